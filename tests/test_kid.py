"""KID: the unbiased MMD^2 with the cubic kernel, against explicit loops and closed forms."""

import numpy as np
import pytest

from lddpm.errors import LddpmError
from lddpm.metrics.kid import kernel_inception_distance


def _kernel(a, b):
    """(a . b / d + 1)^3 for two vectors, written out."""
    return (sum(float(p) * float(q) for p, q in zip(a, b)) / len(a) + 1.0) ** 3


def _mmd2_loops(x, y):
    """The unbiased estimator of Gretton et al. (2012, Lemma 6) as explicit sums over pairs."""
    m = len(x)
    xx = sum(_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(_kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(_kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_matches_explicit_loops_on_random_features():
    rng = np.random.default_rng(0)
    x, y = rng.random((9, 5)), rng.random((9, 5)) * 1.3 + 0.1
    # subsets as large as the sets are permutations of them: every subset gives the full-sample estimate
    out = kernel_inception_distance(x, y, num_subsets=4, subset_size=1000)
    assert out["kid_subset_size"] == 9 and out["kid_subsets"] == 4
    assert out["kid"] == pytest.approx(_mmd2_loops(x, y), rel=1e-12)
    assert out["kid_std"] < 1e-12


@pytest.mark.parametrize("dim", [4, 64])  # 64: kernel matrices computed once and indexed
def test_kid_subsets_are_the_documented_draws(dim):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, dim)), rng.normal(size=(15, dim)) + 0.3
    out = kernel_inception_distance(x, y, num_subsets=5, subset_size=6, seed=7)
    draws = np.random.default_rng(7)
    values = []
    for _ in range(5):  # per subset: m rows of x, then m rows of y, without replacement
        i, j = draws.choice(12, 6, replace=False), draws.choice(15, 6, replace=False)
        values.append(_mmd2_loops(x[i], y[j]))
    assert out["kid"] == pytest.approx(np.mean(values), rel=1e-12)
    assert out["kid_std"] == pytest.approx(np.std(values), rel=1e-9)
    assert out["kid_std"] > 0  # the subsets differ


def test_kid_of_point_masses_is_the_kernel_distance():
    """All x equal to a and all y equal to b: the estimator is exactly k(a,a) + k(b,b) - 2 k(a,b)."""
    a, b = np.array([0.5, 1.0, 2.0]), np.array([1.5, 0.0, 1.0])
    out = kernel_inception_distance(np.tile(a, (30, 1)), np.tile(b, (40, 1)), num_subsets=3, subset_size=20)
    assert out["kid"] == pytest.approx(_kernel(a, a) + _kernel(b, b) - 2 * _kernel(a, b), rel=1e-12)


def _mmd2_power_sums(x, y):
    """The unbiased MMD^2 of whole 1-d samples in closed form: (xy + 1)^3 = sum_k c_k x^k y^k, c = 1, 3, 3, 1."""
    c, x, y, m, n = (1, 3, 3, 1), x[:, 0], y[:, 0], len(x), len(y)
    xx = sum(c[k] * ((x**k).sum() ** 2 - (x ** (2 * k)).sum()) for k in range(4)) / (m * (m - 1))
    yy = sum(c[k] * ((y**k).sum() ** 2 - (y ** (2 * k)).sum()) for k in range(4)) / (n * (n - 1))
    return xx + yy - 2 * sum(c[k] * (x**k).sum() * (y**k).sum() for k in range(4)) / (m * n)


def test_kid_known_shift_and_equal_distributions():
    """1-d, k(x, y) = (xy + 1)^3, so the population MMD^2 is (dE[x^3])^2 + 3 (dE[x^2])^2 + 3 (dE[x])^2.

    x: -1 and +1, 500 of each (moments 0, 1, 0 exactly); y = x + 0.5 (moments 0.5, 1.25, 1.625): 3.578125.
    The mean over subsets estimates the whole-sample statistic, within its standard error std / sqrt(subsets).
    """
    rng = np.random.default_rng(0)
    x = rng.permutation(np.repeat([-1.0, 1.0], 500))[:, None]
    x2 = rng.choice([-1.0, 1.0], size=(1000, 1))  # an independent sample of the same distribution
    y = rng.permutation(x) + 0.5
    shifted = kernel_inception_distance(x, y, subset_size=500)
    assert shifted["kid_subset_size"] == 500 and shifted["kid_subsets"] == 100
    assert abs(shifted["kid"] - _mmd2_power_sums(x, y)) < 4 * shifted["kid_std"] / 10
    assert shifted["kid"] == pytest.approx(1.625**2 + 3 * 0.25**2 + 3 * 0.5**2, rel=0.03)
    same = kernel_inception_distance(x, x2, subset_size=500)  # the same distribution: unbiased, so near 0
    assert abs(same["kid"] - _mmd2_power_sums(x, x2)) < 4 * same["kid_std"] / 10
    assert abs(same["kid"]) < 0.01 * shifted["kid"]
    assert kernel_inception_distance(x, x2, num_subsets=1)["kid_subset_size"] == 1000  # the default: min(1000, N)


def test_kid_is_seeded():
    rng = np.random.default_rng(2)
    x, y = rng.random((50, 8)), rng.random((60, 8)) + 0.05
    first, again = kernel_inception_distance(x, y, seed=3), kernel_inception_distance(x, y, seed=3)
    assert first == again
    assert kernel_inception_distance(x, y, seed=4)["kid"] != first["kid"]


def test_kid_rejects_bad_inputs():
    with pytest.raises(LddpmError, match="same D"):
        kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(LddpmError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
