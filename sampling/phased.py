"""Phased students: K experts, each owning one noise subinterval, switched by the noise level.

A Phased DMD student (trainers/methods/phased_dmd.py; Fan et al. 2025, "Phased DMD: few-step distribution
matching distillation via score matching within subintervals") splits the noise range at boundaries

    sigma_max = s_0 > s_1 > ... > s_{K-1} > s_K = 0

and trains expert k (1-based) on the subinterval (s_k, s_{k-1}]: it is evaluated at the student's conditioning
levels inside that range and hands its state to expert k + 1 at s_k. The boundaries s_1 .. s_{K-1} are student
timesteps, so a sampler on the trained timesteps visits every boundary exactly, and the expert that runs at
sigma = s_k is expert k + 1 (the one whose subinterval starts there):

    expert(sigma) = 1 + #{k in 1..K-1 : sigma <= s_k}

A level within `BOUNDARY_RTOL` (relative) of a boundary counts as the boundary: SIGMAS made by another
implementation of the same schedule (ComfyUI's float32 table) land within ~1e-7 of ours, while neighbouring
integer timesteps of a VP schedule are >= 0.3% apart.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.schedules import NoiseSchedule
from .noise import NoiseSampler
from .x0_renoise import sample_x0_renoise

BOUNDARY_RTOL = 1e-4


def expert_index(sigma: float, boundaries: Sequence[float]) -> int:
    """The 0-based expert that owns noise level `sigma`, given the K-1 inner boundaries (descending)."""
    sigma = float(sigma)
    return sum(1 for b in boundaries if sigma <= float(b) * (1 + BOUNDARY_RTOL))


def expert_indices(sigma: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """:func:`expert_index` of every entry of a sigma tensor (long, same shape)."""
    sigma = sigma.detach().to(torch.float64)
    out = torch.zeros(sigma.shape, dtype=torch.long, device=sigma.device)
    for b in boundaries:
        out += (sigma <= float(b) * (1 + BOUNDARY_RTOL)).long()
    return out


def check_boundaries(boundaries: Sequence[float], experts: int) -> list[float]:
    """The K-1 inner boundaries as floats, checked: strictly decreasing and > 0."""
    values = [float(b) for b in boundaries]
    if len(values) != experts - 1:
        raise ValueError(f"boundaries: {experts} experts need {experts - 1} inner boundaries, got {len(values)}")
    if any(b <= 0 for b in values) or any(hi <= lo for hi, lo in zip(values, values[1:])):
        raise ValueError(f"boundaries: must be > 0 and strictly decreasing (noisiest first), got {values}")
    return values


def boundary_sigmas(schedule: NoiseSchedule, switch_timesteps: Sequence[float]) -> list[float]:
    """The inner boundaries on `schedule` of experts that take over at `switch_timesteps` (training scale,
    noisiest first; a card's `expert_boundaries()`)."""
    from .timesteps import timesteps_to_sigmas

    if not switch_timesteps:
        return []
    return [float(s) for s in timesteps_to_sigmas(schedule, list(switch_timesteps))[:-1]]


class PhasedExperts:
    """One model callable made of K expert callables: `model(x, sigma[B], **extra)` runs the expert that owns
    each sample's level (a batch at one level is one call). `last_experts` records the 0-based expert of each
    call, in order, for samplers' callbacks and tests."""

    def __init__(self, experts: Sequence[Callable], boundaries: Sequence[float]):
        self.experts = list(experts)
        self.boundaries = check_boundaries(boundaries, len(self.experts))
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        index = expert_indices(sigma, self.boundaries)
        first = int(index[0])
        if bool((index == first).all()):
            self.calls.append(first)
            return self.experts[first](x, sigma, **extra_args)
        out = torch.empty_like(x)  # a batch that straddles a boundary: each expert on its own rows
        for k in index.unique().tolist():
            rows = index == k
            self.calls.append(int(k))
            out[rows] = self.experts[k](x[rows], sigma[rows], **_rows(extra_args, rows, len(x)))
        return out


def _rows(extra_args: dict, rows: torch.Tensor, batch: int) -> dict:
    """The per-sample entries of extra_args restricted to `rows` (tensors with the batch's leading size)."""
    return {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v)
            for k, v in extra_args.items()}


@torch.no_grad()
def sample_phased_x0_renoise(experts: Sequence[Callable], x: torch.Tensor, sigmas: torch.Tensor, extra_args=None,
                             callback=None, disable=None, *, schedule: NoiseSchedule, boundaries: Sequence[float],
                             noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """The x0 + fresh-noise sampler (x0_renoise.py) with the expert switched by level.

    Step i from sigma_i to sigma_{i+1}, with k = expert(sigma_i):

        x0_hat = G_k(x_{sigma_i}, sigma_i)
        x_{sigma_{i+1}} = a(sigma_{i+1}) x0_hat + s(sigma_{i+1}) z,   z ~ N(0, I) fresh (none at sigma 0)

    On the trained timesteps every boundary s_k is visited, so expert k's last step ends exactly at s_k
    with the same transition it was trained with. The callback's dict carries "expert" (0-based).
    """
    model = PhasedExperts(experts, boundaries)

    def on_step(info):
        if callback is not None:
            callback({**info, "expert": model.calls[-1]})

    return sample_x0_renoise(model, x, sigmas, extra_args, on_step, disable, schedule=schedule,
                             noise_sampler=noise_sampler)


__all__ = ["BOUNDARY_RTOL", "expert_index", "expert_indices", "check_boundaries", "boundary_sigmas", "PhasedExperts",
           "sample_phased_x0_renoise"]
