"""The demo end to end, scaled down: data in InternVL format, random init, training, held-out quiz."""

from __future__ import annotations

import json

from interleaf.train.demo import run_demo


def test_demo_end_to_end_small(tmp_path):
    lines = []
    settings = {"n_pairs": 6, "n_shapes": 6, "n_test": 8, "max_digits": 40}
    result = run_demo(
        str(tmp_path), steps=3, image_size=56, log=lines.append, settings=settings, mini_suite=False
    )
    out = "\n".join(lines)
    assert "held-out" in out and "interleaf chat" in out and "checkpoint-3" in result["checkpoint"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert set(result["results"]) == {"digit", "larger", "shape", "colour"}
    assert result["results"]["digit"]["chance"] == 0.1 and result["results"]["digit"]["n"] == 8
    # the training file is the InternVL format and the test digits never appear in it
    train = [
        json.loads(ln) for f in (tmp_path / "data").glob("train_*.jsonl") for ln in f.read_text().splitlines()
    ]
    test = [json.loads(ln) for ln in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    seen = {p for r in train for p in ([r["image"]] if isinstance(r["image"], str) else r["image"])}
    test_digits = {r["image"] for r in test if r["task"] == "digit"}
    assert test_digits and not (test_digits & seen)
    assert all(
        r["conversations"][0]["from"] == "human" and r["conversations"][1]["from"] == "gpt" for r in train
    )
