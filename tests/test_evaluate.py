"""Tests for lddpm.evaluate with stand-in networks, caches and pipelines (no Inception, no real data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lddpm import evaluate as ev
from lddpm.errors import LddpmError
from lddpm.metrics import FeatureExtractor
from helpers import ConvFeatures, write_random_idx

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NUM_CLASSES = 4
RES = 8


class _Features(nn.Module):
    """A fixed random projection of the pixels: a deterministic stand-in for Inception."""

    def __init__(self, dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3 * RES * RES, dim, generator=g) / RES)

    def forward(self, x):
        return x.flatten(1) @ self.w


def _extractor(dim=6):
    return FeatureExtractor(_Features(dim), name="stand-in", sha1="f" * 40, input_size=None, batch_size=16)


def _class_images(labels, seed=0):
    """Class k: grey level 40 + 50 k plus noise."""
    rng = np.random.default_rng(seed)
    base = 40 + 50 * np.asarray(labels)[:, None, None, None]
    return np.clip(base + rng.normal(0, 8, size=(len(labels), RES, RES, 1)), 0, 255).astype(np.uint8)


class _Oracle(nn.Module):
    """Classifies the class images above from their mean level (input in [-1, 1])."""

    in_channels = 1

    def forward(self, x):
        level = (x.mean(dim=(1, 2, 3)) + 1) * 127.5
        centres = 40 + 50 * torch.arange(NUM_CLASSES, dtype=x.dtype)
        return -((level[:, None] - centres) ** 2) / 10


class _Cache:
    """The parts of lddpm.data.ImageCache that evaluation uses."""

    def __init__(self, images, labels, split="train", checksum="c0ffee"):
        self.images, self.labels = images, labels
        self.dataset, self.split, self.checksum = "toy", split, checksum
        self.resolution, self.channels = images.shape[1], images.shape[3]

    def __len__(self):
        return len(self.images)


def _reference(tmp_path, n=120, **kw):
    labels = np.arange(n) % NUM_CLASSES
    cache = _Cache(_class_images(labels, seed=1), labels)
    return ev.reference_from_cache(cache, num=None, extractor=_extractor(), cache_dir=tmp_path, progress=False, **kw), cache


def test_reference_built_once_then_loaded_and_mismatch_refused(tmp_path, monkeypatch):
    ref, cache = _reference(tmp_path)
    assert ref.manifest["num"] == 120 and ref.manifest["resolution"] == RES
    assert ref.manifest["network_sha1"] == "f" * 40 and ref.manifest["dataset_checksum"] == "c0ffee"
    np.testing.assert_allclose(ref.mu, ref.features.mean(0), atol=1e-6)  # all 120 features kept
    files = list((tmp_path / "fid-refs").glob("*.npz"))
    assert len(files) == 1

    # a second request loads the cache without computing features
    def boom(*a, **k):
        raise AssertionError("features recomputed")

    ext = _extractor()
    monkeypatch.setattr(ext, "features_batch", boom)
    again = ev.reference_from_cache(cache, num=None, extractor=ext, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    # the dataset cache changed (new checksum) -> refused
    cache.checksum = "changed"
    with pytest.raises(LddpmError, match="dataset_checksum"):
        ev.reference_from_cache(cache, num=None, extractor=ext, cache_dir=tmp_path, progress=False)
    with pytest.raises(LddpmError, match="more than"):
        ev.reference_from_cache(cache, num=1000, extractor=ext, cache_dir=tmp_path, progress=False)


def test_precision_recall_real_features_are_a_random_subset_of_a_class_ordered_cache(tmp_path, monkeypatch):
    """Caches are written class after class: the kept real features must not be the first ones."""
    monkeypatch.setattr("lddpm.evaluate.reference.PR_MAX_FEATURES", 12)
    labels = np.repeat(np.arange(NUM_CLASSES), 30)  # class-ordered, as image-folder caches are
    cache = _Cache(_class_images(labels, seed=1), labels)
    ext = _extractor()
    ref = ev.reference_from_cache(cache, num=None, extractor=ext, cache_dir=tmp_path, progress=False)
    assert ref.features.shape == (12, 6) and ref.manifest["pr_features"] == 12
    assert ref.manifest["pr_subset_seed"] is not None
    every = ext.features_batch(cache.images)
    rows = [int(np.argmin(np.abs(every - f).sum(1))) for f in ref.features]
    assert len(set(rows)) == 12 and np.allclose(every[rows], ref.features, atol=1e-5)
    assert len(set(labels[rows])) == NUM_CLASSES  # the first 12 in cache order would all be class 0
    # the first m of them, as evaluate_generated takes, are spread over the classes too
    assert len(set(labels[rows[:8]])) >= 3
    result = ev.evaluate_generated(cache.images[:8], reference_stats=ref, extractor=ext)
    assert result["pr_real_subset"] == {"seed": ref.manifest["pr_subset_seed"], "size": 8, "of": 120}


def test_reference_subset_is_seeded_and_sorted():
    a, b = ev.reference_indices(100, 10), ev.reference_indices(100, 10)
    np.testing.assert_array_equal(a, b)
    assert (np.diff(a) > 0).all() and len(a) == 10
    np.testing.assert_array_equal(ev.reference_indices(5, 5), np.arange(5))


def test_evaluate_generated_against_itself_and_class_metrics(tmp_path):
    ref, cache = _reference(tmp_path)
    result = ev.evaluate_generated(
        np.asarray(cache.images), cache.labels, reference_stats=ref, extractor=_extractor(),
        classifier=_Oracle(), classifier_meta={"dataset": "toy"},
    )
    assert abs(result["fid"]) < 1e-6
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["class_accuracy"] == 1.0
    assert result["classifier_score"] == pytest.approx(NUM_CLASSES, rel=1e-3)  # confident and balanced
    assert result["full_rank_covariance"] is True and result["num_images"] == 120
    # shifted images: FID grows, accuracy falls for the wrong labels
    other = ev.evaluate_generated(
        np.asarray(cache.images), (cache.labels + 1) % NUM_CLASSES, reference_stats=ref, extractor=_extractor(),
        classifier=_Oracle(),
    )
    assert other["class_accuracy"] == 0.0
    noise = np.random.default_rng(3).integers(0, 256, size=(60, RES, RES, 1), dtype=np.uint8)
    assert ev.evaluate_generated(noise, reference_stats=ref, extractor=_extractor())["fid"] > 1.0


def test_evaluate_generated_small_n_warns_and_records(tmp_path):
    ref, cache = _reference(tmp_path)
    ext = _extractor()
    ext.network = _Features(dim=6)
    with pytest.warns(UserWarning, match="not full rank"):
        r = ev.evaluate_generated(np.asarray(cache.images[:5]), reference_stats=ref, extractor=ext)
    assert r["full_rank_covariance"] is False
    assert np.isfinite(r["fid"])


def test_evaluate_generated_rejects_bad_inputs(tmp_path):
    ref, cache = _reference(tmp_path)
    images = np.asarray(cache.images)
    with pytest.raises(LddpmError, match="uint8"):
        ev.evaluate_generated(images.astype(np.float32) / 255, reference_stats=ref, extractor=_extractor())
    with pytest.raises(LddpmError, match="resolution|built at"):
        ev.evaluate_generated(np.zeros((10, 16, 16, 1), np.uint8), reference_stats=ref, extractor=_extractor())
    other_net = _extractor()
    other_net.sha1 = "0" * 40
    with pytest.raises(LddpmError, match="sha1"):
        ev.evaluate_generated(images, reference_stats=ref, extractor=other_net)
    with pytest.raises(LddpmError, match="labels"):
        ev.evaluate_generated(images, np.zeros(3), reference_stats=ref, extractor=_extractor(), classifier=_Oracle())


def _fake_generate(calls):
    def generate(n, labels, seed):
        calls.append(seed)
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, size=(n, RES, RES, 1), dtype=np.uint8), labels

    return generate


def test_generate_resumable_resumes_to_the_same_images(tmp_path):
    labels = ev.balanced_labels(10, NUM_CLASSES)
    np.testing.assert_array_equal(np.bincount(labels), [3, 3, 2, 2])
    full_calls = []
    full, full_labels, timing = ev.generate_resumable(
        _fake_generate(full_calls), 10, batch_size=4, labels=labels, seed=7, partial_dir=tmp_path / "a",
        settings={"x": 1}, progress=False,
    )
    assert full.shape == (10, RES, RES, 1) and len(full_calls) == 3
    assert timing["timing_excludes_warmup"] and timing["num_timed_images"] == 6
    np.testing.assert_array_equal(full_labels, labels)

    # interrupted after the first two batches, then resumed
    calls = []

    def flaky(n, lab, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_generate(calls)(n, lab, seed)

    with pytest.raises(KeyboardInterrupt):
        ev.generate_resumable(flaky, 10, batch_size=4, labels=labels, seed=7, partial_dir=tmp_path / "b",
                              settings={"x": 1}, progress=False)
    assert sorted(p.name for p in (tmp_path / "b").glob("batch-*.npz")) == ["batch-00000.npz", "batch-00001.npz"]
    resumed_calls = []
    images, out_labels, timing = ev.generate_resumable(
        _fake_generate(resumed_calls), 10, batch_size=4, labels=labels, seed=7, partial_dir=tmp_path / "b",
        settings={"x": 1}, progress=False,
    )
    assert len(resumed_calls) == 1 and timing["num_resumed"] == 8
    np.testing.assert_array_equal(images, full)
    np.testing.assert_array_equal(out_labels, labels)
    with pytest.raises(LddpmError, match="other settings.*x"):
        ev.generate_resumable(_fake_generate([]), 10, batch_size=4, seed=7, partial_dir=tmp_path / "b",
                              settings={"x": 2}, progress=False)


class _Denoiser(nn.Module):
    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


class _FakePipeline:
    """Follows the Pipeline interface: generate() calls the model num_steps times (2x batch with guidance)."""

    num_classes = NUM_CLASSES
    resolution = RES
    channels = 1
    dataset = "toy"

    def __init__(self):
        self.model = _Denoiser()

    def generate(self, num, *, sampler, num_steps, eta=0.0, guidance_scale=1.0, labels=None, seed=0, batch_size=64, progress=True):
        batch = 2 * num if guidance_scale != 1.0 else num
        for step in range(num_steps):
            self.model(torch.zeros(batch, 1, RES, RES), torch.full((batch,), step))
        return _class_images(labels, seed=seed), labels


def test_evaluate_checkpoint_with_fake_pipeline_counts_evaluations(tmp_path):
    ref, _ = _reference(tmp_path)
    result = ev.evaluate_checkpoint(
        "fake-run", num=40, sampler="ddim", num_steps=5, guidance_scale=3.0, reference=ref, batch_size=16,
        extractor=_extractor(), classifier=None, pipeline=_FakePipeline(), partial_dir=tmp_path / "samples",
        progress=False,
    )
    cost = result["cost"]
    assert cost["model_calls"] == 15 and cost["model_calls_per_batch"] == 5
    assert cost["network_evaluations_per_image"] == 10  # guidance: one batched call of twice the batch per step
    assert cost["network_evaluations_per_image_step"] == 2
    assert cost["images_per_second"] > 0 and cost["num_timed_images"] == 24  # first batch is warm-up
    assert cost["peak_memory_mib"] > 0
    assert result["settings"]["guidance_scale"] == 3.0 and result["settings"]["labels"] == "balanced"
    assert result["fid"] < 5.0 and result["lddpm_version"]
    out = ev.write_result(result, tmp_path / "r.json")
    assert json.loads(out.read_text())["settings"]["num_steps"] == 5
    assert "FID" in ev.summary_line(result) and "NFE 5" in ev.summary_line(result)
    with pytest.raises(LddpmError, match="guidance"):
        ev.evaluate_checkpoint("fake-run", num=8, guidance_scale=2.0, labels="none", reference=ref,
                               extractor=_extractor(), classifier=None, pipeline=_FakePipeline(), progress=False)
    # --labels none on a conditional model samples with the null label and scores no class accuracy
    pipe, seen = _FakePipeline(), []
    generate = pipe.generate
    pipe.generate = lambda num, **kw: (seen.append(kw["labels"]), generate(num, **{**kw, "labels": np.zeros(num, int)}))[1]
    r = ev.evaluate_checkpoint("fake-run", num=8, num_steps=2, labels="none", reference=ref, extractor=_extractor(),
                               classifier=None, pipeline=pipe, progress=False)
    assert all((y == NUM_CLASSES).all() for y in seen) and r["class_accuracy"] is None


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class _IdentityVAE(nn.Module):
    def encode(self, x):
        return _Posterior(x)

    def decode(self, z):
        return z


class _DarkeningVAE(_IdentityVAE):
    def decode(self, z):
        return z - 0.2  # 0.1 on [0, 1] pixels (before clamping)


def test_evaluate_vae_identity_and_known_error(tmp_path):
    ref, _ = _reference(tmp_path)
    test = _Cache(_class_images(np.arange(40) % NUM_CLASSES, seed=1), np.arange(40) % NUM_CLASSES, split="test")
    r = ev.evaluate_vae(_IdentityVAE(), test, reference_stats=ref, extractor=_extractor(), num=40)
    assert r["mse"] == 0.0 and r["psnr"] > 100
    dark = ev.evaluate_vae(_DarkeningVAE(), test, reference_stats=ref, extractor=_extractor(), num=40)
    # images are >= 40/255 > 0.1 almost everywhere, so the error is ~0.1 per pixel (uint8 rounding aside)
    assert dark["mse"] == pytest.approx(0.01, rel=0.05)
    assert dark["psnr"] == pytest.approx(20.0, abs=0.3)
    assert dark["fid"] > r["fid"]


def test_load_images_npz_and_png_folder(tmp_path):
    images = _class_images(np.arange(6) % NUM_CLASSES)
    np.savez(tmp_path / "s.npz", images=images, labels=np.arange(6))
    x, y = ev.load_images(tmp_path / "s.npz")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, np.arange(6))
    folder = tmp_path / "png"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")
    x, y = ev.load_images(folder)
    np.testing.assert_array_equal(x, images)
    assert y is None
    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(LddpmError, match="no `images`"):
        ev.load_images(tmp_path / "bad.npz")


def test_cli_registers_evaluation_commands(capsys):
    from lddpm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "runs/x", "--num", "16", "--sampler", "ddim", "--steps", "10", "--guidance-scale", "2"])
    assert args.func.__name__ == "run_eval" and args.num == 16 and args.guidance_scale == 2.0
    args = parser.parse_args(["fid-ref", "fashion-mnist", "--num", "100"])
    assert args.func.__name__ == "run_fid_ref" and args.split == "train"
    args = parser.parse_args(["train-classifier", "fashion-mnist", "--epochs", "1"])
    assert args.func.__name__ == "run_train_classifier"
    with pytest.raises(LddpmError, match="exactly one"):
        parser.parse_args(["eval"]).func(parser.parse_args(["eval"]))


def test_evaluate_checkpoint_end_to_end_with_a_tiny_trained_run(tmp_path):
    """A 2-step run trained by lddpm.train, sampled through lddpm.pipeline, scored against a prepared cache."""
    from lddpm.config import apply_overrides, config_from_preset
    from lddpm.train import train

    root, cache = write_random_idx(tmp_path / "idx"), tmp_path / "cache"
    config = apply_overrides(config_from_preset("fashion-quick"), [
        f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}", "data.resolution=8",
        "optim.batch_size=4", "optim.warmup_steps=1", "run.steps=2", "run.log_every=1", "run.sample_every=0",
        "run.checkpoint_every=100", 'run.device="cpu"', "run.num_sample_images=4", "run.sample_steps=2",
        "model.overrides={model_channels=8, channel_mult=[1], attention_resolutions=[]}",
    ])
    train(config, tmp_path / "run", progress=False)
    result = ev.evaluate_checkpoint(
        tmp_path / "run", num=20, sampler="ddim", num_steps=3, guidance_scale=2.0, batch_size=10, seed=1,
        extractor=_extractor(), classifier=None, cache_dir=cache, data_root=root, partial_dir=tmp_path / "s",
        progress=False,
    )
    assert result["num_images"] == 20 and result["resolution"] == 8 and np.isfinite(result["fid"])
    assert result["reference"]["dataset"] == "fashion-mnist" and result["reference"]["num"] == 20
    assert result["cost"]["model_calls_per_batch"] == 3 and result["cost"]["network_evaluations_per_image"] == 6
    assert len(list((tmp_path / "s").glob("batch-*.npz"))) == 2


def test_cli_fid_ref_and_eval_images(tmp_path, capsys):
    from lddpm.cli import main

    root, cache = write_random_idx(tmp_path / "idx"), tmp_path / "cache"
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    common = ["--inception", str(net), "--cache-dir", str(cache), "--root", str(root), "--quiet"]
    assert main(["fid-ref", "fashion-mnist", "--num", "20", "--resolution", "32", *common]) == 0
    assert "N=20 32px" in capsys.readouterr().out
    images = np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "gen.npz", images=images, labels=np.arange(20) % 10)
    out = tmp_path / "res.json"
    assert main(["eval", "--images", str(tmp_path / "gen.npz"), "--reference", "fashion-mnist:train",
                 "--classifier", "none", "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "rank-deficient" not in printed  # 20 images > 4 features
    result = json.loads(out.read_text())
    assert result["feature_network"]["sha1"] == ev.load_extractor(net).sha1
    assert result["reference"]["num"] == 20 and result["settings"]["num"] == 20
    # a network file whose hash differs from the expected one is refused with exit status 2
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--images", str(tmp_path / "gen.npz"), "--reference", "fashion-mnist:train", "--classifier",
              "none", "--out", str(out), "--inception-sha1", "0" * 40, *common])
    assert exit_info.value.code == 2 and "sha1" in capsys.readouterr().err


def test_cli_eval_vae_reconstructions_of_a_tiny_trained_vae(tmp_path, capsys):
    from lddpm.cli import main
    from lddpm.config import apply_overrides, config_from_preset
    from lddpm.train import train_vae

    root, cache = write_random_idx(tmp_path / "idx"), tmp_path / "cache"
    config = apply_overrides(config_from_preset("vae-fashion-quick"), [
        f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}", "data.resolution=16",
        "optim.batch_size=4", "optim.warmup_steps=1", "run.steps=2", "run.log_every=1", "run.sample_every=0",
        "run.checkpoint_every=100", 'run.device="cpu"', "run.num_sample_images=4",
        "model.overrides={base_channels=8, channel_mult=[1, 2, 2]}",
    ])
    train_vae(config, tmp_path / "vae", progress=False)
    net = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(ConvFeatures()), str(net))
    out = tmp_path / "vae.json"
    assert main(["eval", "--vae", str(tmp_path / "vae"), "--reference", "fashion-mnist:train", "--num", "12",
                 "--inception", str(net), "--cache-dir", str(cache), "--root", str(root), "--out", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "vae" and result["num_images"] == 12 and result["resolution"] == 16
    assert result["source"]["split"] == "test" and 0 < result["mse"] < 1 and np.isfinite(result["psnr"])
    assert "PSNR" in capsys.readouterr().out
