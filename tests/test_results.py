"""lora_ref.results: the notebooks find the committed measurements from their own folder."""
import json
from pathlib import Path

from lora_ref.results import load_result, results_dir

ROOT = Path(__file__).resolve().parents[1]


def test_found_from_a_notebook_folder(monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks" / "07_merge_and_deploy")
    assert results_dir() == ROOT / "benchmarks" / "results"
    want = json.loads((ROOT / "benchmarks" / "results" / "quality_qlora_h200.json").read_text())
    assert load_result("quality_qlora_h200.json") == want


def test_missing_result_is_none_with_a_note(capsys):
    assert load_result("no_such_result.json") is None
    assert "not found" in capsys.readouterr().out
