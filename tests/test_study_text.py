"""Text cells of a study: a prompt set per cell (a file or a built-in scene set), faithfulness fields in the
row, grids labelled with prompts, resume, and one clear error per bad cell key (issue 27)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lddpm import report
from lddpm.data import scenes
from lddpm.errors import LddpmError
from lddpm.study import ROW_FIELDS, load_study, run_study, study_from_dict
from lddpm.study.backend import check_cell_fits_run, faithfulness_fields

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the study file's keys


def _study(cell: dict, tmp_path: Path, **settings) -> dict:
    return {"study": {"name": "t", "dataset": "captioned", **settings},
            "runs": {"text": {"config": "fashion-pairs-30min"}, "vae": {"config": "vae-fashion-quick", "kind": "vae"}},
            "cells": [{"name": "c", "run": "text", **cell}]}


@pytest.mark.parametrize("cell,settings,needle", [
    ({"prompts": "fashion-pairs"}, {}, "needs a number of prompts"),
    ({"prompts": "fashion-pairs:0"}, {}, "must be an integer >= 1"),
    ({"prompts": "fashion-pairs:many"}, {}, "must be an integer >= 1"),
    ({"prompts": "fashion-text:10:maybe"}, {}, "held-out part 'maybe' is not one of"),
    ({"prompts": "fashion-text:10:seen:x"}, {}, "needs a number of prompts"),
    ({"prompts": "missing.jsonl"}, {}, "prompts file 'missing.jsonl' not found"),
    ({"prompts": 5}, {}, "prompts must be a JSONL prompt file"),
    ({"prompts": ""}, {}, None),  # empty: no prompt set (a class cell), valid
    ({"prompts": "fashion-pairs:8", "run": "vae", "kind": "vae"}, {}, "prompts apply to sample cells only"),
    ({"negative_prompt": "a bag"}, {}, "negative_prompt needs a prompt set"),
    ({"prompts": "fashion-pairs:8", "negative_prompt": 3}, {}, "negative_prompt must be a string"),
    ({"prompts": "fashion-pairs:8", "labels": "none"}, {}, "labels = 'none' is for class runs"),
    ({"prompt": "fashion-pairs:8"}, {}, r"unknown key\(s\) \['prompt'\]"),
    ({"prompts": "fashion-pairs:8"}, {"grid_prompts": 0}, "grid_prompts"),
])
def test_bad_text_cell_keys_give_one_clear_error(tmp_path, cell, settings, needle):
    data = _study(cell, tmp_path, **settings)
    if needle is None:
        study_from_dict(data, base_dir=tmp_path)
        return
    with pytest.raises(LddpmError, match=needle) as info:
        study_from_dict(data, base_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_prompt_specs_parse_and_files_resolve_against_the_study_file(tmp_path):
    scenes.write_prompt_set("fashion-text", tmp_path / "sets" / "mine.jsonl", num=4)
    data = _study({"prompts": "fashion-text:40:only", "guidance_scale": 3.0, "negative_prompt": "a bag"}, tmp_path)
    data["cells"].append({"name": "f", "run": "text", "prompts": "sets/mine.jsonl"})
    study = study_from_dict(data, base_dir=tmp_path)
    spec, file_spec = (study.prompt_spec(c) for c in study.cells)
    assert (spec.scene_set, spec.num, spec.heldout) == ("fashion-text", 40, "only")
    assert spec.file_name == "fashion-text-40-only.jsonl"
    assert file_spec.scene_set is None and file_spec.path == tmp_path / "sets" / "mine.jsonl"
    assert study.prompt_spec(study_from_dict(_study({}, tmp_path)).cells[0]) is None


def test_a_cell_and_its_run_must_agree_on_prompts():
    from lddpm.study.schema import CellSpec, PromptSpec

    spec = PromptSpec("fashion-pairs:8", scene_set="fashion-pairs", num=8)
    with pytest.raises(LddpmError, match="run 'net' is not a text run") as info:
        check_cell_fits_run(CellSpec("c", "net", prompts="fashion-pairs:8"), {"text_encoder": ""}, spec)
    assert "\n" not in str(info.value)
    with pytest.raises(LddpmError, match="is a text run .* give the cell `prompts`"):
        check_cell_fits_run(CellSpec("c", "net"), {"text_encoder": "minilm"}, None)
    check_cell_fits_run(CellSpec("c", "net"), {"run_dir": "x"}, spec)  # another backend's run: not checked here


def test_faithfulness_fields_name_the_headline_metric():
    pairs = {"scores": {"task": "fashion-pairs", "pair_accuracy": 0.4, "slot_accuracy": 0.7, "swap_rate": 0.1,
                        "seen": {"pair_accuracy": 0.5}, "heldout": {"pair_accuracy": 0.3}},
             "ceiling": {"pair_accuracy": 0.8}, "of_ceiling": {"pair_accuracy": 0.5}}
    assert faithfulness_fields(pairs) == {
        "faithfulness_metric": "pair_accuracy", "faithfulness": 0.4, "faithfulness_ceiling": 0.8,
        "faithfulness_of_ceiling": 0.5, "faithfulness_seen": 0.5, "faithfulness_heldout": 0.3,
        "slot_accuracy": 0.7, "swap_rate": 0.1}
    text = {"scores": {"task": "fashion-text", "all_accuracy": 0.2, "class_accuracy": 0.6, "seen": {}, "heldout": {}},
            "ceiling": {"all_accuracy": 0.9}, "of_ceiling": {}}
    fields = faithfulness_fields(text)
    assert fields["faithfulness_metric"] == "all_accuracy" and fields["slot_accuracy"] == 0.6
    assert fields["swap_rate"] is None and fields["faithfulness_of_ceiling"] is None


def test_class_rows_keep_their_table_and_csv():
    """No text cell, no text column: existing studies' results.md/csv are as before."""
    rows = [{**{k: None for k in ROW_FIELDS}, "name": "a", "status": "ok", "fid": 3.0, "class_accuracy": 0.5,
             "kind": "sample", "grid": "grids/a.png"}]
    headings, _ = report.table(rows)
    assert len(headings) == len(report.TABLE_COLUMNS) and "Faithfulness" not in headings
    header = next(csv.reader(io.StringIO(report.to_csv(rows))))
    assert header == [*ROW_FIELDS, "grid", "kind"]
    text_rows = rows + [{**rows[0], "name": "b", "prompts": "fashion-pairs:8", "faithfulness": 0.25,
                         "faithfulness_metric": "pair_accuracy", "faithfulness_ceiling": 0.9, "swap_rate": None}]
    headings, body = report.table(text_rows)
    assert headings[headings.index("Class acc.") + 1: headings.index("Class acc.") + 3] == ["Pair acc.", "Ceiling"]
    assert "Swap rate" not in headings and "Negative prompt" not in headings  # no row has a value
    assert body[0][headings.index("Prompts")] == "–" and body[1][headings.index("Pair acc.")] == "25.0%"
    header = next(csv.reader(io.StringIO(report.to_csv(text_rows))))
    assert header[len(ROW_FIELDS):] == ["prompts", "faithfulness_metric", "faithfulness", "faithfulness_ceiling",
                                        "swap_rate", "grid", "kind"]


def test_the_text_demo_parses_and_both_config_folders_hold_it():
    from lddpm.study import StudyBackend

    shipped = ROOT / "src" / "lddpm" / "configs" / "demo-text.toml"
    assert (ROOT / "configs" / "demo-text.toml").read_bytes() == shipped.read_bytes()
    study = load_study("demo-text")
    assert study.settings.dataset == "fashion-pairs" and study.settings.fid_n == 200
    specs = {study.prompt_spec(c) for c in study.cells}
    assert len(specs) == 1 and next(iter(specs)).scene_set == "fashion-pairs" and next(iter(specs)).num == 200
    assert sorted(c.guidance_scale for c in study.cells)[:2] == [1.0, 3.0]
    assert {c.sampler for c in study.cells} == {"dpm++2m"} and {c.steps for c in study.cells} == {20}
    (run,) = study.runs.values()
    config = StudyBackend(progress=False).run_config(run, Path("runs") / run.name, study, {})
    assert config.text.encoder == "minilm" and config.run.max_minutes > 0 and config.data.dataset == "fashion-pairs"


def test_demo_command_takes_a_config():
    from lddpm.cli import build_parser

    args = build_parser().parse_args(["demo", "--config", "demo-text"])
    assert args.config == "demo-text" and args.out is None
    assert build_parser().parse_args(["demo"]).config == "demo"


# ----------------------------------------------------------------------------- a tiny text study, end to end


def _minilm_or_skip():
    pytest.importorskip("transformers")
    from lddpm.nn.text import minilm_folder

    try:
        minilm_folder()
    except LddpmError as exc:  # pragma: no cover - the wheel is installed by `make setup`
        pytest.skip(f"MiniLM is not installed: {exc}")


def _scene_folder(root: Path, records: list[dict]) -> None:
    """A captioned 32x32 grey folder (train and test) whose captions are the prompts: blobs in the named halves."""
    rng = np.random.default_rng(0)
    for split, copies in (("train", 4), ("test", 2)):
        folder = root / split
        folder.mkdir(parents=True)
        lines = []
        for k in range(copies * len(records)):
            record = records[k % len(records)]
            img = np.zeros((32, 32), np.uint8)
            for obj in record["objects"]:
                left = 0 if obj["slot"] == "left" else 16
                top = 6 + int(rng.integers(0, 4))
                img[top:top + 16, left + 2:left + 14] = 80 + 15 * int(obj["class"])
            Image.fromarray(img).save(folder / f"{k:03d}.png")
            lines.append(json.dumps({"file_name": f"{k:03d}.png", "text": record["prompt"],
                                     "objects": record["objects"]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


class _TinyFeatures(torch.nn.Module):
    """Stand-in for Inception: mean-pooled pixels through a fixed random projection (4-d features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture
def stand_in_checker(monkeypatch):
    """A cheap scene checker (an untrained slot classifier) and random 'real' items for the ceiling; counts loads."""
    from lddpm.metrics import faithfulness
    from lddpm.metrics.classifier import SmallClassifier

    torch.manual_seed(0)
    checker = faithfulness.SlotChecker(SmallClassifier(1, len(faithfulness.SLOT_CLASSES), width=4).eval(),
                                       fg_threshold=32, size_threshold=20.0, brightness_feature="top8",
                                       brightness_threshold=150.0)
    loads = []
    monkeypatch.setattr(faithfulness, "load_checker", lambda *a, **k: loads.append(a) or checker)
    items = np.random.default_rng(1).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(scenes, "source_items", lambda split, root=None: (items, np.arange(40) % 10))
    return loads


def test_a_tiny_text_study_scores_faithfulness_labels_grids_with_prompts_and_resumes(tmp_path, stand_in_checker):
    _minilm_or_skip()
    from lddpm.metrics import FeatureExtractor
    from lddpm.study import StudyBackend

    records = scenes.prompt_set("fashion-pairs", num=6)
    _scene_folder(tmp_path / "data", records)
    scenes.write_prompt_set("fashion-pairs", tmp_path / "six.jsonl", num=6)
    tiny = ["model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[16], num_heads=2}",
            "optim.batch_size=8", "optim.warmup_steps=0", "run.log_every=1", "run.checkpoint_every=100",
            "run.sample_every=0", "run.bf16=false", "run.num_sample_images=2", "run.sample_steps=2"]
    data = {
        "study": {"name": "text", "dataset": "captioned", "resolution": 32, "fid_n": 6, "reference_n": 12,
                  "data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "sample_batch_size": 4,
                  "fid_batch_size": 8, "grid_per_class": 2, "grid_prompts": 3},
        "runs": {"text": {"config": "fashion-pairs-30min", "steps": 2, "set": tiny}},
        "cells": [
            {"name": "text-s{guidance_scale:g}", "run": "text", "sampler": "dpm++2m", "steps": 2,
             "guidance_scale": [1.0, 3.0], "prompts": "six.jsonl", "group": "guidance"},
            {"name": "builtin-neg", "run": "text", "sampler": "ddim", "steps": 2, "guidance_scale": 3.0,
             "prompts": "fashion-pairs:6", "negative_prompt": "two bags"},
            {"name": "no-prompts", "run": "text", "sampler": "ddim", "steps": 2},
        ],
    }
    extractor = FeatureExtractor(_TinyFeatures(), name="stand-in", sha1="0" * 40, input_size=None, batch_size=8)
    backend = StudyBackend(extractor=extractor, progress=False)
    study = study_from_dict(data, base_dir=tmp_path)
    out = tmp_path / "out"
    rows = run_study(study, out, train_fn=backend.train, cell_fn=backend.cell, progress=False)
    status = {r["name"]: r["status"] for r in rows}
    assert status["text-s1"] == status["text-s3"] == status["builtin-neg"] == "ok", status
    assert status["no-prompts"].startswith("failed: ") and "is a text run" in status["no-prompts"]
    assert "\n" not in status["no-prompts"]

    row = rows[1]
    assert row["model"].endswith("text (minilm)") and row["prompts"] == "six.jsonl" and row["negative_prompt"] is None
    assert row["faithfulness_metric"] == "pair_accuracy" and 0 <= row["faithfulness"] <= 1
    assert 0 <= row["faithfulness_ceiling"] <= 1 and 0 <= row["slot_accuracy"] <= 1
    assert row["class_accuracy"] is None and row["classifier_score"] is None  # prompts, not classes
    assert row["model_evals"] == 4 and rows[0]["model_evals"] == 2  # dpm++2m, 2 steps; guidance doubles it
    faith = row["extra"]["faithfulness"]
    assert faith["scores"]["task"] == "fashion-pairs" and faith["scores"]["num"] == 6
    assert row["faithfulness"] == faith["scores"]["pair_accuracy"]
    assert rows[2]["negative_prompt"] == "two bags" and rows[2]["faithfulness"] is not None
    assert len(stand_in_checker) == 3  # one checker load per scored text cell

    written = out / "prompts" / "fashion-pairs-6-both.jsonl"  # the built-in set, written once into the study
    assert [json.loads(x)["prompt"] for x in written.read_text().splitlines()] == [r["prompt"] for r in records]

    grid = np.asarray(Image.open(out / "grids" / "text-s3.png"))
    assert grid.shape[0] == 3 * (32 * 2 + 2) + 2  # grid_prompts = 3 rows (6 distinct prompts, one image each)
    assert grid.shape[1] > 2 * (32 * 2 + 2) + 2  # a margin with the prompts
    margin = grid[:, : grid.shape[1] - (32 * 2 + 2) - 2]
    assert (margin < 128).any()  # text drawn in it

    md = (out / "results.md").read_text()
    assert "Pair acc." in md and "Ceiling" in md and "Held-out" in md and "six.jsonl" in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"faithfulness", "faithfulness_ceiling", "swap_rate", "prompts"} <= set(header)
    assert (out / "plots" / "faithfulness.png").stat().st_size > 0
    assert "Faithfulness" in (out / "index.html").read_text() or "Pair acc." in (out / "index.html").read_text()

    # Re-running: no cell is scored again (the failed one is retried and fails again before sampling);
    # the prompt file is not rewritten and no checker is loaded.
    mtimes = {p: p.stat().st_mtime_ns for p in (written, out / "cells" / "text-s3.json")}
    calls = []
    rows2 = run_study(study, out, train_fn=lambda *a: calls.append("train") or backend.train(*a),
                      cell_fn=lambda c, *a: calls.append(c.name) or backend.cell(c, *a), progress=False)
    assert calls == ["train", "no-prompts"] and len(stand_in_checker) == 3
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert [r["faithfulness"] for r in rows2[:3]] == [r["faithfulness"] for r in rows[:3]]

    # A lost cell file: its samples are resumed from the saved batches, nothing is sampled again.
    (out / "cells" / "text-s3.json").unlink()
    rows3 = run_study(study, out, train_fn=backend.train, cell_fn=backend.cell, only=["text-s3"], progress=False)
    again = rows3[1]
    assert again["extra"]["cost"]["num_resumed"] == 6 and again["fid"] == pytest.approx(row["fid"])
    assert again["faithfulness"] == row["faithfulness"]
