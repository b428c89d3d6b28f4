"""Where the loss weight goes: the recipe against EDM's log-normal noise levels and a larger
min-SNR gamma at 10 and 30 training minutes, FID at N = 2,000, with the loss weight per sigma band beside it, and
the post-hoc EMA length swept after training.

1. Runs the study (default: the packaged `study-edm.toml`) with `lddpm study` into OUT/study (resumable: finished
   runs and cells are reused).
2. For the runs named by --ema-runs, reconstructs the post-hoc EMA of each width in --ema-widths at each scored
   step (`lddpm ema`) and scores it with `lddpm eval` under the study's settings (same N, sampler, seeds,
   reference), into OUT/ema/ (also resumable).
3. Writes OUT/ablation.json (every number, the band shares from each run's loss_weights.json, the commands),
   OUT/ablation.md (tables) and OUT/ablation.png (loss weight per sigma band beside FID; FID against sigma_rel).

    python benchmarks/edm_ablation.py --out benchmarks/results/edm-ablation
    python benchmarks/edm_ablation.py --out benchmarks/results/edm-ablation --only recipe-s0-at1400 edm12-s0-at1400
    python benchmarks/edm_ablation.py --out /tmp/edm-smoke --smoke          # the whole path at a tiny size (~3 min)

--smoke shrinks everything (a ~10k-parameter U-Net, 8 steps of batch 8, N = 50, two runs, two widths) to check the
driver end to end; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lddpm.config import read_toml, to_toml
from lddpm.study import load_study

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO / "src" / "lddpm" / "configs" / "study-edm.toml"
STEPS_PER_MINUTE = 4200 / 30  # fashion-30min: 30 minutes fixed as 4,200 steps (docs/recipe.md)
RECIPE_BATCH = 64  # the batch of those 4,200 steps: a row of another batch trains STEPS_PER_MINUTE * 64 / batch
SEED_SUFFIX = re.compile(r"-s(\d+)$")


def lddpm(*args: str) -> list[str]:
    return [sys.executable, "-m", "lddpm", *args]


def run(command: list[str], fatal: bool = True) -> int:
    print("[edm-ablation] " + " ".join(command), flush=True)
    code = subprocess.call(command)
    if code and fatal:
        raise SystemExit(f"`{' '.join(command)}` exited with status {code}")
    return code


def smoke_study(source: Path, out: Path) -> Path:
    """A tiny copy of the study file: two runs, 8 steps of a ~10k-parameter U-Net, N = 50."""
    data = read_toml(source, "study file")
    keep = [name for name in data["runs"] if name in ("recipe-s0", "edm12-s0")] or list(data["runs"])[:2]
    data["runs"] = {name: data["runs"][name] for name in keep}
    for spec in data["runs"].values():
        spec["steps"] = 8
        spec["set"] = [s for s in spec["set"] if not s.startswith(("run.checkpoint_every", "optim.posthoc_every"))] + [
            "model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[16], norm_groups=4}",
            "optim.batch_size=8", "run.checkpoint_every=4", "optim.posthoc_every=2", "run.bf16=false"]
    # a private classifier: a 0.05-epoch one must not become the shared default that real studies reuse
    data["study"].update(fid_n=50, reference_n=50, sample_batch_size=50, classifier_epochs=0.05, bf16=False,
                         classifier=str((out / "classifier").resolve()))
    cells = []
    for cell in data["cells"]:
        cell["run"] = [r for r in cell["run"] if r in keep] if isinstance(cell["run"], list) else cell["run"]
        if "at_step" in cell:
            cell["at_step"] = [4, 8]
        cell["steps"] = min(cell.get("steps", 5), 5)
        if cell["run"]:
            cells.append(cell)
    data["cells"] = cells
    path = out / "study-smoke.toml"
    out.mkdir(parents=True, exist_ok=True)
    text = to_toml({"study": data["study"]})
    for name, spec in data["runs"].items():
        text += f"[runs.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in spec.items()) + "\n"
    for cell in data["cells"]:
        text += "[[cells]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cell.items()) + "\n"
    path.write_text(text)
    return path


def ema_sweep(study, study_dir: Path, out: Path, runs: list[str], widths: list[float], steps: list[int],
              compute: set[int], earlier: list[dict] = ()) -> list[dict]:
    """Reconstruct and score each (run, step, width) for the steps in `compute`; return one record per finished
    evaluation at any of `steps` (resumable by file). A finished evaluation is reported even where the run's
    snapshots and the reconstructed weights are gone (neither is committed): its profile error then comes from
    the `earlier` report's record of the same (run, step, width)."""
    from lddpm.checkpoint import load_checkpoint

    s = study.settings
    sample_cell = next(c for c in study.cells if c.at_step is not None)
    known = {(r["run"], r["at_step"], r["sigma_rel"]): r for r in earlier}
    records = []
    # an earlier report's evaluations stay reported whatever this call's --ema-runs / --ema-widths say
    runs = list(dict.fromkeys([*runs, *(r["run"] for r in earlier)]))
    for name in runs:
        run_dir = study_dir / "runs" / name
        snapshots = (run_dir / "ema_snapshots").is_dir()
        if not snapshots:
            print(f"[edm-ablation] {name}: no snapshots (not trained yet, or not on this machine); "
                  "reporting only its finished evaluations", flush=True)
        run_widths = sorted({*widths, *(w for (r, _, w) in known if r == name)})
        for step in steps:
            for width in run_widths:
                ckpt = out / name / f"ema-{width:.3f}-step_{step:07d}.safetensors"
                result = out / name / f"eval-{width:.3f}-step_{step:07d}.json"
                if not result.is_file() and (step not in compute or not snapshots):
                    continue
                if not result.is_file():
                    if not ckpt.is_file():
                        run(lddpm("ema", str(run_dir), "--sigma-rel", str(width), "--at-step", str(step),
                                  "--out", str(ckpt)))
                    command = ["eval", str(ckpt), "--num", str(s.fid_n), "--sampler", sample_cell.sampler,
                               "--steps", str(sample_cell.steps), "--reference", f"{s.dataset}:{s.reference_split}",
                               "--ref-num", str(s.reference_n), "--batch-size", str(s.sample_batch_size),
                               "--seed", str(s.seed), "--bf16", str(s.bf16).lower(), "--device", s.device,
                               "--out", str(result), "--quiet"]
                    command += ["--cache-dir", s.cache_dir] if s.cache_dir else []
                    command += ["--classifier", s.classifier] if s.classifier else []
                    command += ["--root", s.data_root] if s.data_root else []
                    run(lddpm(*command))
                scored = json.loads(result.read_text())
                info = (load_checkpoint(ckpt).meta["posthoc_ema"] if ckpt.is_file()
                        else known.get((name, step, width), {}))
                records.append({"run": name, "at_step": step, "sigma_rel": width, "fid": scored.get("fid"),
                                "kid": scored.get("kid"), "kid_std": scored.get("kid_std"),
                                "relative_profile_error": info.get("relative_profile_error"),
                                "eval_file": str(result.relative_to(out.parent))})
    return records


def band_shares(study_dir: Path, name: str, study) -> list[dict] | None:
    """A run's loss weight per sigma band: its loss_weights.json (the trainer's), else computed from its config."""
    logged = study_dir / "runs" / name / "loss_weights.json"
    if logged.is_file():
        return json.loads(logged.read_text())["bands"]
    from lddpm.diffusion import build_diffusion, loss_weight_shares

    return loss_weight_shares(build_diffusion(run_config(study_dir, name, study).diffusion))


def run_config(study_dir: Path, name: str, study):
    """The training config the study gives run `name` (its preset with the row's settings)."""
    from lddpm.study.backend import StudyBackend

    return StudyBackend(progress=False).run_config(study.runs[name], study_dir / "runs" / name, study, {})


def summarise(study, study_dir: Path, ema: list[dict]) -> dict:
    """Rows per run and step, grouped by variant (the run name without its -s<seed>), with band shares."""
    results = json.loads((study_dir / "results.json").read_text())
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    cells = {c.name: c for c in study.cells}
    table: dict[str, dict] = {}
    for name in study.runs:
        variant = SEED_SUFFIX.sub("", name)
        seed = int(SEED_SUFFIX.search(name).group(1)) if SEED_SUFFIX.search(name) else 0
        if variant not in table:  # the variant's first run: its settings, bands and batch (every seed shares them)
            table[variant] = {"variant": variant, "runs": [], "shares": band_shares(study_dir, name, study),
                              "settings": study.runs[name].set,
                              "batch_size": run_config(study_dir, name, study).optim.batch_size,
                              "fid": {}, "kid": {}, "other": {}}
        entry = table[variant]
        entry["runs"].append(name)
        for row in rows:
            cell = cells.get(row["name"])
            if cell is None or cell.run != name:
                continue
            if cell.at_step is not None:
                entry["fid"].setdefault(str(cell.at_step), {})[str(seed)] = row["fid"]
                entry["kid"].setdefault(str(cell.at_step), {})[str(seed)] = row["kid"]
            else:
                entry["other"].setdefault(f"{cell.sampler}-{cell.steps}", {})[str(seed)] = row["fid"]
    for entry in table.values():
        entry["fid_mean"] = {step: statistics.mean(v.values()) for step, v in entry["fid"].items() if v}
    floor = results.get("real_floor") or {}
    return {"variants": list(table.values()), "ema_sweep": ema, "real_floor": floor,
            "fid_n": study.settings.fid_n, "cells_ok": len(rows), "cells_total": len(results["rows"])}


def own_ema_fids(summary: dict) -> dict[tuple[str, int], float]:
    """(run, step) -> FID of the study cell that scored the run's own EMA at that step."""
    found = {}
    for v in summary["variants"]:
        for step, per_seed in v["fid"].items():
            for name in v["runs"]:
                seed = SEED_SUFFIX.search(name)
                key = seed.group(1) if seed else "0"
                if key in per_seed:
                    found[(name, int(step))] = per_seed[key]
    return found


def step_label(summary: dict, step: int) -> str:
    """'step S (~M min)': the minutes from the images seen (steps x batch) of the rows scored at that step, at the
    recipe's rate of 4,200 x 64 images in 30 minutes (rows of another batch take other step counts for the same time)."""
    batches = {v.get("batch_size", RECIPE_BATCH) for v in summary["variants"] if str(step) in v.get("fid_mean", {})}
    if len(batches) != 1:
        return f"step {step}"
    return f"step {step} (~{step * batches.pop() / (STEPS_PER_MINUTE * RECIPE_BATCH):.0f} min)"


def report_markdown(summary: dict, steps: list[int]) -> str:
    """The tables of ablation.md (also rendered into docs by tools/render_docs.py from ablation.json); a step
    column only where some variant was scored at that step."""
    steps = [s for s in steps if any(str(s) in v.get("fid_mean", {}) for v in summary["variants"])]
    bands = [b["band"] for b in next((v["shares"] for v in summary["variants"] if v["shares"]), [])]
    others = sorted({k for v in summary["variants"] for k in v["other"]})
    lines = [f"FID at N = {summary['fid_n']} with DPM-Solver++(2M) 25 steps unless a column says otherwise; one "
             "value per training seed; - = not run.", "",
             "| variant | runs | " + " | ".join(f"weight {b}" for b in bands) + " | "
             + " | ".join(f"FID at {step_label(summary, s)} | mean" for s in steps)
             + "".join(f" | FID {o}, last step" for o in others) + " |",
             "|---|---|" + "---:|" * len(bands) + "---|---:|" * len(steps) + "---|" * len(others)]
    for v in summary["variants"]:
        shares = " | ".join(f"{100 * b['share']:.1f}%" for b in v["shares"] or [])
        fids = " | ".join(
            (", ".join(f"{f:.2f}" for f in v["fid"].get(str(s), {}).values()) or "-") + " | "
            + (f"{v['fid_mean'][str(s)]:.2f}" if str(s) in v["fid_mean"] else "-") for s in steps)
        more = "".join(" | " + (", ".join(f"{f:.2f}" for f in v["other"].get(o, {}).values()) or "-") for o in others)
        lines.append(f"| {v['variant']} | {', '.join(v['runs'])} | {shares} | {fids}{more} |")
    own = own_ema_fids(summary)
    if summary["ema_sweep"]:
        lines += ["", "## Post-hoc EMA length (FID)", "",
                  "| run | step | sigma_rel | FID | KID x10^3 | profile error | the run's own EMA: FID |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in summary["ema_sweep"]:
            kid = f"{1e3 * r['kid']:.2f}" if r.get("kid") is not None else "-"
            err = f"{100 * r['relative_profile_error']:.2f}%" if r.get("relative_profile_error") is not None else "-"
            base = own.get((r["run"], r["at_step"]))
            lines.append(f"| {r['run']} | {r['at_step']} | {r['sigma_rel']:g} | {r['fid']:.2f} | {kid} | {err} | "
                         f"{'-' if base is None else f'{base:.2f}'} |")
    return "\n".join(lines) + "\n"


def write_report(summary: dict, out: Path, steps: list[int]) -> None:
    """ablation.md and ablation.png."""
    (out / "ablation.md").write_text(f"# Loss weight per sigma band and FID (N = {summary['fid_n']})\n\n"
                                     + report_markdown(summary, steps))
    bands = [b["band"] for b in next((v["shares"] for v in summary["variants"] if v["shares"]), [])]
    own = own_ema_fids(summary)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if summary["ema_sweep"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8))
    names = [v["variant"] for v in summary["variants"]]
    left = [0.0] * len(names)
    for i, band in enumerate(bands):
        widths = [100 * (v["shares"][i]["share"] if v["shares"] else 0.0) for v in summary["variants"]]
        axes[0].barh(names, widths, left=left, label=band)
        left = [a + b for a, b in zip(left, widths)]
    axes[0].set_xlabel("share of the loss weight (%)")
    axes[0].set_title("loss weight per sigma band")
    axes[0].legend(fontsize=7, loc="lower right")
    for j, s in enumerate(steps):
        for k, v in enumerate(summary["variants"]):
            fids = list(v["fid"].get(str(s), {}).values())
            axes[1].scatter([f for f in fids], [k + 0.15 * (j - 0.5)] * len(fids), marker="o" if j else "s",
                            color=f"C{j}", label=step_label(summary, s) if k == 0 else None)
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set_xlabel(f"FID (N = {summary['fid_n']}), one point per training seed")
    axes[1].set_title("FID")
    axes[1].legend(fontsize=7)
    if summary["ema_sweep"]:
        groups: dict[tuple, list] = {}
        for r in summary["ema_sweep"]:
            groups.setdefault((r["run"], r["at_step"]), []).append(r)
        for (name, step), recs in groups.items():
            recs.sort(key=lambda r: r["sigma_rel"])
            line = axes[2].plot([r["sigma_rel"] for r in recs], [r["fid"] for r in recs], marker="o",
                                label=f"{name} @{step}")[0]
            if own.get((name, step)) is not None:  # the run's own (warm-up) EMA, for comparison
                axes[2].axhline(own[(name, step)], color=line.get_color(), linestyle="--", linewidth=0.8)
        axes[2].set_xlabel("post-hoc EMA sigma_rel")
        axes[2].set_ylabel("FID")
        axes[2].set_title("EMA length (dashed: the run's own EMA)")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study file (default: study-edm.toml)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="+", metavar="CELL", help="run only these study cells (passed to lddpm study)")
    p.add_argument("--ema-runs", default="recipe-s0,edm12-s0,edm065-s0",
                   help="runs whose post-hoc EMA length is swept (comma-separated; empty: none)")
    p.add_argument("--ema-widths", default="0.03,0.05,0.07,0.09,0.12,0.16", help="sigma_rel values")
    p.add_argument("--ema-steps", default="", help="steps at which the EMA length is swept (comma-separated; "
                   "default: every step the study scores)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished work")
    p.add_argument("--smoke", action="store_true", help="the whole path at a tiny size (numbers mean nothing)")
    args = p.parse_args()
    start = time.perf_counter()
    out = args.out
    source = smoke_study(args.study, out) if args.smoke else args.study
    study = load_study(source)
    study_dir = out / "study"
    widths = [float(w) for w in args.ema_widths.split(",") if w]
    ema_runs = [r for r in args.ema_runs.split(",") if r and r in study.runs]
    if args.smoke:
        widths = widths[1:4:2]
        ema_runs = list(study.runs)[:1]
    steps = sorted({c.at_step for c in study.cells if c.at_step is not None})
    shown = source.resolve().relative_to(REPO) if source.resolve().is_relative_to(REPO) else source  # no machine path
    commands = [" ".join(["lddpm", "study", str(shown), "--out", str(study_dir)] + (["--only", *args.only] if args.only else []))]
    previous = out / "ablation.json"
    report = json.loads(previous.read_text()) if previous.is_file() else {}
    if report:  # a resumed ablation: keep the commands that measured the earlier cells
        earlier = report.get("commands", [])
        new = [] if args.report_only else [c for c in commands if c not in earlier]
        commands = earlier + new if earlier else commands
    if not args.report_only:
        if run(lddpm("study", str(source), "--out", str(study_dir), *(["--only", *args.only] if args.only else []),
                     *(["--quiet"] if args.smoke else [])), fatal=False):
            print("[edm-ablation] some study cells failed (see OUT/study/cells/*.error.txt); reporting the rest",
                  flush=True)
    ema_steps = {int(x) for x in args.ema_steps.split(",") if x} or set(steps)
    ema = ema_sweep(study, study_dir, out / "ema", ema_runs, widths, steps,
                    compute=set() if args.report_only else ema_steps, earlier=report.get("ema_sweep", []))
    summary = summarise(study, study_dir, ema)
    summary.update(benchmark="edm_ablation", study_file=str(shown), smoke=args.smoke, commands=commands,
                   ema_widths=widths, ema_runs=ema_runs, steps=steps, steps_per_minute=STEPS_PER_MINUTE,
                   seconds=time.perf_counter() - start, environment=environment())
    write_json(summary, out / "ablation.json")
    write_report(summary, out, steps)
    print((out / "ablation.md").read_text())


if __name__ == "__main__":
    main()
