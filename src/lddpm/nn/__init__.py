"""Noise predictors (U-Net, DiT) and the KL autoencoder, built by name from a registry of configs."""

from lddpm.nn.dit import DiT, DiTConfig
from lddpm.nn.registry import (DIT_CONFIGS, NETWORK_NAMES, UNET_CONFIGS, VAE_CONFIGS, build_network, network_config,
                               network_from_config)
from lddpm.nn.unet import UNet, UNetConfig
from lddpm.nn.vae import (AutoencoderKL, DiagonalGaussian, PatchDiscriminator, VAEConfig, estimate_scaling_factor,
                          hinge_d_loss, vae_loss)

__all__ = [
    "NETWORK_NAMES", "UNET_CONFIGS", "VAE_CONFIGS", "build_network", "network_config", "network_from_config",
    "DIT_CONFIGS", "DiT", "DiTConfig", "UNet", "UNetConfig", "AutoencoderKL", "DiagonalGaussian", "PatchDiscriminator", "VAEConfig",
    "estimate_scaling_factor", "hinge_d_loss", "vae_loss",
]
