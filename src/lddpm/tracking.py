"""Experiment trackers: the run's `log.jsonl` (always written) and, when `run.trackers` asks, TensorBoard.

TensorBoard event files are written by `torch.utils.tensorboard.SummaryWriter` (the `tensorboard`
package, the optional extra `lddpm[tensorboard]`) into the run folder itself, so that
`tensorboard --logdir runs` lists one entry per run folder, named after it. What goes there:

- training (rank 0 only): `train/loss` (the mean since the last record, as in log.jsonl),
  `train/loss_t/<band>` (the unweighted loss by quarter of the timestep range, diffusion runs),
  `train/lr`, `train/grad_norm`, `train/images_per_s`, `train/ema_decay` and the sample grids
  (`samples`) at the step they were made; the run's config as text at its first step;
- `lddpm eval` and study cells: `eval/<settings>/<metric>` and `study/<cell>/<metric>` (FID, KID,
  class accuracy, ..., seconds per image) at the step of the checkpoint they scored.

A resumed run opens its writer with `purge_step` = the step it resumes from + 1: TensorBoard then
drops the records a killed attempt wrote after that checkpoint (the same records `_trim_log`
removes from log.jsonl), so the curves continue without duplicate steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from lddpm.checkpoint import checkpoint_step
from lddpm.errors import LddpmError

TRACKERS = ("jsonl", "tensorboard")  # jsonl: the run's log.jsonl, always written
# The metrics of an evaluation result (lddpm.evaluate) logged to the trackers, by their key there.
EVAL_METRICS = ("fid", "kid", "kid_std", "precision", "recall", "class_accuracy", "classifier_score", "inception_score",
                "psnr", "mse", "seconds_per_image", "slot_accuracy", "pair_accuracy", "all_accuracy", "swap_rate")


def summary_writer_class():
    """`torch.utils.tensorboard.SummaryWriter`; a clear LddpmError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LddpmError("run.trackers asks for 'tensorboard', but the tensorboard package is not installed; "
                         "install it (pip install 'lddpm[tensorboard]', or `make setup`) or remove 'tensorboard' "
                         "from run.trackers") from None
    return SummaryWriter


def check_trackers(trackers: Iterable[str]) -> list[str]:
    """The tracker names, checked: known names, and their packages installed (before any work is done)."""
    from lddpm.checks import check_choice

    names = list(trackers)
    for name in names:
        check_choice("run.trackers", name, TRACKERS)
    if "tensorboard" in names:
        summary_writer_class()
    return names


class Tracker:
    """Scalars, images and text for one run folder, to every tracker of `trackers` besides jsonl.

    With no such tracker every call does nothing, so callers need no `if`. `purge_step` (TensorBoard):
    records from an earlier attempt at steps >= purge_step are dropped by TensorBoard's readers.
    """

    def __init__(self, run_dir: str | Path, trackers: Iterable[str] = ("jsonl",), *, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.writer = None
        if "tensorboard" in check_trackers(trackers):
            self.writer = summary_writer_class()(log_dir=str(self.run_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        """True when some tracker besides jsonl writes."""
        return self.writer is not None

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        """One scalar per finite number of `values`, tagged `prefix + key`; None and NaN are left out."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (bool, str)) or value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self.writer.add_scalar(prefix + key, value, global_step=int(step))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """A uint8 image (H, W, C) or (H, W)."""
        if self.writer is None:
            return
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        self.writer.add_image(tag, image, global_step=int(step), dataformats="HWC")

    def image_file(self, tag: str, step: int, path: str | Path) -> None:
        """A PNG file written by the run (a sample grid)."""
        if self.writer is None or not Path(path).is_file():
            return
        from PIL import Image

        with Image.open(path) as handle:
            self.image(tag, step, np.asarray(handle.convert("RGB") if handle.mode not in ("L", "RGB") else handle))

    def text(self, tag: str, step: int, text: str) -> None:
        """Text (shown as Markdown by TensorBoard)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=int(step))

    def flush(self) -> None:
        """Write what is buffered to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- evaluation results


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder of a checkpoint file `<run>/checkpoints/step_N.safetensors`, else None."""
    path = Path(checkpoint)
    if path.parent.name != "checkpoints" or checkpoint_step(path) is None:
        return None
    return path.parent.parent


def run_trackers(run_dir: str | Path) -> list[str]:
    """`run.trackers` of a run folder's saved config.json (["jsonl"] when it has none or cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text())
        trackers = data["run"].get("trackers") or ["jsonl"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ["jsonl"]
    return [t for t in trackers if isinstance(t, str)]


def evaluation_scalars(result: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation result or a study row: FID, KID, class accuracy, ..., s/image."""
    values = {key: result.get(key) for key in EVAL_METRICS}
    cost = result.get("cost") or {}
    if values["seconds_per_image"] is None:
        values["seconds_per_image"] = cost.get("seconds_per_image")
    faith = ((result.get("faithfulness") or {}).get("scores")) or {}
    for key in ("slot_accuracy", "pair_accuracy", "all_accuracy", "swap_rate"):
        if values[key] is None and faith.get(key) is not None:
            values[key] = faith[key]
    if values["class_accuracy"] is None and faith.get("class_accuracy") is not None:
        values["class_accuracy"] = faith["class_accuracy"]
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def tag_name(text: str) -> str:
    """A TensorBoard tag part: letters, digits and . _ - + kept, anything else (a slash too) becomes '_'."""
    return "".join(c if c.isalnum() or c in "._-+" else "_" for c in str(text)) or "_"


def log_evaluation(checkpoint: str | Path, group: str, name: str, result: Mapping[str, Any]) -> Path | None:
    """Log an evaluation's numbers under `<group>/<name>/<metric>` at the step of `checkpoint`, into its run.

    Only for a checkpoint inside a run folder whose `run.trackers` include a tracker besides jsonl
    (the numbers are always in the evaluation's own JSON file); returns the run folder it logged to.
    """
    run_dir = run_folder_of(checkpoint)
    if run_dir is None:
        return None
    trackers = [t for t in run_trackers(run_dir) if t in TRACKERS]
    if not set(trackers) - {"jsonl"}:
        return None
    values = evaluation_scalars(result)
    with Tracker(run_dir, trackers) as tracker:
        tracker.scalars(checkpoint_step(checkpoint), values, prefix=f"{group}/{tag_name(name)}/")
    return run_dir
