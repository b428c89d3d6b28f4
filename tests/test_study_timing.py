"""A study records each session's start, end and seconds (timing.json), and results.json / results.md carry the
total, so a study's cost is in its files (issue 26)."""

from __future__ import annotations

import json
from datetime import datetime

from lddpm.study import study_from_dict, write_report
from lddpm.study.runner import read_timing
from test_study import TOY, ToyBackend, _run


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_results_json_records_start_end_and_total_seconds_over_sessions(tmp_path):
    _run(tmp_path, ToyBackend())
    payload = json.loads((tmp_path / "results.json").read_text())
    timing = payload["timing"]
    [first] = timing["sessions"]
    assert first["finished"] is not None and _stamp(first["started"]) <= _stamp(first["finished"])
    assert timing["started"] == first["started"] and timing["finished"] == first["finished"]
    assert first["seconds"] > 0 and timing["seconds"] == first["seconds"]
    assert "Time: " in (tmp_path / "results.md").read_text() and "in 1 session;" in (tmp_path / "results.md").read_text()

    # A resumed study (here: nothing left to run) adds a session; the total is their sum.
    _run(tmp_path, ToyBackend())
    timing = json.loads((tmp_path / "results.json").read_text())["timing"]
    assert len(timing["sessions"]) == 2 and timing["sessions"][0] == first
    assert timing["started"] == first["started"] and timing["finished"] == timing["sessions"][1]["finished"]
    assert timing["seconds"] == round(sum(s["seconds"] for s in timing["sessions"]), 3)
    assert "in 2 sessions;" in (tmp_path / "results.md").read_text()

    # Re-writing the report (`lddpm study --report-only`) keeps the record as it is.
    rows = payload["rows"]
    write_report(study_from_dict(TOY), rows, tmp_path, plots=False)
    assert json.loads((tmp_path / "results.json").read_text())["timing"] == timing == read_timing(tmp_path)


def test_a_session_that_did_not_finish_keeps_its_time_up_to_its_last_cell(tmp_path):
    class Dies(ToyBackend):
        def cell(self, cell, info, study, out_dir):
            if cell.name == "cfg-s1":
                raise KeyboardInterrupt  # not a cell failure: the study stops here, as a kill would
            return super().cell(cell, info, study, out_dir)

    try:
        _run(tmp_path, Dies())
    except KeyboardInterrupt:
        pass
    [killed] = read_timing(tmp_path)["sessions"]
    assert killed["finished"] is None and killed["seconds"] > 0  # saved after each finished cell
    _run(tmp_path, ToyBackend())
    timing = json.loads((tmp_path / "results.json").read_text())["timing"]
    assert [s["finished"] is None for s in timing["sessions"]] == [True, False]
    assert timing["finished"] is not None and "in 2 sessions" in (tmp_path / "results.md").read_text()
