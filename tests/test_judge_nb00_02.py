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

# notebooks 03-08 (09's answers are numbers and choices, 10 has tests/test_judge_nb10.py): the solution
# passes the judge on the run's secret cases too, which differ from the notebook's fixed ones
LATER = {"03_lora_on_a_real_model": "03.", "04_rank_and_alpha": "04.", "05_nf4_quantisation": "05.",
         "06_qlora_on_a_gpu": "06.", "07_merge_and_deploy": "07.", "08_evaluating_and_choosing": "08."}

pytestmark = pytest.mark.slow


def _answers(path: Path) -> list[dict]:
    from autograder.course import answer_cells
    return answer_cells(nbformat.read(path, as_version=4))


def _judge(stem: str, folder: str, tmp_path: Path, exercises: list[str] | None = None,
           secret: int = 11) -> dict[str, bool]:
    from autograder import judge
    from autograder.contracts import Limits
    exercises = exercises or NOTEBOOKS[stem]
    ref = tmp_path / "ref.safetensors"
    assert judge.reference_outputs(exercises, ref, secret=secret) == {}
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


@pytest.mark.parametrize("stem", sorted(LATER))
def test_solution_passes_the_judge_on_secret_cases(stem, tmp_path):
    from lora_ref.exercises import REGISTRY, draw_cases, load_all
    load_all()
    exercises = sorted(k for k in REGISTRY if k.startswith(LATER[stem]))
    secret = 20261201
    for ex in exercises:   # the secret really changes the cases (a fixed table of outputs cannot pass)
        drawn = [{k: v for k, v in c.items() if k != "_given"} for c in draw_cases(REGISTRY[ex], secret)]
        assert drawn != list(REGISTRY[ex].cases()), f"{ex}: its cases do not depend on the run's secret"
    assert _judge(stem, "solutions", tmp_path, exercises, secret) == {ex: True for ex in exercises}
