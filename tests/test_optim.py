"""lora_ref.optim.AdamW8bit: trains like torch AdamW, like bitsandbytes' AdamW8bit, at ~1/4 of the state."""
import copy

import pytest
import torch
import torch.nn as nn

from lora_ref import optim


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
    l8 = _train(model, optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=1e-2), x, y)
    l32 = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-2), x, y)
    assert l8[-1] < 0.05 * l8[0]                                  # it learns
    assert l8[-1] == pytest.approx(l32[-1], rel=0.15)             # about as well as fp32 state
    w8, w32 = model[0].weight, ref[0].weight
    assert float((w8 - w32).detach().norm() / w32.detach().norm()) < 0.05


def test_state_memory_is_about_a_quarter():
    model, x, y = _problem()
    ref = copy.deepcopy(model)
    opt8 = optim.AdamW8bit(model.parameters(), lr=1e-3)
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
    _train(model, optim.AdamW8bit(model.parameters(), lr=1e-2), x, y, steps=20)
    try:
        _train(ref, bnb.optim.AdamW8bit(ref.parameters(), lr=1e-2), x, y, steps=20)
    except (RuntimeError, NotImplementedError) as e:       # a bnb build without the CPU 8-bit update
        pytest.skip(f"bitsandbytes 8-bit optimizer unavailable on CPU: {e}")
    rel = float((model[0].weight - ref[0].weight).detach().norm() / ref[0].weight.detach().norm())
    assert rel < 0.01


def test_first_step_equals_adamw_exactly_for_small_tensors():
    p1 = nn.Parameter(torch.randn(10, 10))
    p2 = nn.Parameter(p1.detach().clone())
    o1 = optim.AdamW8bit([p1], lr=0.1)                      # 100 < min_8bit_size: fp32 state
    o2 = torch.optim.AdamW([p2], lr=0.1)
    for _ in range(3):
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad()
            (p ** 3).sum().backward()
            o.step()
    assert torch.allclose(p1, p2, atol=1e-6)


def test_state_dict_round_trip():
    model, x, y = _problem()
    opt = optim.AdamW8bit(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, steps=3)
    clone = copy.deepcopy(model)
    opt2 = optim.AdamW8bit(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    _train(model, opt, x, y, steps=2)
    _train(clone, opt2, x, y, steps=2)
    assert torch.equal(model[0].weight, clone[0].weight)


@pytest.mark.parametrize("kwargs,match", [({"lr": -1}, "lr=-1"), ({"betas": (0.9, 1.0)}, "betas"),
                                          ({"eps": 0}, "eps=0"), ({"weight_decay": -0.1}, "weight_decay")])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.AdamW8bit([nn.Parameter(torch.zeros(3))], **kwargs)
