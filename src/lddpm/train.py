"""The training loop for diffusion models (pixel or latent space) and for the KL autoencoder.

One loop serves both (`train`, `train_vae`): AdamW with linear LR warm-up, gradient clipping,
an EMA of the weights, optional bf16 autocast and torch.compile, DDP under torchrun, and
checkpoints that make a resumed run end with exactly the weights of an uninterrupted one.

Exact resume without saved RNG streams: every random draw of step `n` comes from generators
seeded by (seed, n, shard) -- the data order (`ImageLoader.batch(n)`), timesteps, noise and
label dropout (a `torch.Generator`), and dropout inside the network (the global torch seed is
reset per micro-batch). A "shard" is one micro-batch of the global batch: process `rank` with
`grad_accum` micro-batches owns shards rank * grad_accum + i of world_size * grad_accum, so
2 processes and 1 process with grad_accum=2 see the same data and the same noise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lddpm import distributed
from lddpm.checkpoint import (
    estimate_checkpoint_bytes,
    list_checkpoints,
    load_checkpoint,
    save_run_checkpoint,
)
from lddpm.config import Config, save_config, validate
from lddpm.errors import LddpmError


def step_seed(seed: int, step: int, shard: int) -> int:
    """A 63-bit seed for the random draws of one micro-batch (a pure function of its arguments)."""
    digest = hashlib.sha256(f"lddpm/{seed}/{step}/{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, then constant."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


class EMA:
    """Exponential moving average of a model's weights (buffers are copied).

    With warm-up the decay of update n (0-based) is min(decay, (1 + n) / (10 + n)), as in
    TensorFlow's ExponentialMovingAverage with num_updates, so early averages are not
    dominated by the random initialization.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, num_updates: int) -> float:
        """Decay used for update number `num_updates`."""
        if self.warmup:
            return min(self.decay, (1 + num_updates) / (10 + num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        """ema <- d * ema + (1 - d) * weights."""
        d = self.decay_at(num_updates)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so it can checkpoint and exit cleanly.

    A second SIGINT while the flag is set raises KeyboardInterrupt (the user insists).
    """

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the loop still runs
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rng_state() -> dict[str, torch.Tensor]:
    """The global torch RNG states as tensors (saved for completeness; resume reseeds per step)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def check_run_dir(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training when the run folder is not writable or its disk is too full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise LddpmError(f"cannot write to the run folder {run_dir} ({exc.strerror or exc}); choose another --out") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise LddpmError(
            f"not enough free disk space for checkpoints in {run_dir}: {free / 1e6:.0f} MB free, about "
            f"{needed_bytes / 1e6:.0f} MB needed; free some space, lower run.keep_checkpoints or choose another --out"
        )


def _network_overrides(config: Config, derived: dict[str, Any]) -> dict[str, Any]:
    """model.overrides plus the fields fixed by the data and the diffusion settings."""
    overrides = dict(config.model.overrides)
    for key, value in derived.items():
        given = overrides.get(key)
        if given is not None and (list(given) if isinstance(given, (list, tuple)) else given) != value:
            raise LddpmError(
                f"model.overrides.{key} = {given!r} conflicts with the data/diffusion settings, which need "
                f"{value!r}; remove it from model.overrides"
            )
        overrides[key] = value
    return overrides


def open_training_images(config: Config, info: distributed.DistInfo, progress: bool):
    """Prepare (rank 0 first) and open the image cache named by the [data] section."""
    from lddpm.data import open_cache, prepare

    d = config.data
    kwargs = dict(resolution=d.resolution, split=d.split, root=d.root, cache_dir=d.cache_dir)
    if info.is_main:
        path = prepare(d.dataset, progress=progress, **kwargs)
    distributed.barrier(info)
    if not info.is_main:
        path = prepare(d.dataset, progress=False, **kwargs)
    return open_cache(path)


class _Loop:
    """What both trainers share: run folder, resume, signals, logging, checkpoints, guards."""

    kind = "base"

    def __init__(self, config: Config, run_dir: str | Path | None = None, *, resume: bool = False,
                 progress: bool = True, stop_at: int | None = None):
        self.config = validate(config.copy())
        self.run_dir = Path(run_dir if run_dir is not None else config.run.out)
        self.config.run.out = str(self.run_dir)
        self.resume, self.progress, self.stop_at = resume, progress, stop_at
        self.info = distributed.setup(self.config.run.device)
        self.device = self.info.device
        o = self.config.optim
        self.shards = self.info.world_size * o.grad_accum
        if o.batch_size % self.shards:
            raise LddpmError(
                f"optim.batch_size = {o.batch_size} is not divisible by processes x grad_accum = {self.shards}"
            )
        self.shard_batch = o.batch_size // self.shards
        self.step = 0
        self.wall_offset = 0.0

    # ----------------------------------------------------------------- hooks for subclasses
    def build(self) -> None:
        """Create data, networks and optimizers (self.model, self.ema, self.optimizer)."""
        raise NotImplementedError

    def micro_loss(self, shard: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch; return its mean loss and per-sample tensors to gather."""
        raise NotImplementedError

    def after_step(self, gathered: dict[str, torch.Tensor]) -> None:
        """Work after the optimizer step (adaptive timestep sampler, discriminator...)."""

    def groups(self) -> dict[str, Any]:
        """Checkpoint state groups."""
        raise NotImplementedError

    def load_groups(self, ckpt) -> None:
        """Restore from an opened checkpoint."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """Task-specific checkpoint metadata."""
        return {}

    def write_grid(self, path: Path) -> None:
        """Write the sample grid of the current step."""

    def finish(self) -> None:
        """Work after the last step, before the final checkpoint."""

    # ----------------------------------------------------------------- shared machinery
    def autocast(self):
        """bf16 autocast on CPU or CUDA when run.bf16, else nothing."""
        if self.config.run.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def wrap_ddp(self, model: nn.Module) -> nn.Module:
        """The module the forward pass calls: DDP-wrapped under torchrun, compiled if asked."""
        forward = model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(model, device_ids=ids)
        if self.config.run.compile:
            forward = torch.compile(forward)
        return forward

    def full_meta(self) -> dict[str, Any]:
        """Everything a checkpoint records besides tensors."""
        return {
            "kind": self.kind,
            "step": self.step,
            "images_seen": self.step * self.config.optim.batch_size,
            "wall_time": self.wall_offset + (time.time() - self.t0),
            "config": self.config.to_dict(),
            "network": {"kind": self.config.model.kind, "config": self.model.config.to_dict()},
            **self.meta(),
        }

    def save(self) -> Path | None:
        """Checkpoint on rank 0."""
        if not self.info.is_main:
            return None
        return save_run_checkpoint(self.run_dir, self.step, self.groups(), self.full_meta(),
                                   keep=self.config.run.keep_checkpoints)

    def _prepare_run_dir(self) -> None:
        """Check the folder and disk, refuse to clobber an existing run, resume if asked."""
        ckpt_dir = self.run_dir / "checkpoints"
        existing = list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
        if self.info.is_main:
            if existing and not self.resume:
                raise LddpmError(
                    f"run folder {self.run_dir} already has checkpoints; add --resume to continue it or "
                    "choose another --out"
                )
            needed = estimate_checkpoint_bytes(self.model, self.ema.model) * (self.config.run.keep_checkpoints + 1)
            check_run_dir(self.run_dir, needed + 20_000_000)
        if self.resume:
            if not existing:
                raise LddpmError(f"nothing to resume: {self.run_dir} has no checkpoints; drop --resume to start it")
            ckpt = load_checkpoint(self.run_dir)
            if ckpt.meta.get("kind") != self.kind:
                raise LddpmError(f"{ckpt.path} is a {ckpt.meta.get('kind')!r} checkpoint; this is a {self.kind} run")
            saved = type(self.model.config).from_dict(ckpt.meta["network"]["config"]).to_dict()  # newer fields: defaults
            now = self.model.config.to_dict()
            if saved != now or ckpt.meta["network"]["kind"] != self.config.model.kind:
                diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
                         for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
                raise LddpmError(
                    f"cannot resume {self.run_dir}: the network shape changed ({'; '.join(diffs) or 'kind'}); "
                    "resume with the run's own config.toml or start a new run folder"
                )
            old = ckpt.meta["config"]
            for section in ("diffusion",):
                if old.get(section) != self.config.to_dict()[section]:
                    raise LddpmError(f"cannot resume {self.run_dir}: the [{section}] settings changed since its checkpoint")
            self.load_groups(ckpt)
            self.step = int(ckpt.meta["step"])
            self.wall_offset = float(ckpt.meta.get("wall_time", 0.0))
        if self.info.is_main:
            save_config(self.config, self.run_dir)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def run(self) -> dict[str, Any]:
        """Train to run.steps (or until a stop request); return a summary."""
        try:
            return self._run()
        finally:
            distributed.teardown(self.info)

    def _run(self) -> dict[str, Any]:
        from tqdm import tqdm

        self.t0 = time.time()
        c = self.config
        torch.manual_seed(c.run.seed)  # identical initial weights on every rank
        self.build()
        self._prepare_run_dir()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        total = c.run.steps
        bar = tqdm(total=total, initial=min(self.step, total), unit="step", desc=self.kind,
                   disable=not (self.progress and self.info.is_main), dynamic_ncols=True)
        stopped, last_loss = False, float("nan")
        loss_sum, loss_count, step_time, images = 0.0, 0, 0.0, 0
        with StopSignal() as stop:
            while self.step < total:
                t_start = time.perf_counter()
                loss_value, grad_norm, stop_now = self._train_step(stop.requested)
                step_time += time.perf_counter() - t_start
                images += c.optim.batch_size
                loss_sum, loss_count, last_loss = loss_sum + loss_value, loss_count + 1, loss_value
                self.step += 1
                if self.info.is_main:
                    bar.update(1)
                    if self.step % c.run.log_every == 0 or self.step == total:
                        record = {
                            "step": self.step,
                            "loss": loss_sum / loss_count,
                            "lr": lr_at(self.step - 1, c.optim.lr, c.optim.warmup_steps),
                            "grad_norm": grad_norm,
                            "images_per_s": images / max(step_time, 1e-9),
                            "wall_time": self.wall_offset + (time.time() - self.t0),
                        }
                        self._log(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                        loss_sum, loss_count, step_time, images = 0.0, 0, 0.0, 0
                    if c.run.sample_every and self.step % c.run.sample_every == 0 and self.step < total:
                        self.write_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
                if stop_now or (self.stop_at is not None and self.step >= self.stop_at):
                    stopped = self.step < total
                    break
                if self.step % c.run.checkpoint_every == 0 and self.step < total:
                    self.save()
        bar.close()
        if not stopped:
            self.finish()
            if self.info.is_main:
                self.write_grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
        path = self.save()
        return {"run_dir": str(self.run_dir), "step": self.step, "stopped": stopped, "loss": last_loss,
                "checkpoint": str(path) if path else None}

    def _train_step(self, stop_requested: bool) -> tuple[float, float, bool]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad_norm, stop)."""
        c = self.config
        accum = c.optim.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), device=self.device, dtype=torch.float64)
        gathered: dict[str, list[torch.Tensor]] = {}
        for i in range(accum):
            shard = self.info.rank * accum + i
            seed = step_seed(c.run.seed, self.step, shard)
            torch.random.default_generator.manual_seed(seed)  # dropout inside the network
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            generator = torch.Generator(device=self.device).manual_seed(seed)
            sync = self.info.enabled and i < accum - 1
            with (self.forward_model.no_sync() if sync and hasattr(self.forward_model, "no_sync") else nullcontext()):
                loss, per_sample = self.micro_loss(shard, generator)
                (loss / accum).backward()
            loss_total += loss.detach().double() / accum
            for key, value in per_sample.items():
                gathered.setdefault(key, []).append(value.detach())
        # One collective for the mean loss over ranks and the stop flag; all ranks then agree.
        status = torch.stack([loss_total, torch.tensor(float(stop_requested), device=self.device, dtype=torch.float64)])
        distributed.all_reduce_sum(status, self.info)
        loss_value = float(status[0]) / self.info.world_size
        if not math.isfinite(loss_value):
            last = list_checkpoints(self.run_dir / "checkpoints")
            where = f"the last good checkpoint {last[-1]} is intact" if last else "no checkpoint was written yet"
            raise LddpmError(
                f"the loss became {loss_value} at step {self.step + 1}: training diverged and stopped; {where}. "
                "Lower optim.lr, set optim.grad_clip, or turn off run.bf16"
            )
        max_norm = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, c.optim.lr, c.optim.warmup_steps)
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.after_step({k: distributed.all_gather_cat(torch.cat(v), self.info) for k, v in gathered.items()})
        return loss_value, grad_norm, bool(status[1] > 0)

    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW with the [optim] settings."""
        o = self.config.optim
        return torch.optim.AdamW(params, lr=lr if lr is not None else o.lr, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay, foreach=True)


# ============================================================================ diffusion


class DiffusionTrainer(_Loop):
    """Trains a noise predictor on images or on a VAE's latents (data.latent)."""

    kind = "diffusion"

    def build(self) -> None:
        """Data (and latent cache), network, EMA, diffusion, optimizer."""
        from lddpm.nn import build_network
        from lddpm.diffusion import build_diffusion
        from lddpm.pipeline import Pipeline

        c = self.config
        cache = open_training_images(c, self.info, self.progress)
        self.dataset_info = {"name": c.data.dataset, "split": c.data.split, "num_classes": cache.num_classes,
                             "class_names": list(cache.class_names), "channels": cache.channels,
                             "resolution": cache.resolution}
        self.vae, self.vae_meta = None, None
        accum, world = c.optim.grad_accum, self.info.world_size
        shard_ids = [self.info.rank * accum + i for i in range(accum)]
        if c.data.latent:
            self.vae, self.vae_meta = self._load_vae(cache)
            latents = self._latent_cache(cache)
            from lddpm.data import LatentLoader

            self.loaders = {s: LatentLoader(latents, self.shard_batch, seed=c.run.seed, rank=s,
                                            world_size=world * accum, scaling_factor=self.vae.scaling_factor)
                            for s in shard_ids}
            in_channels, resolution = self.vae.latent_channels, cache.resolution // self.vae.downsample_factor
        else:
            from lddpm.data import ImageLoader

            self.loaders = {s: ImageLoader(cache, self.shard_batch, seed=c.run.seed, rank=s,
                                           world_size=world * accum, hflip=c.data.hflip)
                            for s in shard_ids}
            in_channels, resolution = cache.channels, cache.resolution
        num_classes = cache.num_classes if c.run.class_conditional else 0
        if c.run.class_conditional and num_classes < 1:
            raise LddpmError(f"run.class_conditional = true but dataset {c.data.dataset!r} has no classes")
        if c.model.kind != "unet":
            raise LddpmError(f"lddpm train trains a noise predictor: model.kind must be 'unet', not {c.model.kind!r} "
                             "(use lddpm train-vae for autoencoders)")
        derived = {"resolution": resolution, "in_channels": in_channels, "num_classes": num_classes,
                   "learned_sigma": c.diffusion.learned_variance}
        self.model = build_network(c.model.kind, c.model.name, **_network_overrides(c, derived)).to(self.device)
        self.model.train()
        self.ema = EMA(self.model, c.optim.ema_decay, c.optim.ema_warmup)
        self.diffusion = build_diffusion(c.diffusion)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.forward_model = self.wrap_ddp(self.model)
        self.null_label = self.model.null_label if num_classes else None
        self.grid_pipeline = Pipeline(self.ema.model, self.diffusion, vae=self.vae, config=c,
                                      dataset=self.dataset_info, device=self.device)

    def _load_vae(self, cache):
        """The VAE run named by data.latent; refuse one trained on other data or resolution."""
        from lddpm.pipeline import load_vae

        c = self.config
        if not Path(c.data.latent).exists():
            raise LddpmError(
                f"data.latent = {c.data.latent!r}: no such VAE run; train it first (lddpm train-vae CONFIG "
                f"--out {c.data.latent}) or point data.latent at an existing VAE run folder or checkpoint"
            )
        ckpt = load_checkpoint(c.data.latent)
        if ckpt.meta.get("kind") != "vae":
            raise LddpmError(f"data.latent = {c.data.latent!r} is a {ckpt.meta.get('kind')!r} run, not a VAE run")
        vae_data = ckpt.meta["config"]["data"]
        ours = (c.data.dataset, c.data.split, c.data.resolution)
        theirs = (vae_data["dataset"], vae_data["split"], vae_data["resolution"])
        imported = ckpt.meta.get("source", {}).get("format") == "diffusers"  # pretrained (lddpm import): any data
        if not imported and (vae_data["dataset"], vae_data["resolution"]) != (c.data.dataset, c.data.resolution):
            raise LddpmError(
                f"the VAE run {c.data.latent} was trained on {theirs[0]} at {theirs[2]}px, but this run uses "
                f"{ours[0]} at {ours[2]}px; train a VAE on the same data and resolution"
            )
        if ckpt.meta["network"]["config"].get("in_channels") != cache.channels:
            raise LddpmError(f"the VAE run {c.data.latent} expects {ckpt.meta['network']['config'].get('in_channels')} "
                             f"channels, the data has {cache.channels}")
        vae = load_vae(ckpt.path, device=self.device)
        meta = {"run": str(c.data.latent), "checkpoint": str(ckpt.path.resolve()), "step": ckpt.meta["step"],
                "code_version": ckpt.header["code_version"], "scaling_factor": vae.scaling_factor,
                "network_config": vae.config.to_dict()}
        return vae, meta

    def _latent_cache(self, cache):
        """Encode the image cache with the VAE once (rank 0) and open it."""
        from lddpm.data import default_cache_dir, encode_latents, open_latent_cache

        c = self.config
        root = Path(c.data.cache_dir) if c.data.cache_dir else default_cache_dir()
        key = hashlib.sha256(f"{self.vae_meta['checkpoint']}|{self.vae_meta['step']}".encode()).hexdigest()[:12]
        out = root / "latents" / f"{Path(cache.path).name}-vae-{key}"
        vae_id = f"{self.vae_meta['checkpoint']}@{self.vae_meta['step']}"
        if self.info.is_main:
            encode_latents(self.vae, cache, out, batch_size=64, device=self.device, progress=self.progress, vae_id=vae_id)
        distributed.barrier(self.info)
        self.vae_meta["latent_cache"] = str(out)
        return open_latent_cache(out)

    def micro_loss(self, shard: int, generator: torch.Generator):
        """Diffusion loss of one micro-batch, with label dropout for classifier-free guidance."""
        x, y = self.loaders[shard].batch(self.step)
        x = x.to(self.device, non_blocking=True)
        if self.null_label is not None:
            y = y.to(self.device)
            # Important: dropping labels to the null label trains the unconditional model for CFG.
            drop = torch.rand(y.shape, generator=generator, device=self.device) < self.config.run.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        else:
            y = None
        with self.autocast():
            out = self.diffusion.training_losses(self.forward_model, x, y=y, generator=generator)
        per_sample = {}
        if self.diffusion.timestep_sampling == "adaptive":
            per_sample = {"t": out["t"], "loss": out.get("loss_unweighted", out["loss"]).float()}
        return out["loss"].float().mean(), per_sample

    def after_step(self, gathered):
        """Feed all ranks' losses to the adaptive timestep sampler."""
        if gathered:
            self.diffusion.update_timestep_sampler(gathered["t"], gathered["loss"])

    def groups(self):
        """model, ema, optimizer, diffusion (timestep sampler), rng, and the VAE for latent runs."""
        groups = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                  "optimizer": self.optimizer.state_dict(), "diffusion": self.diffusion.state_dict(),
                  "rng": rng_state()}
        if self.vae is not None:
            groups["vae"] = self.vae.state_dict()  # makes the checkpoint self-contained for sampling
        return groups

    def load_groups(self, ckpt):
        """Restore weights, EMA, optimizer and timestep-sampler state."""
        self.model.load_state_dict(ckpt.load("model", self.device))
        self.ema.model.load_state_dict(ckpt.load("ema", self.device))
        self.optimizer.load_state_dict(ckpt.load("optimizer", self.device))
        self.diffusion.load_state_dict(ckpt.load("diffusion"))

    def meta(self):
        """Dataset and VAE descriptions for the pipeline."""
        return {"dataset": self.dataset_info, "vae": self.vae_meta}

    def write_grid(self, path: Path) -> None:
        """EMA samples from fixed noise; one row per class for conditional models."""
        from lddpm.grid import save_grid

        c = self.config
        if self.null_label is not None:
            k = self.model.num_classes
            per_class = max(1, c.run.num_sample_images // k)
            labels = np.repeat(np.arange(k), per_class)
            nrow = per_class
        else:
            labels, nrow = None, int(math.ceil(math.sqrt(c.run.num_sample_images)))
        num = len(labels) if labels is not None else c.run.num_sample_images
        images, _ = self.grid_pipeline.generate(
            num, sampler=c.run.sampler, num_steps=c.run.sample_steps, labels=labels, seed=c.run.seed,
            guidance_scale=c.run.guidance_scale, batch_size=max(num, 1), progress=False)
        save_grid(images, path, nrow=nrow)


# ============================================================================ autoencoder


class VAETrainer(_Loop):
    """Trains the KL autoencoder (`lddpm.nn.vae.vae_loss`), with an optional PatchGAN."""

    kind = "vae"

    def build(self) -> None:
        """Data, autoencoder, EMA, optimizer, discriminator."""
        from lddpm.data import ImageLoader
        from lddpm.nn import build_network
        from lddpm.nn.vae import PatchDiscriminator

        c = self.config
        if c.model.kind != "vae":
            raise LddpmError(f"lddpm train-vae trains an autoencoder: model.kind must be 'vae', not {c.model.kind!r}")
        cache = open_training_images(c, self.info, self.progress)
        self.cache = cache
        accum, world = c.optim.grad_accum, self.info.world_size
        self.loaders = {s: ImageLoader(cache, self.shard_batch, seed=c.run.seed, rank=s, world_size=world * accum,
                                       hflip=c.data.hflip)
                        for s in (self.info.rank * accum + i for i in range(accum))}
        derived = {"resolution": cache.resolution, "in_channels": cache.channels}
        self.model = build_network("vae", c.model.name, **_network_overrides(c, derived)).to(self.device)
        self.model.train()
        self.ema = EMA(self.model, c.optim.ema_decay, c.optim.ema_warmup)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.forward_model = self.wrap_ddp(self.model)
        self.disc = None
        if c.vae.disc_start >= 0:
            # LDM's 3 layers at >= 64 px; fewer for small images so the patch map stays >= 1x1.
            layers = max(1, min(3, int(math.log2(cache.resolution)) - 3))
            self.disc = PatchDiscriminator(in_channels=cache.channels, num_layers=layers).to(self.device)
            self.disc_optimizer = self.make_optimizer(self.disc.parameters(), lr=c.vae.disc_lr or c.optim.lr)
        self.dataset_info = {"name": c.data.dataset, "split": c.data.split, "num_classes": cache.num_classes,
                             "class_names": list(cache.class_names), "channels": cache.channels,
                             "resolution": cache.resolution}

    def _disc_active(self) -> bool:
        return self.disc is not None and self.step >= self.config.vae.disc_start

    def micro_loss(self, shard: int, generator: torch.Generator):
        """Reconstruction + KL (+ adversarial) loss; the discriminator's hinge loss is accumulated too."""
        from lddpm.nn.vae import hinge_d_loss, vae_loss

        v = self.config.vae
        x, _ = self.loaders[shard].batch(self.step)
        x = x.to(self.device)
        with self.autocast():
            recon, posterior = self.forward_model(x, sample_posterior=True, generator=generator)
            logits_fake = None
            if self._disc_active():
                self.disc.requires_grad_(False)
                logits_fake = self.disc(recon)
                self.disc.requires_grad_(True)
            last_layer = self.model.last_layer if (logits_fake is not None and not self.info.enabled) else None
            losses = vae_loss(x, recon.float(), posterior, kl_weight=v.kl_weight, recon_loss=v.recon_loss,
                              logits_fake=logits_fake, adv_weight=v.disc_weight, step=self.step,
                              disc_start=max(v.disc_start, 0), last_layer=last_layer)
        if self._disc_active():
            with self.autocast():
                d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            (d_loss / self.config.optim.grad_accum).backward()
        return losses["loss"], {}

    def after_step(self, gathered):
        """Discriminator step (its gradients averaged over ranks by hand: it is not DDP-wrapped)."""
        if not self._disc_active():  # self.step is still the step just trained
            return
        if self.info.enabled:
            for p in self.disc.parameters():
                if p.grad is not None:
                    distributed.all_reduce_sum(p.grad, self.info)
                    p.grad /= self.info.world_size
        for group in self.disc_optimizer.param_groups:
            group["lr"] = self.config.vae.disc_lr or self.config.optim.lr
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)

    def groups(self):
        """model, ema, optimizer, rng, and the discriminator with its optimizer."""
        groups = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                  "optimizer": self.optimizer.state_dict(), "rng": rng_state()}
        if self.disc is not None:
            groups["disc"] = self.disc.state_dict()
            groups["disc_optimizer"] = self.disc_optimizer.state_dict()
        return groups

    def load_groups(self, ckpt):
        """Restore weights, EMA, optimizers."""
        self.model.load_state_dict(ckpt.load("model", self.device))
        self.ema.model.load_state_dict(ckpt.load("ema", self.device))
        self.optimizer.load_state_dict(ckpt.load("optimizer", self.device))
        if self.disc is not None and "disc" in ckpt.groups:
            self.disc.load_state_dict(ckpt.load("disc", self.device))
            self.disc_optimizer.load_state_dict(ckpt.load("disc_optimizer", self.device))

    def meta(self):
        """Dataset description and the latent scaling factor."""
        return {"dataset": self.dataset_info, "scaling_factor": self.model.scaling_factor}

    def finish(self) -> None:
        """Estimate the latent scaling factor (1 / std of latents) on a few training batches."""
        from lddpm.data import ImageLoader
        from lddpm.nn.vae import estimate_scaling_factor

        c = self.config
        loader = ImageLoader(self.cache, min(64, c.optim.batch_size), seed=c.run.seed + 1)
        batches = [loader.batch(i)[0].to(self.device) for i in range(c.vae.scaling_batches)]
        generator = torch.Generator(device=self.device).manual_seed(step_seed(c.run.seed, -1, 0))
        self.model.eval()
        factor = estimate_scaling_factor(self.model, batches, generator=generator)
        self.model.train()
        self.ema.model.scaling_factor = factor

    @torch.no_grad()
    def write_grid(self, path: Path) -> None:
        """Originals (top half) and reconstructions (bottom half) of a fixed batch."""
        from lddpm.data import ImageLoader
        from lddpm.grid import save_grid
        from lddpm.pipeline import to_uint8

        c = self.config
        n = c.run.num_sample_images
        x, _ = ImageLoader(self.cache, n, seed=c.run.seed + 1).batch(0)
        was_training = self.model.training
        self.model.eval()
        recon, _ = self.model(x.to(self.device), sample_posterior=False)
        self.model.train(was_training)
        nrow = min(8, n)
        rows = int(math.ceil(n / nrow))
        pad = rows * nrow - n
        x = torch.cat([x, torch.zeros_like(x[:pad])]) if pad else x
        recon = torch.cat([recon.cpu(), torch.zeros_like(recon[:pad].cpu())]) if pad else recon.cpu()
        save_grid(np.concatenate([to_uint8(x), to_uint8(recon)]), path, nrow=nrow)


def train(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> dict[str, Any]:
    """Train a diffusion model; `stop_at` stops (with a checkpoint) after that many steps, as a signal would."""
    return DiffusionTrainer(config, run_dir, resume=resume, progress=progress, stop_at=stop_at).run()


def train_vae(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
              stop_at: int | None = None) -> dict[str, Any]:
    """Train the KL autoencoder, then store its latent scaling factor in the final checkpoint."""
    return VAETrainer(config, run_dir, resume=resume, progress=progress, stop_at=stop_at).run()
