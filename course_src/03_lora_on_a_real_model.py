# %% [markdown]
# # 03 · LoRA on a real model: the Velora Cycles support bot
#
# In notebook 02 you built one LoRA layer. Now you put LoRA into a real language model,
# SmolLM2-135M-Instruct (30 decoder layers, 135 million parameters), and teach it facts it cannot know:
# the policies, prices and opening hours of **Velora Cycles**, an e-bike company invented for this course.
#
# **By the end of this notebook you will have**
# 1. built training examples whose loss sits on the **answer tokens only** (the seed article's trainer
#    puts it on the whole prompt) and batched them with right padding;
# 2. chosen which linear layers to adapt by name, and counted what each choice trains;
# 3. fine-tuned SmolLM2 with LoRA and with full fine-tuning **on the same data, for the same steps**, and
#    compared loss curves, held-out fact accuracy, time per step, training memory and checkpoint size;
# 4. saved the adapter in PEFT's format, loaded it back, and loaded it **with Hugging Face PEFT**, with
#    the same outputs.
#
# **How grading works.** Cells with `# YOUR CODE HERE` are yours (4 exercises, 10 points). The cell after
# each holds visible tests; at grading time hidden tests compare your function with `lora_ref`'s on random
# inputs. The demo cells use `lora_ref` itself, so they run even before you solve anything.
#
# **Time.** About 3 minutes on a 2-core CPU (most of it fine-tuning a 135M model for ten steps);
# much less on a GPU, which is used when present.
# %% locked id=setup
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_ref import data, training
from lora_ref.adapters import load_adapter, save_adapter
from lora_ref.lora import LoRAConfig, count_parameters, inject_lora, lora_layers
from lora_ref.methods import prepare_model
from lora_ref.models import load_smollm2, notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads
ON_GPU = DEVICE.type == "cuda"

# %% [markdown]
# ## 1. The data: facts the base model cannot know
#
# `lora_ref.data` builds the dataset from a fact table (`lora_ref/data_files/velora_facts.json`):
# 41 facts, each with key phrases, two answer wordings, five training questions and two **held-out**
# questions written differently. Training questions appear twice (plain, and inside a greeting such as
# "Hi! ..."); held-out questions use other wordings and other greetings, so a model that gets them right
# knows the fact rather than a sentence. A test in `tests/test_data.py` checks that no held-out question
# appears in training and that they share few word 3-grams.
#
# **Fact accuracy** = the share of held-out questions whose generated answer contains every key phrase of
# the fact (after normalising case, punctuation, currency signs and thousands separators:
# `data.is_correct`). It measures what we care about; the evaluation loss (mean cross-entropy on the
# reference answers) is a smoother signal for curves. The seed article reports `exp(loss)` averaged over
# batches and calls it an "eval score": that is a (mis-averaged) perplexity, not a task metric.
# %%
splits = data.load_dataset()
facts, meta = data.load_facts()
print(f"{meta['company']['name']} ({meta['company']['what']})")
print(f"{len(facts)} facts -> {splits}")
print("system prompt:", repr(data.SYSTEM_PROMPT))
fact = "return_window"
print(f"\nfact {fact!r}, key phrases {next(f.key_phrases for f in facts if f.id == fact)}")
for name, part in (("train", splits.train), ("held-out", splits.heldout)):
    for e in part:
        if e.fact_id == fact:
            print(f"  [{name:8s}] {e.question:70s} -> {e.answer}")

# %% [markdown]
# ### The loss goes on the answer only
#
# A chat example is one token sequence: system prompt, user question, assistant answer, each wrapped in
# SmolLM2's ChatML markers (`<|im_start|>role\n ... <|im_end|>\n`). A causal LM predicts every next
# token, but we only want to teach it to *answer*: predicting the system prompt (identical in every
# example) or the user's question is wasted capacity and dilutes the gradient. So the labels are
# `-100` (PyTorch's `ignore_index`) everywhere except the answer and its closing `<|im_end|>` (so the bot
# learns to stop). The seed article's trainer passes `labels=input_ids`: loss on everything.
#
# Hugging Face causal LMs shift labels themselves, so `labels[t] = input_ids[t]` means "position $t$
# is predicted from tokens $< t$":
#
# $$\mathcal{L} = -\frac{1}{|\mathcal{A}|}\sum_{t \in \mathcal{A}} \log p_\theta(x_t \mid x_{<t}),
#   \qquad \mathcal{A} = \{t : \text{labels}_t \neq -100\}.$$
#
# ## 2. Exercise 1: `answer_only_labels` (3 points)
#
# Given the token ids of the prompt (everything up to `<|im_start|>assistant\n`) and of the completion
# (the answer, the end-of-turn token, and whatever the template writes after it), return
# `{"input_ids": ..., "labels": ...}`, two 1-D `torch.long` tensors of the same length:
# * `input_ids` = prompt followed by completion;
# * `labels` = `-100` on the prompt; on the completion, the token itself up to and including the **last**
#   occurrence of `eos_id`, and `-100` after it; if `eos_id` is `None` or absent from the completion, every
#   completion token carries loss;
# * raise `ValueError` if the completion is empty.
#
# Example with `eos_id = 2`: prompt `[5, 6, 7]`, completion `[8, 9, 2, 4]` gives
# input_ids `[5, 6, 7, 8, 9, 2, 4]`, labels `[-100, -100, -100, 8, 9, 2, -100]`.
# %% answer id=answer_only_labels
IGNORE_INDEX = -100


def answer_only_labels(prompt_ids, completion_ids, eos_id):
    """input_ids = prompt + completion; labels = -100 except completion tokens up to the last eos_id."""
    ### BEGIN SOLUTION
    prompt_ids, completion_ids = [int(i) for i in prompt_ids], [int(i) for i in completion_ids]
    if not completion_ids:
        raise ValueError("the completion is empty: there is nothing to put the loss on")
    n_loss = len(completion_ids)
    if eos_id is not None and eos_id in completion_ids:
        n_loss = len(completion_ids) - completion_ids[::-1].index(eos_id)
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids[:n_loss]
              + [IGNORE_INDEX] * (len(completion_ids) - n_loss))
    return {"input_ids": torch.tensor(prompt_ids + completion_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}
    ### END SOLUTION

# %% test id=test_answer_only_labels points=3
out = answer_only_labels([5, 6, 7], [8, 9, 2, 4], eos_id=2)
assert out["input_ids"].tolist() == [5, 6, 7, 8, 9, 2, 4], f"input_ids is prompt + completion, got {out['input_ids'].tolist()}"
assert out["labels"].tolist() == [-100, -100, -100, 8, 9, 2, -100], (
    f"loss on 8, 9 and the eos 2, not on the prompt nor the trailing 4; got {out['labels'].tolist()}")
assert out["labels"].dtype == torch.long and out["input_ids"].dtype == torch.long, "use torch.long tensors"
assert answer_only_labels([1], [2, 3, 2, 4], eos_id=2)["labels"].tolist() == [-100, 2, 3, 2, -100], \
    "the LAST eos closes the loss"
assert answer_only_labels([1, 1], [3, 4], eos_id=2)["labels"].tolist() == [-100, -100, 3, 4], \
    "no eos in the completion: every completion token carries loss"
assert answer_only_labels([], [3], eos_id=None)["labels"].tolist() == [3], "eos_id=None: loss on the whole completion"
try:
    answer_only_labels([1, 2], [], eos_id=2)
except ValueError:
    pass
else:
    raise AssertionError("an empty completion should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("03.answer_only_labels", answer_only_labels)
### END HIDDEN TESTS

# %% [markdown]
# **Measured on the real tokenizer.** `data.encode_example` formats an example with
# `tokenizer.apply_chat_template`, tokenises prompt and completion separately (exactly what the model
# sees at generation time) and applies the same rule. Below, the tokens that carry loss are in
# `[brackets]`; then we count, over the whole training set, how many tokens carry loss with our labels and
# with the seed article's `labels=input_ids`.
# %%
model_base, tok = load_smollm2(device=DEVICE)          # cached safetensors copy of the GGUF: a few seconds
ex = splits.train[0]
enc = data.encode_example(tok, ex)
pieces = [(f"[{tok.decode([i])}]" if l != -100 else tok.decode([i])) for i, l in zip(enc["input_ids"].tolist(), enc["labels"].tolist())]
print("".join(pieces))
mine = seed = 0
for e in splits.train:
    enc_e = data.encode_example(tok, e)
    mine += int((enc_e["labels"] != -100).sum())
    seed += len(enc_e["input_ids"])
print(f"\ntokens carrying loss over {len(splits.train)} training examples: answer-only {mine:,} "
      f"vs seed's labels=input_ids {seed:,} ({mine / seed:.0%} of the tokens are what we want to teach)")
lengths = [len(data.encode_example(tok, e)["input_ids"]) for e in splits.train]
print(f"example length: {min(lengths)} to {max(lengths)} tokens, mean {np.mean(lengths):.0f}")

# %% [markdown]
# ## 3. Exercise 2: `collate` (2 points)
#
# A batch needs equal lengths. Write `collate(batch, pad_id)`: `batch` is a list of dicts with 1-D
# `input_ids` and `labels`; return a dict of three `(B, T)` `torch.long` tensors, `T` the longest length:
# * `input_ids`: each sequence on the left, then `pad_id` (**right padding**: positions stay
#   0, 1, 2, ... so training matches generation, which starts at position 0 too);
# * `attention_mask`: 1 on real tokens, 0 on padding;
# * `labels`: each sequence's labels, then `-100`: padding must never carry loss. (SmolLM2's pad token
#   *is* `<|im_end|>`, which carries loss at the end of every answer: only the label value tells them apart.)
#
# Raise `ValueError` for an empty batch.
# %% answer id=collate
def collate(batch, pad_id):
    """Right-pad input_ids (with pad_id) and labels (with -100); attention_mask 1 on real tokens."""
    ### BEGIN SOLUTION
    if not batch:
        raise ValueError("collate needs at least one example")
    T = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n] = torch.as_tensor(b["input_ids"])
        labels[i, :n] = torch.as_tensor(b["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ### END SOLUTION

# %% test id=test_collate points=2
b = collate([{"input_ids": torch.tensor([4, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
             {"input_ids": torch.tensor([7]), "labels": torch.tensor([7])}], pad_id=2)
assert b["input_ids"].tolist() == [[4, 5, 6], [7, 2, 2]], f"right padding with pad_id: got {b['input_ids'].tolist()}"
assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]], f"mask: 1 on tokens, 0 on padding; got {b['attention_mask'].tolist()}"
assert b["labels"].tolist() == [[-100, 5, 6], [7, -100, -100]], f"labels padded with -100; got {b['labels'].tolist()}"
assert all(v.dtype == torch.long for v in b.values()), "all three tensors are torch.long"
try:
    collate([], pad_id=0)
except ValueError:
    pass
else:
    raise AssertionError("an empty batch should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("03.collate", collate)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Which layers? Inspect the model's linear modules
#
# LoRA wraps `nn.Linear` layers chosen **by name**, like PEFT's `target_modules`. Before choosing, look at
# what the model has. SmolLM2 uses grouped-query attention: 9 query heads share 3 key/value heads, so
# `k_proj` and `v_proj` map 576 to only 192 features. `lm_head` is tied to the token embedding (the same
# tensor), and PEFT's `"all-linear"` never adapts it.
# %%
shapes = {}
for name, m in model_base.named_modules():
    if isinstance(m, nn.Linear):
        short = name.rsplit(".", 1)[-1]
        shapes.setdefault(short, [0, tuple(m.weight.shape)])[0] += 1
print(f"{'name':10s} {'count':>5s} {'weight (out, in)':>18s} {'params each':>12s}")
for short, (count, shape) in sorted(shapes.items()):
    print(f"{short:10s} {count:5d} {str(shape):>18s} {shape[0] * shape[1]:12,d}")
print("lm_head shares the embedding tensor:", model_base.lm_head.weight is model_base.model.embed_tokens.weight)

# %% [markdown]
# ## 5. Exercise 3: `select_targets` (3 points)
#
# Write `select_targets(model, target_modules)` returning the **sorted** list of full dotted names
# (`model.layers.0.self_attn.q_proj`, ...) of the `nn.Linear` modules to adapt:
# * `target_modules` is a tuple/list of short names: a linear module matches when the last component of
#   its name is one of them;
# * or the string `"all-linear"`: every `nn.Linear` except the output head `lm_head`;
# * if a requested short name matches no linear module, raise `ValueError` and **list the model's linear
#   module short names in the message** (the question PEFT users ask most: "Target modules {...} not
#   found in the base model").
# %% answer id=select_targets
def select_targets(model, target_modules):
    """Sorted full names of the nn.Linear modules of `model` that LoRA should wrap."""
    ### BEGIN SOLUTION
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    short = lambda n: n.rsplit(".", 1)[-1]                     # noqa: E731
    if target_modules == "all-linear":
        return sorted(n for n in linear if short(n) != "lm_head")
    wanted = set(target_modules)
    missing = sorted(wanted - {short(n) for n in linear})
    if missing:
        raise ValueError(f"target modules {missing} not found; linear modules: {sorted({short(n) for n in linear})}")
    return sorted(n for n in linear if short(n) in wanted)
    ### END SOLUTION

# %% test id=test_select_targets points=3
qv = select_targets(model_base, ("q_proj", "v_proj"))
assert len(qv) == 60, f"SmolLM2 has 30 layers, so 30 q_proj + 30 v_proj = 60; got {len(qv)}"
assert qv[0] == "model.layers.0.self_attn.q_proj" and qv == sorted(qv), f"full dotted names, sorted; got {qv[:2]}"
al = select_targets(model_base, "all-linear")
assert len(al) == 210 and not any(n.endswith("lm_head") for n in al), \
    f"all-linear: 7 projections x 30 layers = 210, without lm_head; got {len(al)}"
try:
    select_targets(model_base, ("q_proj", "query"))
except ValueError as err:
    assert "v_proj" in str(err), "the error message should list the model's linear module names"
else:
    raise AssertionError("a target that matches nothing ('query') should raise ValueError")
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("03.select_targets", select_targets)
### END HIDDEN TESTS

# %% [markdown]
# ## 6. Exercise 4: `lora_trainable_params` (2 points)
#
# A rank-$r$ adapter on a linear layer $W \in \mathbb{R}^{d_\text{out}\times d_\text{in}}$ trains
# $A \in \mathbb{R}^{r\times d_\text{in}}$ and $B \in \mathbb{R}^{d_\text{out}\times r}$:
# $r\,(d_\text{in} + d_\text{out})$ numbers. Write `lora_trainable_params(model, target_modules, r)`,
# the total over the layers `select_targets` picks (it raises the same `ValueError` for a bad target).
# %% answer id=lora_trainable_params
def lora_trainable_params(model, target_modules, r):
    """sum over selected layers of r * (in_features + out_features)."""
    ### BEGIN SOLUTION
    modules = dict(model.named_modules())
    return sum(r * (modules[n].in_features + modules[n].out_features) for n in select_targets(model, target_modules))
    ### END SOLUTION

# %% test id=test_lora_trainable_params points=2
n_qv = lora_trainable_params(model_base, ("q_proj", "v_proj"), 8)
assert n_qv == 30 * 8 * ((576 + 576) + (576 + 192)), f"q: 576->576, v: 576->192 (GQA), 30 layers, r=8; got {n_qv:,}"
assert lora_trainable_params(model_base, ("q_proj", "v_proj"), 16) == 2 * n_qv, "the count is linear in r"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("03.lora_trainable_params", lora_trainable_params)
### END HIDDEN TESTS

# %% [markdown]
# **Measured.** Your count against what `lora_ref.inject_lora` actually creates (counted by
# `count_parameters`, which counts the tied embedding once, as PEFT's `print_trainable_parameters` does),
# for the usual choices. Then the error a typo gives.
# %%
total = count_parameters(model_base).total
print(f"{'targets':28s} {'r':>3s} {'yours':>11s} {'inject_lora':>11s} {'% of model':>10s}")
for targets, r in [(("q_proj", "v_proj"), 8), (("q_proj", "k_proj", "v_proj", "o_proj"), 8),
                   ("all-linear", 8), ("all-linear", 16)]:
    injected = count_parameters(inject_lora(copy.deepcopy(model_base), LoRAConfig(r=r, alpha=2 * r, target_modules=targets)))
    try:
        yours = f"{lora_trainable_params(model_base, targets, r):,}"
    except NotImplementedError:
        yours = "(exercise 4)"
    print(f"{str(targets):28s} {r:3d} {yours:>11s} {injected.trainable:11,d} {100 * injected.ratio:9.2f}%")
print(f"full fine-tuning trains all {total:,} parameters")
try:
    inject_lora(copy.deepcopy(model_base), LoRAConfig(target_modules=("q_proj", "value")))
except ValueError as err:
    print("\nValueError:", err)

# %% [markdown]
# ## 7. Before training: what the base model answers
#
# The live experiment below trains on a **subset of the facts** so that it fits the CPU budget (the
# whole dataset on more steps is in section 11, precomputed). We ask the base model the held-out questions
# of those facts, with our system prompt.
# %%
rng = np.random.default_rng(0)
N_FACTS = len(facts) if ON_GPU else (3 if GRADING else 5)
subset = sorted(rng.choice([f.id for f in facts], size=N_FACTS, replace=False).tolist())
train_sub = [e for e in splits.train if e.fact_id in subset]
held_sub = [e for e in splits.heldout if e.fact_id in subset]
print(f"{N_FACTS} facts: {subset}\n{len(train_sub)} training examples, {len(held_sub)} held-out questions")


def report(model, examples, n_show=3, label=""):
    """Held-out fact accuracy and eval loss; prints a few answers with a tick or a cross."""
    acc, answers = training.fact_accuracy(model, tok, examples, max_new_tokens=24, return_answers=True)
    loss = training.evaluate_loss(model, tok, examples)
    for e, a in list(zip(examples, answers))[:n_show]:
        print(f"  {'✓' if data.is_correct(a, e) else '✗'} Q: {e.question}\n      A: {a[:110]}")
    print(f"{label}: fact accuracy {acc:.0%} ({round(acc * len(examples))}/{len(examples)}), eval loss {loss:.3f}")
    return {"fact_accuracy": acc, "eval_loss": loss, "answers": answers}


results = {"base": report(model_base, held_sub, label="base model")}

# %% [markdown]
# It answers fluently and wrongly: it invents prices and hours. Nothing in its pre-training mentions Velora
# Cycles (we made it up), so any fact it gets right after fine-tuning came from our data.
#
# ## 8. Fine-tune: LoRA against full fine-tuning, same data, same steps
#
# Both runs start from the same pretrained weights, see the same batches in the same order (same seed),
# for the same number of steps, with AdamW and gradient clipping (`lora_ref.training.train`). What differs
# is what is trained, and the learning rate each method needs: LoRA's $B$ starts at zero and its update is
# scaled by $\alpha/r$, so it takes a larger rate (here $10^{-3}$) than full fine-tuning, which moves every
# pretrained weight directly ($10^{-4}$).
#
# **LoRA**: `all-linear`, $r = 16$, $\alpha = 32$ (the QLoRA paper found all linear layers needed to
# match full fine-tuning; notebook 04 measures q,v against all-linear).
#
# **Memory.** On a GPU we read the peak allocated memory. On the CPU there is no such counter, so we add
# up the bytes of what training keeps beyond the frozen weights: gradients and AdamW's two moment tensors
# for every trainable parameter (activations come on top and are about the same for both methods).
# %%
STEPS = 150 if ON_GPU else (3 if GRADING else 10)
BATCH = 4 if GRADING else 8
LORA = LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def training_state_bytes(model, opt):
    """Bytes of gradients + optimizer state (what training keeps besides weights and activations)."""
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return grads + state


def run(method):
    model = copy.deepcopy(model_base)
    if method == "LoRA":                    # lora_ref.methods.prepare_model: the setup every comparison uses
        prepare_model(model, "lora", LORA)
        lr = 1e-3
    else:
        prepare_model(model, "full")
        lr = 1e-4
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    res = training.train(model, tok, train_sub, steps=STEPS, lr=lr, batch_size=BATCH, seed=0, optimizer=opt)
    # gradients were freed by zero_grad(set_to_none=True): count them as the parameters' size
    mem = res.peak_memory_bytes if ON_GPU else training_state_bytes(model, opt)
    return model, {"losses": res.losses, "seconds": res.seconds, "memory_bytes": mem,
                   "trainable": count_parameters(model).trainable, "lr": lr}


models, runs = {}, {}
for method in tqdm(["LoRA", "full fine-tuning"], desc=f"{STEPS} steps each"):
    models[method], runs[method] = run(method)
    results[method] = report(models[method], held_sub, label=method)

# %% [markdown]
# ### The comparison
# %%
with tempfile.TemporaryDirectory() as tmp:
    folder = save_adapter(models["LoRA"], Path(tmp) / "velora-lora", LORA)
    adapter_file_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
    adapter_files = sorted(p.name for p in Path(folder).iterdir())
full_bytes = sum(t.numel() * t.element_size() for t in models["full fine-tuning"].state_dict().values())
# one safetensors file per checkpoint; the tied lm_head is the embedding, stored once
full_bytes -= models["full fine-tuning"].lm_head.weight.numel() * 4
runs["LoRA"]["checkpoint_bytes"], runs["full fine-tuning"]["checkpoint_bytes"] = adapter_file_bytes, full_bytes
print(f"adapter files: {adapter_files}; adapter tensors {4 * runs['LoRA']['trainable']:,} bytes + header = "
      f"{adapter_file_bytes:,} bytes on disk")
print(f"\n{'':18s} {'trainable':>12s} {'s/step':>7s} {'grad+Adam MB' if not ON_GPU else 'peak MB':>12s} "
      f"{'checkpoint MB':>13s} {'fact acc':>8s} {'eval loss':>9s}")
print(f"{'base':18s} {'-':>12s} {'-':>7s} {'-':>12s} {'-':>13s} {results['base']['fact_accuracy']:8.0%} "
      f"{results['base']['eval_loss']:9.3f}")
for m, r in runs.items():
    print(f"{m:18s} {r['trainable']:12,d} {r['seconds'] / STEPS:7.2f} {r['memory_bytes'] / 1e6:12.1f} "
          f"{r['checkpoint_bytes'] / 1e6:13.2f} {results[m]['fact_accuracy']:8.0%} {results[m]['eval_loss']:9.3f}")
lo, fu = runs["LoRA"], runs["full fine-tuning"]
print(f"\nLoRA trains {lo['trainable'] / fu['trainable']:.1%} of the parameters: "
      f"{fu['memory_bytes'] / lo['memory_bytes']:.0f}x less {'gradient + AdamW state' if not ON_GPU else 'peak memory'}, "
      f"a {fu['checkpoint_bytes'] / lo['checkpoint_bytes']:.0f}x smaller checkpoint, "
      f"but a step only {fu['seconds'] / lo['seconds']:.2f}x faster")

# why: the FLOPs of one training step (lora_ref.memory.training_flops; Kaplan et al. 2020, Section 2.1)
from lora_ref.memory import training_flops

seq = int(np.mean(lengths))
fl_full = training_flops("smollm2-135m", 1, "full", seq=seq)
fl_lora = training_flops("smollm2-135m", 1, "lora", r=LORA.r, seq=seq)
print(f"FLOPs per token at {seq} tokens: full {fl_full.per_token / 1e6:.0f}M (forward {fl_full.forward / 1e6:.0f}M + "
      f"backward {fl_full.backward / 1e6:.0f}M), LoRA {fl_lora.per_token / 1e6:.0f}M (backward {fl_lora.backward / 1e6:.0f}M): "
      f"{fl_full.per_token / fl_lora.per_token:.2f}x fewer")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
for m, r in runs.items():
    axes[0].plot(r["losses"], label=f"{m} (lr {r['lr']:g})")
axes[0].set_xlabel("step"); axes[0].set_ylabel("training loss (answer tokens)"); axes[0].legend()
axes[0].set_title(f"{N_FACTS} facts, batch {BATCH}")
names = ["base", *runs]
axes[1].bar(names, [100 * results[n]["fact_accuracy"] for n in names], color=["grey", "C0", "C1"])
axes[1].set_ylabel("held-out fact accuracy (%)"); axes[1].set_ylim(0, 100)
axes[1].set_title(f"{len(held_sub)} held-out questions")
plt.tight_layout(); plt.show()

# %% [markdown]
# Read the table with the sizes in mind (the ratios are printed under it): LoRA trains a few percent of the
# parameters, so its gradients and optimizer state, and its checkpoint, shrink by that factor. The time per
# step shrinks far less: the forward and backward passes still go through every frozen weight (the
# gradient must flow through them to reach the adapters of earlier layers). Per token and per weight,
# training costs 2 FLOPs forward and 4 backward, of which 2 compute the gradient of the input and 2 the
# gradient of the weight; LoRA skips only the weight gradients of the frozen weights (half of the backward
# pass, a third of the step) and their optimizer update: the last printed line. LoRA's big wins are memory
# and storage, and they grow with the model. The seed article's "84 GB" for full fine-tuning of a 7B model
# is 12 bytes per parameter (notebook 00): 2 for the 16-bit weight and 10 for its 16-bit gradient and two
# fp32 Adam moments. LoRA keeps the 2 bytes of each frozen weight and drops the other 10 (mixed-precision
# Adam also keeps a 4-byte fp32 master copy, which LoRA drops too).
#
# ### Forgetting: the general-text loss before and after
#
# Does fine-tuning on Velora's answers damage what the model knew? A cheap probe: the language-model loss
# on general text unlike the training data (a few encyclopedia-style passages,
# `lora_ref/data_files/general_text.json`), for the base model and each fine-tuned model. A rise means the
# model moved away from its general knowledge.
# %%
general = json.loads((Path(data.__file__).parent / "data_files" / "general_text.json").read_text())["passages"]
general = general[:3] if GRADING else general


@torch.no_grad()
def general_loss(model) -> float:
    """Token-weighted next-token cross-entropy on the general passages (plain text, no chat template)."""
    model.eval()
    total = count = 0.0
    for text in general:
        ids = tok(text, return_tensors="pt").input_ids.to(DEVICE)
        out = model(input_ids=ids, labels=ids)
        total += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


forgetting = {"base": general_loss(model_base)}
for m in runs:
    forgetting[m] = general_loss(models[m])
print(f"general-text loss over {len(general)} passages: " + ", ".join(f"{k} {v:.4f}" for k, v in forgetting.items()))
for m in runs:
    print(f"  {m:18s}: {forgetting[m] - forgetting['base']:+.4f} against the base model "
          f"(Velora held-out loss {results[m]['eval_loss'] - results['base']['eval_loss']:+.3f})")

# %% [markdown]
# Read the two columns together: how far each method moved the general-text loss, and how much it learned
# (the Velora held-out loss). This live run is a handful of steps, so both changes are small; what it
# shows is how to measure forgetting, not a verdict. At scale, Biderman et al. (2024, "LoRA Learns Less
# and Forgets Less", [arXiv 2405.09673](https://arxiv.org/abs/2405.09673)) fine-tuned Llama-2-7B on code
# and maths: full fine-tuning learned the target domain better, LoRA kept more of the base model's
# abilities on other tasks. Which trade you get depends on the learning rate, the steps and the rank, so
# measure it on your own data, as here.
#
# ## 9. Save the adapter, load it back, load it with PEFT
#
# `save_adapter` writes PEFT's format: `adapter_config.json` (r, lora_alpha, target_modules, ...) and
# `adapter_model.safetensors` with keys like
# `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A is (r, in), B is (out, r)).
# We load it into a **fresh** copy of the base model with `lora_ref` and with Hugging Face PEFT, and compare
# the logits and the generated answers with the model we trained.
# %%
from safetensors.torch import load_file

tuned = models["LoRA"]
del models["full fine-tuning"]                    # free half a GB
probe = held_sub[:2]
batch = data.collate([data.encode_example(tok, e) for e in probe], tok.pad_token_id)
batch = {k: v.to(DEVICE) for k, v in batch.items()}
with tempfile.TemporaryDirectory() as tmp:
    folder = save_adapter(tuned, Path(tmp) / "velora-lora", LORA)
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    keys = sorted(load_file(Path(folder) / "adapter_model.safetensors"))
    print({k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora")})
    print(f"{len(keys)} tensors, e.g. {keys[0]}")
    reloaded = load_adapter(copy.deepcopy(model_base), folder)
    try:
        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model_base), str(folder)).eval()
    except ImportError:
        peft_model = None
        print("peft is not installed (pip install peft): skipping the PEFT check")
    questions = [e.question for e in probe]
    with torch.no_grad():
        ref_logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_answers = training.generate_answers(tuned, tok, questions, max_new_tokens=24)
        for name, m in (("lora_ref load_adapter", reloaded), ("PEFT PeftModel", peft_model)):
            if m is None:
                continue
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            answers = training.generate_answers(m, tok, questions, max_new_tokens=24)
            same = answers == ref_answers
            print(f"{name:22s}: max |logits - trained| = {(logits - ref_logits).abs().max().item():.2e}; "
                  f"same answers: {same}  ({answers[0][:60]!r})")
del reloaded, peft_model

# %% [markdown]
# Identical to rounding: the file holds exactly $A$ and $B$, and PEFT computes $W x + \frac{\alpha}{r} B A x$
# with the same shapes. (`tests/test_adapters.py` checks both directions at 1e-5 on every build.)
#
# ## 10. Merge for deployment
#
# For serving, `merge_and_unload` folds $\frac{\alpha}{r}BA$ into each $W$ and gives back plain
# `nn.Linear` layers: the same parameter count and latency as the base model, and the same outputs
# (notebook 07 goes further).
# %%
from lora_ref.lora import merge_and_unload

with torch.no_grad():
    merged = merge_and_unload(copy.deepcopy(tuned))
    diff = (merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits - ref_logits).abs().max()
print(f"merged model: {count_parameters(merged).total:,} parameters (base: {total:,}), "
      f"LoRA layers left: {len(lora_layers(merged))}, max |logits difference| {diff.item():.2e}")
del merged

# %% [markdown]
# ## 11. The whole dataset, from the command line
#
# The live run above uses a few facts and ten steps so that it fits the CPU budget. The same
# recipe on all 41 facts (410 training examples, 82 held-out questions) is one command, which fine-tunes,
# evaluates base and tuned models, and saves the adapter with its metrics:
#
# ```
# .venv/bin/lora-train --steps 150 --r 16 --alpha 32 --targets all-linear --out runs/velora-lora
# ```
#
# (minutes on a GPU, far longer on a 2-core CPU: the last column below is the measured training time). Its committed runs, read
# from `benchmarks/results/` (the GPU run used the same command with `--device cuda`):
# %%
from lora_ref.results import load_result

print(f"{'run':34s} {'steps':>5s} {'base acc':>8s} {'LoRA acc':>8s} {'base loss':>9s} {'LoRA loss':>9s} {'train s':>8s}")
for fname in ("lora_cpu_demo_cpu.json", "lora_train_h200.json"):
    m = load_result(fname)
    if m is None:
        continue
    where = f"{m.get('gpu', 'CPU')} {m.get('date', '')[:10]}"
    print(f"{where[:34]:34s} {m['args']['steps']:5d} {m['base']['fact_accuracy']:8.1%} {m['lora']['fact_accuracy']:8.1%} "
          f"{m['base']['eval_loss']:9.3f} {m['lora']['eval_loss']:9.3f} {m['train_seconds']:8.0f}")

# %% [markdown]
# On all 41 facts LoRA gets a little over half of the held-out questions right, from almost none: the
# questions are phrased unlike any training question, and a 135M model with 10 examples per fact does not
# generalise every paraphrase. `benchmarks/results/quality_qlora_h200.md` repeats this over 5 seeds
# ({{result:quality_qlora_h200.json:per_seed.lora.*.fact_accuracy.@mean:.1%}} on average) and puts QLoRA beside it (notebook 06).
#
# ## 12. The seed article's trainer, measured
#
# The article's `CustomerServiceLoRATrainer` does three things differently from section 8. It calls
# `apply_lora_to_model` and nothing else, so **nothing outside the adapters is frozen** (notebook 02,
# section 10: embeddings and norms stay trainable, and its optimizer takes every parameter that requires
# a gradient). It **tokenises each batch inside the training loop**, plain text with `padding=True` and
# `labels=input_ids`. And it **saves the adapter with a substring filter**:
#
# ```python
# lora_state_dict = {name: param.data for name, param in self.base_model.named_parameters()
#                    if 'lora_' in name and param.requires_grad}
# torch.save({'lora_state_dict': lora_state_dict, 'lora_config': self.lora_config, ...}, path)
# ```
#
# We reproduce its state on a tiny Llama with SmolLM2's architecture and tokenizer (LoRA on all seven
# projections, everything else left trainable as the article leaves it), run its loop for a few steps,
# and measure what the filter saves against what training changed.
# %%
from lora_ref.models import tiny_llama

texts = [tok.apply_chat_template([{"role": "system", "content": data.SYSTEM_PROMPT},
                                  {"role": "user", "content": e.question},
                                  {"role": "assistant", "content": e.answer}], tokenize=False)
         for e in splits.train]
article_batches = [texts[i:i + 8] for i in range(0, 64, 8)]
tiny = tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
inject_lora(tiny, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
for p in tiny.parameters():
    p.requires_grad_(True)                             # the article freezes nothing but the wrapped weights
for layer in lora_layers(tiny).values():
    layer.base_layer.weight.requires_grad_(False)
before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
tokenise_s = step_s = 0.0
pad_loss_tokens = loss_tokens = 0
tiny.train()
for batch_texts in article_batches:                    # the article's loop, one epoch
    t0 = time.perf_counter()
    inputs = tok(batch_texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
    tokenise_s += time.perf_counter() - t0
    pad_loss_tokens += int((inputs["attention_mask"] == 0).sum())     # labels=input_ids: padding carries loss
    loss_tokens += inputs["input_ids"].numel()
    t0 = time.perf_counter()
    loss = tiny(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    step_s += time.perf_counter() - t0
saved = {n for n, p in tiny.named_parameters() if "lora_" in n and p.requires_grad}
changed = {n for n, p in tiny.named_parameters() if not torch.equal(p.detach(), before[n])}
numel = dict((n, p.numel()) for n, p in tiny.named_parameters())
missed = sorted(changed - saved)
print(f"{len(article_batches)} batches: tokenising took {1e3 * tokenise_s:.0f} ms in total, every epoch again "
      f"(a SmolLM2 step above took {runs['LoRA']['seconds'] / STEPS:.2f} s: the cost is small, what it tokenises is the problem)")
print(f"labels=input_ids with padding: {pad_loss_tokens} of {loss_tokens} loss tokens ({pad_loss_tokens / loss_tokens:.0%}) "
      f"are padding ({tok.pad_token!r}, SmolLM2's end-of-turn token), on top of the loss on system prompt and question")
print(f"the 'lora_' filter saves {len(saved)} tensors ({sum(numel[n] for n in saved):,} numbers)")
print(f"training changed {len(changed)} tensors; changed but NOT saved: {len(missed)} "
      f"({sum(numel[n] for n in missed):,} numbers), e.g. {missed[:3]}")
fresh = tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
inject_lora(fresh, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
fresh.load_state_dict({n: p for n, p in tiny.state_dict().items() if "lora_" in n}, strict=False)
probe_ids = tok(texts[:2], return_tensors="pt", padding=True)
with torch.no_grad():
    tiny.eval()
    gap = (fresh(**probe_ids).logits - tiny(**probe_ids).logits).abs().max().item()
print(f"base model + the saved 'adapter' vs the trained model: max |logits difference| = {gap:.3f} (0 if the file held what was trained)")

# %% [markdown]
# The filter catches exactly the LoRA matrices, and that is the problem: the article's optimizer also
# trained the embeddings (and the output head tied to them) and the norms, which its file does not hold, so
# the saved "adapter" does not reproduce the trained model. (Had it frozen the base model first, as
# `inject_lora` and PEFT do, the filter would be complete.) Its file is also a pickle of Python objects
# (`torch.save` of the config class): loading it runs code and needs the class; PEFT's
# `adapter_model.safetensors` + `adapter_config.json` (section 9) holds tensors and JSON only.
#
# ## 13. Interview practice
#
# Answer out loud first, then open the answer.
#
# **Q1. Your fine-tuned chatbot repeats the system prompt, or its loss falls fast while answers do not
# improve. What do you check first?**
# <details><summary>answer</summary>
# The labels. If the loss is on the whole sequence (the seed article's <code>labels=input_ids</code>), most
# tokens are the fixed system prompt and the question: easy to predict, so the loss falls while the answers
# carry a fraction of the gradient (measured in section 2: answer tokens are a minority of the tokens here). Mask everything but the answer and its end-of-turn token with -100, and mask padding.
# </details>
#
# **Q2. Which `target_modules` would you choose, and how do you find the names?**
# <details><summary>answer</summary>
# Print the model's linear modules (section 4; PEFT's "target modules not found" error is the most asked
# question). The LoRA paper adapted only W_q and W_v; the QLoRA paper found that all linear layers are
# needed to match full fine-tuning. All-linear costs several times q,v's parameters at the same rank
# (section 6 prints both) but is still a few percent of the model. Notebook 04 measures the difference.
# </details>
#
# **Q3. LoRA trains a few percent of the parameters. Why is a training step not that many times faster?**
# <details><summary>answer</summary>
# The forward and backward passes still go through every frozen weight (gradients must flow through
# them to reach the adapters in earlier layers). Per weight and token a step costs 2 FLOPs forward and 4
# backward (2 for the input gradient, 2 for the weight gradient): LoRA removes the weight-gradient matmuls
# of the frozen weights, half of the backward pass and a third of the whole step (at most 1.5x fewer
# FLOPs; section 8 prints the count), and their optimizer update. The large savings are memory (gradients
# and Adam state only for adapters: section 8) and storage (the adapter file of section 8).
# </details>
#
# **Q4. How do you evaluate whether fine-tuning worked? Why is "exp(loss) on the eval set" not enough?**
# <details><summary>answer</summary>
# Measure the task: here held-out fact accuracy on questions phrased differently from training. Eval loss
# (or its exponential, perplexity) is useful for curves but can improve while answers stay wrong, and the
# seed article's per-batch average of exp(loss) is not even a perplexity. Always compare with the base
# model and keep train and held-out phrasings apart.
# </details>
#
# **Q5. You trained an adapter with your own code. How do you ship it so others can use it with PEFT?**
# <details><summary>answer</summary>
# Save PEFT's format: adapter_config.json (peft_type LORA, r, lora_alpha, target_modules, use_rslora ...)
# and adapter_model.safetensors with keys base_model.model.&lt;module&gt;.lora_A.weight (r, in) and
# lora_B.weight (out, r). Check by loading it with PeftModel.from_pretrained on the same base and comparing
# logits (section 9). Or merge and ship a plain checkpoint (section 10) if you serve one task.
# </details>
#
# **Q6. When would you choose full fine-tuning over LoRA?**
# <details><summary>answer</summary>
# When memory is not the constraint and the task moves far from pre-training (new language or domain, large
# datasets) so that a low-rank update underfits; when you serve one model only and storage does not matter.
# On small data like ours LoRA is far cheaper; at scale it also forgets less of the base model than full
# fine-tuning while learning less of the new domain (Biderman et al. 2024); section 8 shows how to measure
# forgetting (the general-text loss of both).
# </details>
