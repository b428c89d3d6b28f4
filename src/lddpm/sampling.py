"""Samplers: DDPM (ancestral), DDIM and DPM-Solver++(2M) over one `Denoiser`, a registry, and `sample()`.

The `Denoiser` (the shape of k-diffusion's / EDM's preconditioning wrapper) owns everything between
a sampler and the network: timestep broadcasting, conditioning, classifier-free guidance, the
conversion from the model's objective (eps / x0 / v) to (x0, eps), and clipping. Each sampler is
then the paper's update rule alone, with one signature:

    sample_X(denoiser, x_T, timesteps, *, <its options>, generator=None, progress=None) -> x_0

`timesteps` are the descending ORIGINAL timesteps to visit (from `NoiseSchedule.timesteps`); each
sampler ends at alpha_bar = 1 (the clean sample). `generator` is a torch.Generator, or one per image
(a list) so that an image's noise does not depend on the batch it is in. `progress` is True (a
progress bar) or a callback that every step calls with its state, as k-diffusion's samplers do:
{"i": step index, "total": steps, "t": original timestep, "x": the sample entering the step,
"denoised": the x0 prediction the step uses}, to watch or save intermediates. `SAMPLERS` maps each
name to its function and defaults; `sample()`, the CLI and config validation all read it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lddpm.diffusion import GaussianDiffusion, output_from_x0_eps, randn, x0_eps_from_output
from lddpm import solvers
from lddpm.errors import LddpmError
from lddpm.distributed import check_bf16
from lddpm.guidance import (ClassifierFreeGuidance, GuidedModel, check_interval, guided_model,  # noqa: F401  (CFG: public here too)
                            interval_json)
from lddpm.progress import progress_bar
from lddpm.solvers import SamplerOptions

DEFAULT_SPACING = "trailing"

Model = Callable[..., torch.Tensor]
Progress = Callable[[dict[str, Any]], Any] | bool | None   # a progress bar (True) or callback(step state)
Generator = torch.Generator | Sequence[torch.Generator] | None


def _steps(n: int, progress: Progress, desc: str):
    """range(n), under a progress bar when progress is True."""
    return progress_bar(range(n), progress is True, desc=desc, leave=False)


def _report(progress: Progress, **state: Any) -> None:
    """Call a callback `progress` with one step's state (i, total, t, x, denoised; see the module docstring)."""
    if callable(progress):
        progress(state)


def _alpha_bar(diffusion: GaussianDiffusion, t: int) -> float:
    """alphas_cumprod[t] as a Python float; t = -1 means the clean end point (alpha_bar = 1)."""
    return 1.0 if t < 0 else float(diffusion.schedule.alphas_cumprod[t])


def _as_list(timesteps: torch.Tensor | list[int]) -> list[int]:
    """Timesteps as a descending list of ints (validated)."""
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
        raise LddpmError(f"timesteps must be a non-empty strictly descending sequence, got {ts[:8]}...")
    return ts


class Denoiser:
    """The network as the samplers see it: guided, conditioned, converted to (x0, eps), clipped.

    model(x_t, t, **cond) predicts the diffusion's objective; t is broadcast from one int. With
    guidance_scale != 1 the model is wrapped in ClassifierFreeGuidance (one batched forward for
    both branches); with a `guide` network and guide_scale != 1 (autoguidance) or a
    `guidance_interval` (sigma_lo, sigma_hi), in lddpm.guidance.GuidedModel (see lddpm.guidance for the
    formulas). Every model call goes through `_output`, which gives a GuidedModel with an interval the call's
    exact noise level sigma = sqrt(1 - abar) / sqrt(abar), so the interval holds for the timestep samplers and
    the sigma-space ones (fractional t, churn's raised sigma) alike. clip_x0 clips predicted x0 to [-1, 1]
    and re-derives eps from it (as
    improved-diffusion / GLIDE do); pass False for latents.

    eps_scaling (b) and eps_scaling_k (k): epsilon scaling (Ning et al. 2023, "Elucidating the exposure bias in
    diffusion models"): the predicted eps is divided by lambda(t) = b + k t (t the original, possibly
    fractional, timestep) and x0 re-derived from it, whatever the objective (v and x0 are converted to eps
    first), before clipping; (1, 0) leaves the model as it is. At alpha_bar = 0 (a zero-terminal-SNR
    schedule's last step) x0 cannot be re-derived, so the output is left unscaled there.
    `denoise(z, sigma)` is the same network in the VE view of the sigma-space samplers (`lddpm.solvers`).
    `nfe` counts the (guided) model evaluations made so far.
    """

    def __init__(self, model: Model, diffusion: GaussianDiffusion, *, cond: dict[str, Any] | None = None,
                 guidance_scale: float = 1.0, null_label: int | None = None,
                 null_context: torch.Tensor | None = None, clip_x0: bool = True, guide: Model | None = None,
                 guide_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
                 eps_scaling: float = 1.0, eps_scaling_k: float = 0.0) -> None:
        if not math.isfinite(float(guidance_scale)):
            raise LddpmError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.network = model
        self.model = guided_model(model, guidance_scale=guidance_scale, null_label=null_label,
                                  null_context=null_context, guide=guide, guide_scale=guide_scale,
                                  interval=guidance_interval, alphas_cumprod=diffusion.schedule.alphas_cumprod)
        self.diffusion = diffusion
        self.cond = {k: v for k, v in (cond or {}).items() if v is not None}
        self.clip_x0 = clip_x0
        self.eps_scaling, self.eps_scaling_k = float(eps_scaling), float(eps_scaling_k)
        self._needs_sigma = isinstance(self.model, GuidedModel) and self.model.interval is not None
        self.nfe = 0

    def timestep(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """t broadcast to a LongTensor (B,) on x's device."""
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

    def eps_scale(self, t: float) -> float:
        """Epsilon scaling's lambda(t) = eps_scaling + eps_scaling_k * t (Ning et al. 2023); 1 when off."""
        return self.eps_scaling + self.eps_scaling_k * float(t)

    def _output(self, x: torch.Tensor, tt: torch.Tensor, a: float, b: float,
                sigma: float | None = None) -> torch.Tensor:
        """The (guided) model output at x_t = a x0 + b eps, with epsilon scaling applied in the output's space.
        `sigma`: the call's noise level for a guidance interval (None: the GuidedModel reads it off the integer t)."""
        if self._needs_sigma:                        # the guidance interval: this call's exact noise level
            out = self.model(x, tt, sigma=sigma, **self.cond)
        else:
            out = self.model(x, tt, **self.cond)
        self.nfe += 1
        lam = self.eps_scale(float(tt[0]))
        if lam == 1.0 or a <= 0.0:
            return out
        d = self.diffusion
        mean, var = d.split_output(out, x)
        x0, eps = x0_eps_from_output(d.objective, mean, x, a, b)
        eps = eps / lam
        scaled = output_from_x0_eps(d.objective, (x - b * eps) / a, eps, a, b)
        return scaled if var is None else torch.cat([scaled, var], dim=1)

    def _ab(self, t: int) -> tuple[float, float]:
        """sqrt(abar_t), sqrt(1 - abar_t) at an integer timestep."""
        s = self.diffusion.schedule
        return float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t])

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The (guided) raw model output at x_t, timestep t."""
        return self._output(x, self.timestep(x, t), *self._ab(t))

    def x0_eps(self, x: torch.Tensor, t: int, *, clip: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) predicted at x_t, t; clipped per `clip` (default: the denoiser's clip_x0)."""
        tt = self.timestep(x, t)
        return self.diffusion.predict_x0_eps(self._output(x, tt, *self._ab(t)), x, tt,
                                             clip=self.clip_x0 if clip is None else clip)

    def sigma_to_t(self, sigma: float) -> float:
        """The fractional timestep of noise level sigma (`NoiseSchedule.sigma_to_t`), clamped to [0, T - 1]."""
        sig = self.diffusion.schedule.sigmas
        return self.diffusion.schedule.sigma_to_t(min(max(float(sigma), float(sig[0])), float(sig[-1])))

    def denoise(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(z; sigma) = E[x0 | z] in the VE view z = x_t / sqrt(abar) = x0 + sigma eps (Karras et al. 2022):
        the VP network at x_t = z / sqrt(1 + sigma^2) and the fractional timestep t(sigma) (log sigma
        interpolated over the discrete schedule; a float tensor, which the timestep embedding takes as it
        is), converted to x0 with the exact coefficients of sigma, scaled and clipped like `x0_eps`. A sigma
        outside the schedule's range (EDM's churn can raise it above sigma(T-1)) uses the nearest end's t."""
        sigma = float(sigma)
        a = 1.0 / math.sqrt(1.0 + sigma * sigma)
        x = z * a
        t = self.sigma_to_t(sigma)
        tt = torch.full((z.shape[0],), t, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32,
                        device=z.device)
        out = self._output(x, tt, a, sigma * a, sigma)
        mean = self.diffusion.split_output(out, x)[0]
        return x0_eps_from_output(self.diffusion.objective, mean, x, a, sigma * a, clip=self.clip_x0)[0]


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor | list[int], *,
                variance: str = "small", generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, over all steps or a respaced subset.

    A subset is handled as improved-diffusion's respacing (Nichol & Dhariwal 2021, Sec. 4): betas of
    the kept steps are 1 - abar[t_i] / abar[t_{i-1}]; the model still receives the original t.
    variance: "small" (beta_tilde), "large" (beta) or, for a learned-variance model, the learned one.
    """
    ts = _as_list(timesteps)
    rd = denoiser.diffusion.respace(ts)              # index j of rd <-> original timestep ts[S-1-j]
    S = len(ts)
    for i in _steps(S, progress, "ddpm"):
        x_prev, x0 = ddpm_step(denoiser, rd, x, ts[i], S - 1 - i, variance=variance, generator=generator)
        _report(progress, i=i, total=S, t=ts[i], x=x, denoised=x0)
        x = x_prev
    return x


def ddpm_step(denoiser: Denoiser, respaced: GaussianDiffusion, x: torch.Tensor, t: int, j: int, *,
              variance: str = "small", generator: Generator = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t_prev} (Algorithm 2 of Ho et al. 2020) on a respaced diffusion: the
    model sees the original timestep t, the posterior uses step j of `respaced`; returns (x_prev, x0 prediction).

    Shared by `sample_ddpm` and RePaint (lddpm.editing), whose reverse step is this one.
    """
    out = denoiser(x, t)
    pm = respaced.p_mean_variance(out, x, denoiser.timestep(x, j), clip_x0=denoiser.clip_x0, variance=variance)
    x_prev = pm["mean"]
    if j > 0:                                        # x_{t-1} = mu + sigma z; no noise at the last step
        x_prev = x_prev + torch.exp(0.5 * pm["log_variance"]) * randn(tuple(x.shape), generator, x.device, x.dtype)
    return x_prev, pm["x0"]


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor | list[int], *, eta: float = 0.0,
                generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta = 0 deterministic, eta = 1 DDPM-like; last step to alpha_bar = 1."""
    check_eta("ddim", eta)
    ts = _as_list(timesteps)
    diffusion = denoiser.diffusion
    for i in _steps(len(ts), progress, "ddim"):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_prev = _alpha_bar(diffusion, ts[i]), _alpha_bar(diffusion, t_prev)
        x0, eps = denoiser.x0_eps(x, ts[i])
        _report(progress, i=i, total=len(ts), t=ts[i], x=x, denoised=x0)
        # Eq. 16: sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        # Eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(tuple(x.shape), generator, x.device, x.dtype)
    return x


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, timesteps: torch.Tensor | list[int], *,
                progress: Progress = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) run forward from clean x0 to the largest timestep (DDIM inversion).

    Each step uses the unclipped prediction at the current point (the first one, at the clean point,
    evaluates the model at the smallest timestep); for an exact model the map inverts
    `sample_ddim(eta=0)` up to the discretization error.
    """
    ts = _as_list(timesteps)[::-1]
    diffusion = denoiser.diffusion
    x = x0
    for i in _steps(len(ts), progress, "ddim-invert"):
        s = ts[i - 1] if i > 0 else -1
        a_s, a_t = _alpha_bar(diffusion, s), _alpha_bar(diffusion, ts[i])
        x0, eps = denoiser.x0_eps(x, max(s, ts[0]), clip=False)
        _report(progress, i=i, total=len(ts), t=max(s, ts[0]), x=x, denoised=x0)
        x0_pred = (x - math.sqrt(1.0 - a_s) * eps) / math.sqrt(a_s)
        x = math.sqrt(a_t) * x0_pred + math.sqrt(1.0 - a_t) * eps
    return x


def _half_log_snr(a: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), +-inf at abar = 1 / 0."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return 0.5 * (math.log(a) - math.log1p(-a))


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor | list[int], *,
                    generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 (multistep, second order, data prediction).

    The first step (no history) and the last step (to alpha_bar = 1, i.e. lambda = +inf, where the
    update reduces to x = x0) are first order, as diffusers' DPMSolverMultistepScheduler does.
    """
    ts = _as_list(timesteps)
    diffusion = denoiser.diffusion
    x0_prev, h_prev = None, None
    for i in _steps(len(ts), progress, "dpm++2m"):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_n = _alpha_bar(diffusion, ts[i]), _alpha_bar(diffusion, t_next)
        x0 = denoiser.x0_eps(x, ts[i])[0]
        _report(progress, i=i, total=len(ts), t=ts[i], x=x, denoised=x0)
        if t_next < 0:                               # sigma_next = 0: the first-order update is x0 itself
            x = x0
            break
        h = _half_log_snr(a_n) - _half_log_snr(a_t)  # h_i = lambda_{t_i} - lambda_{t_{i-1}}
        if x0_prev is None:
            d = x0                                   # DPM-Solver++(1) = DDIM
        else:
            r = h_prev / h                           # r_i = h_{i-1} / h_i
            d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
        # x_{t_i} = (sigma_i / sigma_{i-1}) x - alpha_i (e^{-h_i} - 1) D_i
        x = math.sqrt((1.0 - a_n) / (1.0 - a_t)) * x - math.sqrt(a_n) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its update rule, default step count (None: all T), whether it draws noise, which
    `SamplerOptions` it takes and, for a sigma-space sampler (`lddpm.solvers`), its default step grid.

    A timestep sampler (default_grid None) runs `fn(denoiser, x_T, timesteps, ...)`; with a grid other than
    "time" it runs `sigma_fn` (the same method on sigmas) instead, where it has one. A sigma-space sampler runs
    `fn(denoiser, z, sigmas, ...)` on `NoiseSchedule.sigma_grid`.
    """

    fn: Callable[..., torch.Tensor]
    default_steps: int | None
    stochastic: bool
    takes_eta: bool = False
    takes_variance: bool = False
    default_grid: str | None = None
    options: tuple[str, ...] = ("sigma_min", "sigma_max", "eps_scaling", "eps_scaling_k")
    sigma_fn: Callable[..., torch.Tensor] | None = None
    default_order: int | None = None
    evaluations_per_step: int = 1   # Heun: 2 (minus one for the last step)


_TIMESTEP_OPTIONS = ("sigma_min", "sigma_max", "eps_scaling", "eps_scaling_k")
_GRID_OPTIONS = _TIMESTEP_OPTIONS + ("grid", "rho")
_CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")

SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, None, stochastic=True, takes_variance=True),
    "ddim": SamplerSpec(sample_ddim, 50, stochastic=False, takes_eta=True),   # stochastic when eta > 0
    "dpm++2m": SamplerSpec(sample_dpmpp_2m, 20, stochastic=False, options=_GRID_OPTIONS,
                           sigma_fn=solvers.sample_dpmpp_2m_sigmas),
    # sigma-space samplers (lddpm.solvers); stochastic when s_churn > 0 (euler, heun)
    "euler": SamplerSpec(solvers.sample_euler, 50, stochastic=False, default_grid="karras",
                         options=_GRID_OPTIONS + _CHURN_OPTIONS),
    "heun": SamplerSpec(solvers.sample_heun, 18, stochastic=False, default_grid="karras",
                        options=_GRID_OPTIONS + _CHURN_OPTIONS, evaluations_per_step=2),
    "dpm++3m": SamplerSpec(solvers.sample_dpmpp_3m, 20, stochastic=False, default_grid="logsnr", options=_GRID_OPTIONS),
    "dpm++2m-sde": SamplerSpec(solvers.sample_dpmpp_2m_sde, 25, stochastic=True, default_grid="logsnr",
                               options=_GRID_OPTIONS),
    "unipc": SamplerSpec(solvers.sample_unipc, 20, stochastic=False, default_grid="logsnr",
                         options=_GRID_OPTIONS + ("order",), default_order=3),
    "ipndm": SamplerSpec(solvers.sample_ipndm, 20, stochastic=False, default_grid="karras",
                         options=_GRID_OPTIONS + ("order",), default_order=solvers.IPNDM_MAX_ORDER),
}


def sampler_spec(name: str) -> SamplerSpec:
    """The registered sampler `name`; unknown -> LddpmError listing the choices."""
    if name not in SAMPLERS:
        raise LddpmError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_eta(sampler: str, eta: float) -> None:
    """eta must lie in [0, 1] and is DDIM's alone."""
    if not 0.0 <= float(eta) <= 1.0:
        raise LddpmError(f"eta must be in [0, 1], got {eta!r}")
    if eta != 0.0 and not sampler_spec(sampler).takes_eta:
        raise LddpmError(f"eta={eta} applies only to the 'ddim' sampler, not {sampler!r}")


def check_sampler_options(sampler: str, sampler_options: SamplerOptions | dict[str, Any] | None) -> SamplerOptions:
    """The options parsed and checked for `sampler`: known names, valid values, and only those it takes."""
    spec = sampler_spec(sampler)
    options = SamplerOptions.of(sampler_options).check()
    for name in options.given():
        if name == "grid":
            continue
        if name not in spec.options:
            takers = [n for n, sp in SAMPLERS.items() if name in sp.options]
            raise LddpmError(f"{name} does not apply to the {sampler!r} sampler; it applies to {', '.join(takers)}")
    if options.grid is not None and options.grid != "time" and spec.default_grid is None and spec.sigma_fn is None:
        raise LddpmError(f"the {sampler!r} sampler runs on the schedule's timesteps (grid 'time'); for a "
                         f"{options.grid!r} grid use a sigma-space sampler such as euler (DDIM's update on any grid)")
    if options.order is not None and spec.default_order is not None:
        top = solvers.IPNDM_MAX_ORDER if sampler == "ipndm" else solvers.UNIPC_MAX_ORDER
        if options.order > top:
            raise LddpmError(f"order {options.order} is too high for {sampler!r}; choose 1..{top}")
    return options


def default_num_steps(sampler: str, num_timesteps: int) -> int:
    """The sampler's default step count: all T for ddpm, 50 for ddim and euler, 20 for dpm++2m, dpm++3m, unipc and
    ipndm, 18 for heun (EDM's CIFAR-10 setting, 35 evaluations), 25 for dpm++2m-sde."""
    return sampler_spec(sampler).default_steps or num_timesteps


def is_stochastic(sampler: str, eta: float = 0.0, sampler_options: SamplerOptions | dict[str, Any] | None = None) -> bool:
    """Whether the sampler draws noise after x_T (ddpm, dpm++2m-sde; ddim with eta > 0; euler / heun with
    s_churn > 0)."""
    spec = sampler_spec(sampler)
    churn = SamplerOptions.of(sampler_options).s_churn or 0.0
    return spec.stochastic or (spec.takes_eta and eta > 0) or ("s_churn" in spec.options and churn > 0)


def sampling_grid(sampler: str, num_steps: int | None, diffusion: GaussianDiffusion, *,
                  sampler_options: SamplerOptions | dict[str, Any] | None = None,
                  spacing: str | None = None) -> tuple[str, list]:
    """What the sampler visits: ("timesteps", descending ints) for ddpm / ddim / dpm++2m on the "time" grid, or
    ("sigmas", descending noise levels ending in 0) for the sigma-space samplers. sigma_min / sigma_max drop the
    timesteps whose sigma(t) lies outside [sigma_min, sigma_max] (the last one left then jumps to x0)."""
    spec = sampler_spec(sampler)
    options = check_sampler_options(sampler, sampler_options)
    schedule = diffusion.schedule
    steps = default_num_steps(sampler, diffusion.num_timesteps) if num_steps is None else num_steps
    spacing = spacing or DEFAULT_SPACING
    grid = options.grid or spec.default_grid or "time"
    if spec.default_grid is None and grid == "time":
        ts = schedule.timesteps(steps, spacing).tolist()
        if options.sigma_min or options.sigma_max:
            # the same range checks as the sigma grids, then keep the timesteps whose sigma lies inside
            levels = schedule.sigma_grid(steps, "time", spacing=spacing, sigma_min=options.sigma_min or 0.0,
                                         sigma_max=options.sigma_max or 0.0)[:-1]
            keep = set(levels)
            ts = [t for t in ts if float(schedule.sigmas[t]) in keep]
        return "timesteps", ts
    return "sigmas", schedule.sigma_grid(steps, grid, spacing=spacing, sigma_min=options.sigma_min or 0.0,
                                         sigma_max=options.sigma_max or 0.0, rho=options.rho or 7.0)


def count_model_evaluations(sampler: str, num_steps: int | None, diffusion: GaussianDiffusion, *,
                            sampler_options: SamplerOptions | dict[str, Any] | None = None,
                            spacing: str | None = None) -> int:
    """The sampler's number of (guided) model evaluations, NFE: one per visited step, Heun two per step but
    the last (2N - 1); guidance runs both branches in one batched evaluation (its rows: `lddpm.guidance`)."""
    return len(model_evaluation_sigmas(sampler, num_steps, diffusion, sampler_options=sampler_options,
                                       spacing=spacing))


def model_evaluation_sigmas(sampler: str, num_steps: int | None, diffusion: GaussianDiffusion, *,
                            sampler_options: SamplerOptions | dict[str, Any] | None = None,
                            spacing: str | None = None) -> list[float]:
    """The noise level sigma = sqrt((1 - abar) / abar) of every model evaluation the sampler makes, in order (the
    levels `Denoiser` tells a guidance interval): each visited timestep's (inf where abar = 0), or each grid level
    but the final 0, raised by EDM's churn where it applies (euler, heun), plus Heun's correction at the next
    level (none on the step to 0, so 2N - 1). Its length is `count_model_evaluations`."""
    entry = sampler_spec(sampler)
    options = check_sampler_options(sampler, sampler_options)
    kind, levels = sampling_grid(sampler, num_steps, diffusion, sampler_options=options, spacing=spacing)
    if kind == "timesteps":
        return [math.sqrt((1.0 - a) / a) if a > 0.0 else math.inf for a in (_alpha_bar(diffusion, t) for t in levels)]
    n = len(levels) - 1
    churn = (options.s_churn or 0.0) if "s_churn" in entry.options else 0.0
    s_tmin = options.s_tmin or 0.0
    s_tmax = math.inf if options.s_tmax is None else options.s_tmax
    out: list[float] = []
    for i in range(n):
        sigma = levels[i]
        gamma = min(churn / n, math.sqrt(2.0) - 1.0) if churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
        out.append(sigma * (1.0 + gamma))                # `solvers._churn`'s sigma_hat
        if entry.evaluations_per_step == 2 and levels[i + 1] > 0.0:
            out.append(levels[i + 1])
    return out


def _model_device(model: Model) -> torch.device:
    """Device of the model's first parameter, or CPU for a plain function."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


LABEL_POLICIES = ("balanced", "none")


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample, as one value: the sampler and its options, guidance, and the evaluation's sampling policy.

    `sample()` uses the sampler fields (sampler, num_steps, eta, spacing, variance) and the guidance fields
    (guidance_scale; guide_scale and guidance_interval with the guide network it is given);
    `Pipeline.generate` also seed, batch_size, negative_prompt and `guide` (a run folder or checkpoint file
    of the guide network, loaded once); evaluation (`lddpm.evaluate.evaluate_checkpoint`, `lddpm eval`, study
    cells) also labels ("balanced": N/classes images per class; "none": the null label), prompts (a text
    run's prompt set: a JSONL / text file or the records, cycled to N) and bf16 (how the run is loaded).
    num_steps None: the sampler's default (`default_num_steps`); spacing None: "trailing".
    The scales are 1 for "no guidance" (see lddpm.guidance); guidance_interval = (sigma_lo, sigma_hi).
    sampler_options (a `SamplerOptions` or a dict of its fields, checked against the sampler; None when none is
    set): the step grid, sigma_min / sigma_max, epsilon scaling, churn, order (docs/samplers.md).
    """

    sampler: str = "ddim"
    num_steps: int | None = None
    eta: float = 0.0
    spacing: str | None = None
    variance: str = "small"
    guidance_scale: float = 1.0
    guide: str | None = None
    guide_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    labels: str = "balanced"
    prompts: str | tuple[dict[str, Any], ...] | None = None
    negative_prompt: str | None = None
    seed: int = 0
    batch_size: int = 64
    bf16: bool | str = False
    sampler_options: SamplerOptions | None = None

    def __post_init__(self) -> None:
        sampler_spec(self.sampler)                                 # an unknown sampler: the list of names
        check_eta(self.sampler, self.eta)
        for name in ("guidance_scale", "guide_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LddpmError(f"{name} must be a finite number, got {value!r}")
        for name, value, low in (("seed", self.seed, 0), ("batch_size", self.batch_size, 1)):  # num_steps: by the schedule
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise LddpmError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.labels not in LABEL_POLICIES:
            raise LddpmError(f"labels must be one of {', '.join(LABEL_POLICIES)}, got {self.labels!r}")
        if self.variance not in ("small", "large"):
            raise LddpmError(f"variance must be 'small' or 'large' (DDPM's), got {self.variance!r}")
        if self.guide is not None and not isinstance(self.guide, str):
            object.__setattr__(self, "guide", str(self.guide))     # a Path
        object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
        if isinstance(self.prompts, list):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        elif self.prompts is not None and not isinstance(self.prompts, (str, tuple)):
            object.__setattr__(self, "prompts", str(self.prompts))  # a Path
        check_bf16("bf16", self.bf16)
        options = check_sampler_options(self.sampler, self.sampler_options)   # a dict becomes SamplerOptions
        object.__setattr__(self, "sampler_options", options if options.given() else None)

    def replace(self, **changes: Any) -> "SamplingSpec":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def steps_for(self, diffusion: GaussianDiffusion) -> int:
        """num_steps, or the sampler's default for this diffusion."""
        return default_num_steps(self.sampler, diffusion.num_timesteps) if self.num_steps is None else self.num_steps

    def timesteps(self, diffusion: GaussianDiffusion) -> torch.Tensor:
        """The descending original timesteps of the schedule's grid under this spacing (a timestep sampler
        visits these unless sigma_min / sigma_max drop some; `grid` says what the sampler really visits)."""
        return diffusion.schedule.timesteps(self.steps_for(diffusion), self.spacing or DEFAULT_SPACING)

    def grid(self, diffusion: GaussianDiffusion) -> tuple[str, list]:
        """What the sampler visits (`sampling_grid`): ("timesteps", ints) or ("sigmas", levels ending in 0)."""
        return sampling_grid(self.sampler, self.num_steps, diffusion, sampler_options=self.sampler_options,
                             spacing=self.spacing)

    def options(self) -> dict[str, Any]:
        """The sampler options that are set, as a plain dict ({} when none; what result files record)."""
        return self.sampler_options.given() if self.sampler_options is not None else {}

    def evaluation_sigmas(self, diffusion: GaussianDiffusion) -> list[float]:
        """`model_evaluation_sigmas`: the noise level of each (guided) model evaluation; its length is the NFE."""
        return model_evaluation_sigmas(self.sampler, self.num_steps, diffusion, sampler_options=self.sampler_options,
                                       spacing=self.spacing)

    def guidance_settings(self) -> dict[str, Any]:
        """The guidance fields that differ from "none", for result files (absent when unused, so older files match)."""
        out: dict[str, Any] = {}
        if self.guide is not None:
            out["guide"] = self.guide
        if self.guide_scale != 1.0:
            out["guide_scale"] = self.guide_scale
        if self.guidance_interval is not None:
            out["guidance_interval"] = interval_json(self.guidance_interval)  # null: no upper bound
        if self.spacing is not None:
            out["spacing"] = self.spacing
        return out


def resolve_spec(spec: SamplingSpec | None, **keywords: Any) -> SamplingSpec:
    """A SamplingSpec from `spec` or from keywords (None = not given), never both: one place says each setting."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if spec is None:
        return SamplingSpec(**given)
    if not isinstance(spec, SamplingSpec):
        raise LddpmError(f"spec must be a lddpm.SamplingSpec, got {type(spec).__name__}")
    if given:
        raise LddpmError(f"give the sampling settings in the SamplingSpec or as keywords, not both "
                         f"(got {', '.join(sorted(given))} beside a spec; use spec.replace({next(iter(sorted(given)))}=...))")
    return spec


def sample(model: Model, diffusion: GaussianDiffusion, shape: tuple[int, ...], spec: SamplingSpec | None = None, *,
           sampler: str | None = None, num_steps: int | None = None, eta: float | None = None,
           spacing: str | None = None, clip_x0: bool = True, y: torch.Tensor | None = None,
           guidance_scale: float | None = None, null_label: int | None = None,
           context: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
           generator: Generator = None, x_T: torch.Tensor | None = None,
           device: torch.device | str | None = None, progress: Progress = None,
           variance: str | None = None, guide: Model | None = None, guide_scale: float | None = None,
           guidance_interval: tuple[float, float] | None = None,
           sampler_options: SamplerOptions | dict[str, Any] | None = None) -> torch.Tensor:
    """Generate a batch of samples of `shape` (B, C, H, W) with a named sampler (see SAMPLERS).

    The settings come from `spec` (a SamplingSpec) or, as before, from keywords (None: the default;
    not both). num_steps defaults: see `default_num_steps`. spacing defaults to "trailing" (Lin et al.
    2024: starts at t = T - 1). clip_x0 clips predicted x0 to [-1, 1] (pass False for latents).
    x_T defaults to N(0, I) from `generator` (same seed -> same samples). eta is DDIM's; variance is
    DDPM's ("small" or "large"; a learned-variance model uses its own). A text model takes `context`
    (B, L, D) prompt states and, for guidance, `null_context` (the states of "" or a negative prompt).
    Autoguidance takes the guide network as `guide` (a function like `model`) with guide_scale != 1;
    guidance_interval = (sigma_lo, sigma_hi) limits guidance to those noise levels (lddpm.guidance), for
    every sampler: the Denoiser tells the guided model each call's sigma.
    `sampler_options` (a dict or `SamplerOptions`): the step grid, sigma_min / sigma_max, epsilon scaling,
    EDM's churn, the multistep order (docs/samplers.md). A sigma-space sampler starts from
    z = x_T sqrt(1 + sigma_max^2), the VE form of the VP sample x_T at t(sigma_max).
    """
    spec = resolve_spec(spec, sampler=sampler, num_steps=num_steps, eta=eta, spacing=spacing, variance=variance,
                        guidance_scale=guidance_scale, guide_scale=guide_scale, guidance_interval=guidance_interval,
                        sampler_options=sampler_options)
    entry = sampler_spec(spec.sampler)
    options = SamplerOptions.of(spec.sampler_options)           # checked by the spec
    kind, levels = spec.grid(diffusion)
    if device is None:
        device = x_T.device if x_T is not None else _model_device(model)
    if x_T is None:
        x_T = randn(tuple(shape), generator, device)
    elif tuple(x_T.shape) != tuple(shape):
        raise LddpmError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    cond = {"y": y.to(device) if y is not None else None, "context": context.to(device) if context is not None else None}
    denoiser = Denoiser(model, diffusion, cond=cond, guidance_scale=spec.guidance_scale, null_label=null_label,
                        null_context=null_context, clip_x0=clip_x0, guide=guide, guide_scale=spec.guide_scale,
                        guidance_interval=spec.guidance_interval,
                        eps_scaling=1.0 if options.eps_scaling is None else options.eps_scaling,
                        eps_scaling_k=options.eps_scaling_k or 0.0)
    if kind == "timesteps":
        extra = {"eta": spec.eta} if entry.takes_eta else {"variance": spec.variance} if entry.takes_variance else {}
        return entry.fn(denoiser, x_T.to(device), levels, generator=generator, progress=progress, **extra)
    fn = entry.fn if entry.default_grid is not None else entry.sigma_fn
    extra = {k: v for k, v in options.given().items() if k in _CHURN_OPTIONS}
    if entry.default_order is not None:
        extra["order"] = options.order or entry.default_order
    z = x_T.to(device) * math.sqrt(1.0 + levels[0] ** 2)
    return fn(denoiser, z, levels, generator=generator, progress=progress, **extra)
