"""Small training utilities: learning-rate schedule, stop signal, run-folder and resume checks (EMA: lddpm.train.ema)."""

from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from lddpm import distributed
from lddpm.config import Config
from lddpm.data import DATASETS, open_cache, prepare
from lddpm.diffusion import LOSS_WEIGHTINGS, OBJECTIVES, TIMESTEP_SAMPLINGS
from lddpm.checks import check_choice
from lddpm.errors import LddpmError
from lddpm.nn import NETWORK_NAMES, network_config
from lddpm.nn.vae import RECON_LOSSES
from lddpm.sampling import SAMPLERS
from lddpm.schedule import SCHEDULES
from lddpm.tasks import MASK_KINDS, TASKS
from lddpm.tracking import TRACKERS
from lddpm.train.ema import EMA, power_ema_decay  # noqa: F401  (re-exported for the trainers' imports)

# Config sections whose change alters what a resumed run computes (run.steps/out/logging may change).
RESUME_SECTIONS = ("model", "diffusion", "data", "optim", "vae", "text", "task")
RESUME_RUN_KEYS = ("seed", "bf16", "class_conditional", "label_dropout")


def use_deterministic_kernels(device: torch.device, enabled: bool = True) -> None:
    """On CUDA, pick deterministic kernels (cuDNN, cuBLAS, index/scatter ops) so runs repeat bitwise.

    CPU kernels already repeat. The choice is process-wide (torch.use_deterministic_algorithms);
    warn_only lets an op without a deterministic CUDA kernel run, with a warning naming it.
    """
    if not enabled or torch.device(device).type != "cuda":
        return
    # cuBLAS repeats its results only with a fixed workspace (PyTorch "Reproducibility" notes).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def lr_at(step: int, lr: float, warmup_steps: int, cooldown: float = 0.0, progress: float = 0.0,
          shape: str = "linear") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, constant, then (cooldown > 0) a
    fall to zero over the last `cooldown` fraction of the run, as 1 - x (shape "linear") or 1 - sqrt(x) (shape
    "sqrt", Haegele et al. 2024) of the fraction x of the cool-down done; `progress` is the fraction of the run
    done before this step (so the run's last step, at progress (steps - 1) / steps, still moves the weights)."""
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if cooldown > 0:
        done = min(1.0, max(0.0, 1.0 - (1.0 - progress) / cooldown))
        factor *= 1.0 - (math.sqrt(done) if shape == "sqrt" else done)
    return lr * factor


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so it can checkpoint and exit cleanly.

    A second SIGINT while the flag is set raises KeyboardInterrupt (the user insists).
    """

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the loop still runs
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_run_dir(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training when the run folder is not writable or its disk is too full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise LddpmError(f"cannot write to the run folder {run_dir} ({exc.strerror or exc}); choose another --out") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise LddpmError(
            f"not enough free disk space for checkpoints in {run_dir}: {free / 1e6:.0f} MB free, about "
            f"{needed_bytes / 1e6:.0f} MB needed; free some space, lower run.keep_checkpoints or choose another --out"
        )


def network_overrides(config: Config, derived: dict[str, Any]) -> dict[str, Any]:
    """model.overrides plus the fields fixed by the data and the diffusion settings."""
    overrides = dict(config.model.overrides)
    for key, value in derived.items():
        given = overrides.get(key)
        if given is not None and (list(given) if isinstance(given, (list, tuple)) else given) != value:
            raise LddpmError(
                f"model.overrides.{key} = {given!r} conflicts with the data/diffusion settings, which need "
                f"{value!r}; remove it from model.overrides"
            )
        overrides[key] = value
    return overrides


def open_training_images(config: Config, info: distributed.DistInfo, progress: bool):
    """Prepare (rank 0 first) and open the image cache named by the [data] section."""
    d = config.data
    kwargs = dict(resolution=d.resolution, split=d.split, root=d.root, cache_dir=d.cache_dir,
                  caption_column=d.caption_column)
    if info.is_main:
        path = prepare(d.dataset, progress=progress, **kwargs)
    distributed.barrier(info)
    if not info.is_main:
        path = prepare(d.dataset, progress=False, **kwargs)
    return open_cache(path)


def check_names(config: Config) -> Config:
    """Check every name in a config against the list of the module that owns it (network registry,
    schedules, objectives, datasets, samplers, VAE losses); the error lists the choices."""
    m, d, r = config.model, config.diffusion, config.run
    check_choice("model.kind", m.kind, NETWORK_NAMES)
    check_choice(f"model.name (for kind {m.kind!r})", m.name, NETWORK_NAMES[m.kind])
    network_config(m.kind, m.name, **m.overrides)  # model.overrides: known fields of the right type
    check_choice("diffusion.schedule", d.schedule, SCHEDULES)
    check_choice("diffusion.objective", d.objective, OBJECTIVES)
    check_choice("diffusion.loss_weighting", d.loss_weighting, LOSS_WEIGHTINGS)
    check_choice("diffusion.timestep_sampling", d.timestep_sampling, TIMESTEP_SAMPLINGS)
    check_choice("data.dataset", config.data.dataset, DATASETS)
    check_choice("run.sampler", r.sampler, SAMPLERS)
    check_choice("vae.recon_loss", config.vae.recon_loss, RECON_LOSSES)
    check_choice("task.kind", config.task.kind, TASKS)
    for kind in config.task.masks:
        check_choice("task.masks", kind, MASK_KINDS)
    for tracker in r.trackers:
        check_choice("run.trackers", tracker, TRACKERS)
    return config


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`section.key` names whose values differ between a checkpoint's config and the current one.

    A key the checkpoint's config lacks (a setting added to lddpm after the run started) counts as its default.
    """
    diffs = []
    for section in RESUME_SECTIONS:
        # a section a checkpoint predates (e.g. [task]) holds its defaults, today's behaviour
        defaults = Config().to_dict().get(section) or {}
        old, new = {**defaults, **(saved.get(section) or {})}, {**defaults, **(now.get(section) or {})}
        diffs += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    old, new = saved.get("run") or {}, now.get("run") or {}
    diffs += [f"run.{k}" for k in RESUME_RUN_KEYS if old.get(k) != new.get(k)]
    return diffs
