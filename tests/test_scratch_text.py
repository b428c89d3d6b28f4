"""text.encoder = "scratch": a word-level encoder trained jointly with the network (no pretrained weights).

The encoder lives inside the network (registered as `text_encoder`), so the optimizer, the EMA, DDP and the
checkpoint carry it like any other layer; the network takes token ids and encodes them itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lddpm.checkpoint import load_checkpoint
from lddpm.config import apply_overrides, config_from_preset
from lddpm.convert.runs import export_diffusers
from lddpm.errors import LddpmError
from lddpm.nn import build_network
from lddpm.pipeline import load_pipeline
from lddpm.train import train

CAPTIONS = {"bright": ["a bright square", "a white block"], "dark": ["a dark square"]}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    base = tmp_path_factory.mktemp("scratch")
    folder = base / "images" / "train"
    folder.mkdir(parents=True)
    lines = []
    for i in range(16):
        kind = "bright" if i % 2 else "dark"
        img = np.zeros((16, 16), np.uint8)
        img[4:12, 4:12] = 230 if kind == "bright" else 90
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[kind]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return base / "images", base / "cache"


def scratch_config(captioned, *sets: str, network: str = "unet"):
    root, cache = captioned
    nets = {
        "unet": ["model.overrides={model_channels=8, channel_mult=[1, 2], attention_resolutions=[8], num_heads=2}"],
        "dit": ['model.kind="dit"', 'model.name="dit-tiny/4"', "model.overrides={hidden_size=16, depth=2, num_heads=2}"],
    }
    base = [f"data.root={json.dumps(str(root))}", f"data.cache_dir={json.dumps(str(cache))}", 'data.dataset="captioned"',
            "data.resolution=16", "optim.batch_size=8", "run.steps=4", "run.log_every=1", "run.sample_every=0",
            "run.checkpoint_every=100", 'run.device="cpu"', "run.num_sample_images=4", "run.sample_steps=2",
            "run.class_conditional=false", 'text.encoder="scratch"', "text.max_length=6", "text.caption_dropout=0.25",
            "optim.ema_decay=0.5", "optim.ema_warmup=false"]
    return apply_overrides(config_from_preset("fashion-quick"), base + nets[network] + list(sets))


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_a_scratch_encoder_trains_with_the_network_and_the_run_generates_from_prompts(captioned, tmp_path, network):
    run = tmp_path / "run"
    train(scratch_config(captioned, "run.steps=8", "optim.lr=3e-3", network=network), run, progress=False)
    ckpt = load_checkpoint(run)
    config = ckpt.meta["network"]["config"]
    assert ckpt.meta["text"]["encoder"] == "scratch"
    assert config["scratch_vocab"][:3] == ["[PAD]", "[UNK]", "[CLS]"]
    assert {"bright", "dark", "square", "white", "block", "a"} <= set(config["scratch_vocab"])
    first = build_network(ckpt.meta["network"]["kind"], ckpt.meta["network"]["kind"] == "unet" and "tiny" or
                          "dit-tiny/4", **{k: v for k, v in config.items()})
    trained = ckpt.load("model")
    fresh = first.state_dict()
    moved = [k for k in trained if k.startswith("text_encoder.") and not torch.equal(trained[k], fresh[k])]
    assert moved, "the encoder's weights never changed: it is not being trained"
    ema = ckpt.load("ema")
    assert any(not torch.equal(ema[k], trained[k]) for k in trained if k.startswith("text_encoder."))
    pipe = load_pipeline(run)
    # the pipeline encodes prompts with the (EMA) network's own encoder; ids and states give the same output
    enc = pipe.model.conditioning.text_encoder
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 400)
    ids = enc.tokenize(["a dark square", "a white block"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, context=ids), pipe.model(x, t, context=enc.encode(
            ["a dark square", "a white block"])))
        dark, bright = (pipe.model(x, t, context=enc.encode([p] * 2)) for p in ("a dark square", "a bright square"))
    assert (dark - bright).abs().max() > 1e-5 * dark.abs().max()   # the prompt reaches the output (beyond rounding)
    a, _ = pipe.generate(2, sampler="ddim", num_steps=3, prompts="a dark square", guidance_scale=3.0, progress=False)
    assert a.shape == (2, 16, 16, 1)


def test_scratch_runs_refuse_what_they_cannot_do(captioned, tmp_path):
    run = tmp_path / "run"
    train(scratch_config(captioned, "run.steps=1"), run, progress=False)
    pipe = load_pipeline(run)
    with pytest.raises(LddpmError, match="tokens"):
        pipe.generate(1, prompts="far more words than six tokens allow here", progress=False)
    with pytest.raises(LddpmError, match="scratch"):
        export_diffusers(run, tmp_path / "exported")
    with pytest.raises(LddpmError, match="integers"):
        plain = build_network("unet", "tiny", resolution=16, in_channels=1, model_channels=8, channel_mult=[1, 2],
                              attention_resolutions=[8], num_heads=2, context_dim=12)
        plain(torch.randn(1, 1, 16, 16), torch.tensor([3]), context=torch.ones(1, 4, dtype=torch.long))
