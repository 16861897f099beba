"""``interleaf init-model`` and ``interleaf info`` (heavy imports stay inside the handlers)."""

from __future__ import annotations

import argparse

# the names of presets.PRESETS and mono_checkpoint.MONO_PRESETS, spelt out so that building the parser
# imports no torch (a test keeps them equal)
PRESET_NAMES = ("tiny", "tiny-internlm2", "tiny-phi3", "tiny-llama", "tiny-qwen3", "internvl2-1b",
                "internvl2-2b", "internvl2-4b", "internvl2_5-1b", "internvl2_5-4b", "internvl3_5-1b",
                "tiny-mono", "mono-internvl-2b")  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "init-model",
        help="write a random-weight checkpoint of a preset (offline tokenizer)",
        description="Write a random-weight InternVL checkpoint with a tokenizer made offline.",
    )
    p.add_argument("--preset", required=True, choices=PRESET_NAMES, help="model shape")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--layout", default="internvl_chat", choices=("internvl_chat", "hf"), help="checkpoint layout"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weight dtype (default: float32 for tiny presets, bfloat16 otherwise)")  # fmt: skip
    p.set_defaults(func=_init_model)

    p = subparsers.add_parser("info", help="show a checkpoint's architecture and parameter counts")
    p.add_argument("model_dir", help="checkpoint directory (either layout), or an ONNX export of one")
    p.set_defaults(func=_info)


def _init_model(args: argparse.Namespace) -> int:
    from interleaf.model.presets import init_model

    out = init_model(args.preset, args.out, layout=args.layout, seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.preset} checkpoint ({args.layout} layout) to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from interleaf.generation.onnx import export_summary, is_onnx_export
    from interleaf.model.checkpoint import describe

    weights = export_summary(args.model_dir) if is_onnx_export(args.model_dir) else None
    print(describe(args.model_dir, weights))
    return 0
