"""Sampling with the network under bf16 autocast against fp32: same run, same seeds, per-image differences and speed.

    python benchmarks/bf16_sampling.py RUN                      # DDIM-100 on 100 images, DDPM-1000 on 50
    python benchmarks/bf16_sampling.py RUN --num 8 --ddpm-steps 50 --ddim-steps 10   # a quick look

For each sampler the run is sampled twice with the same seeds (the same starting noise and, for
DDPM, the same per-step noise), once in fp32 and once with `bf16=True` (lddpm.pipeline.bf16_network:
only the network runs in bf16, the sampler's arithmetic stays in float32), and the uint8 images are
compared pixel by pixel. Prints one line per sampler and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from lddpm.pipeline import load_pipeline  # noqa: E402


def compare(run: str, sampler: str, steps: int, num: int, seed: int) -> dict:
    """Sample `num` images in fp32 and in bf16 with the same seeds; differences in grey levels of 255."""
    images, seconds = {}, {}
    for bf16 in (False, True):
        pipe = load_pipeline(run, "cpu", bf16=bf16)
        pipe.generate(2, sampler=sampler, num_steps=2, seed=seed, progress=False)  # warm-up: kernels, allocator
        start = time.perf_counter()
        images[bf16], _ = pipe.generate(num, sampler=sampler, num_steps=steps, seed=seed, batch_size=num, progress=False)
        seconds[bf16] = time.perf_counter() - start
    diff = np.abs(images[False].astype(np.int64) - images[True].astype(np.int64))
    return {
        "sampler": sampler, "steps": steps, "num": num,
        "mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(np.percentile(diff, 99)), "max_abs_diff": int(diff.max()),
        "mean_fp32": float(images[False].mean()), "mean_bf16": float(images[True].mean()),
        "seconds_per_image_fp32": seconds[False] / num, "seconds_per_image_bf16": seconds[True] / num,
        "speedup": seconds[False] / seconds[True],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder or checkpoint (a pixel-space diffusion run)")
    p.add_argument("--num", type=int, default=100, help="images for DDIM (DDPM uses half as many; default 100)")
    p.add_argument("--ddim-steps", type=int, default=100)
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", default="benchmarks/results/bf16_sampling.json")
    args = p.parse_args()
    rows = []
    for sampler, steps, num in (("ddim", args.ddim_steps, args.num), ("ddpm", args.ddpm_steps, max(1, args.num // 2))):
        row = compare(args.run, sampler, steps, num, args.seed)
        rows.append(row)
        print(f"{sampler}-{steps} on {num} images: mean |fp32 - bf16| {row['mean_abs_diff']:.3f} of 255 "
              f"(p99 {row['p99_abs_diff']:.0f}, max {row['max_abs_diff']}), bf16 {row['speedup']:.2f}x as fast", flush=True)
    write_json({"benchmark": "bf16-sampling", **environment(), "run": Path(args.run).name, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
