"""The DDPM / ADM U-Net noise predictor (Ho et al. 2020; Dhariwal & Nichol 2021) with class labels for CFG and,
optionally, text prompts through Stable Diffusion's cross-attention transformers (Rombach et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lddpm.errors import LddpmError
from lddpm.nn.conditioning import Conditioning, attach, concat_condition
from lddpm.nn.layers import (AttentionBlock, Downsample, EmbedSequential, GroupNorm, NetworkConfig, ResBlock,
                             SpatialTransformer, Upsample, run_block, zero_module)


@dataclass
class UNetConfig(NetworkConfig):
    """Shape of a U-Net. Attention resolutions are feature-map sizes in pixels (e.g. 16 for 16x16)."""

    resolution: int = 32
    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    num_heads: int = 1
    num_head_channels: int = -1  # > 0 overrides num_heads: heads = channels // num_head_channels
    dropout: float = 0.1
    norm_groups: int = 32
    num_classes: int = 0  # 0 = unconditional; else labels 0..num_classes-1 plus the null label num_classes
    learned_sigma: bool = False
    use_scale_shift_norm: bool = False
    gradient_checkpointing: bool = False
    channels_last: bool = False
    # Options of published checkpoints (the diffusers port of Ho et al.'s CIFAR-10 model uses
    # flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6); the defaults are ADM's.
    flip_sin_to_cos: bool = True  # timestep embedding order: [cos, sin] (True) or [sin, cos]
    freq_shift: float = 0.0  # frequencies max_period^(-i / (half - freq_shift))
    downsample_padding: int = 1  # 1: pad every side; 0: pad right/bottom only (TensorFlow "SAME")
    norm_eps: float = 1e-5  # GroupNorm epsilon
    # Text prompts: > 0 = the text encoder's width; every attention block (attention_resolutions and the middle)
    # is then a spatial transformer with `transformer_depth` blocks of self-attention, cross-attention, GEGLU FF.
    context_dim: int = 0
    transformer_depth: int = 1
    # > 0: trainable transformer layers over the text encoder's token states before the network reads them
    # (lddpm.nn.conditioning: `context_refiner`); needs context_dim a multiple of 64. Not part of diffusers' layout.
    context_layers: int = 0
    # text.encoder = "scratch": the vocabulary of the text encoder trained with the network (empty = none) and its
    # token length; the network then also takes token ids as `context` (its width is context_dim).
    scratch_vocab: tuple[str, ...] = ()
    scratch_max_length: int = 32
    # Fixed 2-D sin-cos positions added to the spatial transformers' tokens (not part of diffusers' layout):
    # tells cross-attention where each token is, for prompts that place things ("on the left").
    transformer_pos_embed: bool = False
    # Restoration tasks (lddpm.tasks): > 0 = extra input channels (a mask and masked image, or an upsampled
    # low-resolution image) concatenated with x before the first conv; the output keeps in_channels.
    cond_channels: int = 0

    def level_resolutions(self) -> list[int]:
        """Feature-map size at each level of the encoder."""
        return [self.resolution // 2**i for i in range(len(self.channel_mult))]

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a block with `channels` channels."""
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads

    def validate(self) -> None:
        """Raise LddpmError naming the first value that cannot build a network."""
        if not self.channel_mult or any(int(m) < 1 for m in self.channel_mult):
            raise LddpmError(f"channel_mult {self.channel_mult} must be a non-empty list of positive integers")
        for name in ("resolution", "in_channels", "model_channels", "num_res_blocks", "norm_groups", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise LddpmError(f"UNet {name}={getattr(self, name)} must be a positive integer")
        if self.num_classes < 0:
            raise LddpmError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not 0.0 <= self.dropout < 1.0:
            raise LddpmError(f"dropout={self.dropout} must be in [0, 1)")
        if self.cond_channels < 0:
            raise LddpmError(f"cond_channels={self.cond_channels} must be >= 0 (0 = no conditioning image)")
        if self.context_dim < 0 or self.transformer_depth < 1:
            raise LddpmError(f"context_dim={self.context_dim} must be >= 0 (0 = no text prompts) and "
                             f"transformer_depth={self.transformer_depth} >= 1")
        if self.context_layers < 0 or (self.context_layers and not self.context_dim):
            raise LddpmError(f"context_layers={self.context_layers} must be >= 0, and > 0 only with "
                             "context_dim > 0 (the layers refine the text encoder's token states)")
        if self.transformer_pos_embed and not self.context_dim:
            raise LddpmError("transformer_pos_embed = true needs context_dim > 0 (it applies to the spatial "
                             "transformers of a U-Net that reads prompts)")
        if self.context_dim and not (self.attention_resolutions or self.mid_attention):
            raise LddpmError(f"context_dim={self.context_dim} but this U-Net has no attention block to read the "
                             "prompt: set attention_resolutions or mid_attention = true")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.resolution % factor:
            raise LddpmError(f"resolution {self.resolution} is not divisible by the total downsampling {factor} "
                             f"of channel_mult {tuple(self.channel_mult)}; use a multiple of {factor}")
        levels = self.level_resolutions()
        for r in self.attention_resolutions:
            if r not in levels:
                raise LddpmError(f"attention resolution {r} is never reached by this U-Net "
                                 f"(resolution {self.resolution}, feature maps {levels}); choose from {levels}")
        attn_channels = [self.model_channels * m for m, r in zip(self.channel_mult, levels)
                         if r in self.attention_resolutions]
        if self.mid_attention:
            attn_channels.append(self.model_channels * self.channel_mult[-1])
        for c in [self.model_channels] + [self.model_channels * m for m in self.channel_mult]:
            if c % self.norm_groups:
                raise LddpmError(f"{c} channels are not divisible by norm_groups={self.norm_groups}; "
                                 f"choose norm_groups dividing {self.model_channels}")
        for c in attn_channels:
            if self.num_head_channels > 0 and c % self.num_head_channels:
                raise LddpmError(f"attention over {c} channels cannot be split into heads of "
                                 f"num_head_channels={self.num_head_channels}; choose a divisor of {c}")
            if self.num_head_channels <= 0 and c % self.num_heads:
                raise LddpmError(f"attention over {c} channels cannot be split into num_heads={self.num_heads} "
                                 f"heads; choose a divisor of {c}")


class UNet(nn.Module):
    """U-Net eps/x0/v predictor: `model(x, t, y=None, context=None)`.

    Encoder of ResBlocks (+ attention at `attention_resolutions`) and stride-2 downsampling, a
    middle ResBlock-attention-ResBlock, and a decoder with one more ResBlock per level fed by
    skip connections, as in Ho et al. 2020 (Appendix B) and Dhariwal & Nichol 2021. Class labels
    are embedded with `num_classes + 1` rows, the last being the null label used for classifier-free
    guidance (Ho & Salimans 2022); the label embedding is added to the timestep embedding. With
    `context_dim` > 0 each attention block is a spatial transformer whose cross-attention reads the
    text encoder's token states `context` (B, L, context_dim), as in Stable Diffusion 2 (linear
    projections); timestep, label and context go through the shared `Conditioning` module.

    Parameter counts of the named configs (lddpm.nn.registry): ddpm-cifar10 35,746,307 (Ho et al.'s
    exact count), adm-imagenet128 386,045,190 (1000 classes, learned sigma), tiny 1,113,955,
    small 4,636,611 (the last two at 32x32x3, unconditional); tiny at 32x32x1 with context_dim=384
    (MiniLM token states) 1,575,393, the count of diffusers' UNet2DConditionModel of that shape.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        ch = c.model_channels
        emb_dim = 4 * ch
        self.in_channels = c.in_channels
        self.out_channels = c.in_channels * (2 if c.learned_sigma else 1)
        self.num_classes = c.num_classes
        self.null_label = c.num_classes if c.num_classes > 0 else None
        self.context_dim = c.context_dim
        self.cond_channels = c.cond_channels
        self.resolution = c.resolution

        # registers time_embed (Linear(ch, 4ch) -> SiLU -> Linear) and label_embed, as before the shared module
        attach(self, Conditioning(frequencies=ch, dim=emb_dim, num_classes=c.num_classes, context_dim=c.context_dim,
                                  context_layers=c.context_layers, flip_sin_to_cos=c.flip_sin_to_cos,
                                  freq_shift=c.freq_shift, network="U-Net",
                                  scratch_vocab=c.scratch_vocab, scratch_max_length=c.scratch_max_length))
        block = dict(dropout=c.dropout, norm_groups=c.norm_groups, scale_shift=c.use_scale_shift_norm, eps=c.norm_eps)

        def attention(channels: int) -> nn.Module:
            if c.context_dim:
                return SpatialTransformer(channels, c.heads_for(channels), c.context_dim, depth=c.transformer_depth,
                                          norm_groups=c.norm_groups, pos_embed=c.transformer_pos_embed)
            return AttentionBlock(channels, c.heads_for(channels), norm_groups=c.norm_groups, eps=c.norm_eps)

        self.conv_in = nn.Conv2d(c.in_channels + c.cond_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur, res = ch, c.resolution
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(cur, ch * mult, emb_dim, **block)]
                cur = ch * mult
                if res in c.attention_resolutions:
                    layers.append(attention(cur))
                self.down.append(EmbedSequential(layers))
                skip_channels.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(EmbedSequential([Downsample(cur, c.downsample_padding)]))
                skip_channels.append(cur)
                res //= 2

        mid = [ResBlock(cur, cur, emb_dim, **block)]
        if c.mid_attention:
            mid.append(attention(cur))
        mid.append(ResBlock(cur, cur, emb_dim, **block))
        self.mid = EmbedSequential(mid)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(cur + skip_channels.pop(), ch * mult, emb_dim, **block)]
                cur = ch * mult
                if res in c.attention_resolutions:
                    layers.append(attention(cur))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(cur))
                    res *= 2
                self.up.append(EmbedSequential(layers))

        self.norm_out = GroupNorm(c.norm_groups, cur, eps=c.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(cur, self.out_channels, 3, padding=1))
        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Apply one block (with activation checkpointing when configured)."""
        return run_block(block, h, emb, context, checkpointed=self.config.gradient_checkpointing and self.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, cond_image: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps, y (B,) labels or None, context (B, L, context_dim) token states
        (text U-Nets only), cond_image (B, cond_channels, H, W) (task U-Nets only) -> (B, out_channels, H, W)."""
        # emb is SiLU(embed(t) + embed(y)): every ResBlock starts its embedding projection with SiLU
        emb, context = self.conditioning(t, y, context, batch=x.shape[0], device=x.device)
        x = concat_condition(x, cond_image, self.cond_channels, "U-Net")
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.mid, h, emb, context)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.conv_out(F.silu(self.norm_out(h)))
