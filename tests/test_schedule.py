"""NoiseSchedule: closed forms recomputed independently, invariants, posterior by Bayes, spacings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lddpm.errors import LddpmError
from lddpm.schedule import SCHEDULES, SPACINGS, NoiseSchedule


def _betas(name, T, **kw):
    return NoiseSchedule.from_name(name, T, **kw).betas.numpy()


@pytest.mark.parametrize("T", [1000, 250, 50])
def test_linear_closed_form_with_rescaling(T):
    """Ho et al. 2020 betas 1e-4..0.02 at T = 1000, rescaled by 1000/T (Nichol & Dhariwal 2021)."""
    scale = 1000 / T
    expected = [scale * 1e-4 + i * (scale * 0.02 - scale * 1e-4) / (T - 1) for i in range(T)]
    np.testing.assert_allclose(_betas("linear", T), expected, rtol=1e-12)


def test_linear_explicit_range_and_clipping():
    np.testing.assert_allclose(_betas("linear", 5, beta_start=0.1, beta_end=0.5), [0.1, 0.2, 0.3, 0.4, 0.5])
    b = _betas("linear", 10)                      # scale 100: end 2.0 -> clipped at 0.999
    assert b.max() == 0.999 and b[0] == pytest.approx(0.01)


def test_scaled_linear_closed_form():
    T = 1000
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    expected = [(lo + i * (hi - lo) / (T - 1)) ** 2 for i in range(T)]
    np.testing.assert_allclose(_betas("scaled_linear", T), expected, rtol=1e-12)


def _cosine_abar(u, s=0.008):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_closed_form(T):
    """Nichol & Dhariwal 2021 Eq. 17; abar_t = f(t+1)/f(0) wherever the 0.999 clip is inactive."""
    expected = [min(1 - _cosine_abar((i + 1) / T) / _cosine_abar(i / T), 0.999) for i in range(T)]
    s = NoiseSchedule.from_name("cosine", T)
    np.testing.assert_allclose(s.betas.numpy(), expected, rtol=1e-10)
    assert s.betas[-1].item() == 0.999                    # the clip acts at the end
    abar = [_cosine_abar((i + 1) / T) / _cosine_abar(0) for i in range(T - 1)]
    np.testing.assert_allclose(s.alphas_cumprod[:-1].numpy(), abar, rtol=1e-9)


def _sigmoid_gamma(u, start=-3.0, end=3.0, tau=1.0, clip_min=1e-9):
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    v = (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    return min(max(v, clip_min), 1.0)


@pytest.mark.parametrize("params", [{}, {"start": 0.0, "end": 3.0, "tau": 0.7}])
def test_sigmoid_closed_form(params):
    """Chen 2023 Algorithm 1: abar(u) is a normalized sigmoid; alphas_cumprod[i] = gamma((i+1)/T)."""
    T = 500
    s = NoiseSchedule.from_name("sigmoid", T, **params)
    gam = [_sigmoid_gamma(i / T, **params) for i in range(T + 1)]
    expected = [min(1 - gam[i + 1] / gam[i], 0.999) for i in range(T)]
    np.testing.assert_allclose(s.betas.numpy(), expected, rtol=1e-10)
    unclipped = np.array(expected) < 0.999
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[unclipped], np.array(gam[1:])[unclipped], rtol=1e-9)


def test_sigmoid_beta_closed_form():
    """diffusers' "sigmoid": a sigmoid in beta (not in abar)."""
    T = 300
    z = [-6 + 12 * i / (T - 1) for i in range(T)]
    expected = [1 / (1 + math.exp(-zi)) * (0.02 - 1e-4) + 1e-4 for zi in z]
    np.testing.assert_allclose(_betas("sigmoid_beta", T), expected, rtol=1e-12)
    np.testing.assert_allclose(_betas("sigmoid_beta", T, beta_start=1e-7, beta_end=2e-3),
                               [1 / (1 + math.exp(-zi)) * (2e-3 - 1e-7) + 1e-7 for zi in z], rtol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [2, 3, 20, 1000])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name, T):
    ac = NoiseSchedule.from_name(name, T).alphas_cumprod
    assert ac.dtype == torch.float64 and len(ac) == T
    assert bool((ac > 0).all() and (ac < 1).all() and (ac[1:] < ac[:-1]).all())


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr(name):
    """Lin et al. 2024 Algorithm 1: sqrt(abar) shifted/scaled so the last is exactly 0, the first unchanged."""
    base = NoiseSchedule.from_name(name, 1000)
    z = NoiseSchedule.from_name(name, 1000, rescale_zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0 and z.snr[-1].item() == 0.0 and z.betas[-1].item() == 1.0
    assert z.log_snr[-1].item() == -math.inf
    sb = base.sqrt_alphas_cumprod.numpy()
    expected = (sb - sb[-1]) * sb[0] / (sb[0] - sb[-1])
    np.testing.assert_allclose(z.sqrt_alphas_cumprod.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert bool((z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all())


def test_derived_quantities():
    s = NoiseSchedule.from_name("cosine", 200)
    ac = s.alphas_cumprod.numpy()
    np.testing.assert_allclose(ac, np.cumprod(1 - s.betas.numpy()), rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), np.concatenate([[1.0], ac[:-1]]))
    np.testing.assert_allclose(s.snr.numpy(), ac / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(s.log_snr.numpy(), np.log(ac / (1 - ac)), rtol=1e-10, atol=1e-12)
    pv = s.posterior_variance.numpy()
    assert pv[0] == 0.0
    np.testing.assert_allclose(s.posterior_log_variance_clipped.numpy(),
                               np.log(np.concatenate([[pv[1]], pv[1:]])), rtol=1e-12)
    for name in ("betas", "alphas", "alphas_cumprod", "snr", "posterior_mean_coef1", "posterior_variance"):
        assert getattr(s, name).dtype == torch.float64


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_numerical_bayes(t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), integrated on a grid."""
    s = NoiseSchedule.from_name("linear", 1000)
    x0, xt = 0.7, -0.4
    beta, acp = s.betas[t].item(), s.alphas_cumprod_prev[t].item()
    grid = np.linspace(-3.0, 3.0, 1_200_001)     # covers both factors; step 5e-6 << posterior std
    log_p = (-(xt - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta)
             - (grid - math.sqrt(acp) * x0) ** 2 / (2 * (1 - acp)))
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    assert s.posterior_mean_coef1[t].item() * x0 + s.posterior_mean_coef2[t].item() * xt == pytest.approx(mean, abs=1e-7)
    assert s.posterior_variance[t].item() == pytest.approx(var, rel=1e-4)


def test_timesteps_examples():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.timesteps(10, "leading").tolist() == list(range(900, -1, -100))
    assert s.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert s.timesteps(10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # DDIM code (Song et al. 2021), CIFAR-10 "quadratic": int((linspace(0, sqrt(0.8 T), S))^2)
    expected = sorted({int(v) for v in np.linspace(0, np.sqrt(800), 10) ** 2}, reverse=True)
    assert s.timesteps(10, "quadratic").tolist() == expected == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert s.timesteps(3, "trailing").tolist() == [999, 666, 332]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T,S", [(1000, 1), (1000, 37), (1000, 1000), (7, 3), (2, 2)])
def test_timesteps_descending_in_range(spacing, T, S):
    ts = NoiseSchedule.from_name("linear", T).timesteps(S, spacing)
    assert ts.dtype == torch.long and ts.ndim == 1
    assert bool((ts[1:] < ts[:-1]).all()) and 0 <= ts.min() and ts.max() < T
    if spacing != "quadratic":
        assert len(ts) == S
    if S == T and spacing != "quadratic":
        assert ts.tolist() == list(range(T - 1, -1, -1))


def test_quadratic_drops_duplicates():
    ts = NoiseSchedule.from_name("linear", 1000).timesteps(100, "quadratic")
    raw = (np.linspace(0, np.sqrt(800), 100) ** 2).astype(int)
    assert len(ts) == len(set(raw.tolist())) < 100


def test_respace_keeps_alphas_cumprod():
    s = NoiseSchedule.from_name("cosine", 1000)
    kept = s.timesteps(25, "trailing")
    r = s.respace(kept)
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), s.alphas_cumprod[kept.flip(0)].numpy(), rtol=1e-9)
    full = s.respace(range(1000))
    np.testing.assert_allclose(full.betas.numpy(), s.betas.numpy(), rtol=1e-9)


@pytest.mark.parametrize("call,match", [
    (lambda: NoiseSchedule.from_name("quadratic"), "unknown noise schedule 'quadratic'.*cosine"),
    (lambda: NoiseSchedule.from_name("linear", 1), "num_timesteps must be an integer >= 2, got 1"),
    (lambda: NoiseSchedule.from_name("cosine", 100, beta_end=0.1), "beta_end.*allowed"),
    (lambda: NoiseSchedule.from_name("linear", 100).timesteps(101, "leading"), r"\[1, 100\].*101"),
    (lambda: NoiseSchedule.from_name("linear", 100).timesteps(0, "leading"), r"\[1, 100\].*got 0"),
    (lambda: NoiseSchedule.from_name("linear", 100).timesteps(10, "uniform"), "spacing 'uniform'.*trailing"),
])
def test_bad_input(call, match):
    with pytest.raises(LddpmError, match=match):
        call()
