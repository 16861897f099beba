"""``interleaf serve`` met by bad input and adversarial clients: the real server on loopback, raw sockets
and ``http.client`` where the ``openai`` client would not send such a request, and a real image server
(``http.server``) on loopback for http image URLs."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import openai
import pytest
import torch

import interleaf
from interleaf.serve.protocol import ServerOptions
from interleaf.serve.server import make_server


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(content, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def chat(tiny_ckpt):
    return interleaf.load(tiny_ckpt)


@pytest.fixture(scope="module")
def server(chat, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    options = ServerOptions(model_name="tiny", max_tokens=4, allowed_local_media_path=str(media))
    with make_server(chat, options, port=0).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def post(server, body: bytes | dict, method: str = "POST", headers: dict | None = None) -> tuple[int, dict]:
    """Send one request on a fresh connection; the status and the JSON reply."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, "/v1/chat/completions", body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.read()
    conn.close()
    return resp.status, json.loads(out) if out else {}


def occupy_worker(server, client) -> threading.Thread:
    """A long greedy request that keeps the worker busy, so that requests sent next queue up and are
    generated as one batch."""
    before = server.scheduler.metrics["batches"]
    t = threading.Thread(target=client.chat.completions.create, kwargs=user("warm", max_tokens=200))
    t.start()
    while server.scheduler.metrics["batches"] == before:
        time.sleep(0.005)
    return t


def test_unreadable_bodies_get_a_one_line_400_naming_the_field(server):
    # each of these dropped the connection without a reply (a traceback in the server's log)
    status, reply = post(server, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in reply["error"]["message"]
    root = server.options.allowed_local_media_path
    for body, param in [
        (user("hi \ud800"), "messages[0].content"),
        (user([{"type": "text", "text": "\udc00"}]), "messages[0].content[0].text"),
        ({"messages": [{"role": "system", "content": "\ud800"}, {"role": "user", "content": "x"}]},
         "messages[0].content"),
        (user([image_part(f"{root}/\ud800.png")]), "messages[0].content[0].image_url.url"),
    ]:  # fmt: skip
        status, reply = post(server, body)
        assert status == 400 and reply["error"]["param"] == param, reply
        assert "lone surrogate" in reply["error"]["message"]


def test_sampling_extensions_the_server_does_not_apply_are_refused(server):
    """vLLM's sampling extensions (top_k is taken) were silently ignored, so a reply came back from
    another distribution than asked for; set to anything but their neutral value they are a 400
    naming the field, and at their neutral values the request is answered."""
    for field, value in [
        ("repetition_penalty", 1.2), ("min_p", 0.05), ("min_tokens", 3), ("best_of", 2),
        ("use_beam_search", True), ("ignore_eos", True), ("stop_token_ids", [5]), ("bad_words", ["x"]),
        ("include_stop_str_in_output", True), ("skip_special_tokens", False), ("echo", True),
        ("guided_choice", ["a", "b"]), ("add_generation_prompt", False), ("presence_penalty", 0.5),
    ]:  # fmt: skip
        status, reply = post(server, user("hi", **{field: value}))
        assert status == 400 and reply["error"]["param"] == field, (field, reply)
        assert f"{field} is not supported" in reply["error"]["message"]
    neutral = dict(repetition_penalty=1.0, min_p=0, min_tokens=0, best_of=1, use_beam_search=False,
                   ignore_eos=False, stop_token_ids=[], include_stop_str_in_output=False,
                   skip_special_tokens=True, add_generation_prompt=True, user="u", metadata={"k": "v"})  # fmt: skip
    status, reply = post(server, user("hi", **neutral))
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
    # integer bounds are written as integers (the bound was "2.14748e+09")
    status, reply = post(server, user("hi", max_tokens=0))
    assert status == 400 and "[1, 2147483648], got 0" in reply["error"]["message"]


def test_http_level_abuse_is_answered_in_json(server):
    assert post(server, b"{}", headers={"Content-Length": "-1"})[0] == 400  # was 413 "over 64 MiB"
    status, reply = post(server, b"{}", headers={"Content-Length": "1_0"})  # int() reads 10
    assert status == 400 and "Content-Length" in reply["error"]["message"]
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):  # were HTML 501 pages
        status, reply = post(server, b"{}", method=method)
        assert status == 405 and method in reply["error"]["message"]
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")  # a method no handler has: the base class's 501
        head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 ") and "BREW" in json.loads(body)["error"]["message"]


def test_a_client_silent_too_long_is_let_go(chat):
    """A body shorter than its Content-Length, or an idle keep-alive connection, held a handler thread
    for as long as the client kept the socket open."""
    options = ServerOptions(model_name="tiny", max_tokens=2, read_timeout=0.5)
    with make_server(chat, options, port=0).start() as srv:
        host, port = srv.server_address[:2]
        with (
            socket.create_connection((host, port), timeout=10) as short,
            socket.create_connection((host, port), timeout=10) as idle,
        ):
            short.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b" 200 " in idle.recv(1000)
            t0 = time.monotonic()
            short.makefile("rb").read()  # returns once the server closes the connection
            while idle.recv(1000):
                pass
            assert time.monotonic() - t0 < 5


def test_a_bad_request_does_not_fail_the_batch_it_joins(chat, server, client, noise_image):
    """<IMG_CONTEXT> typed into a message with an image made the model refuse the batch at prefill: every
    request generated with it got its error."""
    img = noise_image(30, 200, 200)
    warm = occupy_worker(server, client)
    good = [image_part(data_url(img)), {"type": "text", "text": "What is it?"}]
    bad = [image_part(data_url(img)), {"type": "text", "text": "What is <IMG_CONTEXT>?"}]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda c: post(server, user(c, max_tokens=5)), [good, bad]))
    warm.join()
    assert replies[0][0] == 200
    assert replies[0][1]["choices"][0]["message"]["content"] == chat.chat(
        "What is it?", images=img, max_new_tokens=5
    )
    assert replies[1][0] == 400 and "<IMG_CONTEXT>" in replies[1][1]["error"]["message"]


def test_images_past_the_context_are_refused_before_decoding(server, noise_image):
    """A few kB of 1-pixel data URLs decoded and tiled into one tile each (600k of them fit 64 MiB), and
    max_dynamic_patch had no bound but 65536 (a big image tiled into thousands of tiles)."""
    dot = data_url(noise_image(31, 1, 1))
    status, reply = post(server, user([image_part(dot)] * 129 + [{"type": "text", "text": "q"}]))
    assert status == 400 and "129 images, more than the 128 image tiles" in reply["error"]["message"]
    status, reply = post(server, user([image_part(dot)], mm_processor_kwargs={"max_dynamic_patch": 4096}))
    assert status == 400 and reply["error"]["param"] == "mm_processor_kwargs.max_dynamic_patch"
    status, reply = post(server, user("q", mm_processor_kwargs=[]))
    assert status == 400 and reply["error"]["param"] == "mm_processor_kwargs"


def test_a_prompt_longer_than_the_context_can_take_is_not_tokenised(server):
    """Tokenising takes the tokenizer lock the worker decodes streamed replies under: a 60 MB prompt
    stalled every stream for about a minute before being refused."""
    n = 1_000_000  # the tiny vocabulary's longest token has 13 characters: 32768 tokens spell 851,968 at most
    assert n > server.max_prompt_chars()
    status, reply = post(server, user("x" * n))
    assert status == 400 and f"{n} characters" in reply["error"]["message"]


class _Images(BaseHTTPRequestHandler):
    """A loopback image server: /ok.png, /slow/SECONDS (trickles bytes for that long), anything else 404."""

    png = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif self.path.startswith("/slow/"):
            self.send_response(200)
            self.end_headers()
            for _ in range(int(float(self.path[6:]) * 10)):  # each read well within the per-read timeout
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def images_url(noise_image, loopback_http):
    buf = io.BytesIO()
    noise_image(40, 120, 90).save(buf, format="PNG")
    _Images.png = buf.getvalue()
    with loopback_http(_Images) as base:
        yield base


def test_http_images_and_a_trickling_image_server(chat, images_url, noise_image):
    options = ServerOptions(model_name="tiny", max_tokens=3, fetch_timeout=1.0)
    with make_server(chat, options, port=0).start() as srv:
        status, reply = post(srv, user([image_part(images_url + "/ok.png"), {"type": "text", "text": "Q"}]))
        assert reply["choices"][0]["message"]["content"] == chat.chat(
            "Q", images=noise_image(40, 120, 90), max_new_tokens=3
        )
        status, reply = post(srv, user([image_part(images_url + "/missing")]))
        assert status == 400 and "HTTP 404" in reply["error"]["message"]
        t0 = time.monotonic()
        status, reply = post(srv, user([image_part(images_url + "/slow/4")]))  # was read to its end
        assert status == 400 and "not done after 1 s" in reply["error"]["message"]
        assert time.monotonic() - t0 < 2.5


def test_stop_while_the_worker_waits_for_a_batch_to_fill(chat, images_url):
    """Closed while the worker waited for a request still being prepared, the worker went on to
    generate the queued batch in full (and the caller of stop() waited for it) instead of a 503."""
    options = ServerOptions(model_name="tiny", max_tokens=2000, batch_wait=30.0)
    srv = make_server(chat, options, port=0).start()
    client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
    preparing = threading.Thread(target=post, args=(srv, user([image_part(images_url + "/slow/1.5")])))
    preparing.start()  # its handler fetches the image for 1.5 s
    while srv.scheduler._preparing == 0:
        time.sleep(0.005)
    errors = []

    def queued() -> None:
        try:
            client.chat.completions.create(**user("Tell me a long story."))
        except openai.APIStatusError as exc:
            errors.append(exc.status_code)

    waiting = threading.Thread(target=queued)
    waiting.start()
    while not srv.scheduler._jobs:
        time.sleep(0.005)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    waiting.join()
    preparing.join()
    assert errors == [503]


def test_sixteen_mixed_concurrent_requests_answer_as_alone(chat, server, client):
    """Greedy and seeded, streamed and not, stop strings, different lengths and invalid requests, all at
    once: each valid one gets what it gets alone, each invalid one its 400."""
    questions = [f"Question number {k}?" for k in range(16)]
    full = chat.chat(questions[1], max_new_tokens=8)
    stop = full.split()[len(full.split()) // 2] if len(full.split()) > 1 else full[:2]

    def body(k: int) -> dict:
        kw: dict = {"max_tokens": 2 + k % 6}
        if k % 4 == 1:
            kw.update(max_tokens=8, stop=[stop])
        if k % 5 == 2:
            kw.update(temperature=0.8, seed=k)
        if k % 3 == 0:
            kw.update(stream=True)
        if k in (7, 11):
            kw.update(temperature="hot")
        return {
            "model": "tiny",
            "messages": [{"role": "user", "content": questions[k]}],
            "temperature": 0,
            **kw,
        }

    def ask(k: int) -> tuple[int, str]:
        b = body(k)
        try:
            if b.get("stream"):
                chunks = client.chat.completions.create(**b)
                return 200, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return 200, client.chat.completions.create(**b).choices[0].message.content
        except openai.BadRequestError as exc:
            return 400, str(exc)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    for k, (status, text) in enumerate(together):
        if k in (7, 11):
            assert status == 400 and "temperature" in text
        elif "seed" in body(k):
            assert (status, text) == ask(k)  # the sample does not depend on the other traffic
        else:
            b = body(k)
            ids = torch.tensor([chat.prepare(questions[k])[1]])
            out = chat.generator.generate(ids, config=chat._config({"max_new_tokens": b["max_tokens"]}))
            assert (status, text) == (200, chat.reply_with_stop(out.tokens[0], b.get("stop", ()))[0]), k


def test_clients_leaving_mid_reply_do_not_break_the_batch(chat, server, client):
    host, port = server.server_address[:2]
    warm = occupy_worker(server, client)
    leavers = []
    for stream in (True, False):
        s = socket.create_connection((host, port), timeout=10)
        b = json.dumps(user("Leave early.", max_tokens=300, stream=stream)).encode()
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
        )
        leavers.append(s)
    stay = ThreadPoolExecutor(1).submit(client.chat.completions.create, **user("Stay.", max_tokens=6))
    time.sleep(0.2)
    peers = {s.getsockname() for s in leavers}
    for s in leavers:
        s.close()
    assert stay.result().choices[0].message.content == chat.chat("Stay.", max_new_tokens=6)
    warm.join()

    def peer(conn: socket.socket) -> tuple | str:
        try:
            return conn.getpeername()
        except OSError:  # ENOTCONN: its client reset it (a leaver's, closed with its reply unread)
            return "reset"

    def leavers_served() -> set:  # the server's ends of the leavers' connections still open
        with server._connections_lock:
            return {peer(c) for c in server._connections} & (peers | {"reset"})

    deadline = time.monotonic() + 20
    while leavers_served() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leavers_served()  # their handler threads are done


def test_cli_refuses_a_batch_wait_no_timer_can_take(tiny_ckpt):
    """--batch-wait-ms inf started the server; the worker thread then died of an OverflowError at the
    first burst of requests, leaving them all waiting forever."""
    bad = subprocess.run(
        [sys.executable, "-m", "interleaf.cli", "serve", str(tiny_ckpt), "--batch-wait-ms", "inf"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (
        bad.returncode == 1 and bad.stderr.strip() == "error: --batch-wait-ms must be in [0, 60000], got inf"
    )


def test_a_burst_of_connections_is_queued_not_dropped(chat):
    # not serving yet: every connection waits in the listen queue, as a burst does while accept() lags
    server = make_server(chat, ServerOptions(model_name="m"), port=0)
    socks = []
    try:
        for _ in range(40):
            s = socket.socket()
            s.settimeout(0.5)
            socks.append(s)
            s.connect(server.server_address[:2])  # a dropped SYN times out here
    finally:
        for s in socks:
            s.close()
        server.server_close()


def test_a_request_failing_as_it_joins_fails_alone(chat, server, client, monkeypatch):
    """A row admitted without its reply state would stay active, and the next step's KeyError would fail
    every request in the batch (the reply state is made first)."""
    from interleaf.serve import server as server_module

    class Streamer(server_module.TextStreamer):
        def __init__(self, chat, stop=()):
            if "boom" in stop:
                raise RuntimeError("no streamer for you")
            super().__init__(chat, stop)

    monkeypatch.setattr(server_module, "TextStreamer", Streamer)
    before = server.scheduler.metrics["batches"]
    with ThreadPoolExecutor(3) as pool:
        warm = pool.submit(post, server, user("Warm.", max_tokens=100))  # the batch the others join
        while server.scheduler.metrics["batches"] == before:
            time.sleep(0.005)
        bad, good = pool.map(
            lambda kw: post(server, user("Join now.", max_tokens=5, **kw)), [{"stop": ["boom"]}, {}]
        )
        assert warm.result()[0] == 200
    assert server.scheduler.metrics["batches"] == before + 1
    assert bad[0] == 500 and "no streamer for you" in bad[1]["error"]["message"]
    assert good[0] == 200
    assert good[1]["choices"][0]["message"]["content"] == chat.chat("Join now.", max_new_tokens=5)
    assert post(server, user("Later.", max_tokens=2))[0] == 200


def test_a_video_request_whose_text_is_wrong_names_the_messages_not_the_video(server, gray_video, tmp_path):
    """A good video with text whose ``<image>`` placeholders do not match its frames (in the question or in
    an earlier turn): the text is at fault, as for an image request. Every error of ChatModel.prepare was
    reported under the video's field, telling the client its (good) video was bad."""
    path = tmp_path / "clip.mkv"
    gray_video(path, 6)
    video = {"type": "video_url", "video_url": {"url": "data:video/x-matroska;base64,"
                                                + base64.b64encode(path.read_bytes()).decode()}}  # fmt: skip
    frames = {"mm_processor_kwargs": {"num_frames": 2}, "max_tokens": 1}
    for messages in (
        [{"role": "user", "content": [video, {"type": "text", "text": "<image>\nWhat happens?"}]}],
        [
            {"role": "user", "content": "<image> hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [video, {"type": "text", "text": "?"}]},
        ],
    ):
        status, out = post(server, {"model": "tiny", "messages": messages, **frames})
        assert status == 400 and out["error"]["param"] == "messages", out
        assert "placeholder" in out["error"]["message"]
    status, out = post(
        server,
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [video, {"type": "text", "text": "?"}]}],
            **frames,
        },
    )
    assert status == 200, out
