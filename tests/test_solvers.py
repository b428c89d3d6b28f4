"""The sigma-space samplers (lddpm.solvers), sigma_min and epsilon scaling, on exact Gaussian data.

For data x0 ~ N(mu, v) the exact denoiser is affine in its input, so every sampler's output is an affine
function of the starting noise x_T and of the noise it draws. `Aff` carries those coefficients through an
independent scalar recursion of each method, written here in the VP variables (x_t = alpha x0 + sigma eps, the
papers' own form for DPM-Solver++, UniPC and PNDM) or the paper's VE form (EDM's Algorithm 2), with the
exponential-integrator weights of UniPC computed by quadrature. lddpm's samplers (VE form, lddpm.solvers) must
give the same map to 1e-9, and converge to N(mu, v) as the steps grow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from lddpm.diffusion import GaussianDiffusion
from lddpm.errors import LddpmError
from lddpm.sampling import (SAMPLERS, Denoiser, count_model_evaluations, is_stochastic, sample, sample_ddim,
                            sample_dpmpp_2m, sampling_grid)
from lddpm.schedule import NoiseSchedule, karras_sigmas
from lddpm.solvers import SamplerOptions, sample_dpmpp_2m_sigmas, sample_euler

MU, VAR = 0.3, 0.04
SIGMA_SAMPLERS = [name for name, spec in SAMPLERS.items() if spec.default_grid is not None]
DETERMINISTIC = ["euler", "heun", "dpm++3m", "unipc", "ipndm"]


class Aff:
    """a * x_T + sum_j b[j] * xi_j + c: a sample as an affine function of its starting noise and noise draws."""

    def __init__(self, a=0.0, c=0.0, b=None):
        self.a, self.c, self.b = float(a), float(c), dict(b or {})

    @staticmethod
    def _lift(o):
        return o if isinstance(o, Aff) else Aff(0.0, o)

    def __add__(self, o):
        o = self._lift(o)
        b = dict(self.b)
        for k, v in o.b.items():
            b[k] = b.get(k, 0.0) + v
        return Aff(self.a + o.a, self.c + o.c, b)

    __radd__ = __add__

    def __neg__(self):
        return Aff(-self.a, -self.c, {k: -v for k, v in self.b.items()})

    def __sub__(self, o):
        return self + (-self._lift(o))

    def __rsub__(self, o):
        return self._lift(o) - self

    def __mul__(self, k: float):
        return Aff(self.a * k, self.c * k, {j: v * k for j, v in self.b.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: float):
        return self * (1.0 / k)

    @staticmethod
    def noise(j: int) -> "Aff":
        return Aff(0.0, 0.0, {j: 1.0})

    def var(self) -> float:
        return self.a ** 2 + sum(v * v for v in self.b.values())


def vp(s: float) -> tuple[float, float]:
    """(alpha, sigma) of the VP process at VE noise level s (s = 0: the clean end)."""
    return 1.0 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)


def x0_vp(x: Aff, alpha: float, sig: float) -> Aff:
    """E[x0 | x_t] for x0 ~ N(MU, VAR), x_t = alpha x0 + sig eps."""
    return MU + (x - alpha * MU) * (alpha * VAR / (alpha * alpha * VAR + sig * sig))


def d_ve(z: Aff, s: float) -> Aff:
    """E[x0 | z] for z = x0 + s eps."""
    return MU + (z - MU) * (VAR / (VAR + s * s))


def lam(s: float) -> float:
    """lambda = log(alpha / sigma) of VE level s (+inf at s = 0)."""
    alpha, sig = vp(s)
    return math.inf if s == 0 else math.log(alpha) - math.log(sig)


# ---- the test's own recursions (x is the VP sample; the result is x at s = 0, i.e. x0) ---------------------
def ref_ddim(sigmas, x, eps_scale=lambda s: 1.0):
    """DDIM eta = 0 (Song et al. 2021, Eq. 12) between the levels; = Euler in the VE variable."""
    for s, s_n in zip(sigmas, sigmas[1:]):
        al, sg = vp(s)
        an, sn = vp(s_n)
        x0 = x0_vp(x, al, sg)
        eps = (x - al * x0) / sg / eps_scale(s)
        x0 = (x - sg * eps) / al
        x = an * x0 + sn * eps
    return x


def ref_edm(sigmas, z, heun, churn=0.0, tmin=0.0, tmax=math.inf, noise=1.0):
    """Karras et al. 2022, Algorithm 2 in its own (VE) variable; the noise draws are numbered in order."""
    n, k = len(sigmas) - 1, 0
    for s, s_n in zip(sigmas, sigmas[1:]):
        gamma = min(churn / n, math.sqrt(2) - 1) if tmin <= s <= tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            z = z + math.sqrt(s_hat ** 2 - s ** 2) * noise * Aff.noise(k)
            k += 1
        d = (z - d_ve(z, s_hat)) / s_hat
        z_next = z + (s_n - s_hat) * d
        if heun and s_n > 0:
            d2 = (z_next - d_ve(z_next, s_n)) / s_n
            z_next = z + (s_n - s_hat) * 0.5 * (d + d2)
        z = z_next
    return z


def ref_dpmpp(sigmas, x, order):
    """DPM-Solver++ multistep in VP form (Lu et al. 2022; midpoint 2nd order, 3rd-order multistep), order ramp-up,
    first order to s = 0, second order for the second-to-last step below 15 steps."""
    n, ms = len(sigmas) - 1, []
    for i in range(n):
        s, s_n = sigmas[i], sigmas[i + 1]
        al, sg = vp(s)
        at, st = vp(s_n)
        m0 = x0_vp(x, al, sg)
        ms.append((lam(s), m0))
        if s_n == 0:
            x = m0
            break
        h = lam(s_n) - lam(s)
        k = min(order, i + 1)
        if n < 15 and i == n - 2:
            k = min(k, 2)
        x_new = (st / sg) * x - at * (math.exp(-h) - 1) * m0
        if k >= 2:
            (l1, m1), l0 = ms[-2], ms[-1][0]
            r0 = (l0 - l1) / h
            D1_0 = (m0 - m1) / r0
            if k == 2:
                x_new = x_new - 0.5 * at * (math.exp(-h) - 1) * D1_0
            else:
                l2, m2 = ms[-3]
                r1 = (l1 - l2) / h
                D1_1 = (m1 - m2) / r1
                D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                x_new = (x_new + at * ((math.exp(-h) - 1) / h + 1) * D1
                         - at * ((math.exp(-h) - 1 + h) / h ** 2 - 0.5) * D2)
        x = x_new
    return x


def ref_dpmpp_2m_sde(sigmas, x):
    """SDE-DPM-Solver++(2M), midpoint, VP form; noise draw j at step j (none at the step to s = 0)."""
    prev = None
    for i, (s, s_n) in enumerate(zip(sigmas, sigmas[1:])):
        al, sg = vp(s)
        at, st = vp(s_n)
        m0 = x0_vp(x, al, sg)
        if s_n == 0:
            return m0
        h = lam(s_n) - lam(s)
        D = m0 if prev is None else m0 + 0.5 * (m0 - prev[1]) / (prev[0] / h)
        x = ((st / sg) * math.exp(-h) * x + at * (1 - math.exp(-2 * h)) * D
             + st * math.sqrt(1 - math.exp(-2 * h)) * Aff.noise(i))
        prev = (h, m0)
    return x


def phi(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1 - u) z} u^{k-1} / (k-1)! du (exponential integrators), by quadrature."""
    return integrate.quad(lambda u: math.exp((1 - u) * z) * u ** (k - 1) / math.factorial(k - 1), 0, 1,
                          epsabs=1e-14, epsrel=1e-13)[0]


def unipc_rhos(rks, h, order, predictor):
    """rho of UniP / UniC with B(h) = e^{-h} - 1: R rho = b, R_ik = r_k^(i-1), b_i = i! (-h) phi_{i+1}(-h) / B(h)."""
    if predictor and order == 2:
        return [0.5]
    if not predictor and order == 1:
        return [0.5]
    B = math.expm1(-h)
    b = [math.factorial(i) * (-h) * phi(i + 1, -h) / B for i in range(1, order + 1)]
    m = order - 1 if predictor else order
    R = np.array([[r ** i for r in rks[:m]] for i in range(m)])
    return list(np.linalg.solve(R, np.array(b[:m])))


def ref_unipc(sigmas, x, order):
    """UniPC-p bh2 (Zhao et al. 2023), data prediction, VP form, with the corrector after every evaluation but
    the first; order min(p, steps left, evaluations so far)."""
    n, ms = len(sigmas) - 1, []
    x_last, p_last = None, 1
    for i in range(n):
        s = sigmas[i]
        al, sg = vp(s)
        m = x0_vp(x, al, sg)
        if i > 0:
            s0 = sigmas[i - 1]
            a0, g0 = vp(s0)
            l0, m0 = ms[-1]
            h = lam(s) - l0
            rks = [(ms[-1 - k][0] - l0) / h for k in range(1, p_last)] + [1.0]
            d1s = [(ms[-1 - k][1] - m0) / rks[k - 1] for k in range(1, p_last)] + [m - m0]
            rhos = unipc_rhos(rks, h, p_last, predictor=False)
            B = math.expm1(-h)
            x = (sg / g0) * x_last - al * B * m0 - al * B * sum((r * d for r, d in zip(rhos, d1s)), Aff())
        ms.append((lam(s), m))
        p = min(order, n - i, i + 1)
        x_last, p_last = x, p
        s_n = sigmas[i + 1]
        if s_n == 0:
            return m
        at, st = vp(s_n)
        h = lam(s_n) - lam(s)
        B = math.expm1(-h)
        x_new = (st / sg) * x - at * B * m
        if p >= 2:
            rks = [(ms[-1 - k][0] - lam(s)) / h for k in range(1, p)]
            d1s = [(ms[-1 - k][1] - m) / rks[k - 1] for k in range(1, p)]
            rhos = unipc_rhos(rks + [1.0], h, p, predictor=True)
            x_new = x_new - at * B * sum((r * d for r, d in zip(rhos, d1s)), Aff())
        x = x_new
    return x


def ref_ipndm(sigmas, x, order=4):
    """iPNDM: PNDM's DDIM transfer with eps combined by Adams-Bashforth weights, lower-order warm start."""
    weights = [[1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
    history = []
    for s, s_n in zip(sigmas, sigmas[1:]):
        al, sg = vp(s)
        an, sn = vp(s_n)
        history = [(x - al * x0_vp(x, al, sg)) / sg] + history[:order - 1]
        eps = sum((w * e for w, e in zip(weights[len(history) - 1], history)), Aff())
        x = an * (x - sg * eps) / al + sn * eps
    return x


REFERENCES = {
    "euler": lambda sig, x, **kw: ref_edm(sig, x * math.sqrt(1 + sig[0] ** 2), heun=False, **kw),
    "heun": lambda sig, x, **kw: ref_edm(sig, x * math.sqrt(1 + sig[0] ** 2), heun=True, **kw),
    "dpm++3m": lambda sig, x: ref_dpmpp(sig, x, 3),
    "dpm++2m": lambda sig, x: ref_dpmpp(sig, x, 2),
    "dpm++2m-sde": ref_dpmpp_2m_sde,
    "unipc": lambda sig, x, order=3: ref_unipc(sig, x, order),
    "ipndm": lambda sig, x, order=4: ref_ipndm(sig, x, order),
}


# ---- the exact model, evaluated at fractional timesteps ------------------------------------------------------
def gaussian_net(d: GaussianDiffusion, calls: list | None = None):
    """The network of an exact model for N(MU, VAR) data: its noise level at a (fractional) timestep t is the
    log-linear interpolation of the discrete schedule's sigmas (written here, independently of lddpm)."""
    ac = d.schedule.alphas_cumprod.numpy()
    ac = np.where(ac > 0, ac, 2.0 ** -24)              # zero terminal SNR: sigma 4096 at the last step
    log_sig = np.log(np.sqrt((1 - ac) / ac))

    def net(x, t, y=None):
        if calls is not None:
            calls.append(float(t[0]))
        tf = np.asarray(t, dtype=np.float64)
        lo = np.clip(np.floor(tf).astype(int), 0, len(ac) - 2)
        s = torch.from_numpy(np.exp(log_sig[lo] + (tf - lo) * (log_sig[lo + 1] - log_sig[lo]))).to(x.dtype)
        s = s.view(-1, *([1] * (x.ndim - 1)))
        alpha, sig = 1 / torch.sqrt(1 + s * s), s / torch.sqrt(1 + s * s)
        x0 = MU + (x - alpha * MU) * alpha * VAR / (alpha * alpha * VAR + sig * sig)
        eps = (x - alpha * x0) / sig
        return d.output_from_x0_eps(x0, eps, None) if d.objective != "v" else alpha * eps - sig * x0
    return net


def _diffusion(objective="eps", name="cosine", T=1000, **kw) -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name(name, T, **kw), objective=objective)


X_T = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64).view(3, 1, 1, 1)


def _affine_map(d, sampler, steps, **options) -> tuple[float, float]:
    """(c, a) of lddpm's output a x_T + c, read off x_T = 0, 1 (and checked affine at -2)."""
    out = sample(gaussian_net(d), d, X_T.shape, sampler=sampler, num_steps=steps, clip_x0=False, x_T=X_T,
                 sampler_options=options or None).flatten().tolist()
    c, a = out[0], out[1] - out[0]
    assert out[2] == pytest.approx(c - 2 * a, abs=1e-9)
    return c, a


@pytest.mark.parametrize("sampler", DETERMINISTIC + ["dpm++2m"])
@pytest.mark.parametrize("grid", ["time", "karras", "logsnr"])
@pytest.mark.parametrize("objective", ["eps", "v"])
def test_deterministic_samplers_match_an_independent_recursion(sampler, grid, objective):
    """8 steps on each grid: lddpm's output map equals the test's recursion of the same method to 1e-9
    (so its mean and variance over x_T ~ N(0, 1) do too)."""
    d = _diffusion(objective)
    sigmas = d.schedule.sigma_grid(8, grid)
    ref = REFERENCES[sampler](sigmas, Aff(1.0))
    c, a = _affine_map(d, sampler, 8, grid=grid)
    assert c == pytest.approx(ref.c, abs=1e-9) and a == pytest.approx(ref.a, abs=1e-9)


@pytest.mark.parametrize("sampler,order", [("unipc", 1), ("unipc", 2), ("ipndm", 2), ("ipndm", 3)])
def test_lower_orders_match_the_recursion(sampler, order):
    d = _diffusion("eps", "linear")
    sigmas = d.schedule.sigma_grid(7, "logsnr")
    ref = REFERENCES[sampler](sigmas, Aff(1.0), order=order)
    c, a = _affine_map(d, sampler, 7, grid="logsnr", order=order)
    assert c == pytest.approx(ref.c, abs=1e-9) and a == pytest.approx(ref.a, abs=1e-9)


def test_dpmpp_3m_second_to_last_step_is_second_order_below_15_steps():
    """With >= 15 steps the recursion keeps the third order up to the last step (the rule matters: the two
    variants differ)."""
    d = _diffusion("v")
    for steps in (14, 15):
        sigmas = d.schedule.sigma_grid(steps, "logsnr")
        c, a = _affine_map(d, "dpm++3m", steps)
        ref = ref_dpmpp(sigmas, Aff(1.0), 3)
        assert c == pytest.approx(ref.c, abs=1e-9) and a == pytest.approx(ref.a, abs=1e-9)


def _noises(generator_seed: int, count: int, shape) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(generator_seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


@pytest.mark.parametrize("sampler,options", [
    ("heun", dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)),
    ("euler", dict(s_churn=10.0)),
    ("dpm++2m-sde", {}),
])
def test_stochastic_samplers_match_the_recursion_sample_by_sample(sampler, options):
    """The output is a x_T + sum_j b_j xi_j + c with xi_j the j-th noise draw of the generator: lddpm's samples
    equal the recursion's with the same draws (EDM's Algorithm 2 churn; SDE-DPM-Solver++(2M))."""
    d = _diffusion("v")
    steps = 10
    sigmas = d.schedule.sigma_grid(steps, SAMPLERS[sampler].default_grid)
    ref = REFERENCES[sampler](sigmas, Aff(1.0), **{k.replace("s_t", "t").replace("s_", ""): v
                                                      for k, v in options.items()})
    assert ref.b, "the recursion must draw noise"
    x_T = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = sample(gaussian_net(d), d, x_T.shape, sampler=sampler, num_steps=steps, clip_x0=False, x_T=x_T,
                 generator=torch.Generator().manual_seed(7), sampler_options=options)
    xi = _noises(7, max(ref.b) + 1, x_T.shape)
    expected = ref.a * x_T + ref.c + sum(v * xi[j] for j, v in ref.b.items())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    assert is_stochastic(sampler, sampler_options=options)


@pytest.mark.parametrize("sampler", DETERMINISTIC + ["dpm++2m-sde"])
def test_samplers_converge_to_the_data_distribution(sampler):
    """As the steps grow the output distribution goes to N(MU, VAR): 200 steps on the logSNR grid are within
    1e-3 of both (lddpm's own map; the SDE's variance from the recursion, which equals lddpm's)."""
    d = _diffusion("eps")
    errors = []
    for steps in (10, 200):
        sigmas = d.schedule.sigma_grid(steps, "logsnr")
        if sampler == "dpm++2m-sde":
            ref = ref_dpmpp_2m_sde(sigmas, Aff(1.0))
            mean, var = ref.c, ref.var()
        else:
            mean, a = _affine_map(d, sampler, steps, grid="logsnr")
            var = a * a
        errors.append(abs(mean - MU) + abs(var - VAR))
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 5


def _exact_ode_map(d, sigmas) -> tuple[float, float]:
    """(c, a) of the exact probability-flow ODE from z = x_T sqrt(1 + s_max^2) at s_max down to s_min, then the
    final jump D(z; s_min): for Gaussian data z(s) = MU + sqrt((VAR + s^2) / (VAR + s_max^2)) (z(s_max) - MU)."""
    s_max, s_min = sigmas[0], sigmas[-2]
    z = MU + (Aff(math.sqrt(1 + s_max ** 2)) - MU) * math.sqrt((VAR + s_min ** 2) / (VAR + s_max ** 2))
    out = d_ve(z, s_min)
    return out.c, out.a


@pytest.mark.parametrize("sampler,ratio", [("euler", 1.7), ("heun", 3.5), ("dpm++3m", 6.0), ("unipc", 6.0),
                                           ("ipndm", 3.0)])
def test_convergence_order(sampler, ratio):
    """Against the exact ODE solution (closed form for Gaussian data), doubling the steps (20 -> 40, logSNR grid)
    cuts the error by about 2x for Euler (first order), 4x for Heun and 8x or more for the third-order multistep
    methods; iPNDM's fixed Adams-Bashforth weights assume equal steps in sigma, so on this grid it shows about
    second order (4x)."""
    d = _diffusion("eps")
    err = [math.hypot(*np.subtract(_affine_map(d, sampler, n, grid="logsnr"),
                                   _exact_ode_map(d, d.schedule.sigma_grid(n, "logsnr")))) for n in (20, 40)]
    assert err[0] / err[1] > ratio, err


def test_euler_on_the_time_grid_is_ddim_and_2m_on_sigmas_is_2m_on_timesteps():
    """Karras et al. 2022: DDIM is Euler's method in sigma; and DPM-Solver++(2M) written on sigmas equals the
    timestep version over the same timesteps."""
    d = _diffusion("v")
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = d.schedule.timesteps(12, "trailing")
    sigmas = d.schedule.sigma_grid(12, "time")
    den = Denoiser(gaussian_net(d), d, clip_x0=False)
    z = x * math.sqrt(1 + sigmas[0] ** 2)
    torch.testing.assert_close(sample_euler(den, z, sigmas), sample_ddim(den, x, ts), rtol=0, atol=1e-10)
    torch.testing.assert_close(sample_dpmpp_2m_sigmas(den, z, sigmas), sample_dpmpp_2m(den, x, ts), rtol=0,
                               atol=1e-10)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_nfe_counts(sampler):
    """Denoiser.nfe after sampling equals count_model_evaluations: one per step, Heun 2N - 1."""
    d = _diffusion("eps", "linear", 100)
    calls = []
    sample(gaussian_net(d, calls), d, (2, 1, 2, 2), sampler=sampler, num_steps=6,
           generator=torch.Generator().manual_seed(0))
    expected = {"heun": 11, "ddpm": 6}.get(sampler, 6)
    assert len(calls) == expected == count_model_evaluations(sampler, 6, d)


# ---- grids and the time <-> sigma map ----------------------------------------------------------------------
def test_karras_and_logsnr_grids():
    """Eq. 5 of Karras et al. 2022 by hand at both ends and the middle; logSNR: equal log-sigma steps."""
    s = karras_sigmas(5, 0.002, 80.0, 7.0)
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert s[0] == pytest.approx(80) and s[-1] == pytest.approx(0.002) and s[2] == pytest.approx(mid)
    sched = NoiseSchedule.from_name("cosine", 1000)
    g = sched.sigma_grid(6, "logsnr")
    assert g[-1] == 0.0 and g[0] == pytest.approx(sched.sigmas[-1]) and g[-2] == pytest.approx(sched.sigmas[0])
    np.testing.assert_allclose(np.diff(np.log(g[:-1])), np.log(g[1] / g[0]), rtol=1e-12)
    assert sched.sigma_grid(5, "time", sigma_min=float(sched.sigmas[400])) == \
        [float(sched.sigmas[t]) for t in (999, 799, 599)] + [0.0]


def test_sigma_to_t_interpolates_log_sigma_and_inverts():
    sched = NoiseSchedule.from_name("linear", 1000)
    for t in (0.0, 3.0, 17.25, 500.5, 998.9, 999.0):
        assert sched.sigma_to_t(sched.t_to_sigma(t)) == pytest.approx(t, abs=1e-9)
    ls = np.log(sched.sigmas)
    assert math.log(sched.t_to_sigma(10.25)) == pytest.approx(0.75 * ls[10] + 0.25 * ls[11], abs=1e-12)
    with pytest.raises(LddpmError, match="outside this schedule's range"):
        sched.sigma_to_t(1e6)


def test_zero_terminal_snr_schedule_has_a_finite_top_sigma():
    """The last alpha_bar = 0 is floored at 2^-24 in the sigma table (diffusers' Euler does the same)."""
    d = _diffusion("v", "linear", rescale_zero_terminal_snr=True)
    assert d.schedule.sigmas[-1] == pytest.approx(math.sqrt(2.0 ** 24 - 1))
    for sampler in SIGMA_SAMPLERS:
        x = sample(gaussian_net(d), d, (200, 1, 1, 1), sampler=sampler, num_steps=30, clip_x0=False,
                   generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all() and x.mean().item() == pytest.approx(MU, abs=0.05)


def test_the_unet_takes_fractional_timesteps():
    """The timestep embedding takes float t as it is: an integer-valued float t gives the LongTensor's output
    exactly, and t + 0.5 lies between t and t + 1 (the embedding is smooth)."""
    from lddpm.nn import build_network

    torch.manual_seed(0)
    net = build_network("unet", "tiny", resolution=8, in_channels=1).eval()
    with torch.no_grad():
        for p in net.parameters():                           # no zero-initialised layers
            p.normal_(0.0, 0.2)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        long_out = net(x, torch.tensor([10, 10]))
        assert torch.equal(net(x, torch.tensor([10.0, 10.0])), long_out)
        mid = net(x, torch.tensor([10.5, 10.5]))
        hi = net(x, torch.tensor([11, 11]))
    assert (mid - long_out).abs().max() > 0 and (mid - (long_out + hi) / 2).abs().max() < (hi - long_out).abs().max()


# ---- sigma_min and epsilon scaling ------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_default_options_change_nothing(sampler):
    """sigma_min = 0, eps_scaling = 1 (k = 0) give bitwise the samples without options."""
    d = _diffusion("v", "linear", 100)
    base = sample(gaussian_net(d), d, X_T.shape, sampler=sampler, num_steps=6, x_T=X_T,
                  generator=torch.Generator().manual_seed(0))
    same = sample(gaussian_net(d), d, X_T.shape, sampler=sampler, num_steps=6, x_T=X_T,
                  generator=torch.Generator().manual_seed(0),
                  sampler_options={"sigma_min": 0.0, "eps_scaling": 1.0, "eps_scaling_k": 0.0})
    assert torch.equal(base, same)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "ddpm"])
def test_sigma_min_drops_the_low_noise_steps_and_jumps_to_x0(sampler):
    """With sigma_min = sigma(t = 99) the timesteps below 99 are not evaluated and the last evaluated step's
    x0 prediction is the output."""
    d = _diffusion("eps")
    calls, states = [], []
    smin = float(d.schedule.sigmas[99])
    out = sample(gaussian_net(d, calls), d, X_T.shape, sampler=sampler, num_steps=50, clip_x0=False, x_T=X_T,
                 sampler_options={"sigma_min": smin}, progress=states.append,
                 generator=torch.Generator().manual_seed(0))
    full = d.schedule.timesteps(50, "trailing").tolist()
    assert calls == [float(t) for t in full if t >= 99] and min(calls) == 99.0
    torch.testing.assert_close(out, states[-1]["denoised"], rtol=0, atol=1e-12)
    assert count_model_evaluations(sampler, 50, d, sampler_options={"sigma_min": smin}) == len(calls)


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_sigma_min_ends_the_sigma_grid_there(sampler):
    d = _diffusion("eps")
    calls = []
    smin = float(d.schedule.sigmas[99])
    sample(gaussian_net(d, calls), d, X_T.shape, sampler=sampler, num_steps=5, clip_x0=False, x_T=X_T,
           sampler_options={"sigma_min": smin}, generator=torch.Generator().manual_seed(0))
    assert min(calls) == pytest.approx(99.0, abs=1e-9)


def test_eps_scaling_on_ddim_matches_the_recursion():
    """DDIM with eps / lambda, lambda = b + k t (Ning et al. 2023): the test's recursion with the same scaling."""
    d = _diffusion("eps")
    b, k = 1.02, 2e-5
    ts = d.schedule.timesteps(10, "trailing").tolist()
    sigmas = [float(d.schedule.sigmas[t]) for t in ts] + [0.0]
    t_of = dict(zip(sigmas, ts))
    ref = ref_ddim(sigmas, Aff(1.0), eps_scale=lambda s: b + k * t_of[s])
    c, a = _affine_map(d, "ddim", 10, eps_scaling=b, eps_scaling_k=k)
    assert c == pytest.approx(ref.c, abs=1e-9) and a == pytest.approx(ref.a, abs=1e-9)
    c1, a1 = _affine_map(d, "ddim", 10)
    assert abs(a - a1) > 1e-4                                # it does change the output


@pytest.mark.parametrize("objective", ["x0", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "ddpm"])
def test_eps_scaling_is_objective_independent(objective, sampler):
    """v and x0 outputs are converted to eps before the division: every objective gives the eps model's samples."""
    outs = []
    for obj in ("eps", objective):
        d = _diffusion(obj, "linear", 100)
        outs.append(sample(gaussian_net(d), d, X_T.shape, sampler=sampler, num_steps=8, clip_x0=False, x_T=X_T,
                           sampler_options={"eps_scaling": 1.01, "eps_scaling_k": 1e-4},
                           generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-9)


def test_eps_scaling_closed_form_one_step():
    """One denoise at t: x0 = (x_t - sqrt(1 - abar) eps / lambda) / sqrt(abar) with lambda = b + k t."""
    d = _diffusion("v")
    den = Denoiser(gaussian_net(d), d, clip_x0=False, eps_scaling=1.05, eps_scaling_k=1e-4)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    x0, eps = den.x0_eps(x, 400)
    plain_x0, plain_eps = Denoiser(gaussian_net(d), d, clip_x0=False).x0_eps(x, 400)
    lam_t = 1.05 + 1e-4 * 400
    a = float(d.schedule.alphas_cumprod[400])
    torch.testing.assert_close(eps, plain_eps / lam_t)
    torch.testing.assert_close(x0, (x - math.sqrt(1 - a) * plain_eps / lam_t) / math.sqrt(a))
    z = x / math.sqrt(a)
    s = float(d.schedule.sigmas[400])
    torch.testing.assert_close(den.denoise(z, s), z - s * plain_eps / lam_t)


# ---- options: errors a user can make ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,options,match", [
    ("ddim", {"grid": "karras"}, "runs on the schedule's timesteps"),
    ("ddim", {"s_churn": 1.0}, "s_churn does not apply to the 'ddim' sampler; it applies to euler, heun"),
    ("euler", {"grid": "cosine"}, "unknown grid 'cosine'"),
    ("euler", {"sigma_min": 1e-9}, "sigma_min = 1e-09 is outside"),
    ("euler", {"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min .* is above sigma_max"),
    ("euler", {"rho": 0}, "rho must be > 0"),
    ("euler", {"s_noise": float("nan")}, "s_noise must be a number"),
    ("heun", {"order": 2}, "order does not apply"),
    ("unipc", {"order": 4}, "order 4 is too high for 'unipc'; choose 1..3"),
    ("ipndm", {"order": 0}, "order must be an integer >= 1"),
    ("dpm++3m", {"eps_scaling": 0.0}, "eps_scaling must be > 0"),
    ("ddim", {"sigmamin": 0.1}, "unknown sampler option\\(s\\) \\['sigmamin'\\]"),
])
def test_bad_options(sampler, options, match):
    d = _diffusion("eps", "linear", 100)
    with pytest.raises(LddpmError, match=match):
        sample(gaussian_net(d), d, (1, 1, 2, 2), sampler=sampler, num_steps=4, sampler_options=options)


def test_options_names_and_grid_listing():
    assert SamplerOptions.of({"grid": "karras"}).given() == {"grid": "karras"}
    kind, levels = sampling_grid("heun", 4, _diffusion("eps"), sampler_options={"grid": "karras", "sigma_max": 80.0})
    assert kind == "sigmas" and levels[0] == pytest.approx(80.0) and len(levels) == 5


# ---- diffusers as a test-only oracle ---------------------------------------------------------------------------
class FloatTModel:
    """A smooth deterministic 'network' of (x, fractional t) that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, float]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        t = float(torch.as_tensor(t).reshape(-1)[0])
        self.calls.append((x.clone(), t))
        return 0.8 * torch.tanh(x) + 0.1 * torch.cos(3 * x + t / 97.0)


PRED = {"eps": "epsilon", "v": "v_prediction"}


def _diffusers():
    return pytest.importorskip("diffusers")


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _float64_schedule(sched, d: GaussianDiffusion) -> None:
    """Our float64 alphas_cumprod in the diffusers scheduler (its grids are then computed from them)."""
    sched.alphas_cumprod = d.schedule.alphas_cumprod.clone()


def _ours(d, sampler, steps, options, x=None, model=None):
    model = model or FloatTModel()
    out = sample(model, d, (3, 2, 4, 4), sampler=sampler, num_steps=steps, clip_x0=False,
                 x_T=_x() if x is None else x, sampler_options=options)
    return out, model


@pytest.mark.parametrize("cls_name,sampler", [("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")])
@pytest.mark.parametrize("grid,flag", [("karras", "use_karras_sigmas"), ("logsnr", "use_exponential_sigmas")])
@pytest.mark.parametrize("objective", ["eps", "v"])
def test_euler_and_heun_match_diffusers(cls_name, sampler, grid, flag, objective):
    """Deterministic Euler / Heun (EDM Algorithm 1) on the Karras and the exponential (= logSNR) grids vs
    diffusers' Euler/HeunDiscreteScheduler (linspace spacing, so both grids span sigma(0)..sigma(T-1); fractional
    model timesteps from the same log-sigma interpolation). diffusers steps in float32, hence 1e-5."""
    diffusers = _diffusers()
    d = _diffusion(objective, "linear")
    ref = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="linspace",
                                       prediction_type=PRED[objective], **{flag: True})
    _float64_schedule(ref, d)
    ref.set_timesteps(9)
    ours, m_ours = _ours(d, sampler, 9, {"grid": grid})
    np.testing.assert_allclose(d.schedule.sigma_grid(9, grid), ref.sigmas.double().unique_consecutive().numpy(),
                               rtol=2e-6)
    m_ref = FloatTModel()
    z = _x() * math.sqrt(1 + float(ref.sigmas.max()) ** 2)
    for t in ref.timesteps:
        out = m_ref(ref.scale_model_input(z, t), t.reshape(1))
        z = ref.step(out.to(z.dtype), t, z).prev_sample.double()
    assert len(m_ours.calls) == len(m_ref.calls) == (17 if sampler == "heun" else 9)
    for (xa, ta), (xb, tb) in zip(m_ours.calls, m_ref.calls):
        assert ta == pytest.approx(tb, abs=2e-3)
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_euler_churn_differs_from_diffusers_on_purpose():
    """Deliberate: diffusers' Euler step adds the churn noise after the model call (D is taken at x, sigma_hat),
    while Karras et al.'s Algorithm 2 evaluates D at the churned x_hat, sigma_hat (ours, and the recursion test)."""
    diffusers = _diffusers()
    d = _diffusion("eps", "linear")
    ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                           timestep_spacing="linspace", use_karras_sigmas=True)
    _float64_schedule(ref, d)
    ref.set_timesteps(6)
    ours, m_ours = _ours(d, "euler", 6, {"s_churn": 2.0})
    m_ref, z, g = FloatTModel(), _x() * math.sqrt(1 + float(ref.sigmas.max()) ** 2), torch.Generator().manual_seed(0)
    for t in ref.timesteps:
        out = m_ref(ref.scale_model_input(z, t), t.reshape(1))
        z = ref.step(out.to(z.dtype), t, z, s_churn=2.0, generator=g).prev_sample.double()
    assert not torch.allclose(m_ours.calls[0][0], m_ref.calls[0][0], atol=1e-3)   # ours: the churned input


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_3m_matches_diffusers(objective, steps):
    """DPM-Solver++(3M) on our trailing timesteps (the "time" grid, integer t) vs DPMSolverMultistepScheduler
    (solver_order 3, dpmsolver++, midpoint, lower_order_final, final sigma 0): below 15 steps both lower the
    second-to-last step to second order. diffusers steps in float32, hence 1e-4 (as for DPM++2M)."""
    diffusers = _diffusers()
    d = _diffusion(objective, "cosine")
    ts = d.schedule.timesteps(steps, "trailing").tolist()
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                solver_order=3, prediction_type=PRED[objective])
    _float64_schedule(ref, d)
    ref.set_timesteps(timesteps=ts)
    ours, m_ours = _ours(d, "dpm++3m", steps, {"grid": "time"})
    m_ref, x = FloatTModel(), _x()
    for t in ref.timesteps:
        x = ref.step(m_ref(x, t.reshape(1)), t, x).prev_sample.double()
    assert [t for _, t in m_ours.calls] == [float(t) for t in ts] == [t for _, t in m_ref.calls]
    for (xa, _), (xb, _) in zip(m_ours.calls, m_ref.calls):
        torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(objective):
    """SDE-DPM-Solver++(2M) vs DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order 2),
    given the noise our generator draws at each step (none at the last, where it is multiplied by sigma = 0)."""
    diffusers = _diffusers()
    d = _diffusion(objective, "cosine")
    steps = 12
    ts = d.schedule.timesteps(steps, "trailing").tolist()
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                solver_order=2, algorithm_type="sde-dpmsolver++",
                                                prediction_type=PRED[objective])
    _float64_schedule(ref, d)
    ref.set_timesteps(timesteps=ts)
    model = FloatTModel()
    ours = sample(model, d, (3, 2, 4, 4), sampler="dpm++2m-sde", num_steps=steps, clip_x0=False, x_T=_x(),
                  generator=torch.Generator().manual_seed(9), sampler_options={"grid": "time"})
    g, m_ref, x = torch.Generator().manual_seed(9), FloatTModel(), _x()
    for i, t in enumerate(ref.timesteps):
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype) if i < steps - 1 else torch.zeros_like(x)
        x = ref.step(m_ref(x, t.reshape(1)), t, x, variance_noise=noise).prev_sample.double()
    for (xa, _), (xb, _) in zip(model.calls, m_ref.calls):
        torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("grid", ["time", "logsnr"])
def test_unipc_matches_diffusers(order, objective, grid):
    """UniPC-p bh2 with its corrector vs UniPCMultistepScheduler (predict_x0, bh2, lower_order_final), its sigmas
    and timesteps replaced by our grid (float64) and the model called at our fractional timesteps."""
    diffusers = _diffusers()
    d = _diffusion(objective, "linear")
    steps = 9
    sigmas = d.schedule.sigma_grid(steps, grid)
    ref = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=order,
                                            solver_type="bh2", prediction_type=PRED[objective])
    ref.set_timesteps(steps)
    ref.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    ref.timesteps = torch.arange(steps)                   # step indices; the model gets our t below
    ours, m_ours = _ours(d, "unipc", steps, {"grid": grid, "order": order})
    m_ref, x = FloatTModel(), _x()
    for i, t in enumerate(ref.timesteps):
        tt = torch.tensor([d.schedule.sigma_to_t(sigmas[i])], dtype=torch.float64)
        x = ref.step(m_ref(x, tt), t, x).prev_sample.double()
    for (xa, ta), (xb, tb) in zip(m_ours.calls, m_ref.calls):
        assert ta == pytest.approx(tb, abs=1e-9)
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", ["karras", "time"])
def test_ipndm_matches_diffusers(grid):
    """iPNDM vs IPNDMScheduler, whose alphas/betas (its alpha_t, sigma_t) are replaced by those of our grid; it
    reads the model output as v (eps = sigma x + alpha v), so the model is a v-prediction one."""
    diffusers = _diffusers()
    d = _diffusion("v", "linear")
    steps = 9
    sigmas = d.schedule.sigma_grid(steps, grid)
    ref = diffusers.IPNDMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(steps)
    ref.alphas = torch.tensor([vp(s)[0] for s in sigmas], dtype=torch.float64)
    ref.betas = torch.tensor([vp(s)[1] for s in sigmas], dtype=torch.float64)
    ours, m_ours = _ours(d, "ipndm", steps, {"grid": grid})
    m_ref, x = FloatTModel(), _x()
    for i, t in enumerate(ref.timesteps):
        tt = torch.tensor([d.schedule.sigma_to_t(sigmas[i])], dtype=torch.float64)
        x = ref.step(m_ref(x, tt), t, x).prev_sample
    for (xa, _), (xb, _) in zip(m_ours.calls, m_ref.calls):
        torch.testing.assert_close(xa, xb, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


# ---- the options through Pipeline.generate, the CLI and study cells ------------------------------------------
def test_cli_flags_are_the_sampler_options_and_the_sampler_list_is_the_registry():
    from lddpm.commands.sampler_flags import FLAGS, SAMPLER_NAMES, options_tag

    assert [name for name, _, _ in FLAGS] == list(SamplerOptions.names())
    assert list(SAMPLER_NAMES) == list(SAMPLERS)
    assert options_tag({"grid": "karras", "sigma_min": 0.17, "eps_scaling": 1.005}) == "-karras-smin0.17-es1.005"


@pytest.mark.parametrize("argv,match", [
    (["sample", "no-such-run", "--sampler", "heun", "--order", "2"], "order does not apply to the 'heun' sampler"),
    (["eval", "no-such-run", "--sampler", "euler", "--sigma-min", "-1"], "sigma_min must be >= 0"),
    (["eval", "no-such-run", "--sampler", "ddim", "--grid", "karras"], "runs on the schedule's timesteps"),
])
def test_cli_refuses_bad_options_before_loading(argv, match, capsys):
    import re

    from lddpm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and re.search(match, err[0]), err


def test_pipeline_generate_takes_sampler_options_and_churn_keeps_per_image_noise():
    """A churned Heun draws noise: each image's stream is its own, so the samples do not depend on the batch."""
    from lddpm.nn import build_network
    from lddpm.pipeline import Pipeline

    torch.manual_seed(0)
    net = build_network("unet", "tiny", resolution=8, in_channels=1).eval()
    pipe = Pipeline(net, _diffusion("v", "cosine", 100), dataset={"name": "toy", "resolution": 8, "channels": 1})
    kw = dict(sampler="heun", num_steps=3, seed=5, progress=False, sampler_options={"s_churn": 2.0, "grid": "logsnr"})
    a, _ = pipe.generate(3, batch_size=3, **kw)
    b, _ = pipe.generate(3, batch_size=1, **kw)
    c, _ = pipe.generate(3, batch_size=3, **{**kw, "sampler_options": {"grid": "logsnr"}})
    assert a.shape == (3, 8, 8, 1) and np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(LddpmError, match="s_churn does not apply"):
        pipe.generate(1, sampler="unipc", progress=False, sampler_options={"s_churn": 1.0})


def test_study_cells_take_sampler_options_as_fields_and_list_axes():
    from lddpm.study.schema import base_row, study_from_dict

    data = {"study": {"fid_n": 8}, "runs": {"r": {"config": "fashion-quick"}},
            "cells": [{"name": "ddim-{steps}-floor{sigma_min:g}", "run": "r", "sampler": "ddim", "steps": [10, 200],
                       "sigma_min": [0.0, 0.17]},
                      {"name": "heun", "run": "r", "sampler": "heun", "steps": 9, "grid": "karras", "s_churn": 5.0}]}
    study = study_from_dict(data)
    names = [c.name for c in study.cells]
    assert names == ["ddim-10-floor0", "ddim-10-floor0.17", "ddim-200-floor0", "ddim-200-floor0.17", "heun"]
    assert study.cells[1].sampler_options() == {"sigma_min": 0.17}
    assert study.cells[4].sampler_options() == {"grid": "karras", "s_churn": 5.0}
    assert base_row(study.cells[4], study, "ok")["sampler_options"] == "grid=karras, s_churn=5"
    assert "sampler_options" not in base_row(study.cells[0], study, "ok") or \
        base_row(study.cells[0], study, "ok")["sampler_options"] == "sigma_min=0"
    bad = dict(data, cells=[{"name": "x", "run": "r", "sampler": "unipc", "order": 7}])
    with pytest.raises(LddpmError, match="cell 'x': order 7 is too high for 'unipc'"):
        study_from_dict(bad)


def test_benchmark_maps_nfe_to_steps_and_renders_its_tables(tmp_path):
    """benchmarks/samplers.py: Heun gets (NFE + 1) // 2 steps; the tables and plots come from the points alone."""
    import argparse
    import importlib.util
    from pathlib import Path

    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert [bench.steps_for_nfe("heun", n) for n in (5, 8, 10)] == [3, 4, 5]
    assert bench.steps_for_nfe("unipc", 8) == 8
    assert bench._config_parts("dpm++2m:logsnr,sigma_min=0.1694") == ("dpm++2m", "logsnr", {"sigma_min": 0.1694})
    assert bench._config_parts("ipndm") == ("ipndm", "time", {})
    with pytest.raises(argparse.ArgumentTypeError, match="OPTION=NUMBER"):
        bench._config_parts("unipc:karras,sigma_min")
    result = {"num_images": 16}
    nfe = {"floor": {"fid": 1.5}, "points": [
        {"config": "heun:karras", "sampler": "heun", "nfe_target": 8, "nfe": 7, "fid": 9.0, "result": result},
        {"config": "unipc:logsnr", "sampler": "unipc", "nfe_target": 8, "nfe": 8, "fid": 7.25, "result": result}]}
    table = bench.render_table("nfe", nfe)
    assert "| heun:karras | 9.00 (7) |" in table and "| unipc:logsnr | 7.25 |" in table and "floor 1.50" in table
    steps = {"floor": {"fid": 1.5}, "points": [
        {"variant": "ddim", "sampler": "ddim", "steps": 10, "nfe": 10, "fid": 8.0, "result": result},
        {"variant": "ddim, sigma_min=0.1694", "sampler": "ddim", "steps": 200, "nfe": 181, "fid": 7.0, "result": result},
        {"variant": "ddpm", "sampler": "ddpm", "steps": 1000, "nfe": 1000, "fid": 20.0, "result": result}]}
    table = bench.render_table("steps", steps)
    assert "| ddim, sigma_min=0.1694 |  | 7.00 (181) |" in table and "20.00 (1000 steps)" in table
    bench.plot("nfe", nfe, tmp_path / "nfe.png")
    bench.plot("steps", steps, tmp_path / "steps.png")
    assert (tmp_path / "nfe.png").stat().st_size > 0 and (tmp_path / "steps.png").stat().st_size > 0


@pytest.mark.parametrize("keep", [False, True])
def test_benchmark_point_deletes_its_partial_samples_once_written(tmp_path, monkeypatch, keep):
    """benchmarks/samplers.py: a finished point's JSON is written and its partial samples folder is deleted
    (kept with --keep-samples); a point whose file exists is read back, not recomputed."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers_point", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def fake_evaluate(run, *, partial_dir, **kwargs):
        calls.append(kwargs["sampler"])
        Path(partial_dir).mkdir(parents=True)
        (Path(partial_dir) / "batch-00000.npz").write_bytes(b"x")
        return {"fid": 12.5, "num_images": 4}

    monkeypatch.setattr(bench, "evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(bench, "summary_line", lambda result: f"FID {result['fid']}")
    b = object.__new__(bench.Bench)
    b.out = tmp_path
    (tmp_path / "nfe").mkdir()
    b.args = argparse.Namespace(run="RUN", num=4, batch_size=2, seed=0, device="cpu", classifier="none",
                                cache_dir=None, keep_samples=keep)
    b.pipeline = argparse.Namespace(num_classes=0)
    b.reference = b.extractor = None
    result = b.point("nfe", "unipc", 5, {"grid": "logsnr"})
    assert result["fid"] == 12.5
    assert (tmp_path / "nfe" / "unipc-k5-grid-logsnr.json").is_file()
    assert (tmp_path / "nfe" / "unipc-k5-grid-logsnr.samples").is_dir() == keep
    assert b.point("nfe", "unipc", 5, {"grid": "logsnr"})["fid"] == 12.5 and calls == ["unipc"]
