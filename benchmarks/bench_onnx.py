"""CPU generation on an ONNX export (``interleaf export-onnx``, ONNX Runtime, fp32) against interleaf's
PyTorch engine on the checkpoint it came from (fp32, and bf16: the engine's fast CPU dtype).

Same random-weight checkpoint (``bench_generation.py``'s, written once to a temp dir), same prompt (system
message + one 448 px tile + a question), same input ids and pixel values, greedy, exactly ``--new-tokens``
tokens per row (``ignore_eos``). TTFT and decode tok/s measured as ``bench_generation.py`` does (medians
of ``--repeats`` after a warm-up). The fp32 engine and ONNX Runtime must pick the same greedy tokens.

    .venv/bin/python benchmarks/bench_onnx.py --threads 2                # internvl2-1b shape, B = 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_generation import StepClock, checkpoint, device_name, measure


def export(path: Path) -> Path:
    from interleaf.generation.onnx import export_onnx, is_onnx_export

    out = path.with_name(path.name + "-onnx")
    if not is_onnx_export(out):
        t = time.perf_counter()
        print(f"# exporting {path.name} to {out} ...", file=sys.stderr, flush=True)
        export_onnx(path, out)
        print(f"# done in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return out


def bench(preset: str, args, root: Path) -> list[dict]:
    from interleaf.generation.chat import ChatModel

    path = checkpoint(preset, root)
    onnx_dir = export(path)
    engines = {
        "interleaf bf16": ChatModel.from_pretrained(path, dtype="bfloat16"),
        "interleaf fp32": ChatModel.from_pretrained(path, dtype="float32"),
        "onnxruntime fp32": ChatModel.from_pretrained(onnx_dir),
    }
    first = engines["interleaf fp32"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    question = "Describe this image in detail, including every object you can see."
    _, ids, px, _ = first.prepare(question, images=image, max_num=1)
    rows = []
    for batch in args.batch_sizes:
        input_ids = torch.tensor([ids] * batch)
        mask = torch.ones_like(input_ids)
        pixels = px.repeat(batch, 1, 1, 1)
        tokens = {}
        for name, chat in engines.items():

            def run(n, clock, chat=chat, ids=input_ids, mask=mask, pixels=pixels):
                return chat.generator.generate(
                    ids, mask, pixel_values=pixels, max_new_tokens=n, ignore_eos=True, callback=clock
                )

            row = {"preset": preset, "batch": batch, "engine": name, "prompt_tokens": len(ids)}
            row.update(measure(run, "cpu", args.new_tokens, batch, args.repeats, hf=False))
            tokens[name] = run(8, StepClock("cpu", False)).tokens
            rows.append(row)
        base = next(r for r in rows if r["batch"] == batch and r["engine"] == "interleaf bf16")
        same = tokens["onnxruntime fp32"] == tokens["interleaf fp32"]
        for r in rows:
            if r["batch"] == batch:
                r["decode_vs_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]
                r["ttft_vs_bf16"] = base["ttft_s"] / r["ttft_s"]
                print(
                    f"{preset:<14}{batch:>3} {r['engine']:<18} TTFT {r['ttft_s'] * 1e3:>7.0f} ms "
                    f"({r['ttft_vs_bf16']:.2f}x)  decode {r['decode_tok_s']:>7.1f} tok/s "
                    f"({r['decode_vs_bf16']:.2f}x)",
                    flush=True,
                )
        print(f"# B={batch}: onnxruntime and the fp32 engine pick the same greedy tokens: {same}", flush=True)
        for r in rows:
            if r["batch"] == batch:
                r["same_greedy_tokens_as_fp32"] = same
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="internvl2-1b", help="comma-separated preset names")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime)")
    p.add_argument("--ckpt-root", default=None, help="where to write checkpoints (default: a fixed temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    root = Path(args.ckpt_root or Path(tempfile.gettempdir()) / "interleaf-bench")
    root.mkdir(parents=True, exist_ok=True)
    print(f"# {device_name('cpu')}, torch {torch.__version__}", flush=True)
    rows = [r for preset in args.presets.split(",") for r in bench(preset, args, root)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
