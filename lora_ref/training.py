"""A short, readable fine-tuning loop, its metrics, and the ``lora-train`` command.

What the loop does, and why:
* AdamW over the trainable parameters only (after ``inject_lora`` those are the adapters): optimizer
  state exists only for them, which is where most of LoRA's memory saving comes from.
* The loss covers the answer tokens only (labels are -100 on the system prompt and the question, see
  ``lora_ref.data.encode_example``): the seed article's trainer uses ``labels=input_ids`` and so also
  trains the model to reproduce the prompt.
* Gradient clipping (max norm 1.0) and, on CUDA, bf16 autocast (same exponent range as fp32, so no loss
  scaling is needed, unlike fp16).
* Evaluation reports the token-weighted mean loss over the held-out set and its perplexity exp(loss)
  (the seed article averages exp(loss) per batch and calls it an "eval score"), plus fact accuracy: the
  share of held-out questions whose greedy answer contains the expected fact.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import data as course_data


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)            # training loss per step
    eval_points: list[tuple[int, float]] = field(default_factory=list)   # (step, eval loss)
    tokens_trained: int = 0                                      # answer tokens that carried loss
    peak_memory_bytes: int | None = None                         # CUDA only

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


def batches(examples: Sequence, tokenizer, batch_size: int, seed: int = 0):
    """Endless shuffled batches (epoch after epoch) of encoded, padded examples."""
    if not examples:
        raise ValueError("no training examples")
    encoded = [course_data.encode_example(tokenizer, ex) for ex in examples]
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield course_data.collate([encoded[j] for j in order[i:i + batch_size]], tokenizer.pad_token_id)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(model, tokenizer, train_examples: Sequence, eval_examples: Sequence | None = None, *,
          steps: int = 100, lr: float = 2e-4, batch_size: int = 8, weight_decay: float = 0.0,
          max_grad_norm: float = 1.0, warmup_steps: int = 0, seed: int = 0, eval_every: int | None = None,
          progress: bool = True, optimizer: torch.optim.Optimizer | None = None,
          callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fine-tune whatever parameters of ``model`` require grad. Returns losses, timing and memory."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if lr <= 0:
        raise ValueError(f"lr={lr} must be positive")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: call inject_lora (or unfreeze) first")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = TrainResult(steps=steps, seconds=0.0)
    stream = batches(train_examples, tokenizer, batch_size, seed)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="training", disable=not progress, leave=False)
    for step in bar:
        batch = _to(next(stream), device)
        with _autocast(device):
            loss = model(**batch).loss                   # mean over answer tokens (labels != -100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        result.losses.append(value)
        result.tokens_trained += int((batch["labels"][:, 1:] != -100).sum())
        bar.set_postfix(loss=f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.3f}")
        if callback:
            callback(step, value)
        if eval_examples and eval_every and (step + 1) % eval_every == 0:
            result.eval_points.append((step + 1, evaluate_loss(model, tokenizer, eval_examples, batch_size)))
            model.train()
    result.seconds = time.perf_counter() - start
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    model.eval()
    return result


@torch.no_grad()
def evaluate_loss(model, tokenizer, examples: Sequence, batch_size: int = 16, progress: bool = False) -> float:
    """Token-weighted mean cross-entropy over the answer tokens of ``examples``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    encoded = [course_data.encode_example(tokenizer, ex) for ex in examples]
    for i in tqdm(range(0, len(encoded), batch_size), desc="eval loss", unit="batch", disable=not progress,
                  leave=False):
        batch = _to(course_data.collate(encoded[i:i + batch_size], tokenizer.pad_token_id), device)
        with _autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # next-token prediction: logits at t predict token t+1
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 48,
                     batch_size: int = 32, progress: bool = False) -> list[str]:
    """Greedy answers to each question, with the course's system prompt, batched with left padding.

    Questions are batched in order of prompt length (least padding; answers come back in the input
    order). Left padding plus the attention mask give each row the answer it gets alone (position ids
    follow the mask; tests/test_smollm2.py checks batched == one at a time). Each batch stops as soon as
    every row has ended its turn, or after ``max_new_tokens``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"                       # generation continues from the right end
    texts = [course_data.prompt_text(tokenizer, q) for q in questions]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))
    answers: dict[int, str] = {}
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating answers", unit="batch",
                          disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with _autocast(device):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.update(zip(rows, decoded))
    finally:
        tokenizer.padding_side = side
    model.train(was_training)
    return [answers[i].strip() for i in range(len(texts))]


ANSWER_MARGIN_TOKENS = 8


def answer_token_budget(tokenizer, examples: Sequence, margin: int = ANSWER_MARGIN_TOKENS) -> int:
    """max_new_tokens for greedy answers to ``examples``: the longest reference answer, its end-of-turn
    token, and ``margin`` tokens to spare (the course's answers are one sentence: 21 tokens at most).

    A model that states the fact does so within a reference answer's length; one still talking after
    that is rambling, and every further token costs a decoding step for its whole batch.
    """
    if not examples:
        raise ValueError("no examples to size the answers by")
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    return longest + 1 + margin


def fact_accuracy(model, tokenizer, examples: Sequence, max_new_tokens: int | None = None, progress: bool = False,
                  return_answers: bool = False):
    """Share of examples whose greedy answer states the expected fact (``data.is_correct``).

    ``max_new_tokens`` defaults to :func:`answer_token_budget` of the examples."""
    if max_new_tokens is None:
        max_new_tokens = answer_token_budget(tokenizer, examples)
    answers = generate_answers(model, tokenizer, [ex.question for ex in examples], max_new_tokens,
                               progress=progress)
    acc = course_data.fact_accuracy(answers, examples)
    return (acc, answers) if return_answers else acc


@dataclass
class Evaluation:
    eval_loss: float
    perplexity: float
    fact_accuracy: float
    seconds: float = 0.0


def evaluate(model, tokenizer, examples: Sequence, max_new_tokens: int | None = None, progress: bool = False,
             label: str | None = None) -> Evaluation:
    """Held-out loss, perplexity and fact accuracy of ``model``; with ``label``, says what it is doing."""
    start = time.perf_counter()
    if max_new_tokens is None:
        max_new_tokens = answer_token_budget(tokenizer, examples)
    if label:
        print(f"evaluating the {label}: loss on {len(examples)} held-out answers, then greedy answers to the "
              f"{len(examples)} questions (at most {max_new_tokens} new tokens each)", flush=True)
    loss = evaluate_loss(model, tokenizer, examples, progress=progress)
    acc = fact_accuracy(model, tokenizer, examples, max_new_tokens, progress)
    return Evaluation(loss, math.exp(loss), acc, time.perf_counter() - start)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default: the value, "off" for a flag, or the help's own words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def main(argv: list[str] | None = None) -> int:
    """lora-train: fine-tune SmolLM2 with LoRA on the course dataset, save the adapter, print metrics."""
    from .adapters import save_adapter
    from .lora import LoRAConfig, count_parameters, inject_lora
    from .models import configure_cpu_threads, load_smollm2, pick_device

    ap = argparse.ArgumentParser(prog="lora-train", description=main.__doc__,
                                 formatter_class=_HelpWithDefaults)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling = alpha / r)")
    ap.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA branch while training")
    ap.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated names (q_proj,v_proj)")
    ap.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    ap.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    ap.add_argument("--seed", type=int, default=0, help="seed for the adapter init and the batch order")
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu or cuda")
    ap.add_argument("--out", default="runs/lora-adapter", help="adapter folder (PEFT format)")
    ap.add_argument("--skip-base-eval", action="store_true", help="don't evaluate the base model first")
    ap.add_argument("--heldout-limit", type=int, default=None, help="evaluate on the first N held-out examples "
                    "(default: all of them)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="longest generated answer in the fact-accuracy "
                    "evaluation (default: the longest reference answer + 1 + "
                    f"{ANSWER_MARGIN_TOKENS} tokens, see answer_token_budget)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: configure_cpu_threads: "
                    "$OMP_NUM_THREADS, 1 on a busy machine, else up to 4)")
    args = ap.parse_args(argv)

    device = pick_device() if args.device == "auto" else torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        configure_cpu_threads()        # one thread on a busy machine: OpenMP threads spin-wait for each other
    torch.manual_seed(args.seed)
    splits = course_data.load_dataset()
    heldout = splits.heldout[:args.heldout_limit] if args.heldout_limit else splits.heldout
    print("loading SmolLM2-135M-Instruct ...", flush=True)
    model, tok = load_smollm2(device=device)
    print(f"device: {device} ({torch.get_num_threads()} CPU threads); train examples: {len(splits.train)}; "
          f"held-out: {len(heldout)}", flush=True)
    metrics: dict = {"device": str(device), "args": vars(args)}
    if not args.skip_base_eval:
        base = evaluate(model, tok, heldout, args.max_new_tokens, progress=True, label="base model")
        metrics["base"] = asdict(base)
        print(f"base model:  eval loss {base.eval_loss:.3f}  perplexity {base.perplexity:.1f}  "
              f"fact accuracy {base.fact_accuracy:.1%}  ({base.seconds:.0f} s of evaluation)", flush=True)
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    config = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
                        use_rslora=args.rslora)
    inject_lora(model, config)
    print(count_parameters(model))
    print(f"training {args.steps} steps of {args.batch_size} examples ...", flush=True)
    res = train(model, tok, splits.train, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                seed=args.seed, warmup_steps=min(10, args.steps // 10))
    tuned = evaluate(model, tok, heldout, args.max_new_tokens, progress=True, label="LoRA model")
    metrics.update(lora=asdict(tuned), train_seconds=res.seconds, final_train_loss=res.final_loss,
                   trainable=count_parameters(model).trainable, peak_memory_bytes=res.peak_memory_bytes)
    out = save_adapter(model, args.out, config)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"LoRA model:  eval loss {tuned.eval_loss:.3f}  perplexity {tuned.perplexity:.1f}  "
          f"fact accuracy {tuned.fact_accuracy:.1%}  ({res.seconds:.0f} s of training, "
          f"{tuned.seconds:.0f} s of evaluation)")
    print(f"adapter saved to {out}/ (adapter_config.json, adapter_model.safetensors, metrics.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
