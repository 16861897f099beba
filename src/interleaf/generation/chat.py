"""``ChatModel``: images / video + a question in, the reply text out.

    chat = ChatModel.from_pretrained("ckpt_dir")              # or interleaf.load("ckpt_dir")
    chat.chat("What is in the picture?", images="cat.jpg")
    chat.chat("Describe the video.", video="clip.mp4")
    chat.batch_chat(["Q1", "Q2"], images=["a.jpg", ["b.jpg", "c.jpg"]], max_num=[6, 12])
    for piece in chat.stream_chat("Tell me more.", images="cat.jpg"):
        print(piece, end="")

The prompt follows upstream InternVL's ``chat``/``batch_chat``: the checkpoint's chat template and
system message, ``<image>`` placeholders (added in front of the question when missing), each expanded
to ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>``; the reply is decoded without special tokens,
cut at the template's end-of-turn text and stripped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral
from typing import Any

import torch
from PIL import Image

from interleaf.errors import InputError
from interleaf.generation.engine import (
    GenerationConfig,
    GenerationOutput,
    Generator,
    optimize_for_cpu,
)
from interleaf.processing.image import background_threads, preprocess_images
from interleaf.processing.prompt import add_placeholders, expand_image_placeholders
from interleaf.processing.templates import ChatTemplate, get_template
from interleaf.processing.video import frames_to_pixels, read_video_frames

DEFAULT_MAX_NEW_TOKENS = 512


def _as_list(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        return [images]
    if not isinstance(images, Iterable):
        raise InputError(
            f"images must be an image (path, bytes or PIL image) or a list of them, got {type(images).__name__}"
        )
    return list(images)


def _check_inputs(
    history: Any, video: Any, num_segments: Any, pixel_values: Any, num_tiles: Any, image_size: int
) -> None:
    """Refuse wrongly typed API arguments with one line naming the argument (they would otherwise fail
    deep inside the template, the video reader or the vision encoder with a bare TypeError/ValueError)."""

    def pos_int(n: Any) -> bool:
        return isinstance(n, Integral) and not isinstance(n, bool) and n >= 1

    if history is not None:
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise InputError(
                f"history must be a list of (question, answer) pairs, got {type(history).__name__}"
            )
        for i, turn in enumerate(history):
            pair = isinstance(turn, Sequence) and not isinstance(turn, (str, bytes)) and len(turn) == 2
            if not (pair and all(isinstance(t, str) for t in turn)):
                raise InputError(
                    f"history[{i}] must be a (question, answer) pair of strings, got {turn!r:.80}"
                )
    if video is not None and not isinstance(video, (str, os.PathLike)):
        raise InputError(f"video must be a file path, got {type(video).__name__}")
    if not pos_int(num_segments):
        raise InputError(f"num_segments must be a positive int (video frames), got {num_segments!r:.40}")
    if pixel_values is not None:
        shape = list(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else None
        if shape is None or shape[1:] != [3, image_size, image_size] or shape[0] < 1:
            got = shape if shape is not None else type(pixel_values).__name__
            raise InputError(
                f"pixel_values must be a tensor [tiles, 3, {image_size}, {image_size}], got {got}"
            )
    if num_tiles is not None and (
        isinstance(num_tiles, (str, bytes))
        or not isinstance(num_tiles, Sequence)  # not an iterator: it would be used up here
        or not all(map(pos_int, num_tiles))
    ):
        raise InputError(
            f"num_tiles must be a list of positive ints (tiles per image), got {num_tiles!r:.60}"
        )


class ChatModel:
    """A loaded model + tokenizer + chat template, ready to answer.

    Attributes:
        model: the ``InternVLChatModel`` (eval mode).
        tokenizer: its tokenizer (``transformers.PreTrainedTokenizerFast``).
        config: the ``InternVLConfig``.
        template: the :class:`~interleaf.processing.templates.ChatTemplate` (system message included).
        generator: the :class:`~interleaf.generation.engine.Generator`.
    """

    def __init__(self, model, tokenizer, cpu_optimize: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.template: ChatTemplate = get_template(self.config.template, self.config.system_message)
        self.device = model.device
        if not isinstance(model, torch.nn.Module):  # an ONNX export (OnnxModel) brings its own generator
            self.generator = model.generator
        else:
            if cpu_optimize and self.device.type == "cpu":
                optimize_for_cpu(model)
            self.generator = Generator(model)
        # a fast tokenizer called from two threads at once can fail with "Already borrowed"
        # (transformers resets its truncation/padding state on every call); prepare_batch may run
        # in a worker thread while replies are decoded
        self._tokenizer_lock = threading.Lock()
        # prepare_batch tiles a batch's images in parallel threads (PIL and numpy release the GIL)
        self.prep_workers = background_threads()
        self._prep_pool: ThreadPoolExecutor | None = None
        self.stop_token_ids = self._stop_ids()
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", dtype: Any = None) -> ChatModel:
        """Load a checkpoint directory (InternVL-Chat or ``-hf`` layout), or an ONNX export of one
        (``interleaf export-onnx``; run by ONNX Runtime on the CPU, in its fp32).

        ``dtype``: None keeps the stored dtype; ``"bfloat16"`` on CPU uses oneDNN bf16 kernels.
        """
        from interleaf.generation.onnx import OnnxModel, is_onnx_export
        from interleaf.model import load_checkpoint

        if is_onnx_export(path):
            if str(device) != "cpu" or dtype not in (None, "float32", torch.float32):
                raise InputError(f"{path}: an ONNX export runs on the CPU in float32 (no device or dtype)")
            onnx_model = OnnxModel(path)
            return cls(onnx_model, onnx_model.tokenizer)
        model, tokenizer = load_checkpoint(path, device=device, dtype=dtype)
        return cls(model, tokenizer)

    def _stop_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        vocab = self.tokenizer.get_vocab()
        if self.template.stop_str in vocab:
            ids.append(vocab[self.template.stop_str])
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        eos = self.config.llm.eos_token_id
        ids += [eos] if isinstance(eos, int) else list(eos or [])
        return tuple(dict.fromkeys(int(i) for i in ids))

    # ------------------------------------------------------------------ inputs
    def _image_settings(self, max_num: int | None) -> dict:
        cfg = self.config
        if max_num is None:
            max_num = cfg.max_dynamic_patch if cfg.dynamic_image_size else 1
        elif isinstance(max_num, bool) or not isinstance(max_num, int) or max_num < 1:
            raise InputError(f"max_num must be a positive int (tiles per prompt), got {max_num!r}")
        return dict(
            max_num=max_num,
            min_num=min(cfg.min_dynamic_patch, max_num),  # an explicit smaller budget wins
            image_size=cfg.image_size,
            use_thumbnail=cfg.use_thumbnail,
            dynamic=cfg.dynamic_image_size,
        )

    def prepare(
        self,
        question: str,
        images: Any = None,
        history: Sequence[tuple[str, str]] | None = None,
        video: str | os.PathLike | None = None,
        max_num: int | None = None,
        num_segments: int = 8,
        pixel_values: torch.Tensor | None = None,
        num_tiles: Sequence[int] | None = None,
        system_message: str | None = None,
    ) -> tuple[str, list[int], torch.Tensor | None, str]:
        """Build one prompt: ``(question with placeholders, input ids, pixel_values, prompt text)``.

        ``pixel_values`` [N, 3, H, W] + ``num_tiles`` may be given instead of ``images`` (already
        preprocessed tiles, e.g. by an evaluation pipeline). ``system_message`` replaces the
        checkpoint's for this prompt.
        """
        if not isinstance(question, str):
            raise InputError(f"question must be a string, got {type(question).__name__}")
        if hasattr(num_tiles, "__array__"):  # tile counts as a tensor or numpy array (not a Sequence)
            num_tiles = num_tiles.tolist()
        _check_inputs(history, video, num_segments, pixel_values, num_tiles, self.config.image_size)
        image_list = _as_list(images)
        if video is not None and (image_list or pixel_values is not None):
            raise InputError("give either images or a video, not both")
        is_video = video is not None
        if is_video:
            frames = read_video_frames(video, num_segments=num_segments)
            pixel_values = frames_to_pixels(frames, self.config.image_size)
            tiles = [1] * len(frames)
        elif pixel_values is not None:
            tiles = list(num_tiles) if num_tiles is not None else [pixel_values.shape[0]]
            if sum(tiles) != pixel_values.shape[0]:
                raise InputError(
                    f"num_tiles sums to {sum(tiles)} but pixel_values has {pixel_values.shape[0]} tiles"
                )
        elif image_list:
            pixel_values, tiles = preprocess_images(image_list, **self._image_settings(max_num))
        else:
            pixel_values, tiles = None, []
        question = add_placeholders(question, len(tiles), history, video=is_video)
        text = self.template.chat_prompt(question, history, system_message)
        text = expand_image_placeholders(text, tiles, self.config.num_image_token)
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        vocab = self.config.llm.vocab_size
        if max(ids, default=0) >= vocab:  # the embedding lookup would fail with a bare IndexError
            bad = next(i for i in ids if i >= vocab)
            raise InputError(
                f"token {self.tokenizer.convert_ids_to_tokens(bad)!r} has id {bad}, past the model's "
                f"vocab_size {vocab}: the tokenizer does not belong to this model"
            )
        return question, ids, pixel_values, text

    def _config(self, generation: dict) -> GenerationConfig:
        generation = dict(generation)
        generation.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        generation.setdefault("stop_token_ids", self.stop_token_ids)
        generation.setdefault("pad_token_id", self.pad_token_id)
        try:
            return GenerationConfig(**generation)
        except TypeError as exc:
            raise InputError(f"bad generation option: {exc}") from None

    def decode_reply(self, tokens: Sequence[int]) -> str:
        """Reply text of generated tokens: special tokens dropped, cut at the end-of-turn text, stripped."""
        return self.reply_with_stop(tokens)[0]

    def reply_with_stop(self, tokens: Sequence[int], stop: Sequence[str] = ()) -> tuple[str, bool]:
        """:meth:`decode_reply`, also cut where one of the ``stop`` strings first appears; and whether
        one did (what :class:`TextStreamer` with the same ``stop`` yields in all)."""
        with self._tokenizer_lock:
            text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        text, hit = cut_at_stop(text, (self.template.stop_str, *stop))
        return text.strip(), hit

    # ------------------------------------------------------------------ chat
    def chat(
        self,
        question: str,
        images: Any = None,
        history: Sequence[tuple[str, str]] | None = None,
        video: str | os.PathLike | None = None,
        max_num: int | None = None,
        num_segments: int = 8,
        return_history: bool = False,
        pixel_values: torch.Tensor | None = None,
        num_tiles: Sequence[int] | None = None,
        system_message: str | None = None,
        **generation,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """Answer one question.

        Args:
            question: the user message; ``<image>`` placeholders are optional (added when missing).
            images: an image (path, bytes, PIL) or a list of them.
            history: earlier ``(question, answer)`` turns (their ``<image>`` placeholders count).
            video: a video file; ``num_segments`` frames, one tile each.
            max_num: tile budget (default: the checkpoint's ``max_dynamic_patch``), shared by images.
            return_history: also return the history with this turn appended.
            system_message: replaces the checkpoint's system message for this turn (e.g. a
                reasoning prompt for InternVL3.5's thinking mode).
            **generation: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
                ``seed``, ... (see :class:`GenerationConfig`).
        """
        question, ids, px, _ = self.prepare(
            question, images, history, video, max_num, num_segments, pixel_values, num_tiles, system_message
        )
        out = self.generator.generate(torch.tensor([ids]), pixel_values=px, config=self._config(generation))
        reply = self.decode_reply(out.tokens[0])
        if return_history:
            return reply, [*(history or []), (question, reply)]
        return reply

    def stream_chat(
        self,
        question: str,
        images: Any = None,
        history: Sequence[tuple[str, str]] | None = None,
        video: str | os.PathLike | None = None,
        max_num: int | None = None,
        num_segments: int = 8,
        system_message: str | None = None,
        **generation,
    ) -> Iterator[str]:
        """Like :meth:`chat`, but yield the reply in pieces as it is generated.

        The pieces concatenate to exactly what :meth:`chat` returns.
        """
        _, ids, px, _ = self.prepare(
            question, images, history, video, max_num, num_segments, system_message=system_message
        )
        streamer = TextStreamer(self)
        for step in self.generator.stream(
            torch.tensor([ids]), pixel_values=px, config=self._config(generation)
        ):
            piece = streamer.push(int(step[0]))
            if piece:
                yield piece
            if streamer.stopped:
                break
        piece = streamer.finish()
        if piece:
            yield piece

    def prepare_batch(
        self,
        questions: Sequence[str],
        images: Sequence[Any] | None = None,
        max_num: int | Sequence[int | None] | None = None,
    ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Inputs of :meth:`generate_batch`: ``(input ids, pixel_values or None)`` per question.

        ``images[i]`` is None, one image, or a list of images for ``questions[i]``; ``max_num`` is
        one tile budget for all questions or one per question. Thread-safe (image loading and tiling
        release the GIL), so an evaluation loop can prepare the next batch while one generates.
        """
        if isinstance(questions, str):  # list("ab") would be two questions, "a" and "b"
            raise InputError("batch_chat: questions must be a list of strings; for one question use chat")
        questions = list(questions)
        per_q = [None] * len(questions) if images is None else list(images)
        if len(per_q) != len(questions):
            raise InputError(f"batch_chat: {len(questions)} questions but {len(per_q)} image entries")
        budgets = [max_num] * len(questions) if max_num is None or isinstance(max_num, int) else list(max_num)
        if len(budgets) != len(questions):
            raise InputError(f"batch_chat: {len(questions)} questions but {len(budgets)} max_num entries")

        def one(job: tuple) -> tuple[list[int], torch.Tensor | None]:
            q, im, budget = job
            _, ids, px, _ = self.prepare(q, im, max_num=budget)
            return ids, px

        jobs = list(zip(questions, per_q, budgets))
        if len(jobs) < 2 or self.prep_workers < 2:
            return [one(job) for job in jobs]
        if self._prep_pool is None:
            self._prep_pool = ThreadPoolExecutor(self.prep_workers, thread_name_prefix="interleaf-tiles")
        return list(self._prep_pool.map(one, jobs))  # in order; the first failure is raised

    def generate_batch(
        self,
        prepared: Sequence[tuple[list[int], torch.Tensor | None]],
        prefill: str = "auto",
        **generation,
    ) -> list[str]:
        """Replies to the output of :meth:`prepare_batch`, generated as one batch.

        ``prefill``: ``"rows"`` prefills each prompt alone into its row of a shared cache (one vision
        pass for the batch, no padding; :meth:`Generator.generate_rows`), ``"padded"`` runs one
        left-padded prefill (masked attention), ``"auto"`` picks rows on CPU, padded elsewhere.
        """
        if not prepared:
            return []
        out = GenerationOutput(tokens=[[] for _ in prepared], finish_reasons=[])
        for _ in self.stream_batch(prepared, prefill, _timing=out, **generation):
            pass
        return [self.decode_reply(t) for t in out.tokens]

    def stream_batch(
        self,
        prepared: Sequence[tuple[list[int], torch.Tensor | None]],
        prefill: str = "auto",
        _timing: GenerationOutput | None = None,
        **generation,
    ) -> Iterator[torch.Tensor]:
        """Generate for the output of :meth:`prepare_batch` as one batch, yielding each step's tokens
        (CPU LongTensor [B], in ``prepared`` order; finished rows yield the pad id, and a row's stop
        token is yielded once). ``prefill`` as in :meth:`generate_batch`."""
        if prefill == "auto":
            prefill = "rows" if self.device.type == "cpu" else "padded"
        if prefill not in ("rows", "padded"):
            raise InputError(f"prefill must be 'auto', 'rows' or 'padded', got {prefill!r}")
        config = self._config(generation)
        stream = self.generator.stream_rows if prefill == "rows" else self.generator.stream_padded
        return stream([ids for ids, _ in prepared], [px for _, px in prepared], config, _timing=_timing)

    def batch_chat(
        self,
        questions: Sequence[str],
        images: Sequence[Any] | None = None,
        max_num: int | Sequence[int | None] | None = None,
        prefill: str = "auto",
        **generation,
    ) -> list[str]:
        """Answer several independent questions in one batch (no history).

        ``images[i]`` is None, one image, or a list of images for ``questions[i]``; ``max_num``: one
        tile budget for the batch or one per question. ``prefill``: see :meth:`generate_batch`.
        """
        return self.generate_batch(self.prepare_batch(questions, images, max_num), prefill, **generation)


class TextStreamer:
    """Turns generated tokens into text pieces whose concatenation equals ``ChatModel.decode_reply``.

    Leading whitespace is dropped, trailing whitespace is held back until more text follows, a piece
    is never cut inside a multi-byte character, and text from the end-of-turn string on is dropped.
    ``stop``: more strings that end the reply where they first appear (excluded, as the OpenAI API
    does); text that could be the start of one is held back until it is known not to be.
    """

    def __init__(self, chat: ChatModel, stop: Sequence[str] = ()) -> None:
        self.tokenizer = chat.tokenizer
        self.lock = chat._tokenizer_lock
        self.stop_str = chat.template.stop_str
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _visible(self) -> str:
        with self.lock:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text, hit = cut_at_stop(text, (self.stop_str, *self.stop))
        self.stopped |= hit
        return text.lstrip()

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self._visible()
        if text.endswith("\ufffd") and not self.stopped:
            return ""  # an incomplete multi-byte character: wait for the next token
        if not self.stopped:
            text = text[: len(text) - _stop_prefix_len(text, self.stop)]
        text = text.rstrip()
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def finish(self) -> str:
        text = self._visible().strip()
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            piece, self.emitted = text[len(self.emitted) :], text
            return piece
        return ""


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest of ``stops`` (empty ones ignored), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins one of ``stops`` (to hold back while streaming)."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )
