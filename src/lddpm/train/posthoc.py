"""Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3 and App. C): power-function EMAs saved as snapshots during
training, and an EMA of any relative length reconstructed from them afterwards by least squares.

During training (`optim.posthoc_ema = [0.05, 0.10]`, `optim.posthoc_every = K`) every tracked EMA is updated
after each optimizer step, and every K steps (and at the run's last step) rank 0 writes one snapshot file
`RUN/ema_snapshots/step_XXXXXXX.safetensors` holding all of them. A snapshot of the EMA with exponent gamma
taken after t steps is the average of the weights with the profile p(s; t, gamma) (`lddpm.train.ema`), so a
combination sum_i x_i snapshot_i averages with the profile sum_i x_i p_i; `reconstruct_ema` picks x by least
squares against the profile of the wanted sigma_rel (closed-form inner products) and writes a checkpoint that
`load_pipeline`, `lddpm sample` and `lddpm eval` load like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lddpm.checkpoint import (checkpoint_name, checkpoint_step, list_checkpoints, load_checkpoint, resolve_checkpoint,
                              save_checkpoint)
from lddpm.errors import LddpmError
from lddpm.train.ema import EMA, posthoc_coefficients, sigma_rel_to_gamma

SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_KIND = "ema-snapshot"


class PostHocEMA:
    """The power-function EMAs tracked for post-hoc reconstruction, one per sigma_rel (EDM2 uses 0.05 and 0.10)."""

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = [EMA(model, decay=0.0, warmup=False, gamma=g) for g in self.gammas]

    def update(self, model: nn.Module, num_updates: int) -> None:
        """Update every tracked EMA after optimizer step `num_updates` (0-based)."""
        for ema in self.emas:
            ema.update(model, num_updates)

    def state_dict(self) -> dict[str, Any]:
        """The tracked EMAs' weights, keyed by their index ("0", "1", ...), for the run checkpoint."""
        return {str(i): ema.model.state_dict() for i, ema in enumerate(self.emas)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        if sorted(state) != [str(i) for i in range(len(self.emas))]:
            raise LddpmError(f"the checkpoint tracks {len(state)} post-hoc EMAs, the config {len(self.emas)}")
        for i, ema in enumerate(self.emas):
            ema.model.load_state_dict(state[str(i)])

    def snapshot_bytes(self) -> int:
        """Size of one snapshot file (all tracked EMAs' float32 tensors; the JSON header is small)."""
        return sum(t.numel() * t.element_size() for ema in self.emas for t in ema.model.state_dict().values())

    def save_snapshot(self, run_dir: str | Path, step: int, network: dict[str, Any]) -> Path:
        """Write `RUN/ema_snapshots/step_XXXXXXX.safetensors` (atomic): every tracked EMA after `step` steps."""
        meta = {"kind": SNAPSHOT_KIND, "step": int(step), "sigma_rels": self.sigma_rels, "gammas": self.gammas,
                "network": network}
        groups = {f"ema{i}": ema.model.state_dict() for i, ema in enumerate(self.emas)}
        return save_checkpoint(Path(run_dir) / SNAPSHOT_DIR / checkpoint_name(step), groups, meta)


def list_snapshots(run_dir: str | Path) -> list[Path]:
    """A run's snapshot files, oldest first."""
    return list_checkpoints(Path(run_dir) / SNAPSHOT_DIR)


def drop_snapshots_after(run_dir: str | Path, step: int) -> list[Path]:
    """Remove snapshots taken after `step`: a run resumed from the checkpoint at `step` retrains those steps
    (a killed run may have written snapshots past its last checkpoint). Returns the removed files."""
    removed = [p for p in list_snapshots(run_dir) if checkpoint_step(p) > step]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def reconstruct_ema(run: str | Path, sigma_rel: float, out: str | Path | None = None, *,
                    at_step: int | None = None) -> Path:
    """Write a checkpoint whose EMA weights are the power-function EMA of relative length `sigma_rel` after
    `at_step` steps (default: the last snapshot), reconstructed from the run's snapshots by least squares.

    The file (default `RUN/posthoc_ema/ema-<sigma_rel>-step_XXXXXXX.safetensors`) has the run checkpoint's
    metadata, the reconstructed weights as its `ema` group and, when the run kept a checkpoint at that step,
    its raw weights as `model`; `meta["posthoc_ema"]` records sigma_rel, gamma, the snapshots used, their
    coefficients and the relative L2 error of the fitted profile. Only snapshots up to `at_step` are used.
    """
    run = Path(run)
    if not run.is_dir():
        raise LddpmError(f"run folder {run} does not exist; give the folder of a run trained with optim.posthoc_ema")
    gamma = sigma_rel_to_gamma(sigma_rel)
    snaps = list_snapshots(run)
    if not snaps:
        raise LddpmError(f"{run} has no post-hoc EMA snapshots ({run / SNAPSHOT_DIR}); train with "
                         "--set optim.posthoc_ema=[0.05,0.1] to save them")
    steps = [checkpoint_step(p) for p in snaps]
    target = steps[-1] if at_step is None else int(at_step)
    if target not in steps:
        raise LddpmError(f"no snapshot at step {target} in {run / SNAPSHOT_DIR}; snapshots exist at steps "
                         f"{steps[0]}..{steps[-1]} (every {steps[1] - steps[0] if len(steps) > 1 else steps[0]}); "
                         "choose one of them")
    used = [load_checkpoint(p) for p, s in zip(snaps, steps) if s <= target]
    profiles, keys = [], []
    for ck in used:
        if ck.meta.get("kind") != SNAPSHOT_KIND:
            raise LddpmError(f"{ck.path} is not a post-hoc EMA snapshot")
        for i, g in enumerate(ck.meta["gammas"]):
            profiles.append((float(ck.meta["step"]), float(g)))
            keys.append((ck, f"ema{i}"))
    coeffs, error = posthoc_coefficients(profiles, float(target), gamma)
    base = _run_checkpoint(run)
    network = base.meta["network"]
    if used[-1].meta["network"] != network:
        raise LddpmError(f"the snapshots in {run / SNAPSHOT_DIR} were made by another network than {base.path}")
    from lddpm.nn import network_from_config

    param_names = {name for name, _ in network_from_config(network["kind"], network["config"]).named_parameters()}
    ema: dict[str, torch.Tensor] = {k: v for k, v in base.load("ema").items() if k not in param_names}
    total: dict[str, torch.Tensor] = {}
    loaded: dict[Path, dict[str, Any]] = {}
    for (ck, group), x in zip(keys, coeffs):
        if ck.path not in loaded:
            loaded = {ck.path: {g: ck.load(g) for g in ck.groups}}  # one snapshot file in memory at a time
        for name in param_names:
            value = loaded[ck.path][group][name].double() * float(x)
            total[name] = total[name] + value if name in total else value
    ema.update({name: value.float() for name, value in total.items()})
    groups: dict[str, Any] = {"ema": ema}
    at_target = run / "checkpoints" / checkpoint_name(target)
    source = load_checkpoint(at_target) if at_target.is_file() else None
    if source is not None:
        groups["model"] = source.load("model")
    if "vae" in base.groups:
        groups["vae"] = base.load("vae")
    meta = dict((source or base).meta)
    meta.update(step=target, images_seen=target * int(meta["config"]["optim"]["batch_size"]))
    meta["posthoc_ema"] = {
        "sigma_rel": float(sigma_rel), "gamma": gamma, "step": target, "relative_profile_error": error,
        "snapshots": [{"step": int(t), "gamma": g, "coefficient": float(x)} for (t, g), x in zip(profiles, coeffs)],
        "source": str(run.resolve()),
    }
    if source is None:
        meta["posthoc_ema"]["note"] = (f"no run checkpoint at step {target}: the 'model' group (raw weights) is "
                                       "absent and wall_time is the last checkpoint's")
    if out is None:
        out = run / "posthoc_ema" / f"ema-{sigma_rel:.3f}-{checkpoint_name(target)}"
    return save_checkpoint(out, groups, meta)


def _run_checkpoint(run: Path):
    """The run's last checkpoint (config, network and, for latent runs, the VAE)."""
    try:
        ckpt = load_checkpoint(resolve_checkpoint(run))
    except LddpmError as exc:
        raise LddpmError(f"{run}: post-hoc EMA needs the run folder with its checkpoints ({exc})") from None
    if ckpt.meta.get("kind") != "diffusion":
        raise LddpmError(f"{ckpt.path} is a {ckpt.meta.get('kind')!r} checkpoint, not a diffusion run")
    return ckpt
