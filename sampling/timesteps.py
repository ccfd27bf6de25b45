"""Timestep lists for distilled students, and the SIGMAS they give through a model's own schedule.

Distilled students are trained on a handful of timesteps and should be sampled on exactly those:

=================  ==========================================  =============================================
preset             timesteps                                   reference
=================  ==========================================  =============================================
dmd2_4step         999, 749, 499, 249                          DMD2 README (LCMScheduler, custom timesteps)
dmd2_1step         399                                         DMD2 README, 1-step SDXL
hyper_sd_1step     800                                         Hyper-SDXL-1step-Unet (LCMScheduler, [800])
lcm_tcd            k = 1000 // 50; grid [k-1, 2k-1, ..., 999]  diffusers LCMScheduler / TCDScheduler
                   reversed, indices floor(linspace(0, 50, N))   set_timesteps(N), original_inference_steps=50
trailing           round(arange(1000, 0, -1000 / N)) - 1       diffusers DDIMScheduler trailing (Hyper-SD)
flow_euler         linspace(1000, 1000 * shift(1/1000), N)     diffusers FlowMatchEulerDiscreteScheduler
custom             an explicit list, e.g. "999,749,499,249"
=================  ==========================================  =============================================

Timesteps are on the 0..1000 training scale for every model. VP (SD1.5 / SDXL) models take integer
timesteps 0..999 and map them to sigma exactly; for rectified-flow models t / 1000 is the unshifted
sigma, which the model's own shift then maps (as ComfyUI's ``model_sampling.sigma`` does).

``denoise < 1`` (img2img):

* lcm_tcd: diffusers' ``strength``: the grid is built from the first int(50 * denoise) training steps
  and still gives N steps (LCMScheduler / TCDScheduler ``set_timesteps(N, strength=denoise)``);
* trailing, flow_euler: like ComfyUI's BasicScheduler: the grid for int(N / denoise) steps, keep the
  last N;
* fixed lists (dmd2_*, hyper_sd_1step, custom): diffusers' ``strength`` for custom timesteps: keep the
  last int(len * denoise) timesteps (DMD2 4-step at denoise 0.5 runs 499, 249).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.schedules import NoiseSchedule, RectifiedFlowSchedule

TRAIN_SCALE = 1000  # the timestep scale presets and explicit lists are written on
LCM_ORIGINAL_STEPS = 50


# --- grids -----------------------------------------------------------------------------------------------

def lcm_tcd_timesteps(steps: int, strength: float = 1.0, original_inference_steps: int = LCM_ORIGINAL_STEPS,
                      num_train_timesteps: int = TRAIN_SCALE) -> list[int]:
    """diffusers LCMScheduler / TCDScheduler ``set_timesteps(steps, strength=strength)``."""
    _check_steps(steps)
    k = num_train_timesteps // original_inference_steps
    origin = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    if len(origin) // steps < 1:
        raise ValueError(f"steps={steps} with denoise={strength}: the LCM/TCD grid keeps only "
                         f"{len(origin)} of its {original_inference_steps} training timesteps; lower steps "
                         f"to at most {len(origin)} or raise denoise")
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def trailing_timesteps(steps: int, num_train_timesteps: int = TRAIN_SCALE) -> list[int]:
    """diffusers DDIMScheduler(timestep_spacing="trailing").set_timesteps(steps)."""
    _check_steps(steps)
    ratio = num_train_timesteps / steps
    ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    return [int(t) for t in ts]


def flow_euler_timesteps(steps: int, shift: float = 1.0, num_train_timesteps: int = TRAIN_SCALE) -> list[float]:
    """The unshifted timesteps of diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps).

    diffusers spaces them linearly from 1000 down to 1000 * shift(1/1000) (its shifted sigma_min) and then
    shifts them once more; the second shift is the model's, applied when they become sigmas.
    """
    _check_steps(steps)
    s_min = 1.0 / num_train_timesteps
    s_min = float(np.float32(shift * s_min / (1 + (shift - 1) * s_min)))  # diffusers keeps it in float32
    return [float(t) for t in np.linspace(num_train_timesteps, s_min * num_train_timesteps, steps)]


@dataclass(frozen=True)
class Preset:
    description: str
    fixed: tuple | None = None  # a fixed timestep list, or None for a grid built from steps
    grid: Callable | None = None  # (steps, denoise, schedule) -> timesteps


def _grid_lcm_tcd(steps, denoise, schedule):
    return lcm_tcd_timesteps(steps, strength=denoise)


def _basic_denoise(grid_fn):
    """ComfyUI BasicScheduler's denoise: build int(steps / denoise) steps, keep the last `steps`."""
    def build(steps, denoise, schedule):
        total = steps if denoise >= 1.0 else int(steps / denoise)
        return grid_fn(total, schedule)[-steps:]
    return build


PRESETS: dict[str, Preset] = {
    "dmd2_4step": Preset("DMD2 4-step: 999, 749, 499, 249 (x0 + fresh noise, i.e. LCM sampler)",
                         fixed=(999, 749, 499, 249)),
    "dmd2_1step": Preset("DMD2 1-step: 399", fixed=(399,)),
    "hyper_sd_1step": Preset("Hyper-SD 1-step UNet: 800", fixed=(800,)),
    "lcm_tcd": Preset("LCM / TCD default grid for `steps` (diffusers, original_inference_steps=50)",
                      grid=_grid_lcm_tcd),
    "trailing": Preset("DDIM 'trailing' grid for `steps` (Hyper-SD N-step LoRAs)",
                       grid=_basic_denoise(lambda n, sch: trailing_timesteps(n))),
    "flow_euler": Preset("flow models: diffusers FlowMatchEuler grid for `steps` with the model's shift",
                         grid=_basic_denoise(lambda n, sch: flow_euler_timesteps(
                             n, getattr(sch, "shift", 1.0)))),
    "custom": Preset("the explicit `timesteps` list"),
}
PRESET_NAMES = list(PRESETS)


# --- parsing and validation -------------------------------------------------------------------------------

def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be a whole number >= 1")
    return int(steps)


def _check_denoise(denoise) -> float:
    try:
        denoise = float(denoise)
    except (TypeError, ValueError):
        raise ValueError(f"denoise={denoise!r}: expected a number in (0, 1]") from None
    if math.isnan(denoise) or not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise={denoise}: must be in (0, 1] (1 = from pure noise; 0.5 = img2img "
                         f"keeping half of the image)")
    return denoise


def parse_timesteps(text, *, discrete: bool = True, num_train_timesteps: int = TRAIN_SCALE,
                    field: str = "timesteps") -> list:
    """Parse and validate an explicit timestep list such as "999,749,499,249".

    Separators: commas and / or spaces (brackets are tolerated). The list must be strictly decreasing
    (noisiest first). VP models (discrete) take integers in [0, num_train_timesteps - 1]; rectified-flow
    models take numbers in (0, 1000] on the same scale (1000 = pure noise).
    """
    if isinstance(text, str):
        items = [tok for tok in re.split(r"[\s,;]+", text.strip().strip("[]()")) if tok]
    elif text is None:
        items = []
    else:
        items = list(text)
    if not items:
        raise ValueError(f"{field} is empty: write the student's timesteps, noisiest first, "
                         f"e.g. 999,749,499,249")
    values = []
    for tok in items:
        try:
            value = float(tok)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: {tok!r} is not a number; write numbers separated by commas, "
                             f"e.g. 999,749,499,249") from None
        if not math.isfinite(value):
            raise ValueError(f"{field}: {tok!r} is not a finite number")
        values.append(value)
    if discrete:
        top = num_train_timesteps - 1
        for v in values:
            if v != int(v):
                raise ValueError(f"{field}: {v:g} is not an integer; this model takes integer training "
                                 f"timesteps 0..{top}")
            if not 0 <= v <= top:
                raise ValueError(f"{field}: {int(v)} is out of range; timesteps must be within 0..{top} "
                                 f"(999 is pure noise), e.g. 999,749,499,249")
        values = [int(v) for v in values]
    else:
        for v in values:
            if not 0 < v <= TRAIN_SCALE:
                raise ValueError(f"{field}: {v:g} is out of range; use timesteps within 0..999 (SD-class "
                                 f"models, 999 is pure noise) or (0, 1000] (flow models), e.g. 999,749,499,249")
    for prev, cur in zip(values, values[1:]):
        if cur >= prev:
            raise ValueError(f"{field}: must be strictly decreasing (noisiest first), but {cur:g} follows "
                             f"{prev:g} in {values}; e.g. 999,749,499,249")
    return values


# --- timesteps -> SIGMAS -------------------------------------------------------------------------------------

def timesteps_to_sigmas(schedule: NoiseSchedule, timesteps: Sequence[float]) -> torch.Tensor:
    """SIGMAS (float64, final 0) visiting these timesteps (0..1000 scale) through the schedule."""
    if isinstance(schedule, RectifiedFlowSchedule):
        scale = schedule.multiplier / TRAIN_SCALE
        return schedule.sigmas_from_timesteps([float(t) * scale for t in timesteps])
    return schedule.sigmas_from_timesteps(list(timesteps))


def preset_timesteps(preset: str, steps: int = 4, denoise: float = 1.0, timesteps=None,
                     schedule: NoiseSchedule | None = None) -> list:
    """The timestep list of a preset (or of the explicit `timesteps` for preset "custom")."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: choose one of {PRESET_NAMES}")
    denoise = _check_denoise(denoise)
    spec = PRESETS[preset]
    discrete = schedule is None or bool(schedule.discrete)
    num_train = schedule.num_train_timesteps if (schedule is not None and discrete) else TRAIN_SCALE
    if preset == "flow_euler" and schedule is not None and discrete:
        raise ValueError("preset='flow_euler' is for rectified-flow models (SD3, Flux); for this VP model "
                         "use 'trailing', 'lcm_tcd' or an explicit list")
    if spec.grid is not None:
        return list(spec.grid(_check_steps(steps), denoise, schedule))
    if preset == "custom":
        full = parse_timesteps(timesteps, discrete=discrete, num_train_timesteps=num_train)
    else:
        full = list(spec.fixed)
    keep = min(int(len(full) * denoise), len(full))
    if keep < 1:
        raise ValueError(f"denoise={denoise}: keeps none of the {len(full)} timestep(s) {full} "
                         f"(diffusers' strength keeps the last int({len(full)} x denoise)); raise denoise "
                         f"to at least {1 / len(full):g} or use a longer list")
    return full[len(full) - keep:]


def distilled_sigmas(schedule: NoiseSchedule, preset: str = "custom", timesteps=None, steps: int = 4,
                     denoise: float = 1.0) -> torch.Tensor:
    """SIGMAS (float64, descending, final 0) for a preset or an explicit list, through `schedule`."""
    return timesteps_to_sigmas(schedule, preset_timesteps(preset, steps, denoise, timesteps, schedule))


__all__ = ["PRESETS", "PRESET_NAMES", "Preset", "parse_timesteps", "preset_timesteps", "distilled_sigmas",
           "timesteps_to_sigmas", "lcm_tcd_timesteps", "trailing_timesteps", "flow_euler_timesteps"]
