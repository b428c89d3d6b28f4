"""Editing and restoration (lddpm.editing) against closed forms on exact Gaussian data, and the task networks.

Data: x0 ~ N(mu, Sigma) on a 2x2 grey image (4 correlated pixels). The exact denoiser is linear,
E[x0 | x_t] = mu + sqrt(a) Sigma (a Sigma + (1 - a) I)^-1 (x_t - sqrt(a) mu), so every method has a
closed-form target: the conditional Gaussian of the masked pixels given the kept ones (inpainting), and
the posterior N(mu + Sigma (Sigma + s^2 I)^-1 (y - mu), Sigma - Sigma (Sigma + s^2 I)^-1 Sigma) of a noisy
image y = x + s n (denoising).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lddpm import editing
from lddpm.diffusion import GaussianDiffusion
from lddpm.errors import LddpmError
from lddpm.sampling import ClassifierFreeGuidance, sample
from lddpm.schedule import NoiseSchedule
from lddpm.tasks import (MASK_KINDS, center_mask, cond_channels, inpaint_condition, random_masks, task_condition,
                         upsample)

D = 4
_i = torch.arange(D, dtype=torch.float64)
SIGMA = 0.09 * 0.9 ** (_i[:, None] - _i[None]).abs()          # strongly correlated pixels
MU = torch.tensor([0.1, 0.2, -0.1, 0.0], dtype=torch.float64)
KEPT, HOLE = [0, 1], [2, 3]                                     # the mask regenerates the bottom row
X_KEPT = torch.tensor([0.5, 0.4], dtype=torch.float64)
MASK = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
N = 4000


def gaussian_denoiser(diffusion: GaussianDiffusion, mu: torch.Tensor, sigma: torch.Tensor, dims: list[int]):
    """(x0, eps) of the exact denoiser for x0[dims] ~ N(mu, sigma), as functions of x_t[dims] (B, k) and t."""
    ac = diffusion.schedule.alphas_cumprod
    eye = torch.eye(len(dims), dtype=torch.float64)

    def predict(xf: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = float(ac[t])
        r = torch.linalg.solve(a * sigma + (1 - a) * eye, (xf - math.sqrt(a) * mu).T).T
        x0 = mu + math.sqrt(a) * r @ sigma
        return x0, (xf - math.sqrt(a) * x0) / math.sqrt(1 - a)
    return predict


def gaussian_model(diffusion: GaussianDiffusion):
    """The exact eps prediction for x0 ~ N(MU, SIGMA) on 2x2 images."""
    predict = gaussian_denoiser(diffusion, MU, SIGMA, list(range(D)))

    def model(x, t, y=None):
        return predict(x.reshape(x.shape[0], D), int(t[0]))[1].reshape(x.shape).to(x.dtype)
    return model


def conditional_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the hole's pixels given the kept ones (Gaussian conditioning)."""
    skk, suk, suu = SIGMA[KEPT][:, KEPT], SIGMA[HOLE][:, KEPT], SIGMA[HOLE][:, HOLE]
    return (MU[HOLE] + suk @ torch.linalg.solve(skk, X_KEPT - MU[KEPT]),
            suu - suk @ torch.linalg.solve(skk, suk.T))


def known_image(n: int = N) -> torch.Tensor:
    x0 = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    x0.view(n, D)[:, KEPT] = X_KEPT
    return x0


def repaint_moments(diffusion: GaussianDiffusion, num_steps: int, jump_length: int, resamplings: int):
    """Exact mean and covariance of RePaint's completions with the exact model: every step is linear-Gaussian,
    so (mean, cov) are pushed through Algorithm 1 of Lugmayr et al. 2022 (written here independently of
    lddpm.editing.repaint, with the same positions and DDPM posterior, Eq. 6-7 of Ho et al. 2020)."""
    ts = editing.sampler_timesteps(diffusion, "ddpm", num_steps)
    abar = [1.0] + [float(diffusion.schedule.alphas_cumprod[t]) for t in reversed(ts)]
    eye = torch.eye(D, dtype=torch.float64)
    pu = torch.diag(MASK.reshape(D))
    pk = eye - pu
    x0 = known_image(1).reshape(D)
    m, c = torch.zeros(D, dtype=torch.float64), eye.clone()
    path = editing.repaint_schedule(len(ts), jump_length, resamplings)
    for p_from, p in zip(path, path[1:]):
        if p < p_from:
            a, ap = abar[p_from], abar[p]
            gain = math.sqrt(a) * SIGMA @ torch.linalg.inv(a * SIGMA + (1 - a) * eye)   # x0_hat = gain x + const
            const = MU - math.sqrt(a) * gain @ MU
            beta = 1 - a / ap
            c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            lin = c1 * gain + c2 * eye
            var = beta * (1 - ap) / (1 - a) if p > 0 else 0.0
            m = pu @ (lin @ m + c1 * const) + pk @ (math.sqrt(ap) * x0)
            c = pu @ lin @ c @ lin.T @ pu + var * pu + (1 - ap) * pk
        else:
            beta = 1 - abar[p] / abar[p - 1]
            m, c = math.sqrt(1 - beta) * m, (1 - beta) * c + beta * eye
    return m[HOLE], c[HOLE][:, HOLE]


def hole_moments(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = out.reshape(out.shape[0], D)[:, HOLE]
    return h.mean(0), torch.cov(h.T)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))


# ------------------------------------------------------------------------------------------------ (a) RePaint


def test_repaint_matches_its_exact_linear_gaussian_moments(diffusion):
    """The implementation against an independent propagation of the algorithm's moments: the completions'
    mean within 4 standard errors (sqrt(var / N), N = 4000: about 0.01) and covariance entries within 4 of
    theirs; kept pixels exact."""
    out = editing.repaint(gaussian_model(diffusion), diffusion, known_image(), MASK, num_steps=50, jump_length=5,
                          resamplings=5, clip_x0=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.reshape(N, D)[:, KEPT], X_KEPT.expand(N, 2))
    mean, cov = hole_moments(out)
    m, c = repaint_moments(diffusion, 50, 5, 5)
    se_mean = (c.diagonal() / N).sqrt()
    se_cov = ((c.diagonal()[:, None] * c.diagonal()[None] + c ** 2) / N).sqrt()
    assert ((mean - m).abs() < 4 * se_mean).all(), (mean, m)
    assert ((cov - c).abs() < 4 * se_cov).all(), (cov, c)


def test_repaint_approaches_the_conditional_gaussian_and_resampling_helps(diffusion):
    """Exact moments (no Monte Carlo error): plain replacement (resamplings 1) misses the conditional mean by
    0.030 and its covariance by 0.010 (of a 0.18 shift from the unconditional mean); 5 resamplings of jump 5
    bring these to 0.012 and 0.0073. RePaint is not an exact posterior sampler: the error stays above zero
    with more steps or resampling (250 steps, jump 10, 10 resamplings: 0.028), so the tolerance is the
    measured error, not zero. The sampled completions show the same gain beyond their sampling error."""
    cm, cc = conditional_moments()
    plain_m, plain_c = repaint_moments(diffusion, 50, 5, 1)
    rs_m, rs_c = repaint_moments(diffusion, 50, 5, 5)
    plain = ((plain_m - cm).abs().max(), (plain_c - cc).abs().max())
    resampled = ((rs_m - cm).abs().max(), (rs_c - cc).abs().max())
    assert resampled[0] < 0.5 * plain[0] and resampled[1] < plain[1]
    assert resampled[0] < 0.015 and resampled[1] < 0.008
    assert (MU[HOLE] - cm).abs().max() > 0.15                     # the test is not trivial: conditioning moves a lot
    kwargs = dict(num_steps=50, jump_length=5, clip_x0=False)
    sampled_plain = editing.repaint(gaussian_model(diffusion), diffusion, known_image(), MASK, resamplings=1,
                                    generator=torch.Generator().manual_seed(2), **kwargs)
    sampled = editing.repaint(gaussian_model(diffusion), diffusion, known_image(), MASK, resamplings=5,
                              generator=torch.Generator().manual_seed(3), **kwargs)
    err_plain = (hole_moments(sampled_plain)[0] - cm).abs().max()
    err = (hole_moments(sampled)[0] - cm).abs().max()
    assert err < err_plain - 0.01                                  # standard error of each: about 0.003


def test_repaint_schedule_visits_every_level_and_counts_evaluations():
    path = editing.repaint_schedule(10, 3, 2)
    assert path[0] == 10 and path[-1] == 0 and all(abs(a - b) == 1 for a, b in zip(path, path[1:]))
    assert sum(b < a for a, b in zip(path, path[1:])) == 10 + 3 * 3   # reverse steps: 10 plus one jump at 7, 4, 1
    assert editing.repaint_schedule(10, 3, 1) == list(range(10, -1, -1))
    with pytest.raises(LddpmError, match="resamplings must be an integer >= 1"):
        editing.repaint_schedule(10, 3, 0)


# ------------------------------------------------------------------------------------------------ (b) SDEdit


@pytest.mark.parametrize("sampler,kwargs", [("ddim", {}), ("ddpm", {"num_steps": 20}), ("dpm++2m", {}),
                                            ("ddim", {"eta": 1.0})])
def test_sdedit_strength_one_is_sample_and_zero_is_identity(diffusion, sampler, kwargs):
    model = gaussian_model(diffusion)
    x0 = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(6)]   # noqa: E731
    edited = editing.sdedit(model, diffusion, x0.float(), 1.0, sampler=sampler, generator=gens(), **kwargs)
    plain = sample(model, diffusion, (6, 1, 2, 2), sampler=sampler, generator=gens(), **kwargs)
    assert torch.equal(edited, plain)
    assert torch.equal(editing.sdedit(model, diffusion, x0, 0.0, sampler=sampler, **kwargs), x0)


def test_sdedit_starts_at_the_strength_on_the_grid_and_keeps_more_of_the_input_when_weaker(diffusion):
    calls = []

    def model(x, t, y=None):
        calls.append(int(t[0]))
        return gaussian_model(diffusion)(x, t)

    grid = editing.sampler_timesteps(diffusion, "ddim", 20)
    x0 = torch.full((500, 1, 2, 2), 0.8, dtype=torch.float64)
    distance = {}
    for s in (0.25, 0.5, 0.75):
        calls.clear()
        out = editing.sdedit(model, diffusion, x0, s, sampler="ddim", num_steps=20, clip_x0=False,
                             generator=torch.Generator().manual_seed(0))
        assert calls == grid[20 - round(20 * s):]
        distance[s] = float((out - x0).pow(2).mean().sqrt())
    assert distance[0.25] < distance[0.5] < distance[0.75]
    with pytest.raises(LddpmError, match=r"strength must be a number in \[0, 1\]"):
        editing.sdedit(model, diffusion, x0, 1.5)


# ------------------------------------------------------------------------------------------------ (c) denoising


def posterior(y: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    gain = SIGMA @ torch.linalg.inv(SIGMA + s ** 2 * torch.eye(D, dtype=torch.float64))
    return MU + gain @ (y - MU), SIGMA - gain @ SIGMA


def test_denoise_draws_from_the_gaussian_posterior(diffusion):
    """All DDPM steps below the matched level: the draws' mean within 4 standard errors (about 0.008) of the
    posterior mean and their covariance within 0.002 (measured 0.0006; 4 standard errors of an entry are
    about 0.0013). The posterior mean (one evaluation) is E[x | x_t] at the next grid level above s, reached
    with a little fresh noise (std sqrt(sigma_t^2 - s^2) = 0.007 here): its average over the N images is
    within 1e-3 of the closed form, each image within 0.03 (its spread from that noise is about 0.004)."""
    s, y = 0.2, torch.tensor([0.4, 0.1, 0.3, -0.2], dtype=torch.float64)
    pm, pc = posterior(y, s)
    noisy = y.view(1, 1, 2, 2).expand(N, 1, 2, 2).clone()
    model = gaussian_model(diffusion)
    out = editing.denoise(model, diffusion, noisy, s, clip_x0=False, generator=torch.Generator().manual_seed(4))
    draws = out.reshape(N, D)
    assert ((draws.mean(0) - pm).abs() < 4 * (pc.diagonal() / N).sqrt()).all()
    assert (torch.cov(draws.T) - pc).abs().max() < 0.002
    mean = editing.denoise(model, diffusion, noisy, s, method="mean", clip_x0=False,
                           generator=torch.Generator().manual_seed(5)).reshape(N, D)
    assert (mean.mean(0) - pm).abs().max() < 1e-3 and (mean - pm).abs().max() < 0.03
    assert torch.equal(editing.denoise(model, diffusion, noisy[:3], 0.0), noisy[:3])


def test_the_matched_level_is_exact_for_gaussian_noise(diffusion):
    """sqrt(abar_t) (y + top-up) has exactly the law of q(x_t | x): mean sqrt(abar_t) x, std sqrt(1 - abar_t)."""
    s = 0.3
    t = editing.noise_timestep(diffusion, s)
    sig = editing.noise_level_sigma(diffusion)
    assert sig[t - 1] < s <= sig[t]
    seen = []

    def model(x, tt, y=None):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x = torch.full((20000, 1, 2, 2), 0.5, dtype=torch.float64)
    noisy = x + s * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    editing.denoise(model, diffusion, noisy, s, method="mean", clip_x0=False, generator=torch.Generator().manual_seed(7))
    a = float(diffusion.schedule.alphas_cumprod[t])
    assert abs(seen[0].mean().item() - math.sqrt(a) * 0.5) < 4 * math.sqrt((1 - a) / 80000)
    assert abs(seen[0].std().item() - math.sqrt(1 - a)) < 0.01
    with pytest.raises(LddpmError, match="beyond this schedule's largest level"):
        editing.noise_timestep(diffusion, 1e6)
    with pytest.raises(LddpmError, match="sigma must be a finite number >= 0"):
        editing.denoise(model, diffusion, noisy[:2], -0.1)


def test_noise_estimate_recovers_white_noise_on_a_smooth_image():
    """MAD of the finest diagonal Haar band: within 4% on 32x32 images (256 coefficients each, the median's
    relative standard error about 1.4 / sqrt(256) / 0.67 ... ~5% one image; mean of 16 images)."""
    grad = torch.linspace(-0.5, 0.5, 32, dtype=torch.float64)
    clean = (grad[None, :] + grad[:, None]).expand(16, 1, 32, 32)
    for s in (0.05, 0.2):
        noisy = clean + s * torch.randn(clean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        est = editing.estimate_noise_sigma(noisy)
        assert est.shape == (16,) and abs(est.mean().item() / s - 1) < 0.04
    assert editing.estimate_noise_sigma(clean).max() < 1e-12


# ------------------------------------------------------------------------------------------------ (d) task networks


def conditional_model(diffusion: GaussianDiffusion):
    """An exact inpainting network for the Gaussian data: from its [mask, masked image] channels it denoises
    the hole with the conditional Gaussian (given the kept pixels it reads) and the kept pixels as a point."""
    def model(x, t, y=None, cond_image=None):
        assert cond_image is not None and cond_image.shape == (x.shape[0], 2, 2, 2)
        a = float(diffusion.schedule.alphas_cumprod[int(t[0])])
        mask = cond_image[:, 0].reshape(-1, D)[0].bool()
        kept = cond_image[:, 1].reshape(-1, D)[:, ~mask]
        k, h = (~mask).nonzero()[:, 0].tolist(), mask.nonzero()[:, 0].tolist()
        skk, suk = SIGMA[k][:, k], SIGMA[h][:, k]
        cond_mu = MU[h] + (suk @ torch.linalg.solve(skk, (kept - MU[k]).T)).T       # (B, |h|)
        cond_cov = SIGMA[h][:, h] - suk @ torch.linalg.solve(skk, suk.T)
        xf = x.reshape(-1, D)
        eps = torch.empty_like(xf)
        eps[:, k] = (xf[:, k] - math.sqrt(a) * kept) / math.sqrt(1 - a)
        r = torch.linalg.solve(a * cond_cov + (1 - a) * torch.eye(len(h), dtype=torch.float64),
                               (xf[:, h] - math.sqrt(a) * cond_mu).T).T
        x0_h = cond_mu + math.sqrt(a) * r @ cond_cov
        eps[:, h] = (xf[:, h] - math.sqrt(a) * x0_h) / math.sqrt(1 - a)
        return eps.reshape(x.shape)
    return model


def test_a_conditional_inpainting_model_reads_its_channels_and_samples_the_conditional(diffusion):
    """The task path (mask + masked image as channels, any sampler) with an exact conditional network gives
    the conditional Gaussian: mean within 4 standard errors, covariance within 0.002 (DDPM over all 1000 steps:
    measured 0.0009; with 100 respaced DDPM steps the small-variance choice shrinks the covariance by 0.005)."""
    cm, cc = conditional_moments()
    out = editing.inpaint_with_model(conditional_model(diffusion), diffusion, known_image(), MASK, sampler="ddpm",
                                     clip_x0=False, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out.reshape(N, D)[:, KEPT], X_KEPT.expand(N, 2))
    mean, cov = hole_moments(out)
    assert ((mean - cm).abs() < 4 * (cc.diagonal() / N).sqrt()).all()
    assert (cov - cc).abs().max() < 0.002


def test_guidance_gives_a_conditioning_image_to_both_branches():
    seen = []

    def model(x, t, y=None, cond_image=None):
        seen.append((x.shape[0], cond_image.shape[0]))
        return x * 0 + (y.float().view(-1, 1, 1, 1) + cond_image[:, :1])

    cfg = ClassifierFreeGuidance(model, 3.0, null_label=10)
    x, cond = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = cfg(x, torch.zeros(2, dtype=torch.long), y=torch.tensor([1, 2]), cond_image=cond)
    assert seen == [(4, 4)]
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([10 + 3 * (1 - 10), 10 + 3 * (2 - 10)]) + 1.0)


def test_masks_and_conditions():
    g = torch.Generator().manual_seed(0)
    masks = random_masks(64, 32, list(MASK_KINDS), g)
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    frac = masks.mean(dim=(1, 2, 3))
    assert (frac > 0.02).all() and (frac < 0.8).all()
    assert torch.equal(masks, random_masks(64, 32, list(MASK_KINDS), torch.Generator().manual_seed(0)))
    assert center_mask(32).sum() == 256 and center_mask(32)[8:24, 8:24].all()
    image = torch.rand(3, 2, 8, 8) * 2 - 1
    cond = inpaint_condition(image, center_mask(8)[None, None])
    assert cond.shape == (3, 3, 8, 8) and torch.equal(cond[:, 0], center_mask(8).expand(3, 8, 8))
    assert (cond[:, 1:, 2:6, 2:6] == 0).all() and torch.equal(cond[:, 1:, :2], image[:, :, :2])
    sr = task_condition("super-resolution", image, factor=4)
    low = image.reshape(3, 2, 2, 4, 2, 4).mean(dim=(3, 5))
    assert sr.shape == image.shape and torch.allclose(sr, upsample(low, 8))
    assert (cond_channels("generate", 3), cond_channels("inpaint", 3), cond_channels("super-resolution", 3)) == (0, 4, 3)
    with pytest.raises(LddpmError, match="unknown mask kind 'circle'"):
        random_masks(2, 8, ["circle"])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_networks_take_conditioning_channels(kind):
    from lddpm.nn import build_network

    if kind == "unet":
        net = build_network("unet", "tiny", in_channels=1, resolution=16, model_channels=8, channel_mult=(1, 2),
                            attention_resolutions=(8,), cond_channels=2)
    else:
        net = build_network("dit", "dit-tiny/4", resolution=16, depth=1, num_classes=0, cond_channels=2)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    assert net(x, t, cond_image=torch.randn(3, 2, 16, 16)).shape == (3, 1, 16, 16)
    with pytest.raises(LddpmError, match="pass cond_image"):
        net(x, t)
    with pytest.raises(LddpmError, match=r"cond_image must have shape \(B, 2, 16, 16\)"):
        net(x, t, cond_image=torch.randn(3, 1, 16, 16))
    plain = build_network(kind, "tiny" if kind == "unet" else "dit-tiny/4", in_channels=1, resolution=16,
                          **({"model_channels": 8, "channel_mult": (1, 2), "attention_resolutions": (8,)}
                             if kind == "unet" else {"depth": 1, "num_classes": 0}))
    with pytest.raises(LddpmError, match="takes no conditioning image"):
        plain(x, t, cond_image=torch.randn(3, 2, 16, 16))


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    """An inpainting, a super-resolution and a generating tiny run (2 training steps each) on 16x16 data."""
    from lddpm.train import train
    from test_train import tiny_config, write_idx

    base = tmp_path_factory.mktemp("tasks")
    dirs = (write_idx(base / "idx"), base / "cache")
    for name, sets, network in (("inpaint", ['task.kind="inpaint"', "run.sample_every=2"], "unet"),
                                ("sr", ['task.kind="super-resolution"', "task.factor=2"], "unet"), ("gen", [], "unet"),
                                ("sr-dit", ['task.kind="super-resolution"', "task.factor=4"], "dit")):
        train(tiny_config(dirs, "run.steps=2", "run.checkpoint_every=1", *sets, network=network), base / name,
              progress=False)
    return base


def test_task_runs_train_record_their_task_and_sample(task_runs):
    from lddpm.pipeline import load_pipeline

    inp, sr, gen = (load_pipeline(task_runs / n) for n in ("inpaint", "sr", "gen"))
    assert inp.task["kind"] == "inpaint" and inp.model.config.cond_channels == 2
    assert sr.task == {"kind": "super-resolution", "factor": 2, "masks": ["box", "half", "strokes"]}
    assert sr.model.config.cond_channels == 1 and gen.task["kind"] == "generate" and gen.model.config.cond_channels == 0
    assert (task_runs / "inpaint" / "samples" / "step_000002.png").is_file()     # input | masked | output rows
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    out = inp.inpaint(images, mask, num_steps=3, progress=False)
    assert out.shape == images.shape and np.array_equal(out[:, ~mask], images[:, ~mask])
    again = inp.inpaint(images, mask, num_steps=3, progress=False, batch_size=1)
    assert np.array_equal(out, again)                                   # per-image noise: batching does not matter
    assert sr.upscale(images[:, ::2, ::2], num_steps=3, progress=False).shape == images.shape
    dit = load_pipeline(task_runs / "sr-dit")
    assert dit.model.config.cond_channels == 1 and dit.task["factor"] == 4
    assert dit.upscale(images[:, ::4, ::4], num_steps=2, progress=False, labels=1, guidance_scale=2).shape == images.shape
    with pytest.raises(LddpmError, match=r"low-resolution images are 8x8 pixels, but this run takes 4x4"):
        dit.upscale(images[:, ::2, ::2], progress=False)
    repainted = gen.inpaint(images, mask, num_steps=4, jump_length=2, resamplings=2, progress=False, labels=3)
    assert np.array_equal(repainted[:, ~mask], images[:, ~mask])
    assert np.array_equal(gen.edit(images, 0.0, progress=False), images)
    assert gen.edit(images, 0.5, num_steps=4, progress=False).shape == images.shape
    noisy = images.astype(np.float32) / 127.5 - 1 + 0.2 * np.random.default_rng(1).standard_normal(images.shape)
    assert gen.denoise(noisy.astype(np.float32), 0.2, num_steps=10, progress=False).shape == images.shape
    for call, match in ((lambda: inp.generate(2, progress=False), "trained for task 'inpaint'"),
                        (lambda: sr.inpaint(images, mask, progress=False), "trained for task 'super-resolution'"),
                        (lambda: gen.upscale(images[:, ::2, ::2], progress=False), "not 'super-resolution'"),
                        (lambda: gen.inpaint(images, mask, method="model", progress=False), "not 'inpaint'"),
                        (lambda: inp.edit(images, 0.5, progress=False), "not 'generate'"),
                        (lambda: inp.denoise(images, 0.1, progress=False), "not 'generate'")):
        with pytest.raises(LddpmError, match=match):
            call()


def test_bad_images_and_masks_are_one_clear_error(task_runs):
    from lddpm.pipeline import load_pipeline

    gen = load_pipeline(task_runs / "gen")
    images = np.zeros((2, 16, 16, 1), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    cases = [
        (lambda: gen.edit(np.zeros((2, 28, 28, 1), np.uint8), 0.5), r"are 28x28 pixels, but this run takes 16x16"),
        (lambda: gen.edit(np.zeros((2, 16, 16, 3), np.uint8), 0.5), r"have 3 channels, but this run's images have 1"),
        (lambda: gen.edit(images, 1.5), r"strength must be a number in \[0, 1\], got 1.5"),
        (lambda: gen.edit(images, float("nan")), r"strength must be a number in \[0, 1\]"),
        (lambda: gen.inpaint(images, np.zeros((8, 8), np.uint8)), r"the mask is 8x8 pixels but the images are 16x16"),
        (lambda: gen.inpaint(images, np.full((16, 16), 7, np.uint8)), r"the mask is not binary: it holds the value 7"),
        (lambda: gen.inpaint(images, np.zeros((3, 16, 16), bool)), r"3 masks for 2 images"),
        (lambda: gen.denoise(images, -0.1), r"sigma must be a finite number >= 0, got -0.1"),
        (lambda: gen.inpaint(images, mask, method="blend"), r"unknown inpainting method 'blend'"),
    ]
    for call, match in cases:
        with pytest.raises(LddpmError, match=match):
            call()


def test_resume_of_a_checkpoint_without_a_task_section():
    """A checkpoint written before [task] existed resumes: the missing section reads as its defaults."""
    from lddpm.config import Config
    from lddpm.train.utils import resume_differences

    now = Config().to_dict()
    saved = {k: v for k, v in now.items() if k != "task"}
    assert resume_differences(saved, now) == []
    changed = dict(now, task=dict(now["task"], kind="inpaint"))
    assert resume_differences(saved, changed) == ["task.kind"]


def test_latent_runs_edit_and_repaint_their_latents(task_runs):
    """A latent run: SDEdit and RePaint work on the VAE latents (kept pixels pasted back exactly); denoising and
    task networks are refused (pixel noise is not latent noise; task channels are built from pixels)."""
    import json

    from lddpm.config import validate
    from lddpm.pipeline import load_pipeline
    from lddpm.train import train, train_vae
    from test_train import tiny_config

    dirs = (task_runs / "idx", task_runs / "cache")
    train_vae(tiny_config(dirs, "run.steps=1", "run.num_sample_images=4", preset="vae-fashion-quick"),
              task_runs / "vae", progress=False)
    latent = tiny_config(dirs, "run.steps=1", f"data.latent={json.dumps(str(task_runs / 'vae'))}",
                         "model.overrides.attention_resolutions=[2]")
    train(latent, task_runs / "ldm", progress=False)
    pipe = load_pipeline(task_runs / "ldm")
    images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[:, 8:] = True
    assert np.array_equal(pipe.edit(images, 0.0, progress=False), images)
    assert pipe.edit(images, 0.5, num_steps=4, progress=False).shape == images.shape
    out = pipe.inpaint(images, mask, num_steps=4, jump_length=2, resamplings=2, progress=False)
    assert np.array_equal(out[:, ~mask], images[:, ~mask])
    with pytest.raises(LddpmError, match="denoising needs a pixel-space run"):
        pipe.denoise(images, 0.1, progress=False)
    from lddpm.config import apply_overrides

    with pytest.raises(LddpmError, match="task.kind = 'inpaint' trains a pixel-space model.*drop data.latent"):
        validate(apply_overrides(latent, ['task.kind="inpaint"']))


def test_an_inpainting_run_resumes_exactly(task_runs, tmp_path):
    """The random masks are drawn from each micro-batch's generator: a stopped and resumed run ends with the
    weights of an uninterrupted one; changing the task on resume is refused."""
    from lddpm.config import apply_overrides
    from lddpm.checkpoint import load_checkpoint
    from lddpm.train import train
    from test_train import tiny_config

    config = tiny_config((task_runs / "idx", task_runs / "cache"), "run.steps=3", 'task.kind="inpaint"',
                         'task.masks=["strokes", "box"]')
    train(config, tmp_path / "full", progress=False)
    train(config, tmp_path / "part", progress=False, stop_at=1)
    with pytest.raises(LddpmError, match="task.masks changed"):
        train(apply_overrides(config, ['task.masks=["half"]']), tmp_path / "part", resume=True, progress=False)
    with pytest.raises(LddpmError, match="the network shape changed \\(cond_channels: checkpoint 2, config 1\\)"):
        train(apply_overrides(config, ['task.kind="super-resolution"']), tmp_path / "part", resume=True, progress=False)
    train(config, tmp_path / "part", resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "full").load("model"), load_checkpoint(tmp_path / "part").load("model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_commands_write_one_png_per_image_and_a_grid(task_runs, tmp_path, capsys):
    from PIL import Image

    from lddpm.cli import main
    from lddpm.convert.runs import export_diffusers

    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / f"in{i}.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "low.png")
    noisy = rng.standard_normal((2, 16, 16)).astype(np.float32) * 0.2
    np.savez(tmp_path / "noisy.npz", images=noisy)
    common = ["--steps", "2", "--device", "cpu", "--quiet"]
    calls = [
        (["inpaint", task_runs / "inpaint", tmp_path / "in0.png", tmp_path / "in1.png", "--mask", tmp_path / "mask.png"],
         2, (2 * (16 * 4 + 2) + 2, 3 * (16 * 4 + 2) + 2)),
        (["upscale", task_runs / "sr", tmp_path / "low.png"], 1, (16 * 4 + 4, 3 * (16 * 4 + 2) + 2)),
        (["denoise", task_runs / "gen", tmp_path / "noisy.npz", "--method", "mean"], 2, (2 * (16 * 4 + 2) + 2, 2 * 66 + 2)),
        (["edit", task_runs / "gen", tmp_path / "in0.png", "--strength", "0.3", "--class-name", "Trouser"], 1, None),
    ]
    for k, (argv, count, grid_shape) in enumerate(calls):
        out = tmp_path / f"out{k}"
        assert main([str(a) for a in argv] + common + ["--out-dir", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(count)] + ["grid.png"]
        assert np.asarray(Image.open(out / "00000.png")).shape == (16, 16)
        if grid_shape:
            assert np.asarray(Image.open(out / "grid.png")).shape[:2] == grid_shape
    assert "estimated noise std" in capsys.readouterr().out
    with pytest.raises(LddpmError, match="trained for task 'inpaint'.*not supported"):
        export_diffusers(task_runs / "inpaint", tmp_path / "hf")
