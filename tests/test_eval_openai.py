"""The OpenAI-compatible adapter and the harness against a real HTTP server on loopback.

The server below speaks the chat-completions protocol (the mock is only at that boundary): it checks
the request shape, decodes the base64 images, answers deterministically, and can answer 5xx, 400,
429 with Retry-After, a non-string content or a body cut short, or sleep past the client's timeout
for requests whose text carries a marker.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from interleaf.cli import main
from interleaf.endpoint import EndpointError, OpenAIClient
from interleaf.eval import runner
from interleaf.eval.adapters import OpenAIAdapter, Request
from interleaf.eval.mini import make_mini_mmiu
from test_eval_scorers import rule_judge


class ChatServer:
    """A threaded chat-completions server on 127.0.0.1 (``url`` ends in /v1)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # {"text", "n_images", "model", "max_tokens"}
        self.fail_count: dict[str, int] = {}
        self.judge_status = 200  # another status: every judge prompt is answered with it
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _cut_short(self) -> None:
                """Headers promise 500 bytes; the connection closes after a few."""
                self.send_response(200)
                self.send_header("Content-Length", "500")
                self.end_headers()
                self.wfile.write(b'{"choices": [{"mess')
                self.wfile.flush()
                self.close_connection = True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": "not found"})
                content = body["messages"][0]["content"]
                texts = [c["text"] for c in content if c["type"] == "text"]
                images = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
                for url in images:  # every image must be a decodable data URL
                    head, b64 = url.split(",", 1)
                    assert head.startswith("data:image/") and head.endswith(";base64")
                    Image.open(io.BytesIO(base64.b64decode(b64))).verify()
                text = "".join(texts)
                with server.lock:
                    server.requests.append(
                        {
                            "text": text,
                            "n_images": len(images),
                            "model": body["model"],
                            "max_tokens": body.get("max_tokens"),
                        }
                    )
                    fails = server.fail_count.get(text, 0)
                    if "FAIL503x2" in text and fails < 2:
                        server.fail_count[text] = fails + 1
                        return self._reply(503, {"error": "overloaded"})
                    if ("RATE429" in text or "CUTOFF" in text) and fails < 1:
                        server.fail_count[text] = fails + 1
                        if "CUTOFF" in text:
                            return self._cut_short()
                        return self._reply(429, {"error": "slow down"}, {"Retry-After": "7"})
                if "ALWAYS500" in text:
                    return self._reply(500, {"error": "boom"})
                if "BAD400" in text:
                    return self._reply(400, {"error": "bad request"})
                if "INTCONTENT" in text:
                    return self._reply(200, {"choices": [{"message": {"role": "assistant", "content": 7}}]})
                judging = text.startswith("You are an AI assistant who will help me to match")
                if judging and server.judge_status != 200:
                    return self._reply(server.judge_status, {"error": "judge down"})
                time.sleep(server.delay + (1.0 if "SLOW" in text else 0.0))
                if judging:
                    answer = rule_judge(text).strip()
                else:
                    answer = "ABCD"[len(images) % 4] + ". the first candidate"
                self._reply(200, {"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]})  # fmt: skip

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def mini_mmiu(tmp_path_factory) -> Path:
    return make_mini_mmiu(tmp_path_factory.mktemp("mini") / "mmiu", per_task=2, seed=1).parent


def test_client_retries_5xx_then_succeeds(server):
    client = OpenAIClient(server.url, "m", timeout=5, retries=3, backoff=0.01)
    out = client.complete(
        [{"role": "user", "content": [{"type": "text", "text": "hi FAIL503x2"}]}], max_tokens=4
    )
    assert out.startswith("A")
    assert len(server.requests) == 3


def test_client_timeout_retries_then_fails(server):
    client = OpenAIClient(server.url, "m", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(EndpointError, match="talking to"):
        client.complete([{"role": "user", "content": [{"type": "text", "text": "SLOW"}]}])
    time.sleep(0.1)
    assert len(server.requests) == 2  # first try + one retry


def test_client_does_not_retry_4xx(server):
    client = OpenAIClient(server.url, "m", timeout=5, retries=3, backoff=0.01)
    with pytest.raises(EndpointError, match="HTTP 400"):
        client.complete([{"role": "user", "content": [{"type": "text", "text": "BAD400"}]}])
    assert len(server.requests) == 1


def test_client_waits_what_retry_after_asks(server, monkeypatch):
    from interleaf import endpoint

    slept: list[float] = []
    monkeypatch.setattr(endpoint.time, "sleep", slept.append)
    client = OpenAIClient(server.url, "m", timeout=5, retries=2, backoff=0.01)
    out = client.complete([{"role": "user", "content": [{"type": "text", "text": "hi RATE429"}]}])
    assert out.startswith("A") and len(server.requests) == 2
    assert max(slept) == 7.0  # the server's Retry-After, not the 10 ms backoff


def test_client_retries_a_response_cut_short(server):
    client = OpenAIClient(server.url, "m", timeout=5, retries=1, backoff=0.01)
    out = client.complete([{"role": "user", "content": [{"type": "text", "text": "hi CUTOFF"}]}])
    assert out.startswith("A") and len(server.requests) == 2


def test_client_rejects_content_that_is_not_a_string(server):
    client = OpenAIClient(server.url, "m", timeout=5, retries=0)
    with pytest.raises(EndpointError, match="malformed response.*int, not a string"):
        client.complete([{"role": "user", "content": [{"type": "text", "text": "INTCONTENT"}]}])


def test_adapter_interleaves_images_and_runs_concurrently(server, mini_mmiu):
    server.delay = 0.2
    img = str(next(mini_mmiu.rglob("*.png")))
    adapter = OpenAIAdapter(f"openai:{server.url}#my/model", concurrency=8, retries=0)
    reqs = [
        Request(prompt=f"Image-1: <image>\nImage-2: <image>\nq{i}", images=[img, img], max_new_tokens=5)
        for i in range(8)
    ]
    t0 = time.perf_counter()
    out = dict(adapter.generate(reqs))
    elapsed = time.perf_counter() - t0
    assert sorted(out) == list(range(8)) and all(v.startswith("C") for v in out.values())
    assert elapsed < 8 * 0.2  # requests overlap
    assert {r["n_images"] for r in server.requests} == {2} and {r["max_tokens"] for r in server.requests} == {
        5
    }
    assert adapter.name == "my--model"


def test_run_mmiu_over_endpoint_with_judge_errors_and_resume(server, mini_mmiu, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(mini_mmiu, data)
    records = json.loads((data / "all.json").read_text())
    records[0]["question"] += " ALWAYS500"  # endpoint error for this sample
    os.remove(data / records[1]["input_image_path"][0])  # missing image for this one
    records.append({"task": "visual_ordering", "question": "no options"})  # a record missing fields
    (data / "all.json").write_text(json.dumps(records))
    spec = f"openai:{server.url}#m"
    out = tmp_path / "out"
    scores = runner.run(spec, "mmiu", str(data), out, judge=spec, retries=1, concurrency=4, progress=False)
    n = len(records)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n and len({p["id"] for p in preds}) == n
    assert scores["errors"]["count"] == 3
    assert scores["errors"]["by_kind"] == {"model_error": 1, "missing_image": 1, "bad_record": 1}
    assert preds[0]["response"] == "model error or image error" and preds[1]["response"] == "image none"
    assert scores["run"] == {"cached": 0, "generated": n - 3, "failed": 1}
    assert scores["extraction_counts"]["judge"] > 0  # "X. the first candidate" is not a bare letter
    assert scores["num_scored"] == n - 1
    assert (out / "report.md").read_text().startswith("# mmiu")
    model_calls = [r for r in server.requests if not r["text"].startswith("You are an AI")]
    assert {r["n_images"] for r in model_calls} >= {2, 3}
    # rerun: only the failed sample is asked again (twice: one retry); judge answers come from the store
    before = len(server.requests)
    again = runner.run(spec, "mmiu", str(data), out, judge=spec, retries=1, concurrency=4, progress=False)
    assert again["run"] == {"cached": n - 3, "generated": 0, "failed": 1}
    assert len(server.requests) - before == 2
    assert again["overall"] == scores["overall"]


def test_run_judge_uses_the_runs_timeout_and_retries(server, mini_mmiu, tmp_path):
    # the judge was made with the default 60 s timeout and 3 retries whatever --timeout/--retries said
    server.judge_status = 500
    spec = f"openai:{server.url}#m"
    scores = runner.run(spec, "mmiu", str(mini_mmiu), tmp_path / "out", judge=spec, limit=3, retries=0,
                        concurrency=3, progress=False)  # fmt: skip
    judged = [r for r in server.requests if r["text"].startswith("You are an AI assistant")]
    assert scores["extraction_counts"] == {"judge_error": 3}
    assert len(judged) == 3  # one try each, no retry


def test_cli_run_says_when_judge_calls_failed(server, mini_mmiu, tmp_path, capsys):
    # every judge call failed and eval run exited 0, nothing on stderr (eval score mmiu said so)
    spec = f"openai:{server.url}#m"
    args = ["eval", "run", "--model", spec, "--bench", "mmiu", "--data", str(mini_mmiu), "-o",
            str(tmp_path / "out"), "--judge", spec, "--limit", "3", "--retries", "0", "--no-progress"]  # fmt: skip
    server.judge_status = 500
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec}: all 3 judge calls failed (judge error: HTTP 500 from ")
    assert err.endswith("; those records are left out of the scores\n") and err.count("\n") == 1
    server.judge_status = 200  # the rerun asks the judge again and it answers
    assert main(args) == 0
    assert capsys.readouterr().err == ""


def _store_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_sigkill_mid_run_then_resume_redoes_nothing_and_duplicates_nothing(mini_mmiu, tmp_path):
    server = ChatServer(delay=0.3)
    try:
        out = tmp_path / "out"
        spec = f"openai:{server.url}#m"
        cmd = [sys.executable, "-m", "interleaf.cli", "eval", "run", "--model", spec, "--bench", "mmiu",
               "--data", str(mini_mmiu), "-o", str(out), "--concurrency", "2", "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while _store_rows(out / "responses.sqlite") < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stored = _store_rows(out / "responses.sqlite")
        n = len(json.loads((mini_mmiu / "all.json").read_text()))
        assert 3 <= stored < n
        asked_before = len(server.requests)
        scores = runner.run(spec, "mmiu", str(mini_mmiu), out, concurrency=4, progress=False)
        assert scores["run"]["cached"] == stored
        assert len(server.requests) - asked_before == n - stored  # nothing answered is asked again
        assert _store_rows(out / "responses.sqlite") == n
        ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(ids) == n == len(set(ids))
    finally:
        server.close()
