"""lora_ref.sweep: the cached-prefix loss equals the full model's loss, and so do the adapter gradients."""
import pytest
import torch

from lora_ref import data, sweep
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers
from lora_ref.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return data.tiny_tokenizer()


def _model(tok, first_layer=2, targets="all-linear"):
    model = tiny_llama(seed=1, vocab_size=len(tok), num_hidden_layers=4)
    pattern = rf"model\.layers\.([{first_layer}-9])\..*"       # only layers >= first_layer
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=(pattern,) if targets == "all-linear" else targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():             # B != 0: the adapters change the output
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
    return model.eval()


def test_top_loss_and_grads_equal_full_model(tok):
    model = _model(tok)
    examples = data.load_dataset().train[:5]                   # different lengths: right padding exercised
    batch = data.collate([data.encode_example(tok, e) for e in examples], tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    full = model(**batch).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert all(".layers.2." in n or ".layers.3." in n for n in want)

    cache = sweep.cache_prefix(model, tok, examples, first_layer=2)
    hidden, labels = sweep._batch(cache, range(len(examples)))
    top = sweep.top_loss(model, 2, hidden, labels)
    top.backward()
    assert torch.allclose(top, full, atol=1e-5), (top.item(), full.item())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want[n], atol=1e-5, rtol=1e-4), n


def test_train_top_learns_and_evaluates(tok):
    model = _model(tok)
    splits = data.load_dataset()
    cache = sweep.cache_prefix(model, tok, splits.train[:16], first_layer=2)
    run = sweep.train_top(model, cache, cache, steps=30, lr=1e-2, batch_size=8, eval_every=10)
    assert len(run.losses) == 30 and run.losses[-1] < run.losses[0]
    assert [s for s, _ in run.eval_points] == [10, 20, 30] and run.eval_points[-1][1] == pytest.approx(run.eval_loss)
    loss, acc = sweep.evaluate_top(model, cache)
    assert loss == pytest.approx(run.eval_loss) and 0.0 <= acc <= 1.0
    # the evaluation loss is the token-weighted mean the training module computes on the full model
    from lora_ref.training import evaluate_loss
    assert loss == pytest.approx(evaluate_loss(model, tok, splits.train[:16]), rel=1e-4)


def test_refuses_stale_cache_and_bad_layer(tok):
    model = _model(tok, first_layer=1)
    cache = sweep.cache_prefix(model, tok, data.load_dataset().train[:4], first_layer=2)
    with pytest.raises(ValueError, match="below layer 2 are trainable"):
        sweep.train_top(model, cache, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="first_layer=9"):
        sweep.cache_prefix(model, tok, data.load_dataset().train[:4], first_layer=9)
