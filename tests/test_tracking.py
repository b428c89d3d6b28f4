"""Experiment tracking (lddpm.tracking): TensorBoard event files read back with TensorBoard's own reader.

The tags and step numbers of a training run, across a killed attempt and its resume (no duplicate
steps), the grids as images, `lddpm eval` and study-cell numbers under the run, rank 0 alone under
torchrun, and one clear error when the tensorboard package is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lddpm.checkpoint import list_checkpoints
from lddpm.config import apply_overrides
from lddpm.errors import LddpmError
from lddpm.train import train
from helpers import ConvFeatures
from test_train import _torchrun, data_dirs, one_thread, tiny_config  # noqa: F401  (fixtures)

pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install 'lddpm[tensorboard]'; make setup installs it)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TENSORBOARD = 'run.trackers=["jsonl", "tensorboard"]'


def events(run_dir: Path) -> EventAccumulator:
    """Every event file of a run folder, read as TensorBoard reads it (purges of resumed runs applied)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_training_curves_continue_across_a_killed_attempt_without_duplicate_steps(data_dirs, tmp_path, monkeypatch):
    from lddpm.train import diffusion as trainer

    config = tiny_config(data_dirs, "run.steps=6", "run.checkpoint_every=2", "run.sample_every=2", TENSORBOARD)
    run = tmp_path / "run"
    original = trainer.DiffusionTrainer.micro_loss

    def dies_in_step_4(self, shard, generator):
        if self.step == 3:  # steps 1..3 are logged, the last checkpoint is step 2
            raise KeyboardInterrupt("killed")
        return original(self, shard, generator)

    monkeypatch.setattr(trainer.DiffusionTrainer, "micro_loss", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config, run, progress=False)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000002.safetensors"]
    assert steps(events(run), "train/loss") == [1, 2, 3]
    monkeypatch.setattr(trainer.DiffusionTrainer, "micro_loss", original)
    assert train(config, run, resume=True, progress=False)["step"] == 6

    acc = events(run)
    bands = [f"train/loss_t/{b}" for b in ("000-249", "250-499", "500-749", "750-999")]
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/ema_decay", *bands]:
        assert steps(acc, tag) == [1, 2, 3, 4, 5, 6], tag  # step 3 of the killed attempt is dropped, not repeated
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([r[key] for r in log], rel=1e-6)
    for r, e in zip(log, acc.Scalars("train/loss_t/000-249")):
        assert e.value == pytest.approx(r["loss_t"]["000-249"], rel=1e-6)
    decays = [e.value for e in acc.Scalars("train/ema_decay")]  # warm-up EMA: min(decay, (1 + n) / (10 + n))
    assert decays == pytest.approx([min(config.optim.ema_decay, (1 + n) / (10 + n)) for n in range(6)])
    assert [e.step for e in acc.Images("samples")] == [2, 4, 6]  # the grids, at the steps they were made
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_grids_are_the_png_files(data_dirs, tmp_path):
    from io import BytesIO

    import numpy as np
    from PIL import Image

    run = tmp_path / "run"
    train(tiny_config(data_dirs, "run.steps=2", "run.num_sample_images=4", TENSORBOARD), run, progress=False)
    image = events(run).Images("samples")[-1]
    decoded = np.asarray(Image.open(BytesIO(image.encoded_image_string)).convert("L"))
    assert image.step == 2
    assert np.array_equal(decoded, np.asarray(Image.open(run / "samples" / "step_000002.png")))


def test_a_run_without_the_tracker_writes_no_event_file_and_unknown_trackers_are_refused(data_dirs, tmp_path):
    train(tiny_config(data_dirs, "run.steps=1"), tmp_path / "plain", progress=False)
    assert not list((tmp_path / "plain").glob("events.out.tfevents.*"))
    with pytest.raises(LddpmError, match=r"run.trackers = 'wandb' is not allowed; choose one of: jsonl, tensorboard"):
        train(tiny_config(data_dirs, 'run.trackers=["wandb"]'), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_missing_tensorboard_is_one_clear_error_before_any_work(data_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(LddpmError, match=r"the tensorboard package is not installed; install it \(pip install "
                                         r"'lddpm\[tensorboard\]'"):
        train(tiny_config(data_dirs, TENSORBOARD), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_eval_and_study_cell_numbers_are_logged_under_the_run(data_dirs, tmp_path, capsys):
    from lddpm.cli import main
    from lddpm.study.backend import track_cell

    run = tmp_path / "run"
    train(tiny_config(data_dirs, "run.steps=2", TENSORBOARD), run, progress=False)
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    root, cache = data_dirs
    out = tmp_path / "ddim-k2.json"
    assert main(["eval", str(run), "--num", "16", "--steps", "2", "--out", str(out), "--inception", str(net),
                 "--classifier", "none", "--device", "cpu", "--cache-dir", str(cache), "--root", str(root),
                 "--ref-num", "32", "--batch-size", "8", "--quiet"]) == 0
    assert f"logged to the trackers of {run} as eval/ddim-k2/" in capsys.readouterr().out
    result = json.loads(out.read_text())
    track_cell(run, SimpleNamespace(name="ddim-20"), {"fid": 12.5, "kid": 0.25, "class_accuracy": 0.75,
                                                      "seconds_per_image": 0.125, "status": "ok", "images": None})
    acc = events(run)
    assert [(e.step, e.value) for e in acc.Scalars("eval/ddim-k2/fid")] == [(2, pytest.approx(result["fid"]))]
    assert acc.Scalars("eval/ddim-k2/seconds_per_image")[0].value == pytest.approx(result["cost"]["seconds_per_image"])
    assert acc.Scalars("eval/ddim-k2/kid")[0].value == pytest.approx(result["kid"])
    cell = {tag.split("/")[-1]: acc.Scalars(tag)[0] for tag in acc.Tags()["scalars"] if tag.startswith("study/ddim-20/")}
    assert {k: (e.step, e.value) for k, e in cell.items()} == {
        "fid": (2, 12.5), "kid": (2, 0.25), "class_accuracy": (2, 0.75), "seconds_per_image": (2, 0.125)}
    assert steps(acc, "train/loss") == [1, 2]  # the training curves are untouched

    # a run without the tracker: the results file is the only record, no event file appears
    plain = tmp_path / "plain"
    train(tiny_config(data_dirs, "run.steps=1"), plain, progress=False)
    track_cell(plain, SimpleNamespace(name="c"), {"fid": 1.0})
    assert not list(plain.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_processes_write_one_event_file(data_dirs, tmp_path, one_thread):  # noqa: F811
    config = tiny_config(data_dirs, "run.steps=3", TENSORBOARD)
    _torchrun(config, tmp_path, "train", "ddp")
    assert len(list((tmp_path / "ddp").glob("events.out.tfevents.*"))) == 1
    assert steps(events(tmp_path / "ddp"), "train/loss") == [1, 2, 3]
    single = tmp_path / "single"
    train(apply_overrides(config, ["optim.grad_accum=2"]), single, progress=False)
    a, b = events(tmp_path / "ddp"), events(single)
    for tag in ("train/loss", "train/loss_t/000-249", "train/grad_norm"):  # the bands are summed over both ranks
        assert [e.value for e in a.Scalars(tag)] == pytest.approx([e.value for e in b.Scalars(tag)], rel=1e-5)
