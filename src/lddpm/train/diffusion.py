"""The diffusion trainer: a noise predictor on images or on a VAE's latents (data.latent); for a restoration
task ([task], lddpm.tasks) the network also reads conditioning channels built from each batch."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lddpm import distributed
from lddpm.checkpoint import load_checkpoint
from lddpm.config import Config
from lddpm.data import CAPTIONED_DATASETS, ImageLoader, LatentLoader, default_cache_dir, encode_latents, open_latent_cache
from lddpm.diffusion import build_diffusion, describe_shares, loss_weight_shares
from lddpm.errors import LddpmError
from lddpm.grid import save_grid
from lddpm.io import write_json
from lddpm.nn import build_network
from lddpm.pipeline import Pipeline, PromptStates, load_vae
from lddpm.tasks import cond_channels, task_condition
from lddpm.train.loop import TrainingLoop
from lddpm.train.posthoc import PostHocEMA, drop_snapshots_after
from lddpm.train.utils import EMA, check_run_dir, network_overrides, open_training_images


class DiffusionTrainer(TrainingLoop):
    """Trains a noise predictor on images or on a VAE's latents (data.latent)."""

    kind = "diffusion"
    LOSS_BANDS = 4  # the loss is logged by quarter of the timestep range (fewer when T < 4)

    def build(self) -> None:
        """Data (and latent cache), network, EMA, diffusion, optimizer."""
        c = self.config
        if c.text.encoder and c.data.dataset not in CAPTIONED_DATASETS:
            raise LddpmError(f"text.encoder = {c.text.encoder!r} needs captions, but data.dataset = {c.data.dataset!r} "
                             f"has none; use a captioned dataset ({', '.join(CAPTIONED_DATASETS)}; 'captioned' reads "
                             "an image folder with metadata.jsonl, .txt files, WebDataset shards or COCO captions)")
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
            self.loaders = {s: LatentLoader(latents, self.shard_batch, seed=c.run.seed, rank=s,
                                            world_size=world * accum, scaling_factor=self.vae.scaling_factor)
                            for s in shard_ids}
            in_channels, resolution = self.vae.latent_channels, cache.resolution // self.vae.downsample_factor
        else:
            self.loaders = {s: ImageLoader(cache, self.shard_batch, seed=c.run.seed, rank=s,
                                           world_size=world * accum, hflip=c.data.hflip)
                            for s in shard_ids}
            in_channels, resolution = cache.channels, cache.resolution
        num_classes = cache.num_classes if c.run.class_conditional else 0
        if c.run.class_conditional and num_classes < 1:
            raise LddpmError(f"run.class_conditional = true but dataset {c.data.dataset!r} has no classes")
        if c.model.kind not in ("unet", "dit"):
            raise LddpmError(f"lddpm train trains a noise predictor: model.kind must be 'unet' or 'dit', not {c.model.kind!r} "
                             "(use lddpm train-vae for autoencoders)")
        derived = {"resolution": resolution, "in_channels": in_channels, "num_classes": num_classes,
                   "learned_sigma": c.diffusion.learned_variance}
        if c.task.kind != "generate":
            # Important: the conditioning image enters as extra input channels (mask + masked image, or the
            # upsampled low-resolution image); the output keeps in_channels.
            derived["cond_channels"] = cond_channels(c.task.kind, in_channels)
        self.task = {"kind": c.task.kind, "factor": c.task.factor, "masks": list(c.task.masks)}
        self.grid_images = np.asarray(cache.images[:8]) if c.task.kind != "generate" else None
        self.captions, self.caption_states, self.text_meta = None, None, None
        if c.text.encoder:
            self._encode_captions(cache, derived)
        self.model = build_network(c.model.kind, c.model.name, **network_overrides(c, derived)).to(self.device)
        self.model.train()
        self.ema = EMA(self.model, c.optim.ema_decay, c.optim.ema_warmup, c.optim.ema_gamma)
        self.posthoc = PostHocEMA(self.model, c.optim.posthoc_ema) if c.optim.posthoc_ema else None
        self.diffusion = build_diffusion(c.diffusion)
        # The loss by noise level, for the log and the trackers: quarters of the timestep range 0..T-1.
        T = self.diffusion.num_timesteps
        self.band_edges = [T * k // self.LOSS_BANDS for k in range(self.LOSS_BANDS + 1)]
        self.loss_bands = [f"{lo:03d}-{hi - 1:03d}" for lo, hi in zip(self.band_edges, self.band_edges[1:]) if hi > lo]
        self.loss_weights = loss_weight_shares(self.diffusion)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.forward_model = self.wrap_ddp(self.model)
        self.null_label = self.model.null_label if num_classes else None
        text = None
        if self.captions is not None:   # the grid's prompts: the cached states, or the EMA network's own encoder
            text = (self.ema.model.conditioning.text_encoder if c.text.encoder == "scratch"
                    else PromptStates(self.captions.texts, self.caption_states))
        self.grid_pipeline = Pipeline(self.ema.model, self.diffusion, vae=self.vae, config=c,
                                      dataset=self.dataset_info, device=self.device, text_encoder=text, task=self.task)

    def _encode_captions(self, cache, derived: dict) -> None:
        """Prepare the prompts' conditioning: each distinct caption encoded once with the frozen text encoder
        (rank 0 first, cached on disk by the encoder's identity), or, for text.encoder = "scratch", tokenized for
        the encoder that trains inside the network (its vocabulary: the words of the training captions).
        Sets derived["context_dim"] (and the scratch encoder's fields)."""
        from lddpm.nn.text import ScratchTextEncoder, encode_captions_cached, load_text_encoder

        c = self.config
        self.captions = cache.captions
        if c.text.encoder == "scratch":
            encoder = ScratchTextEncoder.from_captions(self.captions.texts[1:], max_length=c.text.max_length)
            self.caption_states = encoder.tokenize(self.captions.texts)  # token ids (N, L), encoded in the network
            derived.update(context_dim=encoder.dim, scratch_vocab=list(encoder.vocab),
                           scratch_max_length=encoder.max_length)
        else:
            encoder = load_text_encoder(c.text.encoder, c.text.max_length)
            root = (Path(c.data.cache_dir) if c.data.cache_dir else default_cache_dir()) / "text"
            if self.info.is_main:
                self.caption_states = encode_captions_cached(encoder, self.captions.texts, root)
            distributed.barrier(self.info)
            if not self.info.is_main:
                self.caption_states = encode_captions_cached(encoder, self.captions.texts, root)
            derived["context_dim"] = encoder.dim
        self.text_meta = {"encoder": c.text.encoder, "identity": encoder.identity(), "max_length": c.text.max_length,
                          "caption_dropout": c.text.caption_dropout, "num_captions": len(self.captions.texts)}

    def _load_vae(self, cache):
        """The VAE run named by data.latent; refuse one trained on other data or resolution."""
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
        context = None
        if self.captions is not None:
            # One caption per image, a pure function of (seed, step, image); caption dropout picks the
            # null prompt "" (row 0), which trains the unconditional branch of guidance.
            chosen = self.captions.choose(self.loaders[shard].indices(self.step), self.config.run.seed, self.step,
                                          null_prob=self.config.text.caption_dropout)
            context = self.caption_states[torch.from_numpy(chosen)].to(self.device)
            if context.is_floating_point():
                context = context.float()             # fp16 cached states; a scratch run's token ids stay int64
            y = None
        elif self.null_label is not None:
            y = y.to(self.device)
            # Important: dropping labels to the null label trains the unconditional model for CFG.
            drop = torch.rand(y.shape, generator=generator, device=self.device) < self.config.run.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        else:
            y = None
        task = self.config.task
        cond_image = task_condition(task.kind, x, masks=task.masks, factor=task.factor, generator=generator)
        with self.autocast():
            out = self.diffusion.training_losses(self.forward_model, x, y=y, context=context, cond_image=cond_image,
                                                 generator=generator)
        unweighted = out.get("loss_unweighted", out["loss"]).float()
        edges = torch.tensor(sorted(set(self.band_edges))[1:-1], device=out["t"].device, dtype=out["t"].dtype)
        self.add_band_losses(torch.bucketize(out["t"], edges, right=True), unweighted)
        per_sample = {}
        if self.diffusion.timestep_sampling == "adaptive":
            per_sample = {"t": out["t"], "loss": out.get("loss_unweighted", out["loss"]).float()}
        return out["loss"].float().mean(), per_sample

    def after_step(self, gathered):
        """Feed all ranks' losses to the adaptive timestep sampler; update the post-hoc EMAs."""
        if gathered:
            self.diffusion.update_timestep_sampler(gathered["t"], gathered["loss"])
        if self.posthoc is not None:
            self.posthoc.update(self.model, self.step)

    def started(self) -> None:
        """Print (and write to RUN/loss_weights.json) the share of the loss weight per sigma band; drop
        post-hoc EMA snapshots past the step the run starts from; check the disk for the snapshots."""
        if not self.info.is_main:
            return
        d = self.config.diffusion
        write_json(self.run_dir / "loss_weights.json", {
            "note": "share of the training loss weight per band of sigma = sqrt((1 - abar) / abar): timestep "
                    "distribution x loss weight on the v-error scale (lddpm.diffusion.loss_weight_shares)",
            "objective": d.objective, "loss_weighting": d.loss_weighting, "timestep_sampling": d.timestep_sampling,
            "bands": self.loss_weights})
        if self.progress:
            print(f"loss weight per noise level: {describe_shares(self.loss_weights)}", flush=True)
        if self.posthoc is None:
            return
        drop_snapshots_after(self.run_dir, self.step)
        o = self.config.optim
        count = len(range(o.posthoc_every, self.config.run.steps + 1, o.posthoc_every)) + 1
        size = self.posthoc.snapshot_bytes()
        # the snapshots, plus the tracked EMAs inside each kept checkpoint (the loop checked the rest)
        kept = self.config.run.keep_checkpoints + len(self.config.run.keep_steps)
        check_run_dir(self.run_dir, (count + kept + 1) * size + 20_000_000)
        if self.progress:
            widths = ", ".join(f"{s:g} (gamma {g:.2f})" for s, g in zip(self.posthoc.sigma_rels, self.posthoc.gammas))
            print(f"post-hoc EMA: sigma_rel {widths}; a snapshot every {o.posthoc_every} steps, up to {count} x "
                  f"{size / 1e6:.1f} MB = {count * size / 1e6:.0f} MB in {self.run_dir / 'ema_snapshots'}", flush=True)

    def step_done(self) -> None:
        """Every optim.posthoc_every steps, rank 0 writes a snapshot of the post-hoc EMAs."""
        if self.posthoc is not None and self.info.is_main and self.step % self.config.optim.posthoc_every == 0:
            self._snapshot()

    def finish(self) -> None:
        """A last snapshot at the final step (when it is not a multiple of optim.posthoc_every)."""
        if self.posthoc is not None and self.info.is_main and self.step % self.config.optim.posthoc_every:
            self._snapshot()

    def _snapshot(self) -> None:
        self.posthoc.save_snapshot(self.run_dir, self.step, {"kind": self.config.model.kind,
                                                             "config": self.model.config.to_dict()})

    def groups(self):
        """model, ema, optimizer, diffusion (timestep sampler), and the VAE for latent runs."""
        groups = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                  "optimizer": self.optimizer.state_dict(), "diffusion": self.diffusion.state_dict()}
        if self.posthoc is not None:
            groups["posthoc_ema"] = self.posthoc.state_dict()
        if self.vae is not None:
            groups["vae"] = self.vae.state_dict()  # makes the checkpoint self-contained for sampling
        return groups

    def load_groups(self, ckpt):
        """Restore weights, EMA, optimizer and timestep-sampler state."""
        self.model.load_state_dict(ckpt.load("model", self.device))
        self.ema.model.load_state_dict(ckpt.load("ema", self.device))
        self.optimizer.load_state_dict(ckpt.load("optimizer"))  # CPU: AdamW keeps "step" there
        self.diffusion.load_state_dict(ckpt.load("diffusion"))
        if self.posthoc is not None:
            self.posthoc.load_state_dict(ckpt.load("posthoc_ema"))

    def meta(self):
        """Dataset and VAE descriptions for the pipeline."""
        meta = {"dataset": self.dataset_info, "vae": self.vae_meta, "loss_weights": self.loss_weights}
        if self.task["kind"] != "generate":
            meta["task"] = self.task                 # load_pipeline reads it: which editing calls the run answers
        if self.text_meta is not None:
            meta["text"] = self.text_meta
        return meta

    def write_grid(self, path: Path) -> None:
        """EMA samples from fixed noise; one row per class for conditional models."""
        c = self.config
        if self.task["kind"] != "generate":
            self._write_task_grid(path)
            return
        if self.captions is not None:  # the first distinct captions, one row each
            texts = self.captions.texts[1:]
            rows = min(len(texts), max(1, int(math.sqrt(c.run.num_sample_images))))
            per_row = max(1, c.run.num_sample_images // rows)
            prompts = [p for p in texts[:rows] for _ in range(per_row)]
            images, _ = self.grid_pipeline.generate(
                len(prompts), sampler=c.run.sampler, num_steps=c.run.sample_steps, prompts=prompts, seed=c.run.seed,
                guidance_scale=c.run.guidance_scale, batch_size=max(len(prompts), 1), progress=False)
            save_grid(images, path, nrow=per_row)
            return
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

    def _write_task_grid(self, path: Path) -> None:
        """Rows of input | condition | output on the first training images (fixed masks from the run's seed)."""
        from lddpm.grid import comparison_grid, masked_view
        from lddpm.tasks import downsample, random_masks

        c, images = self.config, self.grid_images
        p = self.grid_pipeline
        x = p.images_in(images)
        if self.task["kind"] == "inpaint":
            masks = random_masks(len(images), x.shape[-1], c.task.masks, torch.Generator().manual_seed(c.run.seed))
            out = p.inpaint(images, masks[:, 0].cpu().numpy().astype(bool), method="model", sampler=c.run.sampler,
                            num_steps=c.run.sample_steps, seed=c.run.seed, progress=False)
            middle = masked_view(images, masks[:, 0].cpu().numpy().astype(bool))
        else:
            low = downsample(x, c.task.factor)
            low_u8 = ((low.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            out = p.upscale(low_u8, sampler=c.run.sampler, num_steps=c.run.sample_steps, seed=c.run.seed,
                            progress=False)
            middle = low_u8.repeat(c.task.factor, axis=1).repeat(c.task.factor, axis=2)
        from lddpm.io import write_png

        write_png(path, comparison_grid([images, middle, out]))


def train(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
          stop_at: int | None = None, stop_minutes: float | None = None) -> dict[str, Any]:
    """Train a diffusion model; `stop_at` stops (with a checkpoint) after that many steps, as a signal would, and
    `stop_minutes` once the training time reaches it, without changing run.max_minutes (so an optim.cooldown keeps
    the horizon of the whole run; resuming continues it)."""
    return DiffusionTrainer(config, run_dir, resume=resume, progress=progress, stop_at=stop_at,
                            stop_minutes=stop_minutes).run()
