"""Cheap hyper-parameter sweeps: adapt only the top layers and compute the frozen bottom once.

A sweep over r, alpha or target modules trains many adapters on the same data. When the adapters sit in
the top ``K`` decoder layers only, everything below them is frozen and deterministic (SmolLM2 has no
dropout), so the hidden state entering layer ``L = n_layers - K`` is the same at every step. We compute it
once per example (:func:`cache_prefix`) and each training step runs only::

    cached h_L (T, d) ──► layers L .. n-1 (with LoRA) ──► final norm ──► lm_head on answer positions ──► CE

The loss is the same as the full model's (tests/test_sweep.py checks it to 1e-5 on a tiny Llama, and the
adapter gradients too), but a step costs K/n of the decoder stack, and the output head (49,152 x 576 for
SmolLM2, the single largest matrix) runs only at the ~25% of positions that carry loss.

Why the attention mask can be dropped: batches are right-padded, and causal attention never lets a real
token see a later position, so every real position gets exactly its unpadded result; padded positions
carry no loss (label -100).

Limits: exact only when nothing below ``L`` is trained and the model is in eval mode (no dropout). It is a
sweep tool: the adapters it trains are ordinary LoRA layers and can be saved and used in the full model.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._checks import as_int

from . import data as course_data


@dataclass
class PrefixCache:
    """Hidden states entering decoder layer ``first_layer``, one (T_i, d) tensor per example, plus labels."""
    first_layer: int
    hidden: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.hidden)


def _decoder(model):
    if not (hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head")):
        raise TypeError(f"expected a Llama-style causal LM (model.model.layers, lm_head), got {type(model).__name__}")
    return model.model


@torch.no_grad()
def cache_prefix(model, tokenizer, examples: Sequence, first_layer: int, batch_size: int = 16,
                 progress: bool = False) -> PrefixCache:
    """Run the frozen layers ``0 .. first_layer-1`` once over ``examples`` and keep their output."""
    dec = _decoder(model)
    n = len(dec.layers)
    if as_int(first_layer) is None or not 0 <= first_layer < n:
        raise ValueError(f"first_layer={first_layer!r} must be an integer in [0, {n - 1}]")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [course_data.encode_example(tokenizer, ex) for ex in examples]
    hidden, labels = [], []
    for i in tqdm(range(0, len(encoded), batch_size), desc="caching frozen layers", disable=not progress, leave=False):
        chunk = encoded[i:i + batch_size]
        batch = course_data.collate(chunk, tokenizer.pad_token_id)
        out = dec(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  output_hidden_states=True)
        h = out.hidden_states[first_layer]           # index 0 = embeddings, index L = input of layer L
        for j, e in enumerate(chunk):
            T = len(e["input_ids"])
            hidden.append(h[j, :T].detach().clone())
            labels.append(e["labels"].to(device))
    model.train(was_training)
    return PrefixCache(first_layer, hidden, labels)


def top_loss(model, first_layer: int, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100, from layer ``first_layer`` up.

    hidden: (B, T, d) states entering ``first_layer`` (right-padded); labels: (B, T) aligned with the
    inputs (as for Hugging Face models: position t is predicted from positions < t).
    """
    dec = _decoder(model)
    B, T, _ = hidden.shape
    position_ids = torch.arange(T, device=hidden.device).unsqueeze(0).expand(B, T)
    pos_emb = dec.rotary_emb(hidden, position_ids=position_ids)
    h = hidden
    for layer in dec.layers[first_layer:]:
        h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos_emb)
    h = dec.norm(h)
    targets = labels[:, 1:]
    keep = targets != course_data.IGNORE_INDEX             # (B, T-1): positions that predict an answer token
    logits = model.lm_head(h[:, :-1][keep])                # only where the loss is: (N, vocab)
    return F.cross_entropy(logits.float(), targets[keep])


def _pad(tensors: list[torch.Tensor], value) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


def _batch(cache: PrefixCache, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return (_pad([cache.hidden[i] for i in idx], 0.0),
            _pad([cache.labels[i] for i in idx], course_data.IGNORE_INDEX))


@dataclass
class SweepRun:
    losses: list[float] = field(default_factory=list)
    eval_loss: float = float("nan")
    eval_token_accuracy: float = float("nan")
    eval_points: list[tuple[int, float]] = field(default_factory=list)     # (step, eval loss) every eval_every
    seconds: float = 0.0


@torch.no_grad()
def evaluate_top(model, cache: PrefixCache, batch_size: int = 16) -> tuple[float, float]:
    """(token-weighted answer loss, teacher-forced answer-token accuracy) over the cached examples."""
    dec = _decoder(model)
    was_training = model.training
    model.eval()
    total = correct = count = 0.0
    for i in range(0, len(cache), batch_size):
        hidden, labels = _batch(cache, range(i, min(i + batch_size, len(cache))))
        B, T, _ = hidden.shape
        position_ids = torch.arange(T, device=hidden.device).unsqueeze(0).expand(B, T)
        pos_emb = dec.rotary_emb(hidden, position_ids=position_ids)
        h = hidden
        for layer in dec.layers[cache.first_layer:]:
            h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos_emb)
        targets = labels[:, 1:]
        keep = targets != course_data.IGNORE_INDEX
        logits = model.lm_head(dec.norm(h)[:, :-1][keep]).float()
        total += F.cross_entropy(logits, targets[keep], reduction="sum").item()
        correct += (logits.argmax(-1) == targets[keep]).sum().item()
        count += keep.sum().item()
    model.train(was_training)
    return total / max(count, 1), correct / max(count, 1)


def train_top(model, cache: PrefixCache, eval_cache: PrefixCache | None = None, *, steps: int, lr: float,
              batch_size: int = 8, seed: int = 0, max_grad_norm: float = 1.0, progress: bool = False,
              desc: str = "training", eval_every: int | None = None) -> SweepRun:
    """AdamW on the trainable parameters (which must all sit at or above ``cache.first_layer``)."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps={steps} must be >= 1 and lr={lr} > 0")
    dec = _decoder(model)
    below = [n for n, p in dec.layers[:cache.first_layer].named_parameters() if p.requires_grad]
    below += [n for n, p in dec.embed_tokens.named_parameters() if p.requires_grad]
    if below:
        raise ValueError(f"parameters below layer {cache.first_layer} are trainable ({below[:2]}...): "
                         "the cached hidden states would be stale")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: inject LoRA first")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    run = SweepRun()
    model.eval()                                           # no dropout anywhere: the cache stays exact
    order: list[int] = []
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if len(order) < batch_size:
            fresh = list(range(len(cache)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        loss = top_loss(model, cache.first_layer, *_batch(cache, idx))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(loss.item())
        if eval_cache is not None and eval_every and (step + 1) % eval_every == 0:
            run.eval_points.append((step + 1, evaluate_top(model, eval_cache)[0]))
    run.seconds = time.perf_counter() - start
    if eval_cache is not None:
        run.eval_loss, run.eval_token_accuracy = evaluate_top(model, eval_cache)
    return run
