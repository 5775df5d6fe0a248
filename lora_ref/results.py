"""Where the course keeps its committed measurements, and reading one.

Benchmarks that need a GPU or an hour of CPU (``benchmarks/*.py``) write JSON to ``benchmarks/results/``
with their device and date; the notebooks read them there, so a learner without a GPU still sees the
measured figures (and the script that made them).
"""
from __future__ import annotations

import json
from pathlib import Path


def results_dir() -> Path:
    """``benchmarks/results`` of the course repository: found from the working directory upwards (a notebook
    runs in ``notebooks/NN_topic/``), else next to this package (an editable install)."""
    here = Path.cwd().resolve()
    for root in (here, *here.parents):
        if (root / "benchmarks" / "results").is_dir() and (root / "lora_ref").is_dir():
            return root / "benchmarks" / "results"
    return Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def load_result(name: str) -> dict | None:
    """The committed result ``benchmarks/results/<name>`` as a dict, or None (with a note) when it is missing."""
    path = results_dir() / name
    if not path.exists():
        print(f"{path} not found: the benchmark that writes it has not been run in this checkout")
        return None
    return json.loads(path.read_text())
