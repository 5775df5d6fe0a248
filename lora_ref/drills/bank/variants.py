"""Bank: beyond plain LoRA — DoRA (arXiv 2402.09353), PiSSA (arXiv 2404.02948), LoftQ (arXiv 2310.08659),
LoRA+ (arXiv 2402.12354), as implemented in lora_ref (dora, pissa, loftq, loraplus) and PEFT (notebook 10)."""
from ..items import Item, kp

ITEMS = [
    Item(
        id="variants.dora", topic="variants", kind="free", difficulty=2,
        prompt="What does DoRA change about LoRA, and what does it cost?",
        answer=(
            "DoRA decomposes each weight into a magnitude and a direction (Section 3): W = m * W / ||W||_c, "
            "m the norm of each output unit's weights (a vector of out_features numbers). It trains m directly "
            "and adapts only the direction with LoRA: W' = m * (W + sBA) / ||W + sBA||_c (Section 4.1, eq. 5). At "
            "init B = 0 and m = ||W||_c, so W' = W. Section 4.3: the norm is treated as a constant in backward "
            "(detached), which saves memory; PEFT does the same. Cost: out_features extra parameters per layer "
            "(negligible), but each forward needs the dense W + sBA to compute the norm, so it is slower than "
            "LoRA, and on a 4-bit base it dequantises W every step. Merged, it is an ordinary weight again."
        ),
        key_points=(
            kp("magnitude vector and normalised direction", "magnitude", "direction"),
            kp("LoRA adapts the direction only", "lora direction", "direction lora"),
            kp("norm detached in backward (Section 4.3)", "detach", "constant"),
            kp("one extra parameter per output unit", "out feature", "per output", "extra paramet"),
        ),
        source="DoRA paper Sections 3, 4.1 (eq. 5), 4.3; peft/tuners/lora/dora.py; lora_ref.dora",
        follow_ups=("Why is ||.||_c a row norm of an nn.Linear weight?", "What does DoRA's merge compute?"),
    ),
    Item(
        id="variants.dora-norm-axis", topic="variants", kind="choice", difficulty=2,
        prompt=("In PyTorch's nn.Linear convention (W has shape (out, in), y = x W^T), DoRA's magnitude vector "
                "has one entry per ..."),
        choices=("output unit: the norm of each row of W, torch.linalg.norm(W, dim=1)",
                 "input feature: the norm of each column of W, torch.linalg.norm(W, dim=0)",
                 "layer: one scalar, the Frobenius norm of W",
                 "rank component: one entry per column of B"),
        correct=0,
        answer=("The paper writes W in R^{d x k} with outputs along k and normalises each column; in nn.Linear's "
                "transposed layout that is each row, so m has out_features entries (PEFT: "
                "torch.linalg.norm(weight, dim=1))."),
        key_points=(kp("one per output unit", "output"), kp("row norm dim=1", "row", "dim 1")),
        source="DoRA paper Section 3 (eq. 2); peft DoraLinearLayer.get_weight_norm",
        follow_ups=("How many extra parameters does DoRA add to a 4096 x 11008 projection?",),
    ),
    Item(
        id="variants.pissa", topic="variants", kind="free", difficulty=2,
        prompt="How does PiSSA initialise a LoRA adapter, and why does the model not change at step 0?",
        answer=(
            "PiSSA takes the SVD W = U S V^T and puts the top-r part in the adapter: A = sqrt(S_r/s) V_r^T, "
            "B = U_r sqrt(S_r/s) (dividing by the scaling s is PEFT's convention, so s B A is the top-r part for "
            "any alpha), and replaces the frozen weight by the residual W_res = W - s B A. W_res + s B A = W, so "
            "the adapted model equals the original at step 0 (up to the rounding of the stored residual). "
            "Training then updates the principal directions, which carry most of the weight's energy, instead "
            "of a random subspace starting from zero; the paper reports faster convergence than LoRA. Because "
            "A and B start large, the learning rate that suits LoRA need not suit PiSSA."
        ),
        key_points=(
            kp("top-r singular vectors/values go into A and B", "singular", "svd"),
            kp("residual W - sBA frozen in the base", "residual"),
            kp("W_res + sBA = W: unchanged at step 0", "step 0", "unchanged", "equal origin"),
        ),
        source="PiSSA paper Section 3; peft LoraLayer.pissa_init; lora_ref.pissa",
        follow_ups=("Which gradient directions does PiSSA's init favour compared with LoRA's?",),
    ),
    Item(
        id="variants.loftq", topic="variants", kind="free", difficulty=3,
        prompt="What problem of QLoRA does LoftQ address, and how?",
        answer=(
            "QLoRA starts from Q(W) with B = 0: its step-0 model carries the whole quantisation error W - Q(W), "
            "which training must undo. LoftQ chooses the quantised weight and the adapter together to minimise "
            "||W - Q - sBA||_F (Section 3, eq. 6), alternating T times: Q_t = q(W - sB_{t-1}A_{t-1}), then "
            "sB_tA_t = best rank-r approximation (SVD) of W - Q_t (Algorithm 1). After one iteration the error "
            "is already at most QLoRA's, since the best rank-r part of the quantisation error is removed. "
            "PEFT's loftq_init puts the SVD factors into B and A without dividing by the scaling (right only "
            "for alpha = r; peft issue #1982)."
        ),
        key_points=(
            kp("QLoRA starts with the full quantisation error", "quantiz error", "step 0"),
            kp("alternate quantisation and rank-r SVD", "alternat", "svd", "iterat"),
            kp("minimise ||W - Q - sBA||", "minimise", "minimize", "closest"),
        ),
        source="LoftQ paper Section 3 (eq. 6, Algorithm 1); peft/utils/loftq_utils.py; lora_ref.loftq",
        follow_ups=("Why is Q_T stored exactly when the base is quantised again?", "What does more iterations buy?"),
    ),
    Item(
        id="variants.loraplus", topic="variants", kind="free", difficulty=2,
        prompt="What is LoRA+ and how does PEFT's create_loraplus_optimizer group the parameters?",
        answer=(
            "LoRA+ trains B with a larger learning rate than A: eta_B = lambda * eta_A, lambda around 16 "
            "(Hayou et al., Section 3: with one learning rate, feature learning in wide models is inefficient; "
            "B's steps should be larger by a factor growing with width). Nothing in the model changes. PEFT's "
            "groups: A (everything else) at lr; B — names containing lora_B and every 1-D parameter, such as "
            "biases and DoRA's magnitude — at lr * ratio with weight decay; those in LayerNorms or named bias "
            "at lr * ratio without decay; LoRA on embeddings at its own lr."
        ),
        key_points=(
            kp("B gets lambda times A's learning rate", "lambda", "ratio", "larger learning rate"),
            kp("1-D parameters join B's group", "1 d", "one dimension", "magnitude", "bias"),
            kp("model unchanged; only optimizer groups", "optimizer", "group"),
        ),
        source="LoRA+ paper Section 3-4; peft/optimizers/loraplus.py; lora_ref.loraplus",
        follow_ups=("Why should B move faster than A when B starts at zero?",),
    ),
    Item(
        id="variants.which-changes-what", topic="variants", kind="choice", difficulty=1,
        prompt="Which of these methods changes only the optimizer, leaving the model and its init exactly as LoRA's?",
        choices=("LoRA+", "DoRA", "PiSSA", "LoftQ"),
        correct=0,
        answer=("LoRA+ only sets eta_B = lambda * eta_A. DoRA changes the form of the update (magnitude and "
                "direction), PiSSA the init (principal singular vectors, residual base), LoftQ the init under "
                "quantisation (Q + sBA ~ W)."),
        key_points=(kp("LoRA+ changes the learning rates", "learning rate"), kp("others change form or init", "init")),
        source="notebook 10; the four papers' method sections",
        follow_ups=("Which of them can be combined with QLoRA?",),
    ),
    Item(
        id="variants.claims", topic="variants", kind="free", difficulty=3,
        prompt=("A colleague ran DoRA, PiSSA and LoRA+ once each against LoRA and reports 'DoRA is 1.5 points "
                "better'. What do you ask before believing it?"),
        answer=(
            "How many seeds and what standard error: a few seeds of ~80 questions resolve only large effects "
            "(one question is over 1 point). Whether the comparison was controlled: same data order, steps, "
            "rank, targets, and whether each method's learning rate was tuned (PiSSA and LoRA+ are sensitive "
            "to it; one setting is one point of a curve). What is guaranteed by construction (PiSSA equals the "
            "base at step 0, LoftQ starts closer than QLoRA) versus what is an empirical downstream claim. And "
            "the cost side: DoRA is slower per step."
        ),
        key_points=(
            kp("several seeds and standard errors", "seed", "standard error"),
            kp("controlled: same data, steps, rank", "control", "same data"),
            kp("learning rate tuned per method", "learning rate", "tune"),
        ),
        source="benchmarks/beyond_lora.py (multi-seed, paired differences); notebook 10 section 5",
        follow_ups=("How many seeds would resolve a 1.5-point difference with a per-seed spread of 3 points?",),
    ),
]
