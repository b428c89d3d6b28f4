"""A real full disk (a size-limited tmpfs, mounted as root) under prepare, a training checkpoint, eval and a study
report: one "disk full" line, the earlier files intact, and the command works again once space is freed.

Skipped, with the reason, where a tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN, not Linux)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lddpm.checkpoint import load_checkpoint
from lddpm.config import save_config
from lddpm.io import TEMP_PATTERN
from test_train import data_dirs, tiny_config  # noqa: F401  (the synthetic IDX data fixture)

from helpers import ConvFeatures

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
pytestmark = pytest.mark.slow


@pytest.fixture
def disk(tmp_path):
    """A 64 MB tmpfs at tmp_path/disk."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip() or mount.returncode}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk up to `leave` free bytes with one preallocated file; returns it (delete it to free the space)."""
    path = disk / "filler"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        for _ in range(100):  # another process may be writing: retry with the free space of now
            free = shutil.disk_usage(disk).free
            if free <= leave:
                break
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, free - leave)
                break
            except OSError:
                continue
    finally:
        os.close(fd)
    return path


def lddpm(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lddpm", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_disk_full_line(stderr: str, where: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: disk full while writing" in lines[0] and where in lines[0], stderr[-3000:]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_PATTERN.match(p.name) or re.match(r"^\..+\.old-", p.name)]


def test_prepare_on_a_full_disk(data_dirs, disk):
    from lddpm.data import open_cache

    root, _ = data_dirs
    cache = disk / "cache"
    assert lddpm("prepare", "fashion-mnist", "--resolution", 16, "--root", root, "--cache-dir", cache, "--quiet").returncode == 0
    earlier = cache / "fashion-mnist-train-16"
    # 64 images of 32x32 need 64 KiB: leave exactly that, so the writer's own space check passes and the
    # images file (its header included) does not fit. Without reserving its blocks, the memory-mapped
    # writer died of SIGBUS here (exit -7, no message).
    filler = fill(disk, leave=64 * 32 * 32)
    failed = lddpm("prepare", "fashion-mnist", "--resolution", 32, "--root", root, "--cache-dir", cache, "--quiet")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert_one_disk_full_line(failed.stderr, "fashion-mnist-train-32")
    open_cache(earlier).verify()
    assert sorted(p.name for p in cache.iterdir()) == ["fashion-mnist-train-16"]  # no half-written cache
    filler.unlink()
    assert lddpm("prepare", "fashion-mnist", "--resolution", 32, "--root", root, "--cache-dir", cache, "--quiet").returncode == 0
    assert len(open_cache(cache / "fashion-mnist-train-32")) == 64


def test_a_training_checkpoint_on_a_full_disk(data_dirs, disk, tmp_path):
    config = tiny_config(data_dirs, "run.steps=100000", "run.checkpoint_every=2", "run.keep_checkpoints=2")
    save_config(config, tmp_path / "cfg")
    run = disk / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lddpm", "train", str(tmp_path / "cfg" / "config.toml"), "--out",
                             str(run), "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints").is_dir() or not list((run / "checkpoints").glob("step_*.safetensors")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        size = next((run / "checkpoints").glob("step_*.safetensors")).stat().st_size
        filler = fill(disk, leave=size // 2)  # room for log lines, not for the next checkpoint
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert_one_disk_full_line(err, f"{run}/checkpoints/step_")
    ckpt = load_checkpoint(run)  # the last good checkpoint, whole
    assert all(torch.isfinite(t).all() for t in ckpt.load("model").values())
    assert not temp_files(run)
    filler.unlink()
    step = ckpt.meta["step"]
    resumed = lddpm("train", "--resume", "--out", run, "--set", f"run.steps={step + 2}", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run).meta["step"] == step + 2


def test_eval_on_a_full_disk(data_dirs, disk, tmp_path):
    from lddpm.train import train

    run = tmp_path / "run"
    train(tiny_config(data_dirs, "run.steps=1"), run, progress=False)
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    root, cache = data_dirs
    common = ["--inception", net, "--classifier", "none", "--device", "cpu", "--cache-dir", cache, "--root", root,
              "--ref-num", 32, "--batch-size", 8, "--quiet"]
    first = disk / "eval" / "first.json"
    assert lddpm("eval", run, "--num", 16, "--steps", 2, "--out", first, *common).returncode == 0
    before = first.read_bytes()
    second = disk / "eval" / "second.json"
    partial = second.with_suffix(".samples")
    proc = subprocess.Popen([sys.executable, "-m", "lddpm", "eval", str(run), "--num", "2000", "--steps", "10", "--out",
                             str(second), *map(str, common)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 180
        while not (partial / "batch-00002.npz").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.01)
        filler = fill(disk)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert_one_disk_full_line(err, str(partial))
    assert first.read_bytes() == before and not second.exists() and not temp_files(disk / "eval")
    kept = {p: p.stat().st_mtime_ns for p in partial.glob("batch-*.npz")}
    assert len(kept) >= 3
    filler.unlink()
    again = lddpm("eval", run, "--num", 2000, "--steps", 10, "--out", second, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(second.read_text())["num_images"] == 2000
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the batches written before the failure were reused


def test_a_study_report_on_a_full_disk(disk, tmp_path):
    from lddpm.study import run_study, study_from_dict
    from test_study import ToyBackend

    data = {"study": {"name": "toy", "dataset": "fashion-mnist", "resolution": 8, "fid_n": 16, "grid_per_class": 3},
            "runs": {"net": {"config": "fashion-quick", "steps": 3}},
            "cells": [{"name": "ddim-{steps}", "run": "net", "sampler": "ddim", "steps": [2, 4]}]}
    out = disk / "study"
    backend = ToyBackend()
    run_study(study_from_dict(data), out, train_fn=backend.train, cell_fn=backend.cell, progress=False)
    study_file = tmp_path / "study.toml"
    study_file.write_text('[study]\nname = "toy"\ndataset = "fashion-mnist"\nresolution = 8\nfid_n = 16\n'
                          'grid_per_class = 3\n[runs.net]\nconfig = "fashion-quick"\nsteps = 3\n'
                          '[[cells]]\nname = "ddim-{steps}"\nrun = "net"\nsampler = "ddim"\nsteps = [2, 4]\n')
    reports = ("results.json", "results.csv", "results.md", "index.html")
    before = {name: (out / name).read_bytes() for name in reports}
    filler = fill(disk)
    failed = lddpm("study", study_file, "--out", out, "--report-only", "--quiet")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert_one_disk_full_line(failed.stderr, str(out))
    assert {name: (out / name).read_bytes() for name in reports} == before and not temp_files(out)
    filler.unlink()
    again = lddpm("study", study_file, "--out", out, "--report-only", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"][0]["status"] == "ok"
