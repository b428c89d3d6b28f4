"""The study: a grid of training runs and evaluation cells -> one folder with table, plots, grids.

`schema` parses and validates the study file (and names the table's row fields), `runner` runs
the grid and writes the report, `backend` trains runs and scores cells with the project's trainer
and evaluator. Names are loaded on first use, so `lddpm.report` can import the schema alone.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "schema": ("CELL_KINDS", "LABEL_MODES", "PLOT_GROUPS", "ROW_FIELDS", "RUN_KINDS", "TEXT_ROW_FIELDS", "CellSpec",
               "PromptSpec", "RunSpec", "Study", "StudySettings", "find_study_file", "load_study", "study_from_dict"),
    "runner": ("load_rows", "run_study", "write_report"),
    "backend": ("StudyBackend", "evaluate_cell", "train_run"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Import the submodule that defines `name` on first access."""
    if name not in _WHERE:
        raise AttributeError(f"module 'lddpm.study' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lddpm.study.{_WHERE[name]}"), name)
