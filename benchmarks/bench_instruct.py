"""Instruction generation against a local LLM endpoint: interleaf's concurrent requests vs the
official MMInstruct engine's loop (one request at a time), in one run on the same server.

The endpoint is ``interleaf serve`` on a random-weight checkpoint (``--preset``, default tiny) in a
child process on loopback; it batches concurrent requests (continuous batching). Both rows run
``interleaf.instruct.engine.generate`` on the same captions (drawn images, ``--captions`` records,
the four instruction types, so 4 requests per caption), greedy, ``--max-tokens`` per reply (the
random model never stops early), each repeat into a fresh output folder so nothing comes from the
response store:

- ``official loop``: ``--concurrency 1``, each request sent when the last one has answered, as
  ``data_engine/gpt35_qa.py`` does (a loop over the captions, one ``get_answer`` call each);
- ``interleaf``: ``--concurrency`` (default 8) requests in flight.

The random model's replies hold no tags, so every reply counts as unparsable: what is timed is the
whole pipeline (prompts, requests, store, parsing, outputs), not the quality of instructions. The
script checks that both rows got identical replies (greedy), and prints requests/s, medians of
``--repeats``.

    .venv/bin/python benchmarks/bench_instruct.py            # CPU, tiny (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import Server, checkpoint  # noqa: E402
from machine import cpu_name, load_average  # noqa: E402


def make_captions(root: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    rows = []
    for k in range(n):
        img = Image.new("RGB", (320, 240), (128 + k, 128, 128))
        ImageDraw.Draw(img).ellipse((40 + k, 40, 200, 180), fill=colours[k % len(colours)])
        img.save(root / f"img{k}.png")
        caption = (f"A {colours[k % len(colours)]} disc on a grey background, slightly left of the centre, "
                   f"drawn as picture number {k} of a test set.")  # fmt: skip
        rows.append({"id": f"c{k}", "image": f"img{k}.png", "caption": caption})
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def replies(out: Path) -> dict[str, str]:
    with sqlite3.connect(out / "responses.sqlite") as db:
        return dict(db.execute("SELECT sample_id, response FROM responses"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from interleaf.instruct.engine import GenerateConfig, generate

    root = Path(tempfile.mkdtemp(prefix="bench_instruct_"))
    ckpt = checkpoint(args.preset, root)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "interleaf.cli", "serve", str(ckpt), "--served-model-name", "m",
           "--device", args.device, "--max-batch-size", str(args.concurrency)]  # fmt: skip
    server = Server("interleaf", cmd, env, "m", root)
    if not server.wait_ready(300):
        print(f"server did not start: {server.error}")
        return 1
    captions = make_captions(root, args.captions)
    spec = f"openai:http://127.0.0.1:{server.port}/v1#m"
    rows = {
        "official loop (1 at a time)": 1,
        f"interleaf (--concurrency {args.concurrency})": args.concurrency,
    }
    rates: dict[str, list[float]] = {name: [] for name in rows}
    answers: dict[str, dict[str, str]] = {}
    try:
        for r in range(args.repeats):
            for name, conc in rows.items():  # round-robin: both rows see the same machine
                out = root / f"out-{conc}-{r}"
                cfg = GenerateConfig(max_tokens=args.max_tokens, temperature=0.0, concurrency=conc, retries=0)
                t0 = time.perf_counter()
                stats = generate(captions, spec, out, cfg, progress=False)
                dt = time.perf_counter() - t0
                assert (
                    stats["requests"]["asked"] == stats["requests"]["total"]
                    and not stats["requests"]["failed"]
                )
                rates[name].append(stats["requests"]["total"] / dt)
                answers.setdefault(name, replies(out))
    finally:
        server.stop()
    same = len(set(map(lambda d: tuple(sorted(d.items())), answers.values()))) == 1
    n = args.captions * 4
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}, load {load_average()}, preset {args.preset}, "
          f"{n} requests x {args.max_tokens} tokens, medians of {args.repeats}")  # fmt: skip
    print(f"# replies identical across rows: {same}")
    base = statistics.median(rates["official loop (1 at a time)"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(
            f"| {name} | {med:.2f} req/s | {med / base:.2f}x | runs: {', '.join(f'{v:.2f}' for v in values)} |"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
