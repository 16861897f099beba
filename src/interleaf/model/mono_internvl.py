"""Mono-InternVL: a monolithic InternVL - no vision encoder, visual experts inside the LLM.

    pixel_values [N, 3, 448, 448] --patch conv 14x14 + CLS + abs. pos-emb (InternVisionPatchModel)-->
    [N, 1 + 1024, C] --drop CLS, 32x32 grid, pixel shuffle 0.5--> [N, 256, 4C] --mlp1--> [N, 256, H]

The image embeddings fill the ``<IMG_CONTEXT>`` positions exactly as in InternVL (same prompts, tiling
and templates, 256 tokens per 448 px tile). The decoder is the plain LLM plus, in every layer, a visual
FFN expert ``feed_forward_ve`` beside the text FFN; routing is static by modality:

    visual_mask[b, s] = input_ids[b, s] == <IMG_CONTEXT>
    h[visual] -> feed_forward_ve(h[visual]),   h[~visual] -> mlp(h[~visual])

Tokens are *gathered* per modality, each expert runs on its own tokens only, and the results are
scattered back, so each token costs one FFN (upstream training code computes both experts on every
token and mixes them with the mask: ``FFN_t(h) * (1 - m) + FFN_v(h) * m``; the two are equal). Decode
steps (one new token) always use the text FFN, as upstream. With a text-only input the layer runs the
text path of the original LLM unchanged, so frozen-LLM training (EViP) keeps text logits bit-identical.

Optional visual *attention* experts (Mono-InternVL-1.5) sit behind ``llm.extra["visual_attention_experts"]``:
image tokens then use their own q/k/v/o projections (``self_attn.{q,k,v,o}_proj_ve``); attention itself
is still computed jointly over all tokens.

Parameter names follow the released Mono-InternVL-2B checkpoint where it has them
(``language_model.model.layers.{i}.feed_forward_ve.{w1,w2,w3}.weight``; InternLM2's w1 = gate, w3 = up,
w2 = down), so that layout loads without renaming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.errors import ConfigError
from interleaf.model.cache import KVCache
from interleaf.model.config import InternVLConfig, LLMConfig, VisionConfig
from interleaf.model.intern_vit import VisionEmbeddings
from interleaf.model.internvl import InternVLChatModel
from interleaf.model.llm import Attention, DecoderLayer, ModelOutput, apply_rope, varlen_attention

PATCH_MODEL_TYPE = "intern_vit_patch"  # vision_config.model_type of Mono-InternVL
VE_ARCH = "InternLM2VEForCausalLM"  # llm_config.architectures[0] of the released Mono-InternVL-2B
ATTN_EXPERTS_KEY = "visual_attention_experts"  # llm_config flag (interleaf's, Mono-InternVL-1.5 style)


# ----------------------------------------------------------------------------- config
def is_mono_config(cfg: InternVLConfig) -> bool:
    """True when a parsed config describes Mono-InternVL (patch-embedding vision or a VE LLM)."""
    if isinstance(cfg, MonoInternVLConfig):
        return True
    archs = cfg.llm.extra.get("architectures") or [None]
    return cfg.vision.extra.get("model_type") == PATCH_MODEL_TYPE or archs[0] == VE_ARCH


def has_attention_experts(cfg: LLMConfig) -> bool:
    return bool(cfg.extra.get(ATTN_EXPERTS_KEY, False))


@dataclass
class MonoInternVLConfig(InternVLConfig):
    """An :class:`InternVLConfig` whose ``vision`` is a patch embedding only and whose LLM has visual
    experts. Only the on-disk form differs (``intern_vit_patch``, ``InternLM2VEForCausalLM``); the
    attention-expert flag lives in ``llm.extra`` so that the decoder layers (built from the LLM
    config alone) can see it."""

    @classmethod
    def from_internvl(
        cls, cfg: InternVLConfig, visual_attention_experts: bool | None = None
    ) -> MonoInternVLConfig:
        if isinstance(cfg, cls) and visual_attention_experts is None:
            return cfg
        kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(InternVLConfig)}
        kw["vision"] = dataclasses.replace(
            cfg.vision, extra={**cfg.vision.extra, "model_type": PATCH_MODEL_TYPE}
        )
        llm_extra = dict(cfg.llm.extra)
        if visual_attention_experts is not None:
            llm_extra[ATTN_EXPERTS_KEY] = bool(visual_attention_experts)
        kw["llm"] = dataclasses.replace(cfg.llm, extra=llm_extra)
        return cls(**kw)

    @property
    def visual_attention_experts(self) -> bool:
        return has_attention_experts(self.llm)

    def to_original_dict(self) -> dict[str, Any]:
        """``config.json`` in the released Mono-InternVL layout."""
        out = super().to_original_dict()
        vision = out["vision_config"]
        vision["model_type"] = PATCH_MODEL_TYPE
        vision["architectures"] = ["InternVisionPatchModel"]
        llm = out["llm_config"]
        if self.llm.family == "internlm2":
            llm["architectures"] = [VE_ARCH]
        if not self.visual_attention_experts:
            llm.pop(ATTN_EXPERTS_KEY, None)
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        raise ConfigError(
            "layout: Mono-InternVL has no transformers-native (-hf) layout; save with layout='internvl_chat'"
        )


# ----------------------------------------------------------------------------- vision: patch embedding only
class InternVisionPatchModel(nn.Module):
    """InternViT's embedding layer alone: Conv 14x14 patches, CLS token, absolute position embedding
    (bicubic-interpolated for other grids). ``forward`` returns [N, 1 + P, C] with the CLS token first,
    like :class:`~interleaf.model.intern_vit.InternVisionModel`, so ``extract_feature`` drops it the same
    way. There are no transformer blocks: the LLM itself (with its visual experts) encodes the image."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + (H/p)(W/p), C]; ``select_layer`` is accepted and ignored (one layer)."""
        return self.embeddings(pixel_values)


# ----------------------------------------------------------------------------- routing
_NO_ROUTE = object()


def modality_route(visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat token indices ``(text_idx, visual_idx)`` of a bool mask [B, S]; None without image tokens.

    Computed once per forward (one host sync for ``nonzero``) and cached on the mask tensor itself:
    the same mask object reaches every layer, so the other layers reuse the indices. (So do not edit a
    mask in place between forwards; :class:`MonoInternVLChatModel` always passes a fresh one.)
    """
    cached = getattr(visual_mask, "_interleaf_route", _NO_ROUTE)
    if cached is not _NO_ROUTE:
        return cached
    flat = visual_mask.reshape(-1)
    visual = flat.nonzero().squeeze(1)
    route = None if visual.numel() == 0 else ((~flat).nonzero().squeeze(1), visual)
    visual_mask._interleaf_route = route
    return route


def routed(
    x: torch.Tensor,
    route: tuple[torch.Tensor, torch.Tensor],
    text_fn: nn.Module,
    visual_fn: nn.Module,
    out_features: int | None = None,
) -> torch.Tensor:
    """Apply ``text_fn`` to the text tokens and ``visual_fn`` to the image tokens of x [B, S, D_in]
    (gather, run each on its own rows, scatter back) -> [B, S, D_out]."""
    text_idx, visual_idx = route
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    out = flat.new_empty(b * s, out_features or d)
    if text_idx.numel():
        out.index_copy_(0, text_idx, text_fn(flat.index_select(0, text_idx)))
    out.index_copy_(0, visual_idx, visual_fn(flat.index_select(0, visual_idx)))
    return out.view(b, s, -1)


# ----------------------------------------------------------------------------- decoder
class VisualExpertMLP(nn.Module):
    """The visual FFN expert, SwiGLU with InternLM2 naming: ``w2(silu(w1(x)) * w3(x))``
    (w1 = gate, w3 = up, w2 = down; the same maths and op order as the text :class:`MLP`)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MonoAttention(Attention):
    """Attention with visual attention experts: image tokens use ``{q,k,v,o}_proj_ve``, text tokens the
    LLM's own projections; the softmax attention runs jointly over all tokens (and the KV cache)."""

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        d, h = cfg.head_dim, cfg.hidden_size
        self.q_proj_ve = nn.Linear(h, self.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj_ve = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj_ve = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj_ve = nn.Linear(self.num_heads * d, h, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        cache_position: torch.Tensor | None,
        kv_len: int | None,
        visual_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        route = modality_route(visual_mask) if visual_mask is not None and x.shape[1] > 1 else None
        if route is None:  # text only / decode: exactly the LLM's attention
            return super().forward(
                x, cos, sin, attn_mask, is_causal, kv_cache, cache_position, kv_len, cu_seqlens, max_seqlen
            )
        b, s, _ = x.shape
        d = self.head_dim
        q = routed(x, route, self.q_proj, self.q_proj_ve, self.num_heads * d)
        k = routed(x, route, self.k_proj, self.k_proj_ve, self.num_kv_heads * d)
        v = routed(x, route, self.v_proj, self.v_proj_ve, self.num_kv_heads * d)
        q = q.view(b, s, self.num_heads, d).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cu_seqlens is not None:  # packed samples: variable-length attention
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen).reshape(b, s, self.num_heads * d)
            return routed(out, route, self.o_proj, self.o_proj_ve, self.o_proj.out_features)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, cache_position, kv_len)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * d)
        return routed(out, route, self.o_proj, self.o_proj_ve, self.o_proj.out_features)


class MonoDecoderLayer(DecoderLayer):
    """Decoder layer with a visual FFN expert (``feed_forward_ve``) beside the text FFN (``mlp``) and,
    when the LLM config asks for it, visual attention experts."""

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        if has_attention_experts(cfg):
            self.self_attn = MonoAttention(cfg, layer_idx)
        self.feed_forward_ve = VisualExpertMLP(cfg)

    def feed_forward(self, x: torch.Tensor, visual_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, H] (normed). Image-context tokens -> ``feed_forward_ve``, all others -> ``mlp``."""
        if (
            visual_mask is None or x.shape[1] == 1
        ):  # decode steps: text FFN (also keeps CUDA graphs sync-free)
            return self.mlp(x)
        route = modality_route(visual_mask)
        if route is None:
            return self.mlp(x)
        return routed(x, route, self.mlp, self.feed_forward_ve)

    def dense_feed_forward(self, x: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """Upstream's training formulation, both experts on every token: the reference for tests."""
        m = visual_mask.to(x.dtype).unsqueeze(-1)
        return self.mlp(x) * (1.0 - m) + self.feed_forward_ve(x) * m

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        cache_position: torch.Tensor | None,
        kv_len: int | None,
        visual_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        varlen = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        if not isinstance(self.self_attn, MonoAttention):
            return super().forward(
                x, cos, sin, attn_mask, is_causal, kv_cache, cache_position, kv_len, visual_mask, **varlen
            )
        h = self.input_layernorm(x)
        x = x + self.self_attn(
            h, cos, sin, attn_mask, is_causal, kv_cache, cache_position, kv_len, visual_mask, **varlen
        )
        return x + self.feed_forward(self.post_attention_layernorm(x), visual_mask)


# ----------------------------------------------------------------------------- the model
class MonoInternVLChatModel(InternVLChatModel):
    """Mono-InternVL with the :class:`InternVLChatModel` contract (``embed``, ``extract_feature``,
    ``forward``, ``make_cache``), so the generation engine, chat and trainer take it unchanged.

    Accepts a plain :class:`InternVLConfig` (e.g. parsed from a released checkpoint) and turns it into
    a :class:`MonoInternVLConfig`.
    """

    def __init__(self, config: InternVLConfig, layer_cls: type[DecoderLayer] = MonoDecoderLayer) -> None:
        super().__init__(MonoInternVLConfig.from_internvl(config), layer_cls)

    def build_vision_model(self) -> nn.Module:
        return InternVisionPatchModel(self.config.vision)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ModelOutput:
        """As :meth:`InternVLChatModel.forward`. ``visual_mask`` may also be given as upstream's float
        [B, S, 1] mask; it is derived from ``input_ids`` when None."""
        if visual_mask is not None:
            if visual_mask.dim() == 3:
                visual_mask = visual_mask.squeeze(-1)
            # a private copy: routing indices get cached on the mask object (see modality_route)
            visual_mask = visual_mask.to(torch.bool, copy=True)
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            kv_cache=kv_cache,
            cache_position=cache_position,
            visual_mask=visual_mask,
            image_embeds=image_embeds,
            logits_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )

    @torch.no_grad()
    def copy_experts_from_text(self) -> None:
        """Initialise every visual expert as a copy of the LLM's text weights (FFN, and attention when
        attention experts exist): the starting point of EViP."""
        for layer in self.language_model.model.layers:
            ve, mlp = layer.feed_forward_ve, layer.mlp
            for dst, src in ((ve.w1, mlp.gate_proj), (ve.w3, mlp.up_proj), (ve.w2, mlp.down_proj)):
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias)
            attn = layer.self_attn
            if isinstance(attn, MonoAttention):
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    dst, src = getattr(attn, name + "_ve"), getattr(attn, name)
                    dst.weight.copy_(src.weight)
                    if dst.bias is not None:
                        dst.bias.copy_(src.bias)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the visual-expert parameters (FFN and attention experts) of a Mono model."""
    return [n for n, _ in model.named_parameters() if ".feed_forward_ve." in n or "_proj_ve." in n]
