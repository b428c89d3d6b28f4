"""Text runs in and out of diffusers (`lddpm export` / `lddpm import`): UNet2DConditionModel, the text encoder
folders, StableDiffusionPipeline for latent runs; diffusers and transformers as the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_hub import VAES, assert_refused, diffusers_vae, perturbed, run_cli, state_equal  # noqa: E402
from test_text_train import captioned, text_config  # noqa: E402,F401  (captioned: a fixture)

from lddpm.checkpoint import load_checkpoint, save_run_checkpoint  # noqa: E402
from lddpm.convert.diffusers import (UNET2D_CONDITION_DEFAULTS, unet_cond_config_from_diffusers,  # noqa: E402
                                     unet_cond_config_to_diffusers)
from lddpm.convert.runs import export_diffusers, import_diffusers  # noqa: E402
from lddpm.errors import LddpmError  # noqa: E402
from lddpm.nn import build_network, network_from_config  # noqa: E402
from lddpm.nn.text import MINILM_WEIGHTS_SHA256, file_sha256  # noqa: E402
from lddpm.pipeline import load_pipeline  # noqa: E402
from lddpm.train import train  # noqa: E402

TOL = 1e-5
PROMPT = "a dark square"
GEN = dict(sampler="ddim", num_steps=4, prompts=PROMPT, guidance_scale=3.0, seed=3, progress=False)


def perturb_run(run: Path) -> dict[str, torch.Tensor]:
    """Replace the run's network weights (model and EMA) by perturbed ones, so that zero-initialised outputs do
    not make a comparison 0 == 0; returns the new state."""
    ckpt = load_checkpoint(run)
    net = network_from_config(ckpt.meta["network"]["kind"], ckpt.meta["network"]["config"])
    net.load_state_dict(ckpt.load("ema"))
    state = perturbed(net, seed=5).state_dict()
    groups = {g: ckpt.load(g) for g in ckpt.groups if g not in ("model", "ema", "optimizer")}
    save_run_checkpoint(run, int(ckpt.meta["step"]) + 1, {**groups, "model": state, "ema": state}, ckpt.meta, keep=1)
    return state


@pytest.fixture(scope="module")
def pixel_run(captioned, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("pixel") / "run"
    train(text_config(captioned, "run.steps=2"), run, progress=False)
    perturb_run(run)
    return run


@pytest.fixture(scope="module")
def latent_run(captioned, tmp_path_factory) -> Path:  # noqa: F811
    """A 16 px grey VAE (diffusers AutoencoderKL, f = 2, imported) and a text U-Net trained on its 8x8x4 latents."""
    base = tmp_path_factory.mktemp("latent")
    diffusers_vae(VAES["grey-no-mid-attention"]).save_pretrained(base / "hf-vae", safe_serialization=True)
    import_diffusers(base / "hf-vae", base / "vae")
    run = base / "run"
    train(text_config(captioned, "run.steps=2", f"data.latent={json.dumps(str(base / 'vae'))}"), run, progress=False)
    perturb_run(run)
    return run


def unet_inputs(pipe, n: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *pipe.latent_shape, generator=g)
    t = torch.tensor([3, 871][:n])
    return x, t, pipe.text_encoder.encode(["a dark square", "a bright square"][:n])


# ----------------------------------------------------------------------------- pixel text runs


def test_pixel_text_run_exports_a_unet2dconditionmodel_that_computes_the_same(pixel_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run_cli("export", str(pixel_run), "--out", str(out)) == 0
    assert "UNet2DConditionModel" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["scheduler", "text_encoder", "tokenizer", "unet"]
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["cross_attention_dim"] == 384
    assert config["attention_head_dim"] == 2 and config["use_linear_projection"] is True  # 2 heads (historic name)
    assert json.loads((out / "text_encoder" / "config.json").read_text())["use_attention_mask"] is True
    assert json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 8
    assert file_sha256(out / "text_encoder" / "model.safetensors") == MINILM_WEIGHTS_SHA256  # copied byte for byte

    pipe = load_pipeline(pixel_run)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).eval()
    x, t, context = unet_inputs(pipe)
    with torch.no_grad():
        ours = pipe.model(x, t, context=context)
        want = theirs(x, t, encoder_hidden_states=context).sample
        other = pipe.model(x, t, context=context.flip(0))
    assert (ours - other).abs().max() > 1e-3  # the prompt matters in this comparison
    assert (ours - want).abs().max().item() <= TOL


def test_pixel_text_run_import_round_trips(pixel_run, tmp_path):
    export_diffusers(pixel_run, tmp_path / "hf")
    summary = import_diffusers(tmp_path / "hf", tmp_path / "run")
    assert summary["classes"]["unet"] == "UNet2DConditionModel"
    original, imported = load_checkpoint(pixel_run), load_checkpoint(tmp_path / "run")
    assert imported.meta["text"]["encoder"] == "minilm"  # its weights hash equals MiniLM's: no copy kept
    assert imported.meta["text"]["identity"] == original.meta["text"]["identity"]
    assert not (tmp_path / "run" / "text_encoder").exists()
    assert state_equal(imported.load("ema"), original.load("ema"))
    a, _ = load_pipeline(pixel_run).generate(2, **GEN)
    b, _ = load_pipeline(tmp_path / "run").generate(2, **GEN)
    assert np.array_equal(a, b)


def test_another_text_encoder_is_copied_into_the_run_and_exported_again(pixel_run, tmp_path):
    """A pipeline whose text encoder is not MiniLM: the run keeps a copy (the source may go away), samples with
    it, and exports it again byte for byte."""
    from safetensors.torch import load_file, save_file

    export_diffusers(pixel_run, tmp_path / "hf")
    weights = tmp_path / "hf" / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    import_diffusers(tmp_path / "hf", tmp_path / "run")
    shutil.rmtree(tmp_path / "hf")
    meta = load_checkpoint(tmp_path / "run").meta
    assert meta["text"]["encoder"] == str((tmp_path / "run" / "text_encoder").resolve())
    pipe = load_pipeline(tmp_path / "run")
    changed = pipe.text_encoder.encode([PROMPT])
    assert not torch.equal(changed, load_pipeline(pixel_run).text_encoder.encode([PROMPT]))
    pipe.generate(1, **{**GEN, "num_steps": 2})
    export_diffusers(tmp_path / "run", tmp_path / "again")
    assert file_sha256(tmp_path / "again" / "text_encoder" / "model.safetensors") == \
        file_sha256(tmp_path / "run" / "text_encoder" / "model.safetensors")


# ----------------------------------------------------------------------------- latent text runs


def test_latent_text_run_exports_a_stable_diffusion_pipeline(latent_run, tmp_path):
    out = tmp_path / "sd"
    export_diffusers(latent_run, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["text_encoder"] == ["transformers", "BertModel"]
    sd = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    pipe = load_pipeline(latent_run)
    assert sd.vae.config.scaling_factor == pytest.approx(float(pipe.vae.scaling_factor))

    # the pipeline's prompt encoding is lddpm's, exactly (padding to max_length, attention mask)
    cond, uncond = sd.encode_prompt(PROMPT, "cpu", 1, True)
    assert torch.equal(cond, pipe.text_encoder.encode([PROMPT]))
    assert torch.equal(uncond, pipe.text_encoder.encode([""]))

    x, t, context = unet_inputs(pipe)
    with torch.no_grad():
        want = sd.unet(x, t, encoder_hidden_states=context).sample
        assert (pipe.model(x, t, context=context) - want).abs().max().item() <= TOL

    # diffusers generates what lddpm generates: same starting noise, DDIM (eta 0) on the exported schedule
    ours, _ = pipe.generate(2, **GEN)
    sd.scheduler = diffusers.DDIMScheduler.from_config(sd.scheduler.config)
    x_T = torch.randn((2, *pipe.latent_shape), generator=torch.Generator().manual_seed(GEN["seed"]))
    theirs = sd([PROMPT] * 2, num_inference_steps=GEN["num_steps"], guidance_scale=GEN["guidance_scale"], eta=0.0,
                latents=x_T, output_type="np").images
    assert theirs.shape == ours.shape == (2, 16, 16, 1)
    assert np.abs(theirs * 255.0 - ours.astype(np.float64)).max() <= 1.0  # uint8 rounding
    assert ours.std() > 2  # not a constant image


def test_latent_text_run_import_round_trips(latent_run, tmp_path):
    export_diffusers(latent_run, tmp_path / "sd")
    summary = import_diffusers(tmp_path / "sd", tmp_path / "run")
    assert summary["classes"]["vae"] == "AutoencoderKL" and summary["classes"]["text_encoder"] == "BertModel"
    original, imported = load_checkpoint(latent_run), load_checkpoint(tmp_path / "run")
    assert imported.meta["text"]["encoder"] == "minilm" and imported.meta["text"]["max_length"] == 8
    assert state_equal(imported.load("ema"), original.load("ema"))
    assert state_equal(imported.load("vae"), original.load("vae"))
    a, _ = load_pipeline(latent_run).generate(2, **GEN)
    b, _ = load_pipeline(tmp_path / "run").generate(2, **GEN)
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- configs and bad input


@pytest.mark.parametrize("fields", [
    dict(num_heads=2),
    dict(num_head_channels=8, attention_resolutions=(32, 8), transformer_depth=2, learned_sigma=True),
    dict(num_heads=4, use_scale_shift_norm=True, num_classes=3, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1.0),
])
def test_text_unet_configs_map_both_ways(fields):
    config = build_network("unet", "tiny", in_channels=1, context_dim=384, **fields).config
    theirs = unet_cond_config_to_diffusers(config)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**theirs)  # diffusers accepts every field as written
        ours = network_from_config("unet", config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ref) == count(ours)
    assert unet_cond_config_from_diffusers({"_class_name": "UNet2DConditionModel", **theirs}) == config


@pytest.mark.parametrize("field, value", [
    ("use_linear_projection", False), ("mid_block_type", "UNetMidBlock2D"), ("upcast_attention", True),
    ("encoder_hid_dim", 768), ("addition_embed_type", "text_time"), ("attention_head_dim", [2, 2, 4]),
    ("only_cross_attention", True), ("transformer_layers_per_block", [1, 2, 1]), ("cross_attention_norm", "group_norm"),
])
def test_unrepresentable_unet2dconditionmodel_fields_are_refused_by_name(field, value):
    config = unet_cond_config_to_diffusers(build_network("unet", "tiny", in_channels=1, context_dim=384, num_heads=2,
                                                         attention_resolutions=(16, 8)).config)
    with pytest.raises(LddpmError, match=f"{field}"):
        unet_cond_config_from_diffusers({**config, field: value})
    assert set(config) == set(UNET2D_CONDITION_DEFAULTS)


def _handmade_run(folder: Path, kind: str, config, text: dict) -> None:
    """A diffusion checkpoint of an untrained network with a text run's meta (nothing to train)."""
    from lddpm.config import Config

    net = network_from_config(kind, config)
    meta = {"kind": "diffusion", "step": 1, "config": Config().to_dict(), "text": text,
            "network": {"kind": kind, "config": net.config.to_dict()}, "dataset": None}
    save_run_checkpoint(folder, 1, {"model": net.state_dict(), "ema": net.state_dict()}, meta, keep=1)


def test_text_networks_diffusers_cannot_hold_are_refused_by_name(pixel_run, tmp_path):
    text = load_checkpoint(pixel_run).meta["text"]
    config = load_checkpoint(pixel_run).meta["network"]["config"]
    _handmade_run(tmp_path / "no-mid", "unet", {**config, "mid_attention": False}, text)
    with pytest.raises(LddpmError, match="mid_attention=false") as err:
        export_diffusers(tmp_path / "no-mid", tmp_path / "out")
    assert "nothing was written" in str(err.value) and not (tmp_path / "out").exists()
    dit = build_network("dit", "dit-tiny/4", in_channels=1, resolution=16, hidden_size=16, depth=2, num_heads=2,
                        context_dim=384).config  # refused for the prompts, before its freq_shift
    _handmade_run(tmp_path / "dit", "dit", dit, text)
    with pytest.raises(LddpmError, match="context_dim=384: a DiT that reads prompts cannot be exported"):
        export_diffusers(tmp_path / "dit", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_diffusers_loads_a_text_adaln_zero_transformer2dmodel_as_a_dit_without_cross_attention(tmp_path):
    """Why a text DiT is refused: the class that computes it does not survive save/load in diffusers."""
    model = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8, patch_size=2,
        num_embeds_ada_norm=3, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        activation_fn="gelu-approximate", attention_bias=True, cross_attention_dim=16, caption_channels=12)
    model.save_pretrained(tmp_path / "t", safe_serialization=True)
    loaded = diffusers.Transformer2DModel.from_pretrained(tmp_path / "t", local_files_only=True)
    assert type(loaded).__name__ == "DiTTransformer2DModel"
    assert not any("attn2" in name or "caption" in name for name, _ in loaded.named_parameters())


def test_bad_text_pipeline_folders_are_refused_by_name(pixel_run, tmp_path, capsys):
    export_diffusers(pixel_run, tmp_path / "hf")
    cases = {
        "no-mask": ("text_encoder/config.json", "use_attention_mask", False, "use_attention_mask = false"),
        "long": ("tokenizer/tokenizer_config.json", "model_max_length", 1000000000000000019884624838656,
                 "model_max_length = 1000000000000000019884624838656"),
    }
    for name, (file, key, value, match) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "hf", folder)
        data = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps({**data, key: value}))
        with pytest.raises(LddpmError, match=match):
            import_diffusers(folder, tmp_path / f"run-{name}")
        assert not (tmp_path / f"run-{name}").exists()
    shutil.rmtree(tmp_path / "hf" / "text_encoder")
    assert_refused(tmp_path, tmp_path / "hf", capsys, "reads prompts, but there is no text_encoder/")
    assert_refused(tmp_path, tmp_path / "hf" / "unet", capsys, "reads prompts, but there is no text_encoder/")
