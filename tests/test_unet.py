"""U-Net: parameter counts, shapes, class/null labels, gradients, determinism, options, overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lddpm.errors import LddpmError
from lddpm.nn import build_network, network_config, network_from_config


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_zero_init(model: nn.Module) -> nn.Module:
    """Give zero-initialised layers random weights so every path affects the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def expected_parameters(c) -> int:
    """Trainable parameters of a U-Net from its layer shapes: Ho et al. 2020 (Appendix B) with ADM's options
    (scale-shift norm, heads, learned sigma, class labels) and SD's spatial transformers for text."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    norm = lambda ch: 2 * ch  # noqa: E731  (GroupNorm / LayerNorm affine)
    ch, emb = c.model_channels, 4 * c.model_channels

    def res(i: int, o: int) -> int:  # norm, conv 3x3, embedding projection, norm, conv 3x3, 1x1 skip when i != o
        proj = linear(emb, 2 * o if c.use_scale_shift_norm else o)
        return norm(i) + conv(i, o, 3) + proj + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attention(d: int) -> int:
        if not c.context_dim:  # GroupNorm, qkv, output projection
            return norm(d) + linear(d, 3 * d) + linear(d, d)
        block = (3 * norm(d) + 3 * linear(d, d, False) + linear(d, d)  # self-attention: q, k, v without bias
                 + linear(d, d, False) + 2 * linear(c.context_dim, d, False) + linear(d, d)  # cross-attention
                 + linear(d, 8 * d) + linear(4 * d, d))  # GEGLU feed-forward (inner 4 d, doubled for the gate)
        return norm(d) + 2 * linear(d, d) + c.transformer_depth * block  # proj_in, proj_out

    total = linear(ch, emb) + linear(emb, emb) + (c.num_classes + 1) * emb * (c.num_classes > 0)
    total += conv(c.in_channels, ch, 3)
    skips, cur, res_px = [ch], ch, c.resolution
    for level, mult in enumerate(c.channel_mult):  # encoder: ResBlocks (+ attention), stride-2 conv between levels
        for _ in range(c.num_res_blocks):
            total += res(cur, ch * mult) + (attention(ch * mult) if res_px in c.attention_resolutions else 0)
            cur = ch * mult
            skips.append(cur)
        if level < len(c.channel_mult) - 1:
            total += conv(cur, cur, 3)
            skips.append(cur)
            res_px //= 2
    total += 2 * res(cur, cur) + (attention(cur) if c.mid_attention else 0)
    for level, mult in reversed(list(enumerate(c.channel_mult))):  # decoder: one more ResBlock per level, skips
        for i in range(c.num_res_blocks + 1):
            total += res(cur + skips.pop(), ch * mult) + (attention(ch * mult) if res_px in c.attention_resolutions else 0)
            cur = ch * mult
            if level and i == c.num_res_blocks:
                total += conv(cur, cur, 3)  # nearest upsampling + conv
                res_px *= 2
    return total + norm(cur) + conv(cur, c.in_channels * (2 if c.learned_sigma else 1), 3)


def test_ddpm_cifar10_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = build_network("unet", "ddpm-cifar10")
    # Ho et al. 2020's CIFAR-10 model has 35,746,307 parameters ("35.7M").
    assert count(model) == expected_parameters(model.config) == 35_746_307


def test_ddpm_cifar10_count_matches_diffusers_same_shape():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, attention_head_dim=None, norm_num_groups=32,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
        ours = build_network("unet", "ddpm-cifar10")
    assert count(ours) == count(ref)


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}), ("small", {}), ("adm-imagenet128", {}),
    ("tiny", dict(in_channels=1, num_classes=10, learned_sigma=True, use_scale_shift_norm=True)),
    ("small", dict(num_res_blocks=2, attention_resolutions=(16, 8), mid_attention=False, num_head_channels=32)),
    ("tiny", dict(in_channels=1, context_dim=384)), ("tiny", dict(context_dim=16, transformer_depth=2, num_classes=3)),
])
def test_parameter_counts_follow_from_the_layer_shapes(name, overrides):
    with torch.device("meta"):
        model = build_network("unet", name, **overrides)
    assert count(model) == expected_parameters(model.config)


def test_docstring_parameter_counts():
    """The counts UNet's docstring quotes are those of the named configs."""
    from lddpm.nn.unet import UNet

    doc = " ".join(UNet.__doc__.split())
    for name, overrides, quoted in [("ddpm-cifar10", {}, "ddpm-cifar10 35,746,307"),
                                    ("adm-imagenet128", {}, "adm-imagenet128 386,045,190"),
                                    ("tiny", {}, "tiny 1,113,955"), ("small", {}, "small 4,636,611"),
                                    ("tiny", dict(in_channels=1, context_dim=384), "1,575,393")]:
        assert quoted in doc
        assert f"{expected_parameters(network_config('unet', name, **overrides)):,}" == quoted.split()[-1]
    from lddpm.nn import registry

    registry_text = Path(registry.__file__).read_text()  # the registry's comments quote the CPU configs' counts
    for name in ("tiny", "small"):
        assert f"{expected_parameters(network_config('unet', name)):,} parameters at 32x32x3" in registry_text
    with torch.device("meta"):
        adm = build_network("unet", "adm-imagenet128")
    assert adm.out_channels == 6 and adm.num_classes == 1000 and adm.null_label == 1000


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("resolution,channels", [(28, 1), (32, 3), (8, 4), (16, 4)])
@pytest.mark.parametrize("learned_sigma", [False, True])
def test_output_shapes(name, resolution, channels, learned_sigma):
    model = build_network("unet", name, resolution=resolution, in_channels=channels,
                          learned_sigma=learned_sigma, num_classes=3).eval()
    x = torch.randn(2, channels, resolution, resolution)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]), torch.tensor([1, 3]))
    assert out.shape == (2, channels * (2 if learned_sigma else 1), resolution, resolution)
    assert model.in_channels == channels and model.out_channels == out.shape[1]


def test_ddpm_cifar10_forward_batch_one():
    model = build_network("unet", "ddpm-cifar10").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_adm_imagenet128_shapes_on_meta_device():
    with torch.device("meta"):
        model = build_network("unet", "adm-imagenet128")
        out = model(torch.empty(2, 3, 128, 128), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 6, 128, 128)


def test_null_label_is_its_own_embedding_and_none_means_null():
    model = randomize_zero_init(build_network("unet", "tiny", resolution=16, in_channels=1, num_classes=4)).eval()
    assert model.null_label == 4
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([500])
    with torch.no_grad():
        null = model(x, t, torch.tensor([4]))
        assert torch.equal(model(x, t, None), null)
        outs = [model(x, t, torch.tensor([k])) for k in range(4)]
    for k, out in enumerate(outs):
        assert (out - null).abs().max() > 1e-4, f"class {k} gives the null output"
    assert (outs[0] - outs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("bad", [-1, 5])
def test_label_outside_range_raises(bad):
    model = build_network("unet", "tiny", resolution=16, num_classes=4)
    with pytest.raises(LddpmError, match=str(bad)):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, bad]))


def test_unconditional_model_rejects_class_labels():
    model = build_network("unet", "tiny", resolution=16)
    assert model.num_classes == 0 and model.null_label is None
    with pytest.raises(LddpmError, match="unconditional"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 3]))


@pytest.mark.parametrize("scale_shift", [False, True])
def test_gradients_reach_every_parameter(scale_shift):
    model = randomize_zero_init(build_network("unet", "tiny", resolution=16, num_classes=3, dropout=0.0,
                                              use_scale_shift_norm=scale_shift, learned_sigma=True))
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 3]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name == "label_embed.weight":  # only the rows of used labels get gradient
            assert p.grad[[0, 3]].abs().sum() > 0 and p.grad[[1, 2]].abs().sum() == 0
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_init_output_and_same_seed_same_output():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    torch.manual_seed(5)
    a = build_network("unet", "tiny", resolution=16)
    torch.manual_seed(5)
    b = build_network("unet", "tiny", resolution=16)
    assert a(x, t).abs().max() == 0  # zero-initialised last conv (ADM)
    randomize_zero_init(a), randomize_zero_init(b)
    a.train(), b.train()
    torch.manual_seed(9)
    out_a = a(x, t)
    torch.manual_seed(9)
    out_b = b(x, t)
    assert torch.equal(out_a, out_b)


def test_timestep_changes_output():
    model = randomize_zero_init(build_network("unet", "tiny", resolution=16)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (model(x, torch.tensor([0])) - model(x, torch.tensor([999]))).abs().max() > 1e-4


def test_gradient_checkpointing_and_channels_last_match_plain():
    torch.manual_seed(3)
    plain = randomize_zero_init(build_network("unet", "tiny", resolution=16, dropout=0.0, num_classes=2))
    for option in ({"gradient_checkpointing": True}, {"channels_last": True}):
        other = network_from_config("unet", {**plain.config.to_dict(), **option})
        other.load_state_dict(plain.state_dict())
        x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 50]), torch.tensor([0, 2])
        outs, grads = [], []
        for m in (plain, other):
            m.zero_grad()
            out = m(x, t, y)
            out.square().sum().backward()
            outs.append(out.detach())
            grads.append(m.conv_in.weight.grad.clone())
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_forward_under_bf16_autocast():
    model = randomize_zero_init(build_network("unet", "tiny", resolution=16, num_classes=2)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 50])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_network("unet", "tiny", resolution=16, dropout=0.0, model_channels=16, norm_groups=8)
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))
    target = torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(100):
        loss = (model(x, t) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_config_roundtrip_rebuilds_the_same_network():
    model = build_network("unet", "small", in_channels=4, resolution=8, num_classes=10, learned_sigma=True)
    d = model.config.to_dict()
    rebuilt = network_from_config("unet", d)
    assert rebuilt.config == model.config
    assert rebuilt.config.attention_resolutions == (4, 2)  # levels kept when the resolution changed
    rebuilt.load_state_dict(model.state_dict())  # same parameter names and shapes
    assert network_config("unet", "small") == build_network("unet", "small").config


@pytest.mark.parametrize("channels, size", [(64, 8), (32, 16), (128, 8), (32, 32)])
def test_group_norm_channels_last_bf16_matches_the_contiguous_kernel(channels, size):
    from lddpm.nn.layers import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(8, channels)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(3, channels, size, size) * 2 + 0.5).to(torch.bfloat16)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_plain = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_cl, y_plain = norm(x_cl), nn.GroupNorm.forward(norm, x_plain)
    assert y_cl.dtype == y_plain.dtype == torch.bfloat16
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl.float(), y_plain.float(), rtol=0, atol=0.04)  # one bf16 step at |y| <= 8
    (y_cl.float().square().sum()).backward()
    (y_plain.float().square().sum()).backward()
    torch.testing.assert_close(x_cl.grad.float(), x_plain.grad.float(), rtol=0.02, atol=0.05)
    x32 = x.float().contiguous(memory_format=torch.channels_last)  # float32 goes through nn.GroupNorm unchanged
    torch.testing.assert_close(norm(x32), nn.GroupNorm.forward(norm, x32), rtol=0, atol=0)
