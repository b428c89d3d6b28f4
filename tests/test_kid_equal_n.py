"""KID next to FID in evaluation results and the study report; one N per study; the real-data floor."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import struct

import numpy as np
import pytest
import torch
from torch import nn

from lddpm import evaluate as ev
from lddpm.errors import LddpmError
from lddpm.metrics import FeatureExtractor, ReferenceStats, kernel_inception_distance
from lddpm.study import run_study, study_from_dict

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Projection(nn.Module):
    """A fixed random projection of 8x8 pixels: a deterministic stand-in for Inception."""

    def __init__(self, dim=6):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 64, dim, generator=torch.Generator().manual_seed(0)) / 8)

    def forward(self, x):
        return x.flatten(1) @ self.w


def _images(n, seed, level=100):
    rng = np.random.default_rng(seed)
    return np.clip(level + rng.normal(0, 30, size=(n, 8, 8, 1)), 0, 255).astype(np.uint8)


def test_evaluate_generated_reports_kid_against_the_reference_features():
    ext = FeatureExtractor(_Projection(), name="stand-in", sha1="f" * 40, input_size=None, batch_size=16)
    real = ext.features(_images(40, seed=0))
    ref = ReferenceStats(real.mean(0), np.cov(real, rowvar=False), {"resolution": 8, "network_sha1": "f" * 40}, real)
    fake = _images(30, seed=1, level=130)
    result = ev.evaluate_generated(fake, reference_stats=ref, extractor=ext)
    expected = kernel_inception_distance(real, ext.features(fake))
    assert result["kid"] == pytest.approx(expected["kid"], rel=1e-12) and result["kid"] > 0
    assert result["kid_std"] == pytest.approx(expected["kid_std"], rel=1e-12)
    assert result["kid_subset_size"] == 30 and result["kid_subsets"] == 100 and result["kid_seed"] == 0
    assert "KID x10^3" in ev.summary_line(result)
    no_features = ReferenceStats(ref.mu, ref.sigma, ref.manifest, None)
    assert ev.evaluate_generated(fake, reference_stats=no_features, extractor=ext)["kid"] is None


def _write_idx(root, n=40):
    """Tiny Fashion-MNIST-format IDX files: train has darker images than t10k."""
    root.mkdir(parents=True, exist_ok=True)
    for split, level in (("train", 80), ("t10k", 150)):
        images = np.clip(level + np.random.default_rng(level).normal(0, 30, (n, 28, 28)), 0, 255).astype(np.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    return root


class _ConvFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_cli_fid_ref_against_another_split_and_eval_json_has_kid(tmp_path, capsys):
    from lddpm.cli import main

    root, cache, net = _write_idx(tmp_path / "idx"), tmp_path / "cache", tmp_path / "net.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_ConvFeatures()), str(net))
    onnx = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    backend = "onnx" if onnx else "torch"
    common = ["--inception", str(net), "--cache-dir", str(cache), "--root", str(root), "--quiet", "--feature-backend", backend]
    assert main(["fid-ref", "fashion-mnist", "--num", "20", "--against", "test", *common]) == 0
    printed = capsys.readouterr().out
    floor = re.search(r"real-data floor: test vs train at N=20: FID ([0-9.]+), KID x10\^3 (-?[0-9.]+) \+- ([0-9.]+)", printed)
    assert floor is not None, printed
    assert float(floor.group(1)) > 0  # the two fake splits differ in brightness
    # scoring the reference split against itself is refused
    with pytest.raises(SystemExit) as exit_info:
        main(["fid-ref", "fashion-mnist", "--num", "20", "--against", "train", *common])
    assert exit_info.value.code == 2 and "other than the reference" in capsys.readouterr().err

    images = np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "gen.npz", images=images)
    out = tmp_path / "res.json"
    assert main(["eval", "--images", str(tmp_path / "gen.npz"), "--reference", "fashion-mnist:train",
                 "--classifier", "none", "--out", str(out), *common]) == 0
    assert "KID x10^3" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["kid_subset_size"] == 20 and result["kid_subsets"] == 100 and np.isfinite(result["kid"])
    assert result["feature_network"]["backend"] == backend


STUDY = {
    "study": {"name": "toy", "dataset": "toy", "resolution": 8, "fid_n": 16, "grid_per_class": 3},
    "runs": {"net": {"config": "toy.toml", "steps": 3}},
    "cells": [{"name": "ddim-{steps}", "run": "net", "sampler": "ddim", "steps": [2, 4]}],
}


def test_every_cell_is_scored_at_the_studys_one_n():
    same = json.loads(json.dumps(STUDY))
    same["cells"][0]["fid_n"] = 16
    assert study_from_dict(same).cells[0].fid_n == 16
    other = json.loads(json.dumps(STUDY))
    other["cells"].append({"name": "ddpm-1000", "run": "net", "sampler": "ddpm", "steps": 1000, "fid_n": 8})
    with pytest.raises(LddpmError, match=r"cell 'ddpm-1000': fid_n = 8 differs from the study's fid_n = 16"):
        study_from_dict(other)
    bad = json.loads(json.dumps(STUDY))
    bad["study"]["feature_backend"] = "tensorrt"
    with pytest.raises(LddpmError, match="feature_backend"):
        study_from_dict(bad)


def _toy_train(run, run_dir, study, deps):
    run_dir.mkdir(parents=True, exist_ok=True)
    return {"run_dir": str(run_dir), "model": "toy-net", "schedule": "linear", "train_images": 24, "train_seconds": 0.5}


def _toy_cell(cell, info, study, out_dir):
    return {"fid": 100.0 / cell.steps, "fid_n": study.fid_n(cell), "kid": 0.012 / cell.steps, "kid_std": 0.003,
            "seconds_per_image": 0.01, "model_evals": cell.steps}


def test_study_report_has_kid_column_and_the_real_data_floor(tmp_path):
    calls = []

    def floor_fn(study):
        calls.append(study.settings.fid_n)
        return {"split": "train", "num": study.settings.fid_n, "fid": 31.25, "kid": 0.0021, "kid_std": 0.0004}

    study = study_from_dict(STUDY)
    out = tmp_path / "out"
    rows = run_study(study, out, train_fn=_toy_train, cell_fn=_toy_cell, floor_fn=floor_fn, progress=False)
    assert [r["kid"] for r in rows] == [0.006, 0.003]
    md = (out / "results.md").read_text()
    floor_line = "Real-data floor at N=16: 16 real train images score FID 31.25, KID x10^3 2.10 ± 0.40"
    assert floor_line in md and md.index(floor_line) < md.index("| Cell")
    header = next(line for line in md.splitlines() if line.startswith("| Cell"))
    assert "FID (N=16)" in header and "KID x10^3" in header
    assert "| 6.00 ± 3.00 |" in md and "| 3.00 ± 3.00 |" in md
    payload = json.loads((out / "results.json").read_text())
    assert payload["real_floor"]["fid"] == 31.25 and payload["rows"][0]["kid_std"] == 0.003
    assert "real train images score FID 31.25" in (out / "index.html").read_text()
    run_study(study, out, train_fn=_toy_train, cell_fn=_toy_cell, floor_fn=floor_fn, progress=False)
    assert calls == [16]  # measured once, then read from real_floor.json
    other_n = json.loads(json.dumps(STUDY))
    other_n["study"]["fid_n"] = 8
    run_study(study_from_dict(other_n), out, train_fn=_toy_train, cell_fn=_toy_cell, floor_fn=floor_fn, progress=False)
    assert calls == [16, 8]  # a study at another N measures its own floor

    def broken(study):
        raise RuntimeError("no train split here")

    rows = run_study(study, tmp_path / "out2", train_fn=_toy_train, cell_fn=_toy_cell, floor_fn=broken, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    assert "Real-data floor at N=16: not measured (no train split here)." in (tmp_path / "out2" / "results.md").read_text()
