"""x0 prediction + fresh noise: the multistep sampler of LCM and DMD2.

Luo et al. 2023 (LCM), Algorithm 1 "multistep latent consistency sampling"; Yin et al. 2024 (DMD2),
"backward simulation"; diffusers ``LCMScheduler.step``. One step from level sigma to sigma':

    x0_hat = f_theta(x_sigma, sigma)                 the student's clean estimate
    x_sigma' = a(sigma') x0_hat + s(sigma') z,  z ~ N(0, I) fresh   (no noise when sigma' = 0)

Optionally with LCM's boundary condition (``lcm_boundary=True``), the consistency-function
parameterisation LCM students are trained with (timestep_scaling 10, sigma_data 0.5):

    c_skip(t) = sigma_data^2 / ((10 t)^2 + sigma_data^2),    c_out(t) = 10 t / sqrt((10 t)^2 + sigma_data^2)
    f_theta(x_t, t) = c_skip(t) x_in + c_out(t) x0_hat

where x_in is what the network sees (diffusers' unit-variance sample, `schedule.scale_model_input`), so
this reproduces ``LCMScheduler`` exactly. At DMD2's timesteps c_skip < 1e-7 and c_out > 1 - 1e-7, so
DMD2 students run without it (the default).

The noise is seed-stable (see noise.py) and drawn once per step that ends above sigma 0. SIGMAS that end
above 0 (the first half of a SplitSigmas) re-noise to the final level on the last step, giving a valid
state there for the next sampler. Works for VP (eps / v) and rectified-flow models alike, through the
schedule's (a, s).
"""

from __future__ import annotations

import functools

import torch
from tqdm.auto import trange

from ..core.schedules import NoiseSchedule
from .checks import check_sigmas
from .noise import NoiseSampler, default_noise_sampler

LCM_TIMESTEP_SCALING = 10.0
LCM_SIGMA_DATA = 0.5


def lcm_boundary_scalings(timestep: torch.Tensor, timestep_scaling: float = LCM_TIMESTEP_SCALING,
                          sigma_data: float = LCM_SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's consistency parameterisation at `timestep`."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def lcm_boundary_coefficients(schedule: NoiseSchedule, sigmas: torch.Tensor):
    """Per-step scalars of f = c_skip(t) x_in + c_out(t) x0_hat written on the state: f = c_out x0_hat + k x.

    t = timestep(sigma) and x_in = scale_model_input(x, sigma), the network's input, so k = c_skip * x_in / x
    (c_skip / sqrt(1 + sigma^2) for VP, c_skip for flow). Returns float64 CPU tensors (c_out, k), each [n].
    """
    sigmas = sigmas.detach().to("cpu", torch.float64)[:-1]
    c_skip, c_out = lcm_boundary_scalings(schedule.timestep(sigmas).to(torch.float64))
    unit = schedule.scale_model_input(torch.ones_like(sigmas), sigmas)
    return c_out, c_skip * unit


def x0_renoise_coefficients(schedule: NoiseSchedule, sigmas: torch.Tensor, lcm_boundary: bool = False):
    """Per-step lists (a(sigma'), s(sigma'), c_out, c_skip x_in / x), cached per (schedule, sigmas, flag)."""
    return _x0_renoise_coefficients(schedule, tuple(sigmas.detach().to("cpu", torch.float64).tolist()),
                                    bool(lcm_boundary))


@functools.lru_cache(maxsize=256)
def _x0_renoise_coefficients(schedule: NoiseSchedule, sig: tuple, lcm_boundary: bool) -> tuple:
    sigmas = torch.tensor(sig, dtype=torch.float64)
    a_next, s_next = (tuple(c.tolist()) for c in schedule.scales(sigmas[1:]))  # x' = a x0_hat + s z
    if lcm_boundary:
        c_out, c_skip_in = (tuple(c.tolist()) for c in lcm_boundary_coefficients(schedule, sigmas))
    else:
        c_out = c_skip_in = ()
    return a_next, s_next, c_out, c_skip_in


@torch.no_grad()
def sample_x0_renoise(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None,
                      disable=None, *, schedule: NoiseSchedule, lcm_boundary: bool = False,
                      noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DMD2 / LCM multistep sampling: predict x0, re-noise it with fresh noise to the next level."""
    host = check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    a_next, s_next, c_out, c_skip_in = x0_renoise_coefficients(schedule, host, lcm_boundary)
    sig = host.tolist()
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sig) - 1, disable=disable):
        if sig[i] == 0:
            continue
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if lcm_boundary:  # f = c_skip(t) x_in + c_out(t) x0_hat
            denoised = c_out[i] * denoised + c_skip_in[i] * x
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sig[i + 1] > 0:  # fresh noise to the next level
            x = a_next[i] * denoised + s_next[i] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


__all__ = ["sample_x0_renoise", "lcm_boundary_scalings", "lcm_boundary_coefficients",
           "x0_renoise_coefficients",
           "LCM_TIMESTEP_SCALING", "LCM_SIGMA_DATA"]
