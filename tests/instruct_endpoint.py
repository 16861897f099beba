"""A scripted LLM / VLM behind the OpenAI chat-completions protocol, served over real HTTP on loopback.

It stands in for a hosted model (the one network boundary that cannot exist offline): it reads the
prompts interleaf sends and answers in the tag format, deterministically from the caption, so the
tests know what every instruction must be. Markers in a caption script faults:

- ``GARBLE``: a reply without tags; ``FAIL``: HTTP 500 every time; ``DUPLICATE``: every item asks the
  same question; ``BROKEN``: item 2 has no answer and item 3 keeps a seed's ``<placeholder>``.

Caption requests (an ``image_url`` part) are answered with the thumbnail's size and mean colour,
padded to ``CAPTION_WORDS`` words, then any text the prompt says the image contains.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
from PIL import Image

CAPTION_WORDS = 70


def caption_words(caption: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) > 3]


def expected_items(type_: str, caption: str, lang: str = "en") -> list[tuple[str, str, list[str]]]:
    """(question, reply answer, options) the endpoint writes for a caption and type."""
    words = caption_words(caption) or ["thing", "stuff", "item", "object"]
    pick = [words[i % len(words)] for i in range(8)]
    n = 4 if type_ == "judge" else 3
    items = []
    for i in range(n):
        word = pick[i]
        if "DUPLICATE" in caption:
            question = "What is shown in the picture?"
        elif lang == "zh":
            question = f"图中有{word}{i}吗？"
        else:
            question = f"Question {i + 1} about the {word}: what do you see?"
        if type_ == "judge":
            yes = i % 2 == 0
            answer = ("是" if yes else "否") if lang == "zh" else ("Yes" if yes else "No")
            items.append((question, answer, []))
        elif type_ == "choice":
            options = [f"{pick[(i + k) % 8]} option{k}" for k in range(4)]
            items.append((question, "ABCD"[i % 4], options))
        elif type_ == "long":
            items.append((question, " ".join([*words, *words, *words, "and", "more"] * 3)[:400].strip(), []))
        else:
            items.append((question, word, []))
    return items


def _generation_reply(prompt: str) -> str:
    m = re.search(r"(?:Description: |描述：)(.*)\n", prompt)
    caption = m.group(1) if m else ""
    lang = "zh" if "描述：" in prompt else "en"
    if "<C1> A. ..." in prompt:
        type_ = "choice"
    elif "<C1> Yes, No" in prompt or "<C1> 是, 否" in prompt:
        type_ = "judge"
    elif "the detailed answer" in prompt or "详细答案" in prompt:
        type_ = "long"
    else:
        type_ = "short"
    if "GARBLE" in caption:
        return "I am sorry, I cannot help with that."
    out = []
    for i, (question, answer, options) in enumerate(expected_items(type_, caption, lang), 1):
        if "BROKEN" in caption and i == 3:
            question = "Is the object <object name> visible?"
        part = f"<Q{i}> {question} </Q{i}> "
        if options:
            part += f"<C{i}> " + " ".join(f"{L}. {o}" for L, o in zip("ABCD", options)) + f" </C{i}> "
        elif type_ == "judge":
            part += f'<C{i}> {{"Yes", "No"}} </C{i}> '
        if not ("BROKEN" in caption and i == 2):
            part += f"<A{i}> {answer} </A{i}>"
        out.append(part)
    return "Here you are:\n" + "\n".join(out)


def _caption_reply(content: list[dict]) -> str:
    url = next(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
    text = next(p["text"] for p in content if p.get("type") == "text")
    header, data = url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format == "JPEG" and max(img.size) <= 512
    r, g, b = np.asarray(img.convert("RGB")).reshape(-1, 3).mean(axis=0).astype(int)
    caption = f"A picture of {img.size[0]} by {img.size[1]} pixels with mean colour {r} {g} {b}."
    filler = "The scene shows shapes and colours in a calm arrangement".split()
    k = 0
    while len(caption.split()) < CAPTION_WORDS:
        caption += " " + filler[k % len(filler)]
        k += 1
    m = re.search(r"contains this text: (.*)\n", text)
    return caption + (f" It reads {m.group(1)}." if m else "")


class ScriptedLLM:
    """Holds the requests seen; ``handler()`` is the request handler class to serve."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[dict] = []
        self.delay = delay
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with llm.lock:
                    llm.requests.append(body)
                if llm.delay:
                    time.sleep(llm.delay)
                user = body["messages"][-1]["content"]
                if isinstance(user, list):
                    reply = _caption_reply(user)
                elif "FAIL" in user:
                    self._send(500, {"error": {"message": "scripted failure", "type": "server_error"}})
                    return
                else:
                    reply = _generation_reply(user)
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
