"""Guidance interval, autoguidance and their combination with CFG (lddpm.guidance), on toy networks.

The identities: an interval holding every visited sigma is plain CFG, an empty one the unguided conditional
model; autoguidance with the main network as its own guide is the main network for every w; the mixes are the
stated linear combinations exactly; CFG's two branches stay one batched forward; the network rows counted
through `sample()` equal `evaluations_per_step`'s plan.
"""

from __future__ import annotations

import math

import pytest
import torch

from lddpm.diffusion import GaussianDiffusion
from lddpm.errors import LddpmError
from lddpm.guidance import (ClassifierFreeGuidance, GuidedModel, check_interval, evaluations_per_step, guided_model,
                            interval_from_json, interval_json, mix, timestep_sigma)
from lddpm.sampling import Denoiser, SamplingSpec, resolve_spec, sample
from lddpm.schedule import NoiseSchedule

NULL = 3


class Net(torch.nn.Module):
    """A small conditional 'network': output depends on x, t and the label (null label 3); records each call's rows
    and timestep. `gain` makes a different network of the same kind (a guide)."""

    def __init__(self, gain: float = 1.0, channels_out: int = 1) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(4, 1)
        with torch.no_grad():                               # fixed weights: every Net(gain) is the same network
            self.emb.weight.copy_(torch.tensor([[0.5], [-0.3], [0.8], [0.0]]))
        self.gain, self.channels_out = gain, channels_out
        self.calls: list[tuple[int, int]] = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], int(t[0])))
        y = torch.full((x.shape[0],), NULL) if y is None else y
        h = torch.tanh(self.gain * x * (1 + self.emb(y).view(-1, 1, 1, 1))) + t.view(-1, 1, 1, 1) / 1000
        return torch.cat([h, torch.sin(h + 1)], 1) if self.channels_out == 2 else h


class Uncond(torch.nn.Module):
    """An unconditional 'network' (no label input)."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain
        self.calls: list[int] = []

    def forward(self, x, t):
        self.calls.append(x.shape[0])
        return torch.tanh(self.gain * x) + t.view(-1, 1, 1, 1) / 1000


def _diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))


def _sample(net, d, **kw):
    y = torch.tensor([0, 1, 2, 0])
    return sample(net, d, (4, 1, 3, 3), sampler="ddim", num_steps=8, y=y, null_label=NULL,
                  generator=torch.Generator().manual_seed(0), **kw)


def _sigmas(d, num_steps=8):
    return [timestep_sigma(d.schedule.alphas_cumprod, int(t)) for t in d.schedule.timesteps(num_steps, "trailing")]


def test_timestep_sigma_is_the_ve_noise_level_and_interpolates_log_sigma():
    d = _diffusion()
    ac = d.schedule.alphas_cumprod
    for t in (0, 17, 500, 999):
        a = float(ac[t])
        assert timestep_sigma(ac, t) == pytest.approx(math.sqrt((1 - a) / a), rel=1e-12)
    mid = timestep_sigma(ac, 500.5)
    assert mid == pytest.approx(math.sqrt(timestep_sigma(ac, 500) * timestep_sigma(ac, 501)), rel=1e-12)
    with pytest.raises(LddpmError, match="outside the schedule"):
        timestep_sigma(ac, 1000)


def test_interval_covering_every_sigma_is_plain_cfg_and_an_empty_one_is_the_conditional_model():
    d = _diffusion()
    cfg = _sample(Net(), d, guidance_scale=3.0)
    assert torch.equal(_sample(Net(), d, guidance_scale=3.0, guidance_interval=(0.0, math.inf)), cfg)
    plain = _sample(Net(), d)
    empty = (0.0, 0.5 * min(_sigmas(d)))                 # below the smallest visited sigma: no step inside
    assert torch.equal(_sample(Net(), d, guidance_scale=3.0, guidance_interval=empty), plain)
    assert not torch.equal(cfg, plain)
    # the same holds for autoguidance, alone and with CFG
    guide = Net(gain=0.5)
    ag = _sample(Net(), d, guide=guide, guide_scale=2.0)
    assert not torch.equal(ag, plain)
    assert torch.equal(_sample(Net(), d, guide=guide, guide_scale=2.0, guidance_interval=(0.0, math.inf)), ag)
    assert torch.equal(_sample(Net(), d, guide=guide, guide_scale=2.0, guidance_scale=3.0, guidance_interval=empty),
                       plain)


def test_inside_the_interval_the_step_is_guided_and_outside_it_is_one_conditional_evaluation():
    d = _diffusion()
    net, guide = Net(), Net(gain=0.5)
    sigmas = _sigmas(d)
    lo, hi = sorted(sigmas)[2], sorted(sigmas)[5]            # four of the eight steps inside
    x, y = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    net, guide = net.double(), guide.double()
    model = GuidedModel(net, 3.0, NULL, guide=guide, guide_scale=2.0, interval=(lo, hi),
                        alphas_cumprod=d.schedule.alphas_cumprod)
    for t in d.schedule.timesteps(8, "trailing"):
        tt = torch.full((4,), int(t))
        sigma = timestep_sigma(d.schedule.alphas_cumprod, int(t))
        with torch.no_grad():
            c, u = net(x, tt, y=y), net(x, tt, y=torch.full((4,), NULL))
            g = guide(x, tt, y=y)
            out = model(x, tt, y=y)
        if lo <= sigma <= hi:
            torch.testing.assert_close(out, c + 2.0 * (c - u) + 1.0 * (c - g), rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(out, c)


def test_autoguidance_with_the_main_network_as_guide_is_the_main_network_for_every_w():
    d = _diffusion()
    x, t = torch.randn(3, 1, 3, 3), torch.full((3,), 400)
    for net in (Uncond(), Net()):
        cond = {} if isinstance(net, Uncond) else {"y": torch.tensor([0, 1, 2])}
        with torch.no_grad():
            plain = net(x, t, **cond)
            for w in (0.0, 0.5, 2.0, 7.0):
                assert torch.equal(GuidedModel(net, guide=net, guide_scale=w)(x, t, **cond), plain)
    ref = sample(Uncond(), d, (3, 1, 3, 3), num_steps=6, generator=torch.Generator().manual_seed(1))
    for w in (0.0, 3.0):
        net = Uncond()
        assert torch.equal(sample(net, d, (3, 1, 3, 3), num_steps=6, guide=net, guide_scale=w,
                                  generator=torch.Generator().manual_seed(1)), ref)


def test_the_guidance_mixes_are_the_stated_linear_combinations():
    g = torch.Generator().manual_seed(0)
    c, u, gd = (torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s, w = 2.5, 1.75
    torch.testing.assert_close(mix(c, u, None, s, 1.0, 2), u + s * (c - u), rtol=0, atol=0)
    torch.testing.assert_close(mix(c, None, gd, 1.0, w, 2), gd + w * (c - gd), rtol=0, atol=0)
    both = mix(c, u, gd, s, w, 2)
    torch.testing.assert_close(both, (1 + (s - 1) + (w - 1)) * c - (s - 1) * u - (w - 1) * gd, rtol=1e-12, atol=1e-12)
    # w = 1 is CFG, s = 1 is autoguidance (to rounding)
    torch.testing.assert_close(mix(c, u, gd, s, 1.0, 2), u + s * (c - u), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix(c, u, gd, 1.0, w, 2), gd + w * (c - gd), rtol=1e-12, atol=1e-12)
    # a learned variance: only the first C channels are mixed, the rest come from the conditional output
    out = mix(c, u, gd, s, w, 1)
    assert torch.equal(out[:, 1:], c[:, 1:])
    torch.testing.assert_close(out[:, :1], both[:, :1], rtol=1e-12, atol=1e-12)


def test_autoguidance_of_a_learned_variance_model_through_the_wrapper():
    net, guide = Net(channels_out=2), Net(gain=0.3, channels_out=2)
    x, t, y = torch.randn(2, 1, 3, 3), torch.full((2,), 300), torch.tensor([0, 2])
    with torch.no_grad():
        out = GuidedModel(net, guide=guide, guide_scale=3.0)(x, t, y=y)
        c, g = net(x, t, y=y), guide(x, t, y=y)
    torch.testing.assert_close(out[:, :1], g[:, :1] + 3.0 * (c[:, :1] - g[:, :1]))
    assert torch.equal(out[:, 1:], c[:, 1:])


def test_cfg_branches_are_one_batched_forward_and_the_guide_one_more_per_step():
    d = _diffusion()
    net, guide = Net(), Net(gain=0.5)
    _sample(net, d, guidance_scale=3.0, guide=guide, guide_scale=2.0)
    assert [rows for rows, _ in net.calls] == [8] * 8      # condition + null branch of 4 images: one call a step
    assert [rows for rows, _ in guide.calls] == [4] * 8
    assert [t for _, t in net.calls] == [t for _, t in guide.calls]


@pytest.mark.parametrize("s,w,interval", [(1.0, 1.0, None), (3.0, 1.0, None), (0.0, 1.0, None), (1.0, 2.0, None),
                                          (3.0, 2.0, None), (3.0, 1.0, "middle"), (3.0, 2.0, "middle"),
                                          (1.0, 2.0, "empty")])
def test_counted_network_rows_equal_the_plan(s, w, interval):
    d = _diffusion()
    sigmas = _sigmas(d)
    interval = {"middle": (sorted(sigmas)[1], sorted(sigmas)[4]), "empty": (0.0, 0.0), None: None}[interval]
    net, guide = Net(), Net(gain=0.5)
    _sample(net, d, guidance_scale=s, guide=guide if w != 1.0 else None, guide_scale=w, guidance_interval=interval)
    plan = [evaluations_per_step(sig, guidance_scale=s, guide_scale=w, interval=interval, guide=w != 1.0)
            for sig in sigmas]
    assert sum(rows for rows, _ in net.calls) == 4 * sum(m for m, _ in plan)
    assert sum(rows for rows, _ in guide.calls) == 4 * sum(g for _, g in plan)
    assert len(net.calls) == 8                               # one main-network call per step whatever the guidance


def test_guided_model_returns_the_old_objects_when_nothing_new_is_asked():
    net = Net()
    assert guided_model(net) is net
    assert type(guided_model(net, guidance_scale=2.0, null_label=NULL)) is ClassifierFreeGuidance
    assert guided_model(net, interval=(0.1, 1.0)) is net     # an interval with nothing to guide
    ac = _diffusion().schedule.alphas_cumprod
    assert type(guided_model(net, guidance_scale=2.0, null_label=NULL, interval=(0.1, 1.0), alphas_cumprod=ac)) \
        is GuidedModel


@pytest.mark.parametrize("kwargs,match", [
    (dict(guide_scale=2.0), "guide_scale=2 needs a guide network"),
    (dict(guide_scale=float("nan")), "guide_scale must be a finite number"),
    (dict(guidance_interval=(2.0, 1.0)), r"needs 0 <= sigma_lo <= sigma_hi"),
    (dict(guidance_interval=(-1.0, 1.0)), r"needs 0 <= sigma_lo <= sigma_hi"),
    (dict(guidance_interval=(float("nan"), 1.0)), r"needs 0 <= sigma_lo <= sigma_hi"),
    (dict(guidance_interval=(1.0,)), "must be two noise levels"),
    (dict(guidance_interval="wide"), "must be two noise levels"),
])
def test_bad_guidance_settings_are_one_clear_error(kwargs, match):
    d = _diffusion()
    with pytest.raises(LddpmError, match=match):
        sample(Net(), d, (1, 1, 2, 2), num_steps=2, **kwargs)


def test_cfg_on_an_unconditional_model_is_still_refused_with_autoguidance_allowed():
    d = _diffusion()
    with pytest.raises(LddpmError, match="needs a null condition"):
        sample(Uncond(), d, (1, 1, 2, 2), num_steps=2, guidance_scale=2.0, guide=Uncond(0.5), guide_scale=2.0)
    x = sample(Uncond(), d, (1, 1, 2, 2), num_steps=2, guide=Uncond(0.5), guide_scale=2.0)
    assert torch.isfinite(x).all()


def test_an_interval_needs_one_timestep_per_call():
    d = _diffusion()
    model = GuidedModel(Net(), 2.0, NULL, interval=(0.1, 1.0), alphas_cumprod=d.schedule.alphas_cumprod)
    with pytest.raises(LddpmError, match="one timestep per call"):
        model(torch.zeros(2, 1, 2, 2), torch.tensor([10, 20]), y=torch.tensor([0, 1]))
    assert check_interval([0.28, 5.42]) == (0.28, 5.42) and check_interval(None) is None
    assert interval_json((0.28, math.inf)) == [0.28, None] and interval_json(None) is None  # JSON has no inf
    assert interval_from_json(interval_json((0.28, math.inf))) == (0.28, math.inf) and interval_from_json(None) is None


# ---- the sampling spec -------------------------------------------------------------------------------
def test_sample_with_a_spec_equals_the_keyword_form():
    d = _diffusion()
    guide = Net(gain=0.5)
    spec = SamplingSpec(sampler="dpm++2m", num_steps=5, guidance_scale=2.0, guide_scale=1.5,
                        guidance_interval=(0.2, 20.0), spacing="linspace")
    y = torch.tensor([0, 1])
    a = sample(Net(), d, (2, 1, 3, 3), spec, y=y, null_label=NULL, guide=guide, generator=torch.Generator().manual_seed(4))
    b = sample(Net(), d, (2, 1, 3, 3), sampler="dpm++2m", num_steps=5, guidance_scale=2.0, guide_scale=1.5,
               guidance_interval=(0.2, 20.0), spacing="linspace", y=y, null_label=NULL, guide=guide,
               generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    with pytest.raises(LddpmError, match="in the SamplingSpec or as keywords, not both"):
        sample(Net(), d, (2, 1, 3, 3), spec, num_steps=3)
    assert resolve_spec(None, eta=None, sampler="ddpm") == SamplingSpec(sampler="ddpm")
    assert spec.replace(seed=3).seed == 3 and spec.guidance_interval == (0.2, 20.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="lms"), "unknown sampler"), (dict(eta=0.5, sampler="dpm++2m"), "applies only to the 'ddim'"),
    (dict(labels="some"), "labels must be one of"), (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(seed=-1), "seed must be"), (dict(bf16="maybe"), "use true, false"), (dict(guide_scale=math.inf), "finite"),
    (dict(variance="huge"), "variance must be"), (dict(guidance_interval=(3, 1)), "sigma_lo <= sigma_hi"),
])
def test_a_bad_spec_is_refused_when_made(kwargs, match):
    with pytest.raises(LddpmError, match=match):
        SamplingSpec(**kwargs)


def test_denoiser_keeps_its_old_keywords():
    d = _diffusion()
    den = Denoiser(Net(), d, guidance_scale=2.0, null_label=NULL)
    assert isinstance(den.model, ClassifierFreeGuidance) and not isinstance(den.model, GuidedModel)
    den = Denoiser(Net(), d, guide=Net(0.5), guide_scale=2.0, guidance_interval=(0.1, 10.0))
    assert isinstance(den.model, GuidedModel) and den.model.interval == (0.1, 10.0)
