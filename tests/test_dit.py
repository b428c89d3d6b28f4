"""DiT: parameter counts and GFLOPs against the paper, diffusers as an oracle, adaLN-Zero, labels, overfitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lddpm.errors import LddpmError
from lddpm.nn import NETWORK_NAMES, build_network, network_config, network_from_config

PAPER_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
# Forward GFLOPs at 256x256 images (32x32x4 latents), Peebles & Xie 2023, Table 4 (a multiply-add = 1 FLOP).
PAPER_GFLOPS = {
    "dit-s/2": 6.06, "dit-b/2": 23.01, "dit-l/2": 80.71, "dit-xl/2": 118.64,
    "dit-s/4": 1.41, "dit-b/4": 5.56, "dit-l/4": 19.70, "dit-xl/4": 29.05,
    "dit-s/8": 0.36, "dit-b/8": 1.42, "dit-l/8": 5.01, "dit-xl/8": 7.39,
}


def tiny(**overrides) -> nn.Module:
    """A small random DiT (8x8x4 input, 2x2 patches) for fast tests."""
    fields = dict(resolution=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                  learned_sigma=False)
    return build_network("dit", "dit-tiny/2", **{**fields, **overrides})


def randomize_zero_init(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Give the zero-initialised layers (adaLN, final linear, biases) random values so every path matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def expected_parameters(depth: int, width: int, patch: int, in_ch: int, out_ch: int, classes: int,
                        tokens: int) -> tuple[int, int]:
    """(trainable, fixed position embedding) counts from the layer shapes of the paper's DiT."""
    linear = lambda i, o: i * o + o  # noqa: E731
    patch_embed = in_ch * patch * patch * width + width  # Conv2d(in, width, p, stride p)
    time_embed = linear(256, width) + linear(width, width)  # 256 sinusoidal frequencies -> MLP
    label_embed = (classes + 1) * width  # + the null label
    block = linear(width, 3 * width) + linear(width, width) + linear(width, 4 * width) + linear(4 * width, width) \
        + linear(width, 6 * width)  # qkv, proj, MLP (ratio 4), adaLN (no affine LayerNorms)
    final = linear(width, 2 * width) + linear(width, patch * patch * out_ch)
    return patch_embed + time_embed + label_embed + depth * block + final, tokens * width


def count(model: nn.Module) -> tuple[int, int]:
    """(parameters, buffer values)."""
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


@pytest.mark.parametrize("name,total", [("dit-xl/2", 675_129_632), ("dit-s/2", 32_963_360)])
def test_parameter_counts_match_the_papers_code(name, total):
    depth, width, _ = PAPER_SIZES[name.split("-")[1].split("/")[0]]
    trainable, fixed = expected_parameters(depth, width, 2, 4, 8, 1000, 256)
    assert trainable + fixed == total  # the reference code's count, pos-embed included
    with torch.device("meta"):
        model = build_network("dit", name)
    assert count(model) == (trainable, fixed)
    assert all(p.requires_grad for p in model.parameters())
    if name == "dit-xl/2":
        assert trainable == 674_834_720


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_forward_gflops_match_the_paper(name):
    with torch.device("meta"):
        model = build_network("dit", name)
        x, t, y = torch.empty(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, t, y)
    gflops = counter.get_total_flops() / 2 / 1e9  # the paper counts a multiply-add as one FLOP
    assert gflops == pytest.approx(PAPER_GFLOPS[name], rel=0.01), gflops


def test_registry_has_every_paper_config_and_the_cpu_ones():
    names = set(NETWORK_NAMES["dit"])
    assert {f"dit-{s}/{p}" for s in PAPER_SIZES for p in (2, 4, 8)} | {"dit-tiny/4", "dit-tiny/2"} <= names
    for name in names:
        cfg = network_config("dit", name)
        cfg.validate()
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    xl = network_config("dit", "dit-xl/2")
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    assert (xl.resolution, xl.in_channels, xl.num_classes, xl.learned_sigma) == (32, 4, 1000, True)
    assert network_config("dit", "dit-tiny/4").in_channels == 1 and network_config("dit", "dit-tiny/4").patch_size == 4


# ----------------------------------------------------------------------------- diffusers oracle


def to_diffusers(model: nn.Module):
    """diffusers' DiTTransformer2DModel of the same shape holding `model`'s weights.

    diffusers keeps a copy of the timestep/class embedding in every block (only block 0's feeds the
    final layer); each gets the shared one. diffusers' timestep frequencies divide by half - 1
    (downscale_freq_shift=1) where the paper's code divides by half: set the shift to 0.
    """
    diffusers = pytest.importorskip("diffusers")
    c = model.config
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=model.out_channels, num_layers=c.depth, sample_size=c.resolution, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_eps=1e-6)
    ours = model.state_dict()
    d = c.hidden_size
    state = {"pos_embed.proj.weight": ours["patch_embed.weight"], "pos_embed.proj.bias": ours["patch_embed.bias"],
             "proj_out_1.weight": ours["final_layer.adaLN.weight"], "proj_out_1.bias": ours["final_layer.adaLN.bias"],
             "proj_out_2.weight": ours["final_layer.linear.weight"], "proj_out_2.bias": ours["final_layer.linear.bias"]}
    for i in range(c.depth):
        ref.transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = 0
        dst, src = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = dst + "norm1.emb."
        for k in ("weight", "bias"):
            state[emb + f"timestep_embedder.linear_1.{k}"] = ours[f"time_embed.0.{k}"]
            state[emb + f"timestep_embedder.linear_2.{k}"] = ours[f"time_embed.2.{k}"]
            state[dst + f"norm1.linear.{k}"] = ours[src + f"adaLN.{k}"]
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                state[dst + f"attn1.{name}.{k}"] = ours[src + f"attn.qkv.{k}"][j * d:(j + 1) * d]
            state[dst + f"attn1.to_out.0.{k}"] = ours[src + f"attn.proj.{k}"]
            state[dst + f"ff.net.0.proj.{k}"] = ours[src + f"mlp.0.{k}"]
            state[dst + f"ff.net.2.{k}"] = ours[src + f"mlp.2.{k}"]
        state[emb + "class_embedder.embedding_table.weight"] = ours["label_embed.weight"]
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.mark.parametrize("fields", [
    dict(resolution=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
         learned_sigma=True),
    dict(resolution=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
         learned_sigma=False),
    dict(resolution=16, in_channels=3, patch_size=4, hidden_size=48, depth=3, num_heads=3, num_classes=10,
         learned_sigma=True),
    dict(resolution=8, in_channels=1, patch_size=1, hidden_size=24, depth=1, num_heads=4, num_classes=3,
         learned_sigma=False),
    dict(resolution=16, in_channels=4, patch_size=8, hidden_size=64, depth=2, num_heads=1, num_classes=2,
         learned_sigma=True),
])
def test_same_function_as_diffusers_dit(fields):
    torch.manual_seed(0)
    model = randomize_zero_init(build_network("dit", "dit-tiny/2", **fields)).eval()
    ref = to_diffusers(model)
    r, ch = fields["resolution"], fields["in_channels"]
    x = torch.randn(4, ch, r, r)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 1, fields["num_classes"] - 1, fields["num_classes"]])  # the last one is the null label
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = ref(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert ours.shape == theirs.shape == (4, model.out_channels, r, r)
    assert ours.abs().max() > 0.1  # a non-trivial output
    assert (ours - theirs).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- behaviour


def test_adaln_zero_blocks_start_as_identity_and_output_is_zero():
    torch.manual_seed(0)
    model = tiny(depth=3)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 5]))
    assert out.shape == (2, 4, 8, 8) and out.abs().max() == 0
    randomize_zero_init(model)
    assert not torch.allclose(model.blocks[0](x, c), x)  # the identity came from the zero init


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
@pytest.mark.parametrize("learned_sigma", [False, True])
def test_output_shapes_for_every_patch_size(patch, learned_sigma):
    model = tiny(resolution=16, in_channels=3, patch_size=patch, learned_sigma=learned_sigma).eval()
    assert model.grid_size == 16 // patch and model.pos_embed.shape == (1, (16 // patch) ** 2, 32)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 3]))
    assert out.shape == (2, 3 * (2 if learned_sigma else 1), 16, 16)
    assert model.out_channels == out.shape[1]


def test_unpatchify_inverts_patchify_order():
    model = tiny(resolution=8, in_channels=3, patch_size=2)
    x = torch.randn(2, 3, 8, 8)
    # token (i, j) holds patch x[:, :, 2i:2i+2, 2j:2j+2] with channels ordered (row, col, C)
    tokens = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 12)
    assert torch.equal(model.unpatchify(tokens), x)


def test_null_label_is_its_own_embedding_and_none_means_null():
    model = randomize_zero_init(tiny()).eval()
    assert model.null_label == 5
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        null = model(x, t, torch.tensor([5]))
        assert torch.equal(model(x, t, None), null)
        outs = [model(x, t, torch.tensor([k])) for k in range(5)]
    for k, out in enumerate(outs):
        assert (out - null).abs().max() > 1e-4, f"class {k} gives the null output"


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_classifier_free_guidance_with_a_dit(learned_sigma):
    from lddpm.sampling import ClassifierFreeGuidance

    model = randomize_zero_init(tiny(learned_sigma=learned_sigma)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full((2,), model.null_label))
        out = ClassifierFreeGuidance(model, 3.0, model.null_label)(x, t, y)
    expected = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])  # Ho & Salimans 2022, s = 1 + w
    torch.testing.assert_close(out[:, :4], expected, atol=1e-5, rtol=1e-5)
    if learned_sigma:  # the variance channels come from the conditional branch
        torch.testing.assert_close(out[:, 4:], cond[:, 4:], atol=1e-6, rtol=1e-6)
    assert (cond - uncond).abs().max() > 1e-4


@pytest.mark.parametrize("bad", [-1, 6])
def test_label_outside_range_and_wrong_input_size_raise(bad):
    model = tiny()
    with pytest.raises(LddpmError, match=str(bad)):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, bad]))
    with pytest.raises(LddpmError, match="4x8x8 inputs, got 4x16x16"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]))
    uncond = tiny(num_classes=0)
    assert uncond.null_label is None and uncond.label_embed is None
    with pytest.raises(LddpmError, match="unconditional"):
        uncond(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 3]))


@pytest.mark.parametrize("overrides,needle", [
    ({"patch_size": 3}, "patch_size=3"),
    ({"num_heads": 5}, "num_heads=5"),
    ({"hidden_size": 34, "num_heads": 2}, "multiple of 4"),
    ({"depth": 0}, "depth=0"),
    ({"num_classes": -1}, "-1"),
])
def test_bad_configs_raise(overrides, needle):
    with pytest.raises(LddpmError, match=needle):
        tiny(**overrides)


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    torch.manual_seed(3)
    plain = randomize_zero_init(tiny(learned_sigma=True))
    other = network_from_config("dit", {**plain.config.to_dict(), "gradient_checkpointing": True})
    other.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.tensor([0, 5])
    outs = []
    for m in (plain, other):
        out = m(x, t, y)
        out.square().sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), other.parameters()):
        if name == "label_embed.weight":  # only the rows of used labels get gradient
            assert p.grad[[0, 5]].abs().sum() > 0 and p.grad[1:5].abs().sum() == 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_config_roundtrip_rebuilds_the_same_network():
    model = tiny(learned_sigma=True)
    rebuilt = network_from_config("dit", model.config.to_dict())
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # same names and shapes; pos_embed is not saved
    assert "pos_embed" not in model.state_dict() and torch.equal(rebuilt.pos_embed, model.pos_embed)


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny(hidden_size=64, depth=2, num_heads=4)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 5])
    target = torch.randn(4, 4, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(100):
        loss = (model(x, t, y) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


# ----------------------------------------------------------------------------- engine, pipeline, samplers

from test_train import data_dirs, tiny_config  # noqa: E402,F401  (the synthetic IDX data fixture)


def test_trained_dit_loads_and_samples_with_every_sampler_and_guidance(data_dirs, tmp_path):
    import numpy as np

    from lddpm.checkpoint import load_checkpoint
    from lddpm.pipeline import load_pipeline
    from lddpm.train import train

    config = tiny_config(data_dirs, "run.steps=3", "run.label_dropout=0.2", "diffusion.learned_variance=true",
                         network="dit")
    train(config, tmp_path / "run", progress=False)
    meta = load_checkpoint(tmp_path / "run").meta["network"]
    assert meta["kind"] == "dit" and meta["config"]["learned_sigma"] is True
    assert (meta["config"]["resolution"], meta["config"]["in_channels"], meta["config"]["num_classes"]) == (16, 1, 10)
    pipe = load_pipeline(tmp_path / "run")
    assert type(pipe.model).__name__ == "DiT" and pipe.model.out_channels == 2
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        images, labels = pipe.generate(3, sampler=sampler, num_steps=2, guidance_scale=2.0, progress=False)
        assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8 and list(labels) == [0, 1, 2]
