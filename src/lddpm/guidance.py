"""Guidance as model wrappers: classifier-free guidance, autoguidance, and the guidance interval.

Conventions (the scales are all "1 = no guidance", as DESIGN.md's guidance_scale):

- Classifier-free guidance (Ho & Salimans 2022): D = D_u + s (D_c - D_u); D_c is the conditional
  prediction, D_u the null branch (null label / null prompt, or a negative prompt). The paper's w is s - 1.
- Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
  D = D_g + w (D_c - D_g), with D_g a smaller or shorter-trained guide network of the same task, given
  the SAME condition as the main network (so it guides conditional and unconditional models alike).
- Both at once, the linear multi-guidance form: D = D_c + (s - 1)(D_c - D_u) + (w - 1)(D_c - D_g), i.e.
  (1 + w_cfg + w_ag) D_c - w_cfg D_u - w_ag D_g with w_cfg = s - 1, w_ag = w - 1: each guide's difference
  is added to the conditional prediction. With w = 1 it is exactly CFG, with s = 1 exactly autoguidance;
  moving guidance between the two at a fixed total s + w - 1 is a choice of (s, w) in this one form.
- Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample
  and distribution quality in diffusion models"): guidance only at noise levels sigma in
  [sigma_lo, sigma_hi], sigma = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022's VP-to-VE noise level);
  outside it ONE unguided evaluation of the main network with the condition (D = D_c).

Guidance acts on the raw network output in its own space (eps, x0 or v): for fixed x_t and t these are
affine maps of each other with the same coefficients for every branch, and affine maps commute with
the combinations above (their weights sum to 1), so guiding the output equals guiding the denoised x0
(EDM's D) or eps. With a learned variance (2C output channels) only the first C channels are guided;
the variance channels come from the conditional branch of the main network.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from lddpm.errors import LddpmError

Model = Callable[..., torch.Tensor]
Interval = tuple[float, float]


def _finite(name: str, value: float) -> float:
    """float(value), refusing NaN, infinity and non-numbers with one clear message."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LddpmError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise LddpmError(f"{name} must be a finite number, got {value!r}")
    return value


def check_interval(interval: Sequence[float] | None, what: str = "guidance_interval") -> Interval | None:
    """(sigma_lo, sigma_hi) as floats with 0 <= sigma_lo <= sigma_hi (sigma_hi may be inf); None stays None."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise LddpmError(f"{what} must be two noise levels (sigma_lo, sigma_hi), e.g. (0.28, 5.42); "
                         f"got {interval!r}") from None
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or not 0.0 <= lo <= hi:
        raise LddpmError(f"{what} = ({lo:g}, {hi:g}): needs 0 <= sigma_lo <= sigma_hi (sigma_hi may be inf), "
                         "sigma = sqrt((1 - alpha_bar) / alpha_bar)")
    return lo, hi


def interval_json(interval: Sequence[float] | None) -> list[float | None] | None:
    """An interval for a JSON file: [sigma_lo, sigma_hi], with null for an unbounded sigma_hi (inf is not JSON)."""
    if interval is None:
        return None
    return [float(v) if math.isfinite(float(v)) else None for v in interval]


def interval_from_json(interval: Sequence[float | None] | None) -> Interval | None:
    """The inverse of `interval_json`: [sigma_lo, sigma_hi] from a JSON file as a tuple, null sigma_hi as inf."""
    if not interval:
        return None
    lo, hi = interval
    return float(lo), math.inf if hi is None else float(hi)


def in_interval(sigma: float, interval: Interval | None) -> bool:
    """Whether guidance applies at noise level sigma: always without an interval, else sigma_lo <= sigma <= sigma_hi."""
    return interval is None or interval[0] <= sigma <= interval[1]


def timestep_sigma(alphas_cumprod: torch.Tensor, t: float) -> float:
    """sigma = sqrt((1 - abar_t) / abar_t) at timestep t (0-based); a fractional t interpolates log sigma
    linearly between its integer neighbours (k-diffusion's `t_to_sigma` convention). abar = 0: inf."""
    last = len(alphas_cumprod) - 1
    t = float(t)
    if not 0.0 <= t <= last:
        raise LddpmError(f"timestep {t:g} is outside the schedule's 0..{last}")

    def sigma(i: int) -> float:
        a = float(alphas_cumprod[i])
        return math.inf if a <= 0.0 else math.sqrt((1.0 - a) / a)

    lo = int(math.floor(t))
    frac = t - lo
    if frac == 0.0:
        return sigma(lo)
    s0, s1 = sigma(lo), sigma(lo + 1)
    if math.isinf(s1) or s0 == 0.0:
        return s1 if frac > 0.5 else s0
    return math.exp((1.0 - frac) * math.log(s0) + frac * math.log(s1))


def evaluations_per_step(sigma: float, *, guidance_scale: float = 1.0, guide_scale: float = 1.0,
                         interval: Interval | None = None, guide: bool = False) -> tuple[int, int]:
    """(main-network rows, guide-network rows) one denoiser call costs per image at noise level sigma.

    Inside the interval: CFG's batched conditional + null forward is 2 rows (1 at s = 0, the null branch
    alone), autoguidance adds 1 guide row; outside: 1 main row.
    """
    if not in_interval(sigma, interval):
        return 1, 0
    main = 2 if guidance_scale not in (0.0, 1.0) else 1
    return main, 1 if (guide and guide_scale != 1.0) else 0


def mix(out_c: torch.Tensor, out_u: torch.Tensor | None, out_g: torch.Tensor | None, guidance_scale: float,
        guide_scale: float, channels: int) -> torch.Tensor:
    """The guided output from the conditional (out_c), null (out_u) and guide (out_g) outputs (module docstring).

    Only the first `channels` channels are mixed (a learned variance's channels come from out_c).
    """
    s, w = guidance_scale, guide_scale
    c = out_c[:, :channels]
    if out_g is None:                                  # classifier-free guidance
        u = out_u[:, :channels]
        guided = u + s * (c - u)
    elif out_u is None:                                # autoguidance
        g = out_g[:, :channels]
        guided = g + w * (c - g)
    else:                                              # both: the multi-guidance form
        u, g = out_u[:, :channels], out_g[:, :channels]
        guided = c + (s - 1.0) * (c - u) + (w - 1.0) * (c - g)
    if out_c.shape[1] == channels:
        return guided
    return torch.cat([guided, out_c[:, channels:]], dim=1)


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

    def both_branches(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                      kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional output, null output) from ONE forward of the batch twice (condition, null condition)."""
        null = self.null_condition(x)
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
        return out_c, out_u

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 context: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Guided prediction for x_t at t with labels y and/or prompt states context (None: the null branch)."""
        s = self.guidance_scale
        cond = {k: v.to(x.device) for k, v in (("y", y), ("context", context)) if v is not None}
        if s == 1.0:
            return self.model(x, t, **cond, **kwargs)
        if not cond or s == 0.0:
            return self.model(x, t, **self.null_condition(x), **kwargs)
        out_c, out_u = self.both_branches(x, t, cond, kwargs)
        return mix(out_c, out_u, None, s, 1.0, x.shape[1])


class GuidedModel(ClassifierFreeGuidance):
    """Classifier-free guidance and autoguidance together, each applied only inside the guidance interval.

    `guide` is the guide network (same diffusion, objective, data and conditioning as `model`; see
    `lddpm.pipeline.check_guide`), `guide_scale` its w (1: not used). `interval` = (sigma_lo, sigma_hi) or
    None (guidance at every step); the caller passes each call's noise level as `sigma=` (`lddpm.sampling.Denoiser`
    does, for every sampler); without it `alphas_cumprod` (the schedule the timesteps index) turns the call's
    timestep into sigma, and every row of the call must then share one timestep.
    """

    def __init__(self, model: Model, guidance_scale: float = 1.0, null_label: int | None = None, *,
                 null_context: torch.Tensor | None = None, guide: Model | None = None, guide_scale: float = 1.0,
                 interval: Sequence[float] | None = None, alphas_cumprod: torch.Tensor | None = None) -> None:
        super().__init__(model, guidance_scale, null_label, null_context=null_context)
        self.guide_scale = _finite("guide_scale", guide_scale)
        if self.guide_scale != 1.0 and guide is None:
            raise LddpmError(f"guide_scale={self.guide_scale:g} needs a guide network: give a guide run or checkpoint "
                             "(--guide RUN_OR_CKPT, load_pipeline(run, guide=...), sample(..., guide=network)), "
                             "or use guide_scale=1")
        self.guide = guide
        self.interval = check_interval(interval)
        if self.interval is not None and alphas_cumprod is None:
            raise LddpmError("a guidance interval needs the schedule's alphas_cumprod to turn timesteps into sigma")
        self.alphas_cumprod = alphas_cumprod

    def sigma(self, t: torch.Tensor) -> float:
        """The noise level of this call's timestep (one for every row)."""
        first = t.reshape(-1)[0]
        if not bool((t == first).all()):
            raise LddpmError("guidance with an interval needs one timestep per call; got several in one batch")
        return timestep_sigma(self.alphas_cumprod, float(first))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 context: torch.Tensor | None = None, *, sigma: float | None = None, **kwargs: Any) -> torch.Tensor:
        """The guided prediction inside the interval; one conditional evaluation of the main network outside it.
        `sigma`: this call's noise level (default: from the timestep t)."""
        cond = {k: v.to(x.device) for k, v in (("y", y), ("context", context)) if v is not None}
        if self.interval is not None and not in_interval(self.sigma(t) if sigma is None else float(sigma),
                                                         self.interval):
            return self.model(x, t, **cond, **kwargs)
        if self.guide is None or self.guide_scale == 1.0:
            return super().__call__(x, t, y, context, **kwargs)
        s = self.guidance_scale
        if s != 1.0 and (not cond or s == 0.0):      # CFG reduces to the null branch: guide that
            cond, s = self.null_condition(x), 1.0
        if s == 1.0:
            out_c, out_u = self.model(x, t, **cond, **kwargs), None
        else:
            out_c, out_u = self.both_branches(x, t, cond, kwargs)
        out_g = self.guide(x, t, **cond, **kwargs)   # the guide sees the same condition (Karras et al. 2024)
        return mix(out_c, out_u, out_g, s, self.guide_scale, x.shape[1])


def guided_model(model: Model, *, guidance_scale: float = 1.0, null_label: int | None = None,
                 null_context: torch.Tensor | None = None, guide: Model | None = None, guide_scale: float = 1.0,
                 interval: Sequence[float] | None = None, alphas_cumprod: torch.Tensor | None = None) -> Model:
    """The network as the samplers call it: itself (no guidance), ClassifierFreeGuidance (CFG at every step),
    or GuidedModel (autoguidance and/or an interval)."""
    guidance_scale = _finite("guidance_scale", guidance_scale)
    guide_scale = _finite("guide_scale", guide_scale)
    interval = check_interval(interval)
    autoguided = guide_scale != 1.0
    if not autoguided and interval is None:
        return ClassifierFreeGuidance(model, guidance_scale, null_label, null_context=null_context) \
            if guidance_scale != 1.0 else model
    if not autoguided and guidance_scale == 1.0:
        return model                                 # an interval with nothing to guide
    return GuidedModel(model, guidance_scale, null_label, null_context=null_context, guide=guide,
                       guide_scale=guide_scale, interval=interval, alphas_cumprod=alphas_cumprod)
