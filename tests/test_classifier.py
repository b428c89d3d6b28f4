"""The class-metrics classifier: one flip default for the CLI, the study and the library; atomic saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lddpm.cli import main
from lddpm.errors import LddpmError
from lddpm.metrics.classifier import (META_FILE, WEIGHTS_FILE, SmallClassifier, load_classifier, save_classifier,
                                      train_dataset_classifier)
from test_study import _image_folder


def _train_cli(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "cli"
    code = main(["train-classifier", "imagefolder", "--root", str(tmp_path / "data"), "--resolution", "8",
                 "--epochs", "0.5", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                 "--device", "cpu", "--quiet", *flags])
    assert code == 0
    return json.loads((out / META_FILE).read_text())


def test_train_classifier_and_the_library_share_one_flip_default(tmp_path):
    _image_folder(tmp_path / "data", per_class=4)
    _, library = train_dataset_classifier("imagefolder", 8, epochs=0.5, batch_size=8, root=tmp_path / "data",
                                          cache_dir=tmp_path / "cache", out=tmp_path / "lib", progress=False)
    assert library["hflip"] is True  # natural images: flipped, as the study's classifier is
    assert _train_cli(tmp_path)["hflip"] is library["hflip"]
    assert _train_cli(tmp_path, "--no-hflip")["hflip"] is False


def _model(seed: int) -> SmallClassifier:
    torch.manual_seed(seed)
    return SmallClassifier(1, 3, width=4)


def test_a_failed_save_leaves_the_previous_classifier_whole(tmp_path):
    folder = tmp_path / "clf"
    first = _model(0)
    save_classifier(first, folder, {"dataset": "toy", "run": 1})
    with pytest.raises(TypeError):  # meta that cannot be written: fails after the weights are serialised
        save_classifier(_model(1), folder, {"dataset": "toy", "run": object()})
    model, meta = load_classifier(folder)
    assert meta["run"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), first.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary folder left behind
    assert sorted(p.name for p in folder.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])


def test_saving_over_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LddpmError, match="holds other files \\(notes.txt\\)"):
        save_classifier(_model(0), tmp_path, {"dataset": "toy"})
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / META_FILE).exists()


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".clf.tmp-999999-0123abcd"  # a killed writer's (no process 999999 runs here)
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"half")
    save_classifier(_model(0), tmp_path / "clf", {"dataset": "toy"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]
    assert load_classifier(tmp_path / "clf")[1]["dataset"] == "toy"



def test_result_files_name_the_default_classifier_by_its_cache_relative_folder(tmp_path):
    """`--classifier auto` records `<cache>/classifiers/<name>`, not this machine's cache path; a given folder as given."""
    from lddpm.evaluate.score import resolve_classifier
    from lddpm.metrics.classifier import default_classifier_dir

    folder = default_classifier_dir("toy", 12, tmp_path / "cache")
    save_classifier(_model(0), folder, {"dataset": "toy", "resolution": 12})
    _, meta, note = resolve_classifier("auto", "toy", 12, cache_dir=tmp_path / "cache")
    assert note is None and meta["path"] == "<cache>/classifiers/toy-12"
    assert str(tmp_path) not in json.dumps(meta)
    _, meta, _ = resolve_classifier(folder, "toy", 12)
    assert meta["path"] == str(folder)
