"""EViP (Endogenous Visual Pre-training) stage presets for Mono-InternVL, on the interleaf trainer.

EViP is delta tuning: the pre-trained LLM stays frozen while the new visual parameters learn, so the
model keeps its language ability exactly (text tokens never touch a trained weight).

=========  ============================  ==========================================================
stage      data (paper)                  trains
=========  ============================  ==========================================================
S1.1       noisy image-text pairs        patch embedding, ``mlp1``, visual experts; LLM frozen
S1.2       synthetic captions            same as S1.1
S1.3       task data (caption/OCR/det.)  + the LLM's multi-head attention (``self_attn.*``)
S2         instruction tuning            everything
=========  ============================  ==========================================================

They map onto the trainer's freeze flags exactly as upstream's ``--freeze_llm True --unfreeze_ve``
(and ``--unfreeze_attn`` for S1.3): ``freeze_vit`` (the patch embedding is Mono's ``vision_model``),
``freeze_mlp``, ``freeze_llm`` plus ``trainable_patterns`` re-enabling the expert (and attention)
parameters. Importing this module registers them as ``stage: evip-s1.1`` ... ``evip-s2`` in
:data:`interleaf.train.config.STAGE_PRESETS`. Learning rates: S2 uses the released SFT script's 4e-5;
the pre-training rates are interleaf defaults (the paper's are not in the released code).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interleaf.train.config import STAGE_PRESETS

# Parameter-name regexes (searched in the model's parameter names).
EXPERT_PATTERNS = [r"\.feed_forward_ve\.", r"\.self_attn\.[qkvo]_proj_ve\."]
ATTENTION_PATTERNS = [r"\.self_attn\."]

_DELTA = {"freeze_vit": False, "freeze_mlp": False, "freeze_llm": True}
EVIP_PRESETS: dict[str, dict[str, Any]] = {
    "evip-s1.1": {**_DELTA, "trainable_patterns": list(EXPERT_PATTERNS), "lr": 2e-4},  # concept learning
    "evip-s1.2": {**_DELTA, "trainable_patterns": list(EXPERT_PATTERNS), "lr": 1e-4},  # semantic learning
    "evip-s1.3": {
        **_DELTA,
        "trainable_patterns": EXPERT_PATTERNS + ATTENTION_PATTERNS,
        "lr": 5e-5,
    },  # alignment
    "evip-s2": {
        "freeze_vit": False,
        "freeze_mlp": False,
        "freeze_llm": False,
        "lr": 4e-5,
    },  # instruction tuning
}
STAGE_PRESETS.update(EVIP_PRESETS)

# Stages that must leave the text path of the LLM untouched.
DELTA_STAGES = ("evip-s1.1", "evip-s1.2")


def evip_stage_config(stage: str, **overrides: Any):
    """A :class:`~interleaf.train.config.TrainConfig` for ``stage`` (validated like a YAML config)."""
    from interleaf.train.config import build_config

    return build_config({"stage": stage, **overrides}, source=f"EViP stage {stage}")


def apply_evip_stage(model: nn.Module, stage: str) -> dict[str, int]:
    """Set ``requires_grad`` on a Mono model for ``stage`` (the trainer's own freeze logic); returns
    the trainable parameter counts per part."""
    from interleaf.errors import ConfigError
    from interleaf.train.config import TrainConfig
    from interleaf.train.trainer import set_trainable

    if stage not in EVIP_PRESETS:
        raise ConfigError(f"stage: unknown EViP stage {stage!r} (choose from {', '.join(EVIP_PRESETS)})")
    preset = {k: v for k, v in EVIP_PRESETS[stage].items() if k != "lr"}
    return set_trainable(model, TrainConfig(model_preset="-", meta_path="-", stage=stage, **preset))
