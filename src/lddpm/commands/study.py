"""CLI commands `lddpm study CONFIG` (a grid of runs and cells) and `lddpm demo` (a small study)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    """Add `study` and `demo` to the `lddpm` parser."""
    p = subparsers.add_parser(
        "study",
        help="run a grid of training runs and evaluation cells; write a table, plots, grids and index.html",
        description="Run every cell of a study file (TOML) that is not finished yet, then write "
        "results.md/json/csv, plots/, grids/ and index.html into the output folder. Re-running "
        "skips finished cells and reuses finished training runs.",
    )
    p.add_argument("config", help="study TOML file, or a preset name: study-quick, study-cifar10, study-imagenet100, "
                   "demo, demo-text")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: study-<name>)")
    p.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells (the others are kept as they are)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the study file's, else auto)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per training run (DDP through torchrun, e.g. one per GPU); default: the study file's")
    p.add_argument("--data-root", default=None, help="dataset source folder, as for `lddpm prepare --root`")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $LDDPM_CACHE or ~/.cache/lddpm)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from finished cells; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_study)

    d = subparsers.add_parser(
        "demo",
        help="a short demo on Fashion-MNIST (about 15 minutes on 2 CPU cores): train, sample, score, report "
        "(--config demo-text: text-to-image on the fashion-pairs scenes)",
        description="Prepare Fashion-MNIST at 32x32, train a small class-conditional U-Net, sample with "
        "DDPM, DDIM and classifier-free guidance, score the samples (FID, classifier score, class "
        "accuracy) and write a table, sample grids and index.html. With --config demo-text: render the "
        "fashion-pairs scenes, train a small text U-Net on the frozen MiniLM encoder, sample a prompt set at "
        "guidance 1, 3 and 5, and score FID and prompt faithfulness. Re-running skips finished work.",
    )
    d.add_argument("--config", default="demo",
                   help="the demo's study file or preset: demo (class-conditional, the default) or demo-text "
                        "(text-to-image on fashion-pairs: prompts, guidance, prompt faithfulness)")
    d.add_argument("--out", type=Path, default=None,
                   help="output folder (default: demo-output, or <config>-output for another --config)")
    d.add_argument("--device", default=None, help="auto, cpu or cuda (default: the demo file's, else auto)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo, only=None, report_only=False, nproc=None, data_root=None, cache_dir=None)


def _study(args: argparse.Namespace) -> int:
    """Run (or resume) a study and print where its report is."""
    from lddpm import study as st
    from lddpm.errors import LddpmError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LddpmError("run `lddpm study` as one process; use --nproc N to train each run with N processes (torchrun)")
    study = st.load_study(args.config)
    if args.device:  # "auto" is resolved where the device is used (the trainer and the study backend)
        study.settings.device = args.device
    if args.nproc is not None:
        if args.nproc < 1:
            raise LddpmError(f"--nproc must be >= 1, got {args.nproc}")
        study.settings.train_nproc = args.nproc
    if args.data_root:
        study.settings.data_root = args.data_root
    if args.cache_dir:
        study.settings.cache_dir = args.cache_dir
    out = args.out or Path(f"study-{study.settings.name}")
    if args.report_only:
        from lddpm.io import folder_lock

        with folder_lock(out, "study folder"):
            rows = st.load_rows(study, out)
            st.write_report(study, rows, out)
    else:
        rows = st.run_study(study, out, only=args.only, progress=not args.quiet)
    failed = [r["name"] for r in rows if str(r.get("status", "")).startswith("failed")]
    print(f"results: {out / 'results.md'}")
    print(f"report:  {out / 'index.html'}")
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)} (see {out / 'cells'}/*.error.txt)")
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The demo is a study preset (`demo`, or --config, e.g. `demo-text`) written into --out."""
    if args.out is None:
        args.out = Path("demo-output" if args.config == "demo" else f"{Path(args.config).stem}-output")
    return _study(args)
