"""Training configuration: one flat dataclass, loaded from YAML with ``--set key=value`` overrides.

Every key is checked before training starts: an unknown key or a value of the wrong type is
refused with a :class:`~interleaf.errors.ConfigError` naming the key. Stage presets fill in the
freeze flags and learning rates of InternVL's recipes; keys given explicitly always win.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.errors import ConfigError

# Stage presets as the upstream recipes (spec 6): stage 1 trains only the projector at a high
# learning rate, stage 2 trains everything at a low one. Mono-InternVL registers its own.
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "stage1": {"freeze_vit": True, "freeze_mlp": False, "freeze_llm": True, "lr": 2e-4},
    "stage2": {"freeze_vit": False, "freeze_mlp": False, "freeze_llm": False, "lr": 4e-5},
    # Mini-InternVL domain adaptation: full fine-tune, lr 1e-5, wd 0.01, square loss, packing.
    "adapt": {
        "freeze_vit": False,
        "freeze_mlp": False,
        "freeze_llm": False,
        "lr": 1e-5,
        "weight_decay": 0.01,
        "loss_reduction": "square",
        "packing": True,
    },
}


@dataclass
class TrainConfig:
    """All knobs of ``interleaf train``. Grouped by purpose; see docs for each key."""

    # --- model -----------------------------------------------------------------------------
    model_path: str | None = None  # checkpoint dir to start from (either layout)
    model_preset: str | None = None  # or: random init from a preset (interleaf.model.PRESETS)
    model_overrides: dict = field(
        default_factory=dict
    )  # preset field overrides (e.g. {"llm.num_hidden_layers": 2})
    template: str | None = None  # chat template; default: the checkpoint's
    # InternViT stochastic depth, always set on the model as upstream's --drop_path_rate (its scripts: 0.1)
    drop_path_rate: float = 0.0
    output_dir: str = "runs/train"

    # --- data ------------------------------------------------------------------------------
    meta_path: str | None = None  # InternVL meta JSON (conversation data)
    corpus_paths: list = field(default_factory=list)  # interleaved docs / pairs (JSONL or Parquet)
    max_seq_length: int = 4096
    max_dynamic_patch: int = 6
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    min_num_frame: int = 8
    max_num_frame: int = 32
    data_augment: bool = False
    shuffle: bool = True

    # --- packing and loss --------------------------------------------------------------------
    packing: bool = True
    max_packed_tokens: int = 16384  # upstream InternVL2.5 packed training
    max_packed_images: int = 48  # tiles per packed sequence (upstream num_images_expected)
    pack_lookahead: int = 8  # pending samples that may wait for a later pack
    num_workers: int = -1  # data-loading threads (-1: half the cores, at most 8, on a GPU; 0 on CPU)
    loss_reduction: str = "token"  # token | sample | square
    batch_size: int = 1  # sequences (packed or not) per micro-batch

    # --- optimisation ------------------------------------------------------------------------
    stage: str | None = None  # stage1 | stage2 | adapt (presets above)
    lr: float = 4e-5
    vision_lr: float | None = None  # default: lr
    mlp_lr: float | None = None
    llm_lr: float | None = None
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    max_steps: int = 100
    seed: int = 42

    # --- what trains -------------------------------------------------------------------------
    freeze_vit: bool = False
    freeze_mlp: bool = False
    freeze_llm: bool = False
    trainable_patterns: list = field(default_factory=list)  # regexes re-enabled after freezing
    use_llm_lora: int = 0  # LoRA rank on the LLM (0 = off); alpha = 2r
    use_backbone_lora: int = 0  # LoRA rank on the ViT
    lora_dropout: float = 0.05
    merge_lora_on_save: bool = True

    # --- precision and memory ----------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda
    # auto (bf16-master on cuda, fp32 on cpu) | fp32 | bf16 (autocast over fp32 weights) |
    # bf16-master (bf16 weights, fp32 master weights in the optimizer; see train/precision.py)
    dtype: str = "auto"
    # recompute layers in backward; None: on a GPU (as upstream, so 16k-token packs fit), off on CPU
    grad_checkpointing: bool | None = None
    compile: bool = False  # torch.compile each ViT block and decoder layer (fuses norms, RoPE, SwiGLU)
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)

    # --- saving and logging ------------------------------------------------------------------
    save_steps: int = 0  # 0 = only at the end
    save_layout: str = "internvl_chat"  # internvl_chat | hf
    save_total_limit: int = 2
    log_steps: int = 1
    tensorboard: bool = False
    resume: bool = True  # continue from the newest checkpoint in output_dir

    def resolved_lr(self, part: str) -> float:
        value = {"vision": self.vision_lr, "mlp": self.mlp_lr, "llm": self.llm_lr}[part]
        return self.lr if value is None else value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "loss_reduction": ("token", "sample", "square"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "fp32", "bf16", "bf16-master"),
    "save_layout": ("internvl_chat", "hf"),
    "distributed": ("ddp", "fsdp"),
}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to the field's type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {annotation}, got {type(value).__name__} {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list or origin is list:
        if isinstance(value, list):
            return value
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - all fields use the types above
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key '{key}': expected {name}, got {type(value).__name__} {value!r}")


def build_config(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate ``values`` (unknown keys, types, choices), apply the stage preset, return the config."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in names:
            close = [n for n in names if n.split("_")[0] == str(key).split("_")[0]]
            hint = f" (did you mean {', '.join(sorted(close)[:3])}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
    checked = {key: _check_type(key, value, hints[key]) for key, value in values.items()}
    stage = checked.get("stage")
    merged: dict[str, Any] = {}
    if stage is not None:
        import interleaf.train.evip  # noqa: F401  (registers Mono-InternVL's EViP stages)

        if stage not in STAGE_PRESETS:
            raise ConfigError(
                f"config key 'stage': unknown stage {stage!r} (choose from {sorted(STAGE_PRESETS)})"
            )
        merged.update(STAGE_PRESETS[stage])
    merged.update(checked)
    for key, choices in _CHOICES.items():
        if key in merged and merged[key] not in choices:
            raise ConfigError(f"config key '{key}': {merged[key]!r} is not one of {', '.join(choices)}")
    cfg = TrainConfig(**merged)
    if cfg.model_path is None and cfg.model_preset is None:
        raise ConfigError("config key 'model_path': set model_path (a checkpoint) or model_preset")
    if cfg.model_overrides and cfg.model_path is not None:
        raise ConfigError("config key 'model_overrides': applies to model_preset only, not to model_path")
    if cfg.meta_path is None and not cfg.corpus_paths:
        raise ConfigError("config key 'meta_path': set meta_path (InternVL meta JSON) or corpus_paths")
    for key in (
        "max_seq_length",
        "max_steps",
        "grad_accum",
        "batch_size",
        "max_packed_tokens",
        "max_packed_images",
        "max_dynamic_patch",
        "min_dynamic_patch",
        "min_num_frame",
    ):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}': must be positive, got {getattr(cfg, key)}")
    if cfg.min_dynamic_patch > cfg.max_dynamic_patch:  # the saved checkpoint could not be loaded
        raise ConfigError(
            f"config key 'min_dynamic_patch': {cfg.min_dynamic_patch} is above "
            f"max_dynamic_patch {cfg.max_dynamic_patch}"
        )
    if cfg.num_workers < -1:  # -1 (the default) means automatic
        raise ConfigError(
            f"config key 'num_workers': must be >= 0, or -1 for automatic; got {cfg.num_workers}"
        )
    for key in (
        *("use_llm_lora", "use_backbone_lora", "lr", "vision_lr", "mlp_lr", "llm_lr"),
        *("weight_decay", "warmup_steps", "pack_lookahead"),
    ):
        value = getattr(cfg, key)
        if value is not None and not 0 <= value < math.inf:  # also refuses nan
            raise ConfigError(f"config key '{key}': must be >= 0, got {value}")
    for key in ("warmup_ratio", "min_lr_ratio"):  # fractions of max_steps / of the peak lr
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"config key '{key}': must be in [0, 1], got {getattr(cfg, key)}")
    for key in ("drop_path_rate", "lora_dropout", "adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': must be in [0, 1), got {getattr(cfg, key)}")
    for pattern in cfg.trainable_patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError(
                f"config key 'trainable_patterns': {pattern!r} is not a regex ({exc})"
            ) from None
    # checked here, not per video: a frame range that cannot be drawn from would skip every video
    if cfg.max_num_frame < cfg.min_num_frame:
        raise ConfigError(
            f"config key 'max_num_frame': {cfg.max_num_frame} is below min_num_frame {cfg.min_num_frame}"
        )
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``lr=1e-4``, ``freeze_llm=true``, ``x=[a, b]``)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{key}': cannot parse value {raw!r}: {str(exc).splitlines()[0]}"
        ) from None
    return key.strip(), value


def _beside(config_path: Path, value: Any) -> Any:
    """A relative path that exists next to the YAML file, made relative to it; else ``value`` as is."""
    if isinstance(value, str) and not Path(value).is_absolute() and (config_path.parent / value).exists():
        return str(config_path.parent / value)
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (relative paths in it resolve against its folder) and apply overrides."""
    import yaml

    values: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        values.update(loaded)
        for key in ("model_path", "meta_path"):
            if key in values:
                values[key] = _beside(path, values[key])
        # output_dir is created by the run, so it cannot be looked up: always beside the YAML
        # (as `interleaf adapt` does), or a first run and its resume would use different folders
        out = values.get("output_dir")
        if isinstance(out, str) and not Path(out).is_absolute():
            values["output_dir"] = str(path.parent / out)
        if isinstance(values.get("corpus_paths"), list):
            values["corpus_paths"] = [_beside(path, p) for p in values["corpus_paths"]]
    for item in overrides or []:
        key, value = parse_override(item)
        values[key] = value
    return build_config(values, source)
