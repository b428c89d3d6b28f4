"""Sampling with the network under bf16 autocast and in channels-last memory format against fp32:
same run, same seeds, per-image differences and speed.

    python benchmarks/bf16_sampling.py RUN                      # DDIM-100 on 100 images, DDPM-1000 on 50
    python benchmarks/bf16_sampling.py RUN --num 8 --ddpm-steps 50 --ddim-steps 10   # a quick look

For each sampler the run is sampled four times with the same seeds (the same starting noise and,
for DDPM, the same per-step noise): fp32 and bf16 (lddpm.pipeline.bf16_network: only the network runs
in bf16, the sampler's arithmetic stays in float32), each with the U-Net in the default contiguous
and in channels-last memory format (`load_pipeline(channels_last=...)`). The uint8 images of each
variant are compared pixel by pixel with fp32 contiguous. Prints one line per variant, writes JSON.
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


VARIANTS = ((False, False), (False, True), (True, False), (True, True))  # (bf16, channels_last)


def compare(run: str, sampler: str, steps: int, num: int, seed: int) -> list[dict]:
    """Sample `num` images per variant with the same seeds; differences in grey levels of 255 against fp32 contiguous."""
    images, seconds = {}, {}
    for variant in VARIANTS:
        bf16, channels_last = variant
        pipe = load_pipeline(run, "cpu", bf16=bf16, channels_last=channels_last)
        pipe.generate(2, sampler=sampler, num_steps=2, seed=seed, progress=False)  # warm-up: kernels, allocator
        start = time.perf_counter()
        images[variant], _ = pipe.generate(num, sampler=sampler, num_steps=steps, seed=seed, batch_size=num,
                                           progress=False)
        seconds[variant] = time.perf_counter() - start
    base = VARIANTS[0]
    rows = []
    for variant in VARIANTS:
        diff = np.abs(images[base].astype(np.int64) - images[variant].astype(np.int64))
        rows.append({
            "sampler": sampler, "steps": steps, "num": num, "bf16": variant[0], "channels_last": variant[1],
            "mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(np.percentile(diff, 99)),
            "max_abs_diff": int(diff.max()), "mean": float(images[variant].mean()),
            "seconds_per_image": seconds[variant] / num, "speedup": seconds[base] / seconds[variant],
        })
    return rows


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
        for row in compare(args.run, sampler, steps, num, args.seed):
            rows.append(row)
            name = ("bf16" if row["bf16"] else "fp32") + (" channels-last" if row["channels_last"] else " contiguous")
            print(f"{sampler}-{steps} on {num} images, {name:19s}: {row['seconds_per_image']:.4f} s/image, "
                  f"{row['speedup']:.2f}x fp32 contiguous; mean |diff| {row['mean_abs_diff']:.3f} of 255 "
                  f"(p99 {row['p99_abs_diff']:.0f}, max {row['max_abs_diff']})", flush=True)
    write_json({"benchmark": "bf16-sampling", **environment(), "run": Path(args.run).name, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
