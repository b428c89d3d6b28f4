"""One prepared GPU check of lddpm at the study's real scale; writes gpu-check.json and gpu-check.md.

Sections (each guarded: a failure is recorded with its error text and the others still run; each
has a time budget so the whole stays under about 8 minutes on one GPU):
  environment          torch / CUDA / cuDNN versions, GPU, memory, lddpm version, git commit
  training_throughput  forward+backward img/s and peak memory, fp32 / bf16 / bf16 + torch.compile, for
                       ddpm-cifar10 (32px, batch 128), adm-imagenet128 (128px), the kl-f8 VAE (128px)
                       and a latent DiT when lddpm has one, each beside diffusers' twin (ratio)
  train_resume         `lddpm train` under torchrun (one process): N steps, then N/2 + --resume, with
                       the final weights compared bitwise; plus a one-rank DDP probe (NCCL on CUDA)
  sampling             images/s of ddpm / ddim / dpm++2m, with and without guidance (s = 3), batch 256
  inception            FID-network feature throughput on the device, and device vs CPU features of
                       500 real Fashion-MNIST images (max relative difference, FID between the two)
  end_to_end           the fashion-quick preset trained for 2 minutes, 2,000 dpm++2m samples, FID
                       against the test split

    python benchmarks/gpu.py --out gpu-check                 # on a CUDA machine (about 8 minutes)
    python benchmarks/gpu.py --out gpu-dry --dry-run         # the same code paths on CPU, tiny sizes, seconds

`--dry-run` uses tiny networks, a few steps, synthetic Fashion-MNIST-format files and a stand-in
feature network, so it needs neither a GPU nor the data. The exit status is 1 when a section failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import lddpm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from networks import COMPILE_MODE, measure_row  # noqa: E402
from train import write_synthetic_idx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Seconds per section on a GPU (about 470 s in all); the dry run ignores them.
BUDGETS = {"environment": 10, "training_throughput": 140, "train_resume": 70, "sampling": 30, "inception": 40,
           "end_to_end": 190}
# Seconds a torch.compile row needs to start (compiling forward + backward); larger nets compile longer.
COMPILE_RESERVE = {"adm-imagenet128": 150}
E2E_TRAIN_SECONDS = 120


@dataclass
class Check:
    """Settings shared by the sections: dry run or not, device, folders, and the current deadline."""

    dry_run: bool
    device: torch.device
    work: Path
    data_root: Path | None
    deadline: float = float("inf")
    extractors: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        """Where prepared datasets and FID references go (inside the work folder)."""
        return self.work / "cache"

    def left(self) -> float:
        """Seconds left in the current section's budget."""
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        """Wait for the device (CUDA kernels run asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- helpers


def subprocess_env(chk: Check) -> dict[str, str]:
    """Environment for child processes: the same lddpm as this process, one thread each in a dry run."""
    env = dict(os.environ)
    src = str(Path(lddpm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    if chk.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start(cmd: list[str], chk: Check) -> tuple[subprocess.Popen, Path]:
    """Start a child process whose stdout and stderr go to one log file (a pipe could fill and block it)."""
    logs = chk.work / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"{len(list(logs.iterdir())):03d}.log"
    with open(path, "w") as handle:
        return subprocess.Popen(cmd, env=subprocess_env(chk), stdout=handle, stderr=subprocess.STDOUT, text=True), path


def finish(proc: subprocess.Popen, log: Path, cmd: list[str], timeout: float) -> str:
    """Wait for a child; return its output, or raise with the output's end when it failed or overran."""
    try:
        proc.wait(timeout=max(timeout, 5))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd[:9])} ... ran over {timeout:.0f} s:\n{log.read_text()[-2500:]}") from None
    out = log.read_text()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:9])} ... exited with {proc.returncode}:\n{out[-2500:]}")
    return out


def run_commands(cmds: list[list[str]], chk: Check, timeout: float) -> list[str]:
    """Run commands side by side and return their outputs; a failure raises with the end of its output."""
    started = [start(c, chk) for c in cmds]
    try:
        return [finish(proc, log, cmd, timeout) for cmd, (proc, log) in zip(cmds, started)]
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def fashion_root(chk: Check) -> Path:
    """The Fashion-MNIST folder (synthetic IDX files in a dry run); a clear error when the data is missing."""
    if chk.dry_run:
        root = chk.work / "idx"
        if not (root / "t10k-images-idx3-ubyte.gz").is_file():
            write_synthetic_idx(root, n=96)
            write_synthetic_idx(root, n=48, prefix="t10k")
        return root
    from lddpm.data.readers import FASHION_MNIST_DEFAULT_ROOT

    root = chk.data_root or FASHION_MNIST_DEFAULT_ROOT
    if not any(Path(root).glob("train-images-idx3-ubyte*")) or not any(Path(root).glob("t10k-images-idx3-ubyte*")):
        raise RuntimeError(f"Fashion-MNIST IS MISSING: no train/t10k IDX files in {root}; install the Debian package "
                           "dataset-fashion-mnist (make system-deps) or pass --data-root FOLDER")
    return root


def prepared(chk: Check, split: str, resolution: int = 32):
    """The prepared Fashion-MNIST cache of a split (built once in the work folder)."""
    from lddpm.data import open_cache, prepare

    return open_cache(prepare("fashion-mnist", resolution=resolution, split=split, root=fashion_root(chk),
                              cache_dir=chk.cache_dir, progress=False))


class StandInFeatures(torch.nn.Module):
    """A fixed random conv + mean pool: a cheap stand-in for Inception in the dry run."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 5, stride=4)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def extractor(chk: Check, device: str | torch.device):
    """The pinned Inception feature extractor on `device` (the stand-in in a dry run), loaded once."""
    key = str(device)
    if key not in chk.extractors:
        from lddpm.metrics import FeatureExtractor, load_inception

        if chk.dry_run:
            chk.extractors[key] = FeatureExtractor(StandInFeatures(), name="stand-in", sha1="0" * 40, input_size=16,
                                                   batch_size=4, device=device)
        else:
            batch = 250 if torch.device(device).type == "cuda" else 50
            chk.extractors[key] = load_inception(device=device, batch_size=batch)
    return chk.extractors[key]


def free_memory() -> None:
    """Drop cached CUDA blocks and compiled graphs between measurements."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections


def section_environment(chk: Check) -> dict:
    """Versions, GPU, memory, lddpm version and git commit."""
    info = environment()
    info.update(lddpm=lddpm.__version__, device=str(chk.device), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cuda_available=torch.cuda.is_available())
    if chk.device.type == "cuda":
        props = torch.cuda.get_device_properties(chk.device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        info["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return {"summary": info}


def throughput_plan(chk: Check) -> list[tuple[str, str, dict, int]]:
    """(kind, config, overrides, batch) to measure; the DiT only when lddpm registers one."""
    from lddpm.nn import NETWORK_NAMES

    dits = NETWORK_NAMES.get("dit", ())
    if chk.dry_run:
        plan = [("unet", "tiny", {"resolution": 8}, 2),
                ("unet", "tiny", {"resolution": 8, "num_classes": 10, "learned_sigma": True}, 2),
                ("vae", "kl-f4-tiny", {"resolution": 8}, 2)]
        tiny_dits = [n for n in dits if "tiny" in n.lower()]
        if tiny_dits:  # a full-size DiT would take minutes on a CPU
            plan.append(("dit", tiny_dits[0], {}, 2))
        return plan
    total_gib = torch.cuda.get_device_properties(chk.device).total_memory / 2**30
    adm_batch = 16 if total_gib >= 100 else 8  # 386M parameters at 128x128 (ADM trained 8 per 32 GB GPU in fp16)
    plan = [("unet", "ddpm-cifar10", {}, 128), ("vae", "kl-f8", {}, 16), ("unet", "adm-imagenet128", {}, adm_batch)]
    if dits:  # DiT-B/2-like if there is one (latents 16x16x4 of kl-f8 at 128 px)
        plan.append(("dit", next((n for n in dits if "b" in n.lower()), dits[0]), {}, 64))
    return plan


def section_training_throughput(chk: Check) -> dict:
    """lddpm vs diffusers twins, fp32 / bf16 / bf16 + compile; compile rows last (they cost the most)."""
    from lddpm.nn import NETWORK_NAMES

    plan = throughput_plan(chk)
    notes = [] if "dit" in NETWORK_NAMES else ["no DiT: lddpm.nn has no 'dit' network kind yet (skipped)"]
    modes = ["fp32", "bf16", COMPILE_MODE]
    iters, warmup = (1, 1) if chk.dry_run else (5, 2)
    specs = [dict(kind=k, config=n, overrides=o, batch=b, impl=impl, mode=m, device=str(chk.device), iters=iters,
                  warmup=warmup, forward=False)
             for m in modes for (k, n, o, b) in plan for impl in ("lddpm", "diffusers")]
    if chk.dry_run:  # inductor needs a minute on CPU: dynamo's eager backend (same tracing), first network only
        specs = [s for s in specs if s["mode"] != COMPILE_MODE or (s["config"], s["overrides"]) == plan[0][1:3]]
        for s in specs:
            s["compile_backend"] = "eager"
    rows = []
    for spec in specs:
        reserve = COMPILE_RESERVE.get(spec["config"], 45) if spec["mode"] == COMPILE_MODE else 10
        label = {k: spec[k] for k in ("kind", "config", "impl", "mode", "batch")}
        label["overrides"] = ", ".join(f"{k}={v}" for k, v in spec["overrides"].items()) or "-"
        if not chk.dry_run and chk.left() < reserve:
            rows.append({**label, "skipped": "time budget"})
            continue
        try:
            try:
                row = measure_row(spec)
            except torch.cuda.OutOfMemoryError:  # once more at half the batch
                free_memory()
                spec = {**spec, "batch": spec["batch"] // 2}
                label.update(batch=spec["batch"], note="out of memory at twice this batch")
                row = measure_row(spec)
            rows.append({**label, **{k: row[k] for k in ("params", "train_img_s", "peak_mib", "warmup_s")}})
        except Exception as exc:  # noqa: BLE001 - one failed row (e.g. out of memory) must not stop the rest
            rows.append({**label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        finally:
            if spec["mode"] == COMPILE_MODE:
                torch._dynamo.reset()
            free_memory()
    key = lambda r: (r["kind"], r["config"], r["overrides"], r["mode"], r["batch"])  # noqa: E731
    theirs = {key(r): r for r in rows if r["impl"] == "diffusers"}
    for r in rows:
        other = theirs.get(key(r))
        if r["impl"] == "lddpm" and other and "train_img_s" in r and "train_img_s" in other:
            r["vs_diffusers"] = r["train_img_s"] / other["train_img_s"]
    return {"rows": rows, "notes": notes}


def ddp_probe(device_name: str) -> dict:
    """Run inside torchrun: one DDP step of a small lddpm U-Net; its gradients must equal the plain module's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lddpm.nn import build_network

    device = torch.device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        torch.manual_seed(0)
        model = build_network("unet", "tiny", resolution=8, num_classes=10).to(device)
        x = torch.randn(4, 3, 8, 8, device=device)
        t = torch.tensor([1, 10, 100, 999], device=device)
        y = torch.tensor([0, 1, 2, 10], device=device)
        model(x, t, y=y).square().mean().backward()
        plain = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp(x, t, y=y).square().mean().backward()
        equal = all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters()))
        total = torch.ones((), device=device)
        dist.all_reduce(total)
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "grads_equal_plain": equal,
                "all_reduce_sum": float(total)}
    finally:
        dist.destroy_process_group()


def torchrun(args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=1 ARGS` (what `lddpm train --nproc N` runs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args]


def compare_groups(a_dir: Path, b_dir: Path) -> dict:
    """Bitwise comparison of the model, EMA and optimizer tensors of two runs' last checkpoints."""
    from lddpm.checkpoint import load_checkpoint

    out = {}
    for group in ("model", "ema", "optimizer"):
        a, b = load_checkpoint(a_dir).load(group), load_checkpoint(b_dir).load(group)
        if group == "optimizer":
            a = {f"{i}.{k}": v for i, s in a["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}
            b = {f"{i}.{k}": v for i, s in b["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}
        same = [k for k in a if k in b and torch.equal(a[k], b[k])]
        diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b and k not in same),
                   default=0.0)
        out[group] = {"tensors": len(a), "bitwise_equal": len(same), "max_abs_diff": diff}
    return out


def section_train_resume(chk: Check) -> dict:
    """`lddpm train` under torchrun: uninterrupted vs stopped halfway + --resume, compared bitwise."""
    from lddpm.checkpoint import load_checkpoint
    from lddpm.config import apply_overrides, config_from_preset, save_config
    from lddpm.data import prepare

    root = write_synthetic_idx(chk.work / "resume-idx", n=96 if chk.dry_run else 512)
    steps, log_every = (4, 1) if chk.dry_run else (300, 50)
    cache = chk.work / "resume-cache"  # prepared here, so the runs side by side do not race to prepare it
    prepare("fashion-mnist", resolution=16 if chk.dry_run else 32, root=root, cache_dir=cache, progress=False)
    sets = [f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}",
            f"run.steps={steps}", f"run.log_every={log_every}", "run.sample_every=0",
            f"run.checkpoint_every={10 * steps}", f"run.device={json.dumps(chk.device.type)}",
            "run.num_sample_images=4", "run.sample_steps=2", "run.label_dropout=0.3", "optim.warmup_steps=2",
            "model.overrides.dropout=0.1", "run.deterministic=true"]
    if chk.dry_run:
        sets += ["data.resolution=16", "optim.batch_size=8",
                 "model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8], dropout=0.1}"]
    config = apply_overrides(config_from_preset("fashion-quick"), sets)
    save_config(config, chk.work / "resume-cfg")
    cfg = str(chk.work / "resume-cfg" / "config.toml")
    full, part = chk.work / "resume-full", chk.work / "resume-part"
    train_cmd = ["-m", "lddpm", "train", cfg, "--quiet"]
    t0 = time.perf_counter()
    # side by side (independent processes): the uninterrupted run, the run stopped halfway, the DDP probe
    *_, probe_out = run_commands([torchrun([*train_cmd, "--out", str(full)]),
                                  torchrun([*train_cmd, "--out", str(part), "--set", f"run.steps={steps // 2}"]),
                                  torchrun([str(Path(__file__).resolve()), "--ddp-probe", str(chk.device)])],
                                 chk, max(chk.left(), 60))
    mid = load_checkpoint(part).meta["step"]
    run_commands([torchrun([*train_cmd, "--out", str(part), "--resume"])], chk, max(chk.left(), 30))
    runs_s = time.perf_counter() - t0
    probe = json.loads(probe_out.strip().splitlines()[-1])
    compared = compare_groups(full, part)
    log_steps = [json.loads(line)["step"] for line in (part / "log.jsonl").read_text().splitlines()]
    rows = [{"group": g, **v} for g, v in compared.items()]
    bitwise = all(v["bitwise_equal"] == v["tensors"] for v in compared.values())
    summary = {"steps": steps, "resumed_from_step": mid, "resumed_equals_uninterrupted": bitwise,
               "all_runs_s": runs_s, "log_steps_continuous": log_steps == list(range(log_every, steps + 1, log_every)),
               "ddp_probe": probe}
    notes = ["torchrun with one process: lddpm joins a process group only when WORLD_SIZE > 1, so the runs "
             "train without DDP; the DDP probe wraps a U-Net in DDP on one rank "
             f"({'NCCL' if chk.device.type == 'cuda' else 'gloo'}) and checks its gradients against the plain module"]
    if not bitwise:
        raise RuntimeError(f"the resumed run differs from the uninterrupted one: {compared}")
    if not probe["grads_equal_plain"]:
        raise RuntimeError(f"one-rank DDP gradients differ from the plain module's: {probe}")
    return {"summary": summary, "rows": rows, "notes": notes}


def section_sampling(chk: Check) -> dict:
    """Images/s of each sampler on a class-conditional tiny U-Net, with and without guidance."""
    from lddpm.config import DiffusionConfig
    from lddpm.nn import build_network
    from lddpm.pipeline import build_diffusion
    from lddpm.sampling import sample

    res, batch = (8, 4) if chk.dry_run else (32, 256)
    steps = {"ddpm": 2, "ddim": 2, "dpm++2m": 2} if chk.dry_run else {"ddpm": 100, "ddim": 50, "dpm++2m": 20}
    torch.manual_seed(0)
    model = build_network("unet", "tiny", resolution=res, num_classes=10).to(chk.device).eval()
    diffusion = build_diffusion(DiffusionConfig(schedule="cosine"))
    y = torch.arange(batch, device=chk.device) % 10
    rows = []
    for sampler, num_steps in steps.items():
        for scale in (1.0, 3.0):
            gen = torch.Generator(device=chk.device).manual_seed(0)
            kwargs = dict(sampler=sampler, y=y, guidance_scale=scale, null_label=model.null_label, generator=gen,
                          device=chk.device)
            sample(model, diffusion, (batch, 3, res, res), num_steps=2, **kwargs)  # warm-up
            chk.sync()
            t0 = time.perf_counter()
            x = sample(model, diffusion, (batch, 3, res, res), num_steps=num_steps, **kwargs)
            chk.sync()
            seconds = time.perf_counter() - t0
            if not torch.isfinite(x).all():
                raise RuntimeError(f"{sampler} (guidance {scale}) produced non-finite samples")
            evals = num_steps * (2 if scale != 1.0 else 1)
            rows.append({"sampler": sampler, "guidance_scale": scale, "steps": num_steps, "batch": batch,
                         "images_per_s": batch / seconds, "ms_per_network_eval": 1000 * seconds / evals})
    return {"rows": rows, "summary": {"network": "tiny U-Net (1.1M, class-conditional, random weights)",
                                      "resolution": res}}


def section_inception(chk: Check) -> dict:
    """Feature throughput on the device and device-vs-CPU features of the same real images."""
    from lddpm.metrics import fid_from_features

    num = 8 if chk.dry_run else 500
    images = np.array(prepared(chk, "test").images[:num])
    on_device, on_cpu = extractor(chk, chk.device), extractor(chk, "cpu")
    on_device.features(images[: on_device.batch_size])  # warm-up
    chk.sync()
    t0 = time.perf_counter()
    f_dev = on_device.features(images)
    device_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    f_cpu = on_cpu.features(images)
    cpu_s = time.perf_counter() - t0
    per_image = np.linalg.norm(f_dev - f_cpu, axis=1) / np.maximum(np.linalg.norm(f_cpu, axis=1), 1e-12)
    summary = {"network": on_device.name, "num_images": num, "device": str(chk.device),
               "device_images_per_s": num / device_s, "cpu_images_per_s": num / cpu_s,
               "max_relative_difference": float(per_image.max()),
               "max_abs_difference_over_max_abs": float(np.abs(f_dev - f_cpu).max() / np.abs(f_cpu).max()),
               "fid_device_vs_cpu": fid_from_features(f_dev, f_cpu)}
    return {"summary": summary, "notes": [f"FID between two sets of N={num} features (rank-deficient covariance "
                                          "when N <= 2048): a consistency check, not a quality number"]}


def train_for(chk: Check, cmd: list[str], run_dir: Path, seconds: float) -> dict:
    """Start a training command, let it train `seconds` after its first log record, then SIGTERM it."""
    log = run_dir / "log.jsonl"
    t0 = time.perf_counter()
    proc, output = start(cmd, chk)
    started = None
    while proc.poll() is None:
        if started is None and log.is_file() and log.stat().st_size:
            started = time.perf_counter()
        if started is not None and time.perf_counter() - started >= seconds:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits (lddpm.train.StopSignal)
            break
        if started is None and time.perf_counter() - t0 > 120:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"training logged nothing within two minutes:\n{output.read_text()[-2500:]}")
        time.sleep(0.05)
    out = finish(proc, output, cmd, 120)
    return {"wall_s": time.perf_counter() - t0, "output": out.strip().splitlines()[-1:] or [""]}


def section_end_to_end(chk: Check) -> dict:
    """fashion-quick for two minutes of training, 2,000 dpm++2m samples, FID against the test split."""
    from lddpm.checkpoint import load_checkpoint
    from lddpm.evaluate import evaluate_checkpoint

    root = fashion_root(chk)
    t0 = time.perf_counter()
    resolution = 16 if chk.dry_run else 32  # the preset's 32 px (the dry run's tiny net trains at 16 px)
    prepared(chk, "train", resolution), prepared(chk, "test", resolution)
    prepare_s = time.perf_counter() - t0
    run = chk.work / "e2e"
    sets = [f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(chk.cache_dir))}",
            "run.sample_every=0", f"run.device={json.dumps(chk.device.type)}", "run.num_sample_images=10"]
    if chk.dry_run:
        num, batch, seconds = 8, 4, 1.0
        sets += ["run.steps=100000", "run.log_every=1", "run.checkpoint_every=100000", "data.resolution=16",
                 "optim.batch_size=8", "run.sample_steps=2",
                 "model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8]}"]
    else:
        num, batch = 2000, 500
        seconds = max(10.0, min(E2E_TRAIN_SECONDS, chk.left() - 50))  # leave time to start, sample and score
        sets += ["run.steps=1000000", "run.log_every=50", "run.checkpoint_every=2000"]
    # Far more steps than fit: the run always ends through SIGTERM (checkpoint, clean exit), as on the GPU.
    cmd = [sys.executable, "-m", "lddpm", "train", "fashion-quick", "--out", str(run), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    trained = train_for(chk, cmd, run, seconds)
    meta = load_checkpoint(run).meta
    t0 = time.perf_counter()
    result = evaluate_checkpoint(run, num=num, sampler="dpm++2m", num_steps=2 if chk.dry_run else 20,
                                 reference="fashion-mnist:test", batch_size=batch, device=str(chk.device),
                                 extractor=extractor(chk, chk.device), classifier=None, cache_dir=chk.cache_dir,
                                 data_root=root, progress=False)
    summary = {"preset": "fashion-quick", "train_seconds_after_first_log": seconds, "train_wall_s": trained["wall_s"],
               "steps": meta["step"], "images_seen": meta["images_seen"], "prepare_s": prepare_s,
               "num_samples": num, "sampler": "dpm++2m", "fid_vs_test": result["fid"],
               "reference_num": result["reference"]["num"], "feature_network": result["feature_network"]["name"],
               "sampling_images_per_s": result["cost"]["images_per_second"], "eval_s": time.perf_counter() - t0}
    return {"summary": summary}


SECTIONS: dict[str, Callable[[Check], dict]] = {
    "environment": section_environment,
    "training_throughput": section_training_throughput,
    "train_resume": section_train_resume,
    "sampling": section_sampling,
    "inception": section_inception,
    "end_to_end": section_end_to_end,
}


def run_section(name: str, fn: Callable[[Check], dict], chk: Check) -> dict:
    """Run one section under its budget; an exception becomes status 'error' with its text."""
    budget = BUDGETS[name]
    start = time.perf_counter()
    chk.deadline = start + budget
    print(f"[{name}] budget {budget} s", flush=True)
    try:
        result, status, error = fn(chk), "ok", None
    except Exception as exc:  # noqa: BLE001 - recorded, and the next section still runs
        result, status = {}, "error"
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"[-4000:]
    free_memory()
    seconds = time.perf_counter() - start
    failed_rows = [r for r in result.get("rows", []) if "error" in r]
    if status == "ok" and failed_rows:
        status, error = "error", f"{len(failed_rows)} row(s) failed; first: {failed_rows[0]['error']}"
    print(f"[{name}] {status} in {seconds:.1f} s" + (f": {error.splitlines()[0]}" if error else ""), flush=True)
    return {"status": status, "seconds": seconds, "budget_s": budget, "over_budget": seconds > budget,
            "error": error, "summary": result.get("summary", {}), "rows": result.get("rows", []),
            "notes": result.get("notes", [])}


# ----------------------------------------------------------------------------- report


def _cell(value: Any) -> str:
    """A table cell: floats to 3-4 significant digits, None to a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    """A Markdown table of dict rows (columns: every key, in first-seen order)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]


def markdown(report: dict) -> str:
    """The whole check as Markdown: a status table, then one table per section."""
    env = report["sections"].get("environment", {}).get("summary", {})
    lines = [f"# lddpm GPU check{' (DRY RUN on CPU, tiny sizes)' if report['dry_run'] else ''}", "",
             f"{report['created']}, device {env.get('gpu') or report['device']}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, lddpm {env.get('lddpm')} ({env.get('git_commit')}); command: "
             f"`{report['command']}`; total {report['total_seconds']:.0f} s", "",
             *table([{"section": n, "status": s["status"], "seconds": s["seconds"], "budget_s": s["budget_s"],
                      "error": (s["error"] or "").splitlines()[0] if s["error"] else ""}
                     for n, s in report["sections"].items()])]
    for name, s in report["sections"].items():
        lines += ["", f"## {name}", ""]
        if s["summary"]:
            lines += table([{"key": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
                            for k, v in s["summary"].items()]) + [""]
        if s["rows"]:
            lines += table(s["rows"]) + [""]
        lines += [f"- {n}" for n in s["notes"]]
        if s["error"]:
            lines += ["", "```", s["error"].strip(), "```"]
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary name and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sections, write gpu-check.json and gpu-check.md; 1 if a section failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, synthetic data, stand-in features")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {', '.join(SECTIONS)}")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    p.add_argument("--ddp-probe", default=None, help=argparse.SUPPRESS)  # internal: run under torchrun
    args = p.parse_args(argv)
    if args.ddp_probe:
        print(json.dumps(ddp_probe(args.ddp_probe)))
        # its DDP backward leaves gloo threads that can abort the process at finalization (SIGABRT): leave as
        # lddpm's torchrun workers do
        from lddpm.distributed import exit_process
        exit_process(0, worker=True)
    if not args.out:
        p.error("--out FOLDER is required")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible to torch; run on a GPU machine with a CUDA build of torch, or use --dry-run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lddpm-gpu-check-") as work:
        chk = Check(dry_run=args.dry_run, device=torch.device("cpu") if args.dry_run else torch.device("cuda", 0),
                    work=Path(work), data_root=Path(args.data_root) if args.data_root else None)
        sections = {name: run_section(name, SECTIONS[name], chk) for name in args.sections.split(",")}
    report = {"lddpm_gpu_check": 1, "dry_run": args.dry_run, "device": str(chk.device),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(["python", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "total_seconds": time.perf_counter() - start, "sections": sections}
    write_json(report, out / "gpu-check.json")
    write_text_atomic(out / "gpu-check.md", markdown(report))
    print(f"wrote {out / 'gpu-check.md'}")
    failed = [n for n, s in sections.items() if s["status"] != "ok"]
    if failed:
        print(f"FAILED sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
