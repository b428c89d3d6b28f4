"""CLI commands `lddpm import` (diffusers folder -> run folder) and `lddpm export` (run -> diffusers folder)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add `import` and `export` to the `lddpm` parser."""
    i = subparsers.add_parser(
        "import",
        help="turn a local diffusers model or pipeline folder (safetensors only) into an lddpm run folder",
        description="Read a diffusers folder: a model folder (config.json + diffusion_pytorch_model.safetensors: "
        "UNet2DModel, DiTTransformer2DModel or AutoencoderKL) or a pipeline folder (unet/ or transformer/, scheduler/, "
        "optionally vae/; DDPMPipeline, DiTPipeline; a StableDiffusionPipeline-shaped folder with a "
        "UNet2DConditionModel, text_encoder/ and tokenizer/ becomes a text run). Write a run "
        "folder that `lddpm sample` and `lddpm eval` load (a U-Net or DiT) or that a latent run names as data.latent "
        "(an AutoencoderKL), with the weights as both model and EMA and provenance.json. Pickle weights "
        "(.bin/.ckpt/.pt/.pth) are refused; so is any config field lddpm cannot represent.",
    )
    i.add_argument("folder", metavar="DIR", help="local diffusers model or pipeline folder")
    i.add_argument("--out", required=True, metavar="RUN", help="new run folder (must not exist or be empty)")
    i.add_argument("--dataset", default=None,
                   help="dataset the model was trained on (e.g. cifar10): lddpm eval then uses it as the FID reference")
    i.set_defaults(func=_import)

    e = subparsers.add_parser(
        "export",
        help="write a run as a diffusers folder (pipeline layout for diffusion runs, model folder for VAE runs)",
        description="Write the network of a run or checkpoint as a diffusers folder: unet/ (UNet2DModel) or "
        "transformer/ (DiTTransformer2DModel), scheduler/scheduler_config.json (DDPMScheduler; DDIMScheduler for a "
        "DiT) and, for a latent run, vae/ (AutoencoderKL; with a DiT also model_index.json for DiTPipeline); a VAE run "
        "becomes one AutoencoderKL model folder. A text U-Net run is written as unet/ (UNet2DConditionModel), "
        "scheduler/, text_encoder/ and tokenizer/, plus vae/ and model_index.json for StableDiffusionPipeline when "
        "it is latent. Load it with diffusers' from_pretrained.",
    )
    e.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    e.add_argument("--out", required=True, metavar="DIR", help="new diffusers folder (must not exist or be empty)")
    e.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="ema (default): the weights lddpm samples and decodes with; model: the raw weights")
    e.set_defaults(func=_export)


def _import(args: argparse.Namespace) -> int:
    from lddpm.convert.runs import import_diffusers

    result = import_diffusers(args.folder, args.out, dataset=args.dataset)
    classes = ", ".join(f"{k}: {v}" for k, v in result["classes"].items())
    print(f"imported {args.folder} ({classes}; sha256 {result['sha256'][:16]}) -> {result['kind']} run {result['out']}")
    for note in result["notes"]:
        print(f"  note: {note}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lddpm.convert.runs import export_diffusers

    result = export_diffusers(args.run, args.out, weights=args.weights)
    print(f"exported {result['checkpoint']} ({result['weights']} weights, {result['class']}) -> {result['out']}")
    for note in result["notes"]:
        print(f"  note: {note}")
    return 0
