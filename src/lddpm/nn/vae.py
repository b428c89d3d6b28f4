"""KL-regularised autoencoder for latent diffusion (Rombach et al. 2022, Appendix G), its losses and PatchGAN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lddpm.errors import LddpmError
from lddpm.nn.layers import AttentionBlock, Downsample, GroupNorm, NetworkConfig, ResBlock, Upsample

RECON_LOSSES = ("l1", "l2")  # reconstruction loss of `vae_loss`


@dataclass
class VAEConfig(NetworkConfig):
    """Shape of an AutoencoderKL; the downsampling factor is 2^(len(channel_mult) - 1)."""

    fitted_fields = ("scaling_factor",)  # estimated from the latents when training ends

    resolution: int = 32
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    attention_resolutions: tuple[int, ...] = ()  # extra attention inside the levels (LDM's attn_resolutions)
    mid_attention: bool = True
    dropout: float = 0.0
    norm_groups: int = 32
    scaling_factor: float = 1.0
    downsample_padding: int = 1  # 1: pad every side; 0: pad right/bottom only (LDM's and diffusers' autoencoder)
    norm_eps: float = 1e-5  # GroupNorm epsilon (LDM / diffusers autoencoders use 1e-6)

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling from image to latent."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        """Raise LddpmError naming the first value that cannot build an autoencoder."""
        if not self.channel_mult or any(int(m) < 1 for m in self.channel_mult):
            raise LddpmError(f"channel_mult {self.channel_mult} must be a non-empty list of positive integers")
        if self.downsample_factor not in (1, 2, 4, 8, 16):
            raise LddpmError(f"channel_mult {tuple(self.channel_mult)} gives downsampling factor "
                             f"{self.downsample_factor}; use 2 to 5 levels (f = 2, 4, 8, 16)")
        for name in ("resolution", "in_channels", "base_channels", "num_res_blocks", "latent_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise LddpmError(f"VAE {name}={getattr(self, name)} must be a positive integer")
        if self.resolution % self.downsample_factor:
            raise LddpmError(f"resolution {self.resolution} is not divisible by the total downsampling "
                             f"{self.downsample_factor} of channel_mult {tuple(self.channel_mult)}")
        levels = [self.resolution // 2**i for i in range(len(self.channel_mult))]
        for r in self.attention_resolutions:
            if r not in levels:
                raise LddpmError(f"attention resolution {r} is never reached by this autoencoder "
                                 f"(feature maps {levels}); choose from {levels}")
        for c in [self.base_channels] + [self.base_channels * m for m in self.channel_mult]:
            if c % self.norm_groups:
                raise LddpmError(f"{c} channels are not divisible by norm_groups={self.norm_groups}; "
                                 f"choose norm_groups dividing {self.base_channels}")
        if self.scaling_factor <= 0:
            raise LddpmError(f"scaling_factor={self.scaling_factor} must be positive")


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from the encoder's 2*latent_channels outputs."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)  # float32 even under autocast: KL and exp need it
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps (Kingma & Welling 2014, Eq. 10)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mode (= mean)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dims: 0.5 * sum(mu^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-density of x under the posterior per sample, summed over dims (nats)."""
        return 0.5 * (math.log(2 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var).flatten(1).sum(1)


class Encoder(nn.Module):
    """conv_in -> per level ResBlocks (+attention) and stride-2 downsampling -> middle -> 2*z moments."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, res = c.base_channels, c.resolution
        block = dict(dropout=c.dropout, norm_groups=c.norm_groups, zero_init=False, eps=c.norm_eps)
        attention = dict(norm_groups=c.norm_groups, zero_init=False, eps=c.norm_eps)
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        cur = ch
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers.append(ResBlock(cur, ch * mult, None, **block))
                cur = ch * mult
                if res in c.attention_resolutions:
                    layers.append(AttentionBlock(cur, **attention))
            if level != len(c.channel_mult) - 1:
                layers.append(Downsample(cur, c.downsample_padding))
                res //= 2
        layers.append(ResBlock(cur, cur, None, **block))
        if c.mid_attention:
            layers.append(AttentionBlock(cur, **attention))
        layers.append(ResBlock(cur, cur, None, **block))
        self.blocks = nn.ModuleList(layers)
        self.norm_out = GroupNorm(c.norm_groups, cur, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(cur, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> moments (B, 2*z, H/f, W/f)."""
        h = self.conv_in(x)
        for blk in self.blocks:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z -> conv_in -> middle -> per level (num_res_blocks + 1) ResBlocks and upsampling -> image."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.base_channels
        block = dict(dropout=c.dropout, norm_groups=c.norm_groups, zero_init=False, eps=c.norm_eps)
        attention = dict(norm_groups=c.norm_groups, zero_init=False, eps=c.norm_eps)
        cur = ch * c.channel_mult[-1]
        res = c.resolution // c.downsample_factor
        self.conv_in = nn.Conv2d(c.latent_channels, cur, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(cur, cur, None, **block)]
        if c.mid_attention:
            layers.append(AttentionBlock(cur, **attention))
        layers.append(ResBlock(cur, cur, None, **block))
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                layers.append(ResBlock(cur, ch * mult, None, **block))
                cur = ch * mult
                if res in c.attention_resolutions:
                    layers.append(AttentionBlock(cur, **attention))
            if level:
                layers.append(Upsample(cur))
                res *= 2
        self.blocks = nn.ModuleList(layers)
        self.norm_out = GroupNorm(c.norm_groups, cur, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, z, h, w) -> image (B, C, h*f, w*f)."""
        h = self.conv_in(z)
        for blk in self.blocks:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder of LDM: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    `scaling_factor` (a buffer, so it travels in the state dict) multiplies latents before
    diffusion so that they have unit variance (Section 4.3 / Appendix G of Rombach et al. 2022);
    `decode` expects unscaled latents: divide diffusion samples by it first.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels
        self.latent_channels = config.latent_channels
        self.downsample_factor = config.downsample_factor
        self.resolution = config.resolution
        self.latent_resolution = config.resolution // config.downsample_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.register_buffer("latent_scale", torch.tensor(float(config.scaling_factor)))

    @property
    def scaling_factor(self) -> float:
        """Multiply posterior samples by this to get unit-variance latents."""
        return float(self.latent_scale)

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        if not value > 0 or not math.isfinite(value):
            raise LddpmError(f"scaling_factor={value} must be a positive finite number")
        self.latent_scale.fill_(float(value))
        self.config.scaling_factor = float(value)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last conv (for the adaptive adversarial weight of Esser et al. 2021)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image in [-1, 1] (B, C, H, W) -> posterior over (B, z, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, z, h, w) -> image (B, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or its mode): returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, batches: Iterable[torch.Tensor],
                            generator: torch.Generator | None = None) -> float:
    """Set and return 1 / std of posterior samples over `batches` of images, as LDM does.

    `batches` yields image tensors (or (x, y) pairs); the result is stored in `vae.scaling_factor`.
    """
    device = next(vae.parameters()).device
    samples = []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        samples.append(vae.encode(x.to(device)).sample(generator).float().flatten())
    if not samples:
        raise LddpmError("estimate_scaling_factor got no batches; pass at least one batch of images")
    std = torch.cat(samples).std()
    if not std > 0:
        raise LddpmError(f"posterior samples have std {float(std)}; cannot set a scaling factor")
    vae.scaling_factor = float(1.0 / std)
    return vae.scaling_factor


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, Appendix 6.1.2) giving a logit map over image patches.

    conv(4, stride 2) + LeakyReLU, then (num_layers - 1) conv(4, stride 2)-BatchNorm-LeakyReLU
    with doubling width (capped at 8x), one stride-1 block and a 1-channel output conv.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> patch logits (B, 1, h, w)."""
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss -E[D(G(z))] (the hinge-GAN generator objective)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad rec|| / (||grad adv|| + 1e-4) at the decoder's last layer (Eq. 7 of Esser et al. 2021)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def vae_loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, *, kl_weight: float = 1e-6,
             recon_loss: str = "l1", logits_fake: torch.Tensor | None = None, adv_weight: float = 0.5,
             step: int | None = None, disc_start: int = 0, last_layer: torch.Tensor | None = None) -> dict:
    """Autoencoder training loss as in LDM: reconstruction + kl_weight * KL (+ adversarial term).

    Reconstruction (|x - recon| or (x - recon)^2) and KL are summed over pixels / latent dims per
    sample and averaged over the batch, so `kl_weight` has LDM's meaning (1e-6 in their configs).
    The adversarial term adv_weight * (-E[D(recon)]) is added when `logits_fake` is given and
    `step` (if given) has reached `disc_start`; with `last_layer`, adv_weight is scaled by the
    adaptive weight of Esser et al. 2021. Returns {"loss", "recon", "kl", "mse", "adv", "adv_weight"}.
    """
    if recon_loss not in RECON_LOSSES:
        raise LddpmError(f"recon_loss={recon_loss!r} is not supported; use one of {', '.join(RECON_LOSSES)}")
    diff = (x - recon).float()
    per_pixel = diff.abs() if recon_loss == "l1" else diff.pow(2)
    rec = per_pixel.flatten(1).sum(1).mean()
    kl = posterior.kl().mean()
    loss = rec + kl_weight * kl
    out = {"recon": rec, "kl": kl, "mse": diff.pow(2).mean().detach()}
    if logits_fake is not None and (step is None or step >= disc_start):
        adv = generator_adv_loss(logits_fake)
        weight = torch.tensor(float(adv_weight), device=adv.device)
        if last_layer is not None and torch.is_grad_enabled():
            weight = weight * adaptive_weight(rec, adv, last_layer)
        loss = loss + weight * adv
        out.update(adv=adv, adv_weight=weight)
    out["loss"] = loss
    return out
