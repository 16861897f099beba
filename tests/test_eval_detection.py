"""VisionLLM v2's detection evaluation: COCO conversion checked against pycocotools run by hand, the
teacher-forced detection against the detector's own post-processing, and the resumable CLI."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.cli import main
from interleaf.errors import InputError
from interleaf.eval.detection import (
    STAT_NAMES,
    categories_of,
    coco_ground_truth,
    coco_results,
    coco_scores,
    detect_categories,
)
from interleaf.model.visionllm import init_visionllm
from interleaf.train.visionllm import DetectionRecord
from test_visionllm_train import _write, squares


def _record(phrases, labels, boxes, line=1):
    return DetectionRecord(
        image=None, phrases=phrases, class_labels=labels, boxes=boxes, question="q", line=line
    )


def _pycocotools(gt: dict, dt: list) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dt), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


def test_scores_are_pycocotools_on_the_same_boxes_in_cocos_own_format():
    records = [
        _record(["cat", "dog"], [0, 1], [[10, 10, 50, 60], [60, 20, 90, 90]]),
        _record(["dog", "bird"], [0, 0, 1], [[0, 0, 30, 30], [40, 40, 99, 99], [5, 50, 25, 70]], line=2),
    ]
    categories = categories_of(records)
    assert categories == ["cat", "dog", "bird"]
    detections = [
        [{"category": 0, "score": 0.9, "box": [12, 11, 49, 58]}, {"category": 1, "score": 0.4, "box": [0, 0, 20, 20]}],
        [{"category": 1, "score": 0.8, "box": [41, 38, 97, 99]}, {"category": 2, "score": 0.7, "box": [60, 60, 80, 80]},
         {"category": 1, "score": 0.3, "box": [2, 1, 31, 29]}],
    ]  # fmt: skip
    ours = coco_scores(
        coco_ground_truth(records, [(100, 100), (100, 100)], categories), coco_results(detections)
    )
    # the same data written by hand in COCO's format: [x, y, w, h], category ids from 1
    gt = {
        "images": [{"id": 0, "width": 100, "height": 100}, {"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 40, 50], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 2, "bbox": [60, 20, 30, 70], "area": 2100, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [40, 40, 59, 59], "area": 3481, "iscrowd": 0},
            {"id": 5, "image_id": 1, "category_id": 3, "bbox": [5, 50, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }
    dt = [
        {"image_id": 0, "category_id": 1, "bbox": [12, 11, 37, 47], "score": 0.9},
        {"image_id": 0, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.4},
        {"image_id": 1, "category_id": 2, "bbox": [41, 38, 56, 61], "score": 0.8},
        {"image_id": 1, "category_id": 3, "bbox": [60, 60, 20, 20], "score": 0.7},
        {"image_id": 1, "category_id": 2, "bbox": [2, 1, 29, 28], "score": 0.3},
    ]
    assert [ours[k] for k in STAT_NAMES] == pytest.approx(_pycocotools(gt, dt), abs=1e-12)
    assert 0 < ours["AP"] < 1
    # the truth itself as detections scores 1; no detections score 0
    perfect = [[{"category": categories.index(r.phrases[k]), "score": 1.0, "box": b}
                for k, b in zip(r.class_labels, r.boxes)] for r in records]  # fmt: skip
    truth = coco_ground_truth(records, [(100, 100), (100, 100)], categories)
    assert coco_scores(truth, coco_results(perfect))["AP"] == pytest.approx(1.0)
    # no detections: 0 where there is truth, and pycocotools' -1 where a size has none (no large box here)
    empty = coco_scores(truth, [])
    assert empty["AP"] == 0.0 and empty["AP_large"] == -1.0 and empty["AR_medium"] == 0.0
    # given categories: objects of other phrases leave the truth
    assert len(coco_ground_truth(records, [(100, 100)] * 2, ["dog"])["annotations"]) == 3


def test_teacher_forced_detection_ranks_every_query_category_pair():
    model, tok = init_visionllm("tiny", seed=0)
    model.config.force_image_size, model.config.max_dynamic_patch, model.link.detector_size = 112, 1, 128
    model.eval()
    image = Image.new("RGB", (160, 120), (128, 128, 128))
    image.paste((220, 30, 30), (20, 30, 70, 90))
    dets = detect_categories(model, tok, image, ["red square", "blue square", "dog"], topk=7)
    assert len(dets) == 7 and [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    assert {d["category"] for d in dets} <= {0, 1, 2}
    # the best pair is the detector's own best (query, route) after its post-processing, on the same routes
    from interleaf.model.visionllm import detector_inputs
    from interleaf.train.visionllm import DEFAULT_QUESTION, answer_text, pad_examples, prompt_example

    names = ["red square", "blue square", "dog"]
    ex = prompt_example(model, tok, DEFAULT_QUESTION.format(phrases=", ".join(names)), image,
                     answer_text(names, "det", model.link.num_embs))  # fmt: skip
    batch = pad_examples([ex], 0)
    batch.pop("labels")
    px, mask = detector_inputs([image], 128)
    with torch.no_grad():
        out = model(**batch, det_pixel_values=px, det_pixel_mask=mask)
    best = model.gdino.postprocess(out.det, [(120, 160)], threshold=0.0)[0]
    assert dets[0]["score"] == pytest.approx(best["scores"][0].item(), abs=1e-6)
    # (the random model's routes may tie: the category's own best score is the pair's)
    assert out.det.logits[0, :, dets[0]["category"]].sigmoid().max().item() == pytest.approx(dets[0]["score"])
    assert dets[0]["box"] == pytest.approx(best["boxes"][0].tolist(), abs=1e-4)


def test_eval_det_cli_writes_scores_and_resumes_without_asking_again(tmp_path, capsys):
    rows = squares(tmp_path, 4, seed=11, size=112)
    rows.insert(1, {"image": "missing.png", "objects": []})
    rows.append(
        {
            "image": rows[0]["image"],
            "regions": [[1, 1, 20, 20]],
            "question": "What is <region>?",
            "answer": "x",
        }
    )
    _write(tmp_path / "d.jsonl", rows)
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--region-encoder"]) == 0  # fmt: skip
    capsys.readouterr()
    args = ["visionllm", "eval-det", str(init), str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "ev")]
    assert main([*args, "--limit", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["asked"] == 2 and first["images"] == 2
    assert main(args) == 0  # the rest only
    summary = json.loads(capsys.readouterr().out)
    assert summary["asked"] == 2 and summary["images"] == 4 and summary["categories"] == 2
    assert summary["objects"] == 8 and set(summary["scores"]) == set(STAT_NAMES)
    out = tmp_path / "ev"
    assert len((out / "detections.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "scores.json").read_text()) == summary
    assert "| AP |" in (out / "report.md").read_text()
    reasons = [json.loads(x)["reason"] for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert any("missing.png" in r for r in reasons) and "not a detection record" in reasons
    # the same scores as a run that asked for every image at once
    assert main([*args[:-1], str(tmp_path / "ev2")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["asked"] == 4 and again["scores"] == summary["scores"]
    assert (tmp_path / "ev2" / "coco_results.json").read_text() == (out / "coco_results.json").read_text()
    # an output folder inside the model's is not part of the model: a rerun asks nothing
    inside = ["visionllm", "eval-det", str(init), str(tmp_path / "d.jsonl"), "-o", str(init / "ev")]
    assert main([*inside, "--limit", "2"]) == 0 and json.loads(capsys.readouterr().out)["asked"] == 2
    assert main(inside) == 0 and json.loads(capsys.readouterr().out)["asked"] == 2


def test_eval_det_bad_input_is_one_line(tmp_path, capsys):
    _write(tmp_path / "d.jsonl", squares(tmp_path, 1, seed=3, size=112))
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    from interleaf.model.visionllm import save_visionllm

    bare = save_visionllm(*init_visionllm("tiny", detector=False), tmp_path / "bare")
    cases = [
        ([str(init), "--phrases", "cat,cat"], "--phrases: a phrase given twice"),
        (
            [str(init), "--phrases", ",".join(f"c{i}" for i in range(300))],
            "categories; the detector takes at most",
        ),
        ([str(init), "--topk", "0"], "--topk"),
        # a routing or image token in a category would break the prompt's routes (route k = category k)
        (
            [str(init), "--phrases", "red square[DET],blue square"],
            "--phrases: 'red square[DET]' contains '[DET]'",
        ),
        (
            [str(init), "--phrases", "red <image> square,dog"],
            "--phrases: 'red <image> square' contains '<image>'",
        ),
        ([str(bare)], "the model has no detector"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["visionllm", "eval-det", extra[0], str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "o"),
                     *extra[1:]]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra[1:], err)
    # categories taken from the data: the errors about them name the data file
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    many = {"image": "a.png", "objects": [{"phrase": f"c{i}", "box": [1, 1, 5, 5]} for i in range(300)]}
    for rows, message in (
        ([{"image": "a.png", "objects": [], "phrases": ["cat"]}], "no object in the data"),
        ([many], "300 categories; the detector takes at most"),
    ):
        _write(tmp_path / "e.jsonl", rows)
        capsys.readouterr()
        assert (
            main(["visionllm", "eval-det", str(init), str(tmp_path / "e.jsonl"), "-o", str(tmp_path / "o")])
            == 1
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and f"{tmp_path / 'e.jsonl'}:" in err, err


def test_eval_det_answers_seg_records_with_seg_routes(tmp_path, monkeypatch, capsys):
    """A [SEG] record is scored on a teacher-forced [SEG] answer, as it was trained; [DET] records keep
    their [DET] answers (and store keys), and [GRD] records are not this evaluation's."""
    from interleaf.eval import detection
    from interleaf.model.visionllm import load_visionllm

    rows = squares(tmp_path, 3, seed=13, size=112)
    rows[1]["route"] = "seg"
    rows[2]["route"] = "grd"
    _write(tmp_path / "d.jsonl", rows)
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    capsys.readouterr()
    real, routes = detection.detect_categories, []

    def spy(model, tokenizer, image, categories, topk=100, route="det"):
        routes.append(route)
        return real(model, tokenizer, image, categories, topk, route)

    monkeypatch.setattr(detection, "detect_categories", spy)
    assert main(["visionllm", "eval-det", str(init), str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert routes == ["det", "seg"] and summary["images"] == 2 and summary["skipped"] == 1
    stored = [json.loads(x) for x in (tmp_path / "ev" / "detections.jsonl").read_text().splitlines()]
    model, tok = load_visionllm(init)
    image = Image.open(tmp_path / rows[1]["image"]).convert("RGB")
    categories = list(dict.fromkeys(o["phrase"] for o in rows[0]["objects"]))
    as_seg = real(model, tok, image, categories, 100, "seg")
    assert stored[1]["detections"] == json.loads(json.dumps(as_seg))
    assert as_seg != real(model, tok, image, categories, 100, "det")  # the routing token is read


def test_segm_ground_truth_takes_records_without_objects():
    """A negative image (no objects, so no masks) among records with masks: segm is still scored
    (every record *with objects* has masks), the negative image adds no truth, only false positives."""
    import numpy as np
    from pycocotools import mask as coco_mask

    m = np.zeros((40, 40), np.uint8)
    m[5:25, 10:30] = 1
    rle = coco_mask.encode(np.asfortranarray(m))
    masked = DetectionRecord(image=None, phrases=["cat"], class_labels=[0], boxes=[[10, 5, 30, 25]],
                             question="q", masks=[rle])  # fmt: skip
    negative = _record(["cat"], [], [], line=2)
    truth = coco_ground_truth([masked, negative], [(40, 40), (40, 40)], ["cat"], masks=True)
    assert len(truth["annotations"]) == 1 and truth["annotations"][0]["area"] == 400.0
    hit = {"category": 0, "score": 0.9, "box": [10, 5, 30, 25],
           "mask": {"size": [40, 40], "counts": rle["counts"].decode()}}  # fmt: skip
    scores = coco_scores(truth, coco_results([[hit], [{**hit, "score": 0.5}]], "segm"), "segm")
    assert scores["AP"] == pytest.approx(1.0)
    scores = coco_scores(
        truth, coco_results([[{**hit, "score": 0.5}], [{**hit, "score": 0.9}]], "segm"), "segm"
    )
    assert scores["AP"] < 1.0


# ---------------------------------------------------------------------------------------- grounding


def _refcocoeval(pairs_xyxy):
    """Upstream's RefCOCOeval arithmetic, by hand: pycocotools' IoU (xywh) for P@t and mIoU, and its
    compute_bbox_iou's intersection and union (xyxy) for oIoU."""
    from pycocotools import mask as coco_mask

    ious, inter_sum, union_sum = [], 0.0, 0.0
    for d, g in pairs_xyxy:
        dx, gx = [d[0], d[1], d[2] - d[0], d[3] - d[1]], [g[0], g[1], g[2] - g[0], g[3] - g[1]]
        ious.append(float(coco_mask.iou([dx], [gx], [0])[0][0]))
        w = max(0.0, min(d[2], g[2]) - max(d[0], g[0]))
        h = max(0.0, min(d[3], g[3]) - max(d[1], g[1]))
        inter = w * h
        inter_sum += inter
        union_sum += (d[2] - d[0]) * (d[3] - d[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    out = {f"P@{t}": float(np.sum(np.array(ious) > t)) / len(ious) for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
    return {**out, "oIoU": inter_sum / union_sum, "mIoU": float(np.mean(ious))}


def test_grounding_scores_are_upstreams_refcoco_metrics():
    from interleaf.eval.detection import GROUNDING_METRICS, box_overlap, grounding_scores, mask_overlap
    from interleaf.processing.masks import json_rle

    pairs = [
        ([0, 0, 10, 10], [0, 0, 10, 10]),  # 1.0
        ([0, 0, 10, 10], [0, 0, 10, 20]),  # exactly 0.5: not above 0.5
        ([0, 0, 10, 10], [0, 0, 10, 14]),  # 0.714
        ([0, 0, 10, 10], [20, 20, 30, 30]),  # 0
        ([2.5, 3.5, 40.25, 18.0], [5.0, 1.0, 38.0, 20.0]),
    ]
    got = grounding_scores([box_overlap(d, g) for d, g in pairs])
    assert list(got) == list(GROUNDING_METRICS)
    assert got == pytest.approx(_refcocoeval(pairs), abs=1e-12)
    # IoUs 1, 0.5, 0.714, 0, 0.688
    assert (got["P@0.5"], got["P@0.6"], got["P@0.7"], got["P@0.8"]) == (3 / 5, 3 / 5, 2 / 5, 1 / 5)
    # masks: the same numbers from the decoded pixels
    rng = np.random.default_rng(0)
    a = [rng.random((20, 30)) > 0.5 for _ in range(3)]
    b = [rng.random((20, 30)) > 0.4 for _ in range(3)]
    got = grounding_scores([mask_overlap(json_rle(x), json_rle(y)) for x, y in zip(a, b)])
    ious = [(x & y).sum() / (x | y).sum() for x, y in zip(a, b)]
    assert got["mIoU"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert got["oIoU"] == pytest.approx(
        sum((x & y).sum() for x, y in zip(a, b)) / sum((x | y).sum() for x, y in zip(a, b))
    )


def test_eval_grd_scores_the_top_grd_detection_and_resumes(tmp_path, monkeypatch, capsys):
    from interleaf.eval import detection
    from test_visionllm_masks import _seg_folder, _with_masks

    rows = []
    for row in _with_masks(squares(tmp_path, 2, seed=14, size=64)):
        for obj in row["objects"]:  # one expression per object, as RefCOCO
            rows.append({"image": row["image"], "objects": [obj], "route": "grd",
                         "question": f"Where is the {obj['phrase']}?"})  # fmt: skip
    rows.append({**rows[0], "route": "det"})  # not a grounding record
    rows.append({**rows[0], "objects": rows[0]["objects"] + rows[1]["objects"]})  # two objects
    _write(tmp_path / "g.jsonl", rows)
    init = _seg_folder(tmp_path / "init")
    real, seen = detection.detect_categories, []

    def spy(model, tokenizer, image, categories, **kwargs):
        seen.append((categories, kwargs))
        return real(model, tokenizer, image, categories, **kwargs)

    monkeypatch.setattr(detection, "detect_categories", spy)
    args = [
        "visionllm",
        "eval-grd",
        str(init),
        str(tmp_path / "g.jsonl"),
        "-o",
        str(tmp_path / "ev"),
        "--device",
        "cpu",
    ]
    assert main([*args, "--limit", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["asked"] == 3
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["expressions"] == 4 and summary["asked"] == 1 and summary["skipped"] == 2
    assert seen[0] == (
        [rows[0]["objects"][0]["phrase"]],
        {"topk": 1, "route": "grd", "question": rows[0]["question"]},
    )
    stored = [json.loads(x) for x in (tmp_path / "ev" / "detections.jsonl").read_text().splitlines()]
    # the reference: upstream's arithmetic on the stored top detections and the records' boxes
    pairs = [(s["detection"]["box"], r["objects"][0]["box"]) for s, r in zip(stored, rows)]
    assert summary["scores"] == pytest.approx(_refcocoeval(pairs), abs=1e-12)
    # masks: pycocotools' IoU of the stored RLE and the record's polygon, and their pixels for oIoU
    from pycocotools import mask as coco_mask

    ious, inter, union = [], 0, 0
    for s, r in zip(stored, rows):
        w, h = Image.open(tmp_path / r["image"]).size
        truth = coco_mask.merge(coco_mask.frPyObjects(r["objects"][0]["mask"], h, w))
        det = {"size": s["detection"]["mask"]["size"], "counts": s["detection"]["mask"]["counts"].encode()}
        ious.append(float(coco_mask.iou([det], [truth], [0])[0][0]))
        a, b = coco_mask.decode(det).astype(bool), coco_mask.decode(truth).astype(bool)
        inter, union = inter + (a & b).sum(), union + (a | b).sum()
    want = {f"P@{t}": sum(i > t for i in ious) / 4 for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
    want.update(oIoU=inter / union, mIoU=float(np.mean(ious)))
    assert summary["segm_scores"] == pytest.approx(want, abs=1e-12) and 0 < want["mIoU"] < 1
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "ev" / "skipped.jsonl").read_text().splitlines()]
    assert reasons == [
        "not a grounding record (route: grd)",
        "a grounding record refers to one object, this one to 2 (phrases: 2)",
    ]
    assert "| P@0.5 |" in (tmp_path / "ev" / "report.md").read_text()
    assert main(args) == 0  # a rerun asks nothing
    assert json.loads(capsys.readouterr().out)["asked"] == 0 and len(seen) == 4
    with pytest.raises(InputError, match="no grounding records"):
        _write(tmp_path / "det.jsonl", squares(tmp_path, 1, seed=15, size=64))
        detection.evaluate_grounding(init, tmp_path / "det.jsonl", tmp_path / "x")
