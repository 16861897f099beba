"""ONNX export (interleaf export-onnx) and generation on the export with ONNX Runtime, against the
PyTorch model it came from: graph outputs, greedy and seeded replies, batches, Mono-InternVL routing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from interleaf.errors import CheckpointError, InputError  # noqa: E402
from interleaf.generation.chat import ChatModel  # noqa: E402
from interleaf.generation.onnx import MANIFEST, OnnxModel, export_onnx, is_onnx_export  # noqa: E402


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny_ckpt, out)
    return out


@pytest.fixture(scope="module")
def mono_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Mono-InternVL with visual FFN and attention experts (independent random weights), and its export."""
    from interleaf.model.mono_checkpoint import init_mono_model

    root = tmp_path_factory.mktemp("mono-onnx")
    ckpt = init_mono_model("tiny-mono", root / "ckpt", seed=3, visual_attention_experts=True)
    export_onnx(ckpt, root / "onnx")
    return ckpt, root / "onnx"


def test_export_layout_and_its_own_check(tiny_onnx: Path) -> None:
    names = {p.name for p in tiny_onnx.iterdir()}
    assert {
        "vision_encoder.onnx",
        "embed_tokens.onnx",
        "decoder_model.onnx",
        "config.json",
        MANIFEST,
    } <= names
    assert is_onnx_export(tiny_onnx)
    manifest = json.loads((tiny_onnx / MANIFEST).read_text())
    assert manifest["model"] == "internvl" and manifest["dtype"] == "float32"
    assert set(manifest["check"]) == {"vision", "embed", "decoder_logits", "decoder_present"}
    assert max(manifest["check"].values()) < 1e-4


def test_decoder_graph_names_and_shapes(tiny_onnx: Path, tiny_ckpt: Path) -> None:
    """Prefill (no past) then one decode step with a left-padded row, each against the model's own
    forward on the same tokens."""
    from interleaf.model import load_checkpoint

    model, _ = load_checkpoint(tiny_ckpt)
    onnx_model = OnnxModel(tiny_onnx)
    sess = onnx_model.sessions["decoder"]
    n = model.config.llm.num_hidden_layers
    inputs = [i.name for i in sess.get_inputs()]
    assert inputs[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"] and len(inputs) == 3 + 2 * n
    assert [o.name for o in sess.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]

    ids = torch.tensor([[0, 0, 17, 40, 99, 5], [11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    embeds = onnx_model.embed(ids.numpy())
    pos = np.clip(mask.numpy().cumsum(-1) - 1, 0, None)
    logits, past = onnx_model.decoder_step(embeds, mask.numpy(), pos, onnx_model.empty_past(2))
    assert past[0].shape == (2, model.config.llm.num_key_value_heads, 6, model.config.llm.head_dim)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)

    nxt = torch.tensor([[7], [8]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step_logits, past2 = onnx_model.decoder_step(
        onnx_model.embed(nxt.numpy()), mask2.numpy(), mask.sum(-1, keepdim=True).numpy(), past
    )
    assert past2[-1].shape[2] == 7
    with torch.no_grad():
        want = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1]
    np.testing.assert_allclose(step_logits, want.numpy(), atol=1e-4)


def test_every_generation_step_matches_a_full_forward(tiny_onnx: Path, tiny_ckpt: Path) -> None:
    """The logits of the ONNX prefill and of each decode step (left-padded rows, positions, the growing
    past) are the PyTorch model's at the same positions of one forward over prompt + generated tokens."""
    from interleaf.generation.engine import left_pad
    from interleaf.model import load_checkpoint

    model, _ = load_checkpoint(tiny_ckpt)
    onnx_model = OnnxModel(tiny_onnx)
    seen, step = [], onnx_model.decoder_step

    def spy(*args):
        logits, present = step(*args)
        seen.append(logits.copy())
        return logits, present

    onnx_model.decoder_step = spy
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], pad_id=0)
    out = onnx_model.generator.generate(ids, mask, max_new_tokens=6, ignore_eos=True)
    new = torch.tensor(out.tokens)
    full, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        want = model(input_ids=full, attention_mask=full_mask).logits
    assert len(seen) == 6
    for i, got in enumerate(seen):
        np.testing.assert_allclose(got, want[:, ids.shape[1] - 1 + i].numpy(), atol=1e-4)


def test_replies_equal_the_pytorch_engine(tiny_onnx: Path, tiny_ckpt: Path, noise_image) -> None:
    torch_chat, onnx_chat = ChatModel.from_pretrained(tiny_ckpt), ChatModel.from_pretrained(tiny_onnx)
    assert onnx_chat.device.type == "cpu"
    cases = [
        ("hello", {}),
        ("What is shown?", {"images": noise_image(0)}),
        ("Compare them.", {"images": [noise_image(0), noise_image(1, 300, 500)], "max_num": 3}),
    ]
    for question, kw in cases:
        want = torch_chat.chat(question, max_new_tokens=16, **kw)
        assert onnx_chat.chat(question, max_new_tokens=16, **kw) == want
        assert "".join(onnx_chat.stream_chat(question, max_new_tokens=16, **kw)) == want
    sampled = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 11, "max_new_tokens": 16}
    assert onnx_chat.chat("hello", **sampled) == torch_chat.chat("hello", **sampled)

    # a batch of different lengths, with and without images (left-padded into one ONNX batch)
    questions = ["hi", "What is it?", "Tell me everything about these two pictures, please."]
    images = [None, noise_image(0), [noise_image(0), noise_image(2)]]
    want = [torch_chat.chat(q, images=im, max_new_tokens=10) for q, im in zip(questions, images)]
    assert onnx_chat.batch_chat(questions, images, max_new_tokens=10) == want


def test_mono_internvl_routes_image_tokens_to_its_experts(mono_pair, noise_image) -> None:
    ckpt, out = mono_pair
    assert json.loads((out / MANIFEST).read_text())["model"] == "mono-internvl"
    torch_chat, onnx_chat = ChatModel.from_pretrained(ckpt), ChatModel.from_pretrained(out)
    for kw in (
        {},
        {"images": noise_image(0)},
        {"images": [noise_image(0), noise_image(1, 300, 500)], "max_num": 2},
    ):
        want = torch_chat.chat("Describe it.", max_new_tokens=12, **kw)
        assert onnx_chat.chat("Describe it.", max_new_tokens=12, **kw) == want
    questions, images = ["hi", "What is it?"], [None, noise_image(0)]
    want = [torch_chat.chat(q, images=im, max_new_tokens=8) for q, im in zip(questions, images)]
    assert onnx_chat.batch_chat(questions, images, max_new_tokens=8) == want

    # the graph's visual_mask input decides which expert a token takes: all-text routing differs
    onnx_model = onnx_chat.model
    _, ids, px, _ = torch_chat.prepare("Describe it.", noise_image(0))
    ids = np.array([ids])
    embeds = onnx_model.embed(ids, px.numpy())
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    visual = ids == onnx_model.config.image_token_id
    routed, _ = onnx_model.decoder_step(embeds, mask, pos, onnx_model.empty_past(1), visual)
    text_only, _ = onnx_model.decoder_step(embeds, mask, pos, onnx_model.empty_past(1), np.zeros_like(visual))
    with torch.no_grad():
        want = torch_chat.model(input_ids=torch.from_numpy(ids), pixel_values=px).logits[:, -1]
    np.testing.assert_allclose(routed, want.numpy(), atol=1e-4)
    assert np.abs(text_only - routed).max() > 1e-2


def test_cli_export_then_chat(tiny_ckpt: Path, tmp_path: Path, noise_image) -> None:
    image = tmp_path / "noise.png"
    noise_image(0).save(image)
    out = tmp_path / "export"
    cli = [sys.executable, "-m", "interleaf.cli"]
    done = subprocess.run([*cli, "export-onnx", str(tiny_ckpt), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "decoder_logits" in done.stdout and is_onnx_export(out)
    replies = [
        subprocess.run(
            [*cli, "chat", str(path), "What is it?", "--image", str(image), "--max-new-tokens", "12"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for path in (tiny_ckpt, out)
    ]
    assert replies[0] == replies[1] and replies[0].strip()
    info = subprocess.run([*cli, "info", str(out)], capture_output=True, text=True, check=True).stdout
    assert "ONNX export (vision_encoder.onnx, embed_tokens.onnx, decoder_model.onnx)" in info
    assert "params total" in info


def test_bad_exports_and_options_are_one_line_errors(
    tiny_onnx: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="not an ONNX export"):
        OnnxModel(tmp_path)
    with pytest.raises(InputError, match="overwrite the checkpoint"):
        export_onnx(tiny_ckpt, tiny_ckpt)
    with pytest.raises(InputError, match="runs on the CPU in float32"):
        ChatModel.from_pretrained(tiny_onnx, dtype="bfloat16")

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_onnx.iterdir():
        (broken / f.name).symlink_to(f)
    manifest = json.loads((tiny_onnx / MANIFEST).read_text())
    (broken / MANIFEST).unlink()
    (broken / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        OnnxModel(broken)
    (broken / MANIFEST).write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(CheckpointError, match="not an interleaf ONNX manifest"):
        OnnxModel(broken)
    (broken / MANIFEST).write_text(json.dumps(manifest))
    (broken / "decoder_model.onnx").unlink()
    with pytest.raises(CheckpointError, match="decoder_model.onnx: missing"):
        OnnxModel(broken)
    (broken / "decoder_model.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load it"):
        OnnxModel(broken)

    done = subprocess.run(
        [sys.executable, "-m", "interleaf.cli", "serve", str(tiny_onnx)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "serve the checkpoint it was exported from" in done.stderr
    onnx_chat = ChatModel.from_pretrained(tiny_onnx)
    with pytest.raises(InputError, match="bad generation option"):
        onnx_chat.chat("hi", beams=2)


def test_eval_run_on_an_export_answers_as_the_checkpoint(
    tiny_onnx: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    from interleaf.eval import runner
    from interleaf.eval.mini import make_mini_mmiu

    data = make_mini_mmiu(tmp_path / "mmiu", per_task=1, seed=0).parent
    answers = []
    for model in (tiny_ckpt, tiny_onnx):
        out = tmp_path / model.name
        scores = runner.run(
            str(model), "mmiu", str(data), out, batch_size=4, max_new_tokens=6, progress=False
        )
        assert scores["errors"]["count"] == 0 and scores["run"]["generated"] == scores["num_samples"] == 6
        answers.append(
            [json.loads(line)["response"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        )
    assert answers[0] == answers[1]


@pytest.mark.parametrize(("quantize", "accuracy_level"), [("int4", 0), ("int8", 4)])
def test_quantized_decoder_computes_with_its_dequantized_weights(
    quantize: str, accuracy_level: int, tiny_ckpt: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """ONNX Runtime's MatMulNBits on the quantized decoder equals the PyTorch model on the weights
    dequantize_nbits reads back (exactly with fp32 compute, level 0; within int8 rounding at level 4)."""
    from interleaf.generation.onnx import dequantized_weights
    from interleaf.model import load_checkpoint

    out = tmp_path / quantize
    manifest = export_onnx(tiny_ckpt, out, quantize=quantize, accuracy_level=accuracy_level)
    bits = {"int4": 4, "int8": 8}[quantize]
    assert manifest["quantization"] == {
        "graphs": ["decoder"], "op": "MatMulNBits", "bits": bits, "block_size": 32, "symmetric": True,
        "accuracy_level": accuracy_level,
    }  # fmt: skip
    check = manifest["check"]
    assert check["vision"] < 1e-5 and check["embed"] == 0
    assert check["decoder_logits"] < (1e-5 if accuracy_level == 0 else 0.05)

    model, _ = load_checkpoint(tiny_ckpt)
    lm = model.language_model
    weights = dequantized_weights(out / "decoder_model.onnx", lm)
    linears = {n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(weights) == linears  # every linear layer, lm_head included
    for name, w in weights.items():
        original = lm.get_submodule(name).weight.detach()
        step = original.abs().amax() / (2 ** (bits - 1) - 1)
        assert 0 < (w - original).abs().max() <= step
    fp32 = sum(f.stat().st_size for f in tiny_onnx.glob("decoder_model.onnx*"))
    packed = sum(f.stat().st_size for f in out.glob("decoder_model.onnx*"))
    assert packed < fp32 * (0.45 if bits == 4 else 0.6)
    reply = ChatModel.from_pretrained(out).chat("hello", max_new_tokens=8)
    assert isinstance(reply, str)
