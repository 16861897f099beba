"""``interleaf serve``: an OpenAI-compatible chat server for a checkpoint.

Kept cheap to import: torch and the model are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve MODEL_DIR at http://HOST:PORT/v1 (chat completions, streaming, models, "
        "health, metrics), batching concurrent requests. Stop with Ctrl-C.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (either layout)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the directory's name)"
    )
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together (default 8)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=50.0,
        help="longest wait for requests still being prepared to join a batch (default 50)",
    )  # fmt: skip
    p.add_argument(
        "--max-tokens", type=int, default=512, help="reply length when a request sets none (default 512)"
    )
    p.add_argument(
        "--max-num", type=int, default=None, help="tile budget per request (default: the checkpoint's)"
    )
    p.add_argument("--allowed-local-media-path", metavar="DIR", default=None,
                   help="let requests name image files under DIR (refused otherwise)")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--reasoning-parser", default=None, choices=("qwen3",),
        help="qwen3: a reply's <think>...</think> (InternVL3.5's thinking mode) goes to the message's "
        "reasoning_content (the field vLLM's reasoning parsers fill)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: as stored"
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from interleaf.errors import InputError

    checks = [
        (args.max_batch_size >= 1, f"--max-batch-size must be >= 1, got {args.max_batch_size}"),
        # a wait past threading's limit (inf, 1e300) would kill the worker thread with an OverflowError
        (
            0 <= args.batch_wait_ms <= 60_000,
            f"--batch-wait-ms must be in [0, 60000], got {args.batch_wait_ms}",
        ),
        (args.max_tokens >= 1, f"--max-tokens must be >= 1, got {args.max_tokens}"),
        (args.max_num is None or args.max_num >= 1, f"--max-num must be >= 1 (tiles), got {args.max_num}"),
        (0 <= args.port <= 65535, f"--port must be in [0, 65535], got {args.port}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    media = args.allowed_local_media_path
    if media is not None and not Path(media).is_dir():
        raise InputError(f"--allowed-local-media-path: {media} is not a directory")

    from interleaf.generation.chat import ChatModel
    from interleaf.generation.onnx import is_onnx_export
    from interleaf.serve.protocol import ServerOptions
    from interleaf.serve.server import make_server

    if is_onnx_export(args.model_dir):  # the server batches requests on the PyTorch engine's shared cache
        raise InputError(f"{args.model_dir}: an ONNX export; serve the checkpoint it was exported from")
    chat = ChatModel.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype)
    options = ServerOptions(
        model_name=args.served_model_name or Path(args.model_dir).resolve().name,
        max_tokens=args.max_tokens,
        max_num=args.max_num,
        max_batch_size=args.max_batch_size,
        batch_wait=args.batch_wait_ms / 1000,
        allowed_local_media_path=media,
        api_key=args.api_key,
        reasoning_parser=args.reasoning_parser,
    )
    try:
        server = make_server(chat, options, args.host, args.port)
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    print(f"serving {options.model_name!r} at {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
