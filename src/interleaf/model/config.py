"""Configs of an InternVL-family model, parsed from either checkpoint layout.

Two ``config.json`` layouts exist upstream:

* the original InternVL-Chat layout (``model_type: internvl_chat``): ``vision_config`` (InternViT),
  ``llm_config`` (a Qwen2 / Qwen3 / InternLM2 / Phi-3 / Llama config) and InternVL keys such as ``template``,
  ``downsample_ratio``, ``ps_version``, ``select_layer``, ``max_dynamic_patch``;
* the transformers-native layout (``model_type: internvl``, the ``-hf`` checkpoints): ``vision_config``
  (``internvl_vision``), ``text_config`` (qwen2, qwen3 or llama) and ``image_token_id``.

Both parse into one :class:`InternVLConfig` made of a :class:`VisionConfig` and an :class:`LLMConfig`.
Top-level keys are checked against the keys each layout is known to carry; anything else is a
:class:`~interleaf.errors.ConfigError` naming the key and the file. Nested configs are lenient (upstream
configs serialise dozens of generic keys); the keys that matter are read, the rest kept in ``extra``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interleaf.errors import ConfigError

# Keys that ``transformers.PretrainedConfig`` serialises into every config.json (4.x and 5.x).
GENERIC_KEYS = frozenset(
    """_name_or_path _commit_hash _attn_implementation_autoset _attn_implementation architectures auto_map
    transformers_version torch_dtype dtype model_type add_cross_attention bad_words_ids begin_suppress_tokens
    bos_token_id chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id diversity_penalty
    do_sample early_stopping encoder_no_repeat_ngram_size eos_token_id exponential_decay_length_penalty
    finetuning_task forced_bos_token_id forced_eos_token_id id2label is_decoder is_encoder_decoder label2id
    length_penalty max_length min_length no_repeat_ngram_size num_beam_groups num_beams num_return_sequences
    output_attentions output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens
    task_specific_params temperature tf_legacy_loss tie_encoder_decoder tokenizer_class top_k top_p
    torchscript typical_p use_bfloat16 use_cache tie_word_embeddings""".split()
)

ORIGINAL_KEYS = GENERIC_KEYS | frozenset(
    """vision_config llm_config use_backbone_lora use_llm_lora pad2square select_layer force_image_size
    downsample_ratio template dynamic_image_size use_thumbnail ps_version min_dynamic_patch max_dynamic_patch
    system_message hidden_size image_fold normalize_type num_hidden_layers interleaf""".split()
)

HF_KEYS = GENERIC_KEYS | frozenset(
    """vision_config text_config image_token_id image_seq_length downsample_ratio projector_hidden_act
    vision_feature_layer vision_feature_select_strategy interleaf""".split()
)

# llm_config ``architectures[0]`` (original layout) / text_config ``model_type`` -> our family name.
ARCH_TO_FAMILY = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "InternLM2ForCausalLM": "internlm2",
    "InternLM2VEForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPE_TO_FAMILY = {
    "qwen2": "qwen2", "qwen3": "qwen3", "internlm2": "internlm2", "phi3": "phi3", "llama": "llama"
}  # fmt: skip
FAMILY_TO_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "llama": "LlamaForCausalLM",
}

# RoPE scalings :class:`~interleaf.model.llm.RotaryEmbedding` implements (besides ``default``); others
# are refused, never run as plain RoPE.
ROPE_SCALINGS = ("linear", "dynamic", "longrope", "llama3", "yarn")

# The chat template an hf-layout checkpoint falls back to when it does not record one.
DEFAULT_HF_TEMPLATE = "internvl2_5"


@dataclass
class VisionConfig:
    """InternViT hyper-parameters (``vision_config``)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"  # or "rms_norm"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    initializer_factor: float = 1.0  # LayerScale init value in upstream checkpoints
    initializer_range: float = 0.02
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LLMConfig:
    """Decoder LLM hyper-parameters, one dataclass for every family.

    ``family`` is one of ``qwen2``, ``qwen3``, ``internlm2``, ``phi3``, ``llama``; it decides how weights
    and configs are named on disk, which biases exist and whether q and k are normalised per head
    (Qwen3, :attr:`qk_norm`); the rest of the maths is shared.
    """

    family: str = "qwen2"
    vocab_size: int = 151655
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": ..., ...} (``type`` accepted as alias)
    original_max_position_embeddings: int | None = None  # Phi-3 (longrope)
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    o_bias: bool = False  # bias on the output projection (InternLM2 ``bias``, Llama ``attention_bias``)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"llm_config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def qk_norm(self) -> bool:
        """Qwen3 (InternVL3.5): an RMSNorm over each head's q and k (``self_attn.q_norm``/``k_norm``,
        weight [head_dim]) before RoPE."""
        return self.family == "qwen3"

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"


@dataclass
class InternVLConfig:
    """The whole model: ViT + pixel shuffle + ``mlp1`` projector + decoder LLM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str = "Hermes-2"
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    force_image_size: int | None = 448
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    pad2square: bool = False
    system_message: str | None = None
    img_context_token_id: int | None = None
    img_start_token_id: int | None = None
    img_end_token_id: int | None = None
    projector_eps: float = 1e-5  # mlp1.0 LayerNorm eps (nn.LayerNorm default upstream)
    layout: str = "internvl_chat"  # layout the config was read from
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def image_token_id(self) -> int | None:
        """The ``<IMG_CONTEXT>`` id image embeddings go to.

        ``img_context_token_id`` when known (the loader sets it from the tokenizer when the config does
        not name one); otherwise, for the hf layout, transformers' default (151667), as transformers
        would use for a config without ``image_token_id``.
        """
        if self.img_context_token_id is not None:
            return self.img_context_token_id
        return HF_DEFAULT_IMAGE_TOKEN_ID if self.layout == "hf" else None

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: (448 / 14)^2 * 0.5^2 = 256."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_file(cls, path: str | Path) -> InternVLConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> InternVLConfig:
        """Parse either layout (auto-detected from ``model_type`` / the sub-config keys)."""
        if "visionllmv2" in raw:  # an InternVL inside, but its routes and tools need their own loader
            raise ConfigError(
                f"{source}: a VisionLLM v2 checkpoint: use `interleaf visionllm ask` / `detect`, or "
                "interleaf.model.visionllm.load_visionllm"
            )
        model_type = raw.get("model_type")
        if model_type == "internvl" or (model_type is None and "text_config" in raw):
            return _parse_hf(raw, source)
        if model_type in (None, "internvl_chat") and "llm_config" in raw:
            return _parse_original(raw, source)
        if model_type == "lcl":  # a vision encoder pretrained by LCL, not an MLLM
            raise ConfigError(
                f"{source}: an LCL checkpoint (a ViT and its text model): use `interleaf lcl retrieval` / "
                "`export-vit`, or interleaf.model.lcl.load_lcl"
            )
        raise ConfigError(
            f"{source}: not an InternVL config (model_type {model_type!r}; expected 'internvl_chat' with "
            "llm_config or 'internvl' with text_config)"
        )

    # ------------------------------------------------------------------ writing
    def to_original_dict(self) -> dict[str, Any]:
        """``config.json`` of the original InternVL-Chat layout."""
        out: dict[str, Any] = {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "vision_config": _vision_to_original(self.vision),
            "llm_config": _llm_to_original(self.llm),
            "template": self.template,
            "downsample_ratio": self.downsample_ratio,
            "ps_version": self.ps_version,
            "select_layer": self.select_layer,
            "force_image_size": self.force_image_size,
            "min_dynamic_patch": self.min_dynamic_patch,
            "max_dynamic_patch": self.max_dynamic_patch,
            "use_thumbnail": self.use_thumbnail,
            "dynamic_image_size": self.dynamic_image_size,
            "pad2square": self.pad2square,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "hidden_size": self.llm.hidden_size,
            "tie_word_embeddings": False,
        }
        if self.system_message is not None:
            out["system_message"] = self.system_message
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` that transformers' ``InternVLForConditionalGeneration`` loads.

        InternLM2 goes out as Llama (as the upstream converter does); Phi-3 has no native
        InternVL counterpart upstream but is written the same way (text_config model_type phi3).
        InternVL-only settings (template, ps_version, tiling) are kept under ``interleaf``.
        """
        if self.ps_version != "v2":
            raise ConfigError("ps_version: the hf layout only supports pixel shuffle 'v2'")
        v = self.vision
        vision = {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "hidden_act": v.hidden_act,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_normalization,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels,
            "layer_scale_init_value": v.initializer_factor,
            "initializer_range": v.initializer_range,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
            "attention_dropout": v.attention_dropout,
            "hidden_dropout_prob": v.dropout,
            "projection_dropout": 0.0,
        }
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "vision_config": vision,
            "text_config": _llm_to_hf(self.llm),
            "image_token_id": self.image_token_id,
            "image_seq_length": self.num_image_token,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": self.select_layer,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": self.llm.tie_word_embeddings,
            "interleaf": {
                "template": self.template,
                "ps_version": self.ps_version,
                "force_image_size": self.force_image_size,
                "min_dynamic_patch": self.min_dynamic_patch,
                "max_dynamic_patch": self.max_dynamic_patch,
                "use_thumbnail": self.use_thumbnail,
                "dynamic_image_size": self.dynamic_image_size,
                "system_message": self.system_message,
                "llm_family": self.llm.family,
            },
        }


# ---------------------------------------------------------------------- helpers
def _check_keys(raw: dict[str, Any], known: frozenset[str], source: str, where: str = "") -> None:
    for key in raw:
        # "_"-prefixed keys are transformers' bookkeeping (``_attn_implementation_internal``,
        # ``_output_attentions``, ...), which InternVL's to_dict (a copy of ``__dict__``) lets through
        if key not in known and not key.startswith("_"):
            raise ConfigError(f"{source}: unknown config key {where}{key!r}")


_KIND_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def _typed(
    raw: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    default: Any,
    source: str,
    where: str = "",
    check: Any = None,
    want: str | None = None,
) -> Any:
    """``raw[key]`` checked against ``kind`` (absent or null: ``default``) and, when given, ``check``.

    Errors are one line naming the file and the key: ``ckpt/config.json: llm_config.head_dim must be
    a positive int, got str``. ``where`` is the dotted prefix of nested configs (``llm_config.``).
    """
    value = raw.get(key, default)
    if value is None:
        return default
    want = want or _KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind)))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{source}: {where}{key} must be {want}, got {type(value).__name__}")
    if check is not None and not check(value):
        raise ConfigError(f"{source}: {where}{key} must be {want}, got {value!r}")
    return value


def _pos_int(raw: dict[str, Any], key: str, default: Any, source: str, where: str = "") -> Any:
    return _typed(raw, key, int, default, source, where, lambda v: v > 0, "a positive int")


def _count(raw: dict[str, Any], key: str, default: Any, source: str, where: str = "") -> Any:
    return _typed(raw, key, int, default, source, where, lambda v: v >= 0, "a non-negative int")


def _pos_num(raw: dict[str, Any], key: str, default: Any, source: str, where: str = "") -> Any:
    return _typed(raw, key, float, default, source, where, lambda v: v > 0, "a positive number")


def _rate(raw: dict[str, Any], key: str, default: Any, source: str, where: str = "") -> Any:
    return _typed(raw, key, float, default, source, where, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _flag(raw: dict[str, Any], key: str, default: bool, source: str, where: str = "") -> bool:
    """A boolean; 0 / 1 are accepted too (upstream writes ``use_backbone_lora: 0`` style ints)."""
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    shown = repr(value) if isinstance(value, int) else type(value).__name__
    raise ConfigError(f"{source}: {where}{key} must be true or false, got {shown}")


def _token_id(raw: dict[str, Any], key: str, source: str, where: str = "", many: bool = False) -> Any:
    """A token id (``many``: or a list of them, as ``eos_token_id`` may be); None when absent."""
    value = raw.get(key)
    if many and isinstance(value, list):
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return value
    elif value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    want = "a token id (non-negative int)" + (" or a list of them" if many else "")
    shown = repr(value) if isinstance(value, (int, list)) else type(value).__name__
    raise ConfigError(f"{source}: {where}{key} must be {want}, got {shown}")


def _size(raw: dict[str, Any], key: str, default: int, source: str, where: str = "") -> int:
    """A square size: an int (original layout) or ``[n, n]`` (hf layout)."""
    value = raw.get(key, default)
    if value is None:
        return default
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if (
        1 <= len(items) <= 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items)
        and len(set(items)) == 1
    ):
        return items[0]
    shown = repr(value) if isinstance(value, (int, list)) else type(value).__name__
    raise ConfigError(f"{source}: {where}{key} must be a positive int or a square [n, n], got {shown}")


VISION_USED = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size",
    "num_channels", "hidden_act", "norm_type", "layer_norm_eps", "qkv_bias", "qk_normalization",
    "initializer_factor", "initializer_range", "drop_path_rate", "attention_dropout", "dropout",
    "attention_bias", "use_qk_norm", "layer_scale_init_value", "hidden_dropout_prob",
}  # fmt: skip


def _parse_vision(raw: dict[str, Any], source: str, hf: bool) -> VisionConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field 'vision_config' must be an object")
    w = "vision_config."
    mt = raw.get("model_type")
    if mt is not None and mt not in ("intern_vit_6b", "internvl_vision", "intern_vit_patch"):
        raise ConfigError(f"{source}: {w}model_type {mt!r} is not a supported vision model")
    cfg = VisionConfig(
        hidden_size=_pos_int(raw, "hidden_size", 1024, source, w),
        num_hidden_layers=_count(
            raw, "num_hidden_layers", 24, source, w
        ),  # 0: Mono-InternVL's patch embedding
        num_attention_heads=_pos_int(raw, "num_attention_heads", 16, source, w),
        intermediate_size=_pos_int(raw, "intermediate_size", 4096, source, w),
        patch_size=_size(raw, "patch_size", 14, source, w),
        image_size=_size(raw, "image_size", 448, source, w),
        num_channels=_pos_int(raw, "num_channels", 3, source, w),
        hidden_act=_typed(raw, "hidden_act", str, "gelu", source, w),
        norm_type=_typed(raw, "norm_type", str, "layer_norm", source, w),
        layer_norm_eps=_pos_num(raw, "layer_norm_eps", 1e-6, source, w),
        initializer_range=_typed(raw, "initializer_range", float, 0.02, source, w),
        drop_path_rate=_rate(raw, "drop_path_rate", 0.0, source, w),
        attention_dropout=_rate(raw, "attention_dropout", 0.0, source, w),
    )
    if hf:
        cfg.qkv_bias = _flag(raw, "attention_bias", False, source, w)
        cfg.qk_normalization = _flag(raw, "use_qk_norm", False, source, w)
        cfg.initializer_factor = _typed(raw, "layer_scale_init_value", float, 0.1, source, w)
        cfg.dropout = _rate(raw, "hidden_dropout_prob", 0.0, source, w)
    else:
        cfg.qkv_bias = _flag(raw, "qkv_bias", False, source, w)
        cfg.qk_normalization = _flag(raw, "qk_normalization", False, source, w)
        cfg.initializer_factor = _typed(raw, "initializer_factor", float, 1.0, source, w)
        cfg.dropout = _rate(raw, "dropout", 0.0, source, w)
    if cfg.norm_type not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"{source}: {w}norm_type must be 'layer_norm' or 'rms_norm', got {cfg.norm_type!r}")
    if cfg.hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu"):
        raise ConfigError(f"{source}: {w}hidden_act {cfg.hidden_act!r} is not supported")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"{source}: {w}hidden_size ({cfg.hidden_size}) is not a multiple of num_attention_heads "
            f"({cfg.num_attention_heads})"
        )
    cfg.extra = {k: v for k, v in raw.items() if k not in VISION_USED}
    return cfg


LLM_USED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "original_max_position_embeddings", "attention_bias",
    "mlp_bias", "bias", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id", "partial_rotary_factor",
}  # fmt: skip


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_rope_scaling(rope: Any, source: str) -> dict[str, Any] | None:
    """A ``rope_scaling`` set in code (a model override), checked and normalised as one read from a
    config file (``rope_type`` filled in, the keys its type needs present): a ConfigError naming
    ``source`` rather than a KeyError when the model is built or saved."""
    if isinstance(rope, dict) and "rope_theta" in rope:
        raise ConfigError(f"{source}: set rope_theta as llm.rope_theta, not inside rope_scaling")
    return _parse_rope({"rope_scaling": rope}, source, "")[0]


def _parse_rope(raw: dict[str, Any], source: str, w: str) -> tuple[dict[str, Any] | None, Any, str]:
    """``(rope scaling dict or None, rope_theta or None, the key it was read from)`` from
    ``rope_parameters`` (transformers 5, theta inside) or ``rope_scaling`` + ``rope_theta`` (4.x and
    the remote-code configs).

    The dict gets ``rope_type`` (``su`` read as ``longrope``; an original ``type`` key is kept for the
    save) and is checked for the keys its type needs (per-type checks come after head_dim is known).
    """
    key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    rope = raw.get(key)
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(
            f'{source}: {w}{key} must be an object such as {{"type": "linear", "factor": 2.0}} or null, '
            f"got {type(rope).__name__} {rope!r}"
        )
    rope = dict(rope) if rope else None
    theta = raw.get("rope_theta")
    if rope is not None and "rope_theta" in rope:
        theta = rope.pop("rope_theta")
    if theta is not None and not (_number(theta) and theta > 0):
        raise ConfigError(f"{source}: {w}rope_theta must be a positive number, got {theta!r}")
    if rope is None:
        return None, theta, key
    rope.pop("partial_rotary_factor", None)
    rtype = rope.get("rope_type") or rope.get("type") or "default"
    if not isinstance(rtype, str):
        raise ConfigError(f"{source}: {w}{key}.type must be a string, got {type(rtype).__name__}")
    rope["rope_type"] = "longrope" if rtype == "su" else rtype  # ``type`` keeps the original spelling
    if rope["rope_type"] not in ("default", *ROPE_SCALINGS):
        raise ConfigError(
            f"{source}: {w}{key}: unsupported rope scaling type {rtype!r} (supported: {', '.join(ROPE_SCALINGS)})"
        )
    if rope["rope_type"] == "default":
        return None, theta, key
    # as transformers (standardize_rope_params): a top-level original_max_position_embeddings wins
    top = raw.get("original_max_position_embeddings")
    if rope["rope_type"] in ("llama3", "yarn") and type(top) is int and top > 0:
        rope["original_max_position_embeddings"] = top
    needs = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "longrope": ("short_factor", "long_factor"),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": ("factor", "original_max_position_embeddings"),  # Qwen3's long-context setting
    }[rope["rope_type"]]
    for name in needs:
        if name not in rope:
            raise ConfigError(f"{source}: {w}{key} of type {rtype!r} needs the key '{name}'")
    positive = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "beta_fast", "beta_slow", "mscale", "mscale_all_dim")  # fmt: skip
    for name in positive:
        value = rope.get(name)
        if value is not None and not (_number(value) and value > 0):
            raise ConfigError(f"{source}: {w}{key}.{name} must be a positive number, got {value!r}")
    if rope.get("attention_factor") is not None and not _number(rope["attention_factor"]):
        raise ConfigError(
            f"{source}: {w}{key}.attention_factor must be a number, got {rope['attention_factor']!r}"
        )
    if rope.get("truncate") is not None and not isinstance(rope["truncate"], bool):
        raise ConfigError(f"{source}: {w}{key}.truncate must be true or false, got {rope['truncate']!r}")
    if rope["rope_type"] == "llama3" and rope["low_freq_factor"] == rope["high_freq_factor"]:
        raise ConfigError(f"{source}: {w}{key}: low_freq_factor and high_freq_factor must differ")
    return rope, theta, key


def _parse_llm(raw: dict[str, Any], source: str, key: str) -> LLMConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field {key!r} must be an object")
    w = "" if key == "config" else f"{key}."
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: {w}architectures must be a list, got {type(archs).__name__}")
    family = None
    if archs:
        family = ARCH_TO_FAMILY.get(archs[0])
        if family is None:
            raise ConfigError(
                f"{source}: {w}architectures: unsupported LLM architecture {archs[0]!r} "
                f"(supported: {', '.join(ARCH_TO_FAMILY)})"
            )
    if family is None:
        mt = raw.get("model_type", "")
        family = MODEL_TYPE_TO_FAMILY.get(mt) if isinstance(mt, str) else None
        if family is None:
            raise ConfigError(
                f"{source}: {w}model_type: unsupported LLM model_type {raw.get('model_type')!r}"
            )
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: {w}partial_rotary_factor != 1 is not supported")
    rope, theta, rkey = _parse_rope(raw, source, w)
    hidden = _pos_int(raw, "hidden_size", 4096, source, w)
    heads = _pos_int(raw, "num_attention_heads", 32, source, w)
    kv_heads = _pos_int(raw, "num_key_value_heads", heads, source, w)
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: {w}num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    # transformers' Qwen3Config defaults head_dim to 128 rather than hidden_size / heads
    head_dim = _pos_int(raw, "head_dim", 128 if family == "qwen3" else None, source, w)
    if head_dim is None and hidden % heads:
        raise ConfigError(
            f"{source}: {w}hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
            "and no head_dim is given"
        )
    if (head_dim or hidden // heads) % 2:
        raise ConfigError(f"{source}: {w}head_dim ({head_dim or hidden // heads}) must be even for RoPE")
    cfg = LLMConfig(
        family=family,
        vocab_size=_pos_int(raw, "vocab_size", 32000, source, w),
        hidden_size=hidden,
        intermediate_size=_pos_int(raw, "intermediate_size", 11008, source, w),
        num_hidden_layers=_pos_int(raw, "num_hidden_layers", 32, source, w),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=_typed(raw, "hidden_act", str, "silu", source, w),
        max_position_embeddings=_pos_int(raw, "max_position_embeddings", 2048, source, w),
        rms_norm_eps=_pos_num(raw, "rms_norm_eps", 1e-6, source, w),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=rope,
        original_max_position_embeddings=_pos_int(raw, "original_max_position_embeddings", None, source, w),
        tie_word_embeddings=_flag(raw, "tie_word_embeddings", False, source, w),
        initializer_range=_typed(raw, "initializer_range", float, 0.02, source, w),
        bos_token_id=_token_id(raw, "bos_token_id", source, w),
        eos_token_id=_token_id(raw, "eos_token_id", source, w, many=True),
        pad_token_id=_token_id(raw, "pad_token_id", source, w),
    )
    eos = [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id or []
    past = [i for i in eos if i >= cfg.vocab_size]
    if past:  # the logits end at vocab_size: this id is never generated, so generation would not stop
        raise ConfigError(
            f"{source}: {w}eos_token_id {past[0]} is past the vocabulary (vocab_size {cfg.vocab_size})"
        )
    if family == "qwen2":
        cfg.qkv_bias, cfg.o_bias = True, False
    elif family == "internlm2":
        bias = _flag(raw, "bias", True, source, w)
        cfg.qkv_bias = cfg.o_bias = bias
    elif family == "llama":
        bias = _flag(raw, "attention_bias", False, source, w)
        cfg.qkv_bias = cfg.o_bias = bias
        cfg.mlp_bias = _flag(raw, "mlp_bias", False, source, w)
    elif family == "qwen3":
        cfg.qkv_bias = cfg.o_bias = _flag(raw, "attention_bias", False, source, w)
    elif family == "phi3":
        cfg.qkv_bias = cfg.o_bias = False
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{source}: {w}hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
    _check_sliding_window(raw, cfg, source, w)
    if rope is not None:
        if cfg.rope_type == "longrope":
            half = cfg.head_dim // 2
            for name in ("short_factor", "long_factor"):
                value = rope[name]
                if not (isinstance(value, list) and len(value) == half and all(_number(v) for v in value)):
                    shown = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
                    raise ConfigError(
                        f"{source}: {w}{rkey}.{name} must be a list of {half} numbers (head_dim / 2), got {shown}"
                    )
    if cfg.rope_type == "longrope" and cfg.original_max_position_embeddings is None:
        orig = (rope or {}).get("original_max_position_embeddings")
        if orig is None:
            raise ConfigError(f"{source}: {w}original_max_position_embeddings is needed by longrope scaling")
        cfg.original_max_position_embeddings = int(orig)
    cfg.extra = {k: v for k, v in raw.items() if k not in LLM_USED}
    return cfg


def _check_sliding_window(raw: dict[str, Any], cfg: LLMConfig, source: str, w: str) -> None:
    """Refuse a sliding attention window that could take effect: it is not implemented.

    Qwen2 applies ``sliding_window`` only with ``use_sliding_window: true`` (InternVL's Qwen2 configs
    ship false); transformers' Phi-3 applies it whenever it is set (Phi-3-mini-128k: 262144, beyond
    its 131072 positions, so it never binds). A window at least ``max_position_embeddings`` long is
    the same as full causal attention and is accepted.
    """
    window = raw.get("sliding_window")
    if cfg.family in ("qwen2", "qwen3"):
        if not _flag(raw, "use_sliding_window", False, source, w):
            return
        # transformers 4.x windows the layers from max_window_layers on, 5.x those that layer_types
        # marks "sliding_attention": refused when either reading puts a window on some layer
        layer_types = raw.get("layer_types")
        marked = isinstance(layer_types, list) and "sliding_attention" in layer_types
        if not marked and _count(raw, "max_window_layers", 0, source, w) >= cfg.num_hidden_layers:
            return
    elif cfg.family != "phi3":
        return
    if window is None:
        return
    if not (isinstance(window, int) and not isinstance(window, bool) and window > 0):
        raise ConfigError(f"{source}: {w}sliding_window must be a positive int or null, got {window!r}")
    if window < cfg.max_position_embeddings:
        raise ConfigError(
            f"{source}: {w}sliding_window {window} is shorter than max_position_embeddings "
            f"{cfg.max_position_embeddings}: sliding-window attention is not supported"
            + (" (set use_sliding_window to false)" if cfg.family != "phi3" else "")
        )


def _parse_original(raw: dict[str, Any], source: str) -> InternVLConfig:
    _check_keys(raw, ORIGINAL_KEYS, source)
    normalize = _typed(raw, "normalize_type", str, "imagenet", source)
    if normalize != "imagenet":
        # a training-data option upstream (imagenet / clip / siglip mean-std); upstream inference and
        # evaluation always normalise with the ImageNet mean/std, and so does interleaf
        raise ConfigError(
            f"{source}: normalize_type {normalize!r} is not supported (InternVL inference normalises "
            "images with the ImageNet mean/std: 'imagenet')"
        )
    # ``pad2square`` only changes upstream's non-dynamic *training* transform (model-card inference and
    # the evaluation scripts never read it): kept for the round trip, type-checked, otherwise unused.
    # ``image_fold`` is not read by upstream's internvl_chat code at all (older configs carry null).
    cfg = InternVLConfig(
        vision=_parse_vision(raw.get("vision_config") or {}, source, hf=False),
        llm=_parse_llm(raw["llm_config"], source, "llm_config"),
        template=_typed(raw, "template", str, "Hermes-2", source),
        downsample_ratio=_typed(raw, "downsample_ratio", float, 0.5, source),
        ps_version=_typed(raw, "ps_version", str, "v1", source),  # upstream default when absent
        select_layer=_typed(raw, "select_layer", int, -1, source),
        force_image_size=_pos_int(raw, "force_image_size", None, source),
        min_dynamic_patch=_pos_int(raw, "min_dynamic_patch", 1, source),
        max_dynamic_patch=_pos_int(raw, "max_dynamic_patch", 6, source),
        use_thumbnail=_flag(raw, "use_thumbnail", False, source),
        dynamic_image_size=_flag(raw, "dynamic_image_size", False, source),
        pad2square=_flag(raw, "pad2square", False, source),
        system_message=_typed(raw, "system_message", str, None, source),
        layout="internvl_chat",
    )
    _validate(cfg, source)
    return cfg


# transformers' ``InternVLConfig`` default ``image_token_id``: ``<IMG_CONTEXT>`` of the Qwen2.5 tokenizers.
HF_DEFAULT_IMAGE_TOKEN_ID = 151667


def _parse_hf(raw: dict[str, Any], source: str) -> InternVLConfig:
    _check_keys(raw, HF_KEYS, source)
    text = raw.get("text_config") or {"model_type": "qwen2"}
    ours = raw.get("interleaf") or {}
    if not isinstance(ours, dict):
        raise ConfigError(f"{source}: field 'interleaf' must be an object")
    llm = _parse_llm(text, source, "text_config")
    if "tie_word_embeddings" in raw:
        llm.tie_word_embeddings = _flag(raw, "tie_word_embeddings", True, source)
    elif "tie_word_embeddings" not in text:
        llm.tie_word_embeddings = True  # InternVLConfig class default
    if ours.get("llm_family") in ("internlm2",) and llm.family == "llama":
        llm.family = "internlm2"  # saved by us from an InternLM2 model: restore its native naming
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{source}: field 'vision_feature_select_strategy' must be 'default'")
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: field 'projector_hidden_act' must be 'gelu'")
    vision_raw = raw.get("vision_config") or {}
    vision = _parse_vision(vision_raw, source, hf=True)
    i = "interleaf."
    cfg = InternVLConfig(
        vision=vision,
        llm=llm,
        template=_typed(ours, "template", str, DEFAULT_HF_TEMPLATE, source, i),
        downsample_ratio=_typed(raw, "downsample_ratio", float, 0.5, source),
        ps_version="v2",
        select_layer=_typed(raw, "vision_feature_layer", int, -1, source),
        force_image_size=_pos_int(ours, "force_image_size", vision.image_size, source, i),
        min_dynamic_patch=_pos_int(ours, "min_dynamic_patch", 1, source, i),
        max_dynamic_patch=_pos_int(ours, "max_dynamic_patch", 12, source, i),
        use_thumbnail=_flag(ours, "use_thumbnail", True, source, i),
        dynamic_image_size=_flag(ours, "dynamic_image_size", True, source, i),
        system_message=_typed(ours, "system_message", str, None, source, i),
        # absent: the tokenizer's <IMG_CONTEXT> id when the checkpoint loader has the tokenizer, else
        # transformers' default (see ``InternVLConfig.image_token_id``)
        img_context_token_id=_token_id(raw, "image_token_id", source),
        layout="hf",
    )
    if ours.get("ps_version") not in (None, "v2"):
        raise ConfigError(f"{source}: field 'interleaf.ps_version' must be 'v2' in the hf layout")
    _validate(cfg, source)
    return cfg


TEMPLATES = ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5")


def _validate(cfg: InternVLConfig, source: str) -> None:
    if cfg.ps_version not in ("v1", "v2"):
        raise ConfigError(f"{source}: field 'ps_version' must be 'v1' or 'v2', got {cfg.ps_version!r}")
    if cfg.template not in TEMPLATES:
        raise ConfigError(
            f"{source}: field 'template' is {cfg.template!r}; supported: {', '.join(TEMPLATES)}"
        )
    if cfg.min_dynamic_patch > cfg.max_dynamic_patch:
        raise ConfigError(
            f"{source}: min_dynamic_patch ({cfg.min_dynamic_patch}) is above max_dynamic_patch "
            f"({cfg.max_dynamic_patch})"
        )
    if cfg.downsample_ratio != 0.5:
        raise ConfigError(f"{source}: field 'downsample_ratio' must be 0.5, got {cfg.downsample_ratio}")
    grid = cfg.image_size // cfg.vision.patch_size
    if grid % 2:
        raise ConfigError(f"{source}: image grid {grid}x{grid} is odd; pixel shuffle needs an even grid")
    n = cfg.vision.num_hidden_layers
    if not -n - 1 <= cfg.select_layer <= n:
        raise ConfigError(f"{source}: field 'select_layer' {cfg.select_layer} out of range for {n} layers")


# ---------------------------------------------------------------------- writers
def _vision_to_original(v: VisionConfig) -> dict[str, Any]:
    out = dict(v.extra)
    out.update(
        {
            "model_type": "intern_vit_6b",
            "architectures": ["InternVisionModel"],
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "num_channels": v.num_channels,
            "hidden_act": v.hidden_act,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "qkv_bias": v.qkv_bias,
            "qk_normalization": v.qk_normalization,
            "initializer_factor": v.initializer_factor,
            "initializer_range": v.initializer_range,
            "drop_path_rate": v.drop_path_rate,
            "attention_dropout": v.attention_dropout,
            "dropout": v.dropout,
            "use_flash_attn": False,
        }
    )
    for k in ("layer_scale_init_value", "use_qk_norm", "attention_bias", "projection_dropout", "use_mask_token",
              "use_mean_pooling", "use_absolute_position_embeddings", "hidden_dropout_prob"):  # fmt: skip
        out.pop(k, None)
    return out


def _rope_out(c: LLMConfig) -> dict[str, Any] | None:
    if not c.rope_scaling:
        return None
    rope = dict(c.rope_scaling)
    rope.setdefault(
        "type", rope["rope_type"]
    )  # 4.x readers (and InternLM2 / Phi-3 remote code) read ``type``
    return rope


def _rope_to_original(c: LLMConfig) -> dict[str, Any] | None:
    """``llm_config.rope_scaling`` as the remote-code configs of the original layout validate it.

    Phi-3 (``Phi3Config._rope_scaling_validation``) wants exactly ``{type: su|yarn, short_factor,
    long_factor}`` with ``original_max_position_embeddings`` at the top level; InternLM2 exactly
    ``{type: linear|dynamic, factor: float}``. Keys those cannot carry must hold their default values
    (else the original layout cannot express the model: a ConfigError).
    """
    if not c.rope_scaling:
        return None
    rope = c.rope_scaling
    if c.family == "phi3" and c.rope_type == "longrope":
        orig = c.original_max_position_embeddings
        factor = rope.get("factor") or c.max_position_embeddings / orig
        default_attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        lost = {
            "factor": not math.isclose(factor, c.max_position_embeddings / orig),
            "attention_factor": rope.get("attention_factor") is not None
            and not math.isclose(rope["attention_factor"], default_attn),
            "original_max_position_embeddings": rope.get("original_max_position_embeddings")
            not in (None, orig),
        }
        extra = set(rope) - {"type", "rope_type", "short_factor", "long_factor", *lost}
        bad = sorted(k for k, v in lost.items() if v) + sorted(extra)
        if bad:
            raise ConfigError(
                f"llm_config.rope_scaling: {', '.join(bad)} cannot be written in the original layout "
                "(Phi-3 takes exactly type, short_factor and long_factor there); save in the hf layout"
            )
        return {
            "type": "su",
            "short_factor": list(rope["short_factor"]),
            "long_factor": list(rope["long_factor"]),
        }
    if c.family == "internlm2" and c.rope_type in ("linear", "dynamic"):
        extra = sorted(set(rope) - {"type", "rope_type", "factor"})
        if extra:
            raise ConfigError(
                f"llm_config.rope_scaling: {', '.join(extra)} cannot be written in the original layout "
                "(InternLM2 takes exactly type and factor there)"
            )
        return {"type": c.rope_type, "factor": float(rope["factor"])}
    return _rope_out(c)


def _llm_common(c: LLMConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": _rope_out(c),
        "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }


def _llm_to_original(c: LLMConfig) -> dict[str, Any]:
    out = {k: v for k, v in c.extra.items() if k not in ("architectures", "model_type")}
    out.update(_llm_common(c))
    out["rope_scaling"] = _rope_to_original(c)
    out["architectures"] = [FAMILY_TO_ARCH[c.family]]
    out["model_type"] = c.family
    # Qwen3's own default head_dim (128) is not hidden_size / heads: always written
    if c.head_dim != c.hidden_size // c.num_attention_heads or c.family == "qwen3":
        out["head_dim"] = c.head_dim
    if c.family == "internlm2":
        out["bias"] = c.qkv_bias
    elif c.family == "llama":
        out["attention_bias"] = _one_attention_bias(c, "llm_config")
        out["mlp_bias"] = c.mlp_bias
    elif c.family == "qwen3":
        out["attention_bias"] = _one_attention_bias(c, "llm_config")
    elif c.family == "phi3":
        out["original_max_position_embeddings"] = c.original_max_position_embeddings
    return out


def _one_attention_bias(c: LLMConfig, key: str) -> bool:
    """Llama's and Qwen3's ``attention_bias`` covers q/k/v and o alike."""
    if c.qkv_bias != c.o_bias:
        name = "Qwen3" if c.family == "qwen3" else "Llama"  # InternLM2 goes to the hf layout as Llama
        raise ConfigError(
            f"{key}: {name} needs the same bias on q/k/v and o projections (one attention_bias)"
        )
    return c.qkv_bias


def _llm_to_hf(c: LLMConfig) -> dict[str, Any]:
    """text_config: InternLM2 becomes Llama (same maths once ``wqkv`` is split)."""
    out = _llm_common(c)
    model_type = {"internlm2": "llama"}.get(c.family, c.family)
    out["model_type"] = model_type
    out["architectures"] = [FAMILY_TO_ARCH[model_type]]
    if c.head_dim != c.hidden_size // c.num_attention_heads or model_type in ("llama", "qwen3"):
        out["head_dim"] = c.head_dim
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = _one_attention_bias(c, "text_config")
    if model_type == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.family == "phi3":
        out["original_max_position_embeddings"] = c.original_max_position_embeddings
    if c.rope_scaling:
        rope = dict(c.rope_scaling)
        rope["rope_theta"] = c.rope_theta
        if c.family == "phi3":
            rope.setdefault("original_max_position_embeddings", c.original_max_position_embeddings)
        out["rope_parameters"] = rope
        out.pop("rope_scaling")
    else:
        out.pop("rope_scaling")
    return out
