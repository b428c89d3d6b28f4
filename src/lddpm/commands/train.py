"""CLI commands `lddpm train`, `lddpm train-vae` and `lddpm sample`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lddpm.commands.sampler_flags import SAMPLER_NAMES, add_sampler_flags, sampler_options
from lddpm.errors import LddpmError


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML file or preset name (optional with --resume: the run's own config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting; VALUE is a TOML literal (repeatable), e.g. --set run.steps=200")
    parser.add_argument("--out", help="run folder (default: run.out from the config)")
    parser.add_argument("--resume", action="store_true", help="continue the run folder from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars; only the final summary")
    parser.add_argument("--nproc", type=int, default=1,
                        help="train with N processes (DDP through torchrun; gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="with --nproc: torchrun restarts the processes up to N times after one fails; "
                             "they resume from the last checkpoint")


def register(subparsers) -> None:
    """Add `train`, `train-vae` and `sample` to the `lddpm` parser."""
    p = subparsers.add_parser("train", help="train a diffusion model (pixel space or on a VAE's latents)",
                              description="Train a diffusion model. Stop with Ctrl-C (a checkpoint is written); "
                                          "continue with --resume.")
    _add_train_arguments(p)
    p.set_defaults(func=_train, task="diffusion")

    p = subparsers.add_parser("train-vae", help="train the KL autoencoder for latent diffusion",
                              description="Train the KL autoencoder; its latent scaling factor is estimated "
                                          "at the end and stored in the final checkpoint.")
    _add_train_arguments(p)
    p.set_defaults(func=_train, task="vae")

    p = subparsers.add_parser("sample", help="generate images from a trained run",
                              description="Generate images from a run folder or checkpoint (EMA weights).")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--sampler", default="ddim", help=f"{', '.join(SAMPLER_NAMES)} (default ddim; docs/samplers.md)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: ddpm T, ddim / euler 50, heun 18, dpm++2m-sde 25, others 20)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale s in eps_u + s (eps_c - eps_u); 1 = none")
    add_guidance_arguments(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--class", dest="class_index", type=int, default=None, help="class index for every image")
    group.add_argument("--class-name", default=None, help="class name for every image")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text runs: what to draw (every image)")
    prompt.add_argument("--prompts", default=None, metavar="FILE",
                        help="text runs: a file of prompts (one per line, or JSONL with a `prompt` field); "
                             "--num images each, one grid row per prompt")
    p.add_argument("--negative-prompt", default=None,
                   help="text runs: what to steer away from; replaces the null prompt \"\" of guidance")
    p.add_argument("--num", type=int, default=16, help="number of images (per prompt with --prompts; default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="grid PNG (default samples.png unless --out-dir is given)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image here")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_bf16_argument(p)
    p.add_argument("--quiet", action="store_true")
    add_sampler_flags(p)
    p.set_defaults(func=_sample)


def add_bf16_argument(p: argparse.ArgumentParser) -> None:
    """`--bf16 false|true|auto`: the network under bf16 autocast while sampling."""
    p.add_argument("--bf16", default="false", metavar="false|true|auto",
                   help="run the network under bf16 autocast while sampling (auto: where the device has native bf16, "
                        "e.g. CPUs with AMX, where it is ~2x faster); default false")


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    """`--guide RUN_OR_CKPT`, `--guide-scale W`, `--guidance-interval LO HI` (docs/guidance.md)."""
    p.add_argument("--guide", default=None, metavar="RUN_OR_CKPT",
                   help="autoguidance: the guide network, a run folder or checkpoint file trained with the same "
                        "diffusion, data and conditioning (e.g. the fashion-guide preset); needs --guide-scale")
    p.add_argument("--guide-scale", type=float, default=1.0, metavar="W",
                   help="autoguidance scale w in D_guide + w (D_main - D_guide); 1 = none (Karras et al. 2024)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide (CFG and autoguidance) only at noise levels sigma in [LO, HI], sigma = "
                        "sqrt((1 - abar) / abar); one unguided evaluation elsewhere (Kynkaanniemi et al. 2024)")


def sampling_spec_from_args(args: argparse.Namespace, **extra):
    """The SamplingSpec of `lddpm sample` / `lddpm eval` from their arguments (checked first, flag by flag; the
    sampler option flags --grid, --sigma-min, ... against the sampler)."""
    from lddpm import checks
    from lddpm.distributed import bf16_flag
    from lddpm.sampling import SamplingSpec

    checks.finite_number("--guidance-scale", args.guidance_scale)
    checks.finite_number("--guide-scale", args.guide_scale)
    checks.finite_number("--eta", args.eta)
    if args.guide is not None and args.guide_scale == 1.0:
        raise LddpmError("--guide without --guide-scale does nothing; give --guide-scale W (w != 1, e.g. 2)")
    if args.guide is None and args.guide_scale != 1.0:
        raise LddpmError(f"--guide-scale {args.guide_scale:g} needs a guide network: --guide RUN_OR_CKPT")
    return SamplingSpec(sampler=args.sampler, num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                        guide=args.guide, guide_scale=args.guide_scale, guidance_interval=args.guidance_interval,
                        negative_prompt=args.negative_prompt, seed=args.seed, batch_size=args.batch_size,
                        bf16=bf16_flag(args.bf16), sampler_options=sampler_options(args) or None, **extra)


def _spawn_torchrun(args: argparse.Namespace) -> int:
    """Re-run this command under `python -m torch.distributed.run` with N processes."""
    cleaned = ["train" if args.task == "diffusion" else "train-vae"]
    cleaned += [args.config] if args.config else []
    for item in args.overrides:
        cleaned += ["--set", item]
    cleaned += ["--out", args.out] if args.out else []
    cleaned += ["--resume"] if args.resume else []
    cleaned += ["--quiet"] if args.quiet else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               f"--max-restarts={args.max_restarts}", "-m", "lddpm", *cleaned]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(command, env=env)


def _train(args: argparse.Namespace) -> int:
    from lddpm.config import load_config

    if args.nproc < 1:
        raise LddpmError(f"--nproc must be >= 1, got {args.nproc}")
    if args.max_restarts < 0 or (args.max_restarts and args.nproc == 1):
        raise LddpmError(f"--max-restarts {args.max_restarts}: give a count >= 0, with --nproc N > 1 (torchrun restarts "
                         "its processes)")
    if args.nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise LddpmError("--nproc cannot be used inside torchrun; drop it")
        return _spawn_torchrun(args)
    source = args.config
    if source is None:
        if not (args.resume and args.out):
            raise LddpmError("give a CONFIG (TOML file or preset), or --resume --out RUN_DIR to continue a run")
        source = Path(args.out) / "config.toml"
    config = load_config(source, args.overrides)
    run_dir = Path(args.out or config.run.out)
    from lddpm.train import train, train_vae

    start = time.time()
    fn = train if args.task == "diffusion" else train_vae
    result = fn(config, run_dir, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        took = time.time() - start
        if result.get("already_finished"):
            print(f"nothing to do: {run_dir} finished at step {result['step']} (checkpoint {result['checkpoint']}, "
                  "left as it is); raise run.steps (--set run.steps=N) to train it longer")
        elif result["stopped"]:
            print(f"stopped at step {result['step']}; checkpoint {result['checkpoint']}\n"
                  f"continue with: lddpm {'train' if args.task == 'diffusion' else 'train-vae'} --resume --out {run_dir}")
        else:
            print(f"trained {run_dir} to step {result['step']} in {took:.1f} s (last loss {result['loss']:.4f}); "
                  f"checkpoint {result['checkpoint']}")
    return 0


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a JSONL file (a `prompt` or `text` field per line)."""
    from lddpm.evaluate import read_prompt_records

    return [r["prompt"] for r in read_prompt_records(path)]


# PNG output is estimated at a quarter of the raw pixels (diffusion samples rarely compress better), at least
# one file-system block per file: a count refused by this estimate cannot fit.
PNG_COMPRESSION_ALLOWANCE = 4


def _check_sample_space(args: argparse.Namespace, pipeline) -> None:
    """Refuse --num whose PNG files cannot fit the free disk, before sampling starts."""
    from lddpm.io import existing_parent, require_free_space

    raw = args.num * pipeline.resolution * pipeline.resolution * pipeline.channels
    fix = "lower --num, free some space or write elsewhere"
    if args.out_dir:
        block = os.statvfs(existing_parent(args.out_dir)).f_frsize if hasattr(os, "statvfs") else 4096
        per_image = max(block, raw // args.num // PNG_COMPRESSION_ALLOWANCE)
        require_free_space(args.out_dir, args.num * per_image, f"--num {args.num} PNG files", fix)
    out = args.out if args.out or args.out_dir else "samples.png"
    if out:
        require_free_space(Path(out).parent, raw // PNG_COMPRESSION_ALLOWANCE, f"a grid of --num {args.num} images", fix)


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from lddpm.distributed import resolve_device
    from lddpm.grid import save_grid
    from lddpm.pipeline import load_pipeline

    from lddpm import checks

    if args.num < 1:
        raise LddpmError(f"--num must be >= 1, got {args.num}")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--nrow", args.nrow)):
        if value is not None:
            checks.int_in_range(flag, value, 1)
    spec = sampling_spec_from_args(args)
    device = resolve_device(args.device)
    pipeline = load_pipeline(args.run, device=device, use_ema=not args.no_ema, bf16=spec.bf16, guide=spec.guide)
    _check_sample_space(args, pipeline)
    labels = None
    if args.class_name is not None:
        labels = pipeline.class_index(args.class_name)
    elif args.class_index is not None:
        if not pipeline.num_classes:
            raise LddpmError("this model is unconditional: --class needs a class-conditional run")
        if not 0 <= args.class_index < pipeline.num_classes:
            raise LddpmError(f"--class {args.class_index} is out of range; choose 0..{pipeline.num_classes - 1}")
        labels = args.class_index
    prompts = None
    if args.prompts is not None:
        prompts = [p for p in read_prompt_file(args.prompts) for _ in range(args.num)]
    elif args.prompt is not None:
        prompts = [args.prompt] * args.num
    start = time.time()
    images, out_labels = pipeline.generate(len(prompts) if prompts else args.num, spec, labels=labels,
                                           progress=not args.quiet, prompts=prompts)
    took = time.time() - start
    written = []
    out = args.out if args.out or args.out_dir else "samples.png"
    if out and prompts is not None:  # one row per prompt, labelled with it
        from lddpm.grid import prompt_grid
        from lddpm.io import write_png

        written.append(str(write_png(out, prompt_grid(images, prompts, per_prompt=args.num))))
    elif out:
        nrow = args.nrow or int(np.ceil(np.sqrt(len(images))))
        written.append(str(save_grid(images, out, nrow=nrow)))
    if args.out_dir:
        from lddpm.io import write_png

        folder = Path(args.out_dir)
        for i, image in enumerate(images):
            suffix = f"_class{int(out_labels[i])}" if out_labels is not None else ""
            write_png(folder / f"{i:05d}{suffix}.png", image)  # atomic; a full disk is one clear error
        written.append(f"{folder}/ ({len(images)} files)")
    print(f"{len(images)} images with {args.sampler} ({args.steps or 'default'} steps) in {took:.1f} s "
          f"({took / len(images):.3f} s/image) -> {', '.join(written)}")
    return 0
