"""Time to first token: Mono-InternVL vs InternVL (InternViT-300M + the same LLM), in one run.

Both models share the 2B shape's LLM (internlm2-chat-1.8b: 24 layers, hidden 2048, 16 heads / 8 kv,
vocab 92553) with random weights - the very same weight tensors, so the only difference is the visual
path: InternVL runs InternViT-300M (24 blocks over 1025 tokens per tile) before the LLM; Mono-InternVL
embeds patches (one conv) and lets the LLM's visual FFN experts encode the 256 tokens per tile. Each
model answers the same internlm2-chat prompt with 1, 7 and 13 tiles of 448 px (256 tokens each); the
time to first token is the runtime engine's (``interleaf.generation.Generator``): prefill with the KV
cache + the first sampled token, inputs already tiled.

    .venv/bin/python benchmarks/bench_mono_ttft.py                      # CPU, bf16, 3 repeats
    .venv/bin/python benchmarks/bench_mono_ttft.py --quick              # CPU, 1 repeat (2 cores: ~10 min)
    .venv/bin/python benchmarks/bench_mono_ttft.py --quick --threads 1  # shared CPU: CPU time is exact
    .venv/bin/python benchmarks/bench_mono_ttft.py --device cuda --quick
    .venv/bin/python benchmarks/bench_mono_ttft.py --device cuda --quick --compare-gather --compare-dense

Prints a table (medians) and the TTFT reduction ``1 - mono / internvl`` per tile count; ``--json PATH``
also writes the numbers. On CPU it also prints the process CPU time of each prefill: on a machine
shared with other jobs the wall time swings, and with one thread the CPU time is the compute itself
(with several, OpenMP threads spin while a sibling is descheduled, which inflates it).
``--compare-gather`` / ``--compare-dense`` also time Mono with index gather/scatter routing (instead of
slices of the image runs) / with upstream's dense formula (both experts on every token).
Target (paper: up to 67% lower first-token latency): >= 50% on an H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import torch
from torch import nn

from interleaf.generation.engine import GenerationConfig, Generator
from interleaf.model import VisionConfig, mono_internvl, preset_config
from interleaf.model.checkpoint import parameter_counts
from interleaf.model.mono_checkpoint import PATCH_2B, PATCH_TINY
from interleaf.model.mono_internvl import MonoInternVLChatModel, MonoInternVLConfig
from interleaf.model.presets import make_tokenizer
from interleaf.processing.prompt import build_prompt
from interleaf.processing.templates import get_template
from machine import cpu_name

SHAPES = {"2b": ("internvl2-2b", PATCH_2B), "tiny": ("tiny-internlm2", PATCH_TINY)}


@torch.no_grad()
def _init_(module: nn.Module, gen: torch.Generator, std: float = 0.02, layer_scale: float = 0.1) -> None:
    """Random init as the model core does it (normal(0, std) matrices, zero biases, unit norms,
    LayerScale ``layer_scale``), drawn directly on the parameters' device: on a GPU machine this
    takes seconds instead of a minute of CPU sampling."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            p.zero_()
        elif leaf in ("ls1", "ls2"):
            p.fill_(layer_scale)
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(std))


def _materialise(module: nn.Module, device: str, dtype: torch.dtype, gen: torch.Generator, **kw) -> None:
    module.to_empty(device=device).to(dtype)
    _init_(module, gen, **kw)


def build_pair(shape: str, dtype: torch.dtype, device: str, share_expert_weights: bool):
    """(InternVL, Mono-InternVL, tokenizer) sharing one LLM's weights (attention, text FFN, norms,
    embeddings, head). The visual experts are their own random tensors, or - ``share_expert_weights``,
    to halve CPU memory - views of the text FFN's (same FLOPs and bytes moved per token).
    Parameters are created and initialised directly on ``device``."""
    from interleaf.model import InternVLChatModel
    from interleaf.model.checkpoint import rebuild_buffers

    base, patch = SHAPES[shape]
    tok = make_tokenizer("internlm2")
    cfg = preset_config(base, vocab_size=-(-len(tok) // 64) * 64)
    vocab = tok.get_vocab()
    cfg.img_context_token_id = vocab["<IMG_CONTEXT>"]
    cfg.img_start_token_id, cfg.img_end_token_id = vocab["<img>"], vocab["</img>"]
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        internvl = InternVLChatModel(cfg)
    _materialise(internvl, device, dtype, gen, layer_scale=cfg.vision.initializer_factor)
    internvl.language_model.tie_weights()
    rebuild_buffers(internvl)  # RoPE tables (made on the CPU)
    internvl.to(device)

    mono_cfg = MonoInternVLConfig.from_internvl(cfg)
    mono_cfg.vision = VisionConfig(**patch)
    mono_cfg.vision.extra["model_type"] = "intern_vit_patch"
    with torch.device("meta"):
        mono = MonoInternVLChatModel(mono_cfg)
    src, dst = internvl.language_model, mono.language_model
    for name in ("embed_tokens", "norm", "rotary_emb"):
        setattr(dst.model, name, getattr(src.model, name))
    dst.lm_head = src.lm_head
    for a, b in zip(src.model.layers, dst.model.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            setattr(b, name, getattr(a, name))
        ve = b.feed_forward_ve
        if share_expert_weights:
            ve.w1.weight, ve.w3.weight, ve.w2.weight = (
                a.mlp.gate_proj.weight,
                a.mlp.up_proj.weight,
                a.mlp.down_proj.weight,
            )
        else:
            _materialise(ve, device, dtype, gen)
    for part in (mono.vision_model, mono.mlp1):
        _materialise(part, device, dtype, gen)
    leftovers = [n for n, p in list(mono.named_parameters()) + list(mono.named_buffers()) if p.is_meta]
    assert not leftovers, leftovers
    return internvl.eval(), mono.eval(), tok


def prompt_inputs(tok, template: str, tiles: int, device: str, dtype: torch.dtype, seed: int = 0):
    text = build_prompt(get_template(template), "Describe this image in detail.", num_tiles=[tiles])
    ids = torch.tensor([tok(text)["input_ids"]], device=device)
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(tiles, 3, 448, 448, generator=g).to(device=device, dtype=dtype)
    return ids, px


def ttft(generator: Generator, ids: torch.Tensor, px: torch.Tensor) -> tuple[float, float]:
    """(wall seconds to the first token as the engine reports it, CPU seconds this process spent).

    On a shared CPU the wall time swings with other people's load; the process CPU time (all threads)
    is far steadier, so the CPU table reports both."""
    cpu = time.process_time()
    out = generator.generate(ids, pixel_values=px, config=GenerationConfig(max_new_tokens=1, ignore_eos=True))
    return out.ttft, time.process_time() - cpu


@torch.inference_mode()
def vision_time(model: nn.Module, px: torch.Tensor) -> float:
    """Seconds for the visual path alone (ViT or patch embedding, pixel shuffle, mlp1): wall on GPU,
    process CPU time on CPU (steadier on a shared machine)."""
    sync(px.device)
    t, c = time.perf_counter(), time.process_time()
    model.extract_feature(px)
    sync(px.device)
    return time.perf_counter() - t if px.device.type == "cuda" else time.process_time() - c


@contextmanager
def dense_routing(model: nn.Module):
    """Swap the routed experts for upstream's dense formula ``FFN_t(h)(1-m) + FFN_v(h)m``."""
    layers = list(model.language_model.model.layers)
    for layer in layers:
        layer.feed_forward = layer.dense_feed_forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.feed_forward


@contextmanager
def gather_routing():
    """Force the index gather / scatter routing (the fallback for many image runs) instead of
    routing the contiguous image runs by slices."""
    saved = mono_internvl.MAX_SEGMENT_RUNS
    mono_internvl.MAX_SEGMENT_RUNS = 0
    try:
        yield
    finally:
        mono_internvl.MAX_SEGMENT_RUNS = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--shape", default="2b", choices=sorted(SHAPES))
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 7, 13])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="one timed run per setting (CPU: warm up once)")
    ap.add_argument("--share-expert-weights", choices=["auto", "yes", "no"], default="auto",
                    help="experts reuse the text FFN tensors (auto: yes on CPU to fit memory, no on GPU)")  # fmt: skip
    ap.add_argument("--compare-dense", action="store_true",
                    help="also time Mono with upstream's dense routing (both experts on every token)")  # fmt: skip
    ap.add_argument("--compare-gather", action="store_true",
                    help="also time Mono with index gather/scatter routing instead of slices of the image runs")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is available", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    share = args.share_expert_weights == "yes" or (
        args.share_expert_weights == "auto" and args.device == "cpu"
    )
    device = torch.device(args.device)

    t0 = time.perf_counter()
    internvl, mono, tok = build_pair(args.shape, dtype, args.device, share)
    gc.collect()
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# Mono-InternVL vs InternVL time to first token | shape {args.shape} | {args.device} {args.dtype} | {machine}"
    )
    print(
        f"# built in {time.perf_counter() - t0:.0f}s; experts {'share' if share else 'own'} weights; repeats {repeats}"
    )
    for name, m in (("InternVL", internvl), ("Mono-InternVL", mono)):
        p = {k: v / 1e6 for k, v in parameter_counts(m).items()}
        print(
            f"# {name:<14} params (M): vision {p['vision']:.1f}, projector {p['projector']:.1f}, llm {p['llm']:.1f}"
        )
    gens = {"internvl": Generator(internvl), "mono": Generator(mono)}
    template = internvl.config.template

    # warm-up: kernels, allocator, CUDA graphs (per setting on GPU; once on CPU, where it is costly)
    warm = args.tiles if device.type == "cuda" else args.tiles[:1]
    for tiles in warm:
        ids, px = prompt_inputs(tok, template, tiles if device.type == "cuda" else 1, args.device, dtype)
        for g in gens.values():
            ttft(g, ids, px)

    rows = []
    for tiles in args.tiles:
        ids, px = prompt_inputs(tok, template, tiles, args.device, dtype, seed=tiles)
        times: dict[str, list[float]] = {"internvl": [], "mono": []}
        cpu: dict[str, list[float]] = {"internvl": [], "mono": []}
        for _ in range(repeats):  # interleaved, so load drift hits both alike
            for key, g in gens.items():
                wall, used = ttft(g, ids, px)
                times[key].append(wall)
                cpu[key].append(used)
        variants = {"mono_dense": (args.compare_dense, lambda: dense_routing(mono)),
                    "mono_gather": (args.compare_gather, gather_routing)}  # fmt: skip
        for key, (wanted, routing) in variants.items():
            if not wanted:
                continue
            with routing():
                if device.type == "cuda":
                    ttft(gens["mono"], ids, px)
                runs = [ttft(gens["mono"], ids, px) for _ in range(repeats)]
            times[key], cpu[key] = [r[0] for r in runs], [r[1] for r in runs]
        vis = {"internvl": vision_time(internvl, px), "mono": vision_time(mono, px)}
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "tiles": tiles,
            "tokens": ids.shape[1],
            "internvl_ttft_s": med["internvl"],
            "mono_ttft_s": med["mono"],
            "reduction": 1 - med["mono"] / med["internvl"],
            "speedup": med["internvl"] / med["mono"],
            "internvl_vision_s": vis["internvl"],
            "mono_vision_s": vis["mono"],
            "internvl_cpu_s": statistics.median(cpu["internvl"]),
            "mono_cpu_s": statistics.median(cpu["mono"]),
            "runs": times,
            "cpu_runs": cpu,
        }
        row["cpu_reduction"] = 1 - row["mono_cpu_s"] / row["internvl_cpu_s"]
        extra = ""
        for key, label in (("mono_dense", "dense"), ("mono_gather", "gather")):
            if key in times:
                row[f"{key}_ttft_s"] = statistics.median(times[key])
                row[f"{key}_cpu_s"] = statistics.median(cpu[key])
                extra += f" | Mono {label} routing {row[f'{key}_ttft_s'] * 1e3:.1f} ms"
                if device.type == "cpu":
                    extra += f" (CPU-time {row[f'{key}_cpu_s']:.2f}s)"
        rows.append(row)
        print(
            f"tiles {tiles:>2} | tokens {row['tokens']:>5} | InternVL {med['internvl'] * 1e3:9.1f} ms "
            f"(ViT {vis['internvl'] * 1e3:8.1f}{'' if device.type == 'cuda' else ' cpu'}) | Mono {med['mono'] * 1e3:9.1f} ms (patch {vis['mono'] * 1e3:6.1f}{'' if device.type == 'cuda' else ' cpu'}) "
            f"| reduction {row['reduction'] * 100:5.1f}% | speedup {row['speedup']:.2f}x{extra}"
            + (
                f" | CPU-time {row['internvl_cpu_s']:.2f}s vs {row['mono_cpu_s']:.2f}s: "
                f"reduction {row['cpu_reduction'] * 100:.1f}%"
                if device.type == "cpu"
                else ""
            ),
            flush=True,
        )
    print(f"# mean reduction {statistics.mean(r['reduction'] for r in rows) * 100:.1f}% "
          f"(max {max(r['reduction'] for r in rows) * 100:.1f}%)"
          + (f"; CPU-time mean reduction {statistics.mean(r['cpu_reduction'] for r in rows) * 100:.1f}%"
             if device.type == "cpu" else ""))  # fmt: skip
    if args.json:
        record = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "device": args.device,
            "dtype": args.dtype,
            "shape": args.shape,
            "repeats": repeats,
            "share_expert_weights": share,
            "torch": torch.__version__,
            "rows": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
