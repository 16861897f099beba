"""`visionllm train` under torchrun (two CPU processes, gloo): DDP's gradient average, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from interleaf.cli import main
from test_visionllm_train import _write, squares

pytestmark = pytest.mark.slow


def _log(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]


def test_two_ranks_train_as_one_process_with_twice_the_grad_accum(tmp_path, torchrun):
    """Region questions (an LM loss alone: the detector's Hungarian matching turns rounding into
    visible loss changes). 2 ranks x 1 record = 1 process x 2 micro-batches of 1 record."""
    rows = []
    for r in squares(tmp_path, 4, seed=7, size=112):
        for obj in r["objects"]:
            rows.append({"image": r["image"], "regions": [obj["box"]], "question": "What is in <region>?",
                         "answer": obj["phrase"]})  # fmt: skip
    _write(tmp_path / "d.jsonl", rows)
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--region-encoder"]) == 0  # fmt: skip
    args = ["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "--batch-size", "1",
            "--lr", "1e-3", "--device", "cpu", "--steps", "3"]  # fmt: skip
    assert main([*args, "--grad-accum", "2", "-o", str(tmp_path / "one")]) == 0
    torchrun(*args, "-o", str(tmp_path / "two"))
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert abs(one[1]["loss"] - one[0]["loss"]) > 1e-2  # the updates matter
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys() and b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    wa, wb = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_two_ranks_resume_exactly_with_each_ranks_noise(tmp_path, torchrun, capsys):
    """Generation records: the diffusion loss draws noise, timesteps and prompt dropout on each rank
    from its own stream (seed + rank); the state keeps both, so 2 + 2 steps equal 4."""
    from PIL import Image

    for name, colour in (("red", "red"), ("blue", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{name}.png")
    rows = [{"route": "gen", "caption": f"a {c} square", "output_image": f"{c}.png"} for c in ("red", "blue")]
    _write(tmp_path / "g.jsonl", rows * 2)
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--gen", "tiny"]) == 0  # fmt: skip
    args = ["visionllm", "train", str(tmp_path / "g.jsonl"), "--model", str(init), "--batch-size", "1",
            "--device", "cpu", "--save-every", "2"]  # fmt: skip
    torchrun(*args, "--steps", "4", "-o", str(tmp_path / "whole"))
    torchrun(*args, "--steps", "2", "-o", str(tmp_path / "parts"))
    state = torch.load(tmp_path / "parts" / "train_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0], state["rng"][1])
    torchrun(*args, "--steps", "4", "-o", str(tmp_path / "parts"))
    assert (tmp_path / "parts" / "train_log.jsonl").read_text() == (
        tmp_path / "whole" / "train_log.jsonl"
    ).read_text()
    capsys.readouterr()
    # the state's ranks are the run's: one process cannot take it over
    assert main([*args, "--steps", "6", "-o", str(tmp_path / "parts")]) == 1
    assert "trained with world_size=2, not 1" in capsys.readouterr().err
