"""The sampler-option flags that `lddpm sample` and `lddpm eval` share (--grid, --sigma-min, --eps-scaling, ...).

Torch-free, so the parser stays light; the values are checked by `lddpm.sampling.check_sampler_options` (the
flag names are `lddpm.solvers.SamplerOptions`' fields with dashes; tests/test_solvers_cli.py keeps them equal).
"""

from __future__ import annotations

import argparse
from typing import Any

# the registered samplers (lddpm.sampling.SAMPLERS), for the --sampler help
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m", "euler", "heun", "dpm++3m", "dpm++2m-sde", "unipc", "ipndm")

FLAGS: tuple[tuple[str, type, str], ...] = (
    ("grid", str, "step grid of the sigma-space samplers (and dpm++2m): time, karras or logsnr "
                  "(default: the sampler's own; docs/samplers.md)"),
    ("sigma_min", float, "lowest noise level the network is evaluated at; the last step jumps from it to x0 "
                         "(0: the schedule's sigma(t=0); sigma(t=99) of the cosine schedule is 0.1694)"),
    ("sigma_max", float, "highest noise level, where sampling starts (0: the schedule's sigma(T-1))"),
    ("rho", float, "exponent of the Karras grid (default 7)"),
    ("eps_scaling", float, "epsilon scaling (Ning et al. 2023): divide the predicted eps by b + k t; this is b "
                           "(default 1: off; ADM-ES used 1.017 on CIFAR-10 at 100 steps)"),
    ("eps_scaling_k", float, "epsilon scaling's slope k per timestep t (default 0: constant)"),
    ("s_churn", float, "EDM churn S_churn (euler, heun; Karras et al. 2022, Algorithm 2; default 0: deterministic)"),
    ("s_tmin", float, "EDM churn only at noise levels >= S_tmin (default 0)"),
    ("s_tmax", float, "EDM churn only at noise levels <= S_tmax (default inf)"),
    ("s_noise", float, "EDM S_noise, the churn noise's scale (default 1)"),
    ("order", int, "multistep order of unipc (1-3, default 3) and ipndm (1-4, default 4)"),
)


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """Add the sampler-option flags (default None: the sampler's own value)."""
    group = parser.add_argument_group("sampler options (docs/samplers.md)")
    for name, kind, help_text in FLAGS:
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options given on the command line, as `sampler_options` for the Python API."""
    return {name: getattr(args, name) for name, _, _ in FLAGS if getattr(args, name, None) is not None}


def options_tag(options: dict[str, Any]) -> str:
    """A file-name part for the options, e.g. "-karras-smin0.17-es1.005" ("" without options)."""
    short = {"grid": "", "sigma_min": "smin", "sigma_max": "smax", "rho": "rho", "eps_scaling": "es",
             "eps_scaling_k": "esk", "s_churn": "churn", "s_tmin": "tmin", "s_tmax": "tmax", "s_noise": "snoise",
             "order": "o"}
    return "".join(f"-{short[k]}{v:g}" if isinstance(v, (int, float)) else f"-{short[k]}{v}"
                   for k, v in options.items())
