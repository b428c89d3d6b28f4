"""FID feature extraction with the pinned Inception network: every backend side by side in one run.

    python benchmarks/fid.py                        # 100 images, batch 50, 3 interleaved repeats
    python benchmarks/fid.py --quick                # tiny run, to check the script works
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/fid.py   # the faster allocator

Backends: PyTorch fp32 (the reference), PyTorch with channels_last, PyTorch frozen +
optimize_for_inference, the same with oneDNN graph fusion, ONNX Runtime (the `onnx` backend, when
installed) and OpenVINO fp32 (when installed and tcmalloc is not preloaded: it crashes under it).
The backends take turns batch by batch, so that load from other processes falls on all alike; each
row gives the median images/s, its ratio to PyTorch fp32 (median of the per-repeat ratios) and the
largest relative feature error against PyTorch fp32 on the same images. Also times one Frechet
distance at D = 2048: scipy sqrtm of the product, and against reference statistics with the reference's
square root computed once (lddpm's evaluation path). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lddpm.metrics import ReferenceStats, frechet_distance, load_inception
from lddpm.metrics.inception import find_inception_file, load_torchscript
from lddpm.metrics.onnx_backend import onnx_available, onnx_cache_path, onnx_network

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402


def _frozen(ext, onednn_fusion: bool = False):
    """The extractor with its TorchScript network frozen and optimised for inference (optionally oneDNN graph fusion)."""
    net, _ = load_torchscript(find_inception_file(), None, "FID feature network")
    torch.jit.enable_onednn_fusion(onednn_fusion)
    ext.network = torch.jit.optimize_for_inference(torch.jit.freeze(net.eval()))
    return ext


class _OpenVino:
    """The exported ONNX file compiled by OpenVINO's CPU plugin in fp32 (its default on bf16 CPUs is bf16)."""

    def __init__(self, path: Path, threads: int):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.model = ov.Core().compile_model(str(path), "CPU", config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.model(x.numpy())[0].copy())


def backends(batch_size: int) -> dict:
    """name -> (constructor of a FeatureExtractor, or None, and why it is skipped)."""
    out = {
        "torch fp32": (lambda: load_inception(batch_size=batch_size, backend="torch"), None),
        "torch channels_last": (lambda: load_inception(batch_size=batch_size, backend="torch", channels_last=True), None),
        "torch frozen": (lambda: _frozen(load_inception(batch_size=batch_size, backend="torch")), None),
        "torch frozen+onednn-fusion": (lambda: _frozen(load_inception(batch_size=batch_size, backend="torch"), True), None),
    }
    out["onnxruntime"] = (
        (lambda: load_inception(batch_size=batch_size, backend="onnx"), None) if onnx_available()
        else (None, "onnxruntime/onnx not installed (pip install 'lddpm[fast-fid]')")
    )
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        out["openvino fp32"] = (None, "skipped: OpenVINO crashes with tcmalloc preloaded")
    else:
        try:
            import openvino  # noqa: F401

            def make_openvino():
                ext = load_inception(batch_size=batch_size, backend="torch")
                onnx_network(ext.network, sha1=ext.sha1, input_size=ext.input_size)  # exports once, cached
                ext.network = _OpenVino(onnx_cache_path(ext.sha1, ext.input_size), torch.get_num_threads())
                return ext

            out["openvino fp32"] = (make_openvino, None)
        except ImportError:
            out["openvino fp32"] = (None, "openvino not installed")
    return out


def time_frechet(dim: int) -> dict:
    """Seconds for one Frechet distance on random dim x dim covariances: scipy sqrtm, and against reference
    statistics (ReferenceStats.frechet_distance: the first call computes the reference's square root, later
    calls reuse it), with the relative difference of the two values."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(dim + 100, dim)), rng.normal(size=(dim + 100, dim)) * 1.1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    start = time.perf_counter()
    value = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    seconds = time.perf_counter() - start
    ref = ReferenceStats(mu=b.mean(0), sigma=s2)
    start = time.perf_counter()
    ref.frechet_distance(a.mean(0), s1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached = ref.frechet_distance(a.mean(0), s1)
    again = time.perf_counter() - start
    return {"dim": dim, "seconds": seconds, "reference_first_seconds": first, "reference_cached_seconds": again,
            "relative_difference": abs(cached - value) / abs(value)}


def main(argv: list[str] | None = None) -> dict:
    """Measure, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num", type=int, default=100, help="images per timed pass (after one warm-up batch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed passes per backend")
    parser.add_argument("--resolution", type=int, default=32, help="input image size (resized to 299 inside)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="+", default=None, help="backend names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="4 images, batch 2, 1 repeat, and a 128-d Frechet distance")
    parser.add_argument("--out", default="benchmarks/results/fid.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch_size, args.num, args.repeats = 2, 4, 1
    images = np.random.default_rng(0).integers(0, 256, size=(args.num, args.resolution, args.resolution, 1), dtype=np.uint8)

    extractors, rows = {}, {}
    for name, (make, skipped) in backends(args.batch_size).items():
        if args.only and name not in args.only:
            continue
        if skipped:
            rows[name] = {"backend": name, "skipped": skipped}
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ext = make()
                ext.features_batch(images[: args.batch_size])  # warm-up (oneDNN fusion compiles on its first calls)
                ext.features_batch(images[: args.batch_size])
        except Exception as exc:  # noqa: BLE001 - a backend that fails here is reported, not fatal
            rows[name] = {"backend": name, "skipped": f"failed: {str(exc).splitlines()[0][:120]}"}
            continue
        finally:
            torch.jit.enable_onednn_fusion(False)
        extractors[name] = ext
        rows[name] = {"backend": name, "images_per_s": [], "features": None}
    # interleaved batch by batch, so that load from other processes falls on every backend alike
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    for _ in range(args.repeats):
        seconds, feats = dict.fromkeys(extractors, 0.0), {name: [] for name in extractors}
        for batch in batches:
            for name, ext in extractors.items():
                torch.jit.enable_onednn_fusion(name.endswith("onednn-fusion"))  # a global switch: on for its row only
                start = time.perf_counter()
                feats[name].append(ext.features(batch))
                seconds[name] += time.perf_counter() - start
                torch.jit.enable_onednn_fusion(False)
        for name in extractors:
            rows[name]["images_per_s"].append(len(images) / seconds[name])
            rows[name]["features"] = np.concatenate(feats[name])

    base = rows.get("torch fp32", {})
    base_speeds, ref = np.array(base.get("images_per_s", [])), base.get("features")
    for row in rows.values():
        if "skipped" in row:
            continue
        speeds, feats = row.pop("images_per_s"), row.pop("features")
        row.update(images=len(images), repeats=len(speeds), images_per_s=float(np.median(speeds)),
                   images_per_s_all=[round(s, 3) for s in speeds])
        if ref is not None:
            row["speedup_vs_torch_fp32"] = float(np.median(np.array(speeds) / base_speeds))
            row["max_rel_feature_error"] = float(np.abs(feats - ref).max() / np.abs(ref).max())
            row["norm_rel_feature_error"] = float(np.linalg.norm(feats - ref) / np.linalg.norm(ref))
    fid_dim = 128 if args.quick else 2048
    frechet = time_frechet(fid_dim)

    header = f"{'backend':<27} {'images/s':>9} {'x torch fp32':>12} {'max rel err':>12} {'norm rel err':>12}"
    print(header)
    print("-" * len(header))
    for r in rows.values():
        if "skipped" in r:
            print(f"{r['backend']:<27} {r['skipped']}")
            continue
        print(f"{r['backend']:<27} {r['images_per_s']:>9.2f} {r.get('speedup_vs_torch_fp32', float('nan')):>12.2f} "
              f"{r.get('max_rel_feature_error', float('nan')):>12.2e} {r.get('norm_rel_feature_error', float('nan')):>12.2e}")
    print(f"Frechet distance ({fid_dim}-d): scipy sqrtm {frechet['seconds']:.2f} s; against reference statistics "
          f"{frechet['reference_first_seconds']:.2f} s the first time, {frechet['reference_cached_seconds']:.2f} s "
          f"after (relative difference {frechet['relative_difference']:.1e})")
    result = {
        "benchmark": "fid-features", "quick": args.quick, "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "ld_preload": os.environ.get("LD_PRELOAD", ""), "resolution": args.resolution,
        "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
        "onnxruntime": _version("onnxruntime"), "openvino": _version("openvino"),
        "machine": platform.machine(), "rows": list(rows.values()), "frechet_distance": frechet,
    }
    write_json(result, args.out)
    return result


def _version(package: str) -> str | None:
    """Installed version of a package, or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
