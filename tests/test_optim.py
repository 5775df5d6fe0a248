"""lora_ref.optim.AdamW8bit (readable) and lora_ref.optim_fast.FastAdamW8bit (bucketed, tested equal to it): train like
torch AdamW, like bitsandbytes' AdamW8bit, at ~1/4 of the state."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from lora_ref import optim, optim_fast, quant


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    w_true = torch.randn(64, 128, generator=g) / 10
    y = x @ w_true.t() + 0.01 * torch.randn(512, 64, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 64), )          # weight 8192 values (8-bit state), bias 64 (fp32)
    return model, x, y


def _train(model, opt, x, y, steps=150):
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_trains_close_to_torch_adamw():
    model, x, y = _problem()
    ref = copy.deepcopy(model)
    l8 = _train(model, optim_fast.FastAdamW8bit(model.parameters(), lr=1e-2, weight_decay=1e-2), x, y)
    l32 = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-2), x, y)
    assert l8[-1] < 0.05 * l8[0]                                  # it learns
    assert l8[-1] == pytest.approx(l32[-1], rel=0.15)             # about as well as fp32 state
    w8, w32 = model[0].weight, ref[0].weight
    assert float((w8 - w32).detach().norm() / w32.detach().norm()) < 0.05


def test_state_memory_is_about_a_quarter():
    model, x, y = _problem()
    ref = copy.deepcopy(model)
    opt8 = optim_fast.FastAdamW8bit(model.parameters(), lr=1e-3)
    opt32 = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    _train(model, opt8, x, y, steps=1)
    _train(ref, opt32, x, y, steps=1)
    n_w, n_b = 64 * 128, 64
    assert optim.optimizer_state_nbytes(opt32) == 8 * (n_w + n_b)
    # weight: two uint8 moments + two fp32 absmax per 256 values; the small bias keeps fp32 moments
    expected8 = 2 * n_w + 2 * 4 * (n_w // 256) + 8 * n_b
    assert optim.optimizer_state_nbytes(opt8) == expected8
    st = opt8.state[model[0].weight]
    assert st["exp_avg_q"].dtype == torch.uint8 and st["exp_avg_sq_q"].dtype == torch.uint8
    assert optim.adamw_state_bytes_per_param(True) == pytest.approx(2.03125)
    assert 2 * n_w / (8 * n_w) < expected8 / (8 * (n_w + n_b)) < 0.27


def test_close_to_bitsandbytes_adamw8bit_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    model, x, y = _problem(1)
    ref = copy.deepcopy(model)
    _train(model, optim_fast.FastAdamW8bit(model.parameters(), lr=1e-2), x, y, steps=20)
    try:
        _train(ref, bnb.optim.AdamW8bit(ref.parameters(), lr=1e-2), x, y, steps=20)
    except (RuntimeError, NotImplementedError) as e:       # a bnb build without the CPU 8-bit update
        pytest.skip(f"bitsandbytes 8-bit optimizer unavailable on CPU: {e}")
    rel = float((model[0].weight - ref[0].weight).detach().norm() / ref[0].weight.detach().norm())
    assert rel < 0.01


def test_first_step_equals_adamw_exactly_for_small_tensors():
    p1 = nn.Parameter(torch.randn(10, 10))
    p2 = nn.Parameter(p1.detach().clone())
    o1 = optim_fast.FastAdamW8bit([p1], lr=0.1)                      # 100 < min_8bit_size: fp32 state
    o2 = torch.optim.AdamW([p2], lr=0.1)
    for _ in range(3):
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad()
            (p ** 3).sum().backward()
            o.step()
    assert torch.allclose(p1, p2, atol=1e-6)


def test_state_dict_round_trip():
    model, x, y = _problem()
    opt = optim_fast.FastAdamW8bit(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, steps=3)
    clone = copy.deepcopy(model)
    opt2 = optim_fast.FastAdamW8bit(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    _train(model, opt, x, y, steps=2)
    _train(clone, opt2, x, y, steps=2)
    assert torch.equal(model[0].weight, clone[0].weight)


@pytest.mark.parametrize("kwargs,match", [({"lr": -1}, "lr=-1"), ({"betas": (0.9, 1.0)}, "betas"),
                                          ({"eps": 0}, "eps=0"), ({"weight_decay": -0.1}, "weight_decay")])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim_fast.FastAdamW8bit([nn.Parameter(torch.zeros(3))], **kwargs)


# ----------------------------------------------------------------------------------------------------
# The fast implementation (flat buckets, table-driven nearest-level search) against straightforward code
# ----------------------------------------------------------------------------------------------------

MAPS = {"signed": quant.create_dynamic_map(signed=True), "unsigned": quant.create_dynamic_map(signed=False)}


def _hard_values(code, seed=0):
    """Values a nearest-level search gets wrong first: midpoints, their float neighbours, levels, zeros,
    +-1 and just beyond, subnormals, log-uniform magnitudes, and random bit patterns of every exponent."""
    g = torch.Generator().manual_seed(seed)
    mids = (code[:-1] + code[1:]) / 2
    inf = torch.tensor(float("inf"))
    tiny = torch.tensor([1e-45, 1e-40, 1.1754944e-38, 1e-30, 1e-10, 2.7e-7, 3e-7])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 0.5, -0.5])
    mags = 10 ** (-12 * torch.rand(20000, generator=g))
    signs = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    patterns = bits.view(torch.float32)
    values = torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), code, -code,
                        tiny, -tiny, special, torch.rand(20000, generator=g) * 2 - 1, mags * signs,
                        patterns[torch.isfinite(patterns)]])
    return values


@pytest.mark.parametrize("which", ["signed", "unsigned"])
def test_nearest_level_equals_bucketize(which):
    code = MAPS[which]
    lookup = optim_fast.NearestLevel(code)
    x = _hard_values(code)
    expected = torch.bucketize(x, (code[:-1] + code[1:]) / 2)          # what quant.quantize_8bit does
    assert torch.equal(lookup(x).long(), expected)
    assert lookup.bits <= 8 and lookup.zero_code == int(torch.argmin(code.abs()))


def _on_scaled_midpoints(code, absmax, n):
    """n values whose blocks (of 256) have absmax ``absmax`` and whose scaled values x / absmax lie on a
    midpoint of ``code`` or one float away: there x / absmax and x * (1 / absmax) can differ by an ulp and
    fall on two sides of the midpoint, so quantize_8bit's division in a partial last block matters."""
    mids = (code[:-1] + code[1:]) / 2
    x, inf = mids * absmax, torch.tensor(float("inf"))
    cands = torch.cat([x, torch.nextafter(x, inf), torch.nextafter(x, -inf)])
    cands = cands[cands.abs() <= absmax]
    out = cands[torch.arange(n) % cands.numel()]
    out[::256] = absmax
    return out


def _odd_tensors(code, seed=0):
    """Tensors of awkward sizes and contents: partial blocks, zero blocks, values on midpoints."""
    g = torch.Generator().manual_seed(seed)
    mids = (code[:-1] + code[1:]) / 2
    on_mids = torch.cat([torch.ones(1), mids, mids[:44]])                 # 300 values, absmax exactly 1
    with_zero_block = torch.randn(1000, generator=g)
    with_zero_block[256:512] = 0.0
    with_zero_block[600] = -0.0
    tensors = [torch.randn(1, generator=g), torch.randn(255, generator=g), torch.randn(256, generator=g),
               torch.randn(257, generator=g) * 1e-3, with_zero_block, torch.zeros(300), on_mids,
               _on_scaled_midpoints(code, 3.3, 1000), _on_scaled_midpoints(code, 0.7, 700),
               _on_scaled_midpoints(code, 7.77, 200), torch.randn(4096 + 3, generator=g) ** 3,
               torch.rand(513, generator=g)]
    return tensors if bool((code < 0).any()) else [t.abs() for t in tensors]


@pytest.mark.parametrize("which", ["signed", "unsigned"])
def test_flat_quantize_blocks_equals_quantize_8bit_per_tensor(which):
    """Tensors packed into one flat buffer, each zero-padded to whole blocks: the same codes and absmax as
    quant.quantize_8bit gives each tensor on its own, and the same dequantised values."""
    bs, code = 256, MAPS[which]
    tensors = _odd_tensors(code)
    padded = [-(-t.numel() // bs) * bs for t in tensors]
    flat = torch.cat([torch.nn.functional.pad(t, (0, n - t.numel())) for t, n in zip(tensors, padded)])
    ends = torch.tensor(padded).cumsum(0)
    divide_rows = torch.tensor([int(e) // bs - 1 for e, t in zip(ends, tensors) if t.numel() % bs])
    q, absmax = optim_fast.quantize_blocks(flat.view(-1, bs), optim_fast.NearestLevel(code), divide_rows,
                                      nonnegative=which == "unsigned")
    deq = optim_fast.dequantize_blocks(q, absmax, code).reshape(-1)
    start = 0
    for t, n in zip(tensors, padded):
        q_ref, st = quant.quantize_8bit(t, code, bs)
        assert torch.equal(q.reshape(-1)[start:start + t.numel()], q_ref)
        assert torch.equal(absmax[start // bs:(start + n) // bs], st.absmax)
        assert torch.equal(deq[start:start + t.numel()], quant.dequantize_8bit(q_ref, st, torch.float32))
        start += n


def _reference_adamw8bit(params, grads_per_step, groups, blocksize=256, min_8bit_size=4096):
    """The straightforward per-tensor AdamW8bit (what lora_ref.optim did before buckets): each parameter
    on its own, moments quantised with quant.quantize_8bit. ``groups[i]`` holds parameter i's
    hyperparameters; a ``None`` gradient skips the parameter in that step."""
    signed, unsigned = MAPS["signed"], MAPS["unsigned"]
    params = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    for grads in grads_per_step:
        for p, grad, st, hp in zip(params, grads, states, groups):
            if grad is None:
                continue
            lr, (b1, b2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
            eight_bit = p.numel() >= min_8bit_size
            if not st:
                st["step"], zeros = 0, torch.zeros(p.shape)
                if eight_bit:
                    st["m"], st["v"] = (quant.quantize_8bit(zeros, signed, blocksize),
                                        quant.quantize_8bit(zeros, unsigned, blocksize))
                else:
                    st["m"], st["v"] = zeros, zeros.clone()
            st["step"] += 1
            t = st["step"]
            if eight_bit:
                m = quant.dequantize_8bit(*st["m"], torch.float32)
                v = quant.dequantize_8bit(*st["v"], torch.float32)
            else:
                m, v = st["m"], st["v"]
            g = grad.float()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p32 = p.float()
            p32.mul_(1 - lr * wd)
            denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            p32.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
            p.copy_(p32)
            if eight_bit:
                st["m"], st["v"] = quant.quantize_8bit(m, signed, blocksize), \
                    quant.quantize_8bit(v, unsigned, blocksize)
    return params, states


@pytest.mark.parametrize("bucket_numel", [2 ** 18, 600])
def test_step_matches_per_tensor_reference(bucket_numel):
    """Flat buckets give the per-tensor update: the same moments bit for bit, parameters to fp32 rounding.
    Odd sizes (partial blocks), fp32-state and 8-bit tensors, a bf16 parameter, two param groups, and a
    parameter without a gradient in one step (its step count then lags the others in its bucket)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (255,), (257,), (1000,), (40, 129), (4096,), (3, 300)]
    params = [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
    params.append(nn.Parameter((torch.randn(700, generator=g) * 0.1).bfloat16()))
    hp_a = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    hp_b = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    group_of = [hp_a if i % 2 == 0 else hp_b for i in range(len(params))]
    grads_per_step = []
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) * 10.0 ** -(i % 4) for i, p in enumerate(params)]
        if step == 2:
            grads[3] = None
        grads_per_step.append(grads)
    ref_params, ref_states = _reference_adamw8bit(params, grads_per_step, group_of, min_8bit_size=256)

    opt = optim_fast.FastAdamW8bit([dict(params=params[0::2], **hp_a), dict(params=params[1::2], **hp_b)],
                          min_8bit_size=256, bucket_numel=bucket_numel)
    for grads in grads_per_step:
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
    for p, ref, st in zip(params, ref_params, ref_states):
        if p.dtype == torch.bfloat16:
            torch.testing.assert_close(p.detach(), ref, rtol=1e-2, atol=1e-4)
        else:
            torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-7)
        mine = opt.state[p]
        assert float(mine["step"]) == st["step"]
        if p.numel() >= 256:
            for key, (q_ref, qs) in (("exp_avg", st["m"]), ("exp_avg_sq", st["v"])):
                assert mine[key + "_q"].shape == p.shape and mine[key + "_q"].dtype == torch.uint8
                assert torch.equal(mine[key + "_q"], q_ref) and torch.equal(mine[key + "_absmax"], qs.absmax)
        else:
            assert torch.equal(mine["exp_avg"], st["m"]) and torch.equal(mine["exp_avg_sq"], st["v"])


def test_state_bytes_count_padding_and_state_dict_is_a_snapshot():
    p = nn.Parameter(torch.randn(257))                     # 2 blocks of 256: 255 padding values per moment
    b = nn.Parameter(torch.randn(10))                      # fp32 state
    opt = optim_fast.FastAdamW8bit([p, b], lr=1e-2, min_8bit_size=256)
    for _ in range(2):
        p.grad, b.grad = torch.randn(257), torch.randn(10)
        opt.step()
    assert opt.state[p]["exp_avg_absmax"].shape == (2,) and opt.state[p]["exp_avg_sq_q"].shape == (257,)
    assert optim.optimizer_state_nbytes(opt) == 2 * 512 + 2 * 2 * 4 + 2 * 10 * 4
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in saved["state"][0].items()}
    assert saved["state"][0]["exp_avg_q"].numel() == 257                  # no padding saved
    p.grad, b.grad = torch.randn(257), torch.randn(10)
    opt.step()
    assert all(torch.equal(before[k], saved["state"][0][k]) for k in before)
    assert float(opt.state[p]["step"]) == 3


def test_deepcopy_continues_identically():
    """torch's Optimizer pickles only defaults, state and param_groups: settings must survive, buckets rebuild."""
    params = nn.ParameterList([nn.Parameter(torch.randn(300)), nn.Parameter(torch.randn(7))])
    opt = optim_fast.FastAdamW8bit(params, lr=1e-2, min_8bit_size=256, bucket_numel=512)
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    for gs in grads[:2]:
        for p, gr in zip(params, gs):
            p.grad = gr
        opt.step()
    params2, opt2 = copy.deepcopy((params, opt))
    assert (opt2.min_8bit_size, opt2.bucket_numel) == (256, 512)
    for gs in grads[2:]:
        for ps, o in ((params, opt), (params2, opt2)):
            for p, gr in zip(ps, gs):
                p.grad = gr
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_non_finite_gradient_poisons_its_block_without_a_check():
    """Like torch.optim.AdamW, no NaN/Inf check (it would be a host sync on a GPU): the value goes NaN at
    once, its block's absmax too, so the whole block from the next step on; other blocks are unharmed."""
    p = nn.Parameter(torch.zeros(512))
    opt = optim_fast.FastAdamW8bit([p], lr=1e-2, min_8bit_size=256)
    p.grad = torch.ones(512)
    p.grad[3] = float("nan")
    opt.step()
    assert int(p.isnan().sum()) == 1 and bool(opt.state[p]["exp_avg_absmax"][0].isnan())
    p.grad = torch.ones(512)
    opt.step()
    assert bool(p[:256].isnan().all()) and bool(torch.isfinite(p[256:]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync_and_matches_cpu():
    g = torch.Generator().manual_seed(0)
    cpu = [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in ((16, 576), (192, 16), (1000,), (300,))]
    gpu = [nn.Parameter(p.detach().cuda()) for p in cpu]
    grads = [[torch.randn(p.shape, generator=g) for p in cpu] for _ in range(4)]
    o_cpu = optim_fast.FastAdamW8bit(cpu, lr=1e-2, min_8bit_size=256)
    o_gpu = optim_fast.FastAdamW8bit(gpu, lr=1e-2, min_8bit_size=256)
    for i, gs in enumerate(grads):
        for pc, pg, gr in zip(cpu, gpu, gs):
            pc.grad, pg.grad = gr, gr.cuda()
        o_cpu.step()
        torch.cuda.synchronize()
        if i:                                              # the first step builds the buckets
            torch.cuda.set_sync_debug_mode("error")
        try:
            o_gpu.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for pc, pg in zip(cpu, gpu):
        torch.testing.assert_close(pg.detach().cpu(), pc.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(o_gpu.state[gpu[0]]["exp_avg_q"].cpu(), o_cpu.state[cpu[0]]["exp_avg_q"])


def _run_both(shapes, steps, **kw):
    """The readable and the fast optimizer from the same parameters and gradients, step by step."""
    g = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    pa, pb = [nn.Parameter(p.detach().clone()) for p in params], [nn.Parameter(p.detach().clone()) for p in params]
    oa, ob = optim.AdamW8bit(pa, lr=1e-2, **kw), optim_fast.FastAdamW8bit(pb, lr=1e-2, **kw)
    for _ in range(steps):
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        oa.step()
        ob.step()
    return pa, pb, oa, ob


@pytest.mark.parametrize("kw", [dict(min_8bit_size=256), dict(min_8bit_size=256, weight_decay=0.0, blocksize=64),
                                dict()])
def test_readable_and_fast_adamw8bit_are_the_same_update(kw):
    """Parameters and every state tensor (codes, absmax, fp32 moments, step) are bit-identical after several
    steps, on tensors with and without a partial last block, 8-bit and fp32 state."""
    pa, pb, oa, ob = _run_both([(40, 64), (300,), (7, 5), (33, 31)], steps=6, **kw)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        sa, sb = oa.state[a], ob.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key].reshape(sa[key].shape)), key


def test_readable_adamw8bit_state_bytes_have_no_padding():
    pa, _, oa, _ = _run_both([(40, 64), (300,)], steps=1, min_8bit_size=256)
    assert optim.optimizer_state_nbytes(oa) == 2 * (2560 + 10 * 4) + 2 * (300 + 2 * 4)


def test_readable_adamw8bit_deepcopy_keeps_its_settings():
    pa, _, oa, _ = _run_both([(40, 64)], steps=1, min_8bit_size=256, blocksize=64)
    clone = copy.deepcopy(oa)
    assert (clone.blocksize, clone.min_8bit_size) == (64, 256) and torch.equal(clone.maps[True], oa.maps[True])
