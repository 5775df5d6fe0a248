r"""The rest of the PEFT family: prompt tuning, P-tuning and prefix tuning, on a frozen causal LM.

All three keep every weight of the model frozen and learn a few *virtual tokens*; they differ in where
the virtual tokens enter and how they are parameterised::

    prompt tuning  (Lester et al. 2021, arXiv 2104.08691)     input layer only
        embeds = [ P ; E(x) ],          P in R^(n x d) trained directly              params: n d
    P-tuning       (Liu et al. 2021, arXiv 2103.10385)         input layer only
        embeds = [ f(P') ; E(x) ],      f = prompt encoder (bi-LSTM + MLP, or MLP)    params: n d + |f|
        (f couples the virtual tokens and eases optimisation; after training f(P') is cached and the
        model is served exactly like prompt tuning)
    prefix tuning  (Li & Liang 2021, arXiv 2101.00190)         every layer's attention
        keys_l = [ K_l ; W_k h ],  values_l = [ V_l ; W_v h ],  K_l, V_l in R^(n x d_kv) per layer l
        [K ; V] = MLP(P'),  MLP = Linear(d', h) -> tanh -> Linear(h, 2 L d_kv)   (Section 4.3: the
        reparameterisation stabilises training; after training only the prefix is kept)
                                                                params kept: 2 L n d_kv

(d: hidden size; d_kv = kv_heads * head_dim, smaller than d under grouped-query attention; L: layers;
n: virtual tokens.) LoRA, by contrast, changes the weights themselves and can be merged away; these
methods always cost n extra positions of attention at inference.

Prefix tuning hands the learned keys/values to transformers as an already-filled ``DynamicCache``
(``cache=`` since transformers 5.2x, ``past_key_values=`` before: :func:`_cache_kwarg`), exactly where a KV cache of n earlier tokens would sit; the real tokens
keep positions 0..t-1 (explicit ``position_ids``), so a prefix the attention ignores gives back the base model.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import as_int, check_int

METHODS = ("prompt", "p-tuning", "prefix")


@dataclass
class SoftPromptOutput:
    """``logits`` (b, t, vocab) for the real tokens only; ``loss`` when labels were given."""
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    loss = mean_{t: labels[t+1] != -100} -log softmax(logits[t])[labels[t+1]];  logits (b, t, V), labels (b, t).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, time)")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real (mask = 1) tokens of each row; left padding gets position 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _FrozenLMWrapper(nn.Module):
    """Shared plumbing: freeze the model, count and export only the new parameters, greedy generation."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        num_virtual_tokens = check_int("num_virtual_tokens", num_virtual_tokens, minimum=1)
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What would be saved: the trainable tensors only (the frozen model is never part of it)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def adapter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.adapter_state_dict().values())

    def _dtype(self) -> torch.dtype:
        return self.base_model.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 do_sample: bool = False) -> torch.Tensor:
        """Greedy decoding with the same call and return convention as Hugging Face ``generate``
        (returns prompt + new tokens, so :func:`lora_ref.training.generate_answers` works unchanged).
        Recomputes the whole sequence each step: simple and exact; O(T^2) is fine at course scale.
        Rows that finished (EOS) are filled with ``pad_token_id`` (default: EOS)."""
        if do_sample:
            raise ValueError("do_sample=True is not supported: greedy decoding only")
        if eos_token_id is None:
            eos_token_id = getattr(self.base_model.generation_config, "eos_token_id", None)
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0]
        fill = eos_token_id if pad_token_id is None else pad_token_id
        ids = input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = self(ids, attention_mask=mask).logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return ids


# --------------------------------------------------------------------------------------------------
# prompt tuning and P-tuning: virtual tokens at the input
# --------------------------------------------------------------------------------------------------

def prepend_virtual_tokens(prompt: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor | None = None):
    """[P ; E(x)]: prompt (n, d), inputs_embeds (b, t, d), attention_mask (b, t), labels (b, t) ->
    embeds (b, n+t, d), mask (b, n+t) with ones for the virtual tokens, labels (b, n+t) with -100 there."""
    if prompt.dim() != 2 or prompt.shape[1] != inputs_embeds.shape[-1]:
        raise ValueError(f"prompt {tuple(prompt.shape)} must be (n, {inputs_embeds.shape[-1]})")
    b, n = inputs_embeds.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(b, -1, -1), inputs_embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
    if labels is None:
        return embeds, mask, None
    return embeds, mask, torch.cat([labels.new_full((b, n), -100), labels], dim=1)


class PromptTuning(_FrozenLMWrapper):
    r"""Prompt tuning (Lester et al. 2021): n trainable input embeddings P (n, d) before every input.

    ``init_token_ids``: initialise P from the embeddings of these vocabulary tokens (the paper's
    "sampled vocab"/"class label" init, Section 3.2, which beats random init at small scale); otherwise
    P ~ N(0, std of the embedding table). Trainable parameters: n * d.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 8, init_token_ids: torch.Tensor | None = None):
        super().__init__(model, num_virtual_tokens)
        emb = model.get_input_embeddings().weight
        if init_token_ids is not None:
            init_token_ids = torch.as_tensor(init_token_ids).flatten()
            if init_token_ids.numel() < num_virtual_tokens:       # repeat the text to fill n tokens
                reps = -(-num_virtual_tokens // init_token_ids.numel())
                init_token_ids = init_token_ids.repeat(reps)
            init = emb[init_token_ids[:num_virtual_tokens].to(emb.device)].detach().float().clone()
        else:
            init = torch.randn(num_virtual_tokens, emb.shape[1], device=emb.device) * emb.detach().float().std()
        self.prompt_embeddings = nn.Parameter(init)           # (n, d), fp32 master copy

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SoftPromptOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.base_model.get_input_embeddings()(input_ids)                  # (b, t, d)
        embeds, mask, _ = prepend_virtual_tokens(self.prompt(), embeds, attention_mask)
        logits = self.base_model(inputs_embeds=embeds, attention_mask=mask,
                                 position_ids=_positions(mask), use_cache=False).logits
        logits = logits[:, self.num_virtual_tokens:]                                 # real tokens only
        return SoftPromptOutput(logits, None if labels is None else causal_lm_loss(logits, labels))


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder f: trainable P' (n, d) -> (n, d).

    ``"lstm"``: bidirectional 2-layer LSTM (hidden h per direction) then Linear(2h, 2h) - ReLU - Linear(2h, d)
    (Liu et al. 2021, Section 3.2: the LSTM makes the virtual tokens depend on each other).
    ``"mlp"``: Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d) (PEFT's default encoder).
    """

    def __init__(self, num_virtual_tokens: int, dim: int, hidden: int = 64, kind: str = "lstm"):
        super().__init__()
        if kind not in ("lstm", "mlp"):
            raise ValueError(f"encoder kind={kind!r} must be 'lstm' or 'mlp'")
        self.kind = kind
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, dim) * 0.02)
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        h = self.embedding
        if self.kind == "lstm":
            h = self.lstm(h.unsqueeze(0))[0].squeeze(0)        # (n, 2h)
        return self.head(h)                                    # (n, d)


class PTuning(PromptTuning):
    """P-tuning (v1): like prompt tuning, but the virtual tokens come out of a trainable prompt encoder.

    Trains n*d + |encoder| parameters; serves n*d (cache ``prompt()`` once with :meth:`freeze_prompt`).
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 8, encoder_hidden: int = 64,
                 encoder: str = "lstm"):
        _FrozenLMWrapper.__init__(self, model, num_virtual_tokens)
        dev = model.get_input_embeddings().weight.device
        self.encoder = PromptEncoder(num_virtual_tokens, self.hidden_size, encoder_hidden, encoder).to(dev)
        self.frozen_prompt: torch.Tensor | None = None

    def prompt(self) -> torch.Tensor:
        return self.encoder() if self.frozen_prompt is None else self.frozen_prompt

    def freeze_prompt(self) -> torch.Tensor:
        """Run the encoder once and serve its output (what P-tuning deploys: n x d numbers)."""
        with torch.no_grad():
            self.frozen_prompt = self.encoder().detach()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        return self.frozen_prompt


# --------------------------------------------------------------------------------------------------
# prefix tuning: virtual keys and values in every layer
# --------------------------------------------------------------------------------------------------

def prefix_to_key_values(prefix: torch.Tensor, batch: int, num_layers: int, num_kv_heads: int,
                         head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(n, 2 L H hd) -> L pairs (key, value), each (batch, H, n, hd): the layout of a KV cache.

    Column order of ``prefix``: layer-major, then key/value, then head, then head_dim (PEFT's order).
    """
    n = prefix.shape[0]
    if prefix.dim() != 2 or prefix.shape[1] != 2 * num_layers * num_kv_heads * head_dim:
        raise ValueError(f"prefix {tuple(prefix.shape)} must be (n, 2*L*H*hd) = (n, "
                         f"{2 * num_layers * num_kv_heads * head_dim})")
    kv = prefix.view(n, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)   # (L, 2, H, n, hd)
    kv = kv.unsqueeze(2).expand(num_layers, 2, batch, num_kv_heads, n, head_dim)       # (L, 2, b, H, n, hd)
    return [(kv[l, 0], kv[l, 1]) for l in range(num_layers)]


@lru_cache(maxsize=None)
def _cache_kwarg(forward_cls: type) -> str:
    """The keyword a transformers causal LM takes its KV cache by: ``cache`` in recent 5.x releases,
    ``past_key_values`` before. Passing the wrong one is silently swallowed by ``**kwargs`` and the prefix
    would be ignored (no gradient reaches it), so we ask the signature and fail loudly if neither is there."""
    params = inspect.signature(forward_cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{forward_cls.__name__}.forward takes neither `cache` nor `past_key_values`: "
                    "prefix tuning needs a transformers causal LM that accepts a KV cache")


class PrefixTuning(_FrozenLMWrapper):
    r"""Prefix tuning (Li & Liang 2021): n learned key/value vectors prepended in every attention layer.

    With ``reparam_hidden`` (default, Section 4.3): prefix = W2 tanh(W1 P' + b1) + b2, P' (n, d), W1 (h, d),
    W2 (2 L d_kv, h); without it the prefix (n, 2 L d_kv) is trained directly. Either way the model sees
    keys/values (b, H, n, hd) per layer through a pre-filled DynamicCache; the attention mask gains n ones.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 8, reparam_hidden: int | None = 64):
        super().__init__(model, num_virtual_tokens)
        dev = model.get_input_embeddings().weight.device
        self.kv_width = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        if reparam_hidden is None:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, self.kv_width, device=dev) * 0.02)
            self.embedding, self.mlp = None, None
        else:
            if as_int(reparam_hidden) is None or reparam_hidden < 1:
                raise ValueError(f"reparam_hidden={reparam_hidden!r} must be a positive integer or None")
            self.prefix = None
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, self.hidden_size, device=dev) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(self.hidden_size, reparam_hidden), nn.Tanh(),
                                     nn.Linear(reparam_hidden, self.kv_width)).to(dev)

    def prefix_matrix(self) -> torch.Tensor:
        """(n, 2 L H hd): through the MLP while training, the stored tensor after :meth:`drop_reparameterization`."""
        return self.prefix if self.mlp is None else self.mlp(self.embedding)

    def drop_reparameterization(self) -> None:
        """Keep only MLP(P') as a plain parameter (what Li & Liang store after training); outputs unchanged."""
        if self.mlp is None:
            return
        with torch.no_grad():
            self.prefix = nn.Parameter(self.mlp(self.embedding).detach().clone())
        self.embedding, self.mlp = None, None

    def cache(self, batch: int):
        from transformers import DynamicCache

        kv = prefix_to_key_values(self.prefix_matrix().to(self._dtype()), batch, self.num_layers,
                                  self.num_kv_heads, self.head_dim)
        return DynamicCache(ddp_cache_data=kv)     # fresh every call: the model appends to it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None) -> SoftPromptOutput:
        """``prefix_mask`` (b, n), default ones: set zeros to hide the prefix (then the output is the base
        model's, which is how the tests prove the prefix acts only through attention)."""
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prefix_mask is None:
            prefix_mask = attention_mask.new_ones(b, self.num_virtual_tokens)
        mask = torch.cat([prefix_mask, attention_mask], dim=1)                     # (b, n + t)
        kv = {_cache_kwarg(type(self.base_model)): self.cache(b)}
        logits = self.base_model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(attention_mask),
                                 use_cache=True, **kv).logits
        return SoftPromptOutput(logits, None if labels is None else causal_lm_loss(logits, labels))


# --------------------------------------------------------------------------------------------------
# parameter counts, from the formulas (tests hold them against the modules)
# --------------------------------------------------------------------------------------------------

def prompt_tuning_params(n: int, d: int) -> int:
    """n * d."""
    return n * d


def p_tuning_params(n: int, d: int, hidden: int, encoder: str = "lstm") -> int:
    """n d + encoder. LSTM (2 layers, bidirectional, hidden h): per direction 4h(in + h) + 8h weights+biases,
    layer 1 in = d, layer 2 in = 2h; head 2h*2h + 2h + 2h*d + d. MLP: d h + h + h h + h + h d + d."""
    h = hidden
    if encoder == "mlp":
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    if encoder != "lstm":
        raise ValueError(f"encoder={encoder!r} must be 'lstm' or 'mlp'")
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def prefix_tuning_params(n: int, num_layers: int, kv_dim: int, d: int | None = None,
                         reparam_hidden: int | None = None) -> tuple[int, int]:
    """(trained, kept): kept = n * 2 L d_kv; trained adds the reparameterisation
    n d + (d h + h) + (h * 2 L d_kv + 2 L d_kv) when ``reparam_hidden`` is set."""
    width = 2 * num_layers * kv_dim
    kept = n * width
    if reparam_hidden is None:
        return kept, kept
    if d is None:
        raise ValueError("d (hidden size) is needed to count the reparameterisation")
    h = reparam_hidden
    return n * d + d * h + h + h * width + width, kept


def token_weighted_perplexity(batch_losses: list[float], batch_tokens: list[int]) -> float:
    """exp( sum_b loss_b n_b / sum_b n_b ): the perplexity of the whole evaluation set.

    ``batch_losses``: mean token loss of each batch; ``batch_tokens``: tokens that carried loss in it.
    The seed article returns mean_b exp(loss_b) instead. By Jensen's inequality (exp is convex)
    mean_b exp(loss_b) >= exp(mean_b loss_b), and exp(mean_b loss_b) is this perplexity only when every
    batch holds the same number of loss tokens: then the article's figure is always >= the true one. With
    unequal batches it can fall on either side: 1,000 tokens at loss 3.0 and 1 token at loss 0.0 give
    (e^3 + e^0) / 2 = 10.5 against the true exp(3000 / 1001) = 20.0. Either way it depends on how the data
    is batched, and it is a perplexity, not a task score: lower is better and it says nothing about whether
    the answers are right (that is what fact accuracy measures).
    """
    if len(batch_losses) != len(batch_tokens) or not batch_losses:
        raise ValueError(f"need one token count per batch loss: {len(batch_losses)} losses, "
                         f"{len(batch_tokens)} counts")
    if any(n < 0 for n in batch_tokens) or sum(batch_tokens) == 0:
        raise ValueError(f"token counts {batch_tokens} must be >= 0 with a positive total")
    total = sum(float(l) * n for l, n in zip(batch_losses, batch_tokens))
    return math.exp(total / sum(batch_tokens))


def build(method: str, model: nn.Module, num_virtual_tokens: int = 8, **kw) -> _FrozenLMWrapper:
    """'prompt' | 'p-tuning' | 'prefix' -> the wrapper around ``model`` (frozen in place)."""
    if method == "prompt":
        return PromptTuning(model, num_virtual_tokens, **kw)
    if method == "p-tuning":
        return PTuning(model, num_virtual_tokens, **kw)
    if method == "prefix":
        return PrefixTuning(model, num_virtual_tokens, **kw)
    raise ValueError(f"method={method!r} must be one of {METHODS}")


# --------------------------------------------------------------------------------------------------
# one controlled experiment: same data, steps, seed and evaluation; only the method changes
# --------------------------------------------------------------------------------------------------

#: learning rates that work for each method at course scale (soft prompts need far larger steps than
#: weights: Lester et al. use 0.3 with Adafactor; full fine-tuning the smallest)
DEFAULT_LR = {"prompt": 3e-2, "p-tuning": 1e-2, "prefix": 1e-2, "lora": 2e-3, "lora-qv": 2e-3,
              "qlora": 2e-3, "full": 1e-4}
COMPARED = ("prompt", "p-tuning", "prefix", "lora-qv", "lora", "qlora", "full")


@dataclass
class MethodResult:
    """One row of the comparison. Losses are token-weighted means over answer tokens."""
    method: str
    trainable: int
    total: int
    train_loss: float
    eval_loss: float
    token_accuracy: float            # held-out: share of answer tokens predicted exactly (teacher forcing)
    seconds: float
    memory_bytes: int                # CUDA peak when measured on a GPU, else the estimate below
    memory_measured: bool
    adapter_bytes: int               # what has to be stored/shipped per task
    fact_accuracy: float | None = None
    losses: list = None
    model: nn.Module | None = None   # the trained model, for the methods named in ``keep``

    @property
    def gap(self) -> float:
        """Generalisation gap: held-out loss minus training loss (larger = more over-fitting)."""
        return self.eval_loss - self.train_loss


@torch.no_grad()
def answer_token_accuracy(model, tokenizer, examples, batch_size: int = 16) -> float:
    """Share of answer tokens whose greedy next-token prediction is right, given the true prefix."""
    from . import data as course_data

    device = next(model.parameters()).device
    right = total = 0
    encoded = [course_data.encode_example(tokenizer, ex) for ex in examples]
    for i in range(0, len(encoded), batch_size):
        b = course_data.collate(encoded[i:i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        pred, labels = logits[:, :-1].argmax(-1).cpu(), b["labels"][:, 1:]
        keep = labels != -100
        right += int((pred[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return right / max(total, 1)


def _estimated_training_bytes(model: nn.Module) -> int:
    """Weights (stored bytes, 4-bit ones included) + gradients + AdamW's two moments of the trainable ones."""
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 3 * trainable


def prepare_method(method: str, base: nn.Module, r: int = 8, num_virtual_tokens: int = 16):
    """Turn a fresh base model into the thing to train; returns (model, adapter_bytes_fn).
    Full, LoRA and QLoRA are :func:`lora_ref.methods.prepare_model`'s; soft prompts wrap the model."""
    from .lora import LoRAConfig, lora_layers
    from .methods import prepare_model

    def lora_bytes(m):
        return sum(l.lora_A.numel() * l.lora_A.element_size() + l.lora_B.numel() * l.lora_B.element_size()
                   for l in lora_layers(m).values())

    if method in ("prompt", "p-tuning", "prefix"):
        kw = {"reparam_hidden": 64} if method == "prefix" else {}
        wrapped = build(method, base, num_virtual_tokens, **kw)

        def soft_bytes(m):
            if isinstance(m, PrefixTuning):          # shipped: the prefix alone, the MLP is dropped
                return num_virtual_tokens * m.kv_width * 4
            return num_virtual_tokens * m.hidden_size * 4     # prompt / P-tuning's cached prompt
        return wrapped, soft_bytes
    if method in ("lora", "lora-qv", "qlora"):
        targets = ("q_proj", "v_proj") if method == "lora-qv" else "all-linear"
        config = LoRAConfig(r=r, alpha=2 * r, target_modules=targets)
        return prepare_model(base, "qlora" if method == "qlora" else "lora", config), lora_bytes
    if method == "full":
        return prepare_model(base, "full"), lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    raise ValueError(f"method={method!r} must be one of {COMPARED}")


def compare_methods(base_factory, tokenizer, train_examples, eval_examples, methods=COMPARED, *,
                    steps: int = 100, batch_size: int = 8, lr: dict | None = None, seed: int = 0, r: int = 8,
                    num_virtual_tokens: int = 16, fact_examples: int = 0, progress: bool = True,
                    keep: tuple[str, ...] = ()) -> list[MethodResult]:
    """Train every method from the same fresh base (``base_factory()``) on the same batches (same seed) for
    the same number of steps, then evaluate all of them the same way. Only the method changes.

    Metrics: final training loss (mean of the last 10 steps), held-out loss, their gap, held-out
    answer-token accuracy, optional fact accuracy by generation on ``fact_examples`` held-out questions,
    trainable parameters, wall time, memory (CUDA peak, or an estimate on CPU) and adapter bytes.
    The trained models of the methods in ``keep`` are returned in ``MethodResult.model``; the others are freed.
    """
    from tqdm.auto import tqdm

    from .training import evaluate_loss, fact_accuracy, train

    lrs = {**DEFAULT_LR, **(lr or {})}
    unknown = [m for m in methods if m not in COMPARED]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {COMPARED}")
    results = []
    for method in tqdm(methods, desc="methods", disable=not progress):
        torch.manual_seed(seed)
        model, adapter_bytes = prepare_method(method, base_factory(), r, num_virtual_tokens)
        device = next(model.parameters()).device
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        res = train(model, tokenizer, train_examples, steps=steps, lr=lrs[method], batch_size=batch_size,
                    seed=seed, progress=False)
        model.eval()
        eval_loss = evaluate_loss(model, tokenizer, eval_examples)
        stride = max(1, len(train_examples) // max(1, len(eval_examples)))   # an even sample of all facts
        train_loss = evaluate_loss(model, tokenizer, list(train_examples)[::stride][: len(eval_examples)])
        acc = answer_token_accuracy(model, tokenizer, eval_examples)
        facts = fact_accuracy(model, tokenizer, eval_examples[:fact_examples]) if fact_examples else None
        measured = res.peak_memory_bytes is not None
        results.append(MethodResult(method, trainable, total, train_loss, eval_loss, acc, res.seconds,
                                    res.peak_memory_bytes if measured else _estimated_training_bytes(model),
                                    measured, adapter_bytes(model), facts, res.losses,
                                    model if method in keep else None))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
