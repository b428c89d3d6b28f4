"""KL autoencoder: parameter counts, latent shapes, posterior formulas, scaling factor, losses, overfitting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lddpm.errors import LddpmError
from lddpm.nn import build_network, network_config, network_from_config
from lddpm.nn.vae import DiagonalGaussian, PatchDiscriminator, estimate_scaling_factor, hinge_d_loss, vae_loss


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_parameters(c) -> int:
    """Trainable parameters of an AutoencoderKL from its layer shapes (LDM's autoencoder, Rombach et al. 2022)."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    norm = lambda ch: 2 * ch  # noqa: E731  (GroupNorm affine)

    def res(i: int, o: int) -> int:  # norm, conv 3x3, norm, conv 3x3, 1x1 skip when i != o; no time embedding
        return norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attention(d: int) -> int:  # GroupNorm, qkv, output projection
        return norm(d) + (d * 3 * d + 3 * d) + (d * d + d)

    ch, z = c.base_channels, c.latent_channels
    levels = [c.resolution // 2**i for i in range(len(c.channel_mult))]
    middle = lambda d: 2 * res(d, d) + (attention(d) if c.mid_attention else 0)  # noqa: E731
    encoder, cur = conv(c.in_channels, ch, 3), ch
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            encoder += res(cur, ch * mult) + (attention(ch * mult) if levels[level] in c.attention_resolutions else 0)
            cur = ch * mult
        encoder += conv(cur, cur, 3) if level < len(c.channel_mult) - 1 else 0  # stride-2 conv
    encoder += middle(cur) + norm(cur) + conv(cur, 2 * z, 3)  # -> mean and log-variance
    decoder = conv(z, cur, 3) + middle(cur)
    for level, mult in reversed(list(enumerate(c.channel_mult))):
        for _ in range(c.num_res_blocks + 1):
            decoder += res(cur, ch * mult) + (attention(ch * mult) if levels[level] in c.attention_resolutions else 0)
            cur = ch * mult
        decoder += conv(cur, cur, 3) if level else 0  # nearest upsampling + conv
    decoder += norm(cur) + conv(cur, c.in_channels, 3)
    return encoder + decoder + conv(2 * z, 2 * z, 1) + conv(z, z, 1)  # quant_conv, post_quant_conv


@pytest.mark.parametrize("name,overrides", [
    ("kl-f4", {}), ("kl-f8", {}), ("kl-f4-tiny", {}),
    ("kl-f4-tiny", dict(in_channels=1, latent_channels=3, mid_attention=False)),
    ("kl-f4", dict(attention_resolutions=(16, 8), num_res_blocks=1, channel_mult=(1, 2, 2, 4))),
])
def test_parameter_counts_follow_from_the_layer_shapes(name, overrides):
    with torch.device("meta"):
        vae = build_network("vae", name, **overrides)
    assert count(vae) == expected_parameters(vae.config)


def test_counts_quoted_in_comments_are_the_derived_ones():
    from lddpm.nn import registry

    registry_text = Path(registry.__file__).read_text()
    study_text = (Path(registry.__file__).parents[1] / "configs" / "study-vae.toml").read_text()
    for name, channels, text in [("kl-f4", 3, registry_text), ("kl-f4-tiny", 3, registry_text),
                                 ("kl-f4-tiny", 1, study_text)]:  # the study's 32x32x1 autoencoder
        n = expected_parameters(network_config("vae", name, in_channels=channels))
        assert f"{n:,} parameters" in text, (name, channels, n)


def test_kl_f8_has_ldms_parameter_count():
    with torch.device("meta"):
        f8 = build_network("vae", "kl-f8")
    assert count(f8) == expected_parameters(f8.config) == 83_653_863  # LDM's kl-f8 (the Stable Diffusion VAE shape)


def test_kl_f8_count_matches_diffusers_same_shape():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
        ours = build_network("vae", "kl-f8")
    assert count(ours) == count(ref)


@pytest.mark.parametrize("name,resolution,channels,latent", [
    ("kl-f4-tiny", 32, 3, (4, 8, 8)), ("kl-f4-tiny", 28, 1, (4, 7, 7)), ("kl-f4-tiny", 16, 1, (4, 4, 4)),
    ("kl-f4", 32, 3, (4, 8, 8)),
])
def test_latent_and_reconstruction_shapes(name, resolution, channels, latent):
    vae = build_network("vae", name, resolution=resolution, in_channels=channels).eval()
    assert vae.downsample_factor == 4 and vae.latent_channels == 4
    x = torch.rand(2, channels, resolution, resolution) * 2 - 1
    with torch.no_grad():
        recon, posterior = vae(x)
        z = posterior.sample()
    assert z.shape == (2, *latent) and posterior.mean.shape == z.shape
    assert recon.shape == x.shape and vae.decode(z).shape == x.shape


def test_kl_f8_shapes_on_meta_device():
    with torch.device("meta"):
        vae = build_network("vae", "kl-f8")
        posterior = vae.encode(torch.empty(1, 3, 128, 128))
        assert posterior.mean.shape == (1, 4, 16, 16)
        assert vae.decode(posterior.mode()).shape == (1, 3, 128, 128)
    assert vae.downsample_factor == 8


def test_diagonal_gaussian_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g)
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(q, p).flatten(1).sum(1))
    x = torch.randn(3, 4, 4, 4, generator=g)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(post.std, torch.exp(0.5 * logvar))
    assert torch.equal(post.mode(), mean)


def test_posterior_sampling_and_logvar_clamp():
    moments = torch.cat([torch.full((1, 2, 64, 64), 3.0), torch.full((1, 2, 64, 64), math.log(0.25))], 1)
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 3.0) < 0.02 and abs(a.std().item() - 0.5) < 0.02
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], 1))
    assert clamped.logvar.item() == 20.0
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], 1))
    assert clamped.logvar.item() == -30.0


def test_scaling_factor_gives_unit_variance_and_is_saved():
    vae = build_network("vae", "kl-f4-tiny", in_channels=1).eval()
    assert vae.scaling_factor == 1.0
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    sf = estimate_scaling_factor(vae, [x[:8], (x[8:], torch.zeros(8))], generator=torch.Generator().manual_seed(0))
    assert sf == vae.scaling_factor and vae.config.scaling_factor == sf and sf != 1.0
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(0)) * vae.scaling_factor
    assert abs(z.std().item() - 1.0) < 0.05
    state = vae.state_dict()
    fresh = build_network("vae", "kl-f4-tiny", in_channels=1)
    fresh.load_state_dict(state)
    assert fresh.scaling_factor == pytest.approx(sf)
    assert network_from_config("vae", vae.config.to_dict()).scaling_factor == pytest.approx(sf)


def test_vae_loss_terms_are_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    x, recon = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    post = DiagonalGaussian(torch.randn(2, 4, 2, 2, generator=g))
    out = vae_loss(x, recon, post, kl_weight=0.1, recon_loss="l1")
    assert out["recon"].item() == pytest.approx((x - recon).abs().sum().item() / 2, rel=1e-5)
    assert out["kl"].item() == pytest.approx(post.kl().mean().item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["recon"].item() + 0.1 * out["kl"].item(), rel=1e-6)
    l2 = vae_loss(x, recon, post, kl_weight=0.0, recon_loss="l2")
    assert l2["loss"].item() == pytest.approx((x - recon).pow(2).sum().item() / 2, rel=1e-5)
    with pytest.raises(LddpmError, match="l3"):
        vae_loss(x, recon, post, kl_weight=0.0, recon_loss="l3")


def test_adversarial_term_starts_at_disc_start():
    vae = build_network("vae", "kl-f4-tiny", in_channels=1, resolution=16)
    disc = PatchDiscriminator(in_channels=1, channels=16, num_layers=2)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    recon, post = vae(x)
    logits = disc(recon)
    assert logits.shape[:2] == (2, 1)
    before = vae_loss(x, recon, post, kl_weight=1e-6, logits_fake=logits, step=9, disc_start=10)
    assert "adv" not in before
    after = vae_loss(x, recon, post, kl_weight=1e-6, logits_fake=logits, step=10, disc_start=10,
                     last_layer=vae.last_layer)
    expected = before["loss"] + after["adv_weight"] * (-logits.mean())
    assert after["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert after["adv_weight"].item() > 0
    after["loss"].backward()
    assert vae.last_layer.grad is not None


def test_hinge_d_loss_closed_form():
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 1.0
    assert hinge_d_loss(torch.full((1,), 0.5), torch.full((1,), 0.5)).item() == pytest.approx(0.5 * (0.5 + 1.5))


def test_gradients_reach_every_parameter():
    vae = build_network("vae", "kl-f4-tiny", in_channels=3, resolution=16)
    recon, post = vae(torch.rand(2, 3, 16, 16) * 2 - 1)
    vae_loss(torch.zeros_like(recon), recon, post, kl_weight=1.0)["loss"].backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    vae = build_network("vae", "kl-f4-tiny", in_channels=1, resolution=16)
    x = (torch.rand(4, 1, 16, 16) > 0.5).float() * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(100):
        recon, post = vae(x, generator=g)
        loss = vae_loss(x, recon, post, kl_weight=1e-6, recon_loss="l2")["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())
