"""Variable-length attention: the fused-kernel branch's layout bookkeeping (emulated on CPU), the
per-segment loop, and the kernel wrapper's handling of torch's varlen_attn signatures."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from interleaf.model import llm
from interleaf.model.llm import from_varlen, segment_loop_attention, to_varlen, varlen_attention
from interleaf.train.packing import block_causal_mask


def emulated_kernel(q, k, v, cu_seqlens, max_seqlen):
    """What a varlen kernel computes, in plain PyTorch on the flat layout: q [T, h, d], k/v [T, h_kv, d],
    causal attention inside each segment ``cu_seqlens[i]:cu_seqlens[i+1]`` of the T tokens."""
    bounds = cu_seqlens.tolist()
    assert max_seqlen == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # [1, h, n, d]
        o = F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        out[a:b] = o[0].transpose(0, 1)
    return out


def packed_qkv(lengths, s, h=4, h_kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, h_kv, s, d, generator=g)
    v = torch.randn(b, h_kv, s, d, generator=g)
    cu = [0]
    for lens in lengths:
        for n in lens + ([s - sum(lens)] if sum(lens) < s else []):  # padding: its own segment
            cu.append(cu[-1] + n)
    return q, k, v, torch.tensor(cu, dtype=torch.int32)


def test_layout_roundtrip():
    x = torch.randn(2, 3, 5, 4)
    flat = to_varlen(x)
    assert flat.shape == (10, 3, 4)
    torch.testing.assert_close(flat[5 + 2], x[1, :, 2])  # token (row 1, position 2)
    torch.testing.assert_close(from_varlen(flat, 2, 5), x.transpose(1, 2))


@pytest.mark.parametrize("h_kv", [4, 2])
def test_kernel_branch_equals_loop_and_mask(h_kv):
    lengths = [[3, 5, 1], [6, 2]]
    q, k, v, cu = packed_qkv(lengths, s=10, h_kv=h_kv)
    loop = segment_loop_attention(q, k, v, cu)  # [B, S, h, d]
    fused = varlen_attention(q, k, v, cu, max_seqlen=6, kernel=emulated_kernel)
    torch.testing.assert_close(fused, loop, atol=1e-6, rtol=1e-6)
    mask = block_causal_mask([[3, 5, 1, 1], [6, 2, 2]], 10)  # the padding run is one segment here
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h_kv != 4).transpose(1, 2)
    torch.testing.assert_close(loop, ref, atol=1e-5, rtol=1e-5)
    # default path on CPU is the loop, bit for bit
    torch.testing.assert_close(varlen_attention(q, k, v, cu), loop, atol=0, rtol=0)


def test_kernel_branch_gradients_equal_loop():
    q, k, v, cu = packed_qkv([[4, 4], [7]], s=8)
    grads = []
    for kernel in (emulated_kernel, None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        varlen_attention(*leaves, cu, kernel=kernel).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["window", "is_causal", "none"])
def test_kernel_wrapper_signatures(monkeypatch, style):
    """Causal via window_size=(-1, 0) (newer torch) or is_causal=True (older); GQA native or repeated."""
    import torch.nn.attention.varlen as varlen_mod

    calls = []
    if style == "window":

        def fake(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False
        ):
            calls.append({"window_size": window_size, "enable_gqa": enable_gqa, "kv_heads": key.shape[1]})
            return query

    elif style == "is_causal":

        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            calls.append({"is_causal": is_causal, "kv_heads": key.shape[1]})
            return query

    else:

        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
            return query

    monkeypatch.setattr(varlen_mod, "varlen_attn", fake)
    kernel = llm._resolve_varlen_kernel()
    if style == "none":
        assert kernel is None
        return
    q, k, v = torch.zeros(6, 4, 8), torch.zeros(6, 2, 8), torch.zeros(6, 2, 8)
    kernel(q, k, v, torch.tensor([0, 6], dtype=torch.int32), 6)
    if style == "window":
        assert calls == [{"window_size": (-1, 0), "enable_gqa": True, "kv_heads": 2}]
    else:
        assert calls == [{"is_causal": True, "kv_heads": 4}]  # k/v heads repeated for GQA


def test_installed_torch_kernel_resolves():
    """This torch has varlen_attn: the wrapper must find a causal argument in its signature."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    params = inspect.signature(varlen.varlen_attn).parameters
    if "window_size" in params or "is_causal" in params:
        assert llm._resolve_varlen_kernel() is not None


def test_mono_attention_experts_varlen_equals_block_mask():
    """Mono-InternVL (routed visual attention experts) packed via cu_seqlens == the 4-D block mask."""
    from interleaf.model.mono_checkpoint import build_mono_model, mono_preset_config

    cfg = mono_preset_config("tiny-mono", vocab_size=512, visual_attention_experts=True)
    cfg.img_context_token_id = 500
    model = build_mono_model(cfg, seed=0, copy_experts=False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 400, (2, 256 + 20), generator=g)
    ids[0, 5 : 5 + 256] = 500  # row 0: one tile inside its first sample; row 1: text only
    px = torch.randn(1, 3, 448, 448, generator=g)
    lengths = [[200 + 70, 6], [100, 150, 26]]
    mask = block_causal_mask(lengths, 276)
    cu = torch.tensor([0, 270, 276, 376, 526, 552], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for lens in lengths for n in lens]).view(2, 276)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos).logits
        b = model(input_ids=ids, pixel_values=px, cu_seqlens=cu).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
