"""Bank: LoRA's math (LoRA paper, arXiv 2106.09685, Sections 4 and 7) and rank/alpha choices."""
from ...memory import ATTENTION_PROJECTIONS, linear_shapes
from ..items import Item, kp


def _mlp_share(model: str) -> float:
    """Share of one decoder layer's projection weights in the MLP (gate, up, down), from lora_ref.memory's
    shapes (GQA-aware), so that the figure quoted below is computed, not typed."""
    shapes = linear_shapes(model)
    total = sum(o * i for o, i in shapes.values())
    attention = sum(o * i for name, (o, i) in shapes.items() if name in ATTENTION_PROJECTIONS)
    return (total - attention) / total


ITEMS = [
    Item(
        id="lora.principle", topic="lora-math", kind="free", difficulty=1,
        prompt="What is the mathematical principle behind LoRA? Why does a low-rank update work for fine-tuning?",
        answer=(
            "LoRA freezes the pretrained weight W0 (out x in) and learns the update as a low-rank product: "
            "W = W0 + (alpha/r) * B @ A with A (r x in), B (out x r) and r << min(in, out), so h = W0 x + "
            "(alpha/r) B A x. It works because fine-tuning updates have a low intrinsic dimension: "
            "Aghajanyan et al. (2020) showed a random low-dimensional reparameterisation of the update reaches "
            "most of full fine-tuning's quality, and LoRA hypothesises that the update delta W itself has low "
            "'intrinsic rank'. The paper backs this up: r=1 or 2 on Wq and Wv is already competitive on GPT-3 "
            "(Table 6), and the top directions learned at r=8 and r=64 overlap strongly (Section 7.2). "
            "Only A and B are trained: r(in + out) parameters per matrix instead of in*out."
        ),
        key_points=(
            kp("W0 is frozen; only the update is learned", "frozen", "freeze"),
            kp("delta W = B A with a small rank r", "b a", "product", "factor"),
            kp("r << min(in, out), so r(in+out) parameters instead of in*out", "r in out", "fewer parameter"),
            kp("fine-tuning updates have low intrinsic dimension / rank", "intrinsic"),
            kp("scaled by alpha / r", "alpha r", "scal"),
        ),
        source="LoRA paper Section 4.1 (h = W0x + BAx); intrinsic dimension: Aghajanyan et al. 2020 (arXiv 2012.13255); LoRA Table 6, Section 7.2",
        follow_ups=("Why initialise B to zero and not A?", "What does Section 7 say delta W amplifies?",
                    "Does the low-rank hypothesis hold for continued pre-training on a new domain?"),
    ),
    Item(
        id="lora.init", topic="lora-math", kind="free", difficulty=1,
        prompt="How are LoRA's A and B initialised, and why that way round?",
        answer=(
            "B is initialised to zero and A randomly (the paper says Gaussian; PEFT and the reference "
            "implementation use kaiming_uniform(a=sqrt(5)) on A of shape (r, in)). Then delta W = B A = 0 at "
            "step 0, so the adapted model starts exactly as the pretrained model, and training starts from it. "
            "A must not be zero too: with both zero, the gradients of A (B^T times upstream) and of B (upstream "
            "times (A x)^T) are both zero and nothing ever trains. With B = 0 the gradient flows into B first "
            "(A x is non-zero), then A follows."
        ),
        key_points=(
            kp("B is zero at init", "b zero"),
            kp("A is random (Gaussian in the paper, kaiming uniform in PEFT)", "a random", "gaussian", "kaiming"),
            kp("so delta W = 0: the model starts as the pretrained one", "starts exactly as", "delta w = 0", "starts as the pretrained", "unchanged", "identical"),
            kp("both zero would give zero gradients (nothing trains)", "both zero", "both were zero", "nothing trains", "never train"),
        ),
        source="LoRA paper Section 4.1; PEFT LoraLayer.reset_lora_parameters (kaiming_uniform_(a=sqrt(5)) on lora_A, zeros on lora_B)",
        follow_ups=("What goes wrong if you initialise A to zero and B randomly?",
                    "PiSSA initialises A and B from the top singular vectors of W0: what changes?"),
    ),
    Item(
        id="lora.scaling", topic="lora-math", kind="free", difficulty=2,
        prompt="What does LoRA's alpha do, and why is the update scaled by alpha/r rather than just alpha?",
        answer=(
            "The update is multiplied by scaling = alpha / r. Dividing by r keeps the size of the update "
            "roughly independent of the rank when you change r, so you can change r without re-tuning the "
            "learning rate; the paper sets alpha to the first r tried and does not tune it, noting that with "
            "Adam tuning alpha is roughly like tuning the learning rate. Measured on a SmolLM2 layer "
            "(benchmarks/rslora_norms.py, notebook 02): in the first Adam steps the r columns of B move "
            "independently, B A grows like sqrt(r) and alpha/r starts large ranks slowly, which is rsLoRA's "
            "argument (Kalajdzievski 2023: scale by alpha/sqrt(r), PEFT use_rslora=True); once trained the "
            "columns line up, B A grows like r, alpha/r keeps the update's size nearly independent of r, and "
            "rsLoRA makes large ranks take larger steps, like a larger learning rate."
        ),
        key_points=(
            kp("scaling = alpha / r multiplies B A", "alpha r"),
            kp("keeps the update size independent of r, so r can change without re-tuning", "independent", "without retun", "same learning rate"),
            kp("tuning alpha is like tuning the learning rate under Adam", "learning rate"),
            kp("rsLoRA: alpha / sqrt(r) for large ranks", "sqrt", "rslora"),
        ),
        source="LoRA paper Section 4.1 ('we simply set alpha to the first r we try'); rsLoRA arXiv 2312.03732; PEFT LoraConfig.use_rslora",
        follow_ups=("With alpha fixed at 16, what happens to the effective update when r goes from 8 to 128?",
                    "When does alpha/sqrt(r) help, and when does it act like a larger learning rate?"),
    ),
    Item(
        id="lora.shapes", topic="lora-math", kind="choice", difficulty=1,
        prompt="In PEFT (and nn.Linear's convention) a LoRA layer on a Linear(in_features=4096, out_features=1024) has which shapes?",
        choices=("lora_A (4096, r), lora_B (r, 1024)", "lora_A (r, 4096), lora_B (1024, r)",
                 "lora_A (1024, r), lora_B (r, 4096)", "lora_A (r, 1024), lora_B (4096, r)"),
        correct=1,
        answer=(
            "nn.Linear stores weight as (out, in) and computes x @ W^T. PEFT follows it: lora_A.weight is "
            "(r, in_features) and lora_B.weight is (out_features, r), so delta W = scaling * B @ A is (out, in) "
            "and adds to the weight with no transpose. The article uses the transposed convention, A (in, r) "
            "and B (r, out), x @ A @ B: consistent on its own, but its adapters cannot be loaded by PEFT without "
            "transposes, and kaiming init on an (in, r) tensor uses fan_in = r instead of in."
        ),
        key_points=(kp("A is (r, in), B is (out, r)", "r in", "out r"), kp("delta W is (out, in), like nn.Linear's weight", "out in")),
        corrects_article=True,
        source="PEFT lora.layer.Linear (lora_A = nn.Linear(in, r), lora_B = nn.Linear(r, out)); adapter_model.safetensors keys",
        follow_ups=("Which fan does kaiming_uniform_ use for a 2-D tensor?",),
    ),
    Item(
        id="lora.param-count", topic="lora-math", kind="free", difficulty=1,
        prompt="How many trainable parameters does LoRA add to one d_out x d_in linear layer at rank r, and how does that compare with the layer?",
        answer=(
            "A has r * d_in and B has d_out * r parameters: r (d_in + d_out) in total (no bias). The layer has "
            "d_in * d_out, so the ratio is d_in d_out / (r (d_in + d_out)); for a square d x d layer that is "
            "d / (2r): 4096 / 32 = 128 at r = 16, the article's 128x. That 128x is per matrix, not the model-wide "
            "ratio: against all of a 7B model's parameters the trainable fraction is about 0.25% for q,k,v,o at r=16 "
            "(16.8M of 6.7B), and against only the targeted matrices it is 128x."
        ),
        key_points=(
            kp("r (d_in + d_out) per layer", "r d_in d_out", "r in_features out_features", "rank times sum"),
            kp("square layer ratio d / 2r (128x at d=4096, r=16)", "128", "d 2r"),
            kp("per-matrix ratio is not the model-wide ratio", "per matrix", "model wide", "whole model", "all of a 7b"),
        ),
        corrects_article=True,
        source="LoRA paper Section 4.1; the article's 'Key Principle Diagram' (131K per 4096x4096 matrix, 128x)",
        follow_ups=("How many parameters does r=16 on all 7 projections of Llama-2-7B add?",),
    ),
    Item(
        id="lora.no-latency", topic="lora-math", kind="free", difficulty=1,
        prompt="Why does LoRA add no inference latency, unlike adapter layers?",
        answer=(
            "After training, B A is a d_out x d_in matrix like W0, so you can merge: W = W0 + (alpha/r) B A and "
            "serve an ordinary linear layer: same shapes, same FLOPs, no extra layer. Adapter layers "
            "(Houlsby et al. 2019) insert new bottleneck modules in sequence, which run at inference and add "
            "latency, noticeably at batch size 1 where the GPU is latency-bound. The catch: a merged model "
            "serves one adapter; unmerged serving of many adapters does add the small B(Ax) cost."
        ),
        key_points=(
            kp("merge B A into W0", "merge"),
            kp("same shape and FLOPs as the original layer", "same shape", "same flop", "ordinary linear", "no extra"),
            kp("adapters add sequential layers (latency)", "sequential", "adapter layer", "extra layer", "bottleneck"),
            kp("merged serves one adapter; unmerged multi-adapter costs a little", "one adapter", "multi adapter", "unmerged"),
        ),
        source="LoRA paper Section 3 (adapter latency, Table 1) and Section 4.1 ('No Additional Inference Latency')",
        follow_ups=("When would you keep the adapter unmerged in production?",),
    ),
    Item(
        id="lora.section7", topic="lora-math", kind="free", difficulty=3,
        prompt="What does the LoRA paper's Section 7 (understanding the low-rank updates) find?",
        answer=(
            "Using the subspace similarity phi(A_r8, A_r64, i, j) = ||U_i^T U_j||_F^2 / min(i, j) between the "
            "top right-singular vectors of the learned A matrices at r=8 and r=64, the top direction overlaps strongly and the "
            "rest is mostly noise: a very low rank captures the useful update. Delta W correlates more with W "
            "than a random matrix, but it amplifies directions that are not emphasised in W (it does not "
            "repeat W's top singular directions), with a large amplification factor (about 21.5 for r = 4 on "
            "Wq in GPT-3's 48th layer): fine-tuning amplifies task-specific features already present."
        ),
        key_points=(
            kp("subspace similarity between r=8 and r=64 updates", "subspace", "similarity"),
            kp("top directions overlap: low rank suffices", "overlap", "top direction", "low rank suffic"),
            kp("delta W amplifies directions not emphasised in W", "amplif"),
        ),
        source="LoRA paper Section 7.2-7.3",
        follow_ups=("How would you reproduce the subspace similarity plot on SmolLM2?",),
    ),
    Item(
        id="lora.targets", topic="lora-math", kind="free", difficulty=2,
        prompt="Which weight matrices should LoRA be applied to?",
        answer=(
            "The LoRA paper, with a fixed parameter budget on GPT-3, found adapting Wq and Wv together better "
            "than spending it all on one matrix (Table 5), and mostly left the MLP alone. QLoRA found that the "
            "number of adapted matrices matters most: LoRA on all linear layers (q, k, v, o, gate, up, down) is "
            "needed to match full 16-bit fine-tuning, after which r hardly matters. Today's default is therefore "
            "all linear layers (PEFT target_modules='all-linear'); restricting to attention saves parameters "
            "but usually costs quality. The MLP holds most of a block's weights: "
            f"{_mlp_share('llama-2-7b'):.0%} of a Llama-2-7B layer's projection weights (multi-head attention) and "
            f"{_mlp_share('smollm2-135m'):.0%} of a SmolLM2-135M layer's (grouped-query attention makes k and v "
            "narrow), so attention-only LoRA leaves the largest matrices untouched."
        ),
        key_points=(
            kp("LoRA paper: Wq and Wv under a fixed budget", "wq wv", "q v"),
            kp("QLoRA: all linear layers needed to match full fine-tuning", "all linear", "all layer"),
            kp("MLP (gate/up/down) matters too", "mlp", "gate", "feed forward"),
        ),
        source="LoRA paper Section 7.1 (Table 5); QLoRA paper Section 4 ('LoRA on all linear transformer block layers are required')",
        follow_ups=("What does target_modules='all-linear' exclude in PEFT?", "Should the embedding or lm_head get LoRA?"),
    ),
    Item(
        id="lora.gradient-flow", topic="lora-math", kind="free", difficulty=2,
        prompt="In LoRA training, which gradients are computed through a frozen linear layer, and which are skipped?",
        answer=(
            "For y = W0 x + s B A x the backward pass still computes the gradient with respect to the input x "
            "through W0 (dx = W0^T dy + ...), because earlier layers' adapters need it. What is skipped is the "
            "weight gradient dW0 = dy x^T (a full GEMM) and W0's optimizer state. So LoRA saves about one third "
            "of the training FLOPs (about 4N instead of 6N per token) and most of the optimizer/gradient "
            "memory, not 128x of the compute as the article's FLOP analysis suggests; activations must still "
            "be stored for the backward pass."
        ),
        key_points=(
            kp("input gradient through W0 is still computed", "input gradient", "dx", "grad input", "through w0"),
            kp("weight gradient of W0 is skipped", "weight gradient dw0", "weight gradient is skipped", "skipped weight gradient", "dw0"),
            kp("about 4N instead of 6N FLOPs per token (a third saved)", "4n", "third", "6n"),
            kp("activations still stored", "activations must still be stored", "activations stored", "activations still"),
        ),
        corrects_article=True,
        source="Backprop of a linear layer; LoRA paper Section 4.2 (25% training speed-up on GPT-3 175B); the article's analyze_lora_complexity",
        follow_ups=("Why does LoRA not reduce activation memory?", "What does gradient checkpointing trade?"),
    ),
    Item(
        id="lora.compute-claim", topic="lora-math", kind="choice", difficulty=2,
        prompt=("The article computes 'Compute reduction: 128x' for LoRA (r=16, d=4096). For a training step of a "
                "7B model with LoRA on q,k,v,o, roughly how much compute does LoRA save versus full fine-tuning?"),
        choices=("About 128x less compute", "About a third less (about 4N instead of 6N FLOPs per token)",
                 "None at all", "About 10,000x less, as the LoRA paper reports for GPT-3"),
        correct=1,
        answer=(
            "The forward pass still runs the full frozen model (2N FLOPs per token) and the backward pass still "
            "propagates activation gradients through every frozen weight (another 2N); only the weight-gradient "
            "GEMMs (2N) are skipped, and the adapter adds a little. So the saving is about a third, not 128x: "
            "the article divides the frozen layer's FLOPs by the adapter's, as if the frozen W did not run. "
            "The LoRA paper's 10,000x is about trainable parameters, not compute."
        ),
        key_points=(kp("forward and input-gradient passes still run", "forward"), kp("only weight gradients skipped", "weight gradient")),
        corrects_article=True,
        source="Kaplan et al. 2020 6N rule; LoRA paper Section 4.2; the article's analyze_lora_complexity",
        follow_ups=("What does the LoRA paper actually report as the training speed-up?",),
    ),
    Item(
        id="lora.dropout", topic="lora-math", kind="free", difficulty=2,
        prompt="Where is LoRA dropout applied, and what does it regularise?",
        answer=(
            "In PEFT, dropout is applied to the input of the LoRA branch only: y = W0 x + s B A dropout(x). The "
            "frozen path sees the clean x. It regularises the adapter, useful with small datasets; QLoRA used "
            "0.1 for 7B/13B and 0.05 for 33B/65B. It must be off at evaluation (model.eval()), and merging is "
            "only exact in eval mode because dropout(x) != x in training."
        ),
        key_points=(
            kp("applied to the LoRA branch's input only", "branch", "input", "only lora"),
            kp("frozen path sees clean x", "frozen", "clean"),
            kp("off at eval; merge exact only in eval mode", "eval"),
        ),
        source="PEFT lora.layer.Linear.forward (lora_B(lora_A(dropout(x))) * scaling); QLoRA Appendix B hyperparameters",
        follow_ups=("Why is dropout on the adapter output different from on its input?",),
    ),
    Item(
        id="lora.variants", topic="lora-math", kind="free", difficulty=3,
        prompt="Name two LoRA variants and what each changes: e.g. rsLoRA, DoRA, LoRA+, PiSSA.",
        answer=(
            "rsLoRA scales by alpha/sqrt(r) instead of alpha/r so large ranks keep learning. DoRA (Liu et al. "
            "2024) splits W into magnitude and direction and applies LoRA to the direction, closer to full "
            "fine-tuning's update pattern. LoRA+ (Hayou et al. 2024) gives B a larger learning rate than A "
            "(ratio around 16). PiSSA initialises A and B from the top singular vectors of W0 and freezes the "
            "residual, so training starts on the principal components. All keep the merge-into-W property "
            "(DoRA with a norm rescale)."
        ),
        key_points=(
            kp("rsLoRA: alpha/sqrt(r)", "sqrt", "rslora"),
            kp("DoRA: magnitude and direction", "magnitude", "dora"),
            kp("LoRA+: larger learning rate for B", "learning rate", "lora+", "lora plus"),
            kp("PiSSA: init from singular vectors", "singular", "pissa", "svd"),
        ),
        source="rsLoRA arXiv 2312.03732; DoRA arXiv 2402.09353; LoRA+ arXiv 2402.12354; PiSSA arXiv 2404.02948; PEFT LoraConfig options",
        follow_ups=("Which of these can be merged for free?",),
    ),
    # ----------------------------------------------------------------------------- rank and alpha
    Item(
        id="rank.choose", topic="rank-alpha", kind="free", difficulty=2,
        prompt="How do you choose LoRA's rank r and alpha? Any heuristics?",
        answer=(
            "Start from evidence, not a width formula: the LoRA paper found r = 1-8 on Wq, Wv competitive for "
            "GPT-3 (Table 6), and QLoRA found r hardly matters once LoRA is on all linear layers, which matters "
            "far more. Common starts are r = 8-16 with alpha = 2r (or QLoRA's r = 64, alpha = 16). Raise r when "
            "the task is far from pre-training and data is plentiful (code, maths: LoRA 'learns less and "
            "forgets less', Biderman et al. 2024); lower it for small data. Keep alpha/r fixed when sweeping r, "
            "or use rsLoRA (alpha/sqrt(r)) for large r, and tune the learning rate, which interacts with alpha. "
            "The article's 'rank ~ sqrt(min(in, out))/4' has no source: it just returns 16 for 4096 and scales "
            "with width, while the needed rank tracks the task's intrinsic dimension, which if anything shrinks "
            "as models grow (Aghajanyan et al. 2020)."
        ),
        key_points=(
            kp("small ranks already work (LoRA Table 6)", "small rank", "r 1", "table 6", "low rank"),
            kp("target all linear layers matters more than r (QLoRA)", "all linear", "qlora"),
            kp("alpha sets the scale alpha/r; keep it fixed or use rsLoRA", "alpha r", "rslora", "sqrt"),
            kp("more rank for tasks far from pre-training with lots of data", "data", "far", "code", "math"),
            kp("sqrt(min(d,k))/4 is unfounded", "sqrt", "unfound", "no source", "formula"),
            kp("validate with a sweep", "sweep", "validat"),
        ),
        corrects_article=True,
        source="LoRA Table 6 and Section 7.2; QLoRA Section 4; Biderman et al. 2024 (arXiv 2405.09673); Aghajanyan et al. 2020",
        follow_ups=("Why might bigger models need a smaller relative rank?", "What rank would you pick for SmolLM2-135M?"),
    ),
    Item(
        id="rank.heuristic-formula", topic="rank-alpha", kind="choice", difficulty=2,
        prompt=("The article gives the heuristic 'rank ~ sqrt(min(input_dim, output_dim)) / 4'. Which statement "
                "about it is right?"),
        choices=(
            "It comes from the LoRA paper's Section 7 analysis",
            "It has no published basis: it returns 16 for d=4096, but the rank needed depends on the task and data, not the matrix width",
            "It is the rank at which LoRA provably equals full fine-tuning",
            "It is PEFT's default rank rule",
        ),
        correct=1,
        answer=(
            "Neither paper gives such a formula, and PEFT's default is simply r = 8. The formula ties rank to "
            "layer width, but LoRA's own results (r = 1 competitive on GPT-3, width 12,288) and QLoRA's (r does "
            "not matter with all-layer LoRA) show the needed rank is set by how far the task moves the model, "
            "not by width. It happens to land on the common starting value 16 for 4096-wide models."
        ),
        key_points=(kp("no published basis", "no"), kp("rank depends on task and data", "task")),
        corrects_article=True,
        source="LoRA Table 6; QLoRA Section 4; PEFT LoraConfig(r=8) default",
        follow_ups=("What does the formula give for SmolLM2's width 576 and for Llama-2-70B's 8192?",),
    ),
    Item(
        id="rank.alpha-fixed", topic="rank-alpha", kind="choice", difficulty=2,
        prompt="You keep alpha = 16 and raise r from 8 to 64 with standard LoRA scaling. What happens to the scaling factor applied to B A?",
        choices=("It stays 2.0", "It drops from 2.0 to 0.25 (8x smaller)", "It grows 8x", "It drops to 1/sqrt(8) of its value"),
        correct=1,
        answer=(
            "scaling = alpha / r: 16/8 = 2.0, 16/64 = 0.25. Larger r with fixed alpha shrinks the update per unit "
            "of B A, which slows the first steps at high rank (until B's columns line up and B A grows like r); "
            "rsLoRA's alpha/sqrt(r) "
            "would go from 5.66 to 2.0 (only sqrt(8) smaller), which is what 'drops to 1/sqrt(8)' describes."
        ),
        key_points=(kp("alpha / r", "alpha r"), kp("0.25", "0.25")),
        source="LoRA paper Section 4.1; rsLoRA arXiv 2312.03732",
        follow_ups=("Which scaling keeps the learning dynamics stable across r?",),
    ),
    Item(
        id="rank.model-size", topic="rank-alpha", kind="free", difficulty=3,
        prompt="The article says 'larger models can afford higher rank, smaller models benefit from lower values'. Is that right?",
        answer=(
            "It confuses cost with need. Aghajanyan et al. (2020) found intrinsic dimension decreases as models "
            "get larger: big pretrained models need fewer effective degrees of freedom to adapt, and the LoRA "
            "paper's r = 1-4 worked on GPT-3 175B. A larger model can afford more adapter parameters, but "
            "usually needs a relatively smaller rank; small models (like SmolLM2-135M) may need a relatively "
            "larger rank or full fine-tuning, which is cheap for them anyway."
        ),
        key_points=(
            kp("intrinsic dimension decreases with model size", "intrinsic", "decreas", "smaller"),
            kp("GPT-3 worked with very low rank", "gpt 3", "r 1", "low rank"),
            kp("afford is not need", "afford", "cost", "need"),
        ),
        corrects_article=True,
        source="Aghajanyan et al. 2020 (arXiv 2012.13255) Section 5; LoRA Table 6",
        follow_ups=("What would you do for a 135M model with 100k examples?",),
    ),
    Item(
        id="rank.lr", topic="rank-alpha", kind="free", difficulty=2,
        prompt="What learning rates do LoRA and QLoRA use, and why higher than full fine-tuning?",
        answer=(
            "LoRA/QLoRA typically use about 1e-4 to 2e-4 with AdamW (QLoRA: 2e-4 for 7B/13B, 1e-4 for 33B/65B, "
            "constant schedule), roughly 10x the 1e-5 to 2e-5 common for full fine-tuning. The adapter starts at "
            "zero and has few parameters, so it needs larger steps to move; the scaling alpha/r also multiplies "
            "the effective step. Too high a rate makes the loss spike or the model forget; sweep it with alpha."
        ),
        key_points=(
            kp("about 1e-4 to 2e-4", "1e 4", "2e 4", "0.0001", "0.0002"),
            kp("about 10x full fine-tuning's", "10x", "higher", "full"),
            kp("interacts with alpha/r", "alpha"),
        ),
        source="QLoRA Appendix B.2 (hyperparameters table); LoRA paper Appendix D",
        follow_ups=("Why does LoRA+ give B a larger rate than A?",),
    ),
    Item(
        id="rank.overfit", topic="rank-alpha", kind="free", difficulty=2,
        prompt="Your LoRA fine-tune on 2,000 examples reaches near-zero training loss but held-out quality drops. What do you change?",
        answer=(
            "It is over-fitting (memorising). Levers: fewer epochs or early stopping on a held-out loss/metric; "
            "a lower learning rate; LoRA dropout (0.05-0.1) and weight decay; a lower rank or fewer target "
            "modules; more or more varied data (paraphrases). Check the loss is only on answer tokens (prompt "
            "tokens are easy to memorise) and that held-out examples are really unseen (deduplicate)."
        ),
        key_points=(
            kp("early stopping / fewer epochs", "early stop", "epoch"),
            kp("lower learning rate", "learning rate"),
            kp("dropout / weight decay", "dropout", "weight decay"),
            kp("lower rank or fewer targets", "rank", "target"),
            kp("more or more varied data", "more data", "data"),
        ),
        source="Standard practice; QLoRA Appendix B (dropout 0.1/0.05)",
        follow_ups=("How do you tell over-fitting from a broken eval?",),
    ),
    Item(
        id="rank.rank-budget", topic="rank-alpha", kind="choice", difficulty=2,
        prompt="With a fixed budget of trainable parameters (18M on GPT-3 175B), what did the LoRA paper's Table 5 find?",
        choices=("Putting the whole budget into one matrix at r=8 works best",
                 "Spreading it over several matrices at a lower rank (Wq and Wv at r=4, or all four at r=2) beats one matrix at r=8",
                 "Wk alone is best", "Only r=64 on Wq matches full fine-tuning"),
        correct=1,
        answer=(
            "Table 5: Wq alone at r=8 gives 70.4 on WikiSQL; Wq and Wv at r=4 give 73.7 and all four at r=2 "
            "73.7 (and the best MultiNLI, 91.7). Adapting more matrices at a lower rank beats a high rank on "
            "one matrix: the same lesson QLoRA draws when it puts LoRA on all linear layers."
        ),
        key_points=(kp("more matrices at lower rank beats one at higher rank", "more matrices"), kp("Wq and Wv", "wq wv")),
        source="LoRA paper Section 7.1, Table 5",
        follow_ups=("How does that fit QLoRA's all-linear finding?",),
    ),
]
