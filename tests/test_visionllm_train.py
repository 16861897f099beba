"""VisionLLM v2 detection fine-tuning: records, examples, and the CLI end to end."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.cli import main
from interleaf.errors import InputError
from interleaf.model.visionllm import IGNORE_INDEX, init_visionllm
from interleaf.train.visionllm import (
    answer_text,
    collate_detection,
    encode_detection,
    parse_detection_record,
    read_records,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def squares(folder, n: int, seed: int, size: int = 224) -> list[dict]:
    """Images with a red and a blue square on grey (asked for in random order), and their records."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        img = np.full((size, size, 3), 128, np.uint8)
        objects, taken = [], []
        for colour in rng.sample(sorted(COLOURS), 2):
            while True:
                s = rng.randint(size // 4, size * 2 // 5)
                x, y = rng.randint(0, size - s), rng.randint(0, size - s)
                if all(x + s <= a or a + t <= x or y + s <= b or b + t <= y for a, b, t in taken):
                    break
            taken.append((x, y, s))
            img[y : y + s, x : x + s] = COLOURS[colour]
            objects.append({"phrase": f"{colour} square", "box": [x, y, x + s, y + s]})
        Image.fromarray(img).save(folder / f"sq{seed}_{i}.png")
        rows.append({"image": f"sq{seed}_{i}.png", "objects": objects})
    return rows


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_answer_is_upstreams_detection_format():
    assert (
        answer_text(["cat", "dog"], "det", 4)
        == "cat[DET][EMB][EMB2][EMB3][EMB4], dog[DET][EMB][EMB2][EMB3][EMB4]"
    )
    assert answer_text(["the man"], "grd", 1) == "the man[GRD][EMB]"


def test_bad_records_are_skipped_with_their_line_and_field(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    good = {"image": "a.png", "objects": [{"phrase": "cat", "box": [1, 1, 5, 5]}]}
    rows = [
        good,
        "{not json",
        {"objects": []},
        {"image": "missing.png", "objects": []},
        {"image": "a.png"},
        {"image": "a.png", "objects": [{"phrase": "", "box": [1, 1, 5, 5]}]},
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [5, 1, 1, 5]}]},
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [1, 1, "x", 5]}]},
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [1, 1, 5, 5]}], "phrases": ["dog"]},
        {"image": "a.png", "objects": [], "phrases": ["a[DET]"]},
        {"image": "a.png", "objects": [], "phrases": ["cat", "cat"]},
        {"image": "a.png", "objects": []},
        {"image": "a.png", "objects": [], "phrases": ["cat"], "route": "pose"},
        {**good, "phrases": ["dog", "cat"], "question": "Where?"},
    ]
    _write(tmp_path / "d.jsonl", rows)
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [r.line for r in records] == [1, 14]
    assert (
        records[1].phrases == ["dog", "cat"]
        and records[1].class_labels == [1]
        and records[1].question == "Where?"
    )
    reasons = {s["line"]: s["reason"] for s in skipped}
    assert sorted(reasons) == list(range(2, 14))
    assert reasons[2].startswith("not JSON")
    assert reasons[3] == "image: missing or not a string"
    assert "missing.png not found" in reasons[4]
    assert reasons[5] == "objects: missing or not a list"
    assert reasons[6] == "objects[0].phrase: missing or empty"
    assert "x2 > x1" in reasons[7] and "numbers" in reasons[8]
    assert reasons[9] == "objects: phrase 'cat' is not among phrases"
    assert "contains '[DET]'" in reasons[10] and reasons[11] == "phrases: repeated phrase"
    assert reasons[12].startswith("phrases: nothing to detect") and reasons[13].startswith("route:")
    with pytest.raises(InputError, match="contains ':'"):  # detect names a route by the text after ':'
        parse_detection_record({"image": "a.png", "objects": [], "phrases": ["note: cat"]}, tmp_path)
    with pytest.raises(InputError, match="not a JSON object"):
        parse_detection_record([], tmp_path)


def test_example_labels_the_answer_only_and_targets_are_normalised(tmp_path):
    model, tok = init_visionllm("tiny", detector=False)
    model.config.force_image_size, model.config.max_dynamic_patch = 224, 1
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    rec = parse_detection_record(
        {
            "image": "a.png",
            "objects": [{"phrase": "cat", "box": [20, 10, 60, 50]}],
            "phrases": ["dog", "cat"],
        },
        tmp_path,
    )
    ex = encode_detection(model, tok, rec)
    answer = tok.encode(answer_text(["dog", "cat"], "det", 4) + "<|im_end|>", add_special_tokens=False)
    n = len(answer)
    assert ex["input_ids"][-n:] == answer and ex["labels"][-n:] == answer
    assert set(ex["labels"][:-n]) == {IGNORE_INDEX}
    assert ex["target"]["class_labels"].tolist() == [1]
    torch.testing.assert_close(ex["target"]["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    assert ex["pixel_values"].shape == (1, 3, 224, 224)
    batch = collate_detection([ex, ex], pad_id=0, detector_size=64)
    assert batch["det_pixel_values"].shape == (
        2,
        3,
        53,
        106,
    )  # longest edge <= 64 * 1333 / 800 and batch["attention_mask"].all()
    # the training forward accepts it and finds both routes in each row
    assert [len(row) for row in model.find_links(batch["input_ids"])] == [2, 2]


def test_cli_init_train_detect_learns_to_route_and_localise(tmp_path, capsys):
    """The super link end to end: the LLM learns to answer with one [DET] route per asked phrase, and the
    detector, fed only those routes' hidden states, finds each phrase's own square (not the other)."""
    rows = squares(tmp_path, 8, seed=1)
    _write(tmp_path / "train.jsonl", rows + ['{"image": "nope.png", "objects": []}'])
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "224", "--max-tiles", "1",
                 "--detector-size", "128"]) == 0  # fmt: skip
    out = tmp_path / "trained"
    assert main(["visionllm", "train", str(tmp_path / "train.jsonl"), "--model", str(init), "-o", str(out),
                 "--steps", "600", "--lr", "2e-3", "--device", "cpu"]) == 0  # fmt: skip
    assert "600 steps (600 in all) on 8 records (1 skipped)" in capsys.readouterr().out
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 600 and log[-1]["lm_loss"] < 0.1
    assert "nope.png not found" in (out / "skipped.jsonl").read_text()

    hits = 0
    for row in rows:
        phrases = [o["phrase"] for o in row["objects"]]
        assert main(["visionllm", "detect", str(out), str(tmp_path / row["image"]), "--phrases", ",".join(phrases),
                     "--threshold", "0", "--device", "cpu"]) == 0  # fmt: skip
        result = json.loads(capsys.readouterr().out)
        assert [r["phrase"] for r in result["routes"]] == phrases
        for obj in row["objects"]:
            best = next(d for d in result["detections"] if d["phrase"] == obj["phrase"])
            hits += _iou(best["box"], obj["box"]) > 0.5
    print("hits", hits)
    assert hits >= 12, hits  # of 16 (phrase, image) pairs
    # COCO box AP of the same images (upstream's eval_det): the trained detector, not the initial one
    ap = {}
    capsys.readouterr()
    for name, model in (("init", init), ("trained", out)):
        assert main(["visionllm", "eval-det", str(model), str(tmp_path / "train.jsonl"), "-o", str(tmp_path / f"ev-{name}"),
                     "--device", "cpu"]) == 0  # fmt: skip
        ap[name] = json.loads(capsys.readouterr().out)["scores"]
    print("AP50", ap["init"]["AP50"], ap["trained"]["AP50"], "AP", ap["init"]["AP"], ap["trained"]["AP"])
    assert ap["trained"]["AP50"] >= 0.4 and ap["init"]["AP50"] < 0.1, ap  # measured 0.60 and 0.007


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "objects": []}\n')
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init)]) == 0
    capsys.readouterr()
    assert (
        main(
            ["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o", str(tmp_path / "o")]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable records" in err and "x.png not found" in err
    assert main(["visionllm", "init", "-o", str(init)]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["visionllm", "detect", str(init), str(tmp_path / "none.png"), "--phrases", "cat"]) == 1
    assert "image not found" in capsys.readouterr().err
    assert main(["visionllm", "detect", str(init), str(tmp_path / "d.jsonl")]) == 1
    assert "--question or --phrases" in capsys.readouterr().err


def test_train_resumes_exactly_after_a_kill_and_goes_on_to_more_steps(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    _write(tmp_path / "d.jsonl", squares(tmp_path, 4, seed=3))
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    args = [str(tmp_path / "d.jsonl"), "--model", str(init), "--steps", "6", "--save-every", "2",
            "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(["visionllm", "train", *args, "-o", str(whole)]) == 0
    # --deterministic (for GPUs) changes nothing on the CPU, whose kernels are repeatable anyway
    assert main(["visionllm", "train", *args, "--deterministic", "-o", str(tmp_path / "det")]) == 0
    assert (tmp_path / "det" / "train_log.jsonl").read_text() == (whole / "train_log.jsonl").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "interleaf.cli", "visionllm", "train", *args, "-o", str(broken)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (broken / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (broken / "train_state.pt").exists() and not (broken / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["visionllm", "train", *args, "-o", str(broken)]) == 0
    assert "(6 in all)" in capsys.readouterr().out
    assert (broken / "train_log.jsonl").read_text() == (whole / "train_log.jsonl").read_text()
    a, b = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    more = ["8" if x == "6" else x for x in args]
    assert main(["visionllm", "train", *more, "-o", str(whole)]) == 0
    assert "2 steps (8 in all)" in capsys.readouterr().out
    assert len((whole / "train_log.jsonl").read_text().splitlines()) == 8
    other_lr = ["2e-3" if x == "1e-3" else x for x in more]
    assert main(["visionllm", "train", *other_lr, "-o", str(whole)]) == 1
    assert "trained with lr=0.001, not 0.002" in capsys.readouterr().err


def test_deterministic_algorithms_hold_inside_the_block_and_are_restored_after(monkeypatch):
    from interleaf.train.visionllm import deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyError), deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        raise KeyError  # restored on errors too
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_refusal_is_one_line_naming_the_op(tmp_path, monkeypatch, capsys):
    """CUDA's grid_sample backward (detector, region encoder) refuses deterministic mode; that error,
    raised only on a GPU (tests/test_gpu.py meets the real one), is one line naming the op."""
    import interleaf.train.visionllm as tv

    _write(tmp_path / "d.jsonl", squares(tmp_path, 1, seed=3))
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "grid_sampler_2d_backward_cuda does not have a deterministic implementation, but you set "
            "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation."
        )

    monkeypatch.setattr(tv, "train_visionllm", refuse)
    args = ["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "--device", "cpu"]
    assert main([*args, "--deterministic", "-o", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "error: --deterministic: torch has no deterministic grid_sampler_2d_backward_cuda (train without it)\n"
    )
    with pytest.raises(RuntimeError):  # without the flag it is not ours to explain
        tv.train_command(tmp_path / "d.jsonl", init, tmp_path / "b", device="cpu")


def test_records_whose_text_would_break_training_are_skipped(tmp_path):
    """A question or phrase holding a routing or image token, or a second <image>, made every step
    that drew the record fail (the prompt's image tokens or routes no longer matched)."""
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    good = {"image": "a.png", "objects": [{"phrase": "cat", "box": [1, 1, 5, 5]}]}
    rows = [
        good,
        {**good, "question": "Where is [DET] the cat?"},
        {**good, "question": "<image> and <image>: the cat?"},
        {**good, "question": "a <IMG_CONTEXT> cat?"},
        {"image": "a.png", "objects": [{"phrase": "<img>cat", "box": [1, 1, 5, 5]}]},
        {**good, "question": "<image>\nWhere is the cat?"},
    ]
    _write(tmp_path / "d.jsonl", rows)
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [r.line for r in records] == [1, 6]
    reasons = {s["line"]: s["reason"] for s in skipped}
    assert reasons[2] == "question: contains '[DET]'"
    assert reasons[3].startswith("question: more than one '<image>'")
    assert reasons[4] == "question: contains '<IMG_CONTEXT>'"
    assert reasons[5] == "phrases: '<img>cat' contains '<img>'"


def test_detect_refuses_routing_tokens_in_the_question_naming_the_option(tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init)]) == 0
    capsys.readouterr()
    for option, text in (("--phrases", "cat[DET]"), ("--question", "where is <IMG_CONTEXT>?")):
        assert main(["visionllm", "detect", str(init), str(tmp_path / "a.png"), option, text,
                     "--device", "cpu"]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {option}: ") and "contains" in err, err


def test_records_with_an_unreadable_image_or_a_box_off_the_image_are_skipped(tmp_path):
    """A file that is no image failed the run at the first step that drew it; a box wholly outside
    the image was clamped to a zero-size box on its edge and trained the detector on it."""
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("not an image")
    rows = [
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [-5, -5, 10, 10]}]},  # partly outside: kept
        {"image": "b.png", "objects": [{"phrase": "cat", "box": [1, 1, 5, 5]}]},
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [50, 5, 60, 20]}]},
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [5, -20, 10, 0]}]},
    ]
    _write(tmp_path / "d.jsonl", rows)
    records, skipped = read_records(tmp_path / "d.jsonl")
    assert [r.line for r in records] == [1]
    reasons = {s["line"]: s["reason"] for s in skipped}
    assert reasons[2].startswith("image: ") and "b.png" in reasons[2] and "not a readable image" in reasons[2]
    assert reasons[3] == "objects[0].box: [50, 5, 60, 20] lies outside the 40x30 image"
    assert reasons[4] == "objects[0].box: [5, -20, 10, 0] lies outside the 40x30 image"


def test_a_record_asking_more_phrases_than_the_detector_takes_is_skipped(tmp_path, capsys):
    """One record over the detector's max_text_len (16 routes) refused the whole run, naming no line."""
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "objects": [], "phrases": [f"thing {i}" for i in range(17)]},
        {"image": "a.png", "objects": [{"phrase": "cat", "box": [1, 1, 20, 20]}]},
    ]
    _write(tmp_path / "d.jsonl", rows)
    init, out = tmp_path / "init", tmp_path / "out"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "56", "--max-tiles", "1",
                 "--detector-size", "32"]) == 0  # fmt: skip
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o", str(out),
                 "--steps", "1", "--batch-size", "1", "--device", "cpu"]) == 0  # fmt: skip
    assert "on 1 records (1 skipped)" in capsys.readouterr().out
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"line": 1, "reason": "phrases: 17 asked for; the detector takes at most 16"}]


def test_resume_refuses_a_state_of_something_else_or_data_that_changed(tmp_path, capsys):
    """A train_state.pt that is no run's state was "KeyError: 'settings'"; a records file that lost
    records since the state was taken failed on a stale index or trained on other data silently."""
    _write(tmp_path / "d.jsonl", squares(tmp_path, 3, seed=5, size=40))
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "56", "--max-tiles", "1",
                 "--detector-size", "32"]) == 0  # fmt: skip
    args = [str(tmp_path / "d.jsonl"), "--model", str(init), "--batch-size", "2", "--device", "cpu"]
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"weights": 1}, other / "train_state.pt")
    capsys.readouterr()
    assert main(["visionllm", "train", *args, "--steps", "1", "-o", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_state.pt: not a visionllm train state" in err, err

    out = tmp_path / "out"
    assert main(["visionllm", "train", *args, "--steps", "1", "-o", str(out)]) == 0
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    (tmp_path / "d.jsonl").write_text(lines[0] + "\n")
    capsys.readouterr()
    assert main(["visionllm", "train", *args, "--steps", "2", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run was trained on 3 usable records" in err and "now 1" in err, err


def test_a_kill_during_the_first_state_save_does_not_lock_the_output_folder(tmp_path, capsys):
    """A run killed while writing its first train_state.pt leaves only the partial temporary file;
    the rerun refused the folder as 'not an empty folder'."""
    _write(tmp_path / "d.jsonl", squares(tmp_path, 1, seed=6, size=40))
    init, out = tmp_path / "init", tmp_path / "out"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "56", "--max-tiles", "1",
                 "--detector-size", "32"]) == 0  # fmt: skip
    out.mkdir()
    (out / ".train_state.pt.tmp").write_bytes(b"PK\x03\x04 partial")
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o", str(out),
                 "--steps", "1", "--batch-size", "1", "--device", "cpu"]) == 0  # fmt: skip
    assert "1 steps (1 in all)" in capsys.readouterr().out
    assert (out / "train_state.pt").is_file() and not (out / ".train_state.pt.tmp").exists()


def test_detect_refuses_a_negative_max_new_tokens_in_one_line(tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    assert main(["visionllm", "detect", str(tmp_path / "missing-model"), str(tmp_path / "a.png"),
                 "--phrases", "cat", "--max-new-tokens", "-1"]) == 1  # fmt: skip
    assert capsys.readouterr().err == "error: --max-new-tokens must be >= 0, got -1\n"


def test_resuming_prints_no_scheduler_warning(tmp_path):
    """Every resume printed torch's 'UserWarning: To get the last learning rate computed by the
    scheduler, please use `get_last_lr()`' (the rate was read with get_lr() outside a step)."""
    import warnings

    _write(tmp_path / "d.jsonl", squares(tmp_path, 1, seed=7, size=40))
    init, out = tmp_path / "init", tmp_path / "out"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "56", "--max-tiles", "1",
                 "--detector-size", "32"]) == 0  # fmt: skip
    args = [
        str(tmp_path / "d.jsonl"),
        "--model",
        str(init),
        "-o",
        str(out),
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    assert main(["visionllm", "train", *args, "--steps", "1"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["visionllm", "train", *args, "--steps", "2"]) == 0
    assert not [w for w in caught if "scheduler" in str(w.message)], [str(w.message) for w in caught]


def test_a_batch_larger_than_the_records_is_filled_from_the_next_pass(tmp_path, monkeypatch):
    from interleaf.train import visionllm as tv

    _write(tmp_path / "d.jsonl", squares(tmp_path, 2, seed=4, size=112))
    records, _ = read_records(tmp_path / "d.jsonl")
    model, tok = init_visionllm("tiny", seed=0)
    model.config.force_image_size, model.config.max_dynamic_patch, model.link.detector_size = 112, 1, 128
    sizes = []
    real = tv.collate_detection
    monkeypatch.setattr(
        tv, "collate_detection", lambda examples, *a: sizes.append(len(examples)) or real(examples, *a)
    )
    tv.train_visionllm(model, tok, records, steps=2, batch_size=3)
    assert sizes == [3, 3]  # was [2, 2]: capped at the number of records
