"""lora_ref.models helpers that need no model download (the SmolLM2 tests are in test_smollm2.py)."""
import os

import pytest
import torch

from lora_ref import models


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cpu_threads_follow_omp_num_threads(monkeypatch, keep_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert models.configure_cpu_threads() == 1 == torch.get_num_threads()


def test_cpu_threads_one_on_a_busy_machine(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (10.0 * (os.cpu_count() or 1), 0.0, 0.0))
    assert models.configure_cpu_threads() == 1


def test_cpu_threads_capped_on_an_idle_machine(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    n = models.configure_cpu_threads(max_threads=2)
    assert n == min(2, os.cpu_count() or 1)


def test_pick_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device().type == "cpu"
