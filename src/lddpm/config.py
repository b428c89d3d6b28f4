"""Run configuration: dataclasses, named presets, TOML files and `--set section.key=value` overrides.

A `Config` has one section per concern (`model`, `diffusion`, `data`, `optim`, `run`, `vae`).
It is read from a named preset (`PRESETS`) or a TOML file, adjusted with `apply_overrides`,
checked by `validate`, and saved into every run folder as `config.toml` and `config.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lddpm import checks
from lddpm.checks import check_choice
from lddpm.errors import LddpmError

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser from PyPI (`tomli; python_version < '3.11'`)
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    """The network: registry kind and name (`lddpm.nn.NETWORK_NAMES`) plus field overrides."""

    kind: str = "unet"
    name: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    """The noise schedule and the training objective (`lddpm.schedule`, `lddpm.diffusion`)."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    objective: str = "eps"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    learned_variance: bool = False
    timestep_sampling: str = "uniform"  # "uniform", "adaptive" (Nichol & Dhariwal 2021) or "lognormal" (EDM)
    rescale_zero_terminal_snr: bool = False
    # EDM (Karras et al. 2022): timestep_sampling = "lognormal" draws ln sigma ~ N(p_mean, p_std^2) and trains the
    # nearest timestep; loss_weighting = "edm" weighs the x0 error by (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    # sigma_data is the data's RMS (0.87 for zero-padded Fashion-MNIST in [-1, 1]; EDM's CIFAR-10 value 0.5).
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5


@dataclass
class DataConfig:
    """The training images (`lddpm.data.prepare`) and, for latent diffusion, the VAE run."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    resolution: int = 32
    split: str = "train"
    hflip: bool = False
    latent: str | None = None  # a VAE run folder or checkpoint: train on its latents
    caption_column: str = "text"  # the caption column of a `captioned` dataset's metadata.jsonl / .csv
    cache_dir: str | None = None


COOLDOWN_SHAPES = ("linear", "sqrt")


@dataclass
class OptimConfig:
    """AdamW, linear LR warm-up, gradient clipping and the EMA of the weights."""

    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # > 0: the learning rate falls linearly to zero over this last fraction of the run (warm-up, constant, then
    # a linear cool-down: Hu et al. 2024, "MiniCPM", and Haegele et al. 2024's warmup-stable-decay schedule).
    # The run's progress is steps / run.steps, or its training time / run.max_minutes when that is further on.
    cooldown: float = 0.0
    # The cool-down's shape: "linear" (the factor falls as 1 - x with the cool-down's fraction x done) or "sqrt"
    # (1 - sqrt(x), Haegele et al. 2024's "1-sqrt": it falls faster at first and spends longer at low rates).
    cooldown_shape: str = "linear"
    grad_clip: float = 1.0  # 0 disables clipping
    batch_size: int = 128  # global: summed over processes and accumulation steps
    grad_accum: int = 1  # micro-batches per step in each process
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n))
    # > 0: the power-function EMA of Karras et al. 2024 instead, decay_n = (1 - 1/(n + 1))^(gamma + 1): its
    # length is a fixed fraction of the run so far (relative std 0.10 at gamma 6.94), so it suits runs of any
    # length; ema_decay and ema_warmup are then unused.
    ema_gamma: float = 0.0
    # Post-hoc EMA (Karras et al. 2024, EDM2 Sec. 3): the relative widths sigma_rel of power-function EMAs tracked
    # beside the one above and saved every `posthoc_every` steps (and at the last step) as snapshots in
    # RUN/ema_snapshots/, from which `lddpm ema RUN --sigma-rel S` reconstructs an EMA of any width; e.g.
    # [0.05, 0.1] (EDM2's). Each snapshot holds one float32 copy of the weights per value. [] = off.
    posthoc_ema: list[float] = field(default_factory=list)
    posthoc_every: int = 250


@dataclass
class RunConfig:
    """Length, seed, logging, sample grids, checkpoints, precision and conditioning."""

    steps: int = 1000
    seed: int = 0
    out: str = "runs/run"
    log_every: int = 50
    sample_every: int = 500  # 0 disables grids during training (one is still made at the end)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Steps whose checkpoints are also saved and never removed by keep_checkpoints, e.g. [1400] in fashion-30min:
    # the checkpoint a third of the way that guides the final one (autoguidance, docs/guidance.md). [] = none.
    keep_steps: list[int] = field(default_factory=list)
    bf16: bool | Literal["auto"] = False  # true, false or "auto": on where the device has native bf16 (AMX/AVX-512 bf16, CUDA)
    max_minutes: float = 0.0  # stop after this much training wall time (summed over resumes); 0 = no limit
    compile: bool = False
    deterministic: bool = True  # CUDA: deterministic kernels, so a resumed run repeats an uninterrupted one bitwise
    class_conditional: bool = False
    label_dropout: float = 0.1  # probability of the null label (classifier-free guidance)
    device: str = "auto"
    num_sample_images: int = 64
    sampler: str = "ddim"
    sample_steps: int = 20
    guidance_scale: float = 1.0
    # Where training is logged: "jsonl" (log.jsonl, always written) and "tensorboard" (event files in the run
    # folder; needs the tensorboard package, `lddpm[tensorboard]`). See docs/serving.md and lddpm.tracking.
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])


@dataclass
class VAEConfig:
    """Autoencoder training losses (`lddpm.nn.vae.vae_loss`) and the optional PatchGAN."""

    kl_weight: float = 1e-6
    recon_loss: str = "l1"
    disc_start: int = -1  # step at which the discriminator starts; -1 disables it
    disc_weight: float = 0.5
    disc_lr: float = 0.0  # 0 means optim.lr
    scaling_batches: int = 4  # batches used to estimate the latent scaling factor


@dataclass
class TextConfig:
    """Prompts as the condition (`lddpm.nn.text`): the frozen encoder, its token length, caption dropout."""

    encoder: str = ""  # "" = no text; "minilm" (frozen all-MiniLM-L6-v2), "scratch", or a local HF encoder folder
    max_length: int = 32  # tokens per prompt, [CLS] and [SEP] included; longer prompts are refused
    caption_dropout: float = 0.1  # probability of the null prompt "" (classifier-free guidance, as Stable Diffusion)


@dataclass
class TaskConfig:
    """What the network is trained to do (`lddpm.tasks`): generate, or restore from a conditioning image.

    "inpaint": the network also reads a mask and the masked image as extra input channels (Stable
    Diffusion's inpainting U-Net), trained with random masks of the kinds in `masks`. "super-resolution":
    it reads the image downsampled `factor` times and upsampled back (bicubic) as extra channels (SR3).
    """

    kind: str = "generate"  # "generate" (today's runs), "inpaint" or "super-resolution"
    masks: list[str] = field(default_factory=lambda: ["box", "half", "strokes"])  # inpaint: random mask kinds
    factor: int = 4  # super-resolution: 32x32 images from their 8x8 version (factor 2: from 16x16)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "vae": VAEConfig,
    "text": TextConfig,
    "task": TaskConfig,
}


@dataclass
class Config:
    """A complete, resolved run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/TOML-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build from a nested dict; unknown sections or keys raise LddpmError naming them."""
        if not isinstance(data, dict):
            raise LddpmError(f"{source}: expected a table of sections, got {type(data).__name__}")
        sections = {}
        for name, value in data.items():
            if name not in SECTIONS:
                raise LddpmError(
                    f"{source}: unknown section [{name}]; allowed: {', '.join(SECTIONS)}"
                )
            sections[name] = _section_from_dict(SECTIONS[name], value, f"{source}: [{name}]", name)
        return cls(**sections)

    def copy(self) -> Config:
        """A deep copy."""
        return copy.deepcopy(self)


def _section_from_dict(section_cls: type, data: Any, source: str, section: str):
    if not isinstance(data, dict):
        raise LddpmError(f"{source} must be a table, got {data!r}")
    hints = checks.field_hints(section_cls)
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise LddpmError(
                f"{source}: unknown key {key!r}; allowed: {', '.join(hints)}"
            )
        values[key] = checks.check_type(f"{source.split(':')[0]}: {section}.{key}", hints[key], value)
    return section_cls(**values)


def check_types(config: Config) -> Config:
    """Check every value of every section against its field's type hint (`lddpm.checks.check_type`)."""
    for section in SECTIONS:
        values = getattr(config, section)
        for key, hint in checks.field_hints(type(values)).items():
            checks.check_type(f"{section}.{key}", hint, getattr(values, key))
    return config


# ----------------------------------------------------------------------------- presets

# The named presets are the trainer configs shipped in lddpm/configs/ (the TOML files whose tables are
# all config sections; the study files beside them have [study], [runs] and [[cells]]).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _trainer_presets() -> dict[str, Path]:
    """Preset name -> packaged TOML file, for every shipped trainer config."""
    presets = {}
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        tables = tomllib.loads(path.read_text())
        if tables and set(tables) <= set(SECTIONS):
            presets[path.stem] = path
    return presets


PRESETS: dict[str, Path] = _trainer_presets()


# ----------------------------------------------------------------------------- loading


def config_from_preset(name: str) -> Config:
    """The named preset (a packaged TOML file) as a Config."""
    if name not in PRESETS:
        raise LddpmError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return Config.from_dict(read_toml(PRESETS[name]), source=f"preset {name}")


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file (the package's one TOML reader); unreadable or invalid -> LddpmError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LddpmError(f"{what} {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise LddpmError(f"{what} {path}: cannot be read ({exc.strerror})") from None


def load_config(path_or_name: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or a preset name), apply `section.key=value` overrides and validate."""
    path = Path(path_or_name)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir() and (path / "config.toml").exists():
            path = path / "config.toml"  # a run folder
        if not path.is_file():
            raise LddpmError(
                f"config file {path} not found; give a TOML file or one of the presets: "
                f"{', '.join(PRESETS)}"
            )
        config = Config.from_dict(read_toml(path), source=str(path))
    else:
        config = config_from_preset(str(path_or_name))
    config = apply_overrides(config, overrides or [])
    validate(config)
    return config


def parse_value(text: str) -> Any:
    """A TOML literal (`3`, `1e-4`, `true`, `[0.9, 0.99]`, `"x"`), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Return a copy with each `section.key=value` (or `model.overrides.field=value`) applied."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise LddpmError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise LddpmError(
                f"override {dotted!r}: expected section.key with section one of "
                f"{', '.join(SECTIONS)}"
            )
        section, key = parts[0], parts[1]
        fields = checks.field_hints(SECTIONS[section])
        if key not in fields:
            raise LddpmError(
                f"override {dotted!r}: unknown key {key!r} in [{section}]; allowed: "
                f"{', '.join(fields)}"
            )
        value = parse_value(text.strip())
        if len(parts) == 2:
            data[section][key] = value
        elif len(parts) == 3 and typing.get_origin(fields[key]) is dict:
            data[section][key][parts[2]] = value
        else:
            raise LddpmError(f"override {dotted!r}: {section}.{key} has no sub-keys")
    return Config.from_dict(data, source="--set")


def validate(config: Config) -> Config:
    """Check the values (ranges, consistency); raise LddpmError naming the first bad one.

    Names (network, schedule, objective, dataset, sampler, ...) belong to the modules that define
    them; `lddpm.train.check_names` checks those against each module's list.
    """
    check_types(config)  # every value of its field's type: numbers are finite from here on
    d, data, o, r, v = config.diffusion, config.data, config.optim, config.run, config.vae
    check_choice("run.device", r.device, DEVICES)
    positive = {
        "diffusion.min_snr_gamma": d.min_snr_gamma,
        "diffusion.p_std": d.p_std,
        "diffusion.sigma_data": d.sigma_data,
        "optim.lr": o.lr,
        "optim.batch_size": o.batch_size,
        "optim.grad_accum": o.grad_accum,
        "run.steps": r.steps,
        "optim.posthoc_every": o.posthoc_every,
        "run.log_every": r.log_every,
        "run.checkpoint_every": r.checkpoint_every,
        "run.keep_checkpoints": r.keep_checkpoints,
        "run.num_sample_images": r.num_sample_images,
        "run.sample_steps": r.sample_steps,
        "vae.scaling_batches": v.scaling_batches,
    }
    for where, value in positive.items():
        if value <= 0:
            raise LddpmError(f"{where} = {value} must be positive")
    nonneg = {
        "optim.weight_decay": o.weight_decay,
        "optim.warmup_steps": o.warmup_steps,
        "optim.grad_clip": o.grad_clip,
        "optim.ema_gamma": o.ema_gamma,
        "run.sample_every": r.sample_every,
        "run.max_minutes": r.max_minutes,
        "vae.kl_weight": v.kl_weight,
        "vae.disc_weight": v.disc_weight,
        "vae.disc_lr": v.disc_lr,
    }
    for where, value in nonneg.items():
        if value < 0:
            raise LddpmError(f"{where} = {value} must be a finite number >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise LddpmError(f"optim.betas = {o.betas}: expected two numbers in [0, 1)")
    max_sigma_rel = 1 / (2 * math.sqrt(3))  # lddpm.train.ema.MAX_SIGMA_REL: the width at gamma = 0
    if any(not 0 < s < max_sigma_rel for s in o.posthoc_ema) or len(set(o.posthoc_ema)) < len(o.posthoc_ema):
        raise LddpmError(f"optim.posthoc_ema = {o.posthoc_ema}: expected distinct relative EMA widths in "
                         f"(0, {max_sigma_rel:.4f}), e.g. [0.05, 0.1]")
    if any(step <= 0 for step in r.keep_steps) or len(set(r.keep_steps)) < len(r.keep_steps):
        raise LddpmError(f"run.keep_steps = {r.keep_steps}: expected distinct positive step numbers whose checkpoints "
                         "are kept, e.g. [1400] (a guide a third of the way through a 4,200-step run)")
    if not 0 <= o.cooldown < 1:
        raise LddpmError(f"optim.cooldown = {o.cooldown}: expected a fraction of the run in [0, 1), e.g. 0.2 "
                         "(0 keeps the learning rate constant after warm-up)")
    check_choice("optim.cooldown_shape", o.cooldown_shape, COOLDOWN_SHAPES)
    if not 0 <= o.ema_decay < 1:
        raise LddpmError(f"optim.ema_decay = {o.ema_decay}: expected a number in [0, 1)")
    if not 0 <= r.label_dropout < 1:
        raise LddpmError(f"run.label_dropout = {r.label_dropout}: expected a number in [0, 1)")
    checks.resolution("data.resolution", data.resolution)
    checks.int_in_range("diffusion.num_timesteps", d.num_timesteps, 1, checks.MAX_NUM_TIMESTEPS,
                        " (larger schedules only cost memory; 1000 is the usual T)")
    t = config.text
    if not 0 <= t.caption_dropout < 1:
        raise LddpmError(f"text.caption_dropout = {t.caption_dropout}: expected a number in [0, 1)")
    checks.int_in_range("text.max_length", t.max_length, 2, 512, " (tokens per prompt, [CLS] and [SEP] included)")
    if t.encoder and r.class_conditional:
        raise LddpmError("run.class_conditional = true and text.encoder are both set: a run is conditioned on "
                         "class labels or on prompts; drop one")
    k = config.task
    if k.kind != "generate":
        if k.kind == "super-resolution":
            checks.int_in_range("task.factor", k.factor, 2, 64, " (the low-resolution image is resolution / factor pixels)")
        if k.kind == "super-resolution" and data.resolution % k.factor:
            raise LddpmError(f"task.factor = {k.factor} does not divide data.resolution = {data.resolution}; choose a "
                             "factor that divides it (e.g. 2 or 4 for 32)")
        if k.kind == "inpaint" and not k.masks:
            raise LddpmError("task.masks is empty: an inpainting run needs at least one mask kind "
                             "(box, half, strokes, center)")
        if data.latent or t.encoder:
            raise LddpmError(f"task.kind = {k.kind!r} trains a pixel-space model on class labels or none: drop "
                             + ("data.latent (conditioning image channels are built from pixels)" if data.latent
                                else "text.encoder"))
    if r.guidance_scale != 1.0 and not (r.class_conditional or t.encoder):
        raise LddpmError(
            f"run.guidance_scale = {r.guidance_scale} needs a conditional model "
            "(set run.class_conditional = true, or text.encoder for prompts, or guidance_scale = 1.0)"
        )
    return config


# ----------------------------------------------------------------------------- saving


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise LddpmError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def to_toml(config: Config | dict[str, Any]) -> str:
    """Serialize a config (sections of scalars, lists and one level of sub-tables) as TOML."""
    data = config.to_dict() if isinstance(config, Config) else config
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        tables = []
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null: a missing key reads back as the default (None)
            if isinstance(value, dict):
                tables.append((key, value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, table in tables:
            lines.append(f"\n[{section}.{key}]")
            for k, v in table.items():
                if v is not None:
                    lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def save_config(config: Config, folder: str | Path) -> None:
    """Write `config.toml` and `config.json` into a run folder."""
    from lddpm.io import write_json, write_text

    write_text(Path(folder) / "config.toml", to_toml(config))
    write_json(Path(folder) / "config.json", config.to_dict())
