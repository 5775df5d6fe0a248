"""Bank: the PEFT family (prompt, prefix, P-tuning, adapters, IA3) and full fine-tuning vs LoRA."""
from ..items import Item, kp

ITEMS = [
    Item(
        id="peft.prefix-prompt-ptuning", topic="peft-family", kind="free", difficulty=2,
        prompt="What are the differences among prefix tuning, prompt tuning and P-tuning?",
        answer=(
            "All three freeze the model and learn continuous 'virtual token' vectors instead of weights. "
            "Prompt tuning (Lester et al. 2021) prepends k trainable embeddings at the input layer only: "
            "k x d parameters; it approaches full fine-tuning only at large scale (around 10B+). Prefix tuning "
            "(Li and Liang 2021) prepends trainable key and value vectors to the attention of every layer, so it "
            "steers every layer; training goes through an MLP reparameterisation for stability, dropped after. "
            "P-tuning (Liu et al. 2021, 'GPT Understands, Too') produces the input prompt embeddings with a small "
            "prompt encoder (LSTM/MLP) and can interleave them with real anchor tokens; P-tuning v2 applies "
            "prompts at every layer (deep prompt tuning, like prefix tuning) and works at smaller scales and on "
            "tasks like sequence labelling. All cost context length; LoRA costs none and can be merged."
        ),
        key_points=(
            kp("all learn continuous virtual tokens, model frozen", "virtual token", "continuous", "soft prompt"),
            kp("prompt tuning: input layer only", "input layer", "input only"),
            kp("prefix tuning: key/value prefixes at every layer", "every layer", "key value", "each layer"),
            kp("P-tuning: prompt encoder (LSTM/MLP), v2 deep", "encoder", "lstm"),
            kp("prompt methods use up context length, LoRA does not", "context", "sequence length"),
        ),
        source="Lester et al. 2021 (arXiv 2104.08691); Li & Liang 2021 (arXiv 2101.00190); Liu et al. 2021 (arXiv 2103.10385), P-tuning v2 (arXiv 2110.07602); PEFT PromptTuningConfig/PrefixTuningConfig/PromptEncoderConfig",
        follow_ups=("Why does prompt tuning need a big model to work?", "How many parameters do 20 virtual tokens cost on SmolLM2?"),
    ),
    Item(
        id="peft.prompt-params", topic="peft-family", kind="choice", difficulty=2,
        prompt="Prompt tuning with 20 virtual tokens on a model with hidden size 4096 and 32 layers trains how many parameters?",
        choices=("20 x 4096 = 81,920", "20 x 4096 x 32 = 2,621,440", "2 x 20 x 4096 x 32 = 5,242,880", "4096 x 4096 = 16,777,216"),
        correct=0,
        answer=(
            "Prompt tuning learns only input embeddings: num_virtual_tokens x hidden = 81,920. Prefix tuning "
            "would learn a key and a value vector per token per layer: 2 x 20 x 4096 x 32 = 5,242,880 (with "
            "grouped-query attention, the key/value width is smaller). "
        ),
        key_points=(kp("tokens x hidden", "hidden"), kp("prefix adds 2 x layers", "layer")),
        source="PEFT PromptEmbedding (num_virtual_tokens x token_dim); PrefixEncoder (num_layers * 2 * token_dim)",
        follow_ups=("How does grouped-query attention change the prefix count?",),
    ),
    Item(
        id="peft.prefix-kv", topic="peft-family", kind="choice", difficulty=2,
        prompt="Where does prefix tuning insert its trainable vectors?",
        choices=("Into the input embeddings only", "As extra key and value vectors in the attention of every layer",
                 "As a low-rank update to Wq and Wv", "As a rescaling vector on the MLP activations"),
        correct=1,
        answer=(
            "Prefix tuning prepends trainable keys and values (past_key_values) at every layer, so every "
            "query can attend to them. Input-embeddings-only is prompt tuning, low-rank Wq/Wv updates are LoRA, "
            "and rescaling vectors on keys, values and FFN activations are IA3."
        ),
        key_points=(kp("keys and values", "key"), kp("every layer", "layer")),
        source="Li & Liang 2021 Section 4; PEFT PrefixTuningConfig",
        follow_ups=("Why does prefix tuning use an MLP reparameterisation during training?",),
    ),
    Item(
        id="peft.adapters-ia3", topic="peft-family", kind="free", difficulty=2,
        prompt="Compare adapter layers (Houlsby) and IA3 with LoRA.",
        answer=(
            "Houlsby adapters insert small bottleneck MLPs (down-project, nonlinearity, up-project, residual) "
            "after attention and MLP blocks: few parameters, but extra sequential layers at inference, so added "
            "latency that cannot be merged away (the nonlinearity prevents it). IA3 (Liu et al. 2022) learns "
            "vectors that rescale keys, values and the FFN's intermediate activations: even fewer parameters "
            "(about 0.01%), and it can be merged because it is a diagonal scaling. LoRA sits between: a "
            "low-rank additive update, mergeable, more expressive than IA3."
        ),
        key_points=(
            kp("adapters: bottleneck layers, added latency", "bottleneck", "latency"),
            kp("adapters cannot be merged (nonlinearity)", "nonlinear", "cannot merg"),
            kp("IA3 rescales keys, values, FFN activations", "rescal", "scal"),
            kp("IA3 and LoRA can be merged", "merg"),
        ),
        source="Houlsby et al. 2019 (arXiv 1902.00751); IA3: Liu et al. 2022 (arXiv 2205.05638); LoRA paper Section 3",
        follow_ups=("Why is IA3 mergeable?",),
    ),
    Item(
        id="peft.choose-method", topic="peft-family", kind="free", difficulty=2,
        prompt="You must adapt one 7B model to 50 customers' styles and serve them all from one GPU. Which PEFT method and why?",
        answer=(
            "LoRA (or QLoRA for training on small GPUs): per-customer adapters of a few to tens of MB on one "
            "shared frozen base, kept unmerged and switched per request; multi-adapter serving systems "
            "(vLLM's LoRA support, S-LoRA, LoRAX) batch requests for different adapters together. Prompt "
            "tuning would also share the base but costs context and usually underperforms at 7B. Full "
            "fine-tuning would need 50 copies of 13.5 GB."
        ),
        key_points=(
            kp("LoRA adapters, small files per customer", "per customer", "adapter per", "adapter each"),
            kp("one shared frozen base", "shared frozen base", "shared base", "one base", "single base"),
            kp("unmerged, switched or batched per request", "unmerged", "per request", "batch request"),
            kp("full fine-tuning = 50 full copies", "50 copies", "full copy"),
        ),
        source="LoRA paper Section 1 (task switching) and Section 4.2; S-LoRA (arXiv 2311.03285); vLLM LoRA serving",
        follow_ups=("How big is one adapter at r=16 on q,k,v,o of Llama-2-7B in bf16?",),
    ),
    # ----------------------------------------------------------------------------- full FT vs LoRA
    Item(
        id="full.when", topic="full-vs-lora", kind="free", difficulty=2,
        prompt="When should you use full fine-tuning instead of LoRA?",
        answer=(
            "When the task moves the model far from pre-training and you have much data: continued pre-training "
            "on a new domain or language, large-scale code or maths instruction tuning, where LoRA learns less "
            "than full fine-tuning (Biderman et al. 2024, 'LoRA Learns Less and Forgets Less'); when new tokens "
            "or a new vocabulary must be learned (embeddings need full updates, or LoRA with modules_to_save); "
            "when the model is small, so full fine-tuning is cheap; when you serve only one model and have the "
            "memory (about 16 bytes per parameter with mixed-precision Adam, plus activations). Prefer LoRA for "
            "small data, many tasks or tenants, limited memory, and when forgetting the base skills matters."
        ),
        key_points=(
            kp("large domain shift with lots of data", "new domain", "far from pre-training", "domain shift", "continued pre-training"),
            kp("LoRA learns less (and forgets less)", "learns less"),
            kp("new vocabulary/embeddings", "new tokens", "new vocabulary", "embeddings need"),
            kp("small model or enough memory (16 bytes/param)", "small model", "16 bytes per parameter", "have the memory"),
            kp("LoRA for many tasks, small data, limited memory", "many tasks", "small data", "limited memory", "tenants"),
        ),
        source="Biderman et al. 2024 (arXiv 2405.09673); LoRA paper Section 5; PEFT modules_to_save",
        follow_ups=("What does 'forgets less' mean in measurable terms?",),
    ),
    Item(
        id="full.memory", topic="full-vs-lora", kind="free", difficulty=2,
        prompt="The article says full fine-tuning of a 7B model needs ~84 GB. Derive the memory of mixed-precision Adam per parameter and check it.",
        answer=(
            "Mixed-precision Adam keeps bf16/fp16 weights (2 bytes), bf16/fp16 gradients (2), an fp32 master copy "
            "(4) and two fp32 moments (4 + 4): 16 bytes per parameter, 6.74B x 16 = about 108 GB for Llama-2-7B, "
            "before activations. The article's 84 GB is 12 bytes x 7B parameters: 16-bit weights (2) and "
            "gradients (2) and two fp32 moments (8), without the fp32 master copy; its analyze_lora_complexity even uses 4 x 2 = 8 bytes (fp16 'Adam states'), "
            "which halves the real figure. Activations add more with batch and sequence length, so full "
            "fine-tuning of 7B needs several 80 GB GPUs (or ZeRO/FSDP sharding and offload)."
        ),
        key_points=(
            kp("2 + 2 + 4 + 8 = 16 bytes per parameter", "16 byte", "16"),
            kp("fp32 master weights and two fp32 moments", "master", "moment"),
            kp("about 108 GB for 6.74B parameters", "108", "112"),
            kp("activations come on top", "activation"),
            kp("article's figures assume 12 or 8 bytes", "12", "8 byte", "article"),
        ),
        corrects_article=True,
        source="ZeRO paper (arXiv 1910.02054) Section 3.1 (16 bytes/param for mixed-precision Adam); the article's Background and analyze_lora_complexity",
        follow_ups=("How much does LoRA remove from this budget, and what stays?",),
    ),
    Item(
        id="full.lora-memory", topic="full-vs-lora", kind="free", difficulty=2,
        prompt="Why does LoRA save 'only' about 3x memory on GPT-3 (1.2 TB to 350 GB) when it trains 10,000x fewer parameters?",
        answer=(
            "The frozen weights still have to be in memory (2 bytes per parameter in fp16: 350 GB for 175B) and "
            "activations for the backward pass are unchanged. LoRA removes the gradients, fp32 master copy and "
            "Adam moments of the frozen weights (14 of the 16 bytes per parameter), not the weights themselves. "
            "To shrink the weights you need quantisation: QLoRA stores them in about 4.127 bits."
        ),
        key_points=(
            kp("frozen weights still in memory", "frozen weight", "weight still", "still store"),
            kp("activations unchanged", "activation"),
            kp("removes gradients and optimizer state of the frozen weights", "optimizer", "gradient"),
            kp("quantisation shrinks the weights (QLoRA)", "quantiz", "qlora"),
        ),
        source="LoRA paper Section 4.2 (1.2TB to 350GB, 10,000x fewer trainable parameters)",
        follow_ups=("What dominates LoRA's memory at sequence length 8k?",),
    ),
    Item(
        id="full.forgetting", topic="full-vs-lora", kind="choice", difficulty=2,
        prompt="Compared with full fine-tuning on the same data, LoRA typically...",
        choices=("learns the target task more and forgets more of the base model's abilities",
                 "learns the target task less and forgets less of the base model's abilities",
                 "behaves identically on both",
                 "forgets more because of its high learning rate"),
        correct=1,
        answer=(
            "Biderman et al. (2024) found LoRA underperforms full fine-tuning on code and maths (large shifts) "
            "but better preserves the base model's performance outside the target domain: a form of "
            "regularisation. Full fine-tuning learns weight perturbations of much higher rank than typical "
            "LoRA ranks."
        ),
        key_points=(kp("learns less", "less"), kp("forgets less", "forget")),
        source="Biderman et al. 2024, 'LoRA Learns Less and Forgets Less' (arXiv 2405.09673)",
        follow_ups=("How would you measure forgetting in this course's SmolLM2 experiment?",),
    ),
    Item(
        id="full.small-data", topic="full-vs-lora", kind="free", difficulty=2,
        prompt="The article claims full fine-tuning is 'prone to over-fitting on small data'. Is that a reason to prefer LoRA?",
        answer=(
            "Partly. Fewer trainable parameters and a low-rank update do regularise, and LoRA forgets less, "
            "but LoRA also over-fits small data if you train too long at a high learning rate. The main reasons "
            "for LoRA are memory, storage per task and fast task switching; over-fitting is controlled in both "
            "cases with held-out evaluation, early stopping, a lower learning rate and regularisation. Small "
            "models with small data are often fine with full fine-tuning and early stopping."
        ),
        key_points=(
            kp("LoRA regularises but can still over-fit", "still", "overfit", "over fit"),
            kp("main reasons are memory, storage, switching", "memory", "storage"),
            kp("held-out evaluation and early stopping in both", "early stop", "held out"),
        ),
        corrects_article=True,
        source="Biderman et al. 2024; the article's Background",
        follow_ups=("What signal tells you to stop?",),
    ),
]
