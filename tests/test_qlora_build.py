"""Building a model already quantised (lora_ref.qlora.build_quantized), layer by layer: the path that fits
Llama-2-70B on one 48 GB GPU, held on a tiny Llama and on the real SmolLM2 (same logits as the eager
path; never more than one 16-bit layer alive)."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from lora_ref import kernels, models, qlora, quant


def _dense_linears(model):
    """Names of nn.Linear modules holding real (not meta) 16/32-bit weights inside the decoder layers."""
    layers = qlora.decoder_layers(model)
    return [n for n, m in layers.named_modules() if isinstance(m, nn.Linear) and not m.weight.is_meta]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from safetensors.torch import save_model
    model = models.tiny_llama(num_hidden_layers=3)
    save_model(model, str(tmp_path / "model.safetensors"))
    return model, tmp_path


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 24])
@pytest.mark.parametrize("shape", [(300, 130), (7, 9)])
def test_quantize_in_chunks_gives_the_same_bytes(chunk, shape):
    w = torch.randn(*shape)
    p1, s1 = quant.quantize_4bit(w, 64, "nf4", double_quant=True)
    p2, s2 = qlora.quantize_4bit_in_chunks(w, 64, "nf4", double_quant=True, chunk_numel=chunk)
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax) and s1.offset == s2.offset
    assert torch.equal(s1.state2.absmax, s2.state2.absmax) and s2.shape == shape


def test_streamed_build_equals_eager_quantisation_and_holds_one_layer(tiny_checkpoint):
    ref, folder = tiny_checkpoint
    eager = models.tiny_llama(num_hidden_layers=3)
    qlora.quantize_model(eager)
    trace = []

    def on_layer(i, model):
        layers = qlora.decoder_layers(model)
        still_meta = [j for j in range(len(layers)) if any(p.is_meta for p in layers[j].parameters())]
        trace.append((i, _dense_linears(model), still_meta))

    built = qlora.build_quantized(ref.config, "cpu", weights=models.SafetensorsWeights(folder),
                                  dtype=torch.float32, on_layer=on_layer, progress=False)
    # after layer i: layers 0..i are 4-bit, i+1.. have no memory yet, and no 16-bit linear is alive
    assert trace == [(0, [], [1, 2]), (1, [], [2]), (2, [], [])]
    assert all(not p.requires_grad for p in built.parameters())
    assert isinstance(built.model.layers[2].mlp.down_proj, qlora.Linear4bit)
    assert built.lm_head.weight is built.model.embed_tokens.weight          # ties survive
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(built(ids).logits, eager(ids).logits)
    for a, b in zip(built.state_dict().items(), eager.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_streamed_build_random_init_and_fast_quantiser():
    cfg = models.tiny_llama(num_hidden_layers=2).config
    built = qlora.build_quantized(cfg, "cpu", progress=False, dtype=torch.float32,
                                  quantize=lambda layer: kernels.quantize_model_fast(layer, r=4, alpha=8))
    lin = built.model.layers[1].self_attn.q_proj
    assert isinstance(lin, kernels.FastQLoRALinear)
    w = quant.dequantize_4bit(lin.packed, _state_of(lin), torch.float32)
    assert 0.01 < float(w.std()) < 0.03                                       # N(0, 0.02) init, not garbage
    torch.testing.assert_close(built.model.norm.weight, torch.ones(64))
    out = built(torch.randint(0, 256, (1, 8))).logits
    assert out.isfinite().all()
    assert [n for n, p in built.named_parameters() if p.requires_grad] and \
        all("lora_" in n for n, p in built.named_parameters() if p.requires_grad)


def _state_of(fast):
    lay = fast.lay
    s2 = quant.QuantState(absmax=lay.absmax2, shape=(lay.absmax.numel(),), dtype=torch.float32,
                          blocksize=lay.blocksize2, quant_type="dynamic8", code=lay.code2)
    return quant.QuantState(absmax=lay.absmax, shape=lay.shape, dtype=lay.dtype, blocksize=lay.blocksize,
                            quant_type="nf4", code=lay.code, offset=lay.offset, state2=s2)


def test_missing_and_misshapen_checkpoint_tensors_are_clear_errors(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file
    ref, _ = tiny_checkpoint
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match="up_proj"):
        qlora.build_quantized(ref.config, weights=models.SafetensorsWeights(tmp_path / "missing.safetensors"),
                              dtype=torch.float32, progress=False)
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        qlora.build_quantized(ref.config, weights=models.SafetensorsWeights(tmp_path / "shape.safetensors"),
                              dtype=torch.float32, progress=False)
    with pytest.raises(FileNotFoundError):
        models.SafetensorsWeights(tmp_path / "nowhere")


def test_quantize_model_frees_each_replaced_linear_before_the_next():
    """Issue 15: quantize_model kept every replaced nn.Linear alive until it returned (+1 layer of 16-bit
    weights per layer at the peak). Now each is unreachable once its Linear4bit is in place."""
    model = models.tiny_llama(num_hidden_layers=2)
    refs = [weakref.ref(m.weight) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"]
    alive_at = []
    orig = qlora.Linear4bit.from_linear.__func__

    def spy(cls, linear, *a, **k):
        gc.collect()
        alive_at.append(sum(r() is not None for r in refs))
        return orig(cls, linear, *a, **k)

    qlora.Linear4bit.from_linear = classmethod(spy)
    try:
        qlora.quantize_model(model)
    finally:
        qlora.Linear4bit.from_linear = classmethod(orig)
    n = len(refs)
    assert alive_at == list(range(n, 0, -1))          # one fewer dense weight alive before each new layer


@pytest.mark.slow
def test_smollm2_streamed_from_safetensors_equals_load_then_quantise():
    eager, tok = models.load_smollm2()
    qlora.quantize_model(eager)
    built, _ = models.load_smollm2_quantized()
    assert sum(isinstance(m, qlora.Linear4bit) for m in built.modules()) == 30 * 7
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(built(ids).logits, eager(ids).logits)


def test_build_memory_counts_what_the_streamed_build_holds():
    """memory.build_memory: parts checked by hand on Llama-2-70B (the H200 run in benchmarks/results/
    qlora_70b_llama-2-70b_h200.json holds the totals against max_memory_allocated)."""
    from lora_ref import memory as M
    s = M.get_shape("llama-2-70b")
    pb = M.param_breakdown(s)
    whole = M.build_memory(s, streamed=False)
    assert whole.dense_layers == 2 * pb.linear and whole.dense_rest == 2 * (pb.total - pb.linear)
    assert whole.total > 2 * pb.total > 137e9                       # the whole bf16 model: no 48 GB card
    st = M.build_memory(s, streamed=True)
    one_layer = 2 * sum(o * i for o, i in M.linear_shapes(s).values())
    assert st.dense_layers == one_layer == 2 * pb.linear // 80
    assert st.workspace == M.QUANT_WORKSPACE_BYTES_PER_VALUE * (1 << 24)
    assert st.adapters == 4 * M.lora_param_count(s, 16)
    assert 35e9 < st.total < 41e9 and "streamed" in str(st)
    with pytest.raises(ValueError):
        M.build_memory(s, method="lora")
