"""Model presets and random-weight checkpoints made offline.

``tiny*`` presets (about 2M parameters, 448 px tiles, 256 tokens per tile) are for tests and demos;
the real-shape presets reproduce the published InternVL2 / InternVL2.5 / InternVL3.5 small models
(InternViT-300M + Qwen2 / InternLM2 / Phi-3 / Qwen2.5 / Qwen3) with random weights and the offline
tokenizer (embedding rows keep the real vocabulary size). Phi-3's real longrope factor lists are not
embedded: the 4B preset uses a smooth stand-in with the same shape and scaling type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from interleaf.errors import ConfigError
from interleaf.model.config import InternVLConfig, LLMConfig, VisionConfig

VIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, qkv_bias=True,
    qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6, initializer_factor=0.1,
)  # fmt: skip
VIT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, qkv_bias=True,
                initializer_factor=0.1)  # fmt: skip


def _phi3_longrope(head_dim: int, original: int = 4096) -> dict:
    half = head_dim // 2
    return {
        "rope_type": "longrope",
        "short_factor": [round(1.0 + 0.1 * i / max(half - 1, 1), 4) for i in range(half)],
        "long_factor": [round(math.exp(math.log(64.0) * i / max(half - 1, 1)), 4) for i in range(half)],
        "original_max_position_embeddings": original,
    }


def _tiny_llm(family: str, **kw) -> dict:
    base = dict(family=family, vocab_size=0, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=1e6, tie_word_embeddings=False)  # fmt: skip
    base.update(kw)
    return base


# name -> (vision kwargs, llm kwargs, InternVLConfig kwargs); vocab_size 0 = size of the offline tokenizer
PRESETS: dict[str, tuple[dict, dict, dict]] = {
    "tiny": (VIT_TINY, _tiny_llm("qwen2", qkv_bias=True), dict(template="Hermes-2")),
    "tiny-internlm2": (
        VIT_TINY,
        _tiny_llm("internlm2", rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-5),
        dict(template="internlm2-chat"),
    ),
    "tiny-phi3": (
        VIT_TINY,
        _tiny_llm(
            "phi3",
            num_key_value_heads=4,
            rope_theta=10000.0,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling=_phi3_longrope(32),
            rms_norm_eps=1e-5,
        ),
        dict(template="phi3-chat"),
    ),  # fmt: skip
    "tiny-llama": (VIT_TINY, _tiny_llm("llama", tie_word_embeddings=True), dict(template="internvl2_5")),
    # head_dim 64 != hidden / heads (32), as Qwen3's 128 != 1024 / 16
    "tiny-qwen3": (VIT_TINY, _tiny_llm("qwen3", head_dim=64), dict(template="internvl2_5")),
    "internvl2-1b": (
        VIT_300M,
        dict(
            family="qwen2",
            vocab_size=151655,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
        ),
        dict(template="Hermes-2"),
    ),  # fmt: skip
    "internvl2-2b": (
        VIT_300M,
        dict(
            family="internlm2",
            vocab_size=92553,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
        dict(template="internlm2-chat"),
    ),  # fmt: skip
    "internvl2-4b": (
        VIT_300M,
        dict(
            family="phi3",
            vocab_size=32020,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            original_max_position_embeddings=4096,
            rope_scaling=_phi3_longrope(96),
        ),
        dict(template="phi3-chat"),
    ),  # fmt: skip
    "internvl2_5-1b": (
        VIT_300M,
        dict(
            family="qwen2",
            vocab_size=151674,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
        ),
        dict(template="internvl2_5"),
    ),  # fmt: skip
    "internvl2_5-4b": (
        VIT_300M,
        dict(
            family="qwen2",
            vocab_size=151674,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
        ),
        dict(template="internvl2_5"),
    ),  # fmt: skip
    # InternVL3.5-1B: InternViT-300M-448px-V2_5 + Qwen3-0.6B, lm_head untied (the -HF release's
    # 1,060,897,792 parameters are these shapes with an untied 151936 x 1024 lm_head)
    "internvl3_5-1b": (
        VIT_300M,
        dict(
            family="qwen3",
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
        ),
        dict(template="internvl2_5"),
    ),  # fmt: skip
}
_BOS_FAMILIES = ("internlm2", "phi3")
DEFAULTS = dict(ps_version="v2", select_layer=-1, force_image_size=448, downsample_ratio=0.5,
                min_dynamic_patch=1, max_dynamic_patch=12, use_thumbnail=True, dynamic_image_size=True)  # fmt: skip


def preset_config(name: str, vocab_size: int | None = None) -> InternVLConfig:
    """The :class:`InternVLConfig` of a preset (``vocab_size`` fills the tiny presets' 0)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    vision_kw, llm_kw, top_kw = PRESETS[name]
    llm_kw = dict(llm_kw)
    if not llm_kw["vocab_size"]:
        llm_kw["vocab_size"] = vocab_size or 4096
    if llm_kw["family"] in ("internlm2", "llama", "phi3"):
        llm_kw.setdefault("qkv_bias", False)
    return InternVLConfig(vision=VisionConfig(**vision_kw), llm=LLMConfig(**llm_kw), **DEFAULTS, **top_kw)


def build_model(
    cfg: InternVLConfig, seed: int = 0, dtype: torch.dtype = torch.float32, model_cls: Callable | None = None
):
    """A randomly initialised model, built without a throw-away default init (fast at real shapes)."""
    from interleaf.model.checkpoint import rebuild_buffers
    from interleaf.model.internvl import InternVLChatModel

    model_cls = model_cls or InternVLChatModel
    with torch.device("meta"):
        model = model_cls(cfg)
    model.to_empty(device="cpu")
    model.to(dtype)
    model.language_model.tie_weights()
    rebuild_buffers(model)
    model.init_weights(seed)
    return model.eval()


def make_tokenizer(family: str, vocab_size: int | None = None):
    from interleaf.model.tokenizer import build_offline_tokenizer

    return build_offline_tokenizer(bos=family in _BOS_FAMILIES)


def apply_overrides(cfg: InternVLConfig, overrides: dict[str, Any] | None) -> InternVLConfig:
    """Set dotted config fields in place (``{"llm.num_hidden_layers": 2, "max_dynamic_patch": 6}``)."""
    for key, value in (overrides or {}).items():
        *path, last = str(key).split(".")
        target = cfg
        for part in path:
            target = getattr(target, part, None)
        if (
            target is None
            or not dataclasses.is_dataclass(target)
            or last not in {f.name for f in dataclasses.fields(target)}
        ):
            raise ConfigError(f"model override {key!r}: no such config field")
        current = getattr(target, last)
        if not _same_kind(current, value):
            raise ConfigError(
                f"model override {key!r}: must be {type(current).__name__} like the preset's {current!r}, "
                f"got {type(value).__name__}"
            )
        if key == "llm.rope_scaling":
            from interleaf.model.config import parse_rope_scaling

            value = parse_rope_scaling(value, f"model override {key!r}")
        setattr(target, last, value)
    return cfg


def _same_kind(current: Any, value: Any) -> bool:
    """Whether ``value`` may replace ``current`` (bool is not a number; an int is a float)."""
    if current is None:
        return True
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(current))


def preset_config_for(preset: str, tok: Any) -> InternVLConfig:
    """:func:`preset_config` for the tokenizer ``tok``: a tiny preset's vocabulary is ``len(tok)``
    rounded up to 64, and the image, BOS, EOS and padding token ids are ``tok``'s."""
    cfg = preset_config(preset, vocab_size=-(-len(tok) // 64) * 64)
    if len(tok) > cfg.llm.vocab_size:
        raise ConfigError(
            f"preset {preset}: tokenizer has {len(tok)} tokens > vocab_size {cfg.llm.vocab_size}"
        )
    set_token_ids(cfg, tok)
    return cfg


def set_token_ids(cfg: InternVLConfig, tok: Any) -> None:
    """The image token ids from ``tok``; BOS (for the families that use one), EOS (the template's
    end of turn) and padding where the config has none."""
    from interleaf.model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

    vocab = tok.get_vocab()
    cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id = (
        vocab.get(IMG_CONTEXT), vocab.get(IMG_START), vocab.get(IMG_END)
    )  # fmt: skip
    if cfg.llm.bos_token_id is None and cfg.llm.family in _BOS_FAMILIES:
        cfg.llm.bos_token_id = vocab.get("<s>")
    if cfg.llm.eos_token_id is None:
        cfg.llm.eos_token_id = vocab.get("<|end|>" if cfg.template == "phi3-chat" else "<|im_end|>")
    if cfg.llm.pad_token_id is None:
        cfg.llm.pad_token_id = vocab.get("<|endoftext|>")


def init_model(
    preset: str,
    out_dir: str | Path,
    layout: str = "internvl_chat",
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``preset`` (with the offline tokenizer) to ``out_dir``.

    ``dtype`` default: float32 for tiny presets, bfloat16 for real shapes. Mono-InternVL presets
    (``tiny-mono``, ``mono-internvl-2b``) are written in their released layout. ``overrides`` set
    config fields by dotted name before the weights are made.
    """
    from interleaf.model.checkpoint import parse_dtype, save_checkpoint
    from interleaf.model.mono_checkpoint import MONO_PRESETS, init_mono_model

    if preset in MONO_PRESETS:
        if layout != "internvl_chat":
            raise ConfigError(
                f"layout: Mono-InternVL preset {preset} is saved in the internvl_chat layout only"
            )
        return init_mono_model(preset, out_dir, seed=seed, dtype=dtype, overrides=overrides)
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    dtype = parse_dtype(dtype) or (torch.float32 if preset.startswith("tiny") else torch.bfloat16)
    tok = make_tokenizer(PRESETS[preset][1]["family"])
    cfg = preset_config_for(preset, tok)
    apply_overrides(cfg, overrides)
    model = build_model(cfg, seed=seed, dtype=dtype)
    return save_checkpoint(model, tok, out_dir, layout=layout)
