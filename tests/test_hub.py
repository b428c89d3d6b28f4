"""diffusers folders in and out (`lddpm import` / `lddpm export`), with diffusers as the oracle.

Models are built by diffusers with small random weights (every parameter perturbed, so that
zero-initialised layers do not make a comparison 0 == 0), saved with `save_pretrained`, imported,
and compared output for output; exports are reloaded with `from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from lddpm.checkpoint import load_checkpoint  # noqa: E402
from lddpm.cli import main  # noqa: E402
from lddpm.convert.diffusers import (CLASSES, from_diffusers_state, unet_config_from_diffusers,  # noqa: E402
                                     vae_config_from_diffusers)
from lddpm.convert.runs import export_diffusers, import_diffusers  # noqa: E402
from lddpm.errors import LddpmError  # noqa: E402
from lddpm.nn import UNET_CONFIGS, VAE_CONFIGS, network_from_config  # noqa: E402
from lddpm.pipeline import load_pipeline, load_vae  # noqa: E402

TOL = 1e-5

# The diffusers port of Ho et al.'s CIFAR-10 model (google/ddpm-cifar10-32), field for field.
DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
                    layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, norm_num_groups=32)
# The same block structure at a quarter of the width and half the resolution.
DDPM_SMALL = dict(DDPM_CIFAR10, sample_size=16, block_out_channels=[16, 32, 32, 32], norm_num_groups=8)
# ADM-style: scale-shift norm, heads of 8 channels, class labels, learned variance, three levels.
ADM_SMALL = dict(sample_size=16, in_channels=2, out_channels=4, block_out_channels=[16, 32, 48], layers_per_block=1,
                 down_block_types=["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"], attention_head_dim=8,
                 resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, norm_num_groups=8,
                 num_class_embeds=5, dropout=0.1)
# diffusers' own defaults for the embedding; no middle attention; 4-channel (latent-shaped) input.
PLAIN_SMALL = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 16, 32],
                   layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=4,
                   norm_num_groups=4, add_attention=False)
UNETS = {"ddpm-small": DDPM_SMALL, "adm-small": ADM_SMALL, "plain-small": PLAIN_SMALL}

SD_VAE = dict(sample_size=256, in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
              norm_num_groups=32, scaling_factor=0.18215)
VAES = {
    "kl-f8-small": dict(SD_VAE, sample_size=32, block_out_channels=[16, 32, 64, 64], norm_num_groups=8),
    "kl-f4-small": dict(sample_size=16, block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        norm_num_groups=8, scaling_factor=0.3),
    "grey-no-mid-attention": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                  layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4,
                                  mid_block_add_attention=False, scaling_factor=0.5),
}


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (zero-initialised layers included) at the scale of a default init
    (0.5 / sqrt(fan_in) for weights, 0.05 for vectors), so activations stay O(1); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / (p[0].numel() ** 0.5) if p.ndim > 1 else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def diffusers_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return perturbed(diffusers.UNet2DModel(**config), seed)


def diffusers_vae(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return perturbed(diffusers.AutoencoderKL(**config), seed)


def unet_inputs(config: dict, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config["in_channels"], config["sample_size"], config["sample_size"], generator=g)
    t = torch.tensor([3, 871][:batch])
    y = torch.tensor([0, config["num_class_embeds"] - 1][:batch]) if config.get("num_class_embeds") else None
    return x, t, y


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- UNet2DModel


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_import_export_round_trip(name, tmp_path):
    config = UNETS[name]
    theirs = diffusers_unet(config)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    summary = import_diffusers(tmp_path / "hf", tmp_path / "run")
    assert summary["kind"] == "diffusion" and summary["classes"] == {"unet": "UNet2DModel"}
    pipe = load_pipeline(tmp_path / "run")
    ours = pipe.model
    x, t, y = unet_inputs(config)
    with torch.no_grad():
        expected = theirs(x, t, class_labels=y).sample
        assert max_diff(ours(x, t, y=y), expected) <= TOL
    # raw weights and EMA are the same imported weights
    ckpt = load_checkpoint(tmp_path / "run")
    assert state_equal(ckpt.load("model"), ckpt.load("ema"))

    export_diffusers(tmp_path / "run", tmp_path / "out")
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").is_file()
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    assert state_equal(again.state_dict(), theirs.state_dict())
    with torch.no_grad():
        assert max_diff(again(x, t, class_labels=y).sample, ours(x, t, y=y)) <= TOL

    import_diffusers(tmp_path / "out", tmp_path / "run2")
    assert state_equal(load_checkpoint(tmp_path / "run2").load("ema"), ckpt.load("ema"))


def save_lddpm_run(folder: Path, net: torch.nn.Module, ema: torch.nn.Module | None = None) -> Path:
    """A minimal diffusion run folder holding `net` (and `ema`, default the same weights)."""
    from lddpm.checkpoint import save_run_checkpoint
    from lddpm.config import Config, save_config

    config = Config()
    save_config(config, folder)
    meta = {"kind": "diffusion", "step": 5, "config": config.to_dict(),
            "network": {"kind": "unet", "config": net.config.to_dict()}, "dataset": None}
    groups = {"model": net.state_dict(), "ema": (ema or net).state_dict()}
    save_run_checkpoint(folder, 5, groups, meta, keep=1)
    return folder


def test_export_uses_ema_weights_unless_asked(tmp_path):
    config = UNET_CONFIGS["tiny"].replace(model_channels=8, norm_groups=4)
    net, ema = perturbed(network_from_config("unet", config), 1), perturbed(network_from_config("unet", config), 2)
    save_lddpm_run(tmp_path / "run", net, ema)
    export_diffusers(tmp_path / "run", tmp_path / "ema")
    export_diffusers(tmp_path / "run", tmp_path / "raw", weights="model")
    for folder, source in (("ema", ema), ("raw", net)):
        import_diffusers(tmp_path / folder, tmp_path / f"back-{folder}")
        assert state_equal(load_checkpoint(tmp_path / f"back-{folder}").load("model"), source.state_dict())


def test_lddpm_unet_to_diffusers_and_back_is_bitwise(tmp_path):
    """An lddpm-trained shape (the registry's `small`, two heads, ADM embedding) survives the round trip."""
    net = perturbed(network_from_config("unet", UNET_CONFIGS["small"].replace(num_classes=3, model_channels=16,
                                                                              norm_groups=4)), 3)
    save_lddpm_run(tmp_path / "run", net)
    export_diffusers(tmp_path / "run", tmp_path / "hf")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "hf" / "unet").eval()
    x = torch.randn(2, 3, 32, 32)
    t, y = torch.tensor([5, 999]), torch.tensor([2, 3])
    with torch.no_grad():
        assert max_diff(theirs(x, t, class_labels=y).sample, net(x, t, y=y)) <= TOL
    import_diffusers(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert state_equal(back.load("ema"), net.state_dict())
    # two heads of 16 channels at every attention block: diffusers states it as heads of 16 channels
    assert back.meta["network"]["config"] == net.config.replace(num_heads=1, num_head_channels=16).to_dict()


def test_ddpm_cifar10_shape_maps_onto_the_registry_config():
    """The published 35.7M CIFAR-10 model: same parameter count, every tensor placed, same output."""
    theirs = diffusers_unet(DDPM_CIFAR10)
    assert sum(p.numel() for p in theirs.parameters()) == 35_746_307
    config = unet_config_from_diffusers(DDPM_CIFAR10)
    published = dict(flip_sin_to_cos=False, freq_shift=1.0, downsample_padding=0, norm_eps=1e-6, dropout=0.0)
    assert config == UNET_CONFIGS["ddpm-cifar10"].replace(**published)
    ours = network_from_config("unet", config).eval()
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(from_diffusers_state(CLASSES["UNet2DModel"], config, expected, theirs.state_dict(), "cifar"))
    x, t, _ = unet_inputs(DDPM_CIFAR10, batch=1)
    with torch.no_grad():
        assert max_diff(ours(x, t), theirs(x, t).sample) <= TOL


def test_sharded_weights_are_read(tmp_path):
    theirs = diffusers_unet(DDPM_SMALL)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    import_diffusers(tmp_path / "hf", tmp_path / "run")
    assert state_equal(load_checkpoint(tmp_path / "run").load("model"),
                       load_pipeline(tmp_path / "run").model.state_dict())
    x, t, _ = unet_inputs(DDPM_SMALL)
    with torch.no_grad():
        assert max_diff(load_pipeline(tmp_path / "run").model(x, t), theirs(x, t).sample) <= TOL


def test_legacy_attention_names_are_read(tmp_path):
    """Checkpoints saved before diffusers 0.14 (google/ddpm-*) name attention query/key/value/proj_attn."""
    from safetensors.torch import save_file

    theirs = diffusers_unet(DDPM_SMALL)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v.contiguous() for k, v in theirs.state_dict().items()}
    assert legacy.keys() != theirs.state_dict().keys()
    save_file(legacy, str(tmp_path / "hf" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    import_diffusers(tmp_path / "hf", tmp_path / "run")
    x, t, _ = unet_inputs(DDPM_SMALL)
    with torch.no_grad():
        assert max_diff(load_pipeline(tmp_path / "run").model(x, t), theirs(x, t).sample) <= TOL


# ----------------------------------------------------------------------------- AutoencoderKL


@pytest.mark.parametrize("name", list(VAES))
def test_vae_import_export_round_trip(name, tmp_path):
    config = VAES[name]
    theirs = diffusers_vae(config)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    summary = import_diffusers(tmp_path / "hf", tmp_path / "run")
    assert summary["kind"] == "vae"
    ours = load_vae(tmp_path / "run")
    assert ours.scaling_factor == pytest.approx(config["scaling_factor"])
    channels = config.get("in_channels", 3)
    x = torch.randn(2, channels, config["sample_size"], config["sample_size"], generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, config.get("latent_channels", 4), *ours.encode(x).mean.shape[2:])
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        assert max_diff(ours.encode(x).mean, posterior.mean) <= TOL
        assert max_diff(ours.encode(x).logvar, posterior.logvar) <= TOL
        assert max_diff(ours.decode(z), theirs.decode(z).sample) <= TOL

    export_diffusers(tmp_path / "run", tmp_path / "out")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert again.config.scaling_factor == pytest.approx(config["scaling_factor"])
    assert state_equal(again.state_dict(), theirs.state_dict())
    with torch.no_grad():
        assert max_diff(again.decode(z).sample, ours.decode(z)) <= TOL
    import_diffusers(tmp_path / "out", tmp_path / "run2")
    assert state_equal(load_checkpoint(tmp_path / "run2").load("model"), load_checkpoint(tmp_path / "run").load("model"))


def test_lddpm_vae_exports_when_it_computes_what_autoencoderkl_computes(tmp_path):
    """lddpm's default VAE pads every side before its stride-2 convs (AutoencoderKL pads right/bottom):
    export refuses it by name; with LDM's padding and eps it exports and matches diffusers."""
    from lddpm.checkpoint import save_run_checkpoint
    from lddpm.config import Config

    def vae_run(folder: Path, **overrides) -> torch.nn.Module:
        net = perturbed(network_from_config("vae", VAE_CONFIGS["kl-f4-tiny"].replace(**overrides)), 4)
        net.scaling_factor = 0.7
        meta = {"kind": "vae", "step": 1, "config": Config().to_dict(), "scaling_factor": 0.7,
                "network": {"kind": "vae", "config": net.config.to_dict()}, "dataset": None}
        save_run_checkpoint(folder, 1, {"model": net.state_dict(), "ema": net.state_dict()}, meta, keep=1)
        return net

    vae_run(tmp_path / "default")
    with pytest.raises(LddpmError, match="downsample_padding=1"):
        export_diffusers(tmp_path / "default", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    ours = vae_run(tmp_path / "ldm", downsample_padding=0, norm_eps=1e-6)
    export_diffusers(tmp_path / "ldm", tmp_path / "hf")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.scaling_factor == pytest.approx(0.7)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(theirs.encode(x).latent_dist.mean, ours.encode(x).mean) <= TOL
        z = ours.encode(x).mean
        assert max_diff(theirs.decode(z).sample, ours.decode(z)) <= TOL


def test_sd_vae_shape_maps_onto_kl_f8():
    """Stable Diffusion's kl-f8 autoencoder: lddpm's kl-f8 parameter count, every tensor placed."""
    theirs = diffusers.AutoencoderKL(**SD_VAE)
    config = vae_config_from_diffusers(SD_VAE)
    assert config == VAE_CONFIGS["kl-f8"].replace(resolution=256, scaling_factor=0.18215, downsample_padding=0,
                                                  norm_eps=1e-6)
    with torch.device("meta"):
        ours = network_from_config("vae", config)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 83_653_863
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    state = from_diffusers_state(CLASSES["AutoencoderKL"], config, expected, theirs.state_dict(), "sd-vae")
    assert state.keys() == expected.keys()


def test_imported_vae_is_the_autoencoder_of_a_latent_run(tmp_path):
    from test_train import tiny_config, write_idx

    from lddpm.train import train

    theirs = diffusers_vae(VAES["grey-no-mid-attention"])
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    import_diffusers(tmp_path / "hf", tmp_path / "vae")
    data = (write_idx(tmp_path / "idx"), tmp_path / "cache")
    latent = tiny_config(data, "run.steps=2", f"data.latent={json.dumps(str(tmp_path / 'vae'))}",
                         "model.overrides.attention_resolutions=[4]")
    train(latent, tmp_path / "ldm", progress=False)
    pipe = load_pipeline(tmp_path / "ldm")
    assert pipe.vae is not None and pipe.vae.scaling_factor == pytest.approx(0.5)
    assert pipe.model.config.in_channels == 4 and pipe.model.config.resolution == 8  # 16 px / f = 2
    images, _ = pipe.generate(2, sampler="ddim", num_steps=2, progress=False)
    assert images.shape == (2, 16, 16, 1)


# ----------------------------------------------------------------------------- pipelines and sampling


def ddpm_pipeline_folder(tmp_path: Path, **scheduler) -> tuple[Path, object]:
    unet = diffusers_unet(PLAIN_SMALL | dict(in_channels=3, out_channels=3, sample_size=8))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, **scheduler)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    return tmp_path / "pipe", unet


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_imported_pipeline_samples_like_diffusers(sampler, tmp_path):
    """DDPM (20 steps) and DDIM (eta = 0, 20 steps), leading spacing: docs/diffusion.md lists no difference
    for these; the tolerance covers diffusers' float32 schedule (difference 5)."""
    from lddpm.sampling import sample

    folder, unet = ddpm_pipeline_folder(tmp_path)
    import_diffusers(folder, tmp_path / "run")
    pipe = load_pipeline(tmp_path / "run")
    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(7)
    if sampler == "ddpm":
        expected = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler.from_pretrained(folder / "scheduler"))
        out = expected(batch_size=2, generator=g, num_inference_steps=20, output_type="np").images
    else:
        scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
        expected = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
        out = expected(batch_size=2, generator=g, num_inference_steps=20, eta=0.0, use_clipped_model_output=True,
                       output_type="np").images
    expected = torch.from_numpy(out).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(shape, generator=g)
    ours = sample(pipe.model, pipe.diffusion, shape, sampler=sampler, num_steps=20, spacing="leading", x_T=x_T,
                  generator=g)
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert max_diff(ours, expected) <= 1e-4
    assert float(expected.std()) > 0.05  # the samples are not trivially constant


def test_provenance_hash_follows_the_file_contents(tmp_path):
    from lddpm.convert.runs import folder_sha256

    folder = saved_unet(tmp_path)
    before, files = folder_sha256(folder)
    assert sorted(f[0] for f in files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw, indent=1))  # same config, other bytes
    assert folder_sha256(folder)[0] != before


def test_imported_pipeline_is_evaluated_like_a_trained_run(tmp_path):
    """`lddpm eval`'s evaluate_checkpoint on an imported grey 8x8 DDPM pipeline, against a prepared cache."""
    from helpers import write_random_idx
    from test_evaluate import _extractor

    from lddpm import evaluate as ev

    unet = diffusers_unet(PLAIN_SMALL | dict(in_channels=1, out_channels=1, sample_size=8))
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    import_diffusers(tmp_path / "pipe", tmp_path / "run", dataset="fashion-mnist")
    root, cache = write_random_idx(tmp_path / "idx"), tmp_path / "cache"
    result = ev.evaluate_checkpoint(tmp_path / "run", num=8, sampler="ddim", num_steps=2, batch_size=8,
                                    extractor=_extractor(), classifier=None, cache_dir=cache, data_root=root,
                                    partial_dir=tmp_path / "s", progress=False)
    assert result["num_images"] == 8 and result["resolution"] == 8 and result["fid"] > 0
    assert result["reference"]["dataset"] == "fashion-mnist"


def test_scheduler_config_becomes_the_diffusion_section(tmp_path):
    folder, _ = ddpm_pipeline_folder(tmp_path, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    import_diffusers(folder, tmp_path / "run")
    d = load_checkpoint(tmp_path / "run").meta["config"]["diffusion"]
    assert (d["schedule"], d["num_timesteps"], d["objective"], d["rescale_zero_terminal_snr"]) == ("linear", 1000, "v", True)
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["components"]["scheduler"]["class"] == "DDPMScheduler"
    assert provenance["pipeline_class"] == "DDPMPipeline" and len(provenance["sha256"]) == 64


def test_ddim_pipeline_scheduler_is_read(tmp_path):
    unet = diffusers_unet(PLAIN_SMALL | dict(in_channels=3, out_channels=3, sample_size=8))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    set_alpha_to_one=False)
    diffusers.DDIMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    summary = import_diffusers(tmp_path / "pipe", tmp_path / "run")
    assert summary["classes"]["scheduler"] == "DDIMScheduler"
    assert any("set_alpha_to_one" in note for note in summary["notes"])
    assert load_checkpoint(tmp_path / "run").meta["config"]["diffusion"]["schedule"] == "scaled_linear"


@pytest.mark.parametrize("schedule", [dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="scaled_linear",
                                      beta_start=0.00085, beta_end=0.012, clip_sample=False)])
def test_exported_scheduler_has_the_same_betas(schedule, tmp_path):
    from lddpm.convert.diffusers import scheduler_from_diffusion
    from lddpm.schedule import NoiseSchedule

    name = {"squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear"}[schedule["beta_schedule"]]
    written = scheduler_from_diffusion({"schedule": name, "num_timesteps": 1000, "objective": "eps"},
                                       latent=not schedule.get("clip_sample", True))
    theirs = diffusers.DDPMScheduler.from_config(written)
    ours = NoiseSchedule.from_name(name, 1000)
    assert max_diff(theirs.betas, ours.betas) <= 1e-7


# ----------------------------------------------------------------------------- refusals


def run_cli(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code)


def assert_refused(tmp_path: Path, src: Path, capsys, match: str) -> None:
    out = tmp_path / "refused-run"
    assert run_cli("import", str(src), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".refused-run*"))


def saved_unet(tmp_path: Path) -> Path:
    diffusers_unet(DDPM_SMALL).save_pretrained(tmp_path / "hf", safe_serialization=True)
    return tmp_path / "hf"


def test_pickle_weights_are_refused_unread(tmp_path, capsys):
    folder = saved_unet(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    assert_refused(tmp_path, folder, capsys, "pickle")
    assert_refused(tmp_path, folder, capsys, "safetensors")


def test_missing_config_is_refused(tmp_path, capsys):
    folder = saved_unet(tmp_path)
    (folder / "config.json").unlink()
    assert_refused(tmp_path, folder, capsys, "no unet/, transformer/ or vae/")
    pipe = tmp_path / "pipe"
    shutil.copytree(folder, pipe / "unet")
    assert_refused(tmp_path, pipe, capsys, "config.json not found")


@pytest.mark.parametrize("field,value,match", [
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
     "down_block_types[0] = \"CrossAttnDownBlock2D\""),
    ("act_fn", "gelu", "act_fn"),
    ("resnet_time_scale_shift", "ada_group", "resnet_time_scale_shift"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "must mirror"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("upcast_everything", True, "unknown config field(s) upcast_everything"),
    ("_class_name", "VQModel", "'VQModel' is not supported"),
])
def test_unrepresentable_config_fields_are_refused_by_name(field, value, match, tmp_path, capsys):
    folder = saved_unet(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw[field] = value
    (folder / "config.json").write_text(json.dumps(raw))
    assert_refused(tmp_path, folder, capsys, match)


@pytest.mark.parametrize("field,value,match", [
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "down_block_types[0]"),
    ("shift_factor", 0.1159, "shift_factor"),
    ("use_quant_conv", False, "use_quant_conv"),
])
def test_unrepresentable_vae_fields_are_refused_by_name(field, value, match, tmp_path, capsys):
    diffusers_vae(VAES["grey-no-mid-attention"]).save_pretrained(tmp_path / "hf", safe_serialization=True)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    assert_refused(tmp_path, tmp_path / "hf", capsys, match)


def test_mismatched_tensor_shapes_are_refused(tmp_path, capsys):
    folder = saved_unet(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["block_out_channels"] = [16, 32, 32, 64]
    (folder / "config.json").write_text(json.dumps(raw))
    assert_refused(tmp_path, folder, capsys, "has shape")


def test_unrepresentable_scheduler_is_refused(tmp_path, capsys):
    folder, _ = ddpm_pipeline_folder(tmp_path, beta_end=0.012)
    assert_refused(tmp_path, folder, capsys, "beta_end = 0.012")
    raw = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    raw.update(beta_end=0.02, thresholding=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(raw))
    assert_refused(tmp_path, folder, capsys, "thresholding")


def test_cli_import_export_and_existing_output(tmp_path, capsys):
    folder, _ = ddpm_pipeline_folder(tmp_path)
    assert run_cli("import", str(folder), "--out", str(tmp_path / "run"), "--dataset", "cifar10") == 0
    assert "UNet2DModel" in capsys.readouterr().out
    assert load_pipeline(tmp_path / "run").dataset == "cifar10"
    assert run_cli("sample", str(tmp_path / "run"), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.png"),
                   "--quiet") == 0
    assert (tmp_path / "s.png").is_file()
    assert run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--weights", "model") == 0
    assert json.loads((tmp_path / "hf" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(LddpmError, match="not a folder"):
        import_diffusers(tmp_path / "nowhere", tmp_path / "x")


# ----------------------------------------------------------------------------- DiTTransformer2DModel

# Learned sigma (8 = 2 x 4 output channels), diffusers' default norm_eps (1e-5 in the MLP LayerNorm).
DIT_SIGMA = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=5)
# No learned sigma (out_channels left to default = in_channels), 4x4 patches, three heads, and a large MLP
# LayerNorm eps (so that an eps not carried over would show in the outputs).
DIT_PLAIN = dict(num_attention_heads=3, attention_head_dim=8, in_channels=3, num_layers=3, sample_size=8,
                 patch_size=4, num_embeds_ada_norm=3, norm_eps=0.1)
DITS = {"dit-sigma": DIT_SIGMA, "dit-plain": DIT_PLAIN}
# facebook/DiT-XL-2-256's transformer/config.json as published (saved by diffusers 0.12 as a Transformer2DModel).
DIT_XL_2_256 = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
                "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
                "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
                "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
                "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
                "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32,
                "upcast_attention": False, "use_linear_projection": False}


def share_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """Give every block block 0's timestep/class embedding (a trained diffusers DiT has one shared embedding)."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def diffusers_dit(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return share_embedding(perturbed(diffusers.DiTTransformer2DModel(**config), seed))


def dit_inputs(config: dict):
    g = torch.Generator().manual_seed(1)
    r, classes = config["sample_size"], config["num_embeds_ada_norm"]
    x = torch.randn(3, config["in_channels"], r, r, generator=g)
    return x, torch.tensor([3, 500, 999]), torch.tensor([0, classes - 1, classes])  # the last is the null label


@pytest.mark.parametrize("name", list(DITS))
def test_dit_import_export_round_trip(name, tmp_path):
    config = DITS[name]
    theirs = diffusers_dit(config)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    summary = import_diffusers(tmp_path / "hf", tmp_path / "run")
    assert summary["classes"] == {"dit": "DiTTransformer2DModel"}
    ours = load_pipeline(tmp_path / "run").model
    assert type(ours).__name__ == "DiT" and ours.config.learned_sigma == ("out_channels" in config)
    assert ours.null_label == config["num_embeds_ada_norm"]
    x, t, y = dit_inputs(config)
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        assert float(expected.abs().max()) > 0.1
        assert max_diff(ours(x, t, y=y), expected) <= TOL
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["config"]["diffusion"]["learned_variance"] == ours.config.learned_sigma

    export_diffusers(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out" / "model_index.json").exists()  # a pixel-space DiT: no stock pipeline
    again = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    assert state_equal(again.state_dict(), theirs.state_dict())  # every block's embedding copy written
    with torch.no_grad():
        assert max_diff(again(x, timestep=t, class_labels=y).sample, ours(x, t, y=y)) <= TOL
    import_diffusers(tmp_path / "out", tmp_path / "run2")
    assert state_equal(load_checkpoint(tmp_path / "run2").load("ema"), ckpt.load("ema"))


def test_dit_with_differing_block_embeddings_is_refused_naming_the_block(tmp_path, capsys):
    theirs = diffusers_dit(DIT_PLAIN)
    with torch.no_grad():
        theirs.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[1, 0] += 1e-3
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert_refused(tmp_path, tmp_path / "hf", capsys,
                   "transformer_blocks.2 holds its own copy of the shared embedding, and "
                   "transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight differs")


def test_dit_pipeline_imports_as_a_latent_run_and_exports_a_dit_pipeline(tmp_path):
    """DiTPipeline (transformer/ + DDIMScheduler + AutoencoderKL) -> latent run -> DiTPipeline: same images."""
    vae = diffusers_vae(VAES["kl-f4-small"], seed=1)  # 16 px -> 4x4x3 latents
    transformer = diffusers_dit(dict(DIT_SIGMA, in_channels=3, out_channels=6, sample_size=4), seed=2)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    source = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    source.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    # facebook/DiT-XL-2-256's model_index.json also holds id2label (save_pretrained does not write it)
    names = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "shark", "3": "ray", "4": "cock"}  # ImageNet's first 5
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({**index, "id2label": names}))
    summary = import_diffusers(tmp_path / "pipe", tmp_path / "run")
    assert summary["classes"] == {"transformer": "DiTTransformer2DModel", "vae": "AutoencoderKL",
                                  "scheduler": "DDIMScheduler"}
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["config"]["model"]["kind"] == "dit" and ckpt.meta["dataset"]["resolution"] == 16
    assert ckpt.meta["config"]["diffusion"]["learned_variance"] is True  # DDIMScheduler: the 6 channels decide
    pipe = load_pipeline(tmp_path / "run")
    assert pipe.vae is not None and pipe.vae.scaling_factor == pytest.approx(0.3)
    assert pipe.class_names == [names[str(i)] for i in range(5)]
    images, labels = pipe.generate(2, sampler="ddim", num_steps=2, guidance_scale=2.0, progress=False)
    assert images.shape == (2, 16, 16, 3) and list(labels) == [0, 1]  # sampled as latents, decoded by the VAE
    x, t, y = dit_inputs(dict(DIT_SIGMA, in_channels=3, sample_size=4))
    with torch.no_grad():
        assert max_diff(pipe.model(x, t, y=y), transformer(x, timestep=t, class_labels=y).sample) <= TOL

    summary = export_diffusers(tmp_path / "run", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert any("label 1000" in note for note in summary["notes"])  # 5 classes: DiTPipeline guides with label 1000
    again = diffusers.DiTPipeline.from_pretrained(tmp_path / "out")
    assert again.get_label_ids(["goldfish", "Tinca tinca"]) == [1, 0]  # id2label written back
    assert max_diff(again.scheduler.alphas_cumprod, scheduler.alphas_cumprod) == 0
    again.scheduler = scheduler  # lddpm writes trailing timestep spacing; sample with the source's leading one
    images = []
    for p in (source, again):
        p.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(3)
        images.append(torch.from_numpy(p(class_labels=[1, 4], guidance_scale=1.0, generator=g,
                                         num_inference_steps=4, output_type="np").images))
    assert float(images[0].std()) > 0.01 and max_diff(images[0], images[1]) <= 1e-5


def test_dit_xl_2_256_config_maps_onto_the_registry_dit_xl_2():
    from lddpm.convert.diffusers import CLASS_FOR_KIND, diffusers_names, dit_config_from_diffusers
    from lddpm.nn import network_config

    config = dit_config_from_diffusers(DIT_XL_2_256)
    # diffusers' DiT: timestep frequencies over 128 - 1, MLP LayerNorm eps 1e-5 (its norm_eps default)
    assert config == network_config("dit", "dit-xl/2").replace(freq_shift=1.0, mlp_norm_eps=1e-5)
    with torch.device("meta"):
        ours = network_from_config("dit", config)
        theirs = diffusers.DiTTransformer2DModel(**CLASSES["DiTTransformer2DModel"].config_to_diffusers(config))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == 674_834_720  # the paper's code, position embedding not counted
    embedding = (256 * 1152 + 1152) + (1152 * 1152 + 1152) + 1001 * 1152  # timestep MLP + class table
    assert n_theirs == n_ours + 27 * embedding  # diffusers repeats the embedding in blocks 1..27
    # every lddpm tensor has a diffusers tensor of its shape; with the copies, every diffusers tensor is named
    entry = CLASS_FOR_KIND["dit"]
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    named = set()
    for key, tensor in ours.state_dict().items():
        names = diffusers_names(key, entry.module_pairs(config))
        assert sum(shapes[n][0] for n in names) == tensor.shape[0]  # qkv: to_q, to_k, to_v stacked
        assert all(shapes[n][1:] == tensor.shape[1:] for n in names)
        named.update(names)
    named.update(copy for _, copies in entry.copies(config) for copy in copies)
    assert named == set(shapes) - {"pos_embed.pos_embed"}  # diffusers' fixed sin-cos buffer (lddpm's is not saved)


@pytest.mark.parametrize("field,value,match", [
    ("norm_type", "ada_norm", "norm_type = \"ada_norm\""),
    ("norm_elementwise_affine", True, "norm_elementwise_affine"),
    ("activation_fn", "geglu", "activation_fn"),
    ("dropout", 0.1, "dropout"),
    ("out_channels", 5, "out_channels = 5"),
    ("num_embeds_ada_norm", 0, "num_embeds_ada_norm"),
    ("cross_attention_dim", 768, "cross_attention_dim"),
    ("interpolation_scale", 2, "interpolation_scale"),
])
def test_unrepresentable_dit_fields_are_refused_by_name(field, value, match):
    from lddpm.convert.diffusers import dit_config_from_diffusers

    with pytest.raises(LddpmError, match=match.replace("(", r"\(")):
        dit_config_from_diffusers({**DIT_XL_2_256, field: value})
    if field == "norm_type":  # a Transformer2DModel that is not a DiT is refused as a class
        from lddpm.convert.diffusers import model_class
        with pytest.raises(LddpmError, match="not a DiT"):
            model_class("Transformer2DModel", "here", {**DIT_XL_2_256, field: value})


def test_lddpm_dit_exports_only_with_diffusers_timestep_frequencies(tmp_path):
    from lddpm.checkpoint import save_run_checkpoint
    from lddpm.config import Config, save_config

    config = network_from_config("dit", dict(resolution=8, in_channels=4, patch_size=2, hidden_size=32, depth=2,
                                             num_heads=2, num_classes=5, learned_sigma=True)).config
    for shift in (0.0, 1.0):
        net = perturbed(network_from_config("dit", config.replace(freq_shift=shift)), 4)
        run = tmp_path / f"run{shift:g}"
        run_config = Config()
        run_config.diffusion.learned_variance = True
        save_config(run_config, run)
        meta = {"kind": "diffusion", "step": 1, "config": run_config.to_dict(),
                "network": {"kind": "dit", "config": net.config.to_dict()}, "dataset": None}
        save_run_checkpoint(run, 1, {"model": net.state_dict(), "ema": net.state_dict()}, meta, keep=1)
        if shift == 0.0:  # the paper's frequencies: diffusers' DiT cannot compute them
            with pytest.raises(LddpmError, match="model.overrides.freq_shift = 1"):
                export_diffusers(run, tmp_path / "hf0")
            assert not (tmp_path / "hf0").exists()
            continue
        export_diffusers(run, tmp_path / "hf")
        theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
        x, t, y = dit_inputs(DIT_SIGMA)
        with torch.no_grad():
            assert max_diff(theirs(x, timestep=t, class_labels=y).sample, net(x, t, y=y)) <= TOL
        assert json.loads((tmp_path / "hf" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] \
            == "DDIMScheduler"


def test_dit_saved_as_a_transformer2dmodel_imports_like_diffusers_loads_it(tmp_path):
    """DiT folders saved before diffusers 0.28 (facebook/DiT-*) name the class Transformer2DModel."""
    theirs = diffusers_dit(DIT_SIGMA)
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    legacy = {k: DIT_XL_2_256[k] for k in ("cross_attention_dim", "num_vector_embeds", "only_cross_attention",
                                           "use_linear_projection")}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, **legacy, "_class_name": "Transformer2DModel"}))
    loaded = diffusers.Transformer2DModel.from_pretrained(tmp_path / "hf").eval()  # diffusers' own remapping
    assert type(loaded).__name__ == "DiTTransformer2DModel"
    import_diffusers(tmp_path / "hf", tmp_path / "run")
    x, t, y = dit_inputs(DIT_SIGMA)
    with torch.no_grad():
        assert max_diff(load_pipeline(tmp_path / "run").model(x, t, y=y),
                        loaded(x, timestep=t, class_labels=y).sample) <= TOL
