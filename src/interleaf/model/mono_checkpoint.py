"""Mono-InternVL checkpoints: the released layout, random presets, and initialisation from an LLM.

Released Mono-InternVL-2B layout (original InternVL-Chat layout, InternLM2 naming):

* ``config.json``: ``vision_config.model_type "intern_vit_patch"`` (patch embedding only),
  ``llm_config.architectures ["InternLM2VEForCausalLM"]``, template ``internlm2-chat``;
* weights: ``vision_model.embeddings.{class_embedding, patch_embedding.*, position_embedding}``, ``mlp1.*``,
  the InternLM2 LLM (``attention.wqkv`` ...) plus ``language_model.model.layers.{i}.feed_forward_ve.{w1,w2,w3}.weight``.

Visual attention experts (an interleaf option, Mono-InternVL-1.5 style; no released checkpoint has them)
are stored as ``language_model.model.layers.{i}.self_attn.{q,k,v,o}_proj_ve.*`` with
``llm_config.visual_attention_experts: true``. The transformers-native ``-hf`` layout has no Mono
counterpart, so only the original layout is written.

Command line (random preset / from an LLM or InternVL checkpoint)::

    python -m interleaf.model.mono_checkpoint init --preset tiny-mono OUT
    python -m interleaf.model.mono_checkpoint from-llm path/to/internlm2-chat-1_8b OUT [--attention-experts]

Loading goes through the model core's :func:`~interleaf.model.checkpoint.load_checkpoint` with
``model_cls=MonoInternVLChatModel``, after checking the expert weights against the config so that a
missing, extra or unexpected expert tensor gets an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from interleaf.errors import CheckpointError, ConfigError
from interleaf.model.checkpoint import load_checkpoint as _core_load_checkpoint
from interleaf.model.checkpoint import load_config
from interleaf.model.config import InternVLConfig, LLMConfig, VisionConfig
from interleaf.model.mono_internvl import (
    ATTN_EXPERTS_KEY,
    PATCH_MODEL_TYPE,
    VE_ARCH,
    MonoInternVLChatModel,
    MonoInternVLConfig,
    is_mono_config,
)

# Patch embedding of the presets. The released 2B checkpoint's width is not verified here; the LLM
# width (2048) is used, which matches its 3.1B total parameters either way within rounding.
PATCH_TINY = dict(hidden_size=64, num_hidden_layers=0, num_attention_heads=4, intermediate_size=128)
PATCH_2B = dict(hidden_size=2048, num_hidden_layers=0, num_attention_heads=16, intermediate_size=8192)

# name -> (base model-core preset for the LLM and top-level settings, patch-embedding kwargs)
MONO_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-mono": ("tiny-internlm2", PATCH_TINY),
    "mono-internvl-2b": ("internvl2-2b", PATCH_2B),
}

FAMILY_TEMPLATE = {
    "internlm2": "internlm2-chat",
    "qwen2": "Hermes-2",
    "qwen3": "internvl2_5",
    "phi3": "phi3-chat",
    "llama": "internvl2_5",
}

_EXPERT_RE = re.compile(r"(\.feed_forward_ve\.|\.self_attn\.[qkvo]_proj_ve\.)")


# ----------------------------------------------------------------------------- presets
def mono_preset_config(
    name: str, vocab_size: int | None = None, visual_attention_experts: bool = False
) -> MonoInternVLConfig:
    """Config of a Mono preset: the LLM and tiling of a model-core preset, a patch embedding for vision."""
    from interleaf.model.presets import preset_config

    if name not in MONO_PRESETS:
        raise ConfigError(
            f"preset: unknown Mono-InternVL preset {name!r} (choose from {', '.join(MONO_PRESETS)})"
        )
    base, patch = MONO_PRESETS[name]
    cfg = preset_config(base, vocab_size=vocab_size)
    cfg.vision = VisionConfig(**patch)
    cfg.select_layer = -1
    return MonoInternVLConfig.from_internvl(cfg, visual_attention_experts)


def build_mono_model(
    cfg: InternVLConfig, seed: int = 0, dtype: torch.dtype = torch.float32, copy_experts: bool = True
) -> MonoInternVLChatModel:
    """A random Mono model (experts copied from the text FFN unless ``copy_experts`` is False)."""
    from interleaf.model.presets import build_model

    model = build_model(cfg, seed=seed, dtype=dtype, model_cls=MonoInternVLChatModel)
    if copy_experts:
        model.copy_experts_from_text()
    return model


def init_mono_model(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    visual_attention_experts: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight Mono-InternVL checkpoint (released layout, offline tokenizer) to ``out_dir``.

    Expert weights are independent random tensors here (not copies), so tests see both paths differ.
    """
    from interleaf.model.checkpoint import parse_dtype
    from interleaf.model.presets import apply_overrides, make_tokenizer, set_token_ids

    if preset not in MONO_PRESETS:
        raise ConfigError(
            f"preset: unknown Mono-InternVL preset {preset!r} (choose from {', '.join(MONO_PRESETS)})"
        )
    dtype = parse_dtype(dtype) or (torch.float32 if preset.startswith("tiny") else torch.bfloat16)
    cfg0 = mono_preset_config(preset)
    family = cfg0.llm.family
    tok = make_tokenizer(family)
    cfg = mono_preset_config(
        preset, vocab_size=-(-len(tok) // 64) * 64, visual_attention_experts=visual_attention_experts
    )
    if len(tok) > cfg.llm.vocab_size:
        raise ConfigError(
            f"preset {preset}: tokenizer has {len(tok)} tokens > vocab_size {cfg.llm.vocab_size}"
        )
    set_token_ids(cfg, tok)
    apply_overrides(cfg, overrides)
    model = build_mono_model(cfg, seed=seed, dtype=dtype, copy_experts=False)
    return save_mono_checkpoint(model, tok, out_dir)


# ----------------------------------------------------------------------------- load / save
def _tensor_names(path: Path) -> set[str]:
    """Names of every tensor in a checkpoint directory (safetensors headers only; .bin files are read)."""
    from safetensors import safe_open

    from interleaf.model.checkpoint import weight_files

    names: set[str] = set()
    for f in weight_files(path):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as handle:
                    names.update(handle.keys())
            else:
                names.update(torch.load(str(f), map_location="meta", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
            raise CheckpointError(f"{f}: cannot read weights ({str(exc).splitlines()[0]})") from None
    return names


def _listing(names: Any, limit: int = 4) -> str:
    names = sorted(names, key=_natural)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expected_expert_names(cfg: InternVLConfig) -> set[str]:
    """The visual-expert tensor names a Mono model of ``cfg`` has (identical in memory and on disk)."""
    with torch.device("meta"):
        model = MonoInternVLChatModel(cfg)
    return {n for n in model.state_dict() if _EXPERT_RE.search(n)}


def check_expert_weights(names: set[str], cfg: InternVLConfig, where: str) -> None:
    """Clear errors for visual-expert tensors that do not match the config (names listed)."""
    present = {n for n in names if _EXPERT_RE.search(n)}
    arch = (cfg.llm.extra.get("architectures") or [cfg.llm.family])[0]
    if not is_mono_config(cfg):
        if present:
            raise CheckpointError(
                f"{where}: visual-expert tensors {_listing(present)} but the config describes a plain LLM "
                f"(llm_config.architectures {arch!r}, vision_config.model_type "
                f"{cfg.vision.extra.get('model_type', 'intern_vit_6b')!r}); a Mono-InternVL config has "
                f"vision_config.model_type {PATCH_MODEL_TYPE!r} and {VE_ARCH}"
            )
        return
    expected = expected_expert_names(cfg)
    if not present:
        raise CheckpointError(
            f"{where}: the config declares visual experts ({arch}, vision {PATCH_MODEL_TYPE!r}) but the LLM "
            f"has none: no tensors {_listing(expected)}; to add experts to a plain LLM use "
            "interleaf.model.mono_checkpoint.init_mono_from_llm"
        )
    missing, extra = expected - present, present - expected
    if missing:
        raise CheckpointError(f"{where}: missing visual-expert tensors: {_listing(missing)}")
    if extra:
        hint = ""
        if any("_proj_ve." in n for n in extra) and not cfg.llm.extra.get(ATTN_EXPERTS_KEY):
            hint = f" (attention-expert tensors need llm_config.{ATTN_EXPERTS_KEY}: true)"
        raise CheckpointError(
            f"{where}: visual-expert tensors the config does not use: {_listing(extra)}{hint}"
        )


def load_mono_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[MonoInternVLChatModel, Any]:
    """Load a Mono-InternVL checkpoint (released layout): ``(model, tokenizer)``, eval mode."""
    path = Path(path)
    cfg = load_config(path)
    if not is_mono_config(cfg):
        names = _tensor_names(path)
        check_expert_weights(names, cfg, path.name)  # raises when it has expert tensors
        raise CheckpointError(
            f"{path.name}: not a Mono-InternVL checkpoint (vision_config.model_type is not "
            f"{PATCH_MODEL_TYPE!r}); build one from it with init_mono_from_llm"
        )
    check_expert_weights(_tensor_names(path), cfg, path.name)
    # the model core's loader (captured at import, so a dispatching wrapper installed over it cannot loop)
    model, tokenizer = _core_load_checkpoint(
        path, device=device, dtype=dtype, model_cls=MonoInternVLChatModel
    )
    return model, tokenizer


def load_any_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """Dispatch on the config: Mono-InternVL checkpoints to :func:`load_mono_checkpoint`, the rest to
    the model core's ``load_checkpoint`` (after making sure they carry no stray expert tensors)."""
    path = Path(path)
    cfg = load_config(path)
    if is_mono_config(cfg):
        return load_mono_checkpoint(path, device=device, dtype=dtype)
    check_expert_weights(_tensor_names(path), cfg, path.name)
    return _core_load_checkpoint(path, device=device, dtype=dtype)


def save_mono_checkpoint(model: MonoInternVLChatModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the released Mono-InternVL layout (the model core's writer with the Mono config)."""
    from interleaf.model.checkpoint import save_checkpoint

    if not isinstance(model.config, MonoInternVLConfig):
        raise ConfigError("save_mono_checkpoint: the model is not a Mono-InternVL model")
    return save_checkpoint(model, tokenizer, out_dir, layout="internvl_chat")


# ----------------------------------------------------------------------------- init from an LLM
def _read_llm_only(path: Path, template: str | None) -> tuple[LLMConfig, dict[str, torch.Tensor], Any]:
    """A bare decoder-LLM checkpoint (Qwen2 / InternLM2 / Phi-3 / Llama ``config.json`` + weights)."""
    from interleaf.model.checkpoint import llm_state_from_disk, parse_llm_config, read_weights, tensor_label
    from interleaf.model.tokenizer import load_tokenizer

    source = str(path / "config.json")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: cannot read ({str(exc).splitlines()[0]})") from None
    llm = parse_llm_config(raw, source, "config")
    if (raw.get("architectures") or [None])[0] == VE_ARCH:
        raise CheckpointError(f"{source}: already an LLM with visual experts; load it as a Mono checkpoint")
    disk, origin = read_weights(path)
    stray = [n for n in disk if _EXPERT_RE.search("." + n)]
    if stray:
        raise CheckpointError(
            f"{path.name}: visual-expert tensors {_listing(stray)} in a plain {llm.family} LLM checkpoint"
        )
    sd = llm_state_from_disk(disk, llm, llm.family, lambda name: tensor_label(path, origin, name))
    tok = load_tokenizer(path, template or FAMILY_TEMPLATE[llm.family])
    return llm, sd, tok


@torch.no_grad()
def init_mono_from_llm(
    path: str | Path,
    patch_hidden_size: int | None = None,
    visual_attention_experts: bool = False,
    template: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[MonoInternVLChatModel, Any]:
    """Build Mono-InternVL from the LLM of ``path``: an InternVL checkpoint (either layout; its LLM,
    tiling and template are kept, its ViT and projector dropped) or a bare decoder-LLM checkpoint.

    Every visual expert starts as a copy of the text FFN (and attention, with attention experts); the
    patch embedding (width ``patch_hidden_size``, default the LLM width) and ``mlp1`` are random.
    Tokens the tokenizer adds (``<img>``, ``<IMG_CONTEXT>`` ...) grow the vocabulary with new rows set to
    the mean of the old ones, as upstream's fine-tune script does. Returns ``(model, tokenizer)``.
    """
    from interleaf.model.presets import DEFAULTS, set_token_ids
    from interleaf.processing.templates import get_template

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    if patch_hidden_size is not None and (isinstance(patch_hidden_size, bool) or patch_hidden_size < 1):
        raise ConfigError(f"patch_hidden_size: must be a positive int, got {patch_hidden_size!r}")
    if template is not None:
        get_template(template)  # an unknown name is refused here, not when the checkpoint is loaded
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path / 'config.json'}: expected a JSON object")
    if "llm_config" in raw or "text_config" in raw:
        base_cfg = load_config(path)
        if is_mono_config(base_cfg):
            raise CheckpointError(
                f"{path.name}: already a Mono-InternVL checkpoint; load it with load_mono_checkpoint"
            )
        check_expert_weights(_tensor_names(path), base_cfg, path.name)
        base, tok = _core_load_checkpoint(path)
        llm_cfg = base.config.llm
        llm_sd = {k: v for k, v in base.language_model.state_dict().items()}
        top = {f.name: getattr(base.config, f.name) for f in dataclasses.fields(InternVLConfig)}
        if template:
            top["template"] = template
        del base
    else:
        llm_cfg, llm_sd, tok = _read_llm_only(path, template)
        top = dict(DEFAULTS, template=template or FAMILY_TEMPLATE[llm_cfg.family])
    if dtype is None:
        dtype = next(iter(llm_sd.values())).dtype
    llm_cfg = dataclasses.replace(llm_cfg, extra={**llm_cfg.extra, "architectures": [VE_ARCH]})
    if llm_cfg.family != "internlm2":
        llm_cfg.extra.pop("architectures")
    old_vocab = llm_cfg.vocab_size
    if len(tok) > old_vocab:
        llm_cfg = dataclasses.replace(llm_cfg, vocab_size=len(tok))
    width = patch_hidden_size or llm_cfg.hidden_size
    vision = VisionConfig(
        hidden_size=width, num_hidden_layers=0, num_attention_heads=1, intermediate_size=width
    )
    top.update(vision=vision, llm=llm_cfg, select_layer=-1, layout="internvl_chat", extra={})
    for key in ("img_context_token_id", "img_start_token_id", "img_end_token_id"):
        top[key] = None
    cfg = MonoInternVLConfig.from_internvl(InternVLConfig(**top), visual_attention_experts)
    set_token_ids(cfg, tok)
    if cfg.img_context_token_id is None:
        raise CheckpointError(f"{path.name}: the tokenizer has no <IMG_CONTEXT> token")

    model = build_mono_model(cfg, seed=seed, dtype=dtype, copy_experts=False)
    lm = model.language_model
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in llm_sd and llm_sd[name].shape[0] < llm_cfg.vocab_size:
            old = llm_sd[name]
            grown = old.new_empty(llm_cfg.vocab_size, old.shape[1])
            grown[: old.shape[0]] = old
            grown[old.shape[0] :] = old.float().mean(0).to(old.dtype)
            llm_sd[name] = grown
    target = lm.state_dict()
    if llm_cfg.tie_word_embeddings:
        llm_sd.pop("lm_head.weight", None)
        target.pop("lm_head.weight", None)
    missing = [k for k in target if k not in llm_sd and not _EXPERT_RE.search("." + k)]
    if missing:
        raise CheckpointError(f"{path.name}: the LLM lacks tensors {_listing(missing)}")
    result = lm.load_state_dict({k: v.to(dtype) for k, v in llm_sd.items()}, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{path.name}: tensors the LLM config does not use: {_listing(result.unexpected_keys)}"
        )
    lm.tie_weights()
    model.copy_experts_from_text()
    return model.eval(), tok


def load_mono_chat(path: str | Path, device: str = "cpu", dtype: Any = None):
    """A ready-to-chat :class:`~interleaf.generation.chat.ChatModel` on a Mono-InternVL checkpoint
    (what ``interleaf.load`` returns for InternVL checkpoints)."""
    from interleaf.generation.chat import ChatModel

    model, tokenizer = load_mono_checkpoint(path, device=device, dtype=dtype)
    return ChatModel(model, tokenizer)


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m interleaf.model.mono_checkpoint {init,from-llm} ...`` (errors as one line)."""
    import argparse

    from interleaf.cli import run_handler

    ap = argparse.ArgumentParser(
        prog="python -m interleaf.model.mono_checkpoint", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="write a random-weight Mono-InternVL checkpoint of a preset")
    p.add_argument("--preset", default="tiny-mono", choices=sorted(MONO_PRESETS))
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-experts", action="store_true", help="also add visual attention experts")
    p = sub.add_parser(
        "from-llm", help="build Mono-InternVL from an LLM or InternVL checkpoint (experts = FFN copies)"
    )
    p.add_argument("llm")
    p.add_argument("out")
    p.add_argument("--patch-hidden-size", type=int, default=None)
    p.add_argument("--template", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-experts", action="store_true", help="also add visual attention experts")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = ap.parse_args(argv)

    def run() -> None:
        if args.cmd == "init":
            out = init_mono_model(
                args.preset, args.out, seed=args.seed, visual_attention_experts=args.attention_experts
            )
        else:
            model, tok = init_mono_from_llm(
                args.llm,
                patch_hidden_size=args.patch_hidden_size,
                visual_attention_experts=args.attention_experts,
                template=args.template,
                seed=args.seed,
            )
            out = save_mono_checkpoint(model, tok, args.out)
        print(out)

    return run_handler(run, args.debug)  # as the interleaf CLI: one error line, a closed stdout quietly


if __name__ == "__main__":
    raise SystemExit(main())
