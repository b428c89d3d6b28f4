"""Overhead of the full trainer against a bare training loop of the same network and batch.

The trainer (`lddpm.train.train`: data loader, label dropout, EMA, gradient clipping, LR
warm-up, logging, progress bar) is timed from its own log: images/s between the log records
of step `warmup` and step `warmup + steps` (wall-clock, so everything inside the loop counts).
The bare loop runs the same network, AdamW and `GaussianDiffusion.training_losses` on the same
batches and nothing else. The target is an overhead below 5%. Peak memory: CPU peak RSS above
the starting level (VmHWM reset through /proc/self/clear_refs), CUDA max_memory_allocated.
Prints a table and writes JSON.

    python benchmarks/train.py --out train.json                  # fashion-quick preset, real data
    python benchmarks/train.py --quick                           # seconds-long smoke run, synthetic data
    python benchmarks/train.py --config configs/cifar10-ddpm.toml --set optim.batch_size=32
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lddpm.config import apply_overrides, load_config
from lddpm.train import network_overrides, step_seed, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, environment  # noqa: E402


def write_synthetic_idx(root: Path, n: int = 256, prefix: str = "train") -> Path:
    """Fashion-MNIST-format IDX files with random blocks (for --quick; no real data needed); prefix t10k: test split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0 if prefix == "train" else 1)
    images = (rng.random((n, 28, 28)) < 0.3).astype(np.uint8) * 255
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def bare_loop(config, warmup: int, steps: int) -> dict:
    """Images/s of network + AdamW + diffusion loss on the trainer's batches, nothing else."""
    from lddpm.data import ImageLoader, open_cache, prepare
    from lddpm.distributed import resolve_device
    from lddpm.nn import build_network
    from lddpm.diffusion import build_diffusion

    c = config
    device = resolve_device(c.run.device)
    d = c.data
    cache = open_cache(prepare(d.dataset, resolution=d.resolution, split=d.split, root=d.root,
                               cache_dir=d.cache_dir, progress=False))
    loader = ImageLoader(cache, c.optim.batch_size, seed=c.run.seed, hflip=d.hflip)
    num_classes = cache.num_classes if c.run.class_conditional else 0
    derived = {"resolution": cache.resolution, "in_channels": cache.channels, "num_classes": num_classes,
               "learned_sigma": c.diffusion.learned_variance}
    torch.manual_seed(c.run.seed)
    model = build_network(c.model.kind, c.model.name, **network_overrides(c, derived)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.optim.lr, betas=tuple(c.optim.betas),
                                  weight_decay=c.optim.weight_decay, foreach=True)  # as the trainer
    diffusion = build_diffusion(c.diffusion)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if c.run.bf16 else contextlib.nullcontext())
    with PeakMemory(device) as memory:
        for step in range(warmup + steps):
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            x, y = loader.batch(step)
            x, y = x.to(device), (y.to(device) if num_classes else None)
            generator = torch.Generator(device=device).manual_seed(step_seed(c.run.seed, step, 0))
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = diffusion.training_losses(model, x, y=y, generator=generator)["loss"].float().mean()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return {"images_per_s": steps * c.optim.batch_size / elapsed, "peak_memory_mib": memory.mib}


def trainer_loop(config, warmup: int, steps: int, workdir: Path) -> dict:
    """Images/s of the full trainer from its log (wall-clock between two log records)."""
    # Log records exactly at steps `warmup` and `warmup + steps` (steps is a multiple of warmup).
    c = apply_overrides(config, [f"run.steps={warmup + steps}", f"run.log_every={warmup}", "run.sample_every=0",
                                 f"run.checkpoint_every={10 * (warmup + steps)}"])
    run_dir = Path(tempfile.mkdtemp(prefix="trainer-", dir=workdir))
    from lddpm.distributed import resolve_device

    with PeakMemory(resolve_device(c.run.device)) as memory:
        train(c, run_dir, progress=False)
    log = {r["step"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}
    elapsed = log[warmup + steps]["wall_time"] - log[warmup]["wall_time"]
    return {"images_per_s": steps * c.optim.batch_size / elapsed, "peak_memory_mib": memory.mib}


def main() -> None:
    """Parse arguments, measure, print a table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fashion-quick", help="TOML file or preset (default fashion-quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements; medians are reported")
    p.add_argument("--quick", action="store_true", help="tiny network, synthetic data, a few steps: a smoke run")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="lddpm-bench-train-"))
    overrides = list(args.overrides)
    if args.quick:
        root = write_synthetic_idx(workdir / "idx")
        overrides = [f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(workdir / 'cache'))}",
                     "data.resolution=16", "optim.batch_size=8", "run.device=\"cpu\"",
                     "model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8]}"] + overrides
        args.steps, args.warmup, args.repeats = min(args.steps, 8), min(args.warmup, 2), min(args.repeats, 2)
    args.warmup = max(1, args.warmup)
    args.steps = -(-args.steps // args.warmup) * args.warmup  # a multiple of warmup (see trainer_loop)
    config = load_config(args.config, overrides)
    if config.model.kind != "unet":
        sys.exit("benchmarks/train.py measures diffusion training (model.kind = 'unet')")

    bare, full = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(config, args.warmup, args.steps))
        full.append(trainer_loop(config, args.warmup, args.steps, workdir))
    bare_ips = statistics.median(r["images_per_s"] for r in bare)
    full_ips = statistics.median(r["images_per_s"] for r in full)
    overhead = 1.0 - full_ips / bare_ips
    report = {
        "config": args.config,
        "overrides": overrides,
        "batch_size": config.optim.batch_size,
        "device": config.run.device,
        "bf16": config.run.bf16,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "bare_images_per_s": bare_ips,
        "trainer_images_per_s": full_ips,
        "overhead": overhead,
        "overhead_ok": overhead < 0.05,
        "bare_peak_memory_mib": max((r["peak_memory_mib"] or 0) for r in bare),
        "trainer_peak_memory_mib": max((r["peak_memory_mib"] or 0) for r in full),
        "runs": {"bare": bare, "trainer": full},
        **environment(),
        "quick": args.quick,
    }
    print(f"{'loop':<10}{'images/s':>12}{'peak MiB':>12}")
    print(f"{'bare':<10}{bare_ips:>12.1f}{report['bare_peak_memory_mib']:>12.1f}")
    print(f"{'trainer':<10}{full_ips:>12.1f}{report['trainer_peak_memory_mib']:>12.1f}")
    print(f"trainer overhead: {100 * overhead:.1f}% ({'ok' if report['overhead_ok'] else 'above the 5% target'})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    else:
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}))


if __name__ == "__main__":
    main()
