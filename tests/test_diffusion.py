"""GaussianDiffusion: forward process, parameterizations, loss weightings, learned variance, t sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lddpm.diffusion import (GaussianDiffusion, LossSecondMomentSampler, discretized_gaussian_log_likelihood,
                             normal_kl)
from lddpm.errors import LddpmError
from lddpm.schedule import NoiseSchedule


def _diff(objective="eps", T=1000, name="linear", **kw) -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name(name, T), objective=objective, **kw)


def test_q_sample_statistics():
    """x_t ~ N(sqrt(abar) x0, (1 - abar) I) (Ho et al. 2020, Eq. 4), from many draws."""
    d = _diff()
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.8, dtype=torch.float64)
    for t in (0, 100, 500, 999):
        tt = torch.full((n,), t)
        xt = d.q_sample(x0, tt, torch.randn_like(x0))
        a = d.schedule.alphas_cumprod[t].item()
        se = math.sqrt((1 - a) / n)
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.8, abs=5 * se)
        assert xt.var().item() == pytest.approx(1 - a, rel=0.02)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_parameterizations_round_trip(objective):
    d = _diff(objective, name="cosine")
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = d.q_sample(x0, t, eps)
    out = d.output_from_x0_eps(x0, eps, t)
    x0_hat, eps_hat = d.predict_x0_eps(out, xt, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    a = d.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0                 # Salimans & Ho 2022
    torch.testing.assert_close(d.v_target(x0, eps, t), v)
    if objective == "v":
        torch.testing.assert_close(out, v)


def test_zero_terminal_snr_v_round_trip_at_last_step():
    s = NoiseSchedule.from_name("linear", 1000, rescale_zero_terminal_snr=True)
    d = GaussianDiffusion(s, objective="v")
    x0, eps = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([999, 999])
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(xt, eps)                      # pure noise at the last step
    x0_hat, eps_hat = d.predict_x0_eps(d.v_target(x0, eps, t), xt, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weights(objective):
    """Hang et al. 2023: eps min(snr,g)/snr, x0 min(snr,g), v min(snr,g)/(snr+1)."""
    g = 5.0
    d = _diff(objective, loss_weighting="min_snr", min_snr_gamma=g)
    t = torch.arange(0, 1000, 37)
    snr = d.schedule.snr[t].numpy()
    expected = {"eps": np.minimum(snr, g) / snr, "x0": np.minimum(snr, g),
                "v": np.minimum(snr, g) / (snr + 1)}[objective]
    np.testing.assert_allclose(d.loss_weight(t).numpy(), expected, rtol=1e-12)
    assert (_diff(objective).loss_weight(t) == 1).all()


def test_min_snr_weights_finite_at_zero_snr():
    s = NoiseSchedule.from_name("cosine", 100, rescale_zero_terminal_snr=True)
    t = torch.tensor([99])
    assert GaussianDiffusion(s, "v", loss_weighting="min_snr").loss_weight(t).item() == 0.0
    assert GaussianDiffusion(s, "x0", loss_weighting="min_snr").loss_weight(t).item() == 0.0


def test_min_snr_weighted_loss_is_the_same_for_every_objective():
    """With weights as above, the weighted loss of one x0 prediction is min(snr, g) ||x0 - x0_hat||^2
    whatever space the network predicts in (||d eps||^2 = snr ||d x0||^2, ||d v||^2 = (snr+1) ||d x0||^2)."""
    x0 = torch.rand(8, 2, 4, 4, dtype=torch.float64) * 2 - 1
    results = {}
    for objective in ("eps", "x0", "v"):
        d = _diff(objective, loss_weighting="min_snr")

        def model(xt, t, d=d):
            x0_hat = torch.tanh(xt)                             # the same x0 guess for every objective
            return d.output_from_x0_eps(x0_hat, d.eps_from_x0(x0_hat, xt, t), t)

        out = d.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
        results[objective] = out["loss"]
    torch.testing.assert_close(results["eps"], results["x0"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(results["v"], results["x0"], rtol=1e-8, atol=1e-10)


def test_training_losses_reproducible_and_correct_target():
    d = _diff("v")
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1

    def model(xt, t, y=None):
        return 0.5 * xt

    a = d.training_losses(model, x0, generator=torch.Generator().manual_seed(7))
    b = d.training_losses(model, x0, generator=torch.Generator().manual_seed(7))
    for k in ("loss", "t", "mse"):
        assert torch.equal(a[k], b[k])
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (5,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(a["t"], t)
    xt = d.q_sample(x0, t, noise)
    expected = ((0.5 * xt - d.v_target(x0, noise, t)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(a["mse"], expected)
    torch.testing.assert_close(a["loss"], expected)
    assert set(a) >= {"loss", "loss_unweighted", "t", "mse"} and "vlb" not in a


def test_training_passes_labels():
    d = _diff()
    seen = {}

    def model(xt, t, y=None):
        seen["y"] = y
        return torch.zeros_like(xt)

    d.training_losses(model, torch.zeros(3, 1, 2, 2), y=torch.tensor([1, 2, 3]))
    assert seen["y"].tolist() == [1, 2, 3]


def test_normal_kl():
    m1, m2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    assert normal_kl(m1, lv1, m1, lv1).abs().max().item() < 1e-12
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -1.0), (-0.9, -5.0), (1.3, 0.5), (128 / 255 * 2 - 1, -9.0)])
def test_discretized_log_likelihood_sums_to_one(mean, log_scale):
    """The 256 bins of 8-bit data partition the real line (Ho et al. 2020, Eq. 13)."""
    x = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((lp <= 0).all())
    # a narrow Gaussian centred on a bin puts (almost) all mass in it
    if log_scale == -9.0:
        assert lp[128].exp().item() == pytest.approx(1.0, abs=1e-6)


def test_learned_variance_interpolates_log_variance():
    """Nichol & Dhariwal 2021 Eq. 15: v = -1 -> beta_tilde (clipped), v = +1 -> beta, v = 0 -> geometric mean."""
    d = _diff(learned_variance=True, T=100, name="cosine")
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 99])
    s = d.schedule
    lo = s.posterior_log_variance_clipped[t].view(-1, 1, 1, 1)
    hi = torch.log(s.betas[t]).view(-1, 1, 1, 1)
    for v, expected in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        lv = d.p_mean_variance(out, x, t)["log_variance"]
        torch.testing.assert_close(lv, expected.expand_as(lv))
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


def test_fixed_variances_in_p_mean_variance():
    d = _diff(T=50)
    x, t = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 7])
    s = d.schedule
    out = torch.zeros_like(x)
    small = d.p_mean_variance(out, x, t, variance="small")["variance"][:, 0, 0, 0]
    large = d.p_mean_variance(out, x, t, variance="large")["variance"][:, 0, 0, 0]
    torch.testing.assert_close(small, s.posterior_variance[[1, 7]])
    torch.testing.assert_close(large, torch.stack([s.posterior_variance[1], s.betas[7]]))


def test_vlb_terms_zero_for_exact_model_and_nll_at_t0():
    """An exact x0 prediction with the true posterior variance has KL 0 for t > 1; t = 0 gives the
    decoder NLL in bits/dim."""
    d = _diff("x0", learned_variance=True, T=100)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4)).double() / 255) * 2 - 1
    t = torch.tensor([0, 5, 60])
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    out = torch.cat([x0, -torch.ones_like(x0)], 1)            # v = -1: beta_tilde (clipped)
    vlb = d.vlb_terms(out, x0, xt, t)
    assert vlb[1:].abs().max().item() < 1e-9
    pm = d.p_mean_variance(out, xt, t)
    nll = -discretized_gaussian_log_likelihood(x0, pm["mean"], 0.5 * pm["log_variance"])
    assert vlb[0].item() == pytest.approx(nll[0].mean().item() / math.log(2), rel=1e-9)


def test_hybrid_loss_stops_gradient_into_the_mean():
    """L_hybrid = L_simple + 0.001 * T * L_t; the VLB term trains only the variance channels."""
    d = _diff(learned_variance=True, T=200)
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    param = torch.zeros(4, 2, 4, 4, requires_grad=True)

    def model(xt, t, y=None):
        return param + 0.1 * torch.cat([xt, xt], 1)

    out = d.training_losses(model, x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], out["mse"] + 0.001 * 200 * out["vlb"])
    out["vlb"].sum().backward()
    assert param.grad[:, :1].abs().max().item() == 0.0
    assert param.grad[:, 1:].abs().max().item() > 0.0


def test_adaptive_sampler_probabilities():
    T = 5
    smp = LossSecondMomentSampler(T, history=3, uniform_prob=0.001)
    torch.testing.assert_close(smp.probs(), torch.full((T,), 0.2, dtype=torch.float64))
    losses = {0: [1, 1, 1], 1: [2, 2, 2], 2: [9, 3, 4, 5], 3: [1, 1, 1], 4: [0.5, 0.5, 0.5]}
    for t, ls in losses.items():
        smp.update(torch.tensor([t] * len(ls)), torch.tensor(ls, dtype=torch.float64))
    assert smp.loss_history[2].tolist() == [3, 4, 5]          # keeps only the last `history` losses
    w = np.array([1, 2, math.sqrt((9 + 16 + 25) / 3), 1, 0.5])
    p = 0.999 * w / w.sum() + 0.001 / T
    np.testing.assert_allclose(smp.probs().numpy(), p, rtol=1e-12)
    t, weights = smp.sample(200_000, torch.Generator().manual_seed(0))
    freq = np.bincount(t.numpy(), minlength=T) / 200_000
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 200_000).max())
    np.testing.assert_allclose(weights.numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)


def test_adaptive_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _diff(T=10, timestep_sampling="adaptive")
    for i in range(20):
        d.update_timestep_sampler(torch.arange(10), torch.rand(10) * (i + 1))
    assert d.sampler.warmed_up()
    save_file(d.state_dict(), str(tmp_path / "s.safetensors"))
    e = _diff(T=10, timestep_sampling="adaptive")
    e.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    torch.testing.assert_close(e.sampler.probs(), d.sampler.probs())
    x0 = torch.zeros(16, 1, 2, 2)

    def model(xt, t):
        return xt

    a = d.training_losses(model, x0, generator=torch.Generator().manual_seed(1))
    b = e.training_losses(model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["loss"], b["loss"])
    p = d.sampler.probs()[a["t"]]
    torch.testing.assert_close(a["loss"], a["loss_unweighted"] / (10 * p).float())
    assert _diff(T=10).state_dict() == {}


@pytest.mark.parametrize("kwargs,match", [
    (dict(objective="score"), "objective 'score'.*eps, x0, v"),
    (dict(loss_weighting="p2"), "loss_weighting 'p2'.*uniform, min_snr"),
    (dict(timestep_sampling="logit_normal"), "timestep_sampling 'logit_normal'.*adaptive, lognormal"),
    (dict(p_std=0.0), "p_std"),
    (dict(min_snr_gamma=0.0), "min_snr_gamma"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(LddpmError, match=match):
        GaussianDiffusion(NoiseSchedule.from_name("linear", 10), **kwargs)


def test_eps_objective_rejects_zero_terminal_snr():
    with pytest.raises(LddpmError, match="zero-terminal-SNR.*'v'"):
        GaussianDiffusion(NoiseSchedule.from_name("linear", 10, rescale_zero_terminal_snr=True), objective="eps")


def test_wrong_output_channels():
    d = _diff(learned_variance=True, T=10)
    with pytest.raises(LddpmError, match="has 3 channels, expected 6"):
        d.predict_x0_eps(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.tensor([1]))
