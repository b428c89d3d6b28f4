"""lddpm: denoising diffusion probabilistic models in pixel space and in a VAE's latent space.

The Python API (the CLI commands are thin layers over these functions):

    load_config(path_or_preset, overrides)  -> Config        a run configuration (TOML file or preset)
    train_diffusion(config, run_dir) / train_vae(...)         train a diffusion model / the KL autoencoder
    SamplingSpec(sampler=..., num_steps=..., guidance_scale=..., guide=..., guide_scale=..., guidance_interval=...,
                 sampler_options=...)
                                                              how to sample, one value for the API, CLI and study
    load_pipeline(run, guide=None) -> Pipeline; pipeline.generate(n, spec)  sample images (keywords work too)
    sample(model, diffusion, shape, spec)                     one batch with any model function
    Scorer(reference=..., classifier=...)                     what scores images, built once
    evaluate_checkpoint(run, spec, scorer, num=...)           sample N images, score them, time them
    reconstruct_ema(run, sigma_rel, out) -> Path              post-hoc EMA of any width from a run's snapshots
    loss_weight_shares(build_diffusion(config.diffusion))     the loss weight per band of noise levels
    load_study(path) / run_study(study, out_dir)              a grid of runs and cells -> table, plots, grids
    import_diffusers(folder, out) / export_diffusers(run, out)  diffusers folders in and out

Names load on first use, so `import lddpm` stays light. (`train_diffusion` is `lddpm.train.train`:
the plain name `lddpm.train` is the training package.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Config": "lddpm.config", "load_config": "lddpm.config", "apply_overrides": "lddpm.config",
    "train_diffusion": ("lddpm.train", "train"), "train_vae": "lddpm.train",
    "Pipeline": "lddpm.pipeline", "load_pipeline": "lddpm.pipeline", "load_vae": "lddpm.pipeline",
    "sample": "lddpm.sampling", "SAMPLERS": "lddpm.sampling", "SamplingSpec": "lddpm.sampling",
    "build_network": "lddpm.nn", "build_diffusion": "lddpm.diffusion", "loss_weight_shares": "lddpm.diffusion",
    "reconstruct_ema": "lddpm.train.posthoc",
    "evaluate_checkpoint": "lddpm.evaluate", "evaluate_generated": "lddpm.evaluate", "Scorer": "lddpm.evaluate",
    "load_study": "lddpm.study", "run_study": "lddpm.study",
    "import_diffusers": "lddpm.convert.runs", "export_diffusers": "lddpm.convert.runs",
    "LddpmError": "lddpm.errors",
}
__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    """Import the module that defines a public name on first access."""
    if name not in _API:
        raise AttributeError(f"module 'lddpm' has no attribute {name!r}")
    module, attribute = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    return getattr(importlib.import_module(module), attribute)
