"""text.encoder = "scratch": a word-level encoder trained jointly with the network (no pretrained weights).

The encoder lives inside the network (registered as `text_encoder`), so the optimizer, the EMA, DDP and the
checkpoint carry it like any other layer; the network takes token ids and encodes them itself."""

from __future__ import annotations

import pytest
import torch

from lddpm.checkpoint import load_checkpoint
from lddpm.convert.runs import export_diffusers
from lddpm.errors import LddpmError
from lddpm.nn import build_network
from lddpm.pipeline import load_pipeline
from lddpm.train import train

from helpers import tiny_text_config, write_captioned_squares


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return write_captioned_squares(tmp_path_factory.mktemp("scratch"), 16, jitter=False)


def scratch_config(captioned, *sets: str, network: str = "unet"):
    return tiny_text_config(captioned, "scratch", 6, 4, "optim.ema_decay=0.5", "optim.ema_warmup=false", *sets,
                            network=network)


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
