"""A seeded family of exact Gaussian-mixture worlds (issue 18): many analytic teachers, not one.

One world (:func:`make_world`) is a class-conditional :class:`~.gmm.GaussianMixture` drawn from a seed:

* dimension d in 2..32, log-uniform (as many worlds near 2-4 as near 16-32);
* 1..3 classes, each with K modes, K in 2..25 (the same K for every class of a world);
* unequal weights: w_k proportional to exp(u_k), u_k uniform in [-ln(r)/2, ln(r)/2], so within a class the
  heaviest mode is at most r (3) times the lightest;
* unequal isotropic stds: a world's base std in [0.2, 0.3] times a per-mode factor in [0.8, 1.25];
* means uniform in a cube [-L, L]^d, placed one at a time, a draw kept only if it is at least `separation`
  (6) x the larger of the two stds from every mode of the same class already placed; after 200 rejected
  draws the placement starts over with L 10% larger (L starts at 2), so crowded low-dimensional worlds get
  room instead of narrow modes. At 6 standard deviations two modes are well posed: an exact sample is
  explained better by the other mode with probability below Phi(-3) = 0.13%. Modes of different classes may
  overlap (each class is its own conditional distribution);
* a prediction type, epsilon, v_prediction or flow, by default the seed's (seed mod 3), so consecutive
  seeds cycle through all three. epsilon and v_prediction run on SD1.5's discrete VP schedule, flow on a
  rectified-flow schedule with shift 3 (the schedules the project's tests use).

Everything is drawn from one torch.Generator seeded with the world's seed, so a world is a pure function
of (seed, arguments). :func:`family` lists n worlds, seeds seed..seed+n-1.

The teacher of a world is the exact denoiser (:class:`~.gmm.GaussianMixtureTeacher`) under the world's
schedule, in its prediction type; :func:`teacher_sample` runs its own 50-step deterministic sampler (DDIM
on the trailing grid), the reference a distilled student is scored against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core.schedules import DiscreteVPSchedule, NoiseSchedule, RectifiedFlowSchedule
from .gmm import GaussianMixture, GaussianMixtureTeacher

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
FLOW_SHIFT = 3.0

DIMS = (2, 32)
MODES = (2, 25)
CLASSES = (1, 3)
SEPARATION = 6.0
WEIGHT_RATIO = 3.0
BASE_STD = (0.2, 0.3)
STD_FACTOR = (0.8, 1.25)


def make_schedule(prediction_type: str) -> NoiseSchedule:
    """SD1.5's VP schedule for epsilon / v_prediction, rectified flow (shift 3) for flow."""
    if prediction_type == "flow":
        return RectifiedFlowSchedule(shift=FLOW_SHIFT)
    if prediction_type in ("epsilon", "v_prediction"):
        return DiscreteVPSchedule.sd15(prediction_type)
    raise ValueError(f"prediction_type={prediction_type!r}: one of {PREDICTION_TYPES}")


@dataclass
class FamilyWorld:
    """One world of the family: the mixture, its prediction type, and how it was drawn."""

    seed: int
    prediction_type: str
    mixture: GaussianMixture
    half_width: float  # L of the cube the means were placed in
    separation: float  # the requested minimum separation, in stds
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.mixture.dim

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    @property
    def modes_per_class(self) -> int:
        return self.mixture.means.shape[1]

    @property
    def name(self) -> str:
        short = {"epsilon": "eps", "v_prediction": "v", "flow": "flow"}[self.prediction_type]
        return f"s{self.seed}-d{self.dim}-c{self.num_classes}-k{self.modes_per_class}-{short}"

    def schedule(self) -> NoiseSchedule:
        return make_schedule(self.prediction_type)

    def teacher(self) -> GaussianMixtureTeacher:
        return GaussianMixtureTeacher(self.mixture, self.schedule())

    def min_separation(self) -> float:
        """The smallest distance between two modes of the same class over the larger of their stds."""
        best = math.inf
        for means, stds in zip(self.mixture.means, self.mixture.stds):
            dist = torch.cdist(means, means)
            scale = torch.maximum(stds[:, None], stds[None, :])
            ratio = dist / scale
            ratio.fill_diagonal_(math.inf)
            best = min(best, float(ratio.min()))
        return best

    def describe(self) -> dict:
        w = self.mixture.weights
        return {"name": self.name, "seed": self.seed, "dim": self.dim, "classes": self.num_classes,
                "modes_per_class": self.modes_per_class, "prediction_type": self.prediction_type,
                "min_weight": float(w.min()), "max_weight_ratio": float((w.max(1).values / w.min(1).values).max()),
                "std_range": [float(self.mixture.stds.min()), float(self.mixture.stds.max())],
                "half_width": self.half_width, "separation_requested": self.separation,
                "min_separation": self.min_separation(), **self.info}


def _uniform(g: torch.Generator, lo: float, hi: float, *shape) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)


def _place_means(g: torch.Generator, stds: torch.Tensor, dim: int, separation: float,
                 half_width: float = 2.0, tries: int = 200) -> tuple[torch.Tensor, float]:
    """Means [C, K, d] in [-L, L]^d with |mu_i - mu_j| >= separation * max(s_i, s_j) within each class."""
    c, k = stds.shape
    while True:
        means = torch.zeros(c, k, dim, dtype=torch.float64)
        ok = True
        for cls in range(c):
            for comp in range(k):
                for _ in range(tries):
                    cand = _uniform(g, -half_width, half_width, dim)
                    if comp == 0:
                        break
                    dist = (means[cls, :comp] - cand).norm(dim=1)
                    need = separation * torch.maximum(stds[cls, :comp], stds[cls, comp])
                    if bool((dist >= need).all()):
                        break
                else:
                    ok = False
                    break
                means[cls, comp] = cand
            if not ok:
                break
        if ok:
            return means, half_width
        half_width *= 1.1


def make_world(seed: int, *, dim: int | None = None, num_classes: int | None = None,
               modes_per_class: int | None = None, prediction_type: str | None = None,
               dims: tuple = DIMS, modes: tuple = MODES, classes: tuple = CLASSES,
               separation: float = SEPARATION, weight_ratio: float = WEIGHT_RATIO,
               base_std: tuple = BASE_STD, std_factor: tuple = STD_FACTOR) -> FamilyWorld:
    """The world of `seed` (see the module docstring); any of dim / num_classes / modes_per_class /
    prediction_type given explicitly replaces its draw (the other draws do not change)."""
    g = torch.Generator().manual_seed(int(seed))
    # every draw is made, used or not, so fixing one field leaves the others as the seed has them
    log_d = _uniform(g, math.log(dims[0]), math.log(dims[1] + 1), 1).exp()
    d_draw = int(min(dims[1], max(dims[0], math.floor(float(log_d)))))
    k_draw = int(torch.randint(modes[0], modes[1] + 1, (1,), generator=g))
    c_draw = int(torch.randint(classes[0], classes[1] + 1, (1,), generator=g))
    dim = d_draw if dim is None else int(dim)
    k = k_draw if modes_per_class is None else int(modes_per_class)
    c = c_draw if num_classes is None else int(num_classes)
    if prediction_type is None:
        prediction_type = PREDICTION_TYPES[int(seed) % len(PREDICTION_TYPES)]
    make_schedule(prediction_type)  # validates the name
    if dim < 1 or k < 1 or c < 1:
        raise ValueError(f"make_world: dim, modes_per_class and num_classes must be >= 1 (got {dim}, {k}, {c})")

    half = 0.5 * math.log(weight_ratio)
    weights = _uniform(g, -half, half, c, k).exp()
    std0 = float(_uniform(g, base_std[0], base_std[1], 1))
    stds = std0 * _uniform(g, std_factor[0], std_factor[1], c, k)
    means, half_width = _place_means(g, stds, dim, separation)
    mixture = GaussianMixture(means, stds, weights, torch.ones(c, dtype=torch.float64))
    return FamilyWorld(int(seed), prediction_type, mixture, half_width, separation, {"base_std": std0})


def family(n: int, seed: int = 0, **kwargs) -> list[FamilyWorld]:
    """n worlds, seeds seed, seed+1, ... (prediction types cycle eps, v, flow with the seed)."""
    return [make_world(seed + i, **kwargs) for i in range(n)]


@torch.no_grad()
def teacher_sample(world: FamilyWorld, labels: torch.Tensor, noise: torch.Tensor, steps: int = 50,
                   chunk: int = 20000, model=None) -> torch.Tensor:
    """The exact teacher's own sampler: deterministic DDIM / Euler over `steps` trailing timesteps (VP and
    flow alike; the flow shift is applied to the grid), from the pure-noise state of `noise` [B, d]
    (float64 in, float64 out), in chunks of `chunk` samples. `model` (default: the exact teacher) samples
    another model of the world the same way, e.g. the MLP fitted to it (float32 models get float32 noise)."""
    from ..core.models import Guided
    from ..sampling import sample_ddim
    from ..sampling.api import initial_state
    from ..sampling.timesteps import timesteps_to_sigmas, trailing_timesteps

    teacher = world.teacher() if model is None else model
    dtype = torch.float64 if model is None else next(model.parameters()).dtype
    schedule = teacher.schedule
    sigmas = timesteps_to_sigmas(schedule, trailing_timesteps(steps))
    out = []
    for i in range(0, len(labels), chunk):
        lab = labels[i:i + chunk]
        x = initial_state(teacher, noise[i:i + chunk].to(dtype), float(sigmas[0]))
        out.append(sample_ddim(Guided(teacher, lab), x, sigmas, schedule=schedule, disable=True).double())
    return torch.cat(out)


__all__ = ["PREDICTION_TYPES", "FamilyWorld", "make_world", "family", "make_schedule", "teacher_sample"]
