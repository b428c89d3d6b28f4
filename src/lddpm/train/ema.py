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
