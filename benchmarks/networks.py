"""Training throughput and peak memory of the named networks: fp32 vs bf16 autocast vs channels_last.

For every config: forward + backward images/s (median over --iters after warm-up), no-grad
forward images/s, and peak memory (CPU: the process's peak RSS above its level before the run,
from /proc/self/status VmHWM reset through /proc/self/clear_refs; CUDA: max_memory_allocated).
Each U-Net (VAE, DiT) is measured beside `diffusers.UNet2DModel` (`AutoencoderKL`,
`DiTTransformer2DModel`) built with the same shape (a benchmark-only dependency) so the ratio shows.
A config may carry field overrides in brackets, e.g. `unet:tiny[resolution=8;in_channels=4]`.
`--interleave` also times each DiT and its twin in turn in one process, in CPU time (a ratio that
survives load from other processes); `--latent-ratio` does the same for the latent DiT against the
latent U-Net. Prints a table and writes JSON; `--merge` keeps the rows of an existing --out file
that this run does not measure again.

    python benchmarks/networks.py --out results.json                    # default configs, batch 8
    python benchmarks/networks.py --quick                                # a seconds-long smoke run
    python benchmarks/networks.py --configs unet:small,vae:kl-f4 --batch 32 --devices cpu,cuda
    python benchmarks/networks.py --configs "unet:tiny[resolution=8;in_channels=4;num_classes=10]" --modes fp32 \
        --batch 64 --latent-ratio 30 --out benchmarks/results/networks.json --merge
    python benchmarks/networks.py --configs dit:dit-tiny/2,dit:dit-tiny/4 --modes fp32,bf16 --batch 64 \
        --interleave 10 --out benchmarks/results/networks.json --merge
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lddpm.nn import build_network, network_config
from lddpm.nn.vae import vae_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, environment  # noqa: E402

DEFAULT_CONFIGS = "unet:ddpm-cifar10,unet:small,unet:tiny,vae:kl-f4,vae:kl-f4-tiny"
MODES = ("fp32", "bf16", "channels_last")
COMPILE_MODE = "bf16_compile"  # bf16 autocast + torch.compile (not a default mode: compiling takes minutes on CPU)


def diffusers_twin(cfg):
    """`diffusers.UNet2DModel` with the shape of a UNetConfig (same blocks, widths, attention levels)."""
    from diffusers import UNet2DModel  # benchmark-only dependency

    levels = cfg.level_resolutions()
    attn = [r in cfg.attention_resolutions for r in levels]
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    head_dim = cfg.num_head_channels if cfg.num_head_channels > 0 else None
    if head_dim is None and cfg.num_heads > 1:
        head_dim = widths[-1] // cfg.num_heads
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=cfg.in_channels,
        out_channels=cfg.in_channels * (2 if cfg.learned_sigma else 1), block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups, dropout=cfg.dropout,
        attention_head_dim=head_dim, add_attention=cfg.mid_attention,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None)


def vae_twin(cfg):
    """`diffusers.AutoencoderKL` with the shape of a VAEConfig (same levels, widths, blocks, latent channels)."""
    from diffusers import AutoencoderKL  # benchmark-only dependency

    levels = len(cfg.channel_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups, sample_size=cfg.resolution)


def dit_twin(cfg):
    """`diffusers.DiTTransformer2DModel` with the shape of a DiT config (patch size, width, depth, heads)."""
    from diffusers import DiTTransformer2DModel  # benchmark-only dependency

    heads = cfg.num_heads
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=cfg.hidden_size // heads, in_channels=cfg.in_channels,
        out_channels=cfg.in_channels * (2 if getattr(cfg, "learned_sigma", False) else 1), num_layers=cfg.depth,
        sample_size=cfg.resolution, patch_size=cfg.patch_size, num_embeds_ada_norm=max(cfg.num_classes, 1),
        norm_eps=1e-6)  # the paper's (and lddpm's) LayerNorm eps; diffusers' default for norm2 is 1e-5


def twin(kind: str, cfg):
    """diffusers' network of the same shape as an lddpm config of `kind` (unet, vae or dit)."""
    builders = {"unet": diffusers_twin, "vae": vae_twin, "dit": dit_twin}
    if kind not in builders:
        raise ValueError(f"no diffusers twin for network kind {kind!r}")
    return builders[kind](cfg)


def is_diffusers(model) -> bool:
    """True for a diffusers module (also behind torch.compile)."""
    return type(getattr(model, "_orig_mod", model)).__module__.startswith("diffusers")


def make_step(kind: str, model, batch: int, device: torch.device, channels_last: bool, shape: tuple[int, int, int],
              num_classes: int = 0):
    """A closure running one forward (+ backward when grad is enabled) on fixed random data.

    `shape` is (resolution, in_channels, out_channels); class-conditional networks get random labels.
    """
    res, ch, out_ch = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, ch, res, res, generator=g) * 2 - 1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device) if num_classes else None
    twin = is_diffusers(model)
    if kind == "vae":
        def step():
            if twin:  # the same computation as lddpm's forward: encode, sample the posterior, decode
                posterior = model.encode(x).latent_dist
                recon = model.decode(posterior.sample()).sample
                loss = (recon.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
            else:
                recon, posterior = model(x)
                loss = vae_loss(x, recon, posterior, kl_weight=1e-6)["loss"]
            if torch.is_grad_enabled():
                loss.backward()
    else:
        target = torch.randn(batch, out_ch, res, res, generator=g).to(device)
        cond = {} if y is None else {"class_labels": y} if twin else {"y": y}

        def step():
            out = model(x, t, **cond).sample if twin else model(x, t, **cond)
            loss = F.mse_loss(out.float(), target)
            if torch.is_grad_enabled():
                loss.backward()
    return step


def measure(kind: str, model, *, shape: tuple[int, int, int], batch: int, iters: int, warmup: int,
            device: torch.device, mode: str, num_classes: int = 0, forward_only: bool = True,
            compile_backend: str = "inductor") -> dict:
    """Median forward+backward (and no-grad forward) throughput and peak memory of one (model, mode).

    mode is one of MODES or COMPILE_MODE; `warmup_s` is the warm-up time (it holds the compile time).
    forward_only=False skips the no-grad measurement (with torch.compile it would compile again).
    """
    channels_last = mode == "channels_last"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.to(device).train()
    run_model = torch.compile(model, backend=compile_backend) if mode == COMPILE_MODE else model
    step = make_step(kind, run_model, batch, device, channels_last, shape, num_classes)
    bf16 = mode in ("bf16", COMPILE_MODE)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def timed(grad: bool) -> tuple[list[float], float]:
        times, warm = [], 0.0
        for i in range(warmup + iters):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast, torch.set_grad_enabled(grad):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            else:
                warm += time.perf_counter() - t0
        return times, warm

    with PeakMemory(device) as mem:
        train, warm = timed(True)
    model.zero_grad(set_to_none=True)
    model.eval()
    row = {"train_img_s": batch / statistics.median(train), "peak_mib": mem.mib,
           "train_s": statistics.median(train), "warmup_s": warm}
    if forward_only:
        infer, _ = timed(False)
        row["fwd_img_s"] = batch / statistics.median(infer)
    return row


def measure_row(spec: dict) -> dict:
    """Build one network (ours or its diffusers twin) and measure it in one mode on one device.

    spec: kind, config, impl ("lddpm" or "diffusers"), device, mode, batch, iters, warmup, and
    optionally overrides (config fields), forward (False: no no-grad measurement) and compile_backend.
    """
    kind, name, device = spec["kind"], spec["config"], torch.device(spec["device"])
    cfg = network_config(kind, name, **spec.get("overrides", {}))
    shape = (cfg.resolution, cfg.in_channels, cfg.in_channels * (2 if getattr(cfg, "learned_sigma", False) else 1))
    torch.manual_seed(0)
    overrides = spec.get("overrides", {})
    with device:  # parameters are created on the device (a 386M-parameter init is slow on a CPU)
        model = twin(kind, cfg) if spec["impl"] == "diffusers" else build_network(kind, name, **overrides)
    row = dict(spec, params=sum(p.numel() for p in model.parameters()))
    row.update(measure(kind, model, shape=shape, batch=spec["batch"], iters=spec["iters"], warmup=spec["warmup"],
                       device=device, mode=spec["mode"], num_classes=getattr(cfg, "num_classes", 0),
                       forward_only=spec.get("forward", True), compile_backend=spec.get("compile_backend", "inductor")))
    return row


def parse_entry(entry: str) -> tuple[str, str, dict]:
    """"kind:name[field=value;...]" -> (kind, name, overrides); kind defaults to unet."""
    kind, name = entry.split(":", 1) if ":" in entry else ("unet", entry)
    overrides = {}
    if name.endswith("]") and "[" in name:
        name, fields = name[:-1].split("[", 1)
        for item in filter(None, fields.split(";")):
            key, value = item.split("=", 1)
            overrides[key] = json.loads(value)
    return kind, name, overrides


def interleaved_times(steps: dict, rounds: int, warmup: int, grad: bool, autocast) -> dict[str, float]:
    """Median CPU seconds of this process per call of each step, the steps called in turn each round.

    CPU time rather than wall time, and interleaved, so that other processes on a shared machine
    distort the ratio between the steps as little as possible.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            t0 = time.process_time()
            with autocast, torch.set_grad_enabled(grad):
                step()
            if i >= warmup:
                times[name].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_vs_diffusers(spec: dict, rounds: int) -> dict:
    """lddpm over diffusers speed for one row, the two networks timed in turn in this process."""
    kind, name, overrides = spec["kind"], spec["config"], spec.get("overrides", {})
    cfg = network_config(kind, name, **overrides)
    shape = (cfg.resolution, cfg.in_channels, cfg.in_channels * (2 if getattr(cfg, "learned_sigma", False) else 1))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    models = {"lddpm": build_network(kind, name, **overrides), "diffusers": twin(kind, cfg)}
    steps = {}
    for k, m in models.items():
        m.to(device).train()
        step = make_step(kind, m, spec["batch"], device, False, shape, getattr(cfg, "num_classes", 0))
        steps[k] = lambda m=m, step=step: (m.zero_grad(set_to_none=True), step())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec["mode"] == "bf16" else contextlib.nullcontext()
    train = interleaved_times(steps, rounds, 1, True, autocast)
    for m in models.values():
        m.eval()
    fwd = interleaved_times(steps, rounds, 1, False, autocast)
    return {"interleaved_rounds": rounds, "train_speedup_vs_diffusers_interleaved": train["diffusers"] / train["lddpm"],
            "fwd_speedup_vs_diffusers_interleaved": fwd["diffusers"] / fwd["lddpm"]}


def latent_train_ratio(batch: int, rounds: int, warmup: int = 2) -> dict:
    """Train speed of the latent DiT over the latent U-Net preset's network, interleaved in one process.

    Both take the quick VAE's 8x8x4 latents with 10 classes; each round times one training step
    (forward, backward, AdamW) of each in CPU time (`interleaved_times`).
    """
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    y, target = torch.randint(0, 10, (batch,), generator=g), torch.randn(batch, 4, 8, 8, generator=g)
    nets = {"unet tiny": build_network("unet", "tiny", resolution=8, in_channels=4, num_classes=10),
            "dit-tiny/2": build_network("dit", "dit-tiny/2", resolution=8, in_channels=4, num_classes=10)}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in nets.items()}

    def train_step(name: str) -> None:
        loss = F.mse_loss(nets[name](x, t, y), target)
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()

    steps = {k: (lambda k=k: train_step(k)) for k in nets}
    times = interleaved_times(steps, rounds, warmup, True, contextlib.nullcontext())
    img_s = {k: batch / v for k, v in times.items()}
    return {"batch": batch, "rounds": rounds, "train_img_s_cpu_time": img_s,
            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()},
            "dit_over_unet": img_s["dit-tiny/2"] / img_s["unet tiny"]}


def merge_rows(old: dict, new: dict) -> dict:
    """The old report's rows that `new` did not measure again, then the new rows; the new run's meta."""
    key = lambda r: (r["kind"], r["config"], json.dumps(r.get("overrides", {}), sort_keys=True),  # noqa: E731
                     r["impl"], r["device"], r["mode"])
    measured = {key(r) for r in new["results"]}
    kept = [r for r in old.get("results", []) if key(r) not in measured]
    metas = [m for m in ([old.get("meta")] + old.get("earlier_meta", [])) if m]
    return {**old, **new, "meta": new["meta"] or old.get("meta"), "results": kept + new["results"],
            "earlier_meta": metas if new["meta"] else old.get("earlier_meta", [])}


def run_isolated(spec: dict) -> dict:
    """measure_row in a fresh Python process, so peak memory is not hidden by memory freed earlier."""
    proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark row {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    """Measure every (config, device, impl, mode); returns the JSON-ready results."""
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    results = []
    for entry in filter(None, args.configs.split(",")):
        kind, name, overrides = parse_entry(entry)
        impls = ["lddpm"] + (["diffusers"] if not args.no_diffusers else [])
        modes = [m for m in args.modes.split(",") if not (kind == "dit" and m == "channels_last")]
        for device in devices:
            for impl in impls:
                for mode in modes:
                    spec = {"kind": kind, "config": name, "impl": impl, "device": device, "mode": mode,
                            "batch": args.batch, "iters": args.iters, "warmup": args.warmup}
                    if overrides:
                        spec["overrides"] = overrides
                    row = measure_row(spec) if args.in_process else run_isolated(spec)
                    results.append(row)
                    print(f"  {impl:9s} {name:16s} {device:4s} {mode:13s} "
                          f"{row['train_img_s']:8.1f} img/s train  {row['fwd_img_s']:8.1f} img/s fwd  "
                          f"{row['peak_mib']:8.0f} MiB", flush=True)
    ours = {(r["config"], json.dumps(r.get("overrides", {})), r["device"], r["mode"]): r
            for r in results if r["impl"] == "lddpm"}
    for r in results:
        if r["impl"] == "diffusers":
            o = ours[(r["config"], json.dumps(r.get("overrides", {})), r["device"], r["mode"])]
            o["train_speedup_vs_diffusers"] = o["train_img_s"] / r["train_img_s"]
            if r["mode"] == "fp32":  # diffusers as its training example runs it (mixed_precision "no")
                for mine in results:
                    if mine["impl"] == "lddpm" and (mine["config"], json.dumps(mine.get("overrides", {})),
                                                    mine["device"]) == (r["config"], json.dumps(r.get("overrides", {})),
                                                                        r["device"]):
                        mine["train_speedup_vs_diffusers_fp32"] = mine["train_img_s"] / r["train_img_s"]
            o["fwd_speedup_vs_diffusers"] = o["fwd_img_s"] / r["fwd_img_s"]
            if args.interleave and r["kind"] == "dit":
                o.update(interleaved_vs_diffusers(o, args.interleave))
                print(f"  interleaved {o['config']} {o['mode']}: lddpm / diffusers "
                      f"{o['train_speedup_vs_diffusers_interleaved']:.2f}x train, "
                      f"{o['fwd_speedup_vs_diffusers_interleaved']:.2f}x forward", flush=True)
    return {"meta": {**environment(),
                     # Without native bf16 support oneDNN is skipped and bf16 convs fall back to slow kernels.
                     "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                     "batch": args.batch, "iters": args.iters, "warmup": args.warmup},
            "results": results}


def print_table(report: dict) -> None:
    """A Markdown table of the results."""
    print("\n| config | impl | params | device | mode | batch | train img/s | fwd img/s | peak MiB "
          "| vs diffusers same mode (train; interleaved where measured) | vs diffusers fp32 (train) |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        ratio = r.get("train_speedup_vs_diffusers_interleaved", r.get("train_speedup_vs_diffusers"))
        vs_fp32 = r.get("train_speedup_vs_diffusers_fp32")
        print(f"| {r['config']}{'*' if r.get('overrides') else ''} | {r['impl']} | {r['params'] / 1e6:.2f}M | {r['device']} | {r['mode']} | {r['batch']} "
              f"| {r['train_img_s']:.1f} | {r['fwd_img_s']:.1f} | {r['peak_mib']:.0f} | "
              f"{f'{ratio:.2f}x' if ratio else ''} | {f'{vs_fp32:.2f}x' if vs_fp32 else ''} |")


def main(argv=None) -> None:
    """Parse arguments, run, print and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma list of kind:name[field=value;...] (kind unet, dit or vae)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {MODES + (COMPILE_MODE,)}")
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when absent")
    p.add_argument("--no-diffusers", action="store_true",
                   help="skip the diffusers twins (UNet2DModel, AutoencoderKL, DiTTransformer2DModel)")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="also time each DiT and its diffusers twin in turn in one process for ROUNDS rounds")
    p.add_argument("--latent-ratio", type=int, default=0, metavar="ROUNDS",
                   help="also time the latent DiT against the latent U-Net, interleaved, for ROUNDS steps each")
    p.add_argument("--merge", action="store_true", help="keep the rows of an existing --out not measured again")
    p.add_argument("--quick", action="store_true", help="tiny configs, batch 4, 2 iterations: a smoke test")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--in-process", action="store_true",
                   help="measure every row in this process (faster start, but peak memory is less exact)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row, JSON in and out
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(measure_row(json.loads(args.row))))
        return
    if args.quick:
        args.configs, args.batch, args.iters, args.warmup = "unet:tiny,vae:kl-f4-tiny", 4, 2, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iters} iterations after {args.warmup} warm-up; oneDNN bf16: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}", flush=True)
    report = run(args) if args.configs else {"meta": {}, "results": []}
    print_table(report)
    if args.latent_ratio:
        latent = latent_train_ratio(64, args.latent_ratio)
        report["latent_dit_vs_unet"] = latent
        print(f"\nlatent DiT dit-tiny/2 / U-Net tiny on 8x8x4, batch 64, {args.latent_ratio} interleaved training "
              f"steps: {latent['dit_over_unet']:.2f}x train img/s ({latent['train_img_s_cpu_time']}, CPU time)")
    if args.out:
        if args.merge and Path(args.out).is_file():
            report = merge_rows(json.loads(Path(args.out).read_text()), report)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
