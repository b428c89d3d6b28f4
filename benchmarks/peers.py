"""lddpm against its peers at equal training wall time: Fashion-MNIST 32x32, unconditional, one FID protocol.

Three systems train on the same tensors (the train split of lddpm's Fashion-MNIST cache, 28x28 zero-padded
to 32x32, grey, pixels x / 127.5 - 1 in [-1, 1], batches drawn by lddpm's seeded loader, so every system
sees the same images in the same order) with the same batch size, for the same training wall time:

  lddpm       its recipe preset (`fashion-30min`, unconditional; `--lddpm-set KEY=VALUE` changes it, and the
              recipe the tuned peers read with it), trained with `lddpm.train_diffusion` and `run.max_minutes`,
              resumed for each later mark (with `optim.cooldown`, whose learning rate depends on the budget,
              one run per mark instead); sampled with `--lddpm-sampler` (dpm++2m, 25 steps) or each of
              `--lddpm-samplers` (e.g. `unipc:10:grid=logsnr,sigma_min=0.1694`; `guide=F` autoguides each mark
              by the run's own checkpoint at F x the mark, saved on the way: no extra training).
  lucidrains  denoising-diffusion-pytorch's `Unet` + `GaussianDiffusion`, called as they are
              (`diffusion(x)` is the loss), in a loop that does what its `Trainer` does (Adam, grad-norm
              clip, `ema_pytorch.EMA`); sampled with its own DDIM (`sampling_timesteps`, default 50).
  diffusers   `UNet2DModel` + `DDPMScheduler` trained as diffusers' examples/unconditional_image_generation/
              train_unconditional.py does (AdamW, warm-up + cosine LR, `EMAModel`, epsilon MSE); sampled with
              `DPMSolverMultistepScheduler` (DPM-Solver++(2M), 25 steps: the same solver and the same number of
              network evaluations as lddpm's default, so the table compares training, not samplers) or,
              with `--diffusers-sampler ddim`, `DDIMScheduler` (50 steps), or each of `--diffusers-samplers`
              (dpm++2m, unipc or ddim with the scheduler's own arguments, e.g.
              `unipc:10:solver_order=3,timestep_spacing=trailing`), in diffusers' denoising loop.

Each peer runs twice: `default` (its documented defaults: see `lucidrains_settings` / `diffusers_settings`,
each value with where it comes from) and `tuned` (lddpm's recipe wherever it maps: a network of about the
recipe network's parameter count, learning rate and warm-up, Adam betas and weight decay, EMA, objective,
noise schedule, loss weighting, bf16; the JSON lists what was set from which recipe key, and what could not
be mapped). lddpm runs once, as `recipe`.

The clock: each run trains once to the largest of `--minutes`; at every mark the clock is paused, N images
are sampled with the EMA weights (timed: seconds per image, network evaluations per image counted with a
forward hook) and saved, then training continues. Only training time counts: each system's one-off set-up
(network, optimizer, EMA, data loader) and its steps. A run stops after the step at which its training time
reaches the mark (lddpm: its own `run.max_minutes` clock, which is its checkpoints' cumulative
`wall_time`; it pays its set-up again at each resume). Train images/s = images seen / training seconds.
`--speed ROUNDS` only times the two training steps, lddpm's trainer and diffusers' tuned step, in turn in one
process (the same machine for both), and writes benchmarks/results/peers-speed.json.
The parent process then scores every mark's samples with lddpm's FID and KID (the pinned Inception network,
feature backend `--feature-backend`, default auto) against N images of the Fashion-MNIST test split, and
scores N real train-split images the same way (the real-data floor at this N).

Isolation: by default each (system, variant) trains in its own subprocess (memory, threads and imports do
not carry over from one system to the next); `--in-process` runs them in this process (tests, debugging).

Prints a table and writes JSON (`--out`) plus a Markdown table next to it (`.md`).

Peers (not needed by lddpm or its tests), `make peers` or:

    pip install -e ".[peers]"                                  # diffusers, ema-pytorch, einops, accelerate
    pip install --no-deps denoising-diffusion-pytorch==2.3.4   # lucidrains' package, without its torchvision

denoising-diffusion-pytorch requires torchvision: unpinned, pip takes the newest, which pins a newer torch and
replaces the installed one (a CUDA build); pinned to 0.28.0, the release for torch 2.13.0, pip keeps torch, but
beside a CPU-only torch build that torchvision fails to import (`operator torchvision::nms does not exist`) and
then breaks `import diffusers` as well. The package imports two torchvision names at module level, for its
image-folder Dataset and Trainer, which this benchmark does not use: when torchvision is not installed, this
script stands in for them during that one import. (Where torch and torchvision match, e.g. a CUDA torch 2.13.0
with torchvision 0.28.0, a plain `pip install denoising-diffusion-pytorch==2.3.4 torchvision==0.28.0` works too.)

    python benchmarks/peers.py --quick       # smoke run of every system: seconds of training, minutes in all
    python benchmarks/peers.py --minutes 10,30 --num 1000 --out benchmarks/results/peers.json
    python benchmarks/peers.py --systems lddpm,diffusers --variants tuned --minutes 5
    python benchmarks/peers.py --systems lddpm,diffusers --variants tuned --minutes 10,30 --num 1000 \
        --lddpm-samplers dpm++2m:25 unipc:10:grid=logsnr,sigma_min=0.1694 \
                         unipc:10:grid=logsnr,sigma_min=0.1694,guide=0.3333,guide_scale=2,interval=0.28/5.42 \
        --diffusers-samplers dpm++2m:25 unipc:10:solver_order=3 unipc:10:solver_order=3,timestep_spacing=trailing \
                             dpm++2m:10:use_lu_lambdas=true --out benchmarks/results/peers-samplers.json

diffusers' UniPC and DPM-Solver++ on a Karras or exponential (log-sigma) grid fail on the cosine schedule (its
sigma_max is about 2 x 10^4: the integer timesteps of the grid's first steps repeat, 998, 998, 998, and the
scheduler's step index lookup then breaks: an AssertionError or IndexError); DPM-Solver++ with
use_lu_lambdas=true, the log-SNR grid, runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lddpm.errors import LddpmError
from lddpm.guidance import interval_from_json, interval_json
from lddpm.pipeline import to_uint8
from lddpm.train.ema import power_ema_decay
from lddpm.train.utils import lr_at

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

SYSTEMS = ("lddpm", "lucidrains", "diffusers")
VARIANTS = ("default", "tuned")
PEER_PACKAGES = {"lucidrains": ("denoising_diffusion_pytorch", "ema_pytorch"), "diffusers": ("diffusers",)}
MAX_NFE = 50  # the cap on network evaluations per image for every system's sampler
DATASET, RESOLUTION = "fashion-mnist", 32
RECIPE_PRESET = "fashion-30min"
QUICK_WIDTH = 8  # --quick: base width of every network (lddpm model_channels, lucidrains dim, diffusers first block)


# ----------------------------------------------------------------------------- arguments


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """'a,b' -> ['a', 'b'] in the order given; unknown or repeated names -> ValueError naming them."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if not items or unknown:
        raise ValueError(f"--{what} {text!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"choose from {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise ValueError(f"--{what} {text!r} names a value twice")
    return items


def parse_minutes(text: str) -> list[float]:
    """'10,30' -> [10.0, 30.0]: positive finite numbers, distinct, sorted."""
    try:
        marks = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--minutes {text!r}: expected numbers separated by commas, e.g. 10,30") from None
    if not marks or not all(math.isfinite(m) and m > 0 for m in marks):
        raise ValueError(f"--minutes {text!r}: every mark must be a positive number of minutes, e.g. 10,30")
    if len(set(marks)) != len(marks):
        raise ValueError(f"--minutes {text!r} names a mark twice")
    return sorted(marks)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="peers.py", description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="peer variants: default (their documented defaults), tuned (lddpm's recipe where it maps)")
    p.add_argument("--minutes", default=None, help="evaluation marks in training minutes (default 10,30; --quick 0.05,0.1)")
    p.add_argument("--batch", type=int, default=None, help="training batch size of every system (default 64; --quick 8)")
    p.add_argument("--num", type=int, default=None, help="N: images sampled and scored per mark, and test-split "
                   "reference images (default 1000; --quick 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results; the Markdown table goes next to it (default "
                   "benchmarks/results/peers.json; with --speed benchmarks/results/peers-speed.json)")
    p.add_argument("--work", default=None, help="folder for the run folders and samples (default: a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: marks of seconds, small N, 8-wide networks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (every system)")
    p.add_argument("--sample-batch", type=int, default=100, help="sampling batch size of every system")
    p.add_argument("--lddpm-preset", default=RECIPE_PRESET, help=f"lddpm's recipe: a preset or TOML file (default {RECIPE_PRESET})")
    p.add_argument("--lddpm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an `lddpm train --set` override of the recipe (repeatable); the recipe handed to the peers "
                        "follows it, e.g. diffusion.min_snr_gamma=5.0 for the recipe of the runs before gamma 20")
    p.add_argument("--lddpm-sampler", default="dpm++2m", help="lddpm's sampler (default dpm++2m)")
    p.add_argument("--lddpm-steps", type=int, default=None, help="lddpm's sampler steps (default 25; --quick 10)")
    p.add_argument("--lddpm-samplers", nargs="+", default=None, metavar="SAMPLER:STEPS[:K=V,...]",
                   help="several lddpm samplers, one table row each per mark (instead of --lddpm-sampler/--lddpm-steps); "
                        "K: a SamplerOptions field (grid, sigma_min, ...), guide (autoguidance by the same run's "
                        "checkpoint at this fraction of the mark), guide_scale, interval (LO/HI in sigma; HI inf: no upper bound)")
    p.add_argument("--lucidrains-steps", type=int, default=None, help="lucidrains' DDIM sampling_timesteps (default 50; --quick 10)")
    p.add_argument("--diffusers-sampler", default="dpm++2m", choices=("dpm++2m", "ddim"),
                   help="diffusers' scheduler at sampling: DPMSolverMultistepScheduler or DDIMScheduler")
    p.add_argument("--diffusers-steps", type=int, default=None, help="diffusers' sampling steps (default 25 dpm++2m, 50 ddim; --quick 10)")
    p.add_argument("--diffusers-samplers", nargs="+", default=None, metavar="SCHEDULER:STEPS[:K=V,...]",
                   help=f"several diffusers schedulers ({', '.join(DIFFUSERS_SAMPLERS)}), one row each per mark (instead "
                        "of --diffusers-sampler/--diffusers-steps); K=V: the scheduler's own config arguments, e.g. "
                        "use_exponential_sigmas=true,solver_order=3")
    p.add_argument("--feature-backend", default="auto", help="FID feature backend: auto, torch or onnx")
    p.add_argument("--inception", default=None, help="TorchScript feature network file (default: the pinned Inception)")
    p.add_argument("--cache-dir", default=None, help="lddpm's cache folder (default $LDDPM_CACHE or ~/.cache/lddpm)")
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files (default: lddpm's)")
    p.add_argument("--in-process", action="store_true", help="run every system in this process instead of one subprocess each")
    p.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                   help="only time the training steps: lddpm's trainer and diffusers' tuned step in turn in one process, "
                        "ROUNDS blocks of 5 steps each; writes --out (no sampling, no scoring)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one system from a spec file
    return p


DIFFUSERS_SAMPLERS = {"dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler", "ddim": "DDIMScheduler"}
LDDPM_GUIDE_KEYS = ("guide", "guide_scale", "interval")


def _option_value(text: str):
    """A K=V value: true / false / a number / LO/HI (two numbers) / a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.count("/") == 1:
        lo, hi = text.split("/")
        try:
            return interval_json((float(lo), float(hi)))   # null: no upper bound (JSON has no inf)
        except ValueError:
            pass
    return text


def parse_sampler(text: str, names) -> dict:
    """"NAME:STEPS[:K=V,K=V]" -> {"label", "name", "steps", "options"}; ValueError naming the problem."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ValueError(f"sampler {text!r}: expected NAME:STEPS or NAME:STEPS:K=V,K=V")
    name, steps = parts[0], parts[1]
    if name not in names:
        raise ValueError(f"sampler {text!r}: unknown {name!r} (choose one of {', '.join(names)})")
    if not steps.isdigit() or not 1 <= int(steps) <= MAX_NFE:
        raise ValueError(f"sampler {text!r}: steps must be an integer from 1 to {MAX_NFE} (every sampler is held to "
                         f"at most {MAX_NFE} steps per image)")
    options = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"sampler {text!r}: option {item!r} is not K=V")
        options[key] = _option_value(value)
    return {"label": text, "name": name, "steps": int(steps), "options": options}


def check_lddpm_sampler(item: dict) -> None:
    """lddpm's sampler options and its guide keys, checked before any training (ValueError)."""
    from lddpm.sampling import SamplingSpec

    o = item["options"]
    guide = o.get("guide")
    if guide is not None and not (isinstance(guide, (int, float)) and 0 < guide < 1):
        raise ValueError(f"sampler {item['label']!r}: guide={guide!r}: the guide is the run's own checkpoint at this "
                         "fraction of each mark, a number between 0 and 1")
    if (o.get("guide_scale") is not None or o.get("interval") is not None) and guide is None:
        raise ValueError(f"sampler {item['label']!r}: guide_scale / interval need guide=FRACTION")
    interval = o.get("interval")
    if interval is not None and not (isinstance(interval, list) and len(interval) == 2):
        raise ValueError(f"sampler {item['label']!r}: interval={interval!r}: expected LO/HI in sigma, e.g. 0.28/5.42")
    try:
        SamplingSpec(sampler=item["name"], num_steps=item["steps"], guide_scale=float(o.get("guide_scale", 1.0)),
                     guidance_interval=interval_from_json(interval),
                     sampler_options={k: v for k, v in o.items() if k not in LDDPM_GUIDE_KEYS} or None)
    except (LddpmError, TypeError, ValueError) as exc:
        raise ValueError(f"sampler {item['label']!r}: {exc}") from None


def check_diffusers_sampler(item: dict) -> None:
    """The scheduler's config arguments, checked against its constructor before any training (ValueError)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, DIFFUSERS_SAMPLERS[item["name"]])
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "num_train_timesteps", "beta_start", "beta_end",
                                                               "beta_schedule", "trained_betas", "prediction_type"}
    unknown = sorted(set(item["options"]) - known)
    if unknown:
        raise ValueError(f"sampler {item['label']!r}: {cls.__name__} has no option {', '.join(unknown)} (the training "
                         "schedule's arguments come from the run)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; any mistake ends with one `error:` line (exit status 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        return args
    try:
        args.systems = parse_list(args.systems, SYSTEMS, "systems")
        args.variants = parse_list(args.variants, VARIANTS, "variants")
        args.minutes = parse_minutes(args.minutes or ("0.05,0.1" if args.quick else "10,30"))
    except ValueError as exc:
        p.error(str(exc))
    args.out = args.out or f"benchmarks/results/{'peers-speed' if args.speed else 'peers'}.json"
    if args.speed < 0:
        p.error(f"--speed {args.speed}: give a positive number of rounds")
    if args.speed and "diffusers" not in args.systems:
        p.error("--speed times lddpm against diffusers: keep diffusers in --systems")
    args.batch = args.batch if args.batch is not None else (8 if args.quick else 64)
    args.num = args.num if args.num is not None else (16 if args.quick else 1000)
    defaults = {"lddpm_steps": 25, "lucidrains_steps": 50, "diffusers_steps": 25 if args.diffusers_sampler == "dpm++2m" else 50}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, 10 if args.quick else value)
    for name in ("batch", "num", "sample_batch", "lddpm_steps", "lucidrains_steps", "diffusers_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.num < 2:
        p.error(f"--num {args.num}: KID needs at least 2 images")
    for name in ("lddpm_steps", "lucidrains_steps", "diffusers_steps"):
        if getattr(args, name) > MAX_NFE:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: every sampler is held to at most {MAX_NFE} "
                    "network evaluations per image")
    from lddpm.sampling import SAMPLERS

    if args.lddpm_sampler not in SAMPLERS:
        p.error(f"--lddpm-sampler {args.lddpm_sampler!r}: choose one of {', '.join(SAMPLERS)}")
    try:
        args.lddpm_samplers = [parse_sampler(t, SAMPLERS) for t in
                               (args.lddpm_samplers or [f"{args.lddpm_sampler}:{args.lddpm_steps}"])]
        for item in args.lddpm_samplers:
            check_lddpm_sampler(item)
        args.diffusers_samplers = [parse_sampler(t, tuple(DIFFUSERS_SAMPLERS)) for t in
                                   (args.diffusers_samplers or [f"{args.diffusers_sampler}:{args.diffusers_steps}"])]
    except ValueError as exc:
        p.error(str(exc))
    if args.feature_backend not in ("auto", "torch", "onnx"):
        p.error(f"--feature-backend {args.feature_backend!r}: choose auto, torch or onnx")
    if args.device not in ("auto", "cpu", "cuda"):
        p.error(f"--device {args.device!r}: choose auto, cpu or cuda")
    missing = [f"{system} needs the Python package {package}" for system in args.systems
               for package in PEER_PACKAGES.get(system, ()) if importlib.util.find_spec(package) is None]
    if missing:
        p.error("; ".join(missing) + " (install the peers with `make peers`; see this script's docstring)")
    if "diffusers" in args.systems:
        try:
            for item in args.diffusers_samplers:
                check_diffusers_sampler(item)
        except ValueError as exc:
            p.error(str(exc))
    from lddpm.config import PRESETS

    if args.lddpm_preset not in PRESETS and not Path(args.lddpm_preset).is_file():
        p.error(f"--lddpm-preset {args.lddpm_preset!r}: not a preset ({', '.join(PRESETS)}) or a TOML file")
    return args


# ----------------------------------------------------------------------------- lddpm's recipe


def lddpm_overrides(spec: dict) -> list[str]:
    """The `--set` overrides that turn the recipe preset into this benchmark's lddpm run."""
    o = [
        "run.class_conditional=false",        # the benchmark is unconditional
        "run.sample_every=0",                 # no grids while training (they would cost training time)
        f"optim.batch_size={spec['batch']}",
        f"run.seed={spec['seed']}",
        "run.steps=100000000",                # a cap only: run.max_minutes stops the run
        "run.checkpoint_every=100000000",     # one checkpoint per mark (the peers write none)
        "run.keep_checkpoints=1",
        "run.keep_steps=[]",                  # nor the preset's kept guide step (peers save their guide themselves)
        "run.num_sample_images=1",            # the end-of-run grid (inside lddpm's clock): one image,
        "run.sample_steps=1",                 # one step
        "run.log_every=50",
        f"run.device={json.dumps(spec['device'])}",
        f"data.cache_dir={json.dumps(spec['cache_dir'])}",
    ]
    if spec.get("data_root"):
        o.append(f"data.root={json.dumps(spec['data_root'])}")
    if spec["quick"]:
        o.append(f"model.overrides.model_channels={QUICK_WIDTH}")
    return o + list(spec.get("lddpm_set") or [])  # --lddpm-set: recipe changes, last so they win


def recipe_summary(spec: dict) -> dict:
    """lddpm's recipe as the peers' tuned variants read it: optimizer, EMA, diffusion and network facts."""
    from lddpm.config import load_config
    from lddpm.distributed import resolve_device, use_bf16
    from lddpm.nn import build_network
    from lddpm.train import network_overrides

    c = load_config(spec["lddpm_preset"], lddpm_overrides(spec))
    derived = {"resolution": RESOLUTION, "in_channels": 1, "num_classes": 0, "learned_sigma": c.diffusion.learned_variance}
    with torch.device("meta"):
        net = build_network(c.model.kind, c.model.name, **network_overrides(c, derived))
    bf16 = use_bf16(c.run.bf16, resolve_device(spec["device"]))
    o, d = c.optim, c.diffusion
    return {
        "preset": spec["lddpm_preset"],
        "overrides": lddpm_overrides(spec),
        "params": sum(p.numel() for p in net.parameters()),
        "network": {"kind": c.model.kind, "name": c.model.name, **net.config.to_dict()},
        "lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay, "warmup_steps": o.warmup_steps,
        "lr_schedule": "linear warm-up, then constant" + (
            f", then to zero ({o.cooldown_shape}) over the last {o.cooldown:g} of each mark's training time"
            if o.cooldown else ""),
        "cooldown": o.cooldown, "cooldown_shape": o.cooldown_shape, "grad_clip": o.grad_clip, "grad_accum": o.grad_accum,
        "ema_decay": o.ema_decay, "ema_warmup": o.ema_warmup, "ema_gamma": o.ema_gamma,
        "objective": d.objective, "schedule": d.schedule, "num_timesteps": d.num_timesteps,
        "loss_weighting": d.loss_weighting, "min_snr_gamma": d.min_snr_gamma, "learned_variance": d.learned_variance,
        "timestep_sampling": d.timestep_sampling, "rescale_zero_terminal_snr": d.rescale_zero_terminal_snr,
        "hflip": c.data.hflip, "bf16": bool(bf16), "bf16_setting": c.run.bf16,
    }


# ----------------------------------------------------------------------------- peer settings


def search_width(build, target: int, step: int, start: int | None = None, limit: int = 1024) -> tuple[int, int]:
    """The width (a multiple of `step`) whose network's parameter count is closest to `target`, and that count.

    Networks are built on the meta device (no memory, no initialisation cost); counts grow with width.
    """
    best = None
    for width in range(start or step, limit + 1, step):
        with torch.device("meta"):
            count = sum(p.numel() for p in build(width).parameters())
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (width, count)
        if count > target:
            break
    return best


def lucidrains_unet_kwargs(unet: dict) -> dict:
    """Unet arguments with lists as tuples (its cast_tuple takes a list for one value to repeat per level)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}


def common_not_mapped(recipe: dict) -> dict[str, str]:
    """Recipe settings no peer takes: gradient accumulation, and the cool-down over each mark's time budget."""
    out = {}
    if recipe["grad_accum"] != 1:
        out["optim.grad_accum"] = "every system takes one batch of --batch per step"
    if recipe.get("cooldown"):
        out["optim.cooldown"] = (f"lddpm's learning rate falls to zero over the last {recipe['cooldown']:g} of each mark's "
                                 "training time (one lddpm run per mark); the peer trains one run, sampled at every mark, "
                                 "at a constant rate after warm-up: its LR schedules decay over a step count fixed in "
                                 "advance, which a run with a time budget does not know")
    return out


def lucidrains_settings(variant: str, recipe: dict, quick: bool, steps: int) -> dict:
    """Unet / GaussianDiffusion / optimizer / EMA settings of denoising-diffusion-pytorch, and their sources."""
    readme = "README (Usage)"
    trainer = "Trainer.__init__ default"
    gd = "GaussianDiffusion.__init__ default"
    s: dict[str, Any] = {
        "unet": {"dim": QUICK_WIDTH if quick else 64, "dim_mults": [1, 2, 4, 8], "flash_attn": True, "channels": 1},
        "diffusion": {"image_size": RESOLUTION, "timesteps": 1000, "sampling_timesteps": steps, "objective": "pred_v",
                      "beta_schedule": "sigmoid", "ddim_sampling_eta": 0.0, "min_snr_loss_weight": False, "min_snr_gamma": 5},
        "optimizer": {"name": "Adam", "lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0},
        "lr_warmup_steps": 0,
        "grad_clip": 1.0,
        "grad_accum": 1,
        "ema": {"class": "ema_pytorch.EMA", "beta": 0.995, "update_every": 10, "update_after_step": 100,
                "inv_gamma": 1.0, "power": 2 / 3},
        "bf16": False,
        "hflip": recipe["hflip"],
    }
    sources = {
        "unet.dim": readme + (f" (64; {QUICK_WIDTH} under --quick)" if quick else ""),
        "unet.dim_mults": readme, "unet.flash_attn": readme,
        "unet.channels": "the data (1 grey channel)",
        "diffusion.timesteps": readme,
        "diffusion.sampling_timesteps": f"this benchmark's cap of {MAX_NFE} network evaluations (README's example: 250); DDIM, eta 0",
        "diffusion.objective": gd, "diffusion.beta_schedule": gd, "diffusion.min_snr_loss_weight": gd,
        "optimizer": f"{trainer}: Adam(lr=train_lr 1e-4, betas=adam_betas (0.9, 0.99))",
        "grad_clip": f"{trainer} (max_grad_norm 1.0)", "grad_accum": f"{trainer} (gradient_accumulate_every 1)",
        "ema": f"{trainer} (ema_decay 0.995, ema_update_every 10) and ema_pytorch.EMA defaults",
        "bf16": f"{trainer} (amp False)",
        "batch": "this benchmark's --batch for every system (Trainer default train_batch_size 16)",
        "hflip": "the same tensors for every system (Trainer default augment_horizontal_flip True is not used)",
    }
    mapping, not_mapped = {}, {}
    if variant == "tuned":
        net = recipe["network"]
        if net.get("channel_mult"):
            mults = [int(m) for m in net["channel_mult"]]
            s["unet"]["dim_mults"] = mults
            mapping["unet.dim_mults"] = f"recipe network channel_mult {mults}"
            res = [RESOLUTION // 2 ** i for i in range(len(mults))]
            s["unet"]["full_attn"] = [r in set(net.get("attention_resolutions") or ()) for r in res]
            mapping["unet.full_attn"] = (f"full attention at the recipe's attention_resolutions "
                                         f"{list(net.get('attention_resolutions') or ())} (linear attention elsewhere, as lucidrains' Unet)")
            s["unet"]["dropout"] = float(net.get("dropout", 0.0))
            mapping["unet.dropout"] = f"recipe network dropout {s['unet']['dropout']}"
        from denoising_diffusion_pytorch import Unet

        base = lucidrains_unet_kwargs({k: v for k, v in s["unet"].items() if k != "dim"})
        width, count = search_width(lambda w: Unet(dim=w, **base), recipe["params"], 4)
        s["unet"]["dim"] = width
        mapping["unet.dim"] = f"width whose parameter count ({count:,}) is closest to the recipe network's ({recipe['params']:,})"
        objective = {"eps": "pred_noise", "x0": "pred_x0", "v": "pred_v"}[recipe["objective"]]
        s["diffusion"]["objective"] = objective
        mapping["diffusion.objective"] = f"recipe objective {recipe['objective']!r}"
        schedule = {"linear": "linear", "cosine": "cosine", "sigmoid": "sigmoid"}.get(recipe["schedule"])
        if schedule:
            s["diffusion"]["beta_schedule"] = schedule
            mapping["diffusion.beta_schedule"] = f"recipe schedule {recipe['schedule']!r}"
        else:
            not_mapped["diffusion.schedule"] = f"recipe schedule {recipe['schedule']!r} has no lucidrains equivalent"
        s["diffusion"]["timesteps"] = recipe["num_timesteps"]
        mapping["diffusion.timesteps"] = f"recipe num_timesteps {recipe['num_timesteps']}"
        if recipe["loss_weighting"] == "min_snr":
            s["diffusion"].update(min_snr_loss_weight=True, min_snr_gamma=recipe["min_snr_gamma"])
            mapping["diffusion.min_snr_loss_weight"] = f"recipe loss_weighting min_snr, gamma {recipe['min_snr_gamma']}"
        if recipe["weight_decay"] == 0:
            s["optimizer"] = {"name": "Adam", "lr": recipe["lr"], "betas": recipe["betas"], "weight_decay": 0.0}
            mapping["optimizer"] = f"recipe lr {recipe['lr']}, betas {recipe['betas']} (AdamW with weight decay 0 is Adam)"
        else:
            s["optimizer"] = {"name": "AdamW", "lr": recipe["lr"], "betas": recipe["betas"], "weight_decay": recipe["weight_decay"]}
            mapping["optimizer"] = f"recipe AdamW lr {recipe['lr']}, betas {recipe['betas']}, weight decay {recipe['weight_decay']}"
        s["lr_warmup_steps"] = recipe["warmup_steps"]
        mapping["lr_warmup_steps"] = f"recipe warmup_steps {recipe['warmup_steps']} (lr x min(1, (step + 1) / warmup), then constant)"
        s["grad_clip"] = recipe["grad_clip"]
        mapping["grad_clip"] = f"recipe grad_clip {recipe['grad_clip']}"
        if recipe["ema_gamma"] > 0:
            s["ema"] = {"class": "ema_pytorch.KarrasEMA", "gamma": recipe["ema_gamma"], "update_every": 1}
            mapping["ema"] = (f"recipe ema_gamma {recipe['ema_gamma']}: ema_pytorch's power-function EMA "
                              "(Karras et al. 2024), updated every step (its decay index runs one update ahead of lddpm's)")
        else:
            s["ema"] = {"class": "ema_pytorch.EMA", "beta": recipe["ema_decay"], "update_every": 1, "update_after_step": 100,
                        "inv_gamma": 1.0, "power": 2 / 3}
            mapping["ema"] = (f"recipe ema_decay {recipe['ema_decay']}, updated every step like lddpm; the early-step "
                              "warm-up stays ema_pytorch's own (copy for 100 steps, then 1 - (1 + n)^(-2/3))")
        s["bf16"] = recipe["bf16"]
        mapping["bf16"] = f"recipe run.bf16 {recipe['bf16_setting']!r} resolved for this device: {recipe['bf16']}"
        for key in ("learned_variance", "rescale_zero_terminal_snr"):
            if recipe[key]:
                not_mapped[f"diffusion.{key}"] = "no equivalent in GaussianDiffusion"
        if recipe["timestep_sampling"] != "uniform":
            not_mapped["diffusion.timestep_sampling"] = f"recipe {recipe['timestep_sampling']!r}; lucidrains samples t uniformly"
        not_mapped.update(common_not_mapped(recipe))
    return {"settings": s, "sources": sources, "mapping": mapping, "not_mapped": not_mapped}


DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                       "sigmoid_beta": "sigmoid"}


def diffusers_unet_kwargs(widths: list[int], attention: list[bool], layers: int, groups: int, **extra) -> dict:
    """UNet2DModel arguments for one level per width, attention where `attention` says."""
    return {"sample_size": RESOLUTION, "in_channels": 1, "out_channels": 1, "layers_per_block": layers,
            "block_out_channels": list(widths), "norm_num_groups": groups,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)], **extra}


def diffusers_settings(variant: str, recipe: dict, quick: bool, samplers: list[dict], batch: int,
                       num_train_images: int) -> dict:
    """UNet2DModel / DDPMScheduler / AdamW / LR schedule / EMAModel settings, and their sources."""
    example = "examples/unconditional_image_generation/train_unconditional.py"
    # The example's UNet for 64x64: widths (128, 128, 256, 256, 512, 512) at 64, 32, 16, 8, 4, 2 pixels, attention
    # at 4x4. At 32x32 the 64x64 level is dropped and every other level keeps its width and its attention.
    widths = [128, 256, 256, 512, 512]
    if quick:
        widths = [w * QUICK_WIDTH // 128 for w in widths]
    epochs, warmup = 100, 500
    steps_per_epoch = math.ceil(num_train_images / batch)
    s: dict[str, Any] = {
        "unet": diffusers_unet_kwargs(widths, [False, False, False, True, False], 2, 8 if quick else 32),
        "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"},
        "optimizer": {"name": "AdamW", "lr": 1e-4, "betas": [0.95, 0.999], "weight_decay": 1e-6, "eps": 1e-8},
        "lr_scheduler": {"name": "cosine", "num_warmup_steps": warmup, "num_training_steps": steps_per_epoch * epochs},
        "grad_clip": 1.0,
        "ema": {"class": "diffusers.training_utils.EMAModel", "decay": 0.9999, "use_ema_warmup": True,
                "inv_gamma": 1.0, "power": 3 / 4},
        "snr_gamma": None,
        "bf16": False,
        "hflip": recipe["hflip"],
        "samplers": [{"label": item["label"], "scheduler": DIFFUSERS_SAMPLERS[item["name"]],
                      "num_inference_steps": item["steps"], "config": item["options"]} for item in samplers],
    }
    sources = {
        "unet": (f"{example}'s UNet2DModel (64x64: block_out_channels (128, 128, 256, 256, 512, 512), "
                 "AttnDownBlock2D/AttnUpBlock2D at 4x4, layers_per_block 2) scaled to 32x32 by dropping its 64x64 "
                 "level: each remaining level keeps its width and attention; in/out channels 1 (the example "
                 "converts to RGB)" + (f"; widths x {QUICK_WIDTH}/128 and 8 norm groups under --quick" if quick else "")),
        "scheduler": f"{example}: DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', prediction_type='epsilon') (--ddpm_* / --prediction_type defaults)",
        "optimizer": f"{example}: AdamW(lr 1e-4, betas (0.95, 0.999), weight_decay 1e-6, eps 1e-8)",
        "lr_scheduler": (f"{example}: get_scheduler('cosine', num_warmup_steps=500, num_training_steps=len(dataloader) "
                         f"x num_epochs 100) = {steps_per_epoch} x {epochs}"),
        "grad_clip": f"{example}: clip_grad_norm_(..., 1.0)",
        "ema": f"{example}: EMAModel(decay=ema_max_decay 0.9999, use_ema_warmup=True, inv_gamma 1.0, power 3/4) (--use_ema, as its README runs it)",
        "bf16": f"{example}: mixed_precision 'no'",
        "batch": "this benchmark's --batch for every system (example default train_batch_size 16)",
        "hflip": "the same tensors for every system (example: random_flip off by default)",
        "samplers": ("each row's scheduler (dpm++2m: DPMSolverMultistepScheduler, diffusers' recommended fast "
                     "multistep solver, lddpm's default sampler's method; unipc: UniPCMultistepScheduler; ddim: "
                     "DDIMScheduler, eta 0) built from the training scheduler's config with the row's own arguments "
                     f"and steps; the example samples with DDPMPipeline's 1000 steps, over this benchmark's cap of {MAX_NFE}"),
    }
    mapping, not_mapped = {}, {}
    if variant == "tuned":
        net = recipe["network"]
        if net.get("channel_mult"):
            mults = [int(m) for m in net["channel_mult"]]
            attn = set(net.get("attention_resolutions") or ())
            attention = [RESOLUTION // 2 ** i in attn for i in range(len(mults))]
            layers, groups = int(net.get("num_res_blocks", 2)), int(net.get("norm_groups", 32))
            extra = {"dropout": float(net.get("dropout", 0.0)),
                     "resnet_time_scale_shift": "scale_shift" if net.get("use_scale_shift_norm") else "default",
                     "add_attention": bool(net.get("mid_attention", True))}
            if int(net.get("num_head_channels", -1)) > 0:
                extra["attention_head_dim"] = int(net["num_head_channels"])
            elif int(net.get("num_heads", 1)) == 1:
                extra["attention_head_dim"] = None  # one head per attention layer
            else:
                not_mapped["unet.attention_head_dim"] = f"recipe num_heads {net['num_heads']} (diffusers fixes the head width)"
            mapping["unet"] = (f"recipe network: channel_mult {mults}, attention at {sorted(attn)} px, num_res_blocks "
                               f"{layers} (layers_per_block), norm_groups {groups}, dropout {extra['dropout']}, "
                               f"scale-shift norm {bool(net.get('use_scale_shift_norm'))}, mid attention "
                               f"{extra['add_attention']}, heads {net.get('num_heads')}")
        else:  # a DiT recipe: keep the example's layout, match the size only
            mults = [w // widths[0] for w in widths]
            attention, layers, groups, extra = [False, False, False, True, False], 2, 8, {}
        from diffusers import UNet2DModel

        def build(w):
            return UNet2DModel(**diffusers_unet_kwargs([w * m for m in mults], attention, layers, groups, **extra))

        width, count = search_width(build, recipe["params"], groups)
        s["unet"] = diffusers_unet_kwargs([width * m for m in mults], attention, layers, groups, **extra)
        mapping["unet.block_out_channels"] = (f"base width {width}: parameter count {count:,}, the closest to the "
                                              f"recipe network's {recipe['params']:,}")
        prediction = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[recipe["objective"]]
        s["scheduler"]["prediction_type"] = prediction
        mapping["scheduler.prediction_type"] = f"recipe objective {recipe['objective']!r}"
        if recipe["schedule"] in DIFFUSERS_SCHEDULES:
            s["scheduler"]["beta_schedule"] = DIFFUSERS_SCHEDULES[recipe["schedule"]]
        else:
            s["scheduler"]["beta_schedule"] = "trained_betas"
            s["scheduler"]["lddpm_schedule"] = recipe["schedule"]  # betas taken from lddpm's NoiseSchedule
        mapping["scheduler.beta_schedule"] = f"recipe schedule {recipe['schedule']!r}"
        s["scheduler"]["num_train_timesteps"] = recipe["num_timesteps"]
        mapping["scheduler.num_train_timesteps"] = f"recipe num_timesteps {recipe['num_timesteps']}"
        if recipe["rescale_zero_terminal_snr"]:
            s["scheduler"]["rescale_betas_zero_snr"] = True
            mapping["scheduler.rescale_betas_zero_snr"] = "recipe rescale_zero_terminal_snr"
        if recipe["loss_weighting"] == "min_snr":
            s["snr_gamma"] = recipe["min_snr_gamma"]
            mapping["snr_gamma"] = (f"recipe loss_weighting min_snr, gamma {recipe['min_snr_gamma']}, with diffusers' "
                                    "--snr_gamma weights (examples/text_to_image: min(snr, gamma) / snr, / (snr + 1) for v)")
        s["optimizer"] = {"name": "AdamW", "lr": recipe["lr"], "betas": recipe["betas"],
                          "weight_decay": recipe["weight_decay"], "eps": 1e-8}
        mapping["optimizer"] = f"recipe lr {recipe['lr']}, betas {recipe['betas']}, weight decay {recipe['weight_decay']}"
        s["lr_scheduler"] = {"name": "constant_with_warmup", "num_warmup_steps": recipe["warmup_steps"]}
        mapping["lr_scheduler"] = f"recipe: linear warm-up over {recipe['warmup_steps']} steps, then constant"
        s["grad_clip"] = recipe["grad_clip"]
        mapping["grad_clip"] = f"recipe grad_clip {recipe['grad_clip']}"
        if recipe["ema_gamma"] > 0:
            s["ema"] = {"class": "EMAModel with the power-function decay", "gamma": recipe["ema_gamma"]}
            mapping["ema"] = (f"recipe ema_gamma {recipe['ema_gamma']}: EMAModel whose get_decay is lddpm's "
                              "(1 - 1/n)^(gamma + 1) at update n")
        else:
            s["ema"] = {"class": "diffusers.training_utils.EMAModel", "decay": recipe["ema_decay"],
                        "use_ema_warmup": False, "warmup": "(1 + n) / (10 + n)" if recipe["ema_warmup"] else "none"}
            if not recipe["ema_warmup"]:
                s["ema"]["min_decay"] = recipe["ema_decay"]
            mapping["ema"] = (f"recipe ema_decay {recipe['ema_decay']}, warm-up {recipe['ema_warmup']}: EMAModel's "
                              "non-power warm-up min(decay, (1 + n) / (10 + n)) is lddpm's")
        s["bf16"] = recipe["bf16"]
        mapping["bf16"] = f"recipe run.bf16 {recipe['bf16_setting']!r} resolved for this device: {recipe['bf16']}"
        if recipe["learned_variance"]:
            not_mapped["diffusion.learned_variance"] = "the example trains a fixed-variance model"
        if recipe["timestep_sampling"] != "uniform":
            not_mapped["diffusion.timestep_sampling"] = f"recipe {recipe['timestep_sampling']!r}; the example samples t uniformly"
        not_mapped.update(common_not_mapped(recipe))
    return {"settings": s, "sources": sources, "mapping": mapping, "not_mapped": not_mapped}


# ----------------------------------------------------------------------------- workers: train, pause, sample


class TrainClock:
    """Training seconds: runs while training, paused while sampling (CUDA work is waited for at each edge)."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.started = device, 0.0, None

    def _sync(self) -> None:
        """Wait for queued CUDA work, so the clock edges fall where the work does."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Run the clock."""
        self._sync()
        self.started = time.perf_counter()

    def stop(self) -> None:
        """Pause the clock."""
        self._sync()
        self.total += time.perf_counter() - self.started
        self.started = None

    @property
    def seconds(self) -> float:
        """Training seconds so far, the running interval included."""
        return self.total + (time.perf_counter() - self.started if self.started is not None else 0.0)


class RowCounter:
    """Counts the forward calls of one or more networks and the images they carry (forward hooks)."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls = self.rows = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules if m is not None]

    def _hook(self, module, inputs, output) -> None:
        """Count one call and its batch rows."""
        self.calls += 1
        self.rows += int(inputs[0].shape[0])

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


def timed_sampling(generate, num: int, batch: int, *networks: torch.nn.Module, device: torch.device) -> tuple[np.ndarray, dict]:
    """Run `generate(n, batch_index) -> uint8 (n, H, W, 1)` over N images; seconds per image and network
    evaluations per image (rows through every network given: the main one and an autoguidance guide)."""
    counter = RowCounter(*networks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            images = np.concatenate([generate(min(batch, num - i), i // batch) for i in range(0, num, batch)])
    finally:
        counter.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return images, {"sample_seconds": seconds, "seconds_per_image": seconds / num, "nfe_per_image": counter.rows / num,
                    "network_calls": counter.calls}


def open_train_loader(spec: dict):
    """lddpm's seeded loader over the prepared train cache: the batches lddpm's trainer draws, step for step."""
    from lddpm.data import ImageLoader, open_cache

    cache = open_cache(spec["train_cache"])
    return ImageLoader(cache, spec["batch"], seed=spec["seed"], rank=0, world_size=1, hflip=spec["hflip"]), len(cache)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked, else nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def save_samples(sampled: list[tuple[str, np.ndarray, dict]], out_dir: Path, mark: int) -> list[dict]:
    """Save each sampler's images of one mark; their records (sampler label, samples file, cost)."""
    records = []
    for j, (label, images, cost) in enumerate(sampled):
        path = out_dir / f"samples-mark{mark}-{j}.npz"
        np.savez_compressed(path, images=images)
        records.append({"sampler": label, "samples": str(path), **cost})
    return records


def peer_loop(spec: dict, clock: TrainClock, step_fn, sample_fn, out_dir: Path, log) -> list[dict]:
    """Train with `step_fn(x, step)` until each mark, pause the clock, sample with `sample_fn` (a list of (sampler
    label, images, cost), one per sampler), save; one record per mark."""
    loader, device = spec["_loader"], torch.device(spec["device_resolved"])
    records, step = [], 0
    for k, minutes in enumerate(spec["marks"]):
        while clock.seconds < 60.0 * minutes:
            x, _ = loader.batch(step)
            step_fn(x, step)
            step += 1
        clock.stop()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            sampled = sample_fn()  # the training random streams continue as if sampling had not happened
        records.append({"mark_minutes": minutes, "train_seconds": clock.total, "steps": step,
                        "images_seen": step * spec["batch"], "samplers": save_samples(sampled, out_dir, k)})
        log(f"mark {minutes:g} min: {step} steps in {clock.total:.1f} s of training, sampling "
            + ", ".join(f"{r['sampler']} {r['seconds_per_image']:.3f} s/image" for r in records[-1]["samplers"]))
        clock.start()
    clock.stop()
    return records


def run_lucidrains(spec: dict, out_dir: Path, log) -> dict:
    """denoising-diffusion-pytorch: its Unet and GaussianDiffusion in a loop that does what its Trainer does."""
    ddp = import_lucidrains()
    import ema_pytorch

    # its samplers wrap the step loop in a tqdm bar (one line per batch); the benchmark prints one line per mark
    sys.modules["denoising_diffusion_pytorch.denoising_diffusion_pytorch"].tqdm = lambda iterable, **kwargs: iterable

    device = torch.device(spec["device_resolved"])
    resolved = lucidrains_settings(spec["variant"], spec["recipe"], spec["quick"], spec["lucidrains_steps"])
    s = resolved["settings"]
    clock = TrainClock(device)
    torch.manual_seed(spec["seed"])
    clock.start()  # set-up counts: network, diffusion, optimizer, EMA, loader
    model = ddp.Unet(**lucidrains_unet_kwargs(s["unet"]))
    diffusion = ddp.GaussianDiffusion(model, **s["diffusion"]).to(device)
    o = s["optimizer"]
    opt_cls = torch.optim.Adam if o["name"] == "Adam" else torch.optim.AdamW
    opt = opt_cls(diffusion.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    warmup = s["lr_warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: lr_at(n, 1.0, warmup)) if warmup > 0 else None
    e = s["ema"]
    if e["class"] == "ema_pytorch.KarrasEMA":
        ema = ema_pytorch.KarrasEMA(diffusion, gamma=e["gamma"], update_every=e["update_every"])
    else:
        ema = ema_pytorch.EMA(diffusion, beta=e["beta"], update_every=e["update_every"],
                              update_after_step=e["update_after_step"], inv_gamma=e["inv_gamma"], power=e["power"])
    ema.to(device)
    spec["_loader"], _ = open_train_loader(spec)
    setup_seconds = clock.seconds
    params = sum(p.numel() for p in model.parameters())
    log(f"{params:,} parameters, set-up {setup_seconds:.2f} s")

    def step_fn(x, step):
        # Trainer.train: model(data) under the accelerator's autocast, backward, clip, Adam step, zero_grad, EMA update
        diffusion.train()
        with autocast(device, s["bf16"]):
            loss = diffusion((x.to(device) + 1) / 2)  # its auto_normalize maps [0, 1] back to the same [-1, 1] tensor
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), s["grad_clip"])
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        ema.update()

    def sample_fn():
        ema_diffusion = ema.ema_model
        ema_diffusion.eval()
        torch.manual_seed(spec["seed"])  # its samplers draw from the global generator

        def generate(n, _):
            return to_uint8(ema_diffusion.sample(batch_size=n) * 2 - 1)  # its samples are in [0, 1]

        sampler = f"DDIM (its own), {s['diffusion']['sampling_timesteps']} steps"
        return [(sampler, *timed_sampling(generate, spec["num"], spec["sample_batch"], ema_diffusion.model, device=device))]

    records = peer_loop(spec, clock, step_fn, sample_fn, out_dir, log)
    return {**resolved, "params": params, "setup_seconds": setup_seconds, "marks": records}


def import_lucidrains():
    """Import denoising_diffusion_pytorch; where torchvision is not installed, stand in for it during the import.

    The package imports `torchvision.transforms` and `torchvision.utils` at module level for its image-folder
    Dataset and Trainer only; the stand-ins leave sys.modules right after the import.
    """
    if "denoising_diffusion_pytorch" in sys.modules:
        return sys.modules["denoising_diffusion_pytorch"]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - installed, but built for another torch
        raise LddpmError(
            f"torchvision is installed but does not import beside torch {torch.__version__} ({exc}); it also breaks "
            "diffusers. Uninstall it (pip uninstall torchvision): this benchmark does not need it") from None
    else:
        return importlib.import_module("denoising_diffusion_pytorch")
    import accelerate  # noqa: F401 - its other imports load first, so only the package itself meets the stand-ins
    import einops  # noqa: F401
    import ema_pytorch  # noqa: F401
    names = ("torchvision", "torchvision.transforms", "torchvision.utils")
    stubs = {name: types.ModuleType(name) for name in names}
    for name, module in stubs.items():
        module.__getattr__ = lambda attr, name=name: _missing_torchvision(name, attr)
    stubs["torchvision"].transforms, stubs["torchvision"].utils = stubs["torchvision.transforms"], stubs["torchvision.utils"]
    sys.modules.update(stubs)
    try:
        return importlib.import_module("denoising_diffusion_pytorch")
    finally:
        for name in names:
            if sys.modules.get(name) is stubs[name]:
                del sys.modules[name]


def _missing_torchvision(module: str, attr: str):
    """What the stand-ins answer to any use."""
    raise AttributeError(f"{module}.{attr}: torchvision is not installed (this benchmark stands in for it only "
                         "while importing denoising_diffusion_pytorch)")


def power_ema_model(parameters, gamma: float):
    """diffusers' EMAModel with lddpm's power-function decay (1 - 1/n)^(gamma + 1) at update n (1-based)."""
    from diffusers.training_utils import EMAModel

    class PowerEMAModel(EMAModel):
        def get_decay(self, optimization_step: int) -> float:
            return power_ema_decay(max(optimization_step, 1) - 1, gamma)

    return PowerEMAModel(parameters, decay=1.0)


def diffusers_sample(unet, scheduler, n: int, steps: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """diffusers' denoising loop as its pipelines run it (DDPMPipeline's starting noise, scale_model_input, the
    scheduler's step, which gets the generator where it takes one: UniPC's does not); images in [-1, 1]."""
    import inspect

    from diffusers.utils.torch_utils import randn_tensor

    size = unet.config.sample_size
    x = randn_tensor((n, unet.config.in_channels, size, size), generator=generator, device=device, dtype=unet.dtype)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def diffusers_training(spec: dict, device: torch.device) -> types.SimpleNamespace:
    """diffusers' side of a run: UNet2DModel, DDPMScheduler, AdamW, LR schedule, EMA and the training step of
    examples/unconditional_image_generation under the variant's settings; `step(x)` trains on one batch."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    resolved = diffusers_settings(spec["variant"], spec["recipe"], spec["quick"], spec["diffusers_samplers"],
                                  spec["batch"], spec["num_train_images"])
    s = resolved["settings"]
    unet = UNet2DModel(**s["unet"]).to(device)
    sc = dict(s["scheduler"])
    if sc.get("beta_schedule") == "trained_betas":
        from lddpm.schedule import NoiseSchedule

        betas = NoiseSchedule.from_name(sc.pop("lddpm_schedule"), sc["num_train_timesteps"]).betas
        sc.pop("beta_schedule")
        sc["trained_betas"] = [float(b) for b in betas]
    noise_scheduler = DDPMScheduler(**sc)
    o = s["optimizer"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"],
                                  eps=o["eps"])
    ls = s["lr_scheduler"]
    lr_scheduler = get_scheduler(ls["name"], optimizer=optimizer, num_warmup_steps=ls["num_warmup_steps"],
                                 num_training_steps=ls.get("num_training_steps"))
    e = s["ema"]
    if "gamma" in e:
        ema = power_ema_model(unet.parameters(), e["gamma"])
    else:
        ema = EMAModel(unet.parameters(), decay=e["decay"], use_ema_warmup=e["use_ema_warmup"],
                       inv_gamma=e.get("inv_gamma", 1.0), power=e.get("power", 2 / 3), min_decay=e.get("min_decay", 0.0))
    ema.to(device)
    num_t = noise_scheduler.config.num_train_timesteps
    prediction = noise_scheduler.config.prediction_type

    def step(x):
        # the example's inner loop: noise, uniform t, add_noise, predict, MSE, backward, clip, step, LR step, zero_grad, EMA
        unet.train()
        clean = x.to(device)
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, num_t, (clean.shape[0],), device=device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with autocast(device, s["bf16"]):
            out = unet(noisy, timesteps).sample
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = noise_scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = clean
        if prediction == "sample" and s["snr_gamma"] is None:  # the example's x0 loss: SNR-weighted
            snr = compute_snr(noise_scheduler, timesteps)
            loss = (snr.view(-1, 1, 1, 1) * F.mse_loss(out.float(), target.float(), reduction="none")).mean()
        elif s["snr_gamma"] is not None:  # diffusers' --snr_gamma (Min-SNR, Hang et al. 2023) weights
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=s["snr_gamma"])
            weights = weights / (snr + 1) if prediction == "v_prediction" else (weights if prediction == "sample" else weights / snr)
            per = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per * weights).mean()
        else:
            loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), s["grad_clip"])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())

    return types.SimpleNamespace(unet=unet, ema=ema, noise_scheduler=noise_scheduler, step=step, settings=s, resolved=resolved)


def run_diffusers(spec: dict, out_dir: Path, log) -> dict:
    """diffusers: UNet2DModel + DDPMScheduler trained as examples/unconditional_image_generation does."""
    import diffusers

    device = torch.device(spec["device_resolved"])
    clock = TrainClock(device)
    torch.manual_seed(spec["seed"])
    clock.start()  # set-up counts: network, scheduler, optimizer, EMA, loader
    d = diffusers_training(spec, device)
    unet, ema, noise_scheduler, s, resolved = d.unet, d.ema, d.noise_scheduler, d.settings, d.resolved
    spec["_loader"], _ = open_train_loader(spec)
    setup_seconds = clock.seconds
    params = sum(p.numel() for p in unet.parameters())
    log(f"{params:,} parameters, set-up {setup_seconds:.2f} s")

    def step_fn(x, step):
        d.step(x)

    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)

    def sample_fn():
        ema.copy_to(ema_unet.parameters())
        sampled = []
        for row in s["samplers"]:
            scheduler = getattr(diffusers, row["scheduler"]).from_config(noise_scheduler.config, **row["config"])
            generator = torch.Generator(device="cpu").manual_seed(spec["seed"])  # the same noise for every row

            def generate(n, _, scheduler=scheduler, generator=generator, steps=row["num_inference_steps"]):
                return to_uint8(diffusers_sample(ema_unet, scheduler, n, steps, generator, device))

            sampled.append((row["label"], *timed_sampling(generate, spec["num"], spec["sample_batch"], ema_unet,
                                                          device=device)))
        return sampled

    records = peer_loop(spec, clock, step_fn, sample_fn, out_dir, log)
    if any("guide" in item["options"] for item in spec.get("lddpm_samplers", ())):
        resolved["not_mapped"]["autoguidance"] = (
            "lddpm's guide=F rows (autoguidance by the run's own earlier checkpoint, with the guidance interval) have "
            "no counterpart here: diffusers' guiders.AutoGuidance perturbs the main network by skipping its layers "
            "inside modular pipelines, and UNet2DModel's pipelines take no guide network")
    return {**resolved, "params": params, "setup_seconds": setup_seconds, "marks": records}


def guide_minutes(mark: float, fraction: float) -> float:
    """When the guide of `mark` is saved: that fraction of the mark, to 0.01 minute (so 1/3 of 30 is the 10 mark)."""
    return max(round(mark * fraction, 2), 0.01)


def lddpm_plan(spec: dict, out_dir: Path, cooldown: float) -> list[tuple[Path, float | None, list[float], set[float]]]:
    """lddpm's runs: (run folder, its whole budget in minutes or None, its stops in minutes, which stops are guides).

    Without a cool-down one run is resumed from stop to stop (run.max_minutes = each stop): the marks and the guide
    checkpoints at F x each mark. With optim.cooldown > 0 the learning rate depends on the run's budget, so each
    mark is its own run (run.max_minutes = the mark, out_dir/run-<mark>min) that stops at its guide times."""
    fractions = sorted({item["options"]["guide"] for item in spec["lddpm_samplers"] if "guide" in item["options"]})
    if cooldown > 0:
        plan = []
        for m in spec["marks"]:
            guides = {guide_minutes(m, f) for f in fractions}
            plan.append((out_dir / f"run-{m:g}min", m, sorted(guides | {m}), guides))
        return plan
    guides = {guide_minutes(m, f) for m in spec["marks"] for f in fractions}
    return [(out_dir / "run", None, sorted(set(spec["marks"]) | guides), guides)]


def sample_lddpm_mark(spec: dict, run_dir: Path, minutes: float, meta: dict, outside: float,
                      saved: dict[tuple[Path, float], Path], out_dir: Path, mark_index: int, log) -> tuple[dict, int]:
    """Sample every lddpm sampler row from the run at one mark (guides from `saved`); the mark's record and the
    network's parameter count."""
    import lddpm
    from lddpm.checkpoint import load_checkpoint

    device = torch.device(spec["device_resolved"])
    pipe = lddpm.load_pipeline(run_dir, device=device)
    sampled = []
    for item in spec["lddpm_samplers"]:
        o = dict(item["options"])
        fraction, scale, interval = o.pop("guide", None), o.pop("guide_scale", 1.0), o.pop("interval", None)
        guide = saved[run_dir, guide_minutes(minutes, fraction)] if fraction is not None else None
        pipe.set_guide(guide)

        def generate(n, index, item=item, o=o, scale=scale, interval=interval):
            images, _ = pipe.generate(n, sampler=item["name"], num_steps=item["steps"], sampler_options=o or None,
                                      guide_scale=float(scale), guidance_interval=interval_from_json(interval),
                                      seed=spec["seed"] * 1_000_003 + index, batch_size=n, progress=False)
            return images

        images, cost = timed_sampling(generate, spec["num"], spec["sample_batch"], pipe.model, pipe.guide, device=device)
        if guide is not None:
            cost.update(guide_checkpoint=str(guide), guide_step=int(load_checkpoint(guide).meta["step"]))
        sampled.append((item["label"], images, cost))
    pipe.set_guide(None)
    record = {"mark_minutes": minutes, "train_seconds": float(meta["wall_time"]), "steps": int(meta["step"]),
              "images_seen": int(meta["images_seen"]), "call_seconds": outside, "bf16": meta.get("bf16"),
              "run": run_dir.name, "samplers": save_samples(sampled, out_dir, mark_index)}
    log(f"mark {minutes:g} min: {meta['step']} steps in {meta['wall_time']:.1f} s of training (call {outside:.1f} s), "
        "sampling " + ", ".join(f"{r['sampler']} {r['seconds_per_image']:.3f} s/image" for r in record["samplers"]))
    return record, sum(p.numel() for p in pipe.model.parameters())


def run_lddpm(spec: dict, out_dir: Path, log) -> dict:
    """lddpm: its recipe preset trained with train_diffusion and run.max_minutes (`lddpm_plan`).

    A sampler with guide=F is autoguided (Karras et al. 2024) by the same run's checkpoint at F x the mark: the
    run also stops there (resuming costs its set-up again, inside its clock) and that checkpoint is copied aside.
    """
    import shutil

    import lddpm
    from lddpm.checkpoint import load_checkpoint, resolve_checkpoint

    guide_dir = out_dir / "guides"
    base = lddpm_overrides(spec)
    plan = lddpm_plan(spec, out_dir, lddpm.load_config(spec["lddpm_preset"], base).optim.cooldown)
    saved: dict[tuple[Path, float], Path] = {}  # (run folder, stop minutes) -> checkpoint copy
    records = []
    for run_dir, budget, stops, guides in plan:
        for k, minutes in enumerate(stops):
            config = lddpm.load_config(spec["lddpm_preset"], base + [f"run.max_minutes={budget or minutes}"])
            start = time.perf_counter()
            # it stops itself: at run.max_minutes, or (a budgeted run's guide times) at stop_minutes
            lddpm.train_diffusion(config, run_dir, resume=k > 0, progress=False,
                                  stop_minutes=minutes if budget and minutes < budget else None)
            outside = time.perf_counter() - start
            meta = load_checkpoint(run_dir).meta
            if minutes in guides:
                guide_dir.mkdir(exist_ok=True)
                name = f"{budget:g}-{minutes:g}min.pt" if budget else f"{minutes:g}min.pt"
                saved[run_dir, minutes] = Path(shutil.copy2(resolve_checkpoint(run_dir), guide_dir / name))
                log(f"guide checkpoint at {minutes:g} min: step {meta['step']}")
            if not (minutes == budget if budget else minutes in spec["marks"]):
                continue
            record, params = sample_lddpm_mark(spec, run_dir, minutes, meta, outside, saved, out_dir, len(records), log)
            records.append(record)
    budgets = ("run.max_minutes = the mark: one run per mark, since optim.cooldown ties the learning rate to the "
               "run's budget" if plan[0][1] else "run.max_minutes = each mark in turn (the checkpoints' cumulative wall_time)")
    return {"settings": {"preset": spec["lddpm_preset"], "overrides": base, "config": meta["config"]},
            "sources": {"settings": f"lddpm preset {spec['lddpm_preset']!r} with the overrides listed; {budgets}",
                        "samplers": "each row's lddpm sampler, steps and options; guide=F: autoguidance by the same "
                                    "run's checkpoint at F x the mark (its training time is inside the mark's)"},
            "mapping": {}, "not_mapped": {}, "params": params, "setup_seconds": None, "marks": records}


def speed_check(spec: dict, rounds: int, block: int = 5, warmup: int = 3) -> dict:
    """lddpm's trainer step (the recipe as the peers run trains it) and diffusers' tuned training step, timed in
    turn in this process: `rounds` blocks of `block` steps each after `warmup` steps, so that both see the same
    machine; medians of the per-step wall and CPU time over the blocks. No sampling, no scoring."""
    import lddpm
    from lddpm.train.diffusion import DiffusionTrainer

    device = torch.device(spec["device_resolved"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DiffusionTrainer(lddpm.load_config(spec["lddpm_preset"], lddpm_overrides(spec)), Path(tmp) / "run",
                                   progress=False)
        trainer.prepare()
        peer = dict(spec, variant="tuned")
        torch.manual_seed(spec["seed"])
        d = diffusers_training(peer, device)
        loader, _ = open_train_loader(peer)
        taken = [0]

        def diffusers_step() -> None:
            x, _ = loader.batch(taken[0])
            d.step(x)
            taken[0] += 1

        steps = {"lddpm": trainer.train_step, "diffusers": diffusers_step}
        for step in steps.values():
            for _ in range(warmup):
                step()
        wall: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(block):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall[name].append((time.perf_counter() - w0) / block)
                cpu[name].append((time.process_time() - c0) / block)
    med = {name: {"wall_s_per_step": statistics.median(wall[name]), "cpu_s_per_step": statistics.median(cpu[name]),
                  "images_per_s": spec["batch"] / statistics.median(wall[name]),
                  "wall_s_blocks": wall[name], "cpu_s_blocks": cpu[name]} for name in steps}
    return {"rounds": rounds, "block": block, "warmup": warmup, "systems": med,
            "lddpm_over_diffusers_images_wall": med["diffusers"]["wall_s_per_step"] / med["lddpm"]["wall_s_per_step"],
            "lddpm_over_diffusers_images_cpu": med["diffusers"]["cpu_s_per_step"] / med["lddpm"]["cpu_s_per_step"]}


RUNNERS = {"lddpm": run_lddpm, "lucidrains": run_lucidrains, "diffusers": run_diffusers}


def run_worker(spec: dict) -> dict:
    """Train and sample one (system, variant); write and return its result (samples are in files)."""
    out_dir = Path(spec["run_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"[{spec['system']}/{spec['variant']}]"

    def log(message: str) -> None:
        print(f"{tag} {message}", flush=True)

    result = RUNNERS[spec["system"]](spec, out_dir, log)
    result.update(system=spec["system"], variant=spec["variant"], torch_threads=torch.get_num_threads(),
                  device=spec["device_resolved"])
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


# ----------------------------------------------------------------------------- the parent: runs, scores, table


def run_one(spec: dict, in_process: bool) -> dict:
    """One (system, variant) in a subprocess (default) or here; a failure becomes an `error` entry, not an exit."""
    spec_path = Path(spec["run_dir"]) / "spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    try:
        if in_process:
            return run_worker(json.loads(spec_path.read_text()))
        import lddpm  # the worker imports the same lddpm as this process

        src = str(Path(lddpm.__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH", "")] if p))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the worker exited with status {proc.returncode} (its output is above)")
        return json.loads((Path(spec["run_dir"]) / "result.json").read_text())
    except Exception as exc:  # noqa: BLE001 - one failed system must not lose the others' results
        print(f"[{spec['system']}/{spec['variant']}] failed: {type(exc).__name__}: {exc}", flush=True)
        return {"system": spec["system"], "variant": spec["variant"], "error": f"{type(exc).__name__}: {exc}", "marks": []}


def score_marks(result: dict, reference, extractor) -> None:
    """FID / KID / precision / recall of each mark's samples against the test-split reference (in place)."""
    from lddpm.evaluate import evaluate_generated

    for record in (r for mark in result["marks"] for r in mark["samplers"]):
        images = np.load(record["samples"])["images"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # N <= 2048: rank-deficient covariance, shared by every row
            m = evaluate_generated(images, reference_stats=reference, extractor=extractor)
        record.update({k: m.get(k) for k in ("fid", "kid", "kid_std", "precision", "recall", "full_rank_covariance")},
                      num_scored=int(len(images)))


def table_rows(report: dict) -> list[dict]:
    """One row per (system, variant, mark), plus the real-data floor."""
    rows = []
    for run in report["runs"]:
        if run.get("error"):
            rows.append({"system": run["system"], "variant": run["variant"], "error": run["error"]})
            continue
        for r in run["marks"]:
            for x in r["samplers"]:
                rows.append({
                    "system": run["system"], "variant": run["variant"], "mark_minutes": r["mark_minutes"],
                    "params": run["params"], "train_seconds": r["train_seconds"],
                    "train_images_per_s": r["images_seen"] / r["train_seconds"] if r["train_seconds"] else None,
                    "images_seen": r["images_seen"], "steps": r["steps"], "sampler": x["sampler"],
                    "nfe_per_image": x["nfe_per_image"], "seconds_per_image": x["seconds_per_image"],
                    "fid": x.get("fid"), "kid_x1e3": None if x.get("kid") is None else 1e3 * x["kid"],
                })
    return rows


def portable(obj: Any, work: Path, home: Path | None = None) -> Any:
    """`obj` with machine paths written portably: the work folder as WORK, the home folder as ~ (the JSON is
    committed; the sample files it names stay in the work folder)."""
    home = Path.home() if home is None else home
    if isinstance(obj, dict):
        return {k: portable(v, work, home) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, work, home) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(work), "WORK").replace(str(home), "~")
    return obj


def fmt(value, spec: str, empty: str = "-") -> str:
    """format(value, spec), or `empty` for None."""
    return empty if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """The results as a Markdown table with the settings and notes that qualify it."""
    floor = report.get("real_data_floor") or {}
    lines = [
        f"# lddpm vs peers at equal training time ({DATASET} {RESOLUTION}x{RESOLUTION}, unconditional)",
        "",
        f"N = {report['num']} samples per cell, scored against {report['num']} test-split images (FID, KID with "
        f"lddpm's pinned Inception network); batch {report['batch']}; marks {', '.join(f'{m:g}' for m in report['marks'])} "
        f"training minutes; {'subprocess per run' if not report['in_process'] else 'one process'}; "
        f"torch threads {report['environment']['threads']}."
        + (" **--quick smoke run: 8-wide networks, marks of seconds; the numbers mean nothing.**" if report["quick"] else ""),
        "",
        "| system | variant | mark (min) | params | train img/s | images seen | sampler | NFE | s/image | FID | KID x1e3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['variant']} | failed: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r['system']} | {r['variant']} | {r['mark_minutes']:g} | {r['params']:,} | {fmt(r['train_images_per_s'], '.1f')} "
            f"| {r['images_seen']:,} | {r['sampler']} | {fmt(r['nfe_per_image'], '.0f')} | {fmt(r['seconds_per_image'], '.4f')} "
            f"| {fmt(r['fid'], '.2f')} | {fmt(r['kid_x1e3'], '.2f')} |")
    if floor:
        lines.append(f"| real data (train split) | - | - | - | - | - | - | - | - | {fmt(floor.get('fid'), '.2f')} "
                     f"| {fmt(None if floor.get('kid') is None else 1e3 * floor['kid'], '.2f')} |")
    lines += ["", "Train img/s = images seen / training seconds (set-up included). What each peer variant set, and from "
              "where, is in the JSON (`runs[].settings`, `sources`, `mapping`, `not_mapped`).", ""]
    for run in report["runs"]:
        if run.get("mapping"):
            lines.append(f"- {run['system']} tuned, from lddpm's recipe: " + "; ".join(f"{k}: {v}" for k, v in run["mapping"].items()))
        if run.get("not_mapped"):
            lines.append(f"- {run['system']} {run['variant']}, not mapped: " + "; ".join(f"{k}: {v}" for k, v in run["not_mapped"].items()))
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    """The table on stdout."""
    head = f"{'system':<11}{'variant':<9}{'mark':>6}{'params':>12}{'img/s':>9}{'seen':>10}  {'sampler | NFE':<36}{'s/img':>8}{'FID':>9}{'KIDx1e3':>9}"
    print(head)
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['system']:<11}{r['variant']:<9} failed: {r['error']}")
            continue
        sampler = f"{r['sampler']} | {fmt(r['nfe_per_image'], '.0f')}"
        print(f"{r['system']:<11}{r['variant']:<9}{r['mark_minutes']:>6g}{r['params']:>12,}{fmt(r['train_images_per_s'], '.1f'):>9}"
              f"{r['images_seen']:>10,}  {sampler[:36]:<36}{fmt(r['seconds_per_image'], '.4f'):>8}{fmt(r['fid'], '.2f'):>9}"
              f"{fmt(r['kid_x1e3'], '.2f'):>9}")
    floor = report.get("real_data_floor")
    if floor:
        print(f"real data (train split, N={floor['num']}): FID {fmt(floor.get('fid'), '.2f')}, "
              f"KID x1e3 {fmt(None if floor.get('kid') is None else 1e3 * floor['kid'], '.2f')}")


def write_speed(args: argparse.Namespace, spec: dict) -> dict:
    """--speed: the interleaved step timing, printed and written to --out."""
    report = {"benchmark": "peers-speed", "batch": args.batch, "seed": args.seed, "quick": args.quick,
              "environment": {**environment(), "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "")
                              else "default", "device": spec["device_resolved"]},
              "recipe": spec["recipe"], **speed_check(spec, args.speed)}
    for name, row in report["systems"].items():
        print(f"{name:<10} {1000 * row['wall_s_per_step']:8.1f} ms/step  {row['images_per_s']:7.1f} images/s  "
              f"CPU {1000 * row['cpu_s_per_step']:8.1f} ms/step")
    print(f"lddpm / diffusers training images per second: {report['lddpm_over_diffusers_images_wall']:.3f}x (wall), "
          f"{report['lddpm_over_diffusers_images_cpu']:.3f}x (CPU time)")
    write_json(report, Path(args.out))
    return report


def main(argv: list[str] | None = None) -> dict | None:
    """Parse arguments; run each (system, variant); score; print the table; write JSON and Markdown."""
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(Path(args.worker).read_text()))
        return None
    from lddpm.data import default_cache_dir, prepare
    from lddpm.data.cache import test_split
    from lddpm.distributed import resolve_device
    from lddpm.evaluate import load_extractor, real_data_floor, reference_stats

    work = Path(args.work) if args.work else None  # a new temporary folder once the runs need one (--speed does not)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    runs = [("lddpm", "recipe")] if "lddpm" in args.systems else []
    runs += [(s, v) for s in args.systems if s != "lddpm" for v in args.variants]
    taken = [f"{s}-{v}" for s, v in runs if work is not None and (work / f"{s}-{v}").exists()]
    if taken:
        sys.exit(f"error: {work} already holds run folders {', '.join(taken)}; choose another --work or remove them")
    device = resolve_device(args.device)
    # the train cache is prepared before any clock starts, so no system pays the one-off preprocessing
    train_cache = prepare(DATASET, resolution=RESOLUTION, split="train", root=args.data_root, cache_dir=cache_dir, progress=False)
    base_spec = {"batch": args.batch, "seed": args.seed, "num": args.num, "sample_batch": args.sample_batch,
                 "marks": args.minutes, "quick": args.quick, "device": args.device, "device_resolved": str(device),
                 "cache_dir": str(cache_dir), "data_root": args.data_root, "train_cache": str(train_cache),
                 "lddpm_preset": args.lddpm_preset, "lddpm_set": args.lddpm_set, "lddpm_samplers": args.lddpm_samplers,
                 "lucidrains_steps": args.lucidrains_steps, "diffusers_samplers": args.diffusers_samplers}
    recipe = recipe_summary(base_spec)
    from lddpm.data import open_cache

    base_spec.update(recipe=recipe, hflip=recipe["hflip"], num_train_images=len(open_cache(train_cache)))
    if args.speed:
        return write_speed(args, base_spec)
    work = work or Path(tempfile.mkdtemp(prefix="lddpm-peers-"))
    env = {**environment(), "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default",
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    versions = {}
    for package in ("diffusers", "denoising_diffusion_pytorch", "ema_pytorch", "lddpm"):
        with contextlib.suppress(Exception):
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
    report: dict[str, Any] = {
        "benchmark": "peers", "dataset": DATASET, "resolution": RESOLUTION, "conditional": False,
        "num": args.num, "batch": args.batch, "marks": args.minutes, "seed": args.seed, "quick": args.quick,
        "in_process": args.in_process, "isolation": "one process" if args.in_process else "subprocess per (system, variant)",
        "work": str(work), "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "environment": {**env, "device": str(device), "versions": versions}, "recipe": recipe,
        "reference": {"dataset": DATASET, "split": test_split(DATASET), "num": args.num},
        "runs": [], "rows": [],
    }
    out = Path(args.out)

    def write() -> None:
        report["rows"] = table_rows(report)
        write_json(portable(report, work), out)
        out.with_suffix(".md").write_text(markdown(report))

    extractor = load_extractor(args.inception, batch_size=50, device=str(device), backend=args.feature_backend,
                               cache_dir=cache_dir)
    reference = reference_stats(DATASET, split=test_split(DATASET), num=args.num, resolution=RESOLUTION,
                                extractor=extractor, cache_dir=cache_dir, data_root=args.data_root, progress=False)
    report["feature_network"] = extractor.info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report["real_data_floor"] = real_data_floor(DATASET, reference=reference, split="train", num=args.num,
                                                    resolution=RESOLUTION, extractor=extractor, cache_dir=cache_dir,
                                                    data_root=args.data_root, progress=False)
    for system, variant in runs:
        spec = {**base_spec, "system": system, "variant": variant, "run_dir": str(work / f"{system}-{variant}")}
        result = run_one(spec, args.in_process)
        if not result.get("error"):
            score_marks(result, reference, extractor)
        report["runs"].append(result)
        write()
    print_table(report)
    print(f"wrote {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    try:
        main()
    except LddpmError as exc:
        sys.exit(f"error: {exc}")
