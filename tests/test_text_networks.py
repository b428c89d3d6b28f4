"""Text-conditioned noise predictors: the U-Net's spatial transformers and the DiT's cross-attention.

Shapes, zero-initialised starts (identity blocks), dependence on the prompt, gradients, the attention's
invariance to the order of context tokens, the errors users can cause, and diffusers' UNet2DConditionModel
and Transformer2DModel (adaLN-Zero with cross-attention) as independent references.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lddpm.convert.diffusers import (CLASS_FOR_KIND, dit_config_to_diffusers, to_diffusers_state,
                                    unet_config_to_diffusers)
from lddpm.errors import LddpmError
from lddpm.nn import build_network
from lddpm.nn.layers import SpatialTransformer

CTX = 12  # context width of the small test networks


def unet(**overrides) -> nn.Module:
    """A small text U-Net: 16x16x1, attention (here: spatial transformers) at 4x4 and in the middle."""
    fields = dict(resolution=16, in_channels=1, model_channels=16, norm_groups=4, num_heads=2, context_dim=CTX)
    return build_network("unet", "tiny", **{**fields, **overrides})


def dit(**overrides) -> nn.Module:
    """A small text DiT: 8x8x4 input, 2x2 patches, hidden 32, 2 blocks, no classes."""
    fields = dict(resolution=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=0,
                  context_dim=CTX)
    return build_network("dit", "dit-tiny/2", **{**fields, **overrides})


NETWORKS = {"unet": unet, "dit": dit}


def randomize_zero_init(model: nn.Module, std: float = 0.1, keep: tuple[str, ...] = ()) -> nn.Module:
    """Give every all-zero parameter (zero-initialised outputs, biases) random values, except names containing
    one of `keep`."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p == 0).all() and not any(k in name for k in keep):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(model: nn.Module, n: int = 2, tokens: int = 5):
    """(x, t, context) for `model`."""
    x = torch.randn(n, model.in_channels, model.resolution, model.resolution)
    return x, torch.linspace(0, 999, n).round().long(), torch.randn(n, tokens, model.context_dim)


# ----------------------------------------------------------------------------- shapes and configs


@pytest.mark.parametrize("kind", sorted(NETWORKS))
@pytest.mark.parametrize("learned_sigma", [False, True])
def test_output_shape_with_and_without_class_labels(kind, learned_sigma):
    for classes in (0, 3):
        model = NETWORKS[kind](num_classes=classes, learned_sigma=learned_sigma)
        assert model.context_dim == CTX and model.num_classes == classes
        x, t, context = batch(model, n=3, tokens=7)
        y = torch.tensor([0, 1, 3]) if classes else None
        out = model(x, t, y, context)
        assert out.shape == (3, model.in_channels * (2 if learned_sigma else 1), model.resolution, model.resolution)
        assert model(x, t, y, context=context[:1]).shape == out.shape  # one prompt for the whole batch


def test_text_unet_has_a_spatial_transformer_wherever_the_plain_one_has_attention():
    plain, text = unet(context_dim=0), unet(transformer_depth=2)
    kinds = lambda m: [type(b).__name__ for b in m.modules() if type(b).__name__ in  # noqa: E731
                       ("AttentionBlock", "SpatialTransformer")]
    assert kinds(plain) == ["AttentionBlock"] * len(kinds(plain)) and len(kinds(plain)) == 4  # down, mid, 2 x up
    assert kinds(text) == ["SpatialTransformer"] * 4
    assert all(len(b.transformer_blocks) == 2 for b in text.modules() if isinstance(b, SpatialTransformer))


def test_text_dit_adds_exactly_the_cross_attention_and_caption_mlp_to_the_plain_dit():
    plain, text = dit(context_dim=0), dit()
    extra = set(text.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(text.state_dict())
    cross = {f"blocks.{i}.cross_attn.{p}.{w}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out")
             for w in ("weight", "bias")}
    assert extra == cross | {f"context_embed.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    assert text.context_embed[0].weight.shape == (32, CTX) and text.context_embed[2].weight.shape == (32, 32)


def test_text_tiny_parameter_count():
    with torch.device("meta"):
        model = build_network("unet", "tiny", in_channels=1, context_dim=384)
    assert sum(p.numel() for p in model.parameters()) == 1_575_393  # the UNet.__doc__ figure (diffusers' count)


@pytest.mark.parametrize("kind,field,value", [("unet", "context_dim", -1), ("unet", "transformer_depth", 0),
                                              ("dit", "context_dim", -3)])
def test_bad_text_fields_are_refused_by_name(kind, field, value):
    with pytest.raises(LddpmError, match=field):
        NETWORKS[kind](**{field: value})


def test_text_unet_without_attention_blocks_is_refused():
    with pytest.raises(LddpmError, match="no attention block"):
        unet(attention_resolutions=(), mid_attention=False)


# ----------------------------------------------------------------------------- errors users can cause


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_context_errors_name_the_problem(kind):
    model = NETWORKS[kind]()
    x, t, context = batch(model)
    with pytest.raises(LddpmError, match="takes prompts: pass context"):
        model(x, t)
    with pytest.raises(LddpmError, match=rf"7 channels per token.*context_dim={CTX}"):
        model(x, t, context=torch.randn(2, 5, 7))
    with pytest.raises(LddpmError, match="3 prompts for a batch of 2"):
        model(x, t, context=torch.randn(3, 5, CTX))
    with pytest.raises(LddpmError, match=r"\(B, L, 12\)"):
        model(x, t, context=torch.randn(2, CTX))
    plain = NETWORKS[kind](context_dim=0)
    with pytest.raises(LddpmError, match="takes no prompts"):
        plain(x, t, context=context)


# ----------------------------------------------------------------------------- zero-initialised starts


def test_fresh_spatial_transformer_is_the_identity():
    block = SpatialTransformer(16, 2, CTX, depth=2, norm_groups=4)
    assert (block.proj_out.weight == 0).all() and (block.proj_out.bias == 0).all()
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(block(x, None, torch.randn(2, 5, CTX)), x)


class Skip(nn.Module):
    def forward(self, x, emb=None):
        return x


def test_fresh_text_unet_computes_what_it_computes_with_its_transformers_removed():
    model = randomize_zero_init(unet(), keep=("proj_out", "transformer_blocks")).eval()  # proj_out stays zero
    stripped = copy.deepcopy(model)
    for seq in [*stripped.down, stripped.mid, *stripped.up]:
        for i, block in enumerate(seq):
            if isinstance(block, SpatialTransformer):
                seq[i] = Skip()
    x, t, context = batch(model)
    out = model(x, t, context=context)
    assert out.abs().max() > 0.01
    assert torch.equal(out, stripped(x, t, context=context))
    assert torch.equal(out, model(x, t, context=torch.randn_like(context)))  # no prompt dependence yet


def test_fresh_text_dit_with_active_adaln_computes_what_the_plain_dit_with_the_same_weights_computes():
    model = randomize_zero_init(dit(), keep=("cross_attn.to_out",)).eval()
    plain = dit(context_dim=0).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    x, t, context = batch(model)
    out = model(x, t, context=context)
    assert out.abs().max() > 0.01
    torch.testing.assert_close(out, plain(x, t), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the prompt matters


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_output_depends_on_the_prompt_once_the_zero_outputs_are_random(kind):
    model = randomize_zero_init(NETWORKS[kind]()).eval()
    x, t, context = batch(model)
    a, b = model(x, t, context=context), model(x, t, context=torch.randn_like(context))
    assert (a - b).abs().max() > 1e-3
    single = context.clone()
    single[1, 2] += 1.0  # one token of the second prompt
    c = model(x, t, context=single)
    assert torch.equal(c[0], a[0]) or (c[0] - a[0]).abs().max() < 1e-6  # the other sample is untouched
    assert (c[1] - a[1]).abs().max() > 1e-4


def test_a_fresh_text_unet_learns_to_depend_on_the_prompt_in_a_few_steps():
    torch.manual_seed(0)
    model = unet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, context = batch(model, n=4)
    for _ in range(3):  # step 1 moves conv_out off zero, step 2 proj_out (their gradients are zero before)
        opt.zero_grad()
        (model(x, t, context=context) - x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        a, b = model(x, t, context=context), model(x, t, context=torch.randn_like(context))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_gradients_reach_every_parameter_including_cross_attention(kind):
    model = randomize_zero_init(NETWORKS[kind](num_classes=3))
    x, t, context = batch(model)
    model(x, t, torch.tensor([0, 3]), context).square().mean().backward()
    cross = [n for n, _ in model.named_parameters() if "attn2" in n or "cross_attn" in n or "context_embed" in n]
    assert cross
    for name, p in model.named_parameters():
        if name == "label_embed.weight":
            assert p.grad[[0, 3]].abs().sum() > 0 and p.grad[[1, 2]].abs().sum() == 0
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_permuting_the_context_tokens_changes_nothing(kind):
    """Cross-attention without a mask or positions on the keys sees the context as a set of tokens: a fact of
    attention (a permutation of keys and values permutes the softmax weights with them)."""
    model = randomize_zero_init(NETWORKS[kind]()).eval()
    x, t, context = batch(model, tokens=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a, b = model(x, t, context=context), model(x, t, context=context[:, perm])
    assert (a - model(x, t, context=torch.randn_like(context))).abs().max() > 1e-3  # the context matters...
    # ...but not its token order (up to float32 summation order: the permuted softmax sums in another order)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize_zero_init(unet())
    checkpointed = copy.deepcopy(model)
    checkpointed.config.gradient_checkpointing = True
    x, t, context = batch(model)
    for m in (model, checkpointed):
        m.train()
        m(x, t, context=context).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- diffusers as a reference

# The tiny UNet2DConditionModel of ../shared/research/text-to-image.md section 5.1 (lddpm `tiny` at 1 channel,
# transformers at 8x8 and in the middle, MiniLM's 384-wide token states): 1,575,393 parameters.
SD_TINY = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
           "layers_per_block": 1, "norm_num_groups": 8, "norm_eps": 1e-05,
           "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
           "mid_block_type": "UNetMidBlock2DCrossAttn",
           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
           "cross_attention_dim": 384, "attention_head_dim": 2, "transformer_layers_per_block": 1,
           "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
           "act_fn": "silu", "dropout": 0.0, "resnet_time_scale_shift": "default", "upcast_attention": False,
           "only_cross_attention": False, "num_class_embeds": None, "class_embed_type": None,
           "addition_embed_type": None, "encoder_hid_dim": None, "time_embedding_type": "positional"}


@pytest.mark.parametrize("variant", ["research-5.1", "classes+depth2+scale-shift"])
def test_text_unet_computes_what_diffusers_unet2dconditionmodel_computes(variant):
    diffusers = pytest.importorskip("diffusers")
    theirs_config, ours_fields = dict(SD_TINY), dict(in_channels=1, num_heads=2, context_dim=384)
    if variant != "research-5.1":
        theirs_config.update(num_class_embeds=4, transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift")
        ours_fields.update(num_classes=3, transformer_depth=2, use_scale_shift_norm=True)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**theirs_config).eval()
    ours = randomize_zero_init(build_network("unet", "tiny", **ours_fields), std=0.05).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref)
    if variant == "research-5.1":
        assert count(ours) == 1_575_393
    state = to_diffusers_state(CLASS_FOR_KIND["unet"], ours.config, ours.state_dict())
    ref.load_state_dict(state, strict=True)  # every tensor has a place, and every place a tensor
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 250, 999])
    context = torch.randn(3, 16, 384)
    y = torch.tensor([0, 2, 3]) if ours.num_classes else None
    with torch.no_grad():
        got = ours(x, t, y, context)
        want = ref(x, t, encoder_hidden_states=context, class_labels=y).sample
        other = ours(x, t, y, torch.randn_like(context))
    assert (got - other).abs().max() > 1e-3  # the prompt matters in this comparison
    assert (got - want).abs().max().item() <= 1e-5


def test_text_dit_computes_what_diffusers_adaln_zero_transformer_with_cross_attention_computes():
    """diffusers' Transformer2DModel with norm_type "ada_norm_zero", cross_attention_dim and caption_channels
    is a DiT whose blocks cross-attend after a LayerNorm without affine to the MLP-projected captions."""
    diffusers = pytest.importorskip("diffusers")
    ours = randomize_zero_init(dit(num_classes=5, learned_sigma=True, freq_shift=1.0), std=0.3).eval()
    c = ours.config
    ref = diffusers.Transformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=ours.out_channels, num_layers=c.depth, sample_size=c.resolution, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        norm_eps=c.mlp_norm_eps, activation_fn="gelu-approximate", attention_bias=True,
        cross_attention_dim=c.hidden_size, caption_channels=c.context_dim).eval()
    ref.load_state_dict(to_diffusers_state(CLASS_FOR_KIND["dit"], c, ours.state_dict()), strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([0, 4, 5])
    context = torch.randn(3, 6, CTX)
    with torch.no_grad():
        got = ours(x, t, y, context)
        want = ref(x, encoder_hidden_states=context, timestep=t, class_labels=y, return_dict=False)[0]
    assert got.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-5


def test_exporting_a_text_network_as_a_plain_diffusers_class_is_refused():
    with pytest.raises(LddpmError, match="UNet2DConditionModel"):
        unet_config_to_diffusers(unet().config)
    with pytest.raises(LddpmError, match="no cross-attention"):
        dit_config_to_diffusers(dit(num_classes=3, freq_shift=1.0).config)


# ----------------------------------------------------------------------------- transformer positions


def test_sincos_table_is_the_closed_form_and_rectangular_grids_are_row_major():
    from lddpm.nn.layers import sincos_position_embedding
    dim, rows, cols = 8, 3, 5
    table = sincos_position_embedding(dim, rows, cols)
    assert table.shape == (rows * cols, dim)
    r, c = 2, 4
    freqs = [1.0, 0.01]                                 # 10000^(-i / (dim/4)), i = 0, 1
    want = ([math.sin(c * f) for f in freqs] + [math.cos(c * f) for f in freqs]
            + [math.sin(r * f) for f in freqs] + [math.cos(r * f) for f in freqs])
    assert torch.allclose(table[r * cols + c], torch.tensor(want), atol=1e-6)
    assert torch.equal(sincos_position_embedding(dim, 4), sincos_position_embedding(dim, 4, 4))


def test_transformer_positions_break_left_right_symmetry_and_nothing_else_changes():
    torch.manual_seed(0)
    plain = randomize_zero_init(unet())
    placed = unet(transformer_pos_embed=True)
    placed.load_state_dict(plain.state_dict())          # same weights: the table is a fixed buffer-free term
    x, t, ctx = batch(plain)
    x = x + x.flip(-1)                                  # a left-right symmetric input
    with torch.no_grad():
        a, b = plain(x, t, context=ctx), placed(x, t, context=ctx)
    assert not torch.allclose(a, b, atol=1e-4)
    # a fresh network (zero-initialised transformer outputs) is the same function with or without positions
    fresh = unet()
    fresh_placed = unet(transformer_pos_embed=True)
    fresh_placed.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context=ctx), fresh_placed(x, t, context=ctx))


def test_transformer_positions_need_prompts_and_cannot_be_exported():
    from lddpm.convert.diffusers import unet_cond_config_to_diffusers
    with pytest.raises(LddpmError, match="needs context_dim"):
        unet(context_dim=0, transformer_pos_embed=True)
    with pytest.raises(LddpmError, match="no position embedding"):
        unet_cond_config_to_diffusers(unet(transformer_pos_embed=True).config)


# ----------------------------------------------------------------------------- the trainable context refiner


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_fresh_context_refiner_is_the_identity_and_trained_one_changes_the_output(kind):
    torch.manual_seed(0)
    plain = randomize_zero_init(NETWORKS[kind](context_dim=64)).eval()
    refined = NETWORKS[kind](context_dim=64, context_layers=2).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("context_refiner.") for k in missing)
    x, t, ctx = batch(plain, tokens=6)
    with torch.no_grad():
        assert torch.allclose(plain(x, t, context=ctx), refined(x, t, context=ctx), atol=1e-6)
        randomize_zero_init(refined)
        # the refiner is one pre-LN encoder layer after another: recompute it by hand from its weights
        want = ctx
        for layer in refined.context_refiner:
            h = nn.functional.layer_norm(want, (64,), layer.norm1.weight, layer.norm1.bias)
            q, k, v = (h @ w.T + b for w, b in zip(layer.attn.in_proj_weight.chunk(3), layer.attn.in_proj_bias.chunk(3)))
            split = lambda z: z.view(*z.shape[:2], 1, 64).transpose(1, 2)  # noqa: E731  (one head of 64)
            a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 8.0, -1) @ split(v)
            want = want + layer.attn.out_proj(a.transpose(1, 2).reshape(want.shape))
            want = want + layer.mlp(nn.functional.layer_norm(want, (64,), layer.norm2.weight, layer.norm2.bias))
        states = refined.conditioning.context_states(ctx, 2, torch.device("cpu"))
        if kind == "dit":
            want = refined.context_embed(want)
        assert torch.allclose(states, want, atol=1e-5)
        assert not torch.allclose(plain(x, t, context=ctx), refined(x, t, context=ctx), atol=1e-4)
    loss = refined(x, t, context=ctx).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refined.context_refiner.parameters())


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_context_refiner_fields_are_checked_and_it_cannot_be_exported(kind):
    from lddpm.convert.diffusers import unet_cond_config_to_diffusers
    with pytest.raises(LddpmError, match="context_layers=-1 must be >= 0"):
        NETWORKS[kind](context_dim=64, context_layers=-1)
    with pytest.raises(LddpmError, match="only with context_dim > 0"):
        NETWORKS[kind](context_dim=0, context_layers=1)
    with pytest.raises(LddpmError, match="multiple of 64"):
        NETWORKS[kind](context_dim=CTX, context_layers=1)
    if kind == "unet":
        with pytest.raises(LddpmError, match="no place for the trained refiner"):
            unet_cond_config_to_diffusers(unet(context_dim=64, context_layers=1).config)
