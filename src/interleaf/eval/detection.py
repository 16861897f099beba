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
    model: Any, tokenizer: Any, image: Any, categories: list[str], topk: int = 100, route: str = "det"
) -> list[dict[str, Any]]:
    """Upstream's teacher-forced detection of every category in ``image``: the ``topk`` best
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

    question = DEFAULT_QUESTION.format(phrases=", ".join(categories))
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
    from tqdm import tqdm

    from interleaf.errors import check_minimums
    from interleaf.eval.adapters import directory_fingerprint
    from interleaf.files import jsonl_text, replace_text
    from interleaf.model.checkpoint import parse_device
    from interleaf.model.visionllm import load_visionllm
    from interleaf.processing.image import load_image, to_rgb
    from interleaf.store import ResponseStore, file_digest, request_key
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
    model, tok = load_visionllm(model_dir, device=parse_device(device))
    if model.gdino is None:
        raise ConfigError(f"{model_dir}: the model has no detector (gdino)")
    room = model.gdino.config.max_text_len
    if len(categories) > room:
        where = "--phrases" if phrases is not None else str(data)
        hint = "" if phrases is not None else " (pick some with --phrases)"
        raise InputError(f"{where}: {len(categories)} categories; the detector takes at most {room}{hint}")
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = directory_fingerprint(model_dir, exclude=out)
    # segm when the detector draws masks and every record with objects holds theirs
    with_masks = bool(model.gdino.mask_dim)
    unmasked = next((r for r in records if r.class_labels and r.masks is None), None)
    segm_why = None
    if any(r.masks is not None for r in records):
        if not with_masks:
            segm_why = "the model's detector has no mask head"
        elif unmasked is not None:
            segm_why = f"the objects of line {unmasked.line} have no masks"
    segm = with_masks and unmasked is None and any(r.masks is not None for r in records)
    # a GPU's answers are not the CPU's bits
    params: dict[str, Any] = {"topk": topk, "device": model.device.type}
    if with_masks:  # stored detections hold masks; a box-only model's keys stay as they were
        params["masks"] = True
    detections: list[list[dict[str, Any]]] = []
    sizes: list[tuple[int, int]] = []
    asked = 0
    with ResponseStore(out / "responses.sqlite") as store:
        for i, r in enumerate(tqdm(records, desc="eval-det", unit="image", disable=not progress)):
            image = to_rgb(load_image(r.image))
            sizes.append(image.size)
            key = request_key(
                str(i),
                json.dumps(categories),
                [file_digest(r.image)],
                fingerprint,
                params if r.route == "det" else {**params, "route": r.route},  # [DET] keys as before
            )
            found = store.get(key)
            if found is None:
                found = json.dumps(detect_categories(model, tok, image, categories, topk, r.route))
                store.put(key, str(i), found)
                asked += 1
            detections.append(json.loads(found))
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
    if segm:
        table = "\n".join(f"| {name} | {value:.4f} | {summary['segm_scores'][name]:.4f} |"
                          for name, value in scores.items())  # fmt: skip
        head, kinds = "| metric | bbox | segm |\n|---|---|---|", "bbox and segm"
    else:
        table = "\n".join(f"| {name} | {value:.4f} |" for name, value in scores.items())
        head, kinds = "| metric | value |\n|---|---|", "bbox"
    note = f"\nsegm not scored: {segm_why}\n" if segm_why else ""
    replace_text(out / "report.md", f"# Detection: {Path(data).name}\n\n{len(records)} images, "
                 f"{len(categories)} categories, {summary['objects']} objects (COCOeval {kinds}, top {topk} "
                 f"per image)\n{note}\n{head}\n{table}\n")  # fmt: skip
    return summary
