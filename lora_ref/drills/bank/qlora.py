"""Bank: QLoRA (arXiv 2305.14314, Section 3 and 4) and its bitsandbytes implementation."""
from ..items import Item, kp

ITEMS = [
    Item(
        id="qlora.three", topic="qlora", kind="free", difficulty=1,
        prompt="What are the three innovations of QLoRA?",
        answer=(
            "(1) 4-bit NormalFloat (NF4): a 4-bit data type whose 16 levels are quantiles of a normal "
            "distribution, information-theoretically optimal for normally distributed weights, applied "
            "blockwise (64 weights per absmax constant). (2) Double quantisation: the fp32 absmax constants "
            "(32/64 = 0.5 bits per parameter) are themselves quantised to 8 bits in blocks of 256, cutting "
            "them to 8/64 + 32/(64*256) = 0.127 bits per parameter (about 3 GB saved on a 65B model). "
            "(3) Paged optimizers: optimizer states live in NVIDIA unified memory and are paged to CPU RAM "
            "when the GPU runs out, so gradient-checkpointing memory spikes on long sequences do not crash "
            "training. The article's review checklist names a 'dual-weight scheme' in double quantisation's "
            "place and never says what it means. Plausible readings: QLoRA's one storage data type (NF4) and one "
            "computation data type (bf16), Section 3, where each weight is dequantised on the fly and no second "
            "copy is kept; the frozen 4-bit base beside the 16-bit LoRA weights; or a garbled 'double "
            "quantisation'. The first two describe how any 4-bit LoRA layer works, not a contribution of the "
            "paper; the third names the right idea wrongly. Answer with the paper's three."
        ),
        key_points=(
            kp("NF4: 4-bit NormalFloat from normal quantiles", "nf4"),
            kp("double quantisation of the quantisation constants", "doublequant", "quantiz constant"),
            kp("paged optimizers via unified memory", "paged", "pag"),
            kp("'dual-weight scheme' is not the paper's term (storage vs compute dtype? double quantisation?)",
               "dual weight", "dual", "storage"),
        ),
        corrects_article=True,
        source="QLoRA paper Section 3 (4-bit NormalFloat, Double Quantization, Paged Optimizers)",
        follow_ups=("How many bits per parameter do the constants cost with and without double quantisation?",
                    "Which of the three saves the most memory on a 65B model?"),
    ),
    Item(
        id="qlora.not-innovation", topic="qlora", kind="choice", difficulty=1,
        prompt="Which of these is NOT one of QLoRA's three innovations?",
        choices=("4-bit NormalFloat (NF4)", "Double quantisation of the quantisation constants",
                 "Paged optimizers", "Keeping an fp16 and a 4-bit copy of each weight"),
        correct=3,
        answer=(
            "The three are NF4, double quantisation and paged optimizers (Section 3). QLoRA keeps only the "
            "4-bit weight plus its constants and dequantises block by block to bf16 for each matmul; keeping a "
            "16-bit copy would defeat the point. (The seed article's checklist lists a 'dual-weight scheme' "
            "without defining it: read as two copies of each weight it would be wrong; read as NF4 storage with "
            "bf16 computation it is how every 4-bit layer works, not one of the three.)"
        ),
        key_points=(kp("NF4, double quantisation, paged optimizers", "nf4"), kp("no 16-bit copy kept", "copy")),
        corrects_article=True,
        source="QLoRA paper Section 3",
        follow_ups=("What are QLoRA's storage and compute data types?",),
    ),
    Item(
        id="qlora.accuracy", topic="qlora", kind="free", difficulty=2,
        prompt="How does QLoRA keep 16-bit fine-tuning quality while the base model is in 4 bits?",
        answer=(
            "The 4-bit weights are frozen: there are no 4-bit gradients or updates. Each forward/backward "
            "dequantises a layer's NF4 weights to bf16 (the compute type) and runs the matmul in bf16; "
            "gradients flow through the dequantised weights into 16-bit LoRA adapters, which are trained "
            "normally and can absorb part of the quantisation error. NF4 (optimal for normal weights) with "
            "small blocks (64) keeps that error small, and LoRA must be on all linear layers. The paper shows "
            "NF4 + double quantisation matches 16-bit LoRA and full fine-tuning on GLUE, Super-NaturalInstructions "
            "and MMLU (Section 4, Tables 3-4), while FP4 and int4 lose quality (Table 2 perplexities: Int4 "
            "34.34, FP4 31.07/29.48, NF4+DQ 27.41)."
        ),
        key_points=(
            kp("4-bit base is frozen, no 4-bit gradients", "4 bit weights are frozen", "frozen base", "no 4 bit gradients"),
            kp("dequantised to bf16 compute dtype for each matmul", "dequantiz bf16", "bf16 compute"),
            kp("gradients go to 16-bit LoRA adapters", "16 bit lora adapter", "gradients flow adapters"),
            kp("NF4 with small blocks keeps error small", "small block", "blocks of 64"),
            kp("matches 16-bit results in the paper's benchmarks", "matches 16 bit", "match 16 bit"),
        ),
        source="QLoRA paper Section 3 (eq. 5: Y = X doubleDequant(c1, c2, W) + X L1 L2) and Section 4 (Tables 2-4)",
        follow_ups=("Why is a bf16 adapter on a 4-bit base not the same as 4-bit training?",),
    ),
    Item(
        id="qlora.nf4", topic="qlora", kind="free", difficulty=2,
        prompt="What is NF4 exactly, and how are its 16 values built?",
        answer=(
            "NF4 is a 4-bit codebook of 16 values in [-1, 1] placed at quantiles of N(0, 1), so each bin gets "
            "an equal share of normally distributed weights (quantile quantisation). bitsandbytes builds it "
            "with create_normal_map(offset=0.9677): 8 positive values from norm.ppf(linspace(offset, 0.5, 9)) "
            "(the 0.5 quantile dropped), 7 negative from linspace(offset, 0.5, 8), plus an exact 0, then divides "
            "by the max. It is asymmetric (8 positive, 7 negative) so that zero is exactly representable: "
            "-1, -0.696, ..., -0.091, 0, 0.0796, 0.161, ..., 0.723, 1. A block of 64 weights is divided by its "
            "absmax and each value maps to the nearest code; the 4-bit index and the absmax are stored."
        ),
        key_points=(
            kp("quantiles of a normal distribution", "quantile", "normal"),
            kp("16 values normalised to [-1, 1]", "16", "normaliz"),
            kp("asymmetric: 8 positive, 7 negative, exact zero", "asymmetric", "exact zero", "zero exact"),
            kp("blockwise absmax scaling, nearest code", "absmax", "block"),
        ),
        source="QLoRA paper Section 3 (NF4, eq. 4); bitsandbytes functional.create_normal_map and get_4bit_type('nf4')",
        follow_ups=("Why is NF4 only optimal if weights are normal?", "Why 0.9677 rather than 1 - 1/32?"),
    ),
    Item(
        id="qlora.dq", topic="qlora", kind="free", difficulty=2,
        prompt="Explain double quantisation and compute the memory it saves per parameter.",
        answer=(
            "Blockwise quantisation stores one fp32 absmax per block of 64 weights: 32/64 = 0.5 bits per "
            "parameter on top of the 4 bits. Double quantisation subtracts the mean of the absmax values and "
            "quantises them blockwise (blocks of 256) with an 8-bit float code, keeping one fp32 constant per "
            "256 absmax values: 8/64 + 32/(64*256) = 0.127 bits per parameter. Saving: 0.373 bits per "
            "parameter, about 3 GB on a 65B model (65e9 * 0.373 / 8). Total storage goes from 4.5 to about "
            "4.127 bits per parameter."
        ),
        key_points=(
            kp("absmax per 64 weights costs 0.5 bit/param", "0.5"),
            kp("constants quantised to 8 bits in blocks of 256", "8 bit", "256"),
            kp("0.127 bits per parameter", "0.127"),
            kp("saves about 0.373 bits/param, ~3 GB on 65B", "0.373", "3 gb"),
        ),
        source="QLoRA paper Section 3 (Double Quantization); bitsandbytes quantize_4bit(compress_statistics=True)",
        follow_ups=("Why subtract the mean of the absmax values first?",),
    ),
    Item(
        id="qlora.paged", topic="qlora", kind="free", difficulty=2,
        prompt="What problem do paged optimizers solve, and how?",
        answer=(
            "Memory spikes: with gradient checkpointing, a long sequence (or a big batch) can briefly need more "
            "memory than the GPU has and crash a run that fits on average. Paged optimizers allocate the "
            "optimizer states in NVIDIA unified memory, which the driver pages between GPU and CPU RAM on "
            "demand: when the GPU runs out, states are evicted to the CPU and paged back for the optimizer "
            "step. They prevent out-of-memory errors at a small speed cost; they do not shrink the steady "
            "state (8-bit optimizers do that)."
        ),
        key_points=(
            kp("memory spikes (long sequences, checkpointing)", "spike"),
            kp("NVIDIA unified memory, automatic paging GPU <-> CPU", "unifiedmemory", "cpu"),
            kp("avoids out-of-memory, not steady-state savings", "out of memory", "oom"),
        ),
        source="QLoRA paper Section 3 (Paged Optimizers); bitsandbytes PagedAdamW / optim='paged_adamw_32bit' in transformers",
        follow_ups=("How is a paged optimizer different from an 8-bit optimizer?",),
    ),
    Item(
        id="qlora.blocksize", topic="qlora", kind="free", difficulty=2,
        prompt="Why does QLoRA quantise weights in small blocks (64) with one absmax each, instead of one scale per tensor?",
        answer=(
            "One outlier sets the scale for its whole block: divided by a large absmax, every other value in "
            "the block crowds into the few codes near zero and loses precision. Small blocks confine an outlier's "
            "damage to 64 weights and adapt the scale to local magnitude. The cost is the constants: 32 bits "
            "per 64 weights = 0.5 bits/parameter, which double quantisation cuts to 0.127. Absmax maps the block "
            "onto [-1, 1], NF4's range, and keeps the largest value exact."
        ),
        key_points=(
            kp("outliers set the scale", "outlier"),
            kp("small blocks confine the damage", "block"),
            kp("cost of constants, 0.5 bit/param (0.127 with DQ)", "0.5", "constant"),
            kp("absmax maps block to [-1, 1]", "absmax"),
        ),
        source="QLoRA paper Section 2 (Block-wise k-bit Quantization); bitsandbytes blocksize 64 default (32..4096)",
        follow_ups=("What does the relative error of NF4 look like as the block size grows?",),
    ),
    Item(
        id="qlora.bnb-defaults", topic="qlora", kind="choice", difficulty=2,
        prompt="You load a model with transformers' BitsAndBytesConfig(load_in_4bit=True) and nothing else. What do you get?",
        choices=("NF4, double quantisation, bf16 compute: the QLoRA recipe",
                 "FP4, no double quantisation, fp32 compute dtype",
                 "int4 with per-channel scales",
                 "NF4 without double quantisation, fp16 compute"),
        correct=1,
        answer=(
            "The defaults are bnb_4bit_quant_type='fp4', bnb_4bit_use_double_quant=False and "
            "bnb_4bit_compute_dtype=float32. The QLoRA recipe must say so explicitly: "
            "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16. "
            "fp32 compute is also slow."
        ),
        key_points=(kp("defaults fp4, no DQ, fp32 compute", "fp4"), kp("set nf4, double quant, bf16 explicitly", "nf4")),
        source="transformers BitsAndBytesConfig defaults; QLoRA paper Section 3",
        follow_ups=("How would you check which quant type a loaded model uses?",),
    ),
    Item(
        id="qlora.table2", topic="qlora", kind="choice", difficulty=3,
        prompt="QLoRA Table 2 compares 4-bit data types by mean Pile-CC perplexity (lower is better). Which ordering is right?",
        choices=("NF4+DQ (27.41) < FP4 E3M0 (29.48) < FP4 E2M1 (31.07) < Int4 (34.34)",
                 "Int4 < FP4 < NF4+DQ",
                 "FP4 E2M1 < NF4+DQ < Int4",
                 "All four within 0.1 perplexity"),
        correct=0,
        answer=(
            "Table 2: Int4 34.34, FP4 (E2M1) 31.07, FP4 (E3M0) 29.48, NFloat4 + DQ 27.41. NF4 wins because its "
            "levels match the normal distribution of pretrained weights; int4's evenly spaced levels waste codes "
            "on the rare tails."
        ),
        key_points=(kp("NF4+DQ best", "nf4"), kp("int4 worst", "int4")),
        source="QLoRA paper Table 2",
        follow_ups=("Measure NF4 vs int4 round-trip error on a SmolLM2 weight.",),
    ),
    Item(
        id="qlora.poor", topic="qlora", kind="free", difficulty=3,
        prompt="When might QLoRA perform poorly? (The article lists precision-sensitive tasks, small datasets, hardware and latency. Examine its list.)",
        answer=(
            "Sound points: training is slower than 16-bit LoRA because every layer is dequantised in the forward "
            "and backward passes (this project measured transformers + bitsandbytes + PEFT on an H200, Llama-2-7B "
            "shape, batch 4 x 512: QLoRA at 0.80x the tokens/s of bf16 LoRA without gradient checkpointing and "
            "0.93x with it; benchmarks/results/qlora_step_llama-2-7b_h200.json), GPUs or CPUs without bitsandbytes kernels "
            "suffer more, and 4-bit inference without "
            "merging adds dequantisation work. Weak points: 'small datasets: quantisation noise can dominate' has "
            "no basis; the quantisation error is fixed in the frozen base and does not depend on the dataset "
            "size. 'Precision-sensitive tasks' is plausible but the paper measured NF4+DQ matching 16-bit on its "
            "benchmarks, so it needs a measurement, not an assumption. Missing: models whose weights are far "
            "from normal or have outliers; merging the adapter back (it was trained against the quantised "
            "weights, so merge into the dequantised base); peak memory can exceed expectations (bitsandbytes#1141)."
        ),
        key_points=(
            kp("slower training: dequantisation every step", "slower", "dequantiz"),
            kp("small-dataset claim has no basis: error is fixed in the frozen base", "dataset", "fixed", "no basis"),
            kp("precision claims need measurement; paper matches 16-bit", "measur", "match"),
            kp("merging needs the dequantised base", "merg"),
        ),
        corrects_article=True,
        source="QLoRA paper Section 4; benchmarks/results/qlora_step_llama-2-7b_h200.json; bitsandbytes#465 (4-bit slower), #1141 (peak memory)",
        follow_ups=("How would you measure whether 4-bit hurts your task?",),
    ),
    Item(
        id="qlora.65b", topic="qlora", kind="free", difficulty=3,
        prompt="QLoRA fine-tunes a 65B model on one 48 GB GPU. Where does the memory go?",
        answer=(
            "Weights: 65e9 * (4 + 0.127) bits / 8 = about 33.5 GB in NF4 with double quantisation (vs 130 GB in "
            "bf16). LoRA adapters on all linear layers at r = 64: about 0.8B parameters for LLaMA-65B; with bf16 "
            "weights and gradients and two fp32 Adam moments (12 bytes each) about 10 GB, the second-largest "
            "item. Activations with "
            "gradient checkpointing: only each layer's input is stored, a few GB at moderate sequence length. "
            "Paged optimizers absorb the spikes. Full 16-bit fine-tuning with Adam would need over 780 GB "
            "(16 bytes per parameter, plus activations)."
        ),
        key_points=(
            kp("4.127 bits per weight: ~33 GB", "33", "4.127", "4 bit"),
            kp("adapters with their optimizer state: about 10 GB", "adapter"),
            kp("gradient checkpointing for activations", "checkpointing"),
            kp("paged optimizers for spikes", "paged"),
            kp("full fine-tuning > 780 GB", "780", "16 byte"),
        ),
        source="QLoRA paper Abstract and Section 1 ('from >780GB to <48GB')",
        follow_ups=("Why 16 bytes per parameter for mixed-precision Adam?",),
    ),
    Item(
        id="qlora.peak-memory", topic="qlora", kind="free", difficulty=3,
        prompt=("A Llama-2-7B QLoRA step (transformers + bitsandbytes + PEFT, batch 4 x 512 tokens, r=16 on all 7 "
                "projections) peaked at 25.87 GB on an H200 although its weights take 4.4 GB. Where can the rest "
                "come from, and what would you do?"),
        answer=(
            "First check that gradient checkpointing was really on: transformers only checkpoints in training "
            "mode (model.train() with gradient_checkpointing_enable()), and that figure was measured in eval "
            "mode, without it. This project reproduced it at 25.90 GB without checkpointing and measured "
            "6.86 GB with it (benchmarks/results/qlora_step_llama-2-7b_h200.json). Without checkpointing every "
            "layer keeps its activations for the backward pass (attention and MLP intermediates of 2,048 tokens "
            "in 32 layers): that is most of the difference. With it, what remains above the weights is each layer's input, "
            "one layer's activations while it is recomputed, the logits over the 32k vocabulary in fp32 for "
            "the loss, the dequantised bf16 copy of the layer being computed, the adapters' gradients and Adam "
            "state (40M parameters, small) and the caching allocator's slack. Measure with "
            "torch.cuda.max_memory_allocated per phase; then reduce with chunked cross-entropy (never "
            "materialise the full fp32 logits), a smaller micro-batch with gradient accumulation, and freeing "
            "the dequantised weight right after use."
        ),
        key_points=(
            kp("checkpointing was off (eval mode); on, the peak is 6.86 GB", "checkpoint"),
            kp("without checkpointing, stored activations of every layer", "activation"),
            kp("logits over the vocabulary in fp32", "logit", "vocab"),
            kp("measure per phase (max_memory_allocated / profiler)", "measur", "profil", "max memory"),
            kp("chunked loss, micro-batches, accumulation", "chunk", "accumulat", "micro batch"),
        ),
        source="ANCHORS H200 table (25.87 GB); benchmarks/results/qlora_step_llama-2-7b_h200.json (recipe with and "
               "without checkpointing); bitsandbytes#1141",
        follow_ups=("How big are the fp32 logits for 4 x 512 tokens and a 32,000-word vocabulary?",
                    "Why does transformers skip checkpointing in eval mode?"),
    ),
    Item(
        id="qlora.speed-tradeoff", topic="qlora", kind="choice", difficulty=2,
        prompt=("torchtune reports Llama-3.1-8B on one RTX 4090: LoRA 16.2 GiB at 3,083 tokens/s, QLoRA 7.4 GiB at "
                "2,413 tokens/s. What does that say?"),
        choices=("QLoRA trades about 22% of throughput for less than half the memory",
                 "QLoRA is faster because 4-bit weights move fewer bytes",
                 "The figures must be wrong: QLoRA cannot be slower than LoRA",
                 "QLoRA saves memory only on the optimizer state"),
        correct=0,
        answer=(
            "2,413 / 3,083 = 0.78: QLoRA is about 22% slower, because every frozen weight is dequantised to bf16 in "
            "the forward pass, again in the backward pass (and once more when gradient checkpointing recomputes "
            "the forward); in exchange the base weights take about 4.1 instead of 16 bits. On an H200 this "
            "project measured transformers + bitsandbytes + PEFT on the Llama-2-7B shape at 0.80x the tokens/s of "
            "bf16 LoRA without gradient checkpointing and 0.93x with it "
            "(benchmarks/results/qlora_step_llama-2-7b_h200.json)."
            " The saving is on the weights, not the optimizer state (which is tiny for adapters)."
        ),
        key_points=(kp("slower by the dequantisation work", "dequantiz"), kp("less than half the memory", "memory")),
        source="torchtune published LoRA/QLoRA benchmarks (Llama-3.1-8B, RTX 4090); benchmarks/results/qlora_step_llama-2-7b_h200.json; bitsandbytes#465",
        follow_ups=("When is 4-bit faster than 16-bit?",),
    ),
    Item(
        id="qlora.why-slower", topic="qlora", kind="free", difficulty=3,
        prompt="Why is 4-bit QLoRA training slower than 16-bit LoRA, yet 4-bit inference at batch size 1 can be faster?",
        answer=(
            "Training is compute-bound at realistic batch sizes: the matmuls run in bf16 either way, and QLoRA adds "
            "dequantisation of every weight in the forward pass, again in the backward pass (for the input "
            "gradient), and again when gradient checkpointing recomputes the forward: extra kernels and memory "
            "traffic, no FLOPs saved. Token-by-token inference at batch 1 is memory-bandwidth-bound: each weight "
            "is read once per token, so reading about 4.1 bits instead of 16 can make it faster, if the kernel "
            "fuses dequantisation into the matrix-vector product (bitsandbytes' gemv path). With large batches "
            "the advantage disappears."
        ),
        key_points=(
            kp("training is compute-bound; matmuls in bf16 anyway", "compute bound", "bf16"),
            kp("dequantise in forward, backward and recompute", "dequantiz", "backward"),
            kp("batch-1 inference is memory-bandwidth-bound", "bandwidth", "memory bound"),
            kp("fewer bytes read per weight helps only with fused kernels / small batches", "fused", "fewer byte", "small batch", "batch 1"),
        ),
        source="bitsandbytes#465 (4-bit slower than 16-bit); roofline reasoning; ANCHORS (NF4 dequantise 0.066 ms per 45M weights on H200)",
        follow_ups=("What arithmetic intensity does a batch-1 matrix-vector product have?",),
    ),
]
