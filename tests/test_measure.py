"""lora_ref.measure: bytes autograd saves and the parts of one training step, checked by hand."""
import torch
import torch.nn.functional as F

from lora_ref.lora import LoRAConfig, lora_layers
from lora_ref.measure import saved_for_backward, step_bytes
from lora_ref.methods import prepare_model
from lora_ref.models import tiny_llama


def test_saved_for_backward_counts_distinct_storages_and_skips_resident():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    _, both = saved_for_backward(lambda: F.linear(x, w))                 # linear saves x and W
    assert both == (8 * 16 + 4 * 16) * 4
    _, only_x = saved_for_backward(lambda: F.linear(x, w), exclude=(w,))
    assert only_x == 8 * 16 * 4
    _, twice = saved_for_backward(lambda: F.linear(x, w) + F.linear(x, w))   # the same storages: once
    assert twice == both


def test_step_bytes_parts_of_a_lora_step():
    torch.manual_seed(0)
    model = prepare_model(tiny_llama(seed=0), "lora", LoRAConfig(r=4, alpha=8, target_modules=("q_proj",)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    parts = step_bytes(model, opt, {"input_ids": ids, "labels": ids})
    n = sum(p.numel() for p in params)
    assert n == sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert parts["gradients"] == 4 * n and parts["optimizer"] == 8 * n             # fp32 grads, two fp32 moments
    assert parts["weights"] >= sum(p.numel() * 4 for p in model.parameters()) - 4 * model.lm_head.weight.numel()
    assert parts["activations"] > 0
