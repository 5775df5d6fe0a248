"""nbconvert preprocessors used when nbgrader writes feedback."""
from __future__ import annotations

import re

from nbconvert.preprocessors import Preprocessor

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SanitizeTestErrors(Preprocessor):
    """Replace the traceback of an error in a test cell by its last line (``Name: message``).

    A failing hidden test's traceback quotes the hidden line that failed and the frames of the
    reference package it called; the message itself is written for the learner (see
    ``lora_ref.exercises.compare``). Runs after nbgrader's ClearHiddenTests in GenerateFeedback.
    """

    def preprocess_cell(self, cell, resources, index):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade") and not meta.get("solution"):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    evalue = ANSI.sub("", str(out.get("evalue", ""))).strip()
                    out["traceback"] = [f"{out.get('ename', 'Error')}: {evalue}" if evalue else str(out.get("ename", "Error"))]
        return cell, resources
