"""The Diffusion Transformer noise predictor (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify -> add a fixed 2-D sin-cos position embedding -> N transformer blocks conditioned by
adaLN-Zero on c = embed(t) + embed(y) -> final adaLN layer -> linear -> unpatchify (Section 3.2,
Figure 3 of the paper). With text prompts (context_dim > 0) every block also cross-attends to the
projected token states, between self-attention and MLP, as in PixArt-alpha (Chen et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lddpm.errors import LddpmError
from lddpm.nn.conditioning import Conditioning, attach, concat_condition
from lddpm.nn.layers import CrossAttention, NetworkConfig, run_block, sincos_position_embedding

TIMESTEP_FREQUENCIES = 256  # size of the sinusoidal timestep embedding fed to the MLP (the paper's code)


@dataclass
class DiTConfig(NetworkConfig):
    """Shape of a DiT: input `resolution` x `resolution` x `in_channels`, split into patch_size^2 patches."""

    resolution: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional; else labels 0..num_classes-1 plus the null label num_classes
    learned_sigma: bool = True
    gradient_checkpointing: bool = False
    # Timestep frequencies are 10000^(-i / (128 - freq_shift)): 0 in the paper's code, 1 in diffusers'
    # DiTTransformer2DModel (hard-coded there), so an imported diffusers DiT computes what diffusers computes.
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before each MLP (1e-6 in the paper's code, diffusers' norm_eps)
    context_dim: int = 0  # > 0: text prompts of this width, read by a cross-attention in every block
    # > 0: trainable transformer layers over the text encoder's token states before the network reads them
    # (lddpm.nn.conditioning: `context_refiner`); needs context_dim a multiple of 64. Not part of diffusers' layout.
    context_layers: int = 0
    # text.encoder = "scratch": the vocabulary of the text encoder trained with the network (empty = none) and its
    # token length; the network then also takes token ids as `context` (its width is context_dim).
    scratch_vocab: tuple[str, ...] = ()
    scratch_max_length: int = 32
    cond_channels: int = 0  # > 0: a conditioning image of this many channels, concatenated with x before patchify

    def validate(self) -> None:
        """Raise LddpmError naming the first value that cannot build a network."""
        for name in ("resolution", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise LddpmError(f"DiT {name}={getattr(self, name)} must be a positive integer")
        if self.resolution % self.patch_size:
            raise LddpmError(f"resolution {self.resolution} is not divisible by patch_size={self.patch_size}; "
                             f"choose a patch size dividing {self.resolution}")
        if self.hidden_size % self.num_heads:
            raise LddpmError(f"hidden_size={self.hidden_size} cannot be split into num_heads={self.num_heads} "
                             f"heads; choose a divisor of {self.hidden_size}")
        if self.hidden_size % 4:
            raise LddpmError(f"hidden_size={self.hidden_size} must be a multiple of 4 "
                             "(the 2-D sin-cos position embedding uses a quarter of it per sin/cos and axis)")
        if self.mlp_ratio <= 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise LddpmError(f"mlp_ratio={self.mlp_ratio} must be positive")
        if self.num_classes < 0:
            raise LddpmError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if self.context_dim < 0:
            raise LddpmError(f"context_dim={self.context_dim} must be >= 0 (0 = no text prompts)")
        if self.cond_channels < 0:
            raise LddpmError(f"cond_channels={self.cond_channels} must be >= 0 (0 = no conditioning image)")
        if self.context_layers < 0 or (self.context_layers and not self.context_dim):
            raise LddpmError(f"context_layers={self.context_layers} must be >= 0, and > 0 only with "
                             "context_dim > 0 (the layers refine the text encoder's token states)")
        if not 0 <= self.freq_shift < TIMESTEP_FREQUENCIES // 2 or not self.mlp_norm_eps > 0:
            raise LddpmError(f"freq_shift={self.freq_shift} must be in [0, {TIMESTEP_FREQUENCIES // 2}) and "
                             f"mlp_norm_eps={self.mlp_norm_eps} positive")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample (B, D) shift/scale broadcast over tokens."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Attention(nn.Module):
    """Multi-head self-attention over tokens with one fused qkv projection and SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d_head), scale 1/sqrt(d_head)
        return self.proj(h.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (Section 3.2): shift/scale before, gate after each branch.

    The conditioning Linear starts at zero, so every gate is 0 and the block starts as the identity.
    With `cross_attention`, x += cross_attn(LN(x), context) between self-attention and MLP: unmodulated
    as in PixArt-alpha, after a LayerNorm without affine (eps mlp_norm_eps; the norm2 of diffusers'
    BasicTransformerBlock with adaLN-Zero), q/k/v with biases; its output projection starts at zero.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = 1e-6,
                 cross_attention: bool = False):
        super().__init__()
        self.mlp_norm_eps = mlp_norm_eps
        self.attn = Attention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads, dim, qkv_bias=True) if cross_attention else None
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN = nn.Linear(dim, 6 * dim)  # applied to SiLU(c)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), c (B, D) already through SiLU, context (B, L, D) projected token states -> (B, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN(c).chunk(6, dim=1)
        d = x.shape[-1]
        h = self.attn(modulate(F.layer_norm(x, (d,), eps=1e-6), shift_msa, scale_msa))
        x = torch.addcmul(x, gate_msa[:, None], h)
        if self.cross_attn is not None:
            x = x + self.cross_attn(F.layer_norm(x, (d,), eps=self.mlp_norm_eps), context)
        h = self.mlp(modulate(F.layer_norm(x, (d,), eps=self.mlp_norm_eps), shift_mlp, scale_mlp))
        return torch.addcmul(x, gate_mlp[:, None], h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale; zero-initialised) then a zero-initialised linear to patch_size^2 * C_out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) already through SiLU -> (B, T, out_dim)."""
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer eps/x0/v predictor: `model(x, t, y=None, context=None)`, the same call as the U-Net.

    Class labels use `num_classes + 1` embedding rows, the last being the null label for
    classifier-free guidance; the trainer drops labels by passing it. With `learned_sigma` the
    output has 2C channels (prediction, then the variance interpolation v), for the hybrid loss.
    The position embedding is a fixed buffer (not a parameter, not saved: it follows from the config).
    With `context_dim` > 0 the text encoder's token states (B, L, context_dim) are projected to the hidden
    size by the shared `Conditioning` module's caption MLP and read by a cross-attention in every block.

    Parameter counts (learned sigma, 1000 classes, 32x32x4 input): DiT-XL/2 674,834,720 trainable
    + 294,912 position-embedding values = 675,129,632 as in the paper's code; DiT-S/2 32,963,360.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        dim, p = c.hidden_size, c.patch_size
        self.in_channels = c.in_channels
        self.out_channels = c.in_channels * (2 if c.learned_sigma else 1)
        self.num_classes = c.num_classes
        self.null_label = c.num_classes if c.num_classes > 0 else None
        self.context_dim = c.context_dim
        self.cond_channels = c.cond_channels
        self.resolution = c.resolution
        self.grid_size = c.resolution // p

        self.patch_embed = nn.Conv2d(c.in_channels + c.cond_channels, dim, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_position_embedding(dim, self.grid_size)[None], persistent=False)
        # registers time_embed (Linear(256, dim) -> SiLU -> Linear), label_embed and, for text, context_embed
        attach(self, Conditioning(frequencies=TIMESTEP_FREQUENCIES, dim=dim, num_classes=c.num_classes,
                                  context_dim=c.context_dim, context_proj_dim=dim, context_layers=c.context_layers,
                                  freq_shift=c.freq_shift,
                                  network="DiT", scratch_vocab=c.scratch_vocab,
                                  scratch_max_length=c.scratch_max_length))
        self.blocks = nn.ModuleList(DiTBlock(dim, c.num_heads, c.mlp_ratio, c.mlp_norm_eps, c.context_dim > 0)
                                    for _ in range(c.depth))
        self.final_layer = FinalLayer(dim, p * p * self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The paper's init: Xavier-uniform linears and patch conv, N(0, 0.02) embeddings, adaLN-Zero; for text,
        PixArt-alpha's: N(0, 0.02) caption MLP, zero cross-attention output (and zero refiner outputs)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear over the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        if self.context_embed is not None:
            nn.init.normal_(self.context_embed[0].weight, std=0.02)
            nn.init.normal_(self.context_embed[2].weight, std=0.02)
        zeroed = [*(b.adaLN for b in self.blocks), self.final_layer.adaLN, self.final_layer.linear]
        zeroed += [b.cross_attn.to_out for b in self.blocks if b.cross_attn is not None]
        if self.context_refiner is not None:  # the text refiner starts as the identity
            from lddpm.nn.text import refiner_outputs
            zeroed += refiner_outputs(self.context_refiner)
        for module in zeroed:
            nn.init.zeros_(module.weight)  # adaLN-Zero: gates 0, every block the identity; output 0
            nn.init.zeros_(module.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) tokens -> (B, C, H, W) image; each token's channels are ordered (p_row, p_col, C)."""
        b, g, p, ch = x.shape[0], self.grid_size, self.config.patch_size, self.out_channels
        x = x.view(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, ch, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, cond_image: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps, y (B,) labels or None, context (B, L, context_dim) token states
        (text DiTs only), cond_image (B, cond_channels, H, W) (task DiTs only) -> (B, out_channels, H, W)."""
        b = x.shape[0]
        if tuple(x.shape[1:]) != (self.in_channels, self.resolution, self.resolution):
            raise LddpmError(f"this DiT takes {self.in_channels}x{self.resolution}x{self.resolution} inputs, got "
                             f"{'x'.join(map(str, x.shape[1:]))}; build it with matching in_channels/resolution")
        # c is SiLU(embed(t) + embed(y)): every adaLN Linear starts with SiLU (the paper's code)
        c, context = self.conditioning(t, y, context, batch=b, device=x.device)
        x = concat_condition(x, cond_image, self.cond_channels, "DiT")
        dtype = self.time_embed[0].weight.dtype
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(dtype)  # (B, T, D)
        for block in self.blocks:
            h = run_block(block, h, c, context, checkpointed=self.config.gradient_checkpointing and self.training)
        return self.unpatchify(self.final_layer(h, c))
