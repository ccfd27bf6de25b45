"""Input checks shared by the samplers: one clear error per bad input, naming the field and the fix."""

from __future__ import annotations

import math

import torch

from ..core.schedules import validate_sigmas


def check_unit_interval(value, name: str) -> float:
    """A float in [0, 1] (gamma, denoise, ...)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a number in [0, 1]") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}: must be in [0, 1] (0 = deterministic DDIM, "
                         f"1 = full re-noise like LCM / DMD2)" if name == "gamma" else
                         f"{name}={value}: must be in [0, 1]")
    return value


def check_sigmas(sigmas, field: str = "sigmas", require_final_zero: bool = False) -> torch.Tensor:
    """Validate a SIGMAS tensor and return a float64 CPU copy for cheap per-step indexing.

    Samplers accept SIGMAS that end above 0 (the first half of a SplitSigmas): they then return a
    state at that noise level for the next sampler to continue from. With `require_final_zero`, the
    last sigma must be 0 (a complete schedule, what a standalone run that decodes the result needs).
    """
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: expected a 1-D tensor of noise levels, got "
                             f"{type(sigmas).__name__}") from None
    if require_final_zero:
        validate_sigmas(sigmas, field)
    if sigmas.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D SIGMAS tensor, got shape {tuple(sigmas.shape)}")
    host = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()) or bool((host < 0).any()):
        raise ValueError(f"{field}: every sigma must be finite and >= 0, got "
                         f"{[round(float(s), 4) for s in host]}")
    if bool((host[1:] > host[:-1]).any()):
        raise ValueError(f"{field}: sigmas must be non-increasing (noisiest first), got "
                         f"{[round(float(s), 4) for s in host]}; use FlipSigmas if they are reversed")
    return host


__all__ = ["check_unit_interval", "check_sigmas"]
