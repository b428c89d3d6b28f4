"""diffusers model folders <-> lddpm networks: configs, weights and scheduler configs.

Each supported diffusers class has one `ModelClass` entry in `CLASSES`: its `__init__` defaults,
a config mapping in each direction, and the table of module pairs (lddpm prefix, diffusers
prefix) that renames the weights. A config field lddpm cannot represent raises LddpmError naming
it; nothing is dropped silently. Only safetensors files are read (`read_safetensors`).
To add a class: write its defaults, the two config functions and the module-pair table, and
register it in `CLASSES`. A tensor diffusers repeats (DiT's per-block copy of the timestep/class
embedding) is listed in `copies`: written to every copy on export, checked identical on import.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from lddpm.errors import LddpmError
from lddpm.io import read_json_object
from lddpm.nn.dit import DiTConfig
from lddpm.nn.unet import UNetConfig
from lddpm.nn.vae import VAEConfig
from lddpm.schedule import SCHEDULES, NoiseSchedule

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# The `_diffusers_version` written into exported configs: a release that reads every field we write.
DIFFUSERS_VERSION = "0.30.0"


def refuse(where: str, key: str, value: Any, why: str) -> LddpmError:
    """The error for a config field lddpm cannot represent."""
    return LddpmError(f"{where}: {key} = {json.dumps(value)} cannot be represented in lddpm ({why}); "
                      "nothing was written")


def resolve_config(where: str, config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """diffusers' defaults overlaid with `config`; an unknown field is refused by name."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise LddpmError(f"{where}: unknown config field(s) {', '.join(unknown)} (written by a newer diffusers?); "
                         "lddpm refuses fields it cannot interpret; nothing was written")
    return {**defaults, **fields}


# ----------------------------------------------------------------------------- UNet2DModel

# diffusers.UNet2DModel.__init__ defaults (diffusers 0.30-0.42).
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _square_size(where: str, size: Any) -> int:
    """sample_size as one int (a square); anything else is refused."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise refuse(where, "sample_size", size, "lddpm models are square with a known resolution")
    return size


def check_fixed_fields_and_blocks(c: dict[str, Any], expect: dict[str, tuple[Any, str]],
                                  where: str) -> tuple[list[str], list[str], list[int]]:
    """Refuse a field whose value lddpm cannot represent (`expect`: key -> (the one value, why)); return
    the down blocks, up blocks and channels, checked to have one entry per level."""
    for key, (value, why) in expect.items():
        if c[key] != value:
            raise refuse(where, key, c[key], why)
    down, up, channels = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    if not (len(down) == len(up) == len(channels) >= 1):
        raise LddpmError(f"{where}: down_block_types, up_block_types and block_out_channels must have equal lengths")
    return down, up, channels


def unet_config_from_diffusers(config: dict[str, Any], where: str = "UNet2DModel") -> UNetConfig:
    """A UNet2DModel config -> UNetConfig, refusing every field lddpm's U-Net cannot represent."""
    c = resolve_config(where, config, UNET2D_DEFAULTS)
    expect = {"center_input_sample": (False, "lddpm takes inputs in [-1, 1] as they are"),
              "time_embedding_type": ("positional", "only the sinusoidal timestep embedding exists"),
              "mid_block_type": ("UNetMidBlock2D", "the U-Net always has a ResBlock-attention-ResBlock middle"),
              "mid_block_scale_factor": (1, "residual outputs are not rescaled"),
              "downsample_type": ("conv", "downsampling is a stride-2 convolution"),
              "upsample_type": ("conv", "upsampling is nearest-neighbour + convolution"),
              "act_fn": ("silu", "every activation is SiLU"),
              "class_embed_type": (None, "class labels use a plain embedding table (num_class_embeds)")}
    down, up, channels = check_fixed_fields_and_blocks(c, expect, where)
    for i, name in enumerate(down):
        if name not in _DOWN:
            raise refuse(where, f"down_block_types[{i}]", name, f"supported down blocks: {', '.join(_DOWN)}")
    for i, name in enumerate(up):
        if name not in _UP:
            raise refuse(where, f"up_block_types[{i}]", name, f"supported up blocks: {', '.join(_UP)}")
        if _UP[name] != _DOWN[down[len(down) - 1 - i]]:
            raise refuse(where, f"up_block_types[{i}]", name, f"it must mirror down_block_types[{len(down) - 1 - i}] "
                         f"= {down[len(down) - 1 - i]}: attention sits at the same levels going down and up")
    base = channels[0]
    if any(ch % base for ch in channels):
        raise refuse(where, "block_out_channels", channels, "every width must be a multiple of the first")
    emb_dim = c["time_embedding_dim"]
    if emb_dim not in (None, 4 * base):
        raise refuse(where, "time_embedding_dim", emb_dim, f"the timestep embedding is 4 x {base} = {4 * base} wide")
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise refuse(where, "resnet_time_scale_shift", shift, "supported: default, scale_shift")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int):
        raise refuse(where, "norm_num_groups", groups, "GroupNorm with a fixed group count everywhere")
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups is None and shift == "scale_shift" and c["add_attention"]:
        raise refuse(where, "attn_norm_num_groups", None, "with resnet_time_scale_shift = scale_shift diffusers' "
                     "middle attention has no GroupNorm; lddpm's always has one")
    if attn_groups not in (None, groups):
        raise refuse(where, "attn_norm_num_groups", attn_groups, f"attention uses norm_num_groups = {groups}")
    num_classes = 0
    if c["num_class_embeds"] is not None:
        if c["num_class_embeds"] < 2:
            raise refuse(where, "num_class_embeds", c["num_class_embeds"], "lddpm needs at least one class and the null label")
        num_classes = c["num_class_embeds"] - 1  # lddpm's last row is its null label (classifier-free guidance)
    in_ch, out_ch = c["in_channels"], c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(where, "out_channels", out_ch, f"the output has in_channels ({in_ch}) or, with a learned "
                     f"variance, 2 x in_channels channels")
    resolution = _square_size(where, c["sample_size"])
    levels = [resolution // 2**i for i in range(len(channels))]
    attention_levels = [i for i, name in enumerate(down) if _DOWN[name]]
    attn_channels = [channels[i] for i in attention_levels] + ([channels[-1]] if c["add_attention"] else [])
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        bad = [ch for ch in attn_channels if ch % head_dim]
        if bad:
            raise refuse(where, "attention_head_dim", head_dim, f"it must divide every attention width ({bad[0]})")
    if c["downsample_padding"] not in (0, 1):
        raise refuse(where, "downsample_padding", c["downsample_padding"], "supported: 0 (right/bottom) or 1")
    config = UNetConfig(
        resolution=resolution, in_channels=in_ch, model_channels=base,
        channel_mult=tuple(ch // base for ch in channels), num_res_blocks=int(c["layers_per_block"]),
        attention_resolutions=tuple(levels[i] for i in attention_levels), mid_attention=bool(c["add_attention"]),
        num_heads=1, num_head_channels=int(head_dim) if head_dim is not None else -1, dropout=float(c["dropout"]),
        norm_groups=groups, num_classes=num_classes, learned_sigma=out_ch == 2 * in_ch,
        use_scale_shift_norm=shift == "scale_shift", flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]), downsample_padding=int(c["downsample_padding"]),
        norm_eps=float(c["norm_eps"]))
    config.validate()
    return config


def _attention_head_dim(config: UNetConfig) -> int | None:
    """diffusers' single attention_head_dim for an lddpm U-Net (None = one head per block)."""
    if config.num_head_channels > 0:
        return config.num_head_channels
    if config.num_heads == 1:
        return None
    widths = [config.model_channels * m for m, r in zip(config.channel_mult, config.level_resolutions())
              if r in config.attention_resolutions]
    widths += [config.model_channels * config.channel_mult[-1]] if config.mid_attention else []
    dims = {w // config.num_heads for w in widths}
    if len(dims) > 1:
        raise LddpmError(f"num_heads={config.num_heads} gives head widths {sorted(dims)} at different levels; "
                         "diffusers' UNet2DModel has one attention_head_dim for all of them")
    return dims.pop() if dims else None


def _validated(config, where: str):
    """The network config read from a diffusers folder, validated; an unbuildable one is one error naming the folder."""
    try:
        config.validate()
    except LddpmError as exc:
        raise LddpmError(f"{where}: {exc}; nothing was written") from None
    return config


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """UNetConfig -> a complete UNet2DModel config (every field written, no reliance on defaults)."""
    if config.context_dim:
        raise LddpmError(f"context_dim={config.context_dim}: a U-Net that reads prompts is a UNet2DConditionModel "
                         "in diffusers, not a UNet2DModel (lddpm export writes one for a text run); nothing was "
                         "written")
    out = dict(UNET2D_DEFAULTS)
    out.update(_unet_layout(config, "UNet2DModel", "AttnDownBlock2D", "AttnUpBlock2D", ""))
    out.update({
        "attention_head_dim": _attention_head_dim(config),
        "attn_norm_num_groups": config.norm_groups if config.use_scale_shift_norm else None,
        "add_attention": config.mid_attention,
    })
    return out


def _unet_layout(config: UNetConfig, cls: str, attn_down: str, attn_up: str, suffix: str) -> dict[str, Any]:
    """The config fields UNet2DModel and UNet2DConditionModel share: sizes, levels and their block types
    (`attn_down` / `attn_up` where a level attends), ResBlock and timestep options, class labels."""
    if config.channel_mult[0] != 1:
        raise LddpmError(f"channel_mult {tuple(config.channel_mult)} starts with {config.channel_mult[0]}: "
                         f"{cls}'s first level has the width of its input convolution (channel_mult[0] = 1)"
                         f"{suffix}")
    attn = [r in config.attention_resolutions for r in config.level_resolutions()]
    return {
        "sample_size": config.resolution, "in_channels": config.in_channels,
        "out_channels": config.in_channels * (2 if config.learned_sigma else 1),
        "freq_shift": config.freq_shift if config.freq_shift != int(config.freq_shift) else int(config.freq_shift),
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "down_block_types": [attn_down if a else "DownBlock2D" for a in attn],
        "up_block_types": [attn_up if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks, "downsample_padding": config.downsample_padding,
        "dropout": config.dropout, "norm_num_groups": config.norm_groups, "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "num_class_embeds": config.num_classes + 1 if config.num_classes else None,
    }


def unet_module_pairs(config: UNetConfig) -> list[tuple[str, str]]:
    """(lddpm module, UNet2DModel or UNet2DConditionModel module) for every module that holds weights."""
    c = config
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
             ("label_embed", "class_embedding"), ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"),
             ("conv_out", "conv_out")]
    levels, last = c.level_resolutions(), len(c.channel_mult) - 1

    def attention(ours: str, theirs: str) -> list[tuple[str, str]]:
        if c.context_dim:
            return transformer_module_pairs(ours, theirs, c.transformer_depth)
        return [(ours, theirs)]

    k = 0
    for i, res in enumerate(levels):
        for b in range(c.num_res_blocks):
            pairs.append((f"down.{k}.0", f"down_blocks.{i}.resnets.{b}"))
            if res in c.attention_resolutions:
                pairs += attention(f"down.{k}.1", f"down_blocks.{i}.attentions.{b}")
            k += 1
        if i != last:
            pairs.append((f"down.{k}.0", f"down_blocks.{i}.downsamplers.0"))
            k += 1
    pairs += [pair for ours, theirs in _mid_pairs("mid", "mid_block", c.mid_attention)
              for pair in (attention(ours, theirs) if ".attentions." in theirs else [(ours, theirs)])]
    k = 0
    for i, level in enumerate(reversed(range(len(levels)))):
        attn = levels[level] in c.attention_resolutions
        for b in range(c.num_res_blocks + 1):
            pairs.append((f"up.{k}.0", f"up_blocks.{i}.resnets.{b}"))
            if attn:
                pairs += attention(f"up.{k}.1", f"up_blocks.{i}.attentions.{b}")
            if level and b == c.num_res_blocks:
                pairs.append((f"up.{k}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0"))
            k += 1
    return pairs


def transformer_module_pairs(ours: str, theirs: str, depth: int) -> list[tuple[str, str]]:
    """lddpm's SpatialTransformer `ours` -> diffusers' Transformer2DModel `theirs` (UNet2DConditionModel's
    `attentions.N`, use_linear_projection=True): the same names except the feed-forward's (ff.net.0.proj,
    ff.net.2) and `to_out.0` (see _RENAME)."""
    pairs = [(f"{ours}.{name}", f"{theirs}.{name}") for name in ("norm", "proj_in", "proj_out")]
    for j in range(depth):
        o, t = f"{ours}.transformer_blocks.{j}", f"{theirs}.transformer_blocks.{j}"
        pairs += [(f"{o}.{name}", f"{t}.{name}") for name in ("norm1", "attn1", "norm2", "attn2", "norm3")]
        pairs += [(f"{o}.ff.proj_in", f"{t}.ff.net.0.proj"), (f"{o}.ff.proj_out", f"{t}.ff.net.2")]
    return pairs


def _mid_pairs(ours: str, theirs: str, attention: bool, start: int = 0) -> list[tuple[str, str]]:
    """The middle ResBlock(-attention)-ResBlock, numbered from `start` in a flat lddpm list."""
    pairs = [(f"{ours}.{start}", f"{theirs}.resnets.0")]
    if attention:
        pairs.append((f"{ours}.{start + 1}", f"{theirs}.attentions.0"))
    pairs.append((f"{ours}.{start + (2 if attention else 1)}", f"{theirs}.resnets.1"))
    return pairs


# ----------------------------------------------------------------------------- UNet2DConditionModel

# diffusers.UNet2DConditionModel.__init__ defaults (diffusers 0.30-0.42).
UNET2D_CONDITION_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
_CROSS_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has a transformer
_CROSS_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_NO_EXTRA_CONDITION = "the only conditions are the timestep, a class label and the prompt's token states"


def _one_per_block(where: str, key: str, value: Any, levels: int) -> list[int]:
    """An int-or-list-per-down-block field as one positive int per level."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise refuse(where, key, value, f"it must be a positive integer or one per down block ({levels})")
    return values


def _the_same(where: str, key: str, value: Any, levels: int, why: str) -> int:
    """A per-block field lddpm holds as one number: every block's value must be equal."""
    values = _one_per_block(where, key, value, levels)
    if len(set(values)) > 1:
        raise refuse(where, key, value, why)
    return values[0]


def unet_cond_config_from_diffusers(config: dict[str, Any], where: str = "UNet2DConditionModel") -> UNetConfig:
    """A UNet2DConditionModel config -> a text UNetConfig (context_dim = cross_attention_dim), refusing every
    field lddpm's U-Net cannot represent."""
    c = resolve_config(where, config, UNET2D_CONDITION_DEFAULTS)
    fixed = "lddpm's text U-Net is Stable Diffusion 2's layout"
    expect = {
        "center_input_sample": (False, "lddpm takes inputs as they are"),
        "time_embedding_type": ("positional", "only the sinusoidal timestep embedding exists"),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",
                           "the text U-Net always has a ResBlock-transformer-ResBlock middle"),
        "mid_block_scale_factor": (1, "residual outputs are not rescaled"),
        "act_fn": ("silu", "every activation is SiLU"),
        "class_embed_type": (None, "class labels use a plain embedding table (num_class_embeds)"),
        "only_cross_attention": (False, "every transformer block has self-attention before its cross-attention"),
        "use_linear_projection": (True, "the transformers' proj_in/proj_out are Linear layers (SD 2), "
                                        "not 1x1 convolutions"),
        "dual_cross_attention": (False, fixed),
        "upcast_attention": (False, "attention runs in the model's dtype"),
        "encoder_hid_dim": (None, "the prompt's token states enter the cross-attention unprojected"),
        "encoder_hid_dim_type": (None, "the prompt's token states enter the cross-attention unprojected"),
        "num_attention_heads": (None, "the head count is attention_head_dim (diffusers' historic naming)"),
        "reverse_transformer_layers_per_block": (None, "every transformer has the same depth"),
        "addition_embed_type": (None, _NO_EXTRA_CONDITION),
        "addition_time_embed_dim": (None, _NO_EXTRA_CONDITION),
        "time_cond_proj_dim": (None, _NO_EXTRA_CONDITION),
        "projection_class_embeddings_input_dim": (None, _NO_EXTRA_CONDITION),
        "resnet_skip_time_act": (False, fixed),
        "resnet_out_scale_factor": (1.0, "residual outputs are not rescaled"),
        "time_embedding_act_fn": (None, "the timestep embedding ends with its MLP's second Linear"),
        "timestep_post_act": (None, "the timestep embedding ends with its MLP's second Linear"),
        "conv_in_kernel": (3, "the input and output convolutions are 3x3"),
        "conv_out_kernel": (3, "the input and output convolutions are 3x3"),
        "attention_type": ("default", fixed),
        "class_embeddings_concat": (False, "the class embedding is added to the timestep embedding"),
        "cross_attention_norm": (None, "the prompt's token states enter the cross-attention unnormalised"),
    }
    down, up, channels = check_fixed_fields_and_blocks(c, expect, where)
    if c["mid_block_only_cross_attention"] not in (None, False):
        raise refuse(where, "mid_block_only_cross_attention", c["mid_block_only_cross_attention"], fixed)
    for i, name in enumerate(down):
        if name not in _CROSS_DOWN:
            raise refuse(where, f"down_block_types[{i}]", name, f"supported down blocks: {', '.join(_CROSS_DOWN)}")
    for i, name in enumerate(up):
        mirror = down[len(down) - 1 - i]
        if name not in _CROSS_UP:
            raise refuse(where, f"up_block_types[{i}]", name, f"supported up blocks: {', '.join(_CROSS_UP)}")
        if _CROSS_UP[name] != _CROSS_DOWN[mirror]:
            raise refuse(where, f"up_block_types[{i}]", name, f"it must mirror down_block_types[{len(down) - 1 - i}] "
                         f"= {mirror}: transformers sit at the same levels going down and up")
    n = len(channels)
    base = channels[0]
    if any(ch % base for ch in channels):
        raise refuse(where, "block_out_channels", channels, "every width must be a multiple of the first")
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise refuse(where, "time_embedding_dim", c["time_embedding_dim"],
                     f"the timestep embedding is 4 x {base} = {4 * base} wide")
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise refuse(where, "resnet_time_scale_shift", shift, "supported: default, scale_shift")
    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise refuse(where, "norm_num_groups", groups, "GroupNorm with a fixed group count everywhere")
    layers = _the_same(where, "layers_per_block", c["layers_per_block"], n,
                       "every level has the same number of ResBlocks")
    depth = _the_same(where, "transformer_layers_per_block", c["transformer_layers_per_block"], n,
                      "every transformer has the same depth")
    context_dim = _the_same(where, "cross_attention_dim", c["cross_attention_dim"], n,
                            "every cross-attention reads the same token states")
    num_classes = 0
    if c["num_class_embeds"] is not None:
        if isinstance(c["num_class_embeds"], bool) or not isinstance(c["num_class_embeds"], int) or \
                c["num_class_embeds"] < 2:
            raise refuse(where, "num_class_embeds", c["num_class_embeds"],
                         "lddpm needs at least one class and the null label")
        num_classes = c["num_class_embeds"] - 1  # lddpm's last row is its null label
    in_ch, out_ch = c["in_channels"], c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(where, "out_channels", out_ch, f"the output has in_channels ({in_ch}) or, with a learned "
                     f"variance, 2 x in_channels channels")
    if c["downsample_padding"] not in (0, 1):
        raise refuse(where, "downsample_padding", c["downsample_padding"], "supported: 0 (right/bottom) or 1")
    resolution = _square_size(where, c["sample_size"])
    attended = [i for i, name in enumerate(down) if _CROSS_DOWN[name]]
    # attention_head_dim is the NUMBER of heads per down block (diffusers issue #2011); the middle uses the last
    heads = _one_per_block(where, "attention_head_dim", c["attention_head_dim"], n)
    used = [(channels[i], heads[i]) for i in attended] + [(channels[-1], heads[-1])]
    bad = [ch for ch, h in used if ch % h]
    if bad:
        raise refuse(where, "attention_head_dim", c["attention_head_dim"],
                     f"it is the number of heads, which must divide the width {bad[0]}")
    if len({h for _, h in used}) == 1:
        num_heads, head_channels = used[0][1], -1
    elif len({ch // h for ch, h in used}) == 1:
        num_heads, head_channels = 1, used[0][0] // used[0][1]
    else:
        raise refuse(where, "attention_head_dim", c["attention_head_dim"], "lddpm's transformers have either one "
                     "head count or one head width throughout")
    config = UNetConfig(
        resolution=resolution, in_channels=in_ch, model_channels=base,
        channel_mult=tuple(ch // base for ch in channels), num_res_blocks=layers, attention_resolutions=tuple(resolution // 2**i for i in attended), mid_attention=True,
        num_heads=num_heads, num_head_channels=head_channels, dropout=float(c["dropout"]), norm_groups=groups,
        num_classes=num_classes, learned_sigma=out_ch == 2 * in_ch, use_scale_shift_norm=shift == "scale_shift",
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
        downsample_padding=int(c["downsample_padding"]), norm_eps=float(c["norm_eps"]), context_dim=context_dim,
        transformer_depth=depth)
    return _validated(config, where)


def unet_cond_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """A text UNetConfig -> a complete UNet2DConditionModel config (use_linear_projection, attention_head_dim =
    the number of heads); refuses a U-Net that class would compute differently."""
    if config.scratch_vocab:
        raise LddpmError("text.encoder = 'scratch': the encoder trained inside this U-Net has no Hugging Face model "
                         "class for diffusers to load; nothing was written")
    if config.transformer_pos_embed:
        raise LddpmError("transformer_pos_embed = true: UNet2DConditionModel has no position embedding in its "
                         "transformers, so diffusers could not load this U-Net; nothing was written")
    if config.context_layers:
        raise LddpmError(f"context_layers={config.context_layers}: UNet2DConditionModel reads the text encoder's "
                         "states directly and has no place for the trained refiner layers; nothing was written")
    if not config.context_dim:
        raise LddpmError("context_dim=0: a U-Net without prompts is a UNet2DModel in diffusers")
    if not config.mid_attention:
        raise LddpmError("mid_attention=false cannot be exported: UNet2DConditionModel's middle block without a "
                         "transformer (UNetMidBlock2D) is a single ResBlock, lddpm's middle two ResBlocks; train "
                         "with model.overrides.mid_attention = true to export; nothing was written")
    layout = _unet_layout(config, "UNet2DConditionModel", "CrossAttnDownBlock2D", "CrossAttnUpBlock2D",
                          "; nothing was written")
    heads = [max(1, config.heads_for(ch)) for ch in layout["block_out_channels"]]  # where transformers are, and the last
    out = dict(UNET2D_CONDITION_DEFAULTS)
    out.update(layout)
    out.update({
        "cross_attention_dim": config.context_dim, "transformer_layers_per_block": config.transformer_depth,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads, "use_linear_projection": True,
    })
    return out


# ----------------------------------------------------------------------------- AutoencoderKL

# diffusers.AutoencoderKL.__init__ defaults (diffusers 0.30-0.42).
AUTOENCODER_KL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
VAE_NORM_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code GroupNorm eps 1e-6 (as LDM does)


def vae_config_from_diffusers(config: dict[str, Any], where: str = "AutoencoderKL") -> VAEConfig:
    """An AutoencoderKL config -> VAEConfig, refusing every field lddpm's autoencoder cannot represent."""
    c = resolve_config(where, config, AUTOENCODER_KL_DEFAULTS)
    expect = {"act_fn": ("silu", "every activation is SiLU"),
              "shift_factor": (None, "latents are only scaled (scaling_factor), never shifted"),
              "latents_mean": (None, "latents are only scaled, with one scaling_factor"),
              "latents_std": (None, "latents are only scaled, with one scaling_factor"),
              "use_quant_conv": (True, "the autoencoder always has quant_conv"),
              "use_post_quant_conv": (True, "the autoencoder always has post_quant_conv")}
    down, up, channels = check_fixed_fields_and_blocks(c, expect, where)
    for key, names, allowed in (("down_block_types", down, "DownEncoderBlock2D"), ("up_block_types", up, "UpDecoderBlock2D")):
        for i, name in enumerate(names):
            if name != allowed:
                raise refuse(where, f"{key}[{i}]", name, f"supported: {allowed} (no attention inside the levels)")
    if c["in_channels"] != c["out_channels"]:
        raise refuse(where, "out_channels", c["out_channels"], f"the decoder outputs in_channels = {c['in_channels']}")
    base = channels[0]
    if any(ch % base for ch in channels):
        raise refuse(where, "block_out_channels", channels, "every width must be a multiple of the first")
    scaling = c["scaling_factor"]
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not scaling > 0:
        raise refuse(where, "scaling_factor", scaling, "it must be a positive number")
    config = VAEConfig(
        resolution=_square_size(where, c["sample_size"]), in_channels=c["in_channels"], base_channels=base,
        channel_mult=tuple(ch // base for ch in channels), num_res_blocks=int(c["layers_per_block"]),
        latent_channels=int(c["latent_channels"]), attention_resolutions=(),
        mid_attention=bool(c["mid_block_add_attention"]), dropout=0.0, norm_groups=int(c["norm_num_groups"]),
        scaling_factor=float(scaling), downsample_padding=0, norm_eps=VAE_NORM_EPS)
    config.validate()
    return config


def vae_config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """VAEConfig -> a complete AutoencoderKL config; refuses shapes AutoencoderKL cannot hold."""
    if config.channel_mult[0] != 1:
        raise LddpmError(f"channel_mult {tuple(config.channel_mult)} starts with {config.channel_mult[0]}: "
                         "AutoencoderKL's first level has the width of its input convolution (channel_mult[0] = 1)")
    if config.attention_resolutions:
        raise LddpmError(f"attention_resolutions {tuple(config.attention_resolutions)}: AutoencoderKL has "
                         "attention only in the middle block")
    if config.downsample_padding != 0 or config.norm_eps != VAE_NORM_EPS:
        raise LddpmError(f"downsample_padding={config.downsample_padding}, norm_eps={config.norm_eps}: diffusers' "
                         f"AutoencoderKL always pads right/bottom (0) and uses GroupNorm eps {VAE_NORM_EPS}; "
                         "this autoencoder would compute something else there (train with "
                         "model.overrides.downsample_padding = 0 and norm_eps = 1e-6 to export)")
    levels = len(config.channel_mult)
    out = dict(AUTOENCODER_KL_DEFAULTS)
    out.update({
        "in_channels": config.in_channels, "out_channels": config.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks, "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups, "sample_size": config.resolution,
        "scaling_factor": config.scaling_factor, "mid_block_add_attention": config.mid_attention,
    })
    return out


def vae_module_pairs(config: VAEConfig) -> list[tuple[str, str]]:
    """(lddpm module, AutoencoderKL module) for every module that holds weights."""
    c = config
    last = len(c.channel_mult) - 1
    pairs = [("encoder.conv_in", "encoder.conv_in"), ("encoder.norm_out", "encoder.conv_norm_out"),
             ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
             ("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out"),
             ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    k = 0
    for i in range(len(c.channel_mult)):
        for b in range(c.num_res_blocks):
            pairs.append((f"encoder.blocks.{k}", f"encoder.down_blocks.{i}.resnets.{b}"))
            k += 1
        if i != last:
            pairs.append((f"encoder.blocks.{k}", f"encoder.down_blocks.{i}.downsamplers.0"))
            k += 1
    pairs += _mid_pairs("encoder.blocks", "encoder.mid_block", c.mid_attention, start=k)
    pairs += _mid_pairs("decoder.blocks", "decoder.mid_block", c.mid_attention)
    k = 3 if c.mid_attention else 2
    for i, level in enumerate(reversed(range(len(c.channel_mult)))):
        for b in range(c.num_res_blocks + 1):
            pairs.append((f"decoder.blocks.{k}", f"decoder.up_blocks.{i}.resnets.{b}"))
            k += 1
        if level:
            pairs.append((f"decoder.blocks.{k}", f"decoder.up_blocks.{i}.upsamplers.0"))
            k += 1
    return pairs


def _vae_derived(config: VAEConfig) -> dict[str, torch.Tensor]:
    """lddpm state that diffusers keeps in the config: the latent scaling factor buffer."""
    return {"latent_scale": torch.tensor(float(config.scaling_factor))}


# ----------------------------------------------------------------------------- DiTTransformer2DModel

# diffusers.DiTTransformer2DModel.__init__ defaults (diffusers 0.28-0.42).
DIT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
# Transformer2DModel (the class name of DiT checkpoints saved before diffusers 0.28, e.g. facebook/DiT-XL-2-256):
# diffusers loads one with norm_type "ada_norm_zero" as a DiTTransformer2DModel. Its other fields must keep the
# values under which that load computes a DiT; the defaults of the fields the two classes share differ.
TRANSFORMER2D_DEFAULTS: dict[str, Any] = {
    **DIT_DEFAULTS, "attention_head_dim": 88, "in_channels": None, "num_layers": 1, "attention_bias": False,
    "sample_size": None, "patch_size": None, "activation_fn": "geglu", "num_embeds_ada_norm": None,
    "norm_type": "layer_norm", "norm_elementwise_affine": True,
    "cross_attention_dim": None, "num_vector_embeds": None, "use_linear_projection": False,
    "only_cross_attention": False, "double_self_attention": False, "attention_type": "default",
    "caption_channels": None, "interpolation_scale": None, "use_additional_conditions": None,
}
DIT_FREQ_SHIFT = 1  # diffusers' CombinedTimestepLabelEmbeddings: Timesteps(256, flip_sin_to_cos=True, shift 1)


def dit_config_from_diffusers(config: dict[str, Any], where: str = "DiTTransformer2DModel") -> DiTConfig:
    """A DiTTransformer2DModel (or DiT-shaped Transformer2DModel) config -> DiTConfig, refusing what lddpm's
    DiT cannot represent."""
    legacy = config.get("_class_name") == "Transformer2DModel"
    c = resolve_config(where, config, TRANSFORMER2D_DEFAULTS if legacy else DIT_DEFAULTS)
    expect = {"norm_type": ("ada_norm_zero", "lddpm's DiT blocks are adaLN-Zero"),
              "activation_fn": ("gelu-approximate", "the MLP uses tanh-approximated GELU"),
              "attention_bias": (True, "the q, k, v projections have biases"),
              "norm_elementwise_affine": (False, "the LayerNorms have no affine parameters (adaLN supplies them)"),
              "dropout": (0.0, "lddpm's DiT has no dropout"),
              "upcast_attention": (False, "attention runs in the model's dtype")}
    if legacy:
        expect.update({key: (TRANSFORMER2D_DEFAULTS[key], "a DiT has no such input or layer") for key in (
            "cross_attention_dim", "num_vector_embeds", "use_linear_projection", "only_cross_attention",
            "double_self_attention", "attention_type", "caption_channels", "interpolation_scale",
            "use_additional_conditions")})
    for key, (value, why) in expect.items():
        if c[key] != value:
            raise refuse(where, key, c[key], why)
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "patch_size"):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            raise refuse(where, key, c[key], "it must be a positive integer")
    classes = c["num_embeds_ada_norm"]
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise refuse(where, "num_embeds_ada_norm", classes, "lddpm's DiT is class-conditional with at least one class "
                     "(diffusers' table has num_embeds_ada_norm + 1 rows, the last the null label, as lddpm's)")
    in_ch = c["in_channels"]
    out_ch = in_ch if c["out_channels"] is None else c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(where, "out_channels", out_ch, f"the output has in_channels ({in_ch}) or, with a learned "
                     f"variance, 2 x in_channels channels")
    eps = c["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise refuse(where, "norm_eps", eps, "it must be a positive number")
    config = DiTConfig(
        resolution=_square_size(where, c["sample_size"]), in_channels=in_ch, patch_size=c["patch_size"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
        num_heads=c["num_attention_heads"], mlp_ratio=4.0, num_classes=classes, learned_sigma=out_ch == 2 * in_ch,
        freq_shift=float(DIT_FREQ_SHIFT), mlp_norm_eps=float(eps))
    return _validated(config, where)


def dit_config_to_diffusers(config: DiTConfig) -> dict[str, Any]:
    """DiTConfig -> a complete DiTTransformer2DModel config; refuses a DiT diffusers would compute differently."""
    if config.context_dim:
        raise LddpmError(f"context_dim={config.context_dim}: a DiT that reads prompts cannot be exported. "
                         "DiTTransformer2DModel has no cross-attention to read prompts; diffusers' Transformer2DModel "
                         "computes this DiT (norm_type ada_norm_zero, cross_attention_dim, caption_channels) but "
                         "from_pretrained loads every ada_norm_zero Transformer2DModel folder as a "
                         "DiTTransformer2DModel, dropping the cross-attention, and PixArtTransformer2DModel is "
                         "another network (one shared adaLN-single); export a text U-Net instead; nothing was "
                         "written")
    if config.freq_shift != DIT_FREQ_SHIFT:
        raise LddpmError(f"freq_shift={config.freq_shift}: diffusers' DiTTransformer2DModel divides its timestep "
                         f"frequencies by 128 - {DIT_FREQ_SHIFT} (fixed in its code), this DiT by 128 - "
                         f"{config.freq_shift}; it would compute something else (train with "
                         f"model.overrides.freq_shift = {DIT_FREQ_SHIFT} to export)")
    if config.mlp_ratio != 4.0:
        raise LddpmError(f"mlp_ratio={config.mlp_ratio}: DiTTransformer2DModel's MLP is always 4 x hidden_size wide")
    if config.num_classes < 1:
        raise LddpmError("num_classes=0: DiTTransformer2DModel is always class-conditional (num_embeds_ada_norm "
                         ">= 1); an unconditional lddpm DiT has no diffusers counterpart")
    out = dict(DIT_DEFAULTS)
    out.update({
        "num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels, "out_channels": config.in_channels * (2 if config.learned_sigma else 1),
        "num_layers": config.depth, "sample_size": config.resolution, "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes, "norm_eps": config.mlp_norm_eps,
    })
    return out


_DIT_EMBEDDING = "transformer_blocks.{}.norm1.emb"  # diffusers' per-block copy of the timestep/class embedding


def dit_module_pairs(config: DiTConfig) -> list[tuple[str, str]]:
    """(lddpm module, DiTTransformer2DModel module); the shared embedding maps onto block 0's copy.

    A text DiT's cross-attention and caption MLP map onto the names of diffusers' Transformer2DModel with
    norm_type "ada_norm_zero" and cross_attention_dim/caption_channels (attn2, caption_projection)."""
    emb = _DIT_EMBEDDING.format(0)
    pairs = [("patch_embed", "pos_embed.proj"), ("time_embed.0", f"{emb}.timestep_embedder.linear_1"),
             ("time_embed.2", f"{emb}.timestep_embedder.linear_2"),
             ("label_embed", f"{emb}.class_embedder.embedding_table"),
             ("final_layer.adaLN", "proj_out_1"), ("final_layer.linear", "proj_out_2")]
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        pairs += [(f"{ours}.attn", f"{theirs}.attn1"), (f"{ours}.adaLN", f"{theirs}.norm1.linear"),
                  (f"{ours}.mlp.0", f"{theirs}.ff.net.0.proj"), (f"{ours}.mlp.2", f"{theirs}.ff.net.2")]
        if config.context_dim:
            pairs.append((f"{ours}.cross_attn", f"{theirs}.attn2"))
    if config.context_dim:
        pairs += [("context_embed.0", "caption_projection.linear_1"),
                  ("context_embed.2", "caption_projection.linear_2")]
    return pairs


def dit_copies(config: DiTConfig) -> list[tuple[str, dict[str, str]]]:
    """For blocks 1..depth-1: (block, {copy name: block 0's name}) of the embedding diffusers repeats per block."""
    names = [f"timestep_embedder.linear_{j}.{k}" for j in (1, 2) for k in ("weight", "bias")]
    names.append("class_embedder.embedding_table.weight")
    first = _DIT_EMBEDDING.format(0)
    return [(f"transformer_blocks.{i}", {f"{_DIT_EMBEDDING.format(i)}.{n}": f"{first}.{n}" for n in names})
            for i in range(1, config.depth)]


# ----------------------------------------------------------------------------- the class table


@dataclass(frozen=True)
class ModelClass:
    """How one diffusers model class maps onto one lddpm network kind."""

    diffusers_name: str
    kind: str  # lddpm.nn registry kind
    config_from_diffusers: Callable[[dict[str, Any], str], Any]
    config_to_diffusers: Callable[[Any], dict[str, Any]]
    module_pairs: Callable[[Any], list[tuple[str, str]]]
    derived: Callable[[Any], dict[str, torch.Tensor]] = lambda config: {}  # lddpm tensors diffusers keeps in its config
    # diffusers tensors that repeat another one: [(where, {copy name: original name})], checked in order on import
    copies: Callable[[Any], list[tuple[str, dict[str, str]]]] = lambda config: []


CLASSES: dict[str, ModelClass] = {
    "UNet2DModel": ModelClass("UNet2DModel", "unet", unet_config_from_diffusers, unet_config_to_diffusers,
                              unet_module_pairs),
    "AutoencoderKL": ModelClass("AutoencoderKL", "vae", vae_config_from_diffusers, vae_config_to_diffusers,
                                vae_module_pairs, _vae_derived),
    "DiTTransformer2DModel": ModelClass("DiTTransformer2DModel", "dit", dit_config_from_diffusers,
                                        dit_config_to_diffusers, dit_module_pairs, copies=dit_copies),
    "UNet2DConditionModel": ModelClass("UNet2DConditionModel", "unet", unet_cond_config_from_diffusers,
                                       unet_cond_config_to_diffusers, unet_module_pairs),
}
# The class each network kind exports as; a text U-Net (context_dim > 0) is a UNet2DConditionModel (export_class).
CLASS_FOR_KIND = {entry.kind: entry for name, entry in CLASSES.items() if name != "UNet2DConditionModel"}


def export_class(kind: str, config: Any) -> ModelClass:
    """The diffusers class a network of this kind and config is written as."""
    if kind == "unet" and getattr(config, "context_dim", 0):
        return CLASSES["UNet2DConditionModel"]
    return CLASS_FOR_KIND[kind]


# Class names of older diffusers releases and the entry they load as (diffusers remaps them the same way).
LEGACY_CLASSES = {"Transformer2DModel": ("DiTTransformer2DModel", "norm_type", "ada_norm_zero")}


def model_class(name: Any, where: str, config: dict[str, Any] | None = None) -> ModelClass:
    """The table entry for a diffusers `_class_name`; an unknown class is refused by name."""
    if name in LEGACY_CLASSES and config is not None:
        target, key, value = LEGACY_CLASSES[name]
        if config.get(key) == value:
            return CLASSES[target]
        raise LddpmError(f"{where}: a {name} with {key} = {json.dumps(config.get(key))} is not a DiT; lddpm imports "
                         f"a {name} only with {key} = {json.dumps(value)} (as a {target}); nothing was written")
    if name not in CLASSES:
        raise LddpmError(f"{where}: diffusers class {name!r} is not supported; lddpm imports "
                         f"{', '.join(CLASSES)}; nothing was written")
    return CLASSES[name]


# ----------------------------------------------------------------------------- weights

# lddpm submodule name -> diffusers name inside a ResBlock / attention pair.
_RENAME = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm", "proj": "to_out.0",
           "to_out": "to_out.0"}
# Attention weights of checkpoints saved before diffusers 0.14 (google/ddpm-*, early SD VAEs).
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def diffusers_names(lddpm_key: str, pairs: list[tuple[str, str]]) -> list[str]:
    """The diffusers tensor name(s) of one lddpm tensor (three for a fused qkv projection)."""
    for ours, theirs in sorted(pairs, key=lambda p: -len(p[0])):
        if lddpm_key.startswith(ours + "."):
            first, _, rest = lddpm_key[len(ours) + 1:].partition(".")
            if first == "qkv":
                return [f"{theirs}.{name}.{rest}" for name in ("to_q", "to_k", "to_v")]
            tail = f"{_RENAME.get(first, first)}.{rest}" if rest else _RENAME.get(first, first)
            return [f"{theirs}.{tail}"]
    raise LddpmError(f"internal: lddpm tensor {lddpm_key} has no diffusers counterpart")


def _legacy_name(name: str) -> str:
    """A pre-0.14 diffusers attention name for `name` (or `name` itself)."""
    for new, old in _LEGACY_ATTENTION.items():
        if f".{new}." in name:
            return name.replace(f".{new}.", f".{old}.")
    return name


def to_diffusers_state(entry: ModelClass, config: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An lddpm state dict -> diffusers tensors (qkv split into to_q/to_k/to_v)."""
    pairs, derived = entry.module_pairs(config), entry.derived(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in derived:
            continue
        names = diffusers_names(key, pairs)
        parts = tensor.chunk(len(names), dim=0) if len(names) > 1 else [tensor]
        for name, part in zip(names, parts):
            out[name] = part.detach().to("cpu").contiguous().clone()
    for _, copies in entry.copies(config):
        for copy, original in copies.items():
            out[copy] = out[original].clone()
    return out


def from_diffusers_state(entry: ModelClass, config: Any, expected: dict[str, torch.Size],
                         tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """diffusers tensors -> an lddpm state dict with exactly the `expected` keys and shapes (float32).

    A missing tensor, a tensor of the wrong shape or a tensor lddpm has no place for is refused
    with its name. Attention weights of either diffusers naming (to_q... or query...) are read.
    """
    pairs, derived = entry.module_pairs(config), entry.derived(config)
    used: set[str] = set()
    for block, copies in entry.copies(config):
        for copy, original in copies.items():
            if copy not in tensors or original not in tensors:
                raise LddpmError(f"{where}: tensor {copy if original in tensors else original} is missing; "
                                 "the weights do not match config.json; nothing was written")
            if tensors[copy].shape != tensors[original].shape or not torch.equal(tensors[copy], tensors[original]):
                raise LddpmError(f"{where}: {block} holds its own copy of the shared embedding, and {copy} differs "
                                 f"from {original}; lddpm's network has one embedding for all blocks, so these "
                                 "weights cannot be represented; nothing was written")
            used.add(copy)
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        if key in derived:
            state[key] = derived[key]
            continue
        parts = []
        for name in diffusers_names(key, pairs):
            found = name if name in tensors else _legacy_name(name)
            if found not in tensors:
                raise LddpmError(f"{where}: tensor {name} is missing (needed for lddpm's {key}); "
                                 "the weights do not match config.json; nothing was written")
            used.add(found)
            parts.append(tensors[found])
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tuple(value.shape) != tuple(shape):
            raise LddpmError(f"{where}: tensor {' + '.join(diffusers_names(key, pairs))} has shape "
                             f"{tuple(value.shape)}, but config.json implies {tuple(shape)} (lddpm's {key}); "
                             "the weights do not match the config; nothing was written")
        state[key] = value.float() if value.is_floating_point() else value
    extra = sorted(set(tensors) - used)
    if extra:
        raise LddpmError(f"{where}: {len(extra)} tensor(s) have no place in lddpm's network, e.g. "
                         f"{', '.join(extra[:3])}; the config does not describe these weights; nothing was written")
    return state


def refuse_pickle(path: Path) -> LddpmError:
    """The error for a pickle weight file: why it is refused and how to convert it."""
    return LddpmError(
        f"{path} is a pickle file ({path.suffix}); lddpm reads only safetensors weights, because loading a "
        "pickle can execute arbitrary code. Download the .safetensors version (e.g. `huggingface-cli download "
        "REPO --include '*.json' '*.safetensors'`) or convert it yourself where you trust the file: "
        "`python -c \"from diffusers import DiffusionPipeline as P; P.from_pretrained('IN', use_safetensors=False)"
        ".save_pretrained('OUT', safe_serialization=True)\"` (for a single model use its class, e.g. "
        "UNet2DModel); nothing was written")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder; pickles are refused, never opened."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LddpmError(f"{index} is not a valid safetensors index ({exc}); nothing was written") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file() or f.suffix != ".safetensors":
                raise LddpmError(f"{index} names {f.name}, which is not a safetensors file here; nothing was written")
        return files
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:
        return variants
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    if len(variants) > 1:
        raise LddpmError(f"{folder} holds several weight variants ({', '.join(p.name for p in variants)}) and no "
                         f"{WEIGHTS_NAME}; keep the one you want; nothing was written")
    raise LddpmError(f"{folder} has no {WEIGHTS_NAME}; nothing was written")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the given safetensors files (safetensors never runs code)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
        except Exception as exc:  # truncated, damaged, or not safetensors at all
            raise LddpmError(f"{path} is not a readable safetensors file ({exc}); nothing was written") from None
    return tensors


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; missing or invalid -> LddpmError naming it."""
    return read_json_object(path, f"a diffusers {what} needs it as a valid JSON object; nothing was written")


# ----------------------------------------------------------------------------- schedulers

_SCHEDULER_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {**_SCHEDULER_COMMON, "variance_type": "fixed_small"},
    "DDIMScheduler": {**_SCHEDULER_COMMON, "set_alpha_to_one": True},
}
_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid_beta"}
# (beta_start, beta_end) that lddpm's schedule of this name uses at T steps.
_LDDPM_BETA_RANGE = {"linear": lambda T: (1e-4 * 1000 / T, 0.02 * 1000 / T), "scaled_linear": lambda T: (0.00085, 0.012),
                     "sigmoid_beta": lambda T: (1e-4, 0.02)}


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def diffusion_from_scheduler(config: dict[str, Any], *, latent: bool, where: str) -> tuple[dict[str, Any], list[str]]:
    """A DDPMScheduler / DDIMScheduler config -> lddpm [diffusion] values, plus notes on sampling-time settings.

    `latent` says whether the model denoises VAE latents (lddpm never clips those) or pixels (always
    clipped to [-1, 1]); clip_sample must agree.
    """
    name = config.get("_class_name")
    if name not in SCHEDULER_DEFAULTS:
        raise LddpmError(f"{where}: scheduler class {name!r} is not supported; lddpm reads "
                         f"{', '.join(SCHEDULER_DEFAULTS)}; nothing was written")
    c = resolve_config(where, config, SCHEDULER_DEFAULTS[name])
    T = c["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise refuse(where, "num_train_timesteps", T, "T must be an integer >= 2")
    if c["prediction_type"] not in _PREDICTION:
        raise refuse(where, "prediction_type", c["prediction_type"], f"supported: {', '.join(_PREDICTION)}")
    if c["thresholding"]:
        raise refuse(where, "thresholding", True, "lddpm clips x0 to [-1, 1]; dynamic thresholding does not exist")
    if c["clip_sample"] != (not latent):
        raise refuse(where, "clip_sample", c["clip_sample"], "lddpm clips predicted x0 for pixel models and never "
                     f"for latent models; this is a {'latent' if latent else 'pixel'} model")
    if c["clip_sample"] and not _close(c["clip_sample_range"], 1.0):
        raise refuse(where, "clip_sample_range", c["clip_sample_range"], "x0 is clipped to [-1, 1]")
    variance = c.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range"):
        raise refuse(where, "variance_type", variance, "supported: fixed_small, fixed_large, learned_range")
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], dtype=np.float64)
        schedule = None
        for candidate in SCHEDULES:
            ours = NoiseSchedule.from_name(candidate, len(betas)).betas.numpy()
            if np.allclose(ours, betas, rtol=1e-6, atol=0.0):
                schedule = candidate
                break
        if schedule is None:
            raise refuse(where, "trained_betas", f"<{len(betas)} values>", "they match none of lddpm's named "
                         f"schedules ({', '.join(SCHEDULES)}) at T = {len(betas)}")
        if len(betas) != T:
            raise refuse(where, "trained_betas", f"<{len(betas)} values>", f"num_train_timesteps is {T}")
    else:
        if c["beta_schedule"] not in _BETA_SCHEDULE:
            raise refuse(where, "beta_schedule", c["beta_schedule"], f"supported: {', '.join(_BETA_SCHEDULE)}")
        schedule = _BETA_SCHEDULE[c["beta_schedule"]]
        if schedule in _LDDPM_BETA_RANGE:
            start, end = _LDDPM_BETA_RANGE[schedule](T)
            for key, ours in (("beta_start", start), ("beta_end", end)):
                if not _close(c[key], ours):
                    raise refuse(where, key, c[key], f"lddpm's {schedule!r} schedule at T = {T} uses {key} = {ours:.6g}")
    diffusion = {"schedule": schedule, "num_timesteps": T, "objective": _PREDICTION[c["prediction_type"]],
                 # DDIMScheduler has no variance_type: None = the model's output channels decide
                 "learned_variance": None if name == "DDIMScheduler" else variance == "learned_range",
                 "rescale_zero_terminal_snr": bool(c["rescale_betas_zero_snr"])}
    notes = []
    if variance.startswith("fixed_large"):
        notes.append("variance_type = fixed_large: lddpm's ddpm sampler uses the 'small' variance (beta_tilde) by "
                     "default; pass variance='large' to lddpm.sampling.sample for Ho et al.'s other choice")
    notes.append(f"timestep_spacing = {c['timestep_spacing']!r}, steps_offset = {c['steps_offset']}: sampling-time "
                 "settings; lddpm picks the spacing when it samples (default 'trailing')")
    if name == "DDIMScheduler" and not c["set_alpha_to_one"]:
        notes.append("set_alpha_to_one = false: lddpm's samplers always end at alpha_bar = 1 (DDIM paper)")
    return diffusion, notes


def scheduler_from_diffusion(diffusion: dict[str, Any], *, latent: bool,
                             scheduler_class: str = "DDPMScheduler") -> dict[str, Any]:
    """lddpm [diffusion] values -> a complete DDPMScheduler (or DDIMScheduler) config with the same betas and
    objective. DDIMScheduler has no variance_type: a learned variance is then known from the model alone."""
    T, schedule = int(diffusion["num_timesteps"]), diffusion["schedule"]
    out = {"_class_name": scheduler_class, "_diffusers_version": DIFFUSERS_VERSION,
           **SCHEDULER_DEFAULTS[scheduler_class]}
    names = {ours: theirs for theirs, ours in _BETA_SCHEDULE.items()}
    if schedule in names:
        out["beta_schedule"] = names[schedule]
        if schedule in _LDDPM_BETA_RANGE:
            out["beta_start"], out["beta_end"] = _LDDPM_BETA_RANGE[schedule](T)
    else:  # no diffusers name (e.g. Chen's sigmoid): write the betas themselves
        out["trained_betas"] = NoiseSchedule.from_name(schedule, T).betas.tolist()
    inverse = {ours: theirs for theirs, ours in _PREDICTION.items()}
    out.update({"num_train_timesteps": T, "prediction_type": inverse[diffusion["objective"]],
                "variance_type": "learned_range" if diffusion.get("learned_variance") else "fixed_small",
                "clip_sample": not latent, "timestep_spacing": "trailing",
                "rescale_betas_zero_snr": bool(diffusion.get("rescale_zero_terminal_snr"))})
    if scheduler_class == "DDIMScheduler":
        del out["variance_type"]
    return out
