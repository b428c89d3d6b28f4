"""Reliability leftovers: the logged loss across a resume, the `last.txt` pointer, resuming a finished run,
and sample counts that cannot fit the disk."""

from __future__ import annotations

import json

import pytest
import torch

from lddpm.checkpoint import resolve_checkpoint
from lddpm.cli import main
from lddpm.train import train, train_vae
from test_train import data_dirs, tiny_config  # noqa: F401  (the synthetic IDX data fixture)

from helpers import ConvFeatures


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_logged_loss_of_a_step_is_the_same_after_a_resume(data_dirs, tmp_path):
    """A record averages the steps since the previous record; a resume restores that window from the checkpoint,
    and the records a killed run wrote past its checkpoint (one cut short) are dropped, then written again."""
    config = tiny_config(data_dirs, "run.steps=6", "run.log_every=4")
    full, part = tmp_path / "full", tmp_path / "part"
    train(config, full, progress=False)
    assert train(config, part, progress=False, stop_at=3)["stopped"]  # stops mid-window (steps 1-3 of 1-4)
    with open(part / "log.jsonl", "a") as handle:  # what a process SIGKILLed after its checkpoint had logged
        handle.write('{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    train(config, part, resume=True, progress=False)
    keys = ("step", "loss", "lr", "grad_norm")
    expected = [{k: r[k] for k in keys} for r in _log(full)]
    assert [r["step"] for r in expected] == [4, 6]
    assert [{k: r[k] for k in keys} for r in _log(part)] == expected


@pytest.mark.parametrize("task", ["diffusion", "vae"])
def test_resuming_a_finished_run_leaves_its_last_checkpoint_untouched(data_dirs, tmp_path, task):
    preset = "vae-fashion-quick" if task == "vae" else "fashion-quick"
    config = tiny_config(data_dirs, "run.steps=2", "run.keep_checkpoints=1", preset=preset)
    fn = train_vae if task == "vae" else train
    run = tmp_path / "run"
    fn(config, run, progress=False)
    kept = [p for p in run.rglob("*") if p.is_file() and p.parent.name in ("checkpoints", "samples")]
    kept.append(run / "log.jsonl")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept}
    result = fn(config, run, resume=True, progress=False)
    assert result["already_finished"] and result["step"] == 2 and not result["stopped"]
    assert result["checkpoint"].endswith("step_0000002.safetensors")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == before
    longer = fn(tiny_config(data_dirs, "run.steps=3", "run.keep_checkpoints=1", preset=preset), run, resume=True,
                progress=False)  # more steps still train on
    assert longer["step"] == 3 and not longer.get("already_finished")


def test_last_pointer_is_read_as_a_checkpoint_file_name_inside_checkpoints_only(tmp_path):
    """`last.txt` naming a path (relative or absolute) is ignored: the folder's own newest checkpoint is used."""
    ours, other = tmp_path / "run" / "checkpoints", tmp_path / "other" / "checkpoints"
    for folder, steps in ((ours, (1, 2)), (other, (7,))):
        folder.mkdir(parents=True)
        for step in steps:
            (folder / f"step_{step:07d}.safetensors").write_bytes(b"x")
    pointer = ours / "last.txt"
    pointer.write_text("step_0000001.safetensors\n")  # a name: followed
    assert resolve_checkpoint(tmp_path / "run") == ours / "step_0000001.safetensors"
    for target in ("../../other/checkpoints/step_0000007.safetensors", str(other / "step_0000007.safetensors"),
                   "../checkpoints/step_0000001.safetensors", "notes.txt", ""):
        pointer.write_text(target + "\n")
        assert resolve_checkpoint(tmp_path / "run") == ours / "step_0000002.safetensors", target


def test_sample_and_eval_refuse_a_num_that_cannot_fit_the_free_disk_before_sampling(data_dirs, tmp_path, capsys,
                                                                                    monkeypatch):
    from lddpm.pipeline import Pipeline

    run = tmp_path / "run"
    train(tiny_config(data_dirs, "run.steps=1", "run.class_conditional=false"), run, progress=False)
    generate = Pipeline.generate
    calls = []
    monkeypatch.setattr(Pipeline, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
    huge = str(10**12)  # 10^12 16x16 grey images: 256 TB
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    commands = [
        ["sample", str(run), "--num", huge, "--out-dir", str(tmp_path / "png"), "--quiet"],
        ["sample", str(run), "--num", huge, "--out", str(tmp_path / "grid.png"), "--quiet"],
        ["eval", str(run), "--num", huge, "--inception", str(net), "--classifier", "none", "--device", "cpu",
         "--out", str(tmp_path / "eval.json"), "--quiet"],
    ]
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert "not enough free disk space" in err and f"--num {huge}" in err and "lower --num" in err, err
    assert not calls  # refused before sampling started
    assert main(["sample", str(run), "--num", "4", "--out-dir", str(tmp_path / "png"), "--steps", "2", "--quiet"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 4


def test_keep_steps_pins_checkpoints_that_keep_checkpoints_would_remove(data_dirs, tmp_path):
    """run.keep_steps: those steps' checkpoints are written (also off the checkpoint_every grid) and never pruned;
    the newest keep_checkpoints of the others stay as before. Bad values get one error naming the key."""
    from lddpm.checkpoint import checkpoint_step, list_checkpoints
    from lddpm.config import validate
    from lddpm.errors import LddpmError

    config = tiny_config(data_dirs, "run.steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=1",
                         "run.keep_steps=[3, 4]")
    train(config, tmp_path / "run", progress=False)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 4, 6]
    plain = tiny_config(data_dirs, "run.steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=1")
    train(plain, tmp_path / "plain", progress=False)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "plain" / "checkpoints")] == [6]
    for bad in ("[0]", "[2, 2]", "[-5]"):
        with pytest.raises(LddpmError, match=r"run\.keep_steps"):
            validate(tiny_config(data_dirs, f"run.keep_steps={bad}"))
