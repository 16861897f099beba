"""Evaluation throughput: batched interleaf inference vs the one-sample-at-a-time loop.

VLMEvalKit and lmms-eval answer InternVL one sample at a time (``model.generate`` / ``chat`` per
sample, batch size 1). This script runs, in one process on the same model and the same mini MMIU
questions (official prompts, multi-image, tile budget as the harness uses):

- ``loop``: ``ChatModel.chat`` per sample (the peer's loop);
- ``batched``: the harness's ``InterleafAdapter.generate`` with ``--batch-size`` (default 8) over
  length-sorted batches (on CPU: each prompt prefilled alone, decode batched);
- ``padded`` (CPU only): the same batches through the engine's left-padded prefill (the GPU path);
- ``hf_loop``: transformers' ``InternVLForConditionalGeneration`` one sample at a time.

It checks that the answers agree (greedy) and prints samples/s (median of repeats) and the ratios.
Default model: the tiny random-weight preset made offline.

    .venv/bin/python benchmarks/bench_eval.py                    # CPU, tiny model
    .venv/bin/python benchmarks/bench_eval.py --device cuda --quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a fresh tiny preset)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--per-task", type=int, default=4, help="mini MMIU questions per task (6 tasks)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="fewer questions and repeats")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers per-sample loop row")
    args = ap.parse_args()
    if args.quick:
        args.per_task, args.repeats = 2, 2

    import torch

    import interleaf
    from interleaf.eval.adapters import HFAdapter, InterleafAdapter
    from interleaf.eval.mini import make_mini_mmiu
    from interleaf.eval.runner import mmiu_items
    from interleaf.model import init_model, load_checkpoint, save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    ckpt = args.model or str(init_model("tiny", tmp / "tiny", layout="internvl_chat", seed=0))
    data = make_mini_mmiu(tmp / "mmiu", per_task=args.per_task, seed=0)
    items = mmiu_items(str(data), None, args.max_new_tokens, None)
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

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def padded() -> list[str]:  # the engine's left-padded batch (the GPU path), for comparison
        adapter.rowwise_prefill_on_cpu = False
        try:
            return batched()
        finally:
            adapter.rowwise_prefill_on_cpu = True

    runs = [("loop", loop), ("batched", batched)]
    if args.device == "cpu":
        runs.append(("padded", padded))
    if not args.no_hf:  # lmms-eval's internvl_hf style: transformers' model, batch size 1
        model, tok = load_checkpoint(ckpt)
        hf = HFAdapter(str(save_checkpoint(model, tok, tmp / "hf", layout="hf")), device=args.device)
        del model
        hf._one(requests[0])
        runs.append(("hf_loop", lambda: [hf._one(r) for r in requests]))
    adapter._one(requests[0])  # warm-up (allocations, kernels)
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, fn in runs:
            sync()
            t0 = time.perf_counter()
            answers[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(answers["loop"], answers["batched"]))
    images = sum(len(r.images) for r in requests)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")  # fmt: skip
    print(
        f"mini MMIU: {n} questions, {images} images ({images / n:.1f}/question), max_new_tokens {args.max_new_tokens}"
    )
    labels = {
        "loop": "one-sample loop, ChatModel.chat (VLMEvalKit style)",
        "batched": f"interleaf batched (bs={args.batch_size})",
        "hf_loop": "one-sample loop, transformers InternVL (lmms-eval hf)",
        "padded": f"engine left-padded batch (bs={args.batch_size})",
    }
    for k in times:
        secs = ", ".join(f"{t:.2f}" for t in times[k])
        print(f"{labels[k]:54s} {rate[k]:8.2f} samples/s  (runs s: {secs})")
    print(f"speedup batched / loop: {rate['batched'] / rate['loop']:.2f}x; identical answers: {same}/{n}")
    if "hf_loop" in rate:
        same_hf = sum(a == b for a, b in zip(answers["hf_loop"], answers["batched"]))
        print(
            f"speedup batched / transformers loop: {rate['batched'] / rate['hf_loop']:.2f}x; identical: {same_hf}/{n}"
        )
    return 0 if same == n else 1


if __name__ == "__main__":
    sys.exit(main())
