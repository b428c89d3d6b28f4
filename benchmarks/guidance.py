"""FID / KID / class accuracy of a class-conditional run against the guidance scale: classifier-free guidance and
autoguidance, each with and without the guidance interval.

    python benchmarks/guidance.py runs/fashion-30min --guide runs/fashion-guide --num 2000 \\
        --out benchmarks/results/guidance/fashion-30min

One `lddpm.evaluate.evaluate_checkpoint` per row, all with one `SamplingSpec` shape and one `Scorer` (the pinned
Inception network, the reference statistics, the study classifier): the unguided baseline; CFG at each of
`--cfg-scales` (D = D_u + s (D_c - D_u)); autoguidance at each of `--guide-scales` with the `--guide` network
(D = D_g + w (D_c - D_g), Karras et al. 2024); each guided row again with guidance only for sigma in
`--interval` (Kynkaanniemi et al. 2024; one unguided conditional evaluation elsewhere, so fewer network
evaluations; `--interval-only` runs only these and the baseline); and `--both S:W` rows
(D = D_c + (s - 1)(D_c - D_u) + (w - 1)(D_c - D_g)). Every row's full `lddpm eval` JSON is written as
`<out>/<row>.json` (a finished row is skipped on the next run, so the script resumes); `guidance.json` collects
the rows with the settings and the environment, `table.md` is rendered from the row files, and `--floor` adds
the real-data floor (N real train images against the same reference). The sample batches are kept under
`<out>/samples/` while a row runs (resumable) and removed when it is done (`--keep-samples` keeps them); they are
not results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import environment, write_json

from lddpm.commands.sampler_flags import add_sampler_flags, sampler_options
from lddpm.data import test_split
from lddpm.evaluate import Scorer, evaluate_checkpoint, real_data_floor
from lddpm.evaluate.score import summary_line, write_result
from lddpm.guidance import interval_json
from lddpm.pipeline import load_pipeline
from lddpm.sampling import SamplingSpec

ROW_KEYS = ("fid", "kid", "kid_std", "class_accuracy", "classifier_score", "precision", "recall")


def rows_to_run(args) -> list[dict]:
    """(name, cfg scale, guide scale, interval or None) of every row, the baseline first."""
    interval = tuple(args.interval) if args.interval else None
    rows = [{"name": "none", "mode": "none", "guidance_scale": 1.0, "guide_scale": 1.0, "interval": None}]
    for s in args.cfg_scales:
        if s != 1.0:
            rows.append({"name": f"cfg-s{s:g}", "mode": "cfg", "guidance_scale": s, "guide_scale": 1.0, "interval": None})
    if args.guide:
        for w in args.guide_scales:
            if w != 1.0:
                rows.append({"name": f"ag-w{w:g}", "mode": "autoguidance", "guidance_scale": 1.0, "guide_scale": w,
                             "interval": None})
        for pair in args.both:
            s, w = (float(v) for v in pair.split(":"))
            rows.append({"name": f"both-s{s:g}-w{w:g}", "mode": "both", "guidance_scale": s, "guide_scale": w,
                         "interval": None})
    if interval is not None:
        rows += [{**r, "name": r["name"] + "-interval", "interval": interval} for r in rows if r["mode"] != "none"]
        if args.interval_only:
            rows = [r for r in rows if r["mode"] == "none" or r["interval"] is not None]
    return rows


def render_table(out: Path, rows: list[dict], floor: dict | None) -> str:
    """Markdown table of the rows' files (in the order run), with the real-data floor when measured."""
    head = ["row", "CFG s", "guide w", "interval (sigma)", "FID", "KID x10^3", "class acc.", "NFE / image",
            "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        path = out / f"{r['name']}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        cost = res.get("cost") or {}
        interval = "[{:g}, {:g}]".format(*r["interval"]) if r["interval"] else "all"
        kid = f"{res['kid'] * 1e3:.2f} ± {res['kid_std'] * 1e3:.2f}" if res.get("kid") is not None else ""
        acc = f"{res['class_accuracy']:.3f}" if res.get("class_accuracy") is not None else ""
        nfe = f"{cost['nfe']:g}" if cost.get("nfe") is not None else ""
        spi = f"{cost['seconds_per_image']:.3f}" if cost.get("seconds_per_image") else ""
        lines.append(f"| {r['name']} | {r['guidance_scale']:g} | {r['guide_scale']:g} | {interval} | {res['fid']:.2f} "
                     f"| {kid} | {acc} | {nfe} | {spi} |")
    if floor:
        lines.append(f"| real {floor['split']} images (floor) |  |  |  | {floor['fid']:.2f} | "
                     f"{floor['kid'] * 1e3:.2f} |  |  |  |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the class-conditional run (folder or checkpoint)")
    parser.add_argument("--guide", default=None, help="autoguidance's guide: a run folder or checkpoint file")
    parser.add_argument("--num", type=int, default=2000, help="images per row (default 2000)")
    parser.add_argument("--reference", default="fashion-mnist:test", help="FID reference DATASET:SPLIT")
    parser.add_argument("--ref-num", type=int, default=None, help="reference images (default: --num; 0: the split)")
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, default=25)
    add_sampler_flags(parser)
    parser.add_argument("--cfg-scales", type=float, nargs="*", default=[1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--guide-scales", type=float, nargs="*", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--both", nargs="*", default=[], metavar="S:W", help="CFG and autoguidance together")
    parser.add_argument("--interval", type=float, nargs=2, default=[0.28, 5.42], metavar=("SIGMA_LO", "SIGMA_HI"),
                        help="guidance interval of the interval rows (default 0.28 5.42; SIGMA_HI inf: no upper bound)")
    parser.add_argument("--no-interval", action="store_true", help="no interval rows")
    parser.add_argument("--interval-only", action="store_true",
                        help="guided rows only with the interval (skips the every-step rows; the baseline stays)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--bf16", default="auto", help="true, false or auto (the network under bf16 autocast)")
    parser.add_argument("--no-ema", action="store_true", help="the run's raw weights instead of its EMA (the guide "
                        "keeps its EMA)")
    parser.add_argument("--classifier", default="auto", help="classifier folder, auto or none")
    parser.add_argument("--feature-backend", default="auto")
    parser.add_argument("--inception", default=None, help="FID feature network file (default: the pinned Inception)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--floor", action="store_true", help="also score N real train images (the real-data floor)")
    parser.add_argument("--keep-samples", action="store_true")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    if args.no_interval and args.interval_only:
        parser.error("--no-interval and --interval-only exclude each other: drop one")
    if args.no_interval:
        args.interval = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = {"true": True, "false": False}.get(args.bf16, args.bf16)
    pipeline = load_pipeline(args.run, device=args.device, bf16=bf16, guide=args.guide, use_ema=not args.no_ema)
    scorer = Scorer(reference=args.reference, ref_num=args.ref_num, classifier=args.classifier,
                    inception=args.inception, feature_backend=args.feature_backend, batch_size=min(args.batch_size, 100), device=args.device,
                    cache_dir=args.cache_dir, data_root=args.data_root, progress=False)
    rows = rows_to_run(args)
    for row in rows:
        path = out / f"{row['name']}.json"
        if path.is_file():
            continue
        spec = SamplingSpec(sampler=args.sampler, num_steps=args.steps, guidance_scale=row["guidance_scale"],
                            guide=args.guide if row["guide_scale"] != 1.0 else None, guide_scale=row["guide_scale"],
                            guidance_interval=row["interval"], seed=args.seed, batch_size=args.batch_size, bf16=bf16,
                            sampler_options=sampler_options(args) or None)
        samples = out / "samples" / row["name"]
        result = evaluate_checkpoint(args.run, spec, scorer, num=args.num, pipeline=pipeline, partial_dir=samples,
                                     device=args.device, progress=False)
        write_result(result, path)
        if not args.keep_samples:
            shutil.rmtree(samples, ignore_errors=True)
        print(f"{row['name']}: {summary_line(result)}", flush=True)
    if not args.keep_samples and (out / "samples").is_dir() and not any((out / "samples").iterdir()):
        (out / "samples").rmdir()
    floor = None
    if args.floor:
        floor_path = out / "floor.json"
        if not floor_path.is_file():
            dataset, split = args.reference.split(":")
            other = "train" if split != "train" else test_split(dataset)
            write_result(real_data_floor(dataset, reference=scorer.reference_for(dataset, pipeline.resolution, args.num),
                                         split=other, num=args.num, resolution=pipeline.resolution,
                                         extractor=scorer.extractor, cache_dir=args.cache_dir, data_root=args.data_root,
                                         progress=False), floor_path)
        floor = json.loads(floor_path.read_text())
    collected = []
    for row in rows:
        res = json.loads((out / f"{row['name']}.json").read_text())
        cost = res.get("cost") or {}
        collected.append({**row, "interval": interval_json(row["interval"]),
                          "file": f"{row['name']}.json", **{k: res.get(k) for k in ROW_KEYS},
                          **{k: cost.get(k) for k in ("nfe", "network_evaluations_per_image",
                                                      "guide_evaluations_per_image", "seconds_per_image")}})
    summary = {
        "benchmark": "guidance", "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "environment": environment(),
        "run": str(args.run), "checkpoint": pipeline.checkpoint, "guide": args.guide,
        "guide_checkpoint": pipeline.guide_checkpoint,
        "settings": {**{k: getattr(args, k) for k in ("num", "reference", "ref_num", "sampler", "steps", "seed",
                                                      "batch_size", "bf16", "device", "no_ema")},
                     "interval": interval_json(args.interval)},   # null upper bound: none (JSON has no inf)
        "sampler_options": sampler_options(args),
        "rows": collected, "floor": floor,
    }
    write_json(summary, out / "guidance.json")
    table = render_table(out, rows, floor)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
