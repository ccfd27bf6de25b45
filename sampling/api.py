"""Sampling without ComfyUI: the same samplers for any `core.models.DiffusionModel`.

    from comfyui_distillery.sampling.api import sample, sigmas_for, make_noise

    sigmas = sigmas_for(model, preset="dmd2_4step")                 # or timesteps="999,749,499,249"
    noise = make_noise((4, 4, 64, 64), seed=0)
    x0 = sample(model, noise, sigmas, sampler="x0_renoise", cond=emb, uncond=neg, cfg_scale=1.0, seed=0)

The starting state follows diffusers' pipelines: for text-to-image the network sees the unit noise itself
at the first level (x = noise * sqrt(1 + sigma_0^2) for VP, = noise for flow; ComfyUI does the same at the
top sigma), for image-to-image (`latents` given) x = a(sigma_0) latents + s(sigma_0) noise, like diffusers'
``scheduler.add_noise`` for img2img. The step noise is seed-stable (sampling/noise.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.models import DiffusionModel, Guided
from .checks import check_sigmas
from .noise import initial_noise
from .phased import sample_phased_x0_renoise
from .timesteps import distilled_sigmas


def make_noise(shape, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Unit starting noise from a CPU generator (the same on every device; ComfyUI's stream for `seed`)."""
    return initial_noise(shape, seed, dtype=dtype, device=device)


def sigmas_for(model: DiffusionModel, preset: str = "custom", timesteps=None, steps: int = 4,
               denoise: float = 1.0) -> torch.Tensor:
    """SIGMAS for a preset or an explicit timestep list, through the model's own schedule."""
    return distilled_sigmas(model.schedule, preset, timesteps, steps, denoise)


def initial_state(model: DiffusionModel, noise: torch.Tensor, sigma0: float,
                  latents: torch.Tensor | None = None) -> torch.Tensor:
    """The state at sigma0: pure noise as the network sees it (txt2img) or noised `latents` (img2img)."""
    schedule = model.schedule
    if latents is None:
        unit = schedule.scale_model_input(torch.ones((), dtype=torch.float64), sigma0)
        return noise / unit.to(noise.dtype)
    return schedule.add_noise(latents.to(noise.dtype), noise, sigma0)


def _sampler_fn(name: str) -> Callable:
    from . import SAMPLERS

    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}: choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def _start(model: DiffusionModel, noise: torch.Tensor, sigmas, latents, allow_partial: bool):
    """The checked SIGMAS on the noise's device and the starting state."""
    host = check_sigmas(sigmas, "sigmas", require_final_zero=not allow_partial)
    if len(host) < 2:
        raise ValueError("sigmas: need at least two values (a start level and 0)")
    # float64 where the device has it; MPS has no float64
    sig_dtype = torch.float32 if noise.device.type == "mps" else torch.float64
    return initial_state(model, noise, float(host[0]), latents), host.to(device=noise.device, dtype=sig_dtype)


@torch.no_grad()
def sample(model: DiffusionModel, noise: torch.Tensor, sigmas, sampler: str = "tcd", *,
           latents: torch.Tensor | None = None, cond: Any = None, uncond: Any = None, cfg_scale: float = 1.0,
           seed: int | None = 0, callback: Callable | None = None, progress: bool = False,
           allow_partial: bool = False, **options) -> torch.Tensor:
    """Run `sampler` ("tcd", "x0_renoise", "ddim") over `sigmas` and return the final latent.

    noise: unit Gaussian noise shaped like the latent (see `make_noise`); latents: a clean latent for
    img2img (use SIGMAS starting below the top, e.g. denoise < 1). cond / uncond / cfg_scale: the model's
    conditioning and classifier-free guidance (uncond + cfg_scale * (cond - uncond)). seed: the step
    noise's seed. options: the sampler's own (gamma=..., lcm_boundary=..., end_on_t0=...).
    allow_partial: accept SIGMAS that end above 0 and return the state at that level.
    """
    fn = _sampler_fn(sampler)
    x, sigmas = _start(model, noise, sigmas, latents, allow_partial)
    guided = Guided(model, cond, uncond, cfg_scale)
    extra_args = {} if seed is None else {"seed": int(seed)}
    return fn(guided, x, sigmas, extra_args=extra_args, callback=callback, disable=not progress,
              schedule=model.schedule, **options)


@torch.no_grad()
def sample_phased(model: DiffusionModel, noise: torch.Tensor, sigmas, activate: Sequence[Callable[[], None]],
                  boundaries: Sequence[float], *, latents: torch.Tensor | None = None, cond: Any = None,
                  uncond: Any = None, cfg_scale: float = 1.0, seed: int | None = 0,
                  callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
    """A Phased DMD student (sampling/phased.py) with the x0 + fresh-noise sampler: `model` is the one network,
    `activate[k]()` makes expert k its weights (e.g. merges expert k's LoRA), `boundaries` the K-1 sigmas where
    experts 2..K take over (noisiest first). On the trained timesteps each expert runs its own levels."""
    x, sigmas = _start(model, noise, sigmas, latents, False)
    guided = Guided(model, cond, uncond, cfg_scale)

    def expert(k):
        def run(x, sigma, **extra_args):
            activate[k]()
            return guided(x, sigma, **extra_args)
        return run

    extra_args = {} if seed is None else {"seed": int(seed)}
    return sample_phased_x0_renoise([expert(k) for k in range(len(activate))], x, sigmas, extra_args=extra_args,
                                    callback=callback, disable=not progress, schedule=model.schedule,
                                    boundaries=boundaries)


__all__ = ["sample", "sample_phased", "sigmas_for", "make_noise", "initial_state"]
