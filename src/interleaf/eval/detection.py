"""Detection evaluation of a VisionLLM v2 model, as upstream's ``eval_det`` does it, scored by
pycocotools' ``COCOeval`` (bbox, and segm for masks), the scorer behind mmdet's ``CocoDataset.evaluate``
that upstream calls.

Per image (upstream's evaluation sets build the same input):

1. load: records in ``visionllm train``'s detection format (``{"image", "objects": [{"phrase", "box"}]}``);
   the categories are ``phrases`` (in that order) or every object phrase of the data, in order of
   first appearance; an object whose phrase is no category is left out of the ground truth (counted).
2. prompt: one teacher-forced pass, the question ``Please detect <all categories> in the image.``
   and the answer routing every category in order (``cat[DET][EMB]..., dog[DET]...``; ``[SEG]`` for a
   record whose ``route`` is ``seg``), so the k-th route is category k, for every image alike;
3. extract: the detector, fed the routes' slot states, scores every (object query, category) pair by
   sigmoid; the ``topk`` (default 100) highest pairs are the image's detections, with no threshold
   (upstream's ``post_process_det_gdino``), boxes in the image's pixels;
4. score: COCO AP (IoU .50:.95), AP50, AP75, AP and AR by size, AR at 1/10/100 detections. Every
   object is not-crowd; its area (which sorts it into the small, medium and large buckets) is its
   box's for records with boxes only. COCO's own annotation files give mask areas, which moves objects
   between those buckets but not the AP and AR over all sizes.

Masks, as upstream's ``eval_det`` with ``metric=['bbox', 'segm']``: when the model's detector has a mask
head, each detection also gets its query's mask (upstream's ``post_process_instseg_gdino``: upsampled
by the mask stride, the padding cut off, resized to the image, ``sigmoid > 0.5``), stored as a COCO
RLE. When every record with objects holds their masks as well, ``COCOeval`` also scores segm AP; the
objects' areas are then their masks' (for both scores, as in COCO's files), and the segm results
carry no box, so that pycocotools takes each detection's area from its mask (as mmdet drops it).

Each image's detections are stored as they come (:class:`interleaf.store.ResponseStore`, keyed by the
image's content, the categories, the model and ``topk``): a run killed at any point and run again
redoes nothing and duplicates nothing. Records that cannot be read are skipped with their line and
reason (``skipped.jsonl``).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from interleaf.errors import ConfigError, InputError

# COCOeval's stats, in its order
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")  # fmt: skip


def categories_of(
    records: list[Any], phrases: list[str] | None = None, source: str = "the data"
) -> list[str]:
    """``phrases`` as given, or the records' object phrases in order of first appearance (``source``
    names the records in errors)."""
    if phrases is not None:
        names = [" ".join(p.split()) for p in phrases]
        if not names or not all(names):
            raise InputError("--phrases: an empty phrase")
        if len(set(names)) != len(names):
            raise InputError("--phrases: a phrase given twice")
        from interleaf.train.visionllm import check_phrase

        for p in names:  # a routing or image token would break the routes (route k = category k)
            check_phrase(p, "--phrases")
        return names
    seen: dict[str, None] = {}
    for r in records:
        for label in r.class_labels:
            seen.setdefault(r.phrases[label], None)
    if not seen:
        raise InputError(f"{source}: no object in the data: pass the categories with --phrases")
    return list(seen)


def coco_ground_truth(
    records: list[Any], sizes: list[tuple[int, int]], categories: list[str], masks: bool = False
) -> dict[str, Any]:
    """The COCO ground-truth dict: image ``i`` is record ``i`` (``sizes`` its (width, height)),
    category ``k + 1`` is ``categories[k]``, boxes as [x, y, w, h], area w * h, not crowd. With
    ``masks`` (every record with objects holds their masks) each object also gets its ``segmentation``
    (a COCO RLE) and its mask's area."""
    from pycocotools import mask as coco_mask

    from interleaf.processing.masks import json_rle

    index = {name: k for k, name in enumerate(categories)}
    images = [{"id": i, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    annotations = []
    for i, r in enumerate(records):
        # (a record without objects has no masks: nothing to pair)
        rles = r.masks if masks and r.class_labels else [None] * len(r.boxes)
        for label, (x1, y1, x2, y2), rle in zip(r.class_labels, r.boxes, rles):
            k = index.get(r.phrases[label])
            if k is not None:
                w, h = x2 - x1, y2 - y1
                ann = {"id": len(annotations) + 1, "image_id": i, "category_id": k + 1,
                       "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}  # fmt: skip
                if rle is not None:
                    ann["segmentation"] = json_rle(rle)
                    ann["area"] = float(coco_mask.area(rle))
                annotations.append(ann)
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(categories)]
    return {"images": images, "annotations": annotations, "categories": cats}


def coco_results(detections: list[list[dict[str, Any]]], iou_type: str = "bbox") -> list[dict[str, Any]]:
    """COCO results from each image's ``{"category", "score", "box": [x1, y1, x2, y2], "mask"?: RLE}``:
    ``bbox`` [x, y, w, h] for ``iou_type`` "bbox", the ``segmentation`` RLE (and no box) for "segm"."""
    out = []
    for i, dets in enumerate(detections):
        for d in dets:
            found: dict[str, Any] = {"image_id": i, "category_id": d["category"] + 1}
            if iou_type == "segm":
                found["segmentation"] = d["mask"]
            else:
                x1, y1, x2, y2 = d["box"]
                found["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            out.append({**found, "score": d["score"]})
    return out


def coco_scores(
    ground_truth: dict[str, Any], results: list[dict[str, Any]], iou_type: str = "bbox"
) -> dict[str, float]:
    """pycocotools' ``iou_type`` ("bbox" or "segm") evaluation (its printed summary silenced): the 12
    stats by name; -1 where COCOeval has nothing to average (no object of that size), as it reports."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))  # COCO keeps (and may change) what it is given
        gt.createIndex()
        if results:
            dt = gt.loadRes(json.loads(json.dumps(results)))
        else:  # loadRes refuses an empty list: an empty result set of the same images
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


@torch.no_grad()
def detect_categories(
    model: Any,
    tokenizer: Any,
    image: Any,
    categories: list[str],
    topk: int = 100,
    route: str = "det",
    question: str | None = None,
) -> list[dict[str, Any]]:
    """Upstream's teacher-forced detection of every category in ``image`` (``question``: default
    ``Please detect <categories> in the image.``, as training's default): the ``topk`` best
    (object query, category) pairs by sigmoid score, ``{"category": k, "score", "box": [x1, y1, x2, y2]}``
    in pixels, by score; with a mask head also ``"mask"``, the pair's query's mask as a COCO RLE
    (upstream's ``post_process_instseg_gdino``)."""
    from transformers.image_transforms import center_to_corners_format

    from interleaf.model.grounding_dino import pixel_masks
    from interleaf.model.visionllm import detector_inputs
    from interleaf.processing.masks import json_rle
    from interleaf.train.visionllm import (
        DEFAULT_QUESTION,
        answer_text,
        pad_examples,
        pad_token_id,
        prompt_example,
    )

    question = question or DEFAULT_QUESTION.format(phrases=", ".join(categories))
    example = prompt_example(
        model, tokenizer, question, image, answer_text(categories, route, model.link.num_embs)
    )
    batch = pad_examples([example], pad_token_id(model))
    batch.pop("labels")
    det_pixels, det_mask = detector_inputs([image], model.link.detector_size)
    device, dtype = model.device, next(model.parameters()).dtype
    out = model(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()},
                det_pixel_values=det_pixels.to(device, dtype), det_pixel_mask=det_mask.to(device))  # fmt: skip
    logits = out.det.logits[0, :, : len(categories)].float()  # [queries, categories]: route k = category k
    probs = logits.sigmoid().flatten()
    scores, flat = probs.topk(min(topk, probs.numel()))
    query, category = flat // len(categories), flat % len(categories)
    w, h = image.size
    boxes = center_to_corners_format(out.det.pred_boxes[0].float())[query]
    boxes = boxes * torch.tensor([w, h, w, h], device=boxes.device)
    found = [{"category": int(k), "score": float(s), "box": [float(v) for v in b]}
             for s, k, b in zip(scores.cpu(), category.cpu(), boxes.cpu())]  # fmt: skip
    if out.det.detection.mask_features is not None:
        # the detector's own post-processing of a query's mask (stride up, padding off, image size, > 0.5)
        masks = pixel_masks(out.det.detection, 0, query, [h, w]).cpu().numpy()
        for d, mask in zip(found, masks):
            d["mask"] = json_rle(mask)
    return found


def open_detector(model_dir: str | Path, device: str, out: str | Path) -> tuple[Any, Any, Path, str]:
    """A VisionLLM v2 folder with a detector, loaded for evaluation: (model in eval mode, tokenizer,
    the output folder (made), the model's fingerprint for the store, leaving ``out`` out of it)."""
    from interleaf.eval.adapters import directory_fingerprint
    from interleaf.model.checkpoint import parse_device
    from interleaf.model.visionllm import load_visionllm

    model, tok = load_visionllm(model_dir, device=parse_device(device))
    if model.gdino is None:
        raise ConfigError(f"{model_dir}: the model has no detector (gdino)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return model.eval(), tok, out, directory_fingerprint(model_dir, exclude=out)


def ask_stored(
    model: Any,
    tokenizer: Any,
    store: Any,
    fingerprint: str,
    asks: list[tuple[str, Any, list[str], dict[str, Any], dict[str, Any]]],
    desc: str,
    progress: bool = True,
) -> tuple[list[list[dict[str, Any]]], list[tuple[int, int]], int]:
    """Each ask ``(id, record, categories, settings, kwargs)``: the record image's teacher-forced
    detections (:func:`detect_categories` with ``kwargs``), from ``store`` when it holds them (keyed by
    the id, categories, image content, model and settings), else computed and stored at once.
    Returns (detections, image sizes (width, height), number computed)."""
    from tqdm import tqdm

    from interleaf.processing.image import load_image, to_rgb
    from interleaf.store import file_digest, request_key

    detections: list[list[dict[str, Any]]] = []
    sizes: list[tuple[int, int]] = []
    asked = 0
    for sample_id, r, categories, settings, kwargs in tqdm(
        asks, desc=desc, unit="image", disable=not progress
    ):
        image = to_rgb(load_image(r.image))
        sizes.append(image.size)
        key = request_key(sample_id, json.dumps(categories), [file_digest(r.image)], fingerprint, settings)
        found = store.get(key)
        if found is None:
            found = json.dumps(detect_categories(model, tokenizer, image, categories, **kwargs))
            store.put(key, sample_id, found)
            asked += 1
        detections.append(json.loads(found))
    return detections, sizes, asked


def segm_plan(records: list[Any], with_masks: bool) -> tuple[bool, str | None]:
    """Whether masks are scored: (segm, why not). segm when the detector draws masks and every record
    with objects holds theirs; ``why`` says which is missing when some records hold masks."""
    if not any(r.masks is not None for r in records):
        return False, None
    if not with_masks:
        return False, "the model's detector has no mask head"
    unmasked = next((r for r in records if r.class_labels and r.masks is None), None)
    if unmasked is not None:
        return False, f"the objects of line {unmasked.line} have no masks"
    return True, None


def metrics_table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: a row per metric (the first column's names), a column per named score set."""
    names = next(iter(columns.values()))
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = ["| " + " | ".join([name, *(f"{scores[name]:.4f}" for scores in columns.values())]) + " |"
            for name in names]  # fmt: skip
    return "\n".join([head, *rows])


def evaluate_detection(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    phrases: list[str] | None = None,
    image_root: str | Path | None = None,
    topk: int = 100,
    limit: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """``interleaf visionllm eval-det``: detect every category in every image, store each image's
    detections as they come, and write ``detections.jsonl``, ``coco_results.json``, ``scores.json``,
    ``report.md`` and ``skipped.jsonl`` to ``out`` (with segm, ``coco_results_segm.json`` too);
    returns the scores: ``scores`` (bbox), and ``segm_scores`` or ``segm_not_scored`` (why) when
    the records hold masks."""
    from interleaf.errors import check_minimums
    from interleaf.files import jsonl_text, replace_text
    from interleaf.store import ResponseStore
    from interleaf.train.visionllm import DetectionRecord, read_records

    check_minimums(("--topk", topk, 1), *((("--limit", limit, 1),) if limit is not None else ()))
    records, skipped = read_records(data, image_root)
    # [DET] records, as upstream's eval_det, and [SEG] ones (answered with [SEG], as they were trained);
    # [GRD] (referring expressions) has a metric of its own
    kept = [r for r in records if isinstance(r, DetectionRecord) and r.route in ("det", "seg")]
    taken = {id(r) for r in kept}
    skipped += [{"line": r.line, "reason": "not a detection record"} for r in records if id(r) not in taken]
    skipped.sort(key=lambda s: s["line"])
    records = kept[:limit] if limit is not None else kept
    if not records:
        raise InputError(f"{data}: no detection records")
    categories = categories_of(records, phrases, source=str(data))
    model, tok, out, fingerprint = open_detector(model_dir, device, out)
    room = model.gdino.config.max_text_len
    if len(categories) > room:
        where = "--phrases" if phrases is not None else str(data)
        hint = "" if phrases is not None else " (pick some with --phrases)"
        raise InputError(f"{where}: {len(categories)} categories; the detector takes at most {room}{hint}")
    with_masks = bool(model.gdino.mask_dim)
    segm, segm_why = segm_plan(records, with_masks)
    # a GPU's answers are not the CPU's bits
    params: dict[str, Any] = {"topk": topk, "device": model.device.type}
    if with_masks:  # stored detections hold masks; a box-only model's keys stay as they were
        params["masks"] = True
    # ([DET] records' keys as before the route was part of them)
    asks = [(str(i), r, categories, params if r.route == "det" else {**params, "route": r.route},
             {"topk": topk, "route": r.route}) for i, r in enumerate(records)]  # fmt: skip
    with ResponseStore(out / "responses.sqlite") as store:
        detections, sizes, asked = ask_stored(model, tok, store, fingerprint, asks, "eval-det", progress)
    truth = coco_ground_truth(records, sizes, categories, masks=segm)
    results = coco_results(detections)
    scores = coco_scores(truth, results)
    outside = sum(len(r.class_labels) for r in records) - len(truth["annotations"])
    summary = {"images": len(records), "categories": len(categories), "objects": len(truth["annotations"]),
               "objects_outside_categories": outside, "skipped": len(skipped), "asked": asked, "topk": topk,
               "scores": scores}  # fmt: skip
    if segm:
        segm_results = coco_results(detections, "segm")
        summary["segm_scores"] = coco_scores(truth, segm_results, "segm")
        replace_text(out / "coco_results_segm.json", json.dumps(segm_results))
    elif segm_why is not None:
        summary["segm_not_scored"] = segm_why
    rows = [{"image": str(r.image), "line": r.line, "detections": d} for r, d in zip(records, detections)]
    replace_text(out / "detections.jsonl", jsonl_text(rows))
    replace_text(out / "coco_results.json", json.dumps(results))
    replace_text(out / "scores.json", json.dumps(summary, indent=1) + "\n")
    replace_text(out / "skipped.jsonl", jsonl_text(skipped))
    columns = {"bbox": scores, "segm": summary["segm_scores"]} if segm else {"value": scores}
    kinds = "bbox and segm" if segm else "bbox"
    note = f"\nsegm not scored: {segm_why}\n" if segm_why else ""
    replace_text(out / "report.md", f"# Detection: {Path(data).name}\n\n{len(records)} images, "
                 f"{len(categories)} categories, {summary['objects']} objects (COCOeval {kinds}, top {topk} "
                 f"per image)\n{note}\n{metrics_table(columns)}\n")  # fmt: skip
    return summary


# ---------------------------------------------------------------------------------------- grounding

GROUNDING_METRICS = ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")


def box_overlap(det: list[float], truth: list[float]) -> tuple[float, float, float]:
    """Two pixel boxes [x1, y1, x2, y2]: (pycocotools' IoU, intersection, union), as upstream's
    RefCOCOeval takes them (the IoU for P@k and mIoU; the areas for oIoU)."""
    from pycocotools import mask as coco_mask

    def xywh(b: list[float]) -> list[float]:
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    iou = float(coco_mask.iou([xywh(det)], [xywh(truth)], [0])[0][0])
    inter = max(0.0, min(det[2], truth[2]) - max(det[0], truth[0])) * max(
        0.0, min(det[3], truth[3]) - max(det[1], truth[1])
    )
    union = (det[2] - det[0]) * (det[3] - det[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1]) - inter
    return iou, inter, union


def mask_overlap(det: dict[str, Any], truth: dict[str, Any]) -> tuple[float, float, float]:
    """Two COCO RLE masks of one image (counts as text or bytes; pycocotools reads either):
    (pycocotools' IoU, intersection, union) in pixels."""
    from pycocotools import mask as coco_mask

    iou = float(coco_mask.iou([det], [truth], [0])[0][0])
    a, b = coco_mask.decode(det).astype(bool), coco_mask.decode(truth).astype(bool)
    return iou, float((a & b).sum()), float((a | b).sum())


def grounding_scores(overlaps: list[tuple[float, float, float]]) -> dict[str, float]:
    """Upstream's RefCOCO metrics (its ``RefCOCOeval``) from each expression's top detection against
    its object, ``(iou, intersection, union)``: P@t the share of IoUs strictly above t, oIoU the
    summed intersections over the summed unions, mIoU the mean IoU."""
    if not overlaps:
        return {name: float("nan") for name in GROUNDING_METRICS}
    ious = [o[0] for o in overlaps]
    scores = {f"P@{t}": sum(iou > t for iou in ious) / len(ious) for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
    union = sum(o[2] for o in overlaps)
    scores["oIoU"] = sum(o[1] for o in overlaps) / union if union else float("nan")
    scores["mIoU"] = sum(ious) / len(ious)
    return scores


def evaluate_grounding(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    limit: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """``interleaf visionllm eval-grd``: referring expression comprehension (and segmentation, with
    masks), as upstream evaluates RefCOCO/+/g and ReasonSeg (``task == 'grd'``: one category, top 1).
    Each ``route: grd`` record names one object (its phrase is the expression); the answer to its
    question is teacher-forced with one ``[GRD]`` route and the detector's best query is the
    prediction. Scores: :func:`grounding_scores` of the boxes, and of the masks when every record
    holds its object's mask and the detector has a mask head. Stored as they come (resumable);
    ``detections.jsonl``, ``scores.json``, ``report.md`` and ``skipped.jsonl`` go to ``out``."""
    from interleaf.errors import check_minimums
    from interleaf.files import jsonl_text, replace_text
    from interleaf.store import ResponseStore
    from interleaf.train.visionllm import DetectionRecord, read_records

    if limit is not None:
        check_minimums(("--limit", limit, 1))
    records, skipped = read_records(data, image_root)
    kept = []
    for r in records:
        if not (isinstance(r, DetectionRecord) and r.route == "grd"):
            skipped.append({"line": r.line, "reason": "not a grounding record (route: grd)"})
        elif len(r.boxes) != 1 or len(r.phrases) != 1:
            skipped.append({"line": r.line, "reason": f"a grounding record refers to one object, this one "
                            f"to {len(r.boxes)} (phrases: {len(r.phrases)})"})  # fmt: skip
        else:
            kept.append(r)
    skipped.sort(key=lambda s: s["line"])
    records = kept[:limit] if limit is not None else kept
    if not records:
        raise InputError(f"{data}: no grounding records (route: grd, one object each)")
    model, tok, out, fingerprint = open_detector(model_dir, device, out)
    with_masks = bool(model.gdino.mask_dim)
    segm, segm_why = segm_plan(records, with_masks)  # (each record has its one object)
    settings: dict[str, Any] = {"topk": 1, "route": "grd", "device": model.device.type, "masks": with_masks}
    asks = [(f"grd{i}", r, r.phrases, {**settings, "question": r.question},
             {"topk": 1, "route": "grd", "question": r.question}) for i, r in enumerate(records)]  # fmt: skip
    with ResponseStore(out / "responses.sqlite") as store:
        found, _, asked = ask_stored(model, tok, store, fingerprint, asks, "eval-grd", progress)
    best = [d[0] for d in found]
    summary: dict[str, Any] = {"expressions": len(records), "skipped": len(skipped), "asked": asked,
                               "scores": grounding_scores([box_overlap(d["box"], r.boxes[0])
                                                           for d, r in zip(best, records)])}  # fmt: skip
    if segm:
        summary["segm_scores"] = grounding_scores(
            [mask_overlap(d["mask"], r.masks[0]) for d, r in zip(best, records)]
        )
    elif segm_why is not None:
        summary["segm_not_scored"] = segm_why
    rows = [{"image": str(r.image), "line": r.line, "expression": r.phrases[0], "detection": d}
            for r, d in zip(records, best)]  # fmt: skip
    replace_text(out / "detections.jsonl", jsonl_text(rows))
    replace_text(out / "scores.json", json.dumps(summary, indent=1) + "\n")
    replace_text(out / "skipped.jsonl", jsonl_text(skipped))
    columns = {"box": summary["scores"], **({"mask": summary["segm_scores"]} if segm else {})}
    note = f"\nsegm not scored: {segm_why}\n" if segm_why else ""
    replace_text(out / "report.md", f"# Grounding: {Path(data).name}\n\n{len(records)} expressions (top 1 "
                 f"detection each; P@t: IoU > t)\n{note}\n{metrics_table(columns)}\n")  # fmt: skip
    return summary
