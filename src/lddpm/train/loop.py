"""The training loop shared by the diffusion and the autoencoder trainers.

The training loop for diffusion models (pixel or latent space) and for the KL autoencoder.

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

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lddpm import distributed
from lddpm.checkpoint import clean_checkpoint_dir, estimate_checkpoint_bytes, list_checkpoints, load_checkpoint, save_run_checkpoint
from lddpm.config import Config, save_config, validate
from lddpm.errors import LddpmError
from lddpm.io import folder_lock, os_error, write_text
from lddpm.seeding import step_seed
from lddpm.tracking import Tracker, check_trackers
from lddpm.train.utils import (StopSignal, check_names, check_run_dir, lr_at, resume_differences,
                               use_deterministic_kernels)


class TrainingLoop:
    """What both trainers share: run folder, resume, signals, logging, checkpoints, guards."""

    kind = "base"

    def __init__(self, config: Config, run_dir: str | Path | None = None, *, resume: bool = False,
                 progress: bool = True, stop_at: int | None = None, stop_minutes: float | None = None):
        self.config = check_names(validate(config.copy()))
        check_trackers(self.config.run.trackers)  # e.g. tensorboard asked for but not installed: before any work
        self.run_dir = Path(run_dir if run_dir is not None else config.run.out)
        self.config.run.out = str(self.run_dir)
        self.resume, self.progress, self.stop_at, self.stop_minutes = resume, progress, stop_at, stop_minutes
        self.step_wall = 0.0  # the training time at the last step, the mean over ranks (every rank agrees on it)
        self.info = distributed.setup(self.config.run.device)
        self.device = self.info.device
        use_deterministic_kernels(self.device, self.config.run.deterministic)
        o = self.config.optim
        self.shards = self.info.world_size * o.grad_accum
        if o.batch_size % self.shards:
            raise LddpmError(
                f"optim.batch_size = {o.batch_size} is not divisible by processes x grad_accum = {self.shards}"
            )
        self.shard_batch = o.batch_size // self.shards
        self.bf16 = distributed.use_bf16(self.config.run.bf16, self.device)
        self.step = 0
        self.lr = 0.0  # the learning rate of the last step (lr_at)
        self.wall_offset = 0.0
        self.loss_sum, self.loss_count = 0.0, 0  # the losses of the steps since the last log record
        # Loss by noise level (diffusion runs): the subclass names its bands and adds each micro-batch's
        # per-sample losses with add_band_losses; sums and counts over the steps since the last record.
        self.loss_bands: list[str] = []
        self.band_sum: list[float] = []
        self.band_count: list[float] = []
        self.tracker = Tracker(self.run_dir)  # jsonl only until _train opens the run's trackers on rank 0
        self._config_tracked = False
        self.resumed_finished = False

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

    def add_band_losses(self, band: torch.Tensor, loss: torch.Tensor) -> None:
        """Add one micro-batch's per-sample losses to their bands (band index per sample, 0..len(loss_bands)-1)."""
        # one_hot, not bincount/scatter_add: those have no deterministic CUDA kernel
        onehot = torch.nn.functional.one_hot(band.detach().long(), len(self.loss_bands)).double()
        self._band_step[0] += onehot.T @ loss.detach().double()
        self._band_step[1] += onehot.sum(0)

    def tracker_scalars(self) -> dict[str, float]:
        """Extra scalars for the trackers at each log record (the EMA's decay; subclasses may add)."""
        return {"ema_decay": self.ema.decay_at(max(self.step - 1, 0))}

    def started(self) -> None:
        """Work once the run folder is ready (fresh or resumed), before the first step."""

    def step_done(self) -> None:
        """Work after each optimizer step, once `self.step` counts it (e.g. periodic snapshots)."""

    # ----------------------------------------------------------------- shared machinery
    def autocast(self):
        """bf16 autocast on CPU or CUDA when run.bf16 (resolved for the device), else nothing."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def wrap_ddp(self, model: nn.Module) -> nn.Module:
        """The module the forward pass calls: DDP-wrapped under torchrun, compiled if asked."""
        forward = model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(model, device_ids=ids)
        if self.config.run.compile:
            forward = torch.compile(forward)
        return forward

    def wall_time(self) -> float:
        """Training wall time of the run so far, summed over resumes."""
        return self.wall_offset + (time.time() - self.t0)

    def progress_at(self, wall_time: float) -> float:
        """The fraction of the run done before this step: steps / run.steps, or the training time / run.max_minutes
        when that is further on."""
        r = self.config.run
        done = self.step / r.steps
        return max(done, wall_time / (60.0 * r.max_minutes)) if r.max_minutes else done

    def out_of_time(self, wall: float | None = None) -> bool:
        """True once run.max_minutes (when set) of wall time are spent; every rank must agree. `wall`: a training
        time every rank already shares (the last step's `step_wall`), which spares the collective."""
        limit = self.config.run.max_minutes
        if not limit:
            return False
        if wall is not None:
            return wall >= 60.0 * limit
        flag = torch.tensor([float(self.wall_time() >= 60.0 * limit)], device=self.device, dtype=torch.float64)
        distributed.all_reduce_sum(flag, self.info)  # rank 0's clock may differ slightly: any rank stops all
        return bool(flag[0] > 0)

    def full_meta(self) -> dict[str, Any]:
        """Everything a checkpoint records besides tensors."""
        return {
            "kind": self.kind,
            "step": self.step,
            "images_seen": self.step * self.config.optim.batch_size,
            "wall_time": self.wall_time(),
            "bf16": self.bf16,
            "finished": self.finished,
            "log_window": {"loss_sum": self.loss_sum, "loss_count": self.loss_count,
                           "band_sum": self.band_sum, "band_count": self.band_count},
            "torchelastic_run_id": distributed.elastic_run_id(),
            "config": self.config.to_dict(),
            "network": {"kind": self.config.model.kind, "config": self.model.config.to_dict()},
            **self.meta(),
        }

    def save(self) -> Path | None:
        """Checkpoint on rank 0."""
        if not self.info.is_main:
            return None
        return save_run_checkpoint(self.run_dir, self.step, self.groups(), self.full_meta(),
                                   keep=self.config.run.keep_checkpoints, keep_steps=self.config.run.keep_steps)

    def _prepare_run_dir(self) -> None:
        """Check the folder and disk, refuse to clobber an existing run, resume if asked."""
        ckpt_dir = self.run_dir / "checkpoints"
        existing = list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
        if existing and not self.resume and self._restarted_job(existing[-1]):
            self.resume = True  # torchrun --max-restarts: this job's own checkpoints, after a worker failed
        if self.info.is_main:
            if existing and not self.resume:
                raise LddpmError(
                    f"run folder {self.run_dir} already has checkpoints; add --resume to continue it or "
                    "choose another --out"
                )
            needed = estimate_checkpoint_bytes(self.model, self.ema.model) * (
                self.config.run.keep_checkpoints + len(self.config.run.keep_steps) + 1)
            check_run_dir(self.run_dir, needed + 20_000_000)
            clean_checkpoint_dir(self.run_dir)  # a killed save's temporary files
        if self.resume:
            if not existing:
                raise LddpmError(f"nothing to resume: {self.run_dir} has no checkpoints; drop --resume to start it")
            ckpt = load_checkpoint(self.run_dir)
            if ckpt.meta.get("kind") != self.kind:
                raise LddpmError(f"{ckpt.path} is a {ckpt.meta.get('kind')!r} checkpoint; this is a {self.kind} run")
            config_type = type(self.model.config)
            saved = config_type.from_dict(ckpt.meta["network"]["config"]).to_dict()  # newer fields: defaults
            now = self.model.config.to_dict()
            for key in config_type.fitted_fields:  # e.g. a finished VAE's scaling factor: re-measured at the end
                saved.pop(key, None)
                now.pop(key, None)
            if saved != now or ckpt.meta["network"]["kind"] != self.config.model.kind:
                diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
                         for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
                raise LddpmError(
                    f"cannot resume {self.run_dir}: the network shape changed ({'; '.join(diffs) or 'kind'}); "
                    "resume with the run's own config.toml or start a new run folder"
                )
            changed = resume_differences(ckpt.meta["config"], self.config.to_dict())
            if changed:
                raise LddpmError(
                    f"cannot resume {self.run_dir}: {', '.join(changed)} changed since its checkpoint; resume with "
                    "the run's own config.toml (only run.steps, logging and checkpoint settings may change) or "
                    "start a new run folder"
                )
            try:
                self.load_groups(ckpt)
            except (RuntimeError, ValueError, KeyError) as exc:
                detail = " ".join(str(exc).split())[:300]
                raise LddpmError(f"{ckpt.path}: its saved tensors do not fit this run ({detail}); "
                                 "resume with the run's own config.toml or start a new run folder") from None
            self.step = int(ckpt.meta["step"])
            self.wall_offset = float(ckpt.meta.get("wall_time", 0.0))
            window = ckpt.meta.get("log_window") or {}
            self.loss_sum, self.loss_count = float(window.get("loss_sum", 0.0)), int(window.get("loss_count", 0))
            if len(window.get("band_sum") or []) == len(self.loss_bands):
                self.band_sum = [float(v) for v in window["band_sum"]]
                self.band_count = [float(v) for v in window["band_count"]]
            self.resumed_finished = bool(ckpt.meta.get("finished"))
        if self.info.is_main:
            save_config(self.config, self.run_dir)
            self._trim_log()

    def _restarted_job(self, newest: Path) -> bool:
        """True when torchrun restarted this job (TORCHELASTIC_RESTART_COUNT > 0) and `newest` is its own checkpoint.

        The checkpoint records the job's TORCHELASTIC_RUN_ID (torchrun's --rdzv-id; a fresh id per
        `torchrun --standalone`), so a restart never resumes a folder the first attempt refused.
        """
        restart, run_id = distributed.elastic_restart_count(), distributed.elastic_run_id()
        if restart < 1 or run_id is None:
            return False
        if load_checkpoint(newest).meta.get("torchelastic_run_id") != run_id:
            return False
        if self.info.is_main:
            print(f"torchrun restart {restart}: resuming {self.run_dir} from {newest.name}", flush=True)
        return True

    def _trim_log(self) -> None:
        """Keep only the log records up to the step training starts from (a killed run logged steps it lost)."""
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return
        kept, dropped = [], False
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= self.step
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill or a full disk
                keep = False
            kept += [line] if keep else []
            dropped = dropped or not keep
        if dropped:
            write_text(path, "".join(f"{line}\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        path = self.run_dir / "log.jsonl"
        try:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: one clear line (a line cut short is dropped on resume)
            raise os_error(exc, path) from None

    def run(self) -> dict[str, Any]:
        """Train to run.steps or run.max_minutes (or until a stop request); return a summary."""
        try:
            return self._run()
        finally:
            distributed.teardown(self.info)

    def _run(self) -> dict[str, Any]:
        # One writer per run folder (rank 0 writes it): a second `lddpm train` on it is refused at once.
        with folder_lock(self.run_dir, "run folder") if self.info.is_main else nullcontext():
            return self._train()

    def _train(self) -> dict[str, Any]:
        self.prepare()
        try:
            return self._train_steps()
        finally:
            self.tracker.close()

    def prepare(self) -> None:
        """Build data, networks and optimizer and open the run folder (fresh or resumed): everything before the
        first step. `run()` calls it; a benchmark may call it and then `train_step()`."""
        self.t0 = time.time()
        torch.manual_seed(self.config.run.seed)  # identical initial weights on every rank
        self.build()
        self.band_sum, self.band_count = [0.0] * len(self.loss_bands), [0.0] * len(self.loss_bands)
        self._band_step = torch.zeros(2, len(self.loss_bands), dtype=torch.float64, device=self.device)
        self._prepare_run_dir()
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def train_step(self) -> float:
        """One optimizer step as the training loop takes it (without its logging, grids and checkpoints); returns
        the step's loss. For timing the trainer's step after `prepare()`."""
        loss, _, _ = self._train_step(False)
        self.step += 1
        self.step_done()
        return loss

    def _train_steps(self) -> dict[str, Any]:
        c = self.config
        total = c.run.steps
        if self.resumed_finished and (self.step >= total or self.out_of_time()):
            # Nothing left to train: the finished run's last checkpoint, grid and log stay as they are.
            return {"run_dir": str(self.run_dir), "step": self.step, "stopped": False, "loss": float("nan"),
                    "checkpoint": str(load_checkpoint(self.run_dir).path), "wall_time": self.wall_offset,
                    "already_finished": True}
        if self.info.is_main:  # one writer (rank 0); a resume drops what a killed attempt logged after its checkpoint
            self.tracker = Tracker(self.run_dir, c.run.trackers, purge_step=self.step + 1)
        self.started()
        bar = tqdm(total=total, initial=min(self.step, total), unit="step", desc=self.kind,
                   disable=not (self.progress and self.info.is_main), dynamic_ncols=True)
        stopped, last_loss = False, float("nan")
        self.finished = False
        step_time, images, first = 0.0, 0, self.step
        with StopSignal() as stop:
            # after this call's first step every rank holds the same step_wall, so no extra collective per step
            while self.step < total and not self.out_of_time(self.step_wall if self.step > first else None):
                t_start = time.perf_counter()
                loss_value, grad_norm, stop_now = self._train_step(stop.requested)
                step_time += time.perf_counter() - t_start
                images += c.optim.batch_size
                self.loss_sum, self.loss_count, last_loss = self.loss_sum + loss_value, self.loss_count + 1, loss_value
                self.step += 1
                self.step_done()
                log_now = self.step % c.run.log_every == 0 or self.step == total
                if self.info.is_main:
                    bar.update(1)
                    if log_now:
                        record = {
                            "step": self.step,
                            # the mean over the steps since the last record (a resume restores the window)
                            "loss": self.loss_sum / self.loss_count,
                            "lr": self.lr,
                            "grad_norm": grad_norm,
                            "images_per_s": images / max(step_time, 1e-9),
                            "wall_time": self.wall_time(),
                        }
                        if self.loss_bands:  # unweighted loss by noise level; None for a band no sample fell in
                            record["loss_t"] = {name: (s / n if n else None) for name, s, n
                                                in zip(self.loss_bands, self.band_sum, self.band_count)}
                        self._log(record)
                        self._track(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                        step_time, images = 0.0, 0
                if log_now:
                    self.loss_sum, self.loss_count = 0.0, 0
                    self.band_sum, self.band_count = [0.0] * len(self.loss_bands), [0.0] * len(self.loss_bands)
                if self.info.is_main and c.run.sample_every and self.step % c.run.sample_every == 0 and self.step < total:
                    self._grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
                if stop_now or (self.stop_at is not None and self.step >= self.stop_at) or (
                        self.stop_minutes is not None and self.step_wall >= 60.0 * self.stop_minutes):
                    stopped = self.step < total
                    break
                if (self.step % c.run.checkpoint_every == 0 or self.step in c.run.keep_steps) and self.step < total:
                    self.save()
        bar.close()
        if not stopped:
            self.finished = True
            self.finish()
            if self.info.is_main:
                self._grid(self.run_dir / "samples" / f"step_{self.step:06d}.png")
        path = self.save()
        return {"run_dir": str(self.run_dir), "step": self.step, "stopped": stopped, "loss": last_loss,
                "checkpoint": str(path) if path else None, "wall_time": self.wall_time()}

    def _grid(self, path: Path) -> None:
        """Write the sample grid and give it to the trackers."""
        self.write_grid(path)
        self.tracker.image_file("samples", self.step, path)
        self.tracker.flush()

    def _track(self, record: dict[str, Any]) -> None:
        """A log record (and the config, at a run's first record) to the trackers besides log.jsonl."""
        if not self.tracker.enabled:
            return
        if not self._config_tracked:
            from lddpm.config import to_toml

            self.tracker.text("config", self.step, "```toml\n" + to_toml(self.config) + "\n```")
            self._config_tracked = True
        values = {k: v for k, v in record.items() if k not in ("step", "loss_t", "wall_time")}
        self.tracker.scalars(self.step, {**values, **self.tracker_scalars()}, prefix="train/")
        self.tracker.scalars(self.step, record.get("loss_t") or {}, prefix="train/loss_t/")

    def _train_step(self, stop_requested: bool) -> tuple[float, float, bool]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad_norm, stop)."""
        c = self.config
        accum = c.optim.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), device=self.device, dtype=torch.float64)
        self._band_step.zero_()
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
        # One collective for the mean loss over ranks, the stop flag, the training time (its mean sets the
        # cool-down, so every rank takes the same learning rate) and the loss bands; all ranks then agree.
        flags = torch.tensor([float(stop_requested), self.wall_time()], device=self.device, dtype=torch.float64)
        status = torch.cat([loss_total.view(1), flags, self._band_step.flatten()])
        distributed.all_reduce_sum(status, self.info)
        loss_value = float(status[0]) / self.info.world_size
        bands = status[3:].view(2, -1).tolist()
        self.band_sum = [a + b for a, b in zip(self.band_sum, bands[0])]
        self.band_count = [a + b for a, b in zip(self.band_count, bands[1])]
        if not math.isfinite(loss_value):
            last = list_checkpoints(self.run_dir / "checkpoints")
            where = f"the last good checkpoint {last[-1]} is intact" if last else "no checkpoint was written yet"
            raise LddpmError(
                f"the loss became {loss_value} at step {self.step + 1}: training diverged and stopped; {where}. "
                "Lower optim.lr, set optim.grad_clip, or turn off run.bf16"
            )
        max_norm = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.step_wall = float(status[2]) / self.info.world_size
        self.lr = lr_at(self.step, c.optim.lr, c.optim.warmup_steps, c.optim.cooldown, self.progress_at(self.step_wall),
                        c.optim.cooldown_shape)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.after_step({k: distributed.all_gather_cat(torch.cat(v), self.info) for k, v in gathered.items()})
        return loss_value, grad_norm, bool(status[1] > 0)

    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW with the [optim] settings."""
        o = self.config.optim
        return torch.optim.AdamW(params, lr=lr if lr is not None else o.lr, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay, foreach=True)
