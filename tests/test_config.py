"""Configuration: presets, TOML round trip, --set overrides, clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lddpm.config import (
    tomllib,
    PRESETS,
    Config,
    apply_overrides,
    config_from_preset,
    load_config,
    parse_value,
    save_config,
    to_toml,
    validate,
)
from lddpm.errors import LddpmError
from lddpm.train import check_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_toml(name, tmp_path):
    config = config_from_preset(name)
    again = Config.from_dict(tomllib.loads(to_toml(config)))
    assert again == config
    save_config(config, tmp_path)
    assert load_config(tmp_path / "config.toml") == config
    assert load_config(tmp_path) == config  # a run folder
    assert Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_the_packaged_config_files(name):
    assert PRESETS[name].parent.name == "configs"
    assert load_config(CONFIGS / f"{name}.toml") == config_from_preset(name) == load_config(name)


def test_required_presets_exist():
    for name in ("fashion-quick", "vae-fashion-quick", "latent-fashion-quick", "cifar10-ddpm", "vae-imagenet100", "imagenet100-ldm"):
        assert name in PRESETS
    paper = config_from_preset("cifar10-ddpm")
    assert (paper.optim.lr, paper.optim.batch_size, paper.run.steps) == (2e-4, 128, 800_000)
    assert (paper.optim.warmup_steps, paper.optim.ema_decay, paper.optim.grad_clip) == (5000, 0.9999, 1.0)
    assert paper.model.overrides["dropout"] == 0.1 and paper.data.hflip


def test_overrides_are_parsed_as_toml_literals():
    config = apply_overrides(
        Config(),
        [
            "run.steps=12",
            "optim.lr=3e-4",
            "optim.betas=[0.9, 0.99]",
            "run.bf16=true",
            "data.root=/some/where",
            "data.dataset=\"mnist\"",
            "model.overrides.dropout=0.25",
        ],
    )
    assert config.run.steps == 12 and config.optim.lr == 3e-4 and config.run.bf16 is True
    assert config.optim.betas == [0.9, 0.99]
    assert config.data.root == "/some/where" and config.data.dataset == "mnist"
    assert config.model.overrides == {"dropout": 0.25}
    assert parse_value("1_000") == 1000 and parse_value("abc") == "abc"


def test_unknown_keys_name_the_key_and_allowed_ones(tmp_path):
    with pytest.raises(LddpmError, match=r"'stepz'.*allowed:.*steps"):
        apply_overrides(Config(), ["run.stepz=3"])
    with pytest.raises(LddpmError, match=r"\[trainer\].*allowed: model"):
        Config.from_dict({"trainer": {}})
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(LddpmError, match=r"bad.toml.*learning_rate.*allowed: lr"):
        load_config(path)
    with pytest.raises(LddpmError, match="section.key=value"):
        apply_overrides(Config(), ["steps"])


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(LddpmError, match="run.steps.*integer"):
        apply_overrides(Config(), ["run.steps=1.5"])
    with pytest.raises(LddpmError, match="run.bf16.*true, false or \"auto\""):
        apply_overrides(Config(), ["run.bf16=yes"])
    assert apply_overrides(Config(), ['run.bf16="auto"']).run.bf16 == "auto"
    with pytest.raises(LddpmError, match="batch_size.*positive"):
        validate(apply_overrides(Config(), ["optim.batch_size=0"]))
    with pytest.raises(LddpmError, match="ema_decay"):
        validate(apply_overrides(Config(), ["optim.ema_decay=1.5"]))
    for bad in ("1.0", "-0.1"):
        with pytest.raises(LddpmError, match=r"optim.cooldown = .*fraction of the run in \[0, 1\)"):
            validate(apply_overrides(Config(), [f"optim.cooldown={bad}"]))
    with pytest.raises(LddpmError, match=r"optim.cooldown_shape = 'cosine' is not allowed; choose one of: linear, sqrt"):
        validate(apply_overrides(Config(), ['optim.cooldown_shape="cosine"']))
    with pytest.raises(LddpmError, match="guidance_scale"):
        validate(apply_overrides(Config(), ["run.guidance_scale=3.0"]))
    path = tmp_path / "broken.toml"
    path.write_text("[run\nsteps = 3\n")
    with pytest.raises(LddpmError, match="broken.toml.*TOML"):
        load_config(path)
    with pytest.raises(LddpmError, match="unknown preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize("override,match", [
    ("model.kind=resnet", "model.kind = 'resnet' is not allowed; choose one of: unet, vae"),
    ("model.name=resnet-9000", "model.name.*allowed.*tiny"),
    ("diffusion.schedule=zigzag", "diffusion.schedule.*choose one of: linear"),
    ("diffusion.objective=noise", "diffusion.objective.*eps, x0, v"),
    ("data.dataset=celeba", "data.dataset.*fashion-mnist"),
    ("run.sampler=lms", "run.sampler.*ddpm, ddim, dpm\\+\\+2m"),
    ("vae.recon_loss=l3", "vae.recon_loss.*l1, l2"),
])
def test_unknown_names_are_refused_with_the_owning_modules_choices(override, match):
    with pytest.raises(LddpmError, match=match):
        check_names(apply_overrides(Config(), [override]))
