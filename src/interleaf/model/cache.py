"""Static, preallocated key/value cache.

One ``[B, n_kv, max_len, d]`` buffer per layer for keys and for values. Attention writes the new
keys/values at absolute slots ``cache_position`` (``index_copy_``, no reallocation) and then attends
over the filled prefix ``[:kv_len]``, or - for a call that passes ``cache_position`` while
``full_attention`` is set, i.e. a decode step - over the whole buffer with a causal mask, so every
shape is static and a CUDA graph can capture the step. A prefill into an empty cache always attends
just the prompt.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        full_attention: bool = False,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.full_attention = full_attention
        self.length = 0  # filled prefix length, kept up to date by the model's forward (host side)

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, n_kv, S, d] at ``cache_position`` [S]; return the keys/values to attend."""
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb.index_copy_(2, cache_position, k.to(kb.dtype))
        vb.index_copy_(2, cache_position, v.to(vb.dtype))
        if kv_len == self.max_len:
            return kb, vb
        return kb[:, :, :kv_len], vb[:, :, :kv_len]

    def reset(self) -> None:
        """Forget the content (buffers are reused; stale slots are never attended)."""
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device
