"""``interleaf chat``: answer one prompt about images or a video, streaming the reply to stdout;
``interleaf export-onnx``: write a checkpoint as ONNX graphs that ``interleaf chat`` runs too.

Kept cheap to import: torch and the model are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="answer a prompt about images or a video with a checkpoint",
        description="Load a checkpoint (either layout) and stream its reply to PROMPT to stdout.",
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="checkpoint directory, or an ONNX export of one (export-onnx)"
    )
    p.add_argument("prompt", metavar="PROMPT", help="the question (<image> placeholders optional)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    p.add_argument("--video", metavar="PATH", help="a video file (uniformly sampled frames)")
    p.add_argument("--num-segments", type=int, default=8, help="video frames to sample (default 8)")
    p.add_argument("--max-num", type=int, default=None, help="tile budget (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument(
        "--system-message", default=None, metavar="TEXT",
        help="replaces the checkpoint's system message (e.g. a reasoning prompt for thinking mode)",
    )  # fmt: skip
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=50, help="default 50, as transformers' generate; 0: off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: as stored"
    )
    p.set_defaults(func=_chat)

    e = subparsers.add_parser(
        "export-onnx",
        help="export a checkpoint as ONNX graphs (vision encoder, embeddings, decoder with KV cache)",
        description="Export an InternVL or Mono-InternVL checkpoint (either layout) to ONNX, fp32: "
        "vision_encoder.onnx, embed_tokens.onnx and decoder_model.onnx (past keys/values in, present "
        "out), with the config and tokenizer. 'interleaf chat OUT' runs the export with ONNX Runtime.",
    )
    e.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory")
    e.add_argument("out", metavar="OUT", help="output directory")
    e.add_argument(
        "--no-check", action="store_true",
        help="skip running each graph once in ONNX Runtime against the PyTorch model",
    )  # fmt: skip
    e.add_argument(
        "--quantize", choices=("int4", "int8"), default=None,
        help="the decoder's linear layers as weight-only int4/int8 (ONNX Runtime's MatMulNBits, symmetric, "
        "blocks of 32); default: fp32",
    )  # fmt: skip
    e.add_argument(
        "--accuracy-level", type=int, choices=range(5), default=4, metavar="0-4",
        help="ONNX Runtime's compute type for quantized layers: 4 int8 (default, fast on CPU), 0 fp32",
    )  # fmt: skip
    e.set_defaults(func=_export_onnx)


def _chat(args: argparse.Namespace) -> int:
    from interleaf.errors import InputError
    from interleaf.generation.chat import ChatModel

    if args.image and args.video:
        raise InputError("give --image or --video, not both")
    if args.max_num is not None and args.max_num < 1:
        raise InputError(f"--max-num must be >= 1 (tiles per prompt), got {args.max_num}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    chat = ChatModel.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype)
    pieces = chat.stream_chat(
        args.prompt,
        images=args.image or None,
        video=args.video,
        max_num=args.max_num,
        num_segments=args.num_segments,
        system_message=args.system_message,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from interleaf.generation.onnx import export_onnx

    manifest = export_onnx(
        args.model_dir, args.out, check=not args.no_check, quantize=args.quantize,
        accuracy_level=args.accuracy_level,
    )  # fmt: skip
    out = Path(args.out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
    quant = manifest.get("quantization")
    how = f", decoder int{quant['bits']} weight-only" if quant else ""
    graphs = ", ".join(manifest["graphs"].values())
    print(f"{out}: {manifest['model']} as ONNX ({graphs}{how}), {size / 2**20:.1f} MiB")
    for graph, diff in manifest.get("check", {}).items():
        print(f"  max |onnxruntime - torch| {graph}: {diff:.2e}")
    return 0
