"""The study runner: train (or reuse) each run, score each cell, write the report as cells finish.

`run_study` is resumable: each finished cell is stored atomically in `cells/<name>.json` and
skipped on the next run; a training run is reused when its final checkpoint exists (and resumed
from its last checkpoint otherwise). A cell that raises is recorded as `failed: <message>` and the
rest of the grid goes on. How a run is trained and a cell is scored is injectable (`train_fn`,
`cell_fn`), so the runner and the report are testable with toy functions. Each session (one call;
a resumed study has several) records its start, end and seconds in `timing.json`, and results.json
carries them with their total, so a study's cost is in its file.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lddpm import report
from lddpm.grid import labelled_grid, prompt_grid
from lddpm.io import finite_or_none, folder_lock, read_json_object, remove_stale_temp_files, to_json, write_png, write_text
from lddpm.study.backend import StudyBackend
from lddpm.study.schema import REAL_FLOOR_FILE, TIMING_FILE, CellSpec, RunSpec, Study, base_row, log

TrainFn = Callable[[RunSpec, Path, "Study", dict], dict]
CellFn = Callable[[CellSpec, dict, "Study", Path], dict]


def run_study(
    study: Study,
    out_dir: str | Path,
    *,
    train_fn: TrainFn | None = None,
    cell_fn: CellFn | None = None,
    floor_fn: Callable[[Study], dict] | None = None,
    only: list[str] | None = None,
    rerun_failed: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Run every cell not yet finished, then write the report; returns the table rows.

    `train_fn(run, run_dir, study, deps) -> info` trains (or reuses) one run; `deps` maps the run's
    VAE run name to its info. `info` holds at least `run_dir`, and may hold `model`, `schedule`,
    `train_images`, `train_seconds`, `num_classes`, `class_names`.
    `cell_fn(cell, info, study, out_dir) -> result` scores one cell; `result` holds metric fields of
    `ROW_FIELDS` (and, for text cells, `TEXT_ROW_FIELDS`) and optionally `images` (uint8 (N,H,W,C)) with
    `labels` (class indices) or `prompts` (one per image) for the sample grid.
    `floor_fn(study) -> dict` scores N real images against the reference once (the real-data floor,
    kept in real_floor.json and printed above the table); the real backend's is used with the defaults.
    Defaults are the real trainer and evaluator (`train_run`, `evaluate_cell`).
    """
    out = Path(out_dir)
    with folder_lock(out, "study folder"):  # one writer per study folder
        return _run_study(study, out, train_fn=train_fn, cell_fn=cell_fn, floor_fn=floor_fn, only=only,
                          rerun_failed=rerun_failed, progress=progress)


def _run_study(study: Study, out: Path, *, train_fn, cell_fn, floor_fn, only, rerun_failed, progress) -> list[dict]:
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "cells", out / "grids", out / "plots"):
        remove_stale_temp_files(folder)  # a killed study's half-written files
    session = Session(out)
    if train_fn is None or cell_fn is None:
        backend = StudyBackend(progress=progress)
        train_fn = train_fn or backend.train
        cell_fn = cell_fn or backend.cell
        floor_fn = floor_fn or backend.real_floor
    if floor_fn is not None:
        measure_real_floor(study, out, floor_fn, progress)
    infos: dict[str, dict | BaseException] = {}

    def ensure_run(name: str) -> dict:
        if name not in infos:
            run = study.runs[name]
            try:
                deps = {run.vae: ensure_run(run.vae)} if run.vae else {}
                log(progress, f"[study] run {name}: training / reusing ({run.config})")
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
        old = read_cell(path)
        done = old is not None and (old.get("status") == "ok" or not rerun_failed)
        if done or (only and cell.name not in only):
            rows.append(old if old is not None else base_row(cell, study, status="not run"))
            continue
        what = (f"{cell.sampler} steps={cell.steps} s={cell.guidance_scale:g}" if cell.kind == "sample"
                else "reconstructions")
        at = "" if cell.at_step is None else f" at training step {cell.at_step}"
        log(progress, f"[study] cell {cell.name}: {cell.kind} {what}{at}")
        row = base_row(cell, study, status="ok")
        start = time.perf_counter()
        try:
            info = ensure_run(cell.run)
            for key in ("model", "schedule", "train_images", "train_seconds", "data"):
                if info.get(key) is not None:
                    row[key] = info[key]
            result = dict(cell_fn(cell, info, study, out))
            images, labels = result.pop("images", None), result.pop("labels", None)
            prompts = result.pop("prompts", None)
            row.update(result)
            if images is not None:
                s = study.settings
                if prompts is not None:
                    grid = first_prompts_grid(images, prompts, rows=s.grid_prompts, per_prompt=s.grid_per_class)
                else:
                    grid = labelled_grid(images, labels, per_class=s.grid_per_class, max_images=s.grid_size,
                                         class_names=info.get("class_names"))
                row["grid"] = f"grids/{cell.name}.png"
                write_png(out / row["grid"], grid)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            row["status"] = f"failed: {message}"
            write_text(out / "cells" / f"{cell.name}.error.txt", traceback.format_exc())
            log(progress, f"[study] cell {cell.name} failed: {message}")
        row["cell_seconds"] = round(time.perf_counter() - start, 3)
        row = {k: finite_or_none(v) for k, v in row.items()}
        write_text(path, to_json(row).rstrip("\n"))
        rows.append(row)
        session.save()
        pending = [base_row(c, study, "pending") for c in study.cells[len(rows):]]
        write_report(study, rows + pending, out, plots=False)  # the table so far; plots at the end
    write_report(study, rows, out, run_dirs={n: i["run_dir"] for n, i in infos.items() if isinstance(i, dict)})
    session.save(finished=True)
    floor = write_results_json(study, rows, out)  # with this session's end
    write_text(out / "results.md", report.to_markdown(study, rows, floor, timing=read_timing(out)))
    total = read_timing(out)
    log(progress, f"[study] {session.entry['seconds']:.0f} s in this session, {total['seconds']:.0f} s in "
                  f"{len(total['sessions'])} session(s); results in {out / 'index.html'}")
    return rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Session:
    """This call of the study: its start (UTC), end and seconds, appended to the sessions of `timing.json`.

    `save()` updates the seconds (after each cell, so a killed session keeps the time up to its last cell);
    `save(finished=True)` also records the end. A session without an end was killed (or is still running).
    """

    def __init__(self, out: Path):
        self.path = out / TIMING_FILE
        old = read_json_object(self.path, "delete it to start the study's time record again") if self.path.is_file() else {}
        self.sessions = [s for s in old.get("sessions", []) if isinstance(s, dict)]
        self.entry = {"started": _now(), "finished": None, "seconds": 0.0}
        self.sessions.append(self.entry)
        self._start = time.perf_counter()
        self.save()

    def save(self, *, finished: bool = False) -> None:
        self.entry["seconds"] = round(time.perf_counter() - self._start, 3)
        if finished:
            self.entry["finished"] = _now()
        write_text(self.path, to_json({"sessions": self.sessions}).rstrip("\n"))


def read_timing(out_dir: str | Path) -> dict | None:
    """The study's time record: first start, last end (None while unfinished), total seconds, the sessions."""
    path = Path(out_dir) / TIMING_FILE
    if not path.is_file():
        return None
    sessions = read_json_object(path, "delete it to start the study's time record again").get("sessions") or []
    if not sessions:
        return None
    return {"started": sessions[0].get("started"), "finished": sessions[-1].get("finished"),
            "seconds": round(sum(float(s.get("seconds") or 0.0) for s in sessions), 3), "sessions": sessions}


def first_prompts_grid(images, prompts: list[str], *, rows: int, per_prompt: int):
    """A text cell's grid: one row per distinct prompt, its first `rows` prompts, labelled with the prompt."""
    keep = set(list(dict.fromkeys(prompts))[:rows])
    chosen = [i for i, p in enumerate(prompts) if p in keep]
    return prompt_grid(images[chosen], [prompts[i] for i in chosen], per_prompt=per_prompt)


def measure_real_floor(study: Study, out: Path, floor_fn: Callable[[Study], dict], progress: bool) -> None:
    """Score N real images against the reference once (real_floor.json); a failure is recorded, not fatal."""
    s = study.settings
    path, num = out / REAL_FLOOR_FILE, s.fid_n
    key = [s.dataset, s.resolution, s.reference_split, s.reference_n, num]  # what the floor depends on
    old = read_json_object(path, "delete it to measure the floor again") if path.is_file() else None
    if old and old.get("key") == key and old.get("fid") is not None:
        return
    log(progress, f"[study] real-data floor: {num} real images against the reference")
    try:
        floor = dict(floor_fn(study))
    except Exception as exc:  # the floor is context for the table; the cells still run
        floor = {"num": num, "failed": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}
    floor["key"] = key
    write_text(path, to_json({k: finite_or_none(v) for k, v in floor.items()}).rstrip("\n"))


def read_cell(path: Path) -> dict | None:
    """A finished cell's row, or None when the cell has not run; a damaged file is one clear error.

    Rows written before lddpm named the classifier score for what it is kept it under "inception_score"
    (the study never had an Inception Score network): it is read back as "classifier_score".
    """
    if not path.is_file():
        return None
    row = read_json_object(path, "delete it to run that cell again")
    if "classifier_score" not in row and "inception_score" in row:  # renamed in place (same column order)
        row = {("classifier_score" if k == "inception_score" else k): v for k, v in row.items()}
    return row


def load_rows(study: Study, out_dir: str | Path) -> list[dict]:
    """The rows of the finished (or failed) cells under `out_dir/cells`; others as "not run"."""
    rows = []
    for cell in study.cells:
        path = Path(out_dir) / "cells" / f"{cell.name}.json"
        old = read_cell(path)
        rows.append(old if old is not None else base_row(cell, study, "not run"))
    return rows


def write_report(study: Study, rows: list[dict], out_dir: str | Path, run_dirs: dict[str, Any] | None = None,
                 *, plots: bool = True) -> None:
    """Write results.json, results.csv, results.md, plots/*.png (unless `plots` is false) and index.html."""
    out = Path(out_dir)
    run_dirs = dict(run_dirs or {})
    for name in study.runs:
        run_dirs.setdefault(name, out / "runs" / name)
    floor = write_results_json(study, rows, out)
    write_text(out / "results.csv", report.to_csv(rows))
    write_text(out / "results.md", report.to_markdown(study, rows, floor, timing=read_timing(out)))
    if plots:
        made = report.write_plots(rows, {n: Path(d) for n, d in run_dirs.items()}, out / "plots")
    else:  # keep linking the plots of the last full report
        made = [(p.stem.replace("_", " "), f"plots/{p.name}") for p in sorted((out / "plots").glob("*.png")) if not p.name.startswith(".")]
    write_text(out / "index.html", report.to_html(study, rows, made, floor))


def write_results_json(study: Study, rows: list[dict], out: Path) -> dict | None:
    """results.json: settings, runs, rows, the real-data floor and the time record; returns the floor."""
    floor_path = out / REAL_FLOOR_FILE
    floor = read_json_object(floor_path, "delete it to measure the floor again") if floor_path.is_file() else None
    payload = {"study": asdict(study.settings), "runs": {n: asdict(r) for n, r in study.runs.items()}, "rows": rows,
               "real_floor": floor, "timing": read_timing(out)}
    write_text(out / "results.json", to_json(payload).rstrip("\n"))
    return floor
