"""Guidance (CFG, autoguidance, the guidance interval) with the sigma-space samplers, SamplingSpec's sampler
options, the NFE plan from the sampler's grid, and SDEdit / denoising / task sampling with sigma-space samplers.

Toy networks; the identities: an interval covering every evaluated sigma is plain CFG and an empty one the
unguided conditional model, for Euler / Heun on Karras grids (fractional t) as for DDIM; the rows counted
through `sample()` equal the plan built from `model_evaluation_sigmas` (Heun 2N - 1, churn's raised sigma);
SDEdit at strength 1 with a sigma-space sampler is `sample()` on the "time" grid from the same noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from lddpm.diffusion import GaussianDiffusion
from lddpm.editing import denoise, sample_conditioned, sdedit
from lddpm.errors import LddpmError
from lddpm.guidance import ClassifierFreeGuidance, evaluations_per_step
from lddpm.sampling import SamplingSpec, count_model_evaluations, model_evaluation_sigmas, sample
from lddpm.schedule import NoiseSchedule
from lddpm.solvers import SamplerOptions

NULL = 3


class Net(torch.nn.Module):
    """A conditional toy network (null label 3) that records each call's rows; `gain` makes a guide."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain
        self.emb = torch.tensor([0.5, -0.3, 0.8, 0.0])
        self.calls: list[int] = []

    def forward(self, x, t, y=None, cond_image=None):
        self.calls.append(x.shape[0])
        y = torch.full((x.shape[0],), NULL) if y is None else y
        h = torch.tanh(self.gain * x * (1 + self.emb[y].view(-1, 1, 1, 1))) + t.view(-1, 1, 1, 1).float() / 1000
        return h if cond_image is None else h + 0.1 * cond_image


def _d() -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))


def _sample(net, d, sampler, **kw):
    return sample(net, d, (4, 1, 3, 3), sampler=sampler, num_steps=6, y=torch.tensor([0, 1, 2, 0]), null_label=NULL,
                  generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm++3m"])
def test_an_interval_holding_every_sigma_is_cfg_and_an_empty_one_no_guidance(sampler):
    d = _d()
    cfg = _sample(Net(), d, sampler, guidance_scale=3.0)
    wide = _sample(Net(), d, sampler, guidance_scale=3.0, guidance_interval=(0.0, math.inf))
    torch.testing.assert_close(wide, cfg, rtol=0, atol=0)
    cond = _sample(Net(), d, sampler)
    empty = _sample(Net(), d, sampler, guidance_scale=3.0, guidance_interval=(0.0, 0.0))
    torch.testing.assert_close(empty, cond, rtol=0, atol=0)
    assert not torch.equal(cfg, cond)


@pytest.mark.parametrize("sampler,options", [("euler", None), ("heun", None), ("heun", {"s_churn": 40.0}),
                                             ("unipc", {"grid": "logsnr"}), ("ddim", None)])
def test_counted_rows_equal_the_plan_from_the_evaluation_sigmas(sampler, options):
    d = _d()
    sigmas = model_evaluation_sigmas(sampler, 6, d, sampler_options=options)
    assert len(sigmas) == count_model_evaluations(sampler, 6, d, sampler_options=options)
    interval = (sorted(sigmas)[1], sorted(sigmas)[-2])         # guidance at some evaluations only
    net, guide = Net(), Net(gain=0.5)
    _sample(net, d, sampler, guidance_scale=3.0, guide=guide, guide_scale=2.0, guidance_interval=interval,
            sampler_options=options)
    plan = [evaluations_per_step(s, guidance_scale=3.0, guide_scale=2.0, interval=interval, guide=True)
            for s in sigmas]
    assert sum(net.calls) == 4 * sum(m for m, _ in plan)
    assert sum(guide.calls) == 4 * sum(g for _, g in plan)
    assert len(net.calls) == len(sigmas)
    assert 0 < sum(g for _, g in plan) < len(sigmas)           # the interval cut some evaluations


def test_heun_evaluates_2n_minus_1_times_and_churn_raises_the_planned_sigma():
    d = _d()
    plain = model_evaluation_sigmas("heun", 5, d)
    assert len(plain) == 9
    churned = model_evaluation_sigmas("heun", 5, d, sampler_options={"s_churn": 40.0})
    assert churned[0] == pytest.approx(plain[0] * math.sqrt(2.0))   # gamma = min(40 / 5, sqrt 2 - 1)


def test_the_spec_carries_sampler_options_and_keywords_do_too():
    d = _d()
    spec = SamplingSpec(sampler="euler", num_steps=6, sampler_options={"grid": "time", "eps_scaling": 1.01})
    assert isinstance(spec.sampler_options, SamplerOptions) and spec.options() == {"grid": "time", "eps_scaling": 1.01}
    assert SamplingSpec(sampler="euler", sampler_options={}).sampler_options is None
    net = Net()
    y = torch.tensor([0, 1, 2, 0])
    a = sample(net, d, (4, 1, 3, 3), spec, y=y, null_label=NULL, generator=torch.Generator().manual_seed(0))
    b = sample(net, d, (4, 1, 3, 3), sampler="euler", num_steps=6, sampler_options={"grid": "time", "eps_scaling": 1.01},
               y=y, null_label=NULL, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(LddpmError, match="s_churn does not apply"):
        SamplingSpec(sampler="ddim", sampler_options={"s_churn": 1.0})
    with pytest.raises(LddpmError, match="not both"):
        sample(net, d, (4, 1, 3, 3), spec, sampler_options={"grid": "karras"})


def test_cfg_gives_the_conditioning_image_to_both_branches():
    net = Net()
    x, t, y, img = torch.randn(2, 1, 3, 3), torch.full((2,), 300), torch.tensor([0, 2]), torch.randn(2, 1, 3, 3)
    out = ClassifierFreeGuidance(net, 3.0, NULL)(x, t, y=y, cond_image=img)
    c, u = net(x, t, y=y, cond_image=img), net(x, t, cond_image=img)
    torch.testing.assert_close(out, u + 3.0 * (c - u))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm++3m", "dpm++2m-sde", "unipc", "ipndm"])
def test_sdedit_denoise_and_task_sampling_run_sigma_space_samplers(sampler):
    d = _d()
    x0 = torch.rand(2, 1, 3, 3) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    full = sdedit(Net(), d, x0, 1.0, sampler=sampler, num_steps=5, generator=gens())
    ref = sample(Net(), d, (2, 1, 3, 3), sampler=sampler, num_steps=5, sampler_options={"grid": "time"},
                 generator=gens())
    torch.testing.assert_close(full, ref, rtol=0, atol=0)       # strength 1: sample() on the time grid, same noise
    part = sdedit(Net(), d, x0, 0.4, sampler=sampler, num_steps=5, generator=gens())
    clean = denoise(Net(), d, x0 + 0.1 * torch.randn(2, 1, 3, 3), 0.1, sampler=sampler, num_steps=5, generator=gens())
    task = sample_conditioned(Net(), d, torch.randn(2, 1, 3, 3), (2, 1, 3, 3), sampler=sampler, num_steps=5,
                              guidance_scale=2.0, y=torch.tensor([0, 1]), null_label=NULL, generator=gens())
    for out in (part, clean, task):
        assert out.shape == x0.shape and bool(torch.isfinite(out).all())
