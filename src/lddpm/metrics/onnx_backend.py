"""ONNX Runtime backend for the feature network: the same TorchScript weights, exported once to ONNX.

The network file (pinned by its sha1) is exported with torch's TorchScript-based ONNX exporter and
cached under `<cache>/onnx/`, keyed by the network's sha1 and the converter version (torch version,
opset, `EXPORT_VERSION`), so a new torch or a change to the export code makes a new file. ONNX
Runtime's CPU provider then runs it with all graph optimisations (its NCHWc layout transform is
what makes it faster than PyTorch here). NVIDIA's prologue stays in PyTorch, before the network,
so it is the same code on both backends. Features match PyTorch's to ~1e-6 relative.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lddpm.data.cache import default_cache_dir
from lddpm.errors import LddpmError

FEATURE_BACKENDS = ("auto", "torch", "onnx")
ONNX_OPSET = 17
EXPORT_VERSION = 1  # bump when the export code below changes what it writes
INSTALL_HINT = "install it with `pip install 'lddpm[fast-fid]'` (onnxruntime and onnx), or use --feature-backend torch"


def onnx_available() -> bool:
    """Whether onnxruntime (to run) and onnx (which torch's exporter needs) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def resolve_backend(backend: str, device: str | torch.device = "cpu", exportable: bool = True) -> str:
    """'auto' | 'torch' | 'onnx' -> the backend to use: 'auto' is ONNX Runtime when installed and on CPU, else PyTorch."""
    if backend not in FEATURE_BACKENDS:
        raise LddpmError(f"unknown feature backend {backend!r}; choose one of {', '.join(FEATURE_BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        return "onnx" if on_cpu and exportable and onnx_available() else "torch"
    if backend == "onnx":
        if not on_cpu:
            raise LddpmError(f"the onnx feature backend runs on the CPU only, not {device}; use --feature-backend torch")
        if not exportable:
            raise LddpmError("this feature network cannot use the onnx backend (it resizes its own input); use --feature-backend torch")
        if not onnx_available():
            raise LddpmError(f"the onnx feature backend needs onnxruntime and onnx; {INSTALL_HINT}")
    return backend


def converter_version(input_size: int) -> str:
    """What besides the weights decides the exported file: torch version, opset, export code version, input size."""
    return f"torch{torch.__version__}-opset{ONNX_OPSET}-v{EXPORT_VERSION}-s{input_size}"


def onnx_cache_path(sha1: str, input_size: int, cache_dir: str | Path | None = None) -> Path:
    """`<cache>/onnx/<sha1>-<converter version>.onnx`."""
    return Path(cache_dir or default_cache_dir()) / "onnx" / f"{sha1}-{converter_version(input_size)}.onnx"


def export_onnx(network: nn.Module, path: str | Path, input_size: int) -> Path:
    """Export `network` ((N, 3, S, S) -> (N, D)) to ONNX at `path`, batch dimension dynamic; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    example = torch.zeros(1, 3, input_size, input_size)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated but is the one that takes a ScriptModule
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network.eval().cpu(), (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                input_names=["images"], output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            )
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means this network has no onnx backend
        raise LddpmError(f"could not export the feature network to ONNX: {exc}; use --feature-backend torch") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OnnxNetwork:
    """A feature network run by ONNX Runtime's CPU provider: float32 (N, 3, S, S) tensor -> (N, D) tensor."""

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # installed but broken
            raise LddpmError(f"onnxruntime does not import: {exc}; {INSTALL_HINT}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged cache file
            raise LddpmError(f"ONNX Runtime cannot load {str(path)!r}: {exc}; delete the file to re-export it") from None
        self.path = Path(path)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on one batch."""
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def onnx_network(
    network: nn.Module, *, sha1: str | None, input_size: int, cache_dir: str | Path | None = None, threads: int | None = None
) -> OnnxNetwork:
    """The ONNX Runtime twin of a TorchScript feature network, exported once and cached by sha1 and converter version."""
    if sha1 is None:  # an unhashed network has no stable cache key: export it afresh every time
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            return OnnxNetwork(export_onnx(network, Path(folder) / "network.onnx", input_size), threads)
    path = onnx_cache_path(sha1, input_size, cache_dir)
    if not path.is_file():
        export_onnx(network, path, input_size)
    return OnnxNetwork(path, threads)
