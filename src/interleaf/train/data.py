"""Training data: InternVL's fine-tuning format and interleaved corpora, tokenised with loss masks.

Conversation data (InternVL ``internvl_chat_finetune.py`` format)
    A meta JSON ``{name: {"root", "annotation" (.jsonl), "repeat_time", "max_dynamic_patch", ...}}``
    names JSONL files of samples ``{"id", "image": str | [str] | absent, "video": str,
    "conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``.
    ``<image>`` placeholders must match the images; when a sample has images but no placeholder, one
    ``<image>\\n`` per image is put in front of the first human turn (upstream's auto-prepend;
    several images get the ``Image-i: <image>`` form). ``<video>`` becomes ``Frame-i: <image>`` lines,
    one tile per frame (the training form upstream uses). Each ``<image>`` expands to ``<img>`` +
    ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``.

Loss masks (labels = -100 except what the model must learn), per template as upstream:
    * ``Hermes-2``, ``phi3-chat``, ``internlm2-chat``: the whole conversation is tokenised in one go;
      the loss covers each assistant reply plus its separator (``<|im_end|>`` / ``<|end|>``).
      ``internlm2-chat`` strips message values (the only template whose upstream preprocessing does),
      its BOS is ignored.
    * ``internvl2_5``: each turn block is tokenised on its own and concatenated (BOS once, first);
      the loss covers the reply plus ``<|im_end|>``, not the ``<|im_start|>assistant\\n`` header and
      not the trailing ``\\n``.
    Masks are computed from character offsets of the tokens, so they are exact for any tokenizer.

Interleaved documents (OmniCorpus/OBELICS ``texts``/``images``/``metadata`` rows) and image-text pairs
train with next-token loss on the text; images sit in place and carry no loss.

Bad samples never crash a run: they raise :class:`SkipSample` with a reason, and the dataset counts
them in a :class:`SkipLog` (reason -> count, plus a JSONL record per skipped sample).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interleaf.errors import ConfigError, InputError
from interleaf.files import replace_text

IGNORE_INDEX = -100
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


class SkipSample(Exception):
    """A sample that cannot be trained on; ``reason`` is a short code for the counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipLog:
    """Counts skipped samples by reason and records each one (dataset, index, id, reason, detail)."""

    def __init__(self, path: str | Path | None = None, echo=None, echo_limit: int = 10) -> None:
        self.counts: Counter[str] = Counter()
        self.records: list[dict[str, Any]] = []
        self.path = Path(path) if path else None
        self.echo = echo  # callable(str) for a log line (the first ``echo_limit`` skips), or None
        self.echo_limit = echo_limit
        self._seen: set[tuple[str, int]] = set()
        self._local = threading.local()

    @contextmanager
    def deferred(self) -> Iterator[list[tuple]]:
        """Collect this thread's skips in a list instead of recording them (a data-loading worker
        reads ahead; its skips count only once the trainer consumes the sample: :meth:`replay`)."""
        self._local.pending = pending = []
        try:
            yield pending
        finally:
            self._local.pending = None

    def replay(self, skips: list[tuple]) -> None:
        for skip in skips:
            self.add(*skip)

    def add(self, dataset: str, index: int, sample_id: Any, exc: SkipSample) -> None:
        pending = getattr(self._local, "pending", None)
        if pending is not None:
            pending.append((dataset, index, sample_id, exc))
            return
        key = (dataset, index)
        if key in self._seen:  # the same sample skipped again in a later epoch: counted once
            return
        self._seen.add(key)
        self.counts[exc.reason] += 1
        record = {
            "dataset": dataset,
            "index": index,
            "id": sample_id,
            "reason": exc.reason,
            "detail": exc.detail,
        }
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.echo is not None and len(self.records) <= self.echo_limit:
            more = " (further skips: see the skip log)" if len(self.records) == self.echo_limit else ""
            self.echo(f"skipped sample {dataset}[{index}] (id={sample_id}): {exc}{more}")

    def restore(self, counts: dict[str, int]) -> None:
        """Resume at a checkpoint that had seen ``counts`` skips: the log file keeps its first
        records (those the checkpoint counted; later ones will be met again), and counts, records
        and the seen set are rebuilt from them, so nothing is counted or written twice."""
        n = sum(counts.values())
        kept: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists():
            lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            kept = [json.loads(ln) for ln in lines[:n]]
            replace_text(self.path, "".join(ln + "\n" for ln in lines[:n]))
        if len(kept) == n:
            self.records = kept
            self.counts = Counter(r["reason"] for r in kept)
            self._seen = {(r["dataset"], r["index"]) for r in kept}
        else:  # no (complete) file: trust the checkpoint's counts
            self.counts = Counter(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return skip_summary(self.counts)


def skip_summary(counts: dict[str, int]) -> str:
    """``"3 samples skipped (bad_image=1, missing_image=2)"``, or ``"no samples skipped"``."""
    if not counts:
        return "no samples skipped"
    parts = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
    total = sum(counts.values())
    return f"{total} sample{'' if total == 1 else 's'} skipped ({parts})"


@dataclass
class Sample:
    """One tokenised training sample.

    input_ids: long [S]; labels: long [S] (-100 = no loss); pixel_values: float [N_tiles, 3, H, W] or
    None; num_tiles: tiles per image, in order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    num_tiles: list[int] = field(default_factory=list)
    key: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------
# tokenisation helpers


# a fast tokenizer called from two threads at once can fail ("Already borrowed": transformers resets
# its truncation/padding state on every call); data-loading workers share one
_TOKENIZER_LOCK = threading.Lock()


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (a transformers fast tokenizer or a ``tokenizers.Tokenizer``)."""
    with _TOKENIZER_LOCK:
        if hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "convert_tokens_to_ids"):
            enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def token_id(tokenizer: Any, token: str) -> int:
    """The id of a special token; CheckpointError-like ConfigError if the tokenizer lacks it."""
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        tid = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)):
            tid = None
    else:
        tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ConfigError(f"tokenizer: special token {token!r} is missing")
    return int(tid)


def encode_with_mask(
    tokenizer: Any, segments: list[tuple[str, bool]], add_special_tokens: bool
) -> tuple[list[int], list[bool]]:
    """Tokenise the concatenation of ``segments`` in one go; a token is trained iff its characters
    lie inside a segment marked True. Added tokens with no characters (BOS/EOS) are never trained."""
    text = "".join(s for s, _ in segments)
    spans, pos = [], 0
    for s, train in segments:
        if train and s:
            spans.append((pos, pos + len(s)))
        pos += len(s)
    ids, offsets = _encode(tokenizer, text, add_special_tokens)
    mask = []
    for start, end in offsets:
        mask.append(end > start and any(a <= start and end <= b for a, b in spans))
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# conversations -> token ids + labels


def _template(name: str, system_message: str | None):
    from interleaf.processing.templates import get_template

    return get_template(name, system_message)


def conversation_segments(
    template_name: str, conversations: list[dict], system_message: str | None = None
) -> list[list[tuple[str, bool]]]:
    """Render a conversation as blocks of ``(text, trained)`` segments following upstream's masking.

    One block for the whole-string templates (Hermes-2, internlm2-chat, phi3-chat); one block per
    turn for ``internvl2_5``, whose turns upstream tokenises separately.
    """
    template = _template(template_name, system_message)
    strip = template_name == "internlm2-chat"  # upstream's preprocess_internlm; internvl2_5 does not strip
    msgs = []
    for i, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise SkipSample("bad_conversation", f"turn {i} has no text value")
        if role == "system" and i != 0:
            raise SkipSample("bad_conversation", f"turn {i}: a system message may only come first")
        msgs.append({"from": role, "value": value.strip() if strip else value})
    try:
        parts = template.parts(msgs)
    except InputError as exc:
        raise SkipSample("bad_conversation", str(exc)) from None
    per_block = template_name == "internvl2_5"
    blocks: list[list[tuple[str, bool]]] = [[]]
    for p in parts:
        if per_block and p.kind == "header" and p.role != "system":
            blocks.append([])
        if p.role == "assistant" and p.kind == "content":
            blocks[-1].append((p.text, True))
        elif p.role == "assistant" and p.kind == "sep":
            # The end token is learned; a trailing newline (internvl2_5) is not.
            core = p.text.rstrip("\n")
            blocks[-1].append((core, True))
            if p.text[len(core) :]:
                blocks[-1].append((p.text[len(core) :], False))
        else:
            blocks[-1].append((p.text, False))
    return [b for b in blocks if b]


def tokenize_conversation(
    tokenizer: Any,
    template_name: str,
    conversations: list[dict],
    image_token_counts: list[int],
    system_message: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of a conversation whose ``<image>`` placeholders are already in place.

    Each ``<image>`` becomes ``<img><IMG_CONTEXT>*n</img>`` with n = ``image_token_counts[i]``.
    Returns (input_ids long [S], labels long [S]).
    """
    context_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    marker = f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN}{IMG_END_TOKEN}"
    ids: list[int] = []
    mask: list[bool] = []
    for b, block in enumerate(conversation_segments(template_name, conversations, system_message)):
        block = [(text.replace(IMAGE_PLACEHOLDER, marker), train) for text, train in block]
        block_ids, block_mask = encode_with_mask(tokenizer, block, add_special_tokens=(b == 0))
        ids += block_ids
        mask += block_mask
    return _expand_images(ids, mask, context_id, image_token_counts)


def _expand_images(
    ids: list[int], mask: list[bool], context_id: int, counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the i-th single ``<IMG_CONTEXT>`` id by ``counts[i]`` copies (never trained)."""
    found = sum(1 for t in ids if t == context_id)
    if found != len(counts):
        raise SkipSample("image_count_mismatch", f"{found} image slots in the text for {len(counts)} images")
    out_ids: list[int] = []
    out_labels: list[int] = []
    k = 0
    for t, m in zip(ids, mask):
        if t == context_id:
            out_ids += [context_id] * counts[k]
            out_labels += [IGNORE_INDEX] * counts[k]
            k += 1
        else:
            out_ids.append(t)
            out_labels.append(t if m else IGNORE_INDEX)
    return torch.tensor(out_ids, dtype=torch.long), torch.tensor(out_labels, dtype=torch.long)


def truncate(
    input_ids: torch.Tensor, labels: torch.Tensor, max_len: int, img_end_id: int, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut to ``max_len`` tokens; a cut that would fall inside (or drop) an image skips the sample."""
    if input_ids.numel() <= max_len:
        return input_ids, labels
    kept_ends = int((input_ids[:max_len] == img_end_id).sum())
    if kept_ends < n_images:
        raise SkipSample(
            "too_long",
            f"{input_ids.numel()} tokens > max_seq_length {max_len} and the cut would fall inside an image",
        )
    return input_ids[:max_len], labels[:max_len]


# ---------------------------------------------------------------------------------------------------
# the meta JSON and its datasets


@dataclass
class DatasetSpec:
    """One entry of the meta JSON."""

    name: str
    root: str
    annotation: str
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    data_augment: bool = False


_META_KEYS = {"root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length"}


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """Parse a meta JSON; relative roots and annotations resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: meta file not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not meta:
        raise ConfigError(f"{path}: expected an object of datasets")
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: dataset '{name}' must be an object")
        unknown = set(entry) - _META_KEYS
        if unknown:
            raise ConfigError(f"{path}: dataset '{name}': unknown key '{sorted(unknown)[0]}'")
        if "annotation" not in entry:
            raise ConfigError(f"{path}: dataset '{name}': missing key 'annotation'")
        _check_meta_types(path, name, entry)
        annotation = Path(entry["annotation"])
        if not annotation.is_absolute():
            annotation = path.parent / annotation
        if not annotation.is_file():
            raise ConfigError(f"{path}: dataset '{name}': annotation file not found: {annotation}")
        root = Path(entry.get("root", "") or ".")
        if not root.is_absolute():
            root = path.parent / root
        specs.append(
            DatasetSpec(
                name,
                str(root),
                str(annotation),
                float(entry.get("repeat_time", 1)),
                entry.get("max_dynamic_patch"),
                entry.get("data_augment", False),
            )
        )
    return specs


def _check_meta_types(path: Path, name: str, entry: dict) -> None:
    """Wrong value types in a meta entry are refused at load: read as they are, ``"6"`` would fail at
    the first sample and ``"false"`` would turn augmentation on."""

    def bad(key: str, expected: str) -> ConfigError:
        value = entry[key]
        return ConfigError(
            f"{path}: dataset '{name}': key '{key}' must be {expected}, got {type(value).__name__} {value!r}"
        )

    for key in ("annotation", "root"):
        if key in entry and not isinstance(entry[key], str):
            raise bad(key, "a path (string)")
    if not entry["annotation"]:
        raise bad("annotation", "a path (string)")
    repeat = entry.get("repeat_time", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat > 0:
        raise bad("repeat_time", "a positive number")
    patch = entry.get("max_dynamic_patch")
    if patch is not None and (isinstance(patch, bool) or not isinstance(patch, int) or patch < 1):
        raise bad("max_dynamic_patch", "a positive integer")
    if "data_augment" in entry and not isinstance(entry["data_augment"], bool):
        raise bad("data_augment", "true or false")


@dataclass
class DataArgs:
    """What the dataset needs to know about the model and the run."""

    template: str
    num_image_token: int = 256
    image_size: int = 448
    max_seq_length: int = 4096
    max_dynamic_patch: int = 6
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    min_num_frame: int = 8
    max_num_frame: int = 32
    system_message: str | None = None
    seed: int = 42
    data_augment: bool = False  # every dataset: random JPEG re-encode (quality 75-100), as upstream


class ConversationDataset:
    """All samples of a meta JSON, as (dataset, line) references; ``get(i, epoch)`` builds one.

    ``repeat_time`` < 1 keeps that fraction of a file (prefix, as upstream); > 1 repeats it.
    Lines that are not valid JSON are kept as references and skipped (with a reason) when built.
    """

    def __init__(
        self, meta_path: str | Path, tokenizer: Any, args: DataArgs, skip_log: SkipLog | None = None
    ):
        self.specs = read_meta(meta_path)
        self.tokenizer = tokenizer
        self.args = args
        self.skip_log = skip_log or SkipLog()
        self.lines: list[list[str]] = []
        self.index: list[tuple[int, int]] = []  # (dataset, line)
        for d, spec in enumerate(self.specs):
            with open(spec.annotation, encoding="utf-8", errors="surrogateescape") as fh:  # see parse_line
                lines = [ln for ln in fh.read().splitlines() if ln.strip()]
            self.lines.append(lines)
            n = len(lines)
            if spec.repeat_time < 1:
                refs = list(range(int(n * spec.repeat_time)))
            else:
                whole, frac = int(spec.repeat_time), spec.repeat_time - int(spec.repeat_time)
                refs = list(range(n)) * whole + list(range(int(n * frac)))
            self.index += [(d, i) for i in refs]
        self.img_end_id = token_id(tokenizer, IMG_END_TOKEN)

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, i: int) -> tuple[str, int]:
        d, line = self.index[i]
        return self.specs[d].name, line

    def get(self, i: int, epoch: int = 0) -> Sample | None:
        """Build sample ``i``; a bad one is counted in the skip log and None returned."""
        d, line = self.index[i]
        spec = self.specs[d]
        raw = self.lines[d][line]
        sample_id: Any = line
        try:
            record = parse_line(raw, f"line {line + 1}: ")
            if not isinstance(record, dict):
                raise SkipSample("bad_json", f"line {line + 1}: not an object")
            sample_id = record.get("id", line)
            rng = random.Random(f"{self.args.seed}-{epoch}-{d}-{line}")
            sample = self.build(record, spec, rng)
            sample.key = f"{spec.name}:{line}"
            return sample
        except SkipSample as exc:
            self.skip_log.add(spec.name, line, sample_id, exc)
            return None

    # -- building one sample --------------------------------------------------------------------
    def build(self, record: dict, spec: DatasetSpec, rng: random.Random) -> Sample:
        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise SkipSample("empty_conversation", "no 'conversations' list")
        conversations = [dict(t) if isinstance(t, dict) else {} for t in conversations]
        if not any(t.get("from") == "gpt" and str(t.get("value", "")).strip() for t in conversations):
            raise SkipSample("empty_conversation", "no assistant reply to learn")
        for t in conversations:
            if t.get("from") not in ("system", "human", "gpt"):
                raise SkipSample("bad_conversation", f"unknown role {t.get('from')!r}")
        args = self.args
        max_patch = spec.max_dynamic_patch or args.max_dynamic_patch
        images = record.get("image")
        video = record.get("video")
        pixel_values: torch.Tensor | None = None
        num_tiles: list[int] = []
        if video is not None and not isinstance(video, str):
            raise SkipSample("bad_video", f"field 'video' must be a path, got {type(video).__name__}")
        if images is not None and not (
            isinstance(images, str) or (isinstance(images, list) and all(isinstance(p, str) for p in images))
        ):
            raise SkipSample(
                "bad_image", f"field 'image' must be a path or a list of paths, got {_describe(images)}"
            )
        if images:  # an image wins over a video in the same record, as upstream's __getitem__ decides
            paths = [images] if isinstance(images, str) else list(images)
            conversations = _ensure_placeholders(conversations, len(paths))
            per_image = max_patch if len(paths) == 1 else max(1, max_patch // len(paths))
            augment = rng if (spec.data_augment or args.data_augment) else None
            tensors = []
            for p in paths:
                tensors.append(self._load_image(os.path.join(spec.root, p), per_image, augment))
            num_tiles = [t.shape[0] for t in tensors]
            pixel_values = torch.cat(tensors, dim=0)
        elif video:
            frames = self._video_frames(video, spec.root, rng)
            conversations = _expand_video(conversations, len(frames))
            pixel_values = _frames_pixels(frames, args.image_size)
            num_tiles = [1] * len(frames)
        else:
            n = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in conversations)
            if n:
                raise SkipSample("image_count_mismatch", f"{n} <image> placeholders but no image")
        counts = [n * args.num_image_token for n in num_tiles]
        ids, labels = tokenize_conversation(
            self.tokenizer, args.template, conversations, counts, args.system_message
        )
        ids, labels = truncate(ids, labels, args.max_seq_length, self.img_end_id, len(num_tiles))
        if not (labels != IGNORE_INDEX).any():
            raise SkipSample("no_supervised_tokens", "nothing left to learn after truncation")
        return Sample(ids, labels, pixel_values, num_tiles)

    def _load_image(self, path: str, max_num: int, augment: random.Random | None = None) -> torch.Tensor:
        return load_training_image(self.args, path, max_num, augment)

    def _video_frames(self, video: str, root: str, rng: random.Random) -> list:
        """Frames of a video file or a folder of frame images (random count and 'rand' sampling)."""
        from PIL import Image

        from interleaf.processing.image import to_rgb

        path = os.path.join(root, video)
        n_frames = rng.randint(self.args.min_num_frame, self.args.max_num_frame)
        if os.path.isdir(path):
            files = sorted(
                f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp"))
            )
            if not files:
                raise SkipSample("bad_video", f"no frame images in {path}")
            picks = _rand_segments(len(files), n_frames, rng)
            try:
                # to_rgb: palette frames with transparency go through RGBA, without PIL's warning
                return [to_rgb(Image.open(os.path.join(path, files[k]))) for k in picks]
            except OSError as exc:
                raise SkipSample("bad_video", f"{path}: {exc}") from None
        if not os.path.exists(path):
            raise SkipSample("missing_video", f"video not found: {path}")
        from interleaf.processing.video import read_frames_at, video_info

        try:
            total, _ = video_info(path)
            n_frames = min(n_frames, total)
            # only the picked frames are decoded to images (a 600-frame clip: 8-32 images, not 600)
            return read_frames_at(path, _rand_segments(total, n_frames, rng))
        except InputError as exc:
            raise SkipSample("bad_video", str(exc)) from None


def load_training_image(
    args: DataArgs, path: str, max_num: int, augment: random.Random | None = None
) -> torch.Tensor:
    """One image as tiles [N, 3, H, W] with the run's tiling settings (``min_dynamic_patch``,
    ``dynamic_image_size``, thumbnail); ``augment`` (an rng) applies upstream's train transform, a
    random JPEG re-encode at quality 75-100. A missing or unreadable file skips the sample."""
    from interleaf.processing.image import load_image, preprocess_image

    try:
        image: Any = path
        if augment is not None:
            import io

            buf = io.BytesIO()
            load_image(path).save(buf, format="JPEG", quality=augment.randint(75, 100))
            image = buf.getvalue()
        return preprocess_image(
            image,
            max_num,
            min(args.min_dynamic_patch, max_num),
            args.image_size,
            args.use_thumbnail,
            args.dynamic_image_size,
        )
    except InputError as exc:
        reason = "missing_image" if "not found" in str(exc) else "bad_image"
        raise SkipSample(reason, str(exc)) from None


def parse_line(raw: str, where: str = "") -> Any:
    """A JSONL line as JSON, or :class:`SkipSample` ``bad_json``. Files are read with
    ``errors="surrogateescape"``, so a line with bytes that are not UTF-8 skips that line alone."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipSample("bad_json", f"{where}not valid UTF-8") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SkipSample("bad_json", f"{where}{exc.msg}") from None


def _describe(value: Any) -> str:
    """The type of a bad field value for a skip record (a list by its element types)."""
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {', '.join(kinds)}" if kinds else "an empty list"
    return type(value).__name__


def _rand_segments(total: int, n: int, rng: random.Random) -> list[int]:
    """Upstream's ``sample='rand'``: n uniform segments over the frames, a random frame from each."""
    n = max(1, min(n, total))
    edges = [round(k * total / n) for k in range(n + 1)]
    return [rng.randrange(edges[k], max(edges[k] + 1, edges[k + 1])) for k in range(n)]


def _frames_pixels(frames: list, image_size: int) -> torch.Tensor:
    from interleaf.processing.video import frames_to_pixels

    return frames_to_pixels(frames, image_size)


def _ensure_placeholders(conversations: list[dict], n_images: int) -> list[dict]:
    """Check the ``<image>`` count; auto-prepend to the first human turn when there is none."""
    found = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in conversations)
    if found == n_images:
        return conversations
    if found:
        raise SkipSample("image_count_mismatch", f"{found} <image> placeholders for {n_images} images")
    first = next((i for i, t in enumerate(conversations) if t.get("from") == "human"), None)
    if first is None:
        raise SkipSample("bad_conversation", "no human turn to put the image in")
    from interleaf.processing.prompt import image_prefix  # "<image>\n" or "Image-i: <image>\n" lines

    prefix = image_prefix(n_images)
    out = [dict(t) for t in conversations]
    out[first]["value"] = prefix + out[first]["value"]
    return out


def _expand_video(conversations: list[dict], n_frames: int) -> list[dict]:
    """``<video>\\n`` -> ``Frame-1: <image>\\nFrame-2: <image>...\\n`` (training form, with hyphen)."""
    frames = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n_frames)) + "\n"
    out = [dict(t) for t in conversations]
    found = sum(str(t.get("value", "")).count(VIDEO_PLACEHOLDER) for t in out)
    if found > 1:
        raise SkipSample("image_count_mismatch", f"{found} <video> placeholders for one video")
    if found == 0:
        first = next((i for i, t in enumerate(out) if t.get("from") == "human"), None)
        if first is None:
            raise SkipSample("bad_conversation", "no human turn to put the video in")
        out[first]["value"] = VIDEO_PLACEHOLDER + "\n" + out[first]["value"]
    for t in out:
        v = str(t.get("value", ""))
        if VIDEO_PLACEHOLDER in v:
            if IMAGE_PLACEHOLDER in v:
                raise SkipSample("image_count_mismatch", "<image> placeholders in a video sample")
            t["value"] = re.sub(re.escape(VIDEO_PLACEHOLDER) + r"\n?", frames, v, count=1)
    return out


# ---------------------------------------------------------------------------------------------------
# interleaved documents and image-text pairs (pretraining)


CORPUS_SUFFIXES = (".jsonl", ".parquet")


def is_corpus_build(folder: Path) -> bool:
    """A corpus-engine build folder: ``data/`` beside ``stats.json`` (finished) or ``_work/`` (under way)."""
    return (folder / "data").is_dir() and ((folder / "stats.json").is_file() or (folder / "_work").is_dir())


def corpus_build_root(file: Path) -> Path | None:
    """The build folder a corpus file lies in (its nearest such ancestor), or None."""
    for folder in Path(os.path.abspath(file)).parents:
        if is_corpus_build(folder):
            return folder
    return None


def corpus_files(path: Path) -> list[Path]:
    """The files a ``corpus_paths`` entry names: a file itself; of a build folder only its ``data/``
    shards (``errors/``, ``excluded/`` and ``_work/`` hold JSONL that is not training data); of any
    other folder its JSONL and Parquet files below it, build folders among them read the same way.
    Hidden files (a writer's temporary files) are left out."""
    if not path.is_dir():
        return [path]
    if is_corpus_build(path):
        path = path / "data"
    out: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            out += corpus_files(child)
        elif child.suffix in CORPUS_SUFFIXES:
            out.append(child)
    return out


class CorpusDataset:
    """Interleaved documents (``texts``/``images``/``metadata`` rows, JSONL or Parquet) and image-text
    pairs (``{"image", "text"}`` or ``{"image", "caption"}``, with an optional ``metadata`` object as
    ``interleaf corpus convert --to pairs`` writes): next-token loss on text, images in place.

    A path may be a corpus build folder (its ``data/`` shards are read), any folder, or a file.
    Image nodes resolve to local files: ``metadata["bytes_path"]`` when ``corpus fetch-images``
    stored the image, relative to the build folder the file lies in (the file's own folder when it
    is in none); else the node itself when it is a local path or ``file://`` URL (relative to the
    file). Tiling follows the run's settings; ``data_augment`` re-encodes images as for conversations.
    """

    def __init__(self, paths: list[str], tokenizer: Any, args: DataArgs, skip_log: SkipLog | None = None):
        self.tokenizer = tokenizer
        self.args = args
        self.skip_log = skip_log or SkipLog()
        self.rows, self.build_roots = read_corpus_rows(paths)
        self.context_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        self.img_end_id = token_id(tokenizer, IMG_END_TOKEN)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = int(eos) if isinstance(eos, int) else None

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int, epoch: int = 0) -> Sample | None:
        file, row = self.rows[i]
        name = Path(file).name
        try:
            if isinstance(row, str):
                row = parse_line(row)
            if not isinstance(row, dict):
                raise SkipSample("bad_json", "not an object")
            rng = random.Random(f"{self.args.seed}-{epoch}-corpus-{i}") if self.args.data_augment else None
            sample = self.build(row, Path(file).parent, self.build_roots.get(file), rng)
            sample.key = f"{name}:{i}"
            return sample
        except SkipSample as exc:
            self.skip_log.add(name, i, row_id(row), exc)
            return None

    def build(
        self, row: dict, base: Path, root: Path | None = None, augment: random.Random | None = None
    ) -> Sample:
        """One row as a sample; image nodes resolve against ``base`` (the file's folder), stored
        images (``bytes_path``) against ``root`` (the build folder; default ``base``)."""
        # outside a build folder, bytes_path falls back to the file's folder; a miss there says why
        hint = "" if root else " (bytes_path is relative to the corpus build folder; this file is in none)"
        nodes = document_nodes(row, base, root)
        n_images = sum(1 for kind, _ in nodes if kind == "image")
        per_image = max(1, self.args.max_dynamic_patch // max(1, n_images))
        ids: list[int] = []
        labels: list[int] = []
        tiles: list[torch.Tensor] = []
        bos = _encode(self.tokenizer, "", add_special_tokens=True)[0]
        ids += bos
        labels += [IGNORE_INDEX] * len(bos)
        for kind, value in nodes:
            if kind == "image":
                path, stored = value
                if path is None:
                    raise SkipSample("missing_image", "image node without a local file")
                try:
                    t = load_training_image(self.args, path, per_image, augment)
                except SkipSample as exc:
                    if stored and exc.reason == "missing_image":
                        exc = SkipSample(exc.reason, exc.detail + hint)
                    raise exc from None
                tiles.append(t)
                seg, _ = _encode(self.tokenizer, IMG_START_TOKEN, False)
                end, _ = _encode(self.tokenizer, IMG_END_TOKEN + "\n", False)
                block = seg + [self.context_id] * (t.shape[0] * self.args.num_image_token) + end
                ids += block
                labels += [IGNORE_INDEX] * len(block)
            else:
                t_ids, _ = _encode(self.tokenizer, str(value) + "\n", False)
                ids += t_ids
                labels += t_ids
        if self.eos_id is not None:
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        input_ids = torch.tensor(ids, dtype=torch.long)
        label_t = torch.tensor(labels, dtype=torch.long)
        input_ids, label_t = truncate(
            input_ids, label_t, self.args.max_seq_length, self.img_end_id, len(tiles)
        )
        pv = torch.cat(tiles, dim=0) if tiles else None
        return Sample(input_ids, label_t, pv, [t.shape[0] for t in tiles])


def read_corpus_rows(paths: list[str]) -> tuple[list[tuple[str, Any]], dict[str, Path | None]]:
    """The rows of corpus files (JSONL lines left unparsed, Parquet rows as dicts), each with its file,
    and the build folder each file lies in (None outside one)."""
    rows: list[tuple[str, Any]] = []  # (file, row: dict or raw line)
    build_roots: dict[str, Path | None] = {}  # file -> the build folder it lies in
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ConfigError(f"corpus_paths: file not found: {path}")
        for f in corpus_files(path):
            build_roots[str(f)] = corpus_build_root(f)
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows += [(str(f), r) for r in pq.read_table(f).to_pylist()]
            else:
                with open(f, encoding="utf-8", errors="surrogateescape") as fh:  # see parse_line
                    rows += [(str(f), ln) for ln in fh.read().splitlines() if ln.strip()]
    return rows, build_roots


def document_nodes(row: dict, base: Path, root: Path | None) -> list[tuple[str, Any]]:
    """A corpus row (interleaved document or image-text pair) as ``[("text", str) | ("image",
    (local file or None, stored))]`` in reading order; image nodes resolve as ``CorpusDataset.build``
    says. Raises SkipSample for a malformed row or one without text."""
    root = root or base
    nodes: list[tuple[str, Any]] = []
    if "texts" in row and "images" in row:
        texts, images = row.get("texts") or [], row.get("images") or []
        if not isinstance(texts, list) or not isinstance(images, list):
            raise SkipSample("bad_document", "fields 'texts' and 'images' must be lists")
        if len(texts) != len(images):
            raise SkipSample("bad_document", "texts and images differ in length")
        metadata = _json_field(row, "metadata")
        if metadata is None:
            metadata = [None] * len(images)
        if not isinstance(metadata, list) or len(metadata) != len(images):
            got = f"{len(metadata)} entries" if isinstance(metadata, list) else type(metadata).__name__
            raise SkipSample("bad_document", f"field 'metadata': {got} for {len(images)} positions")
        for k, (t, im, meta) in enumerate(zip(texts, images, metadata)):
            if t is not None and im is None:
                if not isinstance(t, str):
                    raise SkipSample("bad_document", f"field 'texts': position {k} is {type(t).__name__}")
                nodes.append(("text", t))
            elif im is not None and t is None:
                nodes.append(("image", image_file(im, meta, base, root)))
            else:
                raise SkipSample("bad_document", "a position must hold exactly one of text and image")
    elif "image" in row and ("text" in row or "caption" in row):
        text = row.get("text") if row.get("text") is not None else row.get("caption")
        if not isinstance(text, str):
            raise SkipSample("bad_document", f"field 'text' must be a string, got {type(text).__name__}")
        nodes = [
            ("image", image_file(row["image"], _json_field(row, "metadata"), base, root)),
            ("text", text),
        ]
    else:
        raise SkipSample("bad_document", "expected texts/images lists or an image with text")
    if not any(kind == "text" and str(v).strip() for kind, v in nodes):
        raise SkipSample("empty_document", "no text to learn")
    return nodes


def _json_field(row: dict, key: str) -> Any:
    """``row[key]``, decoded when a Parquet row stores it as a JSON string (OBELICS layout)."""
    value = row.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise SkipSample("bad_document", f"field '{key}' is not valid JSON ({exc.msg})") from None
    return value


def row_id(row: Any) -> Any:
    """A corpus row's id for the skip log: ``general_metadata.id`` (documents), else ``id``."""
    if not isinstance(row, dict):
        return None
    try:
        general = _json_field(row, "general_metadata")
    except SkipSample:
        general = None
    if isinstance(general, dict) and general.get("id") is not None:
        return general["id"]
    return row.get("id")


def image_file(node: Any, meta: Any, base: Path, root: Path) -> tuple[str | None, bool]:
    """(local file of an image node or None, whether it is a stored ``bytes_path``)."""
    if isinstance(meta, dict) and meta.get("bytes_path"):
        p = Path(str(meta["bytes_path"]))
        return str(p if p.is_absolute() else root / p), True
    if isinstance(node, str):
        if node.startswith("file://"):
            return node[len("file://") :], False
        if "://" not in node:
            p = Path(node)
            return str(p if p.is_absolute() else base / p), False
    return None, False
