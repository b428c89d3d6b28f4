"""Frechet Inception Distance: feature statistics, the distance, and cached reference statistics.

FID (Heusel et al. 2017, Eq. 6): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), with the
mean and covariance of Inception pool3 features of two image sets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg

from lddpm.checks import strict
from lddpm.data.cache import default_cache_dir  # noqa: F401  (re-exported for metrics users)
from lddpm.errors import LddpmError
from lddpm.io import read_json_object, write_json, write_npz

# Keys of a reference manifest that must equal the request before cached statistics are used.
REFERENCE_KEYS = ("dataset", "split", "num", "resolution", "network_sha1", "dataset_checksum")


def default_reference_path(dataset: str, split: str, num: int, resolution: int, network_sha1: str, cache_dir=None) -> Path:
    """`<cache>/fid-refs/<dataset>-<split>-<resolution>px-n<num>-<sha1[:8]>` (stem of the .npz/.json pair)."""
    root = Path(cache_dir or default_cache_dir()) / "fid-refs"
    return root / f"{dataset}-{split}-{resolution}px-n{num}-{(network_sha1 or 'nohash')[:8]}"


class FeatureStats:
    """Running mean and covariance of features, accumulated in float64 in one pass over batches."""

    def __init__(self, dim: int | None = None):
        self.num = 0
        self.dim = dim
        self._sum = None if dim is None else np.zeros(dim)
        self._outer = None if dim is None else np.zeros((dim, dim))

    def update(self, features: np.ndarray) -> "FeatureStats":
        """Add a batch of features (N, D)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise LddpmError(f"features must have shape (N, D), got {x.shape}")
        if self._sum is None:
            self.dim = x.shape[1]
            self._sum, self._outer = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        if x.shape[1] != self.dim:
            raise LddpmError(f"features have dimension {x.shape[1]}, earlier batches had {self.dim}")
        self.num += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        return self

    @property
    def mean(self) -> np.ndarray:
        """Mean feature (D,)."""
        if self.num == 0:
            raise LddpmError("no features were added to the statistics")
        return self._sum / self.num

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (D, D) (divides by N - 1, as np.cov)."""
        if self.num < 2:
            raise LddpmError(f"a covariance needs at least 2 feature vectors, got {self.num}")
        mu = self.mean
        return (self._outer - self.num * np.outer(mu, mu)) / (self.num - 1)

    @property
    def full_rank(self) -> bool:
        """Whether N is large enough for a full-rank covariance (N > D)."""
        return self.num > (self.dim or 0)


def _checked_statistics(mu1, sigma1, mu2, sigma2):
    """The two Gaussians' statistics as float64 arrays; LddpmError if their shapes do not match."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise LddpmError(
            f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )
    return mu1, sigma1, mu2, sigma2


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Eq. 6 of Heusel et al. 2017).

    The matrix square root of sigma1 @ sigma2 comes from scipy.linalg.sqrtm; if it is not finite
    (a singular product), eps * I is added to both covariances; a small imaginary part from round-off
    is dropped, a large one raises (as pytorch-fid does).
    """
    mu1, sigma1, mu2, sigma2 = _checked_statistics(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sigma1 @ sigma2 is singular; adding {eps} * I to both covariances", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise LddpmError(
                f"FID: the matrix square root has a large imaginary component ({worst:.3g}); "
                "the covariances are degenerate (too few images, or constant features)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    s1, s2 = FeatureStats().update(features1), FeatureStats().update(features2)
    return frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_sqrt(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                          sigma2_sqrt: np.ndarray) -> float:
    """`frechet_distance` given the square root R of sigma2 (`psd_sqrt`), in two symmetric eigen-steps.

    sigma1 @ sigma2 = (sigma1 R) R has the eigenvalues of R sigma1 R, which is symmetric positive
    semi-definite, so tr(sqrtm(sigma1 @ sigma2)) is the sum of the square roots of its eigenvalues.
    With R computed once for a reference, each FID costs two matrix products and one `eigvalsh`
    instead of a general `sqrtm` (one eigh per reference, cached); it agrees with `frechet_distance`
    to round-off (tests/test_metrics.py).
    """
    mu1, sigma1, mu2, sigma2 = _checked_statistics(mu1, sigma1, mu2, sigma2)
    sigma2_sqrt = np.asarray(sigma2_sqrt, np.float64)
    if sigma2_sqrt.shape != sigma2.shape:
        raise LddpmError(f"the square root of sigma2 is {sigma2_sqrt.shape}, sigma2 is {sigma2.shape}: they do not match")
    inner = sigma2_sqrt @ sigma1 @ sigma2_sqrt
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


@dataclass
class ReferenceStats:
    """Statistics of real images: mean, covariance, a feature subset for precision/recall, and a manifest."""

    mu: np.ndarray
    sigma: np.ndarray
    manifest: dict = field(default_factory=dict)
    features: np.ndarray | None = None
    _sigma_sqrt: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def frechet_distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FID of N(mu, sigma) against this reference; the reference's square root is computed once."""
        if self._sigma_sqrt is None:
            self._sigma_sqrt = psd_sqrt(self.sigma)
        return frechet_distance_sqrt(mu, sigma, self.mu, self.sigma, self._sigma_sqrt)


def save_reference(path: str | Path, ref: ReferenceStats) -> Path:
    """Write `<path>.npz` (mu, sigma, features) and `<path>.json` (the manifest); returns the npz path."""
    npz, meta = reference_files(path)
    npz.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": ref.mu, "sigma": ref.sigma}
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    write_npz(npz, **arrays)
    write_json(meta, ref.manifest, sort_keys=True)
    return npz


def reference_files(path: str | Path) -> tuple[Path, Path]:
    """The (npz, json) pair of a reference given either file or their common stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def load_reference(path: str | Path, expect: dict | None = None) -> ReferenceStats:
    """Read a reference written by `save_reference`; raise LddpmError if its manifest differs from `expect`."""
    npz, meta = reference_files(path)
    if not npz.is_file() or not meta.is_file():
        raise LddpmError(f"reference statistics {str(npz)!r} (with its .json manifest) not found; build them with `lddpm fid-ref`")
    fix = "rebuild them with `lddpm fid-ref ... --rebuild`"
    manifest = strict(read_json_object(meta, fix), str(meta), "manifest")
    for key, want in (expect or {}).items():
        have = manifest.get(key)
        if have != want:
            raise LddpmError(
                f"reference statistics {str(npz)!r} were made with {key}={have!r}, but {key}={want!r} was asked for; "
                "rebuild them (`lddpm fid-ref ... --rebuild`) or pass matching settings"
            )
    try:
        with np.load(npz) as data:
            missing = [k for k in ("mu", "sigma") if k not in data]
            if missing:
                raise LddpmError(f"{str(npz)!r} has no {missing[0]!r} array; {fix}")
            features = data["features"].astype(np.float64) if "features" in data else None
            mu, sigma = data["mu"], data["sigma"]
    except LddpmError:
        raise
    except Exception as exc:  # not an npz, truncated, or holding pickled objects (never loaded)
        raise LddpmError(f"cannot read {str(npz)!r} ({type(exc).__name__}: {exc}); {fix}") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()) or sigma.shape != (len(mu), len(mu)):
        raise LddpmError(f"{str(npz)!r} holds non-finite or mis-shaped statistics; {fix}")
    return ReferenceStats(mu, sigma, manifest, features)
