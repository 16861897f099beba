"""``ChatModel`` / ``interleaf.load`` and the ``interleaf chat`` command on the tiny checkpoint."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

import interleaf
from interleaf.cli import main
from interleaf.errors import InputError


@pytest.fixture(scope="module")
def chat(tiny_ckpt):
    return interleaf.load(tiny_ckpt)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


def test_load_exposes_model_tokenizer_template(chat):
    assert chat.template.name == chat.config.template == "Hermes-2"
    assert chat.model.config is chat.config
    assert chat.tokenizer.convert_ids_to_tokens(chat.stop_token_ids[0]) == "<|im_end|>"
    out = chat.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, chat.config.llm.vocab_size)


def test_prompt_has_system_message_and_expanded_image(chat, image_file):
    question, ids, px, text = chat.prepare("What is it?", images=image_file, max_num=1)
    assert question == "<image>\nWhat is it?"
    assert text.startswith("<|im_start|>system\n" + chat.template.system_message + "<|im_end|>")
    assert text.endswith("</img>\nWhat is it?<|im_end|><|im_start|>assistant\n")
    assert px.shape == (1, 3, 448, 448)
    assert ids.count(chat.config.img_context_token_id) == chat.config.num_image_token
    # the checkpoint's tile budget is the default: 160x120 (4:3) with max 12 -> 4x3 grid + thumbnail
    assert chat.config.max_dynamic_patch == 12
    assert chat.prepare("x", images=image_file)[2].shape[0] == 13


def test_chat_stream_and_batch_agree(chat, image_file):
    kw = dict(max_new_tokens=12)
    reply = chat.chat("Describe the image.", images=str(image_file), max_num=1, **kw)
    assert isinstance(reply, str)
    assert "".join(chat.stream_chat("Describe the image.", images=image_file, max_num=1, **kw)) == reply
    pil = Image.open(image_file)
    assert chat.chat("Describe the image.", images=[pil], max_num=1, **kw) == reply
    text_reply = chat.chat("Say something.", **kw)
    batch = chat.batch_chat(
        ["Describe the image.", "Say something."], images=[image_file, None], max_num=1, **kw
    )
    assert batch == [reply, text_reply]


def test_history_round_trip(chat, image_file):
    reply, history = chat.chat(
        "What is it?", images=image_file, max_num=1, max_new_tokens=6, return_history=True
    )
    assert history == [("<image>\nWhat is it?", reply)]
    _, _, _, text = chat.prepare("And then?", images=image_file, history=history, max_num=1)
    assert text.count("<img>") == 1 and f"assistant\n{reply}<|im_end|>" in text
    assert isinstance(
        chat.chat("And then?", images=image_file, history=history, max_num=1, max_new_tokens=4), str
    )


def test_multi_image_and_video_prompts(chat, image_file, tmp_path):
    _, _, px, text = chat.prepare("Compare them.", images=[image_file, image_file], max_num=2)
    assert "Image-1: <img>" in text and "Image-2: <img>" in text and px.shape[0] == 2
    video = tmp_path / "clip.mkv"
    container = av.open(str(video), "w")
    stream = container.add_stream("ffv1", rate=5)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv444p"
    for k in range(10):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * k, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    _, ids, px, text = chat.prepare("What happens?", video=video, num_segments=3)
    assert px.shape == (3, 3, 448, 448)
    assert "Frame1: <img>" in text and "Frame3: <img>" in text and "Frame4" not in text
    assert isinstance(chat.chat("What happens?", video=video, num_segments=2, max_new_tokens=3), str)


def test_bad_input_is_a_one_line_input_error(chat, image_file, tmp_path):
    with pytest.raises(InputError, match="2 <image> placeholder"):
        chat.chat("<image> vs <image>", images=image_file)
    with pytest.raises(InputError, match="nope.png"):
        chat.chat("hi", images=tmp_path / "nope.png")
    with pytest.raises(InputError, match="batch_chat"):
        chat.batch_chat(["a", "b"], images=[image_file])
    with pytest.raises(InputError, match="either images or a video"):
        chat.chat("x", images=image_file, video=image_file)
    for bad in (0, -1, 2.5, "4"):  # no silent fall-back to one tile
        with pytest.raises(InputError, match="max_num must be a positive int"):
            chat.chat("x", images=image_file, max_num=bad)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(images=5), "images must be an image"),
        (dict(history=[("a",)]), r"history\[0\] must be a \(question, answer\) pair"),
        (dict(history=[(1, 2)]), r"history\[0\] must be a \(question, answer\) pair"),
        (dict(history="abc"), "history must be a list"),
        (dict(num_segments="4"), "num_segments must be a positive int"),
        (dict(video=5), "video must be a file path"),
        (
            dict(pixel_values=torch.zeros(3, 448, 448)),
            r"pixel_values must be a tensor \[tiles, 3, 448, 448\]",
        ),
        (dict(pixel_values=[1, 2]), "pixel_values must be a tensor"),
        (dict(pixel_values=torch.zeros(1, 3, 448, 448), num_tiles=5), "num_tiles must be a list"),
    ],
)
def test_wrongly_typed_api_arguments_are_input_errors_naming_them(chat, kwargs, needle):
    """API misuse fails at the ChatModel boundary, not as a bare TypeError/ValueError deep inside."""
    with pytest.raises(InputError, match=needle):
        chat.chat("hi", max_new_tokens=2, **kwargs)
    if "pixel_values" not in kwargs:  # stream_chat takes no preprocessed tiles
        with pytest.raises(InputError, match=needle):
            list(chat.stream_chat("hi", max_new_tokens=2, **kwargs))


@pytest.mark.parametrize("tiles", [[1, 1], (1, 1), torch.tensor([1, 1]), np.array([1, 1])])
def test_num_tiles_may_be_a_tensor_or_array(chat, tiles):
    """Tile counts as a list, tuple, 1-D tensor or numpy array (all worked before the argument checks)."""
    px = torch.zeros(2, 3, 448, 448)
    reply = chat.chat("<image><image> hi", pixel_values=px, num_tiles=[1, 1], max_new_tokens=2)
    assert chat.chat("<image><image> hi", pixel_values=px, num_tiles=tiles, max_new_tokens=2) == reply
    with pytest.raises(InputError, match="num_tiles must be a list of positive ints"):
        chat.chat("hi", pixel_values=px, num_tiles=torch.tensor([1.0, 1.0]), max_new_tokens=2)


def test_batch_chat_refuses_a_bare_string(chat):
    with pytest.raises(InputError, match="for one question use chat"):  # not two questions 'a' and 'b'
        chat.batch_chat("ab", max_new_tokens=2)


def test_load_refuses_unknown_or_unavailable_devices(tiny_ckpt, capsys):
    from interleaf.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        interleaf.load(tiny_ckpt, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda' is not available"):
            interleaf.load(tiny_ckpt, device="cuda")
    assert main(["chat", str(tiny_ckpt), "hello", "--device", "tpu"]) == 1  # the CLI: the same check
    err = capsys.readouterr().err
    assert "unknown device 'tpu'" in err and err.count("\n") == 1 and "Traceback" not in err


def test_parse_device_auto_is_the_gpu_where_there_is_one():
    from interleaf.model.checkpoint import parse_device

    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_with_device_none_stays_on_cpu(tiny_ckpt):
    """device=None (model.to(None): no move) loaded on the CPU before the device check; it still does."""
    assert interleaf.load(tiny_ckpt, device=None).device.type == "cpu"


def test_cli_chat_streams_the_reply(tiny_ckpt, image_file, chat, capsys):
    assert main(["chat", str(tiny_ckpt), "--image", str(image_file), "--max-num", "1",
                 "--max-new-tokens", "8", "Describe the image."]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed == chat.chat("Describe the image.", images=image_file, max_num=1, max_new_tokens=8) + "\n"


def test_system_message_replaces_the_checkpoints_in_chat_stream_and_cli(tiny_ckpt, chat, capsys):
    system = "Think in <think> </think> tags first, then answer."
    _, ids, _, text = chat.prepare("Why?", system_message=system)
    assert text.startswith("<|im_start|>system\n" + system + "<|im_end|>")
    assert chat.template.system_message not in text
    kw = dict(max_new_tokens=10)
    want = chat.decode_reply(
        chat.generator.generate(torch.tensor([ids]), config=chat._config(dict(kw))).tokens[0]
    )
    assert chat.chat("Why?", system_message=system, **kw) == want
    assert "".join(chat.stream_chat("Why?", system_message=system, **kw)) == want
    assert main(["chat", str(tiny_ckpt), "--system-message", system, "--max-new-tokens", "10", "Why?"]) == 0
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--image", "missing.jpg"], "missing.jpg"),
        (["--video", "missing.mp4"], "missing.mp4"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--max-num", "0"], "--max-num must be >= 1"),
        (["--max-num", "-3"], "--max-num must be >= 1"),
    ],
)
def test_cli_bad_input_exits_1_with_one_line(tiny_ckpt, tmp_path, capsys, extra, needle):
    assert main(["chat", str(tiny_ckpt), *extra, "hello"]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_not_a_checkpoint(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "hello"]) == 1
    assert "not a checkpoint" in capsys.readouterr().err


def test_phi3_template_stops_on_its_end_token(tmp_path_factory):
    from interleaf.model import init_model

    chat = interleaf.load(init_model("tiny-phi3", tmp_path_factory.mktemp("ckpt") / "phi3"))
    assert chat.template.name == "phi3-chat"
    end = chat.tokenizer.convert_tokens_to_ids("<|end|>")
    assert chat.stop_token_ids[0] == end
    _, ids, _, text = chat.prepare("hello")
    assert text.startswith("<|system|>\n") and text.endswith("<|user|>\nhello<|end|><|assistant|>\n")
    assert ids[0] == chat.tokenizer.convert_tokens_to_ids("<s>")  # the Phi-3 tokenizer adds BOS
    # special tokens (BOS, <|end|>) never reach the reply text; it is stripped
    enc = chat.tokenizer.encode(" abc ", add_special_tokens=False)
    assert chat.decode_reply([ids[0], *enc, end]) == "abc"


def test_cli_chat_bf16_text_only(tiny_ckpt, capsys):
    assert main(["chat", str(tiny_ckpt), "--dtype", "bfloat16", "--max-new-tokens", "4", "hello"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_tokenizer_larger_than_the_vocabulary_is_refused_per_prompt(tiny_ckpt, tmp_path, caplog, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    tok = interleaf.load(ckpt).tokenizer
    vocab_size = interleaf.load(ckpt).config.llm.vocab_size
    extra = [f"zzword{i}" for i in range(vocab_size - len(tok) + 5)]  # the last 5 ids past the vocabulary
    tok.add_tokens(extra)
    tok.save_pretrained(str(ckpt))
    with caplog.at_level("WARNING"):
        chat = interleaf.load(ckpt)
    assert "vocab_size" in caplog.text
    assert isinstance(chat.chat("hi", max_new_tokens=2), str)  # prompts within the vocabulary still work
    last = extra[-1]
    with pytest.raises(InputError, match=f"'{last}' has id .*past the model's vocab_size {vocab_size}"):
        chat.chat(f"hi {last}", max_new_tokens=2)
    assert main(["chat", str(ckpt), f"hi {last}"]) == 1
    assert "vocab_size" in capsys.readouterr().err
