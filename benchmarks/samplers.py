"""FID against the number of model evaluations (NFE) for every sampler and step grid, and the DDIM step sweep.

    # FID at NFE 5, 8, 10, 15, 20, 25, 50 for every sampler:
    python benchmarks/samplers.py nfe runs/fashion-30min --num 2000 --out benchmarks/results/samplers/fashion-30min
    # DDIM 10-200 steps, plain, with a sigma floor and with epsilon scaling (+ DDPM-1000):
    python benchmarks/samplers.py steps runs/fashion-30min --num 2000 --ddpm \
        --floor-timesteps 99 --eps-scalings 1.005 1.01 [--eps-steps 50 200] [--combine] \
        --out benchmarks/results/samplers/fashion-30min

Each point is one `lddpm.evaluate.evaluate_checkpoint` run (the same protocol as `lddpm eval RUN --num N
--reference DATASET:test --ref-num N --bf16 auto`: N images against N test images, classes balanced for a
class-conditional run), written as the tool's full JSON under OUT/nfe/ or OUT/steps/ (a finished point is not
recomputed; an interrupted one resumes from its partial samples, which are deleted once the point is written,
`--keep-samples` keeps them). The script then writes OUT/<mode>.json (every
point's full result, the real-data floor, the environment, the lddpm commit and the command), OUT/<mode>.md
(the table, rendered from those files) and OUT/<mode>.png (the plot).

NFE to steps: one evaluation per step, Heun 2 per step but the last (steps = (NFE + 1) // 2, so an even NFE
gets NFE - 1); the NFE each point really used (`cost.model_calls_per_batch`) is in its file and the table.
Configurations are SAMPLER:GRID (grid "time" = the run's trailing timesteps; karras; logsnr), optionally with
sampler options: `dpm++2m:logsnr,sigma_min=0.1694@10` (the sigma floor of the DDIM sweep on a logSNR grid).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import environment, write_json  # noqa: E402

from lddpm.evaluate import evaluate_checkpoint, load_extractor, real_data_floor, reference_stats  # noqa: E402
from lddpm.evaluate.score import summary_line, write_result  # noqa: E402
from lddpm.pipeline import load_pipeline  # noqa: E402
from lddpm.sampling import SAMPLERS  # noqa: E402

NFES = (5, 8, 10, 15, 20, 25, 50)
# every sampler on its default grid, and on the grid where the choice matters (the run's own timesteps)
CONFIGS = ("ddim:time", "dpm++2m:time", "dpm++2m:karras", "dpm++2m:logsnr", "euler:karras", "heun:karras",
           "heun:time", "dpm++3m:logsnr", "dpm++3m:time", "dpm++2m-sde:logsnr", "unipc:logsnr", "unipc:time",
           "ipndm:karras", "ipndm:time")
DDIM_STEPS = (10, 20, 50, 100, 200)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps that spend at most `nfe` evaluations (Heun: 2 per step but the last)."""
    return (nfe + 1) // 2 if SAMPLERS[sampler].evaluations_per_step == 2 else nfe


def git_commit() -> str | None:
    """The lddpm checkout's commit (with '+dirty' when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _point(text: str) -> tuple[str, int]:
    """--points' SAMPLER:GRID@NFE as (config, nfe)."""
    config, at, nfe = text.rpartition("@")
    if not at or not nfe.isdigit():
        raise argparse.ArgumentTypeError(f"--points takes SAMPLER:GRID@NFE, got {text!r}")
    return config, int(nfe)


def _config_parts(config: str) -> tuple[str, str, dict]:
    """SAMPLER[:GRID][,OPTION=NUMBER...] (e.g. dpm++2m:logsnr,sigma_min=0.1694) as (sampler, grid, options)."""
    head, *pairs = config.split(",")
    sampler, _, grid = head.partition(":")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        try:
            options[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{config!r}: sampler options are OPTION=NUMBER, got {pair!r}") from None
    return sampler, grid or "time", options


def _point_name(sampler: str, steps: int, options: dict) -> str:
    parts = [sampler, f"k{steps}"] + [f"{k}{v:.4g}" if isinstance(v, (int, float)) else f"{k}-{v}"
                                      for k, v in options.items()]
    return "-".join(parts)


class Bench:
    """The run's pipeline, the feature network, the reference statistics and the floor, loaded once."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.pipeline = load_pipeline(args.run, device=args.device, bf16=args.bf16)
        self.dataset = self.pipeline.dataset
        self.extractor = load_extractor(None, None, batch_size=args.batch_size, device=args.device,
                                        cache_dir=args.cache_dir)
        self.reference = reference_stats(self.dataset, split="test", num=args.num, resolution=self.pipeline.resolution,
                                         extractor=self.extractor, cache_dir=args.cache_dir, progress=False)
        floor_path = self.out / "floor.json"
        if not floor_path.is_file():
            floor = real_data_floor(self.dataset, reference=self.reference, split="train", num=args.num,
                                    resolution=self.pipeline.resolution, extractor=self.extractor,
                                    cache_dir=args.cache_dir, progress=False)
            write_result(floor, floor_path)
        self.floor = json.loads(floor_path.read_text())

    def point(self, folder: str, sampler: str, steps: int, options: dict) -> dict:
        """One evaluation (reused when its file exists)."""
        path = self.out / folder / f"{_point_name(sampler, steps, options)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        start = time.time()
        result = evaluate_checkpoint(
            self.args.run, num=self.args.num, sampler=sampler, num_steps=steps, reference=self.reference,
            labels="balanced" if self.pipeline.num_classes else "none", batch_size=self.args.batch_size,
            seed=self.args.seed, device=self.args.device, partial_dir=path.with_suffix(".samples"),
            extractor=self.extractor, classifier=self.args.classifier, cache_dir=self.args.cache_dir,
            pipeline=self.pipeline, progress=False, sampler_options=options or None)
        write_result(result, path)
        if not self.args.keep_samples:
            shutil.rmtree(path.with_suffix(".samples"), ignore_errors=True)
        print(f"{path.stem}: {summary_line(result)} ({time.time() - start:.0f} s)", flush=True)
        return result


def _entry(result: dict, **fields) -> dict:
    cost = result.get("cost") or {}
    return {**fields, "nfe": cost.get("model_calls_per_batch") or cost.get("nfe_expected"), "fid": result["fid"],
            "kid": result.get("kid"), "kid_std": result.get("kid_std"), "result": result}


def run_nfe(bench: Bench, args: argparse.Namespace) -> dict:
    points = []
    for config, nfe in args.points or [(c, n) for c in args.configs for n in args.nfes]:
        sampler, grid, extra = _config_parts(config)
        steps = steps_for_nfe(sampler, nfe)
        options = {} if grid == "time" and SAMPLERS[sampler].default_grid is None else {"grid": grid}
        options.update(extra)
        result = bench.point("nfe", sampler, steps, options)
        points.append(_entry(result, config=config, sampler=sampler, grid=grid, steps=steps, nfe_target=nfe))
    return {"points": points}


def run_steps(bench: Bench, args: argparse.Namespace) -> dict:
    sigmas = bench.pipeline.diffusion.schedule.sigmas
    args.sigma_mins = [float(sigmas[t]) for t in args.floor_timesteps] + list(args.sigma_mins)
    eps_steps = args.eps_steps or args.steps
    variants = [("ddim", {}, args.steps)] + [("ddim", {"sigma_min": s}, args.steps) for s in args.sigma_mins] + \
        [("ddim", {"eps_scaling": e}, eps_steps) for e in args.eps_scalings]
    if args.combine:
        variants += [("ddim", {"sigma_min": s, "eps_scaling": e}, eps_steps) for s in args.sigma_mins
                     for e in args.eps_scalings]
    points = []
    for sampler, options, step_counts in variants:
        for steps in step_counts:
            result = bench.point("steps", sampler, steps, options)
            points.append(_entry(result, sampler=sampler, steps=steps, options=options,
                                 variant=_variant_label(sampler, options)))
    if args.ddpm:
        T = bench.pipeline.diffusion.num_timesteps
        points.append(_entry(bench.point("steps", "ddpm", T, {}), sampler="ddpm", steps=T, options={},
                             variant="ddpm"))
    return {"points": points}


def _variant_label(sampler: str, options: dict) -> str:
    return sampler + "".join(f", {k}={v:.4g}" for k, v in options.items())


def render_table(mode: str, data: dict) -> str:
    """The Markdown table of one mode, from the collected points (FID, with the NFE actually used)."""
    points, floor = data["points"], data["floor"]
    n = points[0]["result"]["num_images"] if points else 0
    if mode == "nfe":
        cols = sorted({p["nfe_target"] for p in points})
        head = ["sampler:grid"] + [f"NFE {c}" for c in cols]
        rows = {}
        for p in points:
            real = f" ({p['nfe']:g})" if p["nfe"] is not None and p["nfe"] != p["nfe_target"] else ""
            rows.setdefault(p["config"], {})[p["nfe_target"]] = f"{p['fid']:.2f}{real}"
    else:
        cols = sorted({p["steps"] for p in points if p["sampler"] == "ddim"})
        head = ["variant"] + [f"{c} steps" for c in cols]
        rows = {}
        for p in points:
            if p["sampler"] == "ddpm":
                rows.setdefault("ddpm", {})[cols[0] if cols else p["steps"]] = f"{p['fid']:.2f} ({p['steps']} steps)"
                continue
            real = f" ({p['nfe']:g})" if p["nfe"] is not None and p["nfe"] != p["steps"] else ""
            rows.setdefault(p["variant"], {})[p["steps"]] = f"{p['fid']:.2f}{real}"
    lines = [f"FID (N = {n} against {n} test images; real-data floor {floor['fid']:.2f}); in brackets the NFE "
             "actually spent where it differs from the column", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cells in rows.items():
        lines.append("| " + " | ".join([name] + [cells.get(c, "") for c in cols]) + " |")
    return "\n".join(lines) + "\n"


def plot(mode: str, data: dict, path: Path) -> None:
    """FID against NFE (one line per sampler:grid) or against DDIM steps (one line per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, x = ("config", "nfe") if mode == "nfe" else ("variant", "steps")
    lines: dict[str, list] = {}
    for p in data["points"]:
        if p.get(x) is not None and p["sampler"] != "ddpm":
            lines.setdefault(p[key], []).append((p[x], p["fid"]))
    fig, ax = plt.subplots(figsize=(7 + 2.5 * (len(lines) > 6), 4.5))
    colours = plt.get_cmap("tab10").colors
    if len(lines) > 10:  # tab20's strong colours first, then their light partners
        colours = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]
    for i, (name, pts) in enumerate(lines.items()):  # a distinct colour and marker per line, even past ten
        pts.sort()
        ax.plot([a for a, _ in pts], [b for _, b in pts], "osD^v<>p"[i % 8] + "-", label=name, ms=4,
                color=colours[i % len(colours)])
    ax.axhline(data["floor"]["fid"], color="grey", ls="--", lw=1, label="real-data floor")
    ax.set_xscale("log")
    xs = sorted({p.get("nfe_target") or p[x] for p in data["points"] if p.get(x) is not None and p["sampler"] != "ddpm"})
    ax.set_xticks(xs, [f"{a:g}" for a in xs])
    ax.minorticks_off()
    if mode == "nfe":  # a few-step point can be many times the rest: log FID keeps the good samplers apart
        ax.set_yscale("log")
        fids = [b for pts in lines.values() for _, b in pts] + [data["floor"]["fid"]]
        ys = [y for y in (10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300, 400, 600, 1000)
              if min(fids) * 0.9 <= y <= max(fids) * 1.1]
        ax.set_yticks(ys, [f"{y:g}" for y in ys])
        ax.minorticks_off()
    ax.set_xlabel("model evaluations (NFE)" if mode == "nfe" else "DDIM steps")
    ax.set_ylabel(f"FID (N = {data['points'][0]['result']['num_images']})" if data["points"] else "FID")
    ax.set_title("FID against NFE" if mode == "nfe" else "FID against DDIM steps")
    ax.grid(alpha=0.3)
    if len(lines) > 6:  # many lines: the legend beside the plot, where it covers none of them
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("nfe", "steps"), help="nfe: every sampler at NFE 5-50; steps: the DDIM sweep")
    parser.add_argument("run", help="run folder or checkpoint")
    parser.add_argument("--num", type=int, default=2000, help="images per point (and test images in the reference)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--nfes", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="SAMPLER:GRID for the nfe mode")
    parser.add_argument("--points", nargs="+", type=_point, default=None, metavar="SAMPLER:GRID[,OPT=X]@NFE",
                        help="nfe mode: only these points (e.g. unipc:logsnr@10), instead of every config at every NFE")
    parser.add_argument("--steps", type=int, nargs="+", default=list(DDIM_STEPS), help="DDIM steps for the steps mode")
    parser.add_argument("--floor-timesteps", type=int, nargs="*", default=[99],
                        help="sigma floors for the DDIM sweep, as timesteps t: sigma_min = sigma(t) of the run's "
                             "schedule (99: the lowest timestep 10-step trailing DDIM visits)")
    parser.add_argument("--sigma-mins", type=float, nargs="*", default=[], help="more sigma floors, as sigmas")
    parser.add_argument("--eps-scalings", type=float, nargs="*", default=[1.005],
                        help="constant epsilon scalings for the DDIM sweep")
    parser.add_argument("--eps-steps", type=int, nargs="+", default=None,
                        help="the step counts of the epsilon-scaling variants (default: --steps)")
    parser.add_argument("--combine", action="store_true",
                        help="also every sigma floor together with every epsilon scaling")
    parser.add_argument("--ddpm", action="store_true", help="steps mode: also DDPM over all T steps")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-samples", action="store_true", help="keep each point's sample images (OUT/*/*.samples)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", default="auto", help="the network under bf16 autocast: true, false or auto")
    parser.add_argument("--classifier", default="auto", help="classifier folder for class accuracy (auto / none)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    args.bf16 = {"true": True, "false": False}.get(args.bf16, args.bf16)
    for config in args.configs + [config for config, _ in args.points or []]:
        try:
            sampler, _, options = _config_parts(config)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
        if sampler not in SAMPLERS:
            parser.error(f"unknown sampler in {config!r}; choose from {', '.join(SAMPLERS)}")
        if set(options) - set(SAMPLERS[sampler].options):
            parser.error(f"{config!r}: {sampler} takes the options {', '.join(SAMPLERS[sampler].options)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bench = Bench(args)
    data = run_nfe(bench, args) if args.mode == "nfe" else run_steps(bench, args)
    data = {"benchmark": f"samplers-{args.mode}", "run": str(args.run), "command": " ".join(sys.argv),
            "argv": sys.argv[1:] if argv is None else argv, "commit": git_commit(), "environment": environment(),
            "seconds": time.time() - started, "floor": bench.floor, **data}
    write_json(data, out / f"{args.mode}.json")
    table = render_table(args.mode, data)
    (out / f"{args.mode}.md").write_text(table)
    plot(args.mode, data, out / f"{args.mode}.png")
    print(table)
    return data


if __name__ == "__main__":
    main()
