"""The study: a grid of training runs and evaluation cells -> one folder with table, plots, grids.

A study file (TOML) has three parts:

    [study]            shared settings: dataset, resolution, N for FID, reference split, seed, ...
    [runs.<name>]      training runs: a trainer config (file or preset) + `set` overrides + steps
    [[cells]]          evaluation cells: run, sampler, steps, eta, guidance scale, labels

A cell's `run`, `sampler`, `steps`, `guidance_scale` and `eta` may be lists; the cell is then expanded into one
cell per combination and its `name` is a template (`"ddim-{steps}"`, `"cfg-s{guidance_scale:g}"`).

`run_study` is resumable: each finished cell is stored atomically in `cells/<name>.json` and
skipped on the next run; a training run is reused when its final checkpoint exists (and resumed
from its last checkpoint otherwise). A cell that raises is recorded as `failed: <message>` and the
rest of the grid goes on. How a run is trained and a cell is scored is injectable (`train_fn`,
`cell_fn`), so the runner and the report are testable with toy functions.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import tomllib
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lddpm.errors import LddpmError

CELL_KINDS = ("sample", "vae")
RUN_KINDS = ("diffusion", "vae")
LABEL_MODES = ("balanced", "none")
PLOT_GROUPS = ("samplers", "guidance", "schedules", "vae", "other")

# One row of the results table: these keys, in this order, in results.json/csv.
ROW_FIELDS = (
    "name", "status", "run", "model", "data", "sampler", "steps", "eta", "guidance_scale",
    "schedule", "fid", "fid_n", "inception_score", "class_accuracy", "precision", "recall",
    "seconds_per_image", "model_evals", "train_images", "train_seconds", "group",
)


@dataclass
class StudySettings:
    """Settings shared by every run and cell of a study."""

    name: str = "study"
    dataset: str = "fashion-mnist"
    resolution: int = 32
    fid_n: int = 500  # images per cell for FID / IS / precision-recall
    reference_split: str = "test"  # FID reference statistics come from this split
    reference_n: int = 0  # images of that split in the reference statistics (0 = all)
    seed: int = 0
    fid_batch_size: int = 50
    sample_batch_size: int = 64
    grid_per_class: int = 8  # grid columns when the samples have labels (one row per class)
    grid_size: int = 64  # images in the grid of an unlabelled cell
    classifier: str = "classifier"  # classifier run folder (relative to the output folder)
    classifier_steps: int = 1500
    device: str = "cpu"
    data_root: str | None = None
    cache_dir: str | None = None


@dataclass
class RunSpec:
    """One training run: a trainer config plus overrides."""

    name: str
    config: str  # trainer config: a TOML file (relative to the study file) or a preset name
    kind: str = "diffusion"  # "diffusion" or "vae"
    steps: int | None = None  # total training steps (overrides the config's)
    set: list[str] = field(default_factory=list)  # `--set key=value` overrides
    vae: str | None = None  # name of the VAE run whose latents a latent-diffusion run trains on


@dataclass
class CellSpec:
    """One evaluation cell: a run scored with one sampler setting."""

    name: str
    run: str
    kind: str = "sample"  # "sample": generate and score; "vae": reconstruct the reference split
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    labels: str = "balanced"  # "balanced": equal images per class (conditional runs); "none"
    group: str = ""  # which plot the cell belongs to; inferred when empty
    fid_n: int | None = None  # overrides the study's N for this cell


@dataclass
class Study:
    """A parsed study file."""

    settings: StudySettings
    runs: dict[str, RunSpec]
    cells: list[CellSpec]
    base_dir: Path = Path(".")  # folder of the study file; trainer config paths are relative to it

    def fid_n(self, cell: CellSpec) -> int:
        """N for this cell's FID."""
        return cell.fid_n or self.settings.fid_n


# ----------------------------------------------------------------------------- loading


def _from_dict(cls, data: dict, where: str, **extra):
    """Build dataclass `cls` from a TOML table, naming unknown keys in the error."""
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise LddpmError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed - set(extra))}")
    return cls(**data, **extra)


def _expand_cell(raw: dict, index: int) -> list[CellSpec]:
    """Expand list-valued run/sampler/steps/guidance_scale/eta into one cell per combination."""
    if "name" not in raw or "run" not in raw:
        raise LddpmError(f"cells[{index}]: every cell needs `name` and `run` (got keys {sorted(raw)})")
    axes = {k: raw[k] for k in ("run", "sampler", "steps", "guidance_scale", "eta") if isinstance(raw.get(k), list)}
    if not axes:
        return [_from_dict(CellSpec, raw, f"cells[{index}]")]
    cells = []
    for combo in itertools.product(*axes.values()):
        item = dict(raw, **dict(zip(axes, combo)))
        try:
            item["name"] = raw["name"].format(**item)
        except (KeyError, ValueError) as exc:
            raise LddpmError(f"cells[{index}]: bad name template {raw['name']!r}: {exc}") from None
        cells.append(_from_dict(CellSpec, item, f"cells[{index}]"))
    if len({c.name for c in cells}) < len(cells):
        raise LddpmError(f"cells[{index}]: name template {raw['name']!r} must mention every list-valued key {list(axes)}")
    return cells


def _infer_group(cell: CellSpec) -> str:
    """The plot a cell belongs to, when the study file does not say."""
    if cell.kind == "vae":
        return "vae"
    return "samplers" if cell.guidance_scale == 1.0 else "guidance"


def study_from_dict(data: dict, base_dir: str | Path = ".") -> Study:
    """Parse and validate a study description (the TOML file's contents)."""
    unknown = sorted(set(data) - {"study", "runs", "cells"})
    if unknown:
        raise LddpmError(f"study file: unknown top-level table(s) {unknown}; allowed: study, runs, cells")
    settings = _from_dict(StudySettings, dict(data.get("study", {})), "[study]")
    runs = {}
    for name, raw in data.get("runs", {}).items():
        if "config" not in raw:
            raise LddpmError(f"[runs.{name}]: missing `config` (a trainer TOML file or preset name)")
        run = _from_dict(RunSpec, dict(raw), f"[runs.{name}]", name=name)
        if run.kind not in RUN_KINDS:
            raise LddpmError(f"[runs.{name}]: kind {run.kind!r} is not one of {RUN_KINDS}")
        runs[name] = run
    for run in runs.values():
        if run.vae is not None and (run.vae not in runs or runs[run.vae].kind != "vae"):
            raise LddpmError(f"[runs.{run.name}]: vae = {run.vae!r} must name a run with kind = \"vae\"")
    cells: list[CellSpec] = []
    for i, raw in enumerate(data.get("cells", [])):
        cells.extend(_expand_cell(dict(raw), i))
    if not cells:
        raise LddpmError("study file: no [[cells]] given; add at least one evaluation cell")
    seen = set()
    for cell in cells:
        if cell.name in seen:
            raise LddpmError(f"cells: duplicate cell name {cell.name!r}; cell names must be unique")
        seen.add(cell.name)
        if cell.run not in runs:
            raise LddpmError(f"cell {cell.name!r}: run {cell.run!r} is not defined; defined runs: {sorted(runs)}")
        if cell.kind not in CELL_KINDS:
            raise LddpmError(f"cell {cell.name!r}: kind {cell.kind!r} is not one of {CELL_KINDS}")
        if cell.labels not in LABEL_MODES:
            raise LddpmError(f"cell {cell.name!r}: labels {cell.labels!r} is not one of {LABEL_MODES}")
        if cell.kind == "vae" and runs[cell.run].kind != "vae":
            raise LddpmError(f"cell {cell.name!r}: kind \"vae\" needs a run with kind = \"vae\"")
        if cell.group == "":
            cell.group = _infer_group(cell)
        if cell.group not in PLOT_GROUPS:
            raise LddpmError(f"cell {cell.name!r}: group {cell.group!r} is not one of {PLOT_GROUPS}")
    return Study(settings, runs, cells, Path(base_dir))


def find_study_file(name: str | Path) -> Path:
    """A study file path, or a preset name (`study-quick`, `demo`) looked up in the configs folder."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    candidates = [
        Path(__file__).resolve().parents[2] / "configs" / stem,  # source checkout (editable install)
        Path(__file__).resolve().parent / "configs" / stem,  # packaged copy
        Path.cwd() / "configs" / stem,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LddpmError(f"study file {str(name)!r} not found (also looked for configs/{stem}); give a TOML file path")


def load_study(path: str | Path) -> Study:
    """Read a study TOML file (or preset name); trainer config paths resolve relative to it."""
    path = find_study_file(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise LddpmError(f"study file {path}: invalid TOML: {exc}") from None
    return study_from_dict(data, base_dir=path.parent)


# ----------------------------------------------------------------------------- running


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that a reader never sees it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(obj):
    """JSON encoder for numpy scalars and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(value):
    """NaN/inf -> None so results.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


TrainFn = Callable[[RunSpec, Path, "Study", dict], dict]
CellFn = Callable[[CellSpec, dict, "Study", Path], dict]


def run_study(
    study: Study,
    out_dir: str | Path,
    *,
    train_fn: TrainFn | None = None,
    cell_fn: CellFn | None = None,
    only: list[str] | None = None,
    rerun_failed: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Run every cell not yet finished, then write the report; returns the table rows.

    `train_fn(run, run_dir, study, deps) -> info` trains (or reuses) one run; `deps` maps the run's
    VAE run name to its info. `info` holds at least `run_dir`, and may hold `model`, `schedule`,
    `train_images`, `train_seconds`, `num_classes`, `class_names`.
    `cell_fn(cell, info, study, out_dir) -> result` scores one cell; `result` holds metric fields of
    `ROW_FIELDS` and optionally `images` (uint8 (N,H,W,C)) and `labels` for the sample grid.
    Defaults are the real trainer and evaluator (`train_run`, `evaluate_cell`).
    """
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    train_fn = train_fn or train_run
    cell_fn = cell_fn or evaluate_cell
    infos: dict[str, dict | BaseException] = {}

    def ensure_run(name: str) -> dict:
        if name not in infos:
            run = study.runs[name]
            try:
                deps = {run.vae: ensure_run(run.vae)} if run.vae else {}
                _log(progress, f"[study] run {name}: training / reusing ({run.config})")
                infos[name] = train_fn(run, out / "runs" / name, study, deps)
            except Exception as exc:  # remembered, so the run's other cells fail fast
                infos[name] = exc
        info = infos[name]
        if isinstance(info, BaseException):
            raise info
        return info

    rows = []
    for cell in study.cells:
        path = out / "cells" / f"{cell.name}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        done = old is not None and (old.get("status") == "ok" or not rerun_failed)
        if done or (only and cell.name not in only):
            rows.append(old if old is not None else _base_row(cell, study, status="not run"))
            continue
        _log(progress, f"[study] cell {cell.name}: {cell.kind} {cell.sampler} steps={cell.steps} s={cell.guidance_scale:g}")
        row = _base_row(cell, study, status="ok")
        start = time.perf_counter()
        try:
            info = ensure_run(cell.run)
            for key in ("model", "schedule", "train_images", "train_seconds", "data"):
                if info.get(key) is not None:
                    row[key] = info[key]
            result = dict(cell_fn(cell, info, study, out))
            images, labels = result.pop("images", None), result.pop("labels", None)
            row.update({k: v for k, v in result.items() if k in ROW_FIELDS or k == "extra"})
            if images is not None:
                grid = make_grid(images, labels, study.settings, info.get("class_names"))
                row["grid"] = f"grids/{cell.name}.png"
                save_png(grid, out / row["grid"])
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            row["status"] = f"failed: {message}"
            atomic_write_text(out / "cells" / f"{cell.name}.error.txt", traceback.format_exc())
            _log(progress, f"[study] cell {cell.name} failed: {message}")
        row["cell_seconds"] = round(time.perf_counter() - start, 3)
        row = {k: _clean(v) for k, v in row.items()}
        atomic_write_text(path, json.dumps(row, indent=2, default=_json_default))
        rows.append(row)
        write_report(study, rows + [_base_row(c, study, "pending") for c in study.cells[len(rows):]], out)
    write_report(study, rows, out, run_dirs={n: i["run_dir"] for n, i in infos.items() if isinstance(i, dict)})
    _log(progress, f"[study] results in {out / 'index.html'}")
    return rows


def load_rows(study: Study, out_dir: str | Path) -> list[dict]:
    """The rows of the finished (or failed) cells under `out_dir/cells`; others as "not run"."""
    rows = []
    for cell in study.cells:
        path = Path(out_dir) / "cells" / f"{cell.name}.json"
        rows.append(json.loads(path.read_text()) if path.is_file() else _base_row(cell, study, "not run"))
    return rows


def _log(progress: bool, message: str) -> None:
    """Print a progress line (flushed, so it shows up in logs at once)."""
    if progress:
        print(message, flush=True)


def _base_row(cell: CellSpec, study: Study, status: str) -> dict:
    """A table row with the cell's settings filled in and no metrics yet."""
    row: dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update(
        name=cell.name, status=status, run=cell.run, data=f"{study.settings.dataset} {study.settings.resolution}px",
        sampler=cell.sampler if cell.kind == "sample" else "reconstruction",
        steps=cell.steps if cell.kind == "sample" else None,
        eta=cell.eta if cell.kind == "sample" else None,
        guidance_scale=cell.guidance_scale if cell.kind == "sample" else None,
        fid_n=study.fid_n(cell), group=cell.group, kind=cell.kind,
    )
    return row


# ----------------------------------------------------------------------------- grids


def make_grid(
    images: np.ndarray,
    labels: np.ndarray | None,
    settings: StudySettings,
    class_names: list[str] | None = None,
    *,
    pad: int = 2,
) -> np.ndarray:
    """A uint8 RGB grid: one row per class when labels are given, else a square of the first images."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    rows: list[list[np.ndarray]]
    row_names: list[str] | None = None
    if labels is not None and len(labels) == n:
        labels = np.asarray(labels)
        classes = sorted(int(c) for c in np.unique(labels))
        rows = [[images[i] for i in np.flatnonzero(labels == c)[: settings.grid_per_class]] for c in classes]
        if class_names:
            row_names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
    else:
        k = min(n, settings.grid_size)
        cols = max(1, int(math.ceil(math.sqrt(k))))
        rows = [list(images[i : i + cols]) for i in range(0, k, cols)]
    scale = max(1, 64 // max(h, w))  # small images are upscaled so a person can see them
    cols = max(len(r) for r in rows)
    th, tw = h * scale + pad, w * scale + pad
    canvas = np.full((len(rows) * th + pad, cols * tw + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = img.repeat(scale, axis=0).repeat(scale, axis=1)
            canvas[pad + r * th : pad + r * th + h * scale, pad + c * tw : pad + c * tw + w * scale] = tile
    if row_names:
        canvas = _add_row_names(canvas, row_names, th, pad)
    return canvas


def _add_row_names(canvas: np.ndarray, names: list[str], row_height: int, pad: int) -> np.ndarray:
    """Prepend a white margin with each row's class name."""
    from PIL import Image, ImageDraw

    width = 8 + 7 * max(len(s) for s in names)
    out = Image.new("RGB", (canvas.shape[1] + width, canvas.shape[0]), "white")
    out.paste(Image.fromarray(canvas), (width, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        draw.text((4, pad + r * row_height + row_height // 2 - 6), name, fill=(0, 0, 0))
    return np.asarray(out)


def save_png(image: np.ndarray, path: Path) -> None:
    """Save a uint8 image as PNG, atomically."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    Image.fromarray(np.ascontiguousarray(image)).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- report


def write_report(study: Study, rows: list[dict], out_dir: str | Path, run_dirs: dict[str, Any] | None = None) -> None:
    """Write results.json, results.csv, results.md, plots/*.png and index.html."""
    from lddpm import report

    out = Path(out_dir)
    run_dirs = dict(run_dirs or {})
    for name in study.runs:
        run_dirs.setdefault(name, out / "runs" / name)
    payload = {"study": asdict(study.settings), "runs": {n: asdict(r) for n, r in study.runs.items()}, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=_json_default))
    atomic_write_text(out / "results.csv", report.to_csv(rows))
    atomic_write_text(out / "results.md", report.to_markdown(study, rows))
    plots = report.write_plots(rows, {n: Path(d) for n, d in run_dirs.items()}, out / "plots")
    atomic_write_text(out / "index.html", report.to_html(study, rows, plots))


# ----------------------------------------------------------------------------- real backend


def train_run(run: RunSpec, run_dir: Path, study: Study, deps: dict) -> dict:
    """Train (or reuse / resume) one run with the project's trainer; returns its info."""
    raise LddpmError("the trainer is not available yet")


def evaluate_cell(cell: CellSpec, info: dict, study: Study, out_dir: Path) -> dict:
    """Score one cell with the project's evaluator; returns metrics, images and labels."""
    raise LddpmError("the evaluator is not available yet")
