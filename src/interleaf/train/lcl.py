"""LCL pretraining (``interleaf lcl pretrain``): a vision encoder trained from scratch on image-text
pairs and interleaved documents by latent compression (``interleaf.model.lcl``).

Data: the files ``interleaf train`` reads as ``corpus_paths`` (corpus builds, interleaved documents,
``corpus convert --to pairs`` output, ``{"image", "text" | "caption"}`` JSONL). Sequences follow the
official code:

- a pair is ``<soi> <img>xP <eoi> text <eot>`` (image first, with probability ``img_first_prob``) or
  ``<sot> text <soi> <img>xP <eoi>``, its text cut to ``context_length - P - 4`` tokens;
- a document is ``<sot>``, its nodes in order (text, or an image block), ``<eot>``, with at most
  ``max_images`` images; at the context length it is cut, and an image block that would not fit
  whole is dropped from its ``<soi>`` on and replaced by ``<eot>``;
- an MMC4 row (``text_list``, ``image_info``) follows the official MMC4 recipe: images whose
  ``matched_sim`` is below ``sim_threshold`` (0.24) or not a number (NaN, a bool) are dropped (images
  without a similarity, as ``corpus convert --to mmc4`` writes them, are kept), one image per sentence (chosen at random),
  the first ``max_images``; images that cannot be read are left out; each image block goes before or
  after its sentence (``img_first_prob``), sentences are joined by spaces; a row left with no image
  is skipped (``no_image``). ``image_name`` is relative to ``mmc4_image_root`` (default: the file's
  folder), unless the row's interleaf metadata names a stored file (``bytes_path``, relative to the
  corpus build folder: the one the file lies in, else the file's folder, else ``mmc4_image_root``).

Images are resized (shorter side, bicubic) and centre-cropped to the model's size and normalised with
CLIP's mean and std. Training is AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on matrices only,
as OpenCLIP) with linear warm-up and cosine decay, losses weighted 1.0 (generation) and 0.1
(contrastive), ``logit_scale`` clamped to [0, ln 100] after each step. Under torchrun every rank
reads its own share of each epoch's permutation, the contrastive loss sees all ranks' pairs, and
gradients are averaged. A run saves ``checkpoint-N/`` folders (written whole, then renamed) and
resumes from the newest one, at the same sample, with the same random state.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interleaf.errors import ConfigError, InputError
from interleaf.files import replace_text
from interleaf.model.checkpoint import parse_device
from interleaf.model.lcl import (
    CLIP_MEAN,
    CLIP_STD,
    LCL_PRESETS,
    SPECIAL_TOKENS,
    LCLConfig,
    LCLModel,
    lcl_loss,
    load_lcl,
    save_lcl,
)
from interleaf.train.data import (
    SkipLog,
    SkipSample,
    document_nodes,
    image_file,
    parse_line,
    read_corpus_rows,
    row_id,
)
from interleaf.train.trainer import (
    all_gather_object,
    dist_info,
    ending_process_group,
    init_process_group,
    rng_state,
    seed_everything,
    set_rng_state,
)

_CLIP_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


# ----------------------------------------------------------------------------------------------------
# tokenizer


class LCLTokenizer:
    """A Hugging Face tokenizer with LCL's five special tokens: CLIP's ``<|startoftext|>`` /
    ``<|endoftext|>`` serve as start and end of text where present (the official ids 49406/49407), and
    ``<img_placehold>``, ``<start_of_img>``, ``<end_of_img>`` are added after the vocabulary (49408-49410
    for CLIP's)."""

    def __init__(self, tokenizer: Any) -> None:
        vocab = tokenizer.get_vocab()
        clip = all(name in vocab for name in _CLIP_NAMES.values())  # a CLIP tokenizer: use its own
        names = {t: _CLIP_NAMES[t] if clip and t in _CLIP_NAMES else t for t in SPECIAL_TOKENS}
        missing = [n for n in names.values() if n not in vocab]
        if missing:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_extra_special_tokens=False
            )
            vocab = tokenizer.get_vocab()
        self.tokenizer = tokenizer
        self.ids = {t: vocab[n] for t, n in names.items()}
        if 0 in self.ids.values():  # id 0 pads the batches
            raise ConfigError(
                f"tokenizer: special token {next(t for t, i in self.ids.items() if not i)} has id 0, the pad id"
            )

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a text that spells "<img_placehold>" or "<|endoftext|>" is text, never
        # the control token (an extra placeholder or <start_of_img> breaks the image count the model
        # relies on, an extra <end_of_text> the retrieval feature)
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))


def load_lcl_tokenizer(name: str | Path) -> LCLTokenizer:
    """``offline`` (the small BPE the tests and demo build offline), a tokenizer folder (e.g. a CLIP
    tokenizer saved with ``save_pretrained``), or a model folder ``pretrain`` wrote (its ``tokenizer/``)."""
    if str(name) == "offline":
        from interleaf.model.tokenizer import build_offline_tokenizer

        return LCLTokenizer(build_offline_tokenizer())
    from transformers import AutoTokenizer

    path = Path(name)
    if not path.is_dir():
        raise InputError(f"tokenizer folder not found: {name} (or use 'offline')")
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    elif (path / "model.safetensors").is_file():
        raise InputError(
            f"{name}: a model folder without its tokenizer/ (pass the tokenizer it was trained with)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        lines = str(exc).strip().splitlines()
        raise InputError(
            f"{path}: not a tokenizer folder ({type(exc).__name__}{f': {lines[0]}' if lines else ''})"
        ) from None
    return LCLTokenizer(tokenizer)


# ----------------------------------------------------------------------------------------------------
# data


def clip_pixels(path: str, size: int) -> torch.Tensor:
    """An image file as a [3, size, size] tensor: shorter side resized to ``size`` (bicubic), centre
    crop, CLIP normalisation. Unreadable or missing files raise SkipSample."""
    from PIL import Image

    from interleaf.processing.image import load_image

    try:
        img = load_image(path)
    except InputError as exc:
        reason = "missing_image" if not os.path.exists(path) else "bad_image"
        raise SkipSample(reason, str(exc)) from None
    w, h = img.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (rw - size) // 2, (rh - size) // 2
    if rw * rh <= 64 * size * size:
        img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + size, top + size))
    else:  # a very elongated image: scale only the region the crop keeps, not gigabytes of it
        sx, sy = rw / w, rh / h
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        img = img.resize((size, size), Image.BICUBIC, box=box)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy((x - mean) / std)


@dataclass
class LCLSample:
    ids: list[int]
    pixels: torch.Tensor  # [images, 3, S, S], in the order of their blocks


class LCLDataset:
    """Corpus rows as LCL sequences (see the module docstring); bad rows raise nothing: ``get`` returns
    None and the skip log counts them."""

    def __init__(
        self,
        paths: list[str],
        tokenizer: LCLTokenizer,
        config: LCLConfig,
        img_first_prob: float = 0.5,
        max_images: int = 6,
        seed: int = 0,
        skip_log: SkipLog | None = None,
        sim_threshold: float = 0.24,
        mmc4_image_root: str | None = None,
    ) -> None:
        self.rows, self.build_roots = read_corpus_rows(paths)
        self.sim_threshold, self.mmc4_image_root = sim_threshold, mmc4_image_root
        self.tok, self.cfg = tokenizer, config
        self.img_first_prob, self.max_images, self.seed = img_first_prob, max_images, seed
        self.skip_log = skip_log or SkipLog()
        ids = config.special_token_ids
        if ids != tokenizer.ids:
            raise ConfigError(
                f"the tokenizer's special token ids {tokenizer.ids} differ from the model's {ids}"
            )
        if config.context_length < config.num_image_tokens + 5:  # a pair: P + 4 tokens and some text
            raise ConfigError(
                f"context length {config.context_length} cannot hold an image of {config.num_image_tokens} "
                f"tokens with text (at least {config.num_image_tokens + 5})"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def image_block(self) -> list[int]:
        c = self.cfg
        return [c.id("<start_of_img>"), *[c.id("<img_placehold>")] * c.num_image_tokens, c.id("<end_of_img>")]

    def get(self, i: int, epoch: int = 0) -> LCLSample | None:
        file, row = self.rows[i]
        try:
            if isinstance(row, str):
                row = parse_line(row)
            if not isinstance(row, dict):
                raise SkipSample("bad_json", "not an object")
            rng = random.Random(f"{self.seed}-{epoch}-lcl-{i}")
            if "text_list" in row and "image_info" in row:
                return self.build_mmc4(row, Path(file).parent, self.build_roots.get(file), rng)
            nodes = document_nodes(row, Path(file).parent, self.build_roots.get(file))
            return self.build(nodes, rng, pair=not ("texts" in row and "images" in row))
        except SkipSample as exc:
            self.skip_log.add(Path(file).name, i, row_id(row), exc)
            return None

    def build(
        self,
        nodes: list[tuple[str, Any]],
        rng: random.Random,
        pair: bool,
        sep: str = "\n",
        lenient: bool = False,
    ) -> LCLSample:
        """One sequence from text/image nodes (see the module docstring). ``sep`` ends each text node;
        ``lenient`` leaves out images that cannot be read (MMC4) instead of skipping the row."""
        c, size, ctx = self.cfg, self.cfg.image_size, self.cfg.context_length
        sot, eot = c.id("<start_of_text>"), c.id("<end_of_text>")
        block = self.image_block()
        if pair:
            (_, (path, _)), (_, text) = (
                [n for n in nodes if n[0] == "image"][0],
                [n for n in nodes if n[0] == "text"][0],
            )
            if path is None:
                raise SkipSample("missing_image", "image node without a local file")
            pixels = clip_pixels(path, size)[None]
            text_ids = self.tok.encode(text)[: max(0, ctx - len(block) - 2)]
            img_first = rng.random() < self.img_first_prob
            ids = block + text_ids + [eot] if img_first else [sot] + text_ids + block
            return LCLSample(ids, pixels)
        ids, images = [sot], []
        for kind, value in nodes:
            if kind == "image":
                if len(images) == self.max_images:
                    continue
                if len(ids) + len(block) > ctx - 1:
                    break  # an image block that does not fit whole is cut at its <soi>
                path, _ = value
                try:
                    if path is None:
                        raise SkipSample("missing_image", "image node without a local file")
                    images.append(clip_pixels(path, size))
                except SkipSample:
                    if lenient:
                        continue
                    raise
                ids += block
            else:
                ids += self.tok.encode(str(value) + sep)[: ctx - 1 - len(ids)]
                if len(ids) >= ctx - 1:
                    break
        ids.append(eot)
        specials = set(c.special_token_ids.values())
        if not any(t not in specials for t in ids):  # images alone (they filled the context): no text
            raise SkipSample("empty_document", "no text fits the context")
        pixels = torch.stack(images) if images else torch.zeros(0, 3, size, size)
        return LCLSample(ids, pixels)

    def build_mmc4(self, row: dict, base: Path, root: Path | None, rng: random.Random) -> LCLSample:
        """An MMC4 row as the official MMC4 dataset lays it out (see the module docstring)."""
        sentences, infos = row["text_list"], row["image_info"]
        if not isinstance(sentences, list) or not all(isinstance(t, str) for t in sentences):
            raise SkipSample("bad_document", "field 'text_list' must be a list of strings")
        if not isinstance(infos, list) or not all(isinstance(x, dict) for x in infos):
            raise SkipSample("bad_document", "field 'image_info' must be a list of objects")
        image_base = Path(self.mmc4_image_root) if self.mmc4_image_root else base
        matched: dict[int, list[tuple[str | None, bool]]] = {}
        for k, info in enumerate(infos):
            ix, sim = info.get("matched_text_index"), info.get("matched_sim")
            if not isinstance(ix, int) or isinstance(ix, bool) or not 0 <= ix < len(sentences):
                raise SkipSample("bad_document", f"image_info[{k}].matched_text_index {ix!r} is out of range")
            if sim is not None and not _similarity(sim) >= self.sim_threshold:
                continue  # below the threshold, or no number (NaN, a bool, a word): not known to match
            node, meta = info.get("image_name") or info.get("raw_url"), info.get("metadata")
            path, stored = image_file(node, meta, image_base, root or base)
            if stored and root is None and self.mmc4_image_root and not os.path.exists(path):
                # a stored image (bytes_path: relative to the build folder) of a row written outside
                # the build, not beside the file: under mmc4_image_root (the build folder)
                path, stored = image_file(node, meta, image_base, image_base)
            matched.setdefault(ix, []).append((path, stored))
        # one image per sentence, the first max_images sentences with one (the official order)
        chosen = {ix: rng.choice(cands) for ix, cands in sorted(matched.items())[: self.max_images]}
        nodes: list[tuple[str, Any]] = []
        for ix, sentence in enumerate(sentences):
            if ix in chosen and rng.random() < self.img_first_prob:
                nodes += [("image", chosen[ix]), ("text", sentence)]
            elif ix in chosen:
                nodes += [("text", sentence), ("image", chosen[ix])]
            else:
                nodes.append(("text", sentence))
        sample = self.build(nodes, rng, pair=False, sep=" ", lenient=True)
        if sample.pixels.shape[0] == 0:
            detail = "no image of the row is matched, readable and within the context"
            gone = next((p for p, stored in chosen.values() if stored and not os.path.exists(p)), None)
            if gone is not None:  # say why: the common case is a file written outside the build
                detail += f"; stored image {gone} not found"
                if root is None:
                    detail += (
                        " (bytes_path is relative to the corpus build folder and this file is in none:"
                        " pass the build folder as --mmc4-image-root)"
                    )
            raise SkipSample("no_image", detail)
        return sample


def _similarity(value: Any) -> float:
    """An MMC4 ``matched_sim`` as a number (a numeric string too); NaN for anything else (a bool, a
    word), which no threshold admits."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def collate(samples: list[LCLSample], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, T] right-padded with ``pad_id``, pixels [images, 3, S, S] in row order)."""
    longest = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
    return ids, torch.cat([s.pixels for s in samples])


# ----------------------------------------------------------------------------------------------------
# training


@dataclass
class LCLTrainConfig:
    data: list[str]
    output_dir: str
    preset: str = "tiny"
    init: str | None = None  # an LCL checkpoint folder to start from instead of random weights
    tokenizer: str = "offline"
    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int | None = None  # default: 2000 (official), at most a tenth of the steps
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    generation_weight: float = 1.0
    contrastive_weight: float = 0.1
    img_first_prob: float = 0.5
    max_images: int = 6
    sim_threshold: float = 0.24  # MMC4 rows: images matched less closely are dropped (official)
    mmc4_image_root: str | None = None  # MMC4 rows: the folder of their image_name (or build) files
    context_length: int | None = None  # default: the preset's
    grad_checkpointing: bool = False
    save_every: int = 50
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # the GPU where there is one, as interleaf train
    precision: str = "fp32"  # or "bf16": autocast, fp32 weights (OpenCLIP's amp_bf16)
    extra: dict = field(default_factory=dict)  # further LCLConfig fields over the preset


# settings a resumed run may change; the others must be the checkpoint's
_MAY_CHANGE = {"steps", "save_every", "log_every", "device", "precision", "grad_checkpointing", "output_dir"}


def _run_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as a checkpoint keeps and a resume compares them: the files and folders they
    name as absolute paths, so ``pairs.jsonl`` and ``/data/pairs.jsonl`` (from ``/data``) are the same
    data, and the same spelling from another folder is not. A checkpoint of an older version holds the
    spellings; they are taken from the current folder."""
    out = dict(settings)

    def where(p: Any) -> Any:
        return os.path.realpath(p) if isinstance(p, str) else p

    if isinstance(out.get("data"), (list, tuple)):
        out["data"] = [where(p) for p in out["data"]]
    for key in ("init", "mmc4_image_root", "output_dir"):
        out[key] = where(out.get(key))
    if out.get("tokenizer") != "offline":
        out["tokenizer"] = where(out.get("tokenizer"))
    return {k: v for k, v in out.items() if k in settings}


def _model_config(cfg: LCLTrainConfig, tok: LCLTokenizer) -> LCLConfig:
    if cfg.preset not in LCL_PRESETS:
        raise ConfigError(f"unknown LCL preset {cfg.preset!r} (presets: {', '.join(LCL_PRESETS)})")
    fields_ = {**LCL_PRESETS[cfg.preset], **cfg.extra}
    if cfg.context_length:
        fields_["context_length"] = cfg.context_length
    fields_["special_token_ids"] = dict(tok.ids)
    fields_.setdefault("vocab_size", max(len(tok), max(tok.ids.values()) + 1))
    return LCLConfig(**fields_)


def _optimizer(model: LCLModel, cfg: LCLTrainConfig) -> torch.optim.AdamW:
    # OpenCLIP: no weight decay on gains, biases, norms and logit_scale (every parameter under 2-D)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "ln" not in n and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "ln" not in n and "bias" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, cfg: LCLTrainConfig) -> float:
    """OpenCLIP's cosine schedule: linear warm-up over ``warmup`` steps, cosine to 0 at ``steps``."""
    warmup = cfg.warmup if cfg.warmup is not None else min(2000, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * cfg.lr


class _Order:
    """Each epoch a seeded permutation of the rows (padded with its first rows to a multiple of the
    world size); rank r of w reads positions r, r + w, ..."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        perm = list(range(self.n))
        random.Random(f"{self.seed}-order-{self.epoch}").shuffle(perm)
        perm += perm[: -len(perm) % self.world]  # equal shares, as DistributedSampler pads them
        return perm[self.rank :: self.world]

    def next(self) -> tuple[int, int]:
        if self.pos >= len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        i = self._perm[self.pos]
        self.pos += 1
        return i, self.epoch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


def _checkpoints(out: Path) -> list[Path]:
    found = [
        p
        for p in out.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "train_state.pt").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


@ending_process_group()
def pretrain(cfg: LCLTrainConfig, log=print) -> dict[str, Any]:
    """Train (or resume) an LCL model; returns a summary with the final model folder."""
    import torch.distributed as dist

    rank, world, local_rank = dist_info()
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is available")
    if world > 1 and not dist.is_initialized():
        init_process_group("nccl" if kind == "cuda" else "gloo")
    device = torch.device(f"cuda:{local_rank}" if kind == "cuda" else kind)
    if device.type == "cuda":  # NCCL's object collectives (the checkpoints' gathers) use the current device
        torch.cuda.set_device(device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + rank)
    tok = load_lcl_tokenizer(cfg.tokenizer)
    if cfg.init:
        model = load_lcl(cfg.init)
        if model.config.special_token_ids != tok.ids:
            raise ConfigError(f"{cfg.init}: its special token ids differ from the tokenizer's")
    else:
        model = LCLModel(_model_config(cfg, tok))
    model.to(device).train()
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    skips = SkipLog(out / f"skipped{'' if world == 1 else f'.rank{rank}'}.jsonl")  # as interleaf train
    data = LCLDataset(cfg.data, tok, model.config, cfg.img_first_prob, cfg.max_images, cfg.seed, skips,
                      cfg.sim_threshold, cfg.mmc4_image_root)  # fmt: skip
    if len(data) == 0:
        raise InputError(f"no rows in {', '.join(cfg.data)}")
    order = _Order(len(data), cfg.seed, rank, world)
    optimizer = _optimizer(model, cfg)
    step = 0
    ckpts = _checkpoints(out)
    if ckpts:
        state = torch.load(ckpts[-1] / "train_state.pt", map_location="cpu", weights_only=False)
        if len(state["order"]) != world:  # each rank resumes at its own position: as many ranks as then
            raise ConfigError(
                f"{ckpts[-1]} was written by {len(state['order'])} process(es); resume it with as many, "
                f"not {world}"
            )
        # settings the checkpoint names and this version has (an older checkpoint may lack some)
        was, now = _run_settings(state.get("config") or {}), _run_settings(asdict(cfg))
        changed = [k for k, v in was.items() if k not in _MAY_CHANGE and k in now and now[k] != v]
        if changed:  # the data order, model or optimisation would silently differ from the run's
            k = changed[0]
            raise ConfigError(
                f"{ckpts[-1]} was trained with {k}={was[k]!r}, not {now[k]!r}; resume with "
                f"the run's settings (only {', '.join(sorted(_MAY_CHANGE - {'output_dir'}))} may change)"
            )
        model.load_state_dict(load_lcl(ckpts[-1]).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        order.load(state["order"][rank])
        set_rng_state(state["rng"][rank])
        skips.restore(state["skips"][rank])
        step = state["step"]
        log(f"resumed from {ckpts[-1]} at step {step}")
    elif (out / "model").is_dir():  # a finished run whose checkpoints are gone: never train it over
        raise ConfigError(
            f"{out / 'model'} exists but no checkpoint to resume from: the run has finished "
            f"(to train further, --init {out / 'model'} with a new -o)"
        )
    else:  # killed before its first checkpoint: its skip records are met again, so they go
        skips.restore({})
    log_path = out / "log.jsonl"
    if rank == 0 and log_path.exists():  # keep the lines of the steps the checkpoint holds, no more
        kept = []
        for ln in log_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:  # a line cut short by a kill (always past the checkpoint)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(ln)
        replace_text(log_path, "".join(ln + "\n" for ln in kept))  # whole, or the old file
    started = time.time()
    last: dict[str, float] = {}
    while step < cfg.steps:
        batch: list[LCLSample] = []
        misses = 0
        while len(batch) < cfg.batch_size:
            sample = data.get(*order.next())
            if sample is None:
                misses += 1
                if misses > 10 * max(cfg.batch_size, len(data)):
                    raise InputError(f"no usable sample in {', '.join(cfg.data)}: see {skips.path}")
                continue
            batch.append(sample)
        ids, pixels = collate(batch, model.config.pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        # mixed precision as OpenCLIP's --precision amp_bf16: weights and optimizer in fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            output = model(pixels.to(device), ids.to(device))
        # the losses in fp32, as the official code computes the contrastive logits with autocast off
        loss, gen, con = lcl_loss(output, cfg.generation_weight, cfg.contrastive_weight)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if world > 1:
            for p in model.parameters():
                if p.grad is None:  # unused this step on this rank (no pair with context)
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        last = {"step": step, "loss": loss.item(), "generation": gen.item(), "contrastive": con.item(),
                "pairs": int(output.image_features.shape[0]), "lr": lr_at(step - 1, cfg),
                "logit_scale": model.logit_scale.exp().item()}  # fmt: skip
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            if step % cfg.log_every == 0 or step == cfg.steps:
                log(f"step {step}/{cfg.steps} loss {last['loss']:.4f} (generation {last['generation']:.4f}, "
                    f"contrastive {last['contrastive']:.4f}) lr {last['lr']:.2e}")  # fmt: skip
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save(model, optimizer, order, skips, step, out, tok, cfg, rank, world)
    final = out / "model"
    if rank == 0:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lcl(model, tmp)
        tok.save(tmp / "tokenizer")  # beside, not in, the model's config.json (AutoTokenizer reads that)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if world > 1:
        dist.barrier()
    return {"model": str(final), "steps": step, "last": last, "skipped": dict(skips.counts),
            "seconds": round(time.time() - started, 2)}  # fmt: skip


def _save(model, optimizer, order, skips, step, out, tok, cfg, rank, world) -> None:
    import torch.distributed as dist

    orders = all_gather_object(order.state(), world)
    rngs = all_gather_object(rng_state(), world)
    counts = all_gather_object(dict(skips.counts), world)
    if rank == 0:
        final = out / f"checkpoint-{step}"
        tmp = out / f"checkpoint-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lcl(model, tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "order": orders, "rng": rngs,
                 "skips": counts, "config": _run_settings(asdict(cfg))}  # fmt: skip
        torch.save(state, tmp / "train_state.pt")  # its presence marks a complete checkpoint
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# zero-shot retrieval


@torch.no_grad()
def retrieval(
    model_dir: str | Path,
    data: list[str],
    batch_size: int = 64,
    ks: tuple[int, ...] = (1, 5, 10),
    tokenizer: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Image-to-text and text-to-image recall@k over the image-text pairs in ``data`` (OpenCLIP's
    retrieval metrics), with the model's tokenizer (saved beside it by ``pretrain``; ``tokenizer``
    names another: ``offline`` or a folder, e.g. CLIP's for an official checkpoint). Rows that are
    not pairs, or whose image cannot be read, are skipped and counted."""
    from interleaf.model.lcl import load_lcl

    kind = parse_device(device)
    model = load_lcl(model_dir).eval().to(kind)
    tok = load_lcl_tokenizer(tokenizer or model_dir)
    cfg = model.config
    if tok.ids != cfg.special_token_ids:
        raise ConfigError(
            f"the tokenizer's special token ids {tok.ids} differ from the model's {cfg.special_token_ids}"
        )
    rows, roots = read_corpus_rows(data)
    pixels, texts, skipped = [], [], {}
    for file, row in rows:
        try:
            row = parse_line(row) if isinstance(row, str) else row
            if not isinstance(row, dict) or ("texts" in row and "images" in row):
                raise SkipSample("not_a_pair", "only image-text pairs are scored")
            nodes = document_nodes(row, Path(file).parent, roots.get(file))
            path = nodes[0][1][0]
            if path is None:
                raise SkipSample("missing_image", "image node without a local file")
            pixels.append(clip_pixels(path, cfg.image_size))
        except SkipSample as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        texts.append([cfg.id("<start_of_text>"), *tok.encode(nodes[1][1])[: cfg.context_length - 2],
                      cfg.id("<end_of_text>")])  # fmt: skip
    if not texts:
        raise InputError(f"no image-text pairs in {', '.join(data)}")
    image = torch.cat([model.image_features(torch.stack(pixels[i : i + batch_size]).to(kind))
                       for i in range(0, len(pixels), batch_size)])  # fmt: skip
    text = torch.cat([model.text_features(collate([LCLSample(t, torch.zeros(0)) for t in texts[i : i + batch_size]],
                                                  cfg.pad_id)[0].to(kind)) for i in range(0, len(texts), batch_size)])  # fmt: skip
    scores = (image @ text.t()).cpu()
    truth = torch.arange(len(texts))
    out: dict[str, Any] = {"pairs": len(texts), "skipped": skipped}
    for name, logits in (("image_to_text", scores), ("text_to_image", scores.t())):
        # rank of the true partner: how many candidates score strictly higher
        rank = (logits > logits[truth, truth][:, None]).sum(dim=1)
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out
