"""Training precision: fp32, bf16 autocast, or bf16 weights with fp32 master weights.

``dtype`` in the training config:

* ``fp32``: everything in fp32 (the CPU default).
* ``bf16``: fp32 weights under ``torch.autocast``; every matmul casts its weight to bf16 on each use,
  and fp32 parameters mixed into bf16 activations (LayerScale, norms) promote them back to fp32.
* ``bf16-master`` (the GPU default): the model holds bf16 weights, so activations stay bf16 end to end
  and nothing is cast per op; the optimizer updates fp32 master copies, which are rounded into the
  model after every step. This is DeepSpeed's bf16 mode, in which upstream InternVL is trained.

Under FSDP2, ``bf16-master`` is FSDP's own mixed precision (fp32 sharded weights, bf16 compute).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> ``bf16-master`` on a GPU, ``fp32`` on the CPU; other values unchanged."""
    if dtype == "auto":
        return "bf16-master" if device.type == "cuda" else "fp32"
    return dtype


class MasterWeights:
    """fp32 master copies of a model's trainable weights; the model itself is turned to ``dtype``.

    Use the masters as the optimizer's parameters (:meth:`master_of`), then per step::

        loss.backward()            # bf16 gradients on the model
        masters.grads_to_master()  # fp32 gradients on the masters (the model's are freed)
        clip_grad_norm_(...); optimizer.step()
        masters.copy_to_model()    # round the updated masters into the bf16 model

    Frozen weights are converted too (they only feed the forward) and get no master; their original
    values are kept on the CPU where the conversion loses precision, so a saved checkpoint holds
    them unchanged (EViP's frozen LLM must come out bit for bit as it went in). Buffers (RoPE tables)
    keep their dtype.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self._by_id: dict[int, torch.Tensor] = {}
        self._frozen: dict[int, torch.Tensor] = {}
        for p in model.parameters():  # tied weights appear once
            if p.requires_grad:
                m = p.detach().to(torch.float32, copy=True).requires_grad_(True)
                self.params.append(p)
                self.masters.append(m)
                self._by_id[id(p)] = m
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    low = p.data.to(dtype)
                    if not p.requires_grad and not torch.equal(low.to(p.dtype), p.data):
                        self._frozen[id(p)] = p.data.detach().to("cpu", copy=True)
                    p.data = low

    def master_of(self, p: nn.Parameter) -> torch.Tensor:
        return self._by_id[id(p)]

    def named_masters(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(state-dict key, master) for every key backed by a master (tied weights: both keys)."""
        return _keyed(model, self._by_id)

    def named_originals(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(state-dict key, value before the conversion) for frozen weights the conversion rounded."""
        return _keyed(model, self._frozen)

    @torch.no_grad()
    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.masters)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Set the masters (and the model) from ``state``'s entries for them (e.g. resumed LoRA weights)."""
        for name, m in self.named_masters(model):
            if name in state:
                m.copy_(state[name])
        self.copy_to_model()


def _keyed(model: nn.Module, by_id: dict[int, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, ``by_id[id(tensor)]``) for the model's tensors that have an entry."""
    for name, t in model.state_dict(keep_vars=True).items():
        value = by_id.get(id(t))
        if value is not None:
            yield name, value
