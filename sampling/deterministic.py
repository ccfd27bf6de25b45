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

import functools
import math

import torch
from tqdm.auto import trange

from ..core.schedules import NoiseSchedule
from .checks import check_sigmas


def ddim_coefficients(schedule: NoiseSchedule, sigmas: torch.Tensor, end_on_t0: bool = False) -> tuple:
    """Per-step scalars (c_x0, c_x) of the DDIM step written as x' = c_x0 x0_hat + c_x x.

    With eps_hat = (x - a x0_hat) / s:  x' = a' x0_hat + s' eps_hat = (a' - s' a / s) x0_hat + (s' / s) x.
    A step to sigma' = 0 gives x0_hat itself, or with `end_on_t0` the state at sigma(t=0) re-expressed at
    sigma 0 (times |0| / |t0|, |.| = sqrt(a^2 + s^2)). Cached per (schedule, sigmas, end_on_t0).
    """
    return _ddim_coefficients(schedule, tuple(sigmas.detach().to("cpu", torch.float64).tolist()), bool(end_on_t0))


@functools.lru_cache(maxsize=256)
def _ddim_coefficients(schedule: NoiseSchedule, sig: tuple, end_on_t0: bool) -> tuple:
    sigmas = torch.tensor(sig, dtype=torch.float64)
    n = len(sig) - 1
    t0_level = schedule.sigma(torch.zeros(1, dtype=torch.float64)).to(torch.float64)
    a, s = (v.tolist() for v in schedule.scales(torch.cat([sigmas, t0_level])))
    out = []
    for i in range(n):
        a_t, s_t, a_n, s_n = a[i], s[i], a[i + 1], s[i + 1]
        if s_t == 0:  # a 0 -> 0 step, skipped by the sampler
            out.append((0.0, 1.0))
            continue
        post = 1.0
        if sig[i + 1] == 0 and end_on_t0 and s[n + 1] > 0:  # land on timestep 0's level, express it at sigma 0
            post = math.sqrt(a_n * a_n + s_n * s_n) / math.sqrt(a[n + 1] ** 2 + s[n + 1] ** 2)
            a_n, s_n = a[n + 1], s[n + 1]
        out.append(((a_n - s_n * a_t / s_t) * post, s_n / s_t * post))
    return tuple(out)


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None, disable=None,
                *, schedule: NoiseSchedule, end_on_t0: bool = False, noise_sampler=None) -> torch.Tensor:
    """Deterministic DDIM / Euler over the given SIGMAS (`noise_sampler` is accepted and never used)."""
    host = check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    coefficients = ddim_coefficients(schedule, host, end_on_t0)
    sig = host.tolist()
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sig) - 1, disable=disable):
        if sig[i] == 0:
            continue
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        c_x0, c_x = coefficients[i]
        x = c_x0 * denoised + c_x * x  # x' = a' x0_hat + s' eps_hat
    return x


__all__ = ["sample_ddim", "ddim_coefficients"]
