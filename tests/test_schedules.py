"""The noise-schedule object against diffusers' own schedulers."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from comfyui_distillery.core.schedules import (
    DiscreteVPSchedule, RectifiedFlowSchedule, schedule_from_diffusers_config, validate_sigmas)

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def test_alpha_bar_matches_ddpm_scheduler_exactly():
    ref = DDPMScheduler(**SD15)
    sch = DiscreteVPSchedule.sd15()
    assert torch.equal(sch.alphas_cumprod, ref.alphas_cumprod.to(torch.float64))
    t = torch.arange(1000)
    assert torch.allclose(sch.alpha_bar(sch.sigma(t)), ref.alphas_cumprod.double(), rtol=1e-12, atol=0)
    assert sch.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert sch.sigma_min == pytest.approx(0.029168, abs=1e-6)


def test_timestep_sigma_round_trip_and_interpolation():
    sch = DiscreteVPSchedule.sd15()
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sch.timestep(sch.sigma(t)), t)
    frac = torch.tensor([0.25, 10.5, 498.75, 998.9], dtype=torch.float64)
    assert torch.allclose(sch.timestep(sch.sigma(frac)), frac, atol=1e-9)
    # between integers sigma is log-linear (k-diffusion / ComfyUI convention)
    mid = sch.sigma(torch.tensor(10.5, dtype=torch.float64))
    assert float(mid) == pytest.approx(float((sch.sigmas[10] * sch.sigmas[11]).sqrt()), rel=1e-12)
    assert float(sch.timestep(torch.tensor(0.0))) == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_conversions_match_diffusers(prediction_type):
    ref = DDPMScheduler(**SD15, prediction_type=prediction_type)
    sch = DiscreteVPSchedule.sd15(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 249, 500, 749, 999])
    sigma = sch.sigma(t)
    x_vp = ref.add_noise(x0, eps, t)  # diffusers' sample
    x = sch.add_noise(x0, eps, sigma)  # our state (x0 + sigma eps)
    assert torch.allclose(sch.scale_model_input(x, sigma), x_vp, atol=1e-6)
    v_ref = ref.get_velocity(x0, eps, t)
    assert torch.allclose(sch.from_x0(x0, x, sigma, "v_prediction"), v_ref, atol=1e-6)
    assert torch.allclose(sch.from_x0(x0, x, sigma, "epsilon"), eps, atol=1e-9)
    native = eps if prediction_type == "epsilon" else v_ref
    assert torch.allclose(sch.to_x0(native, x, sigma), x0, atol=1e-5)
    flow = sch.from_x0(x0, x, sigma, "flow")
    assert torch.allclose(sch.to_x0(flow, x, sigma, "flow"), x0, atol=1e-9)


def test_flow_schedule_matches_flow_match_euler():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(8)
    sch = RectifiedFlowSchedule(shift=3.0)
    # diffusers builds sigmas linearly in t then shifts them; the timesteps the network sees are sigma*1000
    unshifted_t = torch.linspace(1000, float(ref.sigma_min) * 1000, 8, dtype=torch.float64)
    ours = sch.sigmas_from_timesteps(unshifted_t)
    assert torch.allclose(ours, ref.sigmas.double(), atol=1e-6)
    assert torch.allclose(sch.timestep(ours[:-1]), ref.timesteps.double(), atol=1e-3)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    s = ref.sigmas[2]
    x = sch.add_noise(x0, eps, s)
    assert torch.allclose(x, ref.scale_noise(x0, ref.timesteps[2:3], eps), atol=1e-6)
    assert torch.allclose(sch.to_x0(eps - x0, x, s), x0, atol=1e-5)
    assert torch.allclose(sch.from_x0(x0, x, s, "flow"), eps - x0, atol=1e-5)


def test_renoise_keeps_the_marginal():
    for sch in (DiscreteVPSchedule.sd15(), RectifiedFlowSchedule()):
        lo, hi = sch.sigma(torch.tensor(200.0)), sch.sigma(torch.tensor(700.0))
        g = torch.Generator().manual_seed(0)
        x0 = torch.zeros(200000, dtype=torch.float64)
        x_lo = sch.add_noise(x0, torch.randn(200000, generator=g, dtype=torch.float64), lo)
        x_hi = sch.renoise(x_lo, lo, hi, torch.randn(200000, generator=g, dtype=torch.float64))
        _, s_hi = sch.scales(hi)
        assert float(x_hi.std()) == pytest.approx(float(s_hi), rel=1e-2)


def test_schedule_from_diffusers_config():
    vp = schedule_from_diffusers_config(dict(DDPMScheduler(**SD15, prediction_type="v_prediction").config))
    assert isinstance(vp, DiscreteVPSchedule) and vp.prediction_type == "v_prediction"
    flow = schedule_from_diffusers_config(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert isinstance(flow, RectifiedFlowSchedule) and flow.shift == 3.0


def test_validate_sigmas_names_the_problem():
    ok = torch.tensor([14.6, 3.0, 0.0])
    assert validate_sigmas(ok) is ok
    with pytest.raises(ValueError, match="last sigma must be 0"):
        validate_sigmas(torch.tensor([14.6, 3.0]))
    with pytest.raises(ValueError, match="non-increasing"):
        validate_sigmas(torch.tensor([3.0, 14.6, 0.0]))
    with pytest.raises(ValueError, match="at least two"):
        validate_sigmas(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteVPSchedule.sd15("eps")
