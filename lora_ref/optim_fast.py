r"""The fast path of lora_ref.optim.AdamW8bit: flat buckets and a table-driven nearest-level search.

Never the teaching path: ``lora_ref.optim.AdamW8bit`` is the readable optimizer (one screen, per
parameter, with ``lora_ref.quant.quantize_8bit``); :class:`FastAdamW8bit` runs the same update and
tests/test_optim.py holds the two equal (parameters and 8-bit state). It lives beside
``lora_ref.kernels``, as the other fast paths do.

How the step is made fast (the maths of lora_ref.optim is unchanged)
-------------------------------------------------------------------
A LoRA model has hundreds of small trainable tensors (SmolLM2-135M with r=16 on all 7 projections: 420
tensors of 3,072 to 24,576 values). Updating them one by one costs a dozen tiny torch calls per tensor
(and, on a GPU, a dozen kernel launches); quantising with ``torch.bucketize`` costs a binary search per
value: ~575 ms per step on one CPU thread for those 420 tensors, where ``torch.optim.AdamW`` takes ~20 ms.
Two changes, each a standard trick, bring it to ~60 ms against torch's ~22 ms in the same run
(``benchmarks/optim_speed.py``, ``benchmarks/results/optim_speed_cpu.json``; on an H200, measured once while
writing this and not committed: ~230 ms -> 6-9 ms, ~1.5x torch's AdamW):

1. **Flat buckets.** The parameters of a param group are packed, in order, into *buckets* of about
   ``bucket_numel`` values (like DDP's gradient buckets); each bucket holds its optimizer state in a few
   flat buffers and is updated with one torch call per line of the formula above. Each parameter's
   slice starts on a block boundary and is zero-padded to a multiple of ``blocksize``, so no block
   straddles two parameters: the codes and absmax values are *identical* to quantising each parameter
   on its own. ``optimizer.state[p]`` holds views into these buffers ("exp_avg_q" of p's shape,
   "exp_avg_absmax" of ceil(numel / blocksize) values, "step"), so state can be inspected, saved and
   loaded per parameter as before. Buckets are rebuilt (state copied over) only when the set of
   parameters with a gradient changes or the state was replaced (``load_state_dict``).
   Buckets bound the extra memory of a step on a large model to ~10 fp32 temporaries of one bucket. On a
   CPU, 2^18 values (1 MiB per temporary) keep them in cache; on a GPU, 2^22 values make few launches.
2. **Table-driven nearest-level search** (:class:`NearestLevel`): the top 9 + M bits of a float32
   (sign, exponent, M mantissa bits) index a precomputed table; M is chosen so that at most one decision
   boundary of the 256-level map falls into each table entry, so one comparison finishes the search.

No host synchronisation: every parameter keeps its own step count ``t`` (as torch's AdamW does), stored
per bucket as one (n_params,) tensor on the parameters' device, and the bias corrections are computed
there. Like ``torch.optim.AdamW``, the step does not check gradients for NaN/Inf (that check would be a
host sync on a GPU): a non-finite gradient value makes its parameter NaN at once and its block's absmax
non-finite, so the whole block's parameters turn NaN from the next step on: visibly, not silently (skip
such steps before ``step()``, as ``torch.amp.GradScaler`` does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from lora_ref._checks import check_int

from lora_ref import quant
from lora_ref.optim import AdamW8bit


# ----------------------------------------------------------------------------------------------------
# Exact nearest-level search for a 256-level map, without a binary search per value
# ----------------------------------------------------------------------------------------------------

class NearestLevel:
    r"""q = index of the nearest level of a sorted 256-level ``code``, exactly ``torch.bucketize(s, mid)``.

    ``mid`` are the 255 midpoints between neighbouring levels (computed in fp32 exactly as
    :func:`lora_ref.quant.quantize_8bit` does), and ``q(s) = #{mid < s}``: a value on a midpoint
    goes to the lower level. ``bucketize`` finds that count by a binary search, 8 dependent comparisons
    per value. Here it is one table look-up and one comparison.

    A float32 is 1 sign bit, 8 exponent bits and 23 mantissa bits; its top 9 + M bits (``s >> (23 - M)``
    on the bit pattern) cut the real line into 2^(9+M) *bins*, each an interval of consecutive floats,
    log-spaced like the dynamic map itself (2^M bins per power of two, for each sign). M is the smallest
    number of mantissa bits for which no bin contains more than one midpoint: M = 6 for bitsandbytes'
    signed dynamic map, 7 for the unsigned one (tables of 32,768 and 65,536 entries). Then, for s in bin k::

        q(s) = #{mid < s} = base[k] + (s > next_mid[k]),      next_mid[k] = mid[base[k]]

    with base[k] = #{mid < smallest float of bin k}: the only midpoint that can lie at or above that float
    and below s is the next one, mid[base[k]] (mid[255] = +inf). Both tables are built once, over all
    bins, so the equality holds for every float32 (values outside [-1, 1] too, which is why the scaled
    values need no clamp); non-finite inputs give meaningless codes.

    Shapes: s (...) float32 -> (...) uint8.   Tables: base (2^(9+M),) uint8, next_mid (2^(9+M),) float32.
    """

    def __init__(self, code: torch.Tensor, max_bits: int = 16):
        code = code.detach().float().cpu()
        if code.numel() != 256 or not bool((code[1:] >= code[:-1]).all()):
            raise ValueError(f"an 8-bit map has 256 ascending levels, got {code.numel()} values")
        self.code = code
        self.midpoints = (code[:-1] + code[1:]) / 2                            # (255,) as quant.py
        next_mid = torch.cat([self.midpoints, torch.tensor([math.inf])])       # (256,): mid[255] = +inf
        for bits in range(1, max_bits + 1):
            shift = 23 - bits
            keys = torch.arange(2 ** (9 + bits), dtype=torch.int64)
            first = _as_float32(keys << shift)                                  # first and last float
            last = _as_float32((keys << shift) | ((1 << shift) - 1))            # of each bin
            lo, hi = torch.minimum(first, last), torch.maximum(first, last)    # (negative: reversed)
            finite = torch.isfinite(lo) & torch.isfinite(hi)
            base = torch.searchsorted(self.midpoints, lo)                      # #{mid < lo}
            inside = torch.searchsorted(self.midpoints, hi, right=True) - base  # #{lo <= mid <= hi}
            if bool((inside[finite] <= 1).all()):
                break
        else:
            raise ValueError(f"no table of up to {max_bits} mantissa bits separates the midpoints of this map")
        base = torch.where(finite, base, 0)
        self.bits, self.shift, self.mask = bits, shift, 2 ** (9 + bits) - 1
        self.base = base.to(torch.uint8)
        self.next_mid = next_mid[base]
        self.zero_code = int(self(torch.zeros(1))[0])                          # the code of 0.0

    def to(self, device: torch.device | str) -> "NearestLevel":
        """A shallow copy whose tables live on ``device``."""
        other = object.__new__(NearestLevel)
        other.__dict__.update(self.__dict__)
        other.code, other.midpoints = self.code.to(device), self.midpoints.to(device)
        other.base, other.next_mid = self.base.to(device), self.next_mid.to(device)
        return other

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        if s.dtype != torch.float32:
            raise ValueError(f"NearestLevel reads float32 bit patterns, got {s.dtype}")
        s = s.contiguous()
        key = ((s.view(torch.int32) >> self.shift) & self.mask).reshape(-1)   # bin of each value
        q = self.base.index_select(0, key)                                      # #{mid below the bin}
        q += s.reshape(-1) > self.next_mid.index_select(0, key)                # + the one inside, if passed
        return q.view(s.shape)


def _as_float32(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns (0 .. 2^32-1) -> the float32 values with those bits."""
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def quantize_blocks(x: torch.Tensor, lookup: NearestLevel, divide_rows: torch.Tensor | None = None,
                    nonnegative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Blockwise 8-bit quantisation of rows of blocks: the codes of ``quant.quantize_8bit``, bit for bit.

    Per block (row) b: absmax_b = max |x_b|, s_i = x_i * (1 / absmax_b), q_i = nearest level of s_i.
    ``quant.quantize_8bit`` *divides* by absmax in a tensor's last, partial block instead of
    multiplying by the reciprocal (as bitsandbytes does; the two can differ by one ulp). When a flat buffer
    holds several tensors, each zero-padded to whole blocks, ``divide_rows`` lists the rows that were such
    partial blocks, so that every code equals the one quantising the tensor on its own would give.
    (Zero padding never raises an absmax, and scales to 0.) ``nonnegative=True`` promises x >= 0 (the
    second moment v), which saves the abs().

    Shapes: x (n_blocks, blocksize) float32 -> codes (n_blocks, blocksize) uint8, absmax (n_blocks,) float32.
    """
    absmax = (x if nonnegative else x.abs()).amax(dim=1)
    safe = absmax.clamp(min=1e-38)                       # an all-zero block scales to zeros, absmax 0
    scaled = x * (1.0 / safe).unsqueeze(1)
    if divide_rows is not None:
        scaled[divide_rows] = x[divide_rows] / safe[divide_rows].unsqueeze(1)
    return lookup(scaled), absmax


def dequantize_blocks(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """code[q] * absmax per block, in fp32. Shapes: q (n_blocks, blocksize) uint8, absmax (n_blocks,) -> fp32."""
    return code.index_select(0, q.reshape(-1).int()).view(q.shape).mul_(absmax.unsqueeze(1))


# ----------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Bucket:
    r"""The flat optimizer state of a few parameters of one param group (one device, one kind of state).

    Parameter i occupies ``flat[offsets[i] : offsets[i] + numels[i]]`` of every per-value buffer, followed
    by zero padding up to ``offsets[i + 1]`` (a multiple of ``unit``). ``unit`` is the quantisation
    blocksize for 8-bit state and 1 for fp32 state (no padding). Work arrays are viewed as
    (n_units, unit), so that per-parameter quantities expanded to (n_units, 1) broadcast over them.

    buffers: "exp_avg_q", "exp_avg_sq_q" (N,) uint8 and "exp_avg_absmax", "exp_avg_sq_absmax" (N/unit,)
    float32 for 8-bit state; "exp_avg", "exp_avg_sq" (N,) float32 otherwise.  step: (n_params,) float32.
    """
    params: list[torch.Tensor]
    unit: int
    offsets: list[int]                   # n_params + 1 entries; offsets[-1] = N
    buffers: dict[str, torch.Tensor]
    step: torch.Tensor
    units_per_param: torch.Tensor        # (n_params,) int64, on the device
    divide_rows: torch.Tensor | None     # rows that hold a parameter's partial last block (8-bit only)
    split_sizes: list[int]               # numel_0, pad_0, numel_1, pad_1, ...
    views: list[dict] = field(default_factory=list)   # state[p] of each parameter: views into buffers

    @property
    def eight_bit(self) -> bool:
        return "exp_avg_q" in self.buffers

    @property
    def n_units(self) -> int:
        return self.offsets[-1] // self.unit

    def gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One fp32 (n_units, unit) copy of ``tensors`` (parameters or their gradients), zero padded."""
        pieces = []
        for t, pad in zip(tensors, self.split_sizes[1::2]):
            pieces.append(t.reshape(-1))
            if pad:
                pieces.append(t.new_zeros(pad, dtype=torch.float32))
        return torch.cat(pieces).float().view(self.n_units, self.unit)

    def scatter(self, flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Copy each tensor's slice of ``flat`` back into it (casting to its dtype)."""
        pieces = flat.reshape(-1).split(self.split_sizes)[0::2]
        torch._foreach_copy_(tensors, [piece.view(t.shape) for piece, t in zip(pieces, tensors)])

    def per_unit(self, per_param: torch.Tensor) -> torch.Tensor:
        """(n_params,) -> (n_units, 1): each parameter's value repeated over its blocks (or values)."""
        return per_param.float().repeat_interleave(self.units_per_param, output_size=self.n_units).unsqueeze(1)


class FastAdamW8bit(AdamW8bit):
    """AdamW with 8-bit blockwise-quantised moments, bucketed: the same update as ``lora_ref.optim.AdamW8bit``
    (tests hold the two equal), ~10x faster on many small tensors (see the module docstring for the layout).

    Args:
        params: iterable of parameters or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight_decay default 1e-2 too).
        blocksize: values per quantisation block of the moments (bitsandbytes uses 256).
        min_8bit_size: tensors with fewer values keep fp32 moments.
        bucket_numel: at most how many values are updated together (one flat bucket; a tensor larger
            than this gets a bucket of its own). Default: 2^18 on a CPU (the temporaries stay in cache),
            2^22 on other devices (fewer kernel launches). A step allocates about ten fp32 temporaries
            of one bucket.

    ``state[p]`` holds, for a parameter with 8-bit state: "step" (0-d float32), "exp_avg_q" and
    "exp_avg_sq_q" (p's shape, uint8), "exp_avg_absmax" and "exp_avg_sq_absmax" (ceil(numel/blocksize),
    float32); with fp32 state: "step", "exp_avg", "exp_avg_sq" (p's shape, float32). They are views into
    the buckets' flat buffers: modify them in place, or use ``load_state_dict``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, blocksize: int = 256, min_8bit_size: int = 4096,
                 bucket_numel: int | None = None):
        if bucket_numel is not None:
            bucket_numel = check_int("bucket_numel", bucket_numel, minimum=1)
        super().__init__(params, lr, betas, eps, weight_decay, blocksize, min_8bit_size)   # checks, settings
        self.bucket_numel = bucket_numel
        self._lookups: dict[torch.device, tuple[NearestLevel, NearestLevel]] = {}
        self._buckets: dict[int, tuple[list, list[_Bucket]]] = {}   # group index -> (params, buckets)

    def __getstate__(self) -> dict:
        """For pickle and deepcopy: torch keeps only defaults, state and param_groups; add our settings.
        The buckets are not kept: they are rebuilt from ``state`` at the next step."""
        return {**super().__getstate__(), "bucket_numel": self.bucket_numel}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lookups, self._buckets = {}, {}

    def _code_lookups(self, device: torch.device) -> tuple[NearestLevel, NearestLevel]:
        """(signed map for m, unsigned map for v), cached per device: shared, not per-parameter state."""
        if device not in self._lookups:
            self._lookups[device] = (NearestLevel(quant.create_dynamic_map(signed=True)).to(device),
                                     NearestLevel(quant.create_dynamic_map(signed=False)).to(device))
        return self._lookups[device]

    # -- layout ----------------------------------------------------------------------------------------

    def _group_buckets(self, index: int, params: list[torch.Tensor]) -> list[_Bucket]:
        """The buckets of param group ``index`` for the parameters that have a gradient in this step.

        Reused while they cover exactly these parameters and ``self.state`` still holds their views;
        otherwise rebuilt from whatever ``self.state`` holds (old views, loaded tensors, or nothing).
        """
        cached = self._buckets.get(index)
        if cached is not None:
            cached_params, buckets = cached
            if (len(cached_params) == len(params) and all(a is b for a, b in zip(cached_params, params))
                    and all(self.state.get(p) is views for b in buckets for p, views in zip(b.params, b.views))):
                return buckets
        open_: dict[tuple[torch.device, bool], list[torch.Tensor]] = {}
        sizes: dict[tuple[torch.device, bool], int] = {}
        grouped: list[tuple[bool, list[torch.Tensor]]] = []
        for p in params:
            eight_bit = p.numel() >= self.min_8bit_size
            unit = self.blocksize if eight_bit else 1
            size = -(-p.numel() // unit) * unit
            key = (p.device, eight_bit)
            limit = self.bucket_numel or (2 ** 18 if p.device.type == "cpu" else 2 ** 22)
            if key not in open_ or sizes[key] + size > limit:
                open_[key], sizes[key] = [], 0
                grouped.append((eight_bit, open_[key]))
            open_[key].append(p)
            sizes[key] += size
        buckets = [self._new_bucket(ps, eight_bit) for eight_bit, ps in grouped]
        self._buckets[index] = (params, buckets)
        return buckets

    def _new_bucket(self, params: list[torch.Tensor], eight_bit: bool) -> _Bucket:
        """Allocate flat state for ``params``, copy in their existing state, point ``self.state`` at views."""
        device = params[0].device
        unit = self.blocksize if eight_bit else 1
        numels = [p.numel() for p in params]
        padded = [-(-n // unit) * unit for n in numels]
        offsets = [0]
        for size in padded:
            offsets.append(offsets[-1] + size)
        n, n_units = offsets[-1], offsets[-1] // unit
        if eight_bit:
            signed, unsigned = self._code_lookups(device)
            buffers = {"exp_avg_q": torch.full((n,), signed.zero_code, dtype=torch.uint8, device=device),
                       "exp_avg_absmax": torch.zeros(n_units, device=device),
                       "exp_avg_sq_q": torch.full((n,), unsigned.zero_code, dtype=torch.uint8, device=device),
                       "exp_avg_sq_absmax": torch.zeros(n_units, device=device)}
        else:
            buffers = {"exp_avg": torch.zeros(n, device=device), "exp_avg_sq": torch.zeros(n, device=device)}
        step = torch.zeros(len(params), dtype=torch.float32, device=device)
        partial = [(offsets[i + 1] - unit) // unit for i in range(len(params)) if numels[i] % unit]
        bucket = _Bucket(params=params, unit=unit, offsets=offsets, buffers=buffers, step=step,
                         units_per_param=torch.tensor([s // unit for s in padded], device=device),
                         divide_rows=torch.tensor(partial, device=device) if eight_bit and partial else None,
                         split_sizes=[x for num, pad in zip(numels, padded) for x in (num, pad - num)])
        for i, p in enumerate(params):
            old = self.state.get(p, {})
            views = {"step": step[i]}
            for key, buf in buffers.items():
                if key.endswith("absmax"):
                    views[key] = buf[offsets[i] // unit: offsets[i + 1] // unit]
                else:
                    views[key] = buf[offsets[i]: offsets[i] + numels[i]].view(p.shape)
            if old:
                missing = [k for k in buffers if k not in old]
                if missing:
                    raise ValueError(f"state of a parameter of shape {tuple(p.shape)} lacks {missing} (it has "
                                     f"{sorted(old)}): saved with another min_8bit_size or blocksize?")
                for key in buffers:
                    views[key].copy_(old[key].reshape(views[key].shape))
                views["step"].copy_(old["step"])
            self.state[p] = views
            bucket.views.append(views)
        return bucket

    # -- state_dict ------------------------------------------------------------------------------------

    _STATE_DTYPES = {"exp_avg_q": torch.uint8, "exp_avg_sq_q": torch.uint8, "exp_avg_absmax": torch.float32,
                     "exp_avg_sq_absmax": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}

    def state_dict(self) -> dict:
        """torch's state_dict, with every state tensor copied: a snapshot that later steps do not change
        (the live state is views into flat buffers, updated in place), and no padding is saved."""
        sd = super().state_dict()
        sd["state"] = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                       for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; our uint8 codes and
        fp32 scales/moments must keep their dtypes, so put the saved tensors back as they were. The
        buckets are rebuilt from them at the next step."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, val in state_dict["state"].get(saved_id, {}).items():
                if key in self._STATE_DTYPES:
                    self.state[p][key] = val.to(p.device, self._STATE_DTYPES[key]).clone()
        self._buckets.clear()

    # -- the update ------------------------------------------------------------------------------------

    def _update_group(self, index: int, group: dict) -> None:
        """One param group's update: its parameters with a gradient, bucket by bucket."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        for bucket in self._group_buckets(index, params):
            self._update(bucket, group)

    def _update(self, b: _Bucket, group: dict) -> None:
        """The AdamW update of one bucket: every line works on all its parameters at once.

        Shapes: flat work arrays (n_units, unit) float32; per-parameter quantities (n_units, 1).
        """
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        g = b.gather([p.grad for p in b.params])                     # zero in the padding
        p32 = b.gather(b.params)
        b.step += 1                                                  # t += 1 for each parameter
        # bias corrections per parameter, in float64 like torch's AdamW (Python floats there): in fp32,
        # 1 - b2^t would carry a relative error of ~1e-5 (0.999 is not exact in fp32). MPS has no float64.
        t = b.step.to(torch.float32 if b.step.device.type == "mps" else torch.float64)
        step_size = b.per_unit(lr / (1 - b1 ** t))                   # lr / (1 - b1^t)      (n_units, 1)
        bc2_sqrt = b.per_unit((1 - b2 ** t).sqrt())                  # sqrt(1 - b2^t)       (n_units, 1)
        if b.eight_bit:                                              # m, v = dequant(m_q), dequant(v_q)
            signed, unsigned = self._code_lookups(g.device)
            shape = (b.n_units, b.unit)
            m = dequantize_blocks(b.buffers["exp_avg_q"].view(shape), b.buffers["exp_avg_absmax"], signed.code)
            v = dequantize_blocks(b.buffers["exp_avg_sq_q"].view(shape), b.buffers["exp_avg_sq_absmax"],
                                  unsigned.code)
        else:                                                        # fp32 state, updated in place
            m, v = b.buffers["exp_avg"].view(-1, 1), b.buffers["exp_avg_sq"].view(-1, 1)
        m.mul_(b1).add_(g, alpha=1 - b1)                             # m = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)                      # v = b2 v + (1 - b2) g^2
        if wd:
            p32.mul_(1 - lr * wd)                                    # p = p (1 - lr wd)
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)                    # sqrt(v / (1 - b2^t)) + eps
        p32.addcdiv_(m, denom.div_(step_size), value=-1.0)           # p -= lr / (1 - b1^t) * m / denom
        b.scatter(p32, b.params)                                     # cast back to each parameter's dtype
        if b.eight_bit:                                              # m_q, v_q = quant(m), quant(v)
            for key, x, lookup in (("exp_avg", m, signed), ("exp_avg_sq", v, unsigned)):
                q, absmax = quantize_blocks(x, lookup, b.divide_rows, nonnegative=x is v)   # pad: 0 -> 0
                b.buffers[key + "_q"].copy_(q.view(-1))
                b.buffers[key + "_absmax"].copy_(absmax)
