import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels-community.*")
# pytest runs with -n 2 on 2 cores: one thread per worker, or the workers oversubscribe the CPU
torch.set_num_threads(1)


@pytest.fixture
def tiny():
    from lora_ref.models import tiny_llama
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real model, loaded once per test process (read-only: tests that train must deep-copy)."""
    from lora_ref.models import load_smollm2
    return load_smollm2()
