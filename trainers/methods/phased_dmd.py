"""Phased DMD: K LoRA experts, one per noise subinterval, trained progressively (Fan et al., 2025).

"Phased DMD: Few-step Distribution Matching Distillation via Score Matching within Subintervals"
(arXiv 2510.27684). The noise range is split at boundaries sigma_max = s_0 > s_1 > ... > s_K = 0, which are
student timesteps (s_k = sigma(T_k)). Expert k (a LoRA "student_pk" on the one frozen base) runs the student's
steps inside (s_k, s_{k-1}] and hands over at s_k:

    x0_hat  = G_k(x_{s_{k-1}})                      (its student steps, x0 + fresh noise between them)
    x_{s_k} = a(s_k) x0_hat + s(s_k) z,  z fresh     (the phase output; x0_hat itself for the last phase)

Progressive training: phase 1 trains expert 1 alone; phase k runs the frozen experts 1..k-1 (no gradients) to
make its inputs x_{s_{k-1}}. Within phase k the distribution is matched only where it is defined, on the
levels t in (s_k, s_{k-1}] of the diffused phase output:

    x_t  = (a_t / a_{s_k}) x_{s_k} + sigma_{t|k} eps,   sigma_{t|k}^2 = s_t^2 - (a_t / a_{s_k})^2 s_{s_k}^2
    grad = (x0_fake(x_t) - x0_real^cfg(x_t)) / mean |x0_hat - x0_real^cfg(x_t)|          (DMD Eq. 7-8 on x0_hat)

and the fake score (critic) is trained by score matching within the subinterval: its data are the phase outputs
x_{s_k}, which are noisy, so its target comes from the transition kernel q(x_t | x_{s_k}), not from x0_hat
(`subinterval_target`). With s_K = 0 the last phase is ordinary DMD (the target is the plain denoising one).

One critic adapter serves every phase (it is only ever queried on the current phase's levels, where it is
trained). Resume works mid-phase: the phase of an iteration follows from the step and the phase schedule, which
is stored with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import StepContext
from ..generator import exit_step_option, student_generate, student_timesteps_option
from ..registry import check, option, register
from ..teacher_samples import TeacherSamples
from .dmd2 import (DMD2, guidance_scale_option, max_timestep_option, min_timestep_option, regression_pairs_option,
                   regression_steps_option, regression_weight_option, update_ratio_option)


@dataclass
class PhasedDMDOptions:
    student_timesteps: list = student_timesteps_option()
    phases: int = option(2, min=1, max=16,
                         help="K experts (LoRAs on the one base), one per noise subinterval; at most the number of "
                              "student timesteps (4 timesteps, 2 phases: each expert runs 2 steps)")
    phase_boundaries: str = option("auto",
                                   help="the student timesteps where experts 2..K take over, noisiest first (e.g. "
                                        "499 for 2 phases of 999,749,499,249); auto: the student timesteps in K "
                                        "equal runs")
    phase_split: list = option(kind="int_list", default_factory=lambda: [1], min=1,
                               help="the run's iterations per phase as weights, e.g. 1,1,2 (the last phase twice "
                                    "as long); 1 = equal shares. Experts train in order: phase k after 1..k-1")
    exit_step: str = exit_step_option()
    guidance_scale: float = guidance_scale_option()
    update_ratio: int = update_ratio_option()
    min_timestep: int = min_timestep_option()
    max_timestep: int = max_timestep_option()
    regression_weight: float = regression_weight_option()
    regression_pairs: int = regression_pairs_option()
    regression_steps: int = regression_steps_option()


def subinterval_target(schedule, x_start: torch.Tensor, sigma_start, x_t: torch.Tensor, sigma_t,
                       prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake score's regression target at (x_t, sigma_t) from a phase output x_start at sigma_start < sigma_t,
    in `prediction_type`, and the per-sample loss weight.

    q(x_t | x_s) = N(r x_s, sigma_{t|s}^2 I),  r = a_t / a_s,  sigma_{t|s}^2 = s_t^2 - r^2 s_s^2   (schedule.renoise)
    Denoising score matching from x_s (Vincent, 2011): grad log p_t(x_t) = E[-(x_t - r x_s) / sigma_{t|s}^2 | x_t]
    Tweedie for x = a x0 + s eps: grad log p_t(x) = (a E[x0 | x] - x) / s^2, hence the x0 target

        x0_tgt = (x_t - (s_t^2 / sigma_{t|s}^2) (x_t - r x_s)) / a_t,    E[x0_tgt | x_t] = E_fake[x0 | x_t]

    (eps_tgt = (s_t / sigma_{t|s}) z for x_t = r x_s + sigma_{t|s} z; with s_s = 0 it is z: plain denoising).
    epsilon, v and flow targets are affine in x0 at fixed x_t (schedule.from_x0), so they inherit the same
    conditional mean. eps_tgt's variance s_t^2 / sigma_{t|s}^2 grows without bound as t -> s; the weight
    lambda = sigma_{t|s}^2 / s_t^2 in (0, 1] keeps every level's loss bounded (1 for s_s = 0, the usual loss),
    and a per-level weight does not move the minimiser.
    """
    a_s, s_s = schedule.scales(torch.as_tensor(sigma_start, dtype=torch.float64))
    a_t, s_t = schedule.scales(torch.as_tensor(sigma_t, dtype=torch.float64))
    ratio = a_t / a_s
    var = (s_t * s_t - ratio * ratio * s_s * s_s).clamp(min=1e-20)

    def bcast(c):
        c = c.to(device=x_t.device, dtype=x_t.dtype)
        return c.reshape(c.shape + (1,) * (x_t.ndim - c.ndim)) if c.ndim else c

    x0_tgt = (x_t - bcast(s_t * s_t / var) * (x_t - bcast(ratio) * x_start)) / bcast(a_t)
    target = schedule.from_x0(x0_tgt, x_t, sigma_t, prediction_type)
    weight = (var / (s_t * s_t)).clamp(max=1.0)
    return target, weight


@register("phased_dmd", options=PhasedDMDOptions, display_name="Phased DMD", sampler="x0_renoise",
          search_words="mixture of experts MoE diversity",
          description="Phased DMD (Fan et al., 2025): K LoRA experts, one per noise subinterval, trained from high "
                      "to low noise, each by distribution matching within its subinterval: few-step students that "
                      "keep more of the teacher's diversity; sampled with the expert switched at the trained "
                      "timesteps.")
class PhasedDMD(DMD2):
    needs_critic = True

    def __init__(self, options: PhasedDMDOptions | None = None, **kwargs):
        self.opt = check(options or PhasedDMDOptions(**kwargs))
        self._parse_student_timesteps()
        self.pairs = TeacherSamples(self.opt.regression_pairs, self.opt.regression_steps)
        self.head = None
        self._runs: list[tuple[int, int]] | None = None  # [start, end) of each phase in the student steps
        self._phase_ends: list[int] | None = None  # iteration where each phase ends (exclusive)
        self._boundary_sigmas: list[float] = []
        self._num_train_timesteps = 1000
        self._check_boundary_text()

    # --- the phases -----------------------------------------------------------------------------------
    def _check_boundary_text(self) -> None:
        text = self.opt.phase_boundaries.strip().lower()
        if text != "auto":
            try:
                [float(t) for t in text.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"phase_boundaries={self.opt.phase_boundaries!r}: write auto or student "
                                 f"timesteps separated by commas, e.g. 499") from None
        if len(self.opt.phase_split) not in (1, self.opt.phases):
            raise ValueError(f"phase_split={self.opt.phase_split}: give 1 (equal shares) or one weight per phase "
                             f"({self.opt.phases} for phases={self.opt.phases})")

    def _resolve_runs(self, timesteps: list) -> list[tuple[int, int]]:
        """Which student steps each expert runs: [start, end) index ranges, in order."""
        o, n = self.opt, len(timesteps)
        if o.phases > n:
            raise ValueError(f"phases={o.phases}: each expert needs at least one of the {n} student timesteps "
                             f"({','.join(str(t) for t in timesteps)}); use phases <= {n} or more student_timesteps")
        text = o.phase_boundaries.strip().lower()
        if text == "auto":
            sizes = [n // o.phases + (1 if k < n % o.phases else 0) for k in range(o.phases)]
            starts = [sum(sizes[:k]) for k in range(o.phases)]
        else:
            values = [float(t) for t in text.replace(",", " ").split()]
            if len(values) != o.phases - 1:
                raise ValueError(f"phase_boundaries={o.phase_boundaries!r}: phases={o.phases} needs {o.phases - 1} "
                                 f"boundaries (the student timesteps where experts 2..{o.phases} start), or auto")
            starts = [0]
            for v in values:
                hits = [i for i, t in enumerate(timesteps) if float(t) == v and i > 0]
                if not hits:
                    raise ValueError(f"phase_boundaries: {v:g} is not one of the student timesteps after the first "
                                     f"({','.join(str(t) for t in timesteps[1:])}); experts switch at a student "
                                     f"timestep so the sampler visits every boundary")
                if hits[0] <= starts[-1]:
                    raise ValueError(f"phase_boundaries={o.phase_boundaries!r}: list them noisiest first, each once")
                starts.append(hits[0])
        return [(s, e) for s, e in zip(starts, starts[1:] + [n])]

    def _resolve_phase_ends(self, steps: int) -> list[int]:
        o = self.opt
        weights = o.phase_split if len(o.phase_split) == o.phases else [1] * o.phases
        total = sum(weights)
        ends = [round(steps * sum(weights[:k + 1]) / total) for k in range(o.phases)]
        ends[-1] = steps
        if any(e <= s for s, e in zip([0] + ends[:-1], ends)):
            raise ValueError(f"steps={steps}: too few iterations for {o.phases} phases split {weights}; give "
                             f"every phase at least one iteration (more steps or fewer phases)")
        return ends

    def student_adapters(self) -> list[str]:
        return [f"student_p{k + 1}" for k in range(self.opt.phases)]

    def critic_adapters(self) -> list[str]:
        return ["critic"]  # one critic serves every phase (see the module's docstring)

    def phase_at(self, step: int) -> int:
        """The 0-based phase that iteration `step` trains."""
        for k, end in enumerate(self._phase_ends):
            if step < end:
                return k
        return self.opt.phases - 1  # iterations past the schedule (more steps on a finished run): the last

    def phase_range(self, phase: int) -> tuple[float, float | None]:
        """Phase k's subinterval on the training-timestep scale: (upper, inclusive; lower, exclusive or None)."""
        ts = self.opt.student_timesteps
        start, end = self._runs[phase]
        upper = self._num_train_timesteps - 1 if phase == 0 else float(ts[start])
        lower = float(ts[end]) if end < len(ts) else None
        return upper, lower

    def _levels(self, phase: int, clip: bool) -> tuple[int, int]:
        """Integer training timesteps [lo, hi] inside phase k's subinterval (clip: within [min, max]_timestep)."""
        upper, lower = self.phase_range(phase)
        lo = 0 if lower is None else math.floor(lower) + 1
        hi = math.floor(upper)
        if clip:
            lo, hi = max(lo, self.opt.min_timestep), min(hi, self.opt.max_timestep)
        return lo, hi

    # --- checks before any work ---------------------------------------------------------------------
    def validate(self, task, config) -> None:
        o = self.opt
        self._num_train_timesteps = self._check_timesteps(task)
        self._runs = self._resolve_runs(o.student_timesteps)
        self._phase_ends = self._resolve_phase_ends(config.steps)
        for k in range(o.phases):
            lo, hi = self._levels(k, clip=True)
            if lo > hi:
                upper, lower = self.phase_range(k)
                raise ValueError(f"min_timestep/max_timestep={o.min_timestep}/{o.max_timestep}: phase {k + 1}'s "
                                 f"subinterval ({lower or 0:g}, {upper:g}] has no training level inside them; "
                                 f"widen them or move phase_boundaries")
        sigmas = self.student_sigmas(task.base.schedule)
        self._boundary_sigmas = [float(sigmas[start]) for start, _ in self._runs[1:]]

    # --- schedule -----------------------------------------------------------------------------------
    def setup(self, roles, task, config):
        from ..roles import PhasedStudent

        roles.student = PhasedStudent(roles.experts, self._boundary_sigmas)  # each expert on its levels
        return {}

    def sampler_metadata(self) -> dict:
        return {"sampler": "x0_renoise", "timesteps": self.opt.student_timesteps, "cfg": 1.0,
                "experts": self.experts_metadata()}

    def experts_metadata(self) -> list[dict]:
        """What the card records of each expert: its LoRA key prefix, the student timesteps it runs and its
        subinterval (timesteps on the training scale and the trained schedule's sigmas)."""
        ts = self.opt.student_timesteps
        out = []
        for k, (start, end) in enumerate(self._runs):
            upper, lower = self.phase_range(k)
            out.append({"expert": k + 1, "prefix": f"{self.student_adapters()[k]}.",
                        "timesteps": list(ts[start:end]),
                        "start_timestep": ts[start], "end_timestep": ts[end] if end < len(ts) else 0,
                        "sigma_start": None if k == 0 else self._boundary_sigmas[k - 1],
                        "sigma_end": self._boundary_sigmas[k] if k < len(self._boundary_sigmas) else 0.0})
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "phase_ends": list(self._phase_ends)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        ends = state.get("phase_ends")
        if ends:  # the schedule the run started with; more steps on a finished run go to the last phase
            steps = self._phase_ends[-1]
            self._phase_ends = [int(e) for e in ends]
            self._phase_ends[-1] = max(self._phase_ends[-1], steps)

    # --- losses -------------------------------------------------------------------------------------
    def _generate(self, ctx: StepContext, grad: bool):
        """Experts 1..k-1 (frozen) then expert k from pure noise; returns x0_hat of expert k (with its graph)
        and caches the phase output x_{s_k}."""
        task = ctx.task
        phase = self.phase_at(ctx.step)
        cond, uncond = task.conditioning(ctx.batch, ctx.generator)
        noise = ctx.randn((ctx.batch, *task.sample_shape))
        schedule = ctx.roles.student.schedule
        sigmas = self.student_sigmas(schedule).to(ctx.device)
        start, end = self._runs[phase]
        if self.opt.exit_step == "last" or end - start == 1:
            exit_index = end - 1
        else:  # DMD2's backward simulation within the phase: any of its steps' x0 is a phase output
            exit_index = start + int(torch.randint(0, end - start, (1,), generator=ctx.generator))
        x0_hat, _ = student_generate(ctx.roles.student, cond, sigmas, noise, ctx.generator,
                                     step_index=exit_index, grad=grad)
        sigma_end = self._boundary_sigmas[phase] if phase < len(self._boundary_sigmas) else 0.0
        if sigma_end > 0:
            x_end = schedule.add_noise(x0_hat.detach(), ctx.randn(x0_hat.shape, dtype=x0_hat.dtype), sigma_end)
        else:
            x_end = x0_hat.detach()
        ctx.cache.update(x=x_end, sigma_end=sigma_end, cond=cond, uncond=uncond, phase=phase)
        return x0_hat, cond, uncond

    def _student_loss(self, ctx: StepContext):
        o = self.opt
        x0_hat, cond, uncond = self._generate(ctx, grad=True)
        x_end, sigma_end, phase = ctx.cache["x"], ctx.cache["sigma_end"], ctx.cache["phase"]
        b = x0_hat.shape[0]
        dims = list(range(1, x0_hat.ndim))
        schedule = ctx.roles.student.schedule
        with torch.no_grad():
            sigma = ctx.sample_sigma(b, *self._levels(phase, clip=True))
            # the phase output diffused within the subinterval: x_t ~ q(x_t | x_{s_k})
            x_t = schedule.renoise(x_end, sigma_end, sigma, ctx.randn(x_end.shape, dtype=x_end.dtype))
            x0_fake = ctx.roles.critic(x_t, sigma, cond)
            x0_real = ctx.roles.teacher(x_t, sigma, cond, uncond, o.guidance_scale)
            norm = (x0_hat.detach() - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
            grad = torch.nan_to_num((x0_fake - x0_real) / norm)
        loss = 0.5 * torch.nn.functional.mse_loss(x0_hat.float(), (x0_hat - grad).detach().float())
        metrics = {"dm_grad_norm": float(grad.norm() / b ** 0.5), "phase": phase + 1}
        if o.regression_weight > 0 and phase == 0:  # the first step from pure noise is the first expert's
            reg = self._regression_loss(ctx)
            loss = loss + o.regression_weight * reg
            metrics["regression"] = float(reg.detach())
        return loss, metrics

    def _critic_loss(self, ctx: StepContext):
        if "x" not in ctx.cache:
            with torch.no_grad():
                self._generate(ctx, grad=False)
        x_end, sigma_end, cond, phase = ctx.cache["x"], ctx.cache["sigma_end"], ctx.cache["cond"], ctx.cache["phase"]
        b = x_end.shape[0]
        schedule = ctx.roles.critic.schedule
        sigma = ctx.sample_sigma(b, *self._levels(phase, clip=False))
        x_t = schedule.renoise(x_end, sigma_end, sigma, ctx.randn(x_end.shape, dtype=x_end.dtype))
        native = schedule.prediction_type if schedule.prediction_type != "sample" else "epsilon"
        pred = ctx.roles.critic(x_t, sigma, cond, output=native)
        target, weight = subinterval_target(schedule, x_end, sigma_end, x_t, sigma, native)
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
        loss = (weight.to(per_sample) * per_sample).mean()
        return loss, {"denoise/critic": loss.item(), "phase": phase + 1}
