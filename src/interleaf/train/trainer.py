"""The trainer: plain PyTorch, one loop you can read top to bottom.

    for step in range(start, max_steps):
        for micro in range(grad_accum):
            rows  = batcher.next_batch()                  # packed or single samples (built by data threads)
            batch = collate(rows)                          # ids, positions, cu_seqlens, weights
            loss  = sum(w * CE) / sum(w) / grad_accum      # token | sample | square reduction
            loss.backward()
        clip_grad_norm_; optimizer.step(); scheduler.step()   # fp32 masters in bf16-master
        collate the next step's first micro-batch while the GPU works; one host sync for the stats
        log JSONL; every save_steps: atomic checkpoint (model + optimizer + scheduler + RNG + data position)

AdamW has one parameter group per part (vision / projector / LLM, each split into decay / no-decay)
so each part has its own learning rate; the schedule is linear warm-up then cosine. Freeze flags and
stage presets decide what trains; LoRA wraps the LLM and/or ViT. Under ``torchrun`` the model is
wrapped in DDP (or sharded with FSDP2's ``fully_shard``) and every rank reads its own shard of the data.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from interleaf.errors import CheckpointError, ConfigError
from interleaf.files import replace_text
from interleaf.processing.image import background_threads
from interleaf.train.config import TrainConfig
from interleaf.train.data import (
    ConversationDataset,
    CorpusDataset,
    DataArgs,
    SkipLog,
    skip_summary,
)
from interleaf.train.lora import LLM_TARGETS, VIT_TARGETS, apply_llm_lora, apply_lora, has_lora, merge_lora
from interleaf.train.packing import Batcher, SampleStream, collate
from interleaf.train.precision import MasterWeights, resolve_dtype

PARTS = (("vision", "vision_model."), ("mlp", "mlp1."), ("llm", "language_model."))


def part_of(name: str) -> str:
    for part, prefix in PARTS:
        if name.startswith(prefix):
            return part
    return "llm"


# ---------------------------------------------------------------------------------------------------
# model set-up helpers (usable on their own, e.g. by tests and the demo)


def set_trainable(model: nn.Module, cfg: TrainConfig) -> dict[str, int]:
    """Apply freeze flags, LoRA and ``trainable_patterns``; returns trainable parameter counts per part."""
    from interleaf.model.mono_internvl import is_mono_config

    if (cfg.stage or "").startswith("evip-") and not is_mono_config(model.config):
        # the expert patterns would match nothing and "S1.1" would train the whole ViT instead
        raise ConfigError(
            f"config key 'stage': {cfg.stage} needs a Mono-InternVL model (visual experts), "
            f"got a {type(model).__name__} without them"
        )
    frozen = {"vision": cfg.freeze_vit, "mlp": cfg.freeze_mlp, "llm": cfg.freeze_llm}
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen[part_of(name)])
    if cfg.use_llm_lora:
        for p in model.language_model.parameters():
            p.requires_grad_(False)
        apply_llm_lora(model, cfg.use_llm_lora, dropout=cfg.lora_dropout)
    if cfg.use_backbone_lora:
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
        apply_lora(model.vision_model, VIT_TARGETS, cfg.use_backbone_lora, dropout=cfg.lora_dropout)
    patterns = [re.compile(p) for p in cfg.trainable_patterns]
    matched = 0
    for name, p in model.named_parameters():
        if patterns and any(rx.search(name) for rx in patterns):
            p.requires_grad_(True)
            matched += 1
    if patterns and not matched:  # a typo would otherwise train nothing it names, silently
        raise ConfigError(
            f"config key 'trainable_patterns': {cfg.trainable_patterns} match no parameter of the model"
        )
    counts = {"vision": 0, "mlp": 0, "llm": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[part_of(name)] += p.numel()
    if sum(counts.values()) == 0:
        raise ConfigError("config: nothing to train (every part frozen and no LoRA or trainable_patterns)")
    return counts


def apply_training_settings(config: Any, cfg: TrainConfig) -> None:
    """Record the chat template and image tiling the model is trained with in its config, so the
    saved checkpoint prompts and tiles as in training (upstream's fine-tuning sets ``template``,
    ``min/max_dynamic_patch``, ``use_thumbnail`` and ``dynamic_image_size`` from its arguments; the
    pixel-shuffle version and ViT layer are the model's own here, not training options)."""
    if cfg.template:
        config.template = cfg.template
    config.max_dynamic_patch = cfg.max_dynamic_patch
    config.min_dynamic_patch = cfg.min_dynamic_patch
    config.use_thumbnail = cfg.use_thumbnail
    config.dynamic_image_size = cfg.dynamic_image_size


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, master: MasterWeights | None = None
) -> torch.optim.Optimizer:
    """AdamW with a (decay, no-decay) group pair per part; 1-D tensors (norms, biases, LayerScale,
    CLS/position embeddings) get no weight decay. With ``master`` it updates the fp32 master copies."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = p.dim() >= 2 and "position_embedding" not in name and "class_embedding" not in name
        groups.setdefault((part_of(name), decay), []).append(p if master is None else master.master_of(p))
    param_groups = [
        {
            "params": params,
            "lr": cfg.resolved_lr(part),
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]
    fused = {}
    if all(p.is_cuda for g in param_groups for p in g["params"]):
        fused = {"fused": True}
    return torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **fused)


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr, then cosine decay to ``min_lr_ratio`` x lr at ``max_steps``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * cfg.max_steps)
    return warmup_cosine(optimizer, warmup, cfg.max_steps, cfg.min_lr_ratio)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` x lr at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder and ViT layer in the backward pass instead of storing activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in transformer_layers(model):
        if getattr(layer, "_interleaf_ckpt", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            # every input (cu_seqlens included) is an argument, so the recomputation attends as before
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._interleaf_ckpt = True


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers and the ViT's blocks (Mono-InternVL has no ViT blocks)."""
    layers = list(model.language_model.model.layers)
    encoder = getattr(model.vision_model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers"):
        layers += list(encoder.layers)
    return layers


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer and ViT block on its own (regional compilation): the
    norms, RoPE, SwiGLU, LayerScale and residual adds around each layer's matmuls fuse into a few
    kernels; all layers of a kind share one compiled graph, so compiling costs seconds, not minutes.
    Shapes are dynamic from the start: packed rows change length (and the ViT its tile count) every
    step, and specialising first would only recompile."""
    for layer in transformer_layers(model):
        layer.compile(dynamic=True)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    master: MasterWeights | None,
    max_grad_norm: float,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Scale the gradients by ``grad_scale`` (the loss normaliser), clip them (``max_grad_norm`` <= 0:
    only measure them), step, and with fp32 master weights move the gradients to them first and round
    them into the model after; returns the norm."""
    if master is not None:
        master.grads_to_master()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_scale != 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, grad_scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    if master is not None:
        master.copy_to_model()
    return grad_norm


@contextmanager
def _hidden_instead_of_logits(model: nn.Module):
    """Run the LLM without its lm_head (returns the final hidden states as ``logits``), so the head
    can be applied to the supervised positions only: image and prompt positions cost no vocab matmul."""
    lm = model.language_model
    head = lm.lm_head
    lm.lm_head = nn.Identity()
    try:
        yield head
    finally:
        lm.lm_head = head


class TrainStep(nn.Module):
    """Model + loss in one module (what DDP/FSDP wrap): returns (sum(w * CE), sum(w)).

    ``dummy_tile`` ([1, 3, H, W] zeros, set under FSDP while the ViT or projector trains): a
    micro-batch without images still runs the vision path on it, and its features enter the loss
    multiplied by zero, as upstream's ``image_flags == 0`` dummy image. Every rank then reduces a
    gradient (zero where there was no image) for the same parameters: FSDP reduce-scatters only the
    parameters that got one, so a text-only micro-batch on one rank would otherwise leave the ranks'
    collectives mismatched. The loss value and the other gradients are unchanged.
    """

    def __init__(self, model: nn.Module, dummy_tile: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.dummy_tile = dummy_tile

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        mask = batch["attention_mask"]
        # packed rows (block mask, or none built): variable-length attention over the samples
        varlen = mask is None or mask.dim() == 4
        with _hidden_instead_of_logits(model) as head:
            out = model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                attention_mask=None if varlen else mask,
                position_ids=batch["position_ids"],
                cu_seqlens=batch["cu_seqlens"] if varlen else None,
                max_seqlen=batch.get("max_seqlen") if varlen else None,
            )
        sup = batch["supervised"]  # flat positions with a loss (collate finds them on the host)
        hidden = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, sup)  # [N_sup, H]
        logits = head(hidden).float()  # [N_sup, V]
        ce = nn.functional.cross_entropy(logits, batch["targets"].reshape(-1)[sup], reduction="none")
        w = batch["loss_weight"].reshape(-1)[sup].to(ce.dtype)
        loss_sum = (ce * w).sum()
        if batch["pixel_values"] is None and self.dummy_tile is not None:
            loss_sum = loss_sum + model.extract_feature(self.dummy_tile).float().sum() * 0.0
        return loss_sum, w.sum()


# ---------------------------------------------------------------------------------------------------
# distributed


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 when not distributed)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_process_group(backend: str) -> None:
    """``torch.distributed.init_process_group(backend)``, with ``torch.distributed.nn`` imported first.

    That module's functions take ``group=group.WORLD`` as a default argument, which binds the default
    group itself when the module is imported after the group exists (building AdamW imports it, by
    way of torch._dynamo). The group then outlives ``destroy_process_group``, and so do gloo's
    threads, into interpreter exit, where a rank of a finished run sometimes aborted ('terminate
    called without an active exception'). Imported before, those defaults are None.
    """
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401 - for its import-time defaults, above

    dist.init_process_group(backend)


@contextmanager
def ending_process_group() -> Iterator[None]:
    """A process group started inside the block (or the decorated call: ``@ending_process_group()``)
    is destroyed when it ends, after a garbage collection, so that gloo's threads end while the
    interpreter is whole (see :func:`init_process_group`); one that existed before is its owner's."""
    import gc

    import torch.distributed as dist

    started = not dist.is_initialized()
    try:
        yield
    finally:
        if started and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def all_gather_object(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` outside torchrun)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _print_as_rank(print_fn, rank: int, msg: str) -> None:
    print_fn(f"[rank {rank}] {msg}")


def _merge_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_rank:
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items()))


# ---------------------------------------------------------------------------------------------------
# the trainer


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-N`` folder (its name must end in digits)."""
    return int(path.name.split("-")[-1])


def remove_checkpoint(path: Path, ignore_errors: bool = False) -> None:
    """Remove a checkpoint folder, its ``train_state.pt`` (what marks it complete) first: a kill
    part-way leaves a folder that resuming passes over (and the next prune removes), never one that
    looks complete without its weights."""
    (path / "train_state.pt").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=ignore_errors)


class Trainer:
    """Set up from a :class:`TrainConfig`, then ``train()``. ``log`` receives human-readable lines."""

    def __init__(self, cfg: TrainConfig, log=print) -> None:
        self.cfg = cfg
        self.rank, self.world, self.local_rank = dist_info()
        self.is_main = self.rank == 0
        self._print = log
        self.out = Path(cfg.output_dir)
        self.losses: list[tuple[int, float]] = []
        self.step = 0
        # the next micro-batch, built (or being built) ahead, and the data position before it
        self._ahead: tuple[Future, dict[str, Any]] | None = None
        self._loader: ThreadPoolExecutor | None = None  # builds that micro-batch beside the step
        self._copy_stream: torch.cuda.Stream | None = None  # its host-to-device copy, beside the kernels

    def log(self, msg: str) -> None:
        if self.is_main and self._print is not None:
            self._print(msg)

    # -- set-up -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("config key 'device': cuda requested but no GPU is available")
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _base_model_dir(self) -> Path:
        """The checkpoint training starts from (a preset is initialised once into output_dir/init)."""
        cfg = self.cfg
        if cfg.model_path:
            return Path(cfg.model_path)
        init_dir = self.out / "init"
        # what the folder was made from: another preset, override or seed makes it again
        made_from = {"preset": cfg.model_preset, "overrides": cfg.model_overrides, "seed": cfg.seed}
        marker = init_dir / "interleaf_init.json"
        try:
            current = (init_dir / "config.json").exists() and json.loads(marker.read_text()) == made_from
        except (OSError, ValueError):  # no marker (made by older code) or unreadable: make it again
            current = False
        if not current and self.is_main:
            from interleaf.model import init_model

            tmp = self.out / ".init-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            init_model(
                cfg.model_preset, str(tmp), seed=cfg.seed, dtype="float32", overrides=cfg.model_overrides
            )
            (tmp / marker.name).write_text(json.dumps(made_from))
            shutil.rmtree(init_dir, ignore_errors=True)
            os.replace(tmp, init_dir)
        self._barrier()  # every rank, whatever it saw: a rank that found the new folder must not skip it
        return init_dir

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def setup(self) -> Trainer:
        cfg = self.cfg
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                init_process_group("nccl" if (cfg.device != "cpu" and torch.cuda.is_available()) else "gloo")
        self.device = self._device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_dtype(cfg.dtype, self.device)
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        # the model's randomness (LoRA init) is the same on every rank: FSDP does not broadcast
        # weights; the data and dropout streams get a seed per rank once the model is built
        seed_everything(cfg.seed)
        self._check_start_is_kept()
        if self.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, no permission ...
                raise ConfigError(
                    f"config key 'output_dir': cannot create {self.out} ({exc.strerror})"
                ) from None
            if not (cfg.resume and self.latest_checkpoint() is not None):
                self._start_fresh(checkpoints=not cfg.resume)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self._barrier()

        from interleaf.model.checkpoint import load_checkpoint

        self.base_dir = self._base_model_dir()
        resume_dir = self.latest_checkpoint() if cfg.resume else None
        lora = bool(cfg.use_llm_lora or cfg.use_backbone_lora)
        load_dir = resume_dir if (resume_dir is not None and not lora) else self.base_dir
        model, tokenizer = load_checkpoint(str(load_dir), device="cpu")
        model = model.float()
        apply_training_settings(model.config, cfg)
        # always set, as upstream's fine-tuning does: a released config's own rate (0.1 in some) must
        # not switch stochastic depth on unasked; recorded in the vision config the checkpoint saves
        set_rate = getattr(model.vision_model, "set_drop_path_rate", None)
        if set_rate is not None:
            set_rate(cfg.drop_path_rate)
        elif cfg.drop_path_rate:
            raise ConfigError(
                f"config key 'drop_path_rate': {type(model.vision_model).__name__} has no ViT blocks to drop"
            )
        if cfg.save_layout == "hf":
            model.config.to_hf_dict()  # a layout the model cannot be saved in fails now, not at step N
        counts = set_trainable(model, cfg)
        if self.rank:
            seed_everything(cfg.seed + self.rank)
        self.tokenizer = tokenizer
        self.raw_model = model
        self.log(
            f"model from {load_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"trainable vision={counts['vision'] / 1e6:.2f}M mlp={counts['mlp'] / 1e6:.2f}M llm={counts['llm'] / 1e6:.2f}M"
        )
        ckpt = cfg.grad_checkpointing
        if ckpt if ckpt is not None else self.device.type == "cuda":
            enable_grad_checkpointing(model)

        # data
        mcfg = model.config
        echo = self.log
        if not self.is_main and self._print is not None:  # every rank's skips are shown, not rank 0's only
            echo = partial(_print_as_rank, self._print, self.rank)
        self.skip_log = SkipLog(self.out / f"skipped.rank{self.rank}.jsonl", echo=echo)
        max_len = min(cfg.max_seq_length, cfg.max_packed_tokens) if cfg.packing else cfg.max_seq_length
        args = DataArgs(
            template=cfg.template or mcfg.template,
            num_image_token=mcfg.num_image_token,
            image_size=mcfg.image_size,
            max_seq_length=max_len,
            max_dynamic_patch=cfg.max_dynamic_patch,
            min_dynamic_patch=cfg.min_dynamic_patch,
            use_thumbnail=cfg.use_thumbnail,
            dynamic_image_size=cfg.dynamic_image_size,
            min_num_frame=cfg.min_num_frame,
            max_num_frame=cfg.max_num_frame,
            system_message=mcfg.system_message,
            seed=cfg.seed,
            data_augment=cfg.data_augment,
        )
        if cfg.meta_path:
            dataset: Any = ConversationDataset(cfg.meta_path, tokenizer, args, self.skip_log)
            if cfg.corpus_paths:
                dataset = _Concat([dataset, CorpusDataset(cfg.corpus_paths, tokenizer, args, self.skip_log)])
        else:
            dataset = CorpusDataset(cfg.corpus_paths, tokenizer, args, self.skip_log)
        self.dataset = dataset
        workers = cfg.num_workers
        if workers < 0:  # a CPU run's own threads need the cores; a GPU step should not wait for data
            workers = background_threads() if self.device.type == "cuda" else 0
        stream = SampleStream(
            dataset, cfg.seed, cfg.shuffle, self.rank, self.world, workers=workers, skip_log=self.skip_log
        )
        self.batcher = Batcher(
            stream,
            cfg.batch_size,
            cfg.packing,
            cfg.max_packed_tokens,
            cfg.max_packed_images,
            cfg.pack_lookahead,
        )
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
        if workers > 0:  # on a GPU the thread works on this rank's device, not in a context on device 0
            init = partial(torch.cuda.set_device, self.device) if self.device.type == "cuda" else None
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="interleaf-batch", initializer=init)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0

        # model on device, in its training precision, compiled, wrapped
        model.to(self.device)
        fsdp = self.world > 1 and cfg.distributed == "fsdp"
        self.master = None
        if self.precision == "bf16-master" and not fsdp:
            self.master = MasterWeights(model)
        if cfg.compile:
            compile_layers(model)
        dummy = None
        if fsdp and any(p.requires_grad for n, p in model.named_parameters() if part_of(n) != "llm"):
            dummy = torch.zeros(1, 3, mcfg.image_size, mcfg.image_size, device=self.device)
        step_module: nn.Module = TrainStep(model, dummy_tile=dummy)
        if self.world > 1:
            if fsdp:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                mp = {}
                if self.precision == "bf16-master":  # fp32 sharded weights, bf16 compute
                    mp = {
                        "mp_policy": MixedPrecisionPolicy(
                            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                        )
                    }
                for layer in model.language_model.model.layers:
                    fully_shard(layer, **mp)
                fully_shard(step_module, **mp)
                if hasattr(step_module, "set_reduce_scatter_unused_params"):
                    # zero gradients for any other parameter a rank's micro-batch left unused (e.g.
                    # Mono-InternVL's visual experts on a text-only batch), where torch offers it
                    step_module.set_reduce_scatter_unused_params(True)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                step_module = DDP(
                    step_module,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=True,
                )
        self.step_module = step_module
        self.optimizer = build_optimizer(model, cfg, self.master)
        self.scheduler = cosine_schedule(self.optimizer, cfg)
        if resume_dir is not None:
            self._load_state(resume_dir, lora)
        return self

    # -- checkpoints ----------------------------------------------------------------------------
    def _is_start(self, folder: Path) -> bool:
        """Whether ``folder`` holds the checkpoint this run starts from (``model_path``; stage 2 from
        out/checkpoint-N into out/): it is never removed."""
        return bool(self.cfg.model_path) and Path(self.cfg.model_path).resolve().is_relative_to(
            folder.resolve()
        )

    def _check_start_is_kept(self) -> None:
        """Refuse a ``model_path`` that is a checkpoint of output_dir this run will save again: the save
        would replace the weights it starts from (and a LoRA run resumed later would take that save
        for its base)."""
        cfg = self.cfg
        name = next((p.name for p in self.out.glob("checkpoint-*") if self._is_start(p)), "")
        n = name.removeprefix("checkpoint-")
        if not n.isdigit():
            return
        latest = self.latest_checkpoint() if cfg.resume else None
        done = checkpoint_step(latest) if latest is not None else 0
        step = int(n)
        saved = step == cfg.max_steps or (
            done < step < cfg.max_steps and cfg.save_steps > 0 and step % cfg.save_steps == 0
        )
        if saved:
            raise ConfigError(
                f"config key 'model_path': {cfg.model_path} is checkpoint-{n} of output_dir {self.out}, "
                f"which this run saves again at step {n}; start from a copy elsewhere or use another output_dir"
            )

    def _start_fresh(self, checkpoints: bool) -> None:
        """A run that does not resume starts its logs anew: log.jsonl, the skip logs and (with
        ``checkpoints``, i.e. ``resume: false``) the checkpoints an earlier run left in output_dir are
        removed, so no step is logged twice and a later resume cannot pick up the earlier run's state."""
        old = []
        if checkpoints:
            old = [p for p in self.out.glob("checkpoint-*") if p.is_dir()] + list(
                self.out.glob(".tmp-checkpoint-*")
            )
            old = [p for p in old if not self._is_start(p)]
        if old:
            self.log(f"resume: false: removing {len(old)} checkpoint(s) of an earlier run in {self.out}")
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        for p in [self.out / "log.jsonl", *self.out.glob("skipped.rank*.jsonl"), *self.out.glob(".optim-*")]:
            p.unlink(missing_ok=True)

    def latest_checkpoint(self) -> Path | None:
        if not self.out.is_dir():
            return None
        done = [p for p in self.out.glob("checkpoint-*") if (p / "train_state.pt").exists()]
        return max(done, key=checkpoint_step) if done else None

    def _model_state_for_save(self) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) state dict on CPU; only rank 0 gets it under FSDP."""
        if self.world > 1 and self.cfg.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(
                self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            return sd if self.is_main else None
        state = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
        if self.master is not None:  # save the fp32 masters: a resumed run continues exactly
            state.update((k, m.detach().cpu()) for k, m in self.master.named_masters(self.raw_model))
            state.update(self.master.named_originals(self.raw_model))  # frozen weights, unrounded
        return state

    def _export_model(self, state: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Save the model (LoRA merged when asked) in the configured layout with MODEL's writer."""
        from interleaf.model.checkpoint import save_checkpoint

        # a fresh CPU copy built from the config (FSDP-sharded modules cannot be deep-copied); its
        # random init must not consume the training RNG, or a resumed run would diverge
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            model = type(self.raw_model)(copy.deepcopy(self.raw_model.config))
            if cfg.use_llm_lora:
                apply_llm_lora(model, cfg.use_llm_lora, dropout=cfg.lora_dropout)
            if cfg.use_backbone_lora:
                apply_lora(model.vision_model, VIT_TARGETS, cfg.use_backbone_lora, dropout=cfg.lora_dropout)
        model.load_state_dict(state)
        model.language_model.tie_weights()
        adapter = None
        if has_lora(model):
            if self.cfg.merge_lora_on_save:
                merge_lora(model)
            else:
                adapter = {k: v for k, v in state.items() if "lora_" in k}
                merge_lora(model, merge=False)
        save_checkpoint(model, self.tokenizer, str(out_dir), layout=self.cfg.save_layout)
        if adapter is not None:
            from safetensors.torch import save_file

            from interleaf.model.checkpoint import ADAPTER_CONFIG, ADAPTER_FILE

            # clones: the members of a fused group share one A tensor, which safetensors will not write twice
            save_file({k: v.clone() for k, v in adapter.items()}, str(out_dir / ADAPTER_FILE))
            # what rebuilds it (interleaf's loader merges it at load: W + alpha / r * B @ A)
            parts = {}
            if cfg.use_llm_lora:
                parts["llm"] = {
                    "r": cfg.use_llm_lora,
                    "alpha": 2 * cfg.use_llm_lora,
                    "targets": list(LLM_TARGETS),
                }
            if cfg.use_backbone_lora:
                r = cfg.use_backbone_lora
                parts["vision"] = {"r": r, "alpha": 2 * r, "targets": list(VIT_TARGETS)}
            meta = {"format": "interleaf-lora", "parts": parts, "lora_dropout": cfg.lora_dropout}
            (out_dir / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")

    def save(self, final: bool = False) -> Path:
        """Atomic checkpoint: written to a temporary folder, then renamed into place."""
        cfg = self.cfg
        name = f"checkpoint-{self.step}"
        final_dir = self.out / name
        tmp = self.out / f".tmp-{name}"
        state = self._model_state_for_save()
        per_rank = all_gather_object(
            {"rng": rng_state(), **self._data_position()},
            self.world,
        )
        optim = self.optimizer.state_dict()
        if self.world > 1 and cfg.distributed == "fsdp":
            torch.save(optim, self.out / f".optim-{name}.rank{self.rank}.pt")
        self._barrier()
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._export_model(state, tmp)
            train_state = {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "ranks": per_rank,
                "losses": self.losses,
                "config": cfg.to_dict(),
                "world_size": self.world,
            }
            if self.world > 1 and cfg.distributed == "fsdp":
                for r in range(self.world):
                    os.replace(self.out / f".optim-{name}.rank{r}.pt", tmp / f"optimizer.rank{r}.pt")
            else:
                train_state["optimizer"] = optim
            if has_lora(self.raw_model):
                trainable = {n for n, p in self.raw_model.named_parameters() if p.requires_grad}
                train_state["trainable"] = {k: v for k, v in state.items() if k in trainable}
            torch.save(train_state, tmp / "train_state.pt")
            if final_dir.exists():
                remove_checkpoint(final_dir)
            os.replace(tmp, final_dir)
            self._prune()
        self._barrier()
        return final_dir

    def _prune(self) -> None:
        limit = self.cfg.save_total_limit
        if limit <= 0:
            return
        folders = sorted(
            (p for p in self.out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
            key=checkpoint_step,
        )
        done = [p for p in folders if (p / "train_state.pt").exists()]
        if not done:
            return
        newest = checkpoint_step(done[-1])
        # older folders go, complete or not (an incomplete one is what a kill part-way through an
        # earlier removal left); never the checkpoint this run starts from
        for old in folders:
            if old in done[-limit:] or checkpoint_step(old) >= newest:
                continue
            if not self._is_start(old):
                remove_checkpoint(old, ignore_errors=True)

    def _load_state(self, ckpt: Path, lora: bool) -> None:
        try:
            state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated, not a torch file
            raise CheckpointError(
                f"{ckpt / 'train_state.pt'}: cannot read ({str(exc).splitlines()[0]}); "
                f"remove {ckpt} to resume from the checkpoint before it"
            ) from None
        if state.get("world_size", 1) != self.world:
            raise CheckpointError(
                f"{ckpt}: saved with {state.get('world_size')} processes, resuming with {self.world}"
            )
        if lora:
            missing = self.raw_model.load_state_dict(state["trainable"], strict=False)
            if missing.unexpected_keys:
                raise CheckpointError(f"{ckpt}: unexpected trainable weights {missing.unexpected_keys[:3]}")
            if self.master is not None:
                self.master.load(state["trainable"], self.raw_model)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.optimizer.load_state_dict(
                torch.load(ckpt / f"optimizer.rank{self.rank}.pt", weights_only=False)
            )
        self.scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][self.rank]
        self.batcher.load_state_dict(mine["data"])
        self.skip_log.restore(mine.get("skips", {}))
        set_rng_state(mine["rng"])
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state["losses"]]
        # the log keeps only what the resumed run will not write again
        log_path = self.out / "log.jsonl"
        if self.is_main and log_path.exists():
            kept = [
                ln
                for ln in log_path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= self.step
            ]
            replace_text(log_path, "".join(ln + "\n" for ln in kept))
        self.log(f"resumed from {ckpt} at step {self.step}")

    # -- the loop -------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _stage(self) -> tuple[dict[str, Any], Any]:
        """Build the next micro-batch and start its copy to the device: (batch, copy-done event)."""
        batch = collate(self.batcher.next_batch(), self.pad_id, self.cfg.loss_reduction, block_mask=False)
        batch["weight_sum"] = float(batch["loss_weight"].sum(dtype=torch.float64))  # on the host: no sync
        if self._copy_stream is None:
            return batch, None
        # pinned memory and a side stream: the copy overlaps the kernels already queued
        with torch.cuda.stream(self._copy_stream):
            batch = {k: (v.pin_memory().to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                     for k, v in batch.items()}  # fmt: skip
            return batch, self._copy_stream.record_event()

    def _data_position(self) -> dict[str, Any]:
        """Where the data stands for a checkpoint: before the micro-batch read ahead, if there is one."""
        if self._ahead is not None:
            return self._ahead[1]
        return {"data": self.batcher.state_dict(), "skips": dict(self.skip_log.counts)}

    def _next_micro_batch(self) -> dict[str, Any]:
        """The next micro-batch, on the device: the one read ahead, or a new one."""
        if self._ahead is not None:
            batch, copied = self._ahead[0].result()
            self._ahead = None
        else:
            batch, copied = self._stage()
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for v in batch.values():
                if torch.is_tensor(v):
                    v.record_stream(compute)  # allocated on the copy stream, used on this one
        return batch

    def _read_ahead(self) -> None:
        """Start building the next step's first micro-batch: in the loader thread while this step's
        kernels are queued and run, or here (the position before it is kept for checkpoints, so a
        resumed run reads it again)."""
        position = self._data_position()
        if self._loader is not None:
            self._ahead = (self._loader.submit(self._stage), position)
        else:
            done: Future = Future()
            done.set_result(self._stage())
            self._ahead = (done, position)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its statistics.

        The loss is ``sum(w * CE) / sum(w)`` over every micro-batch of every rank in the step (for the
        ``token``, ``sample`` and ``square`` weights alike), so a step's update does not depend on how
        its samples are split into micro-batches and ranks: 2 processes give what 1 process gives
        with twice the ``grad_accum``. Each micro-batch backpropagates ``sum(w * CE)`` (one process:
        divided by its first micro-batch's ``sum(w)``); the gradients are rescaled to the step's weight
        sum (all-reduced, one number) before clipping.
        """
        cfg = self.cfg
        self.step_module.train()
        losses = []
        tokens = samples = 0
        weight = 0.0
        # one process divides by its first micro-batch's weight sum before backward, so a step of one
        # micro-batch is bit for bit the plain mean loss (the rescale below is then exactly 1.0); ranks
        # backpropagate unnormalised sums, as their weight sums differ until the all-reduce
        ref = None if self.world == 1 else 1.0
        more = self.step + 1 < cfg.max_steps
        for micro in range(cfg.grad_accum):
            batch = self._next_micro_batch()
            tokens += batch["num_tokens"]
            samples += batch["num_samples"]
            weight += batch["weight_sum"]
            if ref is None:
                ref = max(batch["weight_sum"], 1e-8)
            last = micro == cfg.grad_accum - 1
            if last and more and self._loader is not None:
                self._read_ahead()  # the loader thread works while this micro-batch's kernels are queued
            sync = nullcontext()
            if self.world > 1 and cfg.distributed == "ddp" and not last:
                sync = self.step_module.no_sync()
            with sync:
                with self._autocast():
                    loss_sum, _ = self.step_module(batch)
                (loss_sum / ref).backward()
            losses.append(loss_sum.detach())  # no host sync: the next micro-batch is built meanwhile
        lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups if "no_decay" not in g["name"]}
        if self.world > 1:  # the step's weight sum over all ranks (DDP and FSDP average the gradients)
            import torch.distributed as dist

            t = torch.tensor([weight], device=self.device, dtype=torch.float64)
            dist.all_reduce(t)
            weight = float(t[0])
        weight = max(weight, 1e-8)
        grad_norm = optimizer_step(self.optimizer, self.master, cfg.max_grad_norm, ref / weight * self.world)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if more and self._loader is None:
            self._read_ahead()  # built here, while the queued kernels run
        # the one host sync of the step, after everything is queued
        loss_sum = float(torch.stack(losses).double().sum())
        # skips up to the micro-batch read ahead (what a checkpoint now would count)
        skipped = sum((self._ahead[1]["skips"] if self._ahead is not None else self.skip_log.counts).values())
        if self.world > 1:  # loss, counts and skips of all ranks (the skips for the log)
            t = torch.tensor(
                [loss_sum, float(tokens), float(samples), float(skipped)],
                device=self.device,
                dtype=torch.float64,
            )
            dist.all_reduce(t)
            loss_sum, tokens, samples, skipped = float(t[0]), int(t[1]), int(t[2]), int(t[3])
        return {
            "loss": loss_sum / weight,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "samples": samples,
            "skipped": skipped,
            **lrs,
        }

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        writer = None
        if cfg.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self.log("tensorboard is not installed; logging to log.jsonl only")
        log_path = self.out / "log.jsonl"
        t_start = time.perf_counter()
        tokens_total = 0
        self.log(
            f"training steps {self.step + 1}..{cfg.max_steps} on {self.device} (world size {self.world})"
        )
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            stats = self.train_step()
            self.step += 1
            dt = time.perf_counter() - t0
            tokens_total += stats["tokens"]
            self.losses.append((self.step, stats["loss"]))
            if self.is_main and (self.step % max(1, cfg.log_steps) == 0 or self.step == cfg.max_steps):
                position = self._data_position()
                record = {
                    "step": self.step,
                    "loss": stats["loss"],
                    "grad_norm": stats["grad_norm"],
                    "tokens": stats["tokens"],
                    "samples": stats["samples"],
                    "tokens_per_s": stats["tokens"] / dt,
                    "epoch": position["data"]["stream"]["epoch"],
                    "skipped": stats["skipped"],  # all ranks'
                    **{k: v for k, v in stats.items() if k.startswith("lr_")},
                }
                with log_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, self.step)
                self.log(
                    f"step {self.step}/{cfg.max_steps} loss {stats['loss']:.4f} grad {stats['grad_norm']:.2f} "
                    f"{stats['tokens'] / dt:.0f} tok/s"
                )
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                self.save()
        skipped = _merge_counts(all_gather_object(dict(self.skip_log.counts), self.world))  # all ranks'
        # (gathered before the save, which ends on a barrier: a rank leaving straight after an
        # all-gather can tear gloo's connections down while its peer is still in it)
        ckpt = self.save(final=True)
        elapsed = time.perf_counter() - t_start
        if writer is not None:
            writer.close()
        self.log(f"done: {self.step} steps in {elapsed:.1f}s; {skip_summary(skipped)}; checkpoint {ckpt}")
        return {
            "checkpoint": str(ckpt),
            "steps": self.step,
            "losses": self.losses,
            "skipped": skipped,
        }

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.stream.close()
        if self.world > 1:
            import gc

            import torch.distributed as dist

            # free the DDP/FSDP modules (they hold the process group) while the interpreter is whole:
            # left to interpreter exit, gloo's worker threads go down with it and a rank of a finished
            # run sometimes aborted there (SIGABRT, 'terminate called without an active exception')
            self.step_module = self.raw_model = self.optimizer = self.scheduler = self.master = None
            if self.cfg.distributed == "fsdp":
                _clear_dtensor_caches()
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()


def _clear_dtensor_caches() -> None:
    """Empty the module-level caches of DTensor (FSDP2's parameters): their entries hold the device
    mesh, and so the process group, past ``destroy_process_group``. Names as in torch 2.13; a cache
    another version lacks is skipped (the torchrun tests would show one it adds)."""
    from torch.distributed.tensor import _collective_utils, _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    if hasattr(_redistribute, "clear_redistribute_planner_cache"):
        _redistribute.clear_redistribute_planner_cache()
    topo = getattr(_collective_utils, "MeshTopoInfo", None)
    for cached in (
        getattr(_redistribute, "_gen_transform_infos", None),
        getattr(topo, "build_from_mesh", None),
    ):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


class _Concat:
    """Two datasets as one (conversation data first, then corpus rows)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def get(self, i: int, epoch: int = 0):
        for p in self.parts:
            if i < len(p):
                return p.get(i, epoch)
            i -= len(p)
        raise IndexError(i)


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Set up and run a training job; returns the final checkpoint path, steps, losses and skip counts."""
    trainer = Trainer(cfg, log=log).setup()
    try:
        return trainer.train()
    finally:
        trainer.close()
