"""tools/time_notebooks.py leaves the committed record alone unless asked (issue 13, item 12)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tool(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("time_notebooks", ROOT / "tools" / "time_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path)                 # a fake checkout: nothing real is touched
    monkeypatch.setattr(mod, "time_notebook", lambda stem: {
        "seconds": 1.5, "within_budget": True, "error": None, "load_average_before": 0.0,
        "load_average_after": 0.0, "slowest_cells": []})
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = committed / f"notebook_times_{device}.json"
    record.write_text(json.dumps({"notebooks": {"00_welcome": {"seconds": 9.0}, "03_x": {"seconds": 99.0}}}))
    return mod, record, tmp_path / "runs" / "notebook_times" / record.name


def test_one_notebook_does_not_overwrite_the_committed_record(tool):
    mod, committed, scratch = tool
    before = committed.read_text()
    assert mod.main(["00_welcome"]) == 0
    assert committed.read_text() == before
    assert json.loads(scratch.read_text())["notebooks"] == {"00_welcome": json.loads(scratch.read_text())
                                                           ["notebooks"]["00_welcome"]}
    with pytest.raises(SystemExit):                          # --out pointing at it still needs --update
        mod.main(["00_welcome", "--out", str(committed.parent)])
    assert committed.read_text() == before


def test_update_merges_into_the_committed_record(tool):
    mod, committed, _ = tool
    assert mod.main(["--update", "00_welcome"]) == 0
    nbs = json.loads(committed.read_text())["notebooks"]
    assert nbs["00_welcome"]["seconds"] == 1.5 and nbs["03_x"] == {"seconds": 99.0}
