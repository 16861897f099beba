"""Offline mini benchmarks in the official formats (``interleaf eval make-mini``).

Images come from what installed packages ship or what PIL draws: scikit-learn's handwritten digits
(8x8, upscaled) and drawn shapes; MM-NIAH haystacks are the corpus engine's embedded sample (real
interleaved pages, extracted by ``interleaf.corpus.extract``, with the images the sample WARC holds),
else the dataset descriptions scikit-learn ships with digit images. Everything is deterministic
for a given seed, so CI can run the whole harness end to end on a tiny model.

- MMIU (``all.json`` + images under ``<Relationship>/<task>/``): six official task names across four
  relationship types (so both prompt orders occur), each question answerable from the images.
- MM-NIAH (``annotations/<task>.jsonl`` + ``images/``): all six tasks from ``mmniah_make``.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from interleaf.eval.mmniah_make import COLORS, SHAPES, draw_shape, write_split

DIGIT_SIZE = 64


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digit_image(pixels: np.ndarray, size: int = DIGIT_SIZE) -> Image.Image:
    """An 8x8 sklearn digit (values 0..16) as a ``size`` x ``size`` RGB image, dark ink on white."""
    arr = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def _options(texts: list[str]) -> str:
    return "".join(f"{chr(65 + i)}: {t}\n" for i, t in enumerate(texts)).rstrip("\n")


def _record(
    task: str, rel: str, question: str, context_head: str, options: list[str], answer: int, images: list[str]
) -> dict:
    opts = _options(options)
    return {
        "task": task,
        "visual_input_component": "synthetic image",
        "source": "interleaf-mini",
        "options": opts,
        "question": question,
        "context": f"{context_head} Select from the following choices.\n{opts}\n",
        "input_image_path": images,
        "output": chr(65 + answer),
    }


def make_mini_mmiu(out_dir: str | os.PathLike, per_task: int = 4, seed: int = 0) -> Path:
    """Write ``all.json`` and its images; returns the path of ``all.json``."""
    out = Path(out_dir)
    rng = random.Random(seed)
    digits, targets = _digits()
    by_class = {c: np.flatnonzero(targets == c).tolist() for c in range(10)}
    records = []

    def save(img: Image.Image, rel: str, task: str, i: int, k: int) -> str:
        path = out / rel / task / f"{task}_{i}_{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return f"./{rel}/{task}/{task}_{i}_{k}.png"

    for i in range(per_task):
        # 1. handwritten_retrieval (High-level-obj-semantic, question first): same digit, other writer.
        task, rel = "handwritten_retrieval", "High-level-obj-semantic"
        classes = rng.sample(range(10), 4)
        answer = rng.randrange(4)
        q_idx, a_idx = rng.sample(by_class[classes[answer]], 2)
        cands = [a_idx if k == answer else rng.choice(by_class[c]) for k, c in enumerate(classes)]
        imgs = [save(digit_image(digits[q_idx]), rel, task, i, 0)]
        imgs += [save(digit_image(digits[c]), rel, task, i, k + 1) for k, c in enumerate(cands)]
        records.append(
            _record(task, rel, "Which candidate image shows the same handwritten digit as the first image?",
                    "The first image is a query; the next four are candidates.",
                    [f"the {n} candidate" for n in ("first", "second", "third", "fourth")], answer, imgs)
        )  # fmt: skip
        # 2. text2image_retrieval (High-level-obj-semantic, question first): pick the described shape.
        task = "text2image_retrieval"
        combos = rng.sample([(s, c) for s in SHAPES for c in COLORS], 4)
        answer = rng.randrange(4)
        imgs = [
            save(draw_shape(s, c, 96, (255, 255, 255)), rel, task, i, k) for k, (s, c) in enumerate(combos)
        ]
        shape, color = combos[answer]
        records.append(
            _record(task, rel, f"Which image shows a {color} {shape}?", "Four images are given.",
                    [f"image {k + 1}" for k in range(4)], answer, imgs)
        )  # fmt: skip
        # 3. visual_quality_assessment_ve_lol_l (Low-level-semantic, context first): brighter image.
        task, rel = "visual_quality_assessment_ve_lol_l", "Low-level-semantic"
        base = digit_image(digits[rng.randrange(len(digits))], 96)
        dark = ImageEnhance.Brightness(base).enhance(0.35)
        answer = rng.randrange(2)
        pair = [base, dark] if answer == 0 else [dark, base]
        imgs = [save(im, rel, task, i, k) for k, im in enumerate(pair)]
        records.append(
            _record(task, rel, "Which image has the better exposure?", "Two versions of one picture are shown.",
                    ["the first image", "the second image"], answer, imgs)
        )  # fmt: skip
        # 4. Image_Spatial_Transformation_Estimation (2D-spatial, context first): which transform.
        task, rel = "Image_Spatial_Transformation_Estimation", "2D-spatial"
        src = digit_image(digits[rng.randrange(len(digits))], 96)
        transforms = [
            ("rotated 90 degrees counter-clockwise", Image.Transpose.ROTATE_90),
            ("rotated 180 degrees", Image.Transpose.ROTATE_180),
            ("flipped left to right", Image.Transpose.FLIP_LEFT_RIGHT),
            ("flipped top to bottom", Image.Transpose.FLIP_TOP_BOTTOM),
        ]
        answer = rng.randrange(4)
        imgs = [save(src, rel, task, i, 0), save(src.transpose(transforms[answer][1]), rel, task, i, 1)]
        records.append(
            _record(task, rel, "How was the first image transformed into the second?", "Two images are shown.",
                    [t for t, _ in transforms], answer, imgs)
        )  # fmt: skip
        # 5. visual_ordering (Discrete-temporal, context first): order by growing size.
        task, rel = "visual_ordering", "Discrete-temporal"
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        sizes = [32, 56, 80]
        perm = rng.sample(range(3), 3)
        frames = []
        for k in perm:
            canvas = Image.new("RGB", (96, 96), (255, 255, 255))
            s = draw_shape(shape, color, sizes[k])
            canvas.paste(s, ((96 - sizes[k]) // 2, (96 - sizes[k]) // 2), s)
            frames.append(canvas)
        imgs = [save(f, rel, task, i, k) for k, f in enumerate(frames)]
        right = ",".join(str(perm.index(k) + 1) for k in range(3))
        wrong = {
            ",".join(map(str, p)) for p in ([1, 2, 3], [3, 2, 1], [2, 1, 3], [1, 3, 2], [2, 3, 1], [3, 1, 2])
        } - {right}
        opts = rng.sample(sorted(wrong), 3)
        answer = rng.randrange(4)
        opts.insert(answer, right)
        records.append(
            _record(task, rel, "In which order should the images be arranged so that the shape grows?",
                    "Three images are shown out of order.", opts, answer, imgs)
        )  # fmt: skip
        # 6. temporal_ordering (Continuous-temporal, question first): first frame of a motion.
        task = "temporal_ordering"
        rel = "Continuous-temporal"
        xs = [8, 32, 56]
        order = rng.sample(range(3), 3)
        frames = []
        for k in order:
            canvas = Image.new("RGB", (96, 96), (255, 255, 255))
            dot = draw_shape("circle", "red", 32)
            canvas.paste(dot, (xs[k], 32), dot)
            frames.append(canvas)
        imgs = [save(f, rel, task, i, k) for k, f in enumerate(frames)]
        answer = order.index(0)
        records.append(
            _record(task, rel, "The red ball moves from left to right. Which image is the first frame?",
                    "Three frames of a short clip are shown.", [f"image {k + 1}" for k in range(3)], answer, imgs)
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "all.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return path


def corpus_documents(out_dir: Path, limit: int = 40) -> list[dict]:
    """The corpus engine's embedded sample, extracted into interleaved documents (OmniCorpus rows).

    Image records of the sample WARC are written under ``out_dir`` and linked via
    ``metadata.bytes_path``; images the sample lacks stay URLs (the generator skips them).
    Returns [] when the corpus engine or its sample is unavailable.
    """
    try:
        from interleaf.corpus.document import Document
        from interleaf.corpus.extract import extract
        from interleaf.corpus.sample import iter_sample_pages
        from interleaf.processing.image import to_rgb

        pages = list(iter_sample_pages())
    except Exception:  # noqa: BLE001 - optional source; the caller falls back to package text
        return []
    img_dir = out_dir / "corpus_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for url, payload, ctype, _ in pages:
        if ctype.startswith("image/"):
            try:
                img = to_rgb(Image.open(io.BytesIO(payload)))
            except Exception:  # noqa: BLE001 - an undecodable image is simply not used
                continue
            path = img_dir / f"{len(files)}.png"
            img.save(path)
            files[url] = str(path)
    rows = []
    for url, payload, ctype, _ in pages:
        if "html" not in ctype or len(rows) >= limit:
            continue
        doc = extract(payload, url=url)
        if not isinstance(doc, Document):
            continue
        row = doc.to_row()
        for k, image in enumerate(row["images"]):
            if image in files:
                meta = dict(row["metadata"][k] or {})
                meta["bytes_path"] = files[image]
                row["metadata"][k] = meta
        rows.append(row)
    return rows


def _package_texts() -> list[str]:
    """Paragraphs of the dataset descriptions scikit-learn ships."""
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    paras: list[str] = []
    for f in sorted(descr.glob("*.rst")):
        for block in f.read_text(encoding="utf-8").split("\n\n"):
            block = " ".join(block.split())
            if len(block.split()) > 12 and not block.startswith(("..", "|", "=", "-", ":")):
                paras.append(block)
    return paras


def mini_documents(out_dir: Path, seed: int = 0, n_docs: int = 12) -> list[dict]:
    """Interleaved documents for the haystacks: the corpus sample, else package text + digit images."""
    rows = corpus_documents(out_dir)
    if rows and any(m and m.get("bytes_path") for r in rows for m in r["metadata"]):
        return rows
    rng = random.Random(seed)
    texts = _package_texts()
    digits, _ = _digits()
    img_dir = out_dir / "haystack_src"
    img_dir.mkdir(parents=True, exist_ok=True)
    docs = []
    for d in range(n_docs):
        row = {"texts": [], "images": [], "metadata": [], "general_metadata": {"id": f"mini-{d}"}}
        for _ in range(rng.randint(3, 6)):
            row["texts"].append(rng.choice(texts))
            row["images"].append(None)
            row["metadata"].append(None)
            if rng.random() < 0.5:
                k = rng.randrange(len(digits))
                path = img_dir / f"digit_{k}.png"
                if not path.exists():
                    digit_image(digits[k], 32).save(path)
                row["texts"].append(None)
                row["images"].append(f"file://{path}")
                row["metadata"].append({"url": f"file://{path}", "bytes_path": str(path)})
        docs.append(row)
    return docs


def make_mini_mmniah(
    out_dir: str | os.PathLike,
    per_task: int = 6,
    seed: int = 0,
    lengths: tuple[int, ...] = (1000, 2000, 4000),
) -> Path:
    """Write an MM-NIAH split (``annotations/`` + ``images/``) for all six tasks; returns its path."""
    out = Path(out_dir)
    split = out / "mm_niah_val" if "mm_niah" not in out.name else out
    docs = mini_documents(out / "_src", seed)
    write_split(split, docs, lengths=lengths, per_task=per_task, seed=seed)
    return split
