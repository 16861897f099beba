"""Fine-tuning VisionLLM v2 on grounded detection, image generation and image editing: the LLM learns
to name and route, the super links and the decoders learn end to end (upstream's stage 2, on its
answer formats).

Detection records, one JSON object per line::

    {"image": "img.jpg",                 # relative to the records file's folder, or to image_root
     "objects": [{"phrase": "red square", "box": [x1, y1, x2, y2],             # pixels
                  "mask": [[x1, y1, x2, y2, x3, y3, ...]]}, ...],  # optional: COCO polygons or RLE
     "phrases": ["red square", "blue circle"],   # optional: asked for, in this order; a phrase
                                                 # without objects is a negative (default: the
                                                 # objects' phrases, in order of appearance)
     "question": "...", "route": "det"}          # optional ("det", "grd" or "seg")

Prompt: the image, then the question (default ``Please detect p1, p2 in the image.``). Answer, as
upstream's detection datasets write it: ``p1[DET][EMB][EMB2][EMB3][EMB4], p2[DET][EMB]...`` and the
end-of-turn token. Detector targets: class = the index of the object's phrase among the routes, box
normalised (cx, cy, w, h).

Masks (for a detector with a mask head, ``visionllm init --mask-dim``): an object's ``mask`` is a COCO
``segmentation`` in the image's pixels, polygons ``[[x1, y1, x2, y2, ...], ...]`` or an RLE ``{"size":
[h, w], "counts": str or [runs]}`` (:mod:`interleaf.processing.masks`); a record gives every object a
mask or none. Drawn at the image's size, then resized (nearest) to the detector's input as the image is
(:func:`collate_detection`), they become the targets' ``masks``. A record with masks is skipped (with
its reason) for a model whose detector has no mask head.

Generation and editing records (upstream's ``text2img.py`` / ``ip2p.py`` datasets)::

    {"route": "gen", "caption": "a red square", "output_image": "red.png", "question": "..."?}
    {"route": "edit", "image": "in.png", "caption": "make the square blue", "output_image": "out.png"}

Prompt: ``Generate image with caption: <caption>.`` (the caption lower-cased, upstream's punctuation
removed), or for an edit the image and the capitalised instruction. Answer: ``Here it is
[GEN][EMB]x64.`` (``[EDIT]`` for an edit). The diffusion loss (and 0.1 x upstream's caption loss) is
added to the LM loss.

Region records (visual prompts; the model needs a region encoder), trained with the LM loss::

    {"image": "img.png", "regions": [[x1, y1, x2, y2], ...], "question": "What is <region>?", "answer": "..."}

A batch holds one task (detection, generation, editing or regions), as upstream's.

Records that cannot be used are skipped, each with its line and reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.image_transforms import corners_to_center_format

from interleaf.errors import ConfigError, InputError, cannot_read
from interleaf.model.checkpoint import parse_device
from interleaf.model.visionllm import (
    DECODER_OF,
    DETECTOR_ROUTES,
    EMB_TOKENS,
    IGNORE_INDEX,
    REGION_TOKEN,
    ROUTE_TOKENS,
    SPAN_TOKENS,
    VisionLLMv2Model,
    check_box,
    detector_inputs,
)
from interleaf.processing.image import load_image, preprocess_image, to_rgb
from interleaf.processing.masks import decode_masks, object_mask, resize_masks
from interleaf.processing.prompt import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from interleaf.train.trainer import (
    all_gather_object,
    dist_info,
    ending_process_group,
    init_process_group,
    warmup_cosine,
)

DEFAULT_QUESTION = "Please detect {phrases} in the image."
GEN_QUESTION = "Generate image with caption: {caption}."  # upstream's first prompt of each list
GEN_ANSWER = "Here it is"
STATE_FILE = "train_state.pt"
_LOSS_NAMES = {"lm_loss": "lm", "det_loss": "detector", "sd_loss": "generation", "ip2p_loss": "editing"}
# tokens a question may not hold: they would break the prompt's routes or image tokens
_IN_PROMPT = (*ROUTE_TOKENS.values(), IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
_RESERVED = (*_IN_PROMPT, *EMB_TOKENS, *SPAN_TOKENS, IMAGE_PLACEHOLDER, REGION_TOKEN)
# what a phrase may not hold: the tokens above, and the separators of the answer's routes
PHRASE_FORBIDDEN = (*_RESERVED, ",", ";", ":")


def check_question(question: str, name: str = "question", regions: int = 0) -> None:
    """Refuse a question that holds a routing or image token, more than one ``<image>`` (the prompt
    has one image), or a ``<region>`` count other than ``regions``: an ``InputError`` naming ``name``."""
    bad = next((t for t in _IN_PROMPT if t in question), None)
    if bad:
        raise InputError(f"{name}: contains {bad!r}")
    if question.count(IMAGE_PLACEHOLDER) > 1:
        raise InputError(f"{name}: more than one {IMAGE_PLACEHOLDER!r} (there is one image)")
    if question.count(REGION_TOKEN) != regions:
        raise InputError(
            f"{name}: holds {question.count(REGION_TOKEN)} {REGION_TOKEN!r}, for {regions} regions"
        )


def check_phrase(phrase: str, name: str) -> None:
    """Refuse a phrase holding a routing or image token or a route separator (it would break the
    answer's routes): an ``InputError`` naming ``name``."""
    bad = next((t for t in PHRASE_FORBIDDEN if t in phrase), None)
    if bad:
        raise InputError(f"{name}: {phrase!r} contains {bad!r}")


@dataclass
class DetectionRecord:
    image: Path
    phrases: list[str]
    class_labels: list[int]  # per object: index into phrases
    boxes: list[list[float]]  # per object: x1, y1, x2, y2 in pixels
    question: str
    route: str = "det"
    line: int = 0
    # per object: its mask as a compressed COCO RLE at the image's size; None: the record has none
    masks: list[dict[str, Any]] | None = None


def parse_detection_record(raw: Any, folder: Path, image_root: Path | None = None) -> DetectionRecord:
    """Check one record (see the module docstring); raises InputError naming the field."""
    if not isinstance(raw, dict):
        raise InputError("not a JSON object")
    path, (width, height) = _image_path(raw, "image", folder, image_root)
    objects = raw.get("objects")
    if not isinstance(objects, list):
        raise InputError("objects: missing or not a list")
    found: list[str] = []
    boxes: list[list[float]] = []
    masks: list[dict[str, Any]] = []
    with_mask = [isinstance(obj, dict) and obj.get("mask") is not None for obj in objects]
    for i, obj in enumerate(objects):
        phrase = obj.get("phrase") if isinstance(obj, dict) else None
        box = obj.get("box") if isinstance(obj, dict) else None
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputError(f"objects[{i}].phrase: missing or empty")
        boxes.append(check_box(box, f"objects[{i}].box", width, height))
        found.append(" ".join(phrase.split()))
        if any(with_mask):
            if not with_mask[i]:  # an object without a mask would be trained as all background
                first = with_mask.index(True)
                raise InputError(
                    f"objects[{i}].mask: missing, and objects[{first}] has one (every object of a record "
                    "has a mask, or none)"
                )
            masks.append(object_mask(obj["mask"], f"objects[{i}].mask", width, height))
    phrases = raw.get("phrases")
    if phrases is None:
        phrases = list(dict.fromkeys(found))
    elif not (isinstance(phrases, list) and all(isinstance(p, str) and p.strip() for p in phrases)):
        raise InputError("phrases: must be a list of non-empty strings")
    phrases = [" ".join(p.split()) for p in phrases]
    if not phrases:
        raise InputError("phrases: nothing to detect (no objects and no phrases)")
    if len(set(phrases)) != len(phrases):
        raise InputError("phrases: repeated phrase")
    for p in phrases:
        check_phrase(p, "phrases")
    missing = [p for p in found if p not in phrases]
    if missing:
        raise InputError(f"objects: phrase {missing[0]!r} is not among phrases")
    question = raw.get("question", DEFAULT_QUESTION.format(phrases=", ".join(phrases)))
    if not isinstance(question, str) or not question.strip():
        raise InputError("question: must be a non-empty string")
    check_question(question)
    route = raw.get("route", "det")
    if route not in DETECTOR_ROUTES:
        raise InputError(f"route: must be one of {', '.join(DETECTOR_ROUTES)}, got {route!r}")
    return DetectionRecord(path, phrases, [phrases.index(p) for p in found], boxes, question, route,
                           masks=masks if any(with_mask) else None)  # fmt: skip


@dataclass
class GenerationRecord:
    route: str  # "gen" or "edit"
    caption: str
    output_image: Path
    question: str
    image: Path | None = None  # the image an edit starts from
    line: int = 0


def _image_path(
    raw: dict[str, Any], key: str, folder: Path, image_root: Path | None
) -> tuple[Path, tuple[int, int]]:
    """The readable image file a record's ``key`` names and its (width, height), decoded once, or an
    InputError naming ``key``."""
    name = raw.get(key)
    if not isinstance(name, str) or not name:
        raise InputError(f"{key}: missing or not a string")
    path = Path(name) if Path(name).is_absolute() else (image_root or folder) / name
    if not path.is_file():
        raise InputError(f"{key}: {path} not found")
    try:
        # decoded, not just its header: a truncated file would otherwise stop training when drawn
        return path, load_image(path).size
    except InputError as exc:
        raise InputError(f"{key}: {exc}") from None


def clean_caption(caption: str) -> str:
    """Upstream's ``preprocess_caption``: lower case, ``.!"()*#:;~`` to spaces, spaces squeezed."""
    return " ".join(re.sub(r'[.!"()*#:;~]', " ", caption.lower()).split())


def parse_generation_record(raw: Any, folder: Path, image_root: Path | None = None) -> GenerationRecord:
    """Check one generation (``route`` "gen") or editing (``route`` "edit") record."""
    if not isinstance(raw, dict):
        raise InputError("not a JSON object")
    route = raw.get("route")
    if route not in DECODER_OF:
        raise InputError(f"route: must be one of {', '.join(DECODER_OF)}, got {route!r}")
    caption = raw.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise InputError("caption: missing or empty")
    bad = next((t for t in _RESERVED if t in caption), None)
    if bad:
        raise InputError(f"caption: contains {bad!r}")
    output, (width, height) = _image_path(raw, "output_image", folder, image_root)
    side, limit = max(width, height), Image.MAX_IMAGE_PIXELS
    if route == "gen" and limit is not None and side * side > limit:  # upstream squares it before resizing
        raise InputError(
            f"output_image: {width}x{height} would be padded to a {side}x{side} square (upstream's "
            f"expand2square), over the {limit}-pixel limit"
        )
    image = _image_path(raw, "image", folder, image_root)[0] if route == "edit" else None
    if route == "gen" and raw.get("image") is not None:
        raise InputError("image: a generation record has no input image (route 'edit' edits one)")
    if route == "gen":
        caption = clean_caption(caption)
        if not caption:
            raise InputError("caption: nothing left after upstream's punctuation removal")
        bad = next((t for t in _RESERVED if t in caption), None)  # lower-casing made one ("<DET>")
        if bad:
            raise InputError(f"caption: contains {bad!r} (lower-cased)")
        default = GEN_QUESTION.format(caption=caption)
    else:
        caption = " ".join(caption.split())
        default = caption.capitalize().strip(".") + "."  # upstream's (capitalize lowers the rest)
    question = raw.get("question", default)
    if not isinstance(question, str) or not question.strip():
        raise InputError("question: must be a non-empty string")
    check_question(question)
    if route == "gen" and IMAGE_PLACEHOLDER in question:
        raise InputError(f"question: a generation record has no image for {IMAGE_PLACEHOLDER!r}")
    return GenerationRecord(route, caption, output, question, image)


@dataclass
class RegionRecord:
    """A question about regions of an image (visual prompts), one ``<region>`` per box, in order."""

    image: Path
    boxes: list[list[float]]  # x1, y1, x2, y2 in pixels
    question: str
    answer: str
    line: int = 0


Record = DetectionRecord | GenerationRecord | RegionRecord


def parse_region_record(raw: Any, folder: Path, image_root: Path | None = None) -> RegionRecord:
    """Check one region record ``{"image", "regions": [[x1, y1, x2, y2], ...], "question", "answer"}``."""
    if not isinstance(raw, dict):
        raise InputError("not a JSON object")
    path, (width, height) = _image_path(raw, "image", folder, image_root)
    boxes = raw.get("regions")
    if not isinstance(boxes, list) or not boxes:
        raise InputError("regions: must be a non-empty list of [x1, y1, x2, y2]")
    boxes = [check_box(box, f"regions[{i}]", width, height) for i, box in enumerate(boxes)]
    question, answer = raw.get("question"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise InputError("question: missing or empty")
    check_question(question, regions=len(boxes))
    if not isinstance(answer, str) or not answer.strip():
        raise InputError("answer: missing or empty")
    bad = next((t for t in _RESERVED if t in answer), None)
    if bad:
        raise InputError(f"answer: contains {bad!r}")
    return RegionRecord(path, boxes, question, answer.strip())


def parse_record(raw: Any, folder: Path, image_root: Path | None = None) -> Record:
    """A detection, generation, editing or region record: by its ``route`` (default "det"), or its
    ``regions``."""
    if isinstance(raw, dict) and raw.get("route") in DECODER_OF:
        return parse_generation_record(raw, folder, image_root)
    if isinstance(raw, dict) and "regions" in raw:
        return parse_region_record(raw, folder, image_root)
    return parse_detection_record(raw, folder, image_root)


def read_records(
    path: str | Path, image_root: str | Path | None = None
) -> tuple[list[Record], list[dict[str, Any]]]:
    """The usable records of a JSONL file (detection, generation, editing, regions) and the skipped ones
    (``{"line", "reason"}``)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    records: list[Record] = []
    skipped: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_record(json.loads(line), path.parent, root)
        except json.JSONDecodeError as exc:
            skipped.append({"line": n, "reason": f"not JSON ({exc.msg})"})
            continue
        except InputError as exc:
            skipped.append({"line": n, "reason": str(exc)})
            continue
        record.line = n
        records.append(record)
    return records, skipped


def answer_text(phrases: list[str], route: str, num_embs: int) -> str:
    """Upstream's answer: each phrase, its routing token and its query tokens, comma-separated."""
    link = ROUTE_TOKENS[route] + "".join(EMB_TOKENS[:num_embs])
    return ", ".join(p + link for p in phrases)


def prompt_example(
    model: VisionLLMv2Model, tokenizer: Any, question: str, image: Any, answer: str
) -> dict[str, Any]:
    """ids/labels (the answer only, with the end of turn) and the MLLM's tiles (None without an image)."""
    from interleaf.processing.prompt import build_prompt
    from interleaf.processing.templates import get_template

    cfg = model.config
    pixels, tiles = None, []
    if image is not None:
        pixels = preprocess_image(image, max_num=cfg.max_dynamic_patch, min_num=cfg.min_dynamic_patch,
                                  image_size=cfg.image_size, use_thumbnail=cfg.use_thumbnail,
                                  dynamic=cfg.dynamic_image_size)  # fmt: skip
        tiles = [pixels.shape[0]]
    template = get_template(cfg.template)
    prompt = build_prompt(template, question, tiles, num_image_token=model.num_image_token)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer + template.stop_str, add_special_tokens=False)
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "pixel_values": pixels,
    }


def encode_detection(model: VisionLLMv2Model, tokenizer: Any, record: DetectionRecord) -> dict[str, Any]:
    """One training example: ids/labels (answer only), the MLLM's tiles, the detector's image and
    targets; a record with masks adds the target ``masks`` [n, H, W] bool at the image's size
    (:func:`collate_detection` brings them to the detector's input)."""
    image = to_rgb(load_image(record.image))
    answer = answer_text(record.phrases, record.route, model.link.num_embs)
    w, h = image.size
    boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w) / w
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h) / h
    cxcywh = corners_to_center_format(boxes)
    target = {"class_labels": torch.tensor(record.class_labels, dtype=torch.long), "boxes": cxcywh}
    if record.masks is not None:
        target["masks"] = decode_masks(record.masks)
    return {
        **prompt_example(model, tokenizer, record.question, image, answer),
        "image": image,
        "target": target,
    }


def encode_generation(model: VisionLLMv2Model, tokenizer: Any, record: GenerationRecord) -> dict[str, Any]:
    """One training example: ids/labels (answer only), the MLLM's tiles (an edit's image), the target
    image (and an edit's input image) as the diffusion decoder takes them, and the caption."""
    from interleaf.model.stable_diffusion import output_image_tensor

    module = model.diffusion(record.route)
    if module is None:
        raise InputError(
            f"train: the model has no {DECODER_OF[record.route]} for {ROUTE_TOKENS[record.route]}"
        )
    link = ROUTE_TOKENS[record.route] + EMB_TOKENS[0] * model.link.num_embs_gen
    image = to_rgb(load_image(record.image)) if record.image is not None else None
    example = prompt_example(model, tokenizer, record.question, image, f"{GEN_ANSWER} {link}.")
    example["output_image"] = output_image_tensor(to_rgb(load_image(record.output_image)), module.config)
    example["input_image"] = output_image_tensor(image, module.config) if image is not None else None
    example["caption"] = record.caption
    return example


def pad_token_id(model: VisionLLMv2Model) -> int:
    """The id that pads the LLM's input (0 where its config names none)."""
    pad = model.config.llm.pad_token_id
    return pad if pad is not None else 0


def pad_examples(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded ids, labels and attention mask; the examples' tiles concatenated (None if none)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    pixels = [e["pixel_values"] for e in examples if e["pixel_values"] is not None]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }


def collate_detection(examples: list[dict[str, Any]], pad_id: int, detector_size: int) -> dict[str, Any]:
    """Right-padded batch for :meth:`VisionLLMv2Model.forward`. Target ``masks`` are resized (nearest)
    to the size the detector's preprocessing gave their image: [n, h, w] over the image's top-left
    part of the padded input, which the detector pads."""
    from interleaf.model.grounding_dino import image_sizes

    det_pixels, det_mask = detector_inputs([e["image"] for e in examples], detector_size)
    targets = []
    for e, size in zip(examples, image_sizes(det_mask)):  # the resized images' sizes
        target = e["target"]
        if "masks" in target:
            target = {**target, "masks": resize_masks(target["masks"], size)}
        targets.append(target)
    return {
        **pad_examples(examples, pad_id),
        "det_pixel_values": det_pixels,
        "det_pixel_mask": det_mask,
        "det_targets": targets,
    }


def encode_region(model: VisionLLMv2Model, tokenizer: Any, record: RegionRecord) -> dict[str, Any]:
    """One training example: ids/labels (the answer only), the MLLM's tiles and the regions."""
    from interleaf.model.visionllm import region_inputs

    image = to_rgb(load_image(record.image))
    return {
        **prompt_example(model, tokenizer, record.question, image, record.answer),
        "regions": region_inputs(model, image, record.boxes),
    }


def collate_generation(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch of generation (or of editing) examples for :meth:`VisionLLMv2Model.forward`."""
    inputs = [e["input_image"] for e in examples]
    return {
        **pad_examples(examples, pad_id),
        "output_images": torch.stack([e["output_image"] for e in examples]),
        "input_images": torch.stack(inputs) if all(x is not None for x in inputs) else None,
        "captions": [e["caption"] for e in examples],
    }


def task_of(record: Record) -> str:
    """A record's task: "det" (DET/GRD/SEG), "gen", "edit" or "region"; a batch holds one task."""
    if isinstance(record, RegionRecord):
        return "region"
    return record.route if isinstance(record, GenerationRecord) else "det"


def next_batch(
    order: list[int], records: list[Any], batch_size: int, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """The next batch of record indices and the order left: the first ``batch_size`` indices of the
    task of the first index in ``order``, which grows by shuffled passes over ``records`` as needed (a
    batch may span two passes). With one task this is simply the first ``batch_size`` of ``order``."""
    while True:
        if order:
            task = task_of(records[order[0]])
            picked = [pos for pos, i in enumerate(order) if task_of(records[i]) == task][:batch_size]
            if len(picked) == batch_size:
                break
        order = order + torch.randperm(len(records), generator=generator).tolist()
    taken = set(picked)
    return [order[pos] for pos in picked], [i for pos, i in enumerate(order) if pos not in taken]


def train_visionllm(
    model: VisionLLMv2Model,
    tokenizer: Any,
    records: list[Record],
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-4,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
    resume: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    save_every: int = 0,
    max_grad_norm: float | None = 1.0,
    min_lr_ratio: float = 0.1,
    lr_llm_multiplier: float = 1.0,
    lr_backbone_multiplier: float = 1.0,
    grad_accum: int = 1,
) -> list[dict[str, float]]:
    """AdamW on LM loss + the decoders' losses over shuffled passes of ``records``, one task per batch
    (``lr`` after a linear warm-up over the first 5% of steps, cosine to ``min_lr_ratio`` x ``lr`` at
    ``steps``); returns the step log.

    Every ``save_every`` steps ``save`` gets the training state (step, optimizer, data order, random
    states, log; the model's weights are the caller's to store); ``resume`` (such a state, with the
    model already holding its weights) continues exactly where it was taken. Each parameter's rate is
    ``lr`` times its group's multiplier (:func:`param_groups`); frozen parameters (``requires_grad``
    off: :func:`freeze_parts`, LoRA) are not trained, and a batch whose loss reaches none of the
    trained ones (a region batch when the LLM side is frozen) is a step without an update.

    A step's gradient is the mean over ``grad_accum`` micro-batches of ``batch_size`` and, under
    torchrun (a process group), over the ranks, as DDP averages: every rank draws the same step batch
    of ``world x grad_accum x batch_size`` records of one task and takes its own slices. The log holds
    the losses averaged the same way; the state holds every rank's random state."""
    if not records:
        raise InputError("train: no usable records")
    missing = next(filter(None, (missing_tool(model, r) for r in records)), None)
    if missing:
        raise InputError(f"train: {missing}")
    pad = pad_token_id(model)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    rank, world = _rank_world()
    groups = param_groups(model, lr, lr_llm_multiplier, lr_backbone_multiplier)
    if not groups:
        raise InputError("train: nothing to train (every part frozen)")
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    # the Hungarian-matched detector loss settles as the rate falls
    sched = warmup_cosine(opt, max(1, steps // 20), steps, min_lr_ratio)
    log: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        start, order, log = resume["step"], list(resume["order"]), list(resume["log"])
        opt.load_state_dict(resume["optimizer"])
        sched.last_epoch = start  # the schedule is a function of the step alone (a longer rerun stretches it)
        for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(start)  # LambdaLR's rate at `start` (its get_lr() warns here)
        gen.set_state(resume["generator"])
        rng, cuda_rng = resume["rng"], resume.get("cuda_rng")
        if isinstance(rng, list):  # a state of ranks: this rank's
            rng, cuda_rng = rng[rank], cuda_rng[rank]
        torch.set_rng_state(rng)
        if cuda_rng is not None and model.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, model.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(start + 1, steps + 1):
        chosen, order = next_batch(order, records, batch_size * grad_accum * world, gen)
        task = task_of(records[chosen[0]])
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(grad_accum):
            at = (rank * grad_accum + micro) * batch_size
            out = model(
                **_batch(model, tokenizer, [records[i] for i in chosen[at : at + batch_size]], task, pad)
            )
            if out.loss.requires_grad:  # not when --freeze keeps every part this batch's loss reaches
                (out.loss / grad_accum).backward()  # / 1 is exact: one micro-batch trains as before
            for name in _LOSSES:
                if getattr(out, name) is not None:
                    sums[name] = sums.get(name, 0.0) + getattr(out, name).item()
        if world > 1:
            sums = _average_over_ranks(trainable, sums, world)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        entry = {"step": step, "task": task, **{k: v / (grad_accum * world) for k, v in sums.items()}}
        log.append(entry)
        if on_step is not None:
            on_step(entry)
        if save is not None and save_every and (step % save_every == 0 or step == steps):
            # the diffusion losses draw their noise on the model's device: on a GPU, its generator
            cuda_rng = torch.cuda.get_rng_state(model.device) if model.device.type == "cuda" else None
            rng = torch.get_rng_state()
            if world > 1:  # each rank draws its own noise and dropout: the state keeps them all
                rng, cuda_rng = (list(field) for field in zip(*all_gather_object((rng, cuda_rng), world)))
            state = {"step": step, "order": list(order), "log": list(log), "optimizer": opt.state_dict(),
                     "generator": gen.get_state(), "rng": rng, "cuda_rng": cuda_rng}  # fmt: skip
            if rank == 0:
                save(state)
    model.eval()
    return log


_LOSSES = ("loss", "lm_loss", "det_loss", "sd_loss", "ip2p_loss")


def _batch(
    model: VisionLLMv2Model, tokenizer: Any, chosen: list[Record], task: str, pad: int
) -> dict[str, Any]:
    """One micro-batch of ``task`` records as model inputs on the model's device."""
    if task == "det":
        batch = collate_detection([encode_detection(model, tokenizer, r) for r in chosen], pad,
                                  model.link.detector_size)  # fmt: skip
        batch["det_targets"] = [{k: v.to(model.device) for k, v in t.items()} for t in batch["det_targets"]]
    elif task == "region":
        examples = [encode_region(model, tokenizer, r) for r in chosen]
        batch = {**pad_examples(examples, pad), "regions": [e["regions"] for e in examples]}
    else:
        batch = collate_generation([encode_generation(model, tokenizer, r) for r in chosen], pad)
    return {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _average_over_ranks(params: list[nn.Parameter], sums: dict[str, float], world: int) -> dict[str, float]:
    """Gradients averaged over the ranks, as DDP does (a parameter no rank used keeps no gradient, so
    AdamW skips it as in one process; one that only some used counts zero on the others); returns the
    loss sums added over the ranks."""
    import torch.distributed as dist

    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(used)
    grads = []
    for p, n in zip(params, used.tolist()):
        if n:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    names = list(sums)  # the same losses in the same order on every rank: one task per step
    total = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=params[0].device)
    dist.all_reduce(total)
    return dict(zip(names, total.tolist()))


# upstream's VisionLLMv2Trainer.create_optimizer: parameters whose names hold one of these get
# lr x lr_multiplier (the tools' image backbones and deformable-attention sampling) ...
BACKBONE_KEYWORDS = ("backbone", "sampling_offsets", "reference_points")
# ... and these lr x lr_llm_multiplier (upstream's "llm", "vl_bridge", "region_encoder", under this
# package's names; the "llm" substring also catches the diffusion tools' llm2sd_mapper, as upstream)
LLM_KEYWORDS = ("language_model", "mlp1", "region_encoder", "llm")


def param_groups(
    model: nn.Module, lr: float, lr_llm_multiplier: float = 1.0, lr_backbone_multiplier: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters by rate, as upstream's optimizer groups them (its
    weight-decay split is moot: VisionLLM v2 trains with weight decay 0). Groups of equal rate are
    one group, so with both multipliers 1 there is a single group."""
    by_rate: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if any(k in name for k in BACKBONE_KEYWORDS):
            factor = lr_backbone_multiplier
        elif any(k in name for k in LLM_KEYWORDS):
            factor = lr_llm_multiplier
        else:
            factor = 1.0
        by_rate.setdefault(lr * factor, []).append(p)
    return [{"params": ps, "lr": rate} for rate, ps in by_rate.items()]


# --freeze parts: upstream's train.py flags freeze_vis_encoder, freeze_vl_bridge, freeze_llm,
# freeze_region_encoder, freeze_emb_embeddings, freeze_backbone, and its model's freeze_gdino /
# freeze_sd / freeze_ip2p
FREEZE_PARTS = ("vision", "bridge", "llm", "region", "queries", "backbone", "gdino", "sd", "ip2p")
# upstream's wrap_llm_lora targets: attention and the up/down projections, no gate projection
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def check_part(part: str) -> None:
    """A ``ConfigError`` for a name that is none of :data:`FREEZE_PARTS`."""
    if part not in FREEZE_PARTS:
        raise ConfigError(f"--freeze: unknown part {part!r} (parts: {', '.join(FREEZE_PARTS)})")


def part_prefixes(model: VisionLLMv2Model, part: str) -> tuple[str, ...]:
    """The parameter-name prefixes of one ``--freeze`` part; a part the model lacks is an error."""
    fixed = {"vision": ("vision_model.",), "bridge": ("mlp1.",), "llm": ("language_model.",),
             "queries": tuple(f"emb_embeddings_{k}." for k in ("det", "pose", "gen", "edit"))}  # fmt: skip
    if part in fixed:
        return fixed[part]
    if part == "backbone":  # upstream: every parameter with "backbone" in its name
        found = {
            n[: n.index("backbone") + len("backbone")] for n, _ in model.named_parameters() if "backbone" in n
        }
        if not found:
            raise ConfigError("--freeze backbone: the model has no tool with a backbone (gdino)")
        return tuple(sorted(found))
    check_part(part)
    attr = "region_encoder" if part == "region" else part
    if getattr(model, attr) is None:
        raise ConfigError(f"--freeze {part}: the model has no {attr}")
    return (f"{attr}.",)


def freeze_parts(model: VisionLLMv2Model, parts: list[str]) -> tuple[str, ...]:
    """Turn training off for the named parts; returns their prefixes (kept out of the train state)."""
    prefixes = tuple(x for part in parts for x in part_prefixes(model, part))
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
    return prefixes


def add_llm_lora(model: VisionLLMv2Model, r: int) -> list[str]:
    """Upstream's ``wrap_llm_lora``: the LLM frozen, LoRA (r, alpha 2r, dropout 0.05) on its attention
    and up/down projections, its input and output embeddings trained (they hold the added tokens);
    returns the wrapped projections' names."""
    from interleaf.train.lora import FUSED_GROUPS, apply_lora

    llm = model.language_model
    llm.requires_grad_(False)
    groups = FUSED_GROUPS.get(model.config.llm.family, ())
    wrapped = apply_lora(llm, LORA_TARGETS, r, dropout=0.05, fused=groups)
    llm.get_input_embeddings().weight.requires_grad_(True)
    llm.lm_head.weight.requires_grad_(True)
    return wrapped


def frozen_prefixes(model: VisionLLMv2Model) -> tuple[str, ...]:
    """State-dict prefixes of the diffusion pipelines' frozen parts (VAE, text encoder, and the UNet
    unless it trains): training never changes them."""
    out: list[str] = []
    for name in DECODER_OF.values():
        module = getattr(model, name)
        if module is not None:  # the parts the pipeline froze itself
            parts = ("sd_vae", "sd_text_encoder", "sd_unet")
            out += [
                f"{name}.{part}."
                for part in parts
                if not any(p.requires_grad for p in getattr(module, part).parameters())
            ]
    return tuple(out)


def missing_tool(model: VisionLLMv2Model, record: Record) -> str | None:
    """Why ``model`` cannot train on ``record`` (it lacks the record's decoder, or the detector takes
    fewer phrases), or None."""
    if isinstance(record, RegionRecord):
        return None if model.region_encoder is not None else "the model has no region encoder"
    if isinstance(record, GenerationRecord):
        name = DECODER_OF[record.route]
        return (
            None
            if model.diffusion(record.route) is not None
            else f"the model has no {name} for {ROUTE_TOKENS[record.route]}"
        )
    if model.gdino is None:
        return "the model has no detector (gdino)"
    if record.masks is not None and not model.gdino.mask_dim:
        return "objects' masks: the detector has no mask head (visionllm init --mask-dim)"
    room = model.gdino.config.max_text_len
    if len(record.phrases) > room:
        return f"phrases: {len(record.phrases)} asked for; the detector takes at most {room}"
    return None


# ----------------------------------------------------------------------------- commands
def _new_folder(out: str | Path, ignore: tuple[str, ...] = ()) -> Path:
    """``out``, which must not exist or be an empty folder (but for files named in ``ignore``)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in ignore for p in out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder (pick a new output folder)")
    return out


def init_command(
    out: str | Path,
    preset: str = "tiny",
    image_size: int | None = None,
    max_tiles: int | None = None,
    detector_size: int = 128,
    seed: int = 0,
    gen: str | None = None,
    edit: str | None = None,
    train_gen_unet: bool = False,
    region_encoder: bool = False,
    mask_dim: int = 0,
    dn_number: int = 0,
) -> Path:
    """``interleaf visionllm init``: a random-weight model folder. ``gen`` / ``edit``: ``"tiny"`` or a
    Stable Diffusion / InstructPix2Pix pipeline folder (diffusers layout) for the GEN / EDIT routes;
    ``train_gen_unet`` lets training update the GEN UNet too (upstream keeps it frozen); ``mask_dim``
    > 0 gives the detector upstream's mask head of that width (0: boxes only); ``dn_number`` > 0
    trains it with contrastive denoising: dn_number // (most objects of an image) groups of a positive and a negative query per object (upstream: 100)."""
    from interleaf.errors import check_minimums
    from interleaf.model.visionllm import init_visionllm, save_visionllm

    check_minimums(
        ("--image-size", image_size, 28),
        ("--max-tiles", max_tiles, 1),
        ("--detector-size", detector_size, 32),
        ("--mask-dim", mask_dim, 0),
        ("--dn-number", dn_number, 0),
    )
    for flag, source in (("--gen", gen), ("--edit", edit)):
        if source is not None and source != "tiny" and not Path(source).is_dir():
            raise InputError(f"{flag}: {source} is not 'tiny' or a pipeline folder")
    if train_gen_unet and gen is None:
        raise InputError("--train-gen-unet: needs --gen")
    out = _new_folder(out)
    settings = {"gen": {"train_unet": True}} if train_gen_unet else None
    model, tok = init_visionllm(
        preset,
        seed=seed,
        gen=gen,
        edit=edit,
        diffusion=settings,
        region=region_encoder,
        mask_dim=mask_dim,
        dn_number=dn_number,
    )
    if image_size is not None:
        if image_size % (model.config.vision.patch_size * 2):
            raise InputError(f"--image-size: must be a multiple of {model.config.vision.patch_size * 2}")
        model.config.force_image_size = image_size
    if max_tiles is not None:
        model.config.max_dynamic_patch = max_tiles
    model.link.detector_size = detector_size
    return save_visionllm(model, tok, out)


@contextmanager
def deterministic_algorithms(on: bool = True) -> Iterator[None]:
    """torch's deterministic algorithms (and no cuDNN autotuning) inside the block when ``on``; the
    previous settings after it. An op with no deterministic CUDA kernel is then an error naming it."""
    if not on:
        yield
        return
    import os

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    # cuBLAS is repeatable only with a fixed workspace (torch refuses its matmuls otherwise)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@ending_process_group()
def train_command(
    data: str | Path,
    model_dir: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    steps: int = 200,
    batch_size: int = 4,
    lr: float = 1e-4,
    seed: int = 0,
    device: str = "auto",
    save_every: int = 50,
    deterministic: bool = False,
    freeze: list[str] | str | None = None,
    lora_rank: int = 0,
    lr_llm_multiplier: float = 1.0,
    lr_backbone_multiplier: float = 1.0,
    grad_accum: int = 1,
) -> str:
    """``interleaf visionllm train``: fine-tune, then write the model, ``train_log.jsonl`` and
    ``skipped.jsonl`` (every record not used, with its line and reason) to ``out``.

    ``out/train_state.pt`` (weights, optimizer, data order, random states; replaced whole every
    ``save_every`` steps) makes a rerun with the same ``out`` resume after a kill, exactly, or go on
    to more ``steps``; the other settings must be the run's. On a GPU "exactly" needs
    ``deterministic`` (torch's deterministic algorithms, for the whole run): some CUDA backward
    kernels (the UNet's nearest upsampling, for one) sum with atomics in a varying order, so two runs
    of the same steps differ in the last bits.

    Upstream's training stages: ``freeze`` names parts to keep as they are (:data:`FREEZE_PARTS`;
    the third stage, decoders only, freezes ``vision,bridge,llm,queries`` and ``region`` where the
    model has one), ``lora_rank`` > 0 trains the LLM through LoRA (merged into the saved weights),
    and the multipliers scale the rate of upstream's parameter groups (:func:`param_groups`). Frozen
    parts stay out of the train state.

    Under torchrun each process trains on its slices of every step's batch (``batch_size`` per
    process and micro-batch) on its own GPU (``cuda:LOCAL_RANK``) or the CPU, with gradients averaged
    over the ranks; rank 0 writes the files. A resume must use the same number of processes."""
    import os

    import torch.distributed as dist

    from interleaf.errors import CheckpointError, check_minimums
    from interleaf.files import jsonl_text, replace_text
    from interleaf.model.visionllm import load_visionllm, save_visionllm
    from interleaf.train.lora import merge_lora

    check_minimums(
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--lr", lr, 0),
        ("--save-every", save_every, 1),
        ("--lora-rank", lora_rank, 0),
        ("--lr-llm-multiplier", lr_llm_multiplier, 0),
        ("--lr-backbone-multiplier", lr_backbone_multiplier, 0),
        ("--grad-accum", grad_accum, 1),
    )
    if isinstance(freeze, str):  # "vision,llm" from Python, as the CLI takes it
        freeze = freeze.split(",")
    freeze = sorted({p.strip() for p in freeze or [] if p.strip()})
    for part in freeze:  # before the model loads
        check_part(part)
    if lora_rank and "llm" in freeze:
        raise ConfigError("--lora-rank: LoRA trains the LLM, which --freeze llm keeps as it is")
    out = Path(out)
    state_path = out / STATE_FILE
    settings = {"data": os.path.realpath(data), "model": os.path.realpath(model_dir),
                "image_root": os.path.realpath(image_root) if image_root is not None else None,
                "batch_size": batch_size, "lr": lr, "seed": seed}  # fmt: skip
    rank, world, local_rank = dist_info()
    # the stage settings, with the values a state written before they existed was trained with
    stage = {"freeze": freeze, "lora_rank": lora_rank, "lr_llm_multiplier": lr_llm_multiplier,
             "lr_backbone_multiplier": lr_backbone_multiplier, "grad_accum": grad_accum, "world_size": world}  # fmt: skip
    settings.update(stage)
    stage_defaults = {"freeze": [], "lora_rank": 0, "lr_llm_multiplier": 1.0, "lr_backbone_multiplier": 1.0,
                      "grad_accum": 1, "world_size": 1}  # fmt: skip
    resume = None
    if state_path.is_file():
        try:
            resume = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a damaged state file is one line
            raise cannot_read(state_path, exc) from None
        keys = {"settings", "step", "order", "log", "optimizer", "generator", "rng", "model"}
        if not (isinstance(resume, dict) and keys <= resume.keys() and isinstance(resume["settings"], dict)):
            raise CheckpointError(f"{state_path}: not a visionllm train state (pick a new output folder)")
        was = {**stage_defaults, **resume["settings"]}
        changed = [k for k, v in settings.items() if was.get(k) != v]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"{state_path}: the run was trained with {k}={was.get(k)!r}, not {settings[k]!r}"
            )
        if resume["step"] > steps:
            raise ConfigError(
                f"{state_path}: the run has trained {resume['step']} steps, more than --steps {steps}"
            )
    else:  # a run killed while writing its first state leaves just the partial temporary file
        _new_folder(out, ignore=(f".{STATE_FILE}.tmp",))
    dev = parse_device(device)
    if world > 1:
        if dev.type == "cuda":  # each rank its own GPU (NCCL's object gathers use the current one)
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            init_process_group("nccl" if dev.type == "cuda" else "gloo")
        dist.barrier()  # every rank has seen the folder as it was before rank 0 writes to it
    out.mkdir(parents=True, exist_ok=True)
    records, skipped = read_records(data, image_root)

    def check_records() -> None:
        if not records:
            why = f" (first skipped: line {skipped[0]['line']}: {skipped[0]['reason']})" if skipped else ""
            raise InputError(f"{data}: no usable records{why}")

    check_records()
    model, tok = load_visionllm(model_dir, device=dev, dtype=torch.float32)  # trained in float32
    # records the model has no decoder for, or more phrases than the detector takes, are skipped
    reasons = [missing_tool(model, r) for r in records]
    skipped += [{"line": r.line, "reason": why} for r, why in zip(records, reasons) if why]
    skipped.sort(key=lambda s: s["line"])
    records = [r for r, why in zip(records, reasons) if not why]
    check_records()
    if resume is not None and resume.get("records", len(records)) != len(records):
        # the state's data order indexes the records: other records would be other data
        raise ConfigError(
            f"{state_path}: the run was trained on {resume['records']} usable records of {data}, now {len(records)}"
        )
    if resume is None:
        torch.manual_seed(seed)  # LoRA's initial A and every draw of training start from the seed
    # LoRA before the state loads: the state holds its adapters
    if lora_rank:
        add_llm_lora(model, lora_rank)
    # the frozen pipeline parts (VAE, text encoder, a frozen UNet), frozen parts and the LLM weights
    # LoRA keeps frozen never change: not in the state
    frozen = frozen_prefixes(model) + freeze_parts(model, freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("--freeze: nothing left to train (every part the model has is frozen)")
    llm = model.language_model.named_parameters(prefix="language_model", remove_duplicate=False)
    lora_frozen = {n for n, p in llm if not p.requires_grad} if lora_rank else set()

    def kept_out(key: str) -> bool:
        return key.startswith(frozen) or key in lora_frozen

    if resume is not None:
        left = model.load_state_dict(resume["model"], strict=False)
        wrong = [k for k in left.missing_keys if not kept_out(k)] + left.unexpected_keys
        if wrong:
            raise CheckpointError(f"{state_path}: its weights do not fit the model ({wrong[0]})")
    elif world > 1:
        torch.manual_seed(seed + rank)  # the same initial weights, each rank its own noise and dropout

    def save(state: dict[str, Any]) -> None:
        tmp = state_path.with_name(f".{STATE_FILE}.tmp")
        weights = {k: v for k, v in model.state_dict().items() if not kept_out(k)}
        torch.save({**state, "settings": settings, "records": len(records), "model": weights}, tmp)
        os.replace(tmp, state_path)  # whole, or the previous one

    try:
        with deterministic_algorithms(deterministic):
            log = train_visionllm(model, tok, records, steps, batch_size=batch_size, lr=lr, seed=seed,
                                  resume=resume, save=save, save_every=save_every,
                                  lr_llm_multiplier=lr_llm_multiplier,
                                  lr_backbone_multiplier=lr_backbone_multiplier, grad_accum=grad_accum)  # fmt: skip
    except RuntimeError as exc:
        if not (deterministic and "does not have a deterministic implementation" in str(exc)):
            raise
        op = str(exc).split()[0]  # e.g. the detector's and region encoder's grid_sample backward
        raise InputError(f"--deterministic: torch has no deterministic {op} (train without it)") from None
    if lora_rank:
        merge_lora(model.language_model)  # a plain model: loads as any other
    if rank == 0:
        save_visionllm(model, tok, out)
        replace_text(out / "train_log.jsonl", jsonl_text(log))
        replace_text(out / "skipped.jsonl", jsonl_text(skipped))
    if world > 1:
        dist.barrier()  # the run ends when its files are written
    last = log[-1]
    done = steps - (resume["step"] if resume is not None else 0)
    parts = ", ".join(f"{name} {last[k]:.4f}" for k, name in _LOSS_NAMES.items() if k in last)
    return (f"{out}: {done} steps ({steps} in all) on {len(records)} records ({len(skipped)} skipped), final "
            f"loss {last['loss']:.4f} ({parts})")  # fmt: skip


def detect_command(
    model_dir: str | Path,
    image: str | Path,
    question: str | None = None,
    phrases: str | None = None,
    threshold: float = 0.3,
    max_new_tokens: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """``interleaf visionllm detect``: the answer, its routes and the detections (JSON-ready)."""
    from interleaf.errors import check_minimums
    from interleaf.model.visionllm import detect, load_visionllm

    check_minimums(("--max-new-tokens", max_new_tokens, 0))
    if (question is None) == (phrases is None):
        raise InputError("detect: pass --question or --phrases (one of them)")
    if question is None:
        names = [" ".join(p.split()) for p in phrases.split(",") if p.strip()]
        if not names:
            raise InputError("--phrases: no phrase given")
        question = DEFAULT_QUESTION.format(phrases=", ".join(names))
        check_question(question, "--phrases")
    else:
        check_question(question, "--question")
    if not Path(image).is_file():
        raise InputError(f"{image}: image not found")
    model, tok = load_visionllm(model_dir, device=parse_device(device))
    return json_result(
        detect(model, tok, image, question, threshold=threshold, max_new_tokens=max_new_tokens)
    )


def ask_command(
    model_dir: str | Path,
    question: str,
    image: str | Path | None = None,
    out: str | Path | None = None,
    threshold: float = 0.3,
    max_new_tokens: int = 128,
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    regions: list[str] | None = None,
) -> dict[str, Any]:
    """``interleaf visionllm ask``: the answer and what its routes' tools made (detections; images,
    written to ``out`` as ``route<i>.png`` with ``answer.json``), JSON-ready."""
    from interleaf.errors import check_minimums
    from interleaf.model.visionllm import answer, load_visionllm

    check_minimums(("--max-new-tokens", max_new_tokens, 0), ("--steps", steps, 1))
    if not -(2**63) <= seed < 2**63:  # route i samples with seed + i; torch takes 64-bit seeds
        raise InputError(f"--seed: must be in [-2**63, 2**63), got {seed}")
    boxes = [parse_box(r) for r in regions or []]
    check_question(question, "--question", regions=len(boxes))
    if boxes and image is None:
        raise InputError("--region: needs --image")
    if image is not None and not Path(image).is_file():
        raise InputError(f"{image}: image not found")
    if IMAGE_PLACEHOLDER in question and image is None:
        raise InputError(f"--question: holds {IMAGE_PLACEHOLDER!r} but no --image is given")
    if boxes:  # before the model loads, naming the option
        width, height = load_image(image).size
        boxes = [check_box(box, "--region", width, height) for box in boxes]
    if out is not None:
        out = _new_folder(out)
    model, tok = load_visionllm(model_dir, device=parse_device(device))
    result = answer(model, tok, question, image, threshold=threshold, max_new_tokens=max_new_tokens,
                    num_inference_steps=steps, seed=seed, regions=boxes or None)  # fmt: skip
    result = json_result(result, out)
    if out is not None:
        from interleaf.files import replace_text

        Path(out).mkdir(parents=True, exist_ok=True)  # also when no route drew an image
        replace_text(Path(out) / "answer.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return result


def parse_box(text: str) -> list[float]:
    """``--region x1,y1,x2,y2`` (pixels) as a box, or a one-line InputError."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[2] > box[0] and box[3] > box[1]):
        raise InputError(f"--region: must be x1,y1,x2,y2 with x2 > x1 and y2 > y1, got {text!r}")
    return box


def json_result(result: dict[str, Any], out: str | Path | None = None) -> dict[str, Any]:
    """:func:`~interleaf.model.visionllm.answer`'s result, JSON-ready: each image is saved to ``out``
    as ``route<i>.png`` and named by its ``file`` (None without ``out``) and ``size``; a detection's
    ``mask`` becomes a COCO RLE ``{"size": [h, w], "counts": str}``, and with ``out`` is also saved as
    ``mask<k>.png`` (k: the detection's index; 255 = the object), named by its ``mask_file``."""
    from interleaf.processing.masks import json_rle

    detections = []
    for k, item in enumerate(result.get("detections", [])):
        if "mask" in item:
            mask = item["mask"]
            item = {**item, "mask": json_rle(mask)}
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                item["mask_file"] = str(Path(out) / f"mask{k}.png")
                Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(item["mask_file"])
        detections.append(item)
    images = []
    for item in result.get("images", []):
        file = None
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            file = str(Path(out) / f"route{item['route']}.png")
            item["image"].save(file)
        images.append(
            {"route": item["route"], "kind": item["kind"], "file": file, "size": list(item["image"].size)}
        )
    return {**result, "detections": detections, "images": images}
