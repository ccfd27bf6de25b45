"""TCD sampling: Trajectory Consistency Distillation's strategic stochastic sampling (SSS).

Zheng et al. 2024, "Trajectory Consistency Distillation", Eq. 13-14; diffusers ``TCDScheduler.step``.
One step from noise level sigma (timestep t) to the next level sigma' (timestep t'), gamma in [0, 1]:

    x0_hat  = D(x_t, sigma)                                 the model's clean estimate
    eps_hat = (x_t - a_t x0_hat) / s_t                      the noise it implies
    s       = floor((1 - gamma) * t')                       a lower level, an integer timestep (VP)
    x_s     = a_s x0_hat + s_s eps_hat                      deterministic jump down to s
    x_t'    = (a_t'/a_s) x_s + sqrt(s_t'^2 - (a_t'/a_s)^2 s_s^2) z,   z ~ N(0, I)   re-noise up to t'

with x = a(sigma) x0 + s(sigma) eps the state (see core/schedules.py). gamma = 0 is deterministic DDIM
(s = t', nothing to re-noise), gamma = 1 jumps to the clean estimate and re-noises fully (LCM / DMD2
multistep), in between is TCD. Re-noising uses fresh noise; it is skipped when gamma = 0.

Where the steps come from. diffusers walks a list of integer timesteps; here every quantity is derived from
the SIGMAS the sampler is given, so any schedule works (ComfyUI schedulers, img2img / denoise < 1,
SplitSigmas pieces):

* VP (discrete) schedules: t' = timestep(sigma'); when t' is an integer timestep (up to the float32
  rounding of ComfyUI's SIGMAS) s is computed exactly as diffusers does, ``floor((1 - gamma) * t')`` in
  float32 on a long tensor, so the float rounding of the floor matches. A fractional t' (e.g. a karras or
  sgm_uniform schedule) uses floor of the float64 product. gamma = 0 uses s = t' itself.
* rectified flow: s = (1 - gamma) t' on the continuous timestep (sigma_s = (1 - gamma) sigma').
* the last step, sigma' = 0: like diffusers' final step (prev_timestep = 0) it jumps to the level of
  timestep 0 and does not re-noise. For VP that level is sigma_min = sigma(t=0) > 0 (alpha_bar[0]), not the
  clean sample: diffusers returns sqrt(alpha_bar_0) x0_hat + sqrt(1 - alpha_bar_0) eps_hat as its latent.
  In state coordinates that is the state at sigma_min re-expressed at sigma = 0 (divided by
  sqrt(1 + sigma_min^2), `NoiseSchedule.rescale`), so the returned latent is diffusers' latent exactly.
  For flow, timestep 0 is sigma 0 and the step ends on x0_hat.
* SIGMAS that end above 0 (the first half of a SplitSigmas): the final step is an ordinary step, it
  re-noises to the final sigma (gamma > 0), so the result is a valid state at that level and a second
  sampler continues from it exactly as if the schedule had not been split.
"""

from __future__ import annotations

import functools
import math

import torch
from tqdm.auto import trange

from ..core.schedules import NoiseSchedule
from .checks import check_sigmas, check_unit_interval
from .noise import NoiseSampler, default_noise_sampler

#: a VP timestep this close to an integer is that integer (float32 SIGMAS carry ~1e-5 of timestep error)
INTEGER_TIMESTEP_TOL = 1e-3


def tcd_s_timesteps(schedule: NoiseSchedule, sigma_next: torch.Tensor, gamma: float) -> torch.Tensor:
    """The timesteps s = (1 - gamma) t' TCD jumps to before re-noising to each sigma_next (> 0)."""
    t_next = schedule.timestep(sigma_next.to(torch.float64)).to(torch.float64)
    if not schedule.discrete:
        return (1.0 - gamma) * t_next
    t_int = t_next.round()
    on_grid = (t_next - t_int).abs() < INTEGER_TIMESTEP_TOL
    # diffusers: torch.floor((1 - eta) * prev_timestep) on a long tensor, i.e. in float32
    exact = torch.floor((1.0 - gamma) * t_int.to(torch.long)).to(torch.float64)
    return torch.where(on_grid, exact, torch.floor((1.0 - gamma) * t_next))


def tcd_levels(schedule: NoiseSchedule, sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
    """sigma_s of every step [n]: the level each step jumps down to before re-noising (module doc)."""
    sigmas = sigmas.detach().to("cpu", torch.float64)
    sigma_next = sigmas[1:]
    last = sigma_next == 0
    t_s = torch.zeros_like(sigma_next)  # a step to sigma 0 lands on timestep 0 (diffusers' last step)
    if bool((~last).any()):
        t_s[~last] = tcd_s_timesteps(schedule, sigma_next[~last], gamma)
    levels = schedule.sigma(t_s).to(torch.float64)
    # never above the target level (a sigma' below the schedule's sigma_min clamps to timestep 0)
    levels = torch.where(last, levels, torch.minimum(levels, sigma_next))
    if gamma == 0:  # DDIM: s = t' exactly, also for fractional timesteps
        levels = torch.where(last, levels, sigma_next)
    return levels


def tcd_coefficients(schedule: NoiseSchedule, sigmas: torch.Tensor, gamma: float) -> tuple:
    """Per-step scalars (c_x0, c_x, c_z) of the TCD update written as x' = c_x0 x0_hat + c_x x + c_z z.

    Cached per (schedule, sigmas, gamma): re-running the same SIGMAS costs no schedule lookups.
    """
    return _tcd_coefficients(schedule, tuple(sigmas.detach().to("cpu", torch.float64).tolist()), float(gamma))


@functools.lru_cache(maxsize=256)
def _tcd_coefficients(schedule: NoiseSchedule, sig: tuple, gamma: float) -> tuple:
    sigmas = torch.tensor(sig, dtype=torch.float64)
    n = len(sig) - 1
    a, s = (v.tolist() for v in schedule.scales(torch.cat([sigmas, tcd_levels(schedule, sigmas, gamma)])))
    out = []
    for i in range(n):
        a_t, s_t, a_n, s_n = a[i], s[i], a[i + 1], s[i + 1]  # levels t and t'
        a_s, s_s = a[n + 1 + i], s[n + 1 + i]  # level s
        if s_t == 0:  # a 0 -> 0 step, skipped by the sampler
            out.append((0.0, 1.0, 0.0))
            continue
        # x_s = a_s x0_hat + s_s eps_hat with eps_hat = (x - a_t x0_hat) / s_t
        c_x0, c_x = a_s - s_s * a_t / s_t, s_s / s_t
        if sig[i + 1] == 0:  # last step: the level-s state re-expressed at sigma 0 (`rescale`)
            post, c_z = math.sqrt(a_n * a_n + s_n * s_n) / math.sqrt(a_s * a_s + s_s * s_s), 0.0
        elif gamma > 0:  # re-noise s -> t': x' = r x_s + sqrt(s_t'^2 - r^2 s_s^2) z, r = a_t' / a_s (`renoise`)
            post = a_n / a_s
            c_z = math.sqrt(max(s_n * s_n - post * post * s_s * s_s, 0.0))
        else:  # gamma = 0: s = t', x_s is already the next state
            post, c_z = 1.0, 0.0
        out.append((c_x0 * post, c_x * post, c_z))
    return tuple(out)


@torch.no_grad()
def sample_tcd(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None, disable=None,
               *, schedule: NoiseSchedule, gamma: float = 0.3,
               noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """TCD multistep sampling with stochasticity `gamma` (diffusers' `eta`) over the given SIGMAS.

    model(x, sigma[B], **extra_args) -> x0 (k-diffusion convention; `core.models.Guided` or ComfyUI's
    wrapped model). The noise sampler (default: seed-stable, seeded from extra_args["seed"]) is called
    once per re-noising step, i.e. on every step but one ending at sigma 0, when gamma > 0.
    """
    gamma = check_unit_interval(gamma, "gamma")
    host = check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None and gamma > 0:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    coefficients = tcd_coefficients(schedule, host, gamma)
    sig = host.tolist()
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sig) - 1, disable=disable):
        if sig[i] == 0:  # a trailing 0 -> 0 step: nothing to denoise
            continue
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        # x_s = a_s x0_hat + s_s eps_hat, then re-noise to sigma' (or re-express at 0 on a last step)
        c_x0, c_x, c_z = coefficients[i]
        x = c_x0 * denoised + c_x * x
        if gamma > 0 and sig[i + 1] > 0:
            x = x + c_z * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


__all__ = ["sample_tcd", "tcd_levels", "tcd_s_timesteps", "tcd_coefficients"]
