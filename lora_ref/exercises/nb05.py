"""Hidden-test cases of notebook 05_nf4_quantisation: the learner's NF4 pieces against lora_ref.quant.

The learner builds NF4 in small steps whose names mirror ``lora_ref.quant``:

    nf4_code(offset)                                    -> quant.nf4_code
    quantize_blockwise(x, code, blocksize)              -> quant.quantize_blockwise (codes, absmax)
    dequantize_blockwise(codes, absmax, code, shape, blocksize, dtype)   -> quant.dequantize_blockwise
    pack_4bit(codes, pad) / unpack_4bit(packed, n)      -> quant.pack_4bit / quant.unpack_4bit
    bits_per_parameter(blocksize, double_quant, ...)    -> quant.bits_per_parameter
    QLoRALinear(in, out, rank, alpha, blocksize)        -> qlora.StandaloneQLoRALinear (the article's, fixed)

Each reference is the lora_ref function of the same name: ``quant.quantize_blockwise`` (4-bit codes with
any codebook) and ``quant.pack_4bit`` are the building blocks of ``quant.quantize_4bit``,
``quant.dequantize_blockwise`` and ``quant.unpack_4bit`` those of ``quant.dequantize_4bit``; the article's
layer, fixed, is ``qlora.StandaloneQLoRALinear``. tests/test_exercises_nb05.py proves them equal to
``quant.quantize_4bit`` and to bitsandbytes.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from lora_ref import qlora, quant
from lora_ref.exercises import Case, Exercise, given, register

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------
# cases and runs
# ---------------------------------------------------------------------------------------------------

def _nf4_cases(seed: int | None = None) -> list[Case]:
    if seed is None:
        return [dict(offset=o) for o in (0.9677083, 0.99, 0.95, 0.9, 0.975, 0.6)]
    rng = random.Random(seed)
    return [dict(offset=round(rng.uniform(0.6, 0.995), 7)) for _ in range(6)]


def _run_nf4(fn, case: Case) -> dict[str, torch.Tensor]:
    return {"code": fn(case["offset"])}


def _tensor(case: Case) -> torch.Tensor:
    """Random weights with a per-row scale spread (so blocks differ), an all-zero block when asked."""
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(*case["shape"], generator=g) * case["std"]
    if case.get("zero_block"):
        x.view(-1)[: case["blocksize"]] = 0.0
    return x.to(_DTYPES[case["dtype"]])


def _has_ties(case: Case) -> bool:
    """True if some value sits so close to a decision midpoint that x / absmax and x * (1 / absmax) (or
    bitsandbytes' division in a partial last block) round it differently. Half-precision inputs hit such
    ties often (value and absmax both have 8 or 11 significant bits); such a case would fail a correct
    answer that normalises the other way, so it is redrawn."""
    x = _tensor(case).reshape(-1).float()
    n, bs = x.numel(), case["blocksize"]
    blocks = F.pad(x, (0, -n % bs)).view(-1, bs)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    code = quant.get_code(case["quant_type"])
    by_mul = quant.nearest_code_index((blocks * (1.0 / absmax)).clamp(-1, 1), code)
    by_div = quant.nearest_code_index((blocks / absmax).clamp(-1, 1), code)
    return not torch.equal(by_mul, by_div)


def _quant_cases(seed: int = 505) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(14):
        shape = rng.choice([(rng.randint(1, 40), rng.randint(1, 300)), (rng.randint(1, 3000),),
                            (2, rng.randint(1, 20), rng.randint(1, 70))])
        qtype = ("nf4", "fp4", "int4")[i % 3]
        case = dict(seed=seed - 5 + i, shape=shape, dtype=("float32", "bfloat16", "float16")[(i // 3) % 3],
                    std=rng.choice([0.02, 1.0, 37.0]), quant_type=qtype, blocksize=rng.choice([32, 64, 128, 256]),
                    zero_block=(qtype == "nf4" and i % 2 == 0))
        while _has_ties(case):
            case["seed"] += 1000
        cases.append(case)
    return cases


def _run_quantize(fn, case: Case) -> dict[str, torch.Tensor]:
    x = _tensor(case)
    codes, absmax = fn(x, given(case, "code", lambda: quant.get_code(case["quant_type"])), case["blocksize"])
    return {"codes": codes.reshape(-1), "absmax": absmax}


def _run_dequantize(fn, case: Case) -> dict[str, torch.Tensor]:
    x = _tensor(case)
    code = given(case, "code", lambda: quant.get_code(case["quant_type"]))
    codes, absmax = given(case, "quantized", lambda: quant.quantize_blockwise(x, code, case["blocksize"]))
    out = fn(codes, absmax, code, tuple(x.shape), case["blocksize"], _DTYPES[case["dtype"]])
    return {"out": out}


def _pack_cases(seed: int = 506) -> list[Case]:
    rng = random.Random(seed)
    return [dict(seed=seed + 94 + i, n=rng.choice([1, 2, 3, 64, 255, 1000, 4097]), pad=rng.choice([0, 7, 15]))
            for i in range(10)]


def _codes(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"])
    return torch.randint(0, 16, (case["n"],), generator=g, dtype=torch.int64).to(torch.uint8)


def _run_pack(fn, case: Case) -> dict[str, torch.Tensor]:
    return {"packed": fn(_codes(case), pad=case["pad"]).reshape(-1)}


def _run_unpack(fn, case: Case) -> dict[str, torch.Tensor]:
    packed = given(case, "packed", lambda: quant.pack_4bit(_codes(case), case["pad"]))
    return {"codes": fn(packed, case["n"]).reshape(-1).to(torch.int64)}


def _bits_cases(seed: int | None = None) -> list[Case]:
    if seed is not None:
        rng = random.Random(seed)
        return [dict(blocksize=2 ** rng.randint(4, 12), double_quant=rng.random() < 0.6,
                     dq_blocksize=rng.choice([64, 128, 256, 512])) for _ in range(11)]
    cases = []
    for bs in (32, 64, 128, 256, 4096):
        for dq in (False, True):
            cases.append(dict(blocksize=bs, double_quant=dq, dq_blocksize=256))
    cases.append(dict(blocksize=64, double_quant=True, dq_blocksize=128))
    return cases


def _run_bits(fn, case: Case) -> dict[str, torch.Tensor]:
    v = fn(blocksize=case["blocksize"], double_quant=case["double_quant"], dq_blocksize=case["dq_blocksize"])
    return {"bits": torch.tensor(float(v), dtype=torch.float64)}


def _layer_cases(seed: int = 507) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(8):
        in_f, out_f = rng.choice([16, 33, 64, 96, 130]), rng.choice([5, 24, 48, 64])
        r = rng.choice([1, 2, 4, 8])
        r = max(r, -(-16 // in_f))                 # at least 16 values of A, so the init check is meaningful
        cases.append(dict(seed=seed + 193 + i, in_f=in_f, out_f=out_f, r=r, alpha=rng.choice([1.0, 8.0, 16.0, 32.0]),
                          blocksize=rng.choice([32, 64, 128]), std=rng.choice([0.02, 0.5]),
                          batch=rng.choice([(3,), (2, 5)])))
    return cases


def _run_layer(cls, case: Case) -> dict[str, torch.Tensor]:
    in_f, out_f, r = case["in_f"], case["out_f"], case["r"]
    g = torch.Generator().manual_seed(case["seed"])
    w = torch.randn(out_f, in_f, generator=g) * case["std"]
    torch.manual_seed(case["seed"] + 1)
    layer = cls(in_f, out_f, rank=r, alpha=case["alpha"], blocksize=case["blocksize"])
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    bound = 1 / math.sqrt(in_f)
    init_ok = (tuple(A.shape) == (r, in_f) and tuple(B.shape) == (out_f, r) and bool((B == 0).all())
               and float(A.abs().max()) <= bound * (1 + 1e-6) and float(A.abs().max()) > 0.5 * bound)
    layer.quantize_weight(w)
    params = {id(p) for p in layer.parameters()}
    kept = list(layer.named_buffers()) + [(k, v) for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]
    float_copies = [n for n, t in kept
                    if id(t) not in params and t.is_floating_point() and t.numel() >= w.numel()]
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(r, in_f, generator=g) * bound)
        layer.lora_B.copy_(torch.randn(out_f, r, generator=g) * 0.1)
    x = torch.randn(*case["batch"], in_f, generator=g).requires_grad_(True)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=g))
    return {"init_ok": torch.tensor(init_ok), "no_float_copy": torch.tensor(not float_copies),
            "weight_4bit": layer.weight_4bit.reshape(-1), "absmax": layer.absmax.reshape(-1).float(),
            "weight": layer.dequantize_weight().detach(), "out": y.detach(),
            "grad_A": layer.lora_A.grad.detach(), "grad_B": layer.lora_B.grad.detach(), "grad_x": x.grad.detach()}


register(Exercise(id="05.nf4_code", symbol="nf4_code", reference=quant.nf4_code,
                  cases=_nf4_cases, run=_run_nf4, atol=2e-7, rtol=0.0))
register(Exercise(id="05.quantize_blockwise", symbol="quantize_blockwise", reference=quant.quantize_blockwise,
                  cases=_quant_cases, run=_run_quantize, atol=0.0, rtol=0.0))
register(Exercise(id="05.dequantize_blockwise", symbol="dequantize_blockwise",
                  reference=quant.dequantize_blockwise, cases=_quant_cases, run=_run_dequantize,
                  atol=0.0, rtol=0.0))
register(Exercise(id="05.pack_4bit", symbol="pack_4bit", reference=quant.pack_4bit,
                  cases=_pack_cases, run=_run_pack, atol=0.0, rtol=0.0))
register(Exercise(id="05.unpack_4bit", symbol="unpack_4bit", reference=quant.unpack_4bit,
                  cases=_pack_cases, run=_run_unpack, atol=0.0, rtol=0.0))
register(Exercise(id="05.bits_per_parameter", symbol="bits_per_parameter", reference=quant.bits_per_parameter,
                  cases=_bits_cases, run=_run_bits, atol=1e-12, rtol=0.0))
register(Exercise(id="05.qlora_linear", symbol="QLoRALinear", reference=qlora.StandaloneQLoRALinear,
                  cases=_layer_cases, run=_run_layer, atol=1e-5, rtol=1e-4))
