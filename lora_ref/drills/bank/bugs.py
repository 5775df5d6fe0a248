"""Bank: spot-the-bug items built from the seed article's code, and code-level implementation questions.

Each code excerpt is quoted from the article (lightly trimmed); ``bug_lines`` are 1-based lines of the
excerpt. What the bug is, and the fix, is in the model answer.
"""
from ..items import Item, kp

_ARTICLE = "the seed article"

BUGS = [
    Item(
        id="bug.lora-init-fan", topic="implementation", kind="bug", difficulty=3,
        prompt="This is the article's LoRA parameter set-up (in_features=4096, rank=16). What is wrong with the initialisation scale of A?",
        code=(
            "self.lora_A = nn.Parameter(torch.zeros(in_features, rank))\n"
            "self.lora_B = nn.Parameter(torch.zeros(rank, out_features))\n"
            "self.scaling = alpha / rank\n"
            "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))\n"
            "nn.init.zeros_(self.lora_B)\n"
        ),
        bug_lines=(1, 4),
        answer=(
            "kaiming_uniform_ takes fan_in from dimension 1 of a 2-D tensor. With A stored as (in, r) that is r, "
            "so the bound is 1/sqrt(r) = 0.25 instead of 1/sqrt(in) = 1/64: A is 16x larger than in PEFT, "
            "whose A is (r, in) (lines 1 and 4). With B = 0 the start is still exact, but B's gradient "
            "(proportional to A x) is 16x larger, so learning rates tuned on PEFT do not transfer and the "
            "adapter cannot be exported without a transpose. Fix: store A as (r, in) and B as (out, r), "
            "delta W = scaling * B @ A."
        ),
        key_points=(
            kp("fan_in taken from dim 1 = r, not in", "fan in", "fan_in"),
            kp("A is 16x larger than PEFT's (bound 1/sqrt(r))", "16", "larger", "sqrt r", "bound"),
            kp("store A as (r, in), B as (out, r)", "r in", "out r", "transpose"),
        ),
        corrects_article=True,
        source="torch.nn.init._calculate_fan_in_and_fan_out (fan_in = tensor.size(1)); PEFT lora_A = nn.Linear(in, r); " + _ARTICLE,
        follow_ups=("Does this change the function at step 0? Why not?",),
    ),
    Item(
        id="bug.clone", topic="implementation", kind="bug", difficulty=2,
        prompt="The article's apply_lora_to_model replaces each target nn.Linear like this. What is wrong?",
        code=(
            "lora_layer = LoRALinear(module.in_features, module.out_features,\n"
            "                        rank=config.rank, alpha=config.alpha,\n"
            "                        dropout=config.dropout, bias=module.bias is not None)\n"
            "lora_layer.linear.weight.data = module.weight.data.clone()\n"
            "if module.bias is not None:\n"
            "    lora_layer.linear.bias.data = module.bias.data.clone()\n"
            "setattr(parent, parent_name, lora_layer)\n"
        ),
        bug_lines=(1, 4, 6),
        answer=(
            "Line 1 builds a brand-new nn.Linear inside LoRALinear (random init, fp32, on the CPU) and lines 4 and 6 "
            "copy the pretrained weight into it with clone(): for a moment two copies of every weight exist (memory), the "
            "random init is wasted work, and the new layer does not keep the original's device or dtype unless "
            "the clone happens to bring them (the LoRA A/B parameters stay fp32 on the CPU while the model is on "
            "the GPU). It also breaks ties to the original parameter (shared or quantised weights, hooks). Fix: "
            "wrap the existing module (LoRALinear(base_layer=module)), never copy it, and create A and B on the "
            "base weight's device and dtype."
        ),
        key_points=(
            kp("copies (clones) the weights: double memory", "clone", "copy", "copies", "double"),
            kp("random init of a new Linear is wasted", "random", "new linear", "wasted"),
            kp("device/dtype of A, B not matched to the base", "device", "dtype", "cpu"),
            kp("wrap the original module instead", "wrap"),
        ),
        corrects_article=True,
        source="STYLE.md lesson 1 (wrap, never clone); PEFT LoraLayer keeps base_layer; " + _ARTICLE,
        follow_ups=("How do the state-dict keys change when you wrap instead of replace?",),
    ),
    Item(
        id="bug.labels", topic="implementation", kind="bug", difficulty=2,
        prompt="The article's training step for a customer-service chatbot. Which line is wrong for instruction tuning, and why?",
        code=(
            "for batch in train_dataset:\n"
            "    inputs = self.tokenizer(batch['conversations'], return_tensors='pt',\n"
            "                            padding=True, truncation=True, max_length=512)\n"
            "    outputs = self.base_model(**inputs, labels=inputs['input_ids'])\n"
            "    loss = outputs.loss\n"
            "    loss.backward()\n"
        ),
        bug_lines=(4,),
        answer=(
            "Line 4: labels=input_ids trains on every token, including the customer's prompt, the system text, "
            "the chat template and the padding tokens added by padding=True (which are not set to -100). The "
            "model learns to predict prompts and pads; with pad = eos it learns to emit end-of-sequence runs. "
            "Fix: build labels with -100 on every non-answer token and on padding (loss on the answer only). "
            "Also: Llama-style tokenizers have no pad token, so padding=True fails until one is set."
        ),
        key_points=(
            kp("loss on the prompt tokens", "prompt"),
            kp("padding tokens not masked", "padding", "pad"),
            kp("set non-answer labels to -100", "100", "ignore"),
        ),
        corrects_article=True,
        source="transformers causal-LM loss (labels shifted, -100 ignored); QLoRA reference code qlora.py (train_on_source=False); " + _ARTICLE,
        follow_ups=("Write encode_example so that only answer tokens carry labels.",),
    ),
    Item(
        id="bug.eval-score", topic="evaluation", kind="bug", difficulty=2,
        prompt="The article's evaluation function. What is wrong?",
        code=(
            "def _evaluate(self, eval_dataset):\n"
            "    self.base_model.eval()\n"
            "    total_score = 0.0\n"
            "    with torch.no_grad():\n"
            "        for batch in eval_dataset:\n"
            "            inputs = self.tokenizer(batch['conversations'], return_tensors='pt')\n"
            "            outputs = self.base_model(**inputs, labels=inputs['input_ids'])\n"
            "            total_score += torch.exp(outputs.loss).item()\n"
            "    return total_score / len(eval_dataset)\n"
        ),
        bug_lines=(8, 9),
        answer=(
            "Lines 8-9 average per-batch perplexities and call the result a score: perplexity is lower-is-better, "
            "is not a task metric, and the mean of exp(batch loss) is not the corpus perplexity, which is "
            "exp(total loss / total tokens) (token-weighted). Line 7 also scores the prompt tokens, and line 6 "
            "tokenises a batch of different-length conversations without padding, which fails for batches. "
            "Report held-out answer-token loss and a task metric."
        ),
        key_points=(
            kp("perplexity, lower is better, not a score", "perplexit", "lower"),
            kp("mean of per-batch exp is not token-weighted corpus perplexity", "token", "weight"),
            kp("prompt tokens in the loss", "prompt"),
            kp("no padding for a batch", "padding", "pad"),
        ),
        corrects_article=True,
        source="Perplexity definition; " + _ARTICLE,
        follow_ups=("What task metric fits a customer-service bot?",),
    ),
    Item(
        id="bug.nf4-table", topic="qlora", kind="bug", difficulty=2,
        prompt="The article's NF4 code table for QLoRALinear. What is wrong with it?",
        code=(
            "nf4_values = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844,\n"
            "                           -0.1848, -0.0911, 0.0, 0.0911, 0.1848,\n"
            "                           0.2844, 0.3949, 0.5251, 0.6962, 1.0, float('inf')])\n"
        ),
        bug_lines=(2, 3),
        answer=(
            "NF4 has 16 finite values: 7 negative, zero, 8 positive (asymmetric so that zero is exact). The "
            "article mirrors the negative half on line 2 (0.0911, ..., 0.6962), which is wrong: the positive values are "
            "0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0 (bitsandbytes get_4bit_type('nf4')). "
            "Having one value too few it pads the table with float('inf') on line 3: any weight mapped to code 15 "
            "dequantises to inf and the layer outputs inf/NaN. Compute the table from normal quantiles "
            "(create_normal_map) instead of typing rounded constants."
        ),
        key_points=(
            kp("inf as the 16th code gives inf/NaN weights", "inf", "nan"),
            kp("positive half mirrored: wrong values", "mirror", "symmetric", "positive"),
            kp("real NF4: 8 positive, 7 negative, exact zero", "8 positive", "asymmetric", "0.0796", "0.7230"),
            kp("compute from normal quantiles", "quantile", "compute"),
        ),
        corrects_article=True,
        source="bitsandbytes functional.create_normal_map / get_4bit_type('nf4'); QLoRA Section 3; " + _ARTICLE,
        follow_ups=("Why is an exact zero worth an asymmetric table?",),
    ),
    Item(
        id="bug.scale-7", topic="qlora", kind="bug", difficulty=2,
        prompt="The article's blockwise NF4 quantiser. Find the scaling bug.",
        code=(
            "for i in range(0, weight_flat.numel(), block_size):\n"
            "    block = weight_flat[i:i+block_size]\n"
            "    scale = block.abs().max() / 7  # 4-bit range [-7,7]\n"
            "    scale_blocks.append(scale)\n"
            "    normalized = block / scale\n"
            "    quantized = torch.searchsorted(nf4_values, normalized)\n"
            "    quantized = torch.clamp(quantized, 0, 15)\n"
        ),
        bug_lines=(3,),
        answer=(
            "Line 3 mixes two schemes: /7 is the scale of symmetric int4 (levels -7..7), but NF4 codes lie in "
            "[-1, 1]. Dividing by absmax/7 puts the normalised block in [-7, 7], so most values fall outside the "
            "codebook and land on the end codes (including the inf entry): the weight is destroyed. NF4 uses "
            "scale = absmax (normalised block in [-1, 1]). An all-zero block also gives 0/0 = NaN; guard it."
        ),
        key_points=(
            kp("/7 is int4's range; NF4 codes are in [-1, 1]", "7", "int4", "1 1"),
            kp("values pushed outside the codebook onto the end codes", "outside", "end", "clamp", "saturat"),
            kp("scale should be absmax", "absmax"),
            kp("zero block divides by zero", "zero", "nan"),
        ),
        corrects_article=True,
        source="QLoRA Section 2-3 (absmax blockwise quantisation to [-1, 1]); " + _ARTICLE,
        follow_ups=("What relative error does a correct NF4 round trip give on N(0, 0.02) weights? (about 0.092)",),
    ),
    Item(
        id="bug.searchsorted", topic="qlora", kind="bug", difficulty=3,
        prompt="Same quantiser. Assume the scale were fixed: what is still wrong with how values are mapped to codes?",
        code=(
            "normalized = block / scale\n"
            "quantized = torch.searchsorted(nf4_values, normalized)\n"
            "quantized = torch.clamp(quantized, 0, 15)\n"
            "quantized_blocks.append(quantized)\n"
        ),
        bug_lines=(2,),
        answer=(
            "Line 2: torch.searchsorted returns the insertion index: the first code >= the value, not the nearest code. "
            "Every value rounds up to the next code, a systematic bias (e.g. 0.01 maps to 0.0796 instead of 0). "
            "Quantisation must pick the nearest code: argmin |x - code|, or searchsorted/bucketize against the "
            "midpoints between consecutive codes, which is what bitsandbytes does."
        ),
        key_points=(
            kp("searchsorted gives the insertion index (rounds up)", "insert", "round up", "first", "next"),
            kp("must be the nearest code", "nearest"),
            kp("use midpoints / argmin", "midpoint", "argmin", "bucketiz"),
            kp("systematic bias", "bias"),
        ),
        corrects_article=True,
        source="torch.searchsorted semantics; bitsandbytes NF4 quantisation (nearest code via decision tree on midpoints); " + _ARTICLE,
        follow_ups=("Write the midpoint bucketize version.",),
    ),
    Item(
        id="bug.view-transpose", topic="qlora", kind="bug", difficulty=3,
        prompt="The article's QLoRALinear dequantises and applies the base weight (quantised from an nn.Linear weight of shape (out, in)). Find the bug.",
        code=(
            "def forward(self, x):\n"
            "    base_weight = self.dequantize_weight()\n"
            "    base_output = F.linear(x, base_weight.T)\n"
            "    lora_output = (x @ self.lora_A @ self.lora_B) * self.scaling\n"
            "    return base_output + lora_output\n"
            "# in dequantize_weight():\n"
            "    return dequantized.view(self.in_features, self.out_features)\n"
        ),
        bug_lines=(7, 3),
        answer=(
            "An nn.Linear weight is (out, in), flattened row-major when quantised. .view(in, out) reinterprets "
            "that memory with a different row length: it is not a transpose, so the elements are scrambled "
            "(for a square layer it silently yields W itself, and line 3's .T then gives x W instead of x W^T). "
            "Fix: .view(out_features, in_features) and F.linear(x, W) with no transpose. It also dequantises the "
            "whole weight in a Python loop on every forward: extremely slow (about 22 s for one 11008x4096 "
            "weight on CPU) and it keeps the fp32 copy alive for backward."
        ),
        key_points=(
            kp("view is not a transpose: elements scrambled", "view", "scrambl", "not a transpose", "reinterpret"),
            kp("weight is (out, in)", "out in"),
            kp("view(out, in) and F.linear without .T", "f linear", "no transpose", "without"),
            kp("dequantising in a Python loop each forward is slow", "slow", "loop"),
        ),
        corrects_article=True,
        source="torch.Tensor.view semantics; nn.Linear weight layout (out_features, in_features); ANCHORS (article's loop ~22 s per weight); " + _ARTICLE,
        follow_ups=("How would a custom autograd.Function save only the 4-bit weight for backward?",),
    ),
    Item(
        id="bug.merge-weights", topic="deployment", kind="bug", difficulty=3,
        prompt="The article's merge. The model is in bf16 on a GPU. What goes wrong?",
        code=(
            "def merge_weights(self):\n"
            "    if not self.linear.weight.requires_grad:\n"
            "        merged_weight = self.linear.weight.data + (self.lora_A @ self.lora_B * self.scaling).T\n"
            "        merged_linear = nn.Linear(self.in_features, self.out_features, bias=self.linear.bias is not None)\n"
            "        merged_linear.weight.data = merged_weight\n"
            "        if self.linear.bias is not None:\n"
            "            merged_linear.bias.data = self.linear.bias.data\n"
            "        return merged_linear\n"
        ),
        bug_lines=(3, 4),
        answer=(
            "Line 3 computes the delta in the weights' dtype (bf16) and with autograd tracking (lora_A and lora_B "
            "require grad): the small delta is rounded in bf16 before the add, and a graph is built for nothing. "
            "Compute the delta in fp32 under no_grad (PEFT casts half weights to fp32 on the CPU) and check the result "
            "is finite (PEFT's safe_merge=True). Line 4 builds a new "
            "nn.Linear on the default device and dtype (fp32, CPU) with a wasted random init; assigning .data "
            "then silently gives a layer whose parameters are whatever merged_weight was, while its bias may be "
            "on another device. There is also no merged flag, so nothing stops a double merge, and no unmerge."
        ),
        key_points=(
            kp("delta computed in bf16 (rounding), should be fp32", "fp32", "bf16", "round"),
            kp("autograd tracked: use no_grad/detach", "no grad", "no_grad", "detach", "autograd"),
            kp("new Linear on default device/dtype, wasted init", "device", "dtype", "new linear"),
            kp("no merged flag / unmerge", "flag", "twice", "double merge", "unmerge", "idempot"),
        ),
        corrects_article=True,
        source="PEFT lora.layer.Linear.merge/get_delta_weight (fp32 cast for half weights, safe_merge NaN check); " + _ARTICLE,
        follow_ups=("Write merge/unmerge so that unmerge(merge(W)) == W to within rounding.",),
    ),
    Item(
        id="bug.memory-estimate", topic="sizing", kind="bug", difficulty=2,
        prompt="The article's memory analysis (FP16 model, Adam). Which lines misjudge the training memory?",
        code=(
            "original_memory_gb = original_total_params * 2 / 1e9\n"
            "lora_memory_gb = (lora_total_params * 2) / 1e9\n"
            "original_training_memory = original_memory_gb * 4  # params + grads + Adam states\n"
            "lora_training_memory = original_memory_gb + lora_memory_gb * 4\n"
            "memory_reduction = original_training_memory / lora_training_memory\n"
        ),
        bug_lines=(3, 4),
        answer=(
            "Line 3 prices Adam training at 4 x 2 = 8 bytes per parameter; mixed-precision Adam needs 16 (fp16 "
            "weights 2 + fp16 gradients 2 + fp32 master 4 + two fp32 moments 8), so full fine-tuning is "
            "underestimated by 2x. Line 4 likewise gives the adapter 8 bytes per parameter instead of 16, and "
            "both lines ignore activations, which dominate LoRA's memory at realistic batch and sequence "
            "lengths. Also, original_total_params counts only q,k,v,o (4 d^2 per layer), about a third of a "
            "Llama block's weights: the MLP is missing."
        ),
        key_points=(
            kp("16 bytes per parameter for mixed-precision Adam, not 8", "16"),
            kp("fp32 master weights and moments", "master", "fp32"),
            kp("activations ignored", "activation"),
            kp("only attention counted, MLP missing", "mlp", "attention"),
        ),
        corrects_article=True,
        source="ZeRO paper Section 3.1 (16 bytes/param); " + _ARTICLE,
        follow_ups=("Recompute the figure for Llama-2-7B with lora_ref.memory.",),
    ),
]

IMPLEMENTATION = [
    Item(
        id="impl.freeze", topic="implementation", kind="free", difficulty=2,
        prompt=("The article's apply_lora_to_model replaces target layers (setting only their own weight's "
                "requires_grad=False) and returns. Its trainer then builds AdamW over all parameters with "
                "requires_grad. What gets trained?"),
        answer=(
            "Everything that is not a replaced linear: embeddings, the lm_head, norms and every non-target "
            "linear (e.g. the MLP when targeting attention) keep requires_grad=True, so AdamW trains and keeps "
            "optimizer state for most of the model: it is full fine-tuning plus adapters, with none of LoRA's "
            "memory savings, and the printed 'trainable ratio' shows it. Fix: freeze all parameters first, then "
            "enable only lora_A/lora_B (PEFT's mark_only_lora_as_trainable), and check with a parameter count."
        ),
        key_points=(
            kp("other parameters stay trainable (embeddings, norms, MLP, lm_head)", "keep requires_grad", "stay trainable", "still trainable", "remain trainable"),
            kp("effectively full fine-tuning: no memory savings", "full fine-tuning", "no memory saving"),
            kp("freeze everything, then enable only A and B", "freeze all", "freeze everything", "only lora"),
            kp("check with a parameter count", "parameter count", "trainable ratio", "count trainable"),
        ),
        corrects_article=True,
        source="PEFT mark_only_lora_as_trainable; lora_ref.lora.inject_lora (freezes everything else); " + _ARTICLE,
        follow_ups=("How many parameters would the article's trainer report as trainable for Llama-2-7B?",),
    ),
    Item(
        id="impl.wrap-keys", topic="implementation", kind="free", difficulty=2,
        prompt="If LoRA wraps a frozen nn.Linear (self.base_layer = module) instead of copying it, what happens to the state-dict keys, and why does it matter?",
        answer=(
            "The wrapped weight moves from ...q_proj.weight to ...q_proj.base_layer.weight, and new keys "
            "...q_proj.lora_A.weight / lora_B.weight appear. Loading an original checkpoint into the wrapped "
            "model needs the keys remapped (PEFT does this), and merge_and_unload must put a plain Linear back so "
            "the merged checkpoint has the original key names and loads without PEFT. Wrapping keeps the very "
            "same parameter object (no copy, same device, dtype, quantised type, hooks)."
        ),
        key_points=(
            kp("weight key gains base_layer", "base_layer"),
            kp("lora_A / lora_B keys added", "lora_A.weight", "lora_a key", "new keys"),
            kp("merge_and_unload restores original names", "unload", "original name", "restor"),
            kp("same parameter object, no copy", "no copy", "same parameter object", "very same parameter"),
        ),
        source="PEFT LoraLayer.base_layer and merge_and_unload; STYLE.md lesson 1",
        follow_ups=("What error do you see when loading an adapter whose keys do not match (peft#2566)?",),
    ),
    Item(
        id="impl.merge-invariants", topic="implementation", kind="free", difficulty=2,
        prompt="Which invariants should tests of a LoRA layer's merge check?",
        answer=(
            "Merged and unmerged outputs agree (to dtype tolerance) in eval mode; merge is idempotent (merging "
            "twice does not add delta twice: a merged flag); unmerge(merge(W)) == W within rounding; the frozen "
            "base weight is unchanged by training until merge; delta W = scaling * B @ A with shape (out, in); "
            "with B = 0 the adapted model equals the base; non-finite merged weights raise an error; merging "
            "half-precision weights computes the delta in fp32."
        ),
        key_points=(
            kp("merged == unmerged outputs", "output", "same", "agree"),
            kp("idempotent merge (flag)", "idempot", "twice", "flag"),
            kp("unmerge is the inverse", "unmerge", "invers"),
            kp("base weight unchanged by training", "unchanged", "base weight"),
            kp("non-finite check, fp32 delta", "finite", "nan", "fp32"),
        ),
        source="litgpt/torchtune/PEFT test patterns; PEFT safe_merge; STYLE.md lesson 6",
        follow_ups=("What tolerance would you use for bf16?",),
    ),
    Item(
        id="impl.checkpointing", topic="implementation", kind="free", difficulty=3,
        prompt="With LoRA and gradient checkpointing (reentrant), training runs but the adapters never change. Why, and what is the fix?",
        answer=(
            "With the embeddings frozen, the hidden states entering the first checkpointed block do not require "
            "grad. Reentrant torch.utils.checkpoint only builds a backward for a segment whose inputs require "
            "grad, so the adapters inside get no gradients (PyTorch warns 'None of the inputs have "
            "requires_grad=True'). Fix: model.enable_input_require_grads() (a hook making the embedding output "
            "require grad; PEFT's prepare_model_for_kbit_training does it), or use non-reentrant checkpointing "
            "(use_reentrant=False). Check that lora_B's gradient is non-zero after one step."
        ),
        key_points=(
            kp("checkpointed segment inputs do not require grad", "require grad", "requires_grad"),
            kp("frozen embeddings", "embedding", "frozen"),
            kp("enable_input_require_grads or use_reentrant=False", "enable_input_require_grads", "reentrant"),
            kp("check gradients are non-zero", "check", "non zero", "nonzero"),
        ),
        source="torch.utils.checkpoint (use_reentrant); transformers PreTrainedModel.enable_input_require_grads; PEFT prepare_model_for_kbit_training",
        follow_ups=("What does gradient checkpointing cost in compute?",),
    ),
    Item(
        id="impl.param-count-check", topic="implementation", kind="choice", difficulty=1,
        prompt="After injecting LoRA (r=16, all 7 linear projections) into Llama-2-7B, a correct trainable-parameter count is about:",
        choices=("40.0M trainable of 6.78B (0.59%)", "6.74B trainable (100%)", "16.8M trainable", "131K trainable"),
        correct=0,
        answer=(
            "Per layer: q,k,v,o each 16 x (4096 + 4096) = 131,072; gate and up 16 x (4096 + 11008) = 241,664; "
            "down 16 x (11008 + 4096) = 241,664; total 1,249,280 per layer x 32 = 39,976,960 (the figure PEFT "
            "reports). 6.74B + 40M = 6.78B total. 16.8M is q,k,v,o only; 131K is one matrix; 100% means nothing "
            "was frozen (the article's injector)."
        ),
        key_points=(kp("39,976,960", "39976960", "40"), kp("per layer sum", "layer")),
        source="ANCHORS (39,976,960 at r=16 on all 7 projections of Llama-2-7B); PEFT print_trainable_parameters",
        follow_ups=("And for Llama-3-8B, whose k/v projections are 1024 wide (GQA)?",),
    ),
]

ITEMS = BUGS + IMPLEMENTATION
