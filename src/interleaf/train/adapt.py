"""Domain adaptation as Mini-InternVL's unified framework does it: every task becomes VQA in InternVL's
conversation format, then the model is fine-tuned on the domain data mixed with general data.

Converters (``interleaf adapt convert KIND ...``), each writing a JSONL of samples (and images when it
makes new ones) plus a ``meta.json`` naming it:

* ``coco-det``: COCO-style detection JSON -> detection ("Please detect ...") and/or grounding samples
  whose answers are ``<ref>name</ref><box>[[x1, y1, x2, y2], ...]</box>``, coordinates normalised to
  integers in [0, 1000] of the image width/height.
* ``classification``: an image-folder tree (``root/label/*.jpg``) or a CSV ``path,label`` -> multiple
  choice questions (lettered options, one correct, answer = the letter).
* ``multiview``: DriveLM-style camera sets -> one stitched image: 6 views, each resized to 896x448,
  camera name drawn top-left, tiled 3x2 (FRONT_LEFT, FRONT, FRONT_RIGHT / BACK_LEFT, BACK, BACK_RIGHT)
  = 2688x896.
* ``video``: videos -> frames (uniform segments, segment middles), as multi-image samples with
  ``Frame-i: <image>`` lines.

``interleaf adapt CONFIG.yaml`` trains with the ``adapt`` stage preset (full fine-tune, lr 1e-5,
square loss, packing) on a meta file that mixes the domain data with general data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from interleaf.errors import ConfigError, InputError, is_number

DETECT_Q = "Please detect and label all objects in the following image and mark their positions."
GROUND_Q = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
CLS_Q = "What is shown in this image?"
CLS_SUFFIX = "Answer with the option's letter from the given choices directly."
CAMERAS = ("FRONT_LEFT", "FRONT", "FRONT_RIGHT", "BACK_LEFT", "BACK", "BACK_RIGHT")
VIEW_W, VIEW_H = 896, 448


def norm_box(box: list[float], width: int, height: int, xywh: bool = True) -> list[int]:
    """A pixel box -> [x1, y1, x2, y2] as integers in [0, 1000] of the image size."""
    x1, y1, a, b = (float(v) for v in box)
    x2, y2 = (x1 + a, y1 + b) if xywh else (a, b)

    def scale(v: float, size: int) -> int:
        return int(min(1000, max(0, round(v / size * 1000))))

    return [scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)]


def box_text(name: str, boxes: list[list[int]]) -> str:
    inner = ", ".join(f"[{', '.join(str(v) for v in b)}]" for b in boxes)
    return f"<ref>{name}</ref><box>[{inner}]</box>"


def _check_out(out: str | Path) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"-o {out}: exists and is not a folder")


def _write(out: Path, rows: list[dict], name: str, root: str) -> Path:
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta = {
        name: {"root": os.path.relpath(root, out) if root else ".", "annotation": path.name, "repeat_time": 1}
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


# ---------------------------------------------------------------------------------------------------


def convert_coco(
    ann_path: str, image_root: str, out: str, mode: str = "both", name: str = "coco_det", log=print
) -> dict[str, int]:
    """COCO detection JSON -> detection and/or grounding conversations. Returns counts."""
    if not Path(image_root).is_dir():
        raise InputError(f"--images {image_root}: not a folder")
    _check_out(out)
    try:
        coco = json.loads(Path(ann_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{ann_path}: cannot read COCO JSON ({exc})") from None
    if not isinstance(coco, dict):
        raise InputError(f"{ann_path}: expected a COCO object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise InputError(f"{ann_path}: missing list '{key}'")
        if not all(isinstance(entry, dict) for entry in coco[key]):
            raise InputError(f"{ann_path}: every entry of '{key}' must be an object")
    bad_cats = [c for c in coco["categories"] if "id" not in c or not isinstance(c.get("name"), str)]
    if bad_cats:
        raise InputError(f"{ann_path}: category {bad_cats[0]!r} needs an 'id' and a string 'name'")
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[Any, list[dict]] = {}
    for a in coco["annotations"]:
        per_image.setdefault(a.get("image_id"), []).append(a)
    rows = []
    skipped = {"no_annotations": 0, "bad_size": 0, "unknown_category": 0, "bad_bbox": 0, "no_file_name": 0}
    for img in coco["images"]:
        anns = per_image.get(img.get("id"), [])
        w, h = img.get("width"), img.get("height")
        if not anns:
            skipped["no_annotations"] += 1
            continue
        if not (is_number(w) and is_number(h) and w > 0 and h > 0):
            skipped["bad_size"] += 1
            continue
        if not isinstance(img.get("file_name"), str):
            skipped["no_file_name"] += 1
            continue
        grouped: dict[str, list[list[int]]] = {}
        for a in anns:
            if a.get("category_id") not in cats:
                skipped["unknown_category"] += 1
                continue
            box = a.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
                skipped["bad_bbox"] += 1
                continue
            grouped.setdefault(cats[a["category_id"]], []).append(norm_box(box, w, h))
        if not grouped:
            continue
        base = {"image": img["file_name"], "width": w, "height": h}
        if mode in ("detection", "both"):
            answer = "".join(box_text(n, b) for n, b in grouped.items())
            rows.append(
                {
                    "id": f"det-{img['id']}",
                    **base,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{DETECT_Q}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
        if mode in ("grounding", "both"):
            for n, boxes in grouped.items():
                rows.append(
                    {
                        "id": f"ground-{img['id']}-{n}",
                        **base,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{GROUND_Q.format(n)}"},
                            {"from": "gpt", "value": box_text(n, boxes)},
                        ],
                    }
                )
    _write(Path(out), rows, name, image_root)
    log(f"coco-det: {len(rows)} samples from {len(coco['images'])} images; skipped {skipped} -> {out}")
    return {"samples": len(rows), **skipped}


def convert_classification(
    source: str,
    out: str,
    image_root: str | None = None,
    num_options: int = 4,
    seed: int = 0,
    name: str = "classification",
    log=print,
) -> dict[str, int]:
    """Image-folder tree or CSV (path,label) -> multiple-choice conversations."""
    src = Path(source)
    items: list[tuple[str, str]] = []
    if src.is_dir():
        root = str(src)
        for label_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            for f in sorted(label_dir.iterdir()):
                if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"):
                    items.append((f"{label_dir.name}/{f.name}", label_dir.name))
    elif src.is_file():
        root = image_root or str(src.parent)
        try:
            # utf-8-sig: spreadsheet programs start a CSV with a BOM, which would hide its header row
            with src.open(newline="", encoding="utf-8-sig") as fh:
                for i, row in enumerate(csv.reader(fh)):
                    if len(row) < 2:
                        raise InputError(f"{src}: line {i + 1}: expected 'path,label'")
                    if (
                        i == 0
                        and row[0].strip().lower() in ("path", "image", "file")
                        and row[1].strip().lower() == "label"
                    ):
                        continue
                    items.append((row[0].strip(), row[1].strip()))
        except UnicodeDecodeError as exc:
            raise InputError(f"{src}: not a UTF-8 CSV file ({exc})") from None
    else:
        raise InputError(f"{source}: not a folder of class folders nor a CSV file")
    labels = sorted({lab for _, lab in items})
    if len(labels) < 2:
        raise InputError(f"{source}: need at least two classes, found {len(labels)}")
    rng = random.Random(seed)
    rows = []
    for k, (path, label) in enumerate(items):
        others = [lab for lab in labels if lab != label]
        options = [label] + rng.sample(others, min(num_options - 1, len(others)))
        rng.shuffle(options)
        letters = [chr(ord("A") + i) for i in range(len(options))]
        listing = "\n".join(f"{ch}. {opt}" for ch, opt in zip(letters, options))
        question = f"<image>\n{CLS_Q}\n{listing}\n{CLS_SUFFIX}"
        rows.append(
            {
                "id": f"cls-{k}",
                "image": path,
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": letters[options.index(label)]},
                ],
            }
        )
    _write(Path(out), rows, name, root)
    log(f"classification: {len(rows)} samples, {len(labels)} classes -> {out}")
    return {"samples": len(rows), "classes": len(labels)}


def stitch_views(views: dict[str, Any], font_size: int = 48):
    """Six camera images (paths or PIL) -> one 2688x896 image, 3x2 grid, names drawn top-left."""
    from PIL import Image, ImageDraw, ImageFont

    from interleaf.processing.image import load_image

    canvas = Image.new("RGB", (3 * VIEW_W, 2 * VIEW_H), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    lookup = {k.upper().removeprefix("CAM_"): v for k, v in views.items()}
    for i, cam in enumerate(CAMERAS):
        if cam not in lookup:
            raise InputError(f"multiview: camera {cam} missing (have {', '.join(sorted(lookup))})")
        img = load_image(lookup[cam]).resize((VIEW_W, VIEW_H), Image.Resampling.BICUBIC)
        x, y = (i % 3) * VIEW_W, (i // 3) * VIEW_H
        canvas.paste(img, (x, y))
        label = f"CAM_{cam}"
        box = draw.textbbox((x + 10, y + 8), label, font=font)
        draw.rectangle([box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4], fill=(0, 0, 0))
        draw.text((x + 10, y + 8), label, fill=(255, 255, 255), font=font)
    return canvas


def _qa_conversations(rec: dict, prefix: str) -> list[dict]:
    if isinstance(rec.get("conversations"), list):
        conv = [dict(t) for t in rec["conversations"]]
        if conv and "<image>" not in "".join(str(t.get("value", "")) for t in conv):
            first = next(i for i, t in enumerate(conv) if t.get("from") == "human")
            conv[first]["value"] = prefix + conv[first]["value"]
        return conv
    if "question" in rec and "answer" in rec:
        return [
            {"from": "human", "value": prefix + str(rec["question"])},
            {"from": "gpt", "value": str(rec["answer"])},
        ]
    raise InputError("record needs 'conversations' or 'question' and 'answer'")


def _read_records(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            data = json.loads(text)
            records = data if isinstance(data, list) else [data]
        else:
            records = []
            for i, ln in enumerate(text.splitlines()):
                if ln.strip():
                    try:
                        records.append(json.loads(ln))
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}: line {i + 1}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read records ({exc})") from None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{path}: record {i + 1} is not an object")
    return records


def convert_multiview(
    records_path: str, out: str, image_root: str | None = None, name: str = "multiview", log=print
) -> dict[str, int]:
    """Records ``{"id", "images": {CAM: path}, "conversations" | "question"+"answer"}`` -> stitched images."""
    root = Path(image_root or Path(records_path).parent)
    out_dir = Path(out)
    _check_out(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, skipped = [], 0
    for k, rec in enumerate(_read_records(records_path)):
        try:
            if not isinstance(rec.get("images") or {}, dict):
                raise InputError("field 'images' must map camera names to paths")
            views = {cam: str(root / p) for cam, p in (rec.get("images") or {}).items()}
            stitched = stitch_views(views)
            rel = f"images/{rec.get('id', k)}.jpg"
            stitched.save(out_dir / rel, quality=95)
            rows.append(
                {"id": rec.get("id", k), "image": rel, "conversations": _qa_conversations(rec, "<image>\n")}
            )
        except InputError as exc:
            skipped += 1
            log(f"multiview: skipped record {k}: {exc}")
    _write(out_dir, rows, name, str(out_dir))
    log(f"multiview: {len(rows)} samples (stitched 3x2 of {VIEW_W}x{VIEW_H}), {skipped} skipped -> {out}")
    return {"samples": len(rows), "skipped": skipped}


def convert_video(
    records_path: str,
    out: str,
    video_root: str | None = None,
    num_frames: int = 8,
    name: str = "video",
    log=print,
) -> dict[str, int]:
    """Records ``{"id", "video", "conversations" | "question"+"answer"}`` -> frames as multi-image samples."""
    from interleaf.processing.video import read_video_frames

    root = Path(video_root or Path(records_path).parent)
    out_dir = Path(out)
    _check_out(out_dir)
    if num_frames < 1:
        raise InputError(f"--frames must be >= 1, got {num_frames}")
    rows, skipped = [], 0
    for k, rec in enumerate(_read_records(records_path)):
        ident = str(rec.get("id", k))
        try:
            frames = read_video_frames(str(root / rec["video"]), num_segments=num_frames)
            frame_dir = out_dir / "frames" / ident
            frame_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for i, f in enumerate(frames):
                rel = f"frames/{ident}/{i:03d}.jpg"
                f.save(out_dir / rel, quality=95)
                paths.append(rel)
            prefix = "".join(f"Frame-{i + 1}: <image>\n" for i in range(len(paths)))
            raw = rec.get("conversations")
            if isinstance(raw, list) and any("<video>" in str(t.get("value", "")) for t in raw):
                conv = [
                    {
                        **t,
                        "value": re.sub(
                            r"<video>\n?", lambda _, p=prefix: p, str(t.get("value", "")), count=1
                        ),
                    }
                    for t in raw
                ]
            else:
                conv = _qa_conversations(rec, prefix)
            rows.append({"id": ident, "image": paths, "conversations": conv})
        except (InputError, KeyError) as exc:
            skipped += 1
            log(f"video: skipped record {k}: {exc}")
    _write(out_dir, rows, name, str(out_dir))
    log(f"video: {len(rows)} samples ({num_frames} frames each), {skipped} skipped -> {out}")
    return {"samples": len(rows), "skipped": skipped}


# ---------------------------------------------------------------------------------------------------
# fine-tuning with general data mixed in

ADAPT_KEYS = ("domain_meta", "general_meta", "general_repeat")


def mix_meta(domain_meta: str, general_meta: str | None, general_repeat: float, out_path: Path) -> Path:
    """One meta JSON with the domain datasets and the general ones (their repeat_time x ``general_repeat``)."""

    def load(path: str) -> dict:
        p = Path(path)
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read meta JSON ({exc})") from None
        if not isinstance(meta, dict) or not all(isinstance(e, dict) for e in meta.values()):
            raise ConfigError(f"{path}: expected an object of datasets, each an object")
        fixed = {}
        for name, entry in meta.items():
            entry = dict(entry)
            for key in ("root", "annotation"):
                if key in entry and not Path(entry[key]).is_absolute():
                    entry[key] = str((p.parent / entry[key]).resolve())
            fixed[name] = entry
        return fixed

    mixed = load(domain_meta)
    if general_meta:
        for name, entry in load(general_meta).items():
            entry["repeat_time"] = float(entry.get("repeat_time", 1)) * general_repeat
            mixed[f"general/{name}"] = entry
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(mixed, indent=1))
    return out_path


def adapt_train(config_path: str, overrides: list[str]) -> dict[str, Any]:
    import yaml

    from interleaf.train.config import build_config, parse_override
    from interleaf.train.trainer import train

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    for item in overrides:
        k, v = parse_override(item)
        values[k] = v
    values.setdefault("stage", "adapt")
    adapt = {k: values.pop(k) for k in ADAPT_KEYS if k in values}
    if "domain_meta" not in adapt:
        raise ConfigError(f"{path}: missing key 'domain_meta' (the converted domain data's meta.json)")
    for key in ("domain_meta", "general_meta", "output_dir"):
        value = values.get(key) if key == "output_dir" else adapt.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{path}: key '{key}' must be a path (string)")
    base = path.parent

    def resolve(p: str | None) -> str | None:
        return None if p is None else str(p if Path(p).is_absolute() else base / p)

    out_dir = Path(resolve(values.get("output_dir", "runs/adapt")))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{path}: output_dir {out_dir} exists and is not a folder")
    values["output_dir"] = str(out_dir)
    for key in ("model_path",):
        if isinstance(values.get(key), str):
            values[key] = resolve(values[key])
    repeat = adapt.get("general_repeat", 1.0)
    if not isinstance(repeat, (int, float)) or repeat <= 0:
        raise ConfigError(f"{path}: 'general_repeat' must be a positive number")
    values["meta_path"] = str(
        mix_meta(
            resolve(adapt["domain_meta"]),
            resolve(adapt.get("general_meta")),
            float(repeat),
            out_dir / "mixed_meta.json",
        )
    )
    return train(build_config(values, str(path)))


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if not argv:
        raise ConfigError("adapt: expected 'convert KIND ...' or a CONFIG.yaml")
    if argv[0] != "convert":
        config, rest = argv[0], argv[1:]
        overrides = []
        while rest:
            if rest[0] == "--set" and len(rest) > 1:
                overrides.append(rest[1])
                rest = rest[2:]
            else:
                raise ConfigError(f"adapt: unexpected argument {rest[0]!r}")
        result = adapt_train(config, overrides)
        print(result["checkpoint"])
        return 0
    p = argparse.ArgumentParser(prog="interleaf adapt convert")
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("coco-det", help="COCO detection JSON -> <ref>/<box> detection and grounding")
    c.add_argument("annotations")
    c.add_argument("--images", required=True, help="image folder")
    c.add_argument("-o", "--out", required=True)
    c.add_argument("--mode", choices=("detection", "grounding", "both"), default="both")
    k = sub.add_parser("classification", help="image folders or CSV -> multiple choice")
    k.add_argument("source")
    k.add_argument("--images", help="image root for CSV paths")
    k.add_argument("-o", "--out", required=True)
    k.add_argument("--options", type=int, default=4)
    m = sub.add_parser("multiview", help="6 camera views -> one stitched 3x2 image (DriveLM)")
    m.add_argument("records")
    m.add_argument("--images", help="image root")
    m.add_argument("-o", "--out", required=True)
    v = sub.add_parser("video", help="videos -> frames as Frame-i: <image> samples")
    v.add_argument("records")
    v.add_argument("--videos", help="video root")
    v.add_argument("--frames", type=int, default=8)
    v.add_argument("-o", "--out", required=True)
    a = p.parse_args(argv[1:])
    if a.kind == "coco-det":
        convert_coco(a.annotations, a.images, a.out, a.mode)
    elif a.kind == "classification":
        convert_classification(a.source, a.out, a.images, a.options)
    elif a.kind == "multiview":
        convert_multiview(a.records, a.out, a.images)
    else:
        convert_video(a.records, a.out, a.videos, a.frames)
    return 0
