"""The whole training loop, data loading included: tokens/s of ``Trainer`` with and without read-ahead
data-loading threads.

``bench_train.py`` times the train step on samples prepared beforehand (the model's speed). Here the
trainer does everything a run does each step - read JSONL records, decode and tile the images,
tokenise, pack, collate, forward/backward/AdamW - on the demo's digits/shapes data in InternVL's
format, once with ``num_workers: 0`` (samples built in the loop) and once with read-ahead threads.
Checkpoint saving is left out (the loop calls ``train_step`` as ``train`` does).

    .venv/bin/python benchmarks/bench_train_loop.py                     # CPU, tiny preset
    .venv/bin/python benchmarks/bench_train_loop.py --device cuda --preset internvl2-1b --compile
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_train import build_data, step_flops  # noqa: E402


def report_syncs() -> None:
    """Print every synchronising CUDA call from now on, with the Python stack that made it."""
    import traceback
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"--- host sync: {message}\n" + "".join(traceback.format_stack(limit=12)[:-2]), flush=True)

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")


def run(model_dir: Path, meta: Path, out: Path, a, workers: int) -> dict:
    from interleaf.train.config import build_config, parse_override
    from interleaf.train.trainer import Trainer

    values = {
        "model_path": str(model_dir), "meta_path": str(meta), "output_dir": str(out),
        "max_steps": a.steps + a.warmup + a.sync_debug + a.profile, "lr": 1e-5, "packing": True, "device": a.device,
        "max_packed_tokens": a.pack_tokens, "max_seq_length": min(a.pack_tokens, 8192),
        "num_workers": workers, "compile": a.compile, "log_steps": 10**9,
    }  # fmt: skip
    values.update(parse_override(o) for o in a.set)
    trainer = Trainer(build_config(values), log=None).setup()
    # FLOPs are counted from the rows each step used: batches are drawn in the order they are trained
    # on (the trainer reads the next step's first one ahead), so a step uses the oldest grad_accum
    produced: deque = deque()
    next_batch = trainer.batcher.next_batch
    trainer.batcher.next_batch = lambda: produced.append(next_batch()) or produced[-1]
    times, tokens, flops, gc_ms = [], [], [], []
    pauses: list[float] = []  # the garbage collector's pauses (ms) in the current step

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            on_gc.t0 = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - on_gc.t0) * 1e3)

    gc.callbacks.append(on_gc)
    prof = None
    try:
        for k in range(a.steps + a.warmup + a.sync_debug + a.profile):
            # after the timed steps: one that reports its host syncs, then the profiled ones
            debug = a.sync_debug and k == a.steps + a.warmup
            if debug:
                report_syncs()
            if k == a.steps + a.warmup + a.sync_debug and a.profile:
                prof = torch.profiler.profile()
                prof.start()
            pauses.clear()
            t0 = time.perf_counter()
            stats = trainer.train_step()  # ends with a host sync (the loss value)
            if debug:
                torch.cuda.set_sync_debug_mode(0)
            used = [produced.popleft() for _ in range(trainer.cfg.grad_accum)]
            assert sum(smp.num_tokens for b in used for row in b for smp in row) == stats["tokens"]
            if a.warmup <= k < a.warmup + a.steps:
                times.append(time.perf_counter() - t0)
                gc_ms.append(sum(pauses))
                tokens.append(stats["tokens"])
                flops.append(step_flops(trainer.raw_model, [r for batch in used for r in batch]))
    finally:
        gc.callbacks.remove(on_gc)
        if prof is not None:
            prof.stop()
        trainer.close()
    if prof is not None:  # host-side hot spots: what keeps the GPU waiting between steps
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"  workers={workers} step ms:", " ".join(f"{t * 1e3:.0f}" for t in times), flush=True)
    print("  of which garbage collection:", " ".join(f"{t:.0f}" for t in gc_ms), flush=True)
    med = statistics.median(times)
    return {
        "workers": workers,
        "tokens_per_s": sum(tokens) / sum(times),
        "median_step_s": med,
        "step_s": times,
        "gc_ms": gc_ms,
        "tokens_per_step": sum(tokens) / len(tokens),
        "mfu": statistics.mean(flops) / med / (a.peak_tflops * 1e12) if a.device == "cuda" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pack-tokens", type=int, default=16384)
    p.add_argument("--workers", default="0,8", help="comma-separated num_workers values to compare")
    p.add_argument("--compile", action="store_true", help="compile: true (per-layer torch.compile)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more trainer config")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak bf16 dense TFLOP/s")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps (host ops)")
    p.add_argument("--sync-debug", action="store_true", help="one more step that prints its host syncs")
    p.add_argument("--json", help="write results here")
    a = p.parse_args()
    if a.sync_debug and a.device != "cuda":
        p.error("--sync-debug reports CUDA host syncs: it needs --device cuda")
    from interleaf.model import init_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = init_model(a.preset, tmp / "model", dtype="bfloat16")
        meta = build_data(tmp / "data", 448)
        results = [run(model_dir, meta, tmp / f"run{w}", a, int(w)) for w in a.workers.split(",")]
    base = results[0]["tokens_per_s"]
    for r in results:
        print(
            f"{a.preset} {a.device} compile={a.compile} num_workers={r['workers']}: "
            f"{r['tokens_per_s']:,.0f} tok/s ({r['median_step_s'] * 1e3:.0f} ms/step, "
            f"{r['tokens_per_step']:,.0f} tokens/step), {r['tokens_per_s'] / base:.2f}x"
            + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""),
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
