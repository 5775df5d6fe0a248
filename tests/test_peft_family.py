"""lora_ref.peft_family on the tiny Llama: only the new parameters learn, the base never changes, the
prefix really acts through attention, parameter counts match their formulas, and training lowers the loss."""
from __future__ import annotations

import pytest
import torch

from lora_ref.models import tiny_llama
from lora_ref.peft_family import (PrefixTuning, PromptTuning, PTuning, build, causal_lm_loss,
                                  p_tuning_params, prefix_to_key_values, prefix_tuning_params,
                                  prepend_virtual_tokens, prompt_tuning_params,
                                  token_weighted_perplexity)

VARIANTS = [("prompt", {}), ("p-tuning", {"encoder": "lstm"}), ("p-tuning", {"encoder": "mlp"}),
            ("prefix", {}), ("prefix", {"reparam_hidden": None})]


def batch(b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = -100                  # loss on the "answer" half only
    return ids, labels


@pytest.mark.parametrize("method,kw", VARIANTS)
def test_only_new_parameters_learn_and_base_is_unchanged(method, kw):
    base = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = build(method, base, num_virtual_tokens=4, **kw)
    new_params = set(map(id, wrapped.trainable_parameters()))
    assert new_params and all(not p.requires_grad for p in base.parameters())
    opt = torch.optim.AdamW(wrapped.trainable_parameters(), lr=3e-2)
    ids, labels = batch()
    losses = []
    for _ in range(12):
        loss = wrapped(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        for p in wrapped.parameters():
            if id(p) not in new_params:
                assert p.grad is None, "a frozen base parameter received a gradient"
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, "a new parameter got no gradient"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, f"{method} did not learn: {losses[0]:.3f} -> {losses[-1]:.3f}"
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed the frozen model"
    assert set(wrapped.adapter_state_dict()) == {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert not any(k.startswith("base_model.") for k in wrapped.adapter_state_dict())


def test_prompt_tuning_is_prepended_embeddings():
    base = tiny_llama(seed=0)
    pt = PromptTuning(base, num_virtual_tokens=3)
    ids, _ = batch(b=2, t=6)
    emb = base.get_input_embeddings()(ids)
    full = torch.cat([pt.prompt_embeddings.unsqueeze(0).expand(2, -1, -1), emb], dim=1)
    with torch.no_grad():
        want = base(inputs_embeds=full).logits[:, 3:]
        torch.testing.assert_close(pt(ids).logits, want, atol=1e-5, rtol=1e-5)
        assert (pt(ids).logits - base(ids).logits).abs().max() > 1e-3     # the prompt changes the output
    # init from text: the prompt starts as those tokens' embeddings, repeated to fill n
    pt2 = PromptTuning(tiny_llama(seed=0), num_virtual_tokens=5, init_token_ids=torch.tensor([7, 9]))
    w = pt2.base_model.get_input_embeddings().weight
    torch.testing.assert_close(pt2.prompt_embeddings, w[[7, 9, 7, 9, 7]])


def test_prepend_virtual_tokens_masks_and_labels():
    P = torch.randn(2, 4)
    e, m, l = prepend_virtual_tokens(P, torch.randn(3, 5, 4), torch.tensor([[0, 1, 1, 1, 1]] * 3),
                                     torch.arange(15).view(3, 5))
    assert e.shape == (3, 7, 4) and torch.equal(e[1, :2], P)
    assert m[0].tolist() == [1, 1, 0, 1, 1, 1, 1] and l[2, :2].tolist() == [-100, -100] and l[2, 2] == 10
    with pytest.raises(ValueError, match="must be"):
        prepend_virtual_tokens(torch.randn(2, 3), torch.randn(3, 5, 4), torch.ones(3, 5))


def test_prefix_really_changes_attention():
    base = tiny_llama(seed=0, attn_implementation="eager")
    pf = PrefixTuning(base, num_virtual_tokens=4, reparam_hidden=None)
    with torch.no_grad():
        pf.prefix.normal_(0, 1.0)
    ids, _ = batch(b=2, t=6)
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=torch.ones(2, 10, dtype=torch.long), cache=pf.cache(2),
                   position_ids=torch.arange(6).expand(2, -1), output_attentions=True)
        for layer, att in enumerate(out.attentions):            # (b, heads, t, n + t)
            assert att.shape[-1] == 4 + 6
            mass = att[..., :4].sum(-1)
            assert mass.min() > 1e-3, f"layer {layer}: a query ignores the prefix entirely"
        plain = base(input_ids=ids).logits
        assert (pf(ids).logits - plain).abs().max() > 1e-3
        # hide the prefix with the attention mask: exactly the base model (it acts only through attention)
        hidden = pf(ids, prefix_mask=torch.zeros(2, 4, dtype=torch.long)).logits
        torch.testing.assert_close(hidden, plain, atol=1e-5, rtol=1e-5)


def test_prefix_layout_matches_a_kv_cache():
    L, H, hd, n = 3, 2, 4, 5
    prefix = torch.arange(n * 2 * L * H * hd, dtype=torch.float32).view(n, -1)
    kv = prefix_to_key_values(prefix, batch=2, num_layers=L, num_kv_heads=H, head_dim=hd)
    assert len(kv) == L and kv[0][0].shape == (2, H, n, hd)
    # column = ((l * 2 + kv) * H + h) * hd + j
    l, which, h, j, i = 2, 1, 1, 3, 4
    assert kv[l][which][1, h, i, j] == prefix[i, ((l * 2 + which) * H + h) * hd + j]
    with pytest.raises(ValueError, match="2\\*L\\*H\\*hd"):
        prefix_to_key_values(prefix[:, :-1], 1, L, H, hd)


def test_drop_reparameterization_and_frozen_p_tuning_prompt_keep_outputs():
    ids, _ = batch()
    pf = PrefixTuning(tiny_llama(seed=0), num_virtual_tokens=3, reparam_hidden=16)
    with torch.no_grad():
        want = pf(ids).logits
        trained, kept = prefix_tuning_params(3, 2, 2 * 16, d=64, reparam_hidden=16)
        assert pf.num_trainable() == trained
        pf.drop_reparameterization()
        torch.testing.assert_close(pf(ids).logits, want)
        assert pf.num_trainable() == kept == 3 * 2 * 2 * 32
    pt = PTuning(tiny_llama(seed=0), num_virtual_tokens=3, encoder="lstm")
    with torch.no_grad():
        want = pt(ids).logits
        pt.freeze_prompt()
        torch.testing.assert_close(pt(ids).logits, want)
    assert pt.num_trainable() == 0


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_parameter_count_formulas(encoder):
    m = tiny_llama(seed=0)
    assert PromptTuning(m, 7).num_trainable() == prompt_tuning_params(7, 64)
    assert PTuning(tiny_llama(seed=0), 7, encoder_hidden=12, encoder=encoder).num_trainable() == \
        p_tuning_params(7, 64, 12, encoder)
    kv_dim = 2 * 16                                    # 2 kv heads x head_dim 16 (grouped-query attention)
    assert PrefixTuning(tiny_llama(seed=0), 7, reparam_hidden=None).num_trainable() == \
        prefix_tuning_params(7, 2, kv_dim)[0]
    with pytest.raises(ValueError):
        prefix_tuning_params(7, 2, kv_dim, reparam_hidden=8)


def test_token_weighted_perplexity_vs_the_articles_eval_score():
    import math
    losses, tokens = [1.0, 3.0], [30, 10]
    assert math.isclose(token_weighted_perplexity(losses, tokens), math.exp((30 + 30) / 40))
    article = sum(math.exp(l) for l in losses) / len(losses)          # the seed article's "eval score"
    assert article > token_weighted_perplexity(losses, tokens)
    with pytest.raises(ValueError, match="one token count per batch"):
        token_weighted_perplexity([1.0], [1, 2])


def test_generate_and_errors():
    pt = PromptTuning(tiny_llama(seed=0), 2)
    ids, _ = batch(b=2, t=4)
    pt.base_model.generation_config.eos_token_id = None
    out = pt.generate(ids, max_new_tokens=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids)      # HF convention: prompt + new tokens
    first = pt(ids).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 4], first)
    second = pt(out[:, :5]).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 5], second)
    # EOS: a row that emits it is filled with pad afterwards and decoding stops when all rows are done
    eos = int(first[0])
    out = pt.generate(ids, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    with pytest.raises(ValueError, match="num_virtual_tokens=0"):
        PromptTuning(tiny_llama(seed=0), 0)
    with pytest.raises(ValueError, match="method='lora'"):
        build("lora", tiny_llama(seed=0))
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_compare_methods_is_controlled_and_reports_every_metric():
    from lora_ref import data
    from lora_ref.peft_family import answer_token_accuracy, compare_methods

    tok = data.tiny_tokenizer()
    splits = data.load_dataset()
    res = compare_methods(lambda: tiny_llama(seed=0), tok, splits.train[:16], splits.heldout[:4],
                          methods=("prompt", "lora", "full"), steps=2, batch_size=4, progress=False,
                          keep=("lora",))
    by = {r.method: r for r in res}
    assert list(by) == ["prompt", "lora", "full"]
    assert by["prompt"].model is None and by["lora"].model is not None       # only what was asked is kept
    base = tiny_llama(seed=0)
    assert by["full"].trainable == by["full"].total == sum(p.numel() for p in base.parameters())
    assert by["prompt"].trainable == 16 * 64 and by["prompt"].adapter_bytes == 16 * 64 * 4
    assert by["lora"].adapter_bytes == 4 * by["lora"].trainable
    for r in res:
        assert len(r.losses) == 2 and 0 <= r.token_accuracy <= 1 and r.seconds > 0 and r.memory_bytes > 0
        assert abs(r.gap - (r.eval_loss - r.train_loss)) < 1e-12
    # full fine-tuning needs the most memory: gradients and two AdamW moments for every weight
    assert by["full"].memory_bytes > by["lora"].memory_bytes > by["prompt"].memory_bytes
    acc = answer_token_accuracy(base, tok, splits.heldout[:4])
    assert 0 <= acc < 0.2, "a random model cannot predict the answers"
    with pytest.raises(ValueError, match="unknown methods"):
        compare_methods(lambda: tiny_llama(seed=0), tok, splits.train[:4], splits.heldout[:2], methods=("dora",))


def test_cache_keyword_follows_the_transformers_signature():
    """transformers renamed past_key_values= to cache=; a wrong keyword would be swallowed by **kwargs
    and the prefix silently ignored (seen on transformers 5.17), so the keyword comes from the signature."""
    from lora_ref.peft_family import _cache_kwarg

    class Old:
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Neither:
        def forward(self, input_ids, **kwargs): ...

    assert _cache_kwarg(Old) == "past_key_values" and _cache_kwarg(New) == "cache"
    with pytest.raises(TypeError, match="neither"):
        _cache_kwarg(Neither)
