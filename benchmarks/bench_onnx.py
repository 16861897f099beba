"""CPU generation on ONNX exports (``interleaf export-onnx``, run by ONNX Runtime: fp32, and the decoder
weight-only int4 / int8) against interleaf's PyTorch engine on the checkpoint they came from (fp32, and
bf16: the engine's fast CPU dtype).

Same random-weight checkpoint (``bench_generation.py``'s, written once to a temp dir), same prompt (system
message + one 448 px tile + a question), same input ids and pixel values, greedy, exactly ``--new-tokens``
tokens per row (``ignore_eos``). TTFT and decode tok/s measured as ``bench_generation.py`` does (medians
of ``--repeats`` after a warm-up), one engine in memory at a time. Also printed: how many of the first 16
greedy tokens equal the fp32 engine's (fp32 ONNX must give all 16; on random weights, where the logits
are nearly flat, a quantized model soon picks another token).

    .venv/bin/python benchmarks/bench_onnx.py --threads 2                # internvl2-1b shape, B = 1
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_generation import StepClock, checkpoint, device_name, measure


def export(path: Path, quantize: str | None = None) -> Path:
    from interleaf.generation.onnx import export_onnx, is_onnx_export

    out = path.with_name(f"{path.name}-onnx{'-' + quantize if quantize else ''}")
    if not is_onnx_export(out):
        t = time.perf_counter()
        print(f"# exporting {path.name} to {out} ...", file=sys.stderr, flush=True)
        export_onnx(path, out, quantize=quantize)
        print(f"# done in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return out


def bench(preset: str, args, root: Path) -> list[dict]:
    from interleaf.generation.chat import ChatModel

    path = checkpoint(preset, root)
    engines = {  # one at a time in memory, so that none is measured beside another's weights
        "interleaf bf16": lambda: ChatModel.from_pretrained(path, dtype="bfloat16"),
        "interleaf fp32": lambda: ChatModel.from_pretrained(path, dtype="float32"),
        "onnxruntime fp32": lambda: ChatModel.from_pretrained(export(path)),
    }
    for q in args.quantize:
        engines[f"onnxruntime {q}"] = lambda q=q: ChatModel.from_pretrained(export(path, q))
    for q in [None, *args.quantize]:  # exports first: their time stays out of the measured runs
        export(path, q)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    question = "Describe this image in detail, including every object you can see."
    rows = []
    for batch in args.batch_sizes:
        tokens = {}
        for name, build in engines.items():
            chat = build()
            _, ids, px, _ = chat.prepare(question, images=image, max_num=1)
            input_ids = torch.tensor([ids] * batch)
            mask = torch.ones_like(input_ids)
            pixels = px.repeat(batch, 1, 1, 1)

            def run(n, clock, chat=chat, ids=input_ids, mask=mask, pixels=pixels):
                return chat.generator.generate(
                    ids, mask, pixel_values=pixels, max_new_tokens=n, ignore_eos=True, callback=clock
                )

            row = {"preset": preset, "batch": batch, "engine": name, "prompt_tokens": len(ids)}
            row.update(measure(run, "cpu", args.new_tokens, batch, args.repeats, hf=False))
            tokens[name] = run(16, StepClock("cpu", False)).tokens
            rows.append(row)
            del chat, run
            gc.collect()
        base = next(r for r in rows if r["batch"] == batch and r["engine"] == "interleaf bf16")
        ref = tokens["interleaf fp32"]
        for r in rows:
            if r["batch"] != batch:
                continue
            r["decode_vs_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["ttft_vs_bf16"] = base["ttft_s"] / r["ttft_s"]
            got = tokens[r["engine"]]
            r["greedy_tokens_as_fp32"] = sum(
                next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(got, ref)
            ) / len(ref)  # tokens before the first difference, mean over rows
            print(
                f"{preset:<14}{batch:>3} {r['engine']:<18} TTFT {r['ttft_s'] * 1e3:>7.0f} ms "
                f"({r['ttft_vs_bf16']:.2f}x)  decode {r['decode_tok_s']:>7.1f} tok/s "
                f"({r['decode_vs_bf16']:.2f}x)  same first tokens as fp32: {r['greedy_tokens_as_fp32']:.0f}/16",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="internvl2-1b", help="comma-separated preset names")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime)")
    p.add_argument(
        "--quantize", default="int4,int8", help="quantized exports to add (default int4,int8; '' none)"
    )
    p.add_argument("--ckpt-root", default=None, help="where to write checkpoints (default: a fixed temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.quantize = [q for q in args.quantize.split(",") if q]
    root = Path(args.ckpt_root or Path(tempfile.gettempdir()) / "interleaf-bench")
    root.mkdir(parents=True, exist_ok=True)
    print(f"# {device_name('cpu')}, torch {torch.__version__}", flush=True)
    rows = [r for preset in args.presets.split(",") for r in bench(preset, args, root)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
