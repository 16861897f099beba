"""Training throughput: interleaf's trainer vs transformers' ``Trainer`` + ``InternVLForConditionalGeneration``.

Same data (the demo's digits/shapes set in InternVL's format, tokenised once by interleaf), same weights
(the ``-hf`` save of the same random checkpoint), same optimiser (AdamW), in one run; reports training
tokens per second (non-padding tokens) and the ratio. interleaf packs samples into sequences with
block-diagonal attention and computes the vocabulary projection only where there is a loss; the
transformers side pads each batch to its longest sample, as its default collation does.

    .venv/bin/python benchmarks/bench_train.py                       # CPU, demo-size model
    .venv/bin/python benchmarks/bench_train.py --device cuda --quick # H100: MFU of the 1B shape, bf16, packing

``--device cuda`` reports model FLOPs utilisation for the ``internvl2-1b`` preset, for each of the
trainer's GPU precisions (``--variants``: bf16 autocast, bf16 weights with fp32 masters, the latter with
``compile``) in one run: FLOPs per step =
6 x parameters x tokens for every matmul (ViT per tile, projector per image token, LLM per token,
lm_head per supervised token) + the attention score/value matmuls (x3 for backward) / step time /
peak bf16 (989 TFLOP/s for an H100 SXM; ``--peak-tflops`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_data(root: Path, image_size: int) -> Path:
    from interleaf.train.demo import DemoSettings, build_dataset

    s = DemoSettings(root, image_size=image_size, n_pairs=300, n_shapes=150, n_test=20)
    return build_dataset(s, log=lambda m: None)["meta"]


def load_samples(meta: Path, model_dir: Path, n: int) -> list:
    from interleaf.model import load_checkpoint
    from interleaf.train.data import ConversationDataset, DataArgs

    model, tok = load_checkpoint(model_dir)
    c = model.config
    args = DataArgs(
        template=c.template,
        num_image_token=c.num_image_token,
        image_size=c.image_size,
        max_dynamic_patch=c.max_dynamic_patch,
        system_message=c.system_message,
    )
    ds = ConversationDataset(meta, tok, args)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    out = []
    for i in order:
        s = ds.get(i)
        if s is not None:
            out.append(s)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------------------------------
# interleaf


def run_interleaf(
    model_dir: Path,
    samples: list,
    steps: int,
    warmup: int,
    pack_tokens: int,
    device: str,
    precision: str = "fp32",
    compile: bool = False,
    profile_steps: int = 0,
):
    """Tokens/s and seconds per step of interleaf's train step (packing on) over ``samples``, in order,
    in the trainer's ``precision`` (fp32 | bf16 autocast | bf16-master) with its ``compile`` option.
    ``profile_steps`` > 0: that many more steps under ``torch.profiler``, whose top ops are printed."""
    from interleaf.model import load_checkpoint
    from interleaf.train.config import build_config
    from interleaf.train.packing import collate
    from interleaf.train.precision import MasterWeights
    from interleaf.train.trainer import (
        TrainStep,
        build_optimizer,
        compile_layers,
        cosine_schedule,
        optimizer_step,
    )

    model, tok = load_checkpoint(model_dir)
    model = model.float().to(device).train()
    cfg = build_config(
        {"model_path": str(model_dir), "meta_path": "x", "lr": 1e-5, "max_steps": steps + warmup}
    )
    master = MasterWeights(model) if precision == "bf16-master" else None
    if compile:
        compile_layers(model)
    opt = build_optimizer(model, cfg, master)
    sched = cosine_schedule(opt, cfg)
    step_mod = TrainStep(model)
    # pack greedily, in order, up to the token budget (what the trainer's Batcher does)
    rows, row, n = [], [], 0
    for s in samples:
        if row and n + s.num_tokens > pack_tokens:
            rows.append(row)
            row, n = [], 0
        row.append(s)
        n += s.num_tokens
    rows.append(row)
    if len(rows) < steps + warmup + profile_steps:
        raise SystemExit(f"not enough samples for {steps + warmup + profile_steps} packed steps")
    times, tokens = [], []
    prof = None
    for k in range(steps + warmup + profile_steps):
        if k == steps + warmup:
            prof = torch.profiler.profile(record_shapes=False)
            prof.start()
        batch = collate([rows[k]], tok.pad_token_id or 0, block_mask=False)  # varlen attention
        batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss_sum, w_sum = step_mod(batch)
        (loss_sum / w_sum).backward()
        optimizer_step(opt, master, 1.0)
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if warmup <= k < warmup + steps:
            times.append(time.perf_counter() - t0)
            tokens.append(batch["num_tokens"])
    if prof is not None:
        prof.stop()
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=30))
    print("  step ms:", " ".join(f"{t * 1e3:.0f}" for t in times), flush=True)
    return sum(tokens) / sum(times), statistics.median(times), rows[warmup : warmup + steps], model


# ---------------------------------------------------------------------------------------------------
# transformers


def run_transformers(hf_dir: Path, samples: list, steps: int, warmup: int, batch_size: int, pad_id: int):
    """Tokens/s of transformers' Trainer on the same samples (padded batches, HF InternVL)."""
    from transformers import InternVLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    model = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    counted: list[int] = []

    def collator(items):
        L = max(s.num_tokens for s in items)
        ids = torch.full((len(items), L), pad_id, dtype=torch.long)
        labels = torch.full((len(items), L), -100, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        for b, s in enumerate(items):
            ids[b, : s.num_tokens] = s.input_ids
            labels[b, : s.num_tokens] = s.labels
            mask[b, : s.num_tokens] = 1
        counted.append(int(mask.sum()))
        pv = [s.pixel_values for s in items if s.pixel_values is not None]
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if pv:
            out["pixel_values"] = torch.cat(pv)
        return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter() - self.t0)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            max_steps=steps + warmup,
            learning_rate=1e-5,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            max_grad_norm=1.0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=samples, data_collator=collator, callbacks=[clock]
        )
        trainer.train()
    # the collator ran once per step, in order (no workers); step time includes the forward/backward/step
    times = clock.marks[warmup:]
    tokens = counted[warmup : warmup + len(times)]
    return sum(tokens) / sum(times), statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# FLOPs (for MFU on GPU)


def step_flops(model, rows: list[list]) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) over packed ``rows``."""
    cfg = model.config
    vit = sum(
        p.numel() for n, p in model.vision_model.named_parameters() if "embeddings" not in n or "patch" in n
    )
    mlp = sum(p.numel() for p in model.mlp1.parameters())
    llm_layers = sum(p.numel() for p in model.language_model.model.layers.parameters())
    head = model.language_model.lm_head.weight.numel()
    v, lm = cfg.vision, cfg.llm
    patches = (cfg.image_size // v.patch_size) ** 2 + 1
    total = 0.0
    for row in rows:
        tiles = sum(s.num_images for s in row)
        tokens = sum(s.num_tokens for s in row)
        sup = sum(s.num_supervised for s in row)
        total += 2 * vit * patches * tiles + 4 * v.num_hidden_layers * patches**2 * v.hidden_size * tiles
        total += 2 * mlp * tiles * cfg.num_image_token
        total += 2 * llm_layers * tokens + 2 * head * sup
        # causal attention within each sample: QK^T and PV over half the square
        total += sum(
            4 * lm.num_hidden_layers * lm.num_attention_heads * lm.head_dim * s.num_tokens**2 / 2 for s in row
        )
    return 3 * total


def varlen_check() -> dict:
    """Is the fused varlen kernel used on this GPU, and does it match the per-segment loop (bf16)?"""
    from interleaf.model import llm
    from interleaf.model.llm import segment_loop_attention, varlen_attention, varlen_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 14, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, 17, 150, 300, 301, 480, 600], dtype=torch.int32, device="cuda")
    fused = varlen_attention(q, k, v, cu, 179)
    diff = (fused.float() - segment_loop_attention(q, k, v, cu).float()).abs().max().item()
    used = varlen_kernel() is not None and not llm._VARLEN_WARNED
    print(
        f"varlen kernel: {'fused varlen_attn' if used else 'per-segment SDPA'}; max |fused - loop| {diff:.2e}"
    )
    return {"varlen_kernel": used, "varlen_max_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--image-size", type=int, default=224, help="CPU model tile size (demo model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak bf16 dense TFLOP/s")
    p.add_argument("--json", help="write results here")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps (top ops)")
    p.add_argument(
        "--variants",
        default="bf16,bf16-master,bf16-master+compile",
        help="GPU: comma-separated trainer precisions (bf16 = autocast over fp32 weights, bf16-master), "
        "each optionally +compile",
    )
    p.add_argument(
        "--pack-tokens", type=int, default=16384,
        help="GPU: tokens per packed row, one row per step (default: upstream InternVL2.5's max_packed_tokens)",
    )  # fmt: skip
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from interleaf.model import init_model, load_checkpoint, save_checkpoint
    from interleaf.train.demo import init_demo_model

    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.device == "cuda":
            results.update(varlen_check())
            steps = a.steps or (10 if a.quick else 30)
            warm = 3
            model_dir = init_model("internvl2-1b", tmp / "model", dtype="bfloat16")
            meta = build_data(tmp / "data", 448)
            samples = load_samples(meta, model_dir, 20 * (steps + warm + a.profile) * a.pack_tokens // 4096)
            results.update(device=torch.cuda.get_device_name(), preset="internvl2-1b", runs=[])
            for variant in a.variants.split(","):
                precision, _, extra = variant.partition("+")
                compiled = extra == "compile"
                # compiled layers recompile once for dynamic shapes: two more warm-up steps
                tps, med, rows, model = run_interleaf(
                    model_dir, samples, steps, warm + 2 * compiled, a.pack_tokens, "cuda", precision,
                    compiled, profile_steps=a.profile,
                )  # fmt: skip
                flops = statistics.mean(step_flops(model, [r]) for r in rows)
                mfu = flops / med / (a.peak_tflops * 1e12)
                results["runs"].append(
                    dict(variant=variant, pack_tokens=a.pack_tokens, tokens_per_s=tps, step_s=med,
                         tflops_per_step=flops / 1e12, mfu=mfu)
                )  # fmt: skip
                print(
                    f"interleaf 1B {variant:24s} packed {a.pack_tokens}: {tps:,.0f} tok/s, "
                    f"{med * 1e3:.0f} ms/step, MFU {mfu:.1%}",
                    flush=True,
                )
                del model
                torch.cuda.empty_cache()
        else:
            steps = a.steps or (6 if a.quick else 20)
            warm = 2
            model_dir = init_demo_model(tmp / "model", image_size=a.image_size)
            model, tok = load_checkpoint(model_dir)
            save_checkpoint(model, tok, tmp / "model-hf", layout="hf")
            meta = build_data(tmp / "data", a.image_size)
            samples = load_samples(meta, model_dir, 12 * (steps + warm))
            ours, ours_med, rows, _ = run_interleaf(model_dir, samples, steps, warm, 1024, "cpu")
            n_used = sum(len(r) for r in rows)
            batch = max(1, round(n_used / steps))  # same samples per step on both sides
            theirs, theirs_med = run_transformers(
                tmp / "model-hf", samples, steps, warm, batch, tok.pad_token_id or 0
            )
            results.update(
                device="cpu", interleaf_tokens_per_s=ours, transformers_tokens_per_s=theirs, ratio=ours / theirs,
                steps=steps, samples_per_step=batch, image_size=a.image_size,
            )  # fmt: skip
            print(
                f"CPU ({results['threads']} threads), demo model {a.image_size}px, {steps} steps, ~{batch} samples/step:\n"
                f"  interleaf (packed 1024)      {ours:8.0f} tok/s  ({ours_med * 1e3:.0f} ms/step)\n"
                f"  transformers Trainer (padded) {theirs:8.0f} tok/s  ({theirs_med * 1e3:.0f} ms/step)\n"
                f"  ratio {ours / theirs:.2f}x"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
