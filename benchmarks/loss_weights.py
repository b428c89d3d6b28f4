"""The share of the training loss weight per band of noise levels sigma for named recipes (exact, from
`lddpm.diffusion.loss_weight_shares`: timestep distribution x loss weight on the v-error scale), and what
importance-weighted uniform timesteps would cost instead of sampling EDM's log-normal directly.

    python benchmarks/loss_weights.py --out benchmarks/results/loss-weights.json

Each variant is a preset plus `--set` overrides. For a log-normal variant the file also gives the Kish effective
sample size 1 / (T sum_t p(t)^2) of the alternative the trainer does not use: drawing t uniformly and weighting each
sample by T p(t) (the same expected loss; that fraction of the batch's samples is effectively used).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lddpm.config import apply_overrides, config_from_preset
from lddpm.diffusion import SIGMA_BANDS, build_diffusion, describe_shares, loss_weight_shares

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

EDM = ['diffusion.timestep_sampling="lognormal"', 'diffusion.loss_weighting="edm"', "diffusion.p_std=1.2"]
VARIANTS = {
    "recipe (fashion-30min: uniform t, v, min-SNR-20)": [],
    "v, min-SNR-5 (the recipe until study-edm)": ["diffusion.min_snr_gamma=5.0"],
    "eps, min-SNR-5": ['diffusion.objective="eps"', "diffusion.min_snr_gamma=5.0"],
    "v, uniform weights": ['diffusion.loss_weighting="uniform"'],
    "EDM log-normal P_mean -1.2, sigma_data 1.0 (unit v weight)": EDM + ["diffusion.p_mean=-1.2", "diffusion.sigma_data=1.0"],
    "EDM log-normal P_mean -1.2, sigma_data 0.87": EDM + ["diffusion.p_mean=-1.2", "diffusion.sigma_data=0.87"],
    "EDM log-normal P_mean -0.65, sigma_data 0.87": EDM + ["diffusion.p_mean=-0.65", "diffusion.sigma_data=0.87"],
    "EDM log-normal P_mean -0.6, sigma_data 1.0": EDM + ["diffusion.p_mean=-0.6", "diffusion.sigma_data=1.0"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashion-30min")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name, overrides in VARIANTS.items():
        config = apply_overrides(config_from_preset(args.preset), overrides)
        d = build_diffusion(config.diffusion)
        row = {"variant": name, "overrides": overrides, "bands": loss_weight_shares(d)}
        if d.timestep_sampling == "lognormal":
            probs = d.timestep_probs()
            row["importance_uniform_ess"] = float(1.0 / (d.num_timesteps * (probs ** 2).sum()))
            row["mass_clamped_at_t0"] = float(probs[0])
        rows.append(row)
        print(f"{name}: {describe_shares(row['bands'])}"
              + (f"; importance-weighted uniform t would use {100 * row['importance_uniform_ess']:.0f}% of a batch"
                 if "importance_uniform_ess" in row else ""))
    d = build_diffusion(config_from_preset(args.preset).diffusion)
    ls = d.log_sigmas()
    finite = ls[torch.isfinite(ls)]
    cell = finite[1:] - finite[:-1]
    schedule = {"sigma_first": float(finite[0].exp()), "sigma_last": float(finite[-1].exp()),
                "ln_sigma_step_first": float(cell[0]), "ln_sigma_step_median": float(cell.median()),
                "ln_sigma_step_last": float(cell[-1])}
    print(f"schedule: sigma from {schedule['sigma_first']:.4g} to {schedule['sigma_last']:.4g}; ln sigma steps "
          f"{schedule['ln_sigma_step_first']:.3f} (first), {schedule['ln_sigma_step_median']:.4f} (median), "
          f"{schedule['ln_sigma_step_last']:.3f} (last)")
    if args.out:
        write_json({"benchmark": "loss_weights", "preset": args.preset, "band_edges": list(SIGMA_BANDS),
                    "schedule": config.diffusion.schedule, "num_timesteps": config.diffusion.num_timesteps,
                    "schedule_facts": schedule, "rows": rows, "torch": torch.__version__,
                    "environment": environment()}, args.out)


if __name__ == "__main__":
    main()
