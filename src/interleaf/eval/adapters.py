"""Model adapters: one ``generate(requests)`` interface over three kinds of model.

- ``InterleafAdapter``: an interleaf checkpoint directory (either layout), batched greedy generation
  through ``ChatModel.prepare_batch`` / ``generate_batch`` (what ``batch_chat`` does) with each
  question's own tile budget, the next batch prepared in a worker thread while one generates; a
  failing batch is answered sample by sample;
- ``HFAdapter`` (``hf:PATH``): transformers' ``InternVLForConditionalGeneration`` on a ``-hf``
  checkpoint, one sample at a time, as a reference;
- ``OpenAIAdapter`` (``openai:URL#MODEL``): any OpenAI-compatible chat-completions endpoint (vLLM,
  LMDeploy, hosted APIs) with images as base64 data URLs, concurrent requests, per-request timeout,
  retries with exponential backoff on timeouts, connection errors, 429 and 5xx.

``generate`` yields ``(index, response_or_exception)`` as answers arrive, so the runner can commit
each one to the response store at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.endpoint import OpenAIClient, image_data_url, parse_openai_spec
from interleaf.errors import InputError
from interleaf.store import file_digest

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Request:
    """One generation request. ``prompt`` holds one ``<image>`` placeholder per entry of ``images``."""

    prompt: str
    images: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    max_num: int = 6  # tile budget of the whole prompt (shared by its images)
    dynamic: bool = True  # False: every image is one 448x448 tile (MM-NIAH)


class Adapter:
    """Base class: ``name`` (for file names), ``fingerprint`` (for the response store keys)."""

    name: str = "model"
    fingerprint: str = ""
    batched: bool = False
    notes: list[str]

    def settings(self) -> dict[str, Any]:
        """Generation settings that change answers (part of the store key)."""
        return {"do_sample": False}

    def generate(
        self, requests: Sequence[Request], batch_size: int = 8
    ) -> Iterator[tuple[int, str | Exception]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def directory_fingerprint(path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> str:
    """SHA-256 over every file below ``path`` (subfolders too): relative path + xxh3-128 of its
    full content. Sampling parts of the weights let checkpoints that differ only in the middle of
    a file (a stage that trains a few layers) share resume keys, so every byte is read. Hidden
    entries (``.git``, the hub's ``.cache``) are skipped: they change without the model changing,
    and so is ``exclude``, a run's output folder placed inside the model's (its answers change as
    they come); the model's folder itself is refused as that."""
    root = Path(path)
    skip = Path(exclude).resolve() if exclude is not None else None
    if skip is not None and skip == root.resolve():
        raise InputError(f"{exclude}: the output folder is the model's folder; give -o a folder of its own")
    h = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.is_file())
    for rel, f in sorted((f.relative_to(root), f) for f in files):
        if any(part.startswith(".") for part in rel.parts):
            continue
        if skip is not None and f.resolve().is_relative_to(skip):
            continue
        h.update(rel.as_posix().encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def _dtype_name(dtype: Any) -> str:
    """ "bfloat16" for torch.bfloat16 or "bfloat16"; "stored" for None (the checkpoint's own)."""
    return "stored" if dtype is None else str(dtype).removeprefix("torch.")


def _device_type(device: Any) -> str:
    """ "cuda" for "cuda:1" or torch.device("cuda", 1): the kind of device changes answers."""
    return str(device).split(":")[0]


# --------------------------------------------------------------------------------------------
# interleaf checkpoint
# --------------------------------------------------------------------------------------------


class InterleafAdapter(Adapter):
    """An interleaf checkpoint directory, answered with batched greedy generation."""

    batched = True

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: Any = None,
        chat_model: Any = None,
        exclude: str | os.PathLike | None = None,
    ):
        if chat_model is None and not Path(path).is_dir():
            raise InputError(f"{path}: not a checkpoint directory")
        self.path = path
        self.name = Path(path).resolve().name
        self.fingerprint = "interleaf:" + directory_fingerprint(path, exclude)
        self.device, self.dtype = device, dtype
        self._chat_model = chat_model  # loaded on first use: a fully cached rerun never loads weights
        # ChatModel.generate_batch's prefill: auto (rows on CPU, else padded) | rows | padded
        self.prefill = "auto"
        self.rowwise_prefill_on_cpu = True  # False: "padded" whatever ``prefill`` says
        # prepare the next batch in a worker thread: True, False, or None = where it pays (see below)
        self.prefetch: bool | None = None
        self.notes = []

    def settings(self) -> dict[str, Any]:
        # the compute dtype and device kind change greedy answers: part of the resume key
        return {**super().settings(), "dtype": _dtype_name(self.dtype), "device": _device_type(self.device)}

    @property
    def chat_model(self) -> Any:
        if self._chat_model is None:
            import interleaf

            self._chat_model = interleaf.load(self.path, device=self.device, dtype=self.dtype)
        return self._chat_model

    @staticmethod
    def _gen_kwargs(req: Request) -> dict[str, Any]:
        # ChatModel shares ``max_num`` over a prompt's images (max(1, max_num // n) each), so the
        # runner's budget gives the per-image tile count; one tile per image is ``max_num=1``.
        max_num = req.max_num if req.dynamic else 1
        return {"max_new_tokens": req.max_new_tokens, "do_sample": False, "max_num": max_num}

    def _one(self, req: Request) -> str:
        return self.chat_model.chat(req.prompt, images=list(req.images) or None, **self._gen_kwargs(req))

    def _use_prefetch(self) -> bool:
        """The worker thread overlaps input preparation with generation only where a core is free for
        it: always beside an accelerator; on CPU only when torch's threads leave a core over (measured
        on 2 cores with 2 torch threads: 1.04x the loop with the thread, 1.35x without)."""
        if self.prefetch is not None:
            return self.prefetch
        if self.chat_model.device.type != "cpu":
            return True
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cores > torch.get_num_threads()

    def _prepare(self, reqs: Sequence[Request]) -> list:
        """Token ids and tiles of a batch, each question with its own tile budget."""
        return self.chat_model.prepare_batch(
            [r.prompt for r in reqs],
            [list(r.images) or None for r in reqs],
            [self._gen_kwargs(r)["max_num"] for r in reqs],
        )

    def _batch(self, reqs: Sequence[Request], prepared: list) -> list[str]:
        """One batch through ``ChatModel.generate_batch`` (on CPU: each prompt prefilled alone into
        its row of a shared cache and the decode batched; else one left-padded prefill)."""
        gen = self._gen_kwargs(reqs[0])
        gen.pop("max_num")
        prefill = self.prefill if self.rowwise_prefill_on_cpu else "padded"
        return self.chat_model.generate_batch(prepared, prefill=prefill, **gen)

    def generate(
        self, requests: Sequence[Request], batch_size: int = 8
    ) -> Iterator[tuple[int, str | Exception]]:
        if not requests:
            return
        # Batches share the number of new tokens (tile budgets may differ within a batch).
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.max_new_tokens, []).append(i)
        chunks = [
            idxs[start : start + batch_size]
            for idxs in groups.values()
            for start in range(0, len(idxs), batch_size)
        ]
        _ = self.chat_model  # load before the worker thread starts preparing
        # One worker thread loads, tiles and tokenises the next batch while this one generates
        # (PIL, numpy and the tokenizer release the GIL), where a core is free for it.
        prefetch = self._use_prefetch()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="interleaf-prep") as pool:
            submit = pool.submit if prefetch else _run_now
            ahead = None
            for k, chunk in enumerate(chunks):
                reqs = [requests[i] for i in chunk]
                if len(chunk) > 1:
                    fut = ahead if ahead is not None else submit(self._prepare, reqs)
                    nxt = [requests[i] for i in chunks[k + 1]] if k + 1 < len(chunks) else None
                    ahead = submit(self._prepare, nxt) if prefetch and nxt and len(nxt) > 1 else None
                    try:
                        yield from zip(chunk, self._batch(reqs, fut.result()))
                        continue
                    except Exception as exc:  # noqa: BLE001 - isolate the failing sample below
                        self.notes.append(
                            f"a batch failed ({type(exc).__name__}); its samples were answered one by one"
                        )
                else:
                    ahead = None
                for i, r in zip(chunk, reqs):
                    try:
                        yield i, self._one(r)
                    except Exception as exc:  # noqa: BLE001 - one bad sample never stops the run
                        yield i, exc


def _run_now(fn, *args) -> Future:
    """``fn(*args)`` now, as a finished future (the synchronous stand-in for ``pool.submit``)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - re-raised by fut.result()
        fut.set_exception(exc)
    return fut


# --------------------------------------------------------------------------------------------
# transformers reference
# --------------------------------------------------------------------------------------------


class HFAdapter(Adapter):
    """transformers' ``InternVLForConditionalGeneration`` on a ``-hf`` checkpoint, one sample at a time.

    The model forward and the generation loop are transformers'; the prompt (chat template named in
    the checkpoint's ``config.json["interleaf"]["template"]``, default Hermes-2) and the image tiles
    are built with interleaf's processing, so only the model implementation differs from
    ``InterleafAdapter`` (the ``-hf`` directories interleaf writes carry no processor config).
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        template: str | None = None,
        dtype: Any = None,
        exclude: str | os.PathLike | None = None,
    ):
        if not Path(path).is_dir():
            raise InputError(f"{path}: not a checkpoint directory")
        self.path = path
        self.name = Path(path).resolve().name
        self.fingerprint = "hf:" + directory_fingerprint(path, exclude)
        self.device, self.dtype = device, dtype
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        extra = cfg.get("interleaf") or {}
        self.template_name = template or extra.get("template") or "Hermes-2"
        self.system_message = extra.get("system_message")
        self.use_thumbnail = extra.get("use_thumbnail", True)
        self.image_seq_length = int(cfg.get("image_seq_length", 256))
        self.image_size = int(extra.get("force_image_size") or 448)
        self._model = None
        self.notes = ["transformers InternVLForConditionalGeneration reference, one sample at a time"]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "dtype": _dtype_name(self.dtype), "device": _device_type(self.device)}

    def _load(self):
        if self._model is None:
            from transformers import AutoTokenizer, InternVLForConditionalGeneration

            dtype = "auto" if self.dtype is None else self.dtype  # "auto": the stored dtype
            model = InternVLForConditionalGeneration.from_pretrained(self.path, dtype=dtype)
            self._model = model.to(self.device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._model, self._tokenizer

    def _one(self, req: Request) -> str:
        import torch

        from interleaf.processing.image import preprocess_images
        from interleaf.processing.prompt import expand_image_placeholders
        from interleaf.processing.templates import get_template

        model, tok = self._load()
        template = get_template(self.template_name, self.system_message)
        max_num = req.max_num if req.dynamic else 1
        if req.images:
            pixels, tiles = preprocess_images(req.images, max_num=max_num, image_size=self.image_size,
                                              use_thumbnail=self.use_thumbnail)  # fmt: skip
        else:
            pixels, tiles = None, []
        text = expand_image_placeholders(template.chat_prompt(req.prompt, None), tiles, self.image_seq_length)
        enc = tok(text, return_tensors="pt")
        vocab = tok.get_vocab()
        stop = [vocab[template.stop_str]] if template.stop_str in vocab else []
        if tok.eos_token_id is not None:
            stop.append(tok.eos_token_id)
        extra = {} if pixels is None else {"pixel_values": pixels.to(self.device, model.dtype)}
        with torch.inference_mode():
            out = model.generate(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                **extra,
                max_new_tokens=req.max_new_tokens,
                do_sample=False,
                eos_token_id=stop or None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stop or [0])[0],
            )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        return tok.decode(new, skip_special_tokens=True).split(template.stop_str)[0].strip()

    def generate(
        self, requests: Sequence[Request], batch_size: int = 8
    ) -> Iterator[tuple[int, str | Exception]]:
        for i, r in enumerate(requests):
            try:
                yield i, self._one(r)
            except Exception as exc:  # noqa: BLE001 - one bad sample never stops the run
                yield i, exc


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------


def openai_messages(req: Request) -> list[dict]:
    """Interleaved user content: text pieces and image data URLs in placeholder order."""
    pieces = req.prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(req.images):
        raise InputError(f"prompt has {len(pieces) - 1} <image> placeholders but {len(req.images)} images")
    content: list[dict] = []
    for k, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if k < len(req.images):
            content.append({"type": "image_url", "image_url": {"url": image_data_url(req.images[k])}})
    return [{"role": "user", "content": content}]


class OpenAIAdapter(Adapter):
    """Concurrent requests to an OpenAI-compatible endpoint; answers yielded as they complete."""

    def __init__(
        self, spec: str, concurrency: int = 8, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5
    ):
        url, model = parse_openai_spec(spec)
        self.client = OpenAIClient(url, model, timeout=timeout, retries=retries, backoff=backoff)
        self.name = model.replace("/", "--").replace(":", "-")
        self.fingerprint = f"openai:{url}#{model}"
        self.concurrency = concurrency
        self.notes = [f"OpenAI-compatible endpoint {url}, model {model}, {concurrency} concurrent requests"]

    def settings(self) -> dict[str, Any]:
        return {"temperature": 0}

    def _one(self, req: Request) -> str:
        return self.client.complete(openai_messages(req), max_tokens=req.max_new_tokens, temperature=0)

    def generate(
        self, requests: Sequence[Request], batch_size: int = 8
    ) -> Iterator[tuple[int, str | Exception]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for fut in as_completed(futures):
                exc = fut.exception()
                yield futures[fut], (exc if exc is not None else fut.result())


def make_judge(spec: str, timeout: float = 60.0, retries: int = 3):
    """``openai:URL#MODEL`` -> a judge callable (prompt -> text) with the official max_tokens 512.

    Its ``failures`` lists why calls failed (first line of each error), in order: the scores count
    failed calls only as ``judge_error``, and the commands name the first reason.
    """
    url, model = parse_openai_spec(spec)
    client = OpenAIClient(url, model, timeout=timeout, retries=retries)
    failures: list[str] = []

    def judge(prompt: str) -> str:
        try:
            return client.complete(
                [{"role": "user", "content": [{"type": "text", "text": prompt}]}], max_tokens=512
            )
        except Exception as exc:
            failures.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise

    judge.fingerprint = f"judge:{url}#{model}"  # type: ignore[attr-defined]
    judge.failures = failures  # type: ignore[attr-defined]
    return judge


def make_adapter(
    spec: str,
    device: str = "cpu",
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
    output_dir: str | os.PathLike | None = None,
) -> Adapter:
    """``openai:URL#MODEL`` | ``hf:PATH`` | an interleaf checkpoint directory. ``output_dir`` (the
    run's) is left out of a checkpoint's fingerprint, should it lie inside the checkpoint."""
    if spec.startswith("openai:"):
        return OpenAIAdapter(spec, concurrency=concurrency, timeout=timeout, retries=retries)
    if spec.startswith("hf:"):
        return HFAdapter(spec[3:], device=device, exclude=output_dir)
    return InterleafAdapter(spec, device=device, exclude=output_dir)
