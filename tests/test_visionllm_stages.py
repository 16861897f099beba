"""VisionLLM v2's training stages: upstream's freeze flags, LLM LoRA and rate groups in `visionllm train`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from interleaf.cli import main
from interleaf.model.visionllm import init_visionllm
from interleaf.train.visionllm import STATE_FILE, freeze_parts, param_groups
from test_visionllm_train import _write, squares


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A tiny detection model and 4 records; returns (folder, train args without -o)."""
    tmp = tmp_path_factory.mktemp("stages")
    _write(tmp / "d.jsonl", squares(tmp, 4, seed=5, size=112))
    init = tmp / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    args = [str(tmp / "d.jsonl"), "--model", str(init), "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
            "--save-every", "2"]  # fmt: skip
    return tmp, args


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_param_groups_scale_upstreams_keyword_groups():
    model, _ = init_visionllm("tiny", seed=0, gen="tiny", region=True)
    groups = param_groups(model, 1.0, lr_llm_multiplier=0.1, lr_backbone_multiplier=0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert len(rate) == len({id(named[n]) for n in trainable})  # every trainable tensor once
    assert not any(id(named[n]) in rate for n in named if n.startswith("sd.sd_vae."))  # frozen: absent

    def of(prefix: str, contains: str = "") -> set[float]:
        return {rate[id(p)] for n, p in named.items() if n.startswith(prefix) and contains in n}

    # upstream: "backbone" / "sampling_offsets" / "reference_points" x lr_multiplier ...
    assert of("gdino.gdino.model.backbone.") == of("gdino.", "sampling_offsets") == {0.5}
    assert of("gdino.", "reference_points") == {0.5}
    # ... "llm" / "vl_bridge" / "region_encoder" x lr_llm_multiplier (the "llm" of llm2sd_mapper too) ...
    assert of("language_model.") == of("mlp1.") == of("region_encoder.") == of("sd.llm2sd_mapper") == {0.1}
    # ... and the rest at the base rate
    assert (
        of("vision_model.")
        == of("emb_embeddings_")
        == of("gdino.patch2query.")
        == of("sd.emb_proj.")
        == {1.0}
    )
    assert len(param_groups(model, 1e-4)) == 1  # multipliers 1: one group, as before they existed


def test_freeze_keeps_parts_bit_identical_out_of_the_state_and_resumes_exactly(det_run):
    tmp, args = det_run
    frozen = ["--freeze", "vision,bridge,llm,queries"]  # upstream's third stage: the decoder alone
    assert main(["visionllm", "train", *args, *frozen, "--steps", "4", "-o", str(tmp / "f4")]) == 0
    before, after = _weights(tmp / "init"), _weights(tmp / "f4")
    kept = ("vision_model.", "mlp1.", "language_model.", "emb_embeddings_")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(kept))
    assert not torch.equal(
        before["gdino.patch2query.layers.0.weight"], after["gdino.patch2query.layers.0.weight"]
    )
    state = torch.load(tmp / "f4" / STATE_FILE, weights_only=False)
    assert state["model"] and not any(k.startswith(kept) for k in state["model"])
    # 2 + 2 steps equal 4, with the frozen parts read from --model again
    assert main(["visionllm", "train", *args, *frozen, "--steps", "2", "-o", str(tmp / "f22")]) == 0
    assert main(["visionllm", "train", *args, *frozen, "--steps", "4", "-o", str(tmp / "f22")]) == 0
    assert (tmp / "f22" / "train_log.jsonl").read_text() == (tmp / "f4" / "train_log.jsonl").read_text()


def test_lora_trains_low_rank_updates_of_upstreams_targets_and_saves_them_merged(det_run):
    tmp, args = det_run
    assert main(["visionllm", "train", *args, "--lora-rank", "2", "--steps", "4", "-o", str(tmp / "l4")]) == 0
    before, after = _weights(tmp / "init"), _weights(tmp / "l4")
    assert before.keys() == after.keys()  # merged: no adapter left, loads as any model
    layer = "language_model.model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        delta = after[layer + name + ".weight"] - before[layer + name + ".weight"]
        assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-4) <= 2, name  # rtol: float rounding
    # upstream's targets leave out the gate projection; the rest of the LLM is frozen but its embeddings
    for name in ("mlp.gate_proj.weight", "input_layernorm.weight", "self_attn.q_proj.bias"):
        assert torch.equal(before[layer + name], after[layer + name]), name
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert not torch.equal(before[name], after[name]), name
    # the state holds the adapters (LoRA dropout draws from the saved RNG): 2 + 2 steps equal 4
    state = torch.load(tmp / "l4" / STATE_FILE, weights_only=False)
    assert any("lora_A" in k for k in state["model"])
    assert (
        main(["visionllm", "train", *args, "--lora-rank", "2", "--steps", "2", "-o", str(tmp / "l22")]) == 0
    )
    assert (
        main(["visionllm", "train", *args, "--lora-rank", "2", "--steps", "4", "-o", str(tmp / "l22")]) == 0
    )
    assert (tmp / "l22" / "train_log.jsonl").read_text() == (tmp / "l4" / "train_log.jsonl").read_text()
    assert (tmp / "l22" / "model.safetensors").read_bytes() == (tmp / "l4" / "model.safetensors").read_bytes()


def test_lora_on_internlm2_wraps_the_fused_projections_as_upstream(tmp_path):
    # InternLM2 fuses q, k and v into one wqkv: one adapter for it, as peft on upstream's wqkv
    _write(tmp_path / "d.jsonl", squares(tmp_path, 2, seed=5, size=112))
    init, out = tmp_path / "init", tmp_path / "l2"
    assert main(["visionllm", "init", "-o", str(init), "--preset", "tiny-internlm2", "--image-size", "112",
                 "--max-tiles", "1"]) == 0  # fmt: skip
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "--lr", "1e-3",
                 "--device", "cpu", "--lora-rank", "2", "--steps", "2", "-o", str(out)]) == 0  # fmt: skip
    before, after = _weights(init), _weights(out)
    assert before.keys() == after.keys()
    layer = "language_model.model.layers.0."
    for name in (
        "attention.wqkv",
        "attention.wo",
        "feed_forward.w3",
        "feed_forward.w2",
    ):  # q k v, o, up, down
        delta = after[layer + name + ".weight"] - before[layer + name + ".weight"]
        assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-4) <= 2, name
    for name in ("feed_forward.w1.weight", "attention_norm.weight"):  # the gate, and the rest: frozen
        assert torch.equal(before[layer + name], after[layer + name]), name
    for name in ("language_model.model.tok_embeddings.weight", "language_model.output.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_rate_multipliers_change_training_and_must_match_on_resume(det_run, capsys):
    tmp, args = det_run
    slow = ["--lr-llm-multiplier", "0.1", "--lr-backbone-multiplier", "0.1"]
    assert main(["visionllm", "train", *args, *slow, "--steps", "2", "-o", str(tmp / "m2")]) == 0
    assert main(["visionllm", "train", *args, "--steps", "2", "-o", str(tmp / "p2")]) == 0
    a, b = _weights(tmp / "m2"), _weights(tmp / "p2")
    assert not torch.equal(a["language_model.model.norm.weight"], b["language_model.model.norm.weight"])
    # the bridge (the LLM's group) moved less than at the full rate
    init = _weights(tmp / "init")
    moved = {
        k: (w["mlp1.1.weight"] - init["mlp1.1.weight"]).abs().max().item() for k, w in (("m", a), ("p", b))
    }
    assert moved["m"] < moved["p"]
    capsys.readouterr()
    assert main(["visionllm", "train", *args, "--steps", "4", "-o", str(tmp / "m2")]) == 1
    assert "trained with lr_llm_multiplier=0.1, not 1.0" in capsys.readouterr().err
    assert (
        main(
            ["visionllm", "train", *args, *slow, "--freeze", "vision", "--steps", "4", "-o", str(tmp / "m2")]
        )
        == 1
    )
    assert "trained with freeze=[], not ['vision']" in capsys.readouterr().err


def test_a_state_written_before_the_stage_settings_resumes(det_run):
    tmp, args = det_run
    assert main(["visionllm", "train", *args, "--steps", "2", "-o", str(tmp / "old")]) == 0
    path = tmp / "old" / STATE_FILE
    state = torch.load(path, weights_only=False)
    for k in ("freeze", "lora_rank", "lr_llm_multiplier", "lr_backbone_multiplier"):
        del state["settings"][k]
    torch.save(state, path)
    assert main(["visionllm", "train", *args, "--steps", "3", "-o", str(tmp / "old")]) == 0


def test_bad_stage_settings_are_one_line_errors(det_run, capsys):
    tmp, args = det_run
    cases = [
        (["--freeze", "vision,wings"], "--freeze: unknown part 'wings' (parts: vision, bridge, llm,"),
        (["--freeze", "region"], "--freeze region: the model has no region_encoder"),
        (["--freeze", "sd"], "--freeze sd: the model has no sd"),
        (
            ["--freeze", "llm", "--lora-rank", "4"],
            "--lora-rank: LoRA trains the LLM, which --freeze llm keeps",
        ),
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--lr-llm-multiplier", "-0.5"], "--lr-llm-multiplier"),
        (
            ["--freeze", "vision,bridge,llm,queries,gdino"],
            "error: --freeze: nothing left to train (every part the model has is frozen)",
        ),
    ]
    for i, (extra, message) in enumerate(cases):
        capsys.readouterr()
        assert main(["visionllm", "train", *args, *extra, "--steps", "1", "-o", str(tmp / f"bad{i}")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra, err)
    model, _ = init_visionllm("tiny", seed=0)
    assert freeze_parts(model, ["backbone"]) == ("gdino.gdino.model.backbone",)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "backbone" in n)


def test_decoders_only_stage_steps_over_batches_that_reach_no_trained_part(tmp_path):
    """With upstream's third stage frozen, a region batch's LM loss reaches no trainable parameter:
    its backward raised 'element 0 of tensors does not require grad' and killed the run."""
    rows = squares(tmp_path, 2, seed=5, size=112)
    rows += [{"image": r["image"], "regions": [r["objects"][0]["box"]], "question": "What is <region>?",
              "answer": r["objects"][0]["phrase"]} for r in rows]  # fmt: skip
    _write(tmp_path / "d.jsonl", rows)
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--region-encoder"]) == 0  # fmt: skip
    out = tmp_path / "s3"
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "--batch-size", "2",
                 "--steps", "4", "--device", "cpu", "--freeze", "vision,bridge,llm,region,queries",
                 "-o", str(out)]) == 0  # fmt: skip
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {e["task"] for e in log} == {"det", "region"}
    before, after = _weights(init), _weights(out)
    assert not torch.equal(
        before["gdino.patch2query.layers.0.weight"], after["gdino.patch2query.layers.0.weight"]
    )
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("region_encoder."))


def test_lora_state_leaves_out_the_llm_weights_lora_keeps_frozen(det_run):
    """LoRA freezes the LLM but its adapters and embeddings: like a --freeze part, those weights never
    change and are read from --model on resume (the state held the whole LLM, every --save-every)."""
    tmp, args = det_run
    assert main(["visionllm", "train", *args, "--lora-rank", "2", "--steps", "2", "-o", str(tmp / "ls")]) == 0
    state = torch.load(tmp / "ls" / STATE_FILE, weights_only=False)["model"]
    llm = {k for k in state if k.startswith("language_model.")}
    trained = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
    assert trained <= llm and any("lora_A" in k for k in llm)
    assert not [k for k in llm - trained if "lora_" not in k and not k.endswith("rotary_emb.inv_freq")]


def test_the_helps_decoders_only_parts_fit_a_model_without_a_region_encoder(capsys):
    """`visionllm init` makes no region encoder unless asked, and --freeze region refuses a model
    without one: the help's stage-3 list must work on such a model (it named region)."""
    with pytest.raises(SystemExit):
        main(["visionllm", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    parts = re.search(r"\(stage 3\): ([a-z,]+)", text).group(1).rstrip(",").split(",")
    assert {"vision", "bridge", "llm", "queries"} <= set(parts)
    model, _ = init_visionllm("tiny", seed=0)
    freeze_parts(model, parts)
