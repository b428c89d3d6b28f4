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

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lddpm.diffusion import GaussianDiffusion, output_from_x0_eps, randn, x0_eps_from_output
from lddpm import solvers
from lddpm.errors import LddpmError
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


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022) as a model wrapper: out_u + s (out_c - out_u).

    s = guidance_scale (s = 1: conditional model, s = 0: unconditional; the paper's w is s - 1). The
    conditional and null branches run in ONE batched forward. The condition is a class label `y`
    (null branch: the null label) and/or a prompt's token states `context` (null branch:
    `null_context`, the encoding of "" as in Stable Diffusion, or of a negative prompt, which then
    replaces the null branch). Guidance is applied to the raw output in its own space: for fixed
    x_t and t, eps, x0 and v are affine maps of each other with the same coefficients for both
    branches, and an affine map commutes with out_u + s (out_c - out_u), so guiding v or x0 equals
    guiding eps. With a learned variance (2C output channels) only the first C channels are guided;
    the variance channels come from the conditional branch. A restoration task's conditioning image
    (`cond_image`, lddpm.tasks) is given to both branches: guidance is over the label or prompt only.
    """

    def __init__(self, model: Model, guidance_scale: float, null_label: int | None = None, *,
                 null_context: torch.Tensor | None = None) -> None:
        if guidance_scale != 1.0 and null_label is None and null_context is None:
            raise LddpmError(f"guidance_scale={guidance_scale} needs a null condition: this model is unconditional "
                             "(guidance needs a class- or prompt-conditional model trained with condition dropout); "
                             "use guidance_scale=1")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.null_label = null_label
        self.null_context = null_context

    def null_condition(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The null branch's condition for a batch like x: null labels and/or the null prompt's states."""
        null: dict[str, torch.Tensor] = {}
        if self.null_label is not None:
            null["y"] = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        if self.null_context is not None:
            ctx = self.null_context.to(x.device)
            null["context"] = ctx.expand(x.shape[0], *ctx.shape[1:]) if ctx.shape[0] == 1 else ctx
        return null

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 context: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Guided prediction for x_t at t with labels y and/or prompt states context (None: the null branch)."""
        s = self.guidance_scale
        cond = {k: v.to(x.device) for k, v in (("y", y), ("context", context)) if v is not None}
        if s == 1.0:
            return self.model(x, t, **cond, **kwargs)
        null = self.null_condition(x)
        if not cond or s == 0.0:
            return self.model(x, t, **null, **kwargs)
        missing = sorted(set(cond) - set(null))
        if missing:
            raise LddpmError(f"guidance over {', '.join(missing)} needs its null condition "
                             f"({'the null label' if 'y' in missing else 'the null prompt states'})")
        both = {k: torch.cat([cond[k], null[k]]) for k in cond}
        both.update({k: torch.cat([v, v]) for k, v in null.items() if k not in cond})
        # other per-image inputs (a task's conditioning image) are the same in both branches
        both.update({k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] else v
                     for k, v in kwargs.items()})
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **both)
        out_c, out_u = out.chunk(2)
        C = x.shape[1]
        if out.shape[1] == 2 * C:                    # learned variance: guide the mean channels only
            guided = out_u[:, :C] + s * (out_c[:, :C] - out_u[:, :C])
            return torch.cat([guided, out_c[:, C:]], dim=1)
        return out_u + s * (out_c - out_u)


class Denoiser:
    """The network as the samplers see it: guided, conditioned, converted to (x0, eps), clipped.

    model(x_t, t, **cond) predicts the diffusion's objective; t is broadcast from one int. With
    guidance_scale != 1 the model is wrapped in ClassifierFreeGuidance (one batched forward for
    both branches). clip_x0 clips predicted x0 to [-1, 1] and re-derives eps from it (as
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
                 null_context: torch.Tensor | None = None, clip_x0: bool = True, eps_scaling: float = 1.0,
                 eps_scaling_k: float = 0.0) -> None:
        if not math.isfinite(float(guidance_scale)):
            raise LddpmError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.network = model
        self.model = (ClassifierFreeGuidance(model, guidance_scale, null_label, null_context=null_context)
                      if guidance_scale != 1.0 else model)
        self.diffusion = diffusion
        self.cond = {k: v for k, v in (cond or {}).items() if v is not None}
        self.clip_x0 = clip_x0
        self.eps_scaling, self.eps_scaling_k = float(eps_scaling), float(eps_scaling_k)
        self.nfe = 0

    def timestep(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """t broadcast to a LongTensor (B,) on x's device."""
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

    def eps_scale(self, t: float) -> float:
        """Epsilon scaling's lambda(t) = eps_scaling + eps_scaling_k * t (Ning et al. 2023); 1 when off."""
        return self.eps_scaling + self.eps_scaling_k * float(t)

    def _output(self, x: torch.Tensor, tt: torch.Tensor, a: float, b: float) -> torch.Tensor:
        """The (guided) model output at x_t = a x0 + b eps, with epsilon scaling applied in the output's space."""
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
        out = self._output(x, tt, a, sigma * a)
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
    the last (2N - 1); guidance runs both branches in one batched evaluation."""
    kind, levels = sampling_grid(sampler, num_steps, diffusion, sampler_options=sampler_options, spacing=spacing)
    n = len(levels) - (1 if kind == "sigmas" else 0)
    return n * sampler_spec(sampler).evaluations_per_step - (sampler_spec(sampler).evaluations_per_step - 1)


def _model_device(model: Model) -> torch.device:
    """Device of the model's first parameter, or CPU for a plain function."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def sample(model: Model, diffusion: GaussianDiffusion, shape: tuple[int, ...], *, sampler: str = "ddim",
           num_steps: int | None = None, eta: float = 0.0, spacing: str | None = None, clip_x0: bool = True,
           y: torch.Tensor | None = None, guidance_scale: float = 1.0, null_label: int | None = None,
           context: torch.Tensor | None = None, null_context: torch.Tensor | None = None,
           generator: Generator = None, x_T: torch.Tensor | None = None,
           device: torch.device | str | None = None, progress: Progress = None,
           variance: str = "small", sampler_options: SamplerOptions | dict[str, Any] | None = None) -> torch.Tensor:
    """Generate a batch of samples of `shape` (B, C, H, W) with a named sampler (see SAMPLERS).

    num_steps defaults: see `default_num_steps`. spacing defaults to "trailing" (Lin et al.
    2024: starts at t = T - 1). clip_x0 clips predicted x0 to [-1, 1] (pass False for latents).
    x_T defaults to N(0, I) from `generator` (same seed -> same samples). eta is DDIM's; variance is
    DDPM's ("small" or "large"; a learned-variance model uses its own). A text model takes `context`
    (B, L, D) prompt states and, for guidance, `null_context` (the states of "" or a negative prompt).
    `sampler_options` (a dict or `SamplerOptions`): the step grid, sigma_min / sigma_max, epsilon scaling,
    EDM's churn, the multistep order (docs/samplers.md). A sigma-space sampler starts from
    z = x_T sqrt(1 + sigma_max^2), the VE form of the VP sample x_T at t(sigma_max).
    """
    spec = sampler_spec(sampler)
    check_eta(sampler, eta)
    options = check_sampler_options(sampler, sampler_options)
    kind, levels = sampling_grid(sampler, num_steps, diffusion, sampler_options=options, spacing=spacing)
    if device is None:
        device = x_T.device if x_T is not None else _model_device(model)
    if x_T is None:
        x_T = randn(tuple(shape), generator, device)
    elif tuple(x_T.shape) != tuple(shape):
        raise LddpmError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    cond = {"y": y.to(device) if y is not None else None, "context": context.to(device) if context is not None else None}
    denoiser = Denoiser(model, diffusion, cond=cond, guidance_scale=guidance_scale, null_label=null_label,
                        null_context=null_context, clip_x0=clip_x0,
                        eps_scaling=1.0 if options.eps_scaling is None else options.eps_scaling,
                        eps_scaling_k=options.eps_scaling_k or 0.0)
    if kind == "timesteps":
        extra = {"eta": eta} if spec.takes_eta else {"variance": variance} if spec.takes_variance else {}
        return spec.fn(denoiser, x_T.to(device), levels, generator=generator, progress=progress, **extra)
    fn = spec.fn if spec.default_grid is not None else spec.sigma_fn
    extra = {k: v for k, v in options.given().items() if k in _CHURN_OPTIONS}
    if spec.default_order is not None:
        extra["order"] = options.order or spec.default_order
    z = x_T.to(device) * math.sqrt(1.0 + levels[0] ** 2)
    return fn(denoiser, z, levels, generator=generator, progress=progress, **extra)
