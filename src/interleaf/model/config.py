"""Configs of an InternVL-family model, parsed from either checkpoint layout.

Two ``config.json`` layouts exist upstream:

* the original InternVL-Chat layout (``model_type: internvl_chat``): ``vision_config`` (InternViT),
  ``llm_config`` (a Qwen2 / InternLM2 / Phi-3 / Llama config) and InternVL keys such as ``template``,
  ``downsample_ratio``, ``ps_version``, ``select_layer``, ``max_dynamic_patch``;
* the transformers-native layout (``model_type: internvl``, the ``-hf`` checkpoints): ``vision_config``
  (``internvl_vision``), ``text_config`` (qwen2 or llama) and ``image_token_id``.

Both parse into one :class:`InternVLConfig` made of a :class:`VisionConfig` and an :class:`LLMConfig`.
Top-level keys are checked against the keys each layout is known to carry; anything else is a
:class:`~interleaf.errors.ConfigError` naming the key and the file. Nested configs are lenient (upstream
configs serialise dozens of generic keys); the keys that matter are read, the rest kept in ``extra``.
"""

from __future__ import annotations

import json
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
    "InternLM2ForCausalLM": "internlm2",
    "InternLM2VEForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPE_TO_FAMILY = {"qwen2": "qwen2", "internlm2": "internlm2", "phi3": "phi3", "llama": "llama"}
FAMILY_TO_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "llama": "LlamaForCausalLM",
}

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

    ``family`` is one of ``qwen2``, ``internlm2``, ``phi3``, ``llama``; it only decides how weights and
    configs are named on disk and which biases exist (the maths is shared).
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
        model_type = raw.get("model_type")
        if model_type == "internvl" or (model_type is None and "text_config" in raw):
            return _parse_hf(raw, source)
        if model_type in (None, "internvl_chat") and "llm_config" in raw:
            return _parse_original(raw, source)
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
            "image_token_id": self.img_context_token_id,
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
        if key not in known:
            raise ConfigError(f"{source}: unknown config key {where}{key!r}")


def _typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, source: str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


VISION_USED = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size",
    "num_channels", "hidden_act", "norm_type", "layer_norm_eps", "qkv_bias", "qk_normalization",
    "initializer_factor", "initializer_range", "drop_path_rate", "attention_dropout", "dropout",
    "attention_bias", "use_qk_norm", "layer_scale_init_value", "hidden_dropout_prob",
}  # fmt: skip


def _parse_vision(raw: dict[str, Any], source: str, hf: bool) -> VisionConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field 'vision_config' must be an object")
    src = f"{source} (vision_config)"
    mt = raw.get("model_type")
    if mt is not None and mt not in ("intern_vit_6b", "internvl_vision", "intern_vit_patch"):
        raise ConfigError(f"{src}: unsupported vision model_type {mt!r}")
    cfg = VisionConfig(
        hidden_size=_typed(raw, "hidden_size", int, 1024, src),
        num_hidden_layers=_typed(raw, "num_hidden_layers", int, 24, src),
        num_attention_heads=_typed(raw, "num_attention_heads", int, 16, src),
        intermediate_size=_typed(raw, "intermediate_size", int, 4096, src),
        patch_size=_first_int(raw.get("patch_size", 14)),
        image_size=_first_int(raw.get("image_size", 448)),
        num_channels=_typed(raw, "num_channels", int, 3, src),
        hidden_act=_typed(raw, "hidden_act", str, "gelu", src),
        norm_type=_typed(raw, "norm_type", str, "layer_norm", src),
        layer_norm_eps=_typed(raw, "layer_norm_eps", float, 1e-6, src),
        initializer_range=_typed(raw, "initializer_range", float, 0.02, src),
        drop_path_rate=_typed(raw, "drop_path_rate", float, 0.0, src),
        attention_dropout=_typed(raw, "attention_dropout", float, 0.0, src),
    )
    if hf:
        cfg.qkv_bias = _typed(raw, "attention_bias", bool, False, src)
        cfg.qk_normalization = _typed(raw, "use_qk_norm", bool, False, src)
        cfg.initializer_factor = _typed(raw, "layer_scale_init_value", float, 0.1, src)
        cfg.dropout = _typed(raw, "hidden_dropout_prob", float, 0.0, src)
    else:
        cfg.qkv_bias = _typed(raw, "qkv_bias", bool, False, src)
        cfg.qk_normalization = _typed(raw, "qk_normalization", bool, False, src)
        cfg.initializer_factor = _typed(raw, "initializer_factor", float, 1.0, src)
        cfg.dropout = _typed(raw, "dropout", float, 0.0, src)
    if cfg.norm_type not in ("layer_norm", "rms_norm"):
        raise ConfigError(
            f"{src}: field 'norm_type' must be 'layer_norm' or 'rms_norm', got {cfg.norm_type!r}"
        )
    if cfg.hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu"):
        raise ConfigError(f"{src}: unsupported hidden_act {cfg.hidden_act!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{src}: hidden_size is not a multiple of num_attention_heads")
    cfg.extra = {k: v for k, v in raw.items() if k not in VISION_USED}
    return cfg


LLM_USED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "original_max_position_embeddings", "attention_bias",
    "mlp_bias", "bias", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id", "partial_rotary_factor",
}  # fmt: skip


def _parse_llm(raw: dict[str, Any], source: str, key: str) -> LLMConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field {key!r} must be an object")
    src = f"{source} ({key})"
    archs = raw.get("architectures") or []
    family = None
    if archs:
        family = ARCH_TO_FAMILY.get(archs[0])
        if family is None:
            raise ConfigError(
                f"{src}: unsupported LLM architecture {archs[0]!r} (supported: {', '.join(ARCH_TO_FAMILY)})"
            )
    if family is None:
        family = MODEL_TYPE_TO_FAMILY.get(raw.get("model_type", ""))
        if family is None:
            raise ConfigError(f"{src}: unsupported LLM model_type {raw.get('model_type')!r}")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{src}: partial_rotary_factor != 1 is not supported")
    # rope: transformers 5 writes ``rope_parameters`` (with rope_theta inside), 4.x ``rope_theta`` + ``rope_scaling``
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    rope = dict(rope) if isinstance(rope, dict) else None
    theta = raw.get("rope_theta")
    if rope is not None and "rope_theta" in rope:
        theta = rope.pop("rope_theta")
    if rope is not None:
        rope.pop("partial_rotary_factor", None)
        rtype = rope.get("rope_type") or rope.get("type") or "default"
        rope["rope_type"] = "longrope" if rtype == "su" else rtype  # ``type`` keeps the original spelling
        if rope["rope_type"] not in ("default", "linear", "dynamic", "longrope", "llama3"):
            raise ConfigError(f"{src}: unsupported rope scaling type {rtype!r}")
        if rope["rope_type"] == "default":
            rope = None
    hidden = _typed(raw, "hidden_size", int, 4096, src)
    heads = _typed(raw, "num_attention_heads", int, 32, src)
    kv_heads = _typed(raw, "num_key_value_heads", int, heads, src)
    if kv_heads <= 0 or heads % kv_heads:
        raise ConfigError(
            f"{src}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    cfg = LLMConfig(
        family=family,
        vocab_size=_typed(raw, "vocab_size", int, 32000, src),
        hidden_size=hidden,
        intermediate_size=_typed(raw, "intermediate_size", int, 11008, src),
        num_hidden_layers=_typed(raw, "num_hidden_layers", int, 32, src),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=raw.get("head_dim") or None,
        hidden_act=_typed(raw, "hidden_act", str, "silu", src),
        max_position_embeddings=_typed(raw, "max_position_embeddings", int, 2048, src),
        rms_norm_eps=_typed(raw, "rms_norm_eps", float, 1e-6, src),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=rope,
        original_max_position_embeddings=raw.get("original_max_position_embeddings"),
        tie_word_embeddings=_typed(raw, "tie_word_embeddings", bool, False, src),
        initializer_range=_typed(raw, "initializer_range", float, 0.02, src),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    if family == "qwen2":
        cfg.qkv_bias, cfg.o_bias = True, False
    elif family == "internlm2":
        bias = _typed(raw, "bias", bool, True, src)
        cfg.qkv_bias = cfg.o_bias = bias
    elif family == "llama":
        bias = _typed(raw, "attention_bias", bool, False, src)
        cfg.qkv_bias = cfg.o_bias = bias
        cfg.mlp_bias = _typed(raw, "mlp_bias", bool, False, src)
    elif family == "phi3":
        cfg.qkv_bias = cfg.o_bias = False
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{src}: unsupported hidden_act {cfg.hidden_act!r} (only 'silu')")
    if cfg.rope_type == "longrope" and cfg.original_max_position_embeddings is None:
        cfg.original_max_position_embeddings = (rope or {}).get("original_max_position_embeddings")
        if cfg.original_max_position_embeddings is None:
            raise ConfigError(f"{src}: longrope needs original_max_position_embeddings")
    cfg.extra = {k: v for k, v in raw.items() if k not in LLM_USED}
    return cfg


def _parse_original(raw: dict[str, Any], source: str) -> InternVLConfig:
    _check_keys(raw, ORIGINAL_KEYS, source)
    cfg = InternVLConfig(
        vision=_parse_vision(raw.get("vision_config") or {}, source, hf=False),
        llm=_parse_llm(raw["llm_config"], source, "llm_config"),
        template=_typed(raw, "template", str, "Hermes-2", source),
        downsample_ratio=_typed(raw, "downsample_ratio", float, 0.5, source),
        ps_version=_typed(raw, "ps_version", str, "v1", source),  # upstream default when absent
        select_layer=_typed(raw, "select_layer", int, -1, source),
        force_image_size=raw.get("force_image_size"),
        min_dynamic_patch=_typed(raw, "min_dynamic_patch", int, 1, source),
        max_dynamic_patch=_typed(raw, "max_dynamic_patch", int, 6, source),
        use_thumbnail=bool(raw.get("use_thumbnail", False)),
        dynamic_image_size=bool(raw.get("dynamic_image_size", False)),
        pad2square=bool(raw.get("pad2square", False)),
        system_message=raw.get("system_message"),
        layout="internvl_chat",
    )
    _validate(cfg, source)
    return cfg


def _parse_hf(raw: dict[str, Any], source: str) -> InternVLConfig:
    _check_keys(raw, HF_KEYS, source)
    text = raw.get("text_config") or {"model_type": "qwen2"}
    ours = raw.get("interleaf") or {}
    if not isinstance(ours, dict):
        raise ConfigError(f"{source}: field 'interleaf' must be an object")
    llm = _parse_llm(text, source, "text_config")
    if "tie_word_embeddings" in raw:
        llm.tie_word_embeddings = bool(raw["tie_word_embeddings"])
    elif "tie_word_embeddings" not in text:
        llm.tie_word_embeddings = True  # InternVLConfig class default
    if ours.get("llm_family") in ("internlm2",) and llm.family == "llama":
        llm.family = "internlm2"  # saved by us from an InternLM2 model: restore its native naming
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{source}: field 'vision_feature_select_strategy' must be 'default'")
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: field 'projector_hidden_act' must be 'gelu'")
    vision_raw = raw.get("vision_config") or {}
    cfg = InternVLConfig(
        vision=_parse_vision(vision_raw, source, hf=True),
        llm=llm,
        template=ours.get("template") or DEFAULT_HF_TEMPLATE,
        downsample_ratio=_typed(raw, "downsample_ratio", float, 0.5, source),
        ps_version="v2",
        select_layer=_typed(raw, "vision_feature_layer", int, -1, source),
        force_image_size=ours.get("force_image_size") or _first_int(vision_raw.get("image_size", 448)),
        min_dynamic_patch=int(ours.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(ours.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(ours.get("use_thumbnail", True)),
        dynamic_image_size=bool(ours.get("dynamic_image_size", True)),
        system_message=ours.get("system_message"),
        img_context_token_id=raw.get("image_token_id", 151667),
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
    out["architectures"] = [FAMILY_TO_ARCH[c.family]]
    out["model_type"] = c.family
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        out["head_dim"] = c.head_dim
    if c.family == "internlm2":
        out["bias"] = c.qkv_bias
    elif c.family == "llama":
        out["attention_bias"] = c.qkv_bias
        out["mlp_bias"] = c.mlp_bias
    elif c.family == "phi3":
        out["original_max_position_embeddings"] = c.original_max_position_embeddings
    return out


def _llm_to_hf(c: LLMConfig) -> dict[str, Any]:
    """text_config: InternLM2 becomes Llama (same maths once ``wqkv`` is split)."""
    out = _llm_common(c)
    model_type = {"internlm2": "llama"}.get(c.family, c.family)
    out["model_type"] = model_type
    out["architectures"] = [FAMILY_TO_ARCH[model_type]]
    if c.head_dim != c.hidden_size // c.num_attention_heads or model_type == "llama":
        out["head_dim"] = c.head_dim
    if model_type == "llama":
        if c.qkv_bias != c.o_bias:
            raise ConfigError("text_config: Llama needs the same bias on q/k/v and o projections")
        out["attention_bias"] = c.qkv_bias
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
