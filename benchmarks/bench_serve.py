"""Serving under concurrent load: ``interleaf serve`` vs ``transformers serve``, over HTTP on loopback.

As users of vLLM/LMDeploy measure a server: C concurrent clients (default 1, 4, 8, 16), each sending
``--requests`` chat-completion requests one after another (closed loop), each request one 448 px image
(a JPEG data URL, drawn offline with PIL over numpy noise) and a question, greedy, streamed
(``stream_options.include_usage``), exactly ``--max-tokens`` new tokens: the random-weight presets
never emit their stop token, and the script checks ``usage.completion_tokens`` of every reply.

Servers, each in its own process (client and server share no GIL), started here on the same
random-weight checkpoint (written once with ``interleaf init-model ... --layout hf``, a layout both
load), all up at once and measured round-robin, level by level, so they see the same machine:

- ``interleaf``: ``interleaf serve --max-batch-size B`` (default 8): the worker batches what is queued;
- ``interleaf-b1``: ``interleaf serve --max-batch-size 1``: one request at a time, as a naive server
  does (isolates what batching buys);
- ``transformers``: ``transformers serve`` (transformers >= 5; sequential ``generate`` for
  multimodal models), run with ``--peer-python`` (default: this interpreter), offline
  (``HF_HUB_OFFLINE=1``). It needs fastapi and uvicorn (the ``bench`` extra) and, for InternVL's
  processor, torchvision built for the installed torch; if it does not come up, its error line is
  printed and the run goes on without it. A separate environment for it, where the index has no
  torchvision for this torch (a CPU-only torch, say):
  ``python -m venv peer && peer/bin/pip install "transformers[serving]==X" torch torchvision``.

Per server and level: requests/s and output tokens/s (over the wall time of the whole level), median
and p90 latency (request sent -> last byte), median TTFT (request sent -> first non-empty content
delta; n/a where the replies are empty text, as with ``internvl2-1b``, whose ids mostly lie past the
offline tokenizer's), interleaf's requests per generated batch (its ``/metrics``), connections reset
(retried) and TCP connects that took >= 0.5 s. Medians over
``--repeats``. Before timing, every server answers the same ``--pairs`` requests non-streamed (one
concurrent burst) and the script checks the greedy replies: interleaf batched must equal interleaf
one at a time; the peer is compared too (its prompt token counts are printed beside); later every
streamed reply is compared with the same server's non-streamed one. Exit code 1 if interleaf's
replies disagree (in full precision; with ``--dtype bfloat16`` or ``float16`` agreement is reported
only: see ``exact_replies``) or a reply is not ``--max-tokens`` long.

    .venv/bin/python benchmarks/bench_serve.py --peer-python peer/bin/python    # CPU, tiny (~2.5 min)
    .venv/bin/python benchmarks/bench_serve.py --quick                           # ~30 s smoke run
    .venv/bin/python benchmarks/bench_serve.py --presets internvl2-1b --concurrency 1,4 --requests 2 \\
        --pairs 4 --max-tokens 32 --repeats 1                                    # 1B shape, ~4 min
    .venv/bin/python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --peer none  # H100, ~1 min
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from machine import cpu_name, load_average

QUESTIONS = (
    "Describe this image in detail.",
    "What shapes and colours can you see in this picture?",
)
N_IMAGES = 8
PAIRS = N_IMAGES * len(QUESTIONS)  # distinct requests; --pairs sets how many are used


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (Linux, system-wide)."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return None


def checkpoint(preset: str, root: Path) -> Path:
    """The preset's random-weight checkpoint, ``-hf`` layout (both servers load it), written once."""
    path = root / f"{preset}-hf"
    if not (path / "config.json").is_file():
        print(f"# writing {preset} checkpoint to {path} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "interleaf.cli", "init-model", "--preset", preset, "--layout", "hf"]
        subprocess.run([*cmd, "--seed", "0", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def make_images() -> list[str]:
    """N_IMAGES distinct 448x448 JPEG data URLs: noise with a few drawn shapes."""
    rng = np.random.default_rng(0)
    urls = []
    for k in range(N_IMAGES):
        img = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3 + k):
            x0, y0 = (int(v) for v in rng.integers(0, 300, 2))
            x1, y1 = x0 + int(rng.integers(40, 148)), y0 + int(rng.integers(40, 148))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# servers


class Server:
    """A server in a child process, listening on 127.0.0.1:``port``; its output goes to ``log``."""

    def __init__(self, name: str, cmd: list[str], env: dict, model: str, log_dir: Path) -> None:
        self.name, self.model = name, model
        self.port = free_port()
        self.log = log_dir / f"{name}.log"
        cmd = [*cmd, "--port", str(self.port)]
        self.command = " ".join(cmd)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.error: str | None = None

    def wait_ready(self, timeout: float) -> bool:
        """Poll ``/health`` until it answers 200; on exit or timeout, ``error`` says why (one line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.error = f"exited with code {self.proc.returncode}: {last_error_line(self.log)}"
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.5)
        self.error = f"not ready after {timeout:.0f}s: {last_error_line(self.log)}"
        return False

    def metrics(self) -> dict[str, float]:
        """``interleaf serve``'s ``/metrics`` counters (empty where the server has none)."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode()
            conn.close()
        except OSError:
            return {}
        if resp.status != 200:
            return {}
        return {k: float(v) for k, v in (ln.split() for ln in text.splitlines() if ln and ln[0] != "#")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def last_error_line(log: Path) -> str:
    """The exception line of the log's last traceback (with the next line where the message starts there)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[\w.]+(Error|Exception):", lines[i]):
            tail = " " + lines[i + 1] if lines[i].endswith(":") and i + 1 < len(lines) else ""
            return (lines[i] + tail)[:300]
    return lines[-1][:300] if lines else "(no output)"


def start_servers(path: Path, args, log_dir: Path) -> list[Server]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    dtype = ["--dtype", args.dtype] if args.dtype else []
    ours = [sys.executable, "-m", "interleaf.cli", "serve", str(path), "--served-model-name", path.name,
            "--device", args.device, *dtype]  # fmt: skip
    servers = [
        Server("interleaf", [*ours, "--max-batch-size", str(args.max_batch_size)], env, path.name, log_dir),
        Server("interleaf-b1", [*ours, "--max-batch-size", "1"], env, path.name, log_dir),
    ]
    if args.compare_src:  # the same server from another source tree (an A/B of two versions in one run)
        ref_env = dict(env, PYTHONPATH=str(Path(args.compare_src).resolve() / "src"))
        cmd = [*ours, "--max-batch-size", str(args.max_batch_size)]
        servers.append(Server("interleaf-ref", cmd, ref_env, path.name, log_dir))
    if args.peer == "transformers":
        peer = [args.peer_python, "-m", "transformers.cli.transformers", "serve", str(path),
                "--device", args.device, "--dtype", args.dtype or "auto", "--host", "127.0.0.1"]  # fmt: skip
        servers.append(Server("transformers", peer, env, str(path), log_dir))
    up = []
    for s in servers:
        if s.wait_ready(args.start_timeout):
            up.append(s)
        else:
            print(f"# {s.name} did not start ({s.command}): {s.error}", flush=True)
            s.stop()
    return up


# ----------------------------------------------------------------------------------------------------
# clients


def body(model: str, image: str, question: str, max_tokens: int, stream: bool) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]
    req = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
           "max_tokens": max_tokens, "stream": stream}  # fmt: skip
    if stream:
        req["stream_options"] = {"include_usage": True}
    return json.dumps(req).encode()


def post(port: int, payload: bytes, stream: bool, timeout: float = 600, retries: int = 2) -> dict:
    """One chat completion; returns text, usage, latency and (streaming) TTFT in seconds, how many
    times the connection was reset before the server read the request (retried, as the openai client
    retries connection errors; the latency counts from the first try) and how long the TCP connect
    took (a second or more: the server's listen queue was full and the kernel dropped the SYN)."""
    t0 = time.perf_counter()
    for resets in range(retries + 1):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            t = time.perf_counter()
            conn.connect()
            connect = time.perf_counter() - t
            conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            break
        except ConnectionError:  # reset or refused before the server read the request
            conn.close()
            if resets == retries:
                raise
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    if not stream:
        reply = json.loads(resp.read())
        t1 = time.perf_counter()
        conn.close()
        text = reply["choices"][0]["message"]["content"]
        return {
            "text": text,
            "usage": reply.get("usage"),
            "latency": t1 - t0,
            "ttft": None,
            "resets": resets,
            "connect": connect,
        }
    pieces, usage, ttft = [], None, None
    for raw in resp:  # server-sent events, one "data: ..." line each
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(piece)
    t1 = time.perf_counter()
    conn.close()
    return {
        "text": "".join(pieces),
        "usage": usage,
        "latency": t1 - t0,
        "ttft": ttft,
        "resets": resets,
        "connect": connect,
    }


def new_tokens(question: int, args) -> int:
    """Reply length asked with question ``question``: ``--max-tokens``, or ``--short-tokens`` for the
    second question (a mix of long and short replies, as real traffic has)."""
    return args.short_tokens if question == 1 and args.short_tokens else args.max_tokens


def pair(g: int) -> tuple[int, int]:
    """(image, question) of the g-th request of a level (the g-th pair, over and over)."""
    g %= PAIRS
    return g % N_IMAGES, g // N_IMAGES


def run_level(server: Server, payloads: dict, clients: int, per_client: int, stream: bool) -> dict:
    """``clients`` threads, each sending ``per_client`` requests in turn; wall time over all."""
    results: list[dict | None] = [None] * (clients * per_client)
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        start.wait()
        for j in range(per_client):
            g = i * per_client + j
            try:
                results[g] = {**post(server.port, payloads[pair(g), stream], stream), "pair": pair(g)}
            except (OSError, RuntimeError, ValueError) as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    before = server.metrics()
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{server.name}: {len(errors)} failed requests, first: {errors[0]}")
    after = server.metrics()
    batches = after.get("interleaf_batches_total", 0) - before.get("interleaf_batches_total", 0)
    rows = after.get("interleaf_batch_rows_total", 0) - before.get("interleaf_batch_rows_total", 0)
    return {"wall": wall, "results": results, "rows_per_batch": rows / batches if batches else float("nan")}


def summarise(level: dict, args) -> dict:
    res = level["results"]
    lat = [r["latency"] for r in res]
    ttft = [r["ttft"] for r in res if r["ttft"] is not None]
    tokens = [(r["usage"] or {}).get("completion_tokens") for r in res]
    return {
        "req_s": len(res) / level["wall"],
        "tok_s": sum(t or 0 for t in tokens) / level["wall"],
        "lat_med": statistics.median(lat),
        "lat_p90": float(np.percentile(lat, 90)),
        "ttft_med": statistics.median(ttft) if ttft else float("nan"),
        "rows_per_batch": level["rows_per_batch"],  # interleaf's /metrics: requests per generated batch
        "short": sum(t != new_tokens(r["pair"][1], args) for t, r in zip(tokens, res)),  # wrong lengths
        "resets": sum(r["resets"] for r in res),
        "slow_connects": sum(r["connect"] >= 0.5 for r in res),
    }


def check_answers(servers: list[Server], payloads: dict, args, n: int) -> tuple[dict, bool]:
    """Every server answers the first ``n`` (image, question) pairs non-streamed, as one concurrent
    burst; replies are compared with interleaf-b1's (stripped: interleaf strips its replies, the peer
    does not). The timed runs use only these pairs."""
    out = {}
    for s in servers:
        level = run_level(s, payloads[s.name], clients=n, per_client=1, stream=False)
        out[s.name] = {r["pair"]: r for r in level["results"]}
    ref, ok = out["interleaf-b1"], True
    print(f"# greedy replies to {n} (image, question) pairs, sent non-streamed as one burst:")
    for name, got in out.items():
        same = sum(got[p]["text"].strip() == ref[p]["text"].strip() for p in ref)
        prompt = sorted({(got[p]["usage"] or {}).get("prompt_tokens") for p in got})
        lengths = sorted({(got[p]["usage"] or {}).get("completion_tokens") for p in got})
        wrong = sum((got[p]["usage"] or {}).get("completion_tokens") != new_tokens(p[1], args) for p in got)
        resets = sum(r["resets"] for r in got.values())
        slow = sum(r["connect"] >= 0.5 for r in got.values())
        print(f"#   {name:<13} same as interleaf-b1: {same}/{n}, prompt tokens {prompt}, completion tokens "
              f"{lengths} ({wrong} not as asked); connections reset and retried: {resets}, connects "
              f"taking >= 0.5 s: {slow}", flush=True)  # fmt: skip
        ok &= wrong == 0 and (same == n or not name.startswith("interleaf") or not exact_replies(args))
    return out, ok


def exact_replies(args: argparse.Namespace) -> bool:
    """Whether interleaf's replies must agree token for token across batch shapes: not in half
    precision, where a batched step rounds otherwise than a lone one and the random weights' near-tied
    logits then pick other tokens (on an H100 in bf16: 12/16 equal; in fp32: 16/16)."""
    return args.dtype not in ("bfloat16", "float16")


HEADER = (
    f"{'server':<14}{'C':>3}{'reqs':>5} | {'req/s':>7}{'tok/s':>8} | {'lat med':>8}{'lat p90':>8}"
    f"{'TTFT med':>9} | {'req/s vs b1':>11} | {'rows/batch':>10} | resets, slow connects"
)
METRICS = ("req_s", "tok_s", "lat_med", "lat_p90", "ttft_med", "rows_per_batch")


def print_row(r: dict, base: float) -> None:
    ttft = "n/a" if r["ttft_med"] != r["ttft_med"] else f"{r['ttft_med'] * 1e3:.0f}ms"  # nan: no text came
    rows = "-" if r["rows_per_batch"] != r["rows_per_batch"] else f"{r['rows_per_batch']:.1f}"
    print(
        f"{r['server']:<14}{r['concurrency']:>3}{r['requests']:>5} | {r['req_s']:>7.2f}{r['tok_s']:>8.1f} | "
        f"{r['lat_med']:>7.2f}s{r['lat_p90']:>7.2f}s{ttft:>9} | "
        f"{r['req_s'] / base:>10.2f}x | {rows:>10} | {r['resets']:>6}, {r['slow_connects']}",
        f"  ({r['short_replies']} replies of the wrong length!)" if r["short_replies"] else "",
        flush=True,
    )


def bench_preset(preset: str, args, root: Path, log_dir: Path) -> tuple[list[dict], bool]:
    path = checkpoint(preset, root)
    images = make_images()
    servers = start_servers(path, args, log_dir)
    rows: list[dict] = []
    overflows = listen_overflows()
    try:
        if not any(s.name == "interleaf-b1" for s in servers):
            raise RuntimeError("interleaf serve did not start: see the lines above")
        payloads = {
            s.name: {((i, q), stream): body(s.model, images[i], QUESTIONS[q], new_tokens(q, args), stream)
                     for i in range(N_IMAGES) for q in range(len(QUESTIONS)) for stream in (False, True)}
            for s in servers
        }  # fmt: skip
        for s in servers:  # warm-up: one request alone, then a small burst
            run_level(s, payloads[s.name], 1, 1, stream=True)
            run_level(s, payloads[s.name], 4, 1, stream=False)
        reference, ok = check_answers(servers, payloads, args, args.pairs)

        # timed: level by level, the servers round-robin, all repeats interleaved
        runs: dict[tuple[str, int], list[dict]] = {}
        streamed_same = dict.fromkeys(reference, 0)
        for rep in range(args.repeats):
            for c in args.concurrency:
                for s in servers:
                    level = run_level(s, payloads[s.name], c, args.requests, stream=True)
                    runs.setdefault((s.name, c), []).append(summarise(level, args))
                    for r in level["results"]:  # the streamed text = the non-streamed reply
                        streamed_same[s.name] += (
                            r["text"].strip() == reference[s.name][r["pair"]]["text"].strip()
                        )
            print(f"# repeat {rep + 1}/{args.repeats} done, load average {load_average()}", flush=True)

        med = statistics.median
        lengths = f"{args.max_tokens} and {args.short_tokens}" if args.short_tokens else f"{args.max_tokens}"
        print(f"# {preset}: {lengths} new tokens per request, {args.requests} requests per client, "
              f"all streamed; medians of {args.repeats}; resets = connections reset and retried, "
              "slow connects = TCP connects taking >= 0.5 s (SYN dropped: listen queue full), all repeats")  # fmt: skip
        print(HEADER)
        for c in args.concurrency:
            base = med(r["req_s"] for r in runs["interleaf-b1", c])
            for s in servers:
                rs = runs[s.name, c]
                row = {"preset": preset, "server": s.name, "concurrency": c, "requests": c * args.requests}
                row.update({k: med(r[k] for r in rs) for k in METRICS})
                row["short_replies"] = sum(r["short"] for r in rs)
                row["resets"] = sum(r["resets"] for r in rs)
                row["slow_connects"] = sum(r["slow_connects"] for r in rs)
                row["req_s_runs"] = [round(r["req_s"], 3) for r in rs]
                rows.append(row)
                print_row(row, base)
                ok &= row["short_replies"] == 0
        total = args.repeats * args.requests * sum(args.concurrency)
        for name, same in streamed_same.items():
            print(
                f"# {name}: streamed replies equal to its non-streamed reply to the same request: {same}/{total}"
            )
            ok &= same == total or not name.startswith("interleaf") or not exact_replies(args)
        if overflows is not None:
            print(f"# kernel TcpExt ListenOverflows during this preset: {listen_overflows() - overflows} "
                  "(system-wide counter)")  # fmt: skip
    finally:
        for s in servers:
            s.stop()
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda, for every server (default cpu)")
    p.add_argument("--dtype", default=None, help="weight dtype for every server (default: as stored)")
    p.add_argument("--presets", default="tiny", help="comma-separated presets (internvl2-1b: slow on CPU)")
    p.add_argument("--concurrency", default=None, help="client counts (default 1,4,8,16; --quick 1,8)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default 4, --quick 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 128)")
    p.add_argument("--short-tokens", type=int, default=None,
                   help="new tokens asked with the second question (default: --max-tokens): mixed lengths")  # fmt: skip
    p.add_argument("--compare-src", default=None, metavar="DIR",
                   help="also serve with the interleaf source tree in DIR (DIR/src), as 'interleaf-ref'")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="timed runs per level (default 3, --quick 1)")
    p.add_argument(
        "--max-batch-size", type=int, default=8, help="interleaf serve --max-batch-size (default 8)"
    )
    p.add_argument("--peer", default="transformers", choices=("transformers", "none"))
    p.add_argument("--peer-python", default=sys.executable, help="interpreter for transformers serve")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every server")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for a server")
    p.add_argument(
        "--pairs", type=int, default=16, help="distinct (image, question) requests, <= 16 (default 16)"
    )
    p.add_argument("--quick", action="store_true", help="fewer levels, requests and repeats")
    p.add_argument("--ckpt-root", default=None, help="where to write checkpoints (default: a fixed temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.concurrency = [
        int(c) for c in (args.concurrency or ("1,8" if args.quick else "1,4,8,16")).split(",")
    ]
    args.requests = args.requests or (2 if args.quick else 4)
    args.max_tokens = args.max_tokens or 128
    args.repeats = args.repeats or (1 if args.quick else 3)
    if not 1 <= args.pairs <= N_IMAGES * len(QUESTIONS):
        p.error(f"--pairs must be in [1, {N_IMAGES * len(QUESTIONS)}]")
    global PAIRS
    PAIRS = args.pairs
    root = Path(args.ckpt_root or os.path.join(tempfile.gettempdir(), "interleaf-bench-serve"))
    root.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_serve_"))

    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    print(f"# interleaf serving benchmark, {time.strftime('%Y-%m-%d %H:%M')}, device {args.device}, "
          f"{cpu_name()} ({os.cpu_count()} cores), load average {load_average()}")  # fmt: skip
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, server logs in {log_dir}")
    if args.peer == "transformers" and os.path.abspath(args.peer_python) != os.path.abspath(sys.executable):
        code = "import torch, torchvision, transformers as t; print(torch.__version__, torchvision.__version__, t.__version__)"
        out = subprocess.run([args.peer_python, "-c", code], capture_output=True, text=True)
        got = out.stdout.strip().split()
        versions = (
            "torch {}, torchvision {}, transformers {}".format(*got) if len(got) == 3 else out.stderr[-200:]
        )
        print(f"# transformers serve runs with {args.peer_python}: {versions}")
    rows, ok = [], True
    for preset in args.presets.split(","):
        got, good = bench_preset(preset.strip(), args, root, log_dir)
        rows, ok = rows + got, ok and good
    print(f"# load average at the end {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
