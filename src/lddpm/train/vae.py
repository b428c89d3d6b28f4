"""The autoencoder trainer: the KL VAE (`lddpm.nn.vae.vae_loss`) with an optional PatchGAN."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lddpm import distributed
from lddpm.config import Config
from lddpm.data import ImageLoader
from lddpm.errors import LddpmError
from lddpm.grid import save_grid
from lddpm.nn import build_network
from lddpm.nn.vae import PatchDiscriminator, estimate_scaling_factor, hinge_d_loss, vae_loss
from lddpm.pipeline import to_uint8
from lddpm.seeding import step_seed
from lddpm.train.ema import EMA
from lddpm.train.loop import TrainingLoop
from lddpm.train.utils import network_overrides, open_training_images


class VAETrainer(TrainingLoop):
    """Trains the KL autoencoder (`lddpm.nn.vae.vae_loss`), with an optional PatchGAN."""

    kind = "vae"

    def build(self) -> None:
        """Data, autoencoder, EMA, optimizer, discriminator."""
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
        self.model = build_network("vae", c.model.name, **network_overrides(c, derived)).to(self.device)
        self.model.train()
        self.ema = EMA(self.model, c.optim.ema_decay, c.optim.ema_warmup, c.optim.ema_gamma)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.disc = None
        if c.vae.disc_start >= 0:
            # LDM's 3 layers at >= 64 px; fewer for small images so the patch map stays >= 1x1.
            layers = max(1, min(3, int(math.log2(cache.resolution)) - 3))
            self.disc = PatchDiscriminator(in_channels=cache.channels, num_layers=layers).to(self.device)
            self.disc_optimizer = self.make_optimizer(self.disc.parameters(), lr=c.vae.disc_lr or c.optim.lr)
        self.forward_model = self.wrap_ddp(self.model)
        self.dataset_info = {"name": c.data.dataset, "split": c.data.split, "num_classes": cache.num_classes,
                             "class_names": list(cache.class_names), "channels": cache.channels,
                             "resolution": cache.resolution}

    def _disc_active(self) -> bool:
        return self.disc is not None and self.step >= self.config.vae.disc_start

    def micro_loss(self, shard: int, generator: torch.Generator):
        """Reconstruction + KL (+ adversarial) loss; the discriminator's hinge loss is accumulated too."""
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
            # The adaptive adversarial weight (Esser et al. 2021) uses this micro-batch's gradient norms at the
            # decoder's last layer (torch.autograd.grad, which leaves DDP's gradient hooks alone), so
            # N processes compute it as 1 process with grad_accum = N does.
            last_layer = self.model.last_layer if logits_fake is not None else None
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
        distributed.average_gradients(self.disc.parameters(), self.info)
        for group in self.disc_optimizer.param_groups:
            group["lr"] = self.config.vae.disc_lr or self.config.optim.lr
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)

    def groups(self):
        """model, ema, optimizer, and the discriminator with its optimizer."""
        groups = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                  "optimizer": self.optimizer.state_dict()}
        if self.disc is not None:
            groups["disc"] = self.disc.state_dict()
            groups["disc_optimizer"] = self.disc_optimizer.state_dict()
        return groups

    def load_groups(self, ckpt):
        """Restore weights, EMA, optimizers."""
        self.model.load_state_dict(ckpt.load("model", self.device))
        self.ema.model.load_state_dict(ckpt.load("ema", self.device))
        self.optimizer.load_state_dict(ckpt.load("optimizer"))  # CPU: AdamW keeps "step" there
        if self.disc is not None and "disc" in ckpt.groups:
            self.disc.load_state_dict(ckpt.load("disc", self.device))
            self.disc_optimizer.load_state_dict(ckpt.load("disc_optimizer"))

    def meta(self):
        """Dataset description and the latent scaling factor."""
        return {"dataset": self.dataset_info, "scaling_factor": self.model.scaling_factor}

    def finish(self) -> None:
        """Estimate the latent scaling factor (1 / std of the EMA autoencoder's latents) on a few training batches."""
        c = self.config
        loader = ImageLoader(self.cache, min(64, c.optim.batch_size), seed=c.run.seed + 1)
        batches = [loader.batch(i)[0].to(self.device) for i in range(c.vae.scaling_batches)]
        generator = torch.Generator(device=self.device).manual_seed(step_seed(c.run.seed, -1, 0))
        # The EMA weights are the ones that encode and decode (lddpm.pipeline.load_vae): measure their latents.
        self.ema.model.eval()
        factor = estimate_scaling_factor(self.ema.model, batches, generator=generator)
        self.model.scaling_factor = factor

    @torch.no_grad()
    def write_grid(self, path: Path) -> None:
        """Originals (top half) and reconstructions (bottom half) of a fixed batch."""
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


def train_vae(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
              stop_at: int | None = None, stop_minutes: float | None = None) -> dict[str, Any]:
    """Train the KL autoencoder, then store its latent scaling factor in the final checkpoint; `stop_at` and
    `stop_minutes` stop early as for `lddpm.train.train`."""
    return VAETrainer(config, run_dir, resume=resume, progress=progress, stop_at=stop_at,
                      stop_minutes=stop_minutes).run()
