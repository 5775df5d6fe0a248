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
    nb = nbformat.read(path, as_version=4)
    return [{"grade_id": c.metadata["nbgrader"]["grade_id"], "source": c.source} for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution") and not c.metadata["nbgrader"].get("grade")]


def _judge(stem: str, folder: str, tmp_path: Path) -> dict[str, bool]:
    from autograder import judge
    from autograder.worker import run_judge
    exercises = NOTEBOOKS[stem]
    ref = tmp_path / "ref.safetensors"
    assert judge.reference_outputs(exercises, ref) == {}
    job = dict(limits=dict(memory_mb=3072, cpu_seconds=300, file_mb=16), exercises=exercises, cell_timeout=60,
               judge_timeout=300, blocked_reads=[str(ROOT / "lora_ref")])
    log, deaths = run_judge(job, tmp_path, _answers(ROOT / folder / stem / f"{stem}.ipynb"))
    assert not deaths, deaths
    out = judge.verdicts(exercises, log, tmp_path / "judge" / "outputs.safetensors", ref)
    return {k: v.passed for k, v in out.items()}


@pytest.mark.parametrize("stem", sorted(NOTEBOOKS))
def test_solution_passes_the_judge(stem, tmp_path):
    assert _judge(stem, "solutions", tmp_path) == {ex: True for ex in NOTEBOOKS[stem]}


@pytest.mark.parametrize("stem", sorted(NOTEBOOKS))
def test_student_copy_passes_nothing(stem, tmp_path):
    assert _judge(stem, "notebooks", tmp_path) == {ex: False for ex in NOTEBOOKS[stem]}
