"""Generate images from a trained run: `load_pipeline(run)` -> `Pipeline.generate(...)`.

A pipeline is rebuilt from a checkpoint alone (network config, weights, diffusion settings and,
for latent runs, the VAE weights are all inside it). `load_vae` does the same for autoencoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from tqdm import tqdm

from lddpm import seeding
from lddpm.checkpoint import load_checkpoint
from lddpm.config import Config
from lddpm.diffusion import build_diffusion
from lddpm.distributed import use_bf16
from lddpm.errors import LddpmError
from lddpm.nn import network_from_config
from lddpm.sampling import check_sampler_options, is_stochastic, sample


def bf16_network(model: nn.Module, device_type: str):
    """`model` called under bf16 autocast, its output returned as float32.

    Only the network runs in bf16 (its convolutions and matmuls); the sampler's update arithmetic,
    guidance mixing and the VAE decoder stay in float32.
    """
    def forward(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model(x, t, **kwargs).float()

    return forward


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class PromptStates:
    """A text encoder's states looked up from a table (prompts encoded once, e.g. a run's captions)."""

    def __init__(self, texts: Sequence[str], states: torch.Tensor):
        self.index = {text: i for i, text in enumerate(texts)}
        self.states = states
        self.dim, self.max_length = int(states.shape[-1]), int(states.shape[1])

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """float32 (B, L, D) states of prompts that are in the table."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise LddpmError(f"prompt {missing[0]!r} is not among the encoded captions")
        return self.states[torch.tensor([self.index[p] for p in prompts], dtype=torch.long)].float()


class Pipeline:
    """A denoiser, its diffusion, (for latent runs) the VAE that decodes its samples, and (for text runs)
    the text encoder that turns prompts into the token states the network attends to."""

    def __init__(self, model: nn.Module, diffusion, *, vae: nn.Module | None = None, config: Config | None = None,
                 dataset: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 checkpoint: str | None = None, step: int | None = None, bf16: bool | str = False,
                 text_encoder: Any = None):
        self.model, self.diffusion, self.vae = model, diffusion, vae
        self.context_dim: int = int(getattr(model, "context_dim", 0) or 0)
        self.text_encoder = text_encoder  # .encode(list[str]) -> (B, L, D); needed when context_dim > 0
        self._null_states: dict[str, torch.Tensor] = {}  # "" or a negative prompt -> its states (1, L, D)
        self.config = config
        self.dataset_info = dict(dataset or {})
        self.device = torch.device(device)
        self.checkpoint, self.step = checkpoint, step
        self.bf16: bool = use_bf16(bf16, self.device)  # network forward under bf16 autocast ("auto": native bf16 only)
        self.num_classes: int = int(getattr(model, "num_classes", 0) or 0)
        self.null_label: int | None = getattr(model, "null_label", None) if self.num_classes else None
        names = self.dataset_info.get("class_names") or []
        self.class_names: list[str] = list(names) if self.num_classes else []
        self.dataset: str | None = self.dataset_info.get("name")
        self.channels: int = int(self.dataset_info.get("channels") or getattr(vae or model, "in_channels", 3))
        model_res = int(getattr(getattr(model, "config", None), "resolution", 0) or 0)
        self.resolution: int = int(self.dataset_info.get("resolution")
                                   or (model_res * vae.downsample_factor if vae is not None else model_res))
        self.latent_shape = (int(model.in_channels), model_res, model_res)

    def __repr__(self) -> str:
        kind = "latent" if self.vae is not None else "pixel"
        return (f"Pipeline({kind}, {self.dataset}, {self.resolution}px x{self.channels}, "
                f"classes={self.num_classes}, step={self.step})")

    def _labels(self, num: int, labels) -> np.ndarray | None:
        if self.context_dim and labels is not None:
            raise LddpmError("this model takes prompts, not class labels (use --prompt / prompts=[...])")
        if labels is None:
            return np.arange(num, dtype=np.int64) % self.num_classes if self.num_classes else None
        if not self.num_classes:
            raise LddpmError("this model is unconditional: it takes no class labels (drop --class / labels)")
        labels = np.full(num, labels, np.int64) if np.ndim(labels) == 0 else np.asarray(labels, np.int64)
        if labels.shape != (num,):
            raise LddpmError(f"got {labels.size} labels for {num} images")
        if labels.min(initial=0) < 0 or labels.max(initial=0) > self.num_classes:
            raise LddpmError(f"labels must lie in 0..{self.num_classes - 1} (or {self.num_classes}, the null label)")
        return labels

    def class_index(self, name: str) -> int:
        """Index of a class by name (case-insensitive); unknown name -> LddpmError listing them."""
        lowered = [c.lower() for c in self.class_names]
        if name.lower() not in lowered:
            raise LddpmError(f"unknown class {name!r}; classes: {', '.join(self.class_names) or '(none)'}")
        return lowered.index(name.lower())

    def prompt_states(self, num: int, prompts, negative_prompt: str | None) -> tuple[torch.Tensor | None,
                                                                                     torch.Tensor | None]:
        """(context (num, L, D), null context (1, L, D)) for a text model; (None, None) for others.

        The null branch of guidance is the encoding of "" (Stable Diffusion's convention, the
        prompt the model saw under caption dropout) or of `negative_prompt`, which replaces it.
        """
        if not self.context_dim:
            if prompts is not None or negative_prompt is not None:
                raise LddpmError("this model was not trained on prompts: it takes no prompt "
                                 + ("(it takes class labels: use --class / labels)" if self.num_classes else
                                    "(it is unconditional)"))
            return None, None
        if prompts is None:
            raise LddpmError("this model generates from prompts: give one (--prompt TEXT / --prompts FILE, "
                             "prompts=[...])")
        prompts = [prompts] * num if isinstance(prompts, str) else list(prompts)
        if len(prompts) != num:
            raise LddpmError(f"got {len(prompts)} prompts for {num} images")
        for p in prompts + ([negative_prompt] if negative_prompt is not None else []):
            if not isinstance(p, str):
                raise LddpmError(f"a prompt must be text, got {p!r}")
        if any(not p.strip() for p in prompts):
            raise LddpmError("an empty prompt asks for nothing (\"\" is the null prompt of guidance); write what "
                             "to draw, or use guidance_scale=0 for unconditional samples")
        if self.text_encoder is None:
            raise LddpmError("this pipeline has no text encoder; load it with lddpm.load_pipeline(run)")
        row_of = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        states = self.text_encoder.encode(list(row_of)).float()
        rows = torch.tensor([row_of[p] for p in prompts], dtype=torch.long)
        null_prompt = negative_prompt or ""
        if null_prompt not in self._null_states:  # encoded once per pipeline: evaluation calls this per batch
            self._null_states[null_prompt] = self.text_encoder.encode([null_prompt]).float().to(self.device)
        return states[rows].to(self.device), self._null_states[null_prompt]

    @torch.no_grad()
    def generate(self, num: int, *, sampler: str = "ddim", num_steps: int | None = None, eta: float = 0.0,
                 guidance_scale: float = 1.0, labels: int | Sequence[int] | np.ndarray | None = None, seed: int = 0,
                 batch_size: int = 64, progress: bool | Callable[[dict[str, Any]], Any] = True,
                 prompts: str | Sequence[str] | None = None, negative_prompt: str | None = None,
                 sampler_options: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample `num` images -> (uint8 (N, H, W, C), int64 labels or None).

        Conditional models get `labels` (default: classes in turn, 0, 1, ..., so counts are
        balanced); text models get `prompts` (one per image, or one for all) and optionally a
        `negative_prompt` that replaces the null prompt in guidance. The starting noise of image i depends only on (seed, i), and so does the noise a
        stochastic sampler draws at each step (one generator per image): samples do not depend on
        batch_size. Latent samples are divided by the VAE's scaling factor and decoded.
        `progress` is True (a bar), False, or a callback that every sampler step calls with its state
        (lddpm.sampling's: i, total, t, x, denoised; latents for latent runs) plus the batch's place:
        start (its first image), batch (its size) and num. `sampler_options`: the step grid, sigma_min,
        epsilon scaling, churn, order (`lddpm.sampling.sample`, docs/samplers.md).
        """
        stochastic = is_stochastic(sampler, eta, sampler_options)     # also rejects an unknown sampler or a bad eta
        check_sampler_options(sampler, sampler_options)
        if num < 0 or batch_size < 1:
            raise LddpmError(f"num ({num}) must be >= 0 and batch_size ({batch_size}) >= 1")
        labels = self._labels(num, labels)
        context, null_context = self.prompt_states(num, prompts, negative_prompt)
        x_T = torch.randn((num, *self.latent_shape), generator=torch.Generator().manual_seed(int(seed)))
        outputs = []
        self.model.eval()
        network = bf16_network(self.model, self.device.type) if self.bf16 else self.model
        callback = progress if callable(progress) else None
        with tqdm(total=num, unit="img", desc=f"sample {sampler}", disable=callback is not None or not progress) as bar:
            for start in range(0, num, batch_size):
                xb = x_T[start:start + batch_size].to(self.device)
                yb = torch.from_numpy(labels[start:start + batch_size]).to(self.device) if labels is not None else None
                cb = context[start:start + batch_size] if context is not None else None
                generator = ([seeding.generator(seeding.image_seed(int(seed), i), self.device)
                              for i in range(start, start + len(xb))] if stochastic else None)
                steps = (lambda state, start=start, n=len(xb): callback({**state, "start": start, "batch": n, "num": num})
                         ) if callback is not None else False
                x = sample(network, self.diffusion, tuple(xb.shape), sampler=sampler, num_steps=num_steps, eta=eta,
                           clip_x0=self.vae is None, y=yb, guidance_scale=guidance_scale, null_label=self.null_label,
                           context=cb, null_context=null_context, generator=generator, x_T=xb, device=self.device, progress=steps,
                           sampler_options=sampler_options)
                if self.vae is not None:
                    x = self.vae.decode(x.float() / self.vae.scaling_factor)
                outputs.append(to_uint8(x))
                bar.update(len(xb))
        images = np.concatenate(outputs) if outputs else np.zeros((0, self.resolution, self.resolution, self.channels), np.uint8)
        return images, labels


def load_vae(run_or_checkpoint: str | Path, device: str | torch.device = "cpu", *, use_ema: bool = True) -> nn.Module:
    """The autoencoder of a VAE run (EMA weights by default) or the one stored in a latent-diffusion checkpoint.

    A latent-diffusion checkpoint stores the weights its latents were encoded with (the VAE run's EMA
    weights unless it was trained otherwise). Returned in eval mode, without gradients.
    """
    ckpt = load_checkpoint(run_or_checkpoint)
    kind = ckpt.meta.get("kind")
    if kind == "vae":
        vae = network_from_config("vae", ckpt.meta["network"]["config"])
        vae.load_state_dict(ckpt.load("ema" if use_ema else "model"))
    elif kind == "diffusion" and "vae" in ckpt.groups:
        vae = network_from_config("vae", ckpt.meta["vae"]["network_config"])
        vae.load_state_dict(ckpt.load("vae"))
    else:
        raise LddpmError(f"{ckpt.path} holds no autoencoder (a {kind!r} checkpoint); give a VAE run (lddpm train-vae)")
    return vae.to(device).eval().requires_grad_(False)


def load_pipeline(run_or_checkpoint: str | Path, device: str | torch.device = "cpu", *, use_ema: bool = True,
                  bf16: bool | str = False, channels_last: bool = True) -> Pipeline:
    """Rebuild a diffusion run's sampler from its checkpoint alone (EMA weights by default).

    `bf16` (true, false or "auto": where the device has native bf16) runs the network under bf16
    autocast when sampling; on a CPU with AMX this about doubles the sampling speed.
    `channels_last` runs a U-Net in the channels-last memory format whatever it was trained in (the
    same weights and arithmetic; benchmarks/bf16_sampling.py: its forward pass is faster on CPU, in
    fp32 and more so under bf16 autocast); other networks ignore it.
    """
    ckpt = load_checkpoint(run_or_checkpoint)
    meta = ckpt.meta
    if meta.get("kind") != "diffusion":
        raise LddpmError(f"{ckpt.path} is a {meta.get('kind')!r} checkpoint, not a diffusion model "
                         "(use lddpm.pipeline.load_vae for autoencoders)")
    device = torch.device(device)
    network = dict(meta["network"]["config"])
    if meta["network"]["kind"] == "unet" and channels_last:
        network["channels_last"] = True
    model = network_from_config(meta["network"]["kind"], network)
    try:
        model.load_state_dict(ckpt.load("ema" if use_ema else "model"))
    except RuntimeError as exc:
        raise LddpmError(f"{ckpt.path}: the weights do not fit the network recorded in it ({exc})") from None
    model = model.to(device).eval().requires_grad_(False)
    vae = load_vae(ckpt.path, device) if "vae" in ckpt.groups else None
    config = Config.from_dict(meta["config"], source=str(ckpt.path))
    text_encoder = None
    if meta.get("text"):    # a scratch encoder trained with the network is part of it (EMA weights included)
        text_encoder = (model.conditioning.text_encoder if meta["text"].get("encoder") == "scratch"
                        else load_run_text_encoder(meta, device, str(ckpt.path)))
    return Pipeline(model, build_diffusion(config.diffusion), vae=vae, config=config, dataset=meta.get("dataset"),
                    device=device, checkpoint=str(ckpt.path), step=int(meta["step"]), bf16=bf16,
                    text_encoder=text_encoder)


def load_run_text_encoder(meta: dict[str, Any], device, where: str):
    """The frozen text encoder a text run was trained with, checked against the identity in its checkpoint."""
    from lddpm.nn.text import load_text_encoder

    text = meta["text"]
    encoder = load_text_encoder(text["encoder"], int(text["max_length"]), device=device)
    saved, now = text.get("identity") or {}, encoder.identity()
    changed = [k for k in ("weights_sha256", "tokenizer_sha256", "max_length") if saved.get(k) != now.get(k)]
    if changed:
        raise LddpmError(f"{where} was trained with the text encoder {text['encoder']!r} whose "
                         f"{', '.join(changed)} differ from the one installed here; install the encoder it was "
                         "trained with (its identity is in the checkpoint's meta.text)")
    return encoder
