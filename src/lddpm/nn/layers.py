"""Building blocks shared by the U-Net, the DiT and the autoencoder: ResBlock, attention, the spatial transformer
(self- and cross-attention to a text context), up/down. Timestep and label embeddings: lddpm.nn.conditioning."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lddpm import checks
from lddpm.errors import LddpmError


def run_block(block: nn.Module, h: torch.Tensor, *cond, checkpointed: bool) -> torch.Tensor:
    """block(h, *cond); with `checkpointed` (and gradients on) its activations are recomputed in backward."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, h, *cond, use_reentrant=False)
    return block(h, *cond)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that routes the input layouts PyTorch's CPU kernel handles slowly through a faster one.

    PyTorch's CPU kernel for channels-last bfloat16 input is several times slower than its contiguous
    kernel on small feature maps with few channels per group (measured with torch 2.13 on 2 cores:
    4-9x at 8x8 and 16x16 with 4-12 channels per group, the tiny U-Net's inner levels; on par at 32x32
    or with 16 or more channels per group). Such inputs are normalised in contiguous layout and handed
    back channels-last: the same arithmetic in the other kernel. Everything else is nn.GroupNorm as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.dim() == 4 and x.device.type == "cpu"
                and x.shape[-1] * x.shape[-2] <= 256 and self.num_channels // self.num_groups < 16
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (ADM's init for the last layer of each residual branch)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv, timestep injection, GroupNorm-SiLU-dropout-conv, skip.

    The timestep embedding is added after the first conv (Ho et al. 2020), or, with
    `scale_shift=True`, applied as adaptive group norm h = norm(h) * (1 + s) + b
    (AdaGN, Section 3 of Dhariwal & Nichol 2021). `emb_dim=None` gives the unconditioned block of
    the autoencoder. The block expects an embedding that already went through SiLU. With
    `zero_init` the last conv starts at zero, so the block starts as the identity (ADM).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int | None, *, dropout: float = 0.0,
                 norm_groups: int = 32, scale_shift: bool = False, zero_init: bool = True, eps: float = 1e-5):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm(norm_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = None
        if emb_dim is not None:
            self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = GroupNorm(norm_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, H, W), emb (B, emb_dim) already activated -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            e = self.emb_proj(emb)[:, :, None, None]
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))
            else:
                h = F.silu(self.norm2(h + e))
        else:
            h = F.silu(self.norm2(h))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-GroupNorm, residual, zero-initialised output.

    Uses `F.scaled_dot_product_attention` (the fused kernel where the backend has one).
    """

    def __init__(self, channels: int, num_heads: int = 1, *, norm_groups: int = 32, zero_init: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(norm_groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        if zero_init:
            zero_module(self.proj)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) -> x + attention(x); `emb` is ignored (uniform block signature)."""
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.num_heads, c // self.num_heads)).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d)
        h = self.proj(h.transpose(1, 2).flatten(2))  # (B, L, C)
        return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x to a context's tokens (to itself when context is None), with SDPA.

    Separate `to_q`, `to_k`, `to_v` projections (bias only with `qkv_bias`) and an output projection `to_out`
    with bias: the layout of diffusers' Attention. No mask and no position information on the keys, so
    permuting the context's tokens leaves the output unchanged.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, *, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) or None -> (B, N, dim)."""
        source = x if context is None else context
        q, k, v = (proj(h).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj, h in ((self.to_q, x), (self.to_k, source), (self.to_v, source)))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d_head), scale 1/sqrt(d_head)
        return self.to_out(h.transpose(1, 2).flatten(2))


class GEGLUFeedForward(nn.Module):
    """Linear(dim, 2 x inner) -> hidden * GELU(gate) -> Linear(inner, dim), inner = mult x dim.

    GEGLU (Shazeer 2020) as in Stable Diffusion: the first half of the projection is the value, the second
    the gate, exact (erf) GELU.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        hidden, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(hidden * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block with cross-attention (Stable Diffusion's BasicTransformerBlock):
    x += attn1(LN(x)); x += attn2(LN(x), context); x += FF(LN(x)), LayerNorm eps 1e-5 with affine."""

    def __init__(self, dim: int, num_heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = CrossAttention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def sincos_position_embedding(dim: int, grid_size: int, cols: int | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (rows * cols, dim), row-major over the grid (cols = rows by default).

    The first dim/2 channels encode the column, the last dim/2 the row, each as [sin, cos] of
    pos * 10000^(-i / (dim/4)) (ViT/MAE's 2-D version of Vaswani et al. 2017, as in DiT's code).
    """
    cols = grid_size if cols is None else cols
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(n: int) -> torch.Tensor:
        a = torch.outer(torch.arange(n, dtype=torch.float64), freqs)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)  # (n, dim/2)

    rows = axis(grid_size)[:, None, :].expand(grid_size, cols, dim // 2)
    colv = axis(cols)[None, :, :].expand(grid_size, cols, dim // 2)
    return torch.cat([colv, rows], dim=-1).reshape(grid_size * cols, dim).float()


def position_table(dim: int, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """sincos_position_embedding (1, rows * cols, dim) padded to `dim` channels, on like's device and dtype."""
    table = sincos_position_embedding(dim - dim % 4, rows, cols)
    table = torch.nn.functional.pad(table, (0, dim % 4))
    return table[None].to(device=like.device, dtype=like.dtype)


class SpatialTransformer(nn.Module):
    """Stable Diffusion's spatial transformer over the H*W positions of a feature map, linear projections.

    GroupNorm (eps 1e-6, affine) -> proj_in Linear -> `depth` TransformerBlocks reading `context` ->
    proj_out Linear (zero-initialised, so the block starts as the identity) -> + input. The layout of
    diffusers' Transformer2DModel inside UNet2DConditionModel with use_linear_projection=True (SD 2).
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int, *, depth: int = 1, norm_groups: int = 32,
                 zero_init: bool = True, pos_embed: bool = False):
        super().__init__()
        self.pos_embed = pos_embed
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim)
                                                for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), context (B, L, context_dim) -> x + transformer(x); `emb` is ignored.

        With pos_embed the tokens get fixed 2-D sin-cos positions after proj_in (not in diffusers' layout), so
        that cross-attention can tie a phrase like "on the left" to where a token is.
        """
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c))  # (B, L, C)
        if self.pos_embed:
            h = h + position_table(c, hgt, wid, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    `padding=1` pads one pixel on every side; `padding=0` pads one pixel on the right and bottom
    only, as Ho et al.'s TensorFlow code ("SAME" padding) and LDM's autoencoder do.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise LddpmError(f"downsample padding must be 0 (right/bottom only) or 1 (every side), got {padding!r}")
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """A list of blocks applied in order, each called as block(x, emb) (a SpatialTransformer also gets context)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Run every block on x with the same embedding (and text context)."""
        for block in self:
            x = block(x, emb, context) if isinstance(block, SpatialTransformer) else block(x, emb)
        return x


class NetworkConfig:
    """Mixin for network config dataclasses: JSON-friendly `to_dict()` and strict `from_dict()`.

    `fitted_fields` names fields a training run measures at its end (not part of the network's shape):
    resuming a finished run for more steps ignores them.
    """

    fitted_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        """All fields as plain Python values (tuples become lists) for JSON."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild from `to_dict()` output; an unknown key raises LddpmError naming it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise LddpmError(f"unknown {cls.__name__} field(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(fields)}")
        hints = checks.field_hints(cls)
        for key, value in d.items():
            checks.check_type(f"{cls.__name__} field {key}", hints[key], value,
                              f" (check model.overrides.{key} in the config or the checkpoint's network config)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **overrides):
        """A copy with some fields changed; an unknown field raises LddpmError naming it."""
        d = self.to_dict()
        d.update(overrides)
        return type(self).from_dict(d)
