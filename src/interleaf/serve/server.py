"""An OpenAI-compatible chat server for interleaf checkpoints (either layout, Mono-InternVL too).

    interleaf serve ckpt/tiny --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text). What a request may hold and
how its messages become a prompt: :mod:`interleaf.serve.protocol`. The reply is what
``ChatModel.chat`` returns (special tokens dropped, stripped), so a greedy request answers exactly as
``interleaf chat`` does.

Standard-library HTTP, one thread per connection: handler threads check the request, decode and tile
its images and tokenise the prompt; one worker thread owns the model. It starts a batch with every
queued request whose sampling settings match the oldest one's (all greedy requests do; a request with
a ``seed`` runs alone, so its sample does not depend on other traffic), waiting for requests still
being prepared (at most ``batch_wait`` seconds: a burst becomes one batch, a lone request waits for
nothing). While the batch runs, queued requests with its settings join it between decode steps as
rows free up (continuous batching, :class:`~interleaf.generation.engine.RowBatch`), first come first
served. A batch keeps cache room for requests like the last 64 (prompt and reply), so an image
request can join a batch a text request started; one that cannot join holds the later ones back
until the batch drains. Text longer
than the context can take is refused before tokenising.

Errors are JSON as the OpenAI API sends them (405 for other methods). A client silent for
``read_timeout`` seconds is dropped; on shutdown, requests still waiting are answered 503.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from interleaf.errors import InputError
from interleaf.generation.chat import ChatModel, TextStreamer
from interleaf.generation.engine import RowBatch
from interleaf.processing.video import frames_to_pixels, read_video_frames
from interleaf.serve.protocol import (
    APIError,
    ChatRequest,
    ServerOptions,
    ThinkSplitter,
    parse_request,
    split_reasoning,
)

MAX_BODY_BYTES = 64 << 20  # a request with several base64 images fits easily
SHUTDOWN_GRACE = 2.0  # seconds the handlers get to send their last answers when the server stops


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
    def alone(self) -> bool:
        """A seeded job runs alone, its draws its own: it samples as ``ChatModel.chat`` with that seed."""
        return self.sampling.get("seed") is not None

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (a seeded job shares with none)."""
        if self.alone:
            return ("alone", id(self))
        return tuple(sorted(self.sampling.items()))


class Scheduler:
    """Owns the model; generates for the queued jobs in batches, one batch at a time, which queued jobs
    with the same sampling settings join between decode steps."""

    def __init__(
        self, chat: ChatModel, max_batch_size: int = 8, batch_wait: float = 0.05, join_room: int = 512
    ) -> None:
        self.chat, self.max_batch_size, self.batch_wait = chat, max_batch_size, batch_wait
        self.join_room = join_room  # cache slots a batch keeps for the replies of requests that join it
        # prompt + reply lengths of recent requests: a batch leaves room for the like of them to join
        self._recent: collections.deque[int] = collections.deque(maxlen=64)
        self._jobs: list[Job] = []
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
                raise _shutting_down()
            self._jobs.append(job)
            self._recent.append(len(job.prepared[0]) + job.max_tokens)
            self.metrics["requests"] += 1
            self.metrics["prompt_tokens"] += len(job.prepared[0])
            self._cv.notify_all()

    def close(self) -> None:
        """Stop: the batch being generated ends at its next step and, like every queued request,
        is answered 503."""
        with self._cv:
            self._closed = True
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
                    job.events.put(("error", _shutting_down()))
                return []
            for job in batch:
                self._jobs.remove(job)
            return batch

    def _run(self) -> None:
        while batch := self._next_batch():
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - reported to the batch's requests, the server goes on
                self.metrics["errors"] += len(batch)
                for job in batch:
                    job.events.put(("error", exc))

    def _generate(self, first: list[Job]) -> None:
        """Generate for ``first`` as one :class:`RowBatch`; while it runs, queued requests with the same
        sampling settings join it between decode steps (continuous batching)."""
        chat = self.chat
        key = first[0].key
        start = max(len(j.prepared[0]) for j in first)
        # room for the first requests' replies and for requests like the recent ones (a longer prompt
        # moves the write slot up to its length), and join_room more for those that join later
        with self._cv:
            recent = max(self._recent, default=0)
        slots = max(start + max(j.max_tokens for j in first), recent) + self.join_room
        rows = 1 if first[0].alone else self.max_batch_size  # idle rows would take draws from its seed
        batch = chat.generator.row_batch(rows, start, slots, chat._config(first[0].sampling))
        self.metrics["batches"] += 1
        stop_ids = frozenset(chat.stop_token_ids)
        replies: dict[int, _Reply] = {}  # row -> its reply

        def admit(job: Job) -> None:
            try:
                reply = _Reply(job, chat)  # first: a row admitted must have its reply
                replies[batch.admit(*job.prepared, max_new_tokens=job.max_tokens)] = reply
                self.metrics["batch_rows"] += 1
            except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
                self.metrics["errors"] += 1
                job.events.put(("error", exc))

        try:
            for job in first:
                admit(job)
            while replies:
                for row, token in batch.sample().items():
                    reply = replies[row]
                    reason = reply.push(token, stop_ids)
                    if reason is not None:
                        self.metrics["generation_tokens"] += reply.finish(reason)
                    if reason is not None or reply.job.cancelled.is_set():
                        batch.release(row)  # done, or nobody waits for it: the row is free
                        del replies[row]
                if self._closed:
                    break
                batch.advance()
                while (job := self._next_joiner(key, batch)) is not None:
                    admit(job)  # before the next is checked: it may move the write slot
        except Exception as exc:  # noqa: BLE001 - reported to the requests in the batch
            self.metrics["errors"] += len(replies)
            for reply in replies.values():
                reply.job.events.put(("error", exc))
            replies.clear()
        finally:
            batch.close()
            for reply in replies.values():  # left when the server closed
                reply.job.events.put(("error", _shutting_down()))

    def _next_joiner(self, key: tuple, batch: RowBatch) -> Job | None:
        """The queued job that joins the running batch now, first come first served: the head of the
        queue if it shares the batch's sampling settings and fits it (a job that cannot join holds the
        ones behind it back, so the batch drains and that job goes next)."""
        with self._cv:
            if not self._jobs:
                return None
            job = self._jobs[0]
            if job.key != key or not batch.can_admit(len(job.prepared[0]), job.max_tokens):
                return None
            return self._jobs.pop(0)


class _Reply:
    """One request's reply as its tokens come, in the worker."""

    def __init__(self, job: Job, chat: ChatModel) -> None:
        self.job, self.chat = job, chat
        # text as it comes where it is needed (streaming, or stop strings to watch)
        self.streamer = TextStreamer(chat, job.stop) if job.stream or job.stop else None
        self.tokens: list[int] = []  # the reply's tokens (a stop token is not part of it)
        self.stop_token = False

    def push(self, token: int, stop_ids: frozenset[int]) -> str | None:
        """Take the next generated token; the finish reason once the reply is complete."""
        if token in stop_ids:
            self.stop_token = True
            return "stop"
        self.tokens.append(token)
        if self.streamer is not None:
            piece = self.streamer.push(token)
            if piece and self.job.stream:
                self.job.events.put(("text", piece))
            if self.streamer.stopped:
                return "stop"
        return "length" if len(self.tokens) >= self.job.max_tokens else None

    def finish(self, reason: str) -> int:
        """Send the reply's end (its last piece when streaming); returns the tokens it generated."""
        job, streamer = self.job, self.streamer
        if streamer is not None:
            piece = streamer.finish()
            if piece and job.stream:
                job.events.put(("text", piece))
            text = streamer.emitted
        else:
            text, hit = self.chat.reply_with_stop(self.tokens, job.stop)
            reason = "stop" if hit else reason
        n = len(self.tokens) + self.stop_token  # the stop token was generated too
        job.events.put(("done", text, reason, n))
        return n


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
        self.scheduler = Scheduler(chat, options.max_batch_size, options.batch_wait, options.max_tokens)
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
        llm = self.chat.config.llm
        if llm.rope_type == "yarn":  # as vLLM derives it: the scaled original context
            rope = llm.rope_scaling
            return int(rope["original_max_position_embeddings"] * rope["factor"])
        return int(llm.max_position_embeddings)

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

    def _prepare_video(self, req: ChatRequest) -> tuple[list[int], torch.Tensor | None]:
        """Sample and tokenise a request's video (its bytes go through a temporary file: the decoder
        reads files). Decoding errors name the video's field, errors of the text ``messages``."""
        path, tmp = req.video, None
        if isinstance(path, bytes):
            tmp = tempfile.NamedTemporaryFile(prefix="interleaf-video-", delete=False)
            with tmp:
                tmp.write(path)
            path = tmp.name
        try:
            frames = read_video_frames(path, num_segments=req.num_frames)
            pixel_values = frames_to_pixels(frames, self.chat.config.image_size)
        except InputError as exc:
            message = str(exc).replace(path, "the video") if tmp is not None else str(exc)
            raise APIError(400, f"{req.video_where}: {message}", req.video_where) from None
        finally:
            if tmp is not None:
                os.unlink(tmp.name)
        try:  # the question has its frames' placeholders (parse_request): the prompt chat(video=...) makes
            _, ids, pixel_values, _ = self.chat.prepare(
                req.question, None, req.history, pixel_values=pixel_values, num_tiles=[1] * len(frames),
                system_message=req.system_message,
            )  # fmt: skip
        except InputError as exc:
            raise APIError(400, str(exc), "messages") from None
        return ids, pixel_values

    def make_job(self, req: ChatRequest) -> Job:
        """Tile, tokenise and check one request (in its handler thread)."""
        chars = len(req.question) + len(req.system_message or "") + sum(len(q + a) for q, a in req.history)
        if chars > self.max_prompt_chars():
            raise APIError(400, f"the messages hold {chars} characters, more than the model's context of "
                           f"{self.context_length()} tokens can take", "messages")  # fmt: skip
        if req.video is not None:
            ids, pixel_values = self._prepare_video(req)
        else:
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
        kind, *rest = job.events.get()  # a non-streaming job gets no "text" events
        if kind == "error":
            self._error(_as_api_error(rest[0]))
            return
        text, reason, n = rest
        message = {"role": "assistant", "content": text}
        if self.server.options.reasoning_parser:
            message["reasoning_content"], message["content"] = split_reasoning(text)
        self._json(200, {
            **reply, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": _usage(job, n),
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

        splitter = ThinkSplitter() if self.server.options.reasoning_parser else None

        def text(piece: str) -> None:
            for field, part in splitter.push(piece) if splitter else [("content", piece)]:
                event(chunk({field: part}))

        try:
            event(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, *rest = job.events.get()
                if kind == "text":
                    text(rest[0])
                    continue
                if kind == "error":
                    event(_as_api_error(rest[0]).body())
                else:
                    _, reason, n = rest
                    for field, part in splitter.finish() if splitter else []:
                        event(chunk({field: part}))
                    event(chunk({}, reason))
                    if req.include_usage:
                        event(
                            {
                                **reply,
                                "object": "chat.completion.chunk",
                                "choices": [],
                                "usage": _usage(job, n),
                            }
                        )
                event("[DONE]")
                return
        except OSError:  # the client went away: stop generating for it
            job.cancelled.set()


def _usage(job: Job, completion_tokens: int) -> dict:
    prompt_tokens = len(job.prepared[0])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", kind="server_error")


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
