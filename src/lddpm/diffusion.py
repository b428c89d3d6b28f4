"""Gaussian diffusion: forward process, model-output conversions, training losses and timestep sampling.

Conventions (Ho et al. 2020; Salimans & Ho 2022): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0. A model predicts one of eps, x0 or v ("objective"); with a
learned variance (Nichol & Dhariwal 2021) it outputs 2C channels: the prediction, then v_var in [-1, 1].
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from lddpm.config import DiffusionConfig
from lddpm.errors import LddpmError
from lddpm.schedule import NoiseSchedule

OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr", "edm")
TIMESTEP_SAMPLINGS = ("uniform", "adaptive", "lognormal")
SIGMA_BANDS = (0.17, 0.5, 2.0)  # band edges of `loss_weight_shares` (sigma = sqrt((1 - abar) / abar))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the first (batch)."""
    return x.flatten(1).mean(1)


def _bcast(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] as x's dtype/device, shaped (B, 1, ..., 1) to broadcast against x."""
    out = values.to(x.device)[t.to(x.device)].to(x.dtype)
    return out.reshape(out.shape + (1,) * (x.ndim - out.ndim))


def randn(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None,
          device: torch.device | str | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), then moved to `device`.

    A sequence of generators (one per row of the batch) draws row i from generator i, so that each
    image has its own noise stream whatever batch it is sampled in.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise LddpmError(f"{len(generator)} generators for a batch of {shape[0]}; give one per image")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device)
                            for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian discretized to 256 bins.

    Ho et al. 2020, Eq. 13: bin [x - 1/255, x + 1/255], with the edge bins extended to -inf / +inf.
    Uses the exact normal CDF (improved-diffusion uses a tanh approximation).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)           # log P(z < upper), used for the lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)           # log P(z > lower), used for the highest bin
    delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_mid = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def x0_eps_from_output(objective: str, out: torch.Tensor, x_t: torch.Tensor, a, b, *,
                       clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a prediction `out` of `objective` at x_t = a x0 + b eps (a = sqrt(abar), b = sqrt(1 - abar):
    numbers or tensors broadcasting against x_t). clip: x0 clipped to [-1, 1], eps re-derived from it."""
    if objective == "eps":
        x0, eps = (x_t - b * out) / a, out
    elif objective == "x0":
        x0, eps = out, (x_t - a * out) / b
    else:   # v: x0 = sqrt(abar) x_t - sqrt(1-abar) v, eps = sqrt(abar) v + sqrt(1-abar) x_t
        x0, eps = a * x_t - b * out, a * out + b * x_t
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - a * x0) / b
    return x0, eps


def output_from_x0_eps(objective: str, x0: torch.Tensor, eps: torch.Tensor, a, b) -> torch.Tensor:
    """The prediction of `objective` that corresponds to (x0, eps) at x_t = a x0 + b eps (v = a eps - b x0)."""
    return eps if objective == "eps" else x0 if objective == "x0" else a * eps - b * x0


class LossSecondMomentSampler:
    """Importance sampling of t with p(t) ~ sqrt(E[L_t^2]) (Nichol & Dhariwal 2021, Sec. 3.3).

    Keeps the last `history` losses per t; until every t has a full history it samples uniformly.
    Then p = (1 - uniform_prob) * w / sum(w) + uniform_prob / T with w = sqrt(mean(L^2)).
    The importance weight 1 / (T p(t)) keeps the loss estimate unbiased.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.num_timesteps = num_timesteps
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        """True once every timestep has `history` recorded losses."""
        return bool((self.loss_counts >= self.history).all())

    def probs(self) -> torch.Tensor:
        """Current sampling probabilities p(t), float64 (T,)."""
        T = self.num_timesteps
        if not self.warmed_up():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.loss_history.pow(2).mean(1).sqrt()
        if not bool(w.sum() > 0):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        return (1.0 - self.uniform_prob) * w / w.sum() + self.uniform_prob / T

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw t (B,) and the importance weights 1 / (T p(t)) (B,) float32."""
        p = self.probs()
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.multinomial(p.to(gen_device), batch_size, replacement=True, generator=generator).cpu()
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record one loss per entry of t (oldest values are dropped after `history`)."""
        for ti, li in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.loss_counts[ti])
            if n >= self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, n] = li
            self.loss_counts[ti] = n + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (safetensors-compatible)."""
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` (tensors or nested lists)."""
        hist = torch.as_tensor(state["loss_history"], dtype=torch.float64)
        counts = torch.as_tensor(state["loss_counts"], dtype=torch.int64)
        if hist.shape != self.loss_history.shape or counts.shape != self.loss_counts.shape:
            raise LddpmError(f"timestep-sampler state has shape {tuple(hist.shape)}, expected "
                             f"{tuple(self.loss_history.shape)} (T={self.num_timesteps}, history={self.history})")
        self.loss_history = hist.clone()
        self.loss_counts = counts.clone()


class GaussianDiffusion:
    """A noise schedule plus what the network predicts, and how it is trained."""

    def __init__(self, schedule: NoiseSchedule, objective: str = "eps", learned_variance: bool = False,
                 loss_weighting: str = "uniform", min_snr_gamma: float = 5.0,
                 timestep_sampling: str = "uniform", vlb_weight: float = 0.001, p_mean: float = -1.2,
                 p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        if objective not in OBJECTIVES:
            raise LddpmError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise LddpmError(f"unknown loss_weighting {loss_weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise LddpmError(f"unknown timestep_sampling {timestep_sampling!r}; "
                             f"choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
        if not min_snr_gamma > 0:
            raise LddpmError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        if not (math.isfinite(p_mean) and p_std > 0 and sigma_data > 0 and math.isfinite(p_std * sigma_data)):
            raise LddpmError(f"p_mean = {p_mean!r} must be finite, p_std = {p_std!r} and sigma_data = {sigma_data!r} "
                             "positive (EDM's defaults: -1.2, 1.2, 0.5)")
        if objective == "eps" and float(schedule.alphas_cumprod[-1]) == 0.0:
            raise LddpmError("a zero-terminal-SNR schedule cannot be used with objective 'eps' "
                             "(x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) is undefined at abar = 0); use 'v' or 'x0'")
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.objective = objective
        self.learned_variance = learned_variance
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.timestep_sampling = timestep_sampling
        self.vlb_weight = float(vlb_weight)
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)
        self.sampler = LossSecondMomentSampler(self.num_timesteps) if timestep_sampling == "adaptive" else None

    def __repr__(self) -> str:
        return (f"GaussianDiffusion({self.schedule!r}, objective={self.objective!r}, "
                f"learned_variance={self.learned_variance}, loss_weighting={self.loss_weighting!r})")

    def respace(self, timesteps: torch.Tensor | list[int]) -> "GaussianDiffusion":
        """The same model on a subset of steps (new betas from alphas_cumprod at the kept steps)."""
        return GaussianDiffusion(self.schedule.respace(timesteps), self.objective, self.learned_variance,
                                 self.loss_weighting, self.min_snr_gamma, "uniform", self.vlb_weight,
                                 self.p_mean, self.p_std, self.sigma_data)

    # ---- forward process -------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, Eq. 4)."""
        s = self.schedule
        return _bcast(s.sqrt_alphas_cumprod, t, x0) * x0 + _bcast(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 6-7)."""
        s = self.schedule
        return (self.posterior_mean(x0, x_t, t), _bcast(s.posterior_variance, t, x_t),
                _bcast(s.posterior_log_variance_clipped, t, x_t))

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0): coef1_t x_0 + coef2_t x_t (Ho et al. 2020, Eq. 7)."""
        s = self.schedule
        return _bcast(s.posterior_mean_coef1, t, x_t) * x0 + _bcast(s.posterior_mean_coef2, t, x_t) * x_t

    # ---- conversions between eps, x0 and v ------------------------------------------------------
    def _ab(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) broadcast against x."""
        s = self.schedule
        return _bcast(s.sqrt_alphas_cumprod, t, x), _bcast(s.sqrt_one_minus_alphas_cumprod, t, x)

    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4)."""
        a, b = self._ab(t, x0)
        return a * eps - b * x0

    def x0_from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        a, b = self._ab(t, x_t)
        return (x_t - b * eps) / a

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        a, b = self._ab(t, x_t)
        return (x_t - a * x0) / b

    def predict_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                       clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the mean channels of a model output (any objective).

        clip: x0 clipped to [-1, 1] and eps re-derived from the clipped x0 (as improved-diffusion / GLIDE do).
        """
        a, b = self._ab(t, x_t)
        return x0_eps_from_output(self.objective, self.split_output(model_output, x_t)[0], x_t, a, b, clip=clip)

    def output_from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction (in this objective's space) that corresponds to (x0, eps)."""
        if self.objective == "eps":
            return eps
        if self.objective == "x0":
            return x0
        return self.v_target(x0, eps, t)

    def split_output(self, model_output: torch.Tensor,
                     x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean channels, variance channels or None) of a model output."""
        C = x_t.shape[1]
        expected = 2 * C if self.learned_variance else C
        if model_output.shape[1] != expected:
            raise LddpmError(f"model output has {model_output.shape[1]} channels, expected {expected} "
                             f"(input has {C}, learned_variance={self.learned_variance})")
        if self.learned_variance:
            return model_output[:, :C], model_output[:, C:]
        return model_output, None

    # ---- reverse process ---------------------------------------------------------------------
    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                        clip_x0: bool = False, variance: str = "small") -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log_variance, x0 and eps from one model output.

        variance: "small" = beta_tilde_t (posterior variance, log clipped at t = 0), "large" = beta_t
        (with posterior_variance[1] at t = 0, as improved-diffusion); ignored with a learned variance,
        where log var = frac log(beta_t) + (1 - frac) log(beta_tilde_t clipped), frac = (v + 1) / 2
        (Nichol & Dhariwal 2021, Eq. 15). The mean is the posterior mean at the predicted x0 (clipped to
        [-1, 1] if clip_x0; eps is then re-derived from the clipped x0).
        """
        s = self.schedule
        x0, eps = self.predict_x0_eps(model_output, x_t, t, clip=clip_x0)
        mean = self.posterior_mean(x0, x_t, t)
        var_out = self.split_output(model_output, x_t)[1]
        if var_out is not None:
            min_log = _bcast(s.posterior_log_variance_clipped, t, x_t)
            max_log = _bcast(torch.log(s.betas), t, x_t)
            frac = (var_out + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        elif variance == "small":
            log_var = _bcast(s.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        elif variance == "large":
            large = torch.cat([s.posterior_variance[1:2], s.betas[1:]]) if len(s.betas) > 1 else s.betas
            log_var = _bcast(torch.log(large), t, x_t).expand_as(x_t)
        else:
            raise LddpmError(f"unknown variance {variance!r}; choose 'small' (beta_tilde) or 'large' (beta)")
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var, "x0": x0, "eps": eps}

    def vlb_terms(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
        """Per-sample L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and the
        discretized Gaussian NLL of x_0 at t = 0 (Ho et al. 2020, Eq. 5 and 13)."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_x0=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(x0.device) == 0, nll, kl)

    # ---- training ----------------------------------------------------------------------------
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the MSE term (float64, (B,)).

        uniform: 1 (L_simple, Ho et al. 2020). min_snr (Hang et al. 2023, gamma = min_snr_gamma):
        eps: min(SNR, g) / SNR, x0: min(SNR, g), v: min(SNR, g) / (SNR + 1).
        edm: EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = SNR + 1 / sigma_data^2 on
        the x0 error (Karras et al. 2022, Table 1, sigma^2 = 1 / SNR), moved into the objective's space with
        ||d eps||^2 = SNR ||d x0||^2 and ||d v||^2 = (SNR + 1) ||d x0||^2 (docs/training.md):
        eps: 1 + 1 / (sigma_data^2 SNR), x0: SNR + 1 / sigma_data^2, v: (SNR + 1 / sigma_data^2) / (SNR + 1).
        """
        if self.loss_weighting == "uniform":
            return torch.ones(t.shape, dtype=torch.float64)
        snr = self.schedule.snr[t.cpu()]
        if self.loss_weighting == "edm":
            inv_sd2 = 1.0 / self.sigma_data ** 2
            if self.objective == "eps":
                return 1.0 + inv_sd2 / snr
            if self.objective == "x0":
                return snr + inv_sd2
            return (snr + inv_sd2) / (snr + 1.0)
        g = self.min_snr_gamma
        if self.objective == "eps":
            return (g / snr).clamp(max=1.0)      # = min(snr, g) / snr, also finite at snr = 0
        if self.objective == "x0":
            return snr.clamp(max=g)
        return snr.clamp(max=g) / (snr + 1.0)

    def v_scale_weight(self, t: torch.Tensor) -> torch.Tensor:
        """`loss_weight(t)` as a weight on the v error (float64): the common scale of `loss_weight_shares`.

        ||d eps||^2 = abar ||d v||^2 and ||d x0||^2 = (1 - abar) ||d v||^2, so a weight w on the eps error is
        w abar on the v error and a weight on the x0 error is w (1 - abar). The v error is EDM's F-space error
        with sigma_data = 1: a network that predicts v with unit error at every t (as at initialisation) gives
        each t a loss in proportion to this weight.
        """
        w = self.loss_weight(t)
        abar = self.schedule.alphas_cumprod[t.cpu()]
        if self.objective == "eps":
            return w * abar
        if self.objective == "x0":
            return w * (1.0 - abar)
        return w

    def log_sigmas(self) -> torch.Tensor:
        """ln sigma_t = -log-SNR(t) / 2 for every t (float64, ascending; +inf at a zero-terminal-SNR end)."""
        return -0.5 * self.schedule.log_snr

    def lognormal_edges(self) -> torch.Tensor:
        """Midpoints between neighbouring ln sigma_t: cell t of the log-normal sampler is [edge_{t-1}, edge_t)."""
        ls = self.log_sigmas()
        return 0.5 * (ls[1:] + ls[:-1])

    def timestep_probs(self) -> torch.Tensor:
        """The distribution p(t) that `sample_timesteps` draws from now (float64, (T,)).

        lognormal: the mass of N(p_mean, p_std^2) over each t's cell of ln sigma (the nearest-ln-sigma map,
        the two end cells open); adaptive: the sampler's current probabilities (uniform until warmed up).
        """
        T = self.num_timesteps
        if self.timestep_sampling == "lognormal":
            z = (self.lognormal_edges() - self.p_mean) / self.p_std
            cdf = torch.cat([z.new_zeros(1), torch.special.ndtr(z), z.new_ones(1)])
            return (cdf[1:] - cdf[:-1]).clamp(min=0.0)
        if self.sampler is not None:
            return self.sampler.probs()
        return torch.full((T,), 1.0 / T, dtype=torch.float64)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) and importance weights (B,): uniform, adaptive (LossSecondMomentSampler), or lognormal.

        lognormal (EDM's training noise levels, Karras et al. 2022, Sec. 5): ln sigma ~ N(p_mean, p_std^2), then
        the timestep whose ln sigma_t is nearest (all weights 1: the distribution itself is the log-normal one,
        discretised to the schedule's T noise levels).
        """
        if self.sampler is not None:
            return self.sampler.sample(batch_size, generator, device)
        gen_device = generator.device if generator is not None else device
        if self.timestep_sampling == "lognormal":
            ln_sigma = torch.randn((batch_size,), generator=generator, device=gen_device, dtype=torch.float64)
            ln_sigma = self.p_mean + self.p_std * ln_sigma.cpu()
            t = torch.searchsorted(self.lognormal_edges(), ln_sigma, right=True)
            return t.to(device), torch.ones(batch_size, device=device)
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device), torch.ones(batch_size, device=device)

    def training_losses(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, *,
                        y: torch.Tensor | None = None, context: torch.Tensor | None = None,
                        cond_image: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses for one batch; t and noise come from `generator` (reproducible).

        The model is called as model(x_t, t, y=y, context=context, cond_image=cond_image), each only when
        given (labels; a prompt's token states; a restoration task's conditioning channels, lddpm.tasks).

        Returns "loss" (B,) = importance_weight * (weight(t) * mse + vlb_weight * T * vlb),
        "loss_unweighted" (the same without the importance weight: pass it to update_timestep_sampler),
        "t", "mse" (unweighted mean squared error of the prediction), and "vlb" (bits/dim, learned
        variance only; the hybrid loss of Nichol & Dhariwal 2021 with a stop-gradient on the mean).
        """
        B = x0.shape[0]
        t, imp_weights = self.sample_timesteps(B, generator, x0.device)
        noise = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        cond = {k: v for k, v in (("y", y), ("context", context), ("cond_image", cond_image)) if v is not None}
        model_output = model(x_t, t, **cond)
        pred, var_out = self.split_output(model_output, x_t)
        target = self.output_from_x0_eps(x0, noise, t)
        dtype = torch.promote_types(pred.dtype, torch.float32)   # losses in >= float32 under autocast
        pred, var_out = pred.to(dtype), (var_out.to(dtype) if var_out is not None else None)
        mse = mean_flat((pred - target.to(dtype)) ** 2)
        weight = self.loss_weight(t).to(device=mse.device, dtype=mse.dtype)
        loss = weight * mse
        out = {"t": t, "mse": mse}
        if var_out is not None:
            # Stop-gradient on the mean: the VLB term trains only the variance (Nichol & Dhariwal 2021, Sec. 3.1).
            frozen = torch.cat([pred.detach(), var_out], dim=1)
            vlb = self.vlb_terms(frozen, x0.to(dtype), x_t.to(dtype), t)
            out["vlb"] = vlb
            loss = loss + self.vlb_weight * self.num_timesteps * vlb
        out["loss_unweighted"] = loss
        out["loss"] = loss * imp_weights.to(loss.dtype)
        return out

    def update_timestep_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Feed per-sample losses (all ranks, before importance weighting) to the adaptive sampler."""
        if self.sampler is not None:
            self.sampler.update(t, losses)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adaptive-sampler history (empty for uniform sampling)."""
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        if self.sampler is not None and state:
            self.sampler.load_state_dict(state)


def build_diffusion(d: DiffusionConfig | dict[str, Any]):
    """The schedule and GaussianDiffusion described by a [diffusion] section."""
    if isinstance(d, dict):
        d = DiffusionConfig(**d)
    schedule = NoiseSchedule.from_name(d.schedule, d.num_timesteps, rescale_zero_terminal_snr=d.rescale_zero_terminal_snr)
    return GaussianDiffusion(schedule, objective=d.objective, learned_variance=d.learned_variance,
                             loss_weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma,
                             timestep_sampling=d.timestep_sampling, p_mean=d.p_mean, p_std=d.p_std,
                             sigma_data=d.sigma_data)


def loss_weight_shares(diffusion: GaussianDiffusion, edges: Sequence[float] = SIGMA_BANDS) -> list[dict[str, Any]]:
    """The share of the training loss weight in each band of noise levels sigma (exact, no Monte Carlo).

    share(band) = sum over t in the band of p(t) w_v(t), normalised to 1, with p(t) the timestep distribution
    (`timestep_probs`: today's for an adaptive sampler, uniform at the start of a run) and w_v(t) the loss
    weight on the common v-error scale (`v_scale_weight`), so recipes that train different objectives compare.
    The learned-variance VLB term is not counted. Bands: sigma < edges[0], edges[0] <= sigma < edges[1], ...,
    sigma >= edges[-1], with sigma_t = sqrt((1 - abar_t) / abar_t). Each band also reports its share of the
    samples (p alone) and its timestep range; the last band's sigma_high is None (no upper end).
    """
    edges = [float(e) for e in edges]
    if not edges or any(not (e > 0 and math.isfinite(e)) for e in edges) or edges != sorted(set(edges)):
        raise LddpmError(f"sigma band edges {edges} must be increasing positive numbers")
    T = diffusion.num_timesteps
    t = torch.arange(T)
    p = diffusion.timestep_probs()
    mass = p * diffusion.v_scale_weight(t)
    mass, p = mass / mass.sum(), p / p.sum()
    band = torch.bucketize(diffusion.log_sigmas(), torch.log(torch.tensor(edges, dtype=torch.float64)), right=True)
    bounds = [0.0, *edges, math.inf]
    rows = []
    for i in range(len(edges) + 1):
        members = t[band == i]
        label = (f"sigma < {bounds[1]:g}" if i == 0 else f"sigma >= {bounds[i]:g}" if i == len(edges)
                 else f"{bounds[i]:g} <= sigma < {bounds[i + 1]:g}")
        rows.append({"band": label, "sigma_low": bounds[i], "sigma_high": bounds[i + 1] if i < len(edges) else None,
                     "share": float(mass[band == i].sum()), "samples": float(p[band == i].sum()),
                     "t_first": int(members[0]) if len(members) else None,
                     "t_last": int(members[-1]) if len(members) else None})
    return rows


def describe_shares(rows: list[dict[str, Any]]) -> str:
    """One line: `sigma < 0.17 1.5% | 0.17 <= sigma < 0.5 28.9% | ...` (the loss weight per band)."""
    return " | ".join(f"{r['band']} {100 * r['share']:.1f}%" for r in rows)
