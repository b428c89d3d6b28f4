"""Render every table of results in README.md and docs/*.md from the committed result files.

    python tools/render_docs.py            # rewrite the tables (and the derived tables beside result files)
    python tools/render_docs.py --check    # exit 1, with a diff, when a table differs from what its files give

A table sits between two markers; the first names the table's renderer below and its files:

    <!-- table: quick-study (from docs/study-quick/results.json) -->
    | Cell | ... |
    <!-- end table -->

The files a marker names must be the files its renderer reads (a pattern like `s*.json` stands for every
match), so a reader sees where each number comes from. Result files are the tools' own outputs: study
results.json (`lddpm study`, `lddpm demo`), benchmark JSON (`benchmarks/*.py`), `lddpm eval` JSON. A file
that is not in the repository renders as a one-line note saying so. The check also compares the Markdown
tables the benchmark scripts write beside their JSON (benchmarks/results/peers.md, text/*/table.md) with
what those scripts render from it. tests/test_docs_tables.py runs the check in the default suite.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's lddpm, also when another one is installed

from lddpm import report  # noqa: E402
from lddpm.guidance import interval_from_json  # noqa: E402

MARKER = re.compile(r"<!-- table: (?P<name>[a-z0-9-]+) \(from (?P<files>[^)]*)\) -->\n(?P<body>.*?)<!-- end table -->",
                    re.S)
DASH = "–"


class Missing(Exception):
    """A result file a table needs is not in the repository."""


# ----------------------------------------------------------------------------- helpers


def load(path: str) -> Any:
    """A JSON result file, relative to the repository root."""
    file = ROOT / path
    if not file.is_file():
        raise Missing(path)
    return json.loads(file.read_text())


def fmt(value, spec: str = "{}") -> str:
    """One cell: None or NaN as an en dash, else `spec.format(value)`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return spec.format(value)


def md_table(headings: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A Markdown table; `align` holds '---' or '---:' per column."""
    align = align or ["---"] * len(headings)
    lines = ["| " + " | ".join(headings) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def x1e3(value) -> float | None:
    return None if value is None else value * 1e3


def kid_text(row: dict) -> str:
    """KID x10^3 with its spread over subsets, as the study report writes it."""
    return report._kid_text(row)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x"


# ----------------------------------------------------------------------------- study results.json

# Row fields the study report has no column for (heading, format).
EXTRA_STUDY_COLUMNS = {"psnr": ("PSNR", "{:.1f} dB"), "cell_seconds": ("Cell time", "seconds")}


def study_rows(payload: dict, names: list[str] | None = None) -> list[dict]:
    """The rows of a study's results.json, or the named ones in that order."""
    rows = payload["rows"]
    if names is None:
        return rows
    by_name = {r["name"]: r for r in rows}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"cells {missing} are not in the study's rows")
    return [by_name[n] for n in names]


def study_table(rows: list[dict], keys: list[str]) -> str:
    """The study report's own cells (report.table) for the columns `keys`, plus EXTRA_STUDY_COLUMNS."""
    columns = report.table_columns(rows)
    headings, body = report.table(rows)
    where = {key: i for i, (_, key, _) in enumerate(columns)}
    heads, cells = [], [[] for _ in rows]
    for key in keys:
        if key in where:
            heads.append(headings[where[key]])
            for out, line in zip(cells, body):
                out.append(line[where[key]])
        else:
            head, spec = EXTRA_STUDY_COLUMNS[key]
            heads.append(head)
            for out, row in zip(cells, rows):
                out.append(report._fmt(row.get(key), spec))
    return md_table(heads, cells)


def study_block(path: str, keys: list[str], names: list[str] | None = None, *, floor: bool = True) -> str:
    """The real-data floor sentence (as results.md writes it) and the table."""
    payload = load(path)
    text = ""
    if floor and report.floor_text(payload.get("real_floor")):
        text += report.floor_text(payload["real_floor"]) + "\n\n"
    return text + study_table(study_rows(payload, names), keys)


def cost_text(payload: dict) -> str:
    """The study's total time from its record, or what its file holds instead (studies before timing.json)."""
    timing = report.timing_text(payload.get("timing"))
    if timing:
        return timing
    cells = sum(r.get("cell_seconds") or 0.0 for r in payload["rows"])
    return (f"This file records no total time (it predates the study's time record); its cells' own times "
            f"(`cell_seconds`: sampling and scoring, and the training of the runs the first cell of each needed) "
            f"sum to {cells:,.0f} s ({cells / 60:.0f} min).")


# ----------------------------------------------------------------------------- the registry

TABLES: dict[str, tuple[tuple[str, ...], Callable[..., str], str]] = {}


def table(name: str, *files: str, missing: str = ""):
    """Register `fn() -> Markdown` (or `fn(doc_dir)`, for links relative to the document) as the table `name`,
    reading `files`; `missing` says how to make a file that is absent."""
    def register(fn):
        TABLES[name] = (files, fn, missing)
        return fn
    return register


def render(name: str, doc_dir: Path = ROOT) -> str:
    """The table `name` as it goes into a document in `doc_dir`; an absent file gives a one-line note."""
    files, fn, missing = TABLES[name]
    try:
        return fn(doc_dir) if fn.__code__.co_argcount else fn()
    except Missing as exc:
        return f"*Not in the repository yet: `{exc.args[0]}`.{' ' + missing if missing else ''}*\n"


def link(doc_dir: Path, path: str) -> str:
    """`path` (relative to the repository root) as a link from a document in `doc_dir`."""
    return os.path.relpath(ROOT / path, doc_dir)


# ----------------------------------------------------------------------------- the demos

DEMO_KEYS = ["name", "sampler", "steps", "guidance_scale", "fid", "kid", "classifier_score", "class_accuracy",
             "precision", "recall", "seconds_per_image", "model_evals", "train_images", "train_seconds"]


def demo_block(path: str, doc_dir: Path) -> str:
    """A demo's study: floor, table, its total time, the grid of its first guided cell, a link to its files."""
    payload = load(path)
    folder = str(Path(path).parent)
    text = study_block(path, DEMO_KEYS)
    text += "\n" + cost_text(payload) + "\n"
    guided = [r for r in payload["rows"] if r.get("grid") and (r.get("guidance_scale") or 1) > 1]
    if guided:
        row = guided[0]
        text += (f"\nThe grid of `{row['name']}` (guidance s = {row['guidance_scale']:g}):\n\n"
                 f"![{row['name']} samples]({link(doc_dir, folder + '/' + row['grid'])})\n")
    text += f"\nIts files, as `lddpm demo` wrote them: [{folder}/]({link(doc_dir, folder + '/results.md')}).\n"
    return text


@table("demo", "docs/demo/results.json", missing="`make demo` writes it (as demo-output/results.json).")
def demo(doc_dir: Path) -> str:
    return demo_block("docs/demo/results.json", doc_dir)


@table("demo-text", "docs/demo-text/results.json")
def demo_text() -> str:
    path = "docs/demo-text/results.json"
    text = study_block(path, ["name", "guidance_scale", "fid", "kid", "faithfulness", "faithfulness_ceiling",
                              "faithfulness_seen", "faithfulness_heldout", "slot_accuracy", "swap_rate",
                              "seconds_per_image", "train_images", "train_seconds"])
    return text + "\n" + cost_text(load(path)) + "\n"


# ----------------------------------------------------------------------------- the quick study

QUICK = "docs/study-quick/results.json"
QUICK_KEYS = ["name", "model", "sampler", "steps", "guidance_scale", "schedule", "fid", "kid", "classifier_score",
              "class_accuracy", "precision", "recall", "seconds_per_image", "model_evals", "train_images",
              "train_seconds"]


@table("quick-study", QUICK)
def quick_study() -> str:
    return study_block(QUICK, QUICK_KEYS) + "\n" + cost_text(load(QUICK)) + "\n"


@table("quick-study-summary", QUICK)
def quick_study_summary() -> str:
    names = ["ddpm-1000", "ddim-10", "ddim-20", "ddim-50", "ddim-200", "dpm++2m-20", "cfg-s1", "cfg-s3", "cfg-s6",
             "vae-recon", "ldm-cfg-s1", "ldm-cfg-s3"]
    return study_block(QUICK, ["name", "model", "sampler", "steps", "guidance_scale", "fid", "kid", "class_accuracy",
                               "seconds_per_image", "train_images", "train_seconds"], names)


@table("quick-study-checks", QUICK)
def quick_study_checks() -> str:
    payload = load(QUICK)
    row = {r["name"]: r for r in payload["rows"]}
    fid = {n: r.get("fid") for n, r in row.items()}
    floor = payload["real_floor"]["fid"]

    def yes(holds: bool, why: str = "") -> str:
        return "yes" if holds else "**no**" + (f": {why}" if why else "")

    ddim = [f"ddim-{s}" for s in (10, 20, 50, 100, 200)]
    series = [fid[n] for n in ddim]
    best = ddim[series.index(min(series))].split("-")[1]
    acc = [row[f"cfg-s{s}"]["class_accuracy"] for s in (1, 3, 6)]
    ldm = [row[f"ldm-cfg-s{s}"]["class_accuracy"] for s in (1, 3, 6)]
    vae = fid["vae-recon"]
    lines = [
        ["DDIM FID non-increasing from 10 to 200 steps", "Song et al. 2021, Table 1",
         ", ".join(f"{v:.1f}" for v in series) + " (KID x10^3 " + ", ".join(kid_text(row[n]) for n in ddim) + ")",
         yes(all(b <= a for a, b in zip(series, series[1:])), f"lowest at {best} steps")],
        ["DDIM-100 within 1.5x of DDPM-1000", "4.16 vs 3.17 (1.31x), Song et al. 2021",
         f"{fid['ddim-100']:.1f} vs {fid['ddpm-1000']:.1f} ({ratio(fid['ddim-100'], fid['ddpm-1000'])})",
         yes(fid["ddim-100"] <= 1.5 * fid["ddpm-1000"])],
        ["DPM-Solver++(2M)-20 no worse than DDIM-50", "Lu et al. 2022",
         f"{fid['dpm++2m-20']:.1f} vs {fid['ddim-50']:.1f}", yes(fid["dpm++2m-20"] <= fid["ddim-50"])],
        ["class accuracy rises with the guidance scale", "Ho & Salimans 2022",
         " -> ".join(f"{a:.1%}" for a in acc) + " (s = 1, 3, 6); latent " + " -> ".join(f"{a:.1%}" for a in ldm),
         yes(all(b > a for a, b in zip(acc, acc[1:])) and all(b > a for a, b in zip(ldm, ldm[1:])))],
        ["VAE rFID within 1.5x of the real-data floor", "",
         f"{vae:.1f} vs {floor:.2f} ({ratio(vae, floor)}; PSNR {row['vae-recon']['psnr']:.1f} dB)" if row["vae-recon"].get("psnr")
         else f"{vae:.1f} vs {floor:.2f} ({ratio(vae, floor)})", yes(vae <= 1.5 * floor)],
    ]
    return md_table(["Check", "Literature", "Here", "Holds?"], lines)


@table("quick-study-latent-channels", QUICK, "docs/study-vae/quick-study-c8.json")
def latent_channels() -> str:
    four = {r["name"]: r for r in load(QUICK)["rows"]}
    eight = {r["name"]: r for r in load("docs/study-vae/quick-study-c8.json")["rows"]}
    rows = []
    for name in ("vae-recon", "ldm-cfg-s1", "ldm-cfg-s3", "ldm-cfg-s6"):
        a, b = four[name], eight[name]
        rows.append([name, fmt(a.get("fid"), "{:.2f}"), kid_text(a), fmt(b.get("fid"), "{:.2f}"), kid_text(b)])
    return md_table(["Cell", "FID, 4 channels", "KID x10^3, 4 channels", "FID, 8 channels", "KID x10^3, 8 channels"],
                    rows)


# ----------------------------------------------------------------------------- the other studies


@table("study-arch", "docs/study-arch/results.json")
def study_arch() -> str:
    path = "docs/study-arch/results.json"
    return study_block(path, ["name", "model", "guidance_scale", "fid", "kid", "classifier_score", "class_accuracy",
                              "train_images", "train_seconds"])


VAE_KEYS = ["name", "model", "fid", "kid", "psnr", "precision", "recall", "train_images", "train_seconds"]


@table("study-vae", "docs/study-vae/results.json")
def study_vae() -> str:
    return study_block("docs/study-vae/results.json", VAE_KEYS)


@table("study-vae-long", "docs/study-vae-long/results.json")
def study_vae_long() -> str:
    return study_block("docs/study-vae-long/results.json", VAE_KEYS)


def _changes(payload: dict, run: str, base: str) -> str:
    """What a run of a study sets beyond its base run (its `set` list, without the bookkeeping keys)."""
    runs = payload["runs"]
    extra = [s for s in runs[run]["set"] if s not in runs[base]["set"]]
    if runs[run]["steps"] != runs[base]["steps"]:
        extra.append(f"{runs[run]['steps']} steps")
    return ", ".join(f"`{s}`" if "=" in s else s for s in extra) or "(the base run)"


@table("study-recipe", "docs/study-recipe/results.json")
def study_recipe() -> str:
    path = "docs/study-recipe/results.json"
    payload = load(path)
    rows = payload["rows"]
    body = study_table(rows, ["name", "sampler", "steps", "fid", "kid", "class_accuracy", "precision", "recall",
                              "train_images", "train_seconds"])
    changes = md_table(["Run", "Steps", "Set beyond `fashion-quick`'s base run"],
                       [[run, str(payload["runs"][run]["steps"]), _changes(payload, run, "base")]
                        for run in payload["runs"]])
    return report.floor_text(payload["real_floor"]) + "\n\n" + body + "\n" + changes


@table("study-weights", "docs/study-weights/results.json")
def study_weights() -> str:
    payload = load("docs/study-weights/results.json")
    row = {r["name"]: r for r in payload["rows"]}
    steps = (10, 20, 50, 100, 200)
    lines = []
    for run, prefix in (("min-SNR-5 (the recipe)", "ddim"), ("uniform", "uniform-ddim")):
        cells = [row[f"{prefix}-{s}"] for s in steps]
        lines.append([f"{run}: FID", *[fmt(c.get("fid"), "{:.2f}") for c in cells]])
        lines.append([f"{run}: KID x10^3", *[kid_text(c) for c in cells]])
        lines.append([f"{run}: precision", *[fmt(c.get("precision"), "{:.3f}") for c in cells]])
        lines.append([f"{run}: class acc.", *[fmt(c.get("class_accuracy"), "{:.1%}") for c in cells]])
    return md_table(["DDIM steps", *map(str, steps)], lines, ["---"] + ["---:"] * len(steps))


# ----------------------------------------------------------------------------- the recipe

RECIPE_N2000 = "benchmarks/results/recipe-steps-n2000.json"


@table("recipe-hour", RECIPE_N2000)
def recipe_hour() -> str:
    payload = load(RECIPE_N2000)
    rows = [r for r in payload["rows"] if (r["sampler"], r["steps"], r["guidance_scale"]) == ("dpm++2m", 25, 1.0)]
    lines = [[r["run"], fmt(r.get("fid"), "{:.2f}"), kid_text(r), fmt(r.get("class_accuracy"), "{:.1%}"),
              fmt(r.get("precision"), "{:.3f}"), fmt(r.get("recall"), "{:.3f}")] for r in rows]
    return md_table(["Run", f"FID (N={rows[0]['num']})", "KID x10^3", "Class acc.", "Precision", "Recall"], lines,
                    ["---"] + ["---:"] * 5)


@table("recipe-n2000", RECIPE_N2000)
def recipe_n2000() -> str:
    payload = load(RECIPE_N2000)
    lines = []
    for r in payload["rows"]:
        lines.append([r["run"], r["sampler"], str(r["steps"]), f"{r['guidance_scale']:g}", fmt(r.get("fid"), "{:.2f}"),
                      kid_text(r), fmt(r.get("class_accuracy"), "{:.1%}"), fmt(r.get("precision"), "{:.3f}"),
                      fmt(r.get("recall"), "{:.3f}"), fmt(r.get("seconds_per_image"), "{:.3f}")])
    n = {r["num"] for r in payload["rows"]}
    return md_table(["Run", "Sampler", "Steps", "Guidance s", f"FID (N={n.pop() if len(n) == 1 else '?'})",
                     "KID x10^3", "Class acc.", "Precision", "Recall", "s / image"], lines,
                    ["---"] * 4 + ["---:"] * 6)


NETWORKS = "benchmarks/results/networks.json"


def _network_rows(payload: dict, recipe: bool) -> list[dict]:
    is_recipe = lambda r: r.get("overrides") == {"in_channels": 1, "num_classes": 10}  # noqa: E731
    return [r for r in payload["results"] if is_recipe(r) == recipe]


@table("recipe-network-speed", NETWORKS)
def recipe_network_speed() -> str:
    lines = []
    for r in _network_rows(load(NETWORKS), recipe=True):
        same = r.get("train_speedup_vs_diffusers")
        fp32 = r.get("train_speedup_vs_diffusers_fp32")
        lines.append([r["impl"], r["mode"], f"{r['train_img_s']:.1f}", f"{r['fwd_img_s']:.1f}",
                      fmt(same, "{:.2f}x"), fmt(fp32, "{:.2f}x")])
    return md_table(["Implementation", "Mode", "Train images/s", "Forward images/s", "Train vs diffusers, same mode",
                     "Train vs diffusers fp32"], lines, ["---", "---"] + ["---:"] * 4)


# ----------------------------------------------------------------------------- benchmarks


@table("networks", NETWORKS)
def networks() -> str:
    payload = load(NETWORKS)
    lines = []
    for r in _network_rows(payload, recipe=False):
        shape = ", ".join(f"{k}={v}" for k, v in (r.get("overrides") or {}).items())
        lines.append([r["kind"], r["config"] + (f" ({shape})" if shape else ""), r["impl"], r["mode"], str(r["batch"]),
                      f"{r['params']:,}", f"{r['train_img_s']:.1f}", f"{r['fwd_img_s']:.1f}",
                      fmt(r.get("train_speedup_vs_diffusers_interleaved", r.get("train_speedup_vs_diffusers")), "{:.2f}x"),
                      fmt(r.get("fwd_speedup_vs_diffusers_interleaved", r.get("fwd_speedup_vs_diffusers")), "{:.2f}x")])
    text = md_table(["Kind", "Config", "Implementation", "Mode", "Batch", "Parameters", "Train images/s",
                     "Forward images/s", "Train vs diffusers", "Forward vs diffusers"], lines,
                    ["---"] * 4 + ["---:"] * 6)
    latent = payload.get("latent_dit_vs_unet")
    if latent:
        speeds = latent["train_img_s_cpu_time"]
        text += ("\nLatent 8x8x4, batch " + str(latent["batch"]) + f", {latent['rounds']} interleaved rounds (CPU time): "
                 + ", ".join(f"{k} {v:.1f} train images/s" for k, v in speeds.items())
                 + f"; the DiT at {latent['dit_over_unet']:.2f}x the U-Net.\n")
    return text


@table("bf16-sampling", "benchmarks/results/bf16_sampling.json")
def bf16_sampling() -> str:
    payload = load("benchmarks/results/bf16_sampling.json")
    lines = [[r["sampler"], str(r["steps"]), str(r["num"]), "bf16" if r["bf16"] else "fp32",
              "channels-last" if r["channels_last"] else "contiguous", f"{r['mean_abs_diff']:.3f}",
              f"{r['p99_abs_diff']:g}", str(r["max_abs_diff"]), f"{r['seconds_per_image']:.3f}", f"{r['speedup']:.2f}x"]
             for r in payload["rows"]]
    return md_table(["Sampler", "Steps", "Images", "Precision", "Layout", "Mean abs. diff. (grey levels)", "99th pct.",
                     "Max", "s / image", "vs fp32 contiguous"], lines, ["---"] * 5 + ["---:"] * 5)


TRAIN_OVERHEAD = ("benchmarks/results/train.json", "benchmarks/results/train-fashion-30min.json")


@table("train-overhead", *TRAIN_OVERHEAD)
def train_overhead() -> str:
    lines = []
    for path in TRAIN_OVERHEAD:
        r = load(path)
        config = " ".join([f"`{r['config']}`"] + [f"`{o}`" for o in r.get("overrides", [])])
        lines.append([config, str(r["batch_size"]), str(r["bf16"]), f"{r['bare_images_per_s']:.1f}",
                      f"{r['trainer_images_per_s']:.1f}", f"{r['overhead']:.1%}"])
    return md_table(["Config", "Batch", "bf16", "Bare loop images/s", "Full trainer images/s", "Overhead"], lines,
                    ["---"] * 3 + ["---:"] * 3)


@table("data-loader", "benchmarks/results/data.json")
def data_loader() -> str:
    payload = load("benchmarks/results/data.json")
    lines = [[r["cache"], str(r["batch_size"]), "yes" if r["hflip"] else "no", str(r["prefetch"]),
              f"{r['images_per_s'] / 1e6:.2f}M"] for r in payload["rows"]]
    return md_table(["Cache", "Batch", "Random flips", "Prefetch", "Images/s"], lines, ["---"] * 4 + ["---:"])


FID = "benchmarks/results/fid.json"


@table("fid-backends", FID)
def fid_backends() -> str:
    payload = load(FID)
    lines = []
    for r in payload["rows"]:
        if "skipped" in r:
            lines.append([r["backend"], DASH, DASH, DASH, r["skipped"]])
            continue
        lines.append([r["backend"], f"{r['images_per_s']:.1f}", f"{1000 / r['images_per_s']:.1f}",
                      f"{r['speedup_vs_torch_fp32']:.2f}x", f"{r['max_rel_feature_error']:.1e}"])
    text = (f"Batch {payload['batch_size']}, {payload['threads']} threads, "
            f"{'tcmalloc preloaded' if 'tcmalloc' in (payload.get('ld_preload') or '') else 'glibc malloc'}, "
            f"torch {payload['torch']}, ONNX Runtime {payload.get('onnxruntime')}:\n\n")
    text += md_table(["Backend", "Images/s", "ms / image", "vs PyTorch fp32", "Max rel. feature error"], lines,
                     ["---"] + ["---:"] * 3 + ["---"])
    f = payload.get("frechet_distance") or {}
    cached = f.get("reference_cached_seconds")
    first = f.get("reference_first_seconds")
    text += (f"\nOne Frechet distance at D = {f.get('dim')}: `scipy.linalg.sqrtm` of the product {fmt(f.get('seconds'), '{:.2f}')} s; "
             + (f"against reference statistics {fmt(first, '{:.3g}')} s the first time (the reference's square root "
                f"computed), {cached:.3g} s after (relative difference {f.get('relative_difference', float('nan')):.1e})."
                if cached is not None else
                "the time against reference statistics with the cached square root is not in this file "
                "(it predates that measurement; `python benchmarks/fid.py` measures it).") + "\n")
    return text


@table("fid-agreement", "benchmarks/results/fid_agreement.json")
def fid_agreement() -> str:
    payload = load("benchmarks/results/fid_agreement.json")
    lines = [[r["backend"], str(r["num"]), f"{r['fid']:.6f}", kid_text(r), f"{r['images_per_s']:.1f}",
              f"{r['max_rel_feature_error']:.1e}", f"{r['fid_rel_diff']:.1e}"] for r in payload["rows"]]
    return md_table(["Backend", "N per split", "FID", "KID x10^3", "Images/s", "Max rel. feature error",
                     "FID rel. difference"], lines, ["---"] + ["---:"] * 6)


@table("diffusers-parity", "benchmarks/results/diffusers_parity.json")
def diffusers_parity() -> str:
    payload = load("benchmarks/results/diffusers_parity.json")
    lines = [[r["model"], f"{r['params']:,}", r["output"], f"{r['max_abs_diff']:.1e}",
              "yes" if r["round_trip_bitwise"] else "no"] for r in payload["rows"]]
    return md_table(["Model", "Parameters", "Output compared", "Max abs. difference", "Round trip bitwise"], lines)


PEERS = "benchmarks/results/peers.json"
PEERS_SAMPLERS = "benchmarks/results/peers-samplers.json"
PEERS_AG = "benchmarks/results/peers-ag.json"
PEERS_G20 = "benchmarks/results/peers-g20.json"
PEERS_COOLDOWN = "benchmarks/results/peers-cooldown.json"
PEERS_COOLDOWN_30 = "benchmarks/results/peers-cooldown-30.json"
PEERS_INTERVAL = "benchmarks/results/peers-interval.json"
PEERS_INTERVAL_30 = "benchmarks/results/peers-interval-30.json"
PEERS_INTERVAL_10 = "benchmarks/results/peers-interval-10.json"


def _peers(name: str, path: str):
    """Register the table `name` of one benchmarks/peers.py result: one row per system, variant, mark and sampler,
    and the real-data floor."""
    table(name, path)(lambda: _peers_table(path))


def _peers_table(path: str) -> str:
    payload = load(path)
    lines = []
    for r in payload["rows"]:
        if "error" in r:
            lines.append([r["system"], r["variant"], f"failed: {r['error']}"] + [""] * 8)
            continue
        lines.append([r["system"], r["variant"], f"{r['mark_minutes']:g} min", f"{r['params']:,}",
                      fmt(r.get("train_images_per_s"), "{:.1f}"), f"{r['images_seen']:,}",
                      f"{r['sampler']} ({fmt(r.get('nfe_per_image'), '{:.0f}')} NFE)",
                      fmt(r.get("seconds_per_image"), "{:.3f}"), fmt(r.get("fid"), "{:.2f}"),
                      fmt(r.get("kid_x1e3"), "{:.2f}")])
    floor = payload.get("real_data_floor") or {}
    if floor:
        lines.append([f"real {floor.get('split')} images (floor)", "", "", "", "", "", "", "",
                      fmt(floor.get("fid"), "{:.2f}"), fmt(x1e3(floor.get("kid")), "{:.2f}")])
    return md_table(["System", "Variant", "Training", "Params", "Train img/s", "Images seen", "Sampler", "s / image",
                     f"FID (N={payload['num']})", "KID x10^3"], lines, ["---"] * 3 + ["---:"] * 3 + ["---"] + ["---:"] * 3)


PEERS_TABLES = {"peers": PEERS, "peers-samplers": PEERS_SAMPLERS, "peers-ag": PEERS_AG, "peers-g20": PEERS_G20, "peers-cooldown": PEERS_COOLDOWN,
                "peers-cooldown-30": PEERS_COOLDOWN_30, "peers-interval": PEERS_INTERVAL,
                "peers-interval-30": PEERS_INTERVAL_30, "peers-interval-10": PEERS_INTERVAL_10}
for _name, _path in PEERS_TABLES.items():
    _peers(_name, _path)

# The newest peers runs, one per training mark, summarised in README.
PEERS_LATEST = (PEERS_INTERVAL_10, PEERS_INTERVAL_30)


@table("peers-latest", *PEERS_LATEST)
def peers_latest() -> str:
    """Per run and mark: each system's best row, and both systems' unguided DPM-Solver++(2M)-25, with the ratio of
    lddpm's FID to diffusers'."""
    def cell(row):
        return f"{fmt(row['fid'], '{:.2f}')} ({row['sampler']}, {row['nfe_per_image']:.0f} NFE)"

    lines = []
    for path in PEERS_LATEST:
        rows = [r for r in load(path)["rows"] if r.get("fid") is not None]
        for mark in sorted({r["mark_minutes"] for r in rows}):
            at = {s: [r for r in rows if r["system"] == s and r["mark_minutes"] == mark] for s in ("lddpm", "diffusers")}
            best = {s: min(at[s], key=lambda r: r["fid"]) for s in at}
            plain = {s: next(r for r in at[s] if r["sampler"] == "dpm++2m:25") for s in at}
            lines.append([f"{mark:g} min", Path(path).name, cell(best["lddpm"]), cell(best["diffusers"]),
                          f"{best['lddpm']['fid'] / best['diffusers']['fid']:.3f}",
                          f"{plain['lddpm']['fid']:.2f} / {plain['diffusers']['fid']:.2f}",
                          f"{plain['lddpm']['fid'] / plain['diffusers']['fid']:.3f}"])
    return md_table(["Training", "file", "lddpm best", "diffusers best", "ratio", "dpm++2m:25 unguided, lddpm / diffusers",
                     "ratio"], lines, ["---"] * 4 + ["---:"] * 3)


# ----------------------------------------------------------------------------- text-to-image

TEXT_PAIRS = "benchmarks/results/text/fashion-pairs-30min"
TEXT_PAIRS_POS = "benchmarks/results/text/fashion-pairs-pos"
TEXT_TEXT = "benchmarks/results/text/fashion-text-30min"


def _bench_module(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # the scripts import their neighbour `common`
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_pairs(name: str, folder: str):
    """Register the text benchmark's table `name` for one run's folder, rendered by benchmarks/text.py."""
    @table(name, f"{folder}/s*.json", f"{folder}/floor.json")
    def render() -> str:
        for pattern in TABLES[name][0]:
            if not glob.glob(str(ROOT / pattern)):
                raise Missing(pattern)
        return _bench_module("text").render_table(ROOT / folder)
    return render


_text_pairs("text-pairs", TEXT_PAIRS)
_text_pairs("text-pairs-pos", TEXT_PAIRS_POS)
_text_pairs("text-pairs-refiner", "benchmarks/results/text/fashion-pairs-refiner")
_text_pairs("text-pairs-dit", "benchmarks/results/text/fashion-pairs-dit")
_text_pairs("text-text", TEXT_TEXT)

CLASS_RECIPE = "benchmarks/results/text/class-recipe"


def _by_scale(folder: str) -> dict[float, dict]:
    """A text or eval folder's s*.json results by guidance scale."""
    files = glob.glob(str(ROOT / folder / "s*.json"))
    if not files:
        raise Missing(f"{folder}/s*.json")
    return {r["settings"]["guidance_scale"]: r for r in (json.loads(Path(f).read_text()) for f in files)}


def _of(value: float, ceiling: float) -> str:
    return f"{value:.3f} ({value / ceiling:.2f})"


def _class_accuracies(result: dict) -> list[str]:
    """A fashion-text result's class accuracy over all prompts, seen and held-out phrasings (of ceiling)."""
    scores, ceiling = result["faithfulness"]["scores"], result["faithfulness"]["ceiling"]
    return [_of(part["class_accuracy"], top["class_accuracy"]) for part, top in
            ((scores, ceiling), (scores["seen"], ceiling["seen"]), (scores["heldout"], ceiling["heldout"]))]


@table("text-vs-class", f"{TEXT_TEXT}/s*.json", f"{CLASS_RECIPE}/s*.json")
def text_vs_class() -> str:
    """fashion-text's class accuracy (the scene checker; all prompts, seen and held-out phrasings) beside the class
    recipe's (the Fashion-MNIST classifier), per guidance scale, each as a fraction of its ceiling on real test
    images in brackets."""
    text, labels = _by_scale(TEXT_TEXT), _by_scale(CLASS_RECIPE)
    rows = []
    for scale in sorted(set(text) & set(labels)):
        t, c = text[scale], labels[scale]
        rows.append([f"{scale:g}", *_class_accuracies(t), f"{t['fid']:.2f}",
                     _of(c["class_accuracy"], c["classifier"]["test_accuracy"]), f"{c['fid']:.2f}"])
    return md_table(["guidance s", "prompts: class accuracy (of ceiling)", "seen phrasings", "held-out phrasings",
                     f"FID vs scenes (N={t['num_images']})", "class labels: class accuracy (of ceiling)",
                     f"FID vs Fashion-MNIST (N={c['num_images']})"], rows)


TEXT_LATENT = "benchmarks/results/text/fashion-text-latent"
_text_pairs("text-latent", TEXT_LATENT)


@table("text-pixel-vs-latent", f"{TEXT_TEXT}/s*.json", f"{TEXT_LATENT}/s*.json")
def text_pixel_vs_latent() -> str:
    """fashion-text in pixel space (fashion-text-30min) and on the autoencoder's latents (fashion-text-latent), per
    guidance scale: class accuracy (all prompts, seen, held-out; of the checker's ceiling) and FID."""
    pixel, latent = _by_scale(TEXT_TEXT), _by_scale(TEXT_LATENT)
    rows = []
    for scale in sorted(set(pixel) & set(latent)):
        for name, r in (("pixel", pixel[scale]), ("latent", latent[scale])):
            rows.append([f"{scale:g}", name, *_class_accuracies(r), f"{r['fid']:.2f}"])
    return md_table(["guidance s", "space", "class accuracy (of ceiling)", "seen phrasings", "held-out phrasings",
                     f"FID vs scenes (N={latent[min(latent)]['num_images']})"], rows)


# ----------------------------------------------------------------------------- editing and restoration

RESTORATION = "benchmarks/results/restoration"
RESTORATION_MISSING = ("`python benchmarks/restoration.py` writes it from trained runs (the commands are in "
                       "docs/editing.md).")


def _restoration(section: str):
    """Register the restoration benchmark's `section` table, rendered by benchmarks/restoration.py."""
    @table(f"restoration-{section}", f"{RESTORATION}/{section}.json", missing=RESTORATION_MISSING)
    def render_section(doc_dir: Path) -> str:
        payload = load(f"{RESTORATION}/{section}.json")
        renderer = _bench_module("restoration").SECTIONS[section][1]
        return renderer(payload, link(doc_dir, RESTORATION) + "/")
    return render_section


for _section in ("gaussian", "inpaint", "sr", "denoise", "edit"):
    _restoration(_section)


# ----------------------------------------------------------------------------- samplers (docs/samplers.md)

SAMPLERS = "benchmarks/results/samplers/fashion-30min"


def _samplers(mode: str, name: str | None = None, folder: str = SAMPLERS):
    """Register the sampler benchmark's `mode` table (steps or nfe) of one output folder, rendered by
    benchmarks/samplers.py."""
    path = f"{folder}/{mode}.json"

    @table(name or f"samplers-{mode}", path, missing=f"`python benchmarks/samplers.py {mode} RUN` writes it.")
    def render() -> str:
        return _bench_module("samplers").render_table(mode, load(path))
    return render


for _mode in ("steps", "nfe"):
    _samplers(_mode)
# DPM-Solver++(3M)-10 with other sigma floors on the gamma-20 30-minute run (seed 0)
_samplers("nfe", "samplers-floor-gamma20", "benchmarks/results/samplers/floor-minsnr20-s0")


def _guidance(name: str, folder: str):
    """Register the guidance benchmark's table `name` for one output folder, rendered by benchmarks/guidance.py."""
    path = f"{folder}/guidance.json"

    @table(name, path, missing="`python benchmarks/guidance.py RUN --guide GUIDE --out FOLDER` writes it.")
    def render() -> str:
        payload = load(path)
        return _bench_module("guidance").render_table(ROOT / folder, payload["rows"], payload["floor"])
    return render


_guidance("guidance-small-guide", "benchmarks/results/guidance/fashion-30min-unipc10")
_guidance("guidance-early-checkpoint", "benchmarks/results/guidance/fashion-30min-unipc10-guide10min")
_guidance("guidance-peers-uncond", "benchmarks/results/guidance/peers-uncond-30min-dpm25")
_guidance("guidance-dpm3m-early-checkpoint", "benchmarks/results/guidance/fashion-30min-dpm3m10-guide10min")
_guidance("guidance-dpm3m-sweep", "benchmarks/results/guidance/fashion-30min-dpm3m10-sweep")
_guidance("guidance-dpm3m-sweep-wide", "benchmarks/results/guidance/fashion-30min-dpm3m10-sweep-wide")

# The autoguidance sweep on the peers benchmark's lddpm checkpoints: (mark, guide, folder) per guidance.py run.
PEERS_SWEEP = "benchmarks/results/guidance/peers-uncond-sweep"
PEERS_SWEEP_RUNS = (
    (10, "its 3.33-min checkpoint", f"{PEERS_SWEEP}/10min-guide3min"),
    (30, "its 10-min checkpoint", "benchmarks/results/guidance/peers-uncond-30min-dpm25"),
    (30, "its 10-min checkpoint", f"{PEERS_SWEEP}/30min-guide10min"),
    (30, "its 3.33-min checkpoint", f"{PEERS_SWEEP}/30min-guide3min"),
    (30, "its 10-min checkpoint", f"{PEERS_SWEEP}/30min-guide10min-logsnr-floor"),
)


def _interval_text(interval, unbounded: str = "all") -> str:
    """A guidance interval of a result JSON as text: [lo, hi], with inf for a null upper bound."""
    return "[{:g}, {:g}]".format(*interval_from_json(interval)) if interval else unbounded


def _peers_guidance(runs, peers_file: str) -> str:
    """Autoguidance rows of guidance.py folders on the peers' lddpm checkpoints ((mark, guide, folder) each), each
    against diffusers' best FID at its mark in `peers_file`."""
    best = {}
    for r in load(peers_file)["rows"]:
        if r.get("system") == "diffusers" and r.get("fid") is not None:
            best[r["mark_minutes"]] = min(best.get(r["mark_minutes"], float("inf")), r["fid"])
    lines, seen = [], set()
    for mark, guide, folder in runs:
        payload = load(f"{folder}/guidance.json")
        settings, options = payload["settings"], payload.get("sampler_options") or {}
        sampler = f"{settings['sampler']}-{settings['steps']}" + "".join(f", {k} {v}" for k, v in options.items())
        for r in payload["rows"]:
            key = (mark, sampler, r["name"])
            if key in seen:  # the unguided row of runs that share the checkpoint, sampler and seed
                continue
            seen.add(key)
            lines.append([f"{mark} min", sampler, guide if r["guide_scale"] != 1 else "none",
                          f"{r['guide_scale']:g}", _interval_text(r["interval"]) if r["guide_scale"] != 1 else "",
                          f"{r['fid']:.2f}", fmt(x1e3(r.get("kid")), "{:.2f}"), f"{r['nfe']:g}",
                          f"{r['fid'] / best[float(mark)]:.2f}x" if float(mark) in best else ""])
    return md_table(["lddpm at", "sampler", "guide", "w", "interval (sigma)", "FID (N=1000)", "KID x10^3", "NFE",
                     "vs diffusers' best at the mark"], lines, ["---"] * 5 + ["---:"] * 4)


@table("guidance-peers-uncond-sweep", *(f"{folder}/guidance.json" for _, _, folder in PEERS_SWEEP_RUNS),
       PEERS_SAMPLERS)
def guidance_peers_uncond_sweep() -> str:
    """Every autoguidance row on the fourth peers run's lddpm checkpoints, against diffusers' best at its mark."""
    return _peers_guidance(PEERS_SWEEP_RUNS, PEERS_SAMPLERS)


# The sixth peers run's 30-minute lddpm checkpoint guided only above a noise level (its guide: the 10-minute one).
PEERS_30_INTERVAL = ((30, "its 10-min checkpoint", f"{PEERS_SWEEP}/30min-guide10min-above028"),
                     (30, "its 10-min checkpoint", f"{PEERS_SWEEP}/30min-guide10min-above028-w3"))


@table("guidance-peers-30-interval", *(f"{folder}/guidance.json" for _, _, folder in PEERS_30_INTERVAL),
       PEERS_COOLDOWN_30)
def guidance_peers_30_interval() -> str:
    """The same for the sixth peers run's lddpm checkpoint, against diffusers' best in that run."""
    return _peers_guidance(PEERS_30_INTERVAL, PEERS_COOLDOWN_30)


# The same checkpoint and guide setting with other samplers and step counts.
PEERS_30_SAMPLERS = tuple((30, "its 10-min checkpoint", f"{PEERS_SWEEP}/30min-guide10min-above028-{suffix}")
                          for suffix in ("2m50", "sde25", "sde50", "3m25"))


@table("guidance-peers-30-samplers", *(f"{folder}/guidance.json" for _, _, folder in PEERS_30_SAMPLERS),
       PEERS_COOLDOWN_30)
def guidance_peers_30_samplers() -> str:
    """The open-interval setting on the sixth peers run's lddpm checkpoint with other samplers and step counts."""
    return _peers_guidance(PEERS_30_SAMPLERS, PEERS_COOLDOWN_30)


# DPM-Solver++(3M)-10 with and without autoguidance on the 30-minute ablation's runs: (run, min-SNR gamma, folder).
GUIDANCE_BY_GAMMA = (
    ("recipe-s0", 5, "benchmarks/results/guidance/fashion-30min-dpm3m10-sweep"),
    ("recipe-s1", 5, "benchmarks/results/guidance/edm-ablation-recipe-s1-dpm3m10"),
    ("minsnr20-s0", 20, "benchmarks/results/guidance/edm-ablation-minsnr20-s0-dpm3m10"),
    ("minsnr20-s1", 20, "benchmarks/results/guidance/edm-ablation-minsnr20-s1-dpm3m10"),
)


def _guidance_rows(folder: str) -> dict[str, dict]:
    """The rows of a benchmarks/guidance.py output folder by row name (names, not scales: a sweep can hold CFG+AG
    rows at the same guide scale)."""
    return {r["name"]: r for r in load(f"{folder}/guidance.json")["rows"]}


GUIDANCE_BY_COOLDOWN = (
    ("minsnr20-s0", "constant", "benchmarks/results/guidance/edm-ablation-minsnr20-s0-dpm3m10"),
    ("minsnr20-s1", "constant", "benchmarks/results/guidance/edm-ablation-minsnr20-s1-dpm3m10"),
    ("cooldown-s0", "cool-down 0.2", "benchmarks/results/guidance/edm-ablation-cooldown-s0-dpm3m10"),
    ("cooldown-s1", "cool-down 0.2", "benchmarks/results/guidance/edm-ablation-cooldown-s1-dpm3m10"),
)


def _fid_cells(rows: dict[str, dict], columns) -> list[str]:
    """The FID of each (row name, label) column of a guidance.py result, then the best of them (a dash where absent)."""
    fids = [rows[name]["fid"] for name, _ in columns if name in rows]
    return ([fmt(rows.get(name, {}).get("fid"), "{:.2f}") for name, _ in columns]
            + [fmt(min(fids, default=None), "{:.2f}")])


def _merged_rows(folders) -> dict[str, dict]:
    """The rows of several guidance.py folders of one run; the first folder's row wins where two hold the same one."""
    rows: dict[str, dict] = {}
    for folder in reversed(folders):
        rows.update(_guidance_rows(folder))
    return rows


def _guidance_by_run(entries, label: str) -> str:
    """Unguided and autoguided (inside the interval) FID of each (run, setting, folder), seed by seed."""
    columns = [("none", "unguided"), ("ag-w2-interval", "AG w 2"), ("ag-w2.5-interval", "AG w 2.5")]
    lines = [[run, str(setting), run.rsplit("-s", 1)[1]] + _fid_cells(_guidance_rows(folder), columns)
             for run, setting, folder in entries]
    return md_table(["run", label, "seed"] + [f"FID {label}" for _, label in columns] + ["best"], lines,
                    ["---"] * 3 + ["---:"] * (len(columns) + 1))


# fashion-30min as it ships, one training seed per folder, autoguided as docs/guidance.md recommends.
RECIPE_SEEDS = tuple(f"benchmarks/results/guidance/cooldown-s{s}-dpm2m25-above028" for s in (0, 1, 2))
RECIPE_FLOOR = "benchmarks/results/samplers/fashion-30min/floor.json"


@table("recipe-seeds", *(f"{f}/guidance.json" for f in RECIPE_SEEDS), RECIPE_FLOOR)
def recipe_seeds() -> str:
    """Unguided and autoguided FID of each training seed of the preset, their mean, and each as a multiple of the
    real-data floor."""
    floor = load(RECIPE_FLOOR)["fid"]
    pairs, nfe = [], set()
    for folder in RECIPE_SEEDS:
        rows = _guidance_rows(folder)
        pairs.append((rows["none"]["fid"], rows["ag-w2.5-interval"]["fid"]))
        nfe.add((rows["none"]["nfe"], rows["ag-w2.5-interval"]["nfe"]))
    (plain_nfe, guided_nfe), = nfe  # the same sampler and interval on every seed
    lines = [[str(seed), f"{plain:.2f}", f"{guided:.2f}", f"{guided / floor:.3f}x"]
             for seed, (plain, guided) in enumerate(pairs)]
    mean_plain, mean_guided = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
    lines.append(["mean", f"{mean_plain:.2f}", f"{mean_guided:.2f}", f"{mean_guided / floor:.3f}x"])
    return md_table(["training seed", f"FID unguided ({plain_nfe:g} NFE)", f"FID autoguided ({guided_nfe:g} NFE)",
                     f"autoguided / floor ({floor:.2f})"], lines, ["---", "---:", "---:", "---:"])


# The cool-down runs retrained (runs/cooldown-s{0,1}, the study rows' settings) and autoguided with
# DPM-Solver++(2M)-25 at every step and inside the interval; a second folder per run holds the lower guide scales.
GUIDANCE_2M25 = (
    ("cooldown-s0", ("benchmarks/results/guidance/cooldown-s0-dpm2m25",
                     "benchmarks/results/guidance/cooldown-s0-dpm2m25-low")),
    ("cooldown-s1", ("benchmarks/results/guidance/cooldown-s1-dpm2m25",)),
)
GUIDANCE_2M25_COLUMNS = (("none", "unguided"), ("ag-w1.5", "AG w 1.5"), ("ag-w1.75", "AG w 1.75"), ("ag-w2", "AG w 2"),
                         ("ag-w2.5", "AG w 2.5"), ("ag-w2-interval", "AG w 2 in interval"),
                         ("ag-w2.5-interval", "AG w 2.5 in interval"))


@table("guidance-2m25", *(f"{f}/guidance.json" for _, folders in GUIDANCE_2M25 for f in folders))
def guidance_2m25() -> str:
    """FID of the retrained cool-down runs, unguided and autoguided with DPM-Solver++(2M)-25, run by run (the first
    folder's row wins where two folders hold the same row, e.g. the unguided baseline)."""
    lines = [[run, run.rsplit("-s", 1)[1]] + _fid_cells(_merged_rows(folders), GUIDANCE_2M25_COLUMNS)
             for run, folders in GUIDANCE_2M25]
    return md_table(["run", "seed"] + [f"FID {label}" for _, label in GUIDANCE_2M25_COLUMNS] + ["best"], lines,
                    ["---"] * 2 + ["---:"] * (len(GUIDANCE_2M25_COLUMNS) + 1))


# The preset's run against other guides, its raw weights and the half batch, with the same sampler (run, batch,
# the main network's weights, the guide checkpoint, result folders; the first folder's row wins, as above).
GUIDANCE_VARIANTS = (
    ("cooldown-s0", 64, "EMA", "step 1,400 (1/3)", ("benchmarks/results/guidance/cooldown-s0-dpm2m25",
                                                   "benchmarks/results/guidance/cooldown-s0-dpm2m25-low")),
    ("cooldown-s0", 64, "EMA", "step 1,400 (1/3)", ("benchmarks/results/guidance/cooldown-s0-dpm2m25-seed1",)),
    ("cooldown-s0", 64, "EMA", "step 2,800 (2/3)", ("benchmarks/results/guidance/cooldown-s0-dpm2m25-guide2800",)),
    ("cooldown-s0", 64, "raw", "step 1,400 (1/3)", ("benchmarks/results/guidance/cooldown-s0-raw-dpm2m25",)),
    ("cooldown-s1", 64, "EMA", "step 1,400 (1/3)", ("benchmarks/results/guidance/cooldown-s1-dpm2m25",)),
    ("bs32-s0", 32, "EMA", "step 2,800 (1/3)", ("benchmarks/results/guidance/bs32-s0-dpm2m25",
                                               "benchmarks/results/guidance/bs32-s0-dpm2m25-w2.5")),
    ("bs32-s1", 32, "EMA", "step 2,800 (1/3)", ("benchmarks/results/guidance/bs32-s1-dpm2m25",
                                               "benchmarks/results/guidance/bs32-s1-dpm2m25-w2.5")),
)
GUIDANCE_VARIANT_COLUMNS = (("none", "unguided"), ("ag-w1.75", "AG w 1.75"), ("ag-w2", "AG w 2"), ("ag-w2.5", "AG w 2.5"))


@table("guidance-2m25-variants", *(f"{f}/guidance.json" for *_, folders in GUIDANCE_VARIANTS for f in folders))
def guidance_2m25_variants() -> str:
    """FID unguided and autoguided at every step of DPM-Solver++(2M)-25, by batch, main weights, guide and the
    sampling seed (the noise and labels drawn; the training seed is the run's -s suffix)."""
    lines = [[run, str(batch), weights, guide, str(load(f"{folders[0]}/guidance.json")["settings"]["seed"])]
             + _fid_cells(_merged_rows(folders), GUIDANCE_VARIANT_COLUMNS)
             for run, batch, weights, guide, folders in GUIDANCE_VARIANTS]
    return md_table(["run", "batch", "weights", "guide", "sampling seed",
                     *(f"FID {label}" for _, label in GUIDANCE_VARIANT_COLUMNS), "best"], lines,
                    ["---"] * 4 + ["---:"] * (len(GUIDANCE_VARIANT_COLUMNS) + 2))


@table("guide-cost", "benchmarks/results/guidance/guide-cost.json")
def guide_cost() -> str:
    """benchmarks/guide_cost.py: the small guide preset's parameters, steps and CPU times beside the main run's."""
    d = load("benchmarks/results/guidance/guide-cost.json")
    main, guide = d["presets"]["main"], d["presets"]["guide"]
    train, fwd = d["train_step_cpu_seconds"], d["forward_cpu_seconds_per_image"]
    autocast = str(d["bf16_autocast"]).lower()
    lines = [["parameters", f"{d['params']['main']:,}", f"{d['params']['guide']:,}",
              f"{d['params']['guide'] / d['params']['main']:.3f}"],
             [f"training steps (batch {d['batch']})", f"{d['steps']['main']:,}", f"{d['steps']['guide']:,}",
              f"{d['steps']['guide'] / d['steps']['main']:.3f}"],
             [f"training step, CPU s (bf16 autocast: {autocast})", f"{train['main']:.3f}", f"{train['guide']:.3f}",
              f"{d['guide_train_step_over_main']:.3f}"],
             [f"sampling forward, CPU s per image (batch {d['sample_batch']})", f"{fwd['main']:.4f}",
              f"{fwd['guide']:.4f}", f"{d['guide_forward_over_main']:.3f}"],
             ["training compute", "", "", f"**{100 * d['guide_training_share_of_main']:.1f}%** of the main run's"]]
    return md_table(["", f"main (`{main}`)", f"guide (`{guide}`)", "guide / main"], lines,
                    ["---", "---:", "---:", "---:"])


# Where autoguidance applies along DPM-Solver++(2M)-25 (run, the main network's weights, the guide, guided sigma
# range, row-name suffix, result folders; the first folder's row wins, as above): every step, EDM2's interval, each
# of its bounds alone; then the second training seed, the main network as a post-hoc EMA of other lengths, and other
# guides (the same training: runs/phema-s0 is runs/cooldown-s0 with EMA snapshots).
GR = "benchmarks/results/guidance"  # the guidance benchmark's result folders
STEP1400 = "step 1,400"
GUIDANCE_2M25_INTERVALS = (
    ("cooldown-s0", "EMA", STEP1400, "every step", "", (f"{GR}/cooldown-s0-dpm2m25", f"{GR}/cooldown-s0-dpm2m25-low")),
    ("cooldown-s0", "EMA", STEP1400, "[0.28, 5.42]", "-interval", (f"{GR}/cooldown-s0-dpm2m25",)),
    ("cooldown-s0", "EMA", STEP1400, "[0, 5.42]", "-interval", (f"{GR}/cooldown-s0-dpm2m25-below5",)),
    ("cooldown-s0", "EMA", STEP1400, "[0.28, inf]", "-interval", (f"{GR}/cooldown-s0-dpm2m25-above028",
                                                                  f"{GR}/cooldown-s0-dpm2m25-above028-w2.75")),
    ("cooldown-s0", "EMA", STEP1400, "[0.28, inf], 50 steps", "-interval", (f"{GR}/cooldown-s0-dpm2m50-above028",)),
    ("cooldown-s0", "EMA", STEP1400, "[0.6, inf]", "-interval", (f"{GR}/cooldown-s0-dpm2m25-above06",)),
    ("cooldown-s1", "EMA", STEP1400, "every step", "", (f"{GR}/cooldown-s1-dpm2m25",)),
    ("cooldown-s1", "EMA", STEP1400, "[0.28, inf]", "-interval", (f"{GR}/cooldown-s1-dpm2m25-above028",)),
    ("cooldown-s1, sampling seed 1", "EMA", STEP1400, "[0.28, inf]", "-interval",
     (f"{GR}/cooldown-s1-dpm2m25-above028-seed1",)),
    ("cooldown-s2", "EMA", STEP1400, "[0.28, inf]", "-interval", (f"{GR}/cooldown-s2-dpm2m25-above028",)),
    ("cooldown-s0", "post-hoc EMA 0.05", STEP1400, "[0.28, inf]", "-interval",
     (f"{GR}/phema-s0-ema0.050-dpm2m25-above028",)),
    ("cooldown-s0", "post-hoc EMA 0.15", STEP1400, "[0.28, inf]", "-interval",
     (f"{GR}/phema-s0-ema0.150-dpm2m25-above028",)),
    ("cooldown-s0", "EMA", "step 1,400, post-hoc EMA 0.15", "[0.28, inf]", "-interval",
     (f"{GR}/phema-s0-guide-ema0.150-dpm2m25-above028",)),
    ("cooldown-s0", "EMA", "step 700", "[0.28, inf]", "-interval", (f"{GR}/phema-s0-guide700-dpm2m25-above028",
                                                                     f"{GR}/phema-s0-guide700-dpm2m25-above028-w2.5")),
    *((f"bs32-s{s} (batch 32)", "EMA", "step 2,800", where, suffix, folders) for s in (0, 1) for where, suffix, folders in (
        ("every step", "", (f"{GR}/bs32-s{s}-dpm2m25", f"{GR}/bs32-s{s}-dpm2m25-w2.5")),
        ("[0.28, inf]", "-interval", (f"{GR}/bs32-s{s}-dpm2m25-above028",)))),
)
GUIDANCE_INTERVAL_SCALES = ("1.75", "2", "2.5", "2.75", "3")


@table("guidance-2m25-interval",
       *dict.fromkeys(f"{f}/guidance.json" for *_, folders in GUIDANCE_2M25_INTERVALS for f in folders))
def guidance_2m25_interval() -> str:
    """Autoguided FID by the guided sigma range and the guide scale, with the evaluations per image it costs."""
    lines = []
    for run, weights, guide, where, suffix, folders in GUIDANCE_2M25_INTERVALS:
        rows = _merged_rows(folders)
        columns = [(f"ag-w{w}{suffix}", w) for w in GUIDANCE_INTERVAL_SCALES]
        nfe = {rows[name]["nfe"] for name, _ in columns if name in rows}
        lines.append([run, weights, guide, where, fmt(rows["none"]["fid"], "{:.2f}")] + _fid_cells(rows, columns)
                     + ["/".join(f"{n:g}" for n in sorted(nfe))])
    return md_table(["run", "main weights", "guide", "guided where", "FID unguided",
                     *(f"FID AG w {w}" for w in GUIDANCE_INTERVAL_SCALES), "best", "NFE / image"], lines,
                    ["---"] * 4 + ["---:"] * (len(GUIDANCE_INTERVAL_SCALES) + 3))


# The same solver and protocol on the batch-32 runs, beside the batch-64 cool-down runs of the table above.
GUIDANCE_BY_BATCH = (
    *((run, 64, folder) for run, _, folder in GUIDANCE_BY_COOLDOWN if run.startswith("cooldown-")),
    ("bs32-s0", 32, "benchmarks/results/guidance/bs32-s0-dpm3m10"),
    ("bs32-s1", 32, "benchmarks/results/guidance/bs32-s1-dpm3m10"),
)


@table("guidance-by-batch", *(f"{folder}/guidance.json" for _, _, folder in GUIDANCE_BY_BATCH))
def guidance_by_batch() -> str:
    """The same for the cool-down runs at batch 64 against batch 32, seed by seed."""
    return _guidance_by_run(GUIDANCE_BY_BATCH, "batch")


@table("guidance-by-gamma", *(f"{folder}/guidance.json" for _, _, folder in GUIDANCE_BY_GAMMA))
def guidance_by_gamma() -> str:
    """Unguided and autoguided (inside the interval) FID of each run, min-SNR gamma 5 against 20, seed by seed."""
    return _guidance_by_run(GUIDANCE_BY_GAMMA, "min-SNR gamma")


@table("guidance-by-cooldown", *(f"{folder}/guidance.json" for _, _, folder in GUIDANCE_BY_COOLDOWN))
def guidance_by_cooldown() -> str:
    """The same for the min-SNR-20 runs with a constant learning rate against the cool-down, seed by seed."""
    return _guidance_by_run(GUIDANCE_BY_COOLDOWN, "learning rate")


LOW_BOUND = "benchmarks/results/guidance/low-bound"


@table("guidance-low-bound", *(f"{folder}/guidance.json" for _, _, folder in GUIDANCE_BY_GAMMA),
       *(f"{LOW_BOUND}/{run}/guidance.json" for run, _, _ in GUIDANCE_BY_GAMMA))
def guidance_low_bound() -> str:
    """Autoguidance at w 2 and 2.5 with the interval's lower bound 0.28 (table above) against 0.1, run by run."""
    lines = []
    for run, gamma, folder in GUIDANCE_BY_GAMMA:
        upper, lower = _guidance_rows(folder), _guidance_rows(f"{LOW_BOUND}/{run}")
        lines.append([run, str(gamma)] + [fmt(rows.get(f"ag-w{w}-interval", {}).get("fid"), "{:.2f}")
                                          for w in ("2", "2.5") for rows in (upper, lower)])
    return md_table(["run", "min-SNR gamma", "w 2, [0.28, 5.42]", "w 2, [0.1, 5.42]", "w 2.5, [0.28, 5.42]",
                     "w 2.5, [0.1, 5.42]"], lines, ["---", "---"] + ["---:"] * 4)


# Autoguidance (w 2) with other interval bounds on the gamma-20 seed-0 run (the new preset's 30-minute model).
INTERVAL_SWEEP = ("benchmarks/results/guidance/edm-ablation-minsnr20-s0-dpm3m10",
                  *(f"benchmarks/results/guidance/interval-sweep/minsnr20-s0-{b}"
                    for b in ("0.1-5.42", "0.28-2.5", "0.5-5.42", "0.1-2.5")))


@table("guidance-interval-sweep", *(f"{folder}/guidance.json" for folder in INTERVAL_SWEEP))
def guidance_interval_sweep() -> str:
    """The unguided row once, then autoguidance at w 2 with each interval, in the order run."""
    lines, seen_none = [], False
    for folder in INTERVAL_SWEEP:
        for r in load(f"{folder}/guidance.json")["rows"]:
            if r["guide_scale"] == 1:  # the same unguided samples in every folder: shown once
                if seen_none:
                    continue
                seen_none = True
            elif r["guide_scale"] != 2:
                continue
            interval = _interval_text(r["interval"], DASH)
            lines.append([f"{r['guide_scale']:g}", interval, f"{r['fid']:.2f}", fmt(x1e3(r.get("kid")), "{:.2f}"),
                          fmt(r.get("class_accuracy"), "{:.3f}"), f"{r['nfe']:g}"])
    return md_table(["guide w", "interval (sigma)", "FID", "KID x10^3", "class acc.", "NFE / image"], lines,
                    ["---:", "---", "---:", "---:", "---:", "---:"])


EDM_ABLATION_10MIN = "benchmarks/results/edm-ablation-10min/ablation.json"
EDM_ABLATION_30MIN = "benchmarks/results/edm-ablation/ablation.json"


def _edm_ablation(path: str) -> str:
    payload = load(path)
    return _bench_module("edm_ablation").report_markdown(payload, payload["steps"])


@table("edm-ablation-10min", EDM_ABLATION_10MIN,
       missing="`python benchmarks/edm_ablation.py --study src/lddpm/configs/study-edm-10min.toml` writes it.")
def edm_ablation_10min() -> str:
    return _edm_ablation(EDM_ABLATION_10MIN)


@table("edm-ablation-30min", EDM_ABLATION_30MIN, missing="`python benchmarks/edm_ablation.py` writes it.")
def edm_ablation_30min() -> str:
    return _edm_ablation(EDM_ABLATION_30MIN)


EDM_STUDY_10MIN = "benchmarks/results/edm-ablation-10min/study/results.json"
EDM_STUDY_30MIN = "benchmarks/results/edm-ablation/study/results.json"


def _fid_kid(row: dict) -> str:
    return f"{row['fid']:.2f} / {fmt(x1e3(row.get('kid')), '{:.2f}')}"


@table("cooldown-effect", EDM_STUDY_10MIN, EDM_STUDY_30MIN)
def cooldown_effect() -> str:
    """The cool-down rows of both ablation studies beside the constant-rate min-SNR-20 rows of the same seeds."""
    lines = []
    for path, mark, step in ((EDM_STUDY_10MIN, "10 min", 1400), (EDM_STUDY_30MIN, "30 min", 4200)):
        payload = load(path)
        for seed in (0, 1):
            plain, cooled = study_rows(payload, [f"minsnr20-s{seed}-at{step}", f"cooldown-s{seed}-at{step}"])
            lines.append([f"{mark} (step {step:,})", str(seed), _fid_kid(plain), _fid_kid(cooled),
                          f"{cooled['fid'] - plain['fid']:+.2f}"])
    return md_table(["mark", "seed", "min-SNR-20, constant rate: FID / KID x10^3", "with the cool-down: FID / KID x10^3",
                     "FID change"], lines, ["---", "---:", "---", "---", "---:"])


# One change each to the 10-minute cool-down recipe (cell, what changed).
COOLDOWN_SCREEN = (
    ("cooldown-s0-at1400", "(the recipe at 10 minutes)"),
    ("cooldown40-s0-at1400", "`optim.cooldown = 0.4`"),
    ("lr2e3-s0-at1400", "`optim.lr = 2e-3` (peak rate doubled)"),
    ("sqrt-s0-at1400", '`optim.cooldown_shape = "sqrt"`'),
    ("bs32-s0-at2800", "`optim.batch_size = 32` for 2,800 steps (the same images), `optim.ema_decay = 0.9995`"),
)


@table("cooldown-screen", EDM_STUDY_10MIN)
def cooldown_screen() -> str:
    rows = study_rows(load(EDM_STUDY_10MIN), [cell for cell, _ in COOLDOWN_SCREEN])
    lines = [[cell.rsplit("-at", 1)[0], change, f"{r['fid']:.2f}", fmt(x1e3(r.get("kid")), "{:.2f}")]
             for (cell, change), r in zip(COOLDOWN_SCREEN, rows)]
    return md_table(["row", "change", "FID", "KID x10^3"], lines, ["---", "---", "---:", "---:"])


# ----------------------------------------------------------------------------- training (docs/training.md)

LOSS_WEIGHTS = "benchmarks/results/loss-weights.json"


@table("loss-weights", LOSS_WEIGHTS, missing="`python benchmarks/loss_weights.py --out benchmarks/results/loss-weights.json` writes it.")
def loss_weights() -> str:
    payload = load(LOSS_WEIGHTS)
    bands = [b["band"] for b in payload["rows"][0]["bands"]]
    lines = [[r["variant"], *[f"{100 * b['share']:.2f}%" for b in r["bands"]],
              fmt(r.get("importance_uniform_ess"), "{:.0%}")] for r in payload["rows"]]
    return md_table(["Recipe", *bands, "Importance-weighted uniform t: effective batch"], lines,
                    ["---"] + ["---:"] * (len(bands) + 1))


MP_BLOCK = "benchmarks/results/mp_block.json"


@table("mp-block", MP_BLOCK, missing="`python benchmarks/mp_block.py --out benchmarks/results/mp_block.json` writes it.")
def mp_block() -> str:
    payload = load(MP_BLOCK)
    lines = [[f"`{r['net']}`", str(r["threads"]), r["mode"], f"{1e3 * r['unet']['wall_s']:.0f}",
              f"{1e3 * r['resblocks']['wall_s']:.0f}", f"{1e3 * r['mp_blocks']['wall_s']:.0f}",
              f"{r['resblocks']['wall_s'] / r['mp_blocks']['wall_s']:.2f}x",
              f"{r['resblocks']['cpu_s'] / r['mp_blocks']['cpu_s']:.2f}x"] for r in payload["rows"]]
    text = md_table(["U-Net", "Threads", "Mode", "Whole U-Net fwd+bwd (ms)", "Its ResBlocks (ms)", "MP blocks (ms)",
                     "ResBlocks / MP blocks (wall)", "(CPU time)"], lines, ["---"] * 3 + ["---:"] * 5)
    load_avg = [payload.get("load_average_before") or [None], payload.get("load_average_after") or [None]]
    text += (f"\nBatch {payload['batch']}, median of {payload['repeats']} repeats of the median of {payload['iters']} "
             f"finely interleaved iterations; 1-minute load average {fmt(load_avg[0][0], '{:.1f}')} at the start and "
             f"{fmt(load_avg[1][0], '{:.1f}')} at the end (the benchmark's own threads count), on "
             f"{payload['default_threads']} cores.\n")
    for threads, per_net in payload["decision"].items():
        for net, d in per_net.items():
            w, c = d["wall_s"], d["cpu_s"]
            text += (f"\n- `{net}`, {threads} thread(s): ResBlocks are {w['resblock_share_of_unet_step']:.0%} of the "
                     f"{payload['recipe_mode']} U-Net step; the MP blocks at their fastest ({w['best_mp_mode']}) run "
                     f"{w['block_speedup']:.2f}x the {payload['recipe_mode']} ResBlocks, so the MP network's step is at "
                     f"most {w['network_speedup_bound']:.2f}x faster (by CPU time {c['network_speedup_bound']:.2f}x; "
                     f"gate {d['gate']}x).")
    return text + "\n"


# ----------------------------------------------------------------------------- derived files beside results


def derived_files() -> dict[str, Callable[[], str]]:
    """Markdown files the benchmark scripts render from their JSON: path -> what the script renders now."""
    out: dict[str, Callable[[], str]] = {}
    for path in PEERS_TABLES.values():
        if (ROOT / path).with_suffix(".md").is_file():
            out[str(Path(path).with_suffix(".md"))] = lambda p=path: _bench_module("peers").markdown(load(p))
    if (ROOT / RESTORATION / "results.md").is_file():
        out[f"{RESTORATION}/results.md"] = lambda: _bench_module("restoration").render(ROOT / RESTORATION) + "\n"
    for folder in sorted((ROOT / "benchmarks/results/text").glob("*/")):
        if (folder / "table.md").is_file():
            out[str((folder / "table.md").relative_to(ROOT))] = lambda f=folder: _bench_module("text").render_table(f)
    return out


# ----------------------------------------------------------------------------- the documents


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render_document(path: Path, problems: list[str]) -> str:
    """The document with every marked table rendered; unknown names and wrong file lists go into `problems`."""
    text = path.read_text()
    rel = path.relative_to(ROOT)

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            problems.append(f"{rel}: unknown table {name!r} (known: {', '.join(sorted(TABLES))})")
            return match[0]
        files = tuple(f.strip() for f in match["files"].split(","))
        if files != TABLES[name][0]:
            problems.append(f"{rel}: table {name!r} names {', '.join(files)}; it is rendered from "
                            f"{', '.join(TABLES[name][0])}")
            return match[0]
        head = match[0][: match.start("body") - match.start()]
        return head + render(name, path.parent) + "<!-- end table -->"

    return MARKER.sub(replace, text)


def used_tables() -> set[str]:
    return {m["name"] for doc in documents() for m in MARKER.finditer(doc.read_text())}


def check_all() -> tuple[list[tuple[str, str, str]], list[str]]:
    """Every document and derived file rendered: (path, committed text, rendered text) of those that differ,
    and the problems found (unknown tables, wrong file lists, tables no document uses)."""
    problems: list[str] = []
    changed: list[tuple[str, str, str]] = []
    for doc in documents():
        old = doc.read_text()
        new = render_document(doc, problems)
        if new != old:
            changed.append((str(doc.relative_to(ROOT)), old, new))
    for rel, render_fn in derived_files().items():
        old = (ROOT / rel).read_text()
        new = render_fn()
        if new != old:
            changed.append((rel, old, new))
    unused = sorted(set(TABLES) - used_tables())
    if unused:
        problems.append(f"tables registered but in no document: {', '.join(unused)}")
    return changed, problems


def diff(changed: list[tuple[str, str, str]]) -> str:
    """A unified diff of each changed file: committed against rendered."""
    return "".join("".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{rel} (committed)",
                                                f"{rel} (rendered from its files)")) for rel, old, new in changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff when a table differs")
    args = parser.parse_args(argv)
    changed, problems = check_all()
    for problem in problems:
        print(f"render_docs: {problem}", file=sys.stderr)
    if args.check:
        sys.stdout.write(diff(changed))
        if changed:
            print(f"render_docs: {len(changed)} file(s) differ from their result files; run "
                  f"`python tools/render_docs.py` and commit", file=sys.stderr)
        return 1 if changed or problems else 0
    for rel, _, new in changed:
        (ROOT / rel).write_text(new)
        print(f"rendered {rel}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
