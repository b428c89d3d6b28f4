"""lddpm: denoising diffusion probabilistic models in pixel space and in a VAE's latent space."""

__version__ = "0.1.0"
