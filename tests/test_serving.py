"""lora_ref.serving on the tiny Llama: hot swap, mixed batches, merged export, PEFT adapters, latency."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_ref.adapters import save_adapter
from lora_ref.lora import LoRAConfig, inject_lora, lora_layers, merged_weight
from lora_ref.models import tiny_llama
from lora_ref.serving import (AdapterServer, AdapterWeights, MultiLoRALinear, adapter_from_model,
                              batched_lora_delta, compare_latency, export_merged_model, measure_latency, merged_copy,
                              read_peft_adapter)


def trained_lora(seed: int, r: int, targets=("q_proj", "v_proj"), alpha: float = 16.0, rslora=False):
    """A tiny model with a LoRA adapter whose B is random (a trained-looking adapter, not the B=0 init)."""
    model = tiny_llama(seed=0)
    cfg = LoRAConfig(r=r, alpha=alpha, target_modules=targets, use_rslora=rslora)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model.eval(), cfg


@pytest.fixture
def three():
    return {"billing": trained_lora(1, r=4)[0],
            "returns": trained_lora(2, r=8, targets=("q_proj", "k_proj", "o_proj", "down_proj"))[0],
            "tone": trained_lora(3, r=2, targets="all-linear", rslora=True)[0]}


def ids(b=4, t=7, seed=0):
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_hot_swap_matches_each_lora_model_and_base_is_untouched(three):
    base = tiny_llama(seed=0)
    ref_base = logits(base, ids())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    server = AdapterServer(base)
    for name, m in three.items():
        server.add_adapter(name, m)
    for name, m in list(three.items()) * 2:          # swap back and forth: same answers every time
        server.set_adapter(name)
        torch.testing.assert_close(logits(server.model, ids()), logits(m, ids()), atol=1e-5, rtol=1e-5)
    server.set_adapter(None)
    torch.testing.assert_close(logits(server.model, ids()), ref_base, atol=0, rtol=0)
    after = {k.replace(".base_layer", ""): v for k, v in server.model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before), "serving changed a base weight"
    # adapters differ from each other: the test above could not pass with one adapter everywhere
    outs = [logits(three[n], ids()) for n in three]
    assert (outs[0] - outs[1]).abs().max() > 1e-2 and (outs[1] - outs[2]).abs().max() > 1e-2


def test_mixed_batch_equals_each_request_alone(three):
    server = AdapterServer(tiny_llama(seed=0))
    for name, m in three.items():
        server.add_adapter(name, m)
    names = ["returns", None, "billing", "tone", "billing", None]
    x = ids(b=len(names), t=9, seed=5)
    mixed = server.mixed_forward(x, names)
    for i, n in enumerate(names):
        server.set_adapter(n)
        alone = logits(server.model, x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=2e-5, rtol=1e-5)
    # the per-row indices are cleared afterwards
    assert all(l.row_index is None for l in server.layers().values())


def test_mixed_layer_is_gather_bmm_with_zero_padding():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    layer = MultiLoRALinear(lin)
    A1, B1, A2, B2 = torch.randn(2, 6), torch.randn(5, 2), torch.randn(3, 6), torch.randn(5, 3)
    layer.add("a", A1, B1, 0.5)
    layer.add("b", A2, B2, 2.0)
    A_all, B_all, s_all = layer.stacked(["a", "b"])
    assert A_all.shape == (3, 3, 6) and B_all.shape == (3, 5, 3) and s_all.tolist() == [0.0, 0.5, 2.0]
    assert torch.all(A_all[0] == 0) and torch.all(A_all[1, 2] == 0)     # base slot and padding are zeros
    x = torch.randn(3, 4, 6)
    layer.row_index = torch.tensor([2, 0, 1])
    y = layer(x)
    torch.testing.assert_close(y[0], lin(x[0]) + 2.0 * x[0] @ A2.t() @ B2.t())
    torch.testing.assert_close(y[1], lin(x[1]))
    torch.testing.assert_close(y[2], lin(x[2]) + 0.5 * x[2] @ A1.t() @ B1.t())
    layer.row_index = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="3 rows but 2"):
        layer(x)


def test_merged_weight_and_batched_delta_formulas():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    A, B = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [2.0]])
    # s B A = 0.5 * [[1, 0], [2, 0]]
    assert torch.equal(merged_weight(W, A, B, 0.5), torch.tensor([[1.5, 2.0], [4.0, 4.0]]))
    assert torch.equal(merged_weight(merged_weight(W, A, B, 0.5), A, B, 0.5, sign=-1), W)
    Wb = torch.ones(4, 4, dtype=torch.bfloat16) * 100
    tiny = merged_weight(Wb, torch.ones(1, 4) * 1e-2, torch.ones(4, 1), 1.0)      # 100.01 rounds to 100 in bf16
    assert tiny.dtype == torch.bfloat16 and torch.equal(tiny, Wb)
    with pytest.raises(ValueError, match="do not fit"):
        merged_weight(W, A.t(), B, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        merged_weight(W, A, B * float("inf"), 1.0)
    x = torch.randn(3, 2)
    A_all, B_all, s_all = torch.randn(2, 1, 2), torch.randn(2, 2, 1), torch.tensor([0.5, 2.0])
    y = batched_lora_delta(x, A_all, B_all, s_all, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(y[1], 0.5 * B_all[0] @ A_all[0] @ x[1])
    torch.testing.assert_close(y[2], 2.0 * B_all[1] @ A_all[1] @ x[2])
    with pytest.raises(ValueError, match="one entry per row"):
        batched_lora_delta(x, A_all, B_all, s_all, torch.tensor([1, 0]))


def test_mixed_generation_equals_one_request_at_a_time(three):
    server = AdapterServer(tiny_llama(seed=0))
    server.model.generation_config.eos_token_id = None     # random weights: never stop early
    for name, m in three.items():
        server.add_adapter(name, m)
    names = ["tone", "billing", None]
    x = ids(b=3, t=5, seed=9)
    together = server.generate_ids(x, names, max_new_tokens=6, pad_token_id=0)
    assert together.shape == (3, 6)
    for i, n in enumerate(names):
        alone = server.generate_ids(x[i:i + 1], [n], max_new_tokens=6, pad_token_id=0)
        assert torch.equal(together[i], alone[0]), f"row {i} ({n}) generated differently in the batch"


def test_peft_adapter_files_served_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_lora_weights=False)       # random B: a non-trivial adapter
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path / "ad")
    w = read_peft_adapter(tmp_path / "ad")
    assert len(w.layers) == 2 * 3 and w.num_parameters == sum(
        p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    server = AdapterServer(base)
    server.load_adapter("peft", tmp_path / "ad")
    server.set_adapter("peft")
    torch.testing.assert_close(logits(server.model, ids()), logits(pm, ids()), atol=1e-5, rtol=1e-5)


def test_own_adapter_folder_round_trip(tmp_path):
    model, cfg = trained_lora(7, r=3, rslora=True)
    save_adapter(model, tmp_path / "a", cfg)
    server = AdapterServer(tiny_llama(seed=0))
    server.load_adapter("a", tmp_path / "a")
    server.set_adapter("a")
    torch.testing.assert_close(logits(server.model, ids()), logits(model, ids()), atol=1e-5, rtol=1e-5)


def test_merged_copy_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = trained_lora(5, r=4, targets="all-linear")
    want = logits(model, ids())
    merged = merged_copy(model)
    assert not lora_layers(merged) and lora_layers(model), "merged_copy must leave the original LoRA model alone"
    assert not any(lay.merged for lay in lora_layers(model).values())
    torch.testing.assert_close(logits(merged, ids()), want, atol=1e-4, rtol=1e-4)
    folder = export_merged_model(model, tmp_path / "merged")
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(loaded, ids()), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no LoRALinear"):
        merged_copy(tiny_llama(seed=0))


def test_errors_name_the_bad_value(three):
    server = AdapterServer(tiny_llama(seed=0))
    server.add_adapter("billing", three["billing"])
    with pytest.raises(ValueError, match="already loaded"):
        server.add_adapter("billing", three["billing"])
    with pytest.raises(KeyError, match="nope"):
        server.set_adapter("nope")
    with pytest.raises(ValueError, match="2 adapter names for a batch of 4"):
        server.mixed_forward(ids(), ["billing", None])
    with pytest.raises(KeyError, match="not in the base model"):
        server.add_adapter("x", AdapterWeights({"model.nowhere": (torch.zeros(1, 64), torch.zeros(64, 1), 1.0)}))
    with pytest.raises(ValueError, match="do not fit"):
        server.add_adapter("y", AdapterWeights({"model.layers.0.self_attn.q_proj":
                                                (torch.zeros(2, 63), torch.zeros(64, 2), 1.0)}))
    with pytest.raises(ValueError, match="already has LoRALinear"):
        AdapterServer(three["tone"])
    server.remove_adapter("billing")
    assert server.names == [] and all(not l.adapters for l in server.layers().values())


def test_adapter_from_model_copies():
    model, _ = trained_lora(1, r=2)
    w = adapter_from_model(model)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    A, B, s = w.layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(A, layer.lora_A) and torch.equal(B, layer.lora_B) and s == layer.scaling
    with torch.no_grad():
        layer.lora_A.zero_()
    assert A.abs().sum() > 0, "AdapterWeights must not alias the training parameters"


def test_latency_helpers():
    calls = []
    stats = compare_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4                      # interleaved, warm-up included
    assert len(stats["a"].times_ms) == 3 and stats["a"].p10_ms <= stats["a"].median_ms <= stats["a"].p90_ms
    import time
    s = measure_latency(lambda: time.sleep(0.01), repeats=3, warmup=0)
    assert 9 <= s.median_ms < 200 and "median" in str(s)
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(lambda: None, repeats=0)


def test_text_generation_and_chat_session(three):
    from lora_ref import data
    from lora_ref.serving import ChatSession

    tok = data.tiny_tokenizer()
    server = AdapterServer(tiny_llama(seed=0))
    server.add_adapter("billing", three["billing"])
    replies = server.generate(tok, ["Where is my refund?", "Hi!"], ["billing", None], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert tok.padding_side == "right", "generate must restore the tokenizer's padding side"
    bot = ChatSession(server.model, tok, server=server, adapter="billing", max_new_tokens=4, max_turns=2)
    for q in ("one", "two", "three"):
        assert isinstance(bot.ask(q), str)
    assert [m["role"] for m in bot.history] == ["user", "assistant"] * 3 and server.active == "billing"
    bot.reset()
    assert bot.history == []
    with pytest.raises(ValueError, match="needs server"):
        ChatSession(server.model, tok, adapter="billing")
    with pytest.raises(KeyError, match="unknown adapter"):
        ChatSession(server.model, tok, server=server, adapter="nope")
