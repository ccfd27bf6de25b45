"""Hybrid sampling: the base model for the first, diversity-deciding steps, then the distilled student.

"Distilling Diversity and Control in Diffusion Models" (2025) finds that the first timesteps decide a
sample's composition (and so the diversity of a batch), and that running the base model only there and
handing the noisy latent to the distilled student restores the base model's diversity at nearly the
student's cost. Its reference code runs the base on its own grid down to the base level closest to the
student's second timestep and passes the *noisy latent*, not an x0 estimate, to the student.

Here the hand-off lands *exactly* on a level the student was trained on:

* the requested hand-off (``base_steps`` = k steps of the base's own schedule, an explicit ``timestep``,
  or a ``student_index``) is snapped to the nearest student level below the base's start (nearest in
  the network's timestep, what the student is conditioned on), and the snap is reported;
* the base runs every level of its own schedule above that level and its last step lands on it
  (``base part`` = base levels > hand-off, then the hand-off level);
* the student continues from that level on its own schedule (``student part`` = hand-off, the
  student's lower levels, 0).

Noise is added exactly once: ``x`` is the state at the first level of the run (ComfyUI and
k-diffusion's convention); the base's final state at the hand-off level is handed to the student as it
is, with no re-noising and no x0 round trip. With a student equal to the teacher and deterministic
samplers the hybrid therefore *is* the teacher's trajectory on the merged schedule (tests check this).
Everything goes through the schedule's (a, s), so eps, v-prediction and flow models all work.

Evaluations are counted per sample: a guided (CFG) evaluation counts 2, as ``core.models.Guided`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.schedules import NoiseSchedule
from .checks import check_sigmas

#: two noise levels closer than this (relative) are the same level
LEVEL_RTOL = 1e-5
#: a requested timestep this close to the used one is not reported as a snap
SNAP_TOL = 1e-3


def _t(schedule: NoiseSchedule, sigma: float) -> float:
    return float(schedule.timestep(torch.tensor(float(sigma), dtype=torch.float64)))


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= LEVEL_RTOL * max(abs(a), abs(b), 1e-12)


def _fmt_t(t: float) -> str:
    return f"{t:.0f}" if abs(t - round(t)) < 1e-3 else f"{t:.1f}"


@dataclass
class Handoff:
    """Where the base hands over to the student, and the two schedules that result."""

    base_sigmas: torch.Tensor  # the base's part: its levels above the hand-off, then the hand-off level
    student_sigmas: torch.Tensor  # the student's part: the hand-off level, its lower levels, 0
    sigma: float  # the hand-off level (0: the base runs to the end; no student steps)
    timestep: float  # the network timestep of that level (a student-trained timestep)
    requested_timestep: float  # what was asked for, before snapping
    requested: str  # how it was asked for: "base_steps=5", "timestep=760", "student_index=1"
    student_index: int  # index of the hand-off level in the student's schedule (len: no student)
    snapped: bool = False
    notes: list = field(default_factory=list)

    @property
    def base_steps(self) -> int:
        return len(self.base_sigmas) - 1

    @property
    def student_steps(self) -> int:
        return max(len(self.student_sigmas) - 1, 0)

    def merged_sigmas(self) -> torch.Tensor:
        """The whole run's schedule: the base part, then the student part (the hand-off level once)."""
        if self.student_steps == 0:
            return self.base_sigmas
        return torch.cat([self.base_sigmas[:-1], self.student_sigmas])

    def describe(self, schedule: NoiseSchedule | None = None) -> str:
        """One line for a UI: the snap, and who runs which levels."""
        def levels(sig):
            if schedule is None:
                return ", ".join(f"{float(s):.4g}" for s in sig)
            return ", ".join(_fmt_t(_t(schedule, float(s))) if float(s) > 0 else "0" for s in sig)

        if self.snapped:
            head = (f"hand-off requested at t={_fmt_t(self.requested_timestep)} ({self.requested}), snapped to "
                    f"the student's level t={_fmt_t(self.timestep)}")
        elif self.student_steps == 0:
            head = f"no hand-off ({self.requested}): the base runs the whole schedule"
        elif self.base_steps == 0:
            head = f"no base steps ({self.requested}): the student runs its whole schedule"
        else:
            head = f"hand-off at the student's level t={_fmt_t(self.timestep)} ({self.requested}, exact)"
        parts = [head]
        if self.base_steps:
            parts.append(f"base: {self.base_steps} step(s) over t = {levels(self.base_sigmas)}")
        if self.student_steps:
            parts.append(f"student: {self.student_steps} step(s) over t = {levels(self.student_sigmas)}")
        return "; ".join(parts + list(self.notes))

    def as_dict(self) -> dict:
        return {
            "handoff_timestep": self.timestep, "handoff_sigma": self.sigma,
            "requested_timestep": self.requested_timestep, "snapped_from": self.requested_timestep,
            "snapped": self.snapped, "requested": self.requested, "student_index": self.student_index,
            "base_steps": self.base_steps, "student_steps": self.student_steps,
            "base_sigmas": [float(s) for s in self.base_sigmas],
            "student_sigmas": [float(s) for s in self.student_sigmas],
        }


def hybrid_sigmas(base_sigmas, student_sigmas, *, schedule: NoiseSchedule, base_steps: int | None = None,
                  timestep: float | None = None, student_index: int | None = None,
                  student_schedule: NoiseSchedule | None = None) -> Handoff:
    """Pick the hand-off level and split the run into the base's part and the student's part.

    base_sigmas: the base's full schedule (e.g. 20 steps of its scheduler, ending in 0).
    student_sigmas: the student's schedule on its trained timesteps (ending in 0).
    Give one of (default: ``student_index=1``, the reference implementation's default):

    * ``base_steps`` k: hand off where k steps of the base's own schedule end (base_sigmas[k]),
      snapped to the nearest student level; 0 = the student alone, len(base_sigmas) - 1 = the base alone;
    * ``timestep``: hand off at this network timestep, snapped to the nearest student level;
    * ``student_index`` j: hand off at the student's j-th level (1 = its second timestep).

    Snapping is by distance in the network timestep (the student's, ``student_schedule`` or
    ``schedule``) among the student levels strictly between the base's first level and 0.
    """
    given = [name for name, v in (("base_steps", base_steps), ("timestep", timestep),
                                   ("student_index", student_index)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"hand-off: give one of base_steps, timestep or student_index, not {' and '.join(given)}")
    if not given:
        student_index = 1
    base = check_sigmas(base_sigmas, "base_sigmas", require_final_zero=True)
    student = check_sigmas(student_sigmas, "student_sigmas", require_final_zero=True)
    s_sched = student_schedule or schedule
    levels = [float(s) for s in student if float(s) > 0]
    top = float(base[0])

    def split(sigma: float, index: int, requested_t: float, requested: str, snapped: bool, notes=()):
        if sigma <= 0:  # the base runs to the end
            return Handoff(base.clone(), base.new_zeros(0), 0.0, 0.0, requested_t, requested, len(levels),
                           snapped, list(notes))
        above = [float(s) for s in base if float(s) > sigma and not _same(float(s), sigma)]
        base_part = torch.tensor(above + [sigma], dtype=torch.float64)
        student_part = torch.tensor(levels[index:] + [0.0], dtype=torch.float64)
        return Handoff(base_part, student_part, sigma, _t(s_sched, sigma), requested_t, requested, index,
                       snapped, list(notes))

    def student_alone(requested: str):  # the run starts at the student's own first level
        sigma = levels[0]
        return Handoff(torch.tensor([sigma], dtype=torch.float64),
                       torch.tensor(levels + [0.0], dtype=torch.float64), sigma, _t(s_sched, sigma),
                       _t(s_sched, sigma), requested, 0, False)

    if student_index is not None:
        j = int(student_index)
        if not 0 <= j <= len(levels):
            raise ValueError(f"student_index={j}: the student has {len(levels)} level(s); use 0 (student "
                             f"alone) .. {len(levels) - 1}, or {len(levels)} for the base alone")
        if j == len(levels):
            return split(0.0, j, 0.0, f"student_index={j}", False)
        sigma = levels[j]
        if j > 0 and not sigma < top:
            raise ValueError(f"student_index={j}: the student's level t={_fmt_t(_t(s_sched, sigma))} is not "
                             f"below the base's first level t={_fmt_t(_t(schedule, top))}")
        if j == 0:
            return student_alone("student_index=0")
        return split(sigma, j, _t(s_sched, sigma), f"student_index={j}", False)

    if base_steps is not None:
        k = int(base_steps)
        if not 0 <= k <= len(base) - 1:
            raise ValueError(f"base_steps={k}: the base schedule has {len(base) - 1} step(s); use 0 (student "
                             f"alone) .. {len(base) - 1} (base alone)")
        if k == 0:
            return student_alone("base_steps=0")
        requested_sigma = float(base[k])
        requested = f"base_steps={k} of {len(base) - 1}"
        if requested_sigma <= 0:
            return split(0.0, len(levels), 0.0, requested, False)
    else:
        requested_sigma = float(s_sched.sigma(torch.tensor(float(timestep), dtype=torch.float64)))
        requested = f"timestep={_fmt_t(float(timestep))}"
    requested_t = _t(s_sched, requested_sigma)

    candidates = [(j, s) for j, s in enumerate(levels) if s < top and not _same(s, top)]
    if not candidates:
        raise ValueError(f"hand-off: no student level lies below the base's first level "
                         f"t={_fmt_t(_t(schedule, top))} (student levels t = "
                         f"{', '.join(_fmt_t(_t(s_sched, s)) for s in levels)}); start the base higher")
    j, sigma = min(candidates, key=lambda c: (abs(_t(s_sched, c[1]) - requested_t), -c[1]))
    used_t = _t(s_sched, sigma)
    snapped = abs(used_t - requested_t) > SNAP_TOL
    return split(sigma, j, requested_t, requested, snapped)


# --- running both stages ---------------------------------------------------------------------------------

class _Counted:
    """Counts network evaluations of a k-diffusion model(x, sigma) -> x0 (a CFG pair counts 2)."""

    def __init__(self, model, guided: bool | None = None):
        self.model, self.evals = model, 0
        self.guided = guided
        for name in ("inner_model", "schedule"):  # samplers may look these up
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def __call__(self, x, sigma, **kwargs):
        before = getattr(self.model, "calls", None)
        out = self.model(x, sigma, **kwargs)
        after = getattr(self.model, "calls", None)
        if before is not None and after is not None and self.guided is None:
            self.evals += after - before
        else:
            self.evals += 2 if self.guided else 1
        return out


def _sampler(fn_or_name):
    from . import SAMPLERS

    if callable(fn_or_name):
        return fn_or_name
    name = {"euler": "ddim"}.get(fn_or_name, fn_or_name)
    if name not in SAMPLERS:
        raise ValueError(f"sampler={fn_or_name!r}: choose one of {sorted(SAMPLERS) + ['euler']} or pass a "
                         f"sampler function")
    return SAMPLERS[name]


def sample_hybrid(base_model, student_model, x: torch.Tensor, base_sigmas, student_sigmas, *,
                  schedule: NoiseSchedule, base_sampler="ddim", student_sampler="x0_renoise",
                  base_steps: int | None = None, handoff_timestep: float | None = None,
                  student_index: int | None = None, base_options: dict | None = None,
                  student_options: dict | None = None, extra_args: dict | None = None,
                  callback: Callable[[dict], Any] | None = None, disable=None, noise_sampler=None,
                  student_schedule: NoiseSchedule | None = None, base_guided: bool | None = None,
                  student_guided: bool | None = None) -> tuple[torch.Tensor, dict]:
    """Base first, student from a student-trained level on; returns (x0 sample, info).

    base_model / student_model: k-diffusion models ``model(x, sigma[B], **extra_args) -> x0`` with their
    conditioning and CFG bound (``core.models.Guided``: its ``calls`` counter gives the evaluations; for
    other callables say whether a call is a CFG pair with ``base_guided`` / ``student_guided``).
    x: the state at the run's first level (``Handoff.merged_sigmas()[0]``: the base's first level, or the
    student's when the base runs no step), e.g. ``noise * sigma`` for VP; the only noise ever *added* to
    the run besides the samplers' own re-noising within their stage.
    base_sampler / student_sampler: a name from ``sampling.SAMPLERS`` ("ddim" = "euler", "x0_renoise",
    "tcd") or a sampler function; ``*_options`` are its keyword options (e.g. gamma).
    The hand-off: one of ``base_steps``, ``handoff_timestep``, ``student_index`` (see
    :func:`hybrid_sigmas`). ``callback`` gets the samplers' step dicts plus "stage" ("base" / "student"),
    "stage_i" (the step within the stage) and "i" (the step within the whole run).
    A stochastic sampler draws from one noise stream for both stages (``noise_sampler``, default: the
    seed-stable sampler of ``extra_args["seed"]``), so the stages never repeat each other's noise.

    info: handoff_timestep, snapped_from (the requested timestep), snapped, base_steps, student_steps,
    base_evals, student_evals, evals_per_sample (a CFG pair counts 2), message (one line for a UI).
    """
    plan = hybrid_sigmas(base_sigmas, student_sigmas, schedule=schedule, base_steps=base_steps,
                         timestep=handoff_timestep, student_index=student_index,
                         student_schedule=student_schedule)
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        from .noise import default_noise_sampler

        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    base = _Counted(base_model, base_guided)
    student = _Counted(student_model, student_guided)
    device = x.device

    def stage_callback(stage: str, offset: int):
        if callback is None:
            return None

        def cb(d):
            callback({**d, "stage": stage, "stage_i": d["i"], "i": offset + d["i"]})
        return cb

    if plan.base_steps > 0:
        x = _sampler(base_sampler)(base, x, plan.base_sigmas.to(device), extra_args=extra_args,
                                   callback=stage_callback("base", 0), disable=disable, schedule=schedule,
                                   noise_sampler=noise_sampler, **(base_options or {}))
    if plan.student_steps > 0:
        x = _sampler(student_sampler)(student, x, plan.student_sigmas.to(device), extra_args=extra_args,
                                      callback=stage_callback("student", plan.base_steps), disable=disable,
                                      schedule=student_schedule or schedule, noise_sampler=noise_sampler,
                                      **(student_options or {}))
    info = plan.as_dict()
    info.update(base_evals=base.evals, student_evals=student.evals,
                evals_per_sample=base.evals + student.evals,
                message=plan.describe(student_schedule or schedule))
    return x, info


__all__ = ["Handoff", "hybrid_sigmas", "sample_hybrid"]
