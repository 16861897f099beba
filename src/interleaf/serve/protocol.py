"""The OpenAI chat-completions protocol as ``interleaf serve`` takes it: a request body checked field
by field (every error an :class:`APIError` naming the field) and turned into an InternVL conversation.

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
  before any image is decoded;
- a ``video_url`` part (as vLLM takes one; same URL kinds) may stand in the last user message of a
  request without images: ``mm_processor_kwargs: {"num_frames": N}`` frames (default 8) are sampled
  uniformly, one tile each, their ``FrameK: <image>`` lines in front of the text, as ``interleaf chat
  --video`` does.

With ``--reasoning-parser qwen3`` a reply's ``<think>...</think>`` block (InternVL3.5's thinking
mode) is its message's ``reasoning_content`` (:class:`ThinkSplitter`; the field vLLM's reasoning
parsers fill).

Sampling follows the OpenAI API: ``temperature`` (default 1; 0 is greedy), ``top_p``, ``top_k`` (as
vLLM; -1 or 0 is off), ``seed``, ``max_completion_tokens``/``max_tokens`` (default ``--max-tokens``,
and never past the model's context), ``stop`` strings (cut, not included). ``n`` > 1, log-probs, tools,
penalties, logit biases and JSON response formats are refused with a 400 naming the field, and so are
vLLM's other sampling extensions (``repetition_penalty``, ``min_p``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, beam search, guided decoding, ...) when set to anything but their neutral value;
other unknown fields (``user``, ``metadata``, ...) are ignored. A temperature so small that the
logits divided by it overflow samples as its limit, greedy.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interleaf.errors import InputError, is_number
from interleaf.processing.image import load_image
from interleaf.processing.prompt import IMAGE_PLACEHOLDER, image_prefix, video_prefix

MAX_IMAGE_BYTES = 32 << 20
FETCH_TIMEOUT = 10.0
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
    # vLLM's extensions to the protocol (top_k is taken) that change what is generated: a client that
    # sets one expects it applied, and a silently ignored one would change the reply unannounced
    "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "ignore_eos": (None, False),
    "stop_token_ids": (None, []),
    "bad_words": (None, []),
    "allowed_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "prompt_logprobs": (None,),  # (0 asks for the prompt tokens' own log-probs)
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "truncate_prompt_tokens": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
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


@dataclass
class ServerOptions:
    """What ``interleaf serve`` is started with (its flags; see :mod:`interleaf.serve.server`)."""

    model_name: str
    max_tokens: int = 512
    max_num: int | None = None
    max_batch_size: int = 8
    batch_wait: float = 0.05
    allowed_local_media_path: str | None = None
    api_key: str | None = None
    fetch_timeout: float = FETCH_TIMEOUT  # for a whole image download (a server may trickle it)
    read_timeout: float = 60.0  # a client silent this long is dropped (an idle keep-alive, a short body)
    reasoning_parser: str | None = None  # "qwen3": <think>...</think> goes to reasoning_content


THINK_START, THINK_END = "<think>", "</think>"


class ThinkSplitter:
    """Qwen3-style reasoning (InternVL3.5's thinking mode; ``--reasoning-parser qwen3``): the text
    between the reply's first ``<think>`` and the next ``</think>`` is its ``reasoning_content``, the
    rest (before and after) its ``content``, both kept as generated. Fed the reply piece by piece
    (streaming), :meth:`push` gives ``(field, text)`` parts as soon as no tag can still be forming, a
    tag split across pieces being held back until it is whole or ruled out; the parts of a stream
    join to what :func:`split_reasoning` gives for the whole reply. A reply cut short inside its
    reasoning has no content."""

    def __init__(self) -> None:
        self.inside = False  # between <think> and </think>
        self.done = False  # past </think>: one reasoning block per reply
        self.held = ""

    @property
    def started(self) -> bool:
        """A ``<think>`` was seen."""
        return self.inside or self.done

    @property
    def field(self) -> str:
        return "reasoning_content" if self.inside else "content"

    def push(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf, self.held = self.held + text, ""
        while buf:
            tag = THINK_END if self.inside else None if self.done else THINK_START
            if tag is None:
                out.append((self.field, buf))
                break
            i = buf.find(tag)
            if i >= 0:
                if i:
                    out.append((self.field, buf[:i]))
                buf = buf[i + len(tag) :]
                self.done, self.inside = self.inside, not self.inside
                continue
            # hold back the longest end of buf that may be the start of the tag
            keep = next((n for n in range(min(len(tag) - 1, len(buf)), 0, -1) if tag.startswith(buf[-n:])), 0)
            if len(buf) > keep:
                out.append((self.field, buf[: len(buf) - keep]))
            self.held = buf[len(buf) - keep :]
            break
        return out

    def finish(self) -> list[tuple[str, str]]:
        held, self.held = self.held, ""
        return [(self.field, held)] if held else []


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning_content, content)`` of a whole reply (see :class:`ThinkSplitter`); reasoning is
    None when the reply has no ``<think>``."""
    splitter = ThinkSplitter()
    parts = splitter.push(text) + splitter.finish()
    reasoning = "".join(t for f, t in parts if f == "reasoning_content")
    content = "".join(t for f, t in parts if f == "content")
    return (reasoning if splitter.started else None), content


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
    video: bytes | str | None = None  # a video's bytes or allowed path (then no images)
    video_where: str = ""  # its field, for errors
    num_frames: int = 8  # frames sampled from it, one tile each


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
        span = f"[{int(lo)}, {int(hi)}]" if integer else f"[{lo:g}, {hi:g}]"  # (not 2.14748e+09)
        raise APIError(400, f"{name} must be {kind} in {span}, got {value!r:.40}", name)
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
    source = media_source(url, where, local_root, timeout)
    try:
        return load_image(source)
    except InputError as exc:
        raise APIError(400, f"{where}: {exc}", where) from None


def media_source(url: Any, where: str, local_root: str | None, timeout: float = FETCH_TIMEOUT) -> bytes | str:
    """The bytes behind a data or http(s) URL, or the path of an allowed local file; errors name ``where``."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: the media URL must be a non-empty string", where)
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
                f"{where}: local media paths are refused (start the server with --allowed-local-media-path)",
                where,
            )
        path = Path(urllib.parse.unquote(parsed.path) if scheme == "file" else url).resolve()
        if not path.is_relative_to(Path(local_root).resolve()):
            raise APIError(400, f"{where}: {path} is outside --allowed-local-media-path {local_root}", where)
        source = str(path)
    else:
        raise APIError(
            400, f"{where}: unsupported media URL scheme {scheme!r} (data, http, https, file)", where
        )
    return source


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
        raise APIError(400, f"{where}: fetching it got HTTP {exc.code}", where) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise APIError(400, f"{where}: cannot fetch it ({reason})", where) from None
    if size > MAX_IMAGE_BYTES:
        raise APIError(400, f"{where}: the file is over {MAX_IMAGE_BYTES >> 20} MiB", where)
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


def _message_text(msg: dict, i: int, images: list | None, videos: list | None = None) -> str:
    """The text of ``messages[i]``; its image and video URLs are appended to ``images`` and ``videos``
    as ``(url, where)`` (None: refused), to be loaded once the whole request is checked."""
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
        elif kind == "video_url":  # as vLLM takes a video: its frames go in front of the text
            if videos is None:
                raise APIError(400, f"{where}: only user messages may hold a video", where)
            spec = part.get("video_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            videos.append((url, f"{where}.video_url.url"))
        else:
            raise APIError(400, f"{where}.type must be 'text', 'image_url' or 'video_url', got {kind!r:.40}",
                           f"{where}.type")  # fmt: skip
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
    system, turns, sources, videos = None, [], [], []
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
            user, n_videos = role == "user", len(videos)
            turns.append((role, _message_text(msg, i, sources if user else None, videos if user else None)))
            if len(videos) > n_videos and i != len(messages) - 1:
                raise APIError(
                    400, f"messages[{i}]: only the last message may hold a video", f"messages[{i}]"
                )
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
    if not isinstance(mm, dict) or set(mm) - {"max_dynamic_patch", "num_frames"}:
        raise APIError(400, "mm_processor_kwargs: only max_dynamic_patch and num_frames are supported",
                       "mm_processor_kwargs")  # fmt: skip
    max_num = _check_number(mm, "max_dynamic_patch", 1, max_tiles or 1 << 16, True,
                            "mm_processor_kwargs.max_dynamic_patch")  # fmt: skip
    if max_tiles is not None and len(sources) > max_tiles:
        raise APIError(400, f"messages hold {len(sources)} images, more than the {max_tiles} image tiles the "
                       "model's context holds", "messages")  # fmt: skip
    num_frames = _check_number(
        mm, "num_frames", 1, max_tiles or 1 << 16, True, "mm_processor_kwargs.num_frames"
    )
    num_frames = 8 if num_frames is None else num_frames
    root, timeout = options.allowed_local_media_path, options.fetch_timeout
    question, video, video_where = turns[-1][1], None, ""
    if videos:  # as ChatModel.chat takes one: a video alone, its frames one tile each
        if len(videos) > 1 or sources:
            raise APIError(400, "a request may hold one video and then no images", "messages")
        url, video_where = videos[0]
        video = media_source(url, video_where, root, timeout)
        if IMAGE_PLACEHOLDER not in question:
            question = video_prefix(num_frames) + question
    images = [load_media(url, where, root, timeout) for url, where in sources]
    return ChatRequest(
        question=question,
        history=history,
        images=images,
        system_message=system,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=tuple(s for s in stop or () if s),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        max_num=max_num if max_num is not None else options.max_num,
        video=video,
        video_where=video_where,
        num_frames=num_frames,
    )
