"""Checkpoints: one safetensors file per save, tensors plus a JSON header; no pickle anywhere.

A checkpoint holds named groups of state (`model`, `ema`, `optimizer`, `diffusion`, `rng`, ...).
Each group is a nested structure (a state dict, an optimizer state dict, ...): its tensors are
stored as safetensors entries named `group/path/to/tensor`, and everything else (counters,
param groups, the run config, the lddpm and code versions) goes into one JSON document kept in
the safetensors metadata. Loading reads only tensors and JSON, so it can never run code.
Files are written to a temporary name and moved into place with `os.replace` (atomic).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lddpm import __version__
from lddpm.checks import strict
from lddpm.errors import LddpmError
from lddpm.io import remove_stale_temp_files, rust_io_errors, write_text, write_with

FORMAT = "lddpm-checkpoint/1"
META_KEY = "lddpm"
LAST_POINTER = "last.txt"
HALF_FLOATS = (torch.float16, torch.bfloat16)  # lddpm writes float32/float64 only (bf16 runs use autocast)
_STEP_RE = re.compile(r"step_(\d+)\.safetensors$")


@lru_cache(maxsize=1)
def code_version() -> str:
    """A short hash of the lddpm source files (identifies the code without needing git)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- (un)flattening


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference; collect tensors by name."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        # Non-string keys (optimizer state is keyed by parameter index): keep them typed.
        return {"__items__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _flatten(torch.as_tensor(obj), prefix, tensors)
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj: Any, get_tensor) -> Any:
    """Inverse of `_flatten`, fetching tensors by name with `get_tensor`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return get_tensor(obj["__tensor__"])
        if set(obj) == {"__items__"}:
            return {k: _unflatten(v, get_tensor) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_unflatten(v, get_tensor) for v in obj["__tuple__"])
        return {k: _unflatten(v, get_tensor) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, get_tensor) for v in obj]
    return obj


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | Path, groups: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Atomically write `groups` (nested state with tensors) and JSON `meta` to one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = {name: _flatten(value, name, tensors) for name, value in groups.items()}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen:
            tensors[name] = tensor.clone()  # safetensors refuses tensors that share memory
        seen.add(ptr)
    header = {
        "format": FORMAT,
        "lddpm_version": __version__,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "meta": meta,
        "structure": structure,
    }
    def write(tmp: Path) -> None:
        with rust_io_errors(tmp):  # a full disk: OSError -> "disk full while writing ..."
            save_file(tensors, str(tmp), metadata={"format": "pt", META_KEY: json.dumps(header)})

    return write_with(path, write)


class Checkpoint:
    """An opened checkpoint: JSON header in memory, tensors read on demand."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.meta: dict[str, Any] = strict(header["meta"], str(path), "checkpoint metadata")

    @property
    def groups(self) -> list[str]:
        """Names of the stored groups."""
        return list(self.header["structure"])

    def load(self, group: str, device: str | torch.device = "cpu") -> Any:
        """The nested state of one group, with its tensors."""
        if group not in self.header["structure"]:
            raise LddpmError(f"checkpoint {self.path} has no {group!r} state (has: {', '.join(self.groups)})")
        try:
            with safe_open(str(self.path), framework="pt", device=str(device)) as handle:
                return _unflatten(self.header["structure"][group], lambda name: self._checked(name, handle.get_tensor(name)))
        except LddpmError:
            raise
        except Exception as exc:  # a file changed or damaged after opening
            raise LddpmError(f"checkpoint {self.path} is damaged: {exc}") from None

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Refuse a half-precision floating tensor or one holding NaN/inf (a damaged or foreign file)."""
        if tensor.is_floating_point():
            if tensor.dtype in HALF_FLOATS:
                raise LddpmError(f"checkpoint {self.path}: tensor {name} is {str(tensor.dtype).replace('torch.', '')}, "
                                 "but lddpm checkpoints hold float32; convert the weights to float32 (or use the run's own checkpoint)")
            if not bool(torch.isfinite(tensor).all()):
                raise LddpmError(f"checkpoint {self.path}: tensor {name} contains NaN or infinity; "
                                 "use an earlier checkpoint of the run (the weights in this file are unusable)")
        return tensor


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open and check a checkpoint file (or run folder); LddpmError names a bad file."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
    except Exception as exc:  # truncated, corrupt, or not safetensors at all (e.g. a pickle)
        raise LddpmError(
            f"{path} is not a readable lddpm checkpoint (corrupt, truncated or another format: "
            f"{exc}); lddpm never loads pickled files"
        ) from None
    if META_KEY not in metadata:
        raise LddpmError(f"{path} is a safetensors file without lddpm metadata: not an lddpm checkpoint")
    try:
        header = json.loads(metadata[META_KEY])
    except json.JSONDecodeError:
        raise LddpmError(f"{path}: the lddpm metadata is not valid JSON (damaged checkpoint)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LddpmError(f"{path}: unknown checkpoint format {header.get('format') if isinstance(header, dict) else header!r}; expected {FORMAT}")
    for key in ("structure", "meta"):
        if not isinstance(header.get(key), dict):
            raise LddpmError(f"{path} is damaged: its lddpm metadata has no {key!r} table")
    wanted: set[str] = set()
    _unflatten(header["structure"], lambda name: wanted.add(name))
    missing = wanted - names
    if missing:
        raise LddpmError(f"{path} is damaged: {len(missing)} tensors are missing (e.g. {sorted(missing)[0]})")
    return Checkpoint(path, header)


# ----------------------------------------------------------------------------- run folders


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint after `step` optimizer steps."""
    return f"step_{step:07d}.safetensors"


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a checkpoint file's name (`step_0001500.safetensors` -> 1500), or None for other names."""
    match = _STEP_RE.search(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in a `checkpoints/` folder, oldest first."""
    found = [p for p in Path(folder).glob("step_*.safetensors") if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def final_checkpoint(run_dir: str | Path, steps: int, max_minutes: float = 0.0) -> Path | None:
    """The checkpoint a finished run ended with, or None while the run is unfinished.

    A run finishes at run.steps, or, with run.max_minutes, at the step where its time ran out:
    then the last checkpoint says `finished` and holds at least that much wall time.
    """
    folder = Path(run_dir) / "checkpoints"
    final = folder / checkpoint_name(steps)
    if final.is_file():
        return final
    existing = list_checkpoints(folder) if max_minutes and folder.is_dir() else []
    if existing:
        meta = load_checkpoint(existing[-1]).meta
        if meta.get("finished") and float(meta.get("wall_time", 0.0)) >= 60.0 * max_minutes:
            return existing[-1]
    return None


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A checkpoint file from a file path, a run folder or its `checkpoints/` folder."""
    path = Path(run_or_checkpoint)
    if path.is_file():
        return path
    if not path.exists():
        raise LddpmError(f"{path} does not exist: give a run folder or a checkpoint file")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = folder / LAST_POINTER
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        # A checkpoint's file name in this folder, nothing else: a path in the pointer is never followed.
        if name == Path(name).name and checkpoint_step(name) is not None and (folder / name).is_file():
            return folder / name
    found = list_checkpoints(folder)
    if not found:
        raise LddpmError(f"no checkpoint found in {path} (expected {folder}/step_*.safetensors)")
    return found[-1]


def clean_checkpoint_dir(run_dir: str | Path) -> list[Path]:
    """Remove the stale temporary files (`.step_*.safetensors.tmp-*`) a killed save left in `run_dir/checkpoints`.

    Only names made by lddpm's atomic writer are touched, and never those of a writer still running.
    Call it when a run starts (fresh or resumed).
    """
    return remove_stale_temp_files(Path(run_dir) / "checkpoints")


def save_run_checkpoint(run_dir: str | Path, step: int, groups: dict[str, Any], meta: dict[str, Any], keep: int,
                        keep_steps: Iterable[int] = ()) -> Path:
    """Write `checkpoints/step_XXXXXXX.safetensors`, move the `last` pointer, keep the last `keep` and those of
    `keep_steps` (run.keep_steps)."""
    folder = Path(run_dir) / "checkpoints"
    path = save_checkpoint(folder / checkpoint_name(step), groups, meta)
    write_text(folder / LAST_POINTER, path.name + "\n")
    pinned = set(keep_steps)
    for old in [p for p in list_checkpoints(folder) if checkpoint_step(p) not in pinned][:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def estimate_checkpoint_bytes(*modules: torch.nn.Module, optimizer_copies: int = 2) -> int:
    """Rough size of a checkpoint: the weights of `modules` plus Adam's two moments of the first."""
    sizes = [sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in modules]
    return int(sum(sizes) + optimizer_copies * (sizes[0] if sizes else 0) + 1_000_000)
