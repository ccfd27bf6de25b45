"""Few-step samplers for distilled students, in k-diffusion's convention (pure torch).

Every sampler has the signature of k-diffusion / ComfyUI sampling functions,

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, *, schedule, ...)

where model(x, sigma[B], **extra_args) returns x0, x is the state at sigmas[0] and `schedule` is the
`core.schedules.NoiseSchedule` that gives sigma its meaning (VP or rectified flow). Nothing here imports
ComfyUI or diffusers.
"""

from .deterministic import sample_ddim
from .noise import default_noise_sampler, initial_noise, replay_noise_sampler
from .phased import sample_phased_x0_renoise
from .tcd import sample_tcd
from .timesteps import (PRESET_NAMES, PRESETS, distilled_sigmas, parse_timesteps, preset_timesteps,
                        timesteps_to_sigmas)
from .x0_renoise import sample_x0_renoise

#: name -> sampler function; the names are those of the CLI, the Python API and the ComfyUI nodes
SAMPLERS = {
    "tcd": sample_tcd,
    "x0_renoise": sample_x0_renoise,
    "ddim": sample_ddim,
}

__all__ = [
    "SAMPLERS", "sample_tcd", "sample_x0_renoise", "sample_ddim", "sample_phased_x0_renoise",
    "default_noise_sampler", "replay_noise_sampler", "initial_noise",
    "PRESETS", "PRESET_NAMES", "parse_timesteps", "preset_timesteps", "distilled_sigmas",
    "timesteps_to_sigmas",
]
