r"""Serving LoRA models: merged inference, hot-swapped adapters, and one batch with many adapters.

Three ways to serve a LoRA fine-tune (LoRA paper, arXiv 2106.09685, Section 4.2 "No additional inference
latency"; S-LoRA, arXiv 2311.03285; Punica, arXiv 2310.18547)::

    1. merged        W' = W + s B A, written once       -> a plain model, zero added latency, one task
    2. hot-swapped   W stays, the active adapter is a name; switching = flipping a name (no weight copy)
    3. mixed batch   W stays, row i of the batch uses adapter idx[i]:
                         y_i = W x_i + s_{idx[i]} B_{idx[i]} A_{idx[i]} x_i
                     gather A, B per row, then two batched matmuls (Punica's "BGMV" / S-LoRA's idea):
                         x (b, t, in) --bmm A_g^T (b, in, r)--> (b, t, r) --bmm B_g^T (b, r, out)--> (b, t, out)

The base weights are shared by every adapter: many tenants on one copy of the model. Adapters of different
ranks are zero-padded to the largest rank; the zero rows of A and zero columns of B add exactly nothing.

What lives here:
- :class:`MultiLoRALinear`: one frozen linear with a dict of named adapters, an active name, and an optional
  per-row adapter index for mixed batches.
- :class:`AdapterServer`: wraps a base causal LM; ``load_adapter(name, folder)`` (PEFT format),
  ``add_adapter(name, lora_model)``, ``set_adapter(name)``, ``mixed_forward(..., adapter_names)``,
  ``generate(prompts, adapter_names)``.
- :func:`merged_copy`, :func:`export_merged_model`: merged inference and a plain safetensors checkpoint.
- :func:`measure_latency`, :func:`compare_latency`: timing helpers (interleaved runs, median and spread).
- :class:`ChatSession`: a small multi-turn chat helper for the tuned customer-service bot.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .adapters import parse_peft_key, read_adapter
from .lora import lora_layers, lora_scaling, merge_and_unload, set_submodule
from .qlora import Linear4bit, merge_for_deployment

BASE = None          # the adapter name that means "no adapter: the base model alone"


# --------------------------------------------------------------------------------------------------
# adapter weights, independent of any model
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterWeights:
    """One LoRA adapter as plain tensors: ``{module_path: (A (r, in), B (out, r), scaling)}``.

    ``module_path`` is the path of the adapted linear inside the base model, e.g.
    ``model.layers.0.self_attn.q_proj`` (PEFT's file keys minus ``base_model.model.`` and ``.lora_A.weight``).
    """
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
    config: Mapping = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b, _ in self.layers.values())


def adapter_from_model(model: nn.Module) -> AdapterWeights:
    """Collect the adapters of a model injected with :func:`lora_ref.lora.inject_lora` (copies detached)."""
    layers = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), float(layer.scaling))
              for name, layer in lora_layers(model).items()}
    if not layers:
        raise ValueError("the model has no LoRALinear layers; inject or load an adapter first")
    return AdapterWeights(layers)


def read_peft_adapter(folder: str | Path) -> AdapterWeights:
    """Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) into tensors.

    Validation of the files is :func:`lora_ref.adapters.read_adapter`'s; here the flat PEFT keys are
    grouped per module, and scaling = lora_alpha / r (or lora_alpha / sqrt(r) with ``use_rslora``).
    """
    config, tensors = read_adapter(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, kind = parse_peft_key(key)
        parts.setdefault(module, {})[kind] = t
    layers = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: module {module!r} has only lora_{''.join(ab)}; both A and B are needed")
        if ab["A"].shape[0] != config.r or ab["B"].shape[1] != config.r:
            raise ValueError(f"{folder}: {module!r} has A {tuple(ab['A'].shape)}, B {tuple(ab['B'].shape)} but "
                             f"the config says r={config.r}")
        layers[module] = (ab["A"], ab["B"], lora_scaling(config.alpha, config.r, config.use_rslora))
    return AdapterWeights(layers, {"r": config.r, "lora_alpha": config.alpha, "use_rslora": config.use_rslora,
                                   "target_modules": config.target_modules})


# --------------------------------------------------------------------------------------------------
# the two formulas: merged_weight (lora.merged_weight, the one merge) and the mixed-batch delta
# --------------------------------------------------------------------------------------------------

def batched_lora_delta(x: torch.Tensor, A_all: torch.Tensor, B_all: torch.Tensor, s_all: torch.Tensor,
                       idx: torch.Tensor) -> torch.Tensor:
    r"""The LoRA branch of a batch in which row i uses adapter idx[i] (Punica's BGMV, S-LoRA's idea).

    delta_i = s_{idx[i]} * x_i A_{idx[i]}^T B_{idx[i]}^T, by gathering each row's A and B and two bmm's:
    x (b, t, in) or (b, in); A_all (n, r, in); B_all (n, out, r); s_all (n,); idx (b,) long -> (b, t, out)
    or (b, out), in A_all's dtype. Adapters of smaller rank are zero-padded to r (exact).
    """
    if idx.dim() != 1 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must have one entry per row: idx {tuple(idx.shape)}, x {tuple(x.shape)}")
    squeeze = x.dim() == 2
    h = x.unsqueeze(1) if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])    # (b, t, in)
    A_g, B_g = A_all[idx], B_all[idx]                                            # (b, r, in), (b, out, r)
    h = torch.bmm(h.to(A_g.dtype), A_g.transpose(1, 2))                          # (b, t, r)
    y = torch.bmm(h, B_g.transpose(1, 2)) * s_all[idx].to(A_g.dtype).view(-1, 1, 1)   # (b, t, out)
    return y.squeeze(1) if squeeze else y.reshape(*x.shape[:-1], B_all.shape[1])


# --------------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------------

class MultiLoRALinear(nn.Module):
    r"""A frozen linear layer shared by several named LoRA adapters.

    Modes (checked in this order):
      * ``row_index`` set (a LongTensor of shape (batch,), -1 = base only): mixed batch,
        y_i = W x_i + s_{k} B_k A_k x_i with k = row_index[i], by gather + two ``torch.bmm``.
      * ``active`` set to a name: y = W x + s B A x for that adapter (hot swap = change the name).
      * otherwise the base layer alone.

    Adapters are kept in fp32 (or their own float dtype), never merged, so switching costs nothing.
    The stacked tensors for mixed batches, A_all (n+1, r_max, in), B_all (n+1, out, r_max) and
    s_all (n+1,), are rebuilt lazily when adapters change; slot 0 is an all-zero "base" adapter.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        for attr in ("in_features", "out_features", "weight"):
            if not hasattr(base, attr):
                raise TypeError(f"MultiLoRALinear wraps a linear layer; {type(base).__name__} has no {attr!r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.active: str | None = None
        self.row_index: torch.Tensor | None = None
        self._stack: tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"adapter {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a "
                             f"{self.out_features}x{self.in_features} layer (need A (r, {self.in_features}), "
                             f"B ({self.out_features}, r))")
        dev = self.base_layer.weight.device
        dtype = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
        self.adapters[name] = (A.detach().to(dev, dtype), B.detach().to(dev, dtype), float(scaling))
        self._stack = None

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        if self.active == name:
            self.active = None
        self._stack = None

    def stacked(self, order: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A_all (n+1, r_max, in), B_all (n+1, out, r_max), s_all (n+1,) for adapters in ``order``;
        slot 0 is the zero adapter (base only); an adapter absent from this layer is zeros too."""
        order = list(order)
        if self._stack is not None and self._stack[0] == order:
            return self._stack[1:]
        dev = self.base_layer.weight.device
        r_max = max([self.adapters[n][0].shape[0] for n in order if n in self.adapters] or [1])
        A_all = torch.zeros(len(order) + 1, r_max, self.in_features, device=dev)
        B_all = torch.zeros(len(order) + 1, self.out_features, r_max, device=dev)
        s_all = torch.zeros(len(order) + 1, device=dev)
        for k, n in enumerate(order, start=1):
            if n in self.adapters:
                A, B, s = self.adapters[n]
                A_all[k, :A.shape[0]] = A            # zero-padding to r_max is exact
                B_all[k, :, :B.shape[1]] = B
                s_all[k] = s
        self._stack = (order, A_all, B_all, s_all)
        return A_all, B_all, s_all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.row_index is not None:
            return out + self._mixed_delta(x).to(out.dtype)
        if self.active is not None and self.active in self.adapters:
            A, B, s = self.adapters[self.active]
            return out + (((x.to(A.dtype) @ A.t()) @ B.t()) * s).to(out.dtype)
        return out

    def _mixed_delta(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.row_index                         # (b,), values in [0, n]; 0 = base
        if x.shape[0] != idx.shape[0]:
            raise ValueError(f"batch has {x.shape[0]} rows but {idx.shape[0]} adapter indices were given")
        return batched_lora_delta(x, *self._stack[1:], idx)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.adapters)}, active={self.active!r}"


# --------------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------------

class AdapterServer:
    """One base model, many LoRA adapters, switched by name without reloading or copying the base.

    >>> server = AdapterServer(base_model)
    >>> server.load_adapter("billing", "adapters/billing")      # PEFT-format folder
    >>> server.set_adapter("billing"); server.model(ids)          # hot swap: O(1)
    >>> server.mixed_forward(ids, adapter_names=["billing", None, "returns"])   # one batch, 3 adapters
    """

    def __init__(self, model: nn.Module):
        if lora_layers(model):
            raise ValueError("the base model already has LoRALinear layers; serve a clean base model "
                             "(merge_and_unload it first, or load it fresh)")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.names: list[str] = []
        self.active: str | None = None

    # -- adapters ---------------------------------------------------------------------------------
    def layers(self) -> dict[str, MultiLoRALinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiLoRALinear)}

    def add_adapter(self, name: str, adapter: AdapterWeights | nn.Module) -> None:
        """Register an adapter (AdapterWeights, or a model carrying LoRALinear layers) under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.names:
            raise ValueError(f"adapter {name!r} already loaded; remove_adapter({name!r}) first")
        if isinstance(adapter, nn.Module):
            adapter = adapter_from_model(adapter)
        wrapped = self.layers()
        modules = dict(self.model.named_modules())
        missing = [m for m in adapter.layers if m not in wrapped and m not in modules]
        if missing:
            raise KeyError(f"adapter {name!r} targets modules not in the base model: {missing[:3]}")
        for path, (A, B, s) in adapter.layers.items():
            layer = wrapped.get(path)
            if layer is None:
                layer = MultiLoRALinear(modules[path])
                set_submodule(self.model, path, layer)
                wrapped[path] = layer
            layer.add(name, A, B, s)
        self.names.append(name)

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a PEFT-format adapter folder under ``name`` (the base model is not touched)."""
        self.add_adapter(name, read_peft_adapter(folder))

    def remove_adapter(self, name: str) -> None:
        self._check(name)
        for layer in self.layers().values():
            layer.remove(name)
        self.names.remove(name)
        if self.active == name:
            self.active = None

    def _check(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise KeyError(f"unknown adapter {name!r}; loaded: {self.names} (None = base model)")

    def set_adapter(self, name: str | None) -> None:
        """Hot swap: every wrapped layer now uses adapter ``name`` (None = base model). No weight moves."""
        self._check(name)
        for layer in self.layers().values():
            layer.active = name
        self.active = name

    # -- mixed batches ----------------------------------------------------------------------------
    def row_index(self, adapter_names: Sequence[str | None]) -> torch.Tensor:
        """Adapter names per row -> indices into the stacked adapters (0 = base, k = names[k-1])."""
        for n in adapter_names:
            self._check(n)
        return torch.tensor([0 if n is None else self.names.index(n) + 1 for n in adapter_names],
                            dtype=torch.long)

    @contextmanager
    def per_row(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Inside this block, row i of every batch uses adapter ``adapter_names[i]``."""
        idx = self.row_index(adapter_names)
        layers = list(self.layers().values())
        for layer in layers:
            layer.stacked(self.names)
            layer.row_index = idx.to(layer.base_layer.weight.device)
        try:
            yield
        finally:
            for layer in layers:
                layer.row_index = None

    @torch.no_grad()
    def mixed_forward(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None],
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, t, vocab) of one forward where row i uses adapter ``adapter_names[i]``."""
        if len(adapter_names) != input_ids.shape[0]:
            raise ValueError(f"{len(adapter_names)} adapter names for a batch of {input_ids.shape[0]} rows")
        with self.per_row(adapter_names):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, tokenizer, prompts: Sequence[str], adapter_names: Sequence[str | None],
                 max_new_tokens: int = 32, system: str | None = None) -> list[str]:
        """Greedy chat replies for several users at once, each with its own adapter, in one batch."""
        if len(prompts) != len(adapter_names):
            raise ValueError(f"{len(prompts)} prompts but {len(adapter_names)} adapter names")
        texts = []
        for p in prompts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            texts.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"          # decoder-only batches pad on the left
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = side
        out = self.generate_ids(enc["input_ids"], adapter_names, enc["attention_mask"], max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id)
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None],
                     attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                     pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation (b, max_new_tokens) of a (left-padded) batch, row i with its own adapter."""
        if len(adapter_names) != input_ids.shape[0]:
            raise ValueError(f"{len(adapter_names)} adapter names for a batch of {input_ids.shape[0]} rows")
        dev = next(self.model.parameters()).device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.per_row(adapter_names):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask.to(dev),
                                      max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad_token_id)
        return out[:, input_ids.shape[1]:]


# --------------------------------------------------------------------------------------------------
# merged inference and export
# --------------------------------------------------------------------------------------------------

def merged_copy(lora_model: nn.Module) -> nn.Module:
    """A deep copy of a LoRA model with every adapter merged into its weight and the wrappers removed:
    W' = W + s B A (delta in fp32), a plain transformers model with no added latency (LoRA Section 4.2)."""
    if not lora_layers(lora_model):
        raise ValueError("the model has no LoRALinear layers: nothing to merge")
    return merge_and_unload(copy.deepcopy(lora_model))


def export_merged_model(lora_model: nn.Module, folder: str | Path, tokenizer=None,
                        dtype: torch.dtype | None = None, in_place: bool = False) -> Path:
    """Merge and write a plain checkpoint: the one exporter of merged models (LoRA and QLoRA).

    LoRA: W' = W + s B A (:func:`lora_ref.lora.merged_weight`, fp32 sum), wrappers removed; ``dtype`` casts
    the merged model before saving (e.g. torch.bfloat16 halves the file). QLoRA (4-bit bases):
    :func:`lora_ref.qlora.merge_for_deployment`, W_16 = cast(dequant(W_nf4) + s B A) in ``dtype``
    (default bf16): never re-quantised. transformers models are written with ``save_pretrained``
    (config.json + model.safetensors, loads with ``AutoModelForCausalLM.from_pretrained``), other modules
    as ``model.safetensors`` of the state dict. ``in_place=True`` merges ``lora_model`` itself instead of
    a copy (no second copy of a large model in memory).
    """
    model = lora_model if in_place else copy.deepcopy(lora_model)
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        merge_for_deployment(model, torch.bfloat16 if dtype is None else dtype)
    else:
        if not lora_layers(model):
            raise ValueError("the model has no LoRALinear layers: nothing to merge")
        merge_and_unload(model)
        if dtype is not None:
            model = model.to(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        from safetensors.torch import save_model
        save_model(model, str(folder / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock times of repeated calls, in milliseconds."""
    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p10_ms(self) -> float:
        return _quantile(self.times_ms, 0.1)

    @property
    def p90_ms(self) -> float:
        return _quantile(self.times_ms, 0.9)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    def __str__(self) -> str:
        return (f"median {self.median_ms:.2f} ms (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f}, "
                f"n={len(self.times_ms)})")


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_latency(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> LatencyStats:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (CUDA synchronised around each)."""
    return compare_latency({"fn": fn}, repeats=repeats, warmup=warmup)["fn"]


def compare_latency(fns: Mapping[str, Callable[[], object]], repeats: int = 10,
                    warmup: int = 2) -> dict[str, LatencyStats]:
    """Time several functions **interleaved** (a, b, c, a, b, c, ...), so that a noisy shared machine
    slows all of them alike instead of biasing whichever ran during the noise. Returns stats per name."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    if not fns:
        raise ValueError("no functions to time")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: LatencyStats(tuple(v)) for k, v in times.items()}


# --------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------

class ChatSession:
    """A small multi-turn chat with the tuned bot: keeps the history, optionally picks an adapter.

    >>> bot = ChatSession(server.model, tokenizer, server=server, adapter="support")
    >>> bot.ask("How do I reset my password?")
    """

    def __init__(self, model: nn.Module, tokenizer, system: str | None = None,
                 server: AdapterServer | None = None, adapter: str | None = None,
                 max_new_tokens: int = 64, max_turns: int = 4):
        if system is None:
            from .data import SYSTEM_PROMPT
            system = SYSTEM_PROMPT
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.server, self.adapter = server, adapter
        self.max_new_tokens, self.max_turns = max_new_tokens, max_turns
        self.history: list[dict[str, str]] = []
        if server is not None:
            server._check(adapter)
        elif adapter is not None:
            raise ValueError(f"adapter={adapter!r} needs server=AdapterServer(...)")

    def ask(self, question: str) -> str:
        from .models import chat

        if self.server is not None:
            self.server.set_adapter(self.adapter)
        # keep the last max_turns exchanges: a 135M model has a short useful context
        self.history.append({"role": "user", "content": question})
        recent = self.history[-(2 * self.max_turns - 1):]
        reply = chat(self.model, self.tokenizer, recent, max_new_tokens=self.max_new_tokens, system=self.system)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def reset(self) -> None:
        self.history.clear()
