# %% [markdown]
# # 09 · Interview drills
#
# Every high-frequency question of the seed article, practised three ways:
#
# * **numbers** you compute (graded automatically; the answers come from `lora_ref`'s calculators, the
#   same code that sizes models in notebooks 01–08, never typed in by hand);
# * **multiple choice** (graded automatically against the drill bank's answer key);
# * **free text**, the way an interviewer asks: write your answer in the markdown cell (your instructor
#   grades it), then run the *compare* cell to see the model answer and its key points, and optionally
#   let `self_check` count which key points your text covers.
#
# At the end, the **drill widget** keeps going with 70+ bank questions and endless generated ones,
# scheduled by spaced repetition (the same engine as the terminal command `lora-drill`).
#
# **By the end of this notebook you will have** answered the article's eight high-frequency questions and
# its four answer templates, computed the checklist's numbers (the ~128x parameter reduction, adapter
# sizes, double-quantisation savings, full fine-tuning memory) for real model shapes, and started a
# spaced-repetition schedule for the rest.
#
# *How to answer numeric cells:* assign a plain Python number to the variable named in the cell (you
# may write the arithmetic: `x = 32 * 4 * 16 * (4096 + 4096)` is a fine answer). *Multiple choice:*
# assign one letter, e.g. `mc_x = "c"`.
# %% locked id=setup
import math
import os

from lora_ref.drills import FREE_TEXT_LIMITS, get_item, grade, model_answer_text, question_text
from lora_ref.models import notebook_setup

GRADING, DEVICE = notebook_setup()     # grading mode (nbgrader running: demos shrink), CUDA or CPU, CPU threads


def show(item_id: str) -> None:
    """Print a bank question (with its options for multiple choice, numbered code for spot-the-bug)."""
    print(question_text(get_item(item_id)))


def compare(item_id: str) -> None:
    """Print the model answer, key points, follow-ups and source of a bank question."""
    print(model_answer_text(get_item(item_id)))


def self_check(item_id: str, your_answer: str) -> None:
    """Key-point coverage of your free-text answer (a rough guide: read FREE_TEXT_LIMITS)."""
    if not your_answer.strip():
        print("(paste your answer between the quotes to check its key-point coverage)")
        return
    g = grade(get_item(item_id), your_answer)
    print(f"covered {len(g.covered)} of {len(g.covered) + len(g.missed)} key points ({g.score:.0%})")
    for k in g.missed:
        print("  missing:", k)

print(FREE_TEXT_LIMITS)

# %% [markdown]
# ## 1. LoRA's mathematics
# %%
show("lora.principle")
# %% [markdown] manual id=fq_principle points=1
# $\Delta W = s\,BA$ with $A$ $(r \times d_\text{in})$, $B$ $(d_\text{out} \times r)$, $r \ll \min(d_\text{in}, d_\text{out})$;
# the frozen $W$ is kept, only $A$ and $B$ train; pre-trained models have a low intrinsic dimension
# (Aghajanyan et al.) and the update needed for adaptation has a small effective rank (LoRA Section 7,
# and notebook 01's measured spectrum); $B = 0$ at init so training starts at the pretrained model.
# %%
compare("lora.principle")
# %%
self_check("lora.principle", """ """)

# %% [markdown]
# **Numbers.** The article's own example: LoRA with $r=16$ on $W_q, W_k, W_v, W_o$ of a model with
# $d = 4096$ and 32 layers (Llama-2-7B's attention). How many trainable parameters?
# %% answer id=lora_params_llama2
### BEGIN SOLUTION
lora_params_llama2 = 32 * 4 * 16 * (4096 + 4096)
### END SOLUTION
# %% test id=test_lora_params_llama2 points=1
assert isinstance(lora_params_llama2, (int, float)), "assign a number"
assert lora_params_llama2 > 0 and lora_params_llama2 % 16 == 0, "r (in + out) per matrix: a multiple of r = 16"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.lora_params_llama2", lora_params_llama2)
### END HIDDEN TESTS

# %% [markdown]
# And the reduction factor the article quotes: parameters of those four full $4096 \times 4096$ matrices
# divided by the LoRA parameters for them (per layer or for all 32: the same ratio).
# %% answer id=reduction_ratio
### BEGIN SOLUTION
reduction_ratio = (4 * 4096 * 4096) / (4 * 16 * (4096 + 4096))
### END SOLUTION
# %% test id=test_reduction_ratio points=1
assert isinstance(reduction_ratio, (int, float)) and reduction_ratio > 1, "full / LoRA: a number above 1"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.reduction_ratio", reduction_ratio)
### END HIDDEN TESTS

# %% [markdown]
# **Grouped-query attention.** Llama-3-8B has hidden size 4096, 32 layers, 32 query heads and **8**
# key/value heads of dimension 128, so `k_proj` and `v_proj` map 4096 → 1024. LoRA with $r = 8$ on
# `q_proj` and `v_proj` only: how many trainable parameters?
# %% answer id=lora_params_llama3_qv
### BEGIN SOLUTION
lora_params_llama3_qv = 32 * 8 * ((4096 + 4096) + (4096 + 1024))
### END SOLUTION
# %% test id=test_lora_params_llama3_qv points=1
assert isinstance(lora_params_llama3_qv, (int, float)) and lora_params_llama3_qv > 0, "assign a number"
assert lora_params_llama3_qv != 32 * 2 * 8 * (4096 + 4096), "v_proj is 4096 -> 1024 under GQA, not 4096 -> 4096"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.lora_params_llama3_qv", lora_params_llama3_qv)
### END HIDDEN TESTS

# %% [markdown]
# **The course model.** SmolLM2-135M: hidden 576, MLP 1536, 30 layers, 9 query heads and 3 key/value
# heads of dimension 64. LoRA $r = 16$ on all seven projections (q, k, v, o, gate, up, down)?
# %% answer id=lora_params_smollm2
### BEGIN SOLUTION
_kv = 3 * 64
lora_params_smollm2 = 30 * 16 * ((576 + 576) + 2 * (576 + _kv) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
### END SOLUTION
# %% test id=test_lora_params_smollm2 points=1
assert isinstance(lora_params_smollm2, (int, float)) and 1e6 < lora_params_smollm2 < 1e7, \
    "a few million: about 3.5% of the model's 135M"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.lora_params_smollm2", lora_params_smollm2)
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Choosing rank and alpha (the article's Q1)
# %%
show("rank.choose")
# %% [markdown] manual id=fq_rank points=1
# Start small (r = 8–16) on all linear layers, alpha ≈ r to 2r (or rsLoRA); sweep r on a validation set;
# the LoRA paper finds r = 1–8 on Wq, Wv already competitive (Table 6) and that covering more matrices
# beats a higher rank on few; higher r for larger domain shifts and more data; too high a capacity
# over-fits small data (notebook 04); there is no width formula.
# %%
compare("rank.choose")
# %%
self_check("rank.choose", """ """)
# %% [markdown]
# **Multiple choice.**
# %%
show("rank.heuristic-formula")
# %% answer id=mc_heuristic
### BEGIN SOLUTION
mc_heuristic = "b"
### END SOLUTION
# %% test id=test_mc_heuristic points=1
assert isinstance(mc_heuristic, str) and mc_heuristic.strip().lower() in "abcd", "one letter, a to d"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.mc_heuristic", mc_heuristic)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. QLoRA's three innovations (and when it does poorly: the article's Q2)
# %%
show("qlora.three")
# %% [markdown] manual id=fq_qlora points=1
# (1) 4-bit NormalFloat: 16 levels at quantiles of N(0, 1), blockwise absmax (64), exact zero;
# (2) double quantisation of the absmax constants (8-bit, blocks of 256): 0.5 → 0.127 bits per parameter;
# (3) paged optimizers (unified memory) to survive memory spikes. Compute in bf16 on the dequantised
# weight; LoRA adapters on all linear layers in 16/32-bit carry the learning; the paper matches 16-bit
# fine-tuning quality. The article's "dual-weight scheme" is not a term of the paper and the article does not
# define it: it may mean NF4 storage with bf16 computation (Section 3: no second copy of the weights), the
# 4-bit base beside 16-bit adapters, or a garbled "double quantisation"; only the last is one of the three.
# %%
compare("qlora.three")
# %%
show("qlora.not-innovation")
# %% answer id=mc_not_innovation
### BEGIN SOLUTION
mc_not_innovation = "d"
### END SOLUTION
# %% test id=test_mc_not_innovation points=1
assert isinstance(mc_not_innovation, str) and mc_not_innovation.strip().lower() in "abcd", "one letter, a to d"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.mc_not_innovation", mc_not_innovation)
### END HIDDEN TESTS

# %% [markdown]
# **Double quantisation.** With blocks of 64 and an fp32 absmax per block, the constants cost
# $32/64 = 0.5$ bits per parameter. Double quantisation stores each absmax in 8 bits, plus one fp32
# constant per block of 256 absmax values. How many bits per parameter do the constants cost then?
# %% answer id=dq_bits
### BEGIN SOLUTION
dq_bits = 8 / 64 + 32 / (64 * 256)
### END SOLUTION
# %% test id=test_dq_bits points=1
assert isinstance(dq_bits, (int, float)) and 0 < dq_bits < 0.5, "fewer than the 0.5 bits of fp32 constants"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.dq_bits", dq_bits)
### END HIDDEN TESTS
# %%
show("qlora.poor")
# %% [markdown] manual id=fq_qlora_poor points=1
# Measured answers beat the article's list: QLoRA is slower per step than 16-bit LoRA (dequantisation in
# every forward/backward: this project's H200 run of the usual recipe on the Llama-2-7B shape measured
# {{result:qlora_step_llama-2-7b_h200.json:results.recipe_no_ckpt.tokens_per_s/results.bf16_lora_no_ckpt.tokens_per_s:.2f}}x the
# tokens/s of bf16 LoRA without gradient checkpointing,
# {{result:qlora_step_llama-2-7b_h200.json:results.recipe.tokens_per_s/results.bf16_lora.tokens_per_s:.2f}}x with it); its peak memory can exceed
# the weights' saving for small models; the 4-bit error is fixed at the base, so quality depends on
# adapting all linear layers; merging needs care (dequantise first, notebook 07). Small data is not a
# QLoRA-specific problem.
# %%
compare("qlora.poor")

# %% [markdown]
# ## 4. Prefix tuning, prompt tuning, P-tuning
# %%
show("peft.prefix-prompt-ptuning")
# %% [markdown] manual id=fq_family points=1
# Prompt tuning: n trainable input embeddings (n·d). P-tuning: input-layer virtual tokens produced by a
# prompt encoder (bi-LSTM/MLP), cached after training. Prefix tuning: learned keys/values in every
# layer's attention (2·L·n·d_kv kept), trained through an MLP reparameterisation. All cost n positions
# at inference and cannot be merged; LoRA can.
# %%
compare("peft.prefix-prompt-ptuning")
# %% [markdown]
# Prompt tuning with 20 virtual tokens on a model with hidden size 4096: trainable parameters?
# %% answer id=prompt_params
### BEGIN SOLUTION
prompt_params = 20 * 4096
### END SOLUTION
# %% test id=test_prompt_params points=1
assert isinstance(prompt_params, (int, float)) and prompt_params > 0, "assign a number"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.prompt_params", prompt_params)
### END HIDDEN TESTS
# %% [markdown]
# Prefix tuning with 20 virtual tokens on Llama-3-8B (32 layers, 8 key/value heads × 128): how many
# numbers does the *kept* prefix hold (keys and values, every layer; the reparameterisation MLP is
# dropped after training)?
# %% answer id=prefix_params
### BEGIN SOLUTION
prefix_params = 20 * 32 * 2 * 8 * 128
### END SOLUTION
# %% test id=test_prefix_params points=1
assert isinstance(prefix_params, (int, float)) and prefix_params > 0, "assign a number"
assert prefix_params != 20 * 32 * 2 * 4096, "under GQA the keys and values are 8 x 128 = 1024 wide, not 4096"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.prefix_params", prefix_params)
### END HIDDEN TESTS
# %%
show("peft.prefix-kv")
# %% answer id=mc_prefix_kv
### BEGIN SOLUTION
mc_prefix_kv = "b"
### END SOLUTION
# %% test id=test_mc_prefix_kv points=1
assert isinstance(mc_prefix_kv, str) and mc_prefix_kv.strip().lower() in "abcd", "one letter, a to d"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.mc_prefix_kv", mc_prefix_kv)
### END HIDDEN TESTS

# %% [markdown]
# ## 5. Full fine-tuning or LoRA?
# %%
show("full.when")
# %% [markdown] manual id=fq_full points=1
# Full fine-tuning when the needed change is large/high-rank (new domain or language, continued
# pre-training), data is plentiful, one task is served and the memory (≈16 bytes/parameter with AdamW in
# mixed precision) is affordable; LoRA/QLoRA when the base already has the capability, data is small,
# many tasks share one base, or memory is short. Notebook 08 measured both sides.
# %%
compare("full.when")
# %% [markdown]
# The article says full fine-tuning of a 7B model needs "~84 GB". Mixed-precision AdamW keeps, per
# parameter, bf16 weights (2 bytes), bf16 gradients (2), an fp32 master copy (4) and two fp32 moments
# (8): 16 bytes. Llama-2-7B has 6,738,415,616 parameters. How many GB (10⁹ bytes) before activations?
# %% answer id=full_ft_gb_7b
### BEGIN SOLUTION
full_ft_gb_7b = 16 * 6_738_415_616 / 1e9
### END SOLUTION
# %% test id=test_full_ft_gb_7b points=1
assert isinstance(full_ft_gb_7b, (int, float)) and 84 < full_ft_gb_7b < 200, \
    "more than the article's 84 GB (which counts 12 bytes/parameter), in GB (1e9 bytes)"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.full_ft_gb_7b", full_ft_gb_7b)
### END HIDDEN TESTS

# %% [markdown]
# ## 6. Evaluating fine-tuning methods (the article's Q3)
# %%
show("eval.methods")
# %% [markdown] manual id=fq_eval points=1
# A controlled experiment varying only the method (same base, data, batches, budget, evaluation; each
# method's learning rate tuned); the task metric on held-out data (fact accuracy, exact match, F1) plus
# the generalisation gap, trainable parameters, peak memory, time, adapter size and inference cost;
# several seeds when differences are small; perplexity only as a diagnostic, token-weighted.
# %%
compare("eval.methods")
# %%
show("eval.perplexity-mc")
# %% answer id=mc_perplexity
### BEGIN SOLUTION
mc_perplexity = "c"
### END SOLUTION
# %% test id=test_mc_perplexity points=1
assert isinstance(mc_perplexity, str) and mc_perplexity.strip().lower() in "abcd", "one letter, a to d"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.mc_perplexity", mc_perplexity)
### END HIDDEN TESTS
# %% [markdown]
# **Spot the bug** in the article's evaluation function (write the line number and what is wrong):
# %%
show("bug.eval-score")
# %% [markdown] manual id=fq_bug_eval points=1
# It averages exp(loss) per batch (batch-size dependent, not token-weighted; ≥ the true perplexity only when
# every batch holds the same number of tokens, by Jensen's inequality, and on either side otherwise), its
# labels are the whole input (it scores the prompt too), and it calls a perplexity an "eval score"
# though it says nothing about whether the answers are right.
# %%
compare("bug.eval-score")

# %% [markdown]
# ## 7. Merging and deploying (the article's Q4)
# %%
show("deploy.merge-vs-separate")
# %% [markdown] manual id=fq_deploy points=1
# Merge $W' = W + sBA$ in fp32, round once, export a plain checkpoint: no added latency (notebook 07
# measured it). QLoRA: dequantise, merge in fp32, export 16-bit — never merge into the original weights
# or re-quantise. Keep adapters separate for many tasks: hot-swap by name, or batch across adapters with
# gather + bmm (S-LoRA, Punica).
# %%
compare("deploy.merge-vs-separate")
# %% [markdown]
# The PEFT adapter of question 1 (r = 16 on q, k, v, o of Llama-2-7B) saved in bf16: how many MB
# (10⁶ bytes) of tensor data?
# %% answer id=adapter_mb_llama2
### BEGIN SOLUTION
adapter_mb_llama2 = 32 * 4 * 16 * (4096 + 4096) * 2 / 1e6
### END SOLUTION
# %% test id=test_adapter_mb_llama2 points=1
assert isinstance(adapter_mb_llama2, (int, float)) and 1 < adapter_mb_llama2 < 1000, "in MB: tens of MB"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.adapter_mb_llama2", adapter_mb_llama2)
### END HIDDEN TESTS
# %%
show("deploy.unmerged-latency")
# %% answer id=mc_unmerged_latency
### BEGIN SOLUTION
mc_unmerged_latency = "a"
### END SOLUTION
# %% test id=test_mc_unmerged_latency points=1
assert isinstance(mc_unmerged_latency, str) and mc_unmerged_latency.strip().lower() in "abcd", "one letter, a to d"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.mc_unmerged_latency", mc_unmerged_latency)
### END HIDDEN TESTS

# %% [markdown]
# ## 8. Mixed precision
# %%
show("mp.considerations")
# %% [markdown] manual id=fq_mixed points=1
# bf16 where supported (fp32's range: no overflow, no loss scaling); fp16 needs dynamic loss scaling
# (GradScaler: skip steps with Inf, halve the scale); keep master weights, optimizer state and LoRA
# adapters in fp32 (bf16 drops updates below half its spacing); softmax, losses and norms in fp32
# (autocast); in QLoRA the storage (NF4) and compute (bf16) types differ. Notebook 08 measured each.
# %%
compare("mp.considerations")
# %%
show("mp.bf16-eps")
# %% answer id=mc_bf16_eps
### BEGIN SOLUTION
mc_bf16_eps = "b"
### END SOLUTION
# %% test id=test_mc_bf16_eps points=1
assert isinstance(mc_bf16_eps, str) and mc_bf16_eps.strip().lower() in "abcd", "one letter, a to d"
### BEGIN HIDDEN TESTS
from lora_ref.exercises import check
check("09.mc_bf16_eps", mc_bf16_eps)
### END HIDDEN TESTS

# %% [markdown]
# ## 9. Keep drilling: spaced repetition
#
# The widget below draws from the whole bank (70+ questions, each with a model answer, key points,
# difficulty, source and follow-ups) and from generators that make endless numeric questions from real
# model configurations (Llama-2 7B/13B/70B, Llama-3-8B, Mistral-7B, SmolLM2, Qwen2.5) and spot-the-bug
# questions from the article's code. Rate yourself after each answer; the scheduler (FSRS) brings
# questions back when you are about to forget them. Progress is kept locally (SQLite) and shared with the
# terminal command `lora-drill` (`lora-drill practice`, `lora-drill mock --minutes 20`, `lora-drill stats`).
# While grading, the widget uses a throw-away in-memory store.
# %%
from lora_ref.drills import drill_widget

drill_widget()
