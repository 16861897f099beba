"""Load and save InternVL checkpoints in both layouts, never running remote code.

Layouts (see ``config.py``):

* ``internvl_chat`` (original): parameter names as in our modules, except the LLM, which is stored in
  its family's own naming - InternLM2 (``tok_embeddings``, fused ``attention.wqkv`` in the grouped
  ``(kv_head, n_q/n_kv + 2, head_dim)`` row layout, ``wo``, ``feed_forward.w1/w2/w3``,
  ``attention_norm``, ``ffn_norm``, ``output``) and Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``).
* ``hf`` (transformers ``InternVLForConditionalGeneration``): ``model.vision_tower.*`` with split q/k/v,
  ``model.multi_modal_projector.*``, ``model.language_model.*`` (InternLM2 as Llama), ``lm_head``;
  old ``-hf`` checkpoints without the ``model.`` prefix load too.

Weights: ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (``torch.load(weights_only=True)``), optionally sharded with its index.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from interleaf.errors import CheckpointError, ConfigError
from interleaf.model.config import InternVLConfig, LLMConfig
from interleaf.model.internvl import InternVLChatModel

log = logging.getLogger(__name__)

LAYOUTS = ("internvl_chat", "hf")
SHARD_BYTES = 4 * 1024**3

# ----------------------------------------------------------------------------- renaming tables
# (internal, on-disk) pairs for names inside a decoder layer / at the LLM top level.
_INTERNLM2_LAYER = [
    ("self_attn.o_proj.", "attention.wo."),
    ("mlp.gate_proj.", "feed_forward.w1."),
    ("mlp.down_proj.", "feed_forward.w2."),
    ("mlp.up_proj.", "feed_forward.w3."),
    ("input_layernorm.", "attention_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
]
_INTERNLM2_TOP = [("model.embed_tokens.", "model.tok_embeddings."), ("lm_head.", "output.")]

_HF_VISION_LAYER = [
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.", "mlp."),
]
_HF_VISION_TOP = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
]
_HF_PROJECTOR = [("mlp1.0.", "model.multi_modal_projector.layer_norm."),
                 ("mlp1.1.", "model.multi_modal_projector.linear_1."),
                 ("mlp1.3.", "model.multi_modal_projector.linear_2.")]  # fmt: skip
_HF_OLD_PREFIXES = [("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."),
                    ("language_model.model.", "model.language_model."),
                    ("language_model.lm_head.", "lm_head.")]  # fmt: skip

_LAYER_RE = re.compile(r"^(model\.layers|encoder\.layers|encoder\.layer)\.(\d+)\.(.*)$")


def _rename(name: str, table: list[tuple[str, str]], forward: bool) -> str:
    for a, b in table:
        src, dst = (a, b) if forward else (b, a)
        if name.startswith(src):
            return dst + name[len(src) :]
    return name


def _disk_family(cfg: LLMConfig, layout: str) -> str:
    return "llama" if layout == "hf" and cfg.family == "internlm2" else cfg.family


# ----------------------------------------------------------------------------- LLM conversion
# families whose tensors are stored under interleaf's own names (no fused projections, no renames)
_PLAIN_FAMILIES = ("qwen2", "qwen3", "llama")


def llm_state_to_disk(sd: dict[str, torch.Tensor], cfg: LLMConfig, family: str) -> dict[str, torch.Tensor]:
    """A decoder LLM's state dict in interleaf names -> the tensors as ``family`` stores them.

    ``sd``: names relative to the LLM (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``,
    i.e. without ``language_model.``). ``family``: ``qwen2`` / ``qwen3`` / ``llama`` (unchanged), ``internlm2``
    (``tok_embeddings``, grouped fused ``attention.wqkv``, ``wo``, ``w1/w2/w3``, ``output``) or
    ``phi3`` (fused ``qkv_proj`` and ``gate_up_proj``). Tensors are not copied unless fused.
    """
    if family in _PLAIN_FAMILIES:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = _LAYER_RE.match(name)
        if m is None:
            out[_rename(name, _INTERNLM2_TOP, True) if family == "internlm2" else name] = t
            continue
        prefix, rest = f"{m.group(1)}.{m.group(2)}.", m.group(3)
        mm = re.match(r"^(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(weight|bias)$", rest)
        if mm and (family == "phi3" or mm.group(1).startswith("self_attn")):
            fused.setdefault(prefix + mm.group(2), {})[mm.group(1).split(".")[1]] = t
            continue
        out[prefix + (_rename(rest, _INTERNLM2_LAYER, True) if family == "internlm2" else rest)] = t
    for key, parts in fused.items():
        prefix, kind = key.rsplit(".", 1)[0] + ".", key.rsplit(".", 1)[1]
        if "q_proj" in parts:
            q, k, v = parts["q_proj"], parts["k_proj"], parts["v_proj"]
            if family == "phi3":
                out[f"{prefix}self_attn.qkv_proj.{kind}"] = torch.cat([q, k, v], 0)
            else:
                out[f"{prefix}attention.wqkv.{kind}"] = _fuse_wqkv(q, k, v, cfg)
        if "gate_proj" in parts:
            out[f"{prefix}mlp.gate_up_proj.{kind}"] = torch.cat([parts["gate_proj"], parts["up_proj"]], 0)
    return out


def _fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """q [n_q*d, ...], k/v [n_kv*d, ...] -> InternLM2 ``wqkv`` rows laid out (kv_head, g + 2, d)."""
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // n_kv
    tail = q.shape[1:]
    q = q.reshape(n_kv, g, d, *tail)
    k = k.reshape(n_kv, 1, d, *tail)
    v = v.reshape(n_kv, 1, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(n_kv * (g + 2) * d, *tail)


def _split_wqkv(
    w: torch.Tensor, cfg: LLMConfig, label: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's grouped fused ``wqkv`` -> q, k, v; ``label`` names the stored tensor in errors."""
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // n_kv
    tail = w.shape[1:]
    if w.shape[0] != n_kv * (g + 2) * d:
        raise CheckpointError(
            f"{label} has {w.shape[0]} rows; the config expects {n_kv * (g + 2) * d} "
            f"(kv_heads {n_kv} x (q/kv {g} + 2) x head_dim {d})"
        )
    w = w.reshape(n_kv, g + 2, d, *tail)
    q = w[:, :g].reshape(n_kv * g * d, *tail)
    k = w[:, g].reshape(n_kv * d, *tail)
    v = w[:, g + 1].reshape(n_kv * d, *tail)
    return q, k, v


def llm_state_from_disk(
    sd: dict[str, torch.Tensor], cfg: LLMConfig, family: str, where: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`llm_state_to_disk`: a bare LLM checkpoint's tensors (names as ``family``
    stores them, no ``language_model.`` prefix) -> interleaf names. Fused tensors are split by ``cfg``;
    a row count that does not fit the config raises :class:`CheckpointError`, which names the tensor
    as ``where(name)`` (e.g. its file and full name; default ``tensor <name>``).
    """
    label = where or (lambda name: f"tensor {name}")
    if family in _PLAIN_FAMILIES:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    for name, t in sd.items():
        m = _LAYER_RE.match(name)
        if m is None:
            out[_rename(name, _INTERNLM2_TOP, False) if family == "internlm2" else name] = t
            continue
        prefix, rest = f"{m.group(1)}.{m.group(2)}.", m.group(3)
        mm = re.match(r"^(attention\.wqkv|self_attn\.qkv_proj|mlp\.gate_up_proj)\.(weight|bias)$", rest)
        if mm is None:
            out[prefix + (_rename(rest, _INTERNLM2_LAYER, False) if family == "internlm2" else rest)] = t
            continue
        kind = mm.group(2)
        if mm.group(1) == "attention.wqkv":
            q, k, v = _split_wqkv(t, cfg, label(name))
        elif mm.group(1) == "self_attn.qkv_proj":
            if t.shape[0] != q_rows + 2 * kv_rows:
                raise CheckpointError(
                    f"{label(name)} has {t.shape[0]} rows; the config expects {q_rows + 2 * kv_rows}"
                )
            q, k, v = t.split([q_rows, kv_rows, kv_rows], 0)
        else:
            if t.shape[0] % 2:
                raise CheckpointError(
                    f"{label(name)} has an odd number of rows {t.shape[0]} for a fused gate/up projection"
                )
            gate, up = t.chunk(2, 0)
            out[f"{prefix}mlp.gate_proj.{kind}"], out[f"{prefix}mlp.up_proj.{kind}"] = gate, up
            continue
        out[f"{prefix}self_attn.q_proj.{kind}"] = q
        out[f"{prefix}self_attn.k_proj.{kind}"] = k
        out[f"{prefix}self_attn.v_proj.{kind}"] = v
    return out


# ----------------------------------------------------------------------------- whole-model conversion
def _split_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def to_disk(sd: dict[str, torch.Tensor], cfg: InternVLConfig, layout: str) -> dict[str, torch.Tensor]:
    """Internal state dict -> tensors as stored in ``layout``."""
    family = _disk_family(cfg.llm, layout)
    llm = llm_state_to_disk(_split_prefix(sd, "language_model."), cfg.llm, family)
    rest = {k: v for k, v in sd.items() if not k.startswith("language_model.")}
    if layout == "internvl_chat":
        out = dict(rest)
        out.update({"language_model." + k: v for k, v in llm.items()})
        return out
    out = {}
    c = cfg.vision.hidden_size
    for name, t in rest.items():
        if name.startswith("vision_model."):
            sub = name[len("vision_model.") :]
            m = _LAYER_RE.match(sub)
            if m:
                i, r = m.group(2), m.group(3)
                pre = f"model.vision_tower.encoder.layer.{i}."
                if r.startswith("attn.qkv."):
                    kind = r.rsplit(".", 1)[1]
                    for part, piece in zip("qkv", t.split(c, 0)):
                        out[f"{pre}attention.{part}_proj.{kind}"] = piece
                elif r in ("ls1", "ls2"):
                    out[pre + ("lambda_1" if r == "ls1" else "lambda_2")] = t
                else:
                    out[pre + _rename(r, _HF_VISION_LAYER, True)] = t
            else:
                out["model.vision_tower." + _rename(sub, _HF_VISION_TOP, True)] = t
        else:
            out[_rename(name, _HF_PROJECTOR, True)] = t
    for k, v in llm.items():
        out[
            ("lm_head." + k[len("lm_head.") :])
            if k.startswith("lm_head.")
            else "model.language_model." + k[len("model.") :]
        ] = v
    return out


def from_disk(
    sd: dict[str, torch.Tensor], cfg: InternVLConfig, layout: str, where: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors as stored in ``layout`` -> internal state dict (unknown names pass through unchanged).

    ``where``: how errors name a stored tensor (see :func:`llm_state_from_disk`), given its full name.
    """
    family = _disk_family(cfg.llm, layout)
    label = where or (lambda name: f"tensor {name}")
    if layout == "internvl_chat":
        llm = llm_state_from_disk(
            _split_prefix(sd, "language_model."), cfg.llm, family, lambda n: label("language_model." + n)
        )
        out = {k: v for k, v in sd.items() if not k.startswith("language_model.")}
        out.update({"language_model." + k: v for k, v in llm.items()})
        return out
    if any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in sd):  # old -hf prefixes
        sd = {_rename(k, _HF_OLD_PREFIXES, True): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if name.startswith("model.vision_tower."):
            sub = name[len("model.vision_tower.") :]
            m = _LAYER_RE.match(sub)
            if m:
                i, r = m.group(2), m.group(3)
                pre = f"vision_model.encoder.layers.{i}."
                mm = re.match(r"^attention\.([qkv])_proj\.(weight|bias)$", r)
                if mm:
                    qkv.setdefault(f"{pre}attn.qkv.{mm.group(2)}", {})[mm.group(1)] = t
                elif r in ("lambda_1", "lambda_2"):
                    out[pre + ("ls1" if r == "lambda_1" else "ls2")] = t
                else:
                    out[pre + _rename(r, _HF_VISION_LAYER, False)] = t
            else:
                out["vision_model." + _rename(sub, _HF_VISION_TOP, False)] = t
        elif name.startswith("model.language_model."):
            llm["model." + name[len("model.language_model.") :]] = t
        elif name.startswith("lm_head."):
            llm[name] = t
        else:
            out[_rename(name, _HF_PROJECTOR, False)] = t
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{key}: the checkpoint lacks some of the q/k/v projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)

    def stored(n: str) -> str:  # the hf name of an LLM tensor, for errors
        return label(n if n.startswith("lm_head.") else "model.language_model." + n[len("model.") :])

    llm = llm_state_from_disk(llm, cfg.llm, family, stored)
    out.update({"language_model." + k: v for k, v in llm.items()})
    return out


# ----------------------------------------------------------------------------- reading files
def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, in index order.

    Shards listed by ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``), else the
    single ``model.safetensors`` / ``pytorch_model.bin``. Raises :class:`CheckpointError` for a bad
    index, a missing shard or no weights at all.
    """
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid weight index ({exc})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(
                    f"{index}: not a valid weight index ('weight_map' must map names to files)"
                )
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: shard {f.name} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"{path}: no weights (model.safetensors, an index, or pytorch_model.bin)")


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint directory, and the file each came from."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in weight_files(path):
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(str(f), map_location="cpu", weights_only=True)
        except UnpicklingError:  # torch's message suggests weights_only=False, i.e. running the file's code
            raise CheckpointError(f"{f}: cannot read weights (not a weights-only PyTorch file)") from None
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{f}: cannot read weights ({str(exc).splitlines()[0]})") from None
        if not isinstance(part, dict):
            raise CheckpointError(f"{f}: not a state dict")
        tensors.update(part)
        origin.update(dict.fromkeys(part, f.name))
    return tensors, origin


ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def merge_adapter(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Fold the LoRA adapter saved beside a checkpoint's weights into ``sd`` (internal names).

    ``adapter.safetensors`` holds ``<linear>.lora_A`` [r, in] and ``<linear>.lora_B`` [out, r] for each
    adapted linear layer (as the trainer writes with ``merge_lora_on_save: false``);
    ``adapter_config.json`` gives each part's rank and alpha (without it: alpha = 2r, the trainer's and
    upstream's setting). Each ``<linear>.weight`` becomes ``W + alpha / r * B @ A``, computed in fp32
    as the trainer's own merge, so the result equals a checkpoint saved merged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / ADAPTER_FILE
    try:
        adapter = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read the LoRA adapter ({str(exc).splitlines()[0]})") from None
    parts: dict[str, Any] = {}
    if (path / ADAPTER_CONFIG).is_file():
        try:
            parts = json.loads((path / ADAPTER_CONFIG).read_text())["parts"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: not a valid adapter config ({exc})") from None
    sd = dict(sd)
    for key_a in sorted(k for k in adapter if k.endswith(".lora_A")):
        name = key_a[: -len(".lora_A")]
        a, b = adapter[key_a], adapter.get(name + ".lora_B")
        target = name + ".weight"
        if b is None or target not in sd:
            raise CheckpointError(
                f"{file}: {name} has no {'lora_B' if b is None else 'weight in the checkpoint'} to merge into"
            )
        w = sd[target]
        r = a.shape[0]
        if b.shape[1] != r or tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise CheckpointError(
                f"{file}: {name}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} does not fit the weight "
                f"{list(w.shape)}"
            )
        part = parts.get("vision" if name.startswith("vision_model.") else "llm") or {}
        if part.get("r", r) != r:
            raise CheckpointError(f"{file}: {name} has rank {r}, {ADAPTER_CONFIG} says {part['r']}")
        scaling = float(part.get("alpha", 2 * r)) / r
        sd[target] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    stray = [k for k in adapter if not k.endswith((".lora_A", ".lora_B"))]
    if stray:
        raise CheckpointError(f"{file}: not LoRA tensors: {_listing(stray)}")
    return sd


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- public API
def load_config(path: str | Path) -> InternVLConfig:
    path = Path(path)
    if not path.is_dir():
        why = "a file, not a directory" if path.exists() else "no such directory"
        raise CheckpointError(f"{path}: not a checkpoint directory ({why})")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    return InternVLConfig.from_file(path / "config.json")


def load_model_tokenizer(path: str | Path, cfg: InternVLConfig) -> Any:
    """The tokenizer of the checkpoint directory ``path`` whose config is ``cfg``; sets the config's image
    token ids (``<IMG_CONTEXT>``, ``<img>``, ``</img>``) from its vocabulary."""
    from interleaf.model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer

    path = Path(path)
    tokenizer = load_tokenizer(path, cfg.template)
    if len(tokenizer) > cfg.llm.vocab_size:  # not fatal: only prompts using the extra ids fail
        log.warning(
            "%s: the tokenizer has %d tokens, the model's vocab_size is %d; prompts with ids past it are refused",
            path.name, len(tokenizer), cfg.llm.vocab_size,
        )  # fmt: skip
    vocab = tokenizer.get_vocab()
    if cfg.layout == "internvl_chat" or cfg.img_context_token_id is None:
        cfg.img_context_token_id = vocab.get(IMG_CONTEXT)
    cfg.img_start_token_id = vocab.get(IMG_START)
    cfg.img_end_token_id = vocab.get(IMG_END)
    return tokenizer


def load_checkpoint(
    path: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    model_cls: Callable[..., InternVLChatModel] = InternVLChatModel,
    adapter: bool = True,
) -> tuple[InternVLChatModel, Any]:
    """Load a checkpoint directory of either layout: ``(model, tokenizer)``, model in eval mode.

    ``dtype`` None keeps the stored floating dtype. ``model_cls`` lets a subclass (e.g. with expert
    FFNs) be built; its extra parameters must be present in the checkpoint under their own names.
    A LoRA adapter saved beside the weights (``adapter.safetensors``, from training with
    ``merge_lora_on_save: false``) is merged into them (:func:`merge_adapter`); ``adapter=False``
    loads the base weights alone.
    """
    path = Path(path)
    device = parse_device(device)  # before the (slow) weights are read
    cfg = load_config(path)
    if model_cls is InternVLChatModel:
        from interleaf.model.mono_internvl import is_mono_config

        if is_mono_config(cfg):  # the released Mono-InternVL layout: visual experts in the LLM
            from interleaf.model.mono_checkpoint import load_mono_checkpoint

            if not adapter:  # the base weights alone (load_mono_checkpoint merges an adapter)
                from interleaf.model.mono_internvl import MonoInternVLChatModel

                return load_checkpoint(path, device, dtype, model_cls=MonoInternVLChatModel, adapter=False)
            return load_mono_checkpoint(path, device=device, dtype=dtype)
    tokenizer = load_model_tokenizer(path, cfg)

    disk, origin = read_weights(path)
    sd = from_disk(disk, cfg, cfg.layout, lambda name: tensor_label(path, origin, name))
    if adapter and (path / ADAPTER_FILE).is_file():
        sd = merge_adapter(sd, path)
    head, embed = sd.get("language_model.lm_head.weight"), sd.get("language_model.model.embed_tokens.weight")
    if cfg.llm.tie_word_embeddings and head is not None:
        if embed is not None and head.shape == embed.shape and not torch.equal(head, embed):
            cfg.llm.tie_word_embeddings = False  # the config claims tying but a distinct lm_head is stored
        else:
            sd.pop("language_model.lm_head.weight")

    with torch.device("meta"):
        model = model_cls(cfg)
    check_tensors(model, sd, path, origin)
    dtype = parse_dtype(dtype) or stored_dtype(sd)
    sd = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.language_model.tie_weights()
    rebuild_buffers(model)
    model.to(device)
    model.eval()
    return model, tokenizer


def _qk_norm_hint(extra: list[str], model: torch.nn.Module) -> str:
    """Whose stray ``self_attn.q_norm``/``k_norm`` tensors are: a Qwen3 LLM's under another family's config."""
    norms = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
    if model.config.llm.qk_norm or not any(k.endswith(norms) for k in extra):
        return ""
    return (
        f" (self_attn.q_norm/k_norm are a Qwen3 LLM's; the config says {model.config.llm.family}: a Qwen3 LLM "
        "is architectures Qwen3ForCausalLM / model_type qwen3)"
    )


def check_tensors(
    model: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    path: Path,
    origin: dict[str, str],
    skip: tuple[str, ...] = (),
) -> None:
    """``sd`` holds exactly the tensors ``model`` takes (its tied ``lm_head`` and the names starting
    with a ``skip`` prefix aside), each of the right shape and floating where the model's is; else one
    ``CheckpointError`` naming the tensors."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    if model.config.llm.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing:
        raise CheckpointError(f"{path.name}: missing tensors for the config: {_listing(missing)}")
    if extra:
        raise CheckpointError(
            f"{path.name}: tensors the config does not use: {_listing(extra)}{_qk_norm_hint(extra, model)}"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{tensor_label(path, origin, k)} has shape {list(sd[k].shape)}, the config expects {list(v.shape)}"
            )
        if v.is_floating_point() and not sd[k].is_floating_point():
            raise CheckpointError(
                f"{tensor_label(path, origin, k)} has dtype {str(sd[k].dtype).replace('torch.', '')}, "
                "the model needs floating-point weights"
            )


def stored_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most of ``sd``'s tensors have (float32 when none is floating)."""
    floats = [t.dtype for t in sd.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def tensor_label(path: Path, origin: dict[str, str], name: str) -> str:
    """How errors name a stored tensor: ``ckpt/model.safetensors: tensor <name>``."""
    src = origin.get(name)
    return f"{path.name}{'/' + src if src else ''}: tensor {name}"


def rebuild_buffers(model: InternVLChatModel) -> None:
    """Recompute non-persistent buffers (RoPE tables) of a model built on the meta device.

    Call after ``load_state_dict(..., assign=True)``; raises if a buffer is still on meta.
    """
    from interleaf.model.llm import RotaryEmbedding

    for module in model.modules():
        for name, sub in list(module.named_children()):
            if isinstance(sub, RotaryEmbedding):
                setattr(module, name, RotaryEmbedding(model.config.llm))
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"internal: buffer {name} was not initialised")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1", "mps") as a ``torch.device`` that exists on this machine;
    None is the CPU (where the weights are read; ``model.to(None)`` left them there); "auto" is the
    GPU where there is one, else the CPU.

    Checked before loading, so an unknown name or a missing GPU is one ``ConfigError`` instead of
    torch's RuntimeError / AssertionError from deep inside ``model.to``.
    """
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if (
        dev.type == "meta"
        or not callable(getattr(backend, "is_available", None))
        or not backend.is_available()
    ):
        raise ConfigError(f"device: {device!r} is not available on this machine")
    if dev.index is not None and dev.index >= backend.device_count():
        raise ConfigError(
            f"device: {device!r} is not available ({backend.device_count()} {dev.type} device(s))"
        )
    return dev


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None:
        return name
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ConfigError(
                f"dtype: {name} is not a floating-point dtype (use float32, bfloat16 or float16)"
            )
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "auto": None}  # fmt: skip
    if name not in table:
        raise ConfigError(f"dtype: unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return table[name]


def parse_llm_config(raw: dict[str, Any], source: str, key: str = "config") -> LLMConfig:
    """An :class:`LLMConfig` from a decoder LLM's ``config.json`` dict (Qwen2 / InternLM2 / Phi-3 / Llama).

    ``source`` (usually the file path) and ``key`` name the place in errors (:class:`ConfigError`).
    """
    from interleaf.model.config import _parse_llm

    return _parse_llm(raw, source, key)


# Earlier private names, kept for callers that still use them.
_llm_to_disk = llm_state_to_disk
_llm_from_disk = llm_state_from_disk
_weight_files = weight_files
_rebuild_buffers = rebuild_buffers


def save_checkpoint(
    model: InternVLChatModel,
    tokenizer: Any,
    out_dir: str | Path,
    layout: str = "internvl_chat",
    max_shard_bytes: int = SHARD_BYTES,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write ``config.json``, safetensors weights (sharded with an index above ``max_shard_bytes``)
    and the tokenizer files. The ``hf`` layout loads in transformers' ``InternVLForConditionalGeneration``.
    Tensors whose names start with a ``skip`` prefix are not written (a caller stores them itself)."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ConfigError(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if tokenizer is not None:
        from interleaf.model.tokenizer import IMG_CONTEXT

        ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if cfg.img_context_token_id is None:
            cfg.img_context_token_id = ctx
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    tied = cfg.llm.tie_word_embeddings
    if tied:
        sd.pop("language_model.lm_head.weight", None)
        if layout == "internvl_chat":  # upstream always stores lm_head
            sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"]
    disk = {k: v.detach().to("cpu").contiguous() for k, v in to_disk(sd, cfg, layout).items()}
    # safetensors refuses tensors sharing memory: give every tensor its own storage
    seen: set[int] = set()
    for k, v in disk.items():
        if v.untyped_storage().data_ptr() in seen:
            disk[k] = v.clone()
        seen.add(disk[k].untyped_storage().data_ptr())

    config = cfg.to_original_dict() if layout == "internvl_chat" else cfg.to_hf_dict()
    dtypes = [t.dtype for t in disk.values() if t.is_floating_point()]
    if dtypes:
        config["torch_dtype"] = str(max(set(dtypes), key=dtypes.count)).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    for stale in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        (out / stale).unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(disk):
        nbytes = disk[k].numel() * disk[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = disk[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=meta)
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        if layout == "hf":
            write_hf_processor_files(out, cfg, tokenizer)
    return out


def write_hf_processor_files(out: str | Path, cfg: InternVLConfig, tokenizer: Any) -> None:
    """Write what ``transformers.AutoProcessor`` needs next to an ``hf`` checkpoint (after the tokenizer).

    As transformers' own InternVL conversion writes them: ``preprocessor_config.json`` (GotOcr2 image
    processor: ``image_size`` tiles, ImageNet mean/std, bicubic, ``crop_to_patches`` between the
    config's min/max dynamic patches; it always adds the thumbnail when there is more than one tile),
    ``video_preprocessor_config.json`` (one ``image_size`` tile per frame), ``processor_config.json``
    (``InternVLProcessor``, ``image_seq_length`` = ``num_image_token``), ``chat_template.jinja`` rendering
    the checkpoint's InternVL template with its system message, and the named image/video tokens
    (``extra_special_tokens``) in ``tokenizer_config.json``.
    """
    from interleaf.model.tokenizer import HF_NAMED_TOKENS, hf_chat_template
    from interleaf.processing.image import IMAGENET_MEAN, IMAGENET_STD
    from interleaf.processing.templates import get_template

    out = Path(out)
    size = {"height": cfg.image_size, "width": cfg.image_size}
    common = {
        "do_resize": True,
        "size": size,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
        "processor_class": "InternVLProcessor",
    }
    dynamic = cfg.dynamic_image_size
    image = {
        "image_processor_type": "GotOcr2ImageProcessor",
        **common,
        "crop_to_patches": dynamic,
        "min_patches": cfg.min_dynamic_patch if dynamic else 1,
        "max_patches": cfg.max_dynamic_patch if dynamic else 1,
    }
    video = {"video_processor_type": "InternVLVideoProcessor", **common, "initial_shift": True}
    files = {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": {
            "processor_class": "InternVLProcessor",
            "image_seq_length": cfg.num_image_token,
        },
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2) + "\n")

    # the template starts with the BOS token when the tokenizer adds one (as the tokenizer would)
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
    template = get_template(cfg.template, cfg.system_message)
    (out / "chat_template.jinja").write_text(
        hf_chat_template(template, tokenizer.bos_token if adds_bos else None)
    )

    tc_file = out / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text())
    extra = tc.get("extra_special_tokens")
    named = dict(HF_NAMED_TOKENS)
    if isinstance(extra, list):  # keep the plain special-token list under its v4 name
        tc["additional_special_tokens"] = extra
    elif isinstance(extra, dict):
        named = {**extra, **named}
    tc["extra_special_tokens"] = named
    tc["processor_class"] = "InternVLProcessor"
    tc_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (vision / projector / llm / total); tied weights counted once."""
    counts = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters(remove_duplicate=True):
        part = (
            "vision"
            if name.startswith("vision_model.")
            else "projector"
            if name.startswith("mlp1.")
            else "llm"
        )
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def describe(path: str | Path, weights: str | None = None) -> str:
    """Human-readable summary of a checkpoint directory (config only; weights are not loaded).
    ``weights``: the weights line for a folder that stores them otherwise (an ONNX export)."""
    path = Path(path)
    cfg = load_config(path)
    if weights is None:
        files = weight_files(path)  # a checkpoint without weights is an error here too
        size_gb = sum(f.stat().st_size for f in files) / 1e9
        try:
            dtype = json.loads((path / "config.json").read_text()).get("torch_dtype", "?")
        except (OSError, json.JSONDecodeError):
            dtype = "?"
        weights = f"{len(files)} file(s), {size_gb:.3f} GB, {dtype}"
    v, llm = cfg.vision, cfg.llm
    model_cls, name, vit = (
        InternVLChatModel,
        "InternVL-Chat",
        f"InternViT ({v.hidden_size}w x {v.num_hidden_layers}L)",
    )
    try:  # Mono-InternVL checkpoints (patch embedding + visual experts) parse as InternVL configs too
        from interleaf.model.mono_internvl import MonoInternVLChatModel, is_mono_config

        if is_mono_config(cfg):  # no ViT layers: the LLM's visual experts encode the patches
            model_cls, name = MonoInternVLChatModel, "Mono-InternVL"
            vit = f"patch embedding ({v.patch_size}px patches -> {v.hidden_size}w)"
    except ImportError:
        pass
    with torch.device("meta"):
        model = model_cls(cfg)
    counts = parameter_counts(model)
    rope = llm.rope_type if llm.rope_scaling else "default"
    lines = [
        f"checkpoint:   {path}",
        f"layout:       {cfg.layout}",
        f"architecture: {name} = {vit} + "
        f"pixel shuffle {cfg.ps_version} + MLP projector + {llm.family} "
        f"({llm.hidden_size}w x {llm.num_hidden_layers}L, {llm.num_attention_heads} heads / "
        f"{llm.num_key_value_heads} kv of {llm.head_dim}{', q/k norm' if llm.qk_norm else ''}, "
        f"rope {rope}, vocab {llm.vocab_size}"
        f"{', tied embeddings' if llm.tie_word_embeddings else ''})",
        f"weights:      {weights}",
        f"template:     {cfg.template}",
        f"image:        {cfg.image_size}px tiles, {cfg.num_image_token} tokens per tile, "
        f"max {cfg.max_dynamic_patch} tiles{' + thumbnail' if cfg.use_thumbnail else ''}",
    ]
    for part in ("vision", "projector", "llm", "total"):
        lines.append(f"params {part + ':':<11}{counts[part]:>15,d}  ({counts[part] / 1e6:.2f} M)")
    return "\n".join(lines)
