"""Conditioning shared by the U-Net and the DiT: timestep, class label and text prompt.

One `Conditioning` module turns a network's (t, y, context) into what its blocks consume. Both networks
register its parts under their historic names (`time_embed`, `label_embed`, and `context_embed` for a
text DiT), so checkpoints and the diffusers converters address the same tensors as before it existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lddpm.errors import LddpmError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim).

    Section 3.5 of Vaswani et al. 2017 as used by Ho et al. 2020; [cos, sin] order as in ADM
    (Dhariwal & Nichol 2021). Frequencies are max_period^(-i / (half - freq_shift)) for i < half.
    Ho et al.'s original code (and its diffusers port) uses [sin, cos] (`flip_sin_to_cos=False`)
    and `freq_shift=1`.
    """
    half = dim // 2
    denominator = half - freq_shift if freq_shift else half
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / denominator)
    args = t.float()[:, None] * freqs[None]
    pair = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(pair if flip_sin_to_cos else pair[::-1], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def class_labels(y, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Labels to embed: y=None means all null (label num_classes); anything outside [0, num_classes] is an error."""
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    y = torch.as_tensor(y, device=device).long().reshape(-1).expand(batch)
    if torch.compiler.is_compiling() or y.device.type == "meta":
        return y
    lo, hi = torch.aminmax(y)
    if lo < 0 or hi > num_classes:
        bad = int(lo) if lo < 0 else int(hi)
        raise LddpmError(f"class label {bad} is outside [0, {num_classes}] "
                         f"(0..{num_classes - 1} are classes, {num_classes} is the null label)")
    return y


class Conditioning(nn.Module):
    """Timestep + class label + text context for a noise predictor: `cond(t, y, context, batch=B)`.

    - Timestep: the sinusoidal embedding of `frequencies` channels (`flip_sin_to_cos`, `freq_shift` as in
      `timestep_embedding`) through an MLP Linear(frequencies, dim) -> SiLU -> Linear(dim, dim) (Ho et al.
      2020; DiT's TimestepEmbedder); the `time_embed` Sequential.
    - Class label: `label_embed`, a table of num_classes + 1 rows, the last the null label of classifier-free
      guidance (Ho & Salimans 2022), added to the timestep embedding; y=None means the null label. A network
      without classes (num_classes = 0) has no table and refuses labels (all-zero labels are accepted as
      "no label").
    - Text: `context` is the text encoder's token states (B, L, context_dim) read by cross-attention. With
      `context_proj_dim` = 0 it passes through unchanged (Stable Diffusion's U-Net); otherwise `context_embed`,
      an MLP Linear(context_dim, proj) -> GELU(tanh) -> Linear(proj, proj), projects it (PixArt-alpha's caption
      embedder). A text network (context_dim > 0) needs a context; any other refuses one.
    - `context_layers` > 0 puts that many trainable pre-LN transformer encoder layers (width context_dim, heads of
      64 channels) over the token states before the projection, `context_refiner`, with zero-initialised output
      projections so that a fresh network reads the encoder's states unchanged. A frozen encoder's states then
      get a trainable stage that can move what a word says ("on the left") onto the word it applies to (a text
      refiner in the manner of GLIDE's trained text transformer and of the refiners of later DiTs).
    - A network trained with its own text encoder (`scratch_vocab`, lddpm.nn.text.ScratchTextEncoder of width
      context_dim, registered as `text_encoder`) also takes the prompts' token ids (B, L) as `context` and
      encodes them itself, so the encoder trains with the network (and under DDP and the EMA with it).

    Returns (SiLU(timestep + label embedding), context): every consumer of the embedding (ResBlock projection,
    adaLN) starts with SiLU, so it is applied once here. The module holds no state besides its parts and
    behaves the same in train and eval mode.
    """

    def __init__(self, *, frequencies: int, dim: int, num_classes: int = 0, context_dim: int = 0,
                 context_proj_dim: int = 0, context_layers: int = 0, flip_sin_to_cos: bool = True,
                 freq_shift: float = 0.0,
                 network: str = "network", scratch_vocab: tuple[str, ...] = (), scratch_max_length: int = 32):
        super().__init__()
        self.frequencies, self.dim = frequencies, dim
        self.num_classes, self.context_dim = num_classes, context_dim
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        self.network = network  # the name used in error messages ("U-Net", "DiT")
        self.time_embed = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_embed = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.context_embed = None
        if context_dim > 0 and context_proj_dim > 0:
            self.context_embed = nn.Sequential(nn.Linear(context_dim, context_proj_dim), nn.GELU(approximate="tanh"),
                                               nn.Linear(context_proj_dim, context_proj_dim))
        self.context_refiner = None
        if context_layers > 0:
            from lddpm.nn.text import refiner_layers
            if context_dim <= 0 or context_dim % 64:
                raise LddpmError(f"context_layers={context_layers} needs a text {network} whose context_dim is a "
                                 f"positive multiple of 64 (heads of 64 channels), got context_dim={context_dim}")
            self.context_refiner = refiner_layers(context_dim, context_dim // 64, context_layers)
        self.text_encoder = None
        if scratch_vocab:
            from lddpm.nn.text import ScratchTextEncoder
            if context_dim <= 0:
                raise LddpmError(f"scratch_vocab is set but context_dim={context_dim}: a {network} with its own text "
                                 "encoder needs context_dim = the encoder's width")
            self.text_encoder = ScratchTextEncoder(list(scratch_vocab), scratch_max_length, dim=context_dim)

    def parts(self) -> dict[str, nn.Module | None]:
        """The submodules under the names a network registers them (None where absent)."""
        return {"time_embed": self.time_embed, "label_embed": self.label_embed, "context_embed": self.context_embed,
                "context_refiner": self.context_refiner, "text_encoder": self.text_encoder}

    def embedding(self, t: torch.Tensor, y, batch: int, device: torch.device) -> torch.Tensor:
        """timestep + label embedding (B, dim), before the SiLU."""
        t = torch.as_tensor(t, device=device).reshape(-1).expand(batch)
        weight = self.time_embed[0].weight
        t_emb = timestep_embedding(t, self.frequencies, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift)
        emb = self.time_embed(t_emb.to(weight.dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels(y, batch, self.num_classes, device))
        elif y is not None and bool((torch.as_tensor(y) != 0).any()):
            raise LddpmError(f"this {self.network} is unconditional (num_classes=0): pass y=None "
                             "(or build it with num_classes > 0)")
        return emb

    def context_states(self, context, batch: int, device: torch.device) -> torch.Tensor | None:
        """The checked (and, with `context_embed`, projected) context (B, L, D) in the network's dtype, or None."""
        if self.context_dim <= 0:
            if context is not None:
                raise LddpmError(f"this {self.network} takes no prompts (context_dim=0): pass context=None "
                                 "(or build it with context_dim = the text encoder's width)")
            return None
        if context is None:
            raise LddpmError(f"this {self.network} takes prompts: pass context, the text encoder's token states "
                             f"(B, L, {self.context_dim}) (the null prompt's states for an unconditional sample)")
        context = torch.as_tensor(context)
        if not context.is_floating_point():
            if self.text_encoder is None:
                raise LddpmError(f"context holds integers (token ids?), but this {self.network} reads token states "
                                 f"(B, L, {self.context_dim}) from a frozen text encoder: encode the prompts first")
            if context.dim() != 2:
                raise LddpmError(f"token ids must have shape (B, L), got {tuple(context.shape)}")
            context = self.text_encoder(context.to(device))
        if context.dim() != 3:
            raise LddpmError(f"context must be the text encoder's token states (B, L, {self.context_dim}), "
                             f"got shape {tuple(context.shape)}")
        if context.shape[-1] != self.context_dim:
            raise LddpmError(f"context has {context.shape[-1]} channels per token, but this {self.network} was built "
                             f"with context_dim={self.context_dim}; encode the prompts with the text encoder it was "
                             "trained with")
        if context.shape[0] not in (1, batch):
            raise LddpmError(f"context holds {context.shape[0]} prompts for a batch of {batch} images; "
                             "pass one per image (or one for all)")
        context = context.to(device=device, dtype=self.time_embed[0].weight.dtype)
        for layer in self.context_refiner or ():  # per prompt row, before one prompt is broadcast to the batch
            context = layer(context, None)
        if self.context_embed is not None:
            context = self.context_embed(context)
        return context.expand(batch, -1, -1)

    def forward(self, t: torch.Tensor, y=None, context=None, *, batch: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(SiLU(embed(t) + embed(y)) (B, dim), context states (B, L, D) or None)."""
        return F.silu(self.embedding(t, y, batch, device)), self.context_states(context, batch, device)


def concat_condition(x: torch.Tensor, cond_image, cond_channels: int, network: str) -> torch.Tensor:
    """x with a task's conditioning image appended as channels, [x, cond_image] (B, C + cond_channels, H, W).

    The image condition of inpainting (mask and masked image, as Stable Diffusion's inpainting U-Net) and
    super-resolution (the upsampled low-resolution image, SR3) enters the network this way; networks
    built with cond_channels = 0 take none.
    """
    if cond_channels <= 0:
        if cond_image is not None:
            raise LddpmError(f"this {network} takes no conditioning image (cond_channels=0): pass cond_image=None "
                             "(or build it with cond_channels for an inpainting or super-resolution task)")
        return x
    if cond_image is None:
        raise LddpmError(f"this {network} was trained for a restoration task: pass cond_image, its "
                         f"{cond_channels} conditioning channels (lddpm.tasks)")
    cond_image = torch.as_tensor(cond_image)
    if cond_image.dim() != 4 or cond_image.shape[1] != cond_channels or cond_image.shape[2:] != x.shape[2:]:
        raise LddpmError(f"cond_image must have shape (B, {cond_channels}, {x.shape[2]}, {x.shape[3]}), got "
                         f"{tuple(cond_image.shape)}")
    if cond_image.shape[0] not in (1, x.shape[0]):
        raise LddpmError(f"cond_image holds {cond_image.shape[0]} images for a batch of {x.shape[0]}")
    cond_image = cond_image.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
    return torch.cat([x, cond_image], dim=1)


def attach(network: nn.Module, conditioning: Conditioning) -> None:
    """Give `network` the conditioning module and register its parts under their historic names.

    The module itself is kept as a plain attribute (not a registered child), so the parts' tensors appear once
    in the network's state dict, as `time_embed.*`, `label_embed.*` and `context_embed.*`, exactly where
    checkpoints written before this module existed put them.
    """
    for name, part in conditioning.parts().items():
        setattr(network, name, part)
    object.__setattr__(network, "conditioning", conditioning)
