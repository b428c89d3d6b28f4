"""`lddpm import` / `lddpm export`: diffusers model or pipeline folders <-> lddpm run folders.

An imported run is an ordinary run folder (config.toml, config.json, checkpoints/ with the weights
as both `model` and `ema`) plus provenance.json (source folder hash, diffusers classes and version,
notes on settings that lddpm chooses at sampling time). Both directions write into a temporary
folder next to the target and rename it at the end: on any error nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lddpm import __version__
from lddpm.checkpoint import load_checkpoint, save_run_checkpoint
from lddpm.config import Config, DiffusionConfig, ModelConfig, save_config, validate
from lddpm.convert.diffusers import (CLASS_FOR_KIND, CONFIG_NAME, DIFFUSERS_VERSION, SCHEDULER_CONFIG_NAME,
                                     WEIGHTS_NAME, ModelClass, diffusion_from_scheduler, export_class,
                                     from_diffusers_state, model_class, read_json, read_safetensors,
                                     scheduler_from_diffusion, to_diffusers_state, weight_files)
from lddpm.convert.text import TEXT_ENCODER, TOKENIZER, copy_text_encoder, read_text_encoder, write_text_encoder
from lddpm.errors import LddpmError
from lddpm.data.integrity import sha256_file
from lddpm.io import atomic_dir
from lddpm.nn import network_config, network_from_config

PIPELINE_COMPONENTS = ("unet", "transformer", "vae", "scheduler", TEXT_ENCODER, TOKENIZER)
NOT_MODELS = ("scheduler", TEXT_ENCODER, TOKENIZER)  # components that are not diffusers model folders
# The denoiser folder of a pipeline and the network kind it holds (DiTPipeline: transformer/).
DENOISER_FOLDERS = {"unet": "unet", "transformer": "dit"}
# The registry config an imported network is written against (its differences become model.overrides).
BASE_NAMES = {"unet": "ddpm-cifar10", "vae": "kl-f8", "dit": "dit-xl/2"}


def folder_sha256(folder: Path) -> tuple[str, list[list[Any]]]:
    """sha256 over (relative path, sha256 of contents) of every file, in sorted order; and the file list."""
    digest, files = hashlib.sha256(), []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        file_hash = sha256_file(path)
        digest.update(f"{rel}\0{file_hash}\n".encode())
        files.append([rel, path.stat().st_size, file_hash])
    return digest.hexdigest(), files


def read_model_folder(folder: Path) -> tuple[ModelClass, Any, dict[str, torch.Tensor], dict[str, Any]]:
    """(table entry, lddpm network config, lddpm state dict, raw diffusers config) of a model folder."""
    raw = read_json(folder / CONFIG_NAME, "model folder")
    where = str(folder / CONFIG_NAME)
    entry = model_class(raw.get("_class_name"), where, raw)
    config = entry.config_from_diffusers(raw, where)
    tensors = read_safetensors(weight_files(folder))
    with torch.device("meta"):  # shapes only: nothing allocated
        network = network_from_config(entry.kind, config)
    expected = {k: v.shape for k, v in network.state_dict().items()}
    state = from_diffusers_state(entry, config, expected, tensors, str(folder))
    return entry, config, state, raw


def _component(raw: dict[str, Any]) -> dict[str, Any]:
    """Provenance of one diffusers component: class, version and its full config."""
    return {"class": raw.get("_class_name"), "diffusers_version": raw.get("_diffusers_version"), "config": raw}


def _model_section(kind: str, config) -> dict[str, Any]:
    """[model] for a network config: a registry name plus the fields that differ from it."""
    name = BASE_NAMES[kind]
    base = network_config(kind, name).to_dict()
    ours = config.to_dict()
    overrides = {k: v for k, v in ours.items() if base[k] != v}
    # keep attention where it is (network_config would move it with the resolution); a DiT has no such field
    if "resolution" in overrides and "attention_resolutions" in ours:
        overrides.setdefault("attention_resolutions", ours["attention_resolutions"])
    return {"kind": kind, "name": name, "overrides": overrides}


def _pipeline_parts(src: Path) -> dict[str, Path]:
    """The component folders of a pipeline folder; unsupported components are refused by name."""
    index_path = src / "model_index.json"
    if index_path.is_file():
        index = read_json(index_path, "pipeline folder")
        for key, value in index.items():
            if key.startswith("_") or key in PIPELINE_COMPONENTS:
                continue
            if isinstance(value, list) and any(v is not None for v in value):
                raise LddpmError(f"{index_path}: component {key!r} ({value[-1]}) cannot be imported; lddpm reads "
                                 f"{', '.join(PIPELINE_COMPONENTS)}; nothing was written")
    parts = {name: src / name for name in PIPELINE_COMPONENTS if (src / name).is_dir()}
    if "unet" in parts and "transformer" in parts:
        raise LddpmError(f"{src} holds both unet/ and transformer/; lddpm imports one denoiser; nothing was written")
    if not {"unet", "transformer", "vae"} & set(parts):
        raise LddpmError(f"{src} holds no unet/, transformer/ or vae/ folder: give a diffusers model folder "
                         f"(with {CONFIG_NAME}) or a pipeline folder; nothing was written")
    return parts


def _class_names(id2label: Any, num_classes: int) -> list[str]:
    """DiTPipeline's id2label ({"0": "tench, Tinca tinca", ...}) as a list of names; [] unless it names 0..N-1."""
    if not isinstance(id2label, dict) or not num_classes or len(id2label) != num_classes:
        return []
    if sorted(id2label) != sorted(str(i) for i in range(num_classes)):
        return []
    return [str(id2label[str(i)]) for i in range(num_classes)]


def _atomic_folder(out: Path, write) -> None:
    """Run write(tmp) on a fresh temporary folder beside `out`, then move it to `out` (lddpm.io)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LddpmError(f"{out} already exists and is not empty; choose another --out or remove it")
    with atomic_dir(out) as tmp:
        write(tmp)


@dataclasses.dataclass
class ImportedModels:
    """What the models of a diffusers folder become: the run's kind, network, weight groups and data shape."""

    kind: str  # "diffusion" or "vae"
    network: dict[str, Any]  # {"kind", "config"} of the run's network
    groups: dict[str, dict[str, torch.Tensor]]  # checkpoint weight groups ("model", "ema"[, "vae"])
    num_classes: int
    resolution: int  # of the images (a latent run's images are the VAE's)
    channels: int
    meta: dict[str, Any]  # further checkpoint metadata: a VAE's scaling factor, a latent run's VAE


def import_diffusers(src: str | Path, out: str | Path, *, dataset: str | None = None) -> dict[str, Any]:
    """Turn a local diffusers model or pipeline folder into an lddpm run folder; returns a summary.

    UNet2DModel (+ scheduler, + AutoencoderKL for a latent pipeline) becomes a diffusion run that
    `lddpm sample` / `lddpm eval` load; an AutoencoderKL alone becomes a VAE run usable as
    `data.latent`. `dataset` names the data the model was trained on (for `lddpm eval`'s reference).
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise LddpmError(f"{src} is not a folder: give a local diffusers model or pipeline folder "
                         "(download one with `huggingface-cli download REPO --local-dir DIR`)")
    if (src / CONFIG_NAME).is_file():
        parts, pipeline_class, id2label = {"model": src}, None, None
    else:
        parts = _pipeline_parts(src)
        index = src / "model_index.json"
        index_config = read_json(index, "pipeline folder") if index.is_file() else {}
        pipeline_class, id2label = index_config.get("_class_name"), index_config.get("id2label")
    components, models = read_models(parts)
    denoiser_kind = next((k for k in ("unet", "dit") if k in models), None)
    denoiser = models.get(denoiser_kind)  # a U-Net or a DiT, or None for an autoencoder alone
    text = read_text_section(src, out, parts, denoiser, components)
    notes: list[str] = []
    config = Config()
    config.run.out = str(out)
    config.data.dataset = dataset or "imagefolder"
    if denoiser is not None:
        imported = import_denoiser(src, parts, denoiser_kind, denoiser, models.get("vae"), text, config, components,
                                   notes)
    else:
        imported = import_vae(parts, models["vae"], config, notes)
    validate(config)
    class_names = _class_names(id2label, imported.num_classes)
    if id2label and not class_names:
        notes.append(f"model_index.json's id2label does not name classes 0..{imported.num_classes - 1}; "
                     "class names not kept")
    digest, files = folder_sha256(src)
    source = {"format": "diffusers", "folder": str(src.resolve()), "sha256": digest, "files": files,
              "pipeline_class": pipeline_class, "components": components, "notes": notes,
              "imported_by": f"lddpm {__version__}"}
    meta = {"kind": imported.kind, "step": 0, "images_seen": 0, "wall_time": 0.0, "config": config.to_dict(),
            "network": imported.network, "source": {k: v for k, v in source.items() if k != "files"},
            "dataset": {"name": dataset, "split": "train", "num_classes": imported.num_classes,
                        "class_names": class_names, "channels": imported.channels,
                        "resolution": imported.resolution},
            **({"text": text} if text is not None else {}), **imported.meta}

    def write(tmp: Path) -> None:
        save_config(config, tmp)
        save_run_checkpoint(tmp, 0, imported.groups, meta, keep=1)
        if text is not None and text["encoder"] != "minilm":
            copy_text_encoder(src, tmp)
        (tmp / "provenance.json").write_text(json.dumps(source, indent=2) + "\n")

    _atomic_folder(out, write)
    return {"out": str(out), "kind": imported.kind, "classes": {k: v["class"] for k, v in components.items()},
            "sha256": digest, "notes": notes}


def read_models(parts: dict[str, Path]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(provenance of each component, {network kind: (table entry, config, state)}) of the model folders;
    a model in the wrong folder (a VAE in unet/) is refused."""
    components: dict[str, Any] = {}
    models: dict[str, tuple] = {}
    for name, folder in parts.items():
        if name in NOT_MODELS:
            continue
        entry, config, state, raw = read_model_folder(folder)
        expected_kind = {**DENOISER_FOLDERS, "vae": "vae"}.get(name, entry.kind)
        if entry.kind != expected_kind:
            raise LddpmError(f"{folder / CONFIG_NAME}: a {entry.diffusers_name} in the {name}/ folder; "
                             f"expected a {CLASS_FOR_KIND[expected_kind].diffusers_name}; nothing was written")
        models[entry.kind] = (entry, config, state)
        components[name if name != "model" else entry.kind] = _component(raw)
    return components, models


def read_text_section(src: Path, out: Path, parts: dict[str, Path], denoiser: tuple | None,
                      components: dict[str, Any]) -> dict[str, Any] | None:
    """The text encoder of a prompt-conditioned denoiser (meta["text"]; its provenance goes into `components`),
    or None; a text_encoder/ beside a denoiser that reads no prompts is refused."""
    if denoiser is not None and denoiser[1].context_dim:
        if denoiser[1].num_classes:
            raise LddpmError(f"{src}: the U-Net reads both prompts (cross_attention_dim) and class labels "
                             "(num_class_embeds); lddpm generates from prompts or from class labels, not both; "
                             "nothing was written")
        text, keep_copy, components[TEXT_ENCODER] = read_text_encoder(src, denoiser[1].context_dim)
        if keep_copy:  # the run loads its encoder from its own folder
            text["encoder"] = str(Path(out).resolve() / TEXT_ENCODER)
        return text
    if TEXT_ENCODER in parts:
        raise LddpmError(f"{src} has a {TEXT_ENCODER}/ folder but its denoiser reads no prompts (no "
                         "cross-attention); nothing was written")
    return None


def import_denoiser(src: Path, parts: dict[str, Path], kind: str, denoiser: tuple, vae: tuple | None,
                    text: dict[str, Any] | None, config: Config, components: dict[str, Any],
                    notes: list[str]) -> ImportedModels:
    """A U-Net or DiT (`kind`) with its scheduler, its text encoder (`text`) and, for a latent pipeline, its VAE,
    as a diffusion run: fills `config`'s [diffusion], [model], [text] and data resolution, adds the scheduler
    to `components`."""
    _, net_config, weights = denoiser
    latent = vae is not None
    config.diffusion = DiffusionConfig(**{**dataclasses.asdict(DiffusionConfig()),
                                          **_diffusion_section(src, parts, net_config, latent, components, notes)})
    config.model = ModelConfig(**_model_section(kind, net_config))
    config.run.class_conditional = net_config.num_classes > 0
    if text is not None:
        config.text.encoder, config.text.max_length = text["encoder"], text["max_length"]
        notes.append(f"text encoder {text['encoder']!r}, prompts padded to {text['max_length']} tokens; "
                     "caption dropout is not recorded in diffusers folders ([text] holds lddpm's default)")
    meta: dict[str, Any] = {}
    groups = {"model": weights, "ema": weights}
    if latent:
        vae_config = vae[1]
        if vae_config.latent_channels != net_config.in_channels:
            raise LddpmError(f"{src}: the VAE makes {vae_config.latent_channels}-channel latents but the network "
                             f"takes {net_config.in_channels} channels; nothing was written")
        resolution, channels = net_config.resolution * vae_config.downsample_factor, vae_config.in_channels
        groups["vae"] = vae[2]
        meta["vae"] = {"run": None, "checkpoint": None, "step": 0, "code_version": None,
                       "scaling_factor": vae_config.scaling_factor, "network_config": vae_config.to_dict(),
                       "source": "the vae/ folder of the imported pipeline"}
    else:
        resolution, channels = net_config.resolution, net_config.in_channels
    config.data.resolution = resolution
    return ImportedModels("diffusion", {"kind": kind, "config": net_config.to_dict()}, groups,
                          net_config.num_classes, resolution, channels, meta)


def _diffusion_section(src: Path, parts: dict[str, Path], network: Any, latent: bool, components: dict[str, Any],
                       notes: list[str]) -> dict[str, Any]:
    """[diffusion] values from the pipeline's scheduler config (lddpm's defaults without one); the scheduler's
    variance type must agree with the network's output channels."""
    if "scheduler" in parts:
        raw = read_json(parts["scheduler"] / SCHEDULER_CONFIG_NAME, "scheduler folder")
        diffusion, scheduler_notes = diffusion_from_scheduler(
            raw, latent=latent, where=str(parts["scheduler"] / SCHEDULER_CONFIG_NAME))
        components["scheduler"] = _component(raw)
        notes += scheduler_notes
        if diffusion["learned_variance"] is None:  # DDIMScheduler: the network's output channels decide
            diffusion["learned_variance"] = network.learned_sigma
    else:
        diffusion = {**dataclasses.asdict(DiffusionConfig()), "learned_variance": network.learned_sigma}
        notes.append("no scheduler config: the [diffusion] section holds lddpm's defaults (linear, T = 1000, eps); "
                     "import the pipeline folder to take them from its scheduler/scheduler_config.json")
    if diffusion["learned_variance"] != network.learned_sigma:
        raise LddpmError(f"{src}: the scheduler says variance_type "
                         f"{'learned_range' if diffusion['learned_variance'] else 'fixed'}, but the network "
                         f"outputs {network.in_channels * (2 if network.learned_sigma else 1)} channels for "
                         f"{network.in_channels} inputs; nothing was written")
    return diffusion


def import_vae(parts: dict[str, Path], vae: tuple, config: Config, notes: list[str]) -> ImportedModels:
    """An AutoencoderKL alone (a model folder, or a pipeline without a denoiser) as a VAE run; fills `config`."""
    _, vae_config, weights = vae
    if "scheduler" in parts:
        notes.append("the pipeline has a scheduler but no unet/: imported as a VAE run; the scheduler is not used")
    config.model = ModelConfig(**_model_section("vae", vae_config))
    config.data.resolution = vae_config.resolution
    return ImportedModels("vae", {"kind": "vae", "config": vae_config.to_dict()}, {"model": weights, "ema": weights},
                          0, vae_config.resolution, vae_config.in_channels, {"scaling_factor": vae_config.scaling_factor})


# ----------------------------------------------------------------------------- export


def _write_model(folder: Path, entry: ModelClass, config, state: dict[str, torch.Tensor]) -> None:
    """config.json + diffusion_pytorch_model.safetensors of one diffusers model."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"_class_name": entry.diffusers_name, "_diffusers_version": DIFFUSERS_VERSION,
           **entry.config_to_diffusers(config)}
    (folder / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
    save_file(to_diffusers_state(entry, config, state), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def export_diffusers(run: str | Path, out: str | Path, *, weights: str = "ema") -> dict[str, Any]:
    """Write a run as a diffusers folder: a pipeline layout (unet/ or transformer/, scheduler/[, vae/]) for a diffusion
    run, a model folder for a VAE run. `weights`: "ema" (what lddpm samples and decodes with) or "model"."""
    if weights not in ("ema", "model"):
        raise LddpmError(f"--weights must be ema or model, not {weights!r}")
    ckpt = load_checkpoint(run)
    kind = ckpt.meta.get("kind")
    if kind not in ("diffusion", "vae"):
        raise LddpmError(f"{ckpt.path} is a {kind!r} checkpoint; export takes a diffusion or VAE run")
    group = weights
    network_kind = ckpt.meta["network"]["kind"]
    if network_kind not in CLASS_FOR_KIND:
        raise LddpmError(f"{ckpt.path}: no diffusers class is mapped for lddpm network kind {network_kind!r} yet "
                         f"(exportable: {', '.join(CLASS_FOR_KIND)})")
    with torch.device("meta"):  # the validated config with defaults; no weights allocated
        config = network_from_config(network_kind, ckpt.meta["network"]["config"]).config
    if getattr(config, "cond_channels", 0):
        raise LddpmError(f"{ckpt.path}: this network was trained for task {ckpt.meta.get('task', {}).get('kind')!r} "
                         f"and reads {config.cond_channels} conditioning channels; exporting task networks to "
                         "diffusers is not supported yet (only networks trained to generate)")
    entry = export_class(network_kind, config)
    if kind == "vae" and "scaling_factor" in ckpt.meta:
        config = config.replace(scaling_factor=float(ckpt.meta["scaling_factor"]))
    state = ckpt.load(group)
    entry.config_to_diffusers(config)  # refuse before writing anything
    notes = []
    if getattr(config, "dropout", 0.0):
        notes.append(f"dropout = {config.dropout} is a training setting; "
                     + (f"{entry.diffusers_name} stores it" if network_kind == "unet"
                        else "AutoencoderKL has no dropout field"))
    vae_part = None
    if kind == "diffusion" and "vae" in ckpt.groups:
        vae_entry = CLASS_FOR_KIND["vae"]
        vae_config = network_from_config("vae", ckpt.meta["vae"]["network_config"]).config
        vae_entry.config_to_diffusers(vae_config)
        vae_part = (vae_entry, vae_config, ckpt.load("vae"))
    diffusion = ckpt.meta["config"]["diffusion"] if kind == "diffusion" else None
    class_names = list((ckpt.meta.get("dataset") or {}).get("class_names") or [])

    dit = network_kind == "dit"
    text = None
    if kind == "diffusion" and getattr(config, "context_dim", 0):
        text = ckpt.meta.get("text")
        if not text:
            raise LddpmError(f"{ckpt.path}: the network reads prompts (context_dim={config.context_dim}) but the "
                             "checkpoint records no text encoder (meta.text); nothing was written")
    if text is not None and vae_part is None:
        notes.append("a pixel-space text U-Net: written as unet/ + scheduler/ + text_encoder/ + tokenizer/ without "
                     "model_index.json (StableDiffusionPipeline needs a vae/; IFPipeline pads prompts to 77 tokens "
                     "and needs a learned variance); load the parts with from_pretrained")
    if dit and vae_part is None:
        notes.append("a pixel-space DiT: written as transformer/ + scheduler/ without model_index.json "
                     "(DiTPipeline needs a vae/)")
    if dit and vae_part is not None and config.num_classes != 1000:
        notes.append(f"DiTPipeline guides with label 1000 as the null label (fixed in its code); this DiT has "
                     f"{config.num_classes} classes (null label {config.num_classes}): call it with guidance_scale=1, "
                     "or guide with lddpm")

    def write(tmp: Path) -> None:
        if kind == "vae":
            _write_model(tmp, entry, config, state)
            return
        _write_model(tmp / ("transformer" if dit else "unet"), entry, config, state)
        # DiTPipeline passes only the eps channels to its scheduler, so its scheduler must not expect the
        # variance channels: a DDIMScheduler (as facebook/DiT-XL-2-256), whose step needs none.
        scheduler = scheduler_from_diffusion(diffusion, latent=vae_part is not None,
                                             scheduler_class="DDIMScheduler" if dit else "DDPMScheduler")
        if text is not None and vae_part is not None:
            # StableDiffusionPipeline rewrites steps_offset 0 to 1 with a warning; "trailing" spacing ignores it
            scheduler["steps_offset"] = 1
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / SCHEDULER_CONFIG_NAME).write_text(json.dumps(scheduler, indent=2) + "\n")
        if text is not None:
            text_index = write_text_encoder(text, tmp, str(ckpt.path))
        if vae_part is not None:
            _write_model(tmp / "vae", *vae_part)
            if text is not None:  # Stable Diffusion's layout, without its safety checker
                index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                         "feature_extractor": [None, None], "image_encoder": [None, None],
                         "requires_safety_checker": False, "safety_checker": [None, None],
                         "scheduler": ["diffusers", "DDPMScheduler"], **text_index,
                         "unet": ["diffusers", entry.diffusers_name], "vae": ["diffusers", "AutoencoderKL"]}
                (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            elif dit:
                index = {"_class_name": "DiTPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                         "scheduler": ["diffusers", "DDIMScheduler"],
                         "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
                if class_names:  # DiTPipeline.get_label_ids reads them
                    index["id2label"] = {str(i): name for i, name in enumerate(class_names)}
                (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        elif not dit and text is None:  # a pixel U-Net (no stock pipeline runs a class U-Net on latents)
            index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                     "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    _atomic_folder(Path(out), write)
    return {"out": str(out), "kind": kind, "weights": group, "class": entry.diffusers_name,
            "checkpoint": str(ckpt.path), "notes": notes}
