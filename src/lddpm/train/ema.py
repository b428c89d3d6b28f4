"""Exponential moving average of a model's weights: the classic warm-up EMA and the power-function EMA."""

from __future__ import annotations

import copy

import torch
from torch import nn


def power_ema_decay(num_updates: int, gamma: float) -> float:
    """Decay of update `num_updates` (0-based) of the power-function EMA (Karras et al. 2024): (1 - 1/t)^(gamma+1), t = n+1."""
    return (1.0 - 1.0 / (num_updates + 1)) ** (gamma + 1.0)


class EMA:
    """Exponential moving average of a model's weights (buffers are copied).

    With warm-up the decay of update n (0-based) is min(decay, (1 + n) / (10 + n)), as in
    TensorFlow's ExponentialMovingAverage with num_updates, so early averages are not
    dominated by the random initialization. With gamma > 0 it is the power-function EMA of
    Karras et al. 2024 (EDM2), decay (1 - 1/t)^(gamma + 1) at update t = n + 1: after t updates the
    average weighs the weights of update tau by (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1),
    a profile whose width is a fixed fraction of the run so far.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, gamma: float = 0.0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.gamma = decay, warmup, gamma

    def decay_at(self, num_updates: int) -> float:
        """Decay used for update number `num_updates` (0-based)."""
        if self.gamma > 0:
            return power_ema_decay(num_updates, self.gamma)
        if self.warmup:
            return min(self.decay, (1 + num_updates) / (10 + num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        """ema <- d * ema + (1 - d) * weights."""
        d = self.decay_at(num_updates)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# ---------------------------------------------------------------------------------------------------------------
# Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models", Sec. 3
# and App. C). The power-function EMA after t updates is the average of the weights over the run with the profile
# p(s; t, gamma) = (gamma + 1) s^gamma / t^(gamma + 1) on 0 < s <= t: the discrete update above gives update tau
# the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), which is exactly the integral of p over
# (tau - 1, tau], so the snapshots are exact averages of the piecewise-constant weight trajectory.

MAX_SIGMA_REL = 1.0 / (2.0 * 3.0 ** 0.5)  # sigma_rel at gamma = 0 (a plain running mean); larger needs gamma < 0


def gamma_to_sigma_rel(gamma: float) -> float:
    """The profile's standard deviation relative to t: sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)) (EDM2 Eq. 3)."""
    return (gamma + 1.0) ** 0.5 / ((gamma + 2.0) * (gamma + 3.0) ** 0.5)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has relative width sigma_rel (0 < sigma_rel < 1 / (2 sqrt 3)).

    Solves sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, i.e. the cubic
    s^2 g^3 + 7 s^2 g^2 + (16 s^2 - 1) g + 12 s^2 - 1 = 0, for its one root with g > 0.
    """
    import numpy as np

    from lddpm.errors import LddpmError

    s2 = float(sigma_rel) ** 2
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise LddpmError(f"sigma_rel = {sigma_rel!r} must lie in (0, {MAX_SIGMA_REL:.4f}): wider averages need a "
                         "negative power-function exponent (EDM2's optimum lies between 0.02 and 0.2)")
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r)) and r.real > 0]
    gamma = max(real)
    # One Newton step on the unreduced equation polishes np.roots' answer to full float64 precision.
    f = s2 * (gamma + 2) ** 2 * (gamma + 3) - (gamma + 1)
    df = s2 * (2 * (gamma + 2) * (gamma + 3) + (gamma + 2) ** 2) - 1
    return float(gamma - f / df)


def power_profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p(.; t_a, gamma_a), p(.; t_b, gamma_b)> = integral of the product of two profiles over s (closed form).

    With m = min(t_a, t_b): (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),
    written as ratios (m / t)^(g + 1) so that large t and gamma do not overflow.
    """
    m = min(t_a, t_b)
    return ((gamma_a + 1.0) * (gamma_b + 1.0) / ((gamma_a + gamma_b + 1.0) * m)
            * (m / t_a) ** (gamma_a + 1.0) * (m / t_b) ** (gamma_b + 1.0))


def posthoc_coefficients(snapshots, t_target: float, gamma_target: float):
    """Least-squares coefficients x of snapshot profiles for a target profile (EDM2 App. C.3).

    `snapshots` is a list of (t_i, gamma_i). Minimises || sum_i x_i p_i - p_target ||^2 in L2 over s, i.e.
    solves A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target> (least squares with numpy's cut-off for
    tiny singular values, since neighbouring profiles are nearly collinear). Returns (x, relative residual
    || sum x_i p_i - p_target || / || p_target ||), both float64.
    """
    import numpy as np

    n = len(snapshots)
    A = np.empty((n, n))
    for i, (ti, gi) in enumerate(snapshots):
        for j, (tj, gj) in enumerate(snapshots):
            A[i, j] = power_profile_inner(ti, gi, tj, gj)
    b = np.array([power_profile_inner(ti, gi, t_target, gamma_target) for ti, gi in snapshots])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    target = power_profile_inner(t_target, gamma_target, t_target, gamma_target)
    residual2 = max(float(x @ A @ x - 2.0 * x @ b + target), 0.0)
    return x, (residual2 / target) ** 0.5
