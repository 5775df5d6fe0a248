"""Notebooks 00-02 under the autograder's out-of-kernel judge: the solution answer cells pass every
exercise, the unchanged student answer cells pass none (answer cells replayed alone, lora_ref blocked)."""
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "00_welcome": ["00.count_params"],
    "01_low_rank": ["01.best_rank_r", "01.best_rank_r_half", "01.energy_spectrum", "01.lora_param_count"],
    "02_lora_linear": ["02.lora_scaling", "02.lora_init", "02.lora_forward", "02.lora_forward_half",
                       "02.lora_merge", "02.lora_merge_half"],
}

pytestmark = pytest.mark.slow


def _answers(path: Path) -> list[dict]:
    from autograder.course import answer_cells
    return answer_cells(nbformat.read(path, as_version=4))


def _judge(stem: str, folder: str, tmp_path: Path) -> dict[str, bool]:
    from autograder import judge
    from autograder.contracts import Limits
    exercises = NOTEBOOKS[stem]
    ref = tmp_path / "ref.safetensors"
    assert judge.reference_outputs(exercises, ref, secret=11) == {}
    log, deaths = judge.run_judge(_answers(ROOT / folder / stem / f"{stem}.ipynb"), exercises, ref, tmp_path / "judge",
                                  limits=Limits(memory_mb=3072, cpu_seconds=300, file_mb=16), cell_timeout=60,
                                  judge_timeout=300, hidden=[str(tmp_path)])
    assert not deaths, deaths
    out = judge.verdicts(exercises, log, ref)
    return {k: v.passed for k, v in out.items()}


@pytest.mark.parametrize("stem", sorted(NOTEBOOKS))
def test_solution_passes_the_judge(stem, tmp_path):
    assert _judge(stem, "solutions", tmp_path) == {ex: True for ex in NOTEBOOKS[stem]}


@pytest.mark.parametrize("stem", sorted(NOTEBOOKS))
def test_student_copy_passes_nothing(stem, tmp_path):
    assert _judge(stem, "notebooks", tmp_path) == {ex: False for ex in NOTEBOOKS[stem]}
