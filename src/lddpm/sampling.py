"""Samplers: DDPM (ancestral), DDIM and DPM-Solver++(2M), classifier-free guidance, and `sample()`.

Every sampler has the same shape: `sample_X(model, x, diffusion, timesteps, *, ..., cond, generator,
progress)`; `x` is x_T, `timesteps` the descending ORIGINAL timesteps to visit (from
`NoiseSchedule.timesteps`), and the model is only ever called as `model(x_t, t, **cond)` with t a
LongTensor (B,) of original timesteps. Each sampler ends at alpha_bar = 1 (the clean sample).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lddpm.diffusion import GaussianDiffusion, randn
from lddpm.errors import LddpmError

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
DEFAULT_NUM_STEPS = {"ddpm": None, "ddim": 50, "dpm++2m": 20}   # None: all T steps
DEFAULT_SPACING = "trailing"

Model = Callable[..., torch.Tensor]
Progress = Callable[[int, int], Any] | bool | None


def _steps(n: int, progress: Progress, desc: str):
    """Iterate range(n), reporting progress to tqdm (progress=True) or a callable(steps_done, total)."""
    if progress is True:
        from tqdm.auto import tqdm
        yield from tqdm(range(n), desc=desc, leave=False)
        return
    for i in range(n):
        yield i
        if callable(progress):
            progress(i + 1, n)


def _alpha_bar(diffusion: GaussianDiffusion, t: int) -> float:
    """alphas_cumprod[t] as a Python float; t = -1 means the clean end point (alpha_bar = 1)."""
    return 1.0 if t < 0 else float(diffusion.schedule.alphas_cumprod[t])


def _as_list(timesteps: torch.Tensor | list[int]) -> list[int]:
    """Timesteps as a descending list of ints (validated)."""
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
        raise LddpmError(f"timesteps must be a non-empty strictly descending sequence, got {ts[:8]}...")
    return ts


@torch.no_grad()
def sample_ddpm(model: Model, x: torch.Tensor, diffusion: GaussianDiffusion,
                timesteps: torch.Tensor | list[int], *, variance: str = "small", clip_x0: bool = True,
                cond: dict[str, Any] | None = None, generator: torch.Generator | None = None,
                progress: Progress = None) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, over all steps or a respaced subset.

    A subset is handled as improved-diffusion's respacing (Nichol & Dhariwal 2021, Sec. 4): betas of
    the kept steps are 1 - abar[t_i] / abar[t_{i-1}]; the model still receives the original t.
    variance: "small" (beta_tilde), "large" (beta) or, for a learned-variance model, the learned one.
    """
    ts = _as_list(timesteps)
    cond = cond or {}
    rd = diffusion.respace(ts)                       # index j of rd <-> original timestep ts[S-1-j]
    S = len(ts)
    for i in _steps(S, progress, "ddpm"):
        j = S - 1 - i
        t = torch.full((x.shape[0],), ts[i], dtype=torch.long, device=x.device)
        out = model(x, t, **cond)
        pm = rd.p_mean_variance(out, x, torch.full_like(t, j), clip_x0=clip_x0, variance=variance)
        x = pm["mean"]
        if j > 0:                                    # x_{t-1} = mu + sigma z; no noise at the last step
            x = x + torch.exp(0.5 * pm["log_variance"]) * randn(tuple(x.shape), generator, x.device, x.dtype)
    return x


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, diffusion: GaussianDiffusion,
                timesteps: torch.Tensor | list[int], *, eta: float = 0.0, clip_x0: bool = True,
                cond: dict[str, Any] | None = None, generator: torch.Generator | None = None,
                progress: Progress = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta = 0 deterministic, eta = 1 DDPM-like; last step to alpha_bar = 1.

    With clip_x0, eps is re-derived from the clipped x0 (as improved-diffusion / GLIDE do).
    """
    if not 0.0 <= eta <= 1.0:
        raise LddpmError(f"eta must be in [0, 1], got {eta!r}")
    ts = _as_list(timesteps)
    cond = cond or {}
    for i in _steps(len(ts), progress, "ddim"):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_prev = _alpha_bar(diffusion, ts[i]), _alpha_bar(diffusion, t_prev)
        t = torch.full((x.shape[0],), ts[i], dtype=torch.long, device=x.device)
        x0, eps = diffusion.predict_x0_eps(model(x, t, **cond), x, t)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = diffusion.eps_from_x0(x0, x, t)
        # Eq. 16: sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        # Eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(tuple(x.shape), generator, x.device, x.dtype)
    return x


@torch.no_grad()
def ddim_invert(model: Model, x0: torch.Tensor, diffusion: GaussianDiffusion,
                timesteps: torch.Tensor | list[int], *, cond: dict[str, Any] | None = None,
                progress: Progress = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) run forward from clean x0 to the largest timestep (DDIM inversion).

    Each step uses the prediction at the current point (the first one, at the clean point, evaluates
    the model at the smallest timestep); for an exact model the map inverts `sample_ddim(eta=0)`
    up to the discretization error.
    """
    ts = _as_list(timesteps)[::-1]
    cond = cond or {}
    x = x0
    for i in _steps(len(ts), progress, "ddim-invert"):
        s = ts[i - 1] if i > 0 else -1
        a_s, a_t = _alpha_bar(diffusion, s), _alpha_bar(diffusion, ts[i])
        tm = torch.full((x.shape[0],), max(s, ts[0]), dtype=torch.long, device=x.device)
        _, eps = diffusion.predict_x0_eps(model(x, tm, **cond), x, tm)
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
def sample_dpmpp_2m(model: Model, x: torch.Tensor, diffusion: GaussianDiffusion,
                    timesteps: torch.Tensor | list[int], *, clip_x0: bool = True,
                    cond: dict[str, Any] | None = None, generator: torch.Generator | None = None,
                    progress: Progress = None) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 (multistep, second order, data prediction).

    The first step (no history) and the last step (to alpha_bar = 1, i.e. lambda = +inf, where the
    update reduces to x = x0) are first order, as diffusers' DPMSolverMultistepScheduler does.
    """
    ts = _as_list(timesteps)
    cond = cond or {}
    x0_prev, h_prev = None, None
    for i in _steps(len(ts), progress, "dpm++2m"):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_n = _alpha_bar(diffusion, ts[i]), _alpha_bar(diffusion, t_next)
        t = torch.full((x.shape[0],), ts[i], dtype=torch.long, device=x.device)
        x0 = diffusion.predict_x0_eps(model(x, t, **cond), x, t)[0]
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
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


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022) as a model wrapper: out_u + s (out_c - out_u).

    s = guidance_scale (s = 1: conditional model, s = 0: unconditional; the paper's w is s - 1). The
    conditional and null branches run in ONE batched forward. Guidance is applied to the raw output
    in its own space: for fixed x_t and t, eps, x0 and v are affine maps of each other with the same
    coefficients for both branches, and an affine map commutes with out_u + s (out_c - out_u), so
    guiding v or x0 equals guiding eps. With a learned variance (2C output channels) only the first C
    channels are guided; the variance channels come from the conditional branch.
    """

    def __init__(self, model: Model, guidance_scale: float, null_label: int | None) -> None:
        if guidance_scale != 1.0 and null_label is None:
            raise LddpmError(f"guidance_scale={guidance_scale} needs a null label (a class-conditional model "
                             "trained with label dropout); use guidance_scale=1 for this model")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.null_label = null_label

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Guided prediction for x_t at t with labels y (None: all null)."""
        s = self.guidance_scale
        if s == 1.0:
            return self.model(x, t, y=y, **kwargs)
        null = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        if y is None or s == 0.0:
            return self.model(x, t, y=null, **kwargs)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y.to(x.device), null]), **kwargs)
        out_c, out_u = out.chunk(2)
        C = x.shape[1]
        if out.shape[1] == 2 * C:                    # learned variance: guide the mean channels only
            guided = out_u[:, :C] + s * (out_c[:, :C] - out_u[:, :C])
            return torch.cat([guided, out_c[:, C:]], dim=1)
        return out_u + s * (out_c - out_u)


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
           generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
           device: torch.device | str | None = None, progress: Progress = None,
           variance: str = "small") -> torch.Tensor:
    """Generate a batch of samples of `shape` (B, C, H, W) with a named sampler (see SAMPLERS).

    num_steps defaults: ddpm all T, ddim 50, dpm++2m 20. spacing defaults to "trailing" (Lin et al.
    2024: starts at t = T - 1). clip_x0 clips predicted x0 to [-1, 1] (pass False for latents).
    x_T defaults to N(0, I) from `generator` (same seed -> same samples). eta is DDIM's; variance is
    DDPM's ("small" or "large"; a learned-variance model uses its own).
    """
    if sampler not in SAMPLERS:
        raise LddpmError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= float(eta) <= 1.0:
        raise LddpmError(f"eta must be in [0, 1], got {eta!r}")
    if eta != 0.0 and sampler != "ddim":
        raise LddpmError(f"eta={eta} applies only to the 'ddim' sampler, not {sampler!r}")
    if guidance_scale != 1.0 and null_label is None:
        raise LddpmError(f"guidance_scale={guidance_scale} needs null_label (the model's unconditional label); "
                         "use guidance_scale=1 for an unconditional model")
    if num_steps is None:
        num_steps = DEFAULT_NUM_STEPS[sampler] or diffusion.num_timesteps
    timesteps = diffusion.schedule.timesteps(num_steps, spacing or DEFAULT_SPACING)
    if device is None:
        device = x_T.device if x_T is not None else _model_device(model)
    if x_T is None:
        x_T = randn(tuple(shape), generator, device)
    elif tuple(x_T.shape) != tuple(shape):
        raise LddpmError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    x = x_T.to(device)
    if guidance_scale != 1.0:
        model = ClassifierFreeGuidance(model, guidance_scale, null_label)
    cond = {"y": y.to(device)} if y is not None else {}
    if guidance_scale != 1.0 and y is None:
        cond = {"y": None}
    common = dict(clip_x0=clip_x0, cond=cond, generator=generator, progress=progress)
    if sampler == "ddpm":
        return sample_ddpm(model, x, diffusion, timesteps, variance=variance, **common)
    if sampler == "ddim":
        return sample_ddim(model, x, diffusion, timesteps, eta=eta, **common)
    return sample_dpmpp_2m(model, x, diffusion, timesteps, **common)
