"""One writer per folder: a run folder, a study folder and an evaluation's partial folder are locked with
`fcntl.flock` (released by the kernel when the holder dies); a second writer is refused at once, naming the holder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lddpm.config import save_config
from lddpm.errors import LddpmError
from lddpm.io import LOCK_FILE, folder_lock
from test_train import data_dirs, tiny_config  # noqa: F401  (the synthetic IDX data fixture)

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))

HOLDER = """
import sys, time
from lddpm.io import folder_lock
with folder_lock(sys.argv[1], "test folder"):
    print("locked", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def holder(folder: Path):
    """Another process holding `folder`'s lock; SIGKILLed at the end (if still alive)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    folder = tmp_path / "out"
    with holder(folder) as proc:
        with pytest.raises(LddpmError) as info:
            with folder_lock(folder, "run folder"):
                pass
        message = str(info.value)
        assert f"run folder {folder} is in use by process {proc.pid} on host {socket.gethostname()}" in message
        assert "\n" not in message and "wait for it to finish or stop it" in message
        proc.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        proc.wait()
    assert (folder / LOCK_FILE).is_file()  # the stale file stays, and does not block
    with folder_lock(folder, "run folder"):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
        with folder_lock(folder, "run folder"):  # the same process may nest it
            pass
    with holder(folder):  # released at the end of the block
        pass


def test_train_study_and_evaluation_refuse_a_folder_another_process_writes(data_dirs, tmp_path):
    from lddpm.evaluate.generate import generate_resumable
    from lddpm.study import run_study, study_from_dict
    from lddpm.train import train

    config = tiny_config(data_dirs, "run.steps=2")
    run = tmp_path / "run"
    with holder(run):
        for resume in (False, True):
            with pytest.raises(LddpmError, match=r"run folder .*run is in use by process \d+ on host"):
                train(config, run, resume=resume, progress=False)
        assert not (run / "checkpoints").exists() and not (run / "config.toml").exists()
    train(config, run, progress=False)  # free again

    study = study_from_dict({"study": {"name": "s"}, "runs": {"r": {"config": "fashion-quick"}},
                             "cells": [{"name": "c", "run": "r"}]})
    with holder(tmp_path / "study"):
        with pytest.raises(LddpmError, match=r"study folder .*study is in use by process \d+"):
            run_study(study, tmp_path / "study", train_fn=lambda *a: 1 / 0, cell_fn=lambda *a: 1 / 0, progress=False)
    assert not (tmp_path / "study" / "cells").exists()

    def batch(n, labels, seed):
        return np.zeros((n, 4, 4, 1), np.uint8), None

    with holder(tmp_path / "partial"):
        with pytest.raises(LddpmError, match=r"partial samples folder .*partial is in use by process \d+"):
            generate_resumable(batch, 4, batch_size=2, partial_dir=tmp_path / "partial", progress=False)
    images, _, _ = generate_resumable(batch, 4, batch_size=2, partial_dir=tmp_path / "partial", progress=False)
    assert images.shape == (4, 4, 4, 1)


def _lddpm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lddpm", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_lddpm_commands_on_one_folder_the_second_is_refused_at_once(data_dirs, tmp_path):
    """Real processes: `lddpm train` while another `lddpm train` writes the run folder; `lddpm study` and
    `lddpm eval` on held folders; then the first trainer is SIGKILLed and `train --resume` goes on."""
    from lddpm.checkpoint import load_checkpoint

    config = tiny_config(data_dirs, "run.steps=100000", "run.checkpoint_every=2")
    save_config(config, tmp_path / "cfg")
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "lddpm", "train", str(tmp_path / "cfg" / "config.toml"),
                              "--out", str(run), "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not list((run / "checkpoints").glob("step_*.safetensors")) if (run / "checkpoints").is_dir() else True:
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start"
            time.sleep(0.1)
        for args in (["--resume", "--out", str(run)], [str(tmp_path / "cfg" / "config.toml"), "--out", str(run)]):
            second = _lddpm("train", *args, "--quiet")
            assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
            assert (f"run folder {run} is in use by process {first.pid} on host {socket.gethostname()}"
                    in second.stderr), second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
        first.communicate()
    step = load_checkpoint(run).meta["step"]
    resumed = _lddpm("train", "--resume", "--out", str(run), "--set", f"run.steps={step + 2}", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run).meta["step"] == step + 2

    study_file = tmp_path / "study.toml"
    study_file.write_text('[study]\nname = "s"\n[runs.r]\nconfig = "fashion-quick"\n[[cells]]\nname = "c"\nrun = "r"\n')
    partial = tmp_path / "eval.samples"
    with holder(tmp_path / "study") as proc, holder(partial) as proc2:
        for args, what, pid in ((["study", str(study_file), "--out", str(tmp_path / "study")], "study folder", proc.pid),
                                (["study", str(study_file), "--out", str(tmp_path / "study"), "--report-only"],
                                 "study folder", proc.pid),
                                (["eval", str(run), "--num", "4", "--out", str(tmp_path / "eval.json")],
                                 "partial samples folder", proc2.pid)):
            second = _lddpm(*args, "--quiet")
            assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
            assert f"{what} " in second.stderr and f"in use by process {pid} on host" in second.stderr, second.stderr
