"""Noise schedules for discrete-time Gaussian diffusion: betas, alphas_cumprod, SNR, posterior
coefficients and timestep spacings for few-step sampling.

Notation follows Ho et al. 2020 ("DDPM"): beta_t is the variance of step t, alpha_t = 1 - beta_t,
alphas_cumprod[t] = prod_{s<=t} alpha_s (written abar_t), x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps.
Timesteps are 0-based indices t in [0, T). Everything is float64.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from lddpm.errors import LddpmError

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "sigmoid_beta")
SPACINGS = ("leading", "trailing", "linspace", "quadratic")
MAX_BETA = 0.999
# Step grids of the sigma-space samplers: the schedule's own timesteps ("time", under a SPACING), Karras et al.
# 2022's rho-polynomial ("karras") and uniform in log-SNR, i.e. in log sigma ("logsnr"); see `sigma_grid`.
SIGMA_GRIDS = ("time", "karras", "logsnr")
# alpha_bar used in the sigma table where a schedule reaches zero terminal SNR (alpha_bar = 0, sigma infinite):
# diffusers' Euler scheduler's value (the smallest positive float16 subnormal), i.e. sigma = 4096.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def _check_params(name: str, params: dict, allowed: tuple[str, ...]) -> None:
    """Reject unknown keyword parameters of a named schedule."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise LddpmError(
            f"unknown parameter(s) {unknown} for the {name!r} schedule; allowed: {list(allowed) or 'none'}"
        )


def betas_for_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_timesteps: int,
                        max_beta: float = MAX_BETA) -> np.ndarray:
    """Discretize a continuous abar(s), s in [0, 1]: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta).

    This is the discretization of Nichol & Dhariwal 2021, Eq. 17 and its footnote (clip at 0.999).
    """
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    a = alpha_bar(s)
    return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


def linear_betas(num_timesteps: int, beta_start: float | None = None,
                 beta_end: float | None = None) -> np.ndarray:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 at T = 1000.

    For other T the defaults are rescaled as in Nichol & Dhariwal 2021 (improved-diffusion):
    scale = 1000 / T, start = scale * 1e-4, end = scale * 0.02, so the total noise stays comparable.
    Explicit beta_start/beta_end are used as given. Betas are clipped at 0.999 (active only for T < 21).
    """
    scale = 1000.0 / num_timesteps
    start = scale * 1e-4 if beta_start is None else float(beta_start)
    end = scale * 0.02 if beta_end is None else float(beta_end)
    return np.minimum(np.linspace(start, end, num_timesteps, dtype=np.float64), MAX_BETA)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
    """Latent Diffusion / Stable Diffusion: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012), squared."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal 2021, Eq. 17: abar(u) = cos((u + s) / (1 + s) * pi / 2)^2, betas clipped at 0.999.

    Same as diffusers' "squaredcos_cap_v2" (which divides by abar(0)'s argument the same way).
    """
    return betas_for_alpha_bar(lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2,
                               num_timesteps, max_beta)


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  clip_min: float = 1e-9, max_beta: float = MAX_BETA) -> np.ndarray:
    """Chen 2023 ("On the importance of noise scheduling for diffusion models", Algorithm 1).

    abar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)),
    clipped to [clip_min, 1], then discretized like the cosine schedule (betas clipped at 0.999).
    This is a sigmoid in abar(u), not diffusers' "sigmoid" (a sigmoid in beta, see `sigmoid_beta_betas`).
    """
    def sig(z: np.ndarray | float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(u: np.ndarray) -> np.ndarray:
        out = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
        return np.clip(out, clip_min, 1.0)

    return betas_for_alpha_bar(alpha_bar, num_timesteps, max_beta)


def sigmoid_beta_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """diffusers' "sigmoid" schedule (from GeoDiff, Xu et al. 2022): a sigmoid in beta.

    betas = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start, with diffusers' default
    beta_start = 1e-4 and beta_end = 0.02 (GeoDiff itself used 1e-7 and 2e-3).
    """
    z = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z)) * (beta_end - beta_start) + beta_start


_SCHEDULE_FUNCS: dict[str, tuple[Callable[..., np.ndarray], tuple[str, ...]]] = {
    "linear": (linear_betas, ("beta_start", "beta_end")),
    "scaled_linear": (scaled_linear_betas, ("beta_start", "beta_end")),
    "cosine": (cosine_betas, ("s", "max_beta")),
    "sigmoid": (sigmoid_betas, ("start", "end", "tau", "clip_min", "max_beta")),
    "sigmoid_beta": (sigmoid_beta_betas, ("beta_start", "beta_end")),
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1.

    Shift sqrt(abar) so its last value is 0 and scale it so its first value is unchanged; then
    recover betas. The last beta becomes 1 and alphas_cumprod[-1] exactly 0.
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


_zero_terminal_snr = rescale_zero_terminal_snr  # the name is shadowed by a keyword argument below


def karras_sigmas(num: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N."""
    if num == 1:
        return [float(sigma_max)]
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return [float((a + i / (num - 1) * (b - a)) ** rho) for i in range(num)]


def logsnr_sigmas(num: int, sigma_min: float, sigma_max: float) -> list[float]:
    """N sigmas uniform in log sigma = -lambda (half log-SNR), from sigma_max to sigma_min (Lu et al. 2022, "logSNR")."""
    if num == 1:
        return [float(sigma_max)]
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [float(math.exp(hi + i / (num - 1) * (lo - hi))) for i in range(num)]


class NoiseSchedule:
    """Betas and everything derived from them (all float64 tensors of length T)."""

    def __init__(self, betas: torch.Tensor | np.ndarray, name: str = "custom") -> None:
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if betas.ndim != 1 or len(betas) < 1:
            raise LddpmError(f"betas must be a non-empty 1-d array, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise LddpmError(f"betas of schedule {name!r} must lie in (0, 1]; got min {betas.min().item():.3g}, "
                             f"max {betas.max().item():.3g}")
        self.name = name
        self.num_timesteps = T = len(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        ac = self.alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        # SNR(t) = abar / (1 - abar) (Kingma et al. 2021); log-SNR computed stably.
        self.snr = ac / (1.0 - ac)
        self.log_snr = torch.log(ac) - torch.log1p(-ac)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I), Eq. 6-7 of Ho et al. 2020.
        acp = self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        # posterior_variance[0] = 0; as in the DDPM/improved-diffusion code the log uses index 1 at t = 0.
        pv0 = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv0, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * self.alphas.sqrt() / (1.0 - ac)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, *, rescale_zero_terminal_snr: bool = False,
                  **params: float) -> "NoiseSchedule":
        """Build a named schedule (see SCHEDULES) with T = num_timesteps >= 2 steps."""
        if name not in _SCHEDULE_FUNCS:
            raise LddpmError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
            raise LddpmError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        func, allowed = _SCHEDULE_FUNCS[name]
        _check_params(name, params, allowed)
        betas = func(int(num_timesteps), **params)
        label = name
        if rescale_zero_terminal_snr:
            betas = _zero_terminal_snr(betas)
            label = f"{name}+zero_terminal_snr"
        return cls(betas, name=label)

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, T={self.num_timesteps})"

    def timesteps(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """Descending LongTensor of the original timesteps visited by a `num_steps`-step sampler.

        - leading  (DDIM code, diffusers default): t_i = i * (T // S), i < S        -> e.g. 980, ..., 20, 0
        - trailing (Lin et al. 2024, Table 2):     t_i = round(T - i * T / S) - 1    -> e.g. 999, ..., 39, 19
        - linspace (diffusers):                    round(linspace(0, T - 1, S))      -> e.g. 999, ..., 20, 0
        - quadratic (DDIM paper, CIFAR-10):        int(linspace(0, sqrt(0.8 T), S)^2); duplicates (for
          large S) are dropped, so it can return fewer than S steps.
        Rounding is numpy's (half to even), as in diffusers.
        """
        T = self.num_timesteps
        if spacing not in SPACINGS:
            raise LddpmError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise LddpmError(f"num_steps must be an integer in [1, {T}] (the schedule has T={T} steps), "
                             f"got {num_steps!r}")
        S = int(num_steps)
        if spacing == "leading":
            ts = np.arange(S) * (T // S)
        elif spacing == "trailing":
            ts = np.round(T - np.arange(S) * (T / S)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.round(np.linspace(0, T - 1, S))
        else:
            ts = np.unique((np.linspace(0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64))
        ts = np.unique(np.asarray(ts, dtype=np.int64))[::-1].copy()
        return torch.from_numpy(ts)

    # ---- the same schedule in sigma space (Karras et al. 2022's VE view: x / sqrt(abar) = x0 + sigma eps) ----
    @cached_property
    def sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1, float64, ascending; a zero-terminal-SNR schedule's
        last entry uses alpha_bar = ZERO_SNR_ALPHA_BAR (sigma 4096) instead of infinity."""
        ac = self.alphas_cumprod.numpy()
        ac = np.where(ac > 0.0, ac, ZERO_SNR_ALPHA_BAR)
        return np.sqrt((1.0 - ac) / ac)

    @cached_property
    def log_sigmas(self) -> np.ndarray:
        """log of `sigmas` (the table `sigma_to_t` / `t_to_sigma` interpolate)."""
        return np.log(self.sigmas)

    def sigma_to_t(self, sigma: float) -> float:
        """The fractional timestep of a noise level: log sigma interpolated linearly between the integer timesteps
        (k-diffusion's `DiscreteSchedule.sigma_to_t` and diffusers' `_sigma_to_t` do the same); sigma must lie in
        [sigma(0), sigma(T-1)] (`t_to_sigma` is its inverse)."""
        log_sigmas = self.log_sigmas
        ls = math.log(sigma)
        if not log_sigmas[0] - 1e-9 <= ls <= log_sigmas[-1] + 1e-9:
            raise LddpmError(f"sigma {sigma:.6g} is outside this schedule's range [{self.sigmas[0]:.6g}, "
                             f"{self.sigmas[-1]:.6g}]; give a noise level within it")
        i = int(np.clip(np.searchsorted(log_sigmas, ls) - 1, 0, len(log_sigmas) - 2))
        w = (ls - log_sigmas[i]) / (log_sigmas[i + 1] - log_sigmas[i])
        return float(i + min(max(w, 0.0), 1.0))

    def t_to_sigma(self, t: float) -> float:
        """sigma at a fractional timestep t in [0, T-1]: exp of log sigma interpolated linearly (inverse of sigma_to_t)."""
        log_sigmas = self.log_sigmas
        i = int(min(max(math.floor(t), 0), len(log_sigmas) - 2))
        w = t - i
        return float(math.exp((1.0 - w) * log_sigmas[i] + w * log_sigmas[i + 1]))

    def sigma_grid(self, num_steps: int, grid: str = "karras", *, spacing: str = "trailing", sigma_min: float = 0.0,
                   sigma_max: float = 0.0, rho: float = 7.0) -> list[float]:
        """The descending noise levels a `num_steps`-step sigma-space sampler visits, then 0 (the clean end).

        - time:   sigma(t) at the timesteps of `self.timesteps(num_steps, spacing)` (the DDIM / DPM-Solver++ grid);
                  levels outside [sigma_min, sigma_max] are dropped, so fewer steps can remain;
        - karras: `karras_sigmas(num_steps, sigma_min, sigma_max, rho)` (Karras et al. 2022, Eq. 5; rho = 7);
        - logsnr: `logsnr_sigmas(num_steps, sigma_min, sigma_max)` (uniform in log-SNR).
        sigma_min / sigma_max = 0 mean the schedule's own sigma(0) / sigma(T-1); both must lie in that range.
        """
        if grid not in SIGMA_GRIDS:
            raise LddpmError(f"unknown step grid {grid!r}; choose one of {', '.join(SIGMA_GRIDS)}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise LddpmError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not rho > 0:
            raise LddpmError(f"rho must be > 0 (Karras et al. use 7), got {rho!r}")
        sig = self.sigmas
        lo = float(sigma_min) if sigma_min else float(sig[0])
        hi = float(sigma_max) if sigma_max else float(sig[-1])
        for name, value in (("sigma_min", lo), ("sigma_max", hi)):
            if not sig[0] * (1 - 1e-9) <= value <= sig[-1] * (1 + 1e-9):
                raise LddpmError(f"{name} = {value:.6g} is outside this schedule's noise levels [{sig[0]:.6g}, "
                                 f"{sig[-1]:.6g}]; give a value within them (0: the schedule's own end)")
        if lo > hi:
            raise LddpmError(f"sigma_min ({lo:.6g}) is above sigma_max ({hi:.6g}); give sigma_min < sigma_max")
        if grid == "time":
            levels = [float(sig[t]) for t in self.timesteps(num_steps, spacing).tolist()]
            levels = [s for s in levels if lo * (1 - 1e-12) <= s <= hi * (1 + 1e-12)]
            if not levels:
                raise LddpmError(f"no timestep of the {num_steps}-step {spacing} grid has its noise level in "
                                 f"[{lo:.6g}, {hi:.6g}]; widen sigma_min / sigma_max or take more steps")
        elif grid == "karras":
            levels = karras_sigmas(num_steps, lo, hi, rho)
        else:
            levels = logsnr_sigmas(num_steps, lo, hi)
        return levels + [0.0]

    def respace(self, timesteps: torch.Tensor | list[int]) -> "NoiseSchedule":
        """Schedule over a subset of steps (improved-diffusion's respacing, Nichol & Dhariwal 2021 Sec. 4).

        New betas: beta'_i = 1 - abar[t_i] / abar[t_{i-1}] over the kept steps in ascending order
        (abar[t_{-1}] = 1), so alphas_cumprod of the result equals alphas_cumprod at the kept steps.
        """
        ts = sorted(int(t) for t in timesteps)
        if len(set(ts)) != len(ts) or ts[0] < 0 or ts[-1] >= self.num_timesteps:
            raise LddpmError(f"respacing needs distinct timesteps in [0, {self.num_timesteps}), got {ts}")
        ac = self.alphas_cumprod[ts]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return NoiseSchedule(1.0 - ac / prev, name=f"{self.name}[respaced {len(ts)}]")
