"""Generate images from a trained run: `load_pipeline(run)` -> `Pipeline.generate(...)`; edit and restore
images with it: `Pipeline.edit` (SDEdit), `inpaint` (RePaint or an inpainting network), `upscale` (SR3),
`denoise` (lddpm.editing).

A pipeline is rebuilt from a checkpoint alone (network config, weights, diffusion settings, the task the
network was trained for and, for latent runs, the VAE weights are all inside it). `load_vae` does the same
for autoencoders.
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
from lddpm import editing
from lddpm.errors import LddpmError
from lddpm.nn import network_from_config
from lddpm.sampling import SamplingSpec, is_stochastic, resolve_spec, sample
from lddpm.solvers import SamplerOptions
from lddpm.tasks import TASKS, inpaint_condition


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
                 text_encoder: Any = None, task: dict[str, Any] | None = None):
        self.model, self.diffusion, self.vae = model, diffusion, vae
        # what the network was trained for (lddpm.tasks): "generate", "inpaint" or "super-resolution"
        self.task: dict[str, Any] = dict(task or {"kind": "generate"})
        if self.task.get("kind") not in TASKS:
            raise LddpmError(f"unknown task {self.task.get('kind')!r} in {checkpoint or 'the pipeline'}; "
                             f"known: {', '.join(TASKS)}")
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
        self.guide: nn.Module | None = None     # autoguidance's guide network (set_guide)
        self.guide_source: str | None = None     # what set_guide was given (a run folder or checkpoint file)
        self.guide_checkpoint: str | None = None  # the checkpoint file it was read from

    def __repr__(self) -> str:
        kind = "latent" if self.vae is not None else "pixel"
        task = "" if self.task["kind"] == "generate" else f", task={self.task['kind']}"
        return (f"Pipeline({kind}, {self.dataset}, {self.resolution}px x{self.channels}, "
                f"classes={self.num_classes}, step={self.step}{task})")

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
        # the null prompt is encoded once per pipeline: evaluation calls this per batch
        return states[rows].to(self.device), self._null_prompt_states(negative_prompt)

    def set_guide(self, source: str | Path | None, *, use_ema: bool = True) -> None:
        """Load the autoguidance guide network (Karras et al. 2024) from a run folder or any checkpoint file of
        a diffusion run (its EMA weights when it has them), after `check_guide`; None removes it."""
        if source is None:
            self.guide = self.guide_source = self.guide_checkpoint = None
            return
        use_ema = use_ema and "ema" in load_checkpoint(source).groups  # e.g. a post-hoc EMA file: its model weights
        guide = load_pipeline(source, self.device, use_ema=use_ema, channels_last=True)
        check_guide(self, guide, str(source))
        self.guide, self.guide_source, self.guide_checkpoint = guide.model, str(source), guide.checkpoint

    @torch.no_grad()
    def generate(self, num: int, spec: SamplingSpec | None = None, *, sampler: str | None = None,
                 num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                 labels: int | Sequence[int] | np.ndarray | None = None, seed: int | None = None,
                 batch_size: int | None = None, progress: bool | Callable[[dict[str, Any]], Any] = True,
                 prompts: str | Sequence[str] | None = None, negative_prompt: str | None = None,
                 guide_scale: float | None = None, guidance_interval: tuple[float, float] | None = None,
                 spacing: str | None = None, sampler_options: SamplerOptions | dict[str, Any] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample `num` images -> (uint8 (N, H, W, C), int64 labels or None).

        The settings come from `spec` (a lddpm.SamplingSpec: sampler, steps, eta, spacing, guidance, seed,
        batch size, negative prompt, the guide) or, as before, from keywords (None: the default; not both).
        Conditional models get `labels` (default: classes in turn, 0, 1, ..., so counts are
        balanced); text models get `prompts` (one per image, or one for all) and optionally a
        `negative_prompt` that replaces the null prompt in guidance. The spec's `labels` / `prompts`
        policies are evaluation's: here the labels and prompts are these arguments. Autoguidance uses the
        guide network of `set_guide` (or the spec's `guide`, loaded once). The starting noise of image i
        depends only on (seed, i), and so does the noise a stochastic sampler draws at each step (one
        generator per image): samples do not depend on batch_size. Latent samples are divided by the VAE's
        scaling factor and decoded.
        `progress` is True (a bar), False, or a callback that every sampler step calls with its state
        (lddpm.sampling's: i, total, t, x, denoised; latents for latent runs) plus the batch's place:
        start (its first image), batch (its size) and num. `sampler_options`: the step grid, sigma_min,
        epsilon scaling, churn, order (`lddpm.sampling.sample`, docs/samplers.md).
        """
        spec = resolve_spec(spec, sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
                            seed=seed, batch_size=batch_size, negative_prompt=negative_prompt,
                            guide_scale=guide_scale, guidance_interval=guidance_interval, spacing=spacing,
                            sampler_options=sampler_options)
        stochastic = is_stochastic(spec.sampler, spec.eta, spec.sampler_options)
        self.require_task("generate", "generate images from noise alone (lddpm sample)")
        if num < 0:
            raise LddpmError(f"num ({num}) must be >= 0")
        if spec.guide is not None and spec.guide != self.guide_source:
            self.set_guide(spec.guide)
        labels = self._labels(num, labels)
        context, null_context = self.prompt_states(num, prompts, spec.negative_prompt)
        x_T = torch.randn((num, *self.latent_shape), generator=torch.Generator().manual_seed(int(spec.seed)))
        outputs = []
        self.model.eval()
        network = bf16_network(self.model, self.device.type) if self.bf16 else self.model
        guide = None
        if self.guide is not None and spec.guide_scale != 1.0:
            self.guide.eval()
            guide = bf16_network(self.guide, self.device.type) if self.bf16 else self.guide
        callback = progress if callable(progress) else None
        with tqdm(total=num, unit="img", desc=f"sample {spec.sampler}", disable=callback is not None or not progress) as bar:
            for start in range(0, num, spec.batch_size):
                xb = x_T[start:start + spec.batch_size].to(self.device)
                yb = torch.from_numpy(labels[start:start + spec.batch_size]).to(self.device) if labels is not None else None
                cb = context[start:start + spec.batch_size] if context is not None else None
                generator = ([seeding.generator(seeding.image_seed(int(spec.seed), i), self.device)
                              for i in range(start, start + len(xb))] if stochastic else None)
                steps = (lambda state, start=start, n=len(xb): callback({**state, "start": start, "batch": n, "num": num})
                         ) if callback is not None else False
                x = sample(network, self.diffusion, tuple(xb.shape), spec, clip_x0=self.vae is None, y=yb,
                           null_label=self.null_label, context=cb, null_context=null_context, generator=generator,
                           x_T=xb, device=self.device, progress=steps, guide=guide)
                if self.vae is not None:
                    x = self.vae.decode(x.float() / self.vae.scaling_factor)
                outputs.append(to_uint8(x))
                bar.update(len(xb))
        images = np.concatenate(outputs) if outputs else np.zeros((0, self.resolution, self.resolution, self.channels), np.uint8)
        return images, labels

    # ---------------------------------------------------------------------------------------- editing and restoration

    def require_task(self, kind: str, what: str) -> None:
        """Refuse, naming the run's task, an operation that needs a network trained for `kind`."""
        if self.task["kind"] != kind:
            trained = self.task["kind"]
            fix = {"generate": "lddpm sample / edit / inpaint / denoise", "inpaint": "lddpm inpaint",
                   "super-resolution": "lddpm upscale"}[trained]
            raise LddpmError(f"this run was trained for task {trained!r}, not {kind!r}: it cannot {what}; use it with "
                             f"{fix}, or a run trained with task.kind = {kind!r}")

    def images_in(self, images, what: str = "images", size: int | None = None) -> torch.Tensor:
        """Images as a float tensor (N, C, H, W) in [-1, 1] on the pipeline's device.

        uint8 arrays (N, H, W, C) or (N, H, W) are scaled from [0, 255]; float arrays are taken as [-1, 1]
        values as they are (a noisy image may exceed the range). Size and channels must be the run's
        (`size`: another side length, e.g. the low-resolution input of super-resolution).
        """
        arr = np.asarray(images)
        if arr.ndim == 3 and self.channels == 1 and arr.shape[-1] != 1:
            arr = arr[..., None]                     # (N, H, W) grey
        if arr.ndim != 4 or arr.shape[0] < 1:
            raise LddpmError(f"{what} must be an array (N, H, W, C) (or (N, H, W) for grey), got shape {arr.shape}")
        side = self.resolution if size is None else size
        n, h, w, c = arr.shape
        if (h, w) != (side, side):
            raise LddpmError(f"{what} are {h}x{w} pixels, but this run takes {side}x{side}; resize or pad them "
                             f"to {side}x{side}")
        if c != self.channels:
            raise LddpmError(f"{what} have {c} channel{'s' if c != 1 else ''}, but this run's images have "
                             f"{self.channels} ({'grey' if self.channels == 1 else 'RGB'}); convert them")
        if arr.dtype == np.uint8:
            x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise LddpmError(f"{what} hold NaN or infinite values")
            x = torch.from_numpy(arr.astype(np.float32))
        else:
            raise LddpmError(f"{what} must be uint8 (0..255) or float ([-1, 1]) arrays, not {arr.dtype}")
        return x.permute(0, 3, 1, 2).contiguous().to(self.device)

    def masks_in(self, masks, num: int) -> torch.Tensor:
        """Masks as float (N, 1, H, W) in {0, 1} (1 = generate): one (H, W) for all images or one per image.

        Accepted values: bool, 0/1, or 0/255 (a black-and-white mask image, white = regenerate).
        """
        arr = np.asarray(masks)
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise LddpmError(f"a mask must be an (H, W) array or one per image (N, H, W), got shape {arr.shape}")
        if arr.shape[1:] != (self.resolution, self.resolution):
            raise LddpmError(f"the mask is {arr.shape[1]}x{arr.shape[2]} pixels but the images are "
                             f"{self.resolution}x{self.resolution}; give a mask of the images' size")
        if arr.shape[0] not in (1, num):
            raise LddpmError(f"{arr.shape[0]} masks for {num} images; give one mask for all or one per image")
        values = np.unique(arr)
        top = 255 if arr.dtype == np.uint8 and values.max(initial=0) > 1 else 1
        if not set(values.tolist()) <= {0, top}:
            odd = next(v for v in values.tolist() if v not in (0, top))
            raise LddpmError(f"the mask is not binary: it holds the value {odd!r} besides 0 and {top}; use a black-and-"
                             "white mask (white = regenerate, black = keep)")
        m = torch.from_numpy((arr == top).astype(np.float32))[:, None]
        return m.expand(num, -1, -1, -1).contiguous().to(self.device)

    def _edit_condition(self, num: int, labels, prompts, negative_prompt):
        """(y, context, null_context) for editing: class labels default to the null label (the model's prior
        without a class), prompts to the null prompt ""."""
        if labels is None and self.num_classes and not self.context_dim:
            y = np.full(num, self.null_label, np.int64)
        else:
            y = self._labels(num, labels)
        if self.context_dim and prompts is None:
            null = self._null_prompt_states(negative_prompt)
            return y, null.expand(num, *null.shape[1:]), null
        context, null_context = self.prompt_states(num, prompts, negative_prompt)
        return y, context, null_context

    def _null_prompt_states(self, negative_prompt: str | None) -> torch.Tensor:
        """The (1, L, D) states of "" (or of the negative prompt), encoded once per pipeline."""
        if self.text_encoder is None:
            raise LddpmError("this pipeline has no text encoder; load it with lddpm.load_pipeline(run)")
        key = negative_prompt or ""
        if key not in self._null_states:
            self._null_states[key] = self.text_encoder.encode([key]).float().to(self.device)
        return self._null_states[key]

    def _generators(self, seed: int, start: int, stop: int) -> list[torch.Generator]:
        """One generator per image i in [start, stop), seeded by (seed, i): results do not depend on batching."""
        return [seeding.generator(seeding.image_seed(int(seed), i), self.device) for i in range(start, stop)]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the diffusion's space: scaled VAE latents (the posterior mode) for latent runs."""
        if self.vae is None:
            return x
        return self.vae.encode(x).mode() * self.vae.scaling_factor

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion's space -> images in [-1, 1]."""
        return z if self.vae is None else self.vae.decode(z.float() / self.vae.scaling_factor)

    def _run_batches(self, num: int, batch_size: int, progress: bool, desc: str, step) -> np.ndarray:
        """uint8 images of step(start, stop) -> (B, C, H, W) in [-1, 1], over batches of the inputs."""
        if batch_size < 1:
            raise LddpmError(f"batch_size ({batch_size}) must be >= 1")
        self.model.eval()
        outputs = []
        with tqdm(total=num, unit="img", desc=desc, disable=not progress) as bar:
            for start in range(0, num, batch_size):
                stop = min(num, start + batch_size)
                outputs.append(to_uint8(step(start, stop)))
                bar.update(stop - start)
        return np.concatenate(outputs)

    def _network(self):
        return bf16_network(self.model, self.device.type) if self.bf16 else self.model

    def _rows(self, v, start: int, stop: int):
        """Rows [start, stop) of a per-image condition (numpy labels -> a tensor on the device)."""
        if v is None:
            return None
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        return v[start:stop].to(self.device)

    @torch.no_grad()
    def edit(self, images, strength: float, *, sampler: str = "ddim", num_steps: int | None = None, eta: float = 0.0,
             guidance_scale: float = 1.0, labels=None, prompts=None, negative_prompt: str | None = None,
             seed: int = 0, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Image-to-image (SDEdit, Meng et al. 2022): noise each image to `strength` and denoise it -> uint8.

        strength 0 returns the input, 1 ignores it (plain sampling). Class-conditional runs use `labels`
        (default: the null label, the model without a class), text runs `prompts` (default: the null prompt);
        guidance as in `generate`. Latent runs edit the VAE latents of the images and decode the result.
        """
        editing.strength_timesteps(self.diffusion, strength, sampler, num_steps)   # checks strength, sampler, steps
        is_stochastic(sampler, eta)
        self.require_task("generate", "edit images (image-to-image)")
        x_in = self.images_in(images)
        if float(strength) == 0.0:
            return to_uint8(x_in)                    # the input itself, also for latent runs (no VAE round trip)
        n = x_in.shape[0]
        y, context, null_context = self._edit_condition(n, labels, prompts, negative_prompt)

        def step(a: int, b: int) -> torch.Tensor:
            z = editing.sdedit(self._network(), self.diffusion, self._encode(x_in[a:b]), strength, sampler=sampler,
                               num_steps=num_steps, eta=eta, clip_x0=self.vae is None, y=self._rows(y, a, b),
                               context=self._rows(context, a, b), guidance_scale=guidance_scale,
                               null_label=self.null_label, null_context=null_context,
                               generator=self._generators(seed, a, b))
            return self._decode(z)

        return self._run_batches(n, batch_size, progress, f"edit {sampler}", step)

    @torch.no_grad()
    def inpaint(self, images, masks, *, method: str | None = None, sampler: str = "ddim",
                num_steps: int | None = None, eta: float = 0.0, jump_length: int = 5, resamplings: int = 5,
                guidance_scale: float = 1.0, labels=None, prompts=None, negative_prompt: str | None = None,
                seed: int = 0, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Regenerate the masked pixels of each image (mask 1 / white = regenerate) -> uint8 (N, H, W, C).

        method "repaint" (any run trained to generate; Lugmayr et al. 2022) over `num_steps` (default 50)
        DDPM steps with resampling jumps of `jump_length`, `resamplings` times; method "model" (the default
        for runs trained with task.kind = "inpaint") samples the inpainting network with `sampler`, reading
        the mask and masked image at every step. Kept pixels are returned unchanged. Latent runs inpaint the
        VAE latents (a latent cell is regenerated if any of its pixels is) and paste the kept pixels back.
        """
        kind = self.task["kind"]
        method = method or ("model" if kind == "inpaint" else "repaint")
        if method not in ("repaint", "model"):
            raise LddpmError(f"unknown inpainting method {method!r}; choose 'repaint' or 'model'")
        if kind == "super-resolution" or (method == "model" and kind != "inpaint"):
            self.require_task("inpaint", "inpaint with method 'model'" if kind == "generate" else "inpaint images")
        if method == "model":
            is_stochastic(sampler, eta)
        x_in = self.images_in(images)
        n = x_in.shape[0]
        m = self.masks_in(masks, n)
        y, context, null_context = self._edit_condition(n, labels, prompts, negative_prompt)
        steps = 50 if num_steps is None and method == "repaint" else num_steps

        def step(a: int, b: int) -> torch.Tensor:
            x, mb, gens = x_in[a:b], m[a:b], self._generators(seed, a, b)
            common = dict(num_steps=steps, clip_x0=self.vae is None, y=self._rows(y, a, b),
                          guidance_scale=guidance_scale, null_label=self.null_label, generator=gens)
            if method == "model":
                out = editing.inpaint_with_model(self._network(), self.diffusion, x, mb, sampler=sampler, eta=eta,
                                                 **common)
            else:
                factor = self.vae.downsample_factor if self.vae is not None else 1
                ml = editing.latent_mask(mb, factor)
                z = self._encode(x)
                cond = inpaint_condition(x, mb) if kind == "inpaint" else None
                z = editing.repaint(self._network(), self.diffusion, z, ml, jump_length=jump_length,
                                    resamplings=resamplings, context=self._rows(context, a, b),
                                    null_context=null_context, cond_image=cond, **common)
                out = self._decode(z)
            return mb * out + (1.0 - mb) * x          # kept pixels exactly (RePaint keeps them already in pixels)

        return self._run_batches(n, batch_size, progress, f"inpaint {method}", step)

    @torch.no_grad()
    def upscale(self, low_res, *, sampler: str = "ddim", num_steps: int | None = None, eta: float = 0.0,
                guidance_scale: float = 1.0, labels=None, seed: int = 0, batch_size: int = 64,
                progress: bool = True) -> np.ndarray:
        """Super-resolution (SR3, Saharia et al. 2021) with a run trained for it: low-resolution images of
        resolution / task.factor pixels -> uint8 images at the run's resolution."""
        is_stochastic(sampler, eta)
        self.require_task("super-resolution", "upscale images")
        factor = int(self.task.get("factor") or 4)
        low = self.images_in(low_res, "low-resolution images", size=self.resolution // factor)
        n = low.shape[0]
        y, _, _ = self._edit_condition(n, labels, None, None)

        def step(a: int, b: int) -> torch.Tensor:
            return editing.super_resolve(self._network(), self.diffusion, low[a:b], self.resolution, sampler=sampler,
                                         num_steps=num_steps, eta=eta, clip_x0=True, y=self._rows(y, a, b),
                                         guidance_scale=guidance_scale, null_label=self.null_label,
                                         generator=self._generators(seed, a, b))

        return self._run_batches(n, batch_size, progress, f"upscale {sampler}", step)

    def check_denoise(self) -> None:
        """Refuse a run that cannot denoise: one trained for another task, or a latent run."""
        self.require_task("generate", "denoise images")
        if self.vae is not None:
            raise LddpmError("denoising needs a pixel-space run: Gaussian noise on pixels is not Gaussian noise on "
                             "a VAE's latents, so a latent run has no noise level that matches it; use a pixel run")

    def estimate_noise(self, noisy) -> np.ndarray:
        """Each image's noise std in [-1, 1] units (8-bit std / 127.5), by the wavelet MAD estimate
        (`lddpm.editing.estimate_noise_sigma`)."""
        return editing.estimate_noise_sigma(self.images_in(noisy, "noisy images").cpu()).numpy().astype(np.float64)

    @torch.no_grad()
    def denoise(self, noisy, sigma: float | Sequence[float] | np.ndarray | None = None, *, method: str = "sample",
                sampler: str = "ddpm", num_steps: int | None = None, eta: float = 0.0, guidance_scale: float = 1.0,
                labels=None, prompts=None, negative_prompt: str | None = None, seed: int = 0, batch_size: int = 64,
                progress: bool = True) -> np.ndarray:
        """Remove additive Gaussian noise of std `sigma` ([-1, 1] units: 8-bit std / 127.5; None: estimated per
        image) from pixel images -> uint8. method "sample" (a posterior draw with `sampler`, default ddpm
        over all steps below the noise level) or "mean" (the posterior mean, one network evaluation);
        see `lddpm.editing.denoise`."""
        is_stochastic(sampler, eta)
        self.check_denoise()
        x_in = self.images_in(noisy, "noisy images")
        n = x_in.shape[0]
        if sigma is None:
            sig = self.estimate_noise(noisy)
        else:
            sig = np.asarray(sigma, dtype=np.float64).reshape(-1)
            if sig.size == 1:
                sig = np.full(n, float(sig[0]))
            if sig.shape != (n,):
                raise LddpmError(f"sigma must be one number or one per image ({n}), got {sig.size}")
        if not np.isfinite(sig).all() or (sig < 0).any():
            bad = next(float(s) for s in sig if not (np.isfinite(s) and s >= 0))
            raise LddpmError(f"the noise std sigma must be a finite number >= 0, got {bad}")
        y, context, null_context = self._edit_condition(n, labels, prompts, negative_prompt)

        def step(a: int, b: int) -> torch.Tensor:
            return editing.denoise(self._network(), self.diffusion, x_in[a:b], torch.from_numpy(sig[a:b]),
                                   method=method, sampler=sampler, num_steps=num_steps, eta=eta, clip_x0=True,
                                   y=self._rows(y, a, b), context=self._rows(context, a, b),
                                   guidance_scale=guidance_scale, null_label=self.null_label,
                                   null_context=null_context, generator=self._generators(seed, a, b))

        return self._run_batches(n, batch_size, progress, f"denoise {method}", step)


def check_guide(main: Pipeline, guide: Pipeline, source: str) -> None:
    """Refuse a guide network that cannot guide `main`: it must share the diffusion schedule, the objective
    (and learned variance), the data shape (and for latent runs the VAE), the task and the conditioning kind."""
    problems = []
    a, b = main.diffusion, guide.diffusion
    if a.num_timesteps != b.num_timesteps or not torch.equal(a.schedule.alphas_cumprod, b.schedule.alphas_cumprod):
        problems.append(f"diffusion schedule ({_schedule_name(main)} vs {_schedule_name(guide)})")
    if a.objective != b.objective:
        problems.append(f"objective ({a.objective} vs {b.objective})")
    if bool(a.learned_variance) != bool(b.learned_variance):
        problems.append(f"learned variance ({bool(a.learned_variance)} vs {bool(b.learned_variance)})")
    shape = lambda p: (p.latent_shape, p.resolution, p.channels, p.vae is not None)  # noqa: E731
    if shape(main) != shape(guide):
        problems.append(f"data shape ({_shape_text(main)} vs {_shape_text(guide)})")
    elif main.vae is not None and not _same_weights(main.vae, guide.vae):
        problems.append("autoencoder (the guide's latents come from another VAE)")
    task = lambda p: (getattr(p, "task", None) or {}).get("kind", "generate")  # noqa: E731
    if task(main) != task(guide):
        problems.append(f"task ({task(main)} vs {task(guide)})")
    kind = lambda p: ("text" if p.context_dim else f"{p.num_classes} classes" if p.num_classes else "unconditional")  # noqa: E731
    if (main.num_classes, main.context_dim) != (guide.num_classes, guide.context_dim):
        problems.append(f"conditioning ({kind(main)} vs {kind(guide)})")
    elif main.context_dim and "scratch" in (_encoder_kind(main), _encoder_kind(guide)):
        problems.append("text encoder (a scratch encoder trains inside each network, so the guide would read the "
                        "main encoder's states; autoguidance needs runs on one frozen encoder, e.g. MiniLM)")
    elif main.context_dim and _encoder_identity(main) != _encoder_identity(guide):
        problems.append("text encoder (another encoder or prompt length)")
    if problems:
        raise LddpmError(f"guide {source} cannot guide {main.checkpoint}: its {'; '.join(problems)} differ (main vs "
                         "guide); a guide must be trained with the main run's diffusion, data and conditioning "
                         "settings, e.g. a smaller network trained briefly (the fashion-guide preset for "
                         "fashion-30min)")


def _schedule_name(p: Pipeline) -> str:
    d = getattr(p.config, "diffusion", None)
    return f"{d.schedule}, T={d.num_timesteps}" if d is not None else f"T={p.diffusion.num_timesteps}"


def _shape_text(p: Pipeline) -> str:
    space = "latent " + "x".join(map(str, p.latent_shape)) + " of " if p.vae is not None else ""
    return f"{space}{p.resolution}px x{p.channels}"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _encoder_identity(p: Pipeline):
    encoder = p.text_encoder
    return encoder.identity() if hasattr(encoder, "identity") else None


def _encoder_kind(p: Pipeline) -> str | None:
    return (_encoder_identity(p) or {}).get("kind")


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
                  bf16: bool | str = False, channels_last: bool = True, guide: str | Path | None = None) -> Pipeline:
    """Rebuild a diffusion run's sampler from its checkpoint alone (EMA weights by default).

    `bf16` (true, false or "auto": where the device has native bf16) runs the network under bf16
    autocast when sampling; on a CPU with AMX this about doubles the sampling speed.
    `channels_last` runs a U-Net in the channels-last memory format whatever it was trained in (the
    same weights and arithmetic; benchmarks/bf16_sampling.py: its forward pass is faster on CPU, in
    fp32 and more so under bf16 autocast); other networks ignore it.
    `guide`: a run folder or checkpoint file of an autoguidance guide network (`Pipeline.set_guide`;
    a checkpoint without EMA weights, e.g. a reconstructed post-hoc EMA file, gives its `model` weights).
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
    task = meta.get("task") or {"kind": config.task.kind, "factor": config.task.factor, "masks": list(config.task.masks)}
    pipeline = Pipeline(model, build_diffusion(config.diffusion), vae=vae, config=config, dataset=meta.get("dataset"),
                        device=device, checkpoint=str(ckpt.path), step=int(meta["step"]), bf16=bf16,
                        text_encoder=text_encoder, task=task)
    if guide is not None:
        pipeline.set_guide(guide)
    return pipeline


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
