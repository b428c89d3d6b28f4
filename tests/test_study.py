"""Study runner and report: artefacts, resume, failed cells, config parsing (toy cell functions)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from lddpm.errors import LddpmError
from lddpm.grid import labelled_grid
from lddpm.study import load_study, run_study, study_from_dict

TOY = {
    "study": {"name": "toy", "dataset": "toy", "resolution": 8, "fid_n": 16, "grid_per_class": 3},
    "runs": {"net": {"config": "toy.toml", "steps": 3}},
    "cells": [
        {"name": "ddim-{steps}", "run": "net", "sampler": "ddim", "steps": [2, 4]},
        {"name": "cfg-s{guidance_scale:g}", "run": "net", "sampler": "ddim", "steps": 4, "guidance_scale": [1.0, 3.0]},
    ],
}


class ToyBackend:
    """Counts calls; writes a loss log like the trainer; returns labelled random images."""

    def __init__(self, fail: set[str] = frozenset()):
        self.trained, self.scored, self.fail = [], [], set(fail)

    def train(self, run, run_dir: Path, study, deps):
        self.trained.append(run.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "log.jsonl", "w") as f:
            for step in range(run.steps):
                f.write(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n")
        return {"run_dir": str(run_dir), "model": "toy-net", "schedule": "linear", "train_images": 24,
                "train_seconds": 0.5, "class_names": ["a", "b"]}

    def cell(self, cell, info, study, out_dir):
        self.scored.append(cell.name)
        if cell.name in self.fail:
            raise RuntimeError("toy failure\nsecond line")
        rng = np.random.default_rng(cell.steps)
        n = study.fid_n(cell)
        return {
            "fid": 100.0 / cell.steps + cell.guidance_scale, "classifier_score": 1.5, "class_accuracy": 0.5,
            "precision": 0.4, "recall": 0.3, "seconds_per_image": 0.01 * cell.steps,
            "model_evals": cell.steps * (2 if cell.guidance_scale != 1 else 1),
            "images": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), "labels": np.arange(n) % 2,
        }


def _run(out: Path, backend: ToyBackend, data=TOY):
    study = study_from_dict(data)
    return run_study(study, out, train_fn=backend.train, cell_fn=backend.cell, progress=False)


def test_study_writes_every_artefact_and_resumes(tmp_path):
    backend = ToyBackend()
    rows = _run(tmp_path, backend)
    names = ["ddim-2", "ddim-4", "cfg-s1", "cfg-s3"]
    assert [r["name"] for r in rows] == names
    assert all(r["status"] == "ok" for r in rows)
    assert backend.trained == ["net"]  # one training run shared by all cells
    for rel in ["results.md", "results.json", "results.csv", "index.html", "plots/fid_vs_steps.png",
                "plots/guidance.png", "plots/loss_curves.png", "plots/seconds_per_image.png"]:
        assert (tmp_path / rel).stat().st_size > 0, rel
    for name in names:
        assert (tmp_path / "grids" / f"{name}.png").is_file()
        assert (tmp_path / "cells" / f"{name}.json").is_file()
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in payload["rows"]] == names
    row = payload["rows"][1]
    assert row["fid"] == pytest.approx(26.0) and row["fid_n"] == 16 and row["train_images"] == 24
    assert row["model_evals"] == 4 and payload["rows"][3]["model_evals"] == 8
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["name"] for r in csv_rows] == names and float(csv_rows[0]["fid"]) == pytest.approx(51.0)
    md = (tmp_path / "results.md").read_text()
    assert "FID (N=16)" in md and md.count("\n| ") == 1 + len(names)
    html = (tmp_path / "index.html").read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", html)
    assert links and all(not link.startswith("/") and (tmp_path / link).is_file() for link in links)
    assert "grids/cfg-s3.png" in links and "plots/guidance.png" in links

    # Second run: nothing is retrained or rescored; the finished cells' files are untouched.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    again = ToyBackend()
    rows2 = _run(tmp_path, again)
    assert again.trained == [] and again.scored == []
    assert [r["fid"] for r in rows2] == [r["fid"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == mtimes


def test_classifier_score_is_named_for_what_it_is_and_old_cells_are_read_back(tmp_path):
    rows = _run(tmp_path, ToyBackend())
    assert rows[0]["classifier_score"] == 1.5 and "inception_score" not in rows[0]
    header = next(csv.reader((tmp_path / "results.csv").read_text().splitlines()))
    assert "classifier_score" in header and "inception_score" not in header
    md = (tmp_path / "results.md").read_text()
    assert "| Classifier score |" in md and "IS-style" not in md and "not an Inception Score" in md
    # a cell file written before the rename kept the classifier score under "inception_score"
    old = json.loads((tmp_path / "cells" / "ddim-2.json").read_text())
    old["inception_score"] = old.pop("classifier_score")
    (tmp_path / "cells" / "ddim-2.json").write_text(json.dumps(old))
    rows = _run(tmp_path, ToyBackend())
    assert rows[0]["classifier_score"] == 1.5 and "inception_score" not in rows[0]


def test_failed_cell_is_recorded_and_the_rest_runs(tmp_path):
    backend = ToyBackend(fail={"ddim-4"})
    rows = _run(tmp_path, backend)
    status = {r["name"]: r["status"] for r in rows}
    assert status["ddim-4"] == "failed: toy failure"
    assert [s for n, s in status.items() if n != "ddim-4"] == ["ok"] * 3
    assert "failed: toy failure" in (tmp_path / "results.md").read_text()
    assert "RuntimeError" in (tmp_path / "cells" / "ddim-4.error.txt").read_text()
    # Re-running retries only the failed cell.
    retry = ToyBackend()
    rows = _run(tmp_path, retry)
    assert retry.scored == ["ddim-4"] and all(r["status"] == "ok" for r in rows)


def test_failed_training_fails_its_cells_once(tmp_path):
    calls = []

    def bad_train(run, run_dir, study, deps):
        calls.append(run.name)
        raise ValueError("no data")

    rows = run_study(study_from_dict(TOY), tmp_path, train_fn=bad_train, cell_fn=ToyBackend().cell, progress=False)
    assert calls == ["net"] and all(r["status"] == "failed: no data" for r in rows)
    assert (tmp_path / "index.html").is_file()


def test_study_file_validation(tmp_path):
    with pytest.raises(LddpmError, match="run 'nope' is not defined"):
        study_from_dict({"runs": {"a": {"config": "x"}}, "cells": [{"name": "c", "run": "nope"}]})
    with pytest.raises(LddpmError, match="unknown key"):
        study_from_dict({"runs": {"a": {"config": "x", "stepz": 3}}, "cells": [{"name": "c", "run": "a"}]})
    with pytest.raises(LddpmError, match="must mention"):
        study_from_dict({"runs": {"a": {"config": "x"}}, "cells": [{"name": "c", "run": "a", "steps": [1, 2]}]})
    with pytest.raises(LddpmError, match="kind = \"vae\""):
        study_from_dict({"runs": {"a": {"config": "x", "vae": "a"}}, "cells": [{"name": "c", "run": "a"}]})
    with pytest.raises(LddpmError, match="at_step = 5 is past the end"):
        study_from_dict({"runs": {"a": {"config": "x", "steps": 4}}, "cells": [{"name": "c", "run": "a", "at_step": 5}]})
    with pytest.raises(LddpmError, match="bf16"):
        study_from_dict({"study": {"bf16": "yes"}, "runs": {"a": {"config": "x"}}, "cells": [{"name": "c", "run": "a"}]})
    study = study_from_dict(TOY)
    assert [c.group for c in study.cells] == ["samplers", "samplers", "samplers", "guidance"]
    at = study_from_dict({"runs": {"a": {"config": "x", "steps": 4}},
                          "cells": [{"name": "a-{at_step}", "run": "a", "at_step": [2, 4], "group": "schedules"}]})
    assert [(c.name, c.at_step) for c in at.cells] == [("a-2", 2), ("a-4", 4)]


def test_grid_has_one_row_per_class():
    images = np.zeros((6, 4, 4, 1), np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    images[labels == 1] = 255
    grid = labelled_grid(images, labels, per_class=2)
    scale = 64 // 4
    th = 4 * scale + 2
    assert grid.shape == (3 * th + 2, 2 * th + 2, 3)
    row1 = grid[2 + th : 2 + th + 4 * scale, 2 : 2 + 4 * scale]
    assert (row1 == 255).all() and (grid[2 : 2 + 4 * scale, 2 : 2 + 4 * scale] == 0).all()


@pytest.mark.parametrize("preset", ["study-quick", "study-cifar10", "study-imagenet100", "study-arch", "study-recipe", "study-weights", "study-vae", "study-vae-long", "demo"])
def test_presets_parse(preset):
    path = Path(__file__).resolve().parents[1] / "configs" / f"{preset}.toml"
    if not path.is_file():
        pytest.skip(f"{path.name} not written yet")
    from lddpm.study import StudyBackend

    study = load_study(path)
    assert study.cells and all(c.run in study.runs for c in study.cells)
    backend = StudyBackend(progress=False)
    for run in study.runs.values():  # every run's trainer config loads and validates
        deps = {run.vae: {"run_dir": "runs/vae"}} if run.vae else {}
        config = backend.run_config(run, Path("runs") / run.name, study, deps)
        assert config.run.steps == run.steps and config.data.dataset == study.settings.dataset
        assert (config.model.kind == "vae") == (run.kind == "vae")


def test_weights_study_reuses_the_quick_studys_pixel_run_and_changes_only_the_loss_weights():
    from lddpm.study import StudyBackend

    root = Path(__file__).resolve().parents[1] / "configs"
    quick, weights = load_study(root / "study-quick.toml"), load_study(root / "study-weights.toml")
    assert asdict(quick.settings) == {**asdict(weights.settings), "name": quick.settings.name}
    backend = StudyBackend(progress=False)
    configs = {name: backend.run_config(study.runs[run], Path("runs") / run, study, {})
               for name, study, run in [("quick", quick, "pixel"), ("minsnr", weights, "pixel"), ("uniform", weights, "uniform")]}
    assert asdict(configs["quick"]) == asdict(configs["minsnr"])
    assert configs["minsnr"].diffusion.loss_weighting == "min_snr" and configs["uniform"].diffusion.loss_weighting == "uniform"
    changed = {k for k, v in asdict(configs["uniform"]).items() if v != asdict(configs["minsnr"])[k]}
    assert changed == {"diffusion", "run"}  # run.out differs by name; diffusion by the weights alone
    assert {**asdict(configs["uniform"].diffusion), "loss_weighting": "min_snr"} == asdict(configs["minsnr"].diffusion)
    quick_cells = {c.name: asdict(c) for c in quick.cells}
    for cell in weights.cells:  # the min-SNR cells are the quick study's, so a quick study's folder is reused
        if cell.run == "pixel":
            assert asdict(cell) == quick_cells[cell.name]


def test_long_vae_study_continues_the_vae_studys_runs():
    from lddpm.study import StudyBackend
    from lddpm.train.utils import resume_differences

    root = Path(__file__).resolve().parents[1] / "configs"
    short, long = load_study(root / "study-vae.toml"), load_study(root / "study-vae-long.toml")
    assert asdict(short.settings) == {**asdict(long.settings), "name": short.settings.name}
    backend = StudyBackend(progress=False)
    for name in long.runs:  # the same runs, longer: a copy of a study-vae folder is resumed, not retrained
        a, b = (backend.run_config(study.runs[name], Path("runs") / name, study, {}) for study in (short, long))
        assert resume_differences(a.to_dict(), b.to_dict()) == [] and b.run.steps > a.run.steps
        assert asdict(a.model) == asdict(b.model) and asdict(a.optim) == asdict(b.optim)
    assert {c.at_step for c in long.cells} == {4500, 6000}


@pytest.mark.parametrize("preset,dit_name", [("study-arch", "dit-tiny/2"), ("study-imagenet100", "dit-b/2")])
def test_architecture_cells_compare_a_unet_and_a_dit_on_the_same_latents(preset, dit_name):
    from lddpm.nn import network_config
    from lddpm.study import StudyBackend

    study = load_study(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.toml")
    backend = StudyBackend(progress=False)
    cells = [c for c in study.cells if c.group == "architecture"]
    runs = {c.run: study.runs[c.run] for c in cells}
    configs = {name: backend.run_config(run, Path("runs") / name, study, {run.vae: {"run_dir": "runs/vae"}})
               for name, run in runs.items()}
    assert {c.model.kind for c in configs.values()} == {"dit", "unet"}
    assert len({r.vae for r in runs.values()}) == 1 and all(c.data.latent for c in configs.values())
    for dit in (c for c in configs.values() if c.model.kind == "dit"):
        assert dit.model.name == dit_name
        network_config("dit", dit.model.name, **dit.model.overrides).validate()
    for setting in ("sampler", "steps"):  # same sampler and steps for both networks
        assert len({getattr(c, setting) for c in cells}) == 1
    assert len({study.fid_n(c) for c in cells}) == 1  # same N


# ----------------------------------------------------------------------------- real trainer + evaluator


class _TinyFeatures(torch.nn.Module):
    """Stand-in for Inception: mean-pooled pixels through a fixed random projection (4-d features)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def _image_folder(root: Path, per_class: int) -> None:
    """A two-class 8x8 image folder (dark and bright squares) with train and test splits."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(["dark", "bright"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = 40 + 170 * c
                img = np.clip(base + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")


def test_real_backend_end_to_end(tmp_path):
    from lddpm.metrics import FeatureExtractor
    from lddpm.study import StudyBackend

    _image_folder(tmp_path / "data", per_class=12)
    fast = ["optim.batch_size=8", "run.log_every=1", "run.checkpoint_every=2", "run.num_sample_images=4",
            "run.sample_steps=2", "run.sample_every=0", "optim.warmup_steps=0"]
    data = {
        "study": {"name": "mini", "dataset": "imagefolder", "resolution": 8, "fid_n": 8, "reference_n": 16,
                  "data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "classifier_epochs": 1,
                  "sample_batch_size": 8, "grid_per_class": 4, "fid_batch_size": 8},
        "runs": {
            "cfg": {"config": "fashion-quick", "steps": 3, "set": fast + ["run.class_conditional=true"]},
            "vae": {"config": "vae-fashion-quick", "kind": "vae", "steps": 4, "set": fast + ["vae.scaling_batches=1"]},
        },
        "cells": [
            {"name": "cfg-s{guidance_scale:g}", "run": "cfg", "sampler": "ddim", "steps": 2, "guidance_scale": [1.0, 3.0]},
            {"name": "bad-sampler", "run": "cfg", "sampler": "lms", "steps": 2},
            {"name": "vae-recon", "run": "vae", "kind": "vae"},
            {"name": "vae-at2", "run": "vae", "kind": "vae", "at_step": 2, "group": "training"},
            {"name": "cfg-at{at_step}", "run": "cfg", "sampler": "ddim", "steps": 2, "at_step": [2, 1], "group": "schedules"},
        ],
    }
    extractor = FeatureExtractor(_TinyFeatures(), name="stand-in", sha1="0" * 40, input_size=None, batch_size=8)
    backend = StudyBackend(extractor=extractor, progress=False)
    study = study_from_dict(data)
    rows = run_study(study, tmp_path / "out", train_fn=backend.train, cell_fn=backend.cell, progress=False)
    status = {r["name"]: r["status"] for r in rows}
    assert status["cfg-s1"] == "ok" and status["cfg-s3"] == "ok" and status["vae-recon"] == "ok", status
    assert status["bad-sampler"].startswith("failed: ") and "lms" in status["bad-sampler"]
    row = rows[1]
    assert row["fid_n"] == 8 and row["fid"] >= 0 and 0 <= row["class_accuracy"] <= 1
    # the study classifier's score, under its own name; no Inception Score without an Inception network
    assert row["classifier_score"] >= 1.0 and row.get("inception_score") is None
    assert row["model_evals"] == 4 and row["train_images"] == 24 and row["schedule"] == "cosine"
    assert rows[0]["model_evals"] == 2
    recon, recon2 = rows[3], rows[4]  # the VAE's final weights, and its checkpoint at step 2
    assert recon["status"] == recon2["status"] == "ok" and (recon["train_images"], recon2["train_images"]) == (32, 16)
    assert recon2["fid"] != recon["fid"] and recon2["psnr"] != recon["psnr"]
    at2, at1 = rows[-2], rows[-1]  # an earlier checkpoint of the run: its own training length in the row
    assert at2["status"] == "ok" and at2["train_images"] == 16 and at2["fid"] != row["fid"]
    assert at1["status"].startswith("failed: ") and "no checkpoint at step 1" in at1["status"]
    out = tmp_path / "out"
    assert (out / "runs" / "cfg" / "checkpoints" / "step_0000003.safetensors").is_file()
    assert (out / "grids" / "cfg-s3.png").is_file() and (out / "grids" / "vae-recon.png").is_file()
    assert (out / "plots" / "loss_curves.png").is_file() and (out / "plots" / "schedules.png").is_file()
    assert (out / "plots" / "fid_vs_training.png").is_file()  # drawn for the "training" group (vae-at2)

    # Resume: no training and no sampling again; only the failed cell is retried (and fails again).
    mtime = (out / "cells" / "cfg-s3.json").stat().st_mtime_ns
    calls = []
    rows2 = run_study(study, out, train_fn=lambda *a: calls.append("train") or backend.train(*a),
                      cell_fn=lambda c, *a: calls.append(c.name) or backend.cell(c, *a), progress=False)
    assert calls == ["train", "bad-sampler", "cfg-at1"]  # the run is reused from its final checkpoint, not retrained
    assert (out / "cells" / "cfg-s3.json").stat().st_mtime_ns == mtime
    assert [r["fid"] for r in rows2[:2]] == [r["fid"] for r in rows[:2]]
