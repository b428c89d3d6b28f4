"""Where the loss weight goes: EDM's log-normal noise levels on the VP timesteps, EDM's weighting in every objective,
and the share of the loss weight per sigma band (issue 28, section 2; Karras et al. 2022)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from lddpm.config import DiffusionConfig, apply_overrides, config_from_preset, validate
from lddpm.diffusion import GaussianDiffusion, build_diffusion, loss_weight_shares
from lddpm.errors import LddpmError
from lddpm.schedule import NoiseSchedule
from lddpm.train.utils import resume_differences

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import data_dirs, tiny_config  # noqa: E402,F401  (the synthetic IDX data fixture)


def _cosine(objective="v", **kw) -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), objective=objective, **kw)


def _sigmas(d: GaussianDiffusion) -> np.ndarray:
    abar = d.schedule.alphas_cumprod.numpy()
    return np.sqrt((1 - abar) / abar)


def test_lognormal_sampler_picks_the_timestep_nearest_in_log_sigma():
    """The same generator's draws z give ln sigma = P_mean + P_std z; each t is the argmin of |ln sigma_t - that|."""
    d = _cosine(timestep_sampling="lognormal", p_mean=-0.6, p_std=1.4)
    t, weights = d.sample_timesteps(4000, torch.Generator().manual_seed(7))
    z = torch.randn(4000, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    wanted = -0.6 + 1.4 * z
    nearest = np.abs(np.log(_sigmas(d))[None, :] - wanted[:, None]).argmin(1)
    np.testing.assert_array_equal(t.numpy(), nearest)
    assert (weights == 1).all()


def test_lognormal_timesteps_follow_the_discretised_log_normal():
    """200k draws at a fixed seed against the closed form computed here from the schedule (scipy's normal CDF):
    every band's frequency within 5 standard errors, and the quantiles of ln sigma_t within the local cell width
    plus sampling error of the normal's quantiles."""
    p_mean, p_std, n = -1.2, 1.2, 200_000
    d = _cosine(timestep_sampling="lognormal", p_mean=p_mean, p_std=p_std)
    t = d.sample_timesteps(n, torch.Generator().manual_seed(0))[0].numpy()
    ls = np.log(_sigmas(d))
    edges = (ls[1:] + ls[:-1]) / 2
    cdf = np.concatenate([[0.0], norm.cdf((edges - p_mean) / p_std), [1.0]])
    probs = np.diff(cdf)
    np.testing.assert_allclose(d.timestep_probs().numpy(), probs, atol=1e-12)
    # chunks of 50 timesteps: enough mass per chunk for a sharp check
    counts = np.bincount(t, minlength=1000).reshape(20, 50).sum(1) / n
    expected = probs.reshape(20, 50).sum(1)
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        got = np.quantile(ls[t], q)
        want = p_mean + p_std * norm.ppf(q)
        half_cell = np.abs(np.diff(ls))[np.clip(np.searchsorted(ls, want), 1, 998)] / 2 + 1e-3
        se = p_std * math.sqrt(q * (1 - q) / n) / norm.pdf(norm.ppf(q))
        assert abs(got - want) <= half_cell + 4 * se, (q, got, want)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_edm_weights_equal_the_closed_form(objective):
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0 error; ||d x0||^2 = sigma^2 ||d eps||^2 =
    sigma^2 / (1 + sigma^2) ||d v||^2 (VP: abar = 1 / (1 + sigma^2))."""
    sd = 0.87
    d = _cosine(objective, loss_weighting="edm", sigma_data=sd)
    t = torch.arange(0, 1000, 7)
    sigma = _sigmas(d)[t.numpy()]
    lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    expected = {"x0": lam, "eps": lam * sigma ** 2, "v": lam * sigma ** 2 / (1 + sigma ** 2)}[objective]
    np.testing.assert_allclose(d.loss_weight(t).numpy(), expected, rtol=1e-9)


def test_edm_weighted_loss_is_lambda_times_the_x0_error_in_every_objective():
    """One x0 guess, three objectives: the weighted per-sample loss is lambda(sigma_t) ||x0 - x0_hat||^2 each time."""
    x0 = torch.rand(16, 1, 4, 4, dtype=torch.float64) * 2 - 1
    sd = 0.6
    for objective in ("eps", "x0", "v"):
        d = _cosine(objective, loss_weighting="edm", sigma_data=sd, timestep_sampling="lognormal")

        def model(xt, t, d=d):
            x0_hat = torch.tanh(xt)
            return d.output_from_x0_eps(x0_hat, d.eps_from_x0(x0_hat, xt, t), t)

        out = d.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
        t = out["t"]
        gen = torch.Generator().manual_seed(3)  # the same draws as training_losses: t, then the noise
        assert torch.equal(d.sample_timesteps(16, gen)[0], t)
        xt = d.q_sample(x0, t, torch.randn(tuple(x0.shape), generator=gen, dtype=torch.float64))
        sigma = torch.from_numpy(_sigmas(d))[t]
        lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        expected = lam * ((torch.tanh(xt) - x0) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(out["loss"], expected, rtol=1e-7, atol=1e-10)


def test_band_shares_of_the_recipe_match_the_issue():
    """Issue 28: cosine + uniform t + min-SNR-5 on v puts about 1.5% of the weight below sigma = 0.17 (t <= 99);
    uniform v weights put 10% there and 30% above sigma = 2; EDM's log-normal (P_mean -1.2, P_std 1.2, unit
    F-space weight) 32%, and 17% at P_mean -0.6."""
    recipe = loss_weight_shares(_cosine(loss_weighting="min_snr", min_snr_gamma=5.0))
    assert [r["band"] for r in recipe] == ["sigma < 0.17", "0.17 <= sigma < 0.5", "0.5 <= sigma < 2", "sigma >= 2"]
    assert 0.014 < recipe[0]["share"] < 0.017
    assert (recipe[0]["t_first"], recipe[0]["t_last"]) == (0, 99)   # sigma_99 = 0.1694
    assert sum(r["share"] for r in recipe) == pytest.approx(1.0)
    uniform = loss_weight_shares(_cosine())
    assert uniform[0]["share"] == pytest.approx(0.099, abs=0.002) and uniform[3]["share"] == pytest.approx(0.30, abs=0.01)
    edm = loss_weight_shares(_cosine(loss_weighting="edm", sigma_data=1.0, timestep_sampling="lognormal"))
    assert edm[0]["share"] == pytest.approx(norm.cdf((math.log(0.17) + 1.2) / 1.2), abs=0.005)   # 0.317
    shifted = loss_weight_shares(_cosine(loss_weighting="edm", sigma_data=1.0, timestep_sampling="lognormal",
                                         p_mean=-0.6))
    assert 0.16 < shifted[0]["share"] < 0.175
    # min-SNR is one weighting in three objectives: the shares do not depend on what the network predicts
    for objective in ("eps", "x0"):
        other = loss_weight_shares(_cosine(objective, loss_weighting="min_snr"))
        assert [r["share"] for r in other] == pytest.approx([r["share"] for r in recipe], rel=1e-9)


def test_band_shares_equal_a_monte_carlo_of_the_training_draws():
    """The exact shares against 100k timesteps drawn by the training sampler, weighted by the v-scale weight."""
    for kw in (dict(loss_weighting="min_snr", min_snr_gamma=20.0),
               dict(loss_weighting="edm", sigma_data=0.87, timestep_sampling="lognormal", p_mean=-0.65)):
        d = _cosine(**kw)
        t = d.sample_timesteps(100_000, torch.Generator().manual_seed(1))[0]
        w = d.v_scale_weight(t).numpy()
        sigma = _sigmas(d)[t.numpy()]
        bands = np.digitize(sigma, [0.17, 0.5, 2.0])
        mc = np.array([w[bands == i].sum() for i in range(4)]) / w.sum()
        exact = np.array([r["share"] for r in loss_weight_shares(d)])
        np.testing.assert_allclose(mc, exact, atol=0.006)


def test_config_fields_build_the_diffusion_and_are_checked():
    config = apply_overrides(config_from_preset("fashion-30min"), [
        'diffusion.timestep_sampling="lognormal"', 'diffusion.loss_weighting="edm"', "diffusion.p_mean=-0.65",
        "diffusion.p_std=1.2", "diffusion.sigma_data=0.87"])
    d = build_diffusion(validate(config).diffusion)
    assert (d.timestep_sampling, d.loss_weighting, d.p_mean, d.p_std, d.sigma_data) == ("lognormal", "edm", -0.65,
                                                                                         1.2, 0.87)
    for bad, message in (("diffusion.p_std=0.0", "p_std"), ("diffusion.sigma_data=-1.0", "sigma_data")):
        with pytest.raises(LddpmError, match=message):
            validate(apply_overrides(config, [bad]))
    # a run saved before these settings existed resumes: missing keys count as their defaults
    old = config_from_preset("fashion-30min").to_dict()
    for key in ("p_mean", "p_std", "sigma_data"):
        del old["diffusion"][key]
    assert resume_differences(old, config_from_preset("fashion-30min").to_dict()) == []
    assert resume_differences(old, config.to_dict()) == ["diffusion.loss_weighting", "diffusion.p_mean",
                                                         "diffusion.sigma_data", "diffusion.timestep_sampling"]
    assert asdict(DiffusionConfig())["sigma_data"] == 0.5


def test_training_writes_the_band_shares(data_dirs, tmp_path, capsys):
    from lddpm.checkpoint import load_checkpoint
    from lddpm.train import train

    config = tiny_config(data_dirs, "run.steps=2", 'diffusion.schedule="cosine"', 'diffusion.objective="v"',
                         'diffusion.timestep_sampling="lognormal"', 'diffusion.loss_weighting="edm"',
                         "diffusion.sigma_data=0.87")
    train(config, tmp_path / "run", progress=True)
    written = json.loads((tmp_path / "run" / "loss_weights.json").read_text())
    expected = loss_weight_shares(build_diffusion(config.diffusion))
    assert written["bands"] == expected
    assert load_checkpoint(tmp_path / "run").meta["loss_weights"] == expected
    assert f"sigma < 0.17 {100 * expected[0]['share']:.1f}%" in capsys.readouterr().out


def test_edm_study_changes_only_what_each_row_says():
    """configs/study-edm.toml: each row is fashion-30min with its noise distribution / weighting (and seed); the
    step-1,400 checkpoint and snapshot are kept for the 10-minute cells; the shares its comments quote hold."""
    from lddpm.study import load_study
    from lddpm.study.backend import StudyBackend

    study = load_study(Path(__file__).resolve().parents[1] / "configs" / "study-edm.toml")
    backend = StudyBackend(progress=False)
    configs = {name: backend.run_config(run, Path("/nonexistent") / name, study, {}) for name, run in study.runs.items()}
    recipe = config_from_preset("fashion-30min")
    expected_low = {"recipe": (0.0155, 0.0005), "edm12": (0.298, 0.005), "edm065": (0.159, 0.005),
                    "minsnr20": (0.049, 0.001), "cooldown": (0.049, 0.001)}
    steps = sorted({c.at_step for c in study.cells if c.at_step is not None})
    assert steps == [1400, 4200]
    for name, config in configs.items():
        variant, seed = name.rsplit("-s", 1)
        assert config.run.seed == int(seed) and config.run.steps == 4200
        assert all(s % config.run.checkpoint_every == 0 for s in steps)
        assert config.run.keep_checkpoints >= 4200 // config.run.checkpoint_every
        if variant != "cooldown":  # the cool-down rows came later, for FID only (no EMA-length sweep)
            assert all(s % config.optim.posthoc_every == 0 for s in steps) and config.optim.posthoc_ema == [0.05, 0.1]
        same = {**asdict(config.model), **asdict(config.data)} == {**asdict(recipe.model), **asdict(recipe.data)}
        assert same and config.optim.lr == recipe.optim.lr and config.optim.ema_decay == recipe.optim.ema_decay
        low, tol = expected_low[variant]
        assert loss_weight_shares(build_diffusion(config.diffusion))[0]["share"] == pytest.approx(low, abs=tol)
    # the recipe rows are the preset as it was (min-SNR-5); the preset is now the min-SNR-20 row with the cool-down
    assert asdict(configs["recipe-s0"].diffusion) == {**asdict(recipe.diffusion), "min_snr_gamma": 5.0}
    assert asdict(configs["minsnr20-s0"].diffusion) == asdict(recipe.diffusion)
    # the cool-down rows are min-SNR-20 with the learning rate falling to zero over the last 20% of the run
    assert asdict(configs["cooldown-s1"].diffusion) == asdict(configs["minsnr20-s1"].diffusion)
    assert [configs[n].optim.cooldown for n in ("cooldown-s0", "minsnr20-s0")] == [recipe.optim.cooldown, 0.0] == [0.2, 0.0]
    assert configs["edm065-s0"].diffusion.p_mean == pytest.approx(-1.2 + math.log(0.87 / 0.5), abs=0.01)


def test_ten_minute_edm_study_is_the_first_1400_steps_of_the_thirty_minute_one():
    """configs/study-edm-10min.toml: the same runs as study-edm.toml but trained 1,400 steps, scored at 1,400 (the
    first 1,400 steps of the long runs, but for the cool-down rows, whose learning rate follows their own length)."""
    from lddpm.study import load_study
    from lddpm.study.backend import StudyBackend

    folder = Path(__file__).resolve().parents[1] / "configs"
    long, short = load_study(folder / "study-edm.toml"), load_study(folder / "study-edm-10min.toml")
    backend = StudyBackend(progress=False)
    # the cool-down screening rows (10 minutes only): the seed-0 cool-down row with one optim setting changed
    # (bs32-s0: half the batch for twice the steps, the same images; its cell is at step 2,800)
    screening = {"cooldown40-s0": {"cooldown": 0.4}, "lr2e3-s0": {"lr": 0.002}, "sqrt-s0": {"cooldown_shape": "sqrt"},
                 "bs32-s0": {"batch_size": 32, "ema_decay": 0.9995}}
    assert list(short.runs) == list(long.runs) + list(screening)
    assert {c.at_step for c in short.cells if c.at_step is not None} == {1400, 2800}
    for name in long.runs:
        a = asdict(backend.run_config(long.runs[name], Path("/nonexistent") / name, long, {}))
        b = asdict(backend.run_config(short.runs[name], Path("/nonexistent") / name, short, {}))
        assert b["run"]["steps"] == 1400 and 1400 % b["run"]["checkpoint_every"] == 0
        for config in (a, b):
            config["run"].pop("steps"), config["run"].pop("keep_checkpoints")
        assert a == b, name
    base = asdict(backend.run_config(short.runs["cooldown-s0"], Path("/nonexistent"), short, {}))
    for name, change in screening.items():
        config = asdict(backend.run_config(short.runs[name], Path("/nonexistent"), short, {}))
        assert config["optim"] == {**base["optim"], **change}, name
        steps = 1400 * 64 // config["optim"]["batch_size"]
        assert config["run"] == {**base["run"], "steps": steps, "checkpoint_every": steps}, name
        assert {k: v for k, v in config.items() if k not in ("optim", "run")} == {
            k: v for k, v in base.items() if k not in ("optim", "run")}
