"""Deterministic DDIM, which in state coordinates is Euler: for Hyper-SD N-step students and flow models.

Song et al. 2021 (DDIM, eta = 0); diffusers ``DDIMScheduler`` (with ``timestep_spacing="trailing"`` for
Hyper-SD) and ``FlowMatchEulerDiscreteScheduler``. One step from level sigma to sigma':

    x0_hat  = D(x_sigma, sigma),   eps_hat = (x_sigma - a(sigma) x0_hat) / s(sigma)
    x_sigma' = a(sigma') x0_hat + s(sigma') eps_hat

For VP (a = 1, s = sigma) this is x + (sigma' - sigma) (x - x0_hat) / sigma, Euler's step on the
probability-flow ODE in k-diffusion's coordinates; for rectified flow (a = 1 - sigma, s = sigma) it is
x + (sigma' - sigma) v_hat with v_hat = eps_hat - x0_hat, the flow-matching Euler step. One sampler, both.

``end_on_t0``: diffusers' DDIMScheduler with ``set_alpha_to_one=False`` (the SD1.5 / SDXL scheduler
config, which Hyper-SD's ``DDIMScheduler.from_config(..., timestep_spacing="trailing")`` inherits) ends
its last step on the level of timestep 0 (alpha_bar[0]) instead of the clean estimate. With it set, a
step to sigma' = 0 lands on sigma_min = sigma(t=0) and returns that latent expressed at sigma = 0 (as
TCD's last step does, see tcd.py), which is diffusers' latent exactly. For flow models timestep 0 is
sigma 0 and the flag changes nothing.

diffusers' DDIM steps from t to t - 1000 // N, so it agrees with stepping between its own trailing
timesteps when N divides 1000 (1, 2, 4, 5, 8, 10, ...); this sampler always steps between the given SIGMAS.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ..core.schedules import NoiseSchedule
from .checks import check_sigmas


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None, disable=None,
                *, schedule: NoiseSchedule, end_on_t0: bool = False, noise_sampler=None) -> torch.Tensor:
    """Deterministic DDIM / Euler over the given SIGMAS (`noise_sampler` is accepted and never used)."""
    host = check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    t0_level = float(schedule.sigma(torch.tensor(0.0, dtype=torch.float64)))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(host) - 1, disable=disable):
        sigma, sigma_next = float(host[i]), float(host[i + 1])
        if sigma == 0:
            continue
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma_next == 0 and not (end_on_t0 and t0_level > 0):
            x = denoised
            continue
        eps = schedule.from_x0(denoised, x, sigma, "epsilon")
        target = sigma_next if sigma_next > 0 else t0_level
        x = schedule.add_noise(denoised, eps, target)
        if sigma_next == 0:
            x = schedule.rescale(x, target, 0.0)
    return x


__all__ = ["sample_ddim"]
