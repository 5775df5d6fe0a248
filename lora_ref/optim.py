r"""8-bit AdamW: optimizer state in 8 bits, one of QLoRA's memory tricks beyond NF4 (arXiv 2110.02861).

AdamW keeps two fp32 tensors per trainable parameter (first and second moments): 8 bytes/param, twice
the bf16 adapter weights themselves. Dettmers et al. (2022, "8-bit Optimizers via Block-wise
Quantization") store each moment in 8 bits with *blockwise dynamic quantisation* (blocks of 256, one
fp32 absmax each) and dequantise only for the update, which is done in fp32::

    m, v   = dequant(m_q), dequant(v_q)                      (signed dynamic map for m, unsigned for v)
    m      = b1 m + (1 - b1) g ;   v = b2 v + (1 - b2) g^2
    p      = p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     (AdamW, decoupled wd)
    m_q, v_q = quant(m), quant(v)

State: 2 bytes/param + 2 * 4/256 for the absmax values = 2.03 bytes/param instead of 8 (3.9x less), plus
zero padding of a tensor's last block when its size is not a multiple of 256 (none for LoRA adapters
with r = 16 and model widths that are multiples of 16; counted by :func:`optimizer_state_nbytes`).
Small tensors (< ``min_8bit_size`` values, bitsandbytes' default 4096) keep fp32 state: their saving is
negligible and their statistics are the least robust. This mirrors ``bitsandbytes.optim.AdamW8bit``
(its CPU update, ``backends/cpu/ops.py``); our quantiser is exactly nearest-level (the codes are those of
``lora_ref.quant.quantize_8bit``, bit for bit), so results agree closely but not bit for bit.

:class:`AdamW8bit` below is that update, parameter by parameter, readable in one screen. The same update
on flat buckets with a table-driven quantiser, ~10x faster on a LoRA model's hundreds of small tensors,
is ``lora_ref.optim_fast.FastAdamW8bit`` (tested equal to this one); benchmarks and long runs use it.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from lora_ref._checks import as_real, check_int

from lora_ref import quant


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantised moments (the update in the module docstring), per parameter.

    Args: ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay`` as ``torch.optim.AdamW``; ``blocksize``:
    values per quantisation block of the moments (bitsandbytes: 256); tensors with fewer than
    ``min_8bit_size`` values keep fp32 moments. ``state[p]``: "step" (0-d float32) and either "exp_avg_q",
    "exp_avg_sq_q" (p's shape, uint8) with "exp_avg_absmax", "exp_avg_sq_absmax" (ceil(numel/blocksize),
    float32), or "exp_avg", "exp_avg_sq" (fp32): the keys of :class:`lora_ref.optim_fast.FastAdamW8bit`.
    A NaN/Inf moment raises ValueError (quant.quantize_8bit refuses it) instead of spreading silently.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, blocksize: int = 256, min_8bit_size: int = 4096):
        if not (as_real(lr) is not None and lr >= 0) or not eps > 0 or weight_decay < 0:
            raise ValueError(f"lr={lr!r} and weight_decay={weight_decay!r} must be >= 0, eps={eps!r} > 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        blocksize = check_int("blocksize", blocksize, minimum=1)
        lr = float(lr)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.blocksize, self.min_8bit_size = blocksize, min_8bit_size
        self.maps = {True: quant.create_dynamic_map(signed=True),        # m can be negative
                     False: quant.create_dynamic_map(signed=False)}      # v = E[g^2] >= 0

    def __getstate__(self) -> dict:
        """For pickle and deepcopy: torch keeps only defaults, state and param_groups; add our settings."""
        return {**super().__getstate__(), "blocksize": self.blocksize, "min_8bit_size": self.min_8bit_size}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.maps = {True: quant.create_dynamic_map(signed=True), False: quant.create_dynamic_map(signed=False)}

    def _load(self, state: dict, key: str, p: torch.Tensor) -> torch.Tensor:
        """The fp32 moment ``key`` of p: dequant(q) * absmax per block, or the fp32 tensor itself."""
        if key in state:
            return state[key]
        code = self.maps[key == "exp_avg"].to(p.device)
        st = quant.QuantState(absmax=state[key + "_absmax"], shape=tuple(p.shape), dtype=torch.float32,
                              blocksize=self.blocksize, quant_type="dynamic8", code=code)
        return quant.dequantize_8bit(state[key + "_q"], st, torch.float32)

    def _store(self, state: dict, key: str, x: torch.Tensor, eight_bit: bool) -> None:
        if not eight_bit:
            state[key] = x
            return
        q, st = quant.quantize_8bit(x, self.maps[key == "exp_avg"].to(x.device), self.blocksize)
        state[key + "_q"], state[key + "_absmax"] = q, st.absmax

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._update_group(index, group)
        return loss

    def _update_group(self, index: int, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW8bit does not support sparse gradients")
            state, eight_bit = self.state[p], p.numel() >= self.min_8bit_size
            if not state:                                        # m = v = 0, stored as they will be
                state["step"] = torch.zeros((), device=p.device)
                for key in ("exp_avg", "exp_avg_sq"):
                    self._store(state, key, torch.zeros(p.shape, device=p.device), eight_bit)
            g, p32 = p.grad.float(), p.detach().float().clone()
            state["step"] += 1
            t = float(state["step"])
            m, v = self._load(state, "exp_avg", p), self._load(state, "exp_avg_sq", p)
            m.mul_(b1).add_(g, alpha=1 - b1)                     # m = b1 m + (1 - b1) g
            v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v = b2 v + (1 - b2) g^2
            if wd:
                p32.mul_(1 - lr * wd)                            # p = p (1 - lr wd): decoupled decay
            step_size = lr / (1 - b1 ** t)                       # bias corrections (Adam, Section 2)
            denom = v.sqrt().div_(math.sqrt(1 - b2 ** t)).add_(eps)
            p32.addcdiv_(m, denom.div_(step_size), value=-1.0)   # p -= lr/(1-b1^t) m / (sqrt(v/(1-b2^t)) + eps)
            p.copy_(p32)
            self._store(state, "exp_avg", m, eight_bit)          # m_q, v_q = quant(m), quant(v)
            self._store(state, "exp_avg_sq", v, eight_bit)


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer, include_step: bool = False) -> int:
    """Bytes held by an optimizer's per-parameter state tensors (moments, their absmax values).

    Counted by storage, each storage once: AdamW8bit's state tensors are views into flat per-bucket
    buffers, so this counts what is really allocated, including the zero padding that rounds each
    8-bit tensor up to whole blocks (none when numel is a multiple of the blocksize).
    """
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for key, val in state.items():
            if isinstance(val, torch.Tensor) and (include_step or key != "step"):
                storage = val.untyped_storage()
                where = (val.device, storage.data_ptr())
                if where not in seen:
                    seen.add(where)
                    total += storage.nbytes()
    return total


def adamw_state_bytes_per_param(eight_bit: bool, blocksize: int = 256) -> float:
    """Bytes of AdamW state per parameter: 2 fp32 moments = 8, or 2 x (1 byte + 4/blocksize) = 2.03.

    For tensors whose size is a multiple of ``blocksize``; AdamW8bit pads each other tensor to whole
    blocks, up to 2 x (blocksize - 1) more bytes per tensor (counted by :func:`optimizer_state_nbytes`).
    """
    return 2 * (1 + 4 / blocksize) if eight_bit else 8.0
