"""Checkpoint files: exact round trip, atomic run-folder bookkeeping, refusal of bad files."""

from __future__ import annotations

import pickle

import pytest
import torch

from lddpm.checkpoint import (
    code_version,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from lddpm.errors import LddpmError


def _groups():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.99))
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    return net, opt, {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "misc": {"history": torch.arange(6).reshape(2, 3), "count": 3, "names": ["a", "b"]},
    }


def test_round_trip_is_exact(tmp_path):
    net, opt, groups = _groups()
    path = save_checkpoint(tmp_path / "c.safetensors", groups, {"step": 7, "config": {"x": [1.5]}})
    ckpt = load_checkpoint(path)
    assert ckpt.meta == {"step": 7, "config": {"x": [1.5]}}
    assert ckpt.header["code_version"] == code_version()
    model = ckpt.load("model")
    for key, value in net.state_dict().items():
        assert torch.equal(model[key], value)
    # Optimizer state keeps integer parameter keys and tuple betas, so load_state_dict works.
    optim_state = ckpt.load("optimizer")
    assert set(optim_state["state"]) == {0, 1, 2, 3}
    assert optim_state["param_groups"][0]["betas"] == (0.8, 0.99)
    opt2 = torch.optim.AdamW(net.parameters(), lr=1.0)
    opt2.load_state_dict(optim_state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert opt2.param_groups[0]["lr"] == 1e-3
    assert torch.equal(ckpt.load("rng")["torch"], groups["rng"]["torch"])
    misc = ckpt.load("misc")
    assert misc["count"] == 3 and misc["names"] == ["a", "b"]
    assert torch.equal(misc["history"], torch.arange(6).reshape(2, 3))


def test_run_folder_keeps_last_k_and_pointer(tmp_path):
    _, _, groups = _groups()
    for step in (10, 20, 30, 40):
        save_run_checkpoint(tmp_path, step, groups, {"step": step}, keep=2)
    files = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in files] == ["step_0000030.safetensors", "step_0000040.safetensors"]
    assert resolve_checkpoint(tmp_path) == files[-1]
    assert load_checkpoint(tmp_path).meta["step"] == 40
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_truncated_checkpoint_is_refused(tmp_path):
    _, _, groups = _groups()
    path = save_checkpoint(tmp_path / "c.safetensors", groups, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(LddpmError, match="c.safetensors"):
        load_checkpoint(path)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(LddpmError, match="c.safetensors"):
        load_checkpoint(path)


def test_pickle_is_refused_and_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model": Boom()}))
    with pytest.raises(LddpmError, match="evil.safetensors"):
        load_checkpoint(path)
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(LddpmError, match="model.pt"):
        load_checkpoint(pt)
    assert not (tmp_path / "pwned").exists()


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(LddpmError, match="not an lddpm checkpoint"):
        load_checkpoint(path)


def test_missing_run_is_reported(tmp_path):
    with pytest.raises(LddpmError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(LddpmError, match="no checkpoint"):
        load_checkpoint(tmp_path)
