"""Named network configs and the builders `build_network`, `network_config`, `network_from_config`."""

from __future__ import annotations

from torch import nn

from lddpm.errors import LddpmError
from lddpm.nn.dit import DiT, DiTConfig
from lddpm.nn.unet import UNet, UNetConfig
from lddpm.nn.vae import AutoencoderKL, VAEConfig

UNET_CONFIGS: dict[str, UNetConfig] = {
    # Ho et al. 2020 CIFAR-10 model: 35,746,307 parameters (exactly the original's count).
    "ddpm-cifar10": UNetConfig(resolution=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                               attention_resolutions=(16,), dropout=0.1, norm_groups=32, num_heads=1),
    # ADM-style ImageNet 128x128 (Dhariwal & Nichol 2021, Table 14 shape, conv up/down instead of
    # BigGAN resblocks): 386,045,190 parameters with 1000 classes + null label and learned sigma.
    "adm-imagenet128": UNetConfig(resolution=128, model_channels=256, channel_mult=(1, 1, 2, 3, 4),
                                  num_res_blocks=2, attention_resolutions=(32, 16, 8), num_head_channels=64,
                                  dropout=0.0, num_classes=1000, learned_sigma=True, use_scale_shift_norm=True),
    # CPU-sized: 1,113,955 parameters at 32x32x3 (attention at the lowest resolution and in the middle).
    "tiny": UNetConfig(resolution=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_resolutions=(8,), dropout=0.0, norm_groups=8, num_heads=1),
    # CPU-sized: 4,636,611 parameters at 32x32x3 (attention at the two lowest resolutions).
    "small": UNetConfig(resolution=32, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(16, 8), dropout=0.1, norm_groups=16, num_heads=2),
}

VAE_CONFIGS: dict[str, VAEConfig] = {
    # f=4 for 32x32 images -> 8x8x4 latents: 13,859,495 parameters.
    "kl-f4": VAEConfig(resolution=32, base_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                       latent_channels=4, norm_groups=32),
    # f=8 for 128x128 images -> 16x16x4 latents; the shape of LDM's kl-f8 (83,653,863 parameters).
    "kl-f8": VAEConfig(resolution=128, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                       latent_channels=4, norm_groups=32),
    # f=4, 414,799 parameters at RGB: small enough to train on 2 CPU cores at 32x32 (or 28x28).
    "kl-f4-tiny": VAEConfig(resolution=32, base_channels=24, channel_mult=(1, 1, 2), num_res_blocks=1,
                            latent_channels=4, norm_groups=8),
}

# Peebles & Xie 2023, Table 1 (depth, hidden size, heads) x patch size 2/4/8, at 256x256 images
# (32x32x4 latents), 1000 classes, learned sigma. DiT-XL/2: 675,129,632 parameters as in the
# paper's code (674,834,720 trainable + the fixed position embedding), 118.6 GFLOPs.
_DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
DIT_CONFIGS: dict[str, DiTConfig] = {
    f"dit-{size}/{p}": DiTConfig(resolution=32, in_channels=4, patch_size=p, depth=depth, hidden_size=width,
                                 num_heads=heads, num_classes=1000, learned_sigma=True)
    for size, (depth, width, heads) in _DIT_SIZES.items() for p in (2, 4, 8)
}
DIT_CONFIGS.update({
    # CPU-sized, Fashion-MNIST pixels (32x32x1, 64 tokens of 4x4 patches): 1,060,816 parameters (10 classes).
    "dit-tiny/4": DiTConfig(resolution=32, in_channels=1, patch_size=4, depth=6, hidden_size=96, num_heads=3,
                            num_classes=10, learned_sigma=False),
    # CPU-sized, the quick VAE's 8x8x4 latents (16 tokens of 2x2 patches): 1,060,816 parameters, about the
    # latent U-Net "tiny"'s 1.1M, and it trains faster than that U-Net on 8x8x4 (benchmarks/networks.py).
    "dit-tiny/2": DiTConfig(resolution=8, in_channels=4, patch_size=2, depth=6, hidden_size=96, num_heads=3,
                            num_classes=10, learned_sigma=False),
})

_REGISTRY = {"unet": (UNET_CONFIGS, UNetConfig, UNet), "vae": (VAE_CONFIGS, VAEConfig, AutoencoderKL),
             "dit": (DIT_CONFIGS, DiTConfig, DiT)}
NETWORK_NAMES: dict[str, tuple[str, ...]] = {kind: tuple(configs) for kind, (configs, _, _) in _REGISTRY.items()}


def _lookup(kind: str):
    """(configs, config class, network class) for a kind; unknown kind -> LddpmError."""
    if kind not in _REGISTRY:
        raise LddpmError(f"unknown network kind {kind!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[kind]


def network_config(kind: str, name: str, **overrides):
    """The named config with fields overridden.

    When `resolution` changes and `attention_resolutions` is not given, attention stays at the same
    levels (e.g. "tiny" at 28x28 attends at 7x7 instead of 8x8).
    """
    configs, _, _ = _lookup(kind)
    if name not in configs:
        raise LddpmError(f"unknown {kind} config {name!r}; choose one of {', '.join(configs)}")
    base = configs[name]
    type(base).from_dict({**base.to_dict(), **overrides})  # unknown keys and wrong types -> LddpmError
    if "resolution" in overrides and "attention_resolutions" not in overrides and hasattr(base, "attention_resolutions"):
        new_res = int(overrides["resolution"])
        levels = [base.resolution // 2**i for i in range(len(base.channel_mult))]
        overrides["attention_resolutions"] = tuple(new_res // 2 ** levels.index(r)
                                                   for r in base.attention_resolutions)
    return base.replace(**overrides)


def network_from_config(kind: str, config) -> nn.Module:
    """Build a network from a config object or a `config.to_dict()` dict (exact rebuild)."""
    _, config_cls, network_cls = _lookup(kind)
    if isinstance(config, dict):
        config = config_cls.from_dict(config)
    elif not isinstance(config, config_cls):
        raise LddpmError(f"a {kind} network needs a {config_cls.__name__} or a dict, not {type(config).__name__}")
    else:
        config = config.replace()  # a private copy: the network may update it (e.g. scaling_factor)
    return network_cls(config)


def build_network(kind: str, name: str, **overrides) -> nn.Module:
    """Build the named network ("unet", "dit" or "vae"), e.g. build_network("unet", "tiny", in_channels=1)."""
    return network_from_config(kind, network_config(kind, name, **overrides))
