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
PLOT_GROUPS = ("samplers", "guidance", "schedules", "vae", "architecture", "other")

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
    classifier: str = ""  # classifier folder; empty: the shared default (trained when missing)
    classifier_epochs: float = 2.0  # training length of that classifier when it is trained here
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    train_nproc: int = 1  # processes per training run (> 1: `lddpm train --nproc N`, torchrun + DDP)
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
        Path(__file__).resolve().parent / "configs" / stem,  # shipped with the package
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
    if train_fn is None or cell_fn is None:
        backend = StudyBackend(progress=progress)
        train_fn = train_fn or backend.train
        cell_fn = cell_fn or backend.cell
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
            row.update(result)
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
        pending = [_base_row(c, study, "pending") for c in study.cells[len(rows):]]
        write_report(study, rows + pending, out, plots=False)  # the table so far; plots at the end
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


def write_report(study: Study, rows: list[dict], out_dir: str | Path, run_dirs: dict[str, Any] | None = None,
                 *, plots: bool = True) -> None:
    """Write results.json, results.csv, results.md, plots/*.png (unless `plots` is false) and index.html."""
    from lddpm import report

    out = Path(out_dir)
    run_dirs = dict(run_dirs or {})
    for name in study.runs:
        run_dirs.setdefault(name, out / "runs" / name)
    payload = {"study": asdict(study.settings), "runs": {n: asdict(r) for n, r in study.runs.items()}, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=_json_default))
    atomic_write_text(out / "results.csv", report.to_csv(rows))
    atomic_write_text(out / "results.md", report.to_markdown(study, rows))
    if plots:
        made = report.write_plots(rows, {n: Path(d) for n, d in run_dirs.items()}, out / "plots")
    else:  # keep linking the plots of the last full report
        made = [(p.stem.replace("_", " "), f"plots/{p.name}") for p in sorted((out / "plots").glob("*.png")) if not p.name.startswith(".")]
    atomic_write_text(out / "index.html", report.to_html(study, rows, made))


# ----------------------------------------------------------------------------- real backend


def _toml_literal(value: Any) -> str:
    """A value as a `--set` literal (strings quoted, so paths never parse as numbers)."""
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


class StudyBackend:
    """Trains runs with `lddpm.train` and scores cells with `lddpm.evaluate`.

    Loads the FID feature network, the reference statistics and the classifier once per study.
    `extractor` replaces the pinned Inception network (tests use a tiny stand-in).
    """

    def __init__(self, *, extractor=None, progress: bool = True):
        self.extractor = extractor
        self.progress = progress
        self._reference: dict[tuple, Any] = {}
        self._classifier: tuple | None = None

    # ------------------------------------------------------------------------- training
    def run_config(self, run: RunSpec, run_dir: Path, study: Study, deps: dict):
        """The trainer config of a run: its preset/file, the study's data settings, then `set`."""
        from lddpm.config import load_config

        s = study.settings
        source = run.config
        if source.endswith(".toml") or "/" in source:
            source = str((study.base_dir / source).resolve())
        overrides = [
            f"data.dataset={_toml_literal(s.dataset)}",
            f"data.resolution={s.resolution}",
            f"run.out={_toml_literal(str(run_dir))}",
            f"run.seed={s.seed}",
            f"run.device={_toml_literal(_config_device(s.device))}",
        ]
        if s.data_root:
            overrides.append(f"data.root={_toml_literal(s.data_root)}")
        if s.cache_dir:
            overrides.append(f"data.cache_dir={_toml_literal(s.cache_dir)}")
        if run.vae:
            overrides.append(f"data.latent={_toml_literal(str(deps[run.vae]['run_dir']))}")
        if run.steps:
            overrides.append(f"run.steps={run.steps}")
        overrides += run.set
        return load_config(source, overrides)

    def train(self, run: RunSpec, run_dir: Path, study: Study, deps: dict) -> dict:
        """Reuse the run if its final checkpoint exists, else train it (resuming from its last checkpoint)."""
        from lddpm.checkpoint import checkpoint_name, list_checkpoints
        from lddpm.config import save_config

        config = self.run_config(run, run_dir, study, deps)
        final = run_dir / "checkpoints" / checkpoint_name(config.run.steps)
        if not final.is_file():
            resume = bool(list_checkpoints(run_dir / "checkpoints")) if (run_dir / "checkpoints").is_dir() else False
            if study.settings.train_nproc > 1:
                self._train_subprocess(run, config, run_dir, resume, study.settings.train_nproc)
            else:
                from lddpm.train import train, train_vae

                fn = train_vae if run.kind == "vae" else train
                result = fn(config, run_dir, resume=resume, progress=self.progress)
                if result.get("stopped"):
                    raise KeyboardInterrupt(f"training of {run.name} stopped at step {result['step']}")
            save_config(config, run_dir)
        if not final.is_file():
            raise LddpmError(f"run {run.name}: training ended without its final checkpoint {final}")
        return self._run_info(run, config, final)

    def _train_subprocess(self, run: RunSpec, config, run_dir: Path, resume: bool, nproc: int) -> None:
        """Train through `lddpm train --nproc N` (torchrun, DDP) from the resolved config file."""
        import subprocess
        import sys

        from lddpm.config import save_config

        save_config(config, run_dir)
        command = [sys.executable, "-m", "lddpm", "train-vae" if run.kind == "vae" else "train",
                   str(run_dir / "config.toml"), "--out", str(run_dir), "--nproc", str(nproc)]
        command += ["--resume"] if resume else []
        command += [] if self.progress else ["--quiet"]
        print("[study] " + " ".join(command), flush=True)
        code = subprocess.call(command)
        if code:
            raise LddpmError(f"run {run.name}: `{' '.join(command)}` exited with status {code}")

    @staticmethod
    def _run_info(run: RunSpec, config, final: Path) -> dict:
        """What the table needs from a finished run, read from its final checkpoint."""
        from lddpm.checkpoint import load_checkpoint

        meta = load_checkpoint(final).meta
        dataset = meta.get("dataset") or {}
        name = config.model.name
        if run.kind == "vae":
            model = f"VAE {name}"
        else:
            model = f"{'DiT' if config.model.kind == 'dit' else 'U-Net'} {name}"
            if config.data.latent:
                model += " (latent)"
            if config.run.class_conditional:
                model += ", class-cond."
        return {
            "run_dir": str(final.parent.parent),
            "checkpoint": str(final),
            "model": model,
            "schedule": None if run.kind == "vae" else config.diffusion.schedule,
            "train_images": int(meta.get("images_seen", 0)),
            "train_seconds": float(meta.get("wall_time", 0.0)),
            "class_names": list(dataset.get("class_names") or []),
            "data": f"{dataset.get('name', config.data.dataset)} {dataset.get('resolution', config.data.resolution)}px",
        }

    # ------------------------------------------------------------------------- evaluation
    def _extractor(self, study: Study):
        """The FID feature network (pinned Inception unless one was given)."""
        if self.extractor is None:
            from lddpm.evaluate import load_extractor

            self.extractor = load_extractor(batch_size=study.settings.fid_batch_size, device=study.settings.device)
        return self.extractor

    def _reference_stats(self, study: Study):
        """Reference statistics of the study's reference split (cached on disk by lddpm.evaluate)."""
        from lddpm.evaluate import reference_stats

        s = study.settings
        key = (s.dataset, s.reference_split, s.reference_n, s.resolution)
        if key not in self._reference:
            self._reference[key] = reference_stats(
                s.dataset, split=s.reference_split, num=s.reference_n or None, resolution=s.resolution,
                extractor=self._extractor(study), cache_dir=s.cache_dir, data_root=s.data_root, progress=self.progress,
            )
        return self._reference[key]

    def _classifier_folder(self, study: Study) -> Path:
        """The classifier for class accuracy / the Inception-style score; trained here if missing."""
        from lddpm.metrics.classifier import META_FILE, default_classifier_dir

        s = study.settings
        folder = Path(s.classifier) if s.classifier else default_classifier_dir(s.dataset, s.resolution, s.cache_dir)
        if not (folder / META_FILE).is_file():
            import argparse

            from lddpm.commands.evaluate import run_train_classifier

            _log(self.progress, f"[study] training the classifier for class metrics -> {folder}")
            run_train_classifier(argparse.Namespace(
                dataset=s.dataset, resolution=s.resolution, epochs=s.classifier_epochs, batch_size=128, lr=3e-3,
                hflip=s.dataset not in ("mnist", "fashion-mnist"), seed=s.seed, out=str(folder), cache_dir=s.cache_dir,
                root=s.data_root, device=_config_device(s.device), quiet=not self.progress,
            ))
        return folder

    def cell(self, cell: CellSpec, info: dict, study: Study, out_dir: Path) -> dict:
        """Score one cell; returns row fields plus `images`/`labels` for the grid."""
        if cell.kind == "vae":
            return self._vae_cell(cell, info, study)
        from lddpm.evaluate import evaluate_checkpoint

        s = study.settings
        device = _config_device(s.device, resolve=True)
        partial = out_dir / "cells" / f"{cell.name}.samples"
        result = evaluate_checkpoint(
            info["run_dir"], num=study.fid_n(cell), sampler=cell.sampler, num_steps=cell.steps, eta=cell.eta,
            guidance_scale=cell.guidance_scale, labels=cell.labels, reference=self._reference_stats(study),
            batch_size=s.sample_batch_size, seed=s.seed, device=device, partial_dir=partial,
            extractor=self._extractor(study), classifier=str(self._classifier_folder(study)),
            cache_dir=s.cache_dir, data_root=s.data_root, progress=self.progress,
        )
        images, labels = _read_partial(partial)
        cost = result.get("cost") or {}
        evals = cost.get("network_evaluations_per_image")
        if evals is None:  # every batch was resumed from disk: count from the settings
            evals = cell.steps * (2 if cell.guidance_scale != 1.0 else 1)
        return {
            "fid": result["fid"], "fid_n": result["num_images"],
            "inception_score": result.get("inception_score") or result.get("classifier_score"),
            "class_accuracy": result.get("class_accuracy"), "precision": result.get("precision"),
            "recall": result.get("recall"), "seconds_per_image": cost.get("seconds_per_image"),
            "model_evals": int(round(evals)), "images": images, "labels": labels,
            "extra": {"reference": result.get("reference"), "cost": cost, "notes": result.get("notes")},
        }

    def _vae_cell(self, cell: CellSpec, info: dict, study: Study) -> dict:
        """Reconstructions of the reference split: rFID, PSNR; grid of originals next to reconstructions."""
        from lddpm.data import open_cache, prepare
        from lddpm.evaluate import evaluate_vae, vae_reconstructions
        from lddpm.pipeline import load_vae

        s = study.settings
        device = _config_device(s.device, resolve=True)
        vae = load_vae(info["run_dir"], device)
        cache = open_cache(prepare(s.dataset, resolution=s.resolution, split=s.reference_split, root=s.data_root,
                                   cache_dir=s.cache_dir, progress=self.progress))
        start = time.perf_counter()
        result = evaluate_vae(vae, cache, reference_stats=self._reference_stats(study), extractor=self._extractor(study),
                              num=study.fid_n(cell), batch_size=s.sample_batch_size, device=device, progress=self.progress)
        seconds = time.perf_counter() - start
        originals = np.asarray(cache.images[:32])
        recon = vae_reconstructions(vae, originals, batch_size=32, device=device)
        pairs = np.stack([originals, recon], axis=1).reshape(-1, *originals.shape[1:])
        return {
            "fid": result["fid"], "fid_n": result["num_images"], "precision": result.get("precision"),
            "recall": result.get("recall"), "seconds_per_image": seconds / max(1, result["num_images"]),
            "model_evals": 1, "psnr": result["psnr"], "mse": result["mse"], "images": pairs, "labels": None,
        }


def _config_device(device: str, resolve: bool = False) -> str:
    """The study's device as the trainer's run.device (auto/cpu/cuda); `resolve` turns auto into one."""
    name = device.split(":")[0] if device else "auto"
    if resolve and name == "auto":
        import torch

        name = "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _read_partial(folder: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The images (and labels) lddpm.evaluate saved batch by batch under `folder`."""
    files = sorted(folder.glob("batch-*.npz"))
    if not files:
        return None, None
    images, labels = [], []
    for f in files:
        with np.load(f) as data:
            images.append(data["images"])
            labels.append(data["labels"] if "labels" in data else None)
    return np.concatenate(images), (None if any(y is None for y in labels) else np.concatenate(labels))


def train_run(run: RunSpec, run_dir: Path, study: Study, deps: dict) -> dict:
    """Train (or reuse / resume) one run with the project's trainer; returns its info."""
    return StudyBackend().train(run, run_dir, study, deps)


def evaluate_cell(cell: CellSpec, info: dict, study: Study, out_dir: Path) -> dict:
    """Score one cell with the project's evaluator (a fresh backend; `run_study` shares one)."""
    return StudyBackend().cell(cell, info, study, out_dir)
