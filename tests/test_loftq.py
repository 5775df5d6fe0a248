"""LoftQ (arXiv 2310.08659): equal to PEFT's loftq_init (run on the CPU), and better at step 0 than QLoRA."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

from lora_ref.loftq import apply_loftq, loftq_factors, nf4_roundtrip, step0_error
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers
from lora_ref.qlora import quantize_model


def _peft_loftq_on_cpu():
    """PEFT's loftq_init with its hard-coded "cuda" compute device replaced by "cpu" (bitsandbytes 0.50
    quantises NF4 on the CPU); the algorithm is otherwise PEFT's own source."""
    pytest.importorskip("bitsandbytes")
    from peft.utils import loftq_utils
    src = inspect.getsource(loftq_utils.loftq_init).replace('"cuda"', '"cpu"').replace('"xpu" if is_xpu_available() else ', "")
    assert '"cpu"' in src
    ns = dict(vars(loftq_utils))
    exec(compile(src, "peft_loftq_cpu", "exec"), ns)
    return ns["loftq_init"]


@pytest.mark.parametrize("num_iter", [1, 3])
def test_equals_peft_loftq_at_scaling_one(num_iter):
    peft_loftq = _peft_loftq_on_cpu()
    torch.manual_seed(0)
    W = torch.randn(48, 64) * 0.05
    Qp, Ap, Bp = peft_loftq(W, num_bits=4, reduced_rank=4, num_iter=num_iter)
    Q, A, B = loftq_factors(W, 4, scaling=1.0, num_iter=num_iter)
    assert torch.equal(Q, Qp)
    assert torch.allclose(B @ A, Bp @ Ap, atol=1e-5)


def test_scaling_is_divided_out():
    torch.manual_seed(1)
    W = torch.randn(32, 32)
    Q1, A1, B1 = loftq_factors(W, 4, scaling=1.0)
    Q2, A2, B2 = loftq_factors(W, 4, scaling=4.0)
    assert torch.equal(Q1, Q2)
    assert torch.allclose(4.0 * B2 @ A2, B1 @ A1, atol=1e-5)


def test_reduces_step0_error_vs_qlora_and_more_iterations_help():
    torch.manual_seed(2)
    W = torch.randn(64, 64) @ torch.diag(torch.linspace(2, 0.01, 64)) @ torch.randn(64, 64) / 8
    plain = step0_error(W, nf4_roundtrip(W))
    errs = [step0_error(W, *loftq_factors(W, 8, num_iter=t)) for t in (1, 5)]
    assert errs[0] < 0.9 * plain
    assert errs[1] <= errs[0] + 1e-6


def test_model_step0_loss_closer_than_qlora_and_q_is_stored_exactly(tiny):
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = tiny(x).logits
    cfg = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
    plain = inject_lora(copy.deepcopy(tiny), cfg)
    quantize_model(plain, double_quant=False)
    loft = inject_lora(copy.deepcopy(tiny), cfg)
    errors = apply_loftq(loft, num_iter=2)
    assert all(e["loftq"] < e["qlora"] for e in errors.values())
    dense_q = {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(loft).items()}
    quantize_model(loft, double_quant=False)
    for n, l in lora_layers(loft).items():                    # Q_T is representable: re-quantising keeps it
        assert torch.equal(l.base_layer.dequantize(torch.float32), dense_q[n].float())
    with torch.no_grad():
        e_plain = (plain(x).logits - want).abs().mean()
        e_loft = (loft(x).logits - want).abs().mean()
    assert e_loft < e_plain


def test_exercise_quantiser_is_lora_ref_int4_roundtrip():
    """notebook 10's case quantiser (plain torch, for the judge's harness) equals lora_ref.quant's int4."""
    from lora_ref.exercises.nb10 import int4_absmax_roundtrip
    from lora_ref.quant import dequantize_blockwise, int4_code, quantize_blockwise
    g = torch.Generator().manual_seed(0)
    for shape, bs in (((7, 13), 8), ((32, 16), 16), ((5, 5), 16)):
        W = torch.randn(*shape, generator=g)
        codes, absmax = quantize_blockwise(W, int4_code(), bs)
        ours = dequantize_blockwise(codes, absmax, int4_code(), W.shape, bs)
        assert torch.allclose(int4_absmax_roundtrip(W, bs), ours, atol=1e-6), (shape, bs)
