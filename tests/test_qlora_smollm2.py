"""QLoRA on the real SmolLM2-135M-Instruct (slow: loads the model)."""
import pytest
import torch
import torch.nn as nn

from lora_ref import lora, qlora, quant


@pytest.mark.slow
def test_quantize_smollm2_storage_error_and_one_qlora_step():
    from lora_ref.data import encode_example, collate, load_dataset
    from lora_ref.models import load_smollm2
    model, tok = load_smollm2()
    # the paper's ordering on real weights, on a few layers: NF4 has the lowest error
    some = [m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers.0." in n]
    err = {t: sum(quant.quantization_error(w, t)["mse"] * w.numel() for w in some) for t in quant.QUANT_TYPES}
    assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"]

    report = qlora.quantize_model(model, compute_dtype=torch.float32)
    assert len(report.quantized) == 30 * 7 and set(report.skipped) == {"lm_head"}
    dense, q4 = report.linear_bytes
    assert dense == 4 * 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert 8 * q4 / (dense / 4) == pytest.approx(quant.bits_per_parameter(64, True), abs=0.01)

    qlora.inject_qlora(model, lora.LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    ex = load_dataset().train[:2]
    batch = collate([encode_example(tok, e) for e in ex], tok.pad_token_id)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 0.5 < loss.item() < 8
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
