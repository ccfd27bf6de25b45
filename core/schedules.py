"""Noise schedules: the one object that knows how noise level, timestep and signal scale relate.

Every sampler and trainer in the pack works in the *state* coordinates that k-diffusion and ComfyUI use,

    x = a(sigma) * x0 + s(sigma) * eps,

where sigma is the noise level that SIGMAS tensors carry:

* discrete variance-preserving schedules (SD1.5, SDXL): a = 1, s = sigma, with
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t). The network sees x / sqrt(1 + sigma^2), which is the
  diffusers sample sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.
* rectified flow (SD3, Flux, Wan): a = 1 - sigma, s = sigma, sigma in [0, 1]; the network sees x itself
  and its timestep is sigma * 1000.

Conversions between the network's native output (epsilon, v, flow velocity, or x0 itself) are written once,
for any (a, s), in :meth:`NoiseSchedule.to_x0` and :meth:`NoiseSchedule.from_x0`.
"""

from __future__ import annotations

from typing import Sequence

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "sample")


def _as_tensor(value, like: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    device = like.device if like is not None else None
    return torch.as_tensor(value, dtype=dtype, device=device)


def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient [B] (or scalar) broadcast against x [B, ...], in x's dtype."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class NoiseSchedule:
    """Base class. Subclasses define the signal/noise scales and the sigma <-> timestep maps."""

    #: native output of the networks this schedule is used with
    prediction_type: str = "epsilon"
    #: True when the network was trained on integer timesteps only (VP schedules)
    discrete: bool = False
    num_train_timesteps: int = 1000

    def __init__(self, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type

    # --- the parameterisation -------------------------------------------------------------
    def scales(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) with x = a * x0 + s * eps at noise level sigma."""
        raise NotImplementedError

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep the network is conditioned on at noise level sigma."""
        raise NotImplementedError

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`timestep`."""
        raise NotImplementedError

    def scale_model_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network is fed: the state normalised the way the network was trained."""
        return x

    @property
    def sigma_min(self) -> float:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    # --- derived quantities (exact for every subclass) ------------------------------------------
    def alpha_bar(self, sigma: torch.Tensor) -> torch.Tensor:
        """Signal fraction a^2 / (a^2 + s^2); for VP schedules the usual alpha_bar (alphas_cumprod)."""
        a, s = self.scales(_as_tensor(sigma))
        return a * a / (a * a + s * s)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """Forward process q(x_sigma | x0)."""
        a, s = self.scales(_as_tensor(sigma, x0))
        return _bcast(a, x0) * x0 + _bcast(s, x0) * noise

    def renoise(self, x_lo: torch.Tensor, sigma_lo, sigma_hi, noise: torch.Tensor) -> torch.Tensor:
        """Forward transition q(x_hi | x_lo) from a lower noise level to a higher one.

        x_hi = (a_hi / a_lo) x_lo + sqrt(s_hi^2 - (a_hi / a_lo)^2 s_lo^2) z, which keeps the marginal
        a_hi x0 + s_hi eps (the last line of TCD's Eq. 13, and LCM / DMD2 multistep re-noising).
        """
        a_lo, s_lo = self.scales(_as_tensor(sigma_lo, x_lo))
        a_hi, s_hi = self.scales(_as_tensor(sigma_hi, x_lo))
        ratio = a_hi / a_lo
        std = (s_hi * s_hi - ratio * ratio * s_lo * s_lo).clamp(min=0).sqrt()
        return _bcast(ratio, x_lo) * x_lo + _bcast(std, x_lo) * noise

    def rescale(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """Re-express a state in another level's coordinates without adding noise.

        Divides by the norm sqrt(a^2 + s^2) of one level and multiplies by the other's. For VP
        schedules this maps a diffusers-style unit-variance sample into the target level's coordinates.
        """
        a0, s0 = self.scales(_as_tensor(sigma_from, x))
        a1, s1 = self.scales(_as_tensor(sigma_to, x))
        return _bcast(((a1 * a1 + s1 * s1) / (a0 * a0 + s0 * s0)).sqrt(), x) * x

    def to_x0(self, pred: torch.Tensor, x: torch.Tensor, sigma, prediction_type: str | None = None):
        """Convert a network output of `prediction_type` (default: the schedule's) to x0."""
        kind = prediction_type or self.prediction_type
        a, s = self.scales(_as_tensor(sigma, x))
        a, s = _bcast(a, x), _bcast(s, x)
        if kind == "epsilon":  # x = a x0 + s eps
            return (x - s * pred) / a
        if kind == "v_prediction":  # v = a^ eps - s^ x0 on the unit-variance sample (Salimans & Ho)
            norm = (a * a + s * s).sqrt()
            return (a * x - s * norm * pred) / (norm * norm)
        if kind == "flow":  # u = eps - x0, so x = (a + s) x0 + s u
            return (x - s * pred) / (a + s)
        if kind == "sample":
            return pred
        raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, sigma, prediction_type: str):
        """Convert an x0 estimate at state x to another parameterisation (epsilon, v, flow, sample)."""
        a, s = self.scales(_as_tensor(sigma, x))
        a, s = _bcast(a, x), _bcast(s, x)
        if prediction_type == "sample":
            return x0
        eps = (x - a * x0) / s
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            norm = (a * a + s * s).sqrt()
            return (a * eps - s * x0) / norm
        if prediction_type == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def training_sigma(self, timestep) -> torch.Tensor:
        """Noise level of a position on the 0..T training grid (flow schedules apply their shift)."""
        return self.sigma(timestep)

    # --- schedules built from timesteps -----------------------------------------------------------
    def sigmas_from_timesteps(self, timesteps: Sequence[float]) -> torch.Tensor:
        """A SIGMAS tensor (descending, final 0) that visits exactly these timesteps."""
        t = torch.as_tensor(list(timesteps), dtype=torch.float64)
        return torch.cat([self.sigma(t), t.new_zeros(1)])

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "prediction_type": self.prediction_type}


class DiscreteVPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule (DDPM / SD1.5 / SDXL) with integer training timesteps.

    Between integer timesteps sigma is interpolated linearly in log sigma (the convention of
    k-diffusion and ComfyUI), and :meth:`timestep` is its exact inverse.
    """

    discrete = True

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__(prediction_type)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor of values strictly inside (0, 1)")
        self.alphas_cumprod = ac
        self.num_train_timesteps = len(ac)
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                   beta_end: float = 0.012, num_train_timesteps: int = 1000,
                   prediction_type: str = "epsilon") -> "DiscreteVPSchedule":
        """Betas computed exactly as diffusers does (float32), so alpha_bar matches bit for bit."""
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                                   dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule={beta_schedule!r}: use 'scaled_linear' or 'linear'")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod, prediction_type)

    @classmethod
    def sd15(cls, prediction_type: str = "epsilon") -> "DiscreteVPSchedule":
        """The schedule of SD1.x, SD2.x and SDXL."""
        return cls.from_betas("scaled_linear", 0.00085, 0.012, 1000, prediction_type)

    def scales(self, sigma):
        sigma = _as_tensor(sigma)
        return torch.ones_like(sigma), sigma

    def scale_model_input(self, x, sigma):
        sigma = _as_tensor(sigma, x)
        return x / _bcast((sigma * sigma + 1).sqrt(), x)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, timestep):
        t = _as_tensor(timestep).to(torch.float64)
        t_cpu = t.detach().cpu().clamp(0, self.num_train_timesteps - 1)
        lo = t_cpu.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t_cpu - lo
        log_sigma = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]
        return log_sigma.exp().to(t.device)

    def timestep(self, sigma):
        sigma = _as_tensor(sigma).to(torch.float64)
        flat = sigma.detach().cpu().reshape(-1)
        log_sigma = flat.clamp(min=self.sigma_min, max=self.sigma_max).log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_train_timesteps - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).to(torch.float64) + w
        # exp/log round trips leave ~1e-13 off integer timesteps; snap them so t -> sigma -> t is exact
        t = torch.where((t - t.round()).abs() < 1e-6, t.round(), t)
        t = torch.where(flat <= 0, torch.zeros_like(t), t)  # sigma 0 is the clean end, timestep 0
        return t.reshape(sigma.shape).to(sigma.device)

    def describe(self):
        return {**super().describe(), "num_train_timesteps": self.num_train_timesteps,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified flow (SD3, Flux, Wan): x = (1 - sigma) x0 + sigma eps, timestep = sigma * 1000.

    `shift` is the resolution shift sigma' = shift * sigma / (1 + (shift - 1) * sigma) that SD3 / Flux apply
    when they build a sampling schedule; :meth:`shifted` applies it (the network itself only ever sees
    sigma through its timestep).
    """

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, prediction_type: str = "flow"):
        super().__init__(prediction_type)
        if shift <= 0:
            raise ValueError(f"shift={shift}: the flow shift must be positive (1.0 = no shift)")
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.num_train_timesteps = int(round(multiplier))

    def scales(self, sigma):
        sigma = _as_tensor(sigma)
        return 1 - sigma, sigma

    @property
    def sigma_min(self) -> float:
        return 0.0

    @property
    def sigma_max(self) -> float:
        return 1.0

    def timestep(self, sigma):
        return _as_tensor(sigma) * self.multiplier

    def sigma(self, timestep):
        return _as_tensor(timestep).to(torch.float64) / self.multiplier

    def shifted(self, sigma):
        sigma = _as_tensor(sigma)
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def training_sigma(self, timestep) -> torch.Tensor:
        return self.shifted(self.sigma(timestep))

    def sigmas_from_timesteps(self, timesteps, apply_shift: bool = True):
        """Timesteps on the unshifted 0..1000 training grid; the shift is applied, as ComfyUI does."""
        t = torch.as_tensor(list(timesteps), dtype=torch.float64)
        sig = self.sigma(t)
        if apply_shift:
            sig = self.shifted(sig)
        return torch.cat([sig, sig.new_zeros(1)])

    def describe(self):
        return {**super().describe(), "shift": self.shift, "multiplier": self.multiplier}


def schedule_from_diffusers_config(config: dict) -> NoiseSchedule:
    """Build the schedule a diffusers scheduler config describes (DDPM/DDIM/Euler/LCM/TCD or flow-match)."""
    cls_name = config.get("_class_name", "")
    if "FlowMatch" in cls_name or "shift" in config and "beta_schedule" not in config:
        return RectifiedFlowSchedule(shift=float(config.get("shift", 1.0)),
                                     multiplier=float(config.get("num_train_timesteps", 1000)))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        return DiscreteVPSchedule(torch.cumprod(1 - betas, 0), config.get("prediction_type", "epsilon"))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr schedules reach alpha_bar = 0 (infinite sigma) and are "
                         "not supported yet; use a model trained with the standard schedule")
    return DiscreteVPSchedule.from_betas(
        config.get("beta_schedule", "scaled_linear"), float(config.get("beta_start", 0.00085)),
        float(config.get("beta_end", 0.012)), int(config.get("num_train_timesteps", 1000)),
        config.get("prediction_type", "epsilon"))


def validate_sigmas(sigmas: torch.Tensor, field: str = "sigmas") -> torch.Tensor:
    """Reject SIGMAS a few-step sampler cannot use, naming the field and the fix."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"{field}: expected a 1-D SIGMAS tensor with at least two values "
                         f"(start level ... 0), got {getattr(sigmas, 'shape', type(sigmas).__name__)}")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError(f"{field}: every sigma must be finite and >= 0")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError(f"{field}: sigmas must be non-increasing (noisiest first); "
                         f"got {[round(float(s), 4) for s in sigmas]}")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"{field}: the last sigma must be 0 so the sampler ends on a clean sample "
                         f"(got {float(sigmas[-1]):.4g}); append 0, e.g. with a scheduler node, "
                         f"or split with SplitSigmas so the final part ends at 0")
    return sigmas


__all__ = [
    "NoiseSchedule", "DiscreteVPSchedule", "RectifiedFlowSchedule", "PREDICTION_TYPES",
    "schedule_from_diffusers_config", "validate_sigmas",
]
