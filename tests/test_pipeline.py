"""Sampling pipeline: grids, deterministic generation, labels, guidance rules, the `sample` command."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from PIL import Image

from lddpm.errors import LddpmError
from lddpm.grid import make_grid, save_grid
from lddpm.pipeline import load_pipeline, to_uint8
from test_train import tiny_config, write_idx


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional and an unconditional tiny run (2 steps each)."""
    from lddpm.train import train

    base = tmp_path_factory.mktemp("pipeline")
    dirs = (write_idx(base / "idx"), base / "cache")
    cond = tiny_config(dirs, "run.steps=2", "optim.ema_decay=0.5", "optim.ema_warmup=false", "run.checkpoint_every=1",
                       "run.keep_checkpoints=2")
    train(cond, base / "cond", progress=False)
    train(tiny_config(dirs, "run.steps=1", "run.class_conditional=false"), base / "uncond", progress=False)
    return base


def test_to_uint8_and_grid_layout(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).reshape(-1).tolist() == [0, 64, 128, 255, 255]
    images = np.stack([np.full((3, 4, 1), v, np.uint8) for v in (10, 20, 30)])
    grid = make_grid(images, nrow=2, padding=2)
    assert grid.shape == (2 * (3 + 2) + 2, 2 * (4 + 2) + 2, 1)
    assert grid[2, 2, 0] == 10 and grid[2, 8, 0] == 20 and grid[7, 2, 0] == 30 and grid[7, 8, 0] == 0
    assert grid[0, 0, 0] == 0 and grid[4, 5, 0] == 10 and grid[5, 5, 0] == 0
    path = save_grid(images, tmp_path / "g.png", nrow=2)
    loaded = Image.open(path)
    assert loaded.mode == "L" and np.array_equal(np.asarray(loaded), grid[..., 0])
    rgb = save_grid(np.zeros((2, 3, 3, 3), np.uint8), tmp_path / "rgb.png", nrow=1)
    assert Image.open(rgb).mode == "RGB"
    with pytest.raises(LddpmError, match="uint8"):
        make_grid(np.zeros((2, 3, 3, 1), np.float32), nrow=1)


def test_pipeline_metadata_and_deterministic_generation(runs):
    pipe = load_pipeline(runs / "cond")
    assert (pipe.num_classes, pipe.resolution, pipe.channels, pipe.dataset) == (10, 16, 1, "fashion-mnist")
    assert pipe.class_names[1] == "Trouser" and pipe.class_index("trouser") == 1
    assert pipe.config.run.steps == 2 and pipe.step == 2
    a, la = pipe.generate(5, sampler="ddim", num_steps=3, seed=7, batch_size=2, progress=False)
    b, lb = pipe.generate(5, sampler="ddim", num_steps=3, seed=7, batch_size=5, progress=False)
    c, _ = pipe.generate(5, sampler="ddim", num_steps=3, seed=8, batch_size=5, progress=False)
    assert a.shape == (5, 16, 16, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert la.tolist() == [0, 1, 2, 3, 4] and np.array_equal(la, lb)
    _, fixed = pipe.generate(3, sampler="ddpm", num_steps=2, labels=4, progress=False)
    assert fixed.tolist() == [4, 4, 4]
    guided, _ = pipe.generate(2, sampler="dpm++2m", num_steps=2, guidance_scale=3.0, progress=False)
    assert guided.shape == (2, 16, 16, 1)
    with pytest.raises(LddpmError, match="labels must lie"):
        pipe.generate(1, sampler="ddim", num_steps=2, labels=11, progress=False)
    with pytest.raises(LddpmError, match="unknown sampler"):
        pipe.generate(1, sampler="lms", progress=False)
    with pytest.raises(LddpmError, match="unknown class"):
        pipe.class_index("boots")


def test_ema_weights_are_used_by_default(runs):
    """The pipeline samples with the checkpoint's "ema" group, and that group is the EMA of the "model" weights:
    with decay 0.5 and no warm-up, ema_2 = 0.5 ema_1 + 0.5 model_2 (swapped groups would fail it)."""
    from lddpm.checkpoint import load_checkpoint

    step1, step2 = sorted((runs / "cond" / "checkpoints").glob("step_*.safetensors"))
    ema1, ema2, raw2 = (load_checkpoint(step1).load("ema"), load_checkpoint(step2).load("ema"),
                        load_checkpoint(step2).load("model"))
    assert any(not torch.equal(ema2[k], raw2[k]) for k in raw2)  # the average trails the raw weights
    for k in raw2:
        assert torch.allclose(ema2[k], 0.5 * ema1[k] + 0.5 * raw2[k], atol=1e-6), k
    ema, raw = load_pipeline(runs / "cond").model.state_dict(), load_pipeline(runs / "cond", use_ema=False).model.state_dict()
    assert ema.keys() == ema2.keys() == raw.keys()
    assert all(torch.equal(ema[k], ema2[k]) for k in ema) and all(torch.equal(raw[k], raw2[k]) for k in raw)


def test_guidance_or_labels_for_an_unconditional_model_are_errors(runs):
    pipe = load_pipeline(runs / "uncond")
    assert pipe.num_classes == 0 and pipe.class_names == []
    images, labels = pipe.generate(2, sampler="ddim", num_steps=2, progress=False)
    assert images.shape == (2, 16, 16, 1) and labels is None
    with pytest.raises(LddpmError, match="unconditional"):
        pipe.generate(2, sampler="ddim", num_steps=2, guidance_scale=2.0, progress=False)
    with pytest.raises(LddpmError, match="unconditional"):
        pipe.generate(2, sampler="ddim", num_steps=2, labels=1, progress=False)


def test_sample_command_writes_grid_and_images(runs, tmp_path, capsys):
    from lddpm.cli import main

    assert main(["sample", str(runs / "cond"), "--sampler", "dpm++2m", "--steps", "2", "--num", "4",
                 "--class-name", "Bag", "--guidance-scale", "2", "--out", str(tmp_path / "grid.png"),
                 "--out-dir", str(tmp_path / "imgs"), "--device", "cpu", "--quiet"]) == 0
    assert "4 images" in capsys.readouterr().out and (tmp_path / "grid.png").exists()
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [f"{i:05d}_class8.png" for i in range(4)]
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(runs / "uncond"), "--guidance-scale", "3", "--num", "1", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unconditional" in err and "Traceback" not in err


def test_load_pipeline_refuses_a_truncated_checkpoint(runs, tmp_path):
    bad = tmp_path / "broken.safetensors"
    data = (next((runs / "cond" / "checkpoints").glob("step_*.safetensors"))).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LddpmError, match="broken.safetensors"):
        load_pipeline(bad)
    meta = json.loads((runs / "cond" / "config.json").read_text())
    assert meta["run"]["steps"] == 2


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_stochastic_samples_do_not_depend_on_the_batch_size(sampler, eta):
    """Every image has its own noise stream (x_T and each step's noise), so batching changes nothing."""
    from lddpm.config import DiffusionConfig
    from lddpm.diffusion import build_diffusion
    from lddpm.nn import build_network
    from lddpm.pipeline import Pipeline
    from lddpm.sampling import is_stochastic

    assert is_stochastic(sampler, eta)
    torch.manual_seed(0)
    net = build_network("unet", "tiny", resolution=8, in_channels=1, attention_resolutions=(2,)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = Pipeline(net, build_diffusion(DiffusionConfig(num_timesteps=50)),
                    dataset={"name": "toy", "resolution": 8, "channels": 1})
    kw = dict(sampler=sampler, num_steps=6, eta=eta, seed=3, progress=False)
    whole, _ = pipe.generate(5, batch_size=5, **kw)
    split, _ = pipe.generate(5, batch_size=2, **kw)
    diff = np.abs(whole.astype(int) - split.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # equal up to float rounding of batched convolutions
    other, _ = pipe.generate(5, batch_size=5, **dict(kw, seed=4))
    assert np.abs(whole.astype(int) - other.astype(int)).mean() > 5  # the noise does matter


def test_bf16_sampling_runs_the_network_in_bf16_and_the_sampler_in_float32(runs, capsys):
    """bf16=True: the network under bf16 autocast (its convolutions see bf16), its output and the
    samples in float32; images stay close to fp32 sampling; "auto" follows the CPU's native bf16."""
    from lddpm.cli import main
    from lddpm.distributed import native_bf16
    from lddpm.pipeline import bf16_network

    fp32, bf16 = load_pipeline(runs / "cond"), load_pipeline(runs / "cond", bf16=True)
    assert (fp32.bf16, bf16.bf16) == (False, True)
    assert load_pipeline(runs / "cond", bf16="auto").bf16 == native_bf16(torch.device("cpu"))
    seen = []
    hook = bf16.model.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    network = bf16_network(bf16.model, "cpu")
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    out = network(x, t, y=y)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    with torch.no_grad():
        reference = fp32.model(x, t, y=y)
    assert torch.allclose(out, reference, atol=0.05 * reference.abs().max().item())
    assert not torch.equal(out, reference)                       # it really ran in reduced precision
    hook.remove()
    a, _ = fp32.generate(4, sampler="ddim", num_steps=3, seed=1, progress=False)
    b, _ = bf16.generate(4, sampler="ddim", num_steps=3, seed=1, progress=False)
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 4
    with pytest.raises(SystemExit):
        main(["sample", str(runs / "cond"), "--num", "1", "--bf16", "maybe", "--device", "cpu", "--quiet"])
    assert "--bf16 must be true, false or auto" in capsys.readouterr().err


def test_sampling_runs_a_unet_in_channels_last_format_with_the_same_weights_and_images(runs):
    """load_pipeline puts a U-Net in channels-last format by default (a faster forward pass on CPU):
    the same weights, outputs equal to float rounding, the same images; channels_last=False keeps the
    contiguous layout the run was trained in."""
    fast, plain = load_pipeline(runs / "cond"), load_pipeline(runs / "cond", channels_last=False)
    conv = fast.model.conv_out.weight
    assert fast.model.config.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.config.channels_last and not plain.model.conv_out.weight.is_contiguous(
        memory_format=torch.channels_last)
    for (name, a), (_, b) in zip(fast.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 300, 999]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        out_fast, out_plain = fast.model(x, t, y=y), plain.model(x, t, y=y)
    assert torch.allclose(out_fast, out_plain, atol=1e-5, rtol=1e-4)
    a, _ = fast.generate(4, sampler="ddim", num_steps=5, seed=2, progress=False)
    b, _ = plain.generate(4, sampler="ddim", num_steps=5, seed=2, progress=False)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
