"""Talking to an OpenAI-compatible chat-completions endpoint (vLLM, LMDeploy, ``interleaf serve``,
hosted APIs) with the standard library: ``openai:URL#MODEL`` specs, images as data URLs, and a client
with timeouts and retries. Shared by evaluation (models and judges) and instruction generation.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import mimetypes
import os
import random
import time
import urllib.error
import urllib.request
from typing import Any

from interleaf.errors import InputError


class EndpointError(RuntimeError):
    """A request that failed after all retries (or with a non-retryable status)."""


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """``openai:URL#MODEL`` -> (base URL, model)."""
    body = spec[len("openai:") :] if spec.startswith("openai:") else spec
    url, sep, model = body.partition("#")
    if not sep or not url or not model:
        raise InputError(
            f"{spec!r}: expected openai:URL#MODEL, e.g. openai:http://localhost:8000/v1#my-model"
        )
    return url.rstrip("/"), model


def image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def retry_after(headers: Any, cap: float = 60.0) -> float:
    """Seconds a ``Retry-After`` header (seconds or an HTTP date) asks to wait, at most ``cap``; 0
    when there is none or it cannot be read."""
    value = (headers.get("Retry-After") if headers is not None else None) or ""
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(seconds, cap) if seconds > 0 else 0.0  # not NaN, not a date in the past


class OpenAIClient:
    """Minimal chat-completions client (stdlib HTTP) with timeouts and retries with backoff (at least
    what a 429/503's ``Retry-After`` asks)."""

    RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

    def __init__(self, url: str, model: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5):
        self.url, self.model = url, model
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.api_key = os.environ.get("OPENAI_API_KEY", "")

    def complete(self, messages: list[dict], **params: Any) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        wait = 0.0  # what the last answer's Retry-After asked for
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(wait, self.backoff * (2 ** (attempt - 1)) * (1 + 0.25 * random.random())))
            wait = 0.0
            req = urllib.request.Request(
                self.url + "/chat/completions", data=body, headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                content = payload["choices"][0]["message"]["content"]
                if content is not None and not isinstance(content, str):
                    raise TypeError(f"message content is {type(content).__name__}, not a string")
                return content or ""
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:200].decode("utf-8", "replace")
                last = EndpointError(f"HTTP {exc.code} from {self.url}: {detail}")
                if exc.code not in self.RETRY_STATUS:
                    break
                wait = retry_after(exc.headers)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # timeouts, refused or reset connections; HTTPException: closed mid-response
                # (IncompleteRead) or a garbled status line
                reason = getattr(exc, "reason", exc)
                last = EndpointError(f"{type(reason).__name__} talking to {self.url}: {reason}")
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                last = EndpointError(f"malformed response from {self.url}: {exc}")
        raise last if last else EndpointError("no attempt made")
