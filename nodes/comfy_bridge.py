"""The ComfyUI MODEL adapter: our NoiseSchedule from a ComfyUI ``model_sampling`` object, and KSAMPLERs.

ComfyUI describes a model's noise schedule with a ``model_sampling`` module built from two pieces
(comfy/model_sampling.py): a sampling class that maps sigma <-> timestep and a mixin that gives the
prediction type. We read both by duck typing and class names, never importing ComfyUI here:

* ``ModelSamplingDiscrete`` and subclasses (SD1.5, SDXL; ``sigmas`` buffer, one per training timestep):
  ``DiscreteVPSchedule`` with alpha_bar = 1 / (1 + sigma^2). The LCM-patched variant
  (``ModelSamplingDiscreteDistilled``, only 50 sigmas kept) is rebuilt from its linear_start / linear_end.
* ``ModelSamplingDiscreteFlow`` (SD3, AuraFlow, Wan, ...; ``shift`` and ``multiplier``):
  ``RectifiedFlowSchedule(shift, multiplier)``.
* ``ModelSamplingFlux`` (``shift`` is Flux's mu, timestep = sigma): ``RectifiedFlowSchedule(exp(mu), 1)``,
  since exp(mu) / (exp(mu) + 1/t - 1) is the SD3 shift with shift = exp(mu).
* prediction type from the mixin in the class's MRO: ``EPS`` -> epsilon, ``V_PREDICTION`` ->
  v_prediction, ``CONST`` -> flow, ``X0`` -> sample (``LCM``, an EPS whose model output already has LCM's
  boundary condition applied, counts as epsilon).

EDM / continuous-sigma samplings (SVD, Stable Cascade, Cosmos, ...) have no integer training timesteps
or no VP / flow parameterisation, and are refused with a clear error.

Schedules are cached per model_sampling object (weakly, keyed by a cheap signature so a patched shift
is picked up).
"""

from __future__ import annotations

import logging
import math
import weakref

import torch

from ..core.schedules import DiscreteVPSchedule, NoiseSchedule, RectifiedFlowSchedule
from ..sampling import SAMPLERS

log = logging.getLogger("distillery")

_MIXINS = {"V_PREDICTION": "v_prediction", "EPS": "epsilon", "CONST": "flow", "X0": "sample", "LCM": "epsilon"}
_UNSUPPORTED_MIXINS = {"EDM", "IMG_TO_IMG", "COSMOS_RFLOW"}
_UNSUPPORTED_SAMPLINGS = ("Continuous", "StableCascade", "Cosmos")

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _mro_names(obj) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def prediction_type_of(model_sampling) -> str:
    """epsilon / v_prediction / flow / sample, from the prediction mixin of a model_sampling object."""
    for name in _mro_names(model_sampling):
        if name in _UNSUPPORTED_MIXINS:
            raise ValueError(f"model: the {name} parameterisation ({type(model_sampling).__name__}) is not "
                             f"supported by Distillery samplers; they need an eps, v-prediction, x0 or "
                             f"rectified-flow (CONST) model")
        if name in _MIXINS:
            return _MIXINS[name]
    raise ValueError(f"model: cannot tell the prediction type of {type(model_sampling).__name__} "
                     f"(no EPS / V_PREDICTION / CONST / X0 mixin)")


def _signature(ms) -> tuple:
    sigmas = getattr(ms, "sigmas", None)
    ends = (float(sigmas[0]), float(sigmas[-1]), len(sigmas)) if isinstance(sigmas, torch.Tensor) else ()
    return (type(ms), getattr(ms, "shift", None), getattr(ms, "multiplier", None), ends)


def _build(ms) -> NoiseSchedule:
    names = _mro_names(ms)
    cls_name = type(ms).__name__
    bad = [n for n in names if any(key in n for key in _UNSUPPORTED_SAMPLINGS)]
    if bad:
        raise ValueError(f"model: {bad[0]} sampling is not supported by Distillery samplers; they need a "
                         f"discrete VP model (SD1.5 / SDXL) or a rectified-flow model (SD3 / Flux / Wan)")
    prediction = prediction_type_of(ms)
    if "ModelSamplingFlux" in names:
        return RectifiedFlowSchedule(shift=math.exp(float(ms.shift)), multiplier=1.0, prediction_type=prediction)
    if hasattr(ms, "shift") and hasattr(ms, "multiplier"):
        return RectifiedFlowSchedule(shift=float(ms.shift), multiplier=float(ms.multiplier),
                                     prediction_type=prediction)
    if prediction == "flow":
        raise ValueError(f"model: {cls_name} is a flow (CONST) model without shift / multiplier")
    sigmas = getattr(ms, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"model: {cls_name} has no `sigmas` table; Distillery samplers need a discrete "
                         f"VP or a rectified-flow model")
    num = int(getattr(ms, "num_timesteps", len(sigmas)))
    if len(sigmas) != num and hasattr(ms, "linear_start") and hasattr(ms, "linear_end"):
        # ModelSamplingDiscreteDistilled (ComfyUI's "lcm" sampling) keeps 50 of the 1000 sigmas: rebuild the
        # full table the way ComfyUI's make_beta_schedule("linear") does (sqrt-linspace, float64)
        if getattr(ms, "zsnr", False):
            raise ValueError("model: an LCM-patched zero-terminal-SNR model is not supported; remove the "
                             "ModelSamplingDiscrete (lcm) patch, Distillery samplers take the plain model")
        log.info("distillery: %s keeps %d of %d sigmas (LCM-patched); rebuilding the full schedule",
                 cls_name, len(sigmas), num)
        betas = torch.linspace(float(ms.linear_start) ** 0.5, float(ms.linear_end) ** 0.5, num,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
    else:
        s = sigmas.detach().to("cpu", torch.float64)
        alphas_cumprod = 1.0 / (1.0 + s * s)
    return DiscreteVPSchedule(alphas_cumprod, prediction)


def schedule_from_model_sampling(model_sampling) -> NoiseSchedule:
    """Our NoiseSchedule for a ComfyUI model_sampling object (cached per object)."""
    sig = _signature(model_sampling)
    try:
        cached = _CACHE.get(model_sampling)
    except TypeError:  # not weak-referenceable: no caching
        return _build(model_sampling)
    if cached is not None and cached[0] == sig:
        return cached[1]
    schedule = _build(model_sampling)
    _CACHE[model_sampling] = (sig, schedule)
    return schedule


def schedule_from_model(model) -> NoiseSchedule:
    """Our NoiseSchedule for a ComfyUI MODEL (ModelPatcher), through its own model_sampling."""
    return schedule_from_model_sampling(model.get_model_object("model_sampling"))


def comfy_sampler_function(name: str):
    """A k-diffusion-style sampler function for ComfyUI's KSAMPLER.

    It finds the schedule at call time from the wrapped model
    (``model.inner_model.inner_model.model_sampling``, as ComfyUI's own samplers do) and the seed in
    extra_args["seed"] (the seed-stable noise sampler reads it).
    """
    sampler = SAMPLERS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        schedule = schedule_from_model_sampling(model.inner_model.inner_model.model_sampling)
        return sampler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                       schedule=schedule, **options)

    sample.__name__ = f"sample_distillery_{name}"
    sample.__doc__ = sampler.__doc__
    return sample


def make_ksampler(name: str, **options):
    """comfy.samplers.KSAMPLER running our sampler `name` with `options` (gamma, lcm_boundary, ...)."""
    import comfy.samplers  # only inside a running ComfyUI

    return comfy.samplers.KSAMPLER(comfy_sampler_function(name), extra_options=options)


KSAMPLER_TCD_NAME = "tcd"


def register_tcd_in_ksampler() -> bool:
    """Add "tcd" (gamma 0.3) to the plain KSampler's sampler dropdown. Returns whether it was added.

    ComfyUI 0.3.64: ``comfy.samplers.ksampler(name)`` looks up ``comfy.k_diffusion.sampling.sample_<name>``;
    the dropdown lists ``comfy.samplers.SAMPLER_NAMES`` (the very list ``KSampler.SAMPLERS`` points to,
    built as KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]), read each time /object_info is served.
    """
    import comfy.k_diffusion.sampling as kd_sampling
    import comfy.samplers

    attr = f"sample_{KSAMPLER_TCD_NAME}"
    existing = getattr(kd_sampling, attr, None)
    if existing is not None and getattr(existing, "__name__", "") != "sample_distillery_tcd":
        log.warning("distillery: a sampler named %r is already registered; not replacing it",
                    KSAMPLER_TCD_NAME)
        return False
    setattr(kd_sampling, attr, comfy_sampler_function("tcd"))
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if KSAMPLER_TCD_NAME not in names:
            names.append(KSAMPLER_TCD_NAME)
    if comfy.samplers.KSampler.SAMPLERS is not comfy.samplers.SAMPLER_NAMES and \
            KSAMPLER_TCD_NAME not in comfy.samplers.KSampler.SAMPLERS:
        comfy.samplers.KSampler.SAMPLERS.append(KSAMPLER_TCD_NAME)
    return True


__all__ = ["schedule_from_model_sampling", "schedule_from_model", "prediction_type_of",
           "comfy_sampler_function", "make_ksampler", "register_tcd_in_ksampler"]
