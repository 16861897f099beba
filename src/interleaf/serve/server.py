"""An OpenAI-compatible chat server for interleaf checkpoints (either layout, Mono-InternVL too).

    interleaf serve ckpt/tiny --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text). Standard-library HTTP, one
thread per connection: handler threads check the request, decode and tile its images and tokenise
the prompt; one worker thread owns the model and generates for every request queued at that moment
as one batch (:meth:`ChatModel.stream_batch`). Requests join a batch when their sampling settings
agree (all greedy requests do); a request with a ``seed`` runs alone, so its sample does not depend
on other traffic. While other requests are still being prepared the worker waits for them (at most
``batch_wait`` seconds), so a burst of requests becomes one batch and a lone request waits for nothing.

Messages become InternVL prompts with the checkpoint's chat template:

- a leading ``system`` (or ``developer``) message replaces the template's system message;
- ``user`` and ``assistant`` messages must alternate and the last must be ``user``; earlier turns are
  the history;
- a user message is a string or a list of ``text`` and ``image_url`` parts. Its images are placed as
  ``ChatModel.chat`` places them: where the text already has ``<image>`` placeholders, there; when every
  image comes before the text, in front of it (``<image>\\n``, or ``Image-k: <image>\\n`` lines for
  several, as upstream InternVL's ``chat``); otherwise each image part stands where it is in the
  message (so interleaved content keeps its order);
- an image URL is a ``data:`` URL, an ``http(s)`` URL (fetched with a timeout and a size limit), or a
  local path / ``file://`` URL under ``--allowed-local-media-path`` (refused otherwise). The images of
  a request share its tile budget (``--max-num``, default the checkpoint's ``max_dynamic_patch``; a
  request may set ``mm_processor_kwargs: {"max_dynamic_patch": N}`` as vLLM takes it). More images,
  or a larger ``max_dynamic_patch``, than the context has room for (a tile each at least) are refused
  before any image is decoded, and so is text longer than the context can take, before tokenising.

Sampling follows the OpenAI API: ``temperature`` (default 1; 0 is greedy), ``top_p``, ``top_k`` (as
vLLM; -1 or 0 is off), ``seed``, ``max_completion_tokens``/``max_tokens`` (default ``--max-tokens``,
and never past the model's context), ``stop`` strings (cut, not included). ``n`` > 1, log-probs, tools,
penalties and JSON response formats are refused with a 400 naming the field; unknown fields are
ignored. The reply is what ``ChatModel.chat`` returns (special tokens dropped, stripped), so a greedy
request answers exactly as ``interleaf chat`` does.

Errors are JSON as the OpenAI API sends them (405 for other methods). A client silent for
``read_timeout`` seconds is dropped; on shutdown, requests still waiting are answered 503.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from interleaf.errors import InputError, is_number
from interleaf.generation.chat import ChatModel, TextStreamer
from interleaf.processing.image import load_image
from interleaf.processing.prompt import IMAGE_PLACEHOLDER, image_prefix

MAX_BODY_BYTES = 64 << 20  # a request with several base64 images fits easily
MAX_IMAGE_BYTES = 32 << 20
FETCH_TIMEOUT = 10.0
SHUTDOWN_GRACE = 2.0  # seconds the handlers get to send their last answers when the server stops
SYSTEM_ROLES = ("system", "developer")
UNSUPPORTED = {  # field -> the value that means "not asked for"
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


class APIError(Exception):
    """An error answered as the OpenAI API does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# ----------------------------------------------------------------------------------------------------
# requests


@dataclass
class ServerOptions:
    """What ``interleaf serve`` is started with (see the module docstring)."""

    model_name: str
    max_tokens: int = 512
    max_num: int | None = None
    max_batch_size: int = 8
    batch_wait: float = 0.05
    allowed_local_media_path: str | None = None
    api_key: str | None = None
    fetch_timeout: float = FETCH_TIMEOUT  # for a whole image download (a server may trickle it)
    read_timeout: float = 60.0  # a client silent this long is dropped (an idle keep-alive, a short body)


@dataclass
class ChatRequest:
    """A checked ``/v1/chat/completions`` body."""

    question: str
    history: list[tuple[str, str]]
    images: list  # PIL images, in placeholder order over the whole conversation
    system_message: str | None
    sampling: dict  # GenerationConfig fields other than max_new_tokens
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    max_num: int | None


def _check_number(
    body: dict, key: str, lo: float, hi: float, integer: bool = False, name: str | None = None
) -> Any:
    """``body[key]`` checked to lie in [lo, hi] (None when absent); errors name ``name`` (default ``key``)."""
    value = body.get(key)
    if value is None:
        return None
    if not is_number(value) or (integer and value != int(value)) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        name = name or key
        raise APIError(400, f"{name} must be {kind} in [{lo:g}, {hi:g}], got {value!r:.40}", name)
    return int(value) if integer else float(value)


def _check_unicode(text: str, where: str) -> str:
    """``text`` if it is valid Unicode: JSON's "\\ud800" escapes decode to lone surrogates, which the
    tokenizer and the file system cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        raise APIError(
            400, f"{where} holds a lone surrogate \\u{bad:04x} (not valid Unicode)", where
        ) from None
    return text


def load_media(url: Any, where: str, local_root: str | None, timeout: float = FETCH_TIMEOUT) -> Any:
    """The image at ``url`` (data URL, http(s) URL or allowed local path), decoded; errors name ``where``."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: the image URL must be a non-empty string", where)
    _check_unicode(url, where)
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    source: bytes | str
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise APIError(400, f"{where}: a data URL needs a ',' before its payload", where)
        try:
            if header.endswith(";base64"):
                source = base64.b64decode(payload, validate=True)
            else:
                source = urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise APIError(400, f"{where}: bad base64 in the data URL ({exc})", where) from None
    elif scheme in ("http", "https"):
        source = _fetch(url, where, timeout)
    elif scheme in ("file", "") or len(scheme) == 1:  # a path (one letter: a Windows drive)
        if local_root is None:
            raise APIError(
                400,
                f"{where}: local image paths are refused (start the server with --allowed-local-media-path)",
                where,
            )
        path = Path(urllib.parse.unquote(parsed.path) if scheme == "file" else url).resolve()
        if not path.is_relative_to(Path(local_root).resolve()):
            raise APIError(400, f"{where}: {path} is outside --allowed-local-media-path {local_root}", where)
        source = str(path)
    else:
        raise APIError(
            400, f"{where}: unsupported image URL scheme {scheme!r} (data, http, https, file)", where
        )
    try:
        return load_image(source)
    except InputError as exc:
        raise APIError(400, f"{where}: {exc}", where) from None


def _fetch(url: str, where: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "interleaf-serve"})
    deadline = time.monotonic() + timeout  # for the whole download: a server may trickle it
    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            while size <= MAX_IMAGE_BYTES and (chunk := resp.read1(1 << 16)):
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not done after {timeout:g} s")
    except urllib.error.HTTPError as exc:
        raise APIError(400, f"{where}: fetching the image got HTTP {exc.code}", where) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise APIError(400, f"{where}: cannot fetch the image ({reason})", where) from None
    if size > MAX_IMAGE_BYTES:
        raise APIError(400, f"{where}: the image is over {MAX_IMAGE_BYTES >> 20} MiB", where)
    return b"".join(chunks)


def place_images(parts: list[str | None]) -> str:
    """A user message's text from its parts in order (``None`` = an image), placeholders placed as
    the module docstring says."""
    n = sum(p is None for p in parts)
    text = "".join(p for p in parts if p is not None)
    if n == 0 or IMAGE_PLACEHOLDER in text:
        return text
    first_text = next((i for i, p in enumerate(parts) if p), len(parts))
    if all(p is None for p in parts[:first_text]) and all(p is not None for p in parts[first_text:]):
        return image_prefix(n) + text
    return "".join(IMAGE_PLACEHOLDER if p is None else p for p in parts)


def _message_text(msg: dict, i: int, images: list | None) -> str:
    """The text of ``messages[i]``; its image URLs are appended to ``images`` as ``(url, where)``
    (None: images refused), to be loaded once the whole request is checked."""
    content = msg.get("content")
    if isinstance(content, str):
        return _check_unicode(content, f"messages[{i}].content")
    if not isinstance(content, list):
        raise APIError(
            400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content"
        )
    parts: list[str | None] = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.text must be a string", f"{where}.text")
            parts.append(_check_unicode(part["text"], f"{where}.text"))
        elif kind == "image_url":
            if images is None:
                raise APIError(400, f"{where}: only user messages may hold images", where)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            images.append((url, f"{where}.image_url.url"))
            parts.append(None)
        else:
            raise APIError(
                400, f"{where}.type must be 'text' or 'image_url', got {kind!r:.40}", f"{where}.type"
            )
    return place_images(parts)


def parse_request(body: Any, options: ServerOptions, max_tiles: int | None = None) -> ChatRequest:
    """Check a chat-completions body and turn it into a :class:`ChatRequest` (raises :class:`APIError`).

    ``max_tiles``: the most image tiles the model's context holds; more images than that, or a larger
    ``max_dynamic_patch``, are refused before any image is decoded (each image takes a tile at least).
    """
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model", options.model_name)
    if model != options.model_name:
        raise APIError(404, f"the model {model!r:.80} does not exist (this server has {options.model_name!r})",
                       "model", "NotFoundError")  # fmt: skip
    for key, off in UNSUPPORTED.items():
        if body.get(key) not in off:
            raise APIError(400, f"{key} is not supported by this server", key)
    if body.get("n") not in (None, 1):
        raise APIError(400, "n must be 1 (one choice per request)", "n")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "response_format: only {'type': 'text'} is supported", "response_format")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    system, turns, sources = None, [], []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in SYSTEM_ROLES:
            if i:
                raise APIError(
                    400, f"messages[{i}]: a system message may only come first", f"messages[{i}].role"
                )
            system = _message_text(msg, i, None)
        elif role in ("user", "assistant"):
            if role == (turns[-1][0] if turns else "assistant"):
                raise APIError(400, f"messages[{i}]: user and assistant messages must alternate, starting with "
                               "user", f"messages[{i}].role")  # fmt: skip
            media = sources if role == "user" else None
            turns.append((role, _message_text(msg, i, media)))
        else:
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role!r:.40}",
                           f"messages[{i}].role")  # fmt: skip
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must be a user message", "messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

    temperature = _check_number(body, "temperature", 0, 2)
    temperature = 1.0 if temperature is None else temperature
    top_p = _check_number(body, "top_p", 0, 1)
    if top_p == 0:
        raise APIError(400, "top_p must be in (0, 1], got 0", "top_p")
    top_k = _check_number(body, "top_k", -1, 1 << 31, integer=True)
    seed = _check_number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p or 1.0, top_k=max(top_k or 0, 0), seed=seed)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _check_number(body, key, 1, 1 << 31, integer=True)

    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    stream_options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    mm = {} if body.get("mm_processor_kwargs") is None else body["mm_processor_kwargs"]
    if not isinstance(mm, dict) or set(mm) - {"max_dynamic_patch"}:
        raise APIError(400, "mm_processor_kwargs: only max_dynamic_patch is supported", "mm_processor_kwargs")
    max_num = _check_number(mm, "max_dynamic_patch", 1, max_tiles or 1 << 16, True,
                            "mm_processor_kwargs.max_dynamic_patch")  # fmt: skip
    if max_tiles is not None and len(sources) > max_tiles:
        raise APIError(400, f"messages hold {len(sources)} images, more than the {max_tiles} image tiles the "
                       "model's context holds", "messages")  # fmt: skip
    root, timeout = options.allowed_local_media_path, options.fetch_timeout
    images = [load_media(url, where, root, timeout) for url, where in sources]
    return ChatRequest(
        question=turns[-1][1],
        history=history,
        images=images,
        system_message=system,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=tuple(s for s in stop or () if s),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        max_num=max_num if max_num is not None else options.max_num,
    )


# ----------------------------------------------------------------------------------------------------
# the batching worker


@dataclass
class Job:
    """One request on its way through the worker; the worker reports on ``events``:
    ``("text", piece)`` (streaming only), then ``("done", text, finish_reason, completion_tokens)``
    or ``("error", exception)``."""

    prepared: tuple[list[int], torch.Tensor | None]
    sampling: dict
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (a seeded job shares with none)."""
        if self.sampling.get("seed") is not None:
            return ("alone", id(self))
        return tuple(sorted(self.sampling.items()))


class Scheduler:
    """Owns the model; generates for the queued jobs in batches, one batch at a time."""

    def __init__(self, chat: ChatModel, max_batch_size: int = 8, batch_wait: float = 0.05) -> None:
        self.chat, self.max_batch_size, self.batch_wait = chat, max_batch_size, batch_wait
        self._jobs: list[Job] = []
        self._current: list[Job] = []  # the batch being generated
        self._preparing = 0
        self._cv = threading.Condition()
        self._closed = False
        self.metrics = dict.fromkeys(
            ("requests", "batches", "batch_rows", "prompt_tokens", "generation_tokens", "errors"), 0
        )
        self._thread = threading.Thread(target=self._run, name="interleaf-serve-worker", daemon=True)
        self._thread.start()

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Mark a request being prepared in a handler thread, so the worker waits for it to batch."""
        with self._cv:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cv:
                self._preparing -= 1
                self._cv.notify_all()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down", kind="server_error")
            self._jobs.append(job)
            self.metrics["requests"] += 1
            self.metrics["prompt_tokens"] += len(job.prepared[0])
            self._cv.notify_all()

    def close(self) -> None:
        """Stop: the batch being generated ends at its next step and, like every queued request,
        is answered 503."""
        with self._cv:
            self._closed = True
            for job in self._current:
                job.cancelled.set()
            self._cv.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[Job]:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            deadline = time.monotonic() + self.batch_wait
            while not self._closed:
                key = self._jobs[0].key
                batch = [j for j in self._jobs if j.key == key][: self.max_batch_size]
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or self._preparing == 0 or left <= 0:
                    break
                self._cv.wait(left)  # more requests are being prepared: let them join
            if self._closed:  # also when closed while waiting for a batch to fill: none is generated
                for job in self._jobs:
                    job.events.put(
                        ("error", APIError(503, "the server is shutting down", kind="server_error"))
                    )
                return []
            for job in batch:
                self._jobs.remove(job)
            self._current = batch
            return batch

    def _run(self) -> None:
        while batch := self._next_batch():
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - reported to the batch's requests, the server goes on
                self.metrics["errors"] += len(batch)
                for job in batch:
                    job.events.put(("error", exc))

    def _generate(self, batch: list[Job]) -> None:
        chat = self.chat
        self.metrics["batches"] += 1
        self.metrics["batch_rows"] += len(batch)
        stops = set(chat.stop_token_ids)
        # a streamer per row where text is needed as it comes (streaming, or stop strings to watch)
        streamers = [TextStreamer(chat, j.stop) if j.stream or j.stop else None for j in batch]
        tokens: list[list[int]] = [[] for _ in batch]  # the reply's tokens (a stop token is not part of it)
        done = [False] * len(batch)

        def finish(r: int, reason: str, stop_token: bool = False) -> None:
            job, streamer = batch[r], streamers[r]
            done[r] = True
            if streamer is not None:
                piece = streamer.finish()
                if piece and job.stream:
                    job.events.put(("text", piece))
                text = streamer.emitted
            else:
                text, hit = chat.reply_with_stop(tokens[r], job.stop)
                reason = "stop" if hit else reason
            n = len(tokens[r]) + stop_token  # the stop token was generated too
            self.metrics["generation_tokens"] += n
            job.events.put(("done", text, reason, n))

        limit = max(j.max_tokens for j in batch)
        steps = chat.stream_batch([j.prepared for j in batch], max_new_tokens=limit, **batch[0].sampling)
        try:
            for step in steps:
                for r, tok in enumerate(step.tolist()):
                    if done[r]:
                        continue
                    if tok in stops:
                        finish(r, "stop", stop_token=True)
                        continue
                    tokens[r].append(tok)
                    streamer = streamers[r]
                    if streamer is not None:
                        piece = streamer.push(tok)
                        if piece and batch[r].stream:
                            batch[r].events.put(("text", piece))
                        if streamer.stopped:
                            finish(r, "stop")
                            continue
                    if len(tokens[r]) >= batch[r].max_tokens:
                        finish(r, "length")
                if all(d or j.cancelled.is_set() for d, j in zip(done, batch)):
                    break  # nobody is waiting for more: stop generating
        finally:
            steps.close()
        for r in range(len(batch)):
            if done[r]:
                continue
            if self._closed:
                batch[r].events.put(
                    ("error", APIError(503, "the server is shutting down", kind="server_error"))
                )
            else:
                finish(r, "length")


# ----------------------------------------------------------------------------------------------------
# HTTP


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; ``scheduler`` owns the model.

    ``server_close`` stops the worker, closes open connections and waits for every thread it
    started: a thread still letting go of the model while the interpreter exits aborts the process
    (torch frees tensors under a GIL it can no longer take: "terminate called without an active
    exception").
    """

    daemon_threads = False
    block_on_close = True
    # socketserver's default backlog of 5 drops connection attempts when a burst of clients (or a
    # finished batch's streaming clients, reconnecting together) arrives faster than accept() runs
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], chat: ChatModel, options: ServerOptions) -> None:
        self.chat, self.options = chat, options
        self.scheduler = Scheduler(chat, options.max_batch_size, options.batch_wait)
        self.created = int(time.time())
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._max_prompt_chars: int | None = None
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self.scheduler.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away is no error of ours
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        self.scheduler.close()  # every request waiting for the worker now has its answer (a 503)
        # Stop reading first, so that idle keep-alive connections (their threads wait on a read) end
        # while the handlers with an answer still write it; then cut whatever is left after a grace
        # period (a client that does not read its reply).
        self._shutdown_connections(socket.SHUT_RD)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while self._connections and time.monotonic() < deadline:
            time.sleep(0.01)
        self._shutdown_connections(socket.SHUT_RDWR)
        super().server_close()  # joins the handler threads

    def _shutdown_connections(self, how: int) -> None:
        with self._connections_lock:
            open_now = list(self._connections)
        for conn in open_now:
            try:
                conn.shutdown(how)
            except OSError:
                pass

    def start(self) -> ChatServer:
        """Serve from a background thread (for tests, notebooks and programs that embed the server);
        :meth:`stop` ends it. Also a context manager: ``with make_server(...).start() as server:``."""
        self._serving = threading.Thread(target=self.serve_forever, name="interleaf-serve", daemon=True)
        self._serving.start()
        return self

    def stop(self) -> None:
        """Stop serving and wait for the serving thread: a thread still letting go of the model while
        the interpreter exits aborts the process (torch frees tensors under the GIL it can no longer take)."""
        self.shutdown()
        self.server_close()
        self._serving.join()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def context_length(self) -> int:
        return int(self.chat.config.llm.max_position_embeddings)

    def max_tiles(self) -> int:
        """The most image tiles whose tokens fit the model's context."""
        return max(1, self.context_length() // self.chat.config.num_image_token)

    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context (a token spells at most ``longest``
        characters of the vocabulary, twice that for normalisation); longer prompts are refused
        before tokenising, which holds the tokenizer lock the worker decodes under."""
        if self._max_prompt_chars is None:
            longest = max(map(len, self.chat.tokenizer.get_vocab()), default=1)
            self._max_prompt_chars = 2 * longest * self.context_length()
        return self._max_prompt_chars

    def make_job(self, req: ChatRequest) -> Job:
        """Tile, tokenise and check one request (in its handler thread)."""
        chars = len(req.question) + len(req.system_message or "") + sum(len(q + a) for q, a in req.history)
        if chars > self.max_prompt_chars():
            raise APIError(400, f"the messages hold {chars} characters, more than the model's context of "
                           f"{self.context_length()} tokens can take", "messages")  # fmt: skip
        try:
            _, ids, pixel_values, _ = self.chat.prepare(
                req.question, req.images or None, req.history, max_num=req.max_num,
                system_message=req.system_message,
            )  # fmt: skip
        except InputError as exc:
            raise APIError(400, str(exc), "messages") from None
        cfg = self.chat.config
        if (
            pixel_values is not None
            and ids.count(cfg.image_token_id) != len(pixel_values) * cfg.num_image_token
        ):
            # the model refuses such a prompt at prefill, which would fail every request batched with it
            token = self.chat.tokenizer.convert_ids_to_tokens(cfg.image_token_id)
            raise APIError(
                400, f"the messages' text holds {token}, a token for image features only", "messages"
            )
        room = self.context_length() - len(ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(
                400,
                f"this model's maximum context length is {self.context_length()} tokens; the messages take "
                f"{len(ids)} and {req.max_tokens} more were asked for",
                "max_tokens",
            )
        if room < 1:
            raise APIError(400, f"the messages take {len(ids)} tokens, past the model's context of "
                           f"{self.context_length()}", "messages")  # fmt: skip
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.options.max_tokens, room)
        return Job((ids, pixel_values), req.sampling, max_tokens, req.stop, req.stream)


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections

    def setup(self) -> None:
        self.timeout = self.server.options.read_timeout  # a silent client is let go, freeing its thread
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # no access log: one line per request would drown the server's own messages

    # ------------------------------------------------------------------ plumbing
    def _send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:  # tell the client, so that it does not send its next request here
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), headers=headers)

    def _error(self, err: APIError, headers: dict | None = None) -> None:
        self._json(err.status, err.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (a bad request line, headers too long, ...) as JSON, not HTML."""
        self.close_connection = True  # the request was not understood: where it ends is unknown
        self._error(APIError(code, message or self.responses.get(code, ("error",))[0]))

    def _not_allowed(self) -> None:
        self.close_connection = True  # a body it may have sent is not read
        path = urllib.parse.urlsplit(self.path).path
        self._error(APIError(405, f"method {self.command} is not allowed (GET or POST) for {path!r:.80}"),
                    {"Allow": "GET, POST"})  # fmt: skip

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed  # noqa: N815 - the base class's names

    def _authorised(self) -> bool:
        key = self.server.options.api_key
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(
            APIError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", kind="authentication_error"
            )
        )
        return False

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path == "/health":
            self._send(200, b"", "text/plain")
        elif not self._authorised():
            return
        elif path == "/v1/models":
            model = {"id": self.server.options.model_name, "object": "model", "created": self.server.created,
                     "owned_by": "interleaf", "max_model_len": self.server.context_length()}  # fmt: skip
            self._json(200, {"object": "list", "data": [model]})
        elif path == "/metrics":
            lines = [f"interleaf_{k}_total {v}" for k, v in self.server.scheduler.metrics.items()]
            self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")
        else:
            self._error(APIError(404, f"no route GET {path}", kind="NotFoundError"))

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        value = self.headers.get("Content-Length")
        if value is None or not (value.isascii() and value.isdigit()):  # int() would take "-1", "1_0"
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            if value is None:
                self._error(APIError(411, "a Content-Length header is required"))
            else:
                self._error(APIError(400, f"Content-Length must be a byte count, got {value!r:.40}"))
            return
        length = int(value)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB"))
            return
        raw = self.rfile.read(length)
        if not self._authorised():
            return
        if path != "/v1/chat/completions":
            self._error(APIError(404, f"no route POST {path}", kind="NotFoundError"))
            return
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise APIError(400, f"the request body is not JSON ({exc})") from None
            except RecursionError:
                raise APIError(400, "the request body is not JSON we read (nested too deeply)") from None
            with self.server.scheduler.preparing():
                req = parse_request(body, self.server.options, self.server.max_tiles())
                job = self.server.make_job(req)
                self.server.scheduler.submit(job)
        except APIError as err:
            self._error(err)
            return
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answer it, and log it for the operator
            traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            self._error(APIError(500, f"internal error: {type(exc).__name__}: {first}", kind="server_error"))
            return
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.server.options.model_name,
        }
        if req.stream:
            self._stream(job, req, reply)
        else:
            self._complete(job, reply)

    def _complete(self, job: Job, reply: dict) -> None:
        kind, *rest = job.events.get()
        while kind == "text":  # not sent for non-streaming jobs; kept for safety
            kind, *rest = job.events.get()
        if kind == "error":
            self._error(_as_api_error(rest[0]))
            return
        text, reason, n = rest
        n_prompt = len(job.prepared[0])
        self._json(200, {
            **reply, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n},
        })  # fmt: skip

    def _stream(self, job: Job, req: ChatRequest, reply: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

        def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def chunk(delta: dict, reason: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**reply, "object": "chat.completion.chunk", "choices": [choice]}

        try:
            event(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, *rest = job.events.get()
                if kind == "text":
                    event(chunk({"content": rest[0]}))
                    continue
                if kind == "error":
                    event(_as_api_error(rest[0]).body())
                else:
                    _, reason, n = rest
                    event(chunk({}, reason))
                    if req.include_usage:
                        n_prompt = len(job.prepared[0])
                        usage = {
                            "prompt_tokens": n_prompt,
                            "completion_tokens": n,
                            "total_tokens": n_prompt + n,
                        }
                        event({**reply, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                event("[DONE]")
                return
        except OSError:  # the client went away: stop generating for it
            job.cancelled.set()


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InputError):
        return APIError(400, str(exc))
    first = str(exc).splitlines()[0] if str(exc) else ""
    return APIError(
        500, f"generation failed: {type(exc).__name__}{f': {first}' if first else ''}", kind="server_error"
    )


def make_server(
    chat: ChatModel, options: ServerOptions, host: str = "127.0.0.1", port: int = 8000
) -> ChatServer:
    """A :class:`ChatServer` listening on ``host:port`` (port 0: any free port; see ``server.url``).
    Run it with ``serve_forever()`` (``shutdown()`` + ``server_close()`` stop it), or in a background
    thread with ``start()`` / ``stop()``."""
    return ChatServer((host, port), chat, options)
