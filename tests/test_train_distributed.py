"""torchrun, 2 CPU ranks, gloo: what a multi-process run must do as one process would.

FSDP with a text-only micro-batch on one rank; skips counted over all ranks; LoRA initialised
alike on every rank; the loss normalised over the whole step (2 processes = 1 with twice the
grad_accum); the training template and tiling saved with the checkpoint.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from interleaf.train.config import build_config
from interleaf.train.trainer import train

WORDS = "one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from interleaf.train.demo import init_demo_model

    d = tmp_path_factory.mktemp("tiny")
    init_demo_model(d, image_size=56, vit=(32, 1), llm=(64, 2))
    return d


def _yaml(values):
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items())


def test_fsdp_text_only_batch_skips_on_both_ranks_and_saved_template(tiny_dir, tmp_path, torchrun):
    """Unpacked, unshuffled: rank 0 reads samples 0, 2, 4, ... and rank 1 samples 1, 3, 5, ...; at
    step 2 rank 1 has the text-only sample 3 while rank 0 has an image (its vision path would get no
    gradient: the ranks' FSDP reduce-scatters would not match); samples 2 and 5 (one per rank) have
    a missing image."""
    rows = []
    for i in range(12):
        Image.new("RGB", (48, 40), (40 * i % 255, 0, 200)).save(tmp_path / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]
        row = {"id": i, "image": f"{i}.png", "conversations": conv}
        if i in (2, 5):
            row["image"] = "missing.png"
        if i == 3:
            row = {
                "id": i,
                "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}],
            }
        rows.append(row)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "t.jsonl"}}))
    out = tmp_path / "out"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        _yaml({"model_path": str(tiny_dir), "meta_path": str(tmp_path / "meta.json"), "output_dir": str(out),
               "max_steps": 4, "device": "cpu", "distributed": "fsdp", "packing": False, "shuffle": False,
               "max_seq_length": 160, "max_dynamic_patch": 2, "use_thumbnail": False, "lr": 1e-3})
    )  # fmt: skip
    proc = torchrun("train", str(cfg_path), "--set", "template=internvl2_5")
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["skipped"] == 2  # rank 0's and rank 1's
    assert "2 samples skipped (missing_image=2)" in proc.stdout
    assert "[rank 1] skipped sample d[5]" in proc.stdout  # rank 1's skips are shown too
    for r in (0, 1):
        assert (out / f"skipped.rank{r}.jsonl").read_text().count("\n") == 1
    saved = json.loads((out / "checkpoint-4" / "config.json").read_text())
    assert saved["template"] == "internvl2_5"
    assert (saved["max_dynamic_patch"], saved["use_thumbnail"]) == (2, False)


def _count_data(tmp_path, n=8):
    """Text-only samples of 42-49 tokens with 2-9 supervised tokens: two fit a 100-token pack, three
    do not, so packs pair samples (0, 1), (2, 3), ... in one process and (0, 2), (1, 3) on 2 ranks."""
    lengths = [1, 6, 3, 8, 2, 7, 4, 5, 1, 6][:n]
    rows = [
        {"id": i, "conversations": [{"from": "human", "value": f"Count to {k}"},
                                    {"from": "gpt", "value": " ".join(WORDS[:k])}]}
        for i, k in enumerate(lengths)
    ]  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "t.jsonl"}}))
    return tmp_path / "meta.json"


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_train_as_one_process_with_twice_the_grad_accum(tiny_dir, tmp_path, mode, torchrun):
    """LoRA (no dropout) with square-root loss weights on packed rows: step 1's loss needs the loss
    normalised over both ranks (not per rank), step 2's also the same LoRA init on both ranks."""
    meta = _count_data(tmp_path)
    values = {"model_path": str(tiny_dir), "meta_path": str(meta), "max_steps": 2, "device": "cpu",
              "packing": True, "pack_lookahead": 1, "max_packed_tokens": 100, "max_seq_length": 100,
              "shuffle": False, "loss_reduction": "square", "use_llm_lora": 4, "lora_dropout": 0.0,
              "freeze_vit": True, "freeze_mlp": True, "lr": 5e-3, "warmup_steps": 0}  # fmt: skip
    one = train(build_config({**values, "output_dir": str(tmp_path / "one"), "grad_accum": 2}), log=None)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(_yaml({**values, "output_dir": str(tmp_path / "two"), "distributed": mode}))
    torchrun("train", str(cfg_path))
    log = [json.loads(ln) for ln in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    a = [loss for _, loss in one["losses"]]
    b = [r["loss"] for r in log]
    assert abs(a[1] - a[0]) > 1e-2  # the update matters
    assert b[0] == pytest.approx(a[0], rel=1e-5, abs=1e-6)
    assert b[1] == pytest.approx(a[1], rel=1e-5, abs=1e-6)
    assert [r["samples"] for r in log] == [4, 4]
