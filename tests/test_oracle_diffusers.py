"""diffusers as a test-only oracle: betas, spacings and DDPM/DDIM/DPM-Solver++ steps on the same model outputs.

diffusers computes its schedules in float32; to compare the samplers in float64 we put our float64
alphas_cumprod into the diffusers scheduler. Deliberate differences are tested as such (see
docs/diffusion.md): DDIM's previous step for trailing/linspace, DDPM's noise at a final step t > 0,
linear betas for T != 1000, and DPM-Solver++'s own leading/linspace spacings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from lddpm.diffusion import GaussianDiffusion  # noqa: E402
from lddpm.sampling import Denoiser, sample_ddim, sample_ddpm, sample_dpmpp_2m  # noqa: E402
from lddpm.schedule import NoiseSchedule  # noqa: E402

# ours -> diffusers beta_schedule name
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid_beta": "sigmoid"}
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
T = 1000


def _sched_kwargs(name: str) -> dict:
    """diffusers' beta_start/beta_end for each schedule (its defaults except scaled_linear)."""
    return {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(name, {})


def _make(cls, name: str, **kwargs):
    """A diffusers scheduler for our schedule `name`; DDIM/DPM-Solver lack "sigmoid", so those get
    trained_betas (the arrays are replaced by our float64 ones anyway)."""
    try:
        return cls(num_train_timesteps=T, beta_schedule=SCHEDULE_NAMES[name], **_sched_kwargs(name), **kwargs)
    except NotImplementedError:
        betas = NoiseSchedule.from_name(name, T).betas.numpy()
        return cls(num_train_timesteps=T, trained_betas=betas, **kwargs)


def _use_float64(sched, ours: NoiseSchedule) -> None:
    """Replace the float32 schedule arrays of a diffusers scheduler with our float64 ones."""
    sched.betas = ours.betas.clone()
    sched.alphas = ours.alphas.clone()
    sched.alphas_cumprod = ours.alphas_cumprod.clone()
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "one"):
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "alpha_t"):
        sched.alpha_t = ours.alphas_cumprod.sqrt()
        sched.sigma_t = (1 - ours.alphas_cumprod).sqrt()
        sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)


class FakeModel:
    """A smooth deterministic 'network' that records what it was called with."""

    def __init__(self, channels_out: int | None = None) -> None:
        self.calls: list[tuple[torch.Tensor, int]] = []
        self.channels_out = channels_out

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        assert t.dtype == torch.long and bool((t == t[0]).all())
        self.calls.append((x.clone(), int(t[0])))
        out = 0.8 * torch.tanh(x) + 0.1 * torch.cos(3 * x + t[0].item() / 97.0)
        if self.channels_out is not None and self.channels_out > x.shape[1]:
            out = torch.cat([out, torch.sin(x + t[0].item() / 50.0)], 1)   # variance channels in [-1, 1]
        return out


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", list(SCHEDULE_NAMES))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_match_diffusers(name, zero_snr):
    """Our float64 betas equal diffusers' float32 ones to float32 precision, for every shared schedule.

    diffusers' zero-terminal-SNR rescaling divides nearly equal float32 numbers (relative error ~1e-3
    in small betas), so there the tolerance is looser; `test_zero_terminal_snr_matches_diffusers_float64`
    checks the rescaling itself in float64."""
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULE_NAMES[name],
                                  rescale_betas_zero_snr=zero_snr, **_sched_kwargs(name))
    ours = NoiseSchedule.from_name(name, T, rescale_zero_terminal_snr=zero_snr)
    rtol, atol = (5e-5, 1e-6) if zero_snr else (2e-5, 1e-7)
    np.testing.assert_allclose(ours.betas.numpy(), ref.betas.double().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(),
                               rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_matches_diffusers_float64(name):
    """Algorithm 1 of Lin et al. 2024: ours vs diffusers' rescale_zero_terminal_snr run on float64 betas."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    base = NoiseSchedule.from_name(name, T)
    ours = NoiseSchedule.from_name(name, T, rescale_zero_terminal_snr=True)
    ref = rescale_zero_terminal_snr(base.betas.clone())
    np.testing.assert_allclose(ours.betas.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_linear_betas_differ_from_diffusers_for_other_T_on_purpose():
    """Deliberate: linear betas are rescaled by 1000/T (Nichol & Dhariwal 2021); diffusers keeps 1e-4..0.02."""
    ref = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")
    ours = NoiseSchedule.from_name("linear", 100)
    assert ours.betas[-1].item() == pytest.approx(0.2) and ref.betas[-1].item() == pytest.approx(0.02)
    same = NoiseSchedule.from_name("linear", 100, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(same.betas.numpy(), ref.betas.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 999, 1000])
def test_spacings_match_diffusers_ddim(spacing, num_steps):
    """leading/trailing/linspace timesteps equal diffusers' DDIM/DDPM set_timesteps (T = 1000)."""
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(num_steps)
    ours = NoiseSchedule.from_name("linear", T).timesteps(num_steps, spacing)
    assert ours.tolist() == ref.timesteps.tolist()


def test_dpm_solver_spacings_differ_on_purpose():
    """Deliberate: DPMSolverMultistep's leading/linspace use S + 1 points and drop t = 0; ours are the
    DDIM ones for every sampler (trailing is the same)."""
    ours = NoiseSchedule.from_name("linear", T)
    for spacing, same in [("trailing", True), ("linspace", False), ("leading", False)]:
        ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(20)
        assert (ours.timesteps(20, spacing).tolist() == ref.timesteps.tolist()) == same
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="linspace")
    ref.set_timesteps(20)
    expected = np.round(np.linspace(0, T - 1, 21))[::-1][:-1].astype(int).tolist()
    assert ref.timesteps.tolist() == expected


def _run_diffusers(sched, model, x, timesteps, generator=None, **step_kwargs):
    for t in timesteps:
        t = int(t)
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x = sched.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def _compare_calls(ours: FakeModel, ref: FakeModel, rtol: float, atol: float, skip_last_output: bool = False):
    assert [t for _, t in ours.calls] == [t for _, t in ref.calls]
    for (xa, _), (xb, _) in zip(ours.calls, ref.calls):
        torch.testing.assert_close(xa, xb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(SCHEDULE_NAMES))
@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
def test_ddim_matches_diffusers(name, objective, spacing):
    """DDIM eta = 0 step by step vs DDIMScheduler (set_alpha_to_one=True), T divisible by S.

    With T % S == 0 diffusers' prev = t - T // S is our next timestep for leading and trailing; for
    linspace the gaps are uneven, so diffusers' prev differs: there we check ours visits the listed
    timesteps and matches diffusers only on the first step.
    """
    ours_sched = NoiseSchedule.from_name(name, T)
    diff = GaussianDiffusion(ours_sched, objective=objective)
    ref = _make(diffusers.DDIMScheduler, name, clip_sample=False, prediction_type=PRED[objective],
                timestep_spacing=spacing)
    _use_float64(ref, ours_sched)
    ref.set_timesteps(20)
    ts = ours_sched.timesteps(20, spacing)
    assert ts.tolist() == ref.timesteps.tolist()
    m_ours, m_ref = FakeModel(), FakeModel()
    a = sample_ddim(Denoiser(m_ours, diff, clip_x0=False), _x_T(), ts)
    b = _run_diffusers(ref, m_ref, _x_T(), ref.timesteps)
    if spacing == "linspace":
        torch.testing.assert_close(m_ours.calls[0][0], m_ref.calls[0][0])
        assert not torch.allclose(m_ours.calls[1][0], m_ref.calls[1][0])
        return
    _compare_calls(m_ours, m_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_and_clipping_match_diffusers(eta):
    """DDIM with eta > 0 (same generator stream) and x0 clipping with eps re-derived from the clipped x0."""
    s = NoiseSchedule.from_name("linear", T)
    diff = GaussianDiffusion(s, objective="eps")
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=True, timestep_spacing="leading")
    _use_float64(ref, s)
    ref.set_timesteps(25)
    x = _x_T() * 3
    a = sample_ddim(Denoiser(FakeModel(), diff, clip_x0=True), x, s.timesteps(25, "leading"), eta=eta, generator=torch.Generator().manual_seed(5))
    b = _run_diffusers(ref, FakeModel(), x, ref.timesteps, generator=torch.Generator().manual_seed(5),
                       eta=eta, use_clipped_model_output=True)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULE_NAMES))
@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
def test_ddpm_respaced_matches_diffusers(name, objective, spacing):
    """Ancestral DDPM (fixed small variance) over 20 respaced steps vs DDPMScheduler, same noise stream.

    diffusers adds (1e-10-scale) noise at a final step t > 0 (trailing); ours stops at the mean.
    """
    s = NoiseSchedule.from_name(name, T)
    diff = GaussianDiffusion(s, objective=objective)
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULE_NAMES[name], clip_sample=True,
                                  prediction_type=PRED[objective], timestep_spacing=spacing, **_sched_kwargs(name))
    _use_float64(ref, s)
    ref.set_timesteps(20)
    m_ours, m_ref = FakeModel(), FakeModel()
    a = sample_ddpm(Denoiser(m_ours, diff, clip_x0=True), _x_T(), s.timesteps(20, spacing), variance="small", generator=torch.Generator().manual_seed(1))
    b = _run_diffusers(ref, m_ref, _x_T(), ref.timesteps, generator=torch.Generator().manual_seed(1))
    _compare_calls(m_ours, m_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("variance,vt", [("large", "fixed_large"), ("learned", "learned_range")])
def test_ddpm_full_chain_variances_match_diffusers(variance, vt):
    """All 100 steps of a T = 100 chain with fixed-large or learned (range) variance vs DDPMScheduler."""
    s = NoiseSchedule.from_name("cosine", 100)
    learned = variance == "learned"
    diff = GaussianDiffusion(s, objective="eps", learned_variance=learned)
    ref = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                  variance_type=vt)
    _use_float64(ref, s)
    m_ours, m_ref = FakeModel(4 if learned else None), FakeModel(4 if learned else None)
    a = sample_ddpm(Denoiser(m_ours, diff), _x_T(), s.timesteps(100, "leading"), variance="large" if not learned else "small", generator=torch.Generator().manual_seed(2))
    b = _run_diffusers(ref, m_ref, _x_T(), ref.timesteps, generator=torch.Generator().manual_seed(2))
    _compare_calls(m_ours, m_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", list(SCHEDULE_NAMES))
@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("num_steps", [8, 20])
def test_dpmpp_2m_matches_diffusers(name, objective, spacing, num_steps):
    """DPM-Solver++(2M) on our timesteps (passed to diffusers as custom timesteps) vs
    DPMSolverMultistepScheduler (midpoint, lower_order_final, final sigma 0). diffusers steps in
    float32 internally, hence the tolerance."""
    s = NoiseSchedule.from_name(name, T)
    diff = GaussianDiffusion(s, objective=objective)
    ref = _make(diffusers.DPMSolverMultistepScheduler, name, prediction_type=PRED[objective])
    _use_float64(ref, s)
    ts = s.timesteps(num_steps, spacing)
    ref.set_timesteps(timesteps=ts.tolist())
    m_ours, m_ref = FakeModel(), FakeModel()
    a = sample_dpmpp_2m(Denoiser(m_ours, diff, clip_x0=False), _x_T(), ts)
    b = _run_diffusers(ref, m_ref, _x_T(), ref.timesteps)
    _compare_calls(m_ours, m_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dpmpp_2m_clipping_matches_diffusers_thresholding_at_one():
    """clip_x0 equals diffusers' dynamic thresholding with sample_max_value = 1 (a plain clamp)."""
    s = NoiseSchedule.from_name("linear", T)
    diff = GaussianDiffusion(s, objective="eps")
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, thresholding=True, sample_max_value=1.0)
    _use_float64(ref, s)
    ts = s.timesteps(15, "trailing")
    ref.set_timesteps(timesteps=ts.tolist())
    x = _x_T() * 2
    a = sample_dpmpp_2m(Denoiser(FakeModel(), diff, clip_x0=True), x, ts)
    b = _run_diffusers(ref, FakeModel(), x, ref.timesteps)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddpm_fixed_large_final_step_differs_on_purpose():
    """Deliberate: at a final step with t > 0 (trailing) diffusers still adds sqrt(beta) noise with
    fixed_large; ours returns the mean (x0) at the last step for every variance, as improved-diffusion."""
    s = NoiseSchedule.from_name("linear", T)
    diff = GaussianDiffusion(s, objective="eps")
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="fixed_large", timestep_spacing="trailing")
    _use_float64(ref, s)
    ref.set_timesteps(10)
    m_ours, m_ref = FakeModel(), FakeModel()
    a = sample_ddpm(Denoiser(m_ours, diff), _x_T(), s.timesteps(10, "trailing"), variance="large", generator=torch.Generator().manual_seed(3))
    b = _run_diffusers(ref, m_ref, _x_T(), ref.timesteps, generator=torch.Generator().manual_seed(3))
    _compare_calls(m_ours, m_ref, rtol=1e-9, atol=1e-9)       # identical up to the last model call
    assert float(a.abs().max()) <= 1.0 and float((a - b).abs().max()) > 0.05
