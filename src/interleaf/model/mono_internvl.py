"""Mono-InternVL: a monolithic InternVL - no vision encoder, visual experts inside the LLM.

    pixel_values [N, 3, 448, 448] --patch conv 14x14 + CLS + abs. pos-emb (InternVisionPatchModel)-->
    [N, 1 + 1024, C] --drop CLS, 32x32 grid, pixel shuffle 0.5--> [N, 256, 4C] --mlp1--> [N, 256, H]

The image embeddings fill the ``<IMG_CONTEXT>`` positions exactly as in InternVL (same prompts, tiling
and templates, 256 tokens per 448 px tile). The decoder is the plain LLM plus, in every layer, a visual
FFN expert ``feed_forward_ve`` beside the text FFN; routing is static by modality:

    visual_mask[b, s] = input_ids[b, s] == <IMG_CONTEXT>
    h[visual] -> feed_forward_ve(h[visual]),   h[~visual] -> mlp(h[~visual])

Each expert runs on its own tokens only, so each token costs one FFN: in real prompts every image is
one contiguous run of tokens, so the experts run on slices of the hidden states (views; outputs joined
by one ``cat``); with many image runs tokens are gathered per modality and scattered back
(:class:`ModalityRoute`). Upstream's training code computes both experts on every token and mixes
them with the mask, ``FFN_t(h) * (1 - m) + FFN_v(h) * m``; the results are equal. Decode steps (one new token) always use the text FFN, as upstream. With a text-only input the layer runs the
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
import functools
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
MAX_SEGMENT_RUNS = 8  # at most this many image-token runs per forward: route by slices, else gather


@dataclass(frozen=True, eq=False)
class ModalityRoute:
    """Where the text and the image tokens of one forward are, over the flattened [B * S] rows.

    Two forms, with the same results (each expert sees the same rows, in the same order):

    - ``segments`` (real prompts: each image is one contiguous run of 256 x tiles tokens): the
      ``(start, end, visual)`` runs that tile ``[0, B * S)`` in order. Each modality's rows are a
      view (one run) or one ``cat`` of the runs, and the outputs are joined by one ``cat``: no
      index kernels, and a single image's tokens reach their expert without a copy.
    - ``text_idx`` / ``visual_idx`` (more than :data:`MAX_SEGMENT_RUNS` image runs, e.g. a batch of
      many images or arbitrary masks): flat indices for ``index_select`` / ``index_copy_``.
    """

    num_text: int
    num_visual: int
    segments: tuple[tuple[int, int, bool], ...] | None = None
    text_idx: torch.Tensor | None = None
    visual_idx: torch.Tensor | None = None

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """[B * S, D] -> (text rows [num_text, D] or None, image rows [num_visual, D])."""
        if self.segments is None:  # no branch on the counts, so an exported graph takes this form
            return flat.index_select(0, self.text_idx), flat.index_select(0, self.visual_idx)
        sizes, text_at, visual_at, _ = self._plan
        parts = flat.split(sizes) if len(sizes) > 1 else (flat,)  # views, one op
        return _join([parts[i] for i in text_at]), _join([parts[i] for i in visual_at])

    def merge(self, text: torch.Tensor | None, visual: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split` for the experts' outputs: -> [B * S, D_out]."""
        if self.segments is None:
            out = visual.new_empty(self.num_text + self.num_visual, visual.shape[-1])
            return out.index_copy_(0, self.text_idx, text).index_copy_(0, self.visual_idx, visual)
        sizes, text_at, visual_at, order = self._plan
        if len(sizes) == 1:  # image tokens only
            return visual
        # each modality's rows cut back into its runs (views), then all runs in their order
        parts = (
            _cut(text, [sizes[i] for i in text_at]),
            _cut(visual, [sizes[i] for i in visual_at]),
        )
        return torch.cat([parts[v][i] for v, i in order])

    @functools.cached_property
    def _plan(self) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
        """Run lengths; positions of the text / image runs among them; for each run, (0 text / 1
        image, its index among its modality's runs)."""
        sizes = [end - start for start, end, _ in self.segments]
        text_at = [i for i, (_, _, v) in enumerate(self.segments) if not v]
        visual_at = [i for i, (_, _, v) in enumerate(self.segments) if v]
        order = [
            (int(v), (visual_at if v else text_at).index(i)) for i, (_, _, v) in enumerate(self.segments)
        ]
        return sizes, text_at, visual_at, order


def _cut(rows: torch.Tensor | None, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    return () if rows is None else rows.split(sizes) if len(sizes) > 1 else (rows,)


def _join(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """One run is a view (no copy); several are concatenated once."""
    return None if not rows else rows[0] if len(rows) == 1 else torch.cat(rows)


_NO_ROUTE = object()


def modality_route(
    visual_mask: torch.Tensor, max_runs: int | None = None, in_graph: bool = False
) -> ModalityRoute | None:
    """The :class:`ModalityRoute` of a bool mask [B, S]; None without image tokens. Segments when
    the image tokens form at most ``max_runs`` (default :data:`MAX_SEGMENT_RUNS`) runs, else indices.

    One host sync per forward (the run boundaries), then cached on the mask tensor itself: the same
    mask object reaches every layer, so the other layers reuse the route. (So do not edit a mask in
    place between forwards; :class:`MonoInternVLChatModel` always passes a fresh one.)

    ``in_graph``: the index form computed by tensor ops alone (no host sync, never None), for a graph
    exported with the mask as an input (ONNX); its experts also see empty row sets.
    """
    cached = getattr(visual_mask, "_interleaf_route", _NO_ROUTE)
    if cached is not _NO_ROUTE:
        return cached
    flat = visual_mask.reshape(-1)
    if in_graph:
        visual_idx, text_idx = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        num_visual = visual_idx.shape[0]
        route = ModalityRoute(
            flat.shape[0] - num_visual, num_visual, text_idx=text_idx, visual_idx=visual_idx
        )
        visual_mask._interleaf_route = route
        return route
    host = flat.to("cpu", torch.int8)  # the one host sync (the mask is tiny)
    n = host.numel()
    # with a text sentinel at both ends, the changes of the mask are [start0, end0, start1, end1, ...]
    padded = F.pad(host, (1, 1))
    edges = (padded[1:] != padded[:-1]).nonzero().squeeze(1).tolist()
    runs = list(zip(edges[0::2], edges[1::2]))
    num_visual = sum(end - start for start, end in runs)
    if not runs:
        route = None
    elif len(runs) <= (MAX_SEGMENT_RUNS if max_runs is None else max_runs):
        segments, at = [], 0
        for start, end in runs:
            if start > at:
                segments.append((at, start, False))
            segments.append((start, end, True))
            at = end
        if at < n:
            segments.append((at, n, False))
        route = ModalityRoute(n - num_visual, num_visual, segments=tuple(segments))
    else:
        text_idx, visual_idx = ((host == v).nonzero().squeeze(1).to(flat.device) for v in (0, 1))
        route = ModalityRoute(n - num_visual, num_visual, text_idx=text_idx, visual_idx=visual_idx)
    visual_mask._interleaf_route = route
    return route


def routed(x: torch.Tensor, route: ModalityRoute, text_fn: nn.Module, visual_fn: nn.Module) -> torch.Tensor:
    """Apply ``text_fn`` to the text tokens and ``visual_fn`` to the image tokens of x [B, S, D_in]
    (each expert on its own rows only) -> [B, S, D_out]."""
    b, s, d = x.shape
    text, visual = route.split(x.reshape(b * s, d))
    out = route.merge(None if text is None else text_fn(text), visual_fn(visual))
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
        b, s, h = x.shape
        d = self.head_dim
        text, visual = route.split(x.reshape(b * s, h))  # once for q, k and v

        def project(text_fn: nn.Module, visual_fn: nn.Module, heads: int) -> torch.Tensor:
            out = route.merge(None if text is None else text_fn(text), visual_fn(visual))
            return out.view(b, s, heads, d).transpose(1, 2)

        # a Qwen3 LLM's q/k norms are shared by both modalities (the experts are the projections)
        q = self.q_norm(project(self.q_proj, self.q_proj_ve, self.num_heads))
        k = self.k_norm(project(self.k_proj, self.k_proj_ve, self.num_kv_heads))
        v = project(self.v_proj, self.v_proj_ve, self.num_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cu_seqlens is not None:  # packed samples: variable-length attention
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen).reshape(b, s, self.num_heads * d)
            return routed(out, route, self.o_proj, self.o_proj_ve)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, cache_position, kv_len)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * d)
        return routed(out, route, self.o_proj, self.o_proj_ve)


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
        # decode steps: text FFN (also keeps CUDA graphs sync-free)
        if visual_mask is None or x.shape[1] == 1:
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
        derived = visual_mask is None and input_ids is not None
        if visual_mask is not None:
            if visual_mask.dim() == 3:
                visual_mask = visual_mask.squeeze(-1)
            # a private copy: the route gets cached on the mask object (see modality_route)
            visual_mask = visual_mask.to(torch.bool, copy=True)
        elif derived and self.config.img_context_token_id is not None:
            visual_mask = input_ids == self.config.img_context_token_id
        # Prefill: route now, so that its host sync waits for nothing but the mask; every layer then
        # reuses it. Decode steps (one token) never route: they stay sync-free for CUDA graphs.
        route = modality_route(visual_mask) if visual_mask is not None and visual_mask.shape[1] > 1 else None
        has_images = pixel_values is not None or image_embeds is not None
        if inputs_embeds is None and derived and has_images and route is not None and route.segments:
            inputs_embeds = self._embed_runs(input_ids, route, pixel_values, image_embeds)
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

    def _embed_runs(
        self,
        input_ids: torch.Tensor,
        route: ModalityRoute,
        pixel_values: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`embed` for a segment route: the image features are copied into the runs of image
        tokens by slice (no ``masked_scatter``, and the token count is known without a sync)."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_embeds is None:
            image_embeds = self.extract_feature(pixel_values)
        feats = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if feats.shape[0] != route.num_visual:
            return self.embed(input_ids, None, image_embeds)  # raises the model's one-line error
        flat, at = embeds.view(-1, embeds.shape[-1]), 0
        for start, end, visual in route.segments:
            if visual:
                flat[start:end] = feats[at : at + end - start]
                at += end - start
        return embeds

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
