"""Text-to-image end to end: captions -> frozen MiniLM states (cached) -> cross-attention U-Net / DiT ->
prompts, negative prompts and guidance at sampling; the bad inputs of issue 27."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lddpm.checkpoint import load_checkpoint
from lddpm.config import apply_overrides
from lddpm.errors import LddpmError
from lddpm.pipeline import load_pipeline
from lddpm.sampling import ClassifierFreeGuidance
from lddpm.train import train

from helpers import tiny_text_config, write_captioned_squares

pytest.importorskip("transformers")
from lddpm.nn.text import minilm_folder  # noqa: E402

try:
    minilm_folder()
except LddpmError as exc:  # pragma: no cover - the wheel is installed by `make setup`
    pytest.skip(f"MiniLM is not installed: {exc}", allow_module_level=True)

@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple[Path, Path]:
    """An image folder of 16x16 squares with metadata.jsonl captions (bright or dark), and a cache dir."""
    return write_captioned_squares(tmp_path_factory.mktemp("captioned"), 24, jitter=True)


def text_config(captioned, *sets: str, network: str = "unet"):
    return tiny_text_config(captioned, "minilm", 8, 3, *sets, network=network)


@pytest.mark.parametrize("network", ["unet", "dit"])
def test_a_text_run_trains_saves_and_generates_from_prompts(captioned, tmp_path, network):
    run = tmp_path / "run"
    train(text_config(captioned, network=network), run, progress=False)
    meta = load_checkpoint(run).meta
    assert meta["text"]["encoder"] == "minilm" and meta["text"]["identity"]["max_length"] == 8
    assert meta["text"]["num_captions"] == 4  # "", and the three distinct captions
    assert meta["network"]["config"]["context_dim"] == 384
    assert (run / "samples" / "step_000003.png").exists()   # the grid, one row per caption
    pipe = load_pipeline(run)
    a, _ = pipe.generate(2, sampler="ddim", num_steps=3, prompts="a dark square", guidance_scale=3.0, progress=False)
    b, _ = pipe.generate(2, sampler="ddim", num_steps=3, prompts=["a dark square"] * 2, guidance_scale=3.0,
                         progress=False, batch_size=1)
    assert a.shape == (2, 16, 16, 1) and np.array_equal(a, b)  # same seed, any batch size
    neg, _ = pipe.generate(2, sampler="ddim", num_steps=3, prompts="a dark square", guidance_scale=3.0,
                           negative_prompt="a bright square", progress=False)
    assert neg.shape == a.shape


def test_prompts_change_the_prediction_and_guidance_uses_one_batched_forward(captioned, tmp_path):
    run = tmp_path / "run"
    train(text_config(captioned, "run.steps=6", "optim.lr=3e-3"), run, progress=False)
    pipe = load_pipeline(run)
    calls = []
    model = pipe.model

    def counting(x, t, **cond):
        calls.append({k: v.shape for k, v in cond.items()})
        return model(x, t, **cond)

    ctx, null = pipe.prompt_states(3, "a dark square", None)
    guided = ClassifierFreeGuidance(counting, 4.0, null_context=null)
    x, t = torch.randn(3, 1, 16, 16), torch.full((3,), 500)
    out = guided(x, t, context=ctx)
    assert calls == [{"context": torch.Size([6, 8, 384])}]  # both branches in one forward
    cond_out, null_out = model(x, t, context=ctx), model(x, t, context=null.expand(3, -1, -1))
    torch.testing.assert_close(out, null_out + 4.0 * (cond_out - null_out), atol=1e-5, rtol=1e-5)
    other, _ = pipe.prompt_states(3, "a bright square", None)
    assert not torch.allclose(model(x, t, context=other), cond_out)  # the prompt reaches the network


def test_text_bad_inputs_each_one_clear_error(captioned, tmp_path):
    run = tmp_path / "run"
    train(text_config(captioned, "run.steps=1"), run, progress=False)
    pipe = load_pipeline(run)
    with pytest.raises(LddpmError, match="empty prompt"):
        pipe.generate(1, prompts="  ", progress=False)
    with pytest.raises(LddpmError, match="tokens"):
        pipe.generate(1, prompts="a very long prompt that has far more than eight tokens in it", progress=False)
    with pytest.raises(LddpmError, match="prompts, not class labels"):
        pipe.generate(1, prompts="a dark square", labels=1, progress=False)
    with pytest.raises(LddpmError, match="generates from prompts"):
        pipe.generate(1, progress=False)
    with pytest.raises(LddpmError, match="2 prompts for 1 images"):
        pipe.generate(1, prompts=["a", "b"], progress=False)
    with pytest.raises(LddpmError, match="class_conditional"):
        train(text_config(captioned, "run.class_conditional=true"), tmp_path / "both", progress=False)
    with pytest.raises(LddpmError, match="needs captions"):
        root, cache = captioned
        cfg = apply_overrides(text_config(captioned), ['data.dataset="fashion-mnist"', "data.root=\"/nonexistent\""])
        train(cfg, tmp_path / "nocap", progress=False)


def test_a_prompt_given_to_a_class_run_is_refused(tmp_path):
    from lddpm.nn import build_network
    from lddpm.diffusion import build_diffusion
    from lddpm.config import DiffusionConfig
    from lddpm.pipeline import Pipeline

    model = build_network("unet", "tiny", in_channels=1, resolution=16, num_classes=3, channel_mult=[1, 2],
                          attention_resolutions=[8])
    pipe = Pipeline(model, build_diffusion(DiffusionConfig()), dataset={"class_names": ["a", "b", "c"]})
    with pytest.raises(LddpmError, match="not trained on prompts"):
        pipe.generate(1, prompts="a bag", progress=False)


def test_sample_command_with_prompts_writes_a_labelled_grid(captioned, tmp_path, capsys):
    from lddpm.cli import main

    run = tmp_path / "run"
    train(text_config(captioned, "run.steps=1"), run, progress=False)
    out = tmp_path / "one.png"
    assert main(["sample", str(run), "--prompt", "a dark square", "--num", "2", "--steps", "2",
                 "--guidance-scale", "3", "--negative-prompt", "a bright square", "--out", str(out), "--quiet"]) == 0
    one = np.asarray(Image.open(out))
    listing = tmp_path / "prompts.jsonl"
    listing.write_text('{"prompt": "a dark square"}\n{"prompt": "a white block"}\n')
    many = tmp_path / "many.png"
    assert main(["sample", str(run), "--prompts", str(listing), "--num", "2", "--steps", "2", "--out", str(many),
                 "--quiet"]) == 0
    grid = np.asarray(Image.open(many))
    assert grid.shape[0] > one.shape[0] and grid.shape[1] == one.shape[1]  # two labelled rows, same width
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(SystemExit):
        main(["sample", str(run), "--prompts", str(bad), "--quiet"])
    assert "not UTF-8" in capsys.readouterr().err


def test_prepare_renders_a_scene_set_into_a_captioned_cache(tmp_path):
    """`lddpm prepare fashion-pairs --split test`: scenes rendered from the real Fashion-MNIST test items,
    read back through the captioned reader, with the caption table (null prompt first) in the cache."""
    from lddpm.cli import main
    from lddpm.data import open_cache, prepare

    pytest.importorskip("lddpm.data.scenes")
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it as root)")
    assert main(["prepare", "fashion-pairs", "--split", "test", "--cache-dir", str(tmp_path), "--quiet"]) == 0
    cache = open_cache(prepare("fashion-pairs", split="test", cache_dir=tmp_path, progress=False))
    assert len(cache) == 10000 and cache.channels == 1 and cache.num_classes == 0
    texts = cache.captions.texts
    assert texts[0] == "" and any("on the left" in t for t in texts)
    records = [json.loads(x) for x in (tmp_path / "scenes" / "fashion-pairs" / "test" / "metadata.jsonl")
               .read_text().splitlines()[:5]]
    for i, record in enumerate(records):  # the cache keeps each image's own captions, in order
        assert cache.captions.captions_of(i) == record["text"]


def test_eval_of_a_text_run_samples_its_prompt_set(captioned, tmp_path):
    """evaluate_checkpoint with a prompt set: prompt indices carried through the resumable batches, one
    image per record (cycled), FID against a reference; no class metrics."""
    from lddpm.evaluate import evaluate_checkpoint
    from lddpm.evaluate.reference import ReferenceStats

    run = tmp_path / "run"
    train(text_config(captioned, "run.steps=1"), run, progress=False)
    listing = tmp_path / "set.jsonl"
    listing.write_text('{"prompt": "a dark square"}\n{"prompt": "a white block"}\n{"prompt": "a bright square"}\n')

    from lddpm.metrics.inception import FeatureExtractor

    class Projection(torch.nn.Module):  # a fixed random projection of the pixels, a stand-in for Inception
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(3 * 16 * 16, 2, generator=torch.Generator().manual_seed(0)) / 16)

        def forward(self, x):
            return x.flatten(1) @ self.w

    def Features():
        return FeatureExtractor(Projection(), name="stand-in", sha1="f" * 40, input_size=None, batch_size=16)

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 2))
    ref = ReferenceStats(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), features=feats,
                         manifest={"dataset": "captioned", "split": "train", "num": 50})
    first = evaluate_checkpoint(run, num=5, sampler="ddim", num_steps=2, guidance_scale=2.0, reference=ref,
                                extractor=Features(), prompts=listing, batch_size=2, device="cpu", progress=False,
                                partial_dir=tmp_path / "partial")
    assert first["settings"]["labels"] == "prompts" and first["num_images"] == 5
    assert first.get("class_accuracy") is None and "faithfulness" not in first  # no benchmark objects
    again = evaluate_checkpoint(run, num=5, sampler="ddim", num_steps=2, guidance_scale=2.0, reference=ref,
                                extractor=Features(), prompts=listing, batch_size=2, device="cpu", progress=False,
                                partial_dir=tmp_path / "partial")
    assert again["cost"]["num_resumed"] == 5 and again["fid"] == pytest.approx(first["fid"])
    with pytest.raises(LddpmError, match="prompt set"):
        evaluate_checkpoint(run, num=2, reference=ref, extractor=Features(), device="cpu", progress=False)
