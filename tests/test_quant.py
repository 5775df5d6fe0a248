"""lora_ref.quant: codebooks from their definitions, blockwise 4-bit quantisation byte-identical to
bitsandbytes on CPU, double quantisation, serialisable state, edge inputs."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lora_ref import quant as Q

bnb_F = pytest.importorskip("bitsandbytes.functional")

ANCHOR_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]


# ---------------------------------------------------------------- codebooks

def test_nf4_code_equals_bitsandbytes_and_anchor():
    code = Q.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.allclose(code, bnb_F.get_4bit_type("nf4", device="cpu"), atol=1e-7, rtol=0)
    assert torch.allclose(code, torch.tensor(ANCHOR_NF4), atol=1e-7, rtol=0)


def test_nf4_code_structure():
    code = Q.nf4_code()
    assert bool((code[1:] > code[:-1]).all()), "levels must be strictly increasing"
    assert code[7] == 0.0 and code[0] == -1.0 and code[15] == 1.0
    assert int((code > 0).sum()) == 8 and int((code < 0).sum()) == 7      # asymmetric on purpose
    # a different offset gives a different (still normalised) code: it is computed, not typed in
    other = Q.nf4_code(offset=0.99)
    assert other[15] == 1.0 and not torch.allclose(other, code)
    with pytest.raises(ValueError, match="offset"):
        Q.nf4_code(offset=1.0)


def test_fp4_code_equals_bitsandbytes_bit_order():
    code = Q.fp4_code()
    assert torch.equal(code, bnb_F.get_4bit_type("fp4", device="cpu"))
    # hand-worked: pattern 0b0011 is the largest magnitude (12/12), 0b0001 the subnormal 0.0625/12,
    # 0b1000 is -0 and the sign bit mirrors every level
    assert code[0b0011] == 1.0 and code[0b0001] == pytest.approx(0.0625 / 12)
    assert code[0b1000] == 0.0 and math.copysign(1.0, float(code[0b1000])) == -1.0
    assert torch.equal(code[8:], -code[:8])
    # normal magnitudes are E2M1's {1, 1.5, 2, 3, 4, 6}/6
    normal = sorted(float(v) for v in code[2:8])
    assert normal == pytest.approx([v / 6 for v in (1, 1.5, 2, 3, 4, 6)])


def test_int4_code_is_symmetric_sevenths_in_bnb_order():
    code = Q.int4_code()
    expected = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7]) / 7
    assert torch.equal(code, expected)          # bnb's get_4bit_type("int4") table (that function fails in 0.50)
    assert code.unique().numel() == 15


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = Q.create_dynamic_map(signed=signed)
    assert ours.shape == (256,) and bool((ours[1:] >= ours[:-1]).all())
    assert torch.equal(ours, bnb_F.create_dynamic_map(signed=signed))


def test_get_code_rejects_unknown_type():
    with pytest.raises(ValueError, match="quant_type='nf5'"):
        Q.get_code("nf5")


# ---------------------------------------------------------------- parity with bitsandbytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(64, 128), (7, 33), (3, 5, 131)]


def _bnb_reference_dequant(packed, absmax, quant_type, blocksize, shape, dtype):
    """bitsandbytes' own PyTorch dequantise (backends/default), eager: used where its compiled CPU
    kernel is wrong (rows whose length is not a multiple of the blocksize, see the test below)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(packed.reshape(-1), absmax, bnb_F.get_4bit_type(quant_type, device="cpu"), blocksize,
              torch.Size(shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_bytes_and_absmax_equal_bitsandbytes(dtype, quant_type, double_quant):
    g = torch.Generator().manual_seed(hash((str(dtype), quant_type, double_quant)) % 2**31)
    for shape in SHAPES:
        for blocksize in (32, 64, 4096):
            x = torch.randn(*shape, generator=g).to(dtype)
            packed, state = Q.quantize_4bit(x, blocksize, quant_type, double_quant)
            ref, ref_state = bnb_F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=double_quant)
            assert packed.dtype == torch.uint8 and packed.shape == ref.shape
            assert torch.equal(packed, ref), (shape, blocksize)
            if double_quant:
                assert state.offset == float(ref_state.offset)
                assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
                assert torch.equal(state.state2.code, ref_state.state2.code)
            else:
                assert torch.equal(state.absmax, ref_state.absmax)
            # dequantised values: identical to bitsandbytes' PyTorch dequantise of ITS bytes
            ours = Q.dequantize_4bit(packed, state)
            theirs = _bnb_reference_dequant(ref, Q.block_absmax(state), quant_type, blocksize, shape, dtype)
            assert ours.dtype == dtype and ours.shape == x.shape
            assert torch.equal(ours, theirs.reshape(shape))


@pytest.mark.parametrize("blocksize", Q.BLOCKSIZES_4BIT)
def test_every_blocksize_matches_bitsandbytes_public_api(blocksize):
    x = torch.randn(16, 4096, generator=torch.Generator().manual_seed(blocksize))
    packed, state = Q.quantize_4bit(x, blocksize, "nf4")
    ref, ref_state = bnb_F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, ref) and torch.equal(state.absmax, ref_state.absmax)
    # rows are multiples of the blocksize: bitsandbytes' public CPU dequantise is right here (for
    # blocksize >= 2048 it falls back to a torch.compile'd kernel: slow to compile, so use it eagerly)
    theirs = (bnb_F.dequantize_4bit(ref, ref_state) if blocksize < 2048 else
              _bnb_reference_dequant(ref, ref_state.absmax, "nf4", blocksize, x.shape, x.dtype))
    assert torch.equal(Q.dequantize_4bit(packed, state), theirs)


def test_dequantize_is_right_when_rows_do_not_fill_blocks(record_property):
    """Rows of 96 values with blocksize 64: blocks run across rows (bitsandbytes' flat layout). lora_ref's
    round trip stays within half the widest NF4 level gap times each flat block's absmax.

    bitsandbytes 0.50.2's compiled CPU dequantize_4bit was seen to mis-assign block scales for such shapes
    (relative error 0.28 instead of 0.09, benchmarks/README.md); its CUDA build does not, and whether a CPU
    build does depends on the build (issue 15: asserting the bug made this test fail on the GPU machine).
    So bitsandbytes' error is reported (``record_property``, printed), not asserted."""
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    packed, state = Q.quantize_4bit(x, 64, "nf4")
    deq = Q.dequantize_4bit(packed, state)
    levels = torch.sort(Q.get_code("nf4")).values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    flat_absmax = x.reshape(-1, 64).abs().amax(1)                          # 96 blocks over the flat weight
    bound = (half_gap * flat_absmax).repeat_interleave(64).view(64, 96)
    assert torch.equal(state.absmax, flat_absmax)
    assert ((deq - x).abs() <= bound * (1 + 1e-6)).all()
    ref, ref_state = bnb_F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    bnb_err = float((bnb_F.dequantize_4bit(ref, ref_state) - x).abs().max())
    record_property("bitsandbytes_dequantize_max_abs_error", bnb_err)
    print(f"bitsandbytes dequantize_4bit on {x.device}: max abs error {bnb_err:.3f} "
          f"(lora_ref {float((deq - x).abs().max()):.3f})")


def test_nested_codes_equal_bitsandbytes_reference_kernel_and_never_worse_than_its_cpu_kernel():
    """Double quantisation's 8-bit codes: bit-identical to bitsandbytes' reference PyTorch kernel; its
    compiled CPU kernel picks a non-nearest level for a few values, never closer than ours."""
    g = torch.Generator().manual_seed(0)
    absmax_like = torch.randn(20_000, generator=g)
    code = Q.create_dynamic_map()
    q, state = Q.quantize_8bit(absmax_like, blocksize=256)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    ref_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    q_ref, absmax_ref = op.redispatch(ref_keys, absmax_like, code, 256)       # bnb's PyTorch kernel
    assert torch.equal(q, q_ref) and torch.equal(state.absmax, absmax_ref)
    q_cpu, _ = op(absmax_like, code, 256)                                     # bnb's compiled CPU kernel
    normed = absmax_like / state.absmax.repeat_interleave(256)[: absmax_like.numel()]
    ours = (code[q.long()] - normed).abs()
    theirs = (code[q_cpu.long()] - normed).abs()
    assert bool((ours <= theirs).all())
    assert (q != q_cpu).float().mean() < 0.01


def test_nested_dequantise_equals_bitsandbytes_on_our_state():
    x = torch.randn(32, 4096, generator=torch.Generator().manual_seed(3))
    packed, state = Q.quantize_4bit(x, 64, "nf4", double_quant=True)
    bnb_state = bnb_F.QuantState.from_dict(dict(state.to_dict()), device=torch.device("cpu"))
    assert bnb_state.nested
    assert torch.equal(Q.dequantize_4bit(packed, state), bnb_F.dequantize_4bit(packed, bnb_state))


# ---------------------------------------------------------------- hand-worked values and invariants

def test_hand_worked_nf4_bytes():
    x = torch.tensor([2.0, -2.0, 0.0, 1.0])          # absmax 2: scaled 1, -1, 0, 0.5
    packed, state = Q.quantize_4bit(x, blocksize=32, quant_type="nf4")
    # 1 -> 15, -1 -> 0 ; 0 -> 7, 0.5 -> 12 (0.5 < midpoint(0.4407, 0.5626) = 0.5017), high nibble first
    assert packed.flatten().tolist() == [0xF0, 0x7C]
    assert state.absmax.tolist() == [2.0]
    assert Q.dequantize_4bit(packed, state).tolist() == pytest.approx([2.0, -2.0, 0.0, 2 * 0.44070982933044434])


def test_tie_on_midpoint_goes_to_lower_level():
    code = Q.nf4_code()
    mid = (code[12] + code[13]) / 2
    assert Q.nearest_code_index(mid.reshape(1), code).item() == 12
    assert Q.nearest_code_index(torch.nextafter(mid, torch.tensor(2.0)).reshape(1), code).item() == 13


@pytest.mark.parametrize("quant_type", Q.QUANT_TYPES)
def test_quantise_is_idempotent_on_its_own_output(quant_type):
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    packed, state = Q.quantize_4bit(x, 64, quant_type)
    again, state2 = Q.quantize_4bit(Q.dequantize_4bit(packed, state), 64, quant_type)
    assert torch.equal(Q.dequantize_4bit(again, state2), Q.dequantize_4bit(packed, state))


def test_int4_is_round_to_nearest_sevenths():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    packed, state = Q.quantize_4bit(x, 64, "int4")
    absmax = x.abs().amax(dim=1, keepdim=True)
    expected = torch.round(x / absmax * 7) / 7 * absmax
    assert torch.allclose(Q.dequantize_4bit(packed, state), expected, atol=1e-6)


def test_error_ordering_and_anchor_on_gaussian_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    err = {t: Q.quantization_error(w, t)["rel_error"] for t in Q.QUANT_TYPES}
    assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"]
    # measured, not the paper's perplexity ordering: bitsandbytes' FP4 has no level between 0.0052 and
    # 0.167 (its subnormal is 2^-4/12), so on Gaussian weights its L2 error is *above* int4's (0.122 vs 0.108)
    assert err["fp4"] > err["int4"]
    assert err["nf4"] == pytest.approx(0.092, abs=0.004)      # ANCHORS: NF4 round trip on N(0, 0.02)
    dq = Q.quantization_error(w, "nf4", double_quant=True)["rel_error"]
    assert err["nf4"] <= dq < err["nf4"] * 1.01               # double quantisation costs almost nothing


# ---------------------------------------------------------------- accounting

def test_bits_per_parameter_paper_numbers():
    assert Q.bits_per_parameter(64, double_quant=False) == 4.5
    assert Q.bits_per_parameter(64, double_quant=True, dq_blocksize=256) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert Q.bits_per_parameter(64, True) - 4 == pytest.approx(0.127, abs=5e-4)
    with pytest.raises(ValueError, match="blocksize=0"):
        Q.bits_per_parameter(0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_measured_storage_matches_bits_per_parameter(double_quant):
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    packed, state = Q.quantize_4bit(x, 64, "nf4", double_quant)
    measured_bits = 8 * Q.quantized_nbytes(packed, state) / x.numel()
    extra = 32 / x.numel() if double_quant else 0.0             # the one fp32 offset
    assert measured_bits == pytest.approx(Q.bits_per_parameter(64, double_quant) + extra, rel=1e-9)


# ---------------------------------------------------------------- state: frozen, serialisable

def test_state_is_frozen_and_moves_by_copy():
    _, state = Q.quantize_4bit(torch.randn(64), 64, "nf4", double_quant=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.blocksize = 128
    moved = state.to("cpu")
    assert moved is not state and moved.state2 is not state.state2


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_round_trips_through_safetensors(tmp_path, double_quant):
    from safetensors.torch import load_file, save_file
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    packed, state = Q.quantize_4bit(x, 128, "fp4", double_quant)
    tensors = {f"weight.{k}": v.contiguous() for k, v in state.to_dict().items()}
    tensors["weight"] = packed
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    back = Q.QuantState.from_dict({k: v for k, v in loaded.items() if k != "weight"})
    assert back.shape == (33, 70) and back.dtype == torch.bfloat16 and back.quant_type == "fp4"
    assert back.nested == double_quant
    assert torch.equal(Q.dequantize_4bit(loaded["weight"], back), Q.dequantize_4bit(packed, state))


def test_state_reads_bitsandbytes_serialised_state():
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(6))
    ref, ref_state = bnb_F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = Q.QuantState.from_dict(ref_state.as_dict(packed=True))
    assert state.nested and state.blocksize == 64 and state.shape == (16, 256)
    assert torch.equal(Q.dequantize_4bit(ref, state), bnb_F.dequantize_4bit(ref, ref_state))


def test_from_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match="quant_state.bitsandbytes__"):
        Q.QuantState.from_dict({"absmax": torch.zeros(1)})


# ---------------------------------------------------------------- edge inputs

def test_all_zero_block_decodes_to_exact_zeros():
    x = torch.cat([torch.zeros(64), torch.randn(64, generator=torch.Generator().manual_seed(0))])
    packed, state = Q.quantize_4bit(x, 64, "nf4")
    assert state.absmax[0] == 0.0
    assert packed[:32].flatten().tolist() == [0x77] * 32          # code 7 is NF4's exact zero
    out = Q.dequantize_4bit(packed, state)
    assert torch.equal(out[:64], torch.zeros(64)) and not torch.isnan(out).any()


def test_size_not_divisible_by_blocksize_and_odd_count():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))    # 21 values, blocksize 64
    packed, state = Q.quantize_4bit(x, 64, "nf4")
    assert packed.shape == (11, 1) and state.absmax.shape == (1,)
    assert packed[-1, 0] & 0x0F == 7                               # odd count padded with the code of 0
    assert Q.dequantize_4bit(packed, state).shape == (3, 7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(100)
    x[17] = bad
    with pytest.raises(ValueError, match="first at flat index 17"):
        Q.quantize_4bit(x)


def test_empty_tensor_round_trips():
    packed, state = Q.quantize_4bit(torch.empty(0, 16), 64, "nf4", double_quant=True)
    assert packed.shape == (0, 1) and state.n_blocks == 0
    assert Q.dequantize_4bit(packed, state).shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64])
def test_unsupported_dtypes_raise(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        Q.quantize_4bit(torch.ones(64, dtype=dtype))


def test_bad_blocksize_and_type_raise():
    with pytest.raises(ValueError, match="blocksize=48"):
        Q.quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type='af4'"):
        Q.quantize_4bit(torch.randn(64), quant_type="af4")
    packed, state = Q.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="packed bytes"):
        Q.dequantize_4bit(packed[:10], state)


def test_plot_codebooks_returns_figure(monkeypatch):
    # the picture lives with the benchmark that draws it (lora_ref.quant imports no plotting library)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from quality_quant import plot_codebooks
    fig = plot_codebooks(n_blocks=64)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("nf4 (16 levels)" in s for s in labels) and any("int4 (15 levels)" in s for s in labels)


@pytest.mark.parametrize("qtype", Q.QUANT_TYPES)
def test_quantize_4bit_is_quantize_blockwise_then_pack_4bit(qtype):
    """The building blocks (notebook 05's interface) give quantize_4bit's bytes and dequantize_4bit's values."""
    w = torch.randn(37, 51) * 0.1                                   # odd count, ragged last block
    packed, state = Q.quantize_4bit(w, 64, qtype)
    code = Q.get_code(qtype)
    codes, absmax = Q.quantize_blockwise(w, code, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (w.numel(),)
    zero = int(Q.quantize_blockwise(torch.zeros(1), code, 64)[0][0])
    assert torch.equal(Q.pack_4bit(codes, pad=zero), packed.reshape(-1))
    assert torch.equal(Q.unpack_4bit(Q.pack_4bit(codes), w.numel()), codes.long())
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(Q.dequantize_blockwise(codes, absmax, code, w.shape, 64), Q.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="block scales"):
        Q.dequantize_blockwise(codes, absmax[:-1], code, w.shape, 64)


def test_nearest_code_index_256_levels_is_bucketize():
    code = Q.create_dynamic_map(signed=True)
    x = torch.cat([torch.rand(5000) * 2 - 1, (code[:-1] + code[1:]) / 2])      # midpoints go to the lower level
    assert torch.equal(Q.nearest_code_index(x, code), torch.bucketize(x, (code[:-1] + code[1:]) / 2))
