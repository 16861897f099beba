"""Fine-tuning VisionLLM v2 on grounded detection: the LLM learns to name and route, the super link
and the detector learn end to end (upstream's stage 2, on its detection answer format).

Records, one JSON object per line::

    {"image": "img.jpg",                 # relative to the records file's folder, or to image_root
     "objects": [{"phrase": "red square", "box": [x1, y1, x2, y2]}, ...],      # pixels
     "phrases": ["red square", "blue circle"],   # optional: asked for, in this order; a phrase
                                                 # without objects is a negative (default: the
                                                 # objects' phrases, in order of appearance)
     "question": "...", "route": "det"}          # optional ("det", "grd" or "seg")

Prompt: the image, then the question (default ``Please detect p1, p2 in the image.``). Answer, as
upstream's detection datasets write it: ``p1[DET][EMB][EMB2][EMB3][EMB4], p2[DET][EMB]...`` and the
end-of-turn token. Detector targets: class = the index of the object's phrase among the routes, box
normalised (cx, cy, w, h). Records that cannot be used are skipped, each with its line and reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.image_transforms import corners_to_center_format

from interleaf.errors import InputError, cannot_read, is_number
from interleaf.model.checkpoint import parse_device
from interleaf.model.visionllm import (
    DETECTOR_ROUTES,
    EMB_TOKENS,
    IGNORE_INDEX,
    ROUTE_TOKENS,
    SPAN_TOKENS,
    VisionLLMv2Model,
    detector_inputs,
)
from interleaf.processing.image import image_size, load_image, preprocess_image, to_rgb
from interleaf.processing.prompt import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from interleaf.train.trainer import warmup_cosine

DEFAULT_QUESTION = "Please detect {phrases} in the image."
STATE_FILE = "train_state.pt"
# tokens a question may not hold: they would break the prompt's routes or image tokens
_IN_PROMPT = (*ROUTE_TOKENS.values(), IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
_RESERVED = (*_IN_PROMPT, *EMB_TOKENS, *SPAN_TOKENS, IMAGE_PLACEHOLDER)


def check_question(question: str, name: str = "question") -> None:
    """Refuse a question that holds a routing or image token, or more than one ``<image>`` (the
    prompt has one image): an ``InputError`` naming ``name``."""
    bad = next((t for t in _IN_PROMPT if t in question), None)
    if bad:
        raise InputError(f"{name}: contains {bad!r}")
    if question.count(IMAGE_PLACEHOLDER) > 1:
        raise InputError(f"{name}: more than one {IMAGE_PLACEHOLDER!r} (there is one image)")


@dataclass
class DetectionRecord:
    image: Path
    phrases: list[str]
    class_labels: list[int]  # per object: index into phrases
    boxes: list[list[float]]  # per object: x1, y1, x2, y2 in pixels
    question: str
    route: str = "det"
    line: int = 0


def parse_detection_record(raw: Any, folder: Path, image_root: Path | None = None) -> DetectionRecord:
    """Check one record (see the module docstring); raises InputError naming the field."""
    if not isinstance(raw, dict):
        raise InputError("not a JSON object")
    image = raw.get("image")
    if not isinstance(image, str) or not image:
        raise InputError("image: missing or not a string")
    path = Path(image) if Path(image).is_absolute() else (image_root or folder) / image
    if not path.is_file():
        raise InputError(f"image: {path} not found")
    try:
        width, height = image_size(path)  # the header only: training decodes it when it draws it
    except InputError as exc:
        raise InputError(f"image: {exc}") from None
    objects = raw.get("objects")
    if not isinstance(objects, list):
        raise InputError("objects: missing or not a list")
    found: list[str] = []
    boxes: list[list[float]] = []
    for i, obj in enumerate(objects):
        phrase = obj.get("phrase") if isinstance(obj, dict) else None
        box = obj.get("box") if isinstance(obj, dict) else None
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputError(f"objects[{i}].phrase: missing or empty")
        if not (
            isinstance(box, list) and len(box) == 4 and all(is_number(v) and math.isfinite(v) for v in box)
        ):
            raise InputError(f"objects[{i}].box: must be [x1, y1, x2, y2], numbers")
        if not (box[2] > box[0] and box[3] > box[1]):
            raise InputError(f"objects[{i}].box: x2 > x1 and y2 > y1 needed, got {box}")
        if not (box[0] < width and box[2] > 0 and box[1] < height and box[3] > 0):
            # clamping it to the image would leave a zero-size box on the edge
            raise InputError(f"objects[{i}].box: {box} lies outside the {width}x{height} image")
        found.append(" ".join(phrase.split()))
        boxes.append([float(v) for v in box])
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
        bad = next((t for t in (*_RESERVED, ",", ";", ":") if t in p), None)
        if bad:
            raise InputError(f"phrases: {p!r} contains {bad!r}")
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
    return DetectionRecord(path, phrases, [phrases.index(p) for p in found], boxes, question, route)


def read_detection_records(
    path: str | Path, image_root: str | Path | None = None
) -> tuple[list[DetectionRecord], list[dict[str, Any]]]:
    """The usable records of a JSONL file and the skipped ones (``{"line", "reason"}``)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    records: list[DetectionRecord] = []
    skipped: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read(path, exc) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_detection_record(json.loads(line), path.parent, root)
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


def encode_detection(model: VisionLLMv2Model, tokenizer: Any, record: DetectionRecord) -> dict[str, Any]:
    """One training example: ids/labels (answer only), the MLLM's tiles, the detector's image and
    targets."""
    from interleaf.processing.prompt import build_prompt
    from interleaf.processing.templates import get_template

    cfg = model.config
    image = to_rgb(load_image(record.image))
    pixels = preprocess_image(image, max_num=cfg.max_dynamic_patch, min_num=cfg.min_dynamic_patch,
                              image_size=cfg.image_size, use_thumbnail=cfg.use_thumbnail,
                              dynamic=cfg.dynamic_image_size)  # fmt: skip
    template = get_template(cfg.template)
    prompt = build_prompt(template, record.question, [pixels.shape[0]], num_image_token=model.num_image_token)
    answer = answer_text(record.phrases, record.route, model.link.num_embs) + template.stop_str
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    w, h = image.size
    boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w) / w
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h) / h
    cxcywh = corners_to_center_format(boxes)
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "pixel_values": pixels,
        "image": image,
        "target": {"class_labels": torch.tensor(record.class_labels, dtype=torch.long), "boxes": cxcywh},
    }


def collate_detection(examples: list[dict[str, Any]], pad_id: int, detector_size: int) -> dict[str, Any]:
    """Right-padded batch for :meth:`VisionLLMv2Model.forward`."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    det_pixels, det_mask = detector_inputs([e["image"] for e in examples], detector_size)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "det_pixel_values": det_pixels,
        "det_pixel_mask": det_mask,
        "det_targets": [e["target"] for e in examples],
    }


def train_detection(
    model: VisionLLMv2Model,
    tokenizer: Any,
    records: list[DetectionRecord],
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
) -> list[dict[str, float]]:
    """AdamW on LM loss + detector loss over shuffled passes of ``records`` (``lr`` after a linear
    warm-up over the first 5% of steps, cosine to 0 at ``steps``); returns the step log.

    Every ``save_every`` steps ``save`` gets the training state (step, optimizer, data order, random
    states, log; the model's weights are the caller's to store); ``resume`` (such a state, with the
    model already holding its weights) continues exactly where it was taken."""
    if not records:
        raise InputError("train: no usable records")
    if model.gdino is None:
        raise InputError("train: the model has no detector (gdino)")
    most = max(len(r.phrases) for r in records)
    if most > model.gdino.config.max_text_len:
        raise InputError(
            f"train: a record asks for {most} phrases; the detector takes {model.gdino.config.max_text_len}"
        )
    pad = model.config.llm.pad_token_id if model.config.llm.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
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
        torch.set_rng_state(resume["rng"])
    model.train()
    for step in range(start + 1, steps + 1):
        while len(order) < batch_size:  # passes follow each other (a batch may span two)
            order += torch.randperm(len(records), generator=gen).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        batch = collate_detection([encode_detection(model, tokenizer, records[i]) for i in chosen], pad,
                                  model.link.detector_size)  # fmt: skip
        batch = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        batch["det_targets"] = [{k: v.to(model.device) for k, v in t.items()} for t in batch["det_targets"]]
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        entry = {
            "step": step,
            "loss": out.loss.item(),
            "lm_loss": out.lm_loss.item(),
            "det_loss": out.det_loss.item(),
        }
        log.append(entry)
        if on_step is not None:
            on_step(entry)
        if save is not None and save_every and (step % save_every == 0 or step == steps):
            save({"step": step, "order": list(order), "log": list(log), "optimizer": opt.state_dict(),
                  "generator": gen.get_state(), "rng": torch.get_rng_state()})  # fmt: skip
    model.eval()
    return log


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
) -> Path:
    """``interleaf visionllm init``: a random-weight model folder."""
    from interleaf.errors import check_minimums
    from interleaf.model.visionllm import init_visionllm, save_visionllm

    check_minimums(
        ("--image-size", image_size, 28),
        ("--max-tiles", max_tiles, 1),
        ("--detector-size", detector_size, 32),
    )
    out = _new_folder(out)
    model, tok = init_visionllm(preset, seed=seed)
    if image_size is not None:
        if image_size % (model.config.vision.patch_size * 2):
            raise InputError(f"--image-size: must be a multiple of {model.config.vision.patch_size * 2}")
        model.config.force_image_size = image_size
    if max_tiles is not None:
        model.config.max_dynamic_patch = max_tiles
    model.link.detector_size = detector_size
    return save_visionllm(model, tok, out)


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
) -> str:
    """``interleaf visionllm train``: fine-tune, then write the model, ``train_log.jsonl`` and
    ``skipped.jsonl`` (every record not used, with its line and reason) to ``out``.

    ``out/train_state.pt`` (weights, optimizer, data order, random states; replaced whole every
    ``save_every`` steps) makes a rerun with the same ``out`` resume after a kill, exactly, or go on
    to more ``steps``; the other settings must be the run's."""
    import os

    from interleaf.errors import CheckpointError, ConfigError, check_minimums
    from interleaf.files import jsonl_text, replace_text
    from interleaf.model.visionllm import load_visionllm, save_visionllm

    check_minimums(
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--lr", lr, 0),
        ("--save-every", save_every, 1),
    )
    out = Path(out)
    state_path = out / STATE_FILE
    settings = {"data": os.path.realpath(data), "model": os.path.realpath(model_dir),
                "image_root": os.path.realpath(image_root) if image_root is not None else None,
                "batch_size": batch_size, "lr": lr, "seed": seed}  # fmt: skip
    resume = None
    if state_path.is_file():
        try:
            resume = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a damaged state file is one line
            raise cannot_read(state_path, exc) from None
        keys = {"settings", "step", "order", "log", "optimizer", "generator", "rng", "model"}
        if not (isinstance(resume, dict) and keys <= resume.keys() and isinstance(resume["settings"], dict)):
            raise CheckpointError(f"{state_path}: not a visionllm train state (pick a new output folder)")
        changed = [k for k, v in settings.items() if resume["settings"].get(k) != v]
        if changed:
            k = changed[0]
            raise ConfigError(
                f"{state_path}: the run was trained with {k}={resume['settings'].get(k)!r}, not {settings[k]!r}"
            )
        if resume["step"] > steps:
            raise ConfigError(
                f"{state_path}: the run has trained {resume['step']} steps, more than --steps {steps}"
            )
    else:  # a run killed while writing its first state leaves just the partial temporary file
        _new_folder(out, ignore=(f".{STATE_FILE}.tmp",))
    out.mkdir(parents=True, exist_ok=True)
    dev = parse_device(device)
    records, skipped = read_detection_records(data, image_root)

    def check_records() -> None:
        if not records:
            why = f" (first skipped: line {skipped[0]['line']}: {skipped[0]['reason']})" if skipped else ""
            raise InputError(f"{data}: no usable records{why}")

    check_records()
    model, tok = load_visionllm(model_dir, device=dev, dtype=torch.float32)  # trained in float32
    if model.gdino is not None:  # the detector takes at most max_text_len routes at once
        room = model.gdino.config.max_text_len
        skipped += [{"line": r.line, "reason": f"phrases: {len(r.phrases)} asked for; the detector takes at most {room}"}
                    for r in records if len(r.phrases) > room]  # fmt: skip
        skipped.sort(key=lambda s: s["line"])
        records = [r for r in records if len(r.phrases) <= room]
        check_records()
    if resume is not None and resume.get("records", len(records)) != len(records):
        # the state's data order indexes the records: other records would be other data
        raise ConfigError(
            f"{state_path}: the run was trained on {resume['records']} usable records of {data}, now {len(records)}"
        )
    if resume is not None:
        model.load_state_dict(resume["model"])
    else:
        torch.manual_seed(seed)

    def save(state: dict[str, Any]) -> None:
        tmp = state_path.with_name(f".{STATE_FILE}.tmp")
        torch.save({**state, "settings": settings, "records": len(records), "model": model.state_dict()}, tmp)
        os.replace(tmp, state_path)  # whole, or the previous one

    log = train_detection(model, tok, records, steps, batch_size=batch_size, lr=lr, seed=seed,
                          resume=resume, save=save, save_every=save_every)  # fmt: skip
    save_visionllm(model, tok, out)
    replace_text(out / "train_log.jsonl", jsonl_text(log))
    replace_text(out / "skipped.jsonl", jsonl_text(skipped))
    last = log[-1]
    done = steps - (resume["step"] if resume is not None else 0)
    return (f"{out}: {done} steps ({steps} in all) on {len(records)} records ({len(skipped)} skipped), final "
            f"loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, detector {last['det_loss']:.4f})")  # fmt: skip


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
    return detect(model, tok, image, question, threshold=threshold, max_new_tokens=max_new_tokens)
