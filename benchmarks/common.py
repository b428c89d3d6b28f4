"""Helpers shared by the benchmark scripts: peak memory and the JSON result file."""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lddpm.io import write_json as write_json_atomic


def read_status_kb(key: str) -> int | None:
    """A 'kB' field of /proc/self/status (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory above the starting level (MiB): RSS high-water mark on CPU, allocator peak on CUDA.

    On CPU, VmHWM is reset to the current RSS through /proc/self/clear_refs, so memory freed
    before the block does not hide the block's own peak; `mib` is None where /proc is missing.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
            self.start = read_status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = max(torch.cuda.max_memory_allocated(self.device) - self.start, 0) / 2**20
        else:
            peak = read_status_kb("VmHWM")
            self.mib = max(peak - self.start, 0) / 1024 if peak is not None and self.start is not None else None


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every benchmark result."""
    return {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    """Write the result as indented JSON (creating the folder; atomically) and say where."""
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return Path(out)
