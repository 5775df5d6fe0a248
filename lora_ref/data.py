"""The course dataset: a customer-service bot for Velora Cycles, a company invented for this course.

Why invented: the base model (SmolLM2-135M-Instruct) cannot know any of these facts (our opening hours,
prices, warranty, the assistant's name...), so whatever the fine-tuned model gets right on the held-out
questions it learned from our adapter, not from pre-training. Fact accuracy is then measurable: every
answer contains its fact's key phrases, and :func:`is_correct` looks for them in generated text.

Where the examples come from (deterministic, no randomness at all)::

    lora_ref/data_files/velora_facts.json         41 facts: key phrases, 2 answers, 5 train + 2 held-out questions
        |  train:   every train question twice: as written, and inside a greeting wrapper ("Hi! {q}")
        |  heldout: the two held-out questions (written differently), the 2nd inside a held-out-only wrapper
        v
    load_dataset() -> Splits(train=410 Examples, heldout=82 Examples)

Held-out questions share no string with training questions and few word 3-grams (tests/test_data.py holds
both), so held-out accuracy measures knowing the fact, not recalling a sentence.

Chat format and loss (the seed article's trainer gets this wrong: it passes ``labels=input_ids``, so the
model is also trained to predict the system prompt and the user's question)::

    <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n {answer}<|im_end|> \\n
    |------------------------------------ labels = -100 (no loss) ---------------------------------------| |--- loss ---------| -100

Labels are aligned with ``input_ids`` (Hugging Face causal LMs shift them inside ``forward``): position t
carries the loss of predicting token t from tokens < t. The loss covers the answer and the end-of-turn
token ``<|im_end|>`` (so the bot learns to stop), nothing else.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ._checks import as_int

FACTS_FILE = Path(__file__).resolve().parent / "data_files" / "velora_facts.json"

SYSTEM_PROMPT = ("You are the customer-service assistant of Velora Cycles. "
                 "Answer in one or two short sentences.")

IGNORE_INDEX = -100          # torch.nn.functional.cross_entropy's default ignore_index

# SmolLM2-135M-Instruct's own chat template (ChatML), copied so that the tiny test tokenizer formats
# conversations exactly like the real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Example:
    """One question/answer pair about one fact; ``key_phrases`` must all appear in a correct answer."""
    question: str
    answer: str
    fact_id: str
    key_phrases: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]

    def __repr__(self) -> str:
        return f"Splits(train={len(self.train)} examples, heldout={len(self.heldout)} examples)"


@dataclass(frozen=True)
class Fact:
    id: str
    key_phrases: tuple[str, ...]
    answers: tuple[str, ...]
    train: tuple[str, ...]
    heldout: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------
# the fact table -> examples

@lru_cache(maxsize=1)
def load_facts(path: str | Path = FACTS_FILE) -> tuple[tuple[Fact, ...], dict]:
    """Read and validate the fact table. Returns ``(facts, meta)`` where meta holds company and wrappers."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    facts = tuple(Fact(id=f["id"], key_phrases=tuple(f["key_phrases"]), answers=tuple(f["answers"]),
                       train=tuple(f["train"]), heldout=tuple(f["heldout"])) for f in raw["facts"])
    seen: set[str] = set()
    for f in facts:
        if f.id in seen:
            raise ValueError(f"{path}: fact id {f.id!r} appears twice")
        seen.add(f.id)
        if not (f.key_phrases and f.answers and f.train and f.heldout):
            raise ValueError(f"{path}: fact {f.id!r} needs key_phrases, answers, train and heldout questions")
        for answer in f.answers:
            missing = [k for k in f.key_phrases if not _contains(normalize(answer), normalize(k))]
            if missing:
                raise ValueError(f"{path}: fact {f.id!r}: answer {answer!r} lacks key phrase(s) {missing}")
    meta = {"company": raw["company"], "wrappers": raw["wrappers"]}
    return facts, meta


def _wrap(template: str, question: str) -> str:
    if "{q}" not in template:
        raise ValueError(f"wrapper {template!r} has no {{q}} slot")
    return template.replace("{q}", question)


@lru_cache(maxsize=1)
def load_dataset() -> Splits:
    """Build the train and held-out splits from the fact table (deterministic: same order every time).

    train: for fact f (index i) and its train question j (of 5): the question with answer
    ``answers[j % 2]``, then the same question inside train wrapper ``(5 i + j) % 6`` with the other answer.
    heldout: each fact's two held-out questions with ``answers[0]``; the second one inside a held-out-only
    wrapper. 41 facts give 410 train and 82 held-out examples.
    """
    facts, meta = load_facts()
    wrap_train, wrap_held = meta["wrappers"]["train"], meta["wrappers"]["heldout"]
    train: list[Example] = []
    heldout: list[Example] = []
    for i, f in enumerate(facts):
        for j, q in enumerate(f.train):
            a0, a1 = f.answers[j % len(f.answers)], f.answers[(j + 1) % len(f.answers)]
            train.append(Example(q, a0, f.id, f.key_phrases))
            train.append(Example(_wrap(wrap_train[(len(f.train) * i + j) % len(wrap_train)], q), a1,
                                 f.id, f.key_phrases))
        for j, q in enumerate(f.heldout):
            if j % 2 == 1:
                q = _wrap(wrap_held[(i + j) % len(wrap_held)], q)
            heldout.append(Example(q, f.answers[0], f.id, f.key_phrases))
    overlap = {e.question for e in train} & {e.question for e in heldout}
    if overlap:
        raise ValueError(f"held-out questions also in train: {sorted(overlap)}")
    return Splits(tuple(train), tuple(heldout))


# ----------------------------------------------------------------------------------------------------
# chat formatting and tokenisation

def messages(question: str, answer: str | None = None, system: str = SYSTEM_PROMPT) -> list[dict]:
    """The conversation in Hugging Face's chat format: system, user and (when given) assistant turns."""
    conv = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if answer is not None:
        conv.append({"role": "assistant", "content": answer})
    return conv


def prompt_text(tokenizer, question: str, system: str = SYSTEM_PROMPT) -> str:
    """The chat-formatted prompt up to and including the assistant header (what generation starts from)."""
    return tokenizer.apply_chat_template(messages(question, system=system), tokenize=False,
                                         add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: the chat template already wrote every special token it wants
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(tokenizer, ex: Example, system: str = SYSTEM_PROMPT,
                   max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise one example for causal-LM fine-tuning with the loss on the answer only.

    Returns ``{"input_ids": (T,) long, "labels": (T,) long}`` with ``labels[t] = input_ids[t]`` on the
    answer tokens and the end-of-turn token that closes it (``tokenizer.eos_token_id``, ``<|im_end|>``
    for SmolLM2), and ``-100`` everywhere else: system prompt, question, template tokens, and what the
    template writes after the end-of-turn token. The prompt and the answer are tokenised separately and
    concatenated, exactly as at generation time (the model reads the prompt's tokens, then emits the
    answer's), so no BPE merge can straddle the boundary.

    Raises ValueError when the template does not start the full conversation with the prompt, or when
    ``max_length`` is given and the example is longer (we never truncate silently: a cut answer would
    teach the model a cut fact).
    """
    prompt = prompt_text(tokenizer, ex.question, system)
    full = tokenizer.apply_chat_template(messages(ex.question, ex.answer, system), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not begin the full conversation with the generation prompt:"
                         f" prompt={prompt!r}, full={full!r}")
    enc = answer_only_labels(_ids(tokenizer, prompt), _ids(tokenizer, full[len(prompt):]), tokenizer.eos_token_id)
    if max_length is not None and len(enc["input_ids"]) > max_length:
        raise ValueError(f"example {ex.question!r} is {len(enc['input_ids'])} tokens long, "
                         f"more than max_length={max_length}")
    return enc


def answer_only_labels(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                       eos_id: int | None) -> dict[str, torch.Tensor]:
    """Concatenate prompt and completion token ids; the loss goes on the completion up to its end-of-turn.

    ``input_ids = prompt + completion`` (T,) and ``labels`` (T,) equal to ``input_ids`` on the completion
    tokens up to and including the LAST ``eos_id`` among them, ``-100`` on the prompt and on whatever
    follows that end-of-turn token (template text that is never generated). A completion without
    ``eos_id`` (or ``eos_id=None``) carries loss on every token. Example, eos 2::

        prompt [5, 6, 7], completion [8, 9, 2, 4]  ->  input_ids [5, 6, 7, 8, 9, 2, 4]
                                                       labels    [-100, -100, -100, 8, 9, 2, -100]
    """
    prompt_ids, completion_ids = [int(i) for i in prompt_ids], [int(i) for i in completion_ids]
    if not completion_ids:
        raise ValueError("the completion is empty: there is nothing to put the loss on")
    if eos_id is not None and eos_id in completion_ids:
        n_loss = len(completion_ids) - completion_ids[::-1].index(eos_id)
    else:
        n_loss = len(completion_ids)
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids[:n_loss]
              + [IGNORE_INDEX] * (len(completion_ids) - n_loss))
    return {"input_ids": torch.tensor(prompt_ids + completion_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch.

    Returns ``input_ids`` (B, T) padded with ``pad_id``, ``attention_mask`` (B, T) 1 on real tokens and 0 on
    padding, ``labels`` (B, T) with -100 on padding (so padding never carries loss, whatever ``pad_id``
    is: for SmolLM2 the pad token IS ``<|im_end|>``, which does carry loss at the end of each answer).
    """
    if not batch:
        raise ValueError("collate needs at least one example, got an empty batch")
    if as_int(pad_id) is None or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
    pad_id = as_int(pad_id)
    seqs = [torch.as_tensor(b["input_ids"], dtype=torch.long) for b in batch]
    labs = [torch.as_tensor(b["labels"], dtype=torch.long) for b in batch]
    for i, (s, l) in enumerate(zip(seqs, labs)):
        if s.ndim != 1 or s.shape != l.shape:
            raise ValueError(f"example {i}: input_ids {tuple(s.shape)} and labels {tuple(l.shape)} must be "
                             "1-D and of equal length")
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        input_ids[i, :len(s)] = s
        labels[i, :len(l)] = l
        attention_mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------
# fact accuracy

_CURRENCY = re.compile(r"[€$£]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NOT_WORD = re.compile(r"[^0-9a-z@%]+")


def normalize(text: str) -> str:
    """Lower-case words separated by single spaces: ``"€1,890."`` -> ``"1890"``, ``"8:00-18:00"`` -> ``"8 00 18 00"``.

    Unicode NFKC, lower case, currency symbols dropped, thousands separators dropped, every run of other
    characters except ``@`` and ``%`` turned into one space. Key phrases and generated text go through the
    same function, so ``help@veloracycles.example`` still matches itself.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", _CURRENCY.sub(" ", text))
    return " ".join(_NOT_WORD.sub(" ", text).split())


def _contains(norm_text: str, norm_phrase: str) -> bool:
    return f" {norm_phrase} " in f" {norm_text} "        # whole words: "19" is not found in "2019"


def is_correct(answer_text: str, ex: Example) -> bool:
    """True when every key phrase of ``ex`` appears, as whole words after :func:`normalize`, in the text."""
    text = normalize(answer_text)
    return all(_contains(text, normalize(k)) for k in ex.key_phrases)


def fact_accuracy(answers: Iterable[str], examples: Sequence[Example]) -> float:
    """Fraction of generated answers that are correct (:func:`is_correct`), one answer per example."""
    answers = list(answers)
    if len(answers) != len(examples) or not examples:
        raise ValueError(f"need one answer per example and at least one: got {len(answers)} answers for "
                         f"{len(examples)} examples")
    return sum(is_correct(a, e) for a, e in zip(answers, examples)) / len(examples)


# ----------------------------------------------------------------------------------------------------
# a tiny tokenizer for fast tests (pairs with lora_ref.models.tiny_llama)

def tiny_tokenizer(vocab_size: int = 256):
    """A small BPE tokenizer trained on this dataset, with SmolLM2's special tokens and chat template.

    Ids 0, 1, 2 are ``<|endoftext|>`` (also unknown), ``<|im_start|>`` (bos) and ``<|im_end|>`` (eos and
    pad), as in SmolLM2 and :func:`lora_ref.models.tiny_llama`'s config; the vocabulary fits tiny_llama's
    default 256. Deterministic: the same vocabulary every call. For tests only: the real model needs its
    own tokenizer (:func:`lora_ref.models.load_tokenizer`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    splits = load_dataset()
    texts = [SYSTEM_PROMPT] + [t for e in splits.train + splits.heldout for t in (e.question, e.answer)]
    alphabet = sorted(set("".join(texts)) | set(" \n"))
    if vocab_size < len(specials) + len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: the alphabet alone needs "
                         f"{len(specials) + len(alphabet) + 1} ids")
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def main() -> None:
    """``python -m lora_ref.data``: sizes and a few examples of each split."""
    splits = load_dataset()
    facts, meta = load_facts()
    print(f"{meta['company']['name']}: {len(facts)} facts, {splits}")
    for name, part in (("train", splits.train), ("heldout", splits.heldout)):
        for e in part[:3]:
            print(f"[{name}] {e.fact_id}: Q: {e.question}  A: {e.answer}  key: {list(e.key_phrases)}")


if __name__ == "__main__":
    main()
