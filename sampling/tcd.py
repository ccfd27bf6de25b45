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

import math

import torch
from tqdm.auto import trange

from ..core.schedules import NoiseSchedule
from .checks import check_sigmas, check_unit_interval
from .noise import NoiseSampler, default_noise_sampler

#: a VP timestep this close to an integer is that integer (float32 SIGMAS carry ~1e-5 of timestep error)
INTEGER_TIMESTEP_TOL = 1e-3


def tcd_s_timestep(schedule: NoiseSchedule, sigma_next: float, gamma: float) -> float:
    """The timestep s = (1 - gamma) t' TCD jumps to before re-noising to sigma_next (> 0)."""
    t_next = float(schedule.timestep(torch.tensor(sigma_next, dtype=torch.float64)))
    if not schedule.discrete:
        return (1.0 - gamma) * t_next
    t_int = round(t_next)
    if abs(t_next - t_int) < INTEGER_TIMESTEP_TOL:
        # diffusers: torch.floor((1 - eta) * prev_timestep) with prev_timestep a long tensor (float32 math)
        return float(torch.floor((1.0 - gamma) * torch.tensor(t_int, dtype=torch.long)))
    return float(math.floor((1.0 - gamma) * t_next))


def tcd_levels(schedule: NoiseSchedule, sigmas: torch.Tensor, gamma: float) -> list[float]:
    """sigma_s of every step: the level each step jumps down to before re-noising (see module doc)."""
    sigmas = sigmas.detach().to("cpu", torch.float64)
    levels = []
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        if sigma_next > 0 and gamma == 0:
            levels.append(sigma_next)  # DDIM: s = t' exactly, also for fractional timesteps
            continue
        t_s = 0.0 if sigma_next == 0 else tcd_s_timestep(schedule, sigma_next, gamma)
        sigma_s = float(schedule.sigma(torch.tensor(t_s, dtype=torch.float64)))
        # never above the target level (a sigma' below the schedule's sigma_min clamps to timestep 0)
        levels.append(sigma_s if sigma_next == 0 else min(sigma_s, sigma_next))
    return levels


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
    levels = tcd_levels(schedule, host, gamma)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(host) - 1, disable=disable):
        sigma, sigma_next = float(host[i]), float(host[i + 1])
        if sigma == 0:  # a trailing 0 -> 0 step: nothing to denoise
            continue
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = schedule.from_x0(denoised, x, sigma, "epsilon")
        sigma_s = levels[i]
        x = schedule.add_noise(denoised, eps, sigma_s)  # x_s = a_s x0_hat + s_s eps_hat
        if sigma_next == 0:
            x = schedule.rescale(x, sigma_s, 0.0)  # diffusers' final latent at timestep 0, see module doc
        elif gamma > 0:
            x = schedule.renoise(x, sigma_s, sigma_next, noise_sampler(sigmas[i], sigmas[i + 1]))
    return x


__all__ = ["sample_tcd", "tcd_levels", "tcd_s_timestep"]
