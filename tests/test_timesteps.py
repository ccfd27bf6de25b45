"""Timestep presets and explicit lists: the grids diffusers builds, SIGMAS through the schedule, bad input."""

from __future__ import annotations

import pytest
import torch

from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.sampling import PRESET_NAMES, distilled_sigmas, parse_timesteps, preset_timesteps
from comfyui_distillery.sampling.checks import check_sigmas
from comfyui_distillery.sampling.timesteps import (flow_euler_timesteps, lcm_tcd_timesteps,
                                                   timesteps_to_sigmas, trailing_timesteps)

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
VP = DiscreteVPSchedule.sd15()


def test_fixed_presets():
    assert preset_timesteps("dmd2_4step") == [999, 749, 499, 249]
    assert preset_timesteps("dmd2_1step") == [399]
    assert preset_timesteps("hyper_sd_1step") == [800]
    assert set(PRESET_NAMES) >= {"dmd2_4step", "dmd2_1step", "hyper_sd_1step", "lcm_tcd", "trailing",
                                 "flow_euler", "custom"}


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 50])
def test_lcm_tcd_grid_matches_diffusers(steps):
    from diffusers import LCMScheduler, TCDScheduler
    for cls in (LCMScheduler, TCDScheduler):
        sched = cls(**SD_BETAS)
        sched.set_timesteps(steps)
        assert lcm_tcd_timesteps(steps) == sched.timesteps.tolist()
    assert lcm_tcd_timesteps(4) == [999, 759, 499, 259]


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75])
def test_lcm_tcd_denoise_is_diffusers_strength(strength):
    from diffusers import TCDScheduler
    sched = TCDScheduler(**SD_BETAS)
    sched.set_timesteps(4, strength=strength)
    assert preset_timesteps("lcm_tcd", steps=4, denoise=strength) == sched.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 25])
def test_trailing_grid_matches_diffusers(steps):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert trailing_timesteps(steps) == sched.timesteps.tolist()
    assert trailing_timesteps(4) == [999, 749, 499, 249]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_grid_matches_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    sigmas = distilled_sigmas(RectifiedFlowSchedule(shift=shift), "flow_euler", steps=steps)
    assert sigmas.dtype == torch.float64 and len(sigmas) == steps + 1
    assert float((sigmas - sched.sigmas.double()).abs().max()) < 1e-6
    assert len(flow_euler_timesteps(steps, shift)) == steps


def test_flow_timesteps_use_the_model_shift_and_multiplier():
    sd3 = RectifiedFlowSchedule(shift=3.0)
    flux = RectifiedFlowSchedule(shift=3.0, multiplier=1.0)  # Flux: timestep = sigma
    for sch in (sd3, flux):
        sig = timesteps_to_sigmas(sch, [1000, 500])
        assert sig.tolist() == pytest.approx([1.0, 0.75, 0.0])  # shift 3: 0.5 -> 1.5 / 2


def test_vp_sigmas_are_the_schedule_sigmas():
    sig = distilled_sigmas(VP, "dmd2_4step")
    assert sig.tolist() == pytest.approx([float(VP.sigmas[t]) for t in (999, 749, 499, 249)] + [0.0],
                                         rel=1e-12)
    check_sigmas(sig, require_final_zero=True)


def test_custom_list_and_denoise():
    assert preset_timesteps("custom", timesteps="999, 749 499,249") == [999, 749, 499, 249]
    assert preset_timesteps("custom", timesteps="[999,500]") == [999, 500]
    # fixed lists: diffusers' strength keeps the last int(len * denoise)
    assert preset_timesteps("dmd2_4step", denoise=0.5) == [499, 249]
    assert preset_timesteps("dmd2_4step", denoise=0.8) == [749, 499, 249]
    # grids: ComfyUI BasicScheduler keeps `steps` of the int(steps / denoise) grid
    assert preset_timesteps("trailing", steps=2, denoise=0.5) == trailing_timesteps(4)[-2:]
    sig = distilled_sigmas(VP, "trailing", steps=2, denoise=0.5)
    assert len(sig) == 3 and float(sig[-1]) == 0.0


@pytest.mark.parametrize("text, match", [
    ("749,999", "strictly decreasing"),
    ("999,749,749", "strictly decreasing"),
    ("1000,500", "out of range"),
    ("999,-1", "out of range"),
    ("999,749.5", "not an integer"),
    ("999,abc", "not a number"),
    ("", "empty"),
])
def test_bad_timestep_lists_name_the_field(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_timesteps(text)
    assert str(err.value).startswith("timesteps")


def test_flow_lists_are_continuous():
    assert parse_timesteps("1000, 750.5, 250", discrete=False) == [1000.0, 750.5, 250.0]
    with pytest.raises(ValueError, match="out of range"):
        parse_timesteps("1000, 0", discrete=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="dmd2_1step", denoise=0.5), "denoise"),
    (dict(preset="trailing", denoise=0.0), "denoise"),
    (dict(preset="trailing", denoise=1.5), "denoise"),
    (dict(preset="trailing", steps=0), "steps"),
    (dict(preset="lcm_tcd", steps=60), "steps"),
    (dict(preset="nope"), "preset"),
    (dict(preset="flow_euler"), "flow"),
])
def test_bad_preset_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distilled_sigmas(VP, **kwargs)


def test_sigmas_without_final_zero():
    with pytest.raises(ValueError, match="last sigma must be 0"):
        check_sigmas(torch.tensor([14.6, 3.0, 0.5]), require_final_zero=True)
    # samplers themselves accept a SplitSigmas first half
    assert len(check_sigmas(torch.tensor([14.6, 3.0, 0.5]))) == 3
