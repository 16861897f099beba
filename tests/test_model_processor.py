"""A saved ``-hf`` checkpoint also works with transformers' processor, and agrees with interleaf.

``save_checkpoint(..., layout="hf")`` writes the processor files transformers' InternVL conversion writes
(image / video preprocessor configs, ``processor_config.json``, ``chat_template.jinja``, named image
tokens in ``tokenizer_config.json``). Checked: the processor's chat prompt, token ids and pixel values
equal interleaf's (``ChatModel.prepare``) for the same image and question, and transformers' model
logits on the processor's outputs equal interleaf's to 1e-4.

``AutoProcessor`` needs torchvision for InternVL's video processor; without it (as in CI) the same
files are loaded by ``InternVLProcessor``'s own loading steps with no video processor.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from interleaf.generation.chat import ChatModel
from interleaf.model import load_checkpoint
from interleaf.model.tokenizer import HF_NAMED_TOKENS, build_offline_tokenizer, hf_chat_template
from interleaf.processing import preprocess_image
from interleaf.processing.templates import get_template


def _load_processor(path):
    if importlib.util.find_spec("torchvision") is not None:
        return transformers.AutoProcessor.from_pretrained(str(path))
    from transformers.models.internvl import InternVLProcessor

    class _ImageOnlyProcessor(InternVLProcessor):
        """InternVLProcessor without a video processor (that class needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    processor_dict, kwargs = _ImageOnlyProcessor.get_processor_dict(str(path))
    parts = [
        transformers.AutoImageProcessor.from_pretrained(str(path)),
        transformers.AutoTokenizer.from_pretrained(str(path)),
        None,
    ]
    return _ImageOnlyProcessor.from_args_and_dict(parts, processor_dict, **kwargs)


@pytest.fixture(scope="module")
def processor(tiny_ckpt_hf):
    return _load_processor(tiny_ckpt_hf)


def _image(width=600, height=280):
    img = Image.new("RGB", (width, height), (240, 240, 230))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 40, 220, 220), fill=(200, 30, 30))
    draw.rectangle((300, 60, 560, 200), fill=(20, 90, 200))
    return img


def test_processor_files(tiny_ckpt_hf, processor):
    cfg = json.loads((tiny_ckpt_hf / "config.json").read_text())
    pre = json.loads((tiny_ckpt_hf / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "GotOcr2ImageProcessor"
    assert pre["size"] == {"height": 448, "width": 448} and pre["crop_to_patches"] is True
    assert (pre["min_patches"], pre["max_patches"]) == (1, cfg["interleaf"]["max_dynamic_patch"])
    assert processor.image_seq_length == cfg["image_seq_length"] == 256
    tok = processor.tokenizer
    for name, token in HF_NAMED_TOKENS.items():
        assert getattr(tok, name) == token
    assert tok.context_image_token_id == cfg["image_token_id"]
    # the named tokens did not shift any id the model uses; the ordinary specials stay whole
    assert tok.convert_tokens_to_ids("<img>") == processor.start_image_token_id
    assert tok.tokenize("<|im_start|>user\nhi<|im_end|>")[0] == "<|im_start|>"


@pytest.mark.parametrize("size", [(600, 280), (300, 300)])
def test_processor_matches_interleaf_prompt_and_pixels(tiny_ckpt_hf, processor, size):
    model, tokenizer = load_checkpoint(tiny_ckpt_hf)
    chat = ChatModel(model, tokenizer, cpu_optimize=False)
    img = _image(*size)
    question = "What colour is the circle?"
    _, ids, pixels, text = chat.prepare(question, images=[img])

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[img], text=prompt, return_tensors="pt")
    ref = preprocess_image(img, max_num=model.config.max_dynamic_patch)
    assert inputs["pixel_values"].shape == ref.shape == pixels.shape
    torch.testing.assert_close(inputs["pixel_values"], ref, atol=1e-5, rtol=0)
    assert inputs["input_ids"][0].tolist() == ids
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == text


def test_transformers_logits_on_processor_outputs(tiny_ckpt_hf, processor):
    from transformers import InternVLForConditionalGeneration

    model, _ = load_checkpoint(tiny_ckpt_hf)
    ref = InternVLForConditionalGeneration.from_pretrained(str(tiny_ckpt_hf), dtype=torch.float32).eval()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    batch = processor(images=[_image(500, 260)], text=prompt, return_tensors="pt")
    assert batch["pixel_values"].shape[0] == 3  # a 2x1 grid + thumbnail
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        theirs = ref(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("template", "bos"), [("Hermes-2", False), ("internvl2_5", False), ("phi3-chat", True)]
)
def test_chat_template_renders_like_interleaf(template, bos):
    tok = build_offline_tokenizer(bos=bos)
    tmpl = get_template(template)
    jinja = hf_chat_template(tmpl, tok.bos_token if bos else None)

    def render(messages):
        return tok.apply_chat_template(
            messages, chat_template=jinja, add_generation_prompt=True, tokenize=False
        )

    prefix = "<s>" if bos else ""
    two_images = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    assert render([{"role": "user", "content": two_images}]) == prefix + tmpl.chat_prompt(
        "Image-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nCompare them."
    )
    history = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
    ]
    expected = tmpl.chat_prompt("<video>\nWhat happens?", [("Hi", "Hello.")], system_message="Be terse.")
    assert render(history) == prefix + expected
    # tokenized: the processor-side tokenization (no second BOS) equals interleaf's
    ids = tok.apply_chat_template(
        history, chat_template=jinja, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(ids) == tok(expected, add_special_tokens=True)["input_ids"]
    assert list(ids).count(tok.bos_token_id) == (1 if bos else 0) or tok.bos_token_id is None
