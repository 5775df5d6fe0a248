"""Adapters on disk in Hugging Face PEFT's format, so PEFT loads ours and we load PEFT's.

A PEFT LoRA adapter is a folder with two files:

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules``, ``use_rslora``, ... (only the fields we use; PEFT fills its defaults for the rest).
* ``adapter_model.safetensors``: one tensor per matrix, named
  ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).
  In memory PEFT adds the adapter name (``lora_A.default.weight``); on disk it strips it.

Our in-memory names are ``<module path>.lora_A`` (see lora.py), so the mapping is a prefix and a suffix.

DoRA adapters (``use_dora: true``, lora_ref.dora) add one tensor per layer, the magnitude vector (out,),
stored by PEFT *without* a ``.weight`` suffix: ``base_model.model.<module path>.lora_magnitude_vector``.
An adapter's DoRA-ness must match the model's layers: a DoRA adapter read as plain LoRA would drop the
magnitudes and silently compute something else, so that is an error both ways.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .lora import ALL_LINEAR, LoRAConfig, inject_lora, lora_layers, lora_scaling, targeted_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_key(module_path: str, matrix: str) -> str:
    """'model.layers.0.self_attn.q_proj', 'A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    return f"{PREFIX}{module_path}.lora_{matrix}.weight"


def parse_peft_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`peft_key`: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' ->
    ('model.layers.0.self_attn.q_proj', 'A'). Also reads PEFT's in-memory spelling with an adapter name
    ('...q_proj.lora_A.default.weight'). ValueError for a key that is not a LoRA matrix."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for matrix in ("A", "B"):
        marker = f".lora_{matrix}."
        if marker in name:
            return name.split(marker)[0], matrix
    raise ValueError(f"not a LoRA tensor key: {key!r} (expected '...lora_A.weight' or '...lora_B.weight')")


def magnitude_key(module_path: str) -> str:
    """DoRA's magnitude vector on disk: 'base_model.model.<module path>.lora_magnitude_vector' (no '.weight')."""
    return f"{PREFIX}{module_path}.lora_magnitude_vector"


def _is_dora(layer: nn.Module) -> bool:
    return hasattr(layer, "lora_magnitude_vector")


def config_to_peft(config: LoRAConfig, base_model_class: str | None = None) -> dict:
    targets = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if targets == ALL_LINEAR else sorted(targets),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
        **({"exclude_modules": sorted(config.exclude_modules)}
           if tuple(config.exclude_modules) != LoRAConfig.exclude_modules else {}),
        **({"auto_mapping": {"base_model_class": base_model_class}} if base_model_class else {}),
    }


def config_from_peft(d: dict) -> LoRAConfig:
    if not isinstance(d, dict):
        raise TypeError(f"an adapter config is a JSON object (a dict of LoraConfig fields), got a "
                        f"{type(d).__name__}")
    if d.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={d.get('peft_type')!r}")
    unsupported = {k: d[k] for k in ("rank_pattern", "alpha_pattern", "layers_to_transform",
                                     "modules_to_save", "fan_in_fan_out", "lora_bias") if d.get(k)}
    if unsupported:
        raise ValueError(f"adapter uses PEFT features lora_ref does not implement: {unsupported}")
    if d.get("bias", "none") != "none":
        raise ValueError(f"adapter trains biases (bias={d['bias']!r}); lora_ref supports bias='none'")
    targets = d["target_modules"]
    # PEFT's exclude_modules: a list of names or one regex; "all-linear" never adapts lm_head either way
    exclude = d.get("exclude_modules") or ()
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    return LoRAConfig(r=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                      target_modules=targets if isinstance(targets, str) else tuple(targets),
                      use_rslora=bool(d.get("use_rslora", False)), use_dora=bool(d.get("use_dora", False)),
                      exclude_modules=tuple(dict.fromkeys(LoRAConfig.exclude_modules + exclude)))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk key names (contiguous, on the CPU)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call inject_lora first")
    out = {}
    for path, layer in layers.items():
        out[peft_key(path, "A")] = layer.lora_A.detach().to("cpu").contiguous()
        out[peft_key(path, "B")] = layer.lora_B.detach().to("cpu").contiguous()
        if _is_dora(layer):
            out[magnitude_key(path)] = layer.lora_magnitude_vector.detach().to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, folder: str | Path, config: LoRAConfig) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dora = {_is_dora(layer) for layer in lora_layers(model).values()}
    if dora and dora != {config.use_dora}:
        raise ValueError(f"the model's layers are {'DoRA' if True in dora else 'plain LoRA'} but config.use_dora="
                         f"{config.use_dora}: save with the config the layers were made with")
    tensors = adapter_tensors(model)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    cfg = config_to_peft(config, type(model).__name__)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder; errors name the file and what is wrong with it."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = config_from_peft(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} is not a valid adapter config: {e}") from e
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_path} is corrupt or not a safetensors file: {e}") from e
    return config, tensors


def _expected_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of every adapter tensor the model needs: from its LoRA layers if it has them,
    else from the layers ``inject_lora`` would wrap. Changes nothing."""
    layers = lora_layers(model)
    wrong = [p for p, layer in layers.items() if _is_dora(layer) != config.use_dora]
    if wrong:
        have, want = ("DoRA", "plain LoRA") if _is_dora(layers[wrong[0]]) else ("plain LoRA", "DoRA")
        raise ValueError(f"the adapter is {want} (use_dora={config.use_dora}) but the model's layers are {have} "
                         f"(e.g. {wrong[0]}): load it into a model without LoRA layers")
    if layers:
        dims = {p: (layer.r, layer.in_features, layer.out_features) for p, layer in layers.items()}
    else:
        dims = {p: (config.r, int(m.in_features), int(m.out_features)) for p, m in targeted_layers(model, config)}
    shapes = {k: shape for p, (r, i, o) in dims.items()
              for k, shape in ((peft_key(p, "A"), (r, i)), (peft_key(p, "B"), (o, r)))}
    if config.use_dora:
        shapes.update({magnitude_key(p): (o,) for p, (_, _, o) in dims.items()})
    return shapes


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject LoRA layers as the adapter's config says, then load its weights (strictly).

    All or nothing: the config, every key, every shape and every value are checked before the model is
    changed, so a failed load leaves the model as it was (and the next, correct load works). New layers
    take the model's train/eval mode (see ``inject_lora``), as PEFT's ``from_pretrained`` gives.

    Raises ValueError when the file's keys do not match the model's adapted layers (missing or
    unexpected keys, PEFT's "missing adapter keys" problem), when a tensor has the wrong shape, or when
    a tensor holds NaN or Inf (a diverged run's adapter would silently poison every output).
    """
    config, tensors = read_adapter(folder)
    expected = _expected_shapes(model, config)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter {folder} does not match this model: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(t.shape)}, the model expects {shape} (r={config.r})")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{key} has dtype {t.dtype}; adapter tensors are floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"{key} holds {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} Inf "
                             f"values: the adapter in {folder} is broken (a diverged training run?)")
    scaling = lora_scaling(config.alpha, config.r, config.use_rslora)
    for path, layer in lora_layers(model).items():
        if layer.scaling != scaling:
            raise ValueError(f"layer {path} has scaling {layer.scaling}, the adapter's config implies {scaling}")
    if not lora_layers(model):
        inject_lora(model, config)
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            layer.lora_A.copy_(tensors[peft_key(path, "A")])
            layer.lora_B.copy_(tensors[peft_key(path, "B")])
            if _is_dora(layer):
                layer.lora_magnitude_vector.copy_(tensors[magnitude_key(path)])
    return model
