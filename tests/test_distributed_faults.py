"""Distributed runs that survive faults: torchrun restarts resume by themselves, two nodes equal one process,
and a rank that raises ends the job with its error in one line."""

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

import pytest
import torch

from lddpm.checkpoint import load_checkpoint
from lddpm.config import apply_overrides, save_config
from lddpm.errors import LddpmError
from lddpm.train import train
from test_train import data_dirs, one_thread, tiny_config  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _groups(run: Path) -> dict:
    ckpt = load_checkpoint(run)
    return {g: ckpt.load(g) for g in ("model", "ema", "optimizer")}


def _assert_bitwise_equal(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key} differs"
        else:
            assert a[key] == b[key], f"{where}.{key} differs"


def _log(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def test_a_torchrun_restart_resumes_its_own_jobs_run_and_nothing_else(data_dirs, tmp_path, monkeypatch):
    """In-process: TORCHELASTIC_RESTART_COUNT > 0 with this job's checkpoint resumes without --resume;
    another job's checkpoint (a folder the first attempt refused) is still refused."""
    config = tiny_config(data_dirs, "run.steps=6")
    train(config, tmp_path / "full", progress=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    part = tmp_path / "part"
    train(config, part, progress=False, stop_at=3)  # attempt 0 stops (as if a worker died) after step 3
    assert load_checkpoint(part).meta["torchelastic_run_id"] == "job-a"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # attempt 1: the same command line, no --resume
    assert train(config, part, progress=False)["step"] == 6
    _assert_bitwise_equal(_groups(tmp_path / "full"), _groups(part))
    assert _log(tmp_path / "full") == _log(part)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(LddpmError, match="already has checkpoints"):
        train(config, part, progress=False)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which run in sessions of their own), if still alive."""
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run torchrun to its end; on a timeout (a hang) its workers are killed too and the test fails."""
    proc = subprocess.Popen([*TORCHRUN, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_tree(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_a_sigkilled_worker_to_the_uninterrupted_weights(data_dirs, tmp_path):
    """2 gloo processes; rank 1 SIGKILLed mid-run; torchrun restarts both and they resume from the last
    checkpoint by themselves: final weights, EMA, optimizer state and log equal the uninterrupted run's."""
    config = tiny_config(data_dirs, "run.steps=60", "run.checkpoint_every=5", "run.label_dropout=0.3")
    save_config(config, tmp_path / "cfg")
    command = ["-m", "lddpm", "train", str(tmp_path / "cfg" / "config.toml"), "--quiet"]
    ref = _torchrun("--standalone", "--nproc_per_node=2", *command, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=2", *command,
                             "--out", str(run)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed = time.time() + 300, None
        while killed is None:
            assert proc.poll() is None and time.time() < deadline, "training ended before a worker was killed"
            lines = (run / "log.jsonl").read_text().count("\n") if (run / "log.jsonl").is_file() else 0
            if lines >= 7 and list((run / "checkpoints").glob("step_*.safetensors")):
                victims = [p for p in _children(proc.pid) if _rank_of(p) == "1"]
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    killed = lines
            time.sleep(0.01)
        out, err = proc.communicate(timeout=300)  # a restart that hangs fails here
    finally:
        _kill_tree(proc)
    assert killed < 60
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restart 1: resuming" in out, out + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    _assert_bitwise_equal(_groups(tmp_path / "ref"), _groups(run))
    assert _log(tmp_path / "ref") == _log(run)
    print(f"rank 1 SIGKILLed after {killed} logged steps; resumed: {out.strip().splitlines()[0]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_the_same_model_as_one_process_with_two_micro_batches(data_dirs, tmp_path, one_thread):
    """`torchrun --nnodes 2` (c10d rendezvous on 127.0.0.1, one process per node) == 1 process, grad_accum=2."""
    config = tiny_config(data_dirs, "run.steps=3", "run.label_dropout=0.3")
    save_config(config, tmp_path / "cfg")
    port = _free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}", "-m", "lddpm", "train",
                               str(tmp_path / "cfg" / "config.toml"), "--out", str(tmp_path / "nodes"), "--quiet"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            _kill_tree(node)
    assert [node.returncode for node in nodes] == [0, 0], [r[1][-2000:] for r in results]
    train(apply_overrides(config, ["optim.grad_accum=2"]), tmp_path / "one", progress=False)
    a, b = _groups(tmp_path / "nodes"), _groups(tmp_path / "one")
    for group in ("model", "ema"):
        for key in a[group]:
            torch.testing.assert_close(a[group][key], b[group][key], atol=1e-5, rtol=1e-5)
    meta = load_checkpoint(tmp_path / "nodes").meta
    assert meta["step"] == 3 and meta["images_seen"] == 3 * config.optim.batch_size


BAD_RANK = """
import os, sys
from lddpm.data import loader
from lddpm.errors import LddpmError

def batch(self, step, _batch=loader.ImageLoader.batch):
    if os.environ["RANK"] == "1" and step >= 2:  # rank 1's data goes bad at its third step
        raise {error}
    return _batch(self, step)

loader.ImageLoader.batch = batch
from lddpm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("error,line", [
    ('LddpmError("image 7 of shard 1 is damaged; run lddpm verify-cache")',
     "lddpm train: error: rank 1: image 7 of shard 1 is damaged; run lddpm verify-cache"),
    ("MemoryError()", "lddpm train: error: rank 1: out of memory"),
])
def test_a_rank_that_raises_ends_the_job_with_its_error_in_one_line(data_dirs, tmp_path, error, line):
    config = tiny_config(data_dirs, "run.steps=100000")
    save_config(config, tmp_path / "cfg")
    script = tmp_path / "bad_rank.py"
    script.write_text(BAD_RANK.format(error=error))
    proc = _torchrun("--standalone", "--nproc_per_node=2", str(script), "train", str(tmp_path / "cfg" / "config.toml"),
                     "--out", str(tmp_path / "run"), "--quiet", timeout=180)  # a hang fails here
    assert proc.returncode != 0
    err = proc.stderr
    errors = [x for x in err.splitlines() if x.startswith("lddpm train: error:")]
    assert len(errors) == 1 and errors[0].startswith(line), err  # rank 0 only says it stopped because of it
    assert "[rank0]" not in err and "[rank1]" not in err and "gloo" not in err, err  # no worker traceback
    root = err[err.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root and f"traceback : {line}" in root, root


def test_lddpm_train_nproc_passes_max_restarts_to_torchrun(monkeypatch, tmp_path, capsys):
    from lddpm.cli import main
    from lddpm.commands import train as train_command

    calls = []
    monkeypatch.setattr(train_command.subprocess, "call", lambda command, env: calls.append(command) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "fashion-quick", "--out", str(tmp_path / "run"), "--nproc", "2", "--max-restarts", "3"]) == 0
    assert "--max-restarts=3" in calls[0] and "--nproc_per_node=2" in calls[0]
    with pytest.raises(SystemExit):
        main(["train", "fashion-quick", "--out", str(tmp_path / "run"), "--max-restarts", "3"])
    assert "--max-restarts 3" in capsys.readouterr().err
