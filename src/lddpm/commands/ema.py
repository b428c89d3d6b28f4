"""CLI command `lddpm ema`: post-hoc EMA reconstruction from a run's snapshots (EDM2, Karras et al. 2024)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lddpm.errors import LddpmError


def register(subparsers) -> None:
    """Add `ema` to the `lddpm` parser."""
    p = subparsers.add_parser(
        "ema", help="reconstruct an EMA of any relative length from a run's post-hoc EMA snapshots",
        description="Post-hoc EMA (Karras et al. 2024, EDM2 Sec. 3): combine the power-function EMA snapshots a "
                    "run saved (optim.posthoc_ema) by least squares into the EMA of relative width --sigma-rel, "
                    "and write it as a checkpoint that `lddpm sample`, `lddpm eval` and load_pipeline load.")
    p.add_argument("run", metavar="RUN", help="run folder trained with optim.posthoc_ema set")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True, metavar="S",
                   help="relative EMA width(s), e.g. 0.08 (the profile's std as a fraction of the training time; "
                        "EDM2's optima lie between 0.02 and 0.2)")
    p.add_argument("--at-step", type=int, default=None,
                   help="reconstruct the EMA as it was at this snapshot's step (default: the last snapshot)")
    p.add_argument("--out", default=None,
                   help="output .safetensors file (one --sigma-rel) or folder (default: RUN/posthoc_ema/)")
    p.set_defaults(func=_ema)


def _ema(args: argparse.Namespace) -> int:
    from lddpm.train.posthoc import reconstruct_ema

    out = Path(args.out) if args.out else None
    many = len(args.sigma_rel) > 1
    if out is not None and out.suffix == ".safetensors" and many:
        raise LddpmError(f"--out {out} names one file, but {len(args.sigma_rel)} --sigma-rel values were given; "
                         "give a folder")
    for sigma_rel in args.sigma_rel:
        target = out
        if out is not None and out.suffix != ".safetensors":
            target = out / f"ema-{sigma_rel:.3f}.safetensors" if args.at_step is None else \
                out / f"ema-{sigma_rel:.3f}-step_{args.at_step:07d}.safetensors"
        path = reconstruct_ema(args.run, sigma_rel, target, at_step=args.at_step)
        from lddpm.checkpoint import load_checkpoint

        info = load_checkpoint(path).meta["posthoc_ema"]
        print(f"sigma_rel {sigma_rel:g} (gamma {info['gamma']:.3f}) at step {info['step']} from "
              f"{len(info['snapshots'])} snapshot EMAs, profile error {100 * info['relative_profile_error']:.2f}% "
              f"-> {path}")
    return 0
