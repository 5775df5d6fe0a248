"""lora_ref.kernels: every fast path equals the readable one (bit for bit where it should), on CPU and,
when a GPU is present, on CUDA with the Triton kernel."""
import math

import pytest
import torch
import torch.nn.functional as F

from lora_ref import kernels as K
from lora_ref import quant as Q

CUDA = torch.cuda.is_available() and K.HAS_TRITON
devices = ["cpu"] + (["cuda"] if CUDA else [])


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((33, 7), 32), ((1, 3), 32), ((5, 4096), 4096),
                                             ((300, 70), 128)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_equals_reference_bitwise(device, shape, blocksize, double_quant, quant_type):
    g = torch.Generator().manual_seed(hash((shape, blocksize)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.02).to(device)
    packed, state = Q.quantize_4bit(w, blocksize, quant_type, double_quant)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ref = Q.dequantize_4bit(packed, state, dtype)
        got = K.dequantize_4bit(packed, state, dtype)
        assert got.shape == ref.shape and got.dtype == dtype
        assert torch.equal(_bits(got), _bits(ref)), (dtype, (got != ref).sum())


@pytest.mark.parametrize("device", devices)
def test_out_buffer_is_written_everywhere(device):
    w = torch.randn(37, 19, device=device)
    packed, state = Q.quantize_4bit(w, 64, "nf4", True)
    buf = torch.full((2000,), float("nan"), dtype=torch.bfloat16, device=device)   # poisoned
    got = K.dequantize_4bit(packed, state, torch.bfloat16, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, Q.dequantize_4bit(packed, state, torch.bfloat16))
    assert torch.isnan(buf[w.numel():]).all()                                       # nothing past the end


def test_layout_reads_bitsandbytes_state():
    BF = pytest.importorskip("bitsandbytes.functional")
    # rows a multiple of the blocksize: bitsandbytes 0.50.2's CPU dequantize_4bit decodes (64, 96) wrongly
    # (relative error 0.28 instead of 0.09; the packed bytes and absmax are right)
    w = torch.randn(64, 128) * 0.02
    p, s = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    lay = K.layout_of(s)
    assert lay.nested and lay.numel == w.numel() and lay.blocksize == 64
    assert torch.equal(K.dequantize_4bit(p, s, torch.float32), BF.dequantize_4bit(p, s).float())


def test_errors():
    w = torch.randn(8, 8)
    p, s = Q.quantize_4bit(w, 32, "nf4")
    with pytest.raises(ValueError, match="uint8"):
        K.dequantize_4bit(p.to(torch.int32), s)
    with pytest.raises(ValueError, match="cannot hold"):
        K.dequantize_4bit(p[:-1], s)
    with pytest.raises(ValueError, match="backend"):
        K.dequantize_4bit(p, s, backend="cuda-magic")
    with pytest.raises(ValueError, match="chunk"):
        K.chunked_cross_entropy(torch.randn(1, 2, 4), torch.randn(5, 4), torch.zeros(1, 2, dtype=torch.long), chunk=0)
    if not CUDA:
        with pytest.raises(RuntimeError, match="Triton"):
            K.dequantize_4bit(p, s, backend="triton")


@pytest.mark.parametrize("device", devices)
def test_lora4bit_function_matches_autograd_reference(device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False).to(device)
    m = K.FastQLoRALinear.from_linear(lin, r=4, alpha=8.0)
    torch.nn.init.normal_(m.lora_B)
    _, state = Q.quantize_4bit(lin.weight.data, 64, "nf4", True)
    W = Q.dequantize_4bit(m.packed, state, torch.float64)
    x = torch.randn(2, 5, 64, dtype=torch.float64, device=device, requires_grad=True)
    A = m.lora_A.detach().double().requires_grad_()
    B = m.lora_B.detach().double().requires_grad_()
    ref = x @ W.t() + m.scaling * (x @ A.t()) @ B.t()
    y = K.qlora_linear(x, m.packed, state, A, B, m.scaling)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("device", devices)
def test_fast_qlora_module_bf16_close_and_trains(device):
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64, bias=True).to(device)
    m = K.FastQLoRALinear.from_linear(lin, r=8, alpha=16.0)
    assert m.lora_A.dtype == torch.float32 and m.lora_A.requires_grad and not m.packed.requires_grad
    x = torch.randn(4, 128, device=device).to(torch.bfloat16)
    y = m(x)
    _, state = Q.quantize_4bit(lin.weight.data, 64, "nf4", True)
    W = Q.dequantize_4bit(m.packed, state, torch.float32)
    ref = x.float() @ W.t() + lin.bias
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).norm() / ref.norm() < 1e-2          # bf16 operands (B = 0 at init)
    y.float().pow(2).sum().backward()
    assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 and m.lora_A.grad.dtype == torch.float32
    assert m.lora_A.grad.abs().sum() == 0                          # B = 0, so dA = 0 at init


def test_quantize_model_fast_replaces_and_frees():
    transformers = pytest.importorskip("transformers")
    from lora_ref.models import tiny_llama
    model = tiny_llama()
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    K.quantize_model_fast(model, r=4, alpha=8)
    fast = [m for m in model.modules() if isinstance(m, K.FastQLoRALinear)]
    assert len(fast) == 7 * model.config.num_hidden_layers and n_lin == len(fast) + 1   # lm_head stays
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from lora_ref import memory as M
    shape = M.ModelShape.from_config(model.config)
    assert trainable == M.lora_param_count(shape, 4)
    out = model(input_ids=torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8)))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_cross_entropy_equals_full(chunk):
    torch.manual_seed(2)
    h = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 3] = -100
    got = K.chunked_cross_entropy(h, W, labels, chunk=chunk)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    ref = F.cross_entropy((h @ W.t()).view(-1, 50), shifted.reshape(-1))
    assert torch.allclose(got, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (h, W)), torch.autograd.grad(ref, (h, W))):
        assert torch.allclose(a, b, atol=1e-12)


def test_scratch_buffer_reuses_memory():
    sb = K.ScratchBuffer()
    a = sb.get(100, torch.float32, torch.device("cpu"))
    b = sb.get(50, torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.numel() == 50
    c = sb.get(200, torch.float32, torch.device("cpu"))
    assert c.numel() == 200


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
def test_triton_matches_bitsandbytes_on_cuda():
    BF = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(1024, 512, device="cuda") * 0.02).to(torch.bfloat16)
    for nested in (True, False):          # both ways of storing the absmax (double quantisation or fp32)
        p, s = BF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        ref = BF.dequantize_4bit(p, s)
        got = K.dequantize_4bit(p, s, torch.bfloat16, backend="triton")
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), nested
        for cfg in ({"kernel": "flat", "SELECT": True}, {"kernel": "flat", "BYTES": 256, "num_warps": 2},
                    {"kernel": "tiled", "PAIR": False}, {"kernel": "tiled", "PAIR": True, "BYTES": 4096, "num_warps": 8},
                    {"kernel": "flat", "BYTES": 4096, "num_warps": 8}, {"kernel": "outmajor", "BYTES": 2048}):
            out = K.dequantize_4bit_triton(p, K.layout_of(s), torch.bfloat16, **cfg)
            assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (nested, cfg)


def test_fused_rms_norm_close_to_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    ref = norm(x)
    holder = torch.nn.Sequential(norm)
    assert K.fuse_rms_norms(holder) == 1
    got = norm(x)
    assert got.dtype == ref.dtype and (got.float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() * 2**-8


def test_layout_cache_follows_the_buffers():
    from lora_ref.qlora import Linear4bit
    lin = torch.nn.Linear(64, 32)
    q = Linear4bit.from_linear(lin, "nf4", 64, True, torch.bfloat16)
    first = K.layout_of(q.quant_state)
    assert K.layout_of(q.quant_state) is first            # a fresh QuantState over the same buffers: a hit
    q.requantize_(lin.weight.data * 2)                    # new buffers: a new layout, the right values
    again = K.layout_of(q.quant_state)
    assert again is not first
    assert torch.equal(K.dequantize_4bit(q.weight, q.quant_state, torch.float32), q.dequantize(torch.float32))


def test_fast_module_follows_device_moves():
    lin = torch.nn.Linear(64, 32)
    m = K.FastQLoRALinear.from_linear(lin, r=2, alpha=4.0)
    m.to("meta")
    assert m.packed.device.type == "meta" and m.lay.absmax.device.type == "meta"
    assert m.lay.code.device.type == "meta" and m.lay.absmax2.device.type == "meta"


def test_fast_module_rslora_scaling_and_dropout_refused():
    """Issue 14/15: rsLoRA is supported (alpha / sqrt(r), as LoRALinear); adapter dropout is refused clearly."""
    from lora_ref.lora import LoRALinear
    lin = torch.nn.Linear(64, 32)
    m = K.FastQLoRALinear.from_linear(lin, r=16, alpha=8.0, use_rslora=True)
    assert m.scaling == pytest.approx(LoRALinear(torch.nn.Linear(64, 32), r=16, alpha=8.0, use_rslora=True).scaling)
    assert m.scaling == pytest.approx(8.0 / 4.0)
    assert K.FastQLoRALinear.from_linear(lin, r=16, alpha=8.0).scaling == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dropout"):
        K.FastQLoRALinear.from_linear(lin, r=4, alpha=8.0, dropout=0.1)


def test_fast_model_equals_readable_qlora_model_loss_and_gradients():
    """Issue 15: the fast path (kernels.quantize_model_fast + fused RMSNorm + chunked loss, what the
    benchmarks capture in a CUDA graph) and the readable lora_ref.qlora path compute the same loss and
    adapter gradients on a tiny Llama, given the same 4-bit weights and adapter values."""
    pytest.importorskip("transformers")
    from lora_ref import qlora
    from lora_ref.lora import LoRAConfig, lora_layers
    from lora_ref.models import tiny_llama
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = tiny_llama(num_hidden_layers=2)                                 # fp32: the quantiser's input
    fast = tiny_llama(num_hidden_layers=2)
    qlora.quantize_model(ref)
    qlora.inject_qlora(ref, LoRAConfig(r=4, alpha=8, target_modules=targets))
    K.quantize_model_fast(fast, r=4, alpha=8, targets=targets)
    K.fuse_rms_norms(fast)
    torch.manual_seed(3)
    for name, layer in lora_layers(ref).items():
        f = fast.get_submodule(name)
        assert torch.equal(f.packed, layer.base_layer.weight)            # same 4-bit codes
        with torch.no_grad():
            layer.lora_B.normal_()                                       # B != 0: non-trivial gradients
            f.lora_A.copy_(layer.lora_A)
            f.lora_B.copy_(layer.lora_B)
    ids = torch.randint(0, 256, (2, 9))
    loss_ref = ref(input_ids=ids, labels=ids).loss
    loss_fast = K.chunked_cross_entropy(fast.model(input_ids=ids).last_hidden_state, fast.lm_head.weight, ids,
                                        chunk=5)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)      # fp32 rounding only
    loss_ref.backward()
    loss_fast.backward()
    for name, layer in lora_layers(ref).items():
        f = fast.get_submodule(name)
        torch.testing.assert_close(f.lora_A.grad, layer.lora_A.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.lora_B.grad, layer.lora_B.grad, rtol=1e-4, atol=1e-6)


def test_cuda_graph_step_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU error")
    with pytest.raises(RuntimeError, match="CUDA"):
        K.CUDAGraphStep(lambda: torch.zeros(()))
