"""Sigma-space samplers: Euler, Heun (with EDM's churn), DPM-Solver++(2M/3M), DPM-Solver++(2M) SDE, UniPC, iPNDM.

They work in the VE view of the VP process (Karras et al. 2022, Sec. 2; k-diffusion's convention):
z = x_t / sqrt(abar_t) = x0 + sigma eps with sigma = sqrt((1 - abar_t) / abar_t), and the denoiser
D(z; sigma) = E[x0 | z], `Denoiser.denoise` (it evaluates the VP network at x_t = z / sqrt(1 + sigma^2) and the
fractional timestep t(sigma)). The probability-flow ODE is then dz/dsigma = (z - D(z; sigma)) / sigma. In the
half log-SNR variable lambda = -log sigma, a step from sigma_i to sigma_{i+1} has h = log(sigma_i / sigma_{i+1}).
The exponential-integrator formulas of DPM-Solver++ and UniPC are written for x_t = alpha_t z; dividing them by
alpha_t gives the forms used here (the coefficient sigma_t / sigma_s of x becomes sigma_{i+1} / sigma_i).

Every sampler has one signature:

    sample_X(denoiser, z, sigmas, *, <its options>, generator=None, progress=None) -> x0

`sigmas` are the descending noise levels to visit, ending in 0 (`NoiseSchedule.sigma_grid`); z is the sample at
sigmas[0]; the last step goes from sigmas[-2] to 0 and (all samplers but iPNDM) returns D(z; sigmas[-2]), the
denoised x0. Model evaluations (NFE): one per step, Heun two per step except the last (2N - 1).
`generator` (one torch.Generator, or one per image) draws the noise of the stochastic ones. `progress` is True (a
bar) or a callback given each step's state {"i", "total", "t", "sigma", "x", "denoised"}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch

from lddpm.diffusion import randn
from lddpm.errors import LddpmError
from lddpm.progress import progress_bar
from lddpm.schedule import SIGMA_GRIDS

Progress = Callable[[dict[str, Any]], Any] | bool | None
Generator = torch.Generator | Sequence[torch.Generator] | None
IPNDM_MAX_ORDER = 4
UNIPC_MAX_ORDER = 3
DPMPP_LOWER_ORDER_BELOW = 15  # DPM-Solver++(3M) takes a second-order second-to-last step below this many steps


@dataclass(frozen=True)
class SamplerOptions:
    """Options of the samplers beyond steps / eta (the CLI's --grid, --sigma-min, ...; the study's cell keys).

    None means "the sampler's default". Which apply to which sampler: `SamplerSpec.options`.
    - grid: "time" (the schedule's timesteps under the spacing), "karras" (rho-polynomial, Karras et al. 2022)
      or "logsnr" (uniform in log-SNR); sigma-space samplers (and dpm++2m) only.
    - sigma_min: the lowest noise level the network is evaluated at; the last step jumps from it to x0. For the
      timestep samplers (ddpm, ddim, dpm++2m) and the "time" grid: the visited timesteps with sigma(t) <
      sigma_min are dropped. 0: the schedule's own lowest, sigma(t = 0).
    - sigma_max: the highest noise level (the start); 0: sigma(T - 1). Sigma-space samplers only.
    - rho: the Karras grid's exponent (7).
    - eps_scaling, eps_scaling_k: epsilon scaling (Ning et al. 2023): the predicted eps is divided by
      lambda(t) = eps_scaling + eps_scaling_k * t, t the (fractional) original timestep; 1 and 0: off.
    - s_churn, s_tmin, s_tmax, s_noise: EDM's stochastic churn (Karras et al. 2022, Algorithm 2); euler, heun.
    - order: the multistep order of unipc (1-3, default 3) and ipndm (1-4, default 4).
    """

    grid: str | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    eps_scaling: float | None = None
    eps_scaling_k: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    order: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, options: "SamplerOptions | dict[str, Any] | None") -> "SamplerOptions":
        """Options from a dict (unknown names -> LddpmError listing the known ones), an instance, or None."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise LddpmError(f"sampler options must be a dict of {', '.join(cls.names())}; got {options!r}")
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise LddpmError(f"unknown sampler option(s) {unknown}; known: {', '.join(cls.names())}")
        return cls(**options)

    def given(self) -> dict[str, Any]:
        """The options that are set (not None), as a plain dict (what results files record)."""
        return {k: getattr(self, k) for k in self.names() if getattr(self, k) is not None}

    def check(self) -> "SamplerOptions":
        """Value checks (names the option and the fix); returns self."""
        if self.grid is not None and self.grid not in SIGMA_GRIDS:
            raise LddpmError(f"unknown grid {self.grid!r}; choose one of {', '.join(SIGMA_GRIDS)}")
        for name in ("sigma_min", "sigma_max", "rho", "eps_scaling", "eps_scaling_k", "s_churn", "s_tmin", "s_tmax",
                     "s_noise"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise LddpmError(f"{name} must be a number, got {value!r}")
            if name != "s_tmax" and not math.isfinite(value):
                raise LddpmError(f"{name} must be finite, got {value!r}")
        for name in ("sigma_min", "sigma_max", "s_churn", "s_tmin", "s_tmax"):
            if (getattr(self, name) or 0.0) < 0:
                raise LddpmError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("rho", "eps_scaling", "s_noise"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise LddpmError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.order is not None and (isinstance(self.order, bool) or not isinstance(self.order, int)
                                       or self.order < 1):
            raise LddpmError(f"order must be an integer >= 1, got {self.order!r}")
        return self


# ----------------------------------------------------------------------------------------------- helpers


def _steps(n: int, progress: Progress, desc: str):
    """range(n), under a progress bar when progress is True."""
    return progress_bar(range(n), progress is True, desc=desc, leave=False)


def _report(progress: Progress, denoiser, i: int, total: int, sigma: float, x: torch.Tensor,
            denoised: torch.Tensor) -> None:
    """Call a callback `progress` with one step's state."""
    if callable(progress):
        progress({"i": i, "total": total, "t": denoiser.sigma_to_t(sigma), "sigma": sigma, "x": x,
                  "denoised": denoised})


def _check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Noise levels as floats: positive, strictly descending, then a final 0."""
    levels = [float(s) for s in sigmas]
    if len(levels) < 2 or levels[-1] != 0.0 or any(s <= 0 for s in levels[:-1]) \
            or any(a <= b for a, b in zip(levels, levels[1:])):
        raise LddpmError(f"sigmas must be positive and strictly descending, then 0; got {levels[:6]}...")
    return levels


def _churn(x: torch.Tensor, sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
           generator: Generator) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Algorithm 2, lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma,
    gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], by adding fresh noise of std
    sqrt(sigma_hat^2 - sigma^2) S_noise. Returns (x_hat, sigma_hat); no noise is drawn when gamma = 0."""
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0.0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    noise = randn(tuple(x.shape), generator, x.device, x.dtype)
    return x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * noise, sigma_hat


# ----------------------------------------------------------------------------------------------- samplers


@torch.no_grad()
def sample_euler(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, generator: Generator = None,
                 progress: Progress = None) -> torch.Tensor:
    """Euler's method on dz/dsigma = (z - D) / sigma (Karras et al. 2022, Algorithm 2 without the Heun
    correction), with the same optional churn. Deterministic Euler on the "time" grid is DDIM (eta = 0)."""
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    for i in _steps(n, progress, "euler"):
        x, s_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser.denoise(x, s_hat)
        _report(progress, denoiser, i, n, s_hat, x, denoised)
        if sig[i + 1] == 0.0:
            x = denoised                                  # the Euler step to sigma = 0 lands on D exactly
        else:
            x = x + (sig[i + 1] - s_hat) * (x - denoised) / s_hat
    return x


@torch.no_grad()
def sample_heun(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, generator: Generator = None,
                progress: Progress = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2: Heun's 2nd-order method with stochastic churn (S_churn = 0:
    deterministic, their Algorithm 1). The step to sigma = 0 is Euler only, so NFE = 2N - 1."""
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    for i in _steps(n, progress, "heun"):
        x, s_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)   # lines 4-6
        denoised = denoiser.denoise(x, s_hat)
        _report(progress, denoiser, i, n, s_hat, x, denoised)
        s_next = sig[i + 1]
        if s_next == 0.0:
            x = denoised                                  # line 8 with sigma_{i+1} = 0: x_{i+1} = D(x_hat)
            continue
        d = (x - denoised) / s_hat                        # line 7
        x_euler = x + (s_next - s_hat) * d                # line 8
        d_next = (x_euler - denoiser.denoise(x_euler, s_next)) / s_next    # lines 9-10
        x = x + (s_next - s_hat) * 0.5 * (d + d_next)     # line 11
    return x


@torch.no_grad()
def sample_dpmpp_multistep(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, order: int = 3,
                           generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", data prediction): order 2 is their Algorithm 2
    (2M), order 3 the third-order multistep update (3M). The first steps ramp the order up from 1 (no history);
    the last step (to sigma = 0, lambda = +inf) is first order, i.e. returns D; with fewer than 15 steps the
    second-to-last step is at most second order (as diffusers' DPMSolverMultistepScheduler)."""
    if order not in (1, 2, 3):
        raise LddpmError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order!r}")
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    history: list[tuple[float, torch.Tensor]] = []          # (lambda, D) of earlier steps, newest last
    for i in _steps(n, progress, f"dpm++{order}m"):
        s, s_next = sig[i], sig[i + 1]
        d0 = denoiser.denoise(x, s)
        _report(progress, denoiser, i, n, s, x, d0)
        if s_next == 0.0:
            x = d0                                        # first order with sigma_next = 0: x = D
            break
        lam, h = -math.log(s), math.log(s / s_next)
        k = min(order, len(history) + 1)
        if n < DPMPP_LOWER_ORDER_BELOW and i == n - 2:
            k = min(k, 2)
        phi1 = math.expm1(-h)                              # e^{-h} - 1
        x = (s_next / s) * x - phi1 * d0                  # first-order part (DPM-Solver++(1) = DDIM)
        if k >= 2:
            lam1, m1 = history[-1]
            r0 = (lam - lam1) / h
            d1_0 = (d0 - m1) / r0
            if k == 2:
                x = x - 0.5 * phi1 * d1_0                 # 2M: (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}
            else:
                lam2, m2 = history[-2]
                r1 = (lam1 - lam2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + (phi1 / h + 1.0) * d1 - ((phi1 + h) / h ** 2 - 0.5) * d2
        history = (history + [(lam, d0)])[-2:]
    return x


def sample_dpmpp_3m(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generator = None,
                    progress: Progress = None) -> torch.Tensor:
    """DPM-Solver++(3M): `sample_dpmpp_multistep` with order 3."""
    return sample_dpmpp_multistep(denoiser, x, sigmas, order=3, generator=generator, progress=progress)


def sample_dpmpp_2m_sigmas(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generator = None,
                           progress: Progress = None) -> torch.Tensor:
    """DPM-Solver++(2M) on any sigma grid: `sample_dpmpp_multistep` with order 2 (on the "time" grid it equals
    `sampling.sample_dpmpp_2m` over the same timesteps)."""
    return sample_dpmpp_multistep(denoiser, x, sigmas, order=2, generator=generator, progress=progress)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generator = None,
                        progress: Progress = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Sec. 5 / App.: the second-order multistep solver of
    the diffusion SDE in data prediction, midpoint form). Per step, with e = e^{-2h} = (sigma_{i+1} / sigma_i)^2:
        z_{i+1} = e z_i + (1 - e) (D_i + (D_i - D_{i-1}) / (2 r_i)) + sigma_{i+1} sqrt(1 - e) xi,
    r_i = h_{i-1} / h_i; the first step uses D_i alone, the last (to sigma = 0) returns D."""
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    prev: tuple[float, torch.Tensor] | None = None         # (h, D) of the previous step
    for i in _steps(n, progress, "dpm++2m-sde"):
        s, s_next = sig[i], sig[i + 1]
        d0 = denoiser.denoise(x, s)
        _report(progress, denoiser, i, n, s, x, d0)
        if s_next == 0.0:
            x = d0
            break
        h = math.log(s / s_next)
        one_minus_e = -math.expm1(-2.0 * h)
        d = d0 if prev is None else d0 + 0.5 * (d0 - prev[1]) * (h / prev[0])
        noise = randn(tuple(x.shape), generator, x.device, x.dtype)
        x = (1.0 - one_minus_e) * x + one_minus_e * d + s_next * math.sqrt(one_minus_e) * noise
        prev = (h, d0)
    return x


def _unipc_b(order: int, h: float) -> list[float]:
    """UniPC's right-hand side b_k = k! hh phi_{k+1}(hh) / B(h), k = 1..order, for data prediction (hh = -h) and
    B(h) = e^{hh} - 1 ("bh2"; Zhao et al. 2023). phi_{k+1}(hh) hh comes from the recursion g_1 = (e^{hh} - 1)/hh - 1,
    g_{k+1} = g_k / hh - 1/(k+1)! (the phi functions of exponential integrators)."""
    hh = -h
    b_h = math.expm1(hh)
    g, fact, out = math.expm1(hh) / hh - 1.0, 1, []
    for k in range(1, order + 1):
        out.append(g * fact / b_h)
        fact *= k + 1
        g = g / hh - 1.0 / fact
    return out


def _unipc_rhos(rks: list[float], b: list[float]) -> list[float]:
    """Solve sum_k rho_k r_k^(i-1) = b_i, i = 1..len(rks) (the R rho = b system of UniPC), in float64."""
    R = torch.tensor([[r ** i for r in rks] for i in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


@torch.no_grad()
def sample_unipc(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, order: int = 3, generator: Generator = None,
                 progress: Progress = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, B(h) = e^{-h} - 1 ("bh2"): the predictor UniP-p and, after
    every model evaluation but the first, the corrector UniC-p, which corrects the current sample with the
    evaluation just made (no extra NFE). The order ramps up from 1 and, as in the authors' code
    (lower_order_final), is min(order, steps left) so that the last step (to sigma = 0) is first order, i.e. D.
    In the VE variable, with h = lambda_t - lambda_s0, phi = e^{-h} - 1 and D1_k = (m_k - m0) / r_k:
        z_t = (sigma_t / sigma_s0) z_s0 - phi m0 - B(h) sum_k rho_k D1_k.
    UniP-2 uses rho = 1/2 and UniC-1 rho = 1/2; otherwise rho solves R rho = b (`_unipc_rhos`)."""
    if not 1 <= order <= UNIPC_MAX_ORDER:
        raise LddpmError(f"UniPC order must be 1..{UNIPC_MAX_ORDER}, got {order!r}")
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    history: list[tuple[float, torch.Tensor]] = []          # (lambda, D), newest last
    x_last, p_last = x, 1                                   # the sample the last predictor started from, its order
    for i in _steps(n, progress, "unipc"):
        s = sig[i]
        d = denoiser.denoise(x, s)
        _report(progress, denoiser, i, n, s, x, d)
        lam = -math.log(s)
        if i > 0:                                          # UniC-p: correct x_i with D(x_i), order p of the last step
            lam0, m0 = history[-1]
            h = lam - lam0
            rks = [(history[-1 - k][0] - lam0) / h for k in range(1, p_last)] + [1.0]
            d1s = [(history[-1 - k][1] - m0) / rks[k - 1] for k in range(1, p_last)] + [d - m0]
            rhos = [0.5] if p_last == 1 else _unipc_rhos(rks, _unipc_b(p_last, h))
            phi = math.expm1(-h)
            x = (s / sig[i - 1]) * x_last - phi * m0 - phi * sum(r * t for r, t in zip(rhos, d1s))
        history = (history + [(lam, d)])[-UNIPC_MAX_ORDER:]
        p = min(order, n - i, i + 1)
        x_last, p_last = x, p
        s_next = sig[i + 1]
        if s_next == 0.0:                                  # p = 1 here: z = D
            x = d
            break
        h = math.log(s / s_next)                           # UniP-p from (sigma_i, x_i) to sigma_{i+1}
        phi = math.expm1(-h)
        x = (s_next / s) * x - phi * d
        if p >= 2:
            rks = [(history[-1 - k][0] - lam) / h for k in range(1, p)]
            d1s = [(history[-1 - k][1] - d) / rks[k - 1] for k in range(1, p)]
            rhos = [0.5] if p == 2 else _unipc_rhos(rks, _unipc_b(p, h)[:-1])
            x = x - phi * sum(r * t for r, t in zip(rhos, d1s))
    return x


# Adams-Bashforth coefficients of iPNDM (Zhang & Chen 2023, DEIS, "improved PNDM": PNDM's linear multistep
# with a lower-order warm start instead of Runge-Kutta steps), newest eps first.
IPNDM_COEFFICIENTS = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_ipndm(denoiser, x: torch.Tensor, sigmas: Sequence[float], *, order: int = IPNDM_MAX_ORDER,
                 generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, "DEIS", Sec. 5 / App.): eps_i = (z_i - D_i) / sigma_i, combined over the last
    k <= order evaluations with the Adams-Bashforth weights (k = 1, 2, 3, 4 as evaluations accumulate), and
        z_{i+1} = z_i + (sigma_{i+1} - sigma_i) eps',
    which in VP terms is a DDIM step with eps' (diffusers' IPNDMScheduler). The step to sigma = 0 uses eps' too."""
    if not 1 <= order <= IPNDM_MAX_ORDER:
        raise LddpmError(f"iPNDM order must be 1..{IPNDM_MAX_ORDER}, got {order!r}")
    sig = _check_sigmas(sigmas)
    n = len(sig) - 1
    eps_history: list[torch.Tensor] = []                    # newest first
    for i in _steps(n, progress, "ipndm"):
        s = sig[i]
        denoised = denoiser.denoise(x, s)
        _report(progress, denoiser, i, n, s, x, denoised)
        eps_history = ([(x - denoised) / s] + eps_history)[:order]
        weights = IPNDM_COEFFICIENTS[len(eps_history) - 1]
        eps = sum(w * e for w, e in zip(weights, eps_history))
        x = x + (sig[i + 1] - s) * eps
    return x
