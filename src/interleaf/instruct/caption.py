"""``interleaf instruct caption``: images -> detailed captions from a vision-language model.

MMInstruct's step (b): every image is sent, as a thumbnail of at most 512 x 512 pixels with
``detail: low`` (as the official engine sends it), to a VLM on any OpenAI-compatible endpoint
(``interleaf serve``, vLLM, LMDeploy, a hosted API) with a request for a long description; when the
record carries text read from the image (``ocr``), the prompt gives it to the model too. Captions
shorter than ``min_words`` are rejected. Answers are committed to a SQLite store as they arrive, so
a rerun after a kill asks only for the rest.

Input: a folder of images (ids are their paths inside it) or records (JSONL / JSON list) with
``image`` | ``image_path`` and optional ``id``, ``domain``, ``prior`` | ``bing_tag``, ``ocr``.
Output in OUT: ``captions.jsonl`` (what ``interleaf instruct generate`` reads; image paths relative
to OUT), ``rejected.jsonl``, ``stats.json``, ``responses.sqlite``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from interleaf.errors import InputError
from interleaf.files import jsonl_text, replace_text
from interleaf.instruct.engine import (
    Rejected,
    Task,
    ask_all,
    check_failures,
    endpoint_client,
    first_field,
    iter_records,
    prior_text,
    request_params,
    usable_records,
)
from interleaf.instruct.parse import units
from interleaf.store import ResponseStore, request_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
THUMBNAIL = 512
PROMPT = {
    "en": "Describe this image in detail, in at least {n} words: the subjects, their attributes and"
    " actions, the setting, the layout and any visible text.",
    "zh": "请详细描述这张图片，不少于{n}字：包括主体、它们的属性和动作、场景、布局以及图中可见的文字。",
}
PROMPT_OCR = {
    "en": "The image contains this text: {ocr}\nUsing both the image and its text, describe the image in"
    " detail, in at least {n} words.",
    "zh": "图片中包含以下文字：{ocr}\n请结合图片本身和其中的文字，详细描述这张图片，不少于{n}字。",
}


def _image_records(source: Path) -> tuple[Path, Iterable[tuple[str, dict | None, str | None]]]:
    """(image root, [(where, record, error)]) for a folder of images or a records file."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return source, [
            (str(p.relative_to(source)), {"image": str(p.relative_to(source))}, None) for p in files
        ]
    if not source.is_file():
        raise InputError(f"images not found: {source} (a folder of images or a JSONL of records)")
    # read as needed: a records file of any size, and --limit stops reading
    return source.parent, ((f"{source.name}:{i}", rec, err) for i, rec, err in iter_records(source))


def path_from(folder: Path, path: str) -> str:
    """``path`` relative to ``folder``, both as the file system resolves them: ``os.path.abspath``
    drops ``link/..`` by its text, which names another place when ``link`` is a symbolic link. The
    image's own name is kept (a symlinked image is not replaced by its target)."""
    where = os.path.realpath(os.path.dirname(path) or ".")
    return os.path.relpath(os.path.join(where, os.path.basename(path)), os.path.realpath(folder))


def thumbnail_data_url(path: str, size: int = THUMBNAIL) -> str:
    """The image shrunk to fit ``size`` x ``size`` (aspect kept, never enlarged), as a JPEG data URL."""
    from interleaf.processing.image import load_image

    img = load_image(path)  # a new image, decoded from the file: shrunk in place
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def caption_images(
    images: str | os.PathLike,
    vlm: str,
    out: str | os.PathLike,
    domain: str | None = None,
    lang: str = "en",
    min_words: int = 60,
    max_tokens: int = 1024,
    temperature: float | None = None,
    concurrency: int = 8,
    timeout: float = 120.0,
    retries: int = 3,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Caption every readable, distinct image; returns the stats written to ``stats.json``."""
    if lang not in PROMPT:
        raise InputError(f"unknown language {lang!r} (en or zh)")
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    client, fingerprint = endpoint_client(vlm, timeout, retries)
    params = request_params(max_tokens, temperature)
    root, records = _image_records(Path(images))
    rejected: list[Rejected] = []
    tasks: list[Task] = []
    for r in usable_records(records, root, domain, thumbnail_data_url, rejected, need_caption=False):
        ocr = r.record.get("ocr")
        if isinstance(ocr, str) and ocr.strip():
            prompt = PROMPT_OCR[lang].format(ocr=ocr.strip(), n=min_words)
        else:
            prompt = PROMPT[lang].format(n=min_words)
        content = [
            {"type": "image_url", "image_url": {"url": r.opened, "detail": "low"}},
            {"type": "text", "text": prompt},
        ]
        record = {"id": r.id, "image": path_from(out, r.path), "domain": r.domain}
        prior = prior_text(first_field(r.record, ("prior", "bing_tag")))
        if prior != "Empty":
            record["prior"] = prior
        task = Task(r.id, [{"role": "user", "content": content}], meta={"record": record})
        task.key = request_key(r.id, prompt, [r.digest], fingerprint, params)
        tasks.append(task)
        if limit is not None and len(tasks) >= limit:
            break

    examined = len(tasks) + len(rejected)  # every record read became a request or a rejection
    with ResponseStore(out / "responses.sqlite") as store:
        counts = ask_all(client, tasks, store, params, concurrency, progress, desc="captions")
    captions = []
    for task in tasks:
        if task.response is None:
            rejected.append(Rejected("request", "endpoint_error", task.error or "", task.id))
            continue
        text = task.response.strip()
        if len(units(text)) < min_words:
            detail = f"caption has {len(units(text))} words (min {min_words})"
            rejected.append(Rejected("request", "caption_too_short", detail, task.id, response=text))
            continue
        captions.append({**task.meta["record"], "caption": text})

    reasons = Counter(r.reason for r in rejected)
    stats = {
        "vlm": fingerprint,
        "images": examined,  # each is a caption or one rejection (--limit stops reading)
        "requests": {"total": len(tasks), **{k: counts[k] for k in ("from_store", "asked", "failed")}},
        "captions": len(captions),
        "rejected": dict(reasons),
        "seconds": round(time.time() - started, 3),
    }
    replace_text(out / "captions.jsonl", jsonl_text(captions))
    replace_text(out / "rejected.jsonl", jsonl_text(r.to_json() for r in rejected))
    replace_text(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    check_failures(vlm, counts, tasks, out)
    return stats
