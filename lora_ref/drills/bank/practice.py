"""Bank: evaluation, merging and deployment, mixed precision."""
from ..items import Item, kp

EVALUATION = [
    Item(
        id="eval.methods", topic="evaluation", kind="free", difficulty=2,
        prompt="How do you evaluate and compare different fine-tuning methods?",
        answer=(
            "Controlled experiments that change only the method (same data, base model, token budget, and a "
            "comparable hyperparameter search per method), with several seeds because fine-tuning variance is "
            "large. Measure: task metrics on a held-out, deduplicated test set (accuracy, exact match, F1, "
            "pass@k for code, human or LLM-judge preference for open-ended generation), always against the base "
            "model as a baseline; forgetting on general benchmarks (e.g. MMLU before and after); held-out loss "
            "or perplexity on answer tokens as a training signal, not as the headline score; and cost: trainable "
            "parameters, peak memory, tokens per second, wall time, adapter size, inference latency."
        ),
        key_points=(
            kp("vary only the method; tune each fairly", "only the method", "control", "fair"),
            kp("several seeds (variance)", "seed", "varian"),
            kp("task metrics on a held-out, deduplicated test set", "held out", "test set", "dedup"),
            kp("baseline: the base model", "baseline", "base model"),
            kp("forgetting on general benchmarks", "forget", "mmlu", "general"),
            kp("cost: memory, speed, size", "memory", "speed", "throughput"),
        ),
        source="QLoRA paper Section 5-6 (evaluation, Vicuna/Elo, benchmark caveats); the article's Q3 template",
        follow_ups=("Why is perplexity not a task score?", "How many seeds would you run?"),
    ),
    Item(
        id="eval.perplexity", topic="evaluation", kind="free", difficulty=2,
        prompt="The article's trainer reports exp(loss) averaged over batches as 'Eval Score'. What is wrong with that?",
        answer=(
            "exp(mean token cross-entropy) is perplexity: lower is better, so calling it a 'score' invites "
            "reading it the wrong way round. It measures how well the model predicts text, not whether it does "
            "the task: a model can have low perplexity and still give wrong answers, and perplexity is not "
            "comparable across tokenizers. Averaging exp(loss) per batch is also not the corpus perplexity: "
            "the right one is exp(total loss / total tokens), weighting each batch by its tokens. When every batch "
            "holds the same number of tokens the mean of exponentials is at least the true perplexity (Jensen's "
            "inequality: exp is convex); with unequal batches it can fall on either side (1,000 tokens at loss "
            "3.0 and 1 token at loss 0.0: (e^3 + e^0)/2 = 10.5 against the true exp(3000/1001) = 20.0). "
            "And its loss includes the prompt (and padding), "
            "not just the answer. Report held-out answer-token loss or perplexity as a diagnostic and a task "
            "metric (e.g. fact accuracy) as the score."
        ),
        key_points=(
            kp("it is perplexity; lower is better", "lower is better", "perplexity lower"),
            kp("not a task metric", "task metric", "whether it does the task"),
            kp("mean of per-batch exp is not corpus perplexity (token-weighted)", "token weighted", "total tokens", "jensen"),
            kp("Jensen's >= holds only for equal tokens per batch", "equal", "same number"),
            kp("loss includes prompt/padding tokens", "includes the prompt", "prompt and padding", "prompt tokens"),
        ),
        corrects_article=True,
        source="The article's CustomerServiceLoRATrainer._evaluate; perplexity definition exp(sum NLL / N tokens)",
        follow_ups=("Compute corpus perplexity from per-batch losses and token counts.",
                    "When is the mean of per-batch perplexities guaranteed to be at least the true perplexity?"),
    ),
    Item(
        id="eval.perplexity-mc", topic="evaluation", kind="choice", difficulty=1,
        prompt="Two batches have mean token losses 1.0 (100 tokens) and 3.0 (10 tokens). What is the perplexity over both?",
        choices=("exp(2.0) = 7.39, the mean of the losses",
                 "(e^1 + e^3)/2 = 11.40, the mean of per-batch perplexities",
                 "exp((100*1.0 + 10*3.0)/110) = exp(1.18) = 3.26",
                 "e^1 * e^3 = 54.6"),
        correct=2,
        answer=(
            "Perplexity is exp of the token-weighted mean negative log-likelihood: (100 + 30)/110 = 1.182, "
            "exp(1.182) = 3.26. Averaging per-batch perplexities (the article's method) gives 11.40, inflated by "
            "the small high-loss batch. It is not always too high: with unequal batches it can also be too low "
            "(1,000 tokens at loss 3.0 and 1 token at 0.0: 10.5 against a true 20.0); only with equal tokens per "
            "batch does Jensen's inequality guarantee mean exp >= exp mean."
        ),
        key_points=(kp("token-weighted mean NLL", "token"), kp("then exp", "exp")),
        corrects_article=True,
        source="Perplexity definition; the article's _evaluate",
        follow_ups=("Why does the article's method overweight short batches?",),
    ),
    Item(
        id="eval.loss-masking", topic="evaluation", kind="free", difficulty=2,
        prompt="The article trains with labels=input_ids. Why do instruction-tuning recipes mask the prompt, and how?",
        answer=(
            "labels=input_ids puts the loss on every token: system prompt, user question, chat template and "
            "padding. The model then spends capacity learning to predict prompts (and pad tokens), the loss is "
            "dominated by easy template tokens, and a falling loss says little about answer quality. Set the "
            "labels of every non-answer token to -100 (PyTorch cross-entropy's ignore_index), so only answer "
            "tokens count; always mask padding (or set the pad labels to -100 via the attention mask). The QLoRA "
            "reference code does the same by default (train_on_source=False: loss on the target only)."
        ),
        key_points=(
            kp("loss on prompt and padding tokens", "prompt", "padding"),
            kp("labels -100 (ignore_index) for non-answer tokens", "100", "ignore"),
            kp("only answer tokens count", "answer token", "answer only", "only answer"),
        ),
        corrects_article=True,
        source="PyTorch CrossEntropyLoss(ignore_index=-100); TRL completion-only loss; QLoRA reference code qlora.py (train_on_source=False)",
        follow_ups=("What happens if pad_token == eos_token and padding is not masked?",),
    ),
    Item(
        id="eval.contamination", topic="evaluation", kind="free", difficulty=2,
        prompt="Your fine-tuned model scores 95% on your held-out set, but users report it fails. List likely causes.",
        answer=(
            "Leakage: held-out examples duplicated or paraphrased in training (deduplicate, split by source or "
            "fact, not by row); the held-out set does not match real traffic (distribution shift: other phrasing, "
            "longer inputs, other languages); a lenient metric (substring match accepts wrong answers); decoding "
            "differs between eval and serving (greedy vs sampling, a different chat template or system prompt, "
            "max tokens); and the served model is not the evaluated one (adapter not loaded, merge rounding, "
            "quantised serving)."
        ),
        key_points=(
            kp("leakage / duplicates between train and test", "leak", "duplicat", "contaminat"),
            kp("distribution shift to real traffic", "distribution", "shift", "real"),
            kp("lenient metric", "metric"),
            kp("eval and serving differ (template, decoding)", "template", "decod", "serving"),
        ),
        source="Standard evaluation practice; peft#2368 (quality drop after merge)",
        follow_ups=("How would you split a fact-based dataset to test generalisation?",),
    ),
    Item(
        id="eval.llm-judge", topic="evaluation", kind="free", difficulty=3,
        prompt="QLoRA's Guanaco is reported at 99.3% of ChatGPT on the Vicuna benchmark. How far would you trust that figure?",
        answer=(
            "It is GPT-4 judging 80 prompts, comparing each answer with ChatGPT's: a small sample, a judge with "
            "known biases (order of presentation, length, its own style), and QLoRA itself reports the order "
            "effect and that Elo tournaments with humans and GPT-4 agree only moderately. It is evidence of a "
            "chatbot competitive in style on those prompts, not of equal capability; QLoRA also finds MMLU does "
            "not predict chatbot performance. Trust it with confidence intervals, both presentation orders and "
            "a second judge or human rating."
        ),
        key_points=(
            kp("GPT-4 as judge, small prompt set", "gpt 4", "judge", "80"),
            kp("judge biases (order, length)", "bias", "order", "length"),
            kp("not equal capability; benchmarks disagree", "mmlu", "capabilit"),
            kp("confidence intervals / humans", "confidence", "human"),
        ),
        source="QLoRA paper Section 5 and 6 (Vicuna benchmark, Elo, GPT-4 vs human agreement)",
        follow_ups=("How would you design an LLM-as-judge evaluation that controls order bias?",),
    ),
]

DEPLOYMENT = [
    Item(
        id="deploy.merge-vs-separate", topic="deployment", kind="free", difficulty=1,
        prompt="How do you merge and deploy a LoRA fine-tuned model? When do you keep the adapter separate?",
        answer=(
            "Merge: W <- W0 + (alpha/r) B A for every adapted layer (PEFT merge_and_unload), then save and serve a "
            "standard checkpoint: no extra latency, works with any inference engine, one model per task. Keep "
            "adapters separate when serving many tasks or tenants on one base: load/swap adapters at run time "
            "(PEFT set_adapter, vLLM/S-LoRA/LoRAX batch requests for different adapters), store megabytes per "
            "task instead of gigabytes, and roll back a task without touching the others. Compute the merge "
            "delta in fp32 and check outputs before and after; for a QLoRA adapter merge into the dequantised "
            "base."
        ),
        key_points=(
            kp("merge W0 + (alpha/r) B A, serve standard checkpoint", "merg"),
            kp("no added latency when merged", "latency"),
            kp("separate adapters for multi-task / multi-tenant serving", "multi", "many task", "tenant", "separate"),
            kp("verify outputs after merge, fp32 delta", "fp32", "check", "verif"),
        ),
        source="LoRA paper Section 4.2; PEFT merge_and_unload, set_adapter; the article's Q4 template",
        follow_ups=("What breaks when you merge into a 4-bit base?",),
    ),
    Item(
        id="deploy.qlora-merge", topic="deployment", kind="free", difficulty=3,
        prompt="How do you merge a QLoRA adapter, and why is it not as simple as merging into the 4-bit weights?",
        answer=(
            "The NF4 weights cannot hold W_q + delta exactly: adding a small bf16 delta and re-quantising to 4 bits "
            "rounds most of it away and adds new quantisation error. The adapter was also trained against the "
            "quantised weights W_q, not the original W, so merging into the original bf16 checkpoint gives "
            "W + delta, which is not what was trained. Recipe: dequantise the base (W_q in bf16), add the fp32 "
            "delta, keep the merged model in bf16 (or re-quantise it and measure the loss of quality); compare "
            "the merged model's outputs with the unmerged QLoRA model on the same inputs. PEFT users keep asking "
            "this (peft#1080, #2105, qlora#28) and report quality drops after merge (peft#2368)."
        ),
        key_points=(
            kp("4-bit weights cannot absorb a small delta exactly", "requantiz", "re quantiz", "rounds most of it away", "cannot hold"),
            kp("the adapter was trained against the quantised weights", "trained against"),
            kp("dequantise to bf16, then merge", "dequantize the base", "dequantiz base", "bf16 base"),
            kp("compare outputs before/after", "compare merged", "compare output", "before and after"),
        ),
        source="peft#1080, #2105, #2368; qlora#28; QLoRA Section 3",
        follow_ups=("Quantify the error of merging into the original bf16 weights vs into dequantised W_q.",),
    ),
    Item(
        id="deploy.bf16-merge", topic="deployment", kind="free", difficulty=3,
        prompt="After merging a LoRA adapter into a bf16 model, outputs drift slightly from the unmerged model. Why, and what do you do?",
        answer=(
            "bf16 has 8 bits of significand precision (7 stored): a weight of magnitude 0.05 has a spacing "
            "of about 0.0002 between representable values, and adapter deltas are often smaller, so W + delta "
            "rounds part of the update away (peft#1388). Unmerged, the base and adapter outputs are added in the "
            "activation, which keeps them. Compute delta in fp32 (PEFT does for half weights on the CPU), add in fp32 and "
            "round once; measure the drift (max abs difference of logits, task accuracy); if it matters, serve "
            "merged weights in fp16/fp32 or keep the adapter unmerged."
        ),
        key_points=(
            kp("bf16 has only 8 significant bits", "8 bit", "7 bit", "precision", "mantissa"),
            kp("small deltas round away when added to the weight", "round"),
            kp("compute delta and the sum in fp32, round once", "fp32"),
            kp("measure the drift", "measur"),
        ),
        source="peft#1388 (bf16 merge rounding); PEFT get_delta_weight casts to fp32 for fp16/bf16 on CPU",
        follow_ups=("What is the bf16 spacing just above 1.0?",),
    ),
    Item(
        id="deploy.multi-adapter", topic="deployment", kind="free", difficulty=3,
        prompt="How can one server handle requests for 100 different LoRA adapters in the same batch?",
        answer=(
            "Keep the base weights shared and unmerged; compute the base matmul once for the whole batch, then "
            "add each request's adapter term B_i (A_i x) with a gathered/segmented batched matmul (Punica's SGMV "
            "kernel, S-LoRA, vLLM's multi-LoRA support): the extra cost is two skinny matmuls per adapted layer. "
            "Adapters live in CPU memory and are paged into GPU memory when requested (S-LoRA's unified paging); "
            "merging would need one model copy per adapter."
        ),
        key_points=(
            kp("shared unmerged base computed once", "computed once", "shared unmerged", "base matmul once"),
            kp("per-request adapter term B_i A_i x", "per request", "each request"),
            kp("batched / segmented kernels (Punica, S-LoRA, vLLM)", "punica", "vllm", "sgmv"),
            kp("adapters paged between CPU and GPU", "paged into gpu", "cpu memory", "unified paging"),
        ),
        source="S-LoRA (arXiv 2311.03285); Punica (arXiv 2310.18547); vLLM LoRA adapters",
        follow_ups=("What is the extra FLOP cost per token of an unmerged r=16 adapter on q,k,v,o?",),
    ),
    Item(
        id="deploy.adapter-format", topic="deployment", kind="free", difficulty=2,
        prompt="What does a PEFT LoRA adapter on disk look like, and why not save it with torch.save as the article does?",
        answer=(
            "A folder with adapter_config.json (r, lora_alpha, target_modules, base_model_name_or_path, "
            "use_rslora, ...) and adapter_model.safetensors with keys like "
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight ((r, in)) and ...lora_B.weight "
            "((out, r)). safetensors is a plain tensor format: safe to load (no code execution), memory-mappable, "
            "readable by other tools. The article's torch.save of a dict holding its LoRAConfig object is a pickle: "
            "loading it runs arbitrary code, needs the same class importable, and no other tool can read it."
        ),
        key_points=(
            kp("adapter_config.json + adapter_model.safetensors", "adapter_config", "config json", "json"),
            kp("key names with lora_A/lora_B and their shapes", "lora_a", "key"),
            kp("safetensors: safe, no code execution, mmap", "safe", "code execution", "mmap"),
            kp("pickle runs code and needs the class", "pickle"),
        ),
        corrects_article=True,
        source="PEFT save_pretrained (SAFETENSORS_WEIGHTS_NAME = adapter_model.safetensors); the article's save_lora_weights",
        follow_ups=("What error does PEFT give for missing adapter keys (peft#2566)?",),
    ),
    Item(
        id="deploy.unmerged-latency", topic="deployment", kind="choice", difficulty=2,
        prompt="Serving a LoRA adapter unmerged (r=16 on a 4096x4096 projection) adds roughly what fraction of that layer's FLOPs per token?",
        choices=("About 0.8% (2 x 16 x 4096 / 4096^2)", "About 50%", "About 100% (it doubles)", "Nothing at all"),
        correct=0,
        answer=(
            "The base matmul costs in x out = 16.8M multiply-adds per token; A x and B (A x) cost r (in + out) "
            "= 131,072, i.e. 2r/d = 0.78%. In practice the two extra kernel launches and the memory traffic cost "
            "more than the FLOPs at small batch, which is why merging is preferred for single-adapter serving."
        ),
        key_points=(kp("r (in + out) vs in x out", "r"), kp("2r/d", "2r")),
        source="FLOP count of a linear layer; LoRA paper Section 4.2",
        follow_ups=("Why can the measured slowdown be much larger than 0.8%?",),
    ),
    Item(
        id="deploy.missing-keys", topic="deployment", kind="free", difficulty=2,
        prompt="You load a LoRA adapter and PEFT warns about missing adapter keys (or the outputs are identical to the base model). What happened and how do you check?",
        answer=(
            "The adapter's key names did not match the model's modules, so those lora_A/lora_B weights were never "
            "loaded and stayed at their initialisation: B = 0, so the adapter is a silent no-op. Typical causes: the "
            "adapter was trained on another base model or architecture (module names differ), a different prefix "
            "(base_model.model. missing or doubled after wrapping twice), different target_modules in "
            "adapter_config.json, or saved from a model with modules_to_save/extra layers. Check: compare the set of "
            "lora keys in adapter_model.safetensors with the model's state dict (no missing, no unexpected), "
            "compare logits with the adapter enabled and disabled (they must differ), and treat missing-key "
            "warnings as errors in tests."
        ),
        key_points=(
            kp("key names do not match: weights not loaded", "key names did not match", "never loaded", "not loaded"),
            kp("B stays zero: silent no-op", "silent no-op", "b = 0", "stayed at their initialisation"),
            kp("wrong base model / prefix / target modules", "another base model", "prefix", "different target_modules"),
            kp("compare key sets and logits with adapter on and off", "enabled and disabled", "compare logits", "compare the set"),
        ),
        source="peft#2566 (missing adapter keys on load); PEFT set_peft_model_state_dict / load_adapter warnings",
        follow_ups=("How would you make a missing key fail loudly in lora_ref.adapters.load_adapter?",),
    ),
]

PRECISION = [
    Item(
        id="mp.considerations", topic="mixed-precision", kind="free", difficulty=2,
        prompt="What should you consider for mixed-precision training when fine-tuning?",
        answer=(
            "Pick bf16 where supported (Ampere or newer): same exponent range as fp32, so no overflow and no "
            "loss scaling; fp16 (5 exponent bits, max 65504) can overflow in activations or attention logits "
            "of models pre-trained in bf16 and underflow small gradients, so it needs dynamic loss scaling "
            "(GradScaler). Keep numerically sensitive operations (softmax, layer norm, the loss, reductions) in "
            "fp32 (autocast does), keep optimizer state and master weights in fp32 when updating full weights, "
            "and keep LoRA adapter weights in fp32 over a bf16 base (PEFT autocast_adapter_dtype). For QLoRA set "
            "the compute dtype to bf16 explicitly. Watch for NaN/inf losses and skipped steps."
        ),
        key_points=(
            kp("bf16: fp32 range, no loss scaling", "bf16"),
            kp("fp16: overflow (65504) and underflow", "65504", "overflow"),
            kp("loss scaling for fp16 (GradScaler)", "lossscaling"),
            kp("sensitive ops and optimizer/master weights in fp32", "fp32", "master"),
            kp("adapters in fp32 over bf16 base", "adapter"),
        ),
        source="Micikevicius et al. 2018 (arXiv 1710.03740); torch.amp autocast and GradScaler docs; PEFT autocast_adapter_dtype",
        follow_ups=("Why are pre-trained-in-bf16 models risky to fine-tune in fp16?",),
    ),
    Item(
        id="mp.formats", topic="mixed-precision", kind="choice", difficulty=1,
        prompt="Which is right about bf16 versus fp16?",
        choices=("bf16 has more mantissa bits and less range than fp16",
                 "bf16 has 8 exponent bits (fp32's range) and 7 mantissa bits; fp16 has 5 exponent and 10 mantissa bits",
                 "both have 8 exponent bits",
                 "bf16 cannot represent values above 65504"),
        correct=1,
        answer=(
            "bf16: 1 sign, 8 exponent, 7 mantissa bits, range up to about 3.4e38 like fp32, but only about 2-3 "
            "significant decimal digits (machine epsilon 2^-7 = 0.0078). fp16: 1, 5, 10: max 65504, smallest "
            "normal 6.1e-5, epsilon 2^-10 = 0.00098. bf16 trades precision for range; fp16 the opposite."
        ),
        key_points=(kp("bf16 8 exponent 7 mantissa", "8"), kp("fp16 5 exponent 10 mantissa, max 65504", "65504")),
        source="IEEE 754 binary16; bfloat16 format (torch.finfo)",
        follow_ups=("What is torch.finfo(torch.bfloat16).eps?",),
    ),
    Item(
        id="mp.loss-scaling", topic="mixed-precision", kind="free", difficulty=2,
        prompt="Explain dynamic loss scaling: what it fixes and how GradScaler works.",
        answer=(
            "In fp16, small gradients (below about 6e-8, or 6e-5 for normal numbers) underflow to zero. "
            "Multiplying the loss by a large factor S (e.g. 2^16) scales every gradient by S into fp16's range; "
            "before the optimizer step the gradients are unscaled (divided by S) in fp32. If any gradient is "
            "inf or NaN, the step is skipped and S is halved; after N (2000) clean steps S is doubled. With "
            "gradient clipping, unscale first (scaler.unscale_(optimizer)), then clip. bf16 does not need it."
        ),
        key_points=(
            kp("small gradients underflow in fp16", "underflow"),
            kp("multiply loss by S, unscale gradients before the step", "unscal", "multiply", "scale"),
            kp("skip step and lower S on inf/NaN", "skip", "inf", "nan"),
            kp("grow S after clean steps", "grow", "doubl", "increas"),
            kp("unscale before clipping", "clip"),
        ),
        source="Micikevicius et al. 2018 Section 3.2; torch.amp.GradScaler (init_scale=2**16, growth_interval=2000)",
        follow_ups=("Why is a static scale fragile?",),
    ),
    Item(
        id="mp.fp16-overflow", topic="mixed-precision", kind="choice", difficulty=2,
        prompt="A bf16-pretrained model fine-tuned in fp16 gives NaN losses after a few steps; in bf16 it trains fine. Most likely cause?",
        choices=("Activations or attention logits exceed fp16's maximum of 65504 and overflow to inf",
                 "bf16 has more mantissa bits",
                 "The learning rate is too low",
                 "fp16 cannot represent zero"),
        correct=0,
        answer=(
            "Models trained in bf16 can develop activations larger than fp16 can hold (e.g. T5, some Llama layers); "
            "they overflow to inf and inf - inf gives NaN. Loss scaling does not fix overflow in the forward pass. "
            "Fine-tune in the dtype the model was trained in (bf16), or keep the affected ops in fp32."
        ),
        key_points=(kp("overflow past 65504", "65504"), kp("use bf16", "bf16")),
        source="fp16 range (torch.finfo(torch.float16).max = 65504); transformers docs on T5 fp16 NaNs",
        follow_ups=("Why does loss scaling not help here?",),
    ),
    Item(
        id="mp.update-rounding", topic="mixed-precision", kind="free", difficulty=3,
        prompt="Why do optimizers keep an fp32 master copy of the weights, even when the forward pass runs in bf16?",
        answer=(
            "An update lr * g is often much smaller than the weight: with bf16's 8 significant bits, any update "
            "below about w / 256 (half a unit in the last place) rounds to nothing, so w + update == w and training "
            "stalls. Accumulating updates in an fp32 master copy (24 bits of significand) keeps them; the bf16 "
            "copy is re-cast from the master for each forward. Stochastic rounding or Kahan summation are "
            "alternatives for pure-bf16 training. For LoRA this matters for the adapters, not the frozen base."
        ),
        key_points=(
            kp("small updates round away in bf16", "round"),
            kp("fp32 master copy accumulates updates", "master", "fp32"),
            kp("bf16 copy cast from the master for the forward", "cast", "copy"),
            kp("alternatives: stochastic rounding / Kahan", "stochastic", "kahan"),
        ),
        source="Micikevicius et al. 2018 Section 3.1 (FP32 master copy of weights)",
        follow_ups=("What is 1.0 + 0.001 in bf16?",),
    ),
    Item(
        id="mp.qlora-dtypes", topic="mixed-precision", kind="free", difficulty=2,
        prompt="In QLoRA, which tensors are in which dtype?",
        answer=(
            "Frozen base weights: NF4 (4-bit codes, two per byte) with their blockwise constants (8-bit with double "
            "quantisation, plus fp32 second-level constants). Compute: bf16 (each weight block is dequantised to "
            "bf16 for the matmul; activations in bf16). LoRA adapters: bf16 in the paper (PEFT may keep them in "
            "fp32). Optimizer state: 32-bit paged AdamW for the adapters (or 8-bit). Layer norms are often kept "
            "in fp32 for stability (prepare_model_for_kbit_training)."
        ),
        key_points=(
            kp("base weights NF4 with quantised constants", "nf4 codes", "base weights nf4", "frozen base nf4"),
            kp("compute dtype bf16", "compute bf16", "compute dtype bf16"),
            kp("adapters in 16 or 32 bits", "lora adapters bf16", "adapters fp32", "adapters in bf16"),
            kp("optimizer state 32-bit (paged)", "optimizer state 32 bit", "paged adamw"),
        ),
        source="QLoRA Section 3 (storage vs computation data type); PEFT prepare_model_for_kbit_training",
        follow_ups=("What happens if the compute dtype is left at the fp32 default?",),
    ),
    Item(
        id="mp.bf16-eps", topic="mixed-precision", kind="choice", difficulty=2,
        prompt="In bf16, what is 1.0 + 0.001?",
        choices=("1.001", "1.0: the spacing of bf16 just above 1.0 is 2^-7 = 0.0078, so 0.001 rounds away", "1.0078", "inf"),
        correct=1,
        answer=(
            "bf16 keeps 7 stored mantissa bits, so representable numbers just above 1.0 are 1.0, 1.0078, 1.0156, ... "
            "1.001 rounds to 1.0. This is why small weight updates and adapter merges need fp32 accumulation."
        ),
        key_points=(kp("spacing 2^-7", "0.0078"), kp("rounds to 1.0", "1.0")),
        source="torch.finfo(torch.bfloat16).eps == 0.0078125",
        follow_ups=("And in fp16?",),
    ),
]

ITEMS = EVALUATION + DEPLOYMENT + PRECISION
