"""Notebook 10 under the autograder's out-of-kernel judge: the solution's answer cells pass every exercise,
the student copy's pass none (answer cells replayed alone, lora_ref sealed off)."""
from pathlib import Path

import pytest

from test_judge_nb00_02 import _answers  # noqa: F401  (same harness)

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ["10.dora_forward", "10.dora_merge", "10.pissa_factors", "10.loftq_factors", "10.loraplus_groups"]
STEM = "10_beyond_lora"

pytestmark = pytest.mark.slow


def _judge(folder: str, tmp_path: Path) -> dict[str, bool]:
    from autograder import judge
    from autograder.contracts import Limits
    ref = tmp_path / "ref.safetensors"
    assert judge.reference_outputs(EXERCISES, ref, secret=11) == {}
    log, deaths = judge.run_judge(_answers(ROOT / folder / STEM / f"{STEM}.ipynb"), EXERCISES, ref, tmp_path / "judge",
                                  limits=Limits(memory_mb=3072, cpu_seconds=300, file_mb=16), cell_timeout=60,
                                  judge_timeout=300, hidden=[str(tmp_path)])
    assert not deaths, deaths
    return {k: v.passed for k, v in judge.verdicts(EXERCISES, log, ref).items()}


def test_solution_passes_the_judge(tmp_path):
    assert _judge("solutions", tmp_path) == {ex: True for ex in EXERCISES}


def test_student_copy_passes_nothing(tmp_path):
    assert _judge("notebooks", tmp_path) == {ex: False for ex in EXERCISES}
