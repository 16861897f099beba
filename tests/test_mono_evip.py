"""EViP on the interleaf trainer: S1.1 then S1.2 train the patch embedding, projector and visual experts
with the LLM frozen, and the text-only logits stay bit-identical (torch.equal) to the original LLM's:
delta tuning loses no language ability. S1.3 and S2 open the attention / everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from interleaf.errors import ConfigError
from interleaf.model import init_model, load_checkpoint
from interleaf.model.mono_checkpoint import (
    init_mono_from_llm,
    load_mono_checkpoint,
    save_mono_checkpoint,
)
from interleaf.model.mono_internvl import MonoInternVLChatModel
from interleaf.train.evip import EVIP_PRESETS, apply_evip_stage, evip_stage_config
from interleaf.train.trainer import Trainer

SHAPES = [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "blue")]


def _image(shape: str, color: str) -> Image.Image:
    img = Image.new("RGB", (448, 448), "white")
    d = ImageDraw.Draw(img)
    box = (100, 100, 348, 348)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(224, 90), (360, 350), (88, 350)], fill=color)
    return img


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evip")
    llm_ckpt = init_model(
        "tiny-internlm2", root / "llm", seed=11
    )  # the "pre-trained" LLM (with a ViT we drop)
    mono, tok = init_mono_from_llm(llm_ckpt, seed=12)
    mono_dir = save_mono_checkpoint(mono, tok, root / "mono-s0")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    with (data / "pairs.jsonl").open("w") as fh:
        for i, (shape, color) in enumerate(SHAPES):
            _image(shape, color).save(data / "images" / f"{i}.png")
            conv = [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"A {color} {shape} on a white background."},
            ]
            fh.write(json.dumps({"id": i, "image": f"{i}.png", "conversations": conv}) + "\n")
    (data / "meta.json").write_text(json.dumps({"shapes": {"root": "images", "annotation": "pairs.jsonl"}}))
    return {"root": root, "llm": llm_ckpt, "mono": mono_dir, "meta": data / "meta.json"}


def _train(stage: str, model_path: Path, meta: Path, out: Path, steps: int, dtype: str = "fp32") -> Path:
    cfg = evip_stage_config(
        stage,
        model_path=str(model_path),
        meta_path=str(meta),
        output_dir=str(out),
        max_steps=steps,
        lr=2e-3,
        warmup_steps=0,
        max_dynamic_patch=1,
        max_seq_length=1024,
        max_packed_tokens=1024,
        batch_size=1,
        device="cpu",
        dtype=dtype,
        weight_decay=0.1,
        log_steps=1,
    )
    trainer = Trainer(cfg, log=None).setup()
    assert isinstance(trainer.raw_model, MonoInternVLChatModel)
    result = trainer.train()
    assert all(loss == loss for _, loss in result["losses"])  # finite, not NaN
    return Path(result["checkpoint"])


def test_s1_delta_tuning_keeps_text_logits_identical(setup):
    base, tok = load_checkpoint(setup["llm"])
    start, _ = load_mono_checkpoint(setup["mono"])
    s11 = _train("evip-s1.1", setup["mono"], setup["meta"], setup["root"] / "run-s1.1", steps=2)
    s12 = _train("evip-s1.2", s11, setup["meta"], setup["root"] / "run-s1.2", steps=1)

    prompts = ["The weather today is", "Describe a red circle in one sentence, please."]
    for ckpt in (s11, s12):
        trained, _ = load_mono_checkpoint(ckpt)
        for text in prompts:
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                want = base(input_ids=ids).logits  # the original LLM, before Mono existed
                got = trained(input_ids=ids).logits
            assert torch.equal(got, want), f"{ckpt.name}: text logits changed"
        # batched, left-padded text too
        batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(got, want)

        before, after = start.state_dict(), trained.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        frozen = [k for k in before if k.startswith("language_model.") and ".feed_forward_ve." not in k]
        assert not changed & set(frozen), sorted(changed & set(frozen))[:3]  # LLM bit-identical
        assert any(".feed_forward_ve." in k for k in changed)  # the visual experts learned
        assert any(k.startswith("vision_model.") for k in changed)  # patch embedding
        assert any(k.startswith("mlp1.") for k in changed)  # projector
    # and the image path did change (the test could fail)
    trained, _ = load_mono_checkpoint(s12)
    ids = torch.tensor(
        [tok("<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nWhat is in the picture?")["input_ids"]]
    )
    px = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        assert not torch.equal(
            trained(input_ids=ids, pixel_values=px).logits, start(input_ids=ids, pixel_values=px).logits
        )


def test_stage_presets_select_the_right_parameters(setup):
    model, _ = load_mono_checkpoint(setup["mono"])
    for stage in EVIP_PRESETS:
        apply_evip_stage(model, stage)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        experts = {n for n in trainable if ".feed_forward_ve." in n}
        attention = {n for n in trainable if ".self_attn." in n}
        other_llm = {
            n
            for n in trainable
            if n.startswith("language_model.") and n not in experts and n not in attention
        }
        assert experts and any(n.startswith("vision_model.") for n in trainable), stage
        assert any(n.startswith("mlp1.") for n in trainable), stage
        if stage in ("evip-s1.1", "evip-s1.2"):
            assert not attention and not other_llm, stage
        elif stage == "evip-s1.3":
            assert attention and not other_llm, stage
        else:  # S2: everything
            assert all(p.requires_grad for p in model.parameters())


def test_evip_stages_are_known_to_a_fresh_trainer_config():
    import subprocess
    import sys

    code = (
        "from interleaf.train.config import build_config; "
        "c = build_config({'stage': 'evip-s1.2', 'model_preset': 'tiny', 'meta_path': 'm.json'}); "
        "print(c.freeze_llm, c.trainable_patterns)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("True") and "feed_forward_ve" in out


def test_s1_in_bf16_master_with_attention_experts_keeps_the_llm_exact(setup):
    # bf16-master (the GPU default) rounds the frozen fp32 LLM into bf16 for the forward; the saved
    # checkpoint must still hold the original weights, or "no language ability lost" breaks.
    base, tok = load_checkpoint(setup["llm"])
    mono, tok2 = init_mono_from_llm(setup["llm"], visual_attention_experts=True, seed=12)
    start_dir = save_mono_checkpoint(mono, tok2, setup["root"] / "mono-attn-s0")
    ckpt = _train(
        "evip-s1.1", start_dir, setup["meta"], setup["root"] / "run-bf16", steps=1, dtype="bf16-master"
    )
    trained, _ = load_mono_checkpoint(ckpt)
    ids = torch.tensor([tok("The weather today is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, base(input_ids=ids).logits)
    before, after = mono.state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("_proj_ve." in k for k in changed)  # the attention experts trained
    assert not {k for k in changed if k.startswith("language_model.") and "_ve." not in k}


def test_s1_on_a_qwen3_llm_with_attention_experts_keeps_its_text_logits(setup):
    """A Mono-InternVL made by ``from-llm --attention-experts`` from InternVL3.5's LLM family (tiny-qwen3,
    whose q/k norms the experts share): S1.1 trains the experts and leaves the text path bit-identical."""
    from interleaf.model.mono_checkpoint import main

    root = setup["root"] / "qwen3"
    llm = init_model("tiny-qwen3", root / "llm", seed=11)
    assert main(["from-llm", str(llm), str(root / "mono-s0"), "--attention-experts", "--seed", "12"]) == 0
    start, _ = load_mono_checkpoint(root / "mono-s0")
    trained, _ = load_mono_checkpoint(
        _train("evip-s1.1", root / "mono-s0", setup["meta"], root / "run", steps=2)
    )
    base, tok = load_checkpoint(llm)
    prompts = ["The weather today is", "Describe a red circle in one sentence, please."]
    batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        for ids, mask in [(torch.tensor([tok(t)["input_ids"]]), None) for t in prompts] + [
            (batch["input_ids"], batch["attention_mask"])
        ]:
            want = base(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(trained(input_ids=ids, attention_mask=mask).logits, want)
    before, after = start.state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".self_attn.q_norm." in k for k in before)
    assert not {k for k in changed if k.startswith("language_model.") and "_ve." not in k}  # norms too
    assert any(".self_attn.q_proj_ve." in k for k in changed)  # the attention experts learned
    assert any(".feed_forward_ve." in k for k in changed)


def test_evip_stages_need_a_mono_model(setup):
    plain, _ = load_checkpoint(setup["llm"])  # InternVL: a ViT, no visual experts
    for stage in EVIP_PRESETS:
        with pytest.raises(ConfigError, match=f"{stage} needs a Mono-InternVL model"):
            apply_evip_stage(plain, stage)


def test_mono_preset_trains_from_scratch_and_a_layout_it_lacks_fails_before_training(setup, tmp_path):
    common = dict(meta_path=str(setup["meta"]), max_steps=1, max_dynamic_patch=1, max_seq_length=1024,
                  max_packed_tokens=1024, batch_size=1, device="cpu", dtype="fp32", log_steps=1)  # fmt: skip
    cfg = evip_stage_config(
        "evip-s1.1", model_preset="tiny-mono", model_overrides={"llm.num_hidden_layers": 1},
        output_dir=str(tmp_path / "a"), **common,
    )  # fmt: skip
    trainer = Trainer(cfg, log=None).setup()
    assert isinstance(trainer.raw_model, MonoInternVLChatModel)
    assert len(trainer.raw_model.language_model.model.layers) == 1
    assert Path(trainer.train()["checkpoint"]).is_dir()
    cfg = evip_stage_config("evip-s1.1", model_path=str(setup["mono"]), save_layout="hf",
                            output_dir=str(tmp_path / "b"), **common)  # fmt: skip
    with pytest.raises(ConfigError, match="no transformers-native"):
        Trainer(cfg, log=None).setup()
    with pytest.raises(ConfigError, match="model_overrides"):
        evip_stage_config("evip-s1.1", model_path=str(setup["mono"]), model_overrides={"llm.x": 1}, **common)
