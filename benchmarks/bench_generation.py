"""Generation speed: interleaf's engine vs transformers' ``InternVLForConditionalGeneration.generate``.

Same random-weight checkpoint (written once to a temp dir, ``-hf`` layout so both load it), same prompt
(system message + one 448 px image tile + a question), same input ids and pixel values. Random weights
never stop on their own, so both generate exactly ``--new-tokens`` tokens (interleaf: ``ignore_eos``;
transformers: ``min_new_tokens = max_new_tokens``), greedy.

Measured the same way for both, per batch size (the prompt repeated B times, one image per row):

* TTFT: wall time of a generate call with ``max_new_tokens=1`` (ViT + prefill + first token);
* decode tok/s: ``B * (N - 1) / (T_N - TTFT)`` with ``T_N`` the wall time of an N-token call.

Medians over ``--repeats`` runs after a warm-up; printed as a table with ratios (interleaf / transformers
for tok/s, transformers / interleaf for TTFT: > 1 means interleaf is better on both).

    .venv/bin/python benchmarks/bench_generation.py                          # CPU, tiny + 1B shape
    .venv/bin/python benchmarks/bench_generation.py --device cuda --quick    # GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from machine import cpu_name

DEFAULT_PRESETS = ("tiny", "internvl2-1b")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def checkpoint(preset: str, root: Path) -> Path:
    """Write the preset's random-weight checkpoint once (``-hf`` layout, loadable by both)."""
    from interleaf.model import init_model

    path = root / f"{preset}-hf"
    if not (path / "config.json").is_file():
        t = time.perf_counter()
        print(f"# writing {preset} checkpoint to {path} ...", file=sys.stderr, flush=True)
        init_model(preset, path, layout="hf", seed=0)
        print(f"# done in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepClock:
    """Records the wall time of every generated step (a transformers streamer and an interleaf callback)."""

    def __init__(self, device: str, skip_first_put: bool) -> None:
        self.device, self.skip, self.times = device, skip_first_put, []

    def put(self, _tokens) -> None:  # transformers calls put(prompt) first, then put(tokens) per step
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())

    __call__ = put

    def end(self) -> None:
        pass


def measure(run, device: str, new_tokens: int, batch: int, repeats: int, hf: bool) -> dict:
    """``run(n, clock)`` generates n tokens per row, reporting each step to ``clock``.

    TTFT = first step time - start; decode tok/s = B * (N - 1) / (end - first step time). Medians.
    """
    # warm-up: lazy inits, allocator; on CUDA the same length, so the graph for its cache bucket is captured
    warm = new_tokens if device.startswith("cuda") else min(new_tokens, 3)
    run(warm, StepClock(device, hf))
    ttft, decode, total = [], [], []
    for _ in range(repeats):
        clock = StepClock(device, hf)
        sync(device)
        t0 = time.perf_counter()
        run(new_tokens, clock)
        sync(device)
        t1 = time.perf_counter()
        if len(clock.times) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} steps, saw {len(clock.times)}")
        ttft.append(clock.times[0] - t0)
        decode.append(batch * (new_tokens - 1) / (t1 - clock.times[0]))
        total.append(t1 - t0)
    med = statistics.median
    return {"ttft_s": med(ttft), "decode_tok_s": med(decode), "total_s": med(total)}


def bench_preset(preset: str, args, root: Path) -> list[dict]:
    from transformers import InternVLForConditionalGeneration

    from interleaf.generation.chat import ChatModel
    from interleaf.model.checkpoint import parse_dtype

    path = checkpoint(preset, root)
    dtype = parse_dtype(args.dtype)
    hf_dtype = parse_dtype(args.hf_dtype)
    chat = ChatModel.from_pretrained(path, device=args.device, dtype=dtype)
    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=hf_dtype).to(args.device).eval()
    pad = chat.pad_token_id

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    question = "Describe this image in detail, including every object you can see."
    _, ids, px, _ = chat.prepare(question, images=image if args.image else None, max_num=1)
    rows = []
    for batch in args.batch_sizes:
        input_ids = torch.tensor([ids] * batch, device=args.device)
        mask = torch.ones_like(input_ids)
        pixels = None if px is None else px.repeat(batch, 1, 1, 1).to(args.device)

        def ours(n, clock, input_ids=input_ids, mask=mask, pixels=pixels):
            chat.generator.generate(
                input_ids, mask, pixel_values=pixels, max_new_tokens=n, ignore_eos=True, callback=clock
            )

        def theirs(n, clock, input_ids=input_ids, mask=mask, pixels=pixels):
            with torch.inference_mode():
                return hf.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    pixel_values=None if pixels is None else pixels.to(hf_dtype),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                    streamer=clock,
                )

        row = {"preset": preset, "batch": batch, "prompt_tokens": len(ids), "new_tokens": args.new_tokens}
        row["interleaf"] = measure(ours, args.device, args.new_tokens, batch, args.repeats, hf=False)
        row["transformers"] = measure(theirs, args.device, args.new_tokens, batch, args.repeats, hf=True)
        if dtype == hf_dtype == torch.float32:  # same maths: the greedy tokens must agree
            a = chat.generator.generate(
                input_ids, mask, pixel_values=pixels, max_new_tokens=8, ignore_eos=True
            )
            b = theirs(8, StepClock(args.device, True))[:, len(ids) :].tolist()
            row["same_greedy_tokens"] = a.tokens == b
        row["decode_ratio"] = row["interleaf"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["ttft_ratio"] = row["transformers"]["ttft_s"] / row["interleaf"]["ttft_s"]
        rows.append(row)
        print_row(row)
    return rows


HEADER = (
    f"{'preset':<14}{'B':>3}{'prompt':>7}{'new':>5} | {'TTFT ours':>10}{'TTFT hf':>10}{'ratio':>7} | "
    f"{'tok/s ours':>11}{'tok/s hf':>10}{'ratio':>7}"
)


def print_row(r: dict) -> None:
    o, h = r["interleaf"], r["transformers"]
    print(
        f"{r['preset']:<14}{r['batch']:>3}{r['prompt_tokens']:>7}{r['new_tokens']:>5} | "
        f"{o['ttft_s'] * 1e3:>8.0f}ms{h['ttft_s'] * 1e3:>8.0f}ms{r['ttft_ratio']:>6.2f}x | "
        f"{o['decode_tok_s']:>11.1f}{h['decode_tok_s']:>10.1f}{r['decode_ratio']:>6.2f}x",
        "" if "same_greedy_tokens" not in r else f"  same tokens: {r['same_greedy_tokens']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="interleaf dtype (default: bfloat16)")
    p.add_argument(
        "--hf-dtype", default=None, help="transformers dtype (default: float32 on CPU, --dtype on GPU)"
    )
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset names")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 64, --quick 32)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs per measurement (default 3, --quick 1)"
    )
    p.add_argument("--no-image", dest="image", action="store_false", help="text-only prompt")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument("--ckpt-root", default=None, help="where to write checkpoints (default: a fixed temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or "bfloat16"
    if args.hf_dtype is None:
        args.hf_dtype = "float32" if args.device == "cpu" else args.dtype
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.ckpt_root or os.path.join(tempfile.gettempdir(), "interleaf-bench"))
    root.mkdir(parents=True, exist_ok=True)

    print(f"# interleaf generation benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {device_name(args.device)}")
    print(f"# torch {torch.__version__}, interleaf dtype {args.dtype}, transformers dtype {args.hf_dtype}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}, image={'1 tile' if args.image else 'none'}")  # fmt: skip
    print(HEADER)
    rows = []
    for preset in args.presets.split(","):
        rows += bench_preset(preset.strip(), args, root)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device_name(args.device), "args": vars(args), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
