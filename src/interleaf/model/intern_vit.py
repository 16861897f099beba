"""InternViT, the vision encoder of InternVL, plus pixel shuffle.

Shapes: ``N`` tiles, ``P = (image_size / patch_size)^2`` patches (1024 at 448/14), ``C`` the ViT width.

    pixel_values [N, 3, H, W] -> patch conv -> [N, P, C], CLS prepended -> [N, 1 + P, C]
    + absolute position embedding (bicubic-interpolated for other grids) -> L pre-norm blocks
    -> hidden state of ``select_layer`` (no final norm) [N, 1 + P, C]

Parameter names follow the original InternVL-Chat checkpoints (``embeddings.class_embedding``,
``encoder.layers.{i}.attn.qkv``, ``ls1`` ...), so that layout loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.model.config import VisionConfig


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in fp32 and cast back (as InternRMSNorm / Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if norm_type == "rms_norm" else nn.LayerNorm(dim, eps=eps)


def make_act(name: str) -> nn.Module:
    return {
        "gelu": nn.GELU(),  # exact (erf) GELU, as upstream
        "gelu_pytorch_tanh": nn.GELU(approximate="tanh"),
        "silu": nn.SiLU(),
    }.get(name) or _QuickGELU()


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionEmbeddings(nn.Module):
    """CLS token + patch conv + absolute position embedding."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size  # grid the position table was trained for
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, c))

    def patch_pos_embed(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Patch position embedding for an ``h x w`` grid: [1, h*w, C].

        The trained ``grid x grid`` table is resized with bicubic interpolation (align_corners=False)
        in fp32; at the trained grid this is exactly the identity.
        """
        table = self.position_embedding[:, 1:]
        if h == self.grid and w == self.grid:
            return table.to(dtype)
        c, device = table.shape[-1], table.device
        if device.type == "cuda" and torch.are_deterministic_algorithms_enabled() and table.requires_grad:
            # CUDA's bicubic backward sums with atomics, which torch refuses in deterministic mode;
            # the CPU's is exact (the table is small)
            table = table.cpu()
        table = table.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return table.reshape(1, c, h * w).permute(0, 2, 1).to(device, dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + (H/p)(W/p), C]"""
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # [N, C, h, w]
        n, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C], row-major over the grid
        cls = self.class_embedding.to(dtype).expand(n, 1, c)
        pos = torch.cat([self.position_embedding[:, :1].to(dtype), self.patch_pos_embed(h, w, dtype)], dim=1)
        return torch.cat([cls, x], dim=1) + pos


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with a fused ``qkv`` projection and optional q/k RMSNorm."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.proj = nn.Linear(c, c)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            # normalise over the full width C (all heads together), before the head split
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, C] -> [N, T, C]"""
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)  # each [N, T, C]
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, d]
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = make_act(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``, as upstream InternViT uses it): in training, each sample
    (tile) of the batch keeps the residual branch with probability ``1 - p``, scaled by ``1 / (1 - p)``
    so its expectation is unchanged, and loses it otherwise. The identity in eval mode or at ``p == 0``.
    No parameters, so weight names are unaffected."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class VisionBlock(nn.Module):
    """Pre-norm block with LayerScale: ``x += drop_path(ls1 * attn(norm1(x)));
    x += drop_path(ls2 * mlp(norm2(x)))`` (``drop_path`` only acts in training, see :class:`DropPath`)."""

    def __init__(self, cfg: VisionConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = make_norm(cfg.norm_type, c, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(c))
        self.norm2 = make_norm(cfg.norm_type, c, cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(c))
        self.drop_path1 = DropPath(drop_path_rate)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1 * self.attn(self.norm1(x)))
        return x + self.drop_path2(self.ls2 * self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, n_blocks: int) -> list[float]:
    """Stochastic depth per block: linear from 0 to ``rate`` over the blocks (upstream's ``dpr``)."""
    return torch.linspace(0, rate, n_blocks, device="cpu").tolist() if n_blocks else []


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        rates = drop_path_rates(cfg.drop_path_rate, cfg.num_hidden_layers)
        self.layers = nn.ModuleList(VisionBlock(cfg, rate) for rate in rates)


class InternVisionModel(nn.Module):
    """InternViT. ``forward`` returns the hidden state of ``select_layer`` (CLS included)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def set_drop_path_rate(self, rate: float) -> None:
        """Change stochastic depth after construction (e.g. a loaded checkpoint fine-tuned with the
        upstream scripts' ``--drop_path_rate 0.1``): block ``i`` of ``L`` drops with
        ``rate * i / (L - 1)``; ``config.drop_path_rate`` follows, so a saved config records it."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")
        for block, p in zip(self.encoder.layers, drop_path_rates(rate, len(self.encoder.layers))):
            block.drop_path1.p = block.drop_path2.p = p
        self.config.drop_path_rate = float(rate)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + P, C].

        ``select_layer`` indexes the list (embeddings output, block 1 output, ..., block L output)
        like upstream ``hidden_states[select_layer]``; -1 is the last block. Only the blocks needed
        are run. There is no final norm.
        """
        num_layers = len(self.encoder.layers)
        n_run = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
        x = self.embeddings(pixel_values)
        for block in self.encoder.layers[:n_run]:
            x = block(x)
        return x


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Space-to-depth on a patch grid, as InternVL does it.

    x: [N, A, B, C] where upstream names the dims (n, w, h, c); the ViT output reshaped row-major
    gives A = rows, B = columns. Returns [N, B*s, A*s, C/s^2] for v1 (column-pair-major tokens) and
    [N, A*s, B*s, C/s^2] for v2 (row-pair-major). Output token (k, j) of v2 holds the channels of
    x[2k, 2j], x[2k, 2j+1], x[2k+1, 2j], x[2k+1, 2j+1] concatenated (for s = 0.5).
    """
    n, a, b, c = x.shape
    # fold pairs of neighbouring columns into the channels
    x = x.reshape(n, a, int(b * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3)
    # then pairs of neighbouring rows (now on dim 2) into the channels
    x = x.reshape(n, int(b * scale), int(a * scale), int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3)  # back to row-major token order
    return x.contiguous()
