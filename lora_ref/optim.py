r"""8-bit AdamW: optimizer state in 8 bits, one of QLoRA's memory tricks beyond NF4 (arXiv 2110.02861).

AdamW keeps two fp32 tensors per trainable parameter (first and second moments): 8 bytes/param, twice
the bf16 adapter weights themselves. Dettmers et al. (2022, "8-bit Optimizers via Block-wise
Quantization") store each moment in 8 bits with *blockwise dynamic quantisation* (blocks of 256, one
fp32 absmax each) and dequantise only for the update, which is done in fp32::

    m, v   = dequant(m_q), dequant(v_q)                      (signed dynamic map for m, unsigned for v)
    m      = b1 m + (1 - b1) g ;   v = b2 v + (1 - b2) g^2
    p      = p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     (AdamW, decoupled wd)
    m_q, v_q = quant(m), quant(v)

State: 2 bytes/param + 2 * 4/256 for the absmax values = 2.03 bytes/param instead of 8 (3.9x less).
Small tensors (< ``min_8bit_size`` values, bitsandbytes' default 4096) keep fp32 state: their saving is
negligible and their statistics are the least robust. This mirrors ``bitsandbytes.optim.AdamW8bit``
(its CPU update, ``backends/cpu/ops.py``); our quantiser is exactly nearest-level (see
``lora_ref.quant.quantize_blockwise``), so results agree closely but not bit for bit.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from lora_ref import quant


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantised moments (see module docstring for the update).

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight_decay default 1e-2 too).
        blocksize: values per quantisation block of the moments (bitsandbytes uses 256).
        min_8bit_size: tensors with fewer values keep fp32 moments.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, blocksize: int = 256, min_8bit_size: int = 4096):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr={lr!r} must be a non-negative number")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps={eps!r} must be positive")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        if not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize={blocksize!r} must be a positive integer")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.blocksize, self.min_8bit_size = blocksize, min_8bit_size
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _code_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed map for m, unsigned map for v), cached per device: shared, not per-parameter state."""
        if device not in self._maps:
            self._maps[device] = (quant.create_dynamic_map(signed=True).to(device),
                                  quant.create_dynamic_map(signed=False).to(device))
        return self._maps[device]

    def _quantize(self, x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, st = quant.quantize_blockwise(x, code, self.blocksize)
        return q, st.absmax

    def _dequantize(self, q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        st = quant.QuantState(absmax=absmax, shape=tuple(q.shape), dtype=torch.float32, blocksize=self.blocksize,
                              quant_type="dynamic8", code=code)
        return quant.dequantize_blockwise(q, st, torch.float32)

    _STATE_DTYPES = {"exp_avg_q": torch.uint8, "exp_avg_sq_q": torch.uint8, "exp_avg_absmax": torch.float32,
                     "exp_avg_sq_absmax": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; our uint8 codes and
        fp32 scales/moments must keep their dtypes, so put the saved tensors back as they were."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, val in state_dict["state"].get(saved_id, {}).items():
                if key in self._STATE_DTYPES:
                    self.state[p][key] = val.to(p.device, self._STATE_DTYPES[key]).clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                eight_bit = p.numel() >= self.min_8bit_size
                signed, unsigned = self._code_maps(p.device)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    if eight_bit:
                        state["exp_avg_q"], state["exp_avg_absmax"] = self._quantize(zeros, signed)
                        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self._quantize(zeros, unsigned)
                    else:
                        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                state["step"] = state["step"] + 1          # not in place: a saved state_dict shares it
                t = float(state["step"])
                if eight_bit:
                    m = self._dequantize(state["exp_avg_q"], state["exp_avg_absmax"], signed)
                    v = self._dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], unsigned)
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad.float()
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                p.copy_(p32)
                if eight_bit:
                    state["exp_avg_q"], state["exp_avg_absmax"] = self._quantize(m, signed)
                    state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self._quantize(v, unsigned)
        return loss


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer, include_step: bool = False) -> int:
    """Bytes held in an optimizer's per-parameter state tensors (moments, their absmax values)."""
    total = 0
    for state in optimizer.state.values():
        for key, val in state.items():
            if isinstance(val, torch.Tensor) and (include_step or key != "step"):
                total += val.numel() * val.element_size()
    return total


def adamw_state_bytes_per_param(eight_bit: bool, blocksize: int = 256) -> float:
    """Bytes of AdamW state per parameter: 2 fp32 moments = 8, or 2 x (1 byte + 4/blocksize) = 2.03."""
    return 2 * (1 + 4 / blocksize) if eight_bit else 8.0
