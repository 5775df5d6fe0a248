r"""Measure the memory of one training step: what autograd saves, what a CPU step holds, a GPU step's peak.

Three measurements that notebook 06 holds against ``lora_ref.memory``'s calculators:

* :func:`saved_for_backward`: the bytes of the distinct tensors autograd saves for backward while ``fn()``
  runs, seen through ``torch.autograd.graph.saved_tensors_hooks`` (the activations of the memory formula);
* :func:`step_bytes`: on any device, one optimizer step counted by storage: resident weights and buffers,
  gradients, optimizer state and saved activations;
* :func:`cuda_step_peak`: on a GPU, ``torch.cuda.max_memory_allocated`` over one steady-state step.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from .optim import optimizer_state_nbytes


def saved_for_backward(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
                       ) -> tuple[torch.Tensor, int]:
    """Run ``fn()`` and return (its result, bytes of the distinct storages autograd saved for backward).

    Storages of ``exclude`` (parameters and buffers already resident) are not counted; a storage saved by
    several operations is counted once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def step_bytes(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> dict[str, int]:
    """One training step (forward, backward, ``opt.step()``) counted by storage, in bytes:
    ``weights`` (parameters and buffers, 4-bit codes included), ``gradients``, ``optimizer`` (state
    tensors, :func:`lora_ref.optim.optimizer_state_nbytes`) and ``activations`` (saved for backward)."""
    resident = list(model.parameters()) + list(model.buffers())
    weights = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in resident}.values())
    out, saved = saved_for_backward(lambda: model(**batch).loss, exclude=resident)
    out.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer_state_nbytes(opt),
            "activations": saved}


def cuda_step_peak(model: nn.Module, opt: torch.optim.Optimizer, batch: dict,
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes allocated on the GPU during one steady-state step under autocast(``dtype``)
    (weights and optimizer state included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()
