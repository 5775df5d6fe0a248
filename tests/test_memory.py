"""lora_ref.memory: hand-worked values, parity with transformers/safetensors, invariants, error paths."""
import math

import pytest
import torch

from lora_ref import memory as M


# ----------------------------------------------------------------------------- parameters, by hand

def test_llama2_7b_param_count_by_hand():
    # embeddings 32000*4096 twice (untied) + 32 layers * (4*4096^2 + 3*4096*11008 + 2*4096) + 4096
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert per_layer == 202_383_360
    assert M.param_count("llama-2-7b") == 2 * 32000 * 4096 + 32 * per_layer + 4096 == 6_738_415_616


def test_lora_counts_from_the_brief():
    assert M.lora_param_count("llama-2-7b", 16, ("q_proj", "k_proj", "v_proj", "o_proj")) == 16_777_216
    assert M.lora_param_count("llama-2-7b", 16, "attention") == 16_777_216
    assert M.lora_param_count("llama-2-7b", 16, "all-linear") == 39_976_960
    assert M.lora_param_count("smollm2-135m", 16, "all-linear") == 4_884_480


def test_gqa_shapes():
    sh = M.linear_shapes("llama-3-8b")
    assert sh["q_proj"] == (4096, 4096)
    assert sh["k_proj"] == sh["v_proj"] == (1024, 4096)       # 8 kv heads * 128
    assert sh["down_proj"] == (4096, 14336)
    s = M.linear_shapes("smollm2-135m")
    assert s["k_proj"] == (192, 576) and s["o_proj"] == (576, 576)
    # LoRA on k is smaller than on q under GQA: r*(576+192) vs r*(576+576)
    assert M.lora_param_count("smollm2-135m", 1, ["k_proj"]) == 30 * (576 + 192)


def test_rank_is_linear():
    for r in (1, 4, 64):
        assert M.lora_param_count("mistral-7b", r) == r * M.lora_param_count("mistral-7b", 1)


@pytest.mark.parametrize("name", sorted(M.PRESETS))
def test_param_count_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    s = M.PRESETS[name]
    kw = dict(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.n_layers,
              num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, vocab_size=s.vocab,
              head_dim=s.head_dim, tie_word_embeddings=s.tied_embeddings)
    if s.qkv_bias:
        cfg = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**kw)
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    assert M.param_count(s) == sum(p.numel() for p in model.parameters())
    assert M.ModelShape.from_config(cfg).hidden == s.hidden
    assert M.param_count(M.ModelShape.from_config(cfg, name)) == M.param_count(s)
    # the 7 projections of layer 0 have the shapes linear_shapes says
    layer = model.model.layers[0]
    for proj, (o, i) in M.linear_shapes(s).items():
        mod = getattr(layer.self_attn, proj, None) or getattr(layer.mlp, proj)
        assert (mod.out_features, mod.in_features) == (o, i)


def test_adapter_file_bytes_exact(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    shape = M.ModelShape("tiny", 64, 160, 3, 4, 2, 100)
    r = 4
    for targets, dt in (("all-linear", torch.float32), (("q_proj", "v_proj"), torch.bfloat16)):
        tensors = {}
        shapes = M.linear_shapes(shape)
        for key, (o, i) in M._peft_key_names(shape, M.resolve_targets(targets)):
            tensors[key] = torch.zeros((r, i) if o == 0 else (o, r), dtype=dt)
        path = tmp_path / "adapter_model.safetensors"
        st.save_file(tensors, str(path), metadata={"format": "pt"})
        assert path.stat().st_size == M.adapter_file_bytes(shape, r, targets, dt)
        assert len(shapes) == 7


# ----------------------------------------------------------------------------------- FLOPs

def test_flops_6n_and_lora_two_thirds():
    s = M.ModelShape("t", 8, 16, 1, 2, 2, 10)
    n = 4 * 8 * 8 + 3 * 8 * 16 + 10 * 8            # projections + lm_head = 720
    f = M.training_flops(s, tokens=1, seq=1)
    attn = 4 * 1 * 8 * 1                            # 4 * L * q_dim * seq
    assert f.matmul_params == n
    assert f.forward == 2 * n + attn and f.backward == 4 * n + 2 * attn
    assert f.total == 6 * n + 3 * attn
    lo = M.training_flops(s, tokens=3, method="lora", r=2, seq=1)
    nl = M.lora_param_count(s, 2)
    assert lo.per_token == 4 * n + 6 * nl + 3 * attn and lo.total == 3 * lo.per_token
    ck = M.training_flops(s, tokens=1, seq=1, grad_checkpointing=True)
    assert ck.recompute == ck.forward and ck.total == f.total + f.forward


def test_lora_flops_not_128x_smaller():
    full = M.training_flops("llama-2-7b", 32 * 2048, "full", seq=2048)
    lora = M.training_flops("llama-2-7b", 32 * 2048, "lora", r=16, targets="attention", seq=2048)
    assert 1.3 < full.total / lora.total < 1.6     # the seed article claims 128x


# ----------------------------------------------------------------------------------- memory

def test_quantized_bytes_bits_per_param():
    n = 4096 * 4096
    assert M.quantized_linear_bytes(n, 64, False) == n // 2 + 4 * n // 64     # 4.5 bits
    dq = M.quantized_linear_bytes(n, 64, True)
    bits = 8 * dq / n
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)   # 4.127 (QLoRA Section 3)
    assert M.quantized_linear_bytes(65, 64, False) == 33 + 8                  # ceil in both


def _hand_shape():
    return M.ModelShape("hand", hidden=4, intermediate=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab=10)


def test_activation_bytes_by_hand():
    s = _hand_shape()            # head_dim 2, kv_dim 2, q_dim 4
    a = M.activation_bytes(s, batch=1, seq=3, dtype="bf16", method="full")
    t = 3
    norm = 4 * t * 4 + 4 * t + 2 * t * 4                 # fp32 input + rsqrt + bf16 pre-weight value = 84
    linear_inputs = 2 * t * 4 * 2                        # the two norm outputs kept by q/k/v and gate/up
    attn = 2 * t * (2 * 4 + 2 * 2) + 4 * t * 2           # q, k, v, sdpa out + fp32 logsumexp = 96
    mlp = 3 * 2 * t * 8 + 2 * t * 8                      # gate, up, silu + the product kept by down = 192
    assert a.layer == 2 * norm + linear_inputs + attn + mlp == 504
    assert a.checkpoints == 2 * 2 * t * 4
    assert a.head == norm + 2 * t * 4                    # + lm_head's input (trainable in full FT)
    assert a.loss_backward == 12 * t * 10 and a.loss_forward == 4 * t * 10
    lo = M.activation_bytes(s, 1, 3, "bf16", "lora", r=1, targets=["q_proj"], adapter_dtype="fp32")
    # frozen: no pre-weight norm value, no linear inputs, no product; + fp32 copy of x and A x for q
    assert lo.layer == 2 * (4 * t * 4 + 4 * t) + attn + 3 * 2 * t * 8 + 4 * t * 4 + 4 * t * 1 == 420
    k = M.activation_bytes(s, 1, 3, "bf16", "qlora", r=1, targets="all", adapter_input_copies=False)
    # the kernel keeps each linear input once in bf16, and A x (bf16) per adapted linear
    assert k.layer == 2 * (4 * t * 4 + 4 * t) + 2 * t * 4 * 2 + attn + mlp + 7 * 2 * t * 1


def _saved_bytes(model, ids):
    """Bytes autograd saves for backward in one forward pass (each storage once, parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_activation_bytes_match_autograd(method):
    """The op-by-op count against what autograd really saves, on a tiny bf16 Llama (CPU, SDPA)."""
    transformers = pytest.importorskip("transformers")
    from lora_ref import kernels as K
    from lora_ref.lora import LoRAConfig, inject_lora
    s = M.ModelShape("tiny-gqa", 64, 160, 2, 4, 2, 128, tied_embeddings=True)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=True, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    kw = {}
    if method == "lora":
        inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    elif method == "qlora":
        K.quantize_model_fast(model, r=16, alpha=32)
        kw = dict(adapter_input_copies=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    got = _saved_bytes(model, ids)
    a = M.activation_bytes(s, 2, 16, "bf16", method, 16, "all-linear", "fp32", **kw)
    pred = s.n_layers * a.layer + a.head + a.loss_forward
    # the rest: RoPE cos/sin tables, the labels, and layer 0's first norm, which saves nothing when the
    # frozen embedding output needs no gradient
    assert abs(pred / got - 1) < 0.05, (pred, got)


def test_training_memory_full_by_hand():
    s = _hand_shape()
    p = M.param_count(s)
    m = M.training_memory(s, "full", batch=1, seq=3, dtype="bf16", optimizer="adamw")
    assert m.weights == 2 * p and m.gradients == 2 * p and m.optimizer == 4 * p
    mp = M.training_memory(s, "full", batch=1, seq=3, master_weights=True)
    assert mp.weights == 6 * p and mp.gradients == 4 * p and mp.optimizer == 8 * p  # 2+4 / 4 / 8: ZeRO's 16+2
    a = m.act
    assert m.phases["loss"] == 8 * p - 2 * p + a.checkpoints + a.head + a.loss_backward
    assert m.phases["step"] == 8 * p
    assert m.total == max(m.phases.values()) and m.peak_phase in m.phases
    assert m.total <= m.weights + m.gradients + m.optimizer + m.activations


def test_training_memory_qlora_weights_by_hand():
    s = M.PRESETS["llama-2-7b"]
    q = M.training_memory(s, "qlora", r=16, adapter_dtype="fp32")
    pb = M.param_breakdown(s)
    per_layer = sum(M.quantized_linear_bytes(o * i) for o, i in M.linear_shapes(s).values())
    assert q.weights == 32 * per_layer + 2 * (pb.total - pb.linear) + 4 * 39_976_960
    assert q.gradients == 4 * 39_976_960 and q.optimizer == 8 * 39_976_960
    assert 3.9e9 < q.weights < 4.1e9                  # 6.48B params at 4.127 bits + 0.26B at 16 bits


def test_methods_ordering_and_checkpointing():
    for name in ("smollm2-135m", "llama-2-7b", "llama-3-8b"):
        f, lo, q = (M.training_memory(name, m) for m in M.METHODS)
        assert q.total < lo.total < f.total
        no_ck = M.training_memory(name, "lora", grad_checkpointing=False)
        assert no_ck.total > lo.total
        chunked = M.training_memory(name, "qlora", loss_chunks=8)
        assert chunked.total <= q.total


def test_8bit_optimizer_is_smaller():
    a = M.training_memory("llama-2-7b", "full", optimizer="adamw")
    b = M.training_memory("llama-2-7b", "full", optimizer="adamw8bit")
    s = M.training_memory("llama-2-7b", "full", optimizer="sgd")
    assert s.optimizer == 0 < b.optimizer < a.optimizer


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="method"):
        M.training_memory("llama-2-7b", "dora")
    with pytest.raises(ValueError, match="'x_proj'"):
        M.lora_param_count("llama-2-7b", 8, ["x_proj"])
    with pytest.raises(ValueError, match="r must"):
        M.lora_param_count("llama-2-7b", 0)
    with pytest.raises(KeyError, match="llama-9"):
        M.get_shape("llama-9")
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.ModelShape("bad", 64, 128, 2, 4, 3, 10)
    with pytest.raises(ValueError, match="dtype"):
        M.dtype_bytes("int3")
    with pytest.raises(ValueError, match="optimizer"):
        M.training_memory("llama-2-7b", "lora", optimizer="lion")
