"""Post-hoc EMA (Karras et al. 2024, EDM2 Sec. 3 and App. C): power EMAs, snapshots, least-squares reconstruction."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from lddpm.checkpoint import checkpoint_step, load_checkpoint
from lddpm.cli import main
from lddpm.config import apply_overrides, config_from_preset, validate
from lddpm.errors import LddpmError
from lddpm.pipeline import load_pipeline
from lddpm.train import train
from lddpm.train.ema import (gamma_to_sigma_rel, posthoc_coefficients, power_profile_inner, sigma_rel_to_gamma)
from lddpm.train.posthoc import PostHocEMA, list_snapshots, reconstruct_ema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import _torchrun, data_dirs, one_thread, tiny_config  # noqa: E402,F401  (fixtures, torchrun helper)


def test_sigma_rel_and_gamma():
    """EDM2 Eq. 3; its two tracked EMAs are sigma_rel 0.05 and 0.10, i.e. gamma 16.97 and 6.94."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.08, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    for bad in (0.0, 0.29, -0.1):
        with pytest.raises(LddpmError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("a,b", [((100.0, 6.94), (100.0, 16.97)), ((40.0, 3.0), (100.0, 16.97)),
                                 ((250.0, 0.5), (70.0, 9.0))])
def test_profile_inner_products_equal_numerical_integrals(a, b):
    """<p_a, p_b> with p(s; t, g) = (g + 1) s^g / t^(g + 1) on [0, t], against scipy's quadrature."""
    def p(s, t, g):
        return (g + 1) * s ** g / t ** (g + 1) if s <= t else 0.0

    numeric = quad(lambda s: p(s, *a) * p(s, *b), 0, min(a[0], b[0]), limit=200)[0]
    assert power_profile_inner(*a, *b) == pytest.approx(numeric, rel=1e-8)


class Vector(nn.Module):
    """A float64 parameter vector: the weights of a synthetic training run."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dtype=torch.float64))


def trajectory(tau: np.ndarray, T: int) -> np.ndarray:
    """p_tau, a known function of the step tau = 1..T: smooth drifts and a fast oscillation, all within [-1, 1]."""
    u = np.asarray(tau, dtype=np.float64)[..., None] / T
    return np.concatenate([np.sin(3 * u), u ** 2, np.exp(-4 * u), 0.1 * np.cos(40 * u), np.ones_like(u)], -1)


def power_average(T: int, gamma: float) -> np.ndarray:
    """The power EMA after T steps in closed form: sum over tau of (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1) p_tau."""
    tau = np.arange(1, T + 1, dtype=np.float64)
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
    return weights @ trajectory(tau, T)


def run_synthetic(T: int, every: int, sigma_rels=(0.05, 0.10)):
    """Track the power EMAs over the synthetic trajectory; snapshots (t, gamma, weights) every `every` steps."""
    model = Vector(5)
    tracked = PostHocEMA(model, list(sigma_rels))
    snaps = []
    for n in range(T):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(trajectory(n + 1, T)))
        tracked.update(model, n)
        if (n + 1) % every == 0:
            snaps += [(n + 1, g, e.model.weight.detach().numpy().copy()) for g, e in zip(tracked.gammas, tracked.emas)]
    return tracked, snaps


def test_tracked_power_emas_equal_their_closed_form():
    T = 600
    tracked, _ = run_synthetic(T, T)
    for gamma, ema in zip(tracked.gammas, tracked.emas):
        np.testing.assert_allclose(ema.model.weight.detach().numpy(), power_average(T, gamma), rtol=1e-12, atol=1e-14)


def test_reconstruction_of_a_synthetic_trajectory():
    """Snapshots every 100 of 2,000 steps. A tracked sigma_rel comes back exactly (to float64 rounding); widths
    between and around them come back within the bound |error| <= (relative profile error) ||p_target||
    ||p_tau||_L2 (Cauchy-Schwarz), and within 3e-4 (the trajectory spans [-1, 1]) for 0.06 <= sigma_rel <= 0.15."""
    T = 2000
    _, snaps = run_synthetic(T, 100)
    for sigma_rel in (0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.2):
        gamma = sigma_rel_to_gamma(sigma_rel)
        x, error = posthoc_coefficients([(t, g) for t, g, _ in snaps], T, gamma)
        rebuilt = sum(float(xi) * w for xi, (_, _, w) in zip(x, snaps))
        direct = power_average(T, gamma)
        diff = np.abs(rebuilt - direct)
        if sigma_rel in (0.05, 0.10):
            assert error < 1e-6
            np.testing.assert_allclose(rebuilt, direct, rtol=0, atol=1e-12)
            continue
        norm_theta = np.sqrt((trajectory(np.arange(1, T + 1), T) ** 2).sum(0))
        bound = error * power_profile_inner(T, gamma, T, gamma) ** 0.5 * norm_theta
        assert np.all(diff <= bound + 1e-12), (sigma_rel, diff, bound)
        if sigma_rel <= 0.15:
            assert diff.max() < 3e-4, (sigma_rel, diff.max())
    assert diff.max() > 1e-3  # 0.2 lies far outside the tracked widths: the check above is not vacuous


def _posthoc_config(data_dirs, *sets):
    return tiny_config(data_dirs, "run.steps=10", "optim.posthoc_ema=[0.05, 0.1]", "optim.posthoc_every=3",
                       "run.checkpoint_every=4", "run.keep_checkpoints=5", *sets)


def test_training_snapshots_reconstruction_and_resume(data_dirs, tmp_path):
    """A run saves snapshots at 3, 6, 9 and its last step 10; `lddpm ema` at a tracked width returns that EMA;
    a run stopped at step 7, given stale snapshots past its checkpoint (a killed attempt's, at 9 and 12) and
    resumed, ends with the uninterrupted run's snapshots bit for bit (and none at 12)."""
    config = _posthoc_config(data_dirs)
    train(config, tmp_path / "whole", progress=False)
    snaps = list_snapshots(tmp_path / "whole")
    assert [checkpoint_step(p) for p in snaps] == [3, 6, 9, 10]
    last = load_checkpoint(snaps[-1])
    assert last.meta["gammas"] == pytest.approx([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)])

    out = tmp_path / "ema-0.1.safetensors"
    assert main(["ema", str(tmp_path / "whole"), "--sigma-rel", "0.1", "--out", str(out)]) == 0
    rebuilt = load_checkpoint(out)
    assert rebuilt.meta["posthoc_ema"]["relative_profile_error"] < 1e-6
    tracked = last.load("ema1")
    for name, value in rebuilt.load("ema").items():
        torch.testing.assert_close(value, tracked[name], rtol=1e-5, atol=1e-6)
    raw = load_checkpoint(tmp_path / "whole").load("model")
    assert all(torch.equal(rebuilt.load("model")[k], raw[k]) for k in raw)
    pipeline = load_pipeline(out)  # a checkpoint like any other
    assert pipeline.step == 10
    assert all(torch.equal(pipeline.model.state_dict()[k], rebuilt.load("ema")[k]) for k in raw)

    # between the tracked widths: a genuine combination, with its profile error reported
    between = load_checkpoint(reconstruct_ema(tmp_path / "whole", 0.07, at_step=9))
    info = between.meta["posthoc_ema"]
    assert info["step"] == 9 and [s["step"] for s in info["snapshots"]] == [3, 3, 6, 6, 9, 9]
    assert "model" not in between.groups and 0 < info["relative_profile_error"] < 0.2

    train(config, tmp_path / "parts", progress=False, stop_at=7)
    assert [checkpoint_step(p) for p in list_snapshots(tmp_path / "parts")] == [3, 6]
    for stale in (snaps[2].name, "step_0000012.safetensors"):  # a killed longer attempt's, past the checkpoint
        shutil.copy(snaps[0], tmp_path / "parts" / "ema_snapshots" / stale)
    train(config, tmp_path / "parts", resume=True, progress=False)
    resumed = list_snapshots(tmp_path / "parts")
    assert [p.name for p in resumed] == [p.name for p in snaps]
    for a, b in zip(resumed, snaps):
        for group in ("ema0", "ema1"):
            ta, tb = load_checkpoint(a).load(group), load_checkpoint(b).load(group)
            assert all(torch.equal(ta[k], tb[k]) for k in tb), (a.name, group)


@pytest.mark.slow
def test_two_processes_save_the_snapshots_of_one(data_dirs, tmp_path, one_thread):
    """torchrun with 2 gloo processes (log-normal noise levels, EDM weights, post-hoc EMA): rank 0 writes the
    snapshots, and they equal those of 1 process with the same global batch (2 micro-batches)."""
    config = _posthoc_config(data_dirs, "run.steps=4", 'diffusion.timestep_sampling="lognormal"',
                             'diffusion.loss_weighting="edm"', 'diffusion.objective="v"')
    _torchrun(config, tmp_path, "train", "ddp")
    train(apply_overrides(config, ["optim.grad_accum=2"]), tmp_path / "one", progress=False)
    ddp, one = list_snapshots(tmp_path / "ddp"), list_snapshots(tmp_path / "one")
    assert [p.name for p in ddp] == [p.name for p in one] == ["step_0000003.safetensors", "step_0000004.safetensors"]
    for a, b in zip(ddp, one):
        for group in ("ema0", "ema1"):
            ta, tb = load_checkpoint(a).load(group), load_checkpoint(b).load(group)
            for key in tb:
                torch.testing.assert_close(ta[key], tb[key], atol=1e-5, rtol=1e-5)


def test_bad_input(data_dirs, tmp_path, capsys):
    with pytest.raises(LddpmError, match=r"optim.posthoc_ema = \[0.3\]"):
        validate(apply_overrides(config_from_preset("fashion-30min"), ["optim.posthoc_ema=[0.3]"]))
    with pytest.raises(LddpmError, match="optim.posthoc_every"):
        validate(apply_overrides(config_from_preset("fashion-30min"), ["optim.posthoc_every=0"]))
    train(tiny_config(data_dirs, "run.steps=1"), tmp_path / "plain", progress=False)
    for sigma_rel, message in (("0.1", "no post-hoc EMA snapshots"), ("0.5", "sigma_rel = 0.5 must lie in")):
        with pytest.raises(SystemExit) as exit_info:
            main(["ema", str(tmp_path / "plain"), "--sigma-rel", sigma_rel])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_ablation_sweeps_the_ema_only_at_the_steps_asked_and_reports_every_finished_one(tmp_path, monkeypatch):
    """benchmarks/edm_ablation.py: `--ema-steps` limits which steps are reconstructed and scored; evaluations
    finished earlier at other steps are still read into the report, and nothing is recomputed."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "edm_ablation.py"
    spec = importlib.util.spec_from_file_location("bench_edm_ablation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    commands = []

    def fake_run(command, fatal=True):
        commands.append(command)
        if "eval" in command:
            out = Path(command[command.index("--out") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"fid": 20.0 + len(commands), "kid": 0.01, "kid_std": 0.001}))
        return 0

    monkeypatch.setattr(bench, "run", fake_run)
    settings = argparse.Namespace(fid_n=8, dataset="fashion-mnist", reference_split="test", reference_n=8,
                                  sample_batch_size=4, seed=0, bf16="auto", device="cpu", cache_dir=None,
                                  classifier=None, data_root=None)
    cell = argparse.Namespace(at_step=10, sampler="dpm++2m", steps=5)
    study = argparse.Namespace(settings=settings, cells=[cell])
    (tmp_path / "study" / "runs" / "r" / "ema_snapshots").mkdir(parents=True)
    out = tmp_path / "ema"

    first = bench.ema_sweep(study, tmp_path / "study", out, ["r"], [0.05, 0.1], [10, 30], compute={10})
    assert [(r["at_step"], r["sigma_rel"]) for r in first] == [(10, 0.05), (10, 0.1)]
    assert sum("eval" in c for c in commands) == 2 and all("30" not in c for c in commands)
    second = bench.ema_sweep(study, tmp_path / "study", out, ["r"], [0.05, 0.1], [10, 30], compute={30})
    assert [(r["at_step"], r["sigma_rel"]) for r in second] == [(10, 0.05), (10, 0.1), (30, 0.05), (30, 0.1)]
    assert [r["fid"] for r in second[:2]] == [r["fid"] for r in first] and sum("eval" in c for c in commands) == 4
    assert bench.ema_sweep(study, tmp_path / "study", out, ["r"], [0.05, 0.1], [10, 30], compute=set()) == second

    # a fresh checkout: the snapshots and the reconstructed weights are not committed, the evaluations are; the
    # finished rows stay in the report, their profile error taken from the earlier report, and nothing is computed
    (tmp_path / "study" / "runs" / "r" / "ema_snapshots").rmdir()
    earlier = [dict(r, relative_profile_error=0.01 * i) for i, r in enumerate(second)]
    calls = len(commands)
    fresh = bench.ema_sweep(study, tmp_path / "study", out, ["r"], [0.05, 0.1], [10, 30], compute={10, 30},
                            earlier=earlier)
    assert fresh == earlier and len(commands) == calls
    assert bench.ema_sweep(study, tmp_path / "study", out, ["r"], [0.05, 0.1, 0.2], [10, 30], compute={10, 30},
                           earlier=earlier) == earlier  # a width never scored: nothing to report, nothing to compute
