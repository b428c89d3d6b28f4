"""Every table of results in README.md and docs/*.md equals what tools/render_docs.py renders from the committed
result files it names (issue 26: numbers trace to files); the check catches a changed number, a wrong file
list and an unknown table."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rd = _render_docs()


def test_every_table_equals_what_its_files_give():
    changed, problems = rd.check_all()
    assert not problems, "\n".join(problems)
    assert not changed, ("tables differ from their result files; run `python tools/render_docs.py` and commit:\n"
                         + rd.diff(changed)[:6000])


def test_every_marker_names_a_known_table_and_every_document_has_tables():
    used = rd.used_tables()
    assert used == set(rd.TABLES)
    readme = (ROOT / "README.md").read_text()
    assert "<!-- table: demo (from docs/demo/results.json) -->" in readme


def _tree(tmp_path: Path, monkeypatch, table: str) -> Path:
    """A repository root holding one study file and a README with `table` rendered from it."""
    monkeypatch.setattr(rd, "ROOT", tmp_path)
    files = rd.TABLES[table][0]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    (tmp_path / "docs").mkdir(exist_ok=True)
    marker = f"<!-- table: {table} (from {', '.join(files)}) -->\n"
    (tmp_path / "README.md").write_text(f"# x\n\n{marker}{rd.render(table)}<!-- end table -->\n\ntext\n")
    return tmp_path / files[0]


def test_a_number_that_differs_from_its_file_fails_the_check_with_a_diff(tmp_path, monkeypatch):
    study = _tree(tmp_path, monkeypatch, "study-arch")
    changed, problems = rd.check_all()
    assert changed == [] and problems == [f"tables registered but in no document: "
                                          f"{', '.join(sorted(set(rd.TABLES) - {'study-arch'}))}"]
    payload = json.loads(study.read_text())
    payload["rows"][0]["fid"] = 123.456  # the file changes, the README does not
    study.write_text(json.dumps(payload))
    changed, _ = rd.check_all()
    assert [rel for rel, _, _ in changed] == ["README.md"]
    text = rd.diff(changed)
    assert "+| unet-half-s1 |" in text and "123.46" in text and "-| unet-half-s1 |" in text
    assert rd.main(["--check"]) == 1
    assert rd.main([]) == 1  # rewrites the table; still 1 for the unused tables of this toy tree
    assert "123.46" in (tmp_path / "README.md").read_text() and rd.check_all()[0] == []


def test_a_marker_naming_other_files_or_an_unknown_table_is_a_problem(tmp_path, monkeypatch):
    _tree(tmp_path, monkeypatch, "study-arch")
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("(from docs/study-arch/results.json)", "(from docs/other.json)")
                      + "<!-- table: no-such-table (from x.json) -->\n<!-- end table -->\n")
    _, problems = rd.check_all()
    assert any("'study-arch' names docs/other.json; it is rendered from docs/study-arch/results.json" in p
               for p in problems)
    assert any("unknown table 'no-such-table'" in p for p in problems)


def test_a_missing_result_file_renders_as_a_note_saying_so(tmp_path, monkeypatch):
    monkeypatch.setattr(rd, "ROOT", tmp_path)
    assert rd.render("demo") == ("*Not in the repository yet: `docs/demo/results.json`. `make demo` writes it "
                                 "(as demo-output/results.json).*\n")


@pytest.mark.parametrize("doc_dir,prefix", [("", "docs/demo-text/"), ("docs", "demo-text/")])
def test_the_demo_table_renders_a_demo_study(doc_dir, prefix):
    """The demo's renderer on the committed text demo (same layout as `make demo`'s folder)."""
    text = rd.demo_block("docs/demo-text/results.json", ROOT / doc_dir)
    payload = json.loads((ROOT / "docs/demo-text/results.json").read_text())
    assert text.startswith("Real-data floor at N=200: 200 real train images score FID 48.74")
    for row in payload["rows"]:
        assert f"| {row['name']} | {row['sampler']} | {row['steps']} |" in text
    assert f"]({prefix}grids/dpm20-s3.png)" in text and f"]({prefix}results.md)" in text
    assert "sum to 582 s" in text  # no time record in this file: its cells' own times


def test_the_cached_root_time_is_rendered_from_the_fid_benchmark_file(tmp_path, monkeypatch):
    """After `python benchmarks/fid.py` writes `frechet_distance.reference_cached_seconds`, the docs show it."""
    monkeypatch.setattr(rd, "ROOT", tmp_path)
    payload = json.loads((ROOT / "benchmarks/results/fid.json").read_text())
    payload["frechet_distance"].update(reference_first_seconds=1.234, reference_cached_seconds=0.0567,
                                       relative_difference=2e-7)
    (tmp_path / "benchmarks/results").mkdir(parents=True)
    (tmp_path / "benchmarks/results/fid.json").write_text(json.dumps(payload))
    text = rd.render("fid-backends")
    assert "1.23 s the first time (the reference's square root computed), 0.0567 s after (relative difference 2.0e-07)" in text
