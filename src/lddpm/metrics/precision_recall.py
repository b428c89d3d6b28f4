"""Improved precision and recall of generative models (Kynkaanniemi et al. 2019, Sec. 2).

Each set's manifold is the union of balls around its feature vectors whose radius is the distance
to the k-th nearest neighbour within the same set. Precision is the fraction of generated features
inside the real manifold; recall is the fraction of real features inside the generated manifold.
"""

from __future__ import annotations

import numpy as np
import torch

from lddpm.errors import LddpmError


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Features as a float64 CPU tensor (N, D)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if t.ndim != 2:
        raise LddpmError(f"features must have shape (N, D), got {tuple(t.shape)}")
    return t


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance from each feature vector to its k-th nearest neighbour in the same set (itself excluded)."""
    n = features.shape[0]
    if n <= k:
        raise LddpmError(f"k-nearest-neighbour radii need more than k={k} feature vectors, got {n}")
    radii = []
    for i in range(0, n, batch_size):
        d = torch.cdist(features[i : i + batch_size], features)
        # the k+1 smallest include the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of `queries` within radius[j] of some support[j]."""
    inside = []
    for i in range(0, queries.shape[0], batch_size):
        d = torch.cdist(queries[i : i + batch_size], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, *, k: int = 3, batch_size: int = 1024
) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-3) with k-NN radii."""
    real, fake = _as_tensor(real_features), _as_tensor(fake_features)
    if real.shape[1] != fake.shape[1]:
        raise LddpmError(f"real features have dimension {real.shape[1]}, generated ones {fake.shape[1]}")
    real_radii, fake_radii = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    return {
        "precision": _coverage(fake, real, real_radii, batch_size),
        "recall": _coverage(real, fake, fake_radii, batch_size),
        "k": k,
        "num_real": real.shape[0],
        "num_fake": fake.shape[0],
    }
