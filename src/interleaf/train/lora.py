"""LoRA for the LLM and the ViT, mergeable into the weights on save.

``y = W x + (alpha / r) * B(A(dropout(x)))`` with A [r, in] (Kaiming-uniform init) and B [out, r] (zeros),
so a freshly wrapped model computes exactly what the base model does. Upstream settings: alpha = 2r,
dropout 0.05; targets (spec 1.7) in interleaf's unfused layout: the LLM's q/k/v/o projections and
gate/up/down MLP projections (InternLM2 ``wqkv``/``wo``/``w1-3`` and Phi-3 ``qkv_proj``/``gate_up_proj``
map onto these on load), the ViT's ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.

Where upstream's checkpoint holds several projections as one matrix (InternLM2 ``wqkv``, Phi-3
``qkv_proj`` and ``gate_up_proj``), upstream's LoRA is one adapter on the fused matrix: one A, and a B
whose rows split across the projections. The members of such a group here share one ``lora_A``
parameter and keep their slice of B, which is the same parametrisation (same trainable parameters, same
update ``B_member @ A``); only the dropout mask is drawn per member.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# projections fused into one matrix in each LLM family's original checkpoints
FUSED_GROUPS = {
    "internlm2": (("q_proj", "k_proj", "v_proj"),),
    "phi3": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update. Shapes: x [..., in] -> [..., out]."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(
            torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # so code reading ``.weight`` (dtype, device) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """The base Linear with ``scaling * B @ A`` added to its weight (computed in fp32)."""
        w = self.base.weight.data.float() + self.scaling * (
            self.lora_B.data.float() @ self.lora_A.data.float()
        )
        self.base.weight.data.copy_(w.to(self.base.weight.dtype))
        return self.base


def apply_lora(
    module: nn.Module,
    targets: tuple[str, ...],
    r: int,
    alpha: float | None = None,
    dropout: float = 0.05,
    fused: tuple[tuple[str, ...], ...] = (),
) -> list[str]:
    """Wrap every ``nn.Linear`` under ``module`` whose name ends with a target; returns the wrapped names.

    ``fused``: groups of sibling attribute names (e.g. ``("q_proj", "k_proj", "v_proj")``) that share one
    ``lora_A``, as LoRA on the fused matrix they come from."""
    alpha = 2 * r if alpha is None else alpha
    wrapped = []
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear) and name.endswith(targets):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if isinstance(parent, LoRALinear):
                continue
            setattr(parent, attr, LoRALinear(child, r, alpha, dropout))
            wrapped.append(name)
    for parent in module.modules():
        for group in fused:
            members = [getattr(parent, a, None) for a in group]
            if all(isinstance(m, LoRALinear) for m in members):
                for m in members[1:]:
                    m.lora_A = members[0].lora_A
    return wrapped


def apply_llm_lora(model: nn.Module, r: int, dropout: float = 0.05) -> list[str]:
    """LoRA on an InternVL model's LLM, with the LLM family's fused groups sharing A (as upstream)."""
    groups = FUSED_GROUPS.get(model.config.llm.family, ())
    return apply_lora(model.language_model, LLM_TARGETS, r, dropout=dropout, fused=groups)


def merge_lora(module: nn.Module, merge: bool = True) -> int:
    """Fold every LoRA update into its base weight (``merge=False``: drop it) and put the plain
    ``nn.Linear`` back; returns how many were unwrapped."""
    n = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.merged() if merge else child.base)
            n += 1
    return n


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in module.modules())


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k}
