"""Data: readers for each real format (built here in tmp_path), the cache, loaders, latent caches."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lddpm.data import (
    DATASETS,
    ImageLoader,
    LatentLoader,
    dataset_info,
    download_file,
    encode_latents,
    imagenet100_classes,
    open_cache,
    open_latent_cache,
    prepare,
)
from lddpm.data import readers
from lddpm.errors import LddpmError

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------
# fixture builders, one per real format


def idx_bytes(arr: np.ndarray) -> bytes:
    """Standard IDX encoding: 0 0 0x08 ndim, big-endian int32 dims, then the bytes."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()


def write_idx_set(root: Path, n_train=30, n_test=12, gz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
            name = root / f"{prefix}-{kind}-idx{nd}-ubyte"
            raw = idx_bytes(arr)
            if gz:
                with gzip.open(str(name) + ".gz", "wb") as f:
                    f.write(raw)
            else:
                name.write_bytes(raw)
        data[prefix] = (images, labels)
    return data


CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def cifar_batches(name="cifar10", seed=0, per_batch=4) -> dict[str, bytes]:
    """The members of cifar-10-batches-py (or cifar-100-python) as pickled bytes, and the raw arrays."""
    rng = np.random.default_rng(seed)
    out, arrays = {}, {}
    members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    for m in members:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        if name == "cifar10":
            labels = rng.integers(0, 10, per_batch).tolist()
            d = {b"batch_label": m.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch}
        else:
            labels = rng.integers(0, 100, per_batch).tolist()
            d = {b"fine_labels": labels, b"coarse_labels": [0] * per_batch, b"data": data}
        out[m] = pickle.dumps(d, protocol=2)
        arrays[m] = (data, labels)
    if name == "cifar10":
        out["batches.meta"] = pickle.dumps({b"label_names": CIFAR_NAMES, b"num_vis": 3072}, protocol=2)
    else:
        out["meta"] = pickle.dumps({b"fine_label_names": [n.encode() for n in readers.CIFAR100_CLASSES],
                                    b"coarse_label_names": [b"c"] * 20}, protocol=2)
    return out, arrays


def write_cifar(root: Path, name="cifar10", archive=True, seed=0):
    blobs, arrays = cifar_batches(name, seed)
    folder = readers.CIFAR_ARCHIVES[name]["folder"]
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        path = root / readers.CIFAR_ARCHIVES[name]["filename"]
        with tarfile.open(path, "w:gz") as tar:
            for m, b in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{m}")
                info.size = len(b)
                tar.addfile(info, io.BytesIO(b))
    else:  # as the official files were written: numpy 1.x module paths
        (root / folder).mkdir()
        for m, b in blobs.items():
            (root / folder / m).write_bytes(b.replace(b"numpy._core.", b"numpy.core."))
    return arrays


def save_image(path: Path, arr: np.ndarray, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


# ------------------------------------------------------------------------------------------------
# readers


def test_dataset_names_and_info():
    assert DATASETS == ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet100", "imagefolder", "captioned",
                        "fashion-text", "fashion-pairs")
    ch, res, k, names = dataset_info("fashion-mnist")
    assert (ch, res, k) == (1, 32, 10) and names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    assert dataset_info("cifar10")[:3] == (3, 32, 10)
    c100 = dataset_info("cifar100")[3]
    assert len(c100) == 100 and c100 == sorted(c100) and len(set(c100)) == 100
    assert dataset_info("imagenet100")[:3] == (3, 128, 100)
    with pytest.raises(LddpmError, match="unknown dataset"):
        dataset_info("svhn")


def test_imagenet100_class_list():
    wnids = imagenet100_classes()
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert wnids[:4] == ["n02869837", "n01749939", "n02488291", "n02107142"]
    assert wnids[-1] == "n02090622"
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_prepare_pad_and_labels(tmp_path, gz):
    data = write_idx_set(tmp_path / "src", gz=gz)
    folder = prepare("mnist", split="train", root=tmp_path / "src", cache_dir=tmp_path / "cache", progress=False)
    cache = open_cache(folder)
    images, labels = data["train"]
    assert len(cache) == 30 and cache.images.shape == (30, 32, 32, 1) and cache.images.dtype == np.uint8
    np.testing.assert_array_equal(cache.labels, labels.astype(np.int64))
    np.testing.assert_array_equal(cache.images[:, 2:30, 2:30, 0], images)  # zero padding, 2 px each side
    assert cache.images[:, :2].max() == 0 and cache.images[:, :, 30:].max() == 0
    m = cache.manifest
    assert m["preprocessing"]["fit"] == "pad" and "2 pixels" in m["preprocessing"]["pad"]
    assert sum(m["counts_per_class"].values()) == 30
    assert m["counts_per_class"]["3"] == int((labels == 3).sum())
    assert m["source"]["fingerprint"] == "sha256" and len(m["source"]["files"]) == 2
    assert cache.class_names == [str(i) for i in range(10)]


def test_idx_resize_option(tmp_path):
    write_idx_set(tmp_path / "src")
    folder = prepare("mnist", split="test", root=tmp_path / "src", cache_dir=tmp_path / "c",
                     fit="resize", resolution=16, progress=False)
    cache = open_cache(folder)
    assert folder.name == "mnist-test-16" and cache.images.shape == (12, 16, 16, 1)
    assert "resize" in cache.manifest["preprocessing"]
    with pytest.raises(LddpmError, match="pad"):
        prepare("mnist", root=tmp_path / "src", cache_dir=tmp_path / "c", fit="pad", resolution=16, progress=False)


def test_idx_corrupt_files_named(tmp_path):
    root = tmp_path / "src"
    write_idx_set(root, gz=False)
    img = root / "train-images-idx3-ubyte"
    good = img.read_bytes()
    img.write_bytes(b"\x00\x00\x08\x02" + good[4:])  # wrong number of dimensions
    with pytest.raises(LddpmError, match="magic") as exc:
        prepare("mnist", root=root, cache_dir=tmp_path / "c", progress=False)
    assert str(img) in str(exc.value)
    img.write_bytes(good[:-100])  # truncated data
    with pytest.raises(LddpmError, match="truncated") as exc:
        prepare("mnist", root=root, cache_dir=tmp_path / "c", progress=False)
    assert str(img) in str(exc.value)
    img.unlink()
    gzpath = Path(str(img) + ".gz")
    gzpath.write_bytes(gzip.compress(good)[:-30])  # truncated gzip stream
    with pytest.raises(LddpmError, match="corrupt or truncated") as exc:
        prepare("mnist", root=root, cache_dir=tmp_path / "c", progress=False)
    assert str(gzpath) in str(exc.value)
    assert not (tmp_path / "c" / "mnist-train-32").exists()


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(LddpmError) as exc:
        prepare("fashion-mnist", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    msg = str(exc.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--root" in msg
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_counts(tmp_path):
    for split, n, per in (("train", 60000, 6000), ("test", 10000, 1000)):
        raw = readers.read_mnist_like("fashion-mnist", split, None)
        assert raw.images.shape == (n, 28, 28) and raw.images.dtype == np.uint8
        assert np.bincount(raw.labels, minlength=10).tolist() == [per] * 10
    folder = prepare("fashion-mnist", split="test", cache_dir=tmp_path, progress=False)
    cache = open_cache(folder)
    assert cache.images.shape == (10000, 32, 32, 1)
    assert list(cache.manifest["counts_per_class"].values()) == [1000] * 10
    assert cache.class_names[0] == "T-shirt/top"


def test_cifar10_archive_and_folder_agree(tmp_path):
    arrays = write_cifar(tmp_path / "a", archive=True)
    write_cifar(tmp_path / "f", archive=False)
    ca = open_cache(prepare("cifar10", root=tmp_path / "a", cache_dir=tmp_path / "ca", progress=False))
    cf = open_cache(prepare("cifar10", root=tmp_path / "f", cache_dir=tmp_path / "cf", progress=False))
    assert len(ca) == 20 and ca.images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(ca.images, cf.images)
    np.testing.assert_array_equal(ca.labels, cf.labels)
    data, labels = arrays["data_batch_2"]
    # CIFAR row layout: 1024 red, then 1024 green, then 1024 blue bytes, each row-major 32x32
    np.testing.assert_array_equal(ca.images[4, :, :, 0], data[0, :1024].reshape(32, 32))
    np.testing.assert_array_equal(ca.images[4, :, :, 2], data[0, 2048:].reshape(32, 32))
    assert ca.labels[4:8].tolist() == labels
    assert ca.class_names == [n.decode() for n in CIFAR_NAMES]
    test = open_cache(prepare("cifar10", split="test", root=tmp_path / "a", cache_dir=tmp_path / "ca", progress=False))
    assert len(test) == 4


def test_cifar100_fine_labels(tmp_path):
    arrays = write_cifar(tmp_path, "cifar100")
    cache = open_cache(prepare("cifar100", root=tmp_path, cache_dir=tmp_path / "c", resolution=16, progress=False))
    assert cache.images.shape == (4, 16, 16, 3) and cache.num_classes == 100
    assert cache.labels.tolist() == arrays["train"][1]


def test_cifar_rejects_hostile_pickle(tmp_path):
    write_cifar(tmp_path, archive=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(LddpmError, match="not allowed"):
        prepare("cifar10", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    assert not marker.exists()


def test_cifar_truncated_archive(tmp_path):
    write_cifar(tmp_path)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(LddpmError) as exc:
        prepare("cifar10", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    assert str(archive) in str(exc.value)


def test_cifar_missing_names_locations(tmp_path):
    with pytest.raises(LddpmError) as exc:
        prepare("cifar10", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    msg = str(exc.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg and "--download" in msg


@pytest.fixture
def http_dir(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_md5(tmp_path, http_dir, monkeypatch):
    www, base = http_dir
    write_cifar(www)
    blob = (www / "cifar-10-python.tar.gz").read_bytes()
    md5 = hashlib.md5(blob).hexdigest()
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    with pytest.raises(LddpmError, match="MD5"):
        download_file(f"{base}/cifar-10-python.tar.gz", dest, "0" * 32, progress=False)
    assert not dest.exists() and not list(dest.parent.iterdir())  # partial file deleted
    assert download_file(f"{base}/cifar-10-python.tar.gz", dest, md5, progress=False).read_bytes() == blob
    file_dest = tmp_path / "dl2" / "x.tar.gz"
    download_file((www / "cifar-10-python.tar.gz").as_uri(), file_dest, md5, progress=False)
    assert file_dest.read_bytes() == blob
    # the prepare --download path, with the address and checksum overridden
    spec = dict(readers.CIFAR_ARCHIVES["cifar10"], url=f"{base}/cifar-10-python.tar.gz", md5=md5)
    monkeypatch.setitem(readers.CIFAR_ARCHIVES, "cifar10", spec)
    folder = prepare("cifar10", cache_dir=tmp_path / "cache", download=True, progress=False)
    assert len(open_cache(folder)) == 20
    assert (tmp_path / "cache" / "downloads" / "cifar-10-python.tar.gz").is_file()
    monkeypatch.setitem(readers.CIFAR_ARCHIVES, "cifar10", dict(spec, md5="f" * 32))
    with pytest.raises(LddpmError, match="MD5"):
        prepare("cifar10", split="test", cache_dir=tmp_path / "cache2", download=True, progress=False)
    assert not (tmp_path / "cache2" / "downloads" / "cifar-10-python.tar.gz").exists()


def test_imagenet100_tree(tmp_path):
    wnids = imagenet100_classes()
    rng = np.random.default_rng(0)
    for i, w in enumerate(wnids):
        (tmp_path / "train" / w).mkdir(parents=True)
    picks = {0: 2, 37: 1, 99: 1}
    for i, k in picks.items():
        for j in range(k):
            save_image(tmp_path / "train" / wnids[i] / f"{wnids[i]}_{j}.JPEG",
                       rng.integers(0, 256, (30, 44, 3), dtype=np.uint8), fmt="JPEG")
    save_image(tmp_path / "train" / "n01440764" / "tench.JPEG", np.zeros((20, 20, 3), np.uint8), fmt="JPEG")
    # a grey JPEG and a 2:1 image split red | blue: resize shorter side then centre crop
    save_image(tmp_path / "train" / wnids[5] / "grey.JPEG", np.full((24, 24), 200, np.uint8), fmt="JPEG")
    rb = np.zeros((32, 64, 3), np.uint8)
    rb[:, :32, 0] = 255
    rb[:, 32:, 2] = 255
    save_image(tmp_path / "train" / wnids[6] / "rb.png", rb)
    # The fixed class list needs images in every class folder, as the image-folder reader does.
    with pytest.raises(LddpmError, match=rf"class folder .*{wnids[1]} has no images \(and 94 more"):
        prepare("imagenet100", root=tmp_path, resolution=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    for w in wnids:
        if not any((tmp_path / "train" / w).iterdir()):
            save_image(tmp_path / "train" / w / "fill.png", np.zeros((8, 8, 3), np.uint8))
    cache = open_cache(prepare("imagenet100", root=tmp_path, resolution=16, cache_dir=tmp_path / "c",
                               workers=1, progress=False))
    assert len(cache) == 101 and cache.images.shape == (101, 16, 16, 3) and cache.num_classes == 100
    labels = cache.labels.tolist()
    assert labels == sorted(labels) and [labels.count(k) for k in (0, 1, 5, 6, 37, 99)] == [2, 1, 1, 1, 1, 1]
    assert cache.manifest["source"]["fingerprint"] == "size+mtime"
    assert abs(int(cache.images[labels.index(5)].astype(int).mean()) - 200) <= 2  # grey -> RGB
    rbc = cache.images[labels.index(6)].astype(int)  # 64x32 -> 32x16 -> centre 16x16: columns 8..24 of the resized
    assert (rbc[:, :7, 0] > 240).all() and (rbc[:, :7, 2] < 15).all()
    assert (rbc[:, 9:, 2] > 240).all() and (rbc[:, 9:, 0] < 15).all()
    (tmp_path / "val" / wnids[0]).mkdir(parents=True)
    with pytest.raises(LddpmError, match="99 of 100 class folders missing"):
        prepare("imagenet100", split="val", root=tmp_path, cache_dir=tmp_path / "c", progress=False)


def _write_imagefolder(root: Path, n_per_class=20):
    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        for j in range(n_per_class):
            h, w = rng.integers(12, 40, 2)
            save_image(root / c / f"{j:03d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_imagefolder_pool_matches_serial_and_skip_bad(tmp_path):
    root = tmp_path / "mine"
    _write_imagefolder(root)
    (root / "dog" / "010.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LddpmError, match="skip-bad") as exc:
        prepare("imagefolder", root=root, resolution=8, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert "010.png" in str(exc.value)
    assert not any((tmp_path / "c").iterdir())  # no half-written cache or temp folder left
    serial = open_cache(prepare("imagefolder", root=root, resolution=8, cache_dir=tmp_path / "c1",
                                workers=1, skip_bad=True, progress=False))
    pooled = open_cache(prepare("imagefolder", root=root, resolution=8, cache_dir=tmp_path / "c2",
                                workers=2, skip_bad=True, progress=False))
    assert len(serial) == 39 and serial.manifest["skipped"]["count"] == 1
    assert serial.manifest["counts_per_class"] == {"cat": 20, "dog": 19}
    assert serial.class_names == ["cat", "dog"] and serial.labels.tolist() == [0] * 20 + [1] * 19
    np.testing.assert_array_equal(serial.images, pooled.images)
    assert serial.checksum == pooled.checksum
    assert serial.path.name == "imagefolder-mine-train-8"


def test_cache_reuse_and_mismatch_refused(tmp_path):
    write_idx_set(tmp_path / "a", seed=0)
    write_idx_set(tmp_path / "b", seed=1)
    folder = prepare("mnist", root=tmp_path / "a", cache_dir=tmp_path / "c", progress=False)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare("mnist", root=tmp_path / "a", cache_dir=tmp_path / "c", progress=False) == folder
    assert prepare("mnist", cache_dir=tmp_path / "c", progress=False) == folder  # root not given: reuse
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(LddpmError, match="does not match"):
        prepare("mnist", root=tmp_path / "b", cache_dir=tmp_path / "c", progress=False)
    m = json.loads((folder / "manifest.json").read_text())
    m["request"]["fit"] = "resize"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LddpmError, match="fit"):
        prepare("mnist", root=tmp_path / "a", cache_dir=tmp_path / "c", progress=False)


def test_failed_prepare_keeps_existing_cache(tmp_path):
    src = tmp_path / "src"
    write_idx_set(src, gz=False)
    folder = prepare("mnist", root=src, cache_dir=tmp_path / "c", progress=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (src / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # corrupt
    with pytest.raises(LddpmError, match="train-labels"):
        prepare("mnist", root=src, cache_dir=tmp_path / "c", overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [folder.name]
    open_cache(folder).verify()


def test_cache_corruption_detected(tmp_path):
    write_idx_set(tmp_path / "src")
    folder = prepare("mnist", root=tmp_path / "src", cache_dir=tmp_path / "c", progress=False)
    arr = np.load(folder / "images.npy", mmap_mode="r+")
    arr[0, 5, 5, 0] ^= 1
    arr.flush()
    del arr
    with pytest.raises(LddpmError, match="images.npy is corrupt.*--overwrite"):  # refused on open already
        open_cache(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(LddpmError, match="manifest"):
        open_cache(folder)


# ------------------------------------------------------------------------------------------------
# loaders


@pytest.fixture
def small_cache(tmp_path):
    write_idx_set(tmp_path / "src", n_train=48)
    return open_cache(prepare("mnist", root=tmp_path / "src", cache_dir=tmp_path / "c", progress=False))


def test_loader_values_and_determinism(small_cache):
    loader = ImageLoader(small_cache, 8, seed=3)
    x, y = loader.batch(5)
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    idx = loader.indices(5)
    expect = torch.from_numpy(small_cache.images[idx].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    torch.testing.assert_close(x, expect)
    assert x.min() >= -1 and x.max() <= 1
    assert y.tolist() == small_cache.labels[idx].tolist()
    x2, y2 = ImageLoader(small_cache, 8, seed=3).batch(5)  # a fresh loader (resume)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(ImageLoader(small_cache, 8, seed=4).batch(5)[0], x)
    # one epoch (48 / 8 = 6 steps) visits every sample exactly once
    seen = np.concatenate([loader.indices(s) for s in range(6)])
    assert sorted(seen.tolist()) == list(range(48))
    assert not np.array_equal(seen, np.concatenate([loader.indices(s) for s in range(6, 12)]))


def test_loader_shards_disjoint_and_union(small_cache):
    world = 4
    full = ImageLoader(small_cache, 12, seed=7, hflip=True)
    for step in (0, 3, 9):
        shards = [ImageLoader(small_cache, 3, seed=7, rank=r, world_size=world, hflip=True) for r in range(world)]
        idx = [s.indices(step) for s in shards]
        assert len(set(np.concatenate(idx).tolist())) == 12  # disjoint
        np.testing.assert_array_equal(np.concatenate(idx), full.indices(step))  # union = global batch
        xs = torch.cat([s.batch(step)[0] for s in shards])
        assert torch.equal(xs, full.batch(step)[0])  # flips too


def test_loader_hflip(small_cache):
    plain = ImageLoader(small_cache, 16, seed=1)
    flip = ImageLoader(small_cache, 16, seed=1, hflip=True)
    a, b = plain.batch(2)[0], flip.batch(2)[0]
    flipped = [not torch.equal(a[i], b[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i in range(16):
        assert torch.equal(b[i], a[i].flip(-1) if flipped[i] else a[i])
    assert torch.equal(flip.batch(2)[0], b)


def test_iter_from_matches_batch(small_cache):
    loader = ImageLoader(small_cache, 5, seed=2)
    for prefetch in (0, 2):
        it = loader.iter_from(4, prefetch=prefetch)
        for k in range(4):
            x, y = next(it)
            assert torch.equal(x, loader.batch(4 + k)[0]) and torch.equal(y, loader.batch(4 + k)[1])
        it.close()


def test_loader_bad_arguments(small_cache):
    with pytest.raises(LddpmError, match="rank"):
        ImageLoader(small_cache, 4, rank=2, world_size=2)
    with pytest.raises(LddpmError, match="batch_size"):
        ImageLoader(small_cache, 0)


# ------------------------------------------------------------------------------------------------
# latent caches


class _Posterior:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std


class TinyVAE(torch.nn.Module):
    """Stand-in with the AutoencoderKL encode interface: x (B,C,H,W) -> posterior(.mean, .std)."""

    def __init__(self, channels=1, latent=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, 2 * latent, 4, stride=4)
        self.register_buffer("scaling_factor", torch.tensor(0.5))
        self.seen = []

    def encode(self, x):
        self.seen.append((float(x.min()), float(x.max()), tuple(x.shape)))
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return _Posterior(mean, torch.exp(0.5 * logvar.clamp(-4, 2)))


def test_encode_latents_and_loader(small_cache, tmp_path):
    vae = TinyVAE()
    out = encode_latents(vae, small_cache, tmp_path / "lat", batch_size=10, progress=False)
    lat = open_latent_cache(out)
    assert lat.mean.shape == (48, 2, 8, 8) and lat.mean.dtype == np.float16 and lat.std.dtype == np.float16
    assert all(lo >= -1 and hi <= 1 and shape[1:] == (1, 32, 32) for lo, hi, shape in vae.seen)
    x = torch.from_numpy(small_cache.images[:].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        ref = vae.encode(x)
    np.testing.assert_allclose(lat.mean, ref.mean.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(lat.std, ref.std.numpy(), rtol=2e-3, atol=2e-3)
    m = lat.manifest
    assert m["vae_id"].startswith("sha256:") and m["source_checksum"] == small_cache.checksum
    assert m["latent_shape"] == [2, 8, 8] and m["scaling_factor"] == 0.5 and m["resolution"] == 32
    assert encode_latents(vae, small_cache, out, progress=False) == out  # reuse
    with pytest.raises(LddpmError, match="vae_id"):
        encode_latents(TinyVAE(seed=1), small_cache, out, progress=False)

    det = LatentLoader(lat, 6, seed=1, sample_posterior=False)
    z, y = det.batch(3)
    idx = det.sampler.indices(3)
    torch.testing.assert_close(z, 0.5 * torch.from_numpy(lat.mean[idx].astype(np.float32)))
    assert y.tolist() == lat.labels[idx].tolist()
    loader = LatentLoader(out, 6, seed=1, scaling_factor=2.0)
    a, b = loader.batch(3), LatentLoader(out, 6, seed=1, scaling_factor=2.0).batch(3)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], loader.batch(4)[0])
    eps = (a[0] / 2.0 - torch.from_numpy(lat.mean[idx].astype(np.float32))) / torch.from_numpy(lat.std[idx].astype(np.float32))
    assert abs(float(eps.mean())) < 0.15 and abs(float(eps.std()) - 1) < 0.15  # 768 N(0,1) draws
    shards = [LatentLoader(out, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([s.sampler.indices(3) for s in shards]), idx)
    assert torch.equal(shards[1].batch(3)[0], LatentLoader(out, 3, seed=1, rank=1, world_size=2).batch(3)[0])


# ------------------------------------------------------------------------------------------------
# command line and benchmark


def test_cli_prepare(tmp_path, capsys):
    from lddpm.cli import main

    write_idx_set(tmp_path / "src")
    assert main(["prepare", "mnist", "--root", str(tmp_path / "src"), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mnist-train-32" in out and "30 images" in out
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "mnist", "--root", str(tmp_path / "nothing"), "--cache-dir", str(tmp_path / "c2")])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err


def test_benchmark_quick(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).parents[1] / "benchmarks" / "data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] and all(r["images_per_s"] > 0 for r in result["rows"])
