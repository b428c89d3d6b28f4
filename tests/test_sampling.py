"""Samplers with exact models (Gaussian or single-point data), CFG identities, reproducibility, errors."""

from __future__ import annotations

import pytest
import torch

from lddpm.diffusion import GaussianDiffusion
from lddpm.errors import LddpmError
from lddpm.sampling import (SAMPLERS, ClassifierFreeGuidance, Denoiser, ddim_invert, sample, sample_ddim, sample_ddpm,
                            sample_dpmpp_2m)
from lddpm.schedule import NoiseSchedule

MU, STD = 0.3, 0.2
# the samplers over the schedule's integer timesteps (the sigma-space ones are tested in tests/test_solvers.py)
TIMESTEP_SAMPLERS = [name for name, spec in SAMPLERS.items() if spec.default_grid is None]


def gaussian_model(d: GaussianDiffusion, mu: float = MU, std: float = STD, log=None):
    """The exact prediction for data ~ N(mu, std^2) per dimension, in d's objective.

    x_t ~ N(sqrt(a) mu, a std^2 + 1 - a), so E[x0 | x_t] = mu + sqrt(a) std^2 (x_t - sqrt(a) mu) / (a std^2 + 1 - a)
    and E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a std^2 + 1 - a).
    """
    def model(x, t, y=None):
        if log is not None:
            log.append(t.clone())
        a = d.schedule.alphas_cumprod.to(x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        r = (x - a.sqrt() * mu) / (a * std ** 2 + 1 - a)
        return d.output_from_x0_eps(mu + a.sqrt() * std ** 2 * r, (1 - a).sqrt() * r, t)
    return model


def exact_output_moments(d: GaussianDiffusion, timesteps, sampler: str, eta: float = 0.0,
                         variance: str = "small", mu: float = MU, std: float = STD) -> tuple[float, float]:
    """Mean and std of a DDPM/DDIM sample from x_T ~ N(0, 1) with the exact Gaussian model, by pushing
    (mean, var) through each linear-Gaussian step (independent scalar recursion; Eq. 7 of Ho et al. 2020,
    Eq. 12 and 16 of Song et al. 2021)."""
    ac = d.schedule.alphas_cumprod.tolist()
    ts = [int(t) for t in timesteps] + [-1]
    m, v = 0.0, 1.0
    for t, tp in zip(ts[:-1], ts[1:]):
        a, ap = ac[t], (ac[tp] if tp >= 0 else 1.0)
        k0 = a ** 0.5 * std ** 2 / (a * std ** 2 + 1 - a)          # x0_hat = k0 x + c0
        c0 = mu - k0 * a ** 0.5 * mu
        ke, ce = (1 - a * k0 / a ** 0.5) / (1 - a) ** 0.5, -a ** 0.5 * c0 / (1 - a) ** 0.5   # eps_hat
        beta = 1 - a / ap
        if sampler == "ddpm":
            c1, c2 = ap ** 0.5 * beta / (1 - a), (1 - beta) ** 0.5 * (1 - ap) / (1 - a)
            k, c = c1 * k0 + c2, c1 * c0
            var_step = (1 - ap) / (1 - a) * beta if variance == "small" else beta
            sig2 = var_step if tp >= 0 else 0.0
        else:
            sig2 = eta ** 2 * (1 - ap) / (1 - a) * beta
            dirn = (1 - ap - sig2) ** 0.5
            k, c = ap ** 0.5 * k0 + dirn * ke, ap ** 0.5 * c0 + dirn * ce
        m, v = k * m + c, k * k * v + sig2
    return m, v ** 0.5


def _noise(n=20_000, seed=0):
    return torch.randn(n // 10, 1, 10, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("num_steps", [1000, 30])
def test_ddpm_output_distribution_exact_gaussian_model(variance, num_steps):
    """All 1000 ancestral steps, or 30 respaced ones, with the exact model: the sample mean/std match the
    analytic values of the linear-Gaussian chain (to sampling error), and N(mu, std^2) to within the
    fixed-variance bias (the true reverse variance lies between beta_tilde and beta)."""
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    ts = d.schedule.timesteps(num_steps, "trailing")
    x = sample_ddpm(Denoiser(gaussian_model(d), d, clip_x0=False), _noise(), ts, variance=variance, generator=torch.Generator().manual_seed(1))
    m, s = exact_output_moments(d, ts, "ddpm", variance=variance)
    assert x.mean().item() == pytest.approx(m, abs=4 * s / 20_000 ** 0.5)
    assert x.std().item() == pytest.approx(s, rel=4 / (2 * 20_000) ** 0.5)
    if num_steps == 1000:
        assert m == pytest.approx(MU, abs=1e-3) and s == pytest.approx(STD, rel=0.03)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "quadratic"])
def test_ddim_output_distribution_exact_gaussian_model(eta, spacing):
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))
    ts = d.schedule.timesteps(20, spacing)
    x = sample_ddim(Denoiser(gaussian_model(d), d, clip_x0=False), _noise(), ts, eta=eta, generator=torch.Generator().manual_seed(2))
    m, s = exact_output_moments(d, ts, "ddim", eta=eta)
    assert x.mean().item() == pytest.approx(m, abs=4 * s / 20_000 ** 0.5)
    assert x.std().item() == pytest.approx(s, rel=4 / (2 * 20_000) ** 0.5)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler,kwargs", [("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("dpm++2m", {})])
def test_fast_samplers_reproduce_gaussian_data(objective, sampler, kwargs):
    """250 steps of each fast sampler, every objective: the data distribution N(mu, std^2)."""
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), objective=objective)
    x = sample(gaussian_model(d), d, (2000, 1, 10, 1), sampler=sampler, num_steps=250, clip_x0=False,
               x_T=_noise().float(), generator=torch.Generator().manual_seed(2), **kwargs)
    assert x.mean().item() == pytest.approx(MU, abs=0.006)
    assert x.std().item() == pytest.approx(STD, rel=0.03)


def test_dpmpp_2m_is_second_order():
    """Against a 1000-step DDIM path from the same x_T (the ODE solution), halving the step size halves
    DDIM's error (first order) and cuts DPM-Solver++(2M)'s by more than 3x (trailing, cosine)."""
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))
    model, x_T = gaussian_model(d), _noise(5000)
    ref = sample_ddim(Denoiser(model, d, clip_x0=False), x_T, d.schedule.timesteps(1000, "trailing"))
    err = {}
    for n in (20, 40):
        ts = d.schedule.timesteps(n, "trailing")
        err["ddim", n] = (sample_ddim(Denoiser(model, d, clip_x0=False), x_T, ts) - ref).abs().mean().item()
        err["dpm", n] = (sample_dpmpp_2m(Denoiser(model, d, clip_x0=False), x_T, ts) - ref).abs().mean().item()
    assert 1.6 < err["ddim", 20] / err["ddim", 40] < 2.4
    assert err["dpm", 20] / err["dpm", 40] > 3.0 and err["dpm", 40] < 0.25 * err["ddim", 40]


def test_ddim_eta0_is_exact_for_single_point_data():
    """Data = one point x0*: the exact eps of x_t is constant along the DDIM path (Eq. 12), so every
    visited x_t equals sqrt(abar_t) x0* + sqrt(1 - abar_t) e and the output is x0*."""
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))
    ac = d.schedule.alphas_cumprod
    x0_star = torch.linspace(-0.9, 0.9, 16, dtype=torch.float64).view(1, 1, 4, 4)
    e = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    ts = d.schedule.timesteps(10, "linspace")
    seen = []

    def model(x, t, y=None):
        a = ac[t].view(-1, 1, 1, 1)
        seen.append((x.clone(), int(t[0])))
        return (x - a.sqrt() * x0_star) / (1 - a).sqrt()

    a_T = ac[int(ts[0])]
    out = sample_ddim(Denoiser(model, d), a_T.sqrt() * x0_star + (1 - a_T).sqrt() * e, ts)
    for x, t in seen:
        torch.testing.assert_close(x, ac[t].sqrt() * x0_star + (1 - ac[t]).sqrt() * e)
    torch.testing.assert_close(out, x0_star.expand_as(out))


def test_ddim_inversion_round_trip():
    """DDIM inversion then DDIM sampling (eta = 0) with the exact Gaussian model recovers x_0; the error
    is the first-order discretization error, shrinking with the number of steps."""
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    model = gaussian_model(d)
    x0 = MU + STD * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (50, 200, 1000):
        ts = d.schedule.timesteps(n, "trailing")
        x_T = ddim_invert(Denoiser(model, d), x0, ts)
        errors.append((sample_ddim(Denoiser(model, d, clip_x0=False), x_T, ts) - x0).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02
    assert x_T.std().item() == pytest.approx(1.0, abs=0.05)     # inverted latents look like noise


def test_ddpm_respacing_passes_original_timesteps():
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    log = []
    ts = d.schedule.timesteps(10, "linspace")
    sample_ddpm(Denoiser(gaussian_model(d, log=log), d), torch.randn(2, 1, 2, 2), ts, generator=torch.Generator())
    assert [int(t[0]) for t in log] == ts.tolist() and all(t.dtype == torch.long for t in log)


@pytest.mark.parametrize("sampler,expected", [("ddpm", 100), ("ddim", 50), ("dpm++2m", 20)])
def test_default_step_counts(sampler, expected):
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 100))
    log = []
    sample(gaussian_model(d, log=log), d, (2, 1, 2, 2), sampler=sampler)
    assert len(log) == expected and int(log[0][0]) == 99          # trailing starts at T - 1


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_reproducible_with_generator(sampler):
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 100))
    kw = dict(sampler=sampler, num_steps=10, eta=0.5 if sampler == "ddim" else 0.0)
    a = sample(gaussian_model(d), d, (3, 1, 4, 4), generator=torch.Generator().manual_seed(4), **kw)
    b = sample(gaussian_model(d), d, (3, 1, 4, 4), generator=torch.Generator().manual_seed(4), **kw)
    c = sample(gaussian_model(d), d, (3, 1, 4, 4), generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_progress_callback_and_clipping():
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 100))
    calls = []

    def wild(x, t, y=None):
        return -5 * x                                     # x0 predictions far outside [-1, 1]

    x = sample(wild, d, (2, 1, 4, 4), sampler="ddim", num_steps=7, progress=calls.append)
    assert [(c["i"], c["total"]) for c in calls] == [(i, 7) for i in range(7)]
    assert all(c["denoised"].abs().max().item() <= 1.0 for c in calls)  # the clipped prediction the step used
    assert x.abs().max().item() <= 1.0
    assert sample(wild, d, (2, 1, 4, 4), sampler="ddim", num_steps=7, clip_x0=False).abs().max().item() > 1.0


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_progress_callback_receives_each_steps_state(sampler):
    """k-diffusion's callback: step i's t, the x entering the step and the model's x0 prediction there."""
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 100))
    model = gaussian_model(d)
    timesteps = d.schedule.timesteps(6, "trailing")
    states = []
    x = sample(model, d, (3, 1, 2, 2), sampler=sampler, num_steps=6, clip_x0=False, progress=states.append,
               generator=torch.Generator().manual_seed(1))
    assert [s["t"] for s in states] == [int(t) for t in timesteps] and [s["i"] for s in states] == list(range(6))
    assert all(s["total"] == 6 for s in states)
    for s in states:  # denoised is the model's x0 prediction at (x, t)
        tt = torch.full((3,), s["t"])
        assert torch.allclose(s["denoised"], d.predict_x0_eps(model(s["x"], tt), s["x"], tt)[0])
    assert torch.equal(states[0]["x"], torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(1)))
    if sampler == "ddim":  # deterministic: step i + 1 starts where step i's update x_prev ended; the last step lands on x0
        a = [float(d.schedule.alphas_cumprod[s["t"]]) for s in states] + [1.0]
        for i, (s, nxt) in enumerate(zip(states, states[1:])):
            eps = (s["x"] - a[i] ** 0.5 * s["denoised"]) / (1 - a[i]) ** 0.5
            assert torch.allclose(nxt["x"], a[i + 1] ** 0.5 * s["denoised"] + (1 - a[i + 1]) ** 0.5 * eps, atol=1e-6)
        assert torch.allclose(x, states[-1]["denoised"], atol=1e-6)


def test_ddim_inversion_reports_its_steps():
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 100))
    states = []
    ddim_invert(Denoiser(gaussian_model(d), d, clip_x0=False), torch.zeros(2, 1, 2, 2), [80, 40, 0],
                progress=states.append)
    assert [(s["i"], s["t"]) for s in states] == [(0, 0), (1, 0), (2, 40)]


@pytest.mark.parametrize("sampler", TIMESTEP_SAMPLERS)
def test_zero_terminal_snr_with_v_objective(sampler):
    """abar_T = 0 (Lin et al. 2024): x0 = -v at the first step; every sampler stays finite."""
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000, rescale_zero_terminal_snr=True), objective="v")
    x = sample(gaussian_model(d), d, (4000, 1, 1, 1), sampler=sampler, num_steps=100, clip_x0=False,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.02)


# ---- classifier-free guidance ----------------------------------------------------------------------
class LabelNet(torch.nn.Module):
    """A tiny conditional 'network' whose output depends on x, t and the label; counts forwards."""

    def __init__(self, out_mult: int = 1) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(4, 1)      # labels 0..2, null label 3
        self.out_mult = out_mult
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        y = torch.full((x.shape[0],), 3) if y is None else y
        h = torch.tanh(x * (1 + self.emb(y).view(-1, 1, 1, 1))) + t.view(-1, 1, 1, 1) / 1000
        return torch.cat([h, torch.sin(h + 1)], 1) if self.out_mult == 2 else h


def test_cfg_scale_one_and_zero_are_exact():
    net = LabelNet()
    x, t, y = torch.randn(5, 2, 3, 3), torch.randint(0, 1000, (5,)), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y=y), net(x, t, y=torch.full((5,), 3))
        assert torch.equal(ClassifierFreeGuidance(net, 1.0, 3)(x, t, y=y), cond)
        assert torch.equal(ClassifierFreeGuidance(net, 0.0, 3)(x, t, y=y), uncond)
        net.calls.clear()
        g = ClassifierFreeGuidance(net, 3.5, 3)(x, t, y=y)
    assert net.calls == [10]                               # one batched forward: cond and null branches
    torch.testing.assert_close(g, uncond + 3.5 * (cond - uncond))


def test_cfg_learned_variance_guides_mean_only():
    net = LabelNet(out_mult=2)
    x, t, y = torch.randn(4, 2, 3, 3), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        cond, uncond = net(x, t, y=y), net(x, t, y=torch.full((4,), 3))
        g = ClassifierFreeGuidance(net, 2.0, 3)(x, t, y=y)
    torch.testing.assert_close(g[:, :2], uncond[:, :2] + 2.0 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(g[:, 2:], cond[:, 2:])


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_cfg_in_any_parameterization_equals_cfg_on_eps(objective):
    """eps, x0 and v are affine in each other for fixed (x_t, t), so guiding the raw output equals
    converting both branches to eps, guiding eps, and converting back."""
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), objective=objective)
    net = LabelNet().double()
    x, t, y = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.tensor([3, 200, 600, 990]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        guided_raw = ClassifierFreeGuidance(net, 4.0, 3)(x, t, y=y)
        eps_c = d.predict_x0_eps(net(x, t, y=y), x, t)[1]
        eps_u = d.predict_x0_eps(net(x, t, y=torch.full((4,), 3)), x, t)[1]
    eps_g = eps_u + 4.0 * (eps_c - eps_u)
    torch.testing.assert_close(d.predict_x0_eps(guided_raw, x, t)[1], eps_g)
    torch.testing.assert_close(guided_raw, d.output_from_x0_eps(d.x0_from_eps(eps_g, x, t), eps_g, t))


def test_sample_with_guidance_uses_labels():
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 100))
    net = LabelNet()
    y = torch.tensor([0, 2])
    a = sample(net, d, (2, 2, 3, 3), sampler="ddim", num_steps=5, y=y, guidance_scale=3.0, null_label=3,
               generator=torch.Generator().manual_seed(0))
    assert net.calls == [4] * 5
    b = sample(net, d, (2, 2, 3, 3), sampler="ddim", num_steps=5, y=y, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="lms"), "unknown sampler 'lms'.*ddpm, ddim, dpm\\+\\+2m"),
    (dict(sampler="ddim", eta=1.5), "eta must be in \\[0, 1\\], got 1.5"),
    (dict(sampler="ddpm", eta=0.5), "eta=0.5 applies only to the 'ddim'"),
    (dict(sampler="ddim", num_steps=101), "num_steps must be an integer in \\[1, 100\\].*101"),
    (dict(sampler="ddim", num_steps=0), "num_steps must be an integer in \\[1, 100\\].*got 0"),
    (dict(sampler="ddim", guidance_scale=2.0), "guidance_scale=2.0 needs a null condition"),
    (dict(sampler="ddim", spacing="uniform"), "spacing 'uniform'"),
])
def test_bad_input(kwargs, match):
    d = GaussianDiffusion(NoiseSchedule.from_name("linear", 100))
    with pytest.raises(LddpmError, match=match):
        sample(gaussian_model(d), d, (1, 1, 2, 2), **kwargs)


def test_cfg_wrapper_requires_null_label():
    with pytest.raises(LddpmError, match="guidance_scale=1.5 needs a null condition"):
        ClassifierFreeGuidance(LabelNet(), 1.5, None)
    assert ClassifierFreeGuidance(LabelNet(), 1.0, None).guidance_scale == 1.0
