"""Build MM-NIAH-style samples, in the official format, from interleaved documents.

A haystack is a run of interleaved documents (OmniCorpus / OBELICS aligned-list rows: ``texts``,
``images``, ``metadata``) cut to a target context length, counted as the official data does:
text tokens + 256 per image. Needles are placed at chosen depths (fraction of the context tokens
before the needle):

- retrieval-text: one sentence with a secret word; open answer;
- counting-text: several sentences "The little penguin counted N needles."; list answer;
- reasoning-text: a chain of comparisons spread over the haystack; open answer;
- retrieval-image: a drawn shape pasted into one haystack image; 4 text choices, int answer;
- counting-image: k_i copies of a shape pasted into several images; list answer;
- reasoning-image: a drawn shape pasted into one image; 4 option images, int answer.

Output (``write_split``): ``DIR/annotations/<task>.jsonl`` and ``DIR/images/...`` with fields
``id, images_list, context, question, answer, meta{placed_depth, context_length,
context_length_text, context_length_image, num_images, needles, choices, choices_image_path}``.
Text tokens are counted by ``count_tokens`` (default: words and punctuation marks; pass a tokenizer's
``len(encode(text))`` for exact lengths).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from interleaf.errors import InputError
from interleaf.eval.mmniah import IMAGE_PLACEHOLDER, TASKS
from interleaf.processing.image import to_rgb

IMAGE_TOKENS = 256
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 20, 60), "green": (46, 139, 87), "blue": (30, 80, 220), "orange": (255, 140, 0)}
NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank")
SECRET_WORDS = (
    "oak",
    "violin",
    "harbor",
    "lantern",
    "pepper",
    "glacier",
    "compass",
    "meadow",
    "falcon",
    "copper",
)


def count_words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


@dataclass
class Node:
    text: str | None = None
    image: str | Image.Image | None = None  # a file path, or a PIL image made here (a needle image)


def document_nodes(row: dict, image_dir: str | os.PathLike | None = None) -> list[Node]:
    """Nodes of one OmniCorpus/OBELICS row; images resolved to local files (others are skipped)."""
    texts, images = row.get("texts") or [], row.get("images") or []
    metas = row.get("metadata") or [None] * len(texts)
    if len(texts) != len(images):
        raise InputError(
            f"document {row.get('general_metadata', {}).get('id', '?')}: texts and images differ in length"
        )
    nodes = []
    for text, image, meta in zip(texts, images, metas):
        if text is not None:
            if text.strip():
                nodes.append(Node(text=text))
            continue
        if image is None:
            continue
        candidates = [
            (meta or {}).get("bytes_path"),
            image[7:] if str(image).startswith("file://") else image,
        ]
        if image_dir:
            candidates.append(str(Path(image_dir) / str(image)))
        path = next((c for c in candidates if c and os.path.isfile(c)), None)
        if path:
            nodes.append(Node(image=path))
    return nodes


class Haystack:
    """Nodes cut to a target length; ``insert_text`` / ``image_at`` place needles at a depth."""

    def __init__(self, nodes: list[Node], count_tokens: Callable[[str], int]):
        self.nodes = nodes
        self.count = count_tokens

    def tokens(self, node: Node) -> int:
        return self.count(node.text) if node.text is not None else IMAGE_TOKENS

    def total(self) -> int:
        return sum(self.tokens(n) for n in self.nodes)

    @classmethod
    def build(cls, pool: Iterable[Node], target: int, count_tokens: Callable[[str], int]) -> Haystack:
        nodes, total = [], 0
        for node in pool:
            need = target - total
            if need <= 0:
                break
            if node.image is not None:
                if IMAGE_TOKENS <= need:
                    nodes.append(node)
                    total += IMAGE_TOKENS
                continue
            n = count_tokens(node.text)
            if n <= need:
                nodes.append(node)
                total += n
            else:  # cut the text at a word boundary: the shortest prefix that reaches the target
                words = node.text.split(" ")
                lo, hi = 1, len(words)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if count_tokens(" ".join(words[:mid])) >= need:
                        hi = mid
                    else:
                        lo = mid + 1
                nodes.append(Node(text=" ".join(words[:lo])))
                total += count_tokens(nodes[-1].text)
                break
        return cls(nodes, count_tokens)

    def insert_text(self, needle: str, depth: float) -> float:
        """Insert a text needle at ``depth`` (splitting a text node at a word); returns the real depth."""
        total = max(self.total(), 1)
        target = depth * total
        acc = 0
        for i, node in enumerate(self.nodes):
            n = self.tokens(node)
            if acc + n >= target:
                if node.text is not None and target > acc:
                    words = node.text.split(" ")
                    k = 0
                    while k < len(words) and acc + self.count(" ".join(words[: k + 1])) <= target:
                        k += 1
                    head, tail = " ".join(words[:k]), " ".join(words[k:])
                    parts = [Node(text=head)] if head else []
                    parts.append(Node(text=needle))
                    if tail:
                        parts.append(Node(text=tail))
                    self.nodes[i : i + 1] = parts
                    return (acc + (self.count(head) if head else 0)) / total
                self.nodes.insert(i, Node(text=needle))
                return acc / total
            acc += n
        self.nodes.append(Node(text=needle))
        return acc / total

    def image_at(self, depth: float, rng: random.Random, avoid: set[int]) -> tuple[int, float]:
        """Index of the image node nearest to ``depth`` (adding a plain canvas if there is none)."""
        total = max(self.total(), 1)
        acc, best = 0, None
        for i, node in enumerate(self.nodes):
            if node.image is not None and i not in avoid:
                d = acc / total
                if best is None or abs(d - depth) < abs(best[1] - depth):
                    best = (i, d)
            acc += self.tokens(node)
        if best is not None:
            return best
        canvas = Image.new("RGB", (224, 224), tuple(rng.randint(200, 255) for _ in range(3)))
        pos = self.insert_text("", depth)  # split point at the depth, then turn it into an image
        for i, node in enumerate(self.nodes):
            if node.text == "" and node.image is None:
                self.nodes[i] = Node(image=canvas)
                return i, pos
        raise AssertionError("unreachable")


def draw_shape(
    shape: str, color: str, size: int = 96, background: tuple[int, int, int] | None = None
) -> Image.Image:
    """A filled shape on a transparent (or solid) square."""
    mode = "RGBA" if background is None else "RGB"
    img = Image.new(mode, (size, size), (0, 0, 0, 0) if background is None else background)
    d = ImageDraw.Draw(img)
    m, s, c = size // 8, size - size // 8, COLORS[color]
    if shape == "circle":
        d.ellipse([m, m, s, s], fill=c)
    elif shape == "square":
        d.rectangle([m, m, s, s], fill=c)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (s, s), (m, s)], fill=c)
    else:
        d.polygon([(size // 2, m), (s, size // 2), (size // 2, s), (m, size // 2)], fill=c)
    return img


def _paste(base: str | Image.Image, needles: Sequence[Image.Image], rng: random.Random) -> Image.Image:
    img = to_rgb(Image.open(base) if isinstance(base, str) else base)  # a haystack GIF/PNG: no PIL warning
    side = max(img.width, img.height)
    if side < 224:  # small haystack images are upscaled so a needle stays visible
        scale = 224 / side
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.NEAREST
        )
    for needle in needles:
        n = max(16, min(img.width, img.height) // 4)
        nd = needle.resize((n, n), Image.Resampling.BICUBIC)
        x, y = rng.randint(0, img.width - n), rng.randint(0, img.height - n)
        img.paste(nd, (x, y), nd if nd.mode == "RGBA" else None)
    return img


@dataclass
class RawSample:
    nodes: list[Node]
    question: str
    answer: object
    depths: list[float]
    needles: list[str]
    choices: list[str] | None = None
    choice_images: list[Image.Image] | None = None


def needle_depths(hay: Haystack, is_needle: Callable[[Node], bool]) -> list[tuple[float, Node]]:
    """(depth, node) of the needle nodes in context order; depth = context tokens before / total."""
    total = max(hay.total(), 1)
    acc, out = 0, []
    for node in hay.nodes:
        if is_needle(node):
            out.append((acc / total, node))
        acc += hay.tokens(node)
    return out


def make_sample(task: str, hay: Haystack, depths: Sequence[float], rng: random.Random) -> RawSample:
    """Place the needles of ``task`` into ``hay`` (mutated) at ``depths``.

    Depths (and counting answers) are read back from the final context, so several needles report
    where they ended up after all insertions.
    """
    if task in ("retrieval-text", "counting-text", "reasoning-text"):
        if task == "retrieval-text":
            word = rng.choice(SECRET_WORDS)
            needles = [f"The secret word hidden in this document is '{word}'."]
            q, answer = "What is the secret word hidden in the document?", word
        elif task == "counting-text":
            needles = [f"The little penguin counted {rng.randint(1, 9)} needles." for _ in depths]
            q = (
                "How many needles did the little penguin count each time? List the numbers in the order "
                "they appear, as a JSON list."
            )
            answer = None  # read back below, in context order
        else:
            people = rng.sample(NAMES, len(depths) + 1)
            needles = [f"{a} is taller than {b}." for a, b in zip(people, people[1:])]
            rng.shuffle(needles)
            q, answer = f"Among {', '.join(sorted(people))}, who is the shortest?", people[-1]
        for needle, depth in zip(needles, sorted(depths)):
            hay.insert_text(needle, depth)
        placed = needle_depths(hay, lambda n: n.text in needles)
        if task == "counting-text":
            answer = [int(re.search(r"\d+", n.text).group()) for _, n in placed]
        return RawSample(hay.nodes, q, answer, [d for d, _ in placed], [n.text for _, n in placed])
    shape_color = [(s, c) for s in SHAPES for c in COLORS]
    options = rng.sample(shape_color, 4)
    answer = rng.randrange(4)
    shape, color = options[answer]
    counts: dict[int, int] = {}
    used: set[int] = set()
    for depth in sorted(depths if task == "counting-image" else depths[:1]):
        idx, _ = hay.image_at(depth, rng, used)
        k = rng.randint(1, 4) if task == "counting-image" else 1
        pasted = _paste(hay.nodes[idx].image, [draw_shape(shape, color)] * k, rng)
        hay.nodes[idx] = Node(image=pasted)
        used.add(idx)
        counts[id(pasted)] = k
    placed = needle_depths(hay, lambda n: id(n.image) in counts)
    ds = [d for d, _ in placed]
    if task == "retrieval-image":
        q = "One of the images in the document contains a small drawn shape. Which shape is it?"
        choices = [f"a {c} {s}" for s, c in options]
        return RawSample(hay.nodes, q, answer, ds, [f"{color} {shape}"], choices=choices)
    if task == "counting-image":
        q = (
            f"Count the {color} {shape}s pasted into the images of the document. List the count for each image "
            "that contains them, in the order the images appear, as a JSON list."
        )
        return RawSample(hay.nodes, q, [counts[id(n.image)] for _, n in placed], ds, [f"{color} {shape}"])
    if task == "reasoning-image":
        q = "Which of the following images appears inside one of the images of the document?"
        imgs = [draw_shape(s, c, 128, background=(255, 255, 255)) for s, c in options]
        return RawSample(hay.nodes, q, answer, ds, [f"{color} {shape}"], choice_images=imgs)
    raise InputError(f"unknown MM-NIAH task {task!r}")


def write_split(
    out_dir: str | os.PathLike,
    documents: Iterable[dict],
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (1000, 2000, 4000),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    per_task: int = 5,
    seed: int = 0,
    count_tokens: Callable[[str], int] = count_words,
    image_dir: str | os.PathLike | None = None,
    num_needles: int = 3,
) -> Path:
    """Write ``annotations/<task>.jsonl`` + ``images/`` under ``out_dir``; returns ``out_dir``.

    Samples cycle over (length, depth) combinations; counting and reasoning-text tasks spread
    ``num_needles`` needles around the chosen depth.
    """
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pool = [n for row in documents for n in document_nodes(row, image_dir)]
    if not any(n.text for n in pool):
        raise InputError("the documents hold no text to build a haystack from")
    rng = random.Random(seed)
    for task in tasks:
        with open(out / "annotations" / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for sid in range(per_task):
                length = lengths[sid % len(lengths)]
                depth = depths[
                    (sid // len(lengths) + sid % len(lengths)) % len(depths)
                ]  # every (length, depth) pair
                start = rng.randrange(len(pool))
                rotated = pool[start:] + pool[:start]
                stream = (rotated[i % len(rotated)] for i in range(10 * len(rotated) + 1000))
                hay = Haystack.build(stream, length, count_tokens)
                multi = task.startswith("counting") or task == "reasoning-text"
                ds = (
                    sorted({min(1.0, max(0.0, depth + off)) for off in (-0.15, 0.0, 0.15)})[:num_needles]
                    if multi
                    else [depth]
                )
                raw = make_sample(task, hay, ds, rng)
                rec = _to_record(task, sid, raw, out, count_tokens)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


def _to_record(task: str, sid: int, raw: RawSample, out: Path, count_tokens: Callable[[str], int]) -> dict:
    parts, images, n_text = [], [], 0
    made = 0
    for node in raw.nodes:
        if node.text is not None:
            if node.text:
                parts.append(node.text)
                n_text += count_tokens(node.text)
            continue
        if isinstance(node.image, Image.Image):
            rel = f"{task}/{sid}_{made}.png"
            (out / "images" / task).mkdir(parents=True, exist_ok=True)
            node.image.convert("RGB").save(out / "images" / rel)
            made += 1
        else:  # copy haystack files under images/ so the split is self-contained
            src = Path(node.image)
            rel = f"haystack/{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]}_{src.name}"
            dst = out / "images" / rel
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        images.append(rel)
        parts.append(IMAGE_PLACEHOLDER)
    choice_paths = None
    if raw.choice_images:
        choice_paths = []
        for k, img in enumerate(raw.choice_images):
            rel = f"{task}/{sid}_choice{k}.png"
            (out / "images" / task).mkdir(parents=True, exist_ok=True)
            img.save(out / "images" / rel)
            choice_paths.append(rel)
    context = "\n".join(parts)
    return {
        "id": sid,
        "images_list": images,
        "context": context,
        "question": raw.question,
        "answer": raw.answer,
        "meta": {
            "placed_depth": raw.depths,
            "context_length": n_text + IMAGE_TOKENS * len(images),
            "context_length_text": n_text,
            "context_length_image": IMAGE_TOKENS * len(images),
            "num_images": len(images),
            "needles": raw.needles,
            "choices": raw.choices,
            "choices_image_path": choice_paths,
        },
    }
