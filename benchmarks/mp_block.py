"""Microbenchmark: EDM2's magnitude-preserving residual block against lddpm's ResBlock, forward + backward on CPU.

A gate: build EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and
improving the training dynamics of diffusion models", Sec. 2, configs E-G) only if its training step would be
>= 1.2x faster than today's. The MP block has no GroupNorm, whose channels-last bf16 backward is what cancelled
the faster channels-last convolutions in lddpm's U-Net (docs/recipe.md), so the question is whether it lets
channels-last bf16 pay.

What is timed, for each U-Net shape (`tiny`, `small` at 32x32, batch 64) and mode (fp32; bf16 autocast; bf16
autocast in channels-last layout), with the machine's default thread count:
- `unet`: today's whole U-Net, forward + backward of a mean-square loss (no optimizer);
- `resblocks`: every ResBlock of that U-Net, each on the input it receives in the U-Net (captured by hooks),
  forward + backward (input and weight gradients), one after another;
- `mp_blocks`: the MP block of the same in/out channels, embedding width and input, the same way.
The MP block, written here from the paper's equations: forced weight normalisation (every conv's weight vector
re-normalised to unit RMS in place at each training forward, then used at unit norm: Eq. 5 and App. B.4), pixel
norm of the input (in every block: EDM2 has it in the encoder's only, so this is an upper bound on its cost),
MP-SiLU silu(x) / 0.596, conv3x3, a learned embedding gain (1 + MP-linear(emb)), MP-SiLU, conv3x3, MP-sum of the
skip and the residual with t = 0.3, a 1x1 MP conv on the skip when channels change.
Every closure is timed once per iteration in turn (finely interleaved, so a change of load falls on all alike);
the result is the median over repeats of each repeat's median, in wall time and in process CPU time. `--threads
0,1` measures with the default thread count (the brief's setting) and again with one thread, a cross-check that
a shared machine disturbs less (no thread waits at a barrier for a thread the OS has preempted).

Estimate of the network's step: with f the share of today's U-Net step spent in its ResBlocks (recipe mode,
bf16 contiguous) and s the ResBlocks-to-MP-blocks speed ratio, the MP network's step is at best
(1 - f) + f / s of today's (Amdahl; the rest of the network kept as it is), so the speed-up is at most
1 / ((1 - f) + f / s), and never more than s. The gate passes at >= 1.2.

    python benchmarks/mp_block.py --out benchmarks/results/mp_block.json
    python benchmarks/mp_block.py --nets tiny --iters 2 --warmup 1 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lddpm.nn import build_network
from lddpm.nn.layers import ResBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

MODES = ("fp32", "bf16", "bf16_channels_last")
RECIPE_MODE = "bf16"  # what fashion-30min trains in (bf16 autocast, contiguous layout)
GATE = 1.2


# ----------------------------------------------------------------------------- the magnitude-preserving block
def normalize(x: torch.Tensor, dim: tuple[int, ...], eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit RMS over `dim` (EDM2's normalisation of weight vectors and, over channels, of pixels)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS for unit-normal input, 0.596 (EDM2 Sec. 2, "magnitude-preserving fixed-function layers")."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.3) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): the sum of two unit-magnitude signals keeps unit magnitude."""
    dtype = torch.promote_types(a.dtype, b.dtype)  # under autocast the skip may be float32, the branch bf16
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t ** 2)


class MPConv(nn.Module):
    """Convolution (or linear map, kernel 0) with forced weight normalisation: the stored weight is re-normalised in
    place at each training forward and used as unit-norm vectors, so the layer preserves magnitudes."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([kernel] * 2 if kernel else [])))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.float()
        dims = tuple(range(1, w.ndim))
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w, dims))  # forced weight normalisation (EDM2 Eq. 5)
        w = normalize(w, dims) * (gain / math.sqrt(w[0].numel()))
        if w.ndim == 2:
            return F.linear(x, w.to(x.dtype) if not torch.is_autocast_enabled() else w)
        return F.conv2d(x, w.to(x.dtype) if not torch.is_autocast_enabled() else w, padding=w.shape[-1] // 2)


class MPBlock(nn.Module):
    """EDM2 config-G style residual block (no GroupNorm, no biases): see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.skip = MPConv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.conv1 = MPConv(out_channels, out_channels, 3)
        self.emb = MPConv(emb_dim, out_channels, 0)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv2 = MPConv(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.skip is not None:
            x = self.skip(x)
        x = normalize(x, dim=(1,))  # pixel norm
        y = self.conv1(mp_silu(x))
        c = self.emb(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = self.conv2(y)
        return mp_sum(x, y)


# ----------------------------------------------------------------------------- timing
def capture_resblocks(net: nn.Module, x: torch.Tensor, t: torch.Tensor,
                      autocast) -> list[tuple[ResBlock, torch.Tensor, torch.Tensor]]:
    """(block, input, embedding) of every ResBlock in one forward of the U-Net (in the mode's precision: under
    bf16 autocast a block's input is bf16 where a convolution made it)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach(), args[1].detach())))
             for m in net.modules() if isinstance(m, ResBlock)]
    with torch.no_grad(), autocast():
        net(x, t)
    for h in hooks:
        h.remove()
    return seen


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def layout(x: torch.Tensor, mode: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if mode.endswith("channels_last") and x.ndim == 4 else x


def make_steps(net_name: str, batch: int, mode: str):
    """The three closures (unet, resblocks, mp_blocks) of one network shape and mode."""
    torch.manual_seed(0)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode.startswith("bf16") else nullcontext
    net = build_network("unet", net_name, in_channels=1, num_classes=0)
    if mode.endswith("channels_last"):
        net = net.to(memory_format=torch.channels_last)
    res = net.config.resolution
    x = torch.randn(batch, 1, res, res)
    t = torch.randint(0, 1000, (batch,))
    captured = capture_resblocks(net, layout(x, mode), t, autocast)

    def unet_step():
        net.zero_grad(set_to_none=True)
        with autocast():
            out = net(layout(x, mode), t)
        out.float().square().mean().backward()

    def stack(blocks):
        data = []
        for block, inp, emb in blocks:
            block.train()
            with torch.no_grad(), autocast():
                out = block(layout(inp, mode), emb)
            data.append((block, layout(inp, mode), emb, layout(torch.randn(out.shape, dtype=out.dtype), mode)))

        def step():
            for block, inp, emb, grad in data:
                block.zero_grad(set_to_none=True)
                inp = inp.detach().requires_grad_(True)
                with autocast():
                    out = block(inp, emb)
                out.backward(grad.to(out.dtype))
        return step

    today = [(copy.deepcopy(b).to(memory_format=torch.channels_last) if mode.endswith("channels_last")
              else copy.deepcopy(b), inp, emb) for b, inp, emb in captured]
    mp = [(MPBlock(b.conv1.in_channels, b.conv1.out_channels, emb.shape[1]), inp, emb) for b, inp, emb in captured]
    if mode.endswith("channels_last"):
        mp = [(b.to(memory_format=torch.channels_last), inp, emb) for b, inp, emb in mp]
    shapes = [[int(inp.shape[1]), int(b.conv1.out_channels), int(inp.shape[-1])] for b, inp, _ in captured]
    return {"unet": unet_step, "resblocks": stack(today), "mp_blocks": stack(mp)}, shapes


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (Linux), a record of how shared the machine was."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def bf16_support() -> dict[str, object]:
    """Whether this CPU has native bf16 (AVX-512 bf16 / AMX), from torch and /proc/cpuinfo."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {"mkldnn_available": torch.backends.mkldnn.is_available(),
            "mkldnn_bf16_supported": bool(native()) if native else None,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def measure(built: dict, iters: int, warmup: int, repeats: int, start: float, label: str) -> dict[str, list]:
    """Every closure warmed up, then timed once per iteration in turn (finely interleaved, so a change of load
    falls on all of them alike); returns key -> per-repeat lists of {wall_s, cpu_s}."""
    for steps, _ in built.values():
        for step in steps.values():
            for _ in range(warmup):
                step()
    samples: dict[str, list[list[dict[str, float]]]] = {}
    for r in range(repeats):
        for _ in range(iters):
            for (n, m), (steps, _) in built.items():
                for what, step in steps.items():
                    w0, c0 = clock()
                    step()
                    w1, c1 = clock()
                    per_repeat = samples.setdefault(f"{n}/{m}/{what}", [])
                    if len(per_repeat) <= r:
                        per_repeat.append([])
                    per_repeat[r].append({"wall_s": w1 - w0, "cpu_s": c1 - c0})
        print(f"{label}: repeat {r + 1}/{repeats} done after {time.perf_counter() - start:.0f} s", flush=True)
    return samples


def summarise(built: dict, samples: dict, threads: int) -> tuple[list[dict], dict]:
    """Rows (median over repeats of each repeat's median) and the gate's estimate per network."""
    rows = []
    for (n, m), (_, shapes) in built.items():
        row = {"net": n, "mode": m, "threads": threads, "block_shapes": shapes}
        for what in ("unet", "resblocks", "mp_blocks"):
            reps = samples[f"{n}/{m}/{what}"]
            row[what] = {k: statistics.median(statistics.median(x[k] for x in rep) for rep in reps)
                         for k in ("wall_s", "cpu_s")}
            row[what]["wall_s_repeats"] = [statistics.median(x["wall_s"] for x in rep) for rep in reps]
        rows.append(row)
    decisions = {}
    for n in dict.fromkeys(r["net"] for r in rows):
        by_mode = {r["mode"]: r for r in rows if r["net"] == n}
        if RECIPE_MODE not in by_mode:
            continue
        recipe = by_mode[RECIPE_MODE]
        out = {}
        for clock_name in ("wall_s", "cpu_s"):
            f = recipe["resblocks"][clock_name] / recipe["unet"][clock_name]
            best_mode = min(by_mode, key=lambda m: by_mode[m]["mp_blocks"][clock_name])
            s = recipe["resblocks"][clock_name] / by_mode[best_mode]["mp_blocks"][clock_name]
            out[clock_name] = {"resblock_share_of_unet_step": f, "best_mp_mode": best_mode, "block_speedup": s,
                               "network_speedup_bound": 1.0 / ((1 - min(f, 1.0)) + min(f, 1.0) / s),
                               "mp_vs_resblocks_same_mode": {m: by_mode[m]["resblocks"][clock_name]
                                                             / by_mode[m]["mp_blocks"][clock_name] for m in by_mode}}
        out["gate"] = GATE
        out["passes"] = out["wall_s"]["network_speedup_bound"] >= GATE
        decisions[n] = out
    return rows, decisions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="tiny,small", help="U-Net shapes (lddpm.nn registry names), comma-separated")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--fp32-nets", default="tiny", help="nets also timed in fp32 (the others: bf16 modes only)")
    p.add_argument("--threads", default="0", help="torch thread counts to measure with, comma-separated (0: the "
                   "default, OMP_NUM_THREADS or all cores; 1: a cross-check that a shared machine disturbs less)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median taken)")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args()
    nets, modes = args.nets.split(","), args.modes.split(",")
    fp32_nets = set(args.fp32_nets.split(","))
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    load_before = load_average()
    built = {(n, m): make_steps(n, args.batch, m) for n in nets for m in modes if m != "fp32" or n in fp32_nets}
    rows, decisions = [], {}
    for count in [int(t) for t in args.threads.split(",")]:
        threads = count or default_threads
        torch.set_num_threads(threads)
        samples = measure(built, args.iters, args.warmup, args.repeats, start, f"{threads} thread(s)")
        more_rows, more = summarise(built, samples, threads)
        rows += more_rows
        decisions[str(threads)] = more
    torch.set_num_threads(default_threads)
    result = {"benchmark": "mp_block", "command": " ".join(sys.argv), "default_threads": default_threads,
              "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
              "repeats": args.repeats, "recipe_mode": RECIPE_MODE, "bf16_support": bf16_support(),
              "environment": environment(), "seconds": time.perf_counter() - start, "rows": rows,
              "load_average_before": load_before, "load_average_after": load_average(),
              "decision": decisions,
              "notes": ["times are per forward + backward of the whole network or of all its residual blocks",
                        "machine possibly shared with other jobs: medians of finely interleaved repeats"]}
    print(f"{'net':6} {'thr':>3} {'mode':20} {'unet ms':>9} {'resblocks ms':>13} {'mp_blocks ms':>13} {'res/mp':>7} "
          f"{'res/mp cpu':>10}")
    for r in rows:
        print(f"{r['net']:6} {r['threads']:3d} {r['mode']:20} {1e3 * r['unet']['wall_s']:9.1f} "
              f"{1e3 * r['resblocks']['wall_s']:13.1f} {1e3 * r['mp_blocks']['wall_s']:13.1f} "
              f"{r['resblocks']['wall_s'] / r['mp_blocks']['wall_s']:7.2f} "
              f"{r['resblocks']['cpu_s'] / r['mp_blocks']['cpu_s']:10.2f}")
    for threads, per_net in decisions.items():
        for n, d in per_net.items():
            for clock_name in ("wall_s", "cpu_s"):
                w = d[clock_name]
                print(f"{n} ({threads} thread(s), {clock_name[:-2]}): ResBlocks {100 * w['resblock_share_of_unet_step']:.0f}% "
                      f"of the {RECIPE_MODE} U-Net step; MP blocks ({w['best_mp_mode']}) {w['block_speedup']:.2f}x the "
                      f"{RECIPE_MODE} ResBlocks -> network step at most {w['network_speedup_bound']:.2f}x (gate {GATE}x)")
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main()
