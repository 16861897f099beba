"""Chat templates and prompt building."""

from __future__ import annotations

import pytest

from interleaf.errors import ConfigError, InputError
from interleaf.processing.prompt import build_prompt, expand_image_placeholders, image_tokens
from interleaf.processing.templates import (
    SYSTEM_INTERNVL2,
    SYSTEM_INTERNVL2_5,
    TEMPLATES,
    get_template,
)

A, B = SYSTEM_INTERNVL2, SYSTEM_INTERNVL2_5


def test_the_four_templates_render_as_upstream():
    msgs = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]
    im = "<|im_start|>"
    expected = {
        "Hermes-2": f"{im}system\n{A}<|im_end|>{im}user\nQ1<|im_end|>{im}assistant\nA1<|im_end|>{im}user\nQ2<|im_end|>{im}assistant\n",
        "internlm2-chat": f"{im}system\n{A}<|im_end|>{im}user\nQ1<|im_end|>{im}assistant\nA1<|im_end|>{im}user\nQ2<|im_end|>{im}assistant\n",
        "phi3-chat": f"<|system|>\n{A}<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\n",
        "internvl2_5": f"{im}system\n{B}<|im_end|>\n{im}user\nQ1<|im_end|>\n{im}assistant\nA1<|im_end|>\n{im}user\nQ2<|im_end|>\n{im}assistant\n",
    }
    assert set(TEMPLATES) == set(expected)
    for name, text in expected.items():
        t = get_template(name)
        assert t.render(msgs, add_generation_prompt=True) == text
        assert t.chat_prompt("Q2", [("Q1", "A1")]) == text
        # an explicitly open assistant turn is the same as the generation prompt
        assert t.render([*msgs, ("assistant", None)]) == text
    assert get_template("phi3-chat").stop_str == "<|end|>"
    assert get_template("internvl2_5").stop_str == "<|im_end|>"


def test_system_message_override_and_dict_messages():
    t = get_template("internvl2_5", system_message="Be brief.")
    assert t.chat_prompt("hi").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    d = [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert get_template("Hermes-2").render(d) == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>"
    )
    with pytest.raises(ConfigError, match="nope"):
        get_template("nope")
    with pytest.raises(InputError, match="role"):
        get_template("Hermes-2").render([("robot", "x")])


def test_parts_label_every_piece_for_loss_masking():
    t = get_template("internvl2_5")
    msgs = [("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")]
    parts = t.parts(msgs)
    assert "".join(p.text for p in parts) == t.render(msgs)
    replies = [p.text for p in parts if p.role == "assistant" and p.kind == "content"]
    assert replies == ["a", "a2"]
    assert [p.kind for p in parts[:2]] == ["header", "sep"] and parts[0].role == "system"
    assert {p.turn for p in parts if p.role == "assistant"} == {1, 3}


def test_image_expansion_in_order():
    t = get_template("Hermes-2")
    prompt = build_prompt(t, "What is this?", num_tiles=[3], num_image_token=2)
    assert f"<|im_start|>user\n<img>{'<IMG_CONTEXT>' * 6}</img>\nWhat is this?<|im_end|>" in prompt
    multi = build_prompt(t, "Compare.", num_tiles=[1, 2], num_image_token=1)
    assert (
        "Image-1: <img><IMG_CONTEXT></img>\nImage-2: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nCompare." in multi
    )
    video = build_prompt(t, "What happens?", num_tiles=[1, 1, 1], num_image_token=1, video=True)
    assert (
        "user\n" + "".join(f"Frame{i}: <img><IMG_CONTEXT></img>\n" for i in (1, 2, 3)) + "What happens?"
        in video
    )
    # explicit placeholders are kept where the user put them
    placed = build_prompt(t, "A <image> then <image>.", num_tiles=[2, 1], num_image_token=1)
    assert "A <img><IMG_CONTEXT><IMG_CONTEXT></img> then <img><IMG_CONTEXT></img>." in placed
    assert image_tokens(2, 256).count("<IMG_CONTEXT>") == 512


def test_history_placeholders_count_and_no_auto_prefix_with_history():
    t = get_template("Hermes-2")
    history = [("<image>\nDescribe.", "A cat.")]
    prompt = build_prompt(t, "And the colour?", num_tiles=[1], history=history, num_image_token=1)
    assert prompt.count("<img>") == 1 and "user\n<img><IMG_CONTEXT></img>\nDescribe." in prompt
    assert "user\nAnd the colour?" in prompt
    # history without placeholder + an image -> no place to put it
    with pytest.raises(InputError, match="0 <image> placeholder"):
        build_prompt(t, "And now?", num_tiles=[1], history=[("hi", "hello")])


def test_placeholder_count_mismatch_is_an_input_error():
    t = get_template("Hermes-2")
    with pytest.raises(InputError, match="2 <image> placeholder.*1 image"):
        build_prompt(t, "<image> and <image>", num_tiles=[1])
    with pytest.raises(InputError, match="1 <image> placeholder.*0 image"):
        build_prompt(t, "<image> what?", num_tiles=[])
    with pytest.raises(InputError):
        expand_image_placeholders("no placeholder", [2])
    assert build_prompt(t, "plain", num_tiles=[]).endswith("user\nplain<|im_end|><|im_start|>assistant\n")
