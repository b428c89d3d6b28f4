"""One list of dataset names (lddpm.datasets) for the data layer, the config check and every command."""

from __future__ import annotations

import argparse

import pytest

from lddpm.cli import build_parser, main
from lddpm.data import DATASETS, open_cache
from test_captions import write_jsonl


def _dataset_choices() -> dict[str, tuple]:
    """The `dataset` argument's choices of every command that has one."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "dataset" and action.choices is not None:
                found[name] = tuple(action.choices)
    return found


def test_every_command_offers_the_one_dataset_list():
    choices = _dataset_choices()
    assert {"prepare", "fid-ref", "train-classifier"} <= set(choices)
    from lddpm.datasets import DATASETS as NAMES

    assert DATASETS is NAMES
    for command, names in choices.items():
        assert names == DATASETS, f"lddpm {command} offers {names}"


def test_prepare_reads_a_captioned_folder_from_the_command_line(tmp_path, capsys):
    root = write_jsonl(tmp_path / "folder")
    code = main(["prepare", "captioned", "--root", str(root), "--resolution", "8", "--cache-dir",
                 str(tmp_path / "cache"), "--workers", "1", "--quiet"])
    assert code == 0
    cache = open_cache(capsys.readouterr().out.splitlines()[0])
    assert len(cache) == 4 and cache.captions is not None and "a tree" in cache.captions.texts


def test_train_classifier_refuses_a_dataset_without_classes(tmp_path, capsys):
    root = write_jsonl(tmp_path / "folder")
    with pytest.raises(SystemExit) as info:
        main(["train-classifier", "captioned", "--root", str(root), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'captioned' has no class labels" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # refused before preparing anything
