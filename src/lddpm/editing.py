"""Editing and restoration with a trained denoiser: image-to-image (SDEdit), inpainting (RePaint, or a network
trained with mask channels), super-resolution (SR3) and denoising of a noisy image.

Everything here works on tensors (images in [-1, 1], or scaled latents) and a model function
`model(x_t, t, **cond)`, as `lddpm.sampling.sample` does; `Pipeline.edit`, `inpaint`, `upscale` and
`denoise` add image arrays, the VAE of latent runs, labels or prompts, and per-image seeds. None of
these methods has its own copy of a sampler's update rule: they start a registered sampler from the
user's image (SDEdit, denoising), give it a conditioning image (task networks), or, for RePaint,
interleave the DDPM step (`lddpm.sampling.ddpm_step`) with the known pixels re-noised to each level.

Conventions: a mask is 1 where pixels are generated (white in a mask PNG) and 0 where they are kept.
`generator` is a torch.Generator or one per image (a list), as for the samplers: the first draw of
each image's stream is its starting noise, so results do not depend on the batch an image is in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lddpm.diffusion import GaussianDiffusion, randn
from lddpm.errors import LddpmError
from lddpm.sampling import (DEFAULT_SPACING, Denoiser, Generator, Model, Progress, check_eta, ddpm_step,
                            default_num_steps, sampler_spec)
from lddpm.tasks import inpaint_condition, upsample

# Median of |N(0, 1)|: sigma = median(|d|) / 0.6745 for Gaussian noise d (Donoho & Johnstone 1994).
MAD_TO_SIGMA = 0.6744897501960817


# ------------------------------------------------------------------------------------------------ shared parts


def make_denoiser(model: Model, diffusion: GaussianDiffusion, *, y: torch.Tensor | None = None,
                  context: torch.Tensor | None = None, cond_image: torch.Tensor | None = None,
                  guidance_scale: float = 1.0, null_label: int | None = None,
                  null_context: torch.Tensor | None = None, clip_x0: bool = True) -> Denoiser:
    """The `Denoiser` of `sample()`, with a task network's conditioning image among its conditions."""
    return Denoiser(model, diffusion, cond={"y": y, "context": context, "cond_image": cond_image},
                    guidance_scale=guidance_scale, null_label=null_label, null_context=null_context, clip_x0=clip_x0)


def sampler_timesteps(diffusion: GaussianDiffusion, sampler: str, num_steps: int | None = None,
                      spacing: str | None = None) -> list[int]:
    """The descending timestep grid `sample()` would visit with these settings."""
    steps = default_num_steps(sampler, diffusion.num_timesteps) if num_steps is None else num_steps
    return [int(t) for t in diffusion.schedule.timesteps(steps, spacing or DEFAULT_SPACING)]


def run_sampler(sampler: str, denoiser: Denoiser, x: torch.Tensor, timesteps: list[int], *, eta: float = 0.0,
                variance: str = "small", generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """The registered sampler `sampler` from x = x_t at timesteps[0] down to the clean end, with its own options.

    A sigma-space sampler (euler, heun, dpm++3m, dpm++2m-sde, unipc, ipndm; `lddpm.solvers`) runs on the same
    timesteps as noise levels sigma(t) = sqrt((1 - abar_t) / abar_t), then 0, from z = x_t / sqrt(abar_t) =
    x_t sqrt(1 + sigma^2), as `sample()` does on the "time" grid (its churn and order at their defaults).
    """
    spec = sampler_spec(sampler)
    check_eta(sampler, eta)
    if spec.default_grid is not None:
        sig = denoiser.diffusion.schedule.sigmas
        sigmas = [float(sig[int(t)]) for t in timesteps] + [0.0]
        extra = {"order": spec.default_order} if spec.default_order is not None else {}
        z = x * math.sqrt(1.0 + sigmas[0] ** 2)
        return spec.fn(denoiser, z, sigmas, generator=generator, progress=progress, **extra)
    options = {"eta": eta} if spec.takes_eta else {"variance": variance} if spec.takes_variance else {}
    return spec.fn(denoiser, x, timesteps, generator=generator, progress=progress, **options)


def _check_unit(name: str, value: float) -> float:
    """A finite number in [0, 1]."""
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise LddpmError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def _alpha_bar(diffusion: GaussianDiffusion, t: int) -> float:
    return float(diffusion.schedule.alphas_cumprod[t])


# ------------------------------------------------------------------------------------------------ SDEdit


def strength_timesteps(diffusion: GaussianDiffusion, strength: float, sampler: str = "ddim",
                       num_steps: int | None = None, spacing: str | None = None) -> list[int]:
    """The last round(strength * S) timesteps of the sampler's S-step grid: where SDEdit starts and steps.

    strength 1 is the whole grid (plain sampling), 0 none (the input is returned); diffusers'
    img2img pipelines truncate their grid the same way.
    """
    strength = _check_unit("strength", strength)
    ts = sampler_timesteps(diffusion, sampler, num_steps, spacing)
    k = int(math.floor(strength * len(ts) + 0.5))
    return ts[len(ts) - k:]


@torch.no_grad()
def sdedit(model: Model, diffusion: GaussianDiffusion, x0: torch.Tensor, strength: float, *, sampler: str = "ddim",
           num_steps: int | None = None, eta: float = 0.0, spacing: str | None = None, variance: str = "small",
           clip_x0: bool = True, y: torch.Tensor | None = None, context: torch.Tensor | None = None,
           cond_image: torch.Tensor | None = None, guidance_scale: float = 1.0, null_label: int | None = None,
           null_context: torch.Tensor | None = None, generator: Generator = None,
           progress: Progress = None) -> torch.Tensor:
    """Image-to-image with SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with SDEs").

    The input x0 is noised by q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) to the first timestep t of
    `strength_timesteps` and denoised from there by `sampler` over the rest of its grid. strength 0 returns
    x0 unchanged; strength 1 starts from the noise alone, so it is exactly `sample()` with the same generator.
    """
    ts = strength_timesteps(diffusion, strength, sampler, num_steps, spacing)
    if not ts:
        return x0.clone()
    noise = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    full = len(sampler_timesteps(diffusion, sampler, num_steps, spacing))
    if len(ts) == full:
        x = noise                                    # strength 1: plain sampling from this noise
    else:
        x = diffusion.q_sample(x0, torch.full((x0.shape[0],), ts[0], dtype=torch.long, device=x0.device), noise)
    denoiser = make_denoiser(model, diffusion, y=y, context=context, cond_image=cond_image,
                             guidance_scale=guidance_scale, null_label=null_label, null_context=null_context,
                             clip_x0=clip_x0)
    return run_sampler(sampler, denoiser, x, ts, eta=eta, variance=variance, generator=generator, progress=progress)


# ------------------------------------------------------------------------------------------------ conditional models


@torch.no_grad()
def sample_conditioned(model: Model, diffusion: GaussianDiffusion, cond_image: torch.Tensor, shape: tuple[int, ...], *,
                       sampler: str = "ddim", num_steps: int | None = None, eta: float = 0.0,
                       spacing: str | None = None, variance: str = "small", clip_x0: bool = True,
                       y: torch.Tensor | None = None, guidance_scale: float = 1.0, null_label: int | None = None,
                       generator: Generator = None, progress: Progress = None) -> torch.Tensor:
    """Samples of `shape` from a task network given its conditioning channels at every step (any sampler)."""
    x = randn(tuple(shape), generator, cond_image.device, cond_image.dtype)
    denoiser = make_denoiser(model, diffusion, y=y, cond_image=cond_image, guidance_scale=guidance_scale,
                             null_label=null_label, clip_x0=clip_x0)
    ts = sampler_timesteps(diffusion, sampler, num_steps, spacing)
    return run_sampler(sampler, denoiser, x, ts, eta=eta, variance=variance, generator=generator, progress=progress)


def inpaint_with_model(model: Model, diffusion: GaussianDiffusion, x0: torch.Tensor, mask: torch.Tensor,
                       **kwargs: Any) -> torch.Tensor:
    """Inpainting with a network trained for it (task "inpaint"): it reads [mask, x0 * (1 - mask)] at every
    step; the kept pixels of x0 are pasted back into the result. kwargs: those of `sample_conditioned`."""
    out = sample_conditioned(model, diffusion, inpaint_condition(x0, mask), tuple(x0.shape), **kwargs)
    return mask * out + (1.0 - mask) * x0


def super_resolve(model: Model, diffusion: GaussianDiffusion, low: torch.Tensor, resolution: int,
                  **kwargs: Any) -> torch.Tensor:
    """Super-resolution with a network trained for it (SR3, Saharia et al. 2021): the low-resolution images
    (B, C, h, w) are upsampled to `resolution` (bicubic) and read as extra channels at every step."""
    cond = upsample(low, resolution)
    return sample_conditioned(model, diffusion, cond, tuple(cond.shape), **kwargs)


# ------------------------------------------------------------------------------------------------ RePaint


def repaint_schedule(num_steps: int, jump_length: int = 10, resamplings: int = 10) -> list[int]:
    """The grid positions RePaint visits, from S (pure noise) to 0 (clean), with its resampling jumps.

    Lugmayr et al. 2022, Sec. 4.2: going down, at every `jump_length`-th position (counted from the top, the
    last `jump_length` steps excepted) the chain jumps back up `jump_length` positions, one forward noising
    step each, and goes down again; this happens `resamplings - 1` times at each such position (resamplings
    1: no jumps, plain replacement). Consecutive entries differ by one: down a reverse step, up a forward one.
    """
    for name, value in (("num_steps", num_steps), ("jump_length", jump_length), ("resamplings", resamplings)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LddpmError(f"{name} must be an integer >= 1, got {value!r}")
    jumps = {p: resamplings - 1 for p in range(num_steps - jump_length, 0, -jump_length)}
    path, p = [num_steps], num_steps
    while p > 0:
        p -= 1
        path.append(p)
        if jumps.get(p, 0) > 0:
            jumps[p] -= 1
            for _ in range(jump_length):
                p += 1
                path.append(p)
    return path


@torch.no_grad()
def repaint(model: Model, diffusion: GaussianDiffusion, x0: torch.Tensor, mask: torch.Tensor, *, num_steps: int = 50,
            jump_length: int = 5, resamplings: int = 5, spacing: str | None = None, variance: str = "small",
            clip_x0: bool = True, y: torch.Tensor | None = None, context: torch.Tensor | None = None,
            cond_image: torch.Tensor | None = None, guidance_scale: float = 1.0, null_label: int | None = None,
            null_context: torch.Tensor | None = None, generator: Generator = None,
            progress: Progress = None) -> torch.Tensor:
    """Inpainting with any unconditional or conditional model: RePaint (Lugmayr et al. 2022, Algorithm 1).

    Over a `num_steps` grid (respaced as for `sample_ddpm`), each reverse step from level p to p - 1 sets
        x_{p-1} = (1 - m) * [sqrt(abar_{p-1}) x0 + sqrt(1 - abar_{p-1}) eps] + m * ddpm_step(x_p),   eps fresh,
    i.e. the kept pixels are the input re-noised to the new level and the generated ones come from the DDPM
    step; the last step (to abar = 1) keeps x0 exactly. Resampling (`repaint_schedule`) re-noises x_{p-1}
    to x_p with q(x_p | x_{p-1}) = N(sqrt(1 - beta_p) x_{p-1}, beta_p I) and steps down again, which lets
    the generated region agree with the kept one. Cost: about resamplings x num_steps network evaluations.
    """
    ts = sampler_timesteps(diffusion, "ddpm", num_steps, spacing)
    S = len(ts)
    rd = diffusion.respace(ts)                       # position p <-> original timestep ts[S - p], rd index p - 1
    abar = [1.0] + [float(a) for a in rd.schedule.alphas_cumprod]   # abar at positions 0..S
    betas = [0.0] + [float(b) for b in rd.schedule.betas]
    mask = mask.to(device=x0.device, dtype=x0.dtype)  # (B or 1, 1 or C, H, W): broadcast against x0
    denoiser = make_denoiser(model, diffusion, y=y, context=context, cond_image=cond_image,
                             guidance_scale=guidance_scale, null_label=null_label, null_context=null_context,
                             clip_x0=clip_x0)
    path = repaint_schedule(S, jump_length, resamplings)
    x = randn(tuple(x0.shape), generator, x0.device, x0.dtype)     # x at position S: pure noise
    for k in range(1, len(path)):
        p_from, p = path[k - 1], path[k]
        if p < p_from:                               # reverse step p_from -> p, then the kept pixels
            unknown, x0_pred = ddpm_step(denoiser, rd, x, ts[S - p_from], p_from - 1, variance=variance,
                                         generator=generator)
            if p > 0:
                eps = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
                known = math.sqrt(abar[p]) * x0 + math.sqrt(1.0 - abar[p]) * eps
            else:
                known = x0
            if callable(progress):
                progress({"i": k - 1, "total": len(path) - 1, "t": ts[S - p_from], "x": x, "denoised": x0_pred})
            x = mask * unknown + (1.0 - mask) * known
        else:                                        # resampling: forward step p - 1 -> p
            z = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
            x = math.sqrt(1.0 - betas[p]) * x + math.sqrt(betas[p]) * z
    return x


# ------------------------------------------------------------------------------------------------ denoising


def estimate_noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Per-image std of additive white Gaussian noise (B,), from the finest Haar wavelet's diagonal band.

    The robust MAD estimator of Donoho & Johnstone 1994: sigma = median(|HH|) / 0.6745, with the
    orthonormal Haar coefficients HH = (a - b - c + d) / 2 of each 2x2 block (unit variance for unit
    noise). Edges put large values in HH, which the median ignores; flat or smooth images give the best
    estimates. Units are those of the images (for [-1, 1] images: 8-bit std / 127.5).
    """
    x = images.double()
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2.0
    return (hh.abs().flatten(1).median(dim=1).values / MAD_TO_SIGMA).to(images.dtype)


def noise_level_sigma(diffusion: GaussianDiffusion) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) (T,) float64: the noise std of x_t / sqrt(abar_t) in data units."""
    ac = diffusion.schedule.alphas_cumprod
    return ((1.0 - ac) / ac).sqrt()


def noise_timestep(diffusion: GaussianDiffusion, sigma: float) -> int:
    """The first timestep whose sigma_t = sqrt((1 - abar_t) / abar_t) reaches sigma (sigma > 0)."""
    sigmas = noise_level_sigma(diffusion)
    if not float(sigma) <= float(sigmas[-1]):
        raise LddpmError(f"noise std sigma = {float(sigma):.4g} is beyond this schedule's largest level "
                         f"({float(sigmas[-1]):.4g}); nothing of the image is left to restore: sample instead")
    return int(torch.searchsorted(sigmas, torch.tensor([float(sigma)], dtype=torch.float64))[0])


@torch.no_grad()
def denoise(model: Model, diffusion: GaussianDiffusion, noisy: torch.Tensor, sigma: float | torch.Tensor, *,
            method: str = "sample", sampler: str = "ddpm", num_steps: int | None = None, eta: float = 0.0,
            spacing: str | None = None, variance: str = "small", clip_x0: bool = True,
            y: torch.Tensor | None = None, context: torch.Tensor | None = None, guidance_scale: float = 1.0,
            null_label: int | None = None, null_context: torch.Tensor | None = None, generator: Generator = None,
            progress: Progress = None) -> torch.Tensor:
    """Remove additive Gaussian noise of std `sigma` (data units; one number or one per image) from `noisy`.

    noisy = x + sigma n is x_t / sqrt(abar_t) at the level where sigma_t = sqrt((1 - abar_t) / abar_t)
    equals sigma: sqrt(abar_t) noisy = sqrt(abar_t) x + sqrt(1 - abar_t) n, exactly a draw of q(x_t | x).
    The level is the first timestep t with sigma_t >= sigma; the missing noise std sqrt(sigma_t^2 - sigma^2)
    is added (fresh noise), so x_t = sqrt(abar_t) (noisy + sqrt(sigma_t^2 - sigma^2) n') is exact. From there
    method "sample" runs `sampler` over t and the grid's steps below it: with a stochastic sampler (ddpm,
    ddim with eta = 1) a draw from the posterior p(x | noisy); "mean" is one network evaluation,
    E[x | x_t] (Tweedie's formula), the minimum-mean-squared-error estimate. sigma 0 returns the input.
    """
    if method not in ("sample", "mean"):
        raise LddpmError(f"unknown denoising method {method!r}; choose 'sample' (a posterior draw) or 'mean' "
                         "(the posterior mean)")
    B = noisy.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B) if torch.as_tensor(sigma).numel() == 1 \
        else torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if sig.shape != (B,):
        raise LddpmError(f"sigma must be one number or one per image ({B}), got {tuple(sig.shape)}")
    if not bool(torch.isfinite(sig).all()) or bool((sig < 0).any()):
        raise LddpmError(f"the noise std sigma must be a finite number >= 0, got {sig.min().item():.4g}")
    sigmas = noise_level_sigma(diffusion)
    starts = [noise_timestep(diffusion, float(s)) if s > 0 else -1 for s in sig.tolist()]
    topup = torch.tensor([math.sqrt(max(float(sigmas[t]) ** 2 - float(s) ** 2, 0.0)) if t >= 0 else 0.0
                          for t, s in zip(starts, sig.tolist())], dtype=noisy.dtype, device=noisy.device)
    n = randn(tuple(noisy.shape), generator, noisy.device, noisy.dtype)   # each image's first draw
    scale = torch.tensor([math.sqrt(_alpha_bar(diffusion, t)) if t >= 0 else 1.0 for t in starts],
                         dtype=noisy.dtype, device=noisy.device).view(-1, *[1] * (noisy.dim() - 1))
    x_t = scale * (noisy + topup.view_as(scale) * n)
    grid = sampler_timesteps(diffusion, sampler, num_steps, spacing)
    out = noisy.clone()
    gens = generator if isinstance(generator, (list, tuple)) else None
    for start in sorted(set(starts)):
        if start < 0:
            continue                                 # sigma 0: nothing to remove
        rows = [i for i, t in enumerate(starts) if t == start]
        idx = torch.tensor(rows, device=noisy.device)
        sub = lambda v: v[idx] if torch.is_tensor(v) and v.shape[:1] == (B,) else v   # noqa: E731
        denoiser = make_denoiser(model, diffusion, y=sub(y), context=sub(context), guidance_scale=guidance_scale,
                                 null_label=null_label, null_context=null_context, clip_x0=clip_x0)
        if method == "mean":
            out[idx] = denoiser.x0_eps(x_t[idx], start)[0]
            continue
        ts = [start] + [t for t in grid if t < start]
        g = [gens[i] for i in rows] if gens is not None else generator
        out[idx] = run_sampler(sampler, denoiser, x_t[idx], ts, eta=eta, variance=variance, generator=g,
                               progress=progress)
    return out


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) at a VAE's latent resolution: a latent cell is generated if any pixel of its
    factor x factor patch is (max-pooling), so the kept latents see kept pixels only."""
    return F.max_pool2d(mask, factor) if factor > 1 else mask
