"""Evaluation throughput: batched interleaf inference vs the one-sample-at-a-time loop.

VLMEvalKit and lmms-eval answer InternVL one sample at a time (``model.generate`` / ``chat`` per
sample, batch size 1). This script runs, in one process on the same model, dtype, threads and mini
MMIU questions (official prompts, multi-image, the harness's per-question tile budgets and its
default ``max_new_tokens``, 64 for MMIU):

- ``loop``: ``ChatModel.chat`` per sample (the peer's loop, as a user would call it);
- ``batched``: the harness's ``InterleafAdapter.generate`` with ``--batch-size`` (default 8) over
  length-sorted batches: ``ChatModel.generate_batch`` (CPU: one ViT pass over the batch's tiles,
  each prompt prefilled alone into its row of a shared cache, batched decode), the next batch loaded
  and tiled in a worker thread where a core is free for it (beside a GPU, or on CPU when torch's
  threads leave a core over);
- ``batched_sync`` / ``batched_prefetch``: the same with the worker thread forced off / on;
- ``padded`` (CPU) / ``rows`` (GPU): the same batches with the other prefill (left-padded, the
  GPU default / row by row into a shared cache, the CPU default);
- ``hf_loop``: transformers' ``InternVLForConditionalGeneration`` one sample at a time.

It checks that the answers agree (greedy), prints samples/s (median of repeats) and the ratios, and
a per-stage breakdown (ms per sample; one extra untimed pass of ``loop`` and ``batched_sync`` with
timers around input preparation, ViT, LLM prefill and decode steps). Default model: the tiny
random-weight preset made offline (it never emits the stop token, so every answer is 64 tokens).

    .venv/bin/python benchmarks/bench_eval.py --threads 1        # CPU, tiny model
    .venv/bin/python benchmarks/bench_eval.py --device cuda --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def stage_breakdown(chat, fn, n: int) -> dict[str, float]:
    """Run ``fn`` once with timers around the pipeline stages; ms per sample for each stage.

    Input preparation is timed as wall clock around ``prepare_batch`` (batched) or ``prepare``
    (loop); the image part inside it is summed over ``prepare_batch``'s worker threads, so it is
    reported as "of which" and left out of the sum. On a GPU the model stages synchronise, so each
    gets its kernels' time, and the decode steps run eagerly (a synchronising timer cannot sit inside
    a CUDA graph's capture)."""
    import torch

    import interleaf.generation.chat as chat_mod

    model, lm = chat.model, chat.model.language_model
    sync = torch.cuda.synchronize if chat.device.type == "cuda" else (lambda: None)
    acc: dict[str, float] = {}

    def timed(f, name, synced=False):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                out = f(*a, **k)
                if synced:
                    sync()
                return out
            finally:
                key = name(a, k) if callable(name) else name
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t

        return g

    def llm_stage(a, k):
        x = k.get("inputs_embeds")
        return "LLM prefill" if x is not None and x.shape[1] > 1 else "LLM decode steps"

    saved = (chat_mod.preprocess_images, chat.prepare, chat.prepare_batch, model.extract_feature, lm.forward)
    chat_mod.preprocess_images = timed(saved[0], "_images")
    chat.prepare = timed(saved[1], "_prepare")
    chat.prepare_batch = timed(saved[2], "_prepare_batch")
    model.extract_feature = timed(saved[3], "ViT + projector", synced=True)
    lm.forward = timed(saved[4], llm_stage, synced=True)
    graphs, chat.generator.cuda_graphs = chat.generator.cuda_graphs, False
    try:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    finally:
        chat_mod.preprocess_images = saved[0]
        del chat.prepare, chat.prepare_batch, model.extract_feature, lm.forward
        chat.generator.cuda_graphs = graphs
    images, prepare = acc.pop("_images", 0.0), acc.pop("_prepare", 0.0)
    acc["prepare inputs: load, tile, tokenise (wall)"] = acc.pop("_prepare_batch", prepare)
    acc["other (Python, sampling, detokenise)"] = total - sum(acc.values())
    acc["total"] = total
    acc["  of which image load+tile+normalise (thread time)"] = images
    return {k: 1000 * v / n for k, v in acc.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a fresh tiny preset)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--per-task", type=int, default=4, help="mini MMIU questions per task (6 tasks)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the harness's MMIU default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="fewer questions and repeats")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers per-sample loop row")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.per_task, args.repeats = 2, 2

    import torch

    import interleaf
    from interleaf.eval.adapters import HFAdapter, InterleafAdapter
    from interleaf.eval.mini import make_mini_mmiu
    from interleaf.eval.runner import MMIU_MAX_NEW_TOKENS, mmiu_items
    from interleaf.model import init_model, load_checkpoint, save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    max_new = args.max_new_tokens or MMIU_MAX_NEW_TOKENS
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    ckpt = args.model or str(init_model("tiny", tmp / "tiny", layout="internvl_chat", seed=0))
    data = make_mini_mmiu(tmp / "mmiu", per_task=args.per_task, seed=0)
    items = mmiu_items(str(data), None, max_new, None)
    # the runner's order: length-sorted, so a batch holds prompts of similar length
    requests = sorted((it.request for it in items), key=lambda r: (len(r.prompt), len(r.images)))
    chat = interleaf.load(ckpt, device=args.device)
    adapter = InterleafAdapter(ckpt, device=args.device, chat_model=chat)
    n = len(requests)

    def loop() -> list[str]:
        return [adapter._one(r) for r in requests]

    def batched() -> list[str]:
        out = dict(adapter.generate(requests, batch_size=args.batch_size))
        bad = [v for v in out.values() if isinstance(v, Exception)]
        if bad:
            raise bad[0]
        return [out[i] for i in range(n)]

    def variant(**attrs):
        def run() -> list[str]:
            saved = {k: getattr(adapter, k) for k in attrs}
            for k, v in attrs.items():
                setattr(adapter, k, v)
            try:
                return batched()
            finally:
                for k, v in saved.items():
                    setattr(adapter, k, v)

        return run

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    runs = [("loop", loop), ("batched", batched), ("batched_sync", variant(prefetch=False)),
            ("batched_prefetch", variant(prefetch=True))]  # fmt: skip
    if args.device == "cpu":  # the other prefill for comparison
        runs.append(("padded", variant(prefill="padded")))
    else:
        runs.append(("rows", variant(prefill="rows")))
    if not args.no_hf:  # lmms-eval's internvl_hf style: transformers' model, batch size 1
        model, tok = load_checkpoint(ckpt)
        hf = HFAdapter(str(save_checkpoint(model, tok, tmp / "hf", layout="hf")), device=args.device)
        del model
        hf._one(requests[0])
        runs.append(("hf_loop", lambda: [hf._one(r) for r in requests]))
    adapter._one(requests[0])  # warm-up (allocations, kernels)
    list(adapter.generate(requests[:2], batch_size=2))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, fn in runs:
            sync()
            t0 = time.perf_counter()
            answers[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    images = sum(len(r.images) for r in requests)
    tiles = sum(px.shape[0] for _, px in chat.prepare_batch(
        [r.prompt for r in requests], [r.images for r in requests], [r.max_num for r in requests]))  # fmt: skip
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")  # fmt: skip
    print(f"mini MMIU: {n} questions, {images} images, {tiles} tiles ({tiles / n:.1f}/question), "
          f"max_new_tokens {max_new}" + (" (harness default)" if args.max_new_tokens is None else ""))  # fmt: skip
    labels = {
        "loop": "one-sample loop, ChatModel.chat (VLMEvalKit style)",
        "batched": f"interleaf batched (bs={args.batch_size}; prefetch thread {'on' if adapter._use_prefetch() else 'off'})",
        "batched_sync": f"interleaf batched, no prefetch thread (bs={args.batch_size})",
        "batched_prefetch": f"interleaf batched, prefetch thread (bs={args.batch_size})",
        "padded": f"left-padded prefill batch (bs={args.batch_size})",
        "rows": f"row-by-row prefill, batched decode (bs={args.batch_size})",
        "hf_loop": "one-sample loop, transformers InternVL (lmms-eval hf)",
    }
    for k in times:
        secs = ", ".join(f"{t:.2f}" for t in times[k])
        same = sum(a == b for a, b in zip(answers[k], answers["loop"]))
        print(f"{labels[k]:70s} {rate[k]:7.2f} samples/s  {rate[k] / rate['loop']:5.2f}x loop  "
              f"identical {same}/{n}  (runs s: {secs})")  # fmt: skip
    print(f"speedup batched / loop: {rate['batched'] / rate['loop']:.2f}x (target >= 3x at batch 8 on CPU)")
    if "hf_loop" in rate:
        print(f"speedup batched / transformers loop: {rate['batched'] / rate['hf_loop']:.2f}x")

    # where the time goes (one more pass each, with timers; the sync variant so stages add up)
    prof = {
        "loop": stage_breakdown(chat, loop, n),
        "batched_sync": stage_breakdown(chat, variant(prefetch=False), n),
    }
    print("\nper-stage ms / sample" + " " * 30 + "".join(f"{k:>14s}" for k in prof))
    for stage in prof["loop"]:
        print(f"{stage:52s}" + "".join(f"{prof[k].get(stage, 0.0):14.1f}" for k in prof))
    ok = all(answers[k] == answers["loop"] for k in answers)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "samples_per_s": rate, "stage_ms_per_sample": prof}, indent=2)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
