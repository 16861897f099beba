"""The decoder LLM: one implementation for Qwen2/Qwen2.5, Qwen3, InternLM2/2.5, Phi-3 and Llama.

The families differ only in naming on disk (handled by ``checkpoint.py``), in which projections carry
a bias, in their RoPE scaling and in Qwen3's per-head RMSNorm of q and k (``q_norm``/``k_norm``, before
RoPE); the maths below is shared:

    x = embed_tokens(ids)                                   [B, S, H]
    for each layer:
        x = x + self_attn(input_layernorm(x))               (GQA, RoPE, SDPA, optional static KV cache)
        x = x + feed_forward(post_attention_layernorm(x), visual_mask)    (SwiGLU)
    logits = lm_head(norm(x))                               [B, S, V]

``DecoderLayer.feed_forward(x, visual_mask)`` is the single place a modality-expert FFN
(Mono-InternVL) hooks in: subclass ``DecoderLayer`` and pass ``layer_cls`` to :class:`DecoderLM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.errors import ConfigError
from interleaf.model.cache import KVCache
from interleaf.model.config import ROPE_SCALINGS, LLMConfig
from interleaf.model.intern_vit import RMSNorm


@dataclass
class ModelOutput:
    """``logits`` [B, S', V] (S' = S or ``logits_to_keep``); ``last_hidden_state`` [B, S, H] after the
    final norm; ``hidden_states`` the input of every layer plus the final output (only when asked)."""

    logits: torch.Tensor
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:  # dict-style access, like transformers outputs
        return getattr(self, key)


# ----------------------------------------------------------------------------- RoPE
class RotaryEmbedding(nn.Module):
    """Rotary position embedding with the scaling types used by the family's configs.

    * ``default``: inv_freq = theta^(-2i/d)
    * ``linear``: inv_freq / factor
    * ``dynamic`` (NTK, InternLM2): theta grows once the sequence passes ``max_position_embeddings``
    * ``longrope`` / ``su`` (Phi-3): per-frequency short or long factors, chosen by sequence length,
      and cos/sin scaled by an attention factor
    * ``llama3``: wavelength-dependent smooth scaling
    * ``yarn`` (Qwen3's long context): per-frequency blend of scaled and unscaled frequencies over a
      ramp between ``beta_fast`` and ``beta_slow`` rotations, and cos/sin scaled by an attention factor

    ``forward(position_ids [B, S]) -> (cos, sin)`` each [B, S, d], computed in fp32.
    The length-dependent choices are tensor ops (no host sync), so a CUDA graph can capture them.
    """

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.dim = dim = cfg.head_dim
        self.rope_type = cfg.rope_type
        if self.rope_type not in ("default", *ROPE_SCALINGS):  # a config made in code, not parsed
            raise ConfigError(
                f"llm.rope_scaling: rope scaling type {self.rope_type!r} is not implemented "
                f"(supported: {', '.join(ROPE_SCALINGS)})"
            )
        rope = cfg.rope_scaling or {}
        self.base = cfg.rope_theta
        self.attention_factor = 1.0
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (cfg.rope_theta**exponents)
        if self.rope_type == "linear":
            inv_freq = inv_freq / rope["factor"]
        elif self.rope_type == "dynamic":
            self.factor = float(rope["factor"])
            self.max_pos = cfg.max_position_embeddings
            self.register_buffer("exponents", exponents, persistent=False)
        elif self.rope_type == "longrope":
            orig = cfg.original_max_position_embeddings
            self.original_max = orig
            factor = rope.get("factor") or cfg.max_position_embeddings / orig
            attn = rope.get("attention_factor")
            if attn is None:
                attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            self.attention_factor = attn
            base_freq = cfg.rope_theta**exponents
            self.register_buffer(
                "long_inv_freq",
                1.0 / (torch.tensor(rope["long_factor"]).float() * base_freq),
                persistent=False,
            )
            inv_freq = 1.0 / (torch.tensor(rope["short_factor"]).float() * base_freq)
        elif self.rope_type == "llama3":
            inv_freq = _llama3_scale(inv_freq, rope)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn_scale(inv_freq, rope, dim, cfg.rope_theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.rope_type == "dynamic":
            seq_len = (position_ids.max() + 1).float().clamp(min=self.max_pos)
            base = self.base * (self.factor * seq_len / self.max_pos - (self.factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
            return 1.0 / base ** self.exponents.to(position_ids.device)
        if self.rope_type == "longrope":
            use_long = position_ids.max() + 1 > self.original_max
            return torch.where(use_long, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq(position_ids)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # [B, S, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def _llama3_scale(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_scale(inv_freq: torch.Tensor, rope: dict, dim: int, theta: float) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071), as transformers computes it: frequencies that turn fewer than
    ``beta_slow`` times over the original context are divided by ``factor`` (interpolated), those that
    turn more than ``beta_fast`` times are kept, with a linear ramp between; cos/sin are scaled by
    ``attention_factor`` (default 0.1 ln(factor) + 1, or the ratio of the two ``mscale`` terms)."""
    factor, original = float(rope["factor"]), rope["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention = mscale(factor)

    def dim_of(rotations: float) -> float:  # the rotary dimension that turns this often over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(rope.get("beta_fast") or 32), dim_of(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (unscaled), 0: interpolate (divided by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, S, d], cos/sin [B, 1, S, d] (already in x's dtype)."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- variable-length attention
# Packed rows hold several samples; ``cu_seqlens`` (int32 [n_segments + 1]) are the segment offsets into
# the flattened [B * S] tokens (segments never cross rows). Each segment attends causally to itself only.

_VARLEN_KERNEL: list = []  # [callable or None], resolved on first use
_VARLEN_WARNED = False  # set once the fused kernel proved unusable here
_VARLEN_REASONS: set[str] = set()


def _resolve_varlen_kernel():
    """A ``kernel(q [T, h, d], k [T, h_kv, d], v, cu_seqlens, max_seqlen) -> [T, h, d]`` (causal per
    segment) built on ``torch.nn.attention.varlen.varlen_attn``, or None when this torch lacks it.
    Causal is ``window_size=(-1, 0)`` in newer torch and ``is_causal=True`` in older; GQA uses
    ``enable_gqa`` when the kernel has it, else k/v heads are repeated."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
    except Exception:  # noqa: BLE001 - any import/introspection problem means: no kernel
        return None
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    native_gqa = "enable_gqa" in params

    def kernel(q, k, v, cu_seqlens, max_seqlen):
        extra = dict(causal)
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:
                g = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **extra)

    return kernel


def _warn_once(reason: str, disable: bool = True) -> None:
    """One warning per process; ``disable``: stop trying the kernel (it cannot work in this process)."""
    global _VARLEN_WARNED
    if disable:
        _VARLEN_WARNED = True
    if reason not in _VARLEN_REASONS:
        _VARLEN_REASONS.add(reason)
        import warnings

        warnings.warn(f"{reason}: packed attention runs per segment (slower)", stacklevel=3)


def varlen_kernel():
    """The fused varlen kernel (see :func:`_resolve_varlen_kernel`), resolved once; None if absent."""
    if not _VARLEN_KERNEL:
        _VARLEN_KERNEL.append(_resolve_varlen_kernel())
    return _VARLEN_KERNEL[0]


def to_varlen(x: torch.Tensor) -> torch.Tensor:
    """[B, h, S, d] -> [B * S, h, d] (token-major, the layout of varlen kernels)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def from_varlen(x: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """[B * S, h, d] -> [B, S, h, d]."""
    return x.view(b, s, x.shape[1], x.shape[2])


def segment_loop_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Per-segment causal SDPA (plain PyTorch, any device): q [B, h, S, d], k/v [B, h_kv, S, d] ->
    [B, S, h, d]. Costs the samples' own lengths, not the whole (mostly masked) S x S square."""
    b, _, s, _ = q.shape
    bounds = cu_seqlens.tolist()
    gqa = k.shape[1] != q.shape[1]
    rows: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        r, st = divmod(start, s)
        n = end - start
        rows[r].append(
            F.scaled_dot_product_attention(
                q[r : r + 1, :, st : st + n],
                k[r : r + 1, :, st : st + n],
                v[r : r + 1, :, st : st + n],
                is_causal=True,
                enable_gqa=gqa,
            )  # fmt: skip
        )
    return torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0).transpose(1, 2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    kernel=None,
) -> torch.Tensor:
    """Causal attention inside each segment: q [B, h, S, d], k/v [B, h_kv, S, d] -> [B, S, h, d].

    One fused call over all segments when a varlen kernel applies (``kernel``, or on CUDA in fp16/bf16
    the torch one), else :func:`segment_loop_attention` (the CPU path; exactly the per-sample maths).
    """
    b, _, s, _ = q.shape
    if kernel is None and q.is_cuda and not _VARLEN_WARNED:
        kernel = varlen_kernel()
        if torch.is_autocast_enabled(q.device.type):  # rope may have upcast q/k; SDPA would downcast
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if kernel is None:
            _warn_once("torch has no usable torch.nn.attention.varlen.varlen_attn")
        elif q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
            kernel = None
            _warn_once(f"the varlen kernel needs fp16/bf16 (got {q.dtype}; use autocast)", disable=False)
    if kernel is not None:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        try:
            out = kernel(
                to_varlen(q), to_varlen(k), to_varlen(v), cu_seqlens.to(q.device, torch.int32), max_seqlen
            )
            return from_varlen(out, b, s)
        except Exception as err:  # noqa: BLE001 - an unsupported shape/dtype/build: use the loop from now on
            if not q.is_cuda:
                raise
            _warn_once(f"the varlen attention kernel failed ({type(err).__name__}: {err})")
    return segment_loop_attention(q, k, v, cu_seqlens)


def causal_mask(kv_len: int, cache_position: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool attention mask [B or 1, 1, S, kv_len] (True = attend) of queries at key slots ``cache_position``
    [S]: causal over the slots, and with ``pad_mask`` (bool [B, kv_len], False = padding) padding keys
    hidden - except a query's own slot, so that a padded query still sees one key (no NaN)."""
    slots = torch.arange(kv_len, device=cache_position.device)
    causal = slots[None, :] <= cache_position[:, None]  # [S, S_kv]
    if pad_mask is None:
        return causal[None, None]
    own = slots[None, :] == cache_position[:, None]
    return (causal & pad_mask[:, None, None, :]) | own


# ----------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; writes to / reads from a static :class:`KVCache`."""

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3: RMSNorm over each head's d channels (weight [d]) of q and k, before RoPE
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()

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
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]. ``attn_mask`` bool [B, 1, S, S_kv] (True = attend) or None;
        ``cu_seqlens`` (int32 [n_segments + 1] over the flattened [B * S] tokens): packed samples, each
        attending causally to itself only (``attn_mask``/``is_causal`` are then ignored)."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cu_seqlens is not None:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # [B, S, h, d]
            return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, cache_position, kv_len)
        if s == 1 and self.num_kv_heads != self.num_heads and not is_causal:
            # one-token decode with GQA: the g query heads of a kv head become g "query positions",
            # so any SDPA kernel runs without repeating k/v (same maths, mask broadcasts)
            g = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(
                q.view(b, self.num_kv_heads, g, self.head_dim), k, v, attn_mask=attn_mask
            )
            return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block. Override :meth:`feed_forward` to route tokens to experts."""

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def feed_forward(self, x: torch.Tensor, visual_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, H] (already normed); ``visual_mask`` [B, S] bool marks image-context tokens."""
        return self.mlp(x)

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
        x = x + self.self_attn(
            self.input_layernorm(x), cos, sin, attn_mask, is_causal, kv_cache, cache_position, kv_len,
            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        )  # fmt: skip
        return x + self.feed_forward(self.post_attention_layernorm(x), visual_mask)


class DecoderModel(nn.Module):
    """Embeddings + layers + final norm (``language_model.model`` in checkpoints)."""

    def __init__(self, cfg: LLMConfig, layer_cls: type[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class DecoderLM(nn.Module):
    """Causal LM. ``forward`` takes ids or embeddings, masks, positions and an optional KV cache."""

    def __init__(self, cfg: LLMConfig, layer_cls: type[DecoderLayer] = DecoderLayer) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, layer_cls)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def make_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        cfg, w = self.config, self.model.embed_tokens.weight
        return KVCache(
            cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim,
            dtype=dtype or w.dtype, device=device or w.device,
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ModelOutput:
        """ids [B, S] or embeds [B, S, H] -> logits [B, S or logits_to_keep, V].

        ``cu_seqlens`` int32 [n_segments + 1]: packed rows (variable-length attention). Offsets of the
        samples (and padding runs) in the flattened [B * S] tokens, segments never crossing a row; each
        attends causally to itself only, ``attention_mask`` is ignored, ``position_ids`` default to
        restarting at every segment, ``max_seqlen`` (longest segment) is computed when None. No cache.

        ``attention_mask``: 2-D [B, L] 1/0 padding mask over the key slots (L >= the keys attended;
        shorter masks are padded with ones), or 4-D bool [B, 1, S, S_kv] (True = attend) used as is.
        ``position_ids`` default: from the 2-D mask (cumsum - 1) or the cache positions.
        With ``kv_cache``, the new keys/values go to slots ``cache_position`` (default: after the
        cache's current length) and attention covers the filled prefix - or, when ``cache_position``
        is given and ``kv_cache.full_attention`` is set, the whole buffer under a mask, so a CUDA graph
        sees the same shapes at every step. Without ``cache_position`` the keys attended are always
        the filled prefix: a prefill into an empty cache runs the fused causal kernel.
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        device = x.device
        if cu_seqlens is not None:
            return self._forward_varlen(x, cu_seqlens, max_seqlen, position_ids, visual_mask,
                                        logits_to_keep, output_hidden_states)  # fmt: skip

        # --- which key slots exist, and where the new tokens go
        if kv_cache is None:
            kv_len = s
            if cache_position is None:
                cache_position = torch.arange(s, device=device)
            start_known_zero = True
        else:
            if cache_position is None:
                cache_position = torch.arange(kv_cache.length, kv_cache.length + s, device=device)
                start_known_zero = kv_cache.length == 0
                kv_len = kv_cache.length + s
                kv_cache.length += s
            elif kv_cache.full_attention:
                kv_len, start_known_zero = kv_cache.max_len, False
            else:
                last = int(cache_position[-1])  # host sync; CPU path only
                kv_len, start_known_zero = last + 1, last + 1 == s
                kv_cache.length = max(kv_cache.length, kv_len)

        # --- positions
        pad_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            pad_mask = attention_mask.bool()
            if pad_mask.shape[1] < kv_len:
                pad_mask = F.pad(pad_mask, (0, kv_len - pad_mask.shape[1]), value=True)
        if position_ids is None:
            if pad_mask is not None:
                pos = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos[:, cache_position] if kv_cache is not None or pos.shape[1] != s else pos
            else:
                position_ids = cache_position[None].expand(b, s)

        # --- attention mask: None + is_causal for the plain cases, else bool [B, 1, S, S_kv]
        attn_mask, is_causal = None, False
        if attention_mask is not None and attention_mask.dim() == 4:
            attn_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(x.dtype)
        else:
            if pad_mask is not None:
                pad_mask = pad_mask[:, :kv_len]
                if pad_mask.device.type == "cpu" and bool(pad_mask.all()):
                    pad_mask = None  # nothing padded: keep the fast path
            plain_prefill = start_known_zero and s == kv_len
            plain_decode = s == 1 and kv_cache is not None and not kv_cache.full_attention
            if pad_mask is None and plain_prefill:
                is_causal = s > 1
            elif pad_mask is None and plain_decode:
                pass
            else:
                attn_mask = causal_mask(kv_len, cache_position, pad_mask)

        return self._run_layers(
            x, position_ids, attn_mask, is_causal, kv_cache, cache_position, kv_len, visual_mask,
            logits_to_keep, output_hidden_states,
        )  # fmt: skip

    def _forward_varlen(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        position_ids: torch.Tensor | None,
        visual_mask: torch.Tensor | None,
        logits_to_keep: int,
        output_hidden_states: bool,
    ) -> ModelOutput:
        b, s, _ = x.shape
        cu = cu_seqlens.to(x.device, torch.int32)
        if position_ids is None:  # restart at every segment
            lens = (cu[1:] - cu[:-1]).long()
            starts = torch.repeat_interleave(cu[:-1].long(), lens, output_size=b * s)
            position_ids = (torch.arange(b * s, device=x.device) - starts).view(b, s)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not per layer
        return self._run_layers(
            x, position_ids, None, False, None, None, s, visual_mask, logits_to_keep, output_hidden_states,
            cu_seqlens=cu, max_seqlen=max_seqlen,
        )  # fmt: skip

    def _run_layers(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        cache_position: torch.Tensor | None,
        kv_len: int | None,
        visual_mask: torch.Tensor | None,
        logits_to_keep: int,
        output_hidden_states: bool,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ModelOutput:
        cos, sin = self.model.rotary_emb(position_ids)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # [B, 1, S, d]
        varlen = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}

        hidden = [] if output_hidden_states else None
        for layer in self.model.layers:
            if hidden is not None:
                hidden.append(x)
            x = layer(
                x, cos, sin, attn_mask, is_causal, kv_cache, cache_position, kv_len, visual_mask, **varlen
            )
        x = self.model.norm(x)
        if hidden is not None:
            hidden.append(x)
        h = x[:, -logits_to_keep:] if logits_to_keep else x
        return ModelOutput(
            logits=self.lm_head(h), last_hidden_state=x, hidden_states=tuple(hidden) if hidden else None
        )
