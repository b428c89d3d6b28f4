"""CLI commands `lddpm edit` (image-to-image), `inpaint`, `upscale` and `denoise` over a trained run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lddpm.errors import LddpmError


def _common(p: argparse.ArgumentParser, *, sampler: str, labels: bool = True, prompts: bool = True) -> None:
    """Arguments every editing command shares: the run, the inputs, sampling, conditioning, output."""
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("inputs", nargs="+", metavar="IMAGE",
                   help="PNG files, or .npz files with an `images` array (uint8 (N,H,W[,C]) or float in [-1, 1])")
    p.add_argument("--sampler", default=sampler, help=f"any registered sampler, e.g. ddpm, ddim, dpm++2m, euler, heun "
                   f"(sigma-space ones on the schedule's time grid; default {sampler})")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale s (1 = none); needs --class or --prompt")
    if labels:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--class", dest="class_index", type=int, default=None,
                           help="class index for every image (default: the null label, no class)")
        group.add_argument("--class-name", default=None, help="class name for every image")
    if prompts:
        p.add_argument("--prompt", default=None, help="text runs: the prompt for every image (default: none)")
        p.add_argument("--negative-prompt", default=None, help="text runs: replaces the null prompt of guidance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="edited", help="folder for one PNG per output and grid.png (default edited)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true")


def register(subparsers) -> None:
    """Add `edit`, `inpaint`, `upscale` and `denoise` to the `lddpm` parser."""
    p = subparsers.add_parser("edit", help="image-to-image: noise images to a strength and denoise them (SDEdit)",
                              description="Image-to-image with SDEdit (Meng et al. 2022): each image is noised to "
                                          "--strength (0 = unchanged, 1 = a new sample) and denoised by the sampler.")
    _common(p, sampler="ddim")
    p.add_argument("--strength", type=float, required=True, help="how much to change, in [0, 1]")
    p.set_defaults(func=_edit)

    p = subparsers.add_parser("inpaint", help="regenerate the masked part of images (RePaint or an inpainting run)",
                              description="Inpainting: white mask pixels are regenerated, black ones kept. Runs trained "
                                          "with task.kind = inpaint use their network (--method model); any other run "
                                          "uses RePaint (Lugmayr et al. 2022).")
    _common(p, sampler="ddim")
    p.add_argument("--mask", nargs="+", required=True, metavar="MASK",
                   help="mask PNG(s) of the images' size (white = regenerate), one for all or one per image, "
                        "or an .npz with a `masks` array")
    p.add_argument("--method", choices=("repaint", "model"), default=None,
                   help="repaint (any run) or model (runs trained for inpainting; their default)")
    p.add_argument("--jump-length", type=int, default=5, help="RePaint: steps per resampling jump (default 5)")
    p.add_argument("--resamplings", type=int, default=5, help="RePaint: times each jump is made (default 5; 1 = none)")
    p.set_defaults(func=_inpaint)

    p = subparsers.add_parser("upscale", help="super-resolution with a run trained for it (SR3)",
                              description="Super-resolution (Saharia et al. 2021) with a run trained with task.kind = "
                                          "super-resolution: low-resolution images of resolution / task.factor pixels "
                                          "in, the run's resolution out.")
    _common(p, sampler="ddim", prompts=False)
    p.set_defaults(func=_upscale)

    p = subparsers.add_parser("denoise", help="remove Gaussian noise from images with a pixel run",
                              description="Denoising: the noisy image is the diffusion's x_t at the timestep whose "
                                          "noise level matches --sigma (or the estimated one), and the reverse "
                                          "process runs from there.")
    _common(p, sampler="ddpm")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise std in [-1, 1] units (8-bit std / 127.5, e.g. 25/255 noise = 0.196); default: estimated "
                        "per image (wavelet MAD)")
    p.add_argument("--method", choices=("sample", "mean"), default="sample",
                   help="sample (a posterior draw, default) or mean (the posterior mean, one network evaluation)")
    p.set_defaults(func=_denoise)


# ------------------------------------------------------------------------------------------------ reading inputs


def _read_png(path: Path):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "I", "I;16", "P"):
                img = img.convert("L" if mode != "P" else "RGB")
            elif mode not in ("L", "RGB"):
                raise LddpmError(f"{path} is a {mode} image; give a grey (L) or RGB PNG")
            arr = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise LddpmError(f"{path} is not a readable image ({exc}); give a PNG file") from None
    return arr[None, ..., None] if arr.ndim == 2 else arr[None]


def read_arrays(paths: list[str], what: str, key: str):
    """PNG files (one image each) or .npz files (array `key`, or their only array) stacked into one array."""
    import numpy as np

    arrays = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise LddpmError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                             + "; give PNG or .npz files")
        if path.suffix.lower() == ".npz":
            try:
                with np.load(path) as data:
                    if key not in data and len(data.files) != 1:
                        raise LddpmError(f"{path} has no `{key}` array (found: {', '.join(data.files)})")
                    arr = data[key] if key in data else data[data.files[0]]
            except (OSError, ValueError) as exc:
                raise LddpmError(f"{path} is not a readable .npz file ({exc})") from None
            arr = arr[None] if arr.ndim == 2 else arr
            arrays.append(arr[..., None] if arr.ndim == 3 and key == "images" else arr)
        else:
            arrays.append(_read_png(path))
    if len({(a.shape[1:], a.dtype.kind) for a in arrays}) != 1:
        raise LddpmError(f"the {what}s differ in size, channels or type ({sorted({a.shape[1:] for a in arrays})}); "
                         "all must match")
    return np.concatenate(arrays)


def _check_args(args: argparse.Namespace) -> None:
    from lddpm import checks

    checks.finite_number("--guidance-scale", args.guidance_scale)
    checks.finite_number("--eta", args.eta)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None:
            checks.int_in_range(flag, value, 1)


def _load(args: argparse.Namespace):
    from lddpm.distributed import resolve_device
    from lddpm.pipeline import load_pipeline

    return load_pipeline(args.run, device=resolve_device(args.device), use_ema=not args.no_ema)


def _labels(args: argparse.Namespace, pipeline):
    if getattr(args, "class_name", None) is not None:
        return pipeline.class_index(args.class_name)
    if getattr(args, "class_index", None) is not None:
        if not pipeline.num_classes:
            raise LddpmError("this model is unconditional: --class needs a class-conditional run")
        if not 0 <= args.class_index < pipeline.num_classes:
            raise LddpmError(f"--class {args.class_index} is out of range; choose 0..{pipeline.num_classes - 1}")
        return args.class_index
    return None


def _conditions(args: argparse.Namespace, pipeline, num: int) -> dict:
    out = {"labels": _labels(args, pipeline), "guidance_scale": args.guidance_scale, "seed": args.seed,
           "batch_size": args.batch_size, "progress": not args.quiet}
    if hasattr(args, "prompt"):
        out["prompts"] = [args.prompt] * num if args.prompt is not None else None
        out["negative_prompt"] = args.negative_prompt
    return out


def _write(args: argparse.Namespace, columns: list, outputs, started: float, what: str) -> int:
    """One PNG per output and grid.png (the columns side by side) into --out-dir."""
    from lddpm.grid import comparison_grid
    from lddpm.io import write_png

    folder = Path(args.out_dir)
    for i, image in enumerate(outputs):
        write_png(folder / f"{i:05d}.png", image)
    write_png(folder / "grid.png", comparison_grid(columns))
    took = time.time() - started
    print(f"{what}: {len(outputs)} images in {took:.1f} s ({took / len(outputs):.3f} s/image) -> {folder}/ "
          f"({len(outputs)} PNG files and grid.png)")
    return 0


def _display(pipeline, images):
    """Input arrays as uint8 (N, H, W, C) for the grid (float [-1, 1] inputs clipped)."""
    from lddpm.pipeline import to_uint8

    return to_uint8(pipeline.images_in(images))


# ------------------------------------------------------------------------------------------------ the commands


def _edit(args: argparse.Namespace) -> int:
    import math

    _check_args(args)
    if not math.isfinite(args.strength) or not 0.0 <= args.strength <= 1.0:
        raise LddpmError(f"--strength {args.strength} is outside [0, 1]; 0 keeps the image, 1 draws a new one")
    images = read_arrays(args.inputs, "image", "images")
    pipeline = _load(args)
    start = time.time()
    out = pipeline.edit(images, args.strength, sampler=args.sampler, num_steps=args.steps, eta=args.eta,
                        **_conditions(args, pipeline, len(images)))
    return _write(args, [_display(pipeline, images), out], out, start, f"edit (strength {args.strength:g})")


def _inpaint(args: argparse.Namespace) -> int:
    from lddpm import checks
    from lddpm.grid import masked_view

    _check_args(args)
    for flag, value in (("--jump-length", args.jump_length), ("--resamplings", args.resamplings)):
        checks.int_in_range(flag, value, 1)
    images = read_arrays(args.inputs, "image", "images")
    masks = read_arrays(args.mask, "mask", "masks")
    if masks.ndim == 4:
        if masks.shape[-1] != 1:
            raise LddpmError(f"a mask must be a grey image (white = regenerate), got {masks.shape[-1]} channels")
        masks = masks[..., 0]
    pipeline = _load(args)
    start = time.time()
    out = pipeline.inpaint(images, masks, method=args.method, sampler=args.sampler, num_steps=args.steps, eta=args.eta,
                           jump_length=args.jump_length, resamplings=args.resamplings,
                           **_conditions(args, pipeline, len(images)))
    shown = _display(pipeline, images)
    m = pipeline.masks_in(masks, len(images))[:, 0].cpu().numpy().astype(bool)
    return _write(args, [shown, masked_view(shown, m), out], out, start,
                  f"inpaint ({args.method or ('model' if pipeline.task['kind'] == 'inpaint' else 'repaint')})")


def _upscale(args: argparse.Namespace) -> int:
    import numpy as np

    from lddpm.pipeline import to_uint8
    from lddpm.tasks import upsample

    _check_args(args)
    low = read_arrays(args.inputs, "image", "images")
    pipeline = _load(args)
    start = time.time()
    out = pipeline.upscale(low, sampler=args.sampler, num_steps=args.steps, eta=args.eta,
                           **_conditions(args, pipeline, len(low)))
    factor = pipeline.resolution // low.shape[1]
    x = pipeline.images_in(low, "low-resolution images", size=low.shape[1])
    nearest = to_uint8(x).repeat(factor, axis=1).repeat(factor, axis=2)
    bicubic = to_uint8(upsample(x, pipeline.resolution))
    return _write(args, [np.ascontiguousarray(nearest), bicubic, out], out, start, f"upscale (x{factor})")


def _denoise(args: argparse.Namespace) -> int:
    import math

    _check_args(args)
    if args.sigma is not None and (not math.isfinite(args.sigma) or args.sigma < 0):
        raise LddpmError(f"--sigma {args.sigma} must be a noise std >= 0 (in [-1, 1] units: 8-bit std / 127.5)")
    images = read_arrays(args.inputs, "image", "images")
    pipeline = _load(args)
    pipeline.check_denoise()
    sigma = args.sigma
    if sigma is None:
        sigmas = pipeline.estimate_noise(images)
        print(f"estimated noise std (wavelet MAD): {', '.join(f'{s:.4f}' for s in sigmas[:8])}"
              f"{' ...' if len(sigmas) > 8 else ''} ([-1, 1] units; x127.5 for 8-bit)")
        sigma = sigmas
    start = time.time()
    out = pipeline.denoise(images, sigma, method=args.method, sampler=args.sampler, num_steps=args.steps, eta=args.eta,
                           **_conditions(args, pipeline, len(images)))
    return _write(args, [_display(pipeline, images), out], out, start, f"denoise ({args.method})")
