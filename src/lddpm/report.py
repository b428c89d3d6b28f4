"""The study's report: results table (Markdown, CSV, HTML), plots (matplotlib Agg) and index.html."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from lddpm.io import write_with
from lddpm.study.schema import GUIDANCE_ROW_FIELDS, ROW_FIELDS, TEXT_ROW_FIELDS, Study

SAMPLER_LABELS = {"ddpm": "DDPM (ancestral)", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "euler": "Euler",
                  "heun": "Heun (EDM)", "dpm++3m": "DPM-Solver++(3M)", "dpm++2m-sde": "DPM-Solver++(2M) SDE",
                  "unipc": "UniPC (bh2)", "ipndm": "iPNDM"}

# (heading, row key, format) of the human-readable table; FID's heading gets its N.
TABLE_COLUMNS = (
    ("Cell", "name", "{}"),
    ("Model", "model", "{}"),
    ("Data", "data", "{}"),
    ("Sampler", "sampler", "{}"),
    ("Steps", "steps", "{}"),
    ("Guidance s", "guidance_scale", "{:g}"),
    ("Schedule", "schedule", "{}"),
    ("FID", "fid", "{:.2f}"),
    ("KID x10^3", "kid", "kid"),
    ("Classifier score", "classifier_score", "{:.2f}"),
    ("Class acc.", "class_accuracy", "{:.1%}"),
    ("Precision", "precision", "{:.3f}"),
    ("Recall", "recall", "{:.3f}"),
    ("s / image", "seconds_per_image", "{:.4f}"),
    ("Model evals", "model_evals", "{}"),
    ("Train images", "train_images", "{:,}"),
    ("Train time", "train_seconds", "seconds"),
    ("Status", "status", "{}"),
)


# Columns of text cells, shown only when some row has a value for them (class studies' tables are unchanged):
# (heading, row key, format, the column after which it goes).
TEXT_COLUMNS = (
    ("Prompts", "prompts", "{}", "guidance_scale"),
    ("Negative prompt", "negative_prompt", "{}", "prompts"),
    ("Faithfulness", "faithfulness", "{:.1%}", "class_accuracy"),
    ("Ceiling", "faithfulness_ceiling", "{:.1%}", "faithfulness"),
    ("Seen", "faithfulness_seen", "{:.1%}", "faithfulness_ceiling"),
    ("Held-out", "faithfulness_heldout", "{:.1%}", "faithfulness_seen"),
    ("Slot acc.", "slot_accuracy", "{:.1%}", "faithfulness_heldout"),
    ("Swap rate", "swap_rate", "{:.1%}", "slot_accuracy"),
)
# Columns of autoguided / guidance-interval cells, shown only when some row has them (other tables are unchanged).
GUIDANCE_COLUMNS = (  # each goes right after the guidance scale: listed last to first
    ("Guidance interval (sigma)", "guidance_interval", "interval", "guidance_scale"),
    ("Guide w", "guide_scale", "{:g}", "guidance_scale"),
    ("Guide", "guide", "{}", "guidance_scale"),
)
METRIC_HEADINGS = {"pair_accuracy": "Pair acc.", "all_accuracy": "All-clause acc."}
# The sampler options a cell set (grid, sigma_min, epsilon scaling, ...), shown only when some row has them.
OPTION_COLUMNS = (("Sampler options", "sampler_options", "{}", "steps"),)


def table_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """TABLE_COLUMNS plus the text columns some row has a value for; the faithfulness heading names its metric."""
    columns = list(TABLE_COLUMNS)
    metrics = {r.get("faithfulness_metric") for r in rows if r.get("faithfulness") is not None}
    for head, key, spec, after in TEXT_COLUMNS + GUIDANCE_COLUMNS + OPTION_COLUMNS:
        if not any(r.get(key) is not None for r in rows):
            continue
        if key == "faithfulness" and len(metrics) == 1:
            head = METRIC_HEADINGS.get(next(iter(metrics)), head)
        where = next((i for i, c in enumerate(columns) if c[1] == after), len(columns) - 1)
        columns.insert(where + 1, (head, key, spec))
    return columns


def _fmt(value, spec: str) -> str:
    """Format one table value; missing values show as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if spec == "interval":
        return "[" + ", ".join("inf" if v is None else f"{float(v):g}" for v in value) + "]"
    if spec == "seconds":
        value = float(value)
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _fid_heading(rows: list[dict]) -> tuple[str, bool]:
    """'FID (N=500)' when every row shares one N, else 'FID' with N shown per value."""
    ns = {r.get("fid_n") for r in rows if r.get("fid") is not None} or {r.get("fid_n") for r in rows}
    ns.discard(None)
    if len(ns) == 1:
        return f"FID (N={ns.pop()})", False
    return "FID", True


def _kid_text(row: dict) -> str:
    """KID x 10^3 with its standard deviation over subsets, e.g. '12.34 ± 0.56'."""
    if row.get("kid") is None:
        return "–"
    std = row.get("kid_std")
    return f"{row['kid'] * 1e3:.2f}" + ("" if std is None else f" ± {std * 1e3:.2f}")


def floor_text(floor: dict | None) -> str | None:
    """One sentence on the real-data floor: N real images of another split scored against the same reference."""
    if not floor:
        return None
    if floor.get("fid") is None:
        return f"Real-data floor at N={floor.get('num')}: not measured ({floor.get('failed', 'no result')})."
    return (f"Real-data floor at N={floor['num']}: {floor['num']} real {floor.get('split')} images score FID "
            f"{floor['fid']:.2f}, KID x10^3 {_kid_text(floor)} against the same reference; no cell can be expected below it.")


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headings and formatted cells of the results table."""
    fid_heading, per_row_n = _fid_heading(rows)
    columns = table_columns(rows)
    headings = [fid_heading if key == "fid" else head for head, key, _ in columns]
    body = []
    for row in rows:
        cells = []
        for _, key, spec in columns:
            text = _kid_text(row) if spec == "kid" else _fmt(row.get(key), spec)
            if key == "fid" and per_row_n and row.get("fid") is not None:
                text += f" (N={row.get('fid_n')})"
            if key == "fid" and row.get("kind") == "vae" and row.get("fid") is not None:
                text += " (rFID)"
            cells.append(text)
        body.append(cells)
    return headings, body


def timing_text(timing: dict | None) -> str | None:
    """One sentence on the study's time record (runner.read_timing): total seconds, sessions, first start, last end."""
    if not timing or not timing.get("sessions"):
        return None
    n = len(timing["sessions"])
    end = f"finished {timing['finished']}" if timing.get("finished") else "not finished (running, or killed)"
    return (f"Time: {timing['seconds']:.0f} s ({timing['seconds'] / 60:.1f} min) in {n} session{'s' if n > 1 else ''}; "
            f"started {timing['started']}, {end}.")


def to_markdown(study: Study, rows: list[dict], floor: dict | None = None, timing: dict | None = None) -> str:
    """results.md: settings line, the real-data floor, the time record, the table, and notes on reconstruction cells."""
    s = study.settings
    headings, body = table(rows)
    lines = [
        f"# Study `{s.name}`",
        "",
        f"Dataset {s.dataset} at {s.resolution}x{s.resolution}; FID against the {s.reference_split} split "
        f"(Inception pool3 features, N generated images vs reference statistics); seed {s.seed}.",
        "",
    ]
    if floor_text(floor):
        lines += [floor_text(floor), ""]
    if timing_text(timing):
        lines += [timing_text(timing), ""]
    lines += [
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---" for _ in headings) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    lines += [
        "",
        "FID: lower is better, comparable only at equal N. KID x10^3: the unbiased kernel distance "
        "(Binkowski et al. 2018), mean ± std over 100 subsets of min(1000, N). Classifier score: exp of the mean KL "
        "between the study classifier's per-image and marginal class distributions (the Inception Score's formula "
        "with the dataset's own small classifier in place of Inception: not an Inception Score, not comparable "
        "to published ones). Class acc.: share of conditional samples the classifier assigns to "
        "the requested class. Model evals: network evaluations per image (2 per step with guidance). "
        "VAE rows score reconstructions of the reference split (rFID).",
    ]
    if any(r.get("faithfulness") is not None for r in rows):
        lines += ["", FAITHFULNESS_NOTE]
    if any(r.get("guide_scale") is not None for r in rows):
        lines += ["", GUIDANCE_NOTE]
    return "\n".join(lines) + "\n"


FAITHFULNESS_NOTE = (
    "Text cells sample their prompt set (cycled to N) and have no class metrics. Faithfulness "
    "(lddpm.metrics.faithfulness, GenEval's rule: an image counts only if every clause of its prompt holds): "
    "pair accuracy on fashion-pairs (both halves hold what the prompt says, an unnamed half empty), all-clause "
    "accuracy on fashion-text (class, size and brightness). Ceiling: the same checker on real rendered test "
    "scenes for the same prompts, the best a model can score. Seen / Held-out: pair prompts with class pairs "
    "seen / never seen together in training (fashion-pairs), prompts with seen / held-out phrasings "
    "(fashion-text). Slot acc.: share of scene slots holding the prompt's item (or nothing); on fashion-text "
    "the one slot's class. Swap rate: pair prompts drawn with both items on the wrong sides."
)


GUIDANCE_NOTE = (
    "Guide w: autoguidance (Karras et al. 2024), D = D_guide + w (D_main - D_guide) with the guide network named "
    "in Guide; with a guidance scale s too, D = D_c + (s - 1)(D_c - D_u) + (w - 1)(D_c - D_guide). Guidance "
    "interval: guidance only at noise levels sigma in [lo, hi] (Kynkaanniemi et al. 2024), one unguided "
    "evaluation elsewhere. Model evals of these rows count the main and the guide network's evaluations."
)


def to_csv(rows: list[dict]) -> str:
    """results.csv: one row per cell, machine-readable fields (fid and fid_n separate)."""
    present = {k for r in rows for k in r}
    text = [k for k in TEXT_ROW_FIELDS + GUIDANCE_ROW_FIELDS if k in present]  # only when some row has them
    extra = text + sorted(present - set(ROW_FIELDS) - set(text) - {"extra"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*ROW_FIELDS, *extra], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _ok(rows: list[dict]) -> list[dict]:
    """Rows that finished."""
    return [r for r in rows if r.get("status") == "ok"]


def read_loss_log(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) from a trainer log.jsonl; lines without both fields are skipped."""
    steps, losses = [], []
    if not path.is_file():
        return steps, losses
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec and "loss" in rec and rec.get("loss") is not None:
            steps.append(int(rec["step"]))
            losses.append(float(rec["loss"]))
    return steps, losses


def write_plots(rows: list[dict], run_dirs: dict[str, Path], plot_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot that has data; returns (title, path relative to the study folder)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows)
    drawers = (
        lambda: plot_fid_vs_steps(ok),
        lambda: plot_guidance(ok),
        lambda: plot_faithfulness(ok),
        lambda: plot_schedules(ok),
        lambda: plot_fid_vs_training(ok),
        lambda: plot_loss_curves(run_dirs),
        lambda: plot_seconds_per_image(ok),
    )
    made: list[tuple[str, str]] = []
    for draw in drawers:
        drawn = draw()
        if drawn is not None:
            fig, name, title = drawn
            _save(fig, plot_dir / name)
            made.append((title, f"{plot_dir.name}/{name}"))
    return made


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write a figure as PNG atomically and close it."""
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    _pyplot().close(fig)


Drawn = tuple[Any, str, str] | None  # (figure, file name, title), or None when the rows hold nothing to draw


def plot_fid_vs_steps(ok: list[dict]) -> Drawn:
    """FID against sampling steps, one line per (run, sampler and its options)."""
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in ok:
        if r.get("group") == "samplers" and r.get("fid") is not None and r.get("steps"):
            sampler = r["sampler"] + (f" [{r['sampler_options']}]" if r.get("sampler_options") else "")
            lines.setdefault((r["run"], sampler), []).append((r["steps"], r["fid"]))
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (run, sampler), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{SAMPLER_LABELS.get(sampler, sampler)} ({run})")
    ax.set_xscale("log")
    return _one_panel(fig, ax, "sampling steps", _fid_axis(ok), "FID against sampling steps", "fid_vs_steps.png")


def _one_panel(fig, ax, xlabel: str, ylabel: str, title: str, file_name: str) -> Drawn:
    """Label a one-panel plot (axes, title, light grid, legend) and return it as (figure, file, caption)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, file_name, title


def plot_guidance(ok: list[dict]) -> Drawn:
    """FID and class accuracy against guidance scale, one line per run; the run's unguided cell with the same
    sampler and steps (if any) is the s = 1 point."""
    scans: dict[str, list[dict]] = {}
    for r in ok:
        if r.get("group") == "guidance" and r.get("guidance_scale") is not None:
            scans.setdefault(r["run"], []).append(r)
    for run, scan in scans.items():
        keys = {(r["sampler"], r["steps"]) for r in scan}
        scales = {r["guidance_scale"] for r in scan}
        scan += [r for r in ok if r.get("group") == "samplers" and r["run"] == run
                 and (r["sampler"], r["steps"]) in keys and r.get("guidance_scale") not in scales]
    guided = [r for scan in scans.values() for r in scan]
    runs_with_scan = sorted(scans)
    if not runs_with_scan:
        return None
    plt = _pyplot()
    if not any(r.get("class_accuracy") is not None for r in guided):  # text runs: FID alone
        fig, ax1 = plt.subplots(figsize=(5, 3.8))
        for run in runs_with_scan:
            pts = sorted((r["guidance_scale"], r["fid"]) for r in guided
                         if r["run"] == run and r.get("fid") is not None)
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=run)
        ax1.set_xlabel("guidance scale s")
        ax1.set_ylabel(_fid_axis(ok))
        ax1.set_title("FID against guidance scale")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        return fig, "guidance.png", "FID against guidance scale"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for run in runs_with_scan:
        pts = sorted(((r["guidance_scale"], r.get("fid"), r.get("class_accuracy")) for r in guided if r["run"] == run),
                     key=lambda p: p[0])
        xs_f = [p[0] for p in pts if p[1] is not None]
        ax1.plot(xs_f, [p[1] for p in pts if p[1] is not None], "o-", label=run)
        xs_a = [p[0] for p in pts if p[2] is not None]
        ax2.plot(xs_a, [100 * p[2] for p in pts if p[2] is not None], "o-", label=run)
    ax1.set_xlabel("guidance scale s")
    ax1.set_ylabel(_fid_axis(ok))
    ax1.set_title("FID against guidance scale")
    ax2.set_xlabel("guidance scale s")
    ax2.set_ylabel("class accuracy (%)")
    ax2.set_title("Class accuracy against guidance scale")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig, "guidance.png", "FID and class accuracy against guidance scale"


def plot_faithfulness(ok: list[dict]) -> Drawn:
    """Text cells: faithfulness against guidance scale (the checker's ceiling dashed) and against FID, the
    alignment / fidelity trade-off of guidance; one line per run, sampler, steps, prompt set and negative prompt."""
    faithful = [r for r in ok if r.get("faithfulness") is not None and r.get("guidance_scale") is not None]
    if not faithful:
        return None
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    lines: dict[tuple, list[dict]] = {}
    for r in faithful:
        lines.setdefault((r["run"], r.get("sampler"), r.get("steps"), r.get("prompts"), r.get("negative_prompt")),
                         []).append(r)
    metrics = {r.get("faithfulness_metric") for r in faithful}
    what = METRIC_HEADINGS.get(metrics.pop(), "faithfulness") if len(metrics) == 1 else "faithfulness"
    for (run, sampler, steps, prompts, negative), members in sorted(lines.items(), key=lambda kv: str(kv[0])):
        members.sort(key=lambda r: r["guidance_scale"])
        label = f"{run}, {SAMPLER_LABELS.get(sampler, sampler)} {steps}"
        label += f", {prompts}" if len(lines) > 1 else ""
        label += f", negative {negative!r}" if negative else ""
        line = ax1.plot([r["guidance_scale"] for r in members], [100 * r["faithfulness"] for r in members], "o-",
                        label=label)[0]
        ceiling = [r["faithfulness_ceiling"] for r in members if r.get("faithfulness_ceiling") is not None]
        if ceiling:
            ax1.axhline(100 * ceiling[0], ls="--", color=line.get_color(), alpha=0.6, lw=1)
        scored = [r for r in members if r.get("fid") is not None]
        ax2.plot([r["fid"] for r in scored], [100 * r["faithfulness"] for r in scored], "o-",
                 color=line.get_color(), label=label)
        for r in scored:
            ax2.annotate(f"s={r['guidance_scale']:g}", (r["fid"], 100 * r["faithfulness"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    ax1.set_xlabel("guidance scale s")
    ax1.set_title(f"{what} against guidance scale (dashed: ceiling)")
    ax2.set_xlabel(_fid_axis(ok))
    ax2.set_title(f"{what} against FID")
    ax2.xaxis.set_major_locator(MaxNLocator(5))
    highest = max([r["faithfulness"] for r in faithful]
                  + [r["faithfulness_ceiling"] for r in faithful if r.get("faithfulness_ceiling") is not None])
    for ax in (ax1, ax2):
        ax.set_ylabel(f"{what} (%)")
        ax.set_ylim(0, min(100.0, max(10.0, 115 * highest)))  # percentages from 0, the ceiling in view
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig, "faithfulness.png", "Prompt faithfulness against guidance scale and FID"


def plot_schedules(ok: list[dict]) -> Drawn:
    """FID per noise schedule against training images: one line per schedule run (a cell per scored checkpoint,
    `at_step`), so an order that is an early-training accident shows as crossing lines."""
    sched = [r for r in ok if r.get("group") == "schedules" and r.get("fid") is not None]
    if not sched:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    per_run: dict[str, list[dict]] = {}
    for r in sched:
        per_run.setdefault(r["run"], []).append(r)
    for run, members in sorted(per_run.items()):
        members.sort(key=lambda r: r.get("train_images") or 0)
        ax.plot([(r.get("train_images") or 0) / 1000 for r in members], [r["fid"] for r in members], "o-",
                label=members[0].get("schedule") or run)
    return _one_panel(fig, ax, "training images seen (thousands)", _fid_axis(ok),
                      "FID per noise schedule against training length", "schedules.png")


def plot_fid_vs_training(ok: list[dict]) -> Drawn:
    """FID and KID against training length: one model trained to several lengths, a line per model and guidance
    scale. The x axis is images seen, not wall time: wall times of runs trained at different moments on a shared
    machine are not comparable, and an architecture study equalises time by scaling the steps. Group
    "architecture" (configs/study-arch.toml) or "training" (any other such sweep, e.g. a VAE's rFID)."""
    trained = [r for r in ok if r.get("group") in ("architecture", "training") and r.get("fid") is not None
               and r.get("train_images")]
    if not trained:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    runs_of: dict[str, set] = {}
    for r in trained:
        runs_of.setdefault(r.get("model") or r["run"], set()).add(r["run"])
    lines: dict[str, list[dict]] = {}
    for r in trained:
        s, model = r.get("guidance_scale"), r.get("model") or r["run"]
        label = model if len(runs_of[model]) == 1 else f"{model} ({r['run']})"  # runs of one network apart
        lines.setdefault(label + ("" if s is None else f", s={s:g}"), []).append(r)
    for label, members in sorted(lines.items()):
        members.sort(key=lambda r: r["train_images"])
        seen = [r["train_images"] / 1000 for r in members]
        ax1.plot(seen, [r["fid"] for r in members], marker="o", label=label)
        kid = [(x, r["kid"] * 1e3) for x, r in zip(seen, members) if r.get("kid") is not None]
        if kid:
            ax2.plot(*zip(*kid), marker="o", label=label)
    ax1.set_ylabel(_fid_axis(ok))
    ax2.set_ylabel("KID x10^3")
    for ax, what in ((ax1, "FID"), (ax2, "KID")):
        ax.set_xlabel("training images seen (thousands)")
        ax.set_title(f"{what} against training length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig, "fid_vs_training.png", "FID and KID against training length"


def plot_loss_curves(run_dirs: dict[str, Path]) -> Drawn:
    """Training loss curves from each run's log.jsonl."""
    curves = {name: read_loss_log(Path(d) / "log.jsonl") for name, d in sorted(run_dirs.items())}
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, _smooth(losses), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, "loss_curves.png", "Training loss curves"


def plot_seconds_per_image(ok: list[dict]) -> Drawn:
    """Seconds per image, one bar per row."""
    timed = [r for r in ok if r.get("seconds_per_image") is not None]
    if not timed:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.8 + 0.3 * len(timed)))
    ax.barh(range(len(timed)), [r["seconds_per_image"] for r in timed], color="tab:orange")
    ax.set_yticks(range(len(timed)), [r["name"] for r in timed], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (sampling + decoding)")
    ax.set_title("Sampling time per image")
    return fig, "seconds_per_image.png", "Seconds per image"


def _fid_axis(rows: list[dict]) -> str:
    """The FID axis label with the study's N (a study scores every cell at one N)."""
    ns = sorted({r.get("fid_n") for r in rows if r.get("fid_n") is not None})
    return f"FID (N={ns[0]})" if len(ns) == 1 else f"FID (N={', '.join(map(str, ns))})"


def _smooth(values: list[float], alpha: float = 0.05) -> list[float]:
    """Exponential moving average (bias-corrected) so noisy losses read as a curve."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** (i + 1)))
    return out


# ----------------------------------------------------------------------------- html


def to_html(study: Study, rows: list[dict], plots: list[tuple[str, str]], floor: dict | None = None) -> str:
    """index.html: table, plots and sample grids on one page; relative links only."""
    s = study.settings
    esc = html.escape
    headings, body = table(rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lddpm study {esc(s.name)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}tr.failed td{background:#fee}"
        "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figcaption{font-size:13px}"
        "img{image-rendering:pixelated;max-width:100%}</style></head><body>",
        f"<h1>Study {esc(s.name)}</h1>",
        f"<p>{esc(s.dataset)} at {s.resolution}x{s.resolution}; FID against the {esc(s.reference_split)} split; "
        f"seed {s.seed}. Also as <a href='results.md'>results.md</a>, <a href='results.json'>results.json</a>, "
        f"<a href='results.csv'>results.csv</a>.</p>",
        f"<p>{esc(floor_text(floor))}</p>" if floor_text(floor) else "",
        "<h2>Results</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headings) + "</tr>",
    ]
    for row, cells in zip(rows, body):
        cls = " class='failed'" if str(row.get("status", "")).startswith("failed") else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    if any(r.get("faithfulness") is not None for r in rows):
        parts.append(f"<p>{esc(FAITHFULNESS_NOTE)}</p>")
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure><img src='{esc(p)}' alt='{esc(t)}'><figcaption>{esc(t)}</figcaption></figure>" for t, p in plots]
    grids = [r for r in rows if r.get("grid")]
    if grids:
        parts.append("<h2>Samples</h2>")
        for r in grids:
            caption = f"{r['name']}: {r.get('sampler')}"
            if r.get("steps"):
                caption += f", {r['steps']} steps"
            if r.get("guidance_scale") not in (None, 1, 1.0):
                caption += f", s={r['guidance_scale']:g}"
            if r.get("prompts"):
                caption += f"; prompts {r['prompts']}" + (f", negative {r['negative_prompt']!r}"
                                                            if r.get("negative_prompt") else "")
            parts.append(f"<figure><img src='{esc(r['grid'])}' alt='{esc(r['name'])}'><figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
