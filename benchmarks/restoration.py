"""Editing and restoration measured on test images: inpainting, super-resolution, denoising, image-to-image.

    python benchmarks/restoration.py --generate-run runs/fashion-generate-10min \
        --inpaint-run runs/fashion-inpaint-10min --sr-run runs/fashion-sr-10min \
        --num 1000 --out benchmarks/results/restoration

Inputs are N test-split images that are not among the N of the FID reference (a seeded random subset of
the rest of the split), so "FID vs the test split" compares completions with other real test images and
the untouched originals score the real-data floor at N. Sections (each runs when its runs are given;
each writes its own JSON, skipped on a re-run unless --force; `results.md` is rendered from the files):

- inpaint.json: centre and bottom-half masks; RePaint (--generate-run: 50 DDPM steps, jumps of 5, 5
  resamplings, and plain replacement: 1 resampling) and the trained inpainting network (--inpaint-run,
  DDIM); FID of the completed images, class accuracy of the completions by the project's classifier
  against the test labels, seconds and network evaluations per image.
- sr.json: the test images downsampled by the run's factor; the SR3 network (DDIM) against bicubic
  upsampling: PSNR (8-bit, against the originals) and FID.
- denoise.json: Gaussian noise of std sigma (in [-1, 1] units, not clipped) added to the images; the
  posterior mean (one evaluation), a posterior draw (DDPM below the matched level) and Wiener filters
  (scipy.signal.wiener, 3x3 and 5x5, told the noise power), PSNR at each sigma; and the wavelet-MAD noise
  estimate's relative error.
- edit.json: SDEdit at strengths 0.25-1 (DDIM 50 steps): class accuracy against the input's label, RMSE
  to the input (8-bit), FID.
- gaussian.json (no run needed, seconds): RePaint and denoising with the exact denoiser of Gaussian data
  against the closed-form conditional and posterior, at N = 20,000 (tests/test_editing.py checks the same
  at N = 4,000).

Grids (first 8 images, one row each) go beside the JSON files. Every JSON holds the full settings, the
environment, the lddpm version and git commit.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lddpm import __version__
from lddpm.data import open_cache, prepare
from lddpm.evaluate import (ForwardCounter, evaluate_generated, load_extractor, reference_indices, reference_stats,
                            resolve_classifier)
from lddpm.grid import comparison_grid, masked_view
from lddpm.io import write_png, write_text
from lddpm.pipeline import load_pipeline, to_uint8
from lddpm.tasks import center_mask, downsample, half_mask, upsample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MASKS = {"center": lambda size: center_mask(size), "half": lambda size: half_mask(size, 3)}   # 3: the bottom half
SIGMAS = (0.1, 0.2, 0.4)
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
GRID_ROWS = 8


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


class Bench:
    """The shared inputs of every section: test images, the FID reference, the feature network, the classifier."""

    def __init__(self, args: argparse.Namespace, dataset: str, resolution: int):
        self.args = args
        self.dataset, self.resolution = dataset, resolution
        cache = open_cache(prepare(dataset, resolution=resolution, split="test", root=args.data_root,
                                   cache_dir=args.cache_dir, progress=not args.quiet))
        ref_num = args.ref_num or args.num
        rest = np.setdiff1d(np.arange(len(cache)), reference_indices(len(cache), ref_num))
        if len(rest) < args.num:
            raise SystemExit(f"{dataset}:test has {len(cache)} images: too few for --num {args.num} inputs beside a "
                             f"reference of {ref_num}")
        pick = np.sort(np.random.default_rng(args.seed).choice(rest, args.num, replace=False))
        self.images = np.asarray(cache.images[pick])
        self.labels = np.asarray(cache.labels, np.int64)[pick]
        self.extractor = load_extractor(args.inception, batch_size=64, device=args.device)
        self.reference = reference_stats(dataset, split="test", num=ref_num, resolution=resolution,
                                         extractor=self.extractor, cache_dir=args.cache_dir, data_root=args.data_root,
                                         progress=not args.quiet)
        self.classifier, self.classifier_meta, note = resolve_classifier(args.classifier, dataset, resolution,
                                                                         cache_dir=args.cache_dir, device=args.device)
        self.notes = [note] if note else []
        self.inputs = {"dataset": dataset, "split": "test", "num": args.num, "resolution": resolution,
                       "selection": f"seeded ({args.seed}) random subset of the test images outside the FID reference",
                       "reference_num": ref_num, "first_indices": pick[:10].tolist()}

    def score(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """FID (and KID) against the test reference, and class accuracy against `labels` (default: the inputs')."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = evaluate_generated(images, self.labels if labels is None else labels, reference_stats=self.reference,
                                   extractor=self.extractor, classifier=self.classifier,
                                   classifier_meta=self.classifier_meta, device=self.args.device)
        return {k: r.get(k) for k in ("fid", "kid", "kid_std", "class_accuracy")}

    def header(self, runs: dict) -> dict:
        return {"benchmark": "restoration", "lddpm_version": __version__, "git_commit": git_commit(),
                "environment": environment(), "command": " ".join(sys.argv), "inputs": self.inputs,
                "runs": runs, "classifier": self.classifier_meta, "feature_network": self.extractor.info,
                "reference": {k: v for k, v in self.reference.manifest.items() if k != "network"},
                "notes": self.notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of 8-bit images (mean squared error over all pixels of all images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def timed(pipeline, fn):
    """(result, seconds, network evaluations per image) of fn() with the pipeline's network counted."""
    counter = ForwardCounter(pipeline.model)
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        counter.close()
    seconds = time.perf_counter() - start
    return out, seconds, counter.rows


def run_info(pipeline, path: str) -> dict:
    return {"path": str(path), "checkpoint": pipeline.checkpoint, "step": pipeline.step, "task": pipeline.task,
            "network": pipeline.model.config.to_dict(), "diffusion": pipeline.config.diffusion.__dict__,
            "num_classes": pipeline.num_classes, "latent": pipeline.vae is not None}


def row(name: str, images: np.ndarray, seconds: float | None, evals: int | None, n: int, score: dict, **extra) -> dict:
    return {"method": name, **score, "seconds_per_image": seconds / n if seconds is not None else None,
            "network_evaluations_per_image": evals / n if evals is not None else None, **extra}


# ------------------------------------------------------------------------------------------------ sections


def inpaint_section(bench: Bench, args) -> dict:
    n, size = len(bench.images), bench.resolution
    runs, results, grids = {}, {}, {}
    gen = load_pipeline(args.generate_run, device=args.device) if args.generate_run else None
    inp = load_pipeline(args.inpaint_run, device=args.device) if args.inpaint_run else None
    if gen is not None:
        runs["generate"] = run_info(gen, args.generate_run)
    if inp is not None:
        runs["inpaint"] = run_info(inp, args.inpaint_run)
    settings = {"masks": {"center": "the centre square of half the side", "half": "the bottom half"},
                # r = 2: the smallest error of the exact-Gaussian section (gaussian.json) at 95 evaluations;
                # add 1 (plain replacement) for the comparison without resampling
                "repaint": {"num_steps": 50, "jump_length": 5, "resamplings": [2]},
                "model": {"sampler": "ddim", "num_steps": args.steps}, "seed": args.seed,
                "labels": "none (the null label of class-conditional runs)"}
    for mask_name, make in MASKS.items():
        mask = make(size).numpy().astype(bool)
        rows = [row("originals (no mask: the real-data floor)", bench.images, None, None, n, bench.score(bench.images))]
        holes = masked_view(bench.images, mask[None])
        grid_cols = [bench.images, holes]
        if gen is not None:
            for r in settings["repaint"]["resamplings"]:
                out, sec, ev = timed(gen, lambda: gen.inpaint(bench.images, mask, method="repaint", num_steps=50,
                                                              jump_length=5, resamplings=r, seed=args.seed,
                                                              batch_size=args.batch_size, progress=not args.quiet))
                rows.append(row(f"RePaint, 50 steps, jump 5, {r} resampling{'s' if r > 1 else ''}", out, sec, ev, n,
                                bench.score(out), run="generate"))
                grid_cols.append(out)
        if inp is not None:
            out, sec, ev = timed(inp, lambda: inp.inpaint(bench.images, mask, method="model", sampler="ddim",
                                                          num_steps=args.steps, seed=args.seed,
                                                          batch_size=args.batch_size, progress=not args.quiet))
            rows.append(row(f"inpainting network, DDIM {args.steps}", out, sec, ev, n, bench.score(out), run="inpaint"))
            grid_cols.append(out)
        results[mask_name] = rows
        grids[mask_name] = grid_cols
        write_png(Path(args.out) / f"inpaint-{mask_name}.png", comparison_grid([c[:GRID_ROWS] for c in grid_cols]))
    return {**bench.header(runs), "section": "inpaint", "settings": settings, "results": results,
            "grids": [f"inpaint-{m}.png" for m in MASKS],
            "grid_columns": ["original", "masked (white = regenerated)"]
            + ([f"RePaint r={r}" for r in settings["repaint"]["resamplings"]] if gen is not None else [])
            + (["inpainting network"] if inp is not None else [])}


def sr_section(bench: Bench, args) -> dict:
    sr = load_pipeline(args.sr_run, device=args.device)
    factor = int(sr.task["factor"])
    n = len(bench.images)
    x = sr.images_in(bench.images)
    low = to_uint8(downsample(x, factor))
    bicubic = to_uint8(upsample(sr.images_in(low, size=bench.resolution // factor), bench.resolution))
    rows = [row("originals (the real-data floor)", bench.images, None, None, n, bench.score(bench.images)),
            row(f"bicubic upsampling x{factor}", bicubic, None, None, n, bench.score(bicubic),
                psnr=psnr(bicubic, bench.images))]
    out, sec, ev = timed(sr, lambda: sr.upscale(low, sampler="ddim", num_steps=args.steps, seed=args.seed,
                                                batch_size=args.batch_size, progress=not args.quiet))
    rows.append(row(f"SR3 network, DDIM {args.steps}", out, sec, ev, n, bench.score(out), psnr=psnr(out, bench.images)))
    nearest = low.repeat(factor, axis=1).repeat(factor, axis=2)
    write_png(Path(args.out) / "sr.png", comparison_grid([c[:GRID_ROWS] for c in (nearest, bicubic, out, bench.images)]))
    return {**bench.header({"sr": run_info(sr, args.sr_run)}), "section": "sr",
            "settings": {"factor": factor, "low_resolution": bench.resolution // factor, "downsampling": "area average",
                         "sampler": "ddim", "num_steps": args.steps, "seed": args.seed},
            "results": {"x%d" % factor: rows}, "grids": ["sr.png"],
            "grid_columns": ["low resolution (nearest)", "bicubic", "SR3 network", "original"]}


def wiener(noisy: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """scipy.signal.wiener on each image (in [-1, 1] units, told the noise power sigma^2) -> uint8."""
    from scipy.signal import wiener as scipy_wiener

    out = np.stack([np.stack([scipy_wiener(img[..., c], (size, size), noise=sigma ** 2) for c in range(img.shape[-1])],
                             axis=-1) for img in noisy.astype(np.float64)])
    return np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)


def denoise_section(bench: Bench, args) -> dict:
    gen = load_pipeline(args.generate_run, device=args.device)
    n = len(bench.images)
    clean = bench.images.astype(np.float32) / 127.5 - 1.0
    results, grids = {}, []
    for sigma in args.sigmas:
        noise = np.random.default_rng(args.seed + int(sigma * 1000)).standard_normal(clean.shape).astype(np.float32)
        noisy = clean + sigma * noise                               # not clipped: Gaussian noise as the method assumes
        noisy_u8 = to_uint8(torch.from_numpy(noisy).permute(0, 3, 1, 2))
        estimate = gen.estimate_noise(noisy)
        rows = [row("noisy input (clipped to 8 bits)", noisy_u8, None, None, n, {}, psnr=psnr(noisy_u8, bench.images))]
        for size in (3, 5):
            start = time.perf_counter()
            w = wiener(noisy, sigma, size)
            rows.append(row(f"Wiener filter {size}x{size} (scipy.signal.wiener, known noise power)", w,
                            time.perf_counter() - start, None, n, {}, psnr=psnr(w, bench.images)))
        outs = {}
        for method, sampler, steps in (("mean", "ddpm", None), ("sample", "ddpm", args.denoise_steps)):
            out, sec, ev = timed(gen, lambda: gen.denoise(noisy, sigma, method=method, sampler=sampler,
                                                          num_steps=steps, seed=args.seed, batch_size=args.batch_size,
                                                          progress=not args.quiet))
            name = ("posterior mean (one network evaluation)" if method == "mean" else
                    f"posterior draw (DDPM on a {steps}-step grid below the level)")
            rows.append(row(name, out, sec, ev, n, {}, psnr=psnr(out, bench.images)))
            outs[method] = out
        est_out, sec, ev = timed(gen, lambda: gen.denoise(noisy, None, method="mean", seed=args.seed,
                                                          batch_size=args.batch_size, progress=not args.quiet))
        rows.append(row("posterior mean, sigma estimated (wavelet MAD)", est_out, sec, ev, n, {},
                        psnr=psnr(est_out, bench.images)))
        results[f"{sigma:g}"] = {"sigma": sigma, "sigma_8bit": sigma * 127.5, "rows": rows,
                                 "estimated_sigma": {"mean": float(estimate.mean()), "std": float(estimate.std()),
                                                     "mean_relative_error": float(np.mean(np.abs(estimate / sigma - 1)))}}
        name = f"denoise-{sigma:g}.png"
        write_png(Path(args.out) / name, comparison_grid([c[:GRID_ROWS] for c in (
            noisy_u8, wiener(noisy[:GRID_ROWS], sigma, 5), outs["mean"], outs["sample"], bench.images)]))
        grids.append(name)
    return {**bench.header({"generate": run_info(gen, args.generate_run)}), "section": "denoise",
            "settings": {"sigmas": list(args.sigmas), "units": "[-1, 1] (8-bit std / 127.5)", "noise": "not clipped",
                         "draw": {"sampler": "ddpm", "num_steps": args.denoise_steps}, "seed": args.seed},
            "results": results, "grids": grids,
            "grid_columns": ["noisy", "Wiener 5x5", "posterior mean", "posterior draw", "original"]}


def edit_section(bench: Bench, args) -> dict:
    gen = load_pipeline(args.generate_run, device=args.device)
    n = len(bench.images)
    rows, cols = [], [bench.images]
    for strength in args.strengths:
        out, sec, ev = timed(gen, lambda: gen.edit(bench.images, strength, sampler="ddim", num_steps=args.steps,
                                                   seed=args.seed, batch_size=args.batch_size,
                                                   progress=not args.quiet))
        rmse = float(np.sqrt(np.mean((out.astype(np.float64) - bench.images.astype(np.float64)) ** 2)))
        rows.append(row(f"strength {strength:g}", out, sec, ev, n, bench.score(out), strength=strength,
                        rmse_to_input=rmse))
        cols.append(out)
    write_png(Path(args.out) / "edit.png", comparison_grid([c[:GRID_ROWS] for c in cols]))
    return {**bench.header({"generate": run_info(gen, args.generate_run)}), "section": "edit",
            "settings": {"strengths": list(args.strengths), "sampler": "ddim", "num_steps": args.steps,
                         "labels": "none (the null label of class-conditional runs)", "seed": args.seed},
            "results": {"originals": row("originals (strength 0)", bench.images, None, None, n,
                                         bench.score(bench.images), strength=0.0, rmse_to_input=0.0),
                        "rows": rows},
            "grids": ["edit.png"], "grid_columns": ["input", *[f"strength {s:g}" for s in args.strengths]]}


def gaussian_section(args) -> dict:
    """No run needed: the methods with the exact denoiser of Gaussian data x0 ~ N(mu, Sigma) on 2x2 images (4
    correlated pixels), against the closed forms (as tests/test_editing.py, at a larger N)."""
    from lddpm import editing
    from lddpm.diffusion import GaussianDiffusion
    from lddpm.schedule import NoiseSchedule

    n, d = args.gaussian_num, 4
    i = torch.arange(d, dtype=torch.float64)
    cov = 0.09 * 0.9 ** (i[:, None] - i[None]).abs()
    mu = torch.tensor([0.1, 0.2, -0.1, 0.0], dtype=torch.float64)
    kept, hole = [0, 1], [2, 3]
    x_kept = torch.tensor([0.5, 0.4], dtype=torch.float64)
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))
    ac = diffusion.schedule.alphas_cumprod

    def model(x, t, y=None):
        a = float(ac[int(t[0])])
        xf = x.reshape(x.shape[0], d)
        r = torch.linalg.solve(a * cov + (1 - a) * torch.eye(d, dtype=torch.float64), (xf - math.sqrt(a) * mu).T).T
        x0 = mu + math.sqrt(a) * r @ cov
        return ((xf - math.sqrt(a) * x0) / math.sqrt(1 - a)).reshape(x.shape)

    skk, suk = cov[kept][:, kept], cov[hole][:, kept]
    cond_mean = mu[hole] + suk @ torch.linalg.solve(skk, x_kept - mu[kept])
    cond_cov = cov[hole][:, hole] - suk @ torch.linalg.solve(skk, suk.T)
    x0 = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    x0.view(n, d)[:, kept] = x_kept
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    se = float((cond_cov.diagonal() / n).sqrt().max())
    rows = []
    for steps, jump, r in ((50, 5, 1), (50, 5, 2), (50, 5, 5), (50, 5, 10), (250, 10, 1), (250, 10, 10)):
        start = time.perf_counter()
        out = editing.repaint(model, diffusion, x0, mask, num_steps=steps, jump_length=jump, resamplings=r,
                              clip_x0=False, generator=torch.Generator().manual_seed(args.seed))
        h = out.reshape(n, d)[:, hole]
        rows.append({"num_steps": steps, "jump_length": jump, "resamplings": r,
                     "network_evaluations": sum(b < a for a, b in zip(*(lambda p: (p, p[1:]))(
                         editing.repaint_schedule(steps, jump, r)))),
                     "mean_error": float((h.mean(0) - cond_mean).abs().max()),
                     "cov_error": float((torch.cov(h.T) - cond_cov).abs().max()),
                     "seconds": time.perf_counter() - start})
    sigma, y = 0.2, torch.tensor([0.4, 0.1, 0.3, -0.2], dtype=torch.float64)
    gain = cov @ torch.linalg.inv(cov + sigma ** 2 * torch.eye(d, dtype=torch.float64))
    post_mean, post_cov = mu + gain @ (y - mu), cov - gain @ cov
    noisy = y.view(1, 1, 2, 2).expand(n, 1, 2, 2).clone()
    denoise_rows = []
    for method, steps in (("sample", None), ("sample", 100), ("mean", None)):
        out = editing.denoise(model, diffusion, noisy, sigma, method=method, num_steps=steps, clip_x0=False,
                              generator=torch.Generator().manual_seed(args.seed)).reshape(n, d)
        denoise_rows.append({"method": method, "sampler": "ddpm", "num_steps": steps or 1000,
                             "mean_error": float((out.mean(0) - post_mean).abs().max()),
                             "standard_error_of_mean": float((post_cov.diagonal() / n).sqrt().max()),
                             # the posterior mean is one point per image: its spread is not the posterior's
                             "cov_error": float((torch.cov(out.T) - post_cov).abs().max()) if method == "sample" else None})
    return {"benchmark": "restoration", "section": "gaussian", "lddpm_version": __version__, "git_commit": git_commit(),
            "environment": environment(), "command": " ".join(sys.argv),
            "settings": {"num": n, "schedule": "cosine, T = 1000", "mu": mu.tolist(), "Sigma": "0.09 * 0.9^|i-j|",
                         "kept_pixels": kept, "kept_values": x_kept.tolist(), "seed": args.seed,
                         "denoise": {"sigma": sigma, "y": y.tolist()}},
            "conditional": {"mean": cond_mean.tolist(), "cov": cond_cov.tolist(),
                            "unconditional_mean": mu[hole].tolist(),
                            "shift": float((cond_mean - mu[hole]).abs().max())},
            "standard_error_of_mean": se, "repaint": rows, "denoise": denoise_rows}


# ------------------------------------------------------------------------------------------------ tables


def _f(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(x) + " |" for x in lines)]


def render_gaussian(r: dict, prefix: str = "") -> str:
    """The exact-Gaussian section's tables (gaussian.json)."""
    parts = [f"RePaint's completions against the conditional Gaussian (N = {r['settings']['num']}): the largest error "
             f"of their mean and covariance (the conditional mean lies {r['conditional']['shift']:.3f} from the "
             f"unconditional one; standard error of a mean {r['standard_error_of_mean']:.4f}).", ""]
    parts += _table(["steps", "jump", "resamplings", "network evaluations", "mean error", "covariance error"],
                    [[str(x["num_steps"]), str(x["jump_length"]), str(x["resamplings"]),
                      str(x["network_evaluations"]), _f(x["mean_error"], 4), _f(x["cov_error"], 4)]
                     for x in r["repaint"]])
    parts += ["", f"Denoising (sigma {r['settings']['denoise']['sigma']:g}) against the Gaussian posterior:", ""]
    parts += _table(["method", "DDPM grid", "mean error", "standard error", "covariance error"],
                    [[x["method"], str(x["num_steps"]), _f(x["mean_error"], 4),
                      _f(x.get("standard_error_of_mean"), 4), _f(x["cov_error"], 4)] for x in r["denoise"]])
    return "\n".join(parts) + "\n"


def render_inpaint(r: dict, prefix: str = "") -> str:
    """The inpainting tables and grids (inpaint.json); grid links start with `prefix`."""
    n, parts = r["inputs"]["num"], []
    for k, (mask, rows) in enumerate(r["results"].items()):
        parts += [f"{mask} mask ({r['settings']['masks'][mask]}), N = {n}:", ""]
        parts += _table(["method", f"FID (N={n})", "class accuracy", "s / image", "network evaluations / image"],
                        [[x["method"], _f(x["fid"]), _f(x["class_accuracy"], 3), _f(x["seconds_per_image"], 3),
                          _f(x["network_evaluations_per_image"], 0)] for x in rows])
        parts += ["", f"![{mask} mask]({prefix}{r['grids'][k]})", ""]
    parts.append(f"Grid columns: {' | '.join(r['grid_columns'])}.")
    return "\n".join(parts) + "\n"


def render_sr(r: dict, prefix: str = "") -> str:
    """The super-resolution table and grid (sr.json)."""
    n, parts = r["inputs"]["num"], []
    for key, rows in r["results"].items():
        parts += [f"{key}: {r['settings']['low_resolution']}px -> {r['inputs']['resolution']}px, N = {n}:", ""]
        parts += _table(["method", "PSNR (dB)", f"FID (N={n})", "class accuracy", "s / image"],
                        [[x["method"], _f(x.get("psnr")), _f(x["fid"]), _f(x["class_accuracy"], 3),
                          _f(x["seconds_per_image"], 3)] for x in rows])
    parts += ["", f"![super-resolution]({prefix}sr.png)", "", f"Grid columns: {' | '.join(r['grid_columns'])}."]
    return "\n".join(parts) + "\n"


def render_denoise(r: dict, prefix: str = "") -> str:
    """The denoising table (PSNR at each sigma) and grids (denoise.json)."""
    sigmas = list(r["results"])
    methods = [x["method"] for x in r["results"][sigmas[0]]["rows"]]
    head = ["method", *[f"sigma {s} ({r['results'][s]['sigma_8bit']:.1f}/255)" for s in sigmas], "s / image"]
    lines = [[m, *[_f(r["results"][s]["rows"][k]["psnr"]) for s in sigmas],
              _f(r["results"][sigmas[-1]]["rows"][k]["seconds_per_image"], 3)] for k, m in enumerate(methods)]
    lines.append(["noise estimate: mean relative error",
                  *[_f(r["results"][s]["estimated_sigma"]["mean_relative_error"], 3) for s in sigmas], "-"])
    parts = [f"PSNR (dB) against the originals, N = {r['inputs']['num']}:", "", *_table(head, lines), ""]
    parts += [f"![denoising, sigma {g[len('denoise-'):-len('.png')]}]({prefix}{g})" for g in r["grids"]]
    parts += ["", f"Grid columns: {' | '.join(r['grid_columns'])}."]
    return "\n".join(parts) + "\n"


def render_edit(r: dict, prefix: str = "") -> str:
    """The SDEdit strength table and grid (edit.json)."""
    n = r["inputs"]["num"]
    rows = [r["results"]["originals"], *r["results"]["rows"]]
    parts = _table(["strength", "class accuracy (input's label)", "RMSE to input (8-bit)", f"FID (N={n})",
                    "s / image"],
                   [[_f(x["strength"]), _f(x["class_accuracy"], 3), _f(x["rmse_to_input"], 1), _f(x["fid"]),
                     _f(x["seconds_per_image"], 3)] for x in rows])
    parts += ["", f"![image-to-image]({prefix}edit.png)", "", f"Grid columns: {' | '.join(r['grid_columns'])}."]
    return "\n".join(parts) + "\n"


SECTIONS = {"gaussian": ("Exact Gaussian data", render_gaussian), "inpaint": ("Inpainting", render_inpaint),
            "sr": ("Super-resolution", render_sr), "denoise": ("Denoising", render_denoise),
            "edit": ("Image-to-image (SDEdit)", render_edit)}


def render(out: Path) -> str:
    """results.md: every table from the section JSON files in `out` (nothing typed by hand)."""
    parts = ["# Restoration benchmark", "", "Rendered by `benchmarks/restoration.py` from the JSON files beside this "
             "file; docs/editing.md describes the methods.", ""]
    for name, (title, fn) in SECTIONS.items():
        path = out / f"{name}.json"
        if path.is_file():
            parts += [f"## {title} (`{name}.json`)", "", fn(json.loads(path.read_text()))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generate-run", help="a run trained to generate: RePaint, denoising, image-to-image")
    p.add_argument("--inpaint-run", help="a run trained with task.kind = inpaint")
    p.add_argument("--sr-run", help="a run trained with task.kind = super-resolution")
    p.add_argument("--num", type=int, default=1000, help="test images per measurement (default 1000)")
    p.add_argument("--ref-num", type=int, default=None, help="FID reference size (default: --num)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the task networks and SDEdit (default 50)")
    p.add_argument("--denoise-steps", type=int, default=100,
                   help="grid of the denoising draw: DDPM steps over the whole schedule, those below the level run")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--sections", nargs="+", default=["gaussian", "inpaint", "sr", "denoise", "edit"],
                   choices=["gaussian", "inpaint", "sr", "denoise", "edit"])
    p.add_argument("--gaussian-num", type=int, default=20000, help="samples of the Gaussian section (default 20000)")
    p.add_argument("--classifier", default="auto", help="auto (lddpm train-classifier's folder), a folder, or none")
    p.add_argument("--inception", default=None, help="a TorchScript feature network instead of the pinned one")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/restoration")
    p.add_argument("--force", action="store_true", help="measure sections whose JSON exists again")
    p.add_argument("--report-only", action="store_true", help="only render results.md from the JSON files")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.report_only:
        any_run = args.generate_run or args.inpaint_run or args.sr_run
        if not any_run and args.sections != ["gaussian"]:
            p.error("give at least one of --generate-run, --inpaint-run, --sr-run (or --sections gaussian)")
        if "gaussian" in args.sections and (args.force or not (out / "gaussian.json").is_file()):
            start = time.time()
            result = gaussian_section(args)
            result["section_seconds"] = time.time() - start
            write_json(result, out / "gaussian.json")
        first = load_pipeline(any_run) if any_run else None
        bench = Bench(args, first.dataset, first.resolution) if first is not None else None
        jobs = {"gaussian": (None, None), "inpaint": (inpaint_section, args.generate_run or args.inpaint_run),
                "sr": (sr_section, args.sr_run), "denoise": (denoise_section, args.generate_run),
                "edit": (edit_section, args.generate_run)}
        for name in args.sections:
            fn, needed = jobs[name]
            if name == "gaussian":
                continue
            if not needed:
                print(f"{name}: skipped (its run is not given)")
                continue
            if (out / f"{name}.json").is_file() and not args.force:
                print(f"{name}: {out / f'{name}.json'} exists (--force to measure again)")
                continue
            start = time.time()
            result = fn(bench, args)
            result["section_seconds"] = time.time() - start
            write_json(result, out / f"{name}.json")
    text = render(out)
    write_text(out / "results.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
