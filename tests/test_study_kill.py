"""A study SIGKILLed at many moments (training, a checkpoint write, the classifier, sampling, scoring, the cell's
row, the report, the plots), re-run after each kill: it finishes, recomputes nothing that was finished, and its
results equal an uninterrupted study's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lddpm.checkpoint import load_checkpoint
from lddpm.io import TEMP_PATTERN
from test_study import _image_folder

REPO = Path(__file__).resolve().parents[1]

# `lddpm study` with a tiny stand-in feature network; it logs what it computes to $EVENTS and SIGKILLs
# itself at the n-th event named in $KILL_AT ("name:n"). Every hook logs before (name) or after (name_done)
# the real function, so a kill lands inside the study's own code path, as an outside SIGKILL would.
WRAPPER = r'''
import json, os, signal, sys
from pathlib import Path
import torch
import lddpm.checkpoint, lddpm.report
from lddpm.evaluate import generate, score
from lddpm.metrics import FeatureExtractor, classifier
from lddpm.pipeline import Pipeline
from lddpm.study import backend, runner
from lddpm.train.loop import TrainingLoop

kill_name, _, kill_n = os.environ.get("KILL_AT", "").partition(":")
counts = {}

def event(name, detail=None):
    with open(os.environ["EVENTS"], "a") as handle:
        handle.write(json.dumps([name, detail]) + "\n")
    counts[name] = counts.get(name, 0) + 1
    if name == kill_name and counts[name] == int(kill_n):
        os.kill(os.getpid(), signal.SIGKILL)

def hook(owner, attr, name, detail=lambda *a, **k: None, before=True, after=False, when=lambda *a, **k: True):
    original = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        hit = when(*args, **kwargs)
        if hit and before:
            event(name, detail(*args, **kwargs))
        result = original(*args, **kwargs)
        if hit and after:
            event(name + "_done", detail(*args, **kwargs))
        return result
    setattr(owner, attr, wrapper)

class Features(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 4)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 4 * 48).reshape(4, 48))
            self.proj.bias.zero_()
    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))

backend.load_extractor = lambda **kw: FeatureExtractor(Features(), name="stand-in", sha1="0" * 40, input_size=None,
                                                       batch_size=8)
hook(TrainingLoop, "_train_step", "train_step", lambda self, *a: self.step)
hook(TrainingLoop, "save", "checkpoint_saved", lambda self: self.step, before=False, after=True)
hook(lddpm.checkpoint, "save_file", "checkpoint_file", after=True)
hook(classifier, "save_file", "classifier_weights", after=True)
hook(backend, "train_dataset_classifier", "train_classifier")
hook(backend.StudyBackend, "real_floor", "real_floor")
hook(Pipeline, "generate", "generate", lambda self, n, **k: k.get("seed"))
hook(generate, "write_npz", "batch", lambda path, **k: f"{Path(path).parent.name}/{Path(path).name}", after=True)
hook(score, "evaluate_generated", "score")
hook(runner, "write_text", "cell_row", lambda path, text: Path(path).name, after=True,
     when=lambda path, text: Path(path).parent.name == "cells" and str(path).endswith(".json"))
hook(lddpm.report, "to_html", "report")
hook(lddpm.report, "write_plots", "plots")
event("start", os.environ.get("KILL_AT"))
from lddpm.cli import main
sys.exit(main(sys.argv[1:]))
'''

# The moments, in the order a study reaches them (each re-run gets this far again, then one step further).
KILL_POINTS = [
    "train_step:4",           # while the run trains (its checkpoint at step 2 written)
    "checkpoint_file_done:2",  # inside a checkpoint write: the temporary file complete, not yet moved into place
    "classifier_weights_done:1",  # while the class-metrics classifier is saved
    "batch_done:1",           # while the first cell samples: after its first batch
    "generate:1",             # in the middle of that cell's second batch
    "score:1",                # while the cell is scored
    "cell_row:1",             # the cell's grid written, its row not yet
    "report:1",               # while the table after the first cell is written
    "batch_done:2",           # the second (stochastic, DDPM) cell: after both its batches
    "plots:1",                # while the final report's plots are drawn
]
TIMING = {"seconds_per_image", "train_seconds", "cell_seconds", "extra"}


def _study_file(tmp_path: Path) -> Path:
    fast = ["optim.batch_size=8", "run.log_every=1", "run.checkpoint_every=2", "run.keep_checkpoints=10",
            "run.num_sample_images=4", "run.sample_steps=2", "run.sample_every=0", "optim.warmup_steps=0",
            "run.class_conditional=true"]
    sets = ", ".join(json.dumps(s) for s in fast)
    text = f"""
[study]
name = "kill"
dataset = "imagefolder"
resolution = 8
fid_n = 8
reference_n = 16
data_root = {json.dumps(str(tmp_path / "data"))}
cache_dir = {json.dumps(str(tmp_path / "cache"))}
classifier_epochs = 1
sample_batch_size = 4
grid_per_class = 4
fid_batch_size = 8
device = "cpu"

[runs.cfg]
config = "fashion-quick"
steps = 12
set = [{sets}]

[[cells]]
name = "ddim"
run = "cfg"
sampler = "ddim"
steps = 2

[[cells]]
name = "ddpm"
run = "cfg"
sampler = "ddpm"
steps = 3
"""
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _run(tmp_path: Path, out: Path, events: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), EVENTS=str(events))
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(tmp_path / "wrapper.py"), "study", str(tmp_path / "study.toml"),
                           "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=600)


def _events(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rows(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.slow
def test_a_study_killed_at_ten_moments_finishes_recomputes_nothing_finished_and_equals_an_uninterrupted_one(tmp_path):
    _image_folder(tmp_path / "data", per_class=12)
    _study_file(tmp_path)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    ref, out = tmp_path / "ref", tmp_path / "out"
    done = _run(tmp_path, ref, tmp_path / "ref-events.jsonl", None)
    assert done.returncode == 0, done.stderr[-3000:]
    # the uninterrupted study shares the data cache, reference statistics and classifier with the killed one:
    # move them aside so the killed study builds its own
    (tmp_path / "cache").rename(tmp_path / "ref-cache")

    events = tmp_path / "events.jsonl"
    for point in KILL_POINTS:
        killed = _run(tmp_path, out, events, point)
        assert killed.returncode == -9, f"{point} was not reached: {killed.returncode}\n{killed.stderr[-3000:]}"
    final = _run(tmp_path, out, events, None)
    assert final.returncode == 0, final.stderr[-3000:]

    # Results equal the uninterrupted study's: rows (all but timings), grids, samples, weights.
    assert _rows(out) == _rows(ref) and [r["status"] for r in _rows(out)] == ["ok", "ok"]
    floors = [json.loads((d / "real_floor.json").read_text()) for d in (out, ref)]
    for floor in floors:  # the reference's record holds its file's path and creation time
        floor["reference"] = {k: floor["reference"][k] for k in ("dataset", "split", "num", "network_sha1")}
    assert floors[0] == floors[1] and floors[0]["fid"] is not None
    for name in ("ddim", "ddpm"):
        assert (out / "grids" / f"{name}.png").read_bytes() == (ref / "grids" / f"{name}.png").read_bytes()
        batches = sorted((ref / "cells" / f"{name}.samples").glob("batch-*.npz"))
        assert len(batches) == 2
        for batch in batches:
            with np.load(batch) as a, np.load(out / "cells" / f"{name}.samples" / batch.name) as b:
                assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    a, b = load_checkpoint(ref / "runs" / "cfg"), load_checkpoint(out / "runs" / "cfg")
    assert a.meta["step"] == b.meta["step"] == 12
    for group in ("model", "ema", "optimizer"):
        x, y = a.load(group), b.load(group)
        flat_x, flat_y = {}, {}
        for src, dst in ((x, flat_x), (y, flat_y)):
            stack = [("", src)]
            while stack:
                prefix, obj = stack.pop()
                if isinstance(obj, dict):
                    stack += [(f"{prefix}/{k}", v) for k, v in obj.items()]
                elif isinstance(obj, torch.Tensor):
                    dst[prefix] = obj
        assert flat_x.keys() == flat_y.keys() and all(torch.equal(flat_x[k], flat_y[k]) for k in flat_x), group
    for name in ("results.md", "results.csv", "index.html"):
        assert (out / name).is_file()
    assert (out / "plots" / "loss_curves.png").is_file()
    log = [json.loads(x)["step"] for x in (out / "runs" / "cfg" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 13))
    leftovers = [p for p in [*out.rglob("*"), *(tmp_path / "cache").rglob("*")] if TEMP_PATTERN.match(p.name)
                 or re.match(r"^\..+\.old-", p.name)]
    assert not leftovers

    # Nothing finished was computed again.
    attempts, current = [], None
    for name, detail in _events(events):
        if name == "start":
            current = []
            attempts.append(current)
        current.append((name, detail))
    assert len(attempts) == len(KILL_POINTS) + 1
    every = [e for attempt in attempts for e in attempt]
    for name in ("batch_done", "cell_row_done", "checkpoint_saved_done"):
        finished = [d for n, d in every if n == name]
        assert len(finished) == len(set(finished)), f"{name} repeated: {finished}"
    assert [d for n, d in every if n == "batch_done"] == [d for n, d in _events(tmp_path / "ref-events.jsonl")
                                                          if n == "batch_done"]
    saved = 0
    for attempt in attempts:  # each attempt trains on from the newest checkpoint a finished save left
        steps = [d for n, d in attempt if n == "train_step"]
        assert not steps or steps[0] == saved, (steps, saved)
        saved = max([saved] + [d for n, d in attempt if n == "checkpoint_saved_done"])
    assert sum(n == "real_floor" for n, _ in every) == 1
    assert sum(n == "train_classifier" for n, _ in every) == 2  # the one killed while saving, then once more
    trained_after_final = [n for attempt in attempts[attempts.index(next(a for a in attempts if ("checkpoint_saved_done", 12) in a)) + 1:]
                           for n, _ in attempt if n == "train_step"]
    assert not trained_after_final
    print(f"{len(KILL_POINTS)} kills, {len(attempts)} runs: rows, grids, samples and weights equal the uninterrupted study")
