"""Network registry: names, overrides, exact rebuild from saved configs, and validation errors."""

from __future__ import annotations

import json

import pytest
import torch

from lddpm.errors import LddpmError
from lddpm.nn import NETWORK_NAMES, UNetConfig, VAEConfig, build_network, network_config, network_from_config


def test_names():
    assert set(NETWORK_NAMES) == {"unet", "dit", "vae"}
    assert {"ddpm-cifar10", "adm-imagenet128", "tiny", "small"} <= set(NETWORK_NAMES["unet"])
    assert {"kl-f4", "kl-f8", "kl-f4-tiny"} <= set(NETWORK_NAMES["vae"])


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_every_named_config_is_valid_and_roundtrips_through_json(kind):
    for name in NETWORK_NAMES[kind]:
        cfg = network_config(kind, name)
        cfg.validate()
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg


@pytest.mark.parametrize("kind,name", [("unet", "tiny"), ("vae", "kl-f4-tiny")])
def test_network_from_config_rebuilds_exactly(kind, name):
    torch.manual_seed(0)
    net = build_network(kind, name, in_channels=1, resolution=16)
    assert isinstance(net.config, UNetConfig if kind == "unet" else VAEConfig)
    other = network_from_config(kind, json.loads(json.dumps(net.config.to_dict())))
    other.load_state_dict(net.state_dict(), strict=True)
    assert other.config == net.config and other.in_channels == 1


def test_resolution_override_keeps_attention_levels_unless_given():
    assert network_config("unet", "ddpm-cifar10", resolution=64).attention_resolutions == (32,)
    assert network_config("unet", "tiny", resolution=28).attention_resolutions == (7,)
    assert network_config("unet", "tiny", resolution=28, attention_resolutions=[14]).attention_resolutions == (14,)
    assert network_config("unet", "tiny").resolution == 32  # the preset itself is untouched


def test_unknown_names_and_keys_raise():
    with pytest.raises(LddpmError, match="dit"):
        build_network("dit", "tiny")
    with pytest.raises(LddpmError, match="huge"):
        build_network("unet", "huge")
    with pytest.raises(LddpmError, match="num_chanels"):
        network_config("unet", "tiny", num_chanels=3)
    with pytest.raises(LddpmError, match="bogus"):
        network_from_config("vae", {**network_config("vae", "kl-f4").to_dict(), "bogus": 1})


@pytest.mark.parametrize("overrides,needle", [
    ({"resolution": 30}, "30"),  # not divisible by 4
    ({"attention_resolutions": (5,)}, "5"),  # never reached
    ({"norm_groups": 7}, "norm_groups=7"),  # 32 channels not divisible by 7
    ({"num_heads": 3}, "num_heads=3"),
    ({"num_head_channels": 48}, "num_head_channels=48"),
    ({"channel_mult": ()}, "channel_mult"),
    ({"dropout": 1.5}, "1.5"),
    ({"num_classes": -2}, "-2"),
])
def test_bad_unet_configs_raise(overrides, needle):
    with pytest.raises(LddpmError, match=needle):
        build_network("unet", "tiny", **overrides)


@pytest.mark.parametrize("overrides,needle", [
    ({"resolution": 30}, "30"),
    ({"attention_resolutions": (3,)}, "3"),
    ({"norm_groups": 5}, "norm_groups=5"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"scaling_factor": -1.0}, "-1.0"),
])
def test_bad_vae_configs_raise(overrides, needle):
    with pytest.raises(LddpmError, match=needle):
        build_network("vae", "kl-f4-tiny", **overrides)


def test_network_attributes():
    unet = build_network("unet", "tiny", num_classes=10, learned_sigma=True, in_channels=4, resolution=8)
    assert (unet.in_channels, unet.out_channels, unet.num_classes, unet.null_label) == (4, 8, 10, 10)
    vae = build_network("vae", "kl-f4-tiny")
    assert (vae.in_channels, vae.latent_channels, vae.downsample_factor, vae.scaling_factor) == (3, 4, 4, 1.0)
    assert "latent_scale" in vae.state_dict()
