"""TCD: trajectory consistency distillation into a LoRA (Zheng et al., 2024), with LCM and Hyper-SD modes.

On a DDIM grid of 50 timesteps (skip k = 20), per sample:

    t  = grid[i],  t_n = t - k,  s <= t_n                           (s: the consistency end point)
    x_t = a_t x0 + s_t eps                                           (x0: a real or teacher-made sample)
    student:  f(x_t, t -> s) = a_s x0_hat + s_s eps_hat              (the trajectory consistency function,
                                                                      first-order exponential integrator)
    teacher:  x_tn = DDIM step t -> t_n of the guided teacher, CFG w ~ U[w_min, w_max]    (no grad)
    target:   f(x_tn, t_n -> s) by the same LoRA without grad (as diffusers' LCM-LoRA script: a LoRA
              student has no separate EMA target network)
    loss:     Huber or L2 between the two, on unit-variance samples

Modes (where s comes from):
* "tcd": s uniform over the grid points <= t_n (and 0): the student can jump to any earlier point, which
  is what the TCD sampler's gamma exploits;
* "lcm": s = 0, plain consistency to x0 (LCM);
* "tscd": Hyper-SD's trajectory-segmented consistency: the grid is cut into k segments and s stays in
  x_t's segment; k shrinks 8 -> 4 -> 2 -> 1 over training, so the student serves several step counts.

No critic: memory is one frozen base plus one LoRA, the cheapest of the three methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...sampling.timesteps import lcm_tcd_timesteps, timesteps_to_sigmas
from ..engine import DistillationMethod, StepContext
from ..registry import check, option, register
from ..teacher_samples import TeacherSamples

MODES = ("tcd", "lcm", "tscd")


@dataclass
class TCDOptions:
    mode: str = option("tcd", choices=MODES,
                       help="tcd: consistency to any earlier grid point (the gamma sampler's trajectory); lcm: "
                            "to x0 only (LCM); tscd: Hyper-SD's segments 8 -> 4 -> 2 -> 1 over training")
    sample_steps: int = option(4, min=1, max=50, help="the step count the student's card recommends")
    gamma: float = option(0.3, min=0.0, max=1.0,
                          help="TCD sampler gamma written into the student's card (0 = deterministic, 1 = LCM)")
    guidance_min: float = option(2.0, min=0.0, max=100.0, aliases=("cfg_min",),
                                 help="lowest teacher CFG scale drawn per sample")
    guidance_max: float = option(6.0, min=0.0, max=100.0, aliases=("cfg_max",),
                                 help="highest teacher CFG scale drawn per sample")
    loss: str = option("huber", choices=("huber", "l2"), help="consistency distance: huber (LCM / TCD) or l2")
    huber_c: float = option(0.001, min=1e-8, max=1.0, advanced=True, help="the pseudo-Huber loss's c")
    num_ddim_timesteps: int = option(50, min=2, max=1000, advanced=True,
                                     help="the DDIM grid the consistency is trained on (a divisor of 1000)")
    segments: list = option(kind="int_list", min=1, default_factory=lambda: [8, 4, 2, 1], advanced=True,
                            help="tscd: segment counts of the successive training stages")
    teacher_samples: int = option(256, min=1, max=1_000_000, advanced=True,
                                  help="teacher-made training samples when no real images are given")
    teacher_sample_steps: int = option(25, min=1, max=1000, advanced=True,
                                       help="DDIM steps of the teacher for its training samples")


@register("tcd", options=TCDOptions, display_name="TCD", sampler="tcd", real_images="data",
          search_words="LCM / Hyper-SD",
          description="Trajectory consistency distillation (Zheng et al., 2024), with LCM and Hyper-SD "
                      "(segmented) modes: no critic, the cheapest in memory; samples at any step count with "
                      "the gamma sampler. Real images, when given, are its training data.")
class TCD(DistillationMethod):
    needs_critic = False

    def __init__(self, options: TCDOptions | None = None, **kwargs):
        self.opt = check(options or TCDOptions(**kwargs))
        self.samples = TeacherSamples(self.opt.teacher_samples, self.opt.teacher_sample_steps, keep_noise=False)

    def validate(self, task, config) -> None:
        o = self.opt
        n = task.base.schedule.num_train_timesteps
        if n % o.num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps={o.num_ddim_timesteps}: use a divisor of {n}, e.g. 50")
        if o.guidance_min > o.guidance_max:
            raise ValueError(f"guidance_min/guidance_max={o.guidance_min}/{o.guidance_max}: need min <= max")

    def phases(self, step: int) -> list[str]:
        return ["student"]

    def state_dict(self) -> dict:  # the teacher samples, so a resume continues on the same data
        return {"buffer": self.samples.x, "buffer_cond": self.samples.cond}

    def load_state_dict(self, state: dict) -> None:
        self.samples.load_state_dict({"x": state.get("buffer"), "cond": state.get("buffer_cond")})

    def student_sigmas(self, schedule) -> torch.Tensor:
        return timesteps_to_sigmas(schedule, lcm_tcd_timesteps(self.opt.sample_steps))[:-1]

    def sampler_metadata(self) -> dict:
        return {"sampler": "tcd", "gamma": self.opt.gamma, "cfg": 1.0,
                "timesteps": lcm_tcd_timesteps(self.opt.sample_steps), "mode": self.opt.mode}

    # --- data: real images, or samples of the guided teacher -------------------------------------
    def _data(self, ctx: StepContext, batch: int):
        task = ctx.task
        if task.has_real_images:
            return task.real_images(batch, ctx.generator)
        self.samples.grow(ctx, task.default_guidance)
        _, x0, cond = self.samples.draw(ctx, batch)
        return x0, cond

    # --- the consistency end point s ---------------------------------------------------------------
    def _end_timesteps(self, ctx: StepContext, t_n: torch.Tensor, step_size: int) -> torch.Tensor:
        o = self.opt
        if o.mode == "lcm":
            return torch.zeros_like(t_n)
        if o.mode == "tcd":
            lo = torch.zeros_like(t_n)
        else:  # tscd: stay inside x_t's segment; the stage decides how many segments
            stage = min(len(o.segments) - 1, ctx.step * len(o.segments) // max(1, ctx.config.steps))
            seg = ctx.task.base.schedule.num_train_timesteps // o.segments[stage]
            lo = torch.div(t_n, seg, rounding_mode="floor") * seg
        # s on the grid {0, k-1, 2k-1, ...} between lo and t_n, uniform
        grid_lo = torch.div(lo + 1, step_size, rounding_mode="floor")
        grid_hi = torch.div(t_n + 1, step_size, rounding_mode="floor")
        u = torch.rand(t_n.shape, generator=ctx.generator)
        j = grid_lo + (u * (grid_hi - grid_lo + 1).float()).floor().long()
        return torch.where(j <= 0, torch.zeros_like(t_n), j * step_size - 1).clamp(max=t_n)

    def loss(self, role: str, ctx: StepContext):
        o = self.opt
        task = ctx.task
        b = ctx.batch
        schedule = ctx.roles.student.schedule
        n = schedule.num_train_timesteps
        k = n // o.num_ddim_timesteps
        x0, cond = self._data(ctx, b)
        uncond = task.conditioning(b, ctx.generator)[1]
        index = torch.randint(0, o.num_ddim_timesteps, (b,), generator=ctx.generator)
        t = (index + 1) * k - 1
        t_n = (t - k).clamp(min=0 if schedule.discrete else 1)  # flow: t = 0 is sigma = 0, no noise left
        s = self._end_timesteps(ctx, t_n, k)
        sig_t, sig_n = (schedule.training_sigma(v.double()).to(ctx.device) for v in (t, t_n))
        sig_s = schedule.training_sigma(s.double()).to(ctx.device)
        noise = ctx.randn(x0.shape, dtype=x0.dtype)
        x_t = schedule.add_noise(x0, noise, sig_t)

        def jump(x, sigma_from, x0_hat, sigma_to):
            eps_hat = schedule.from_x0(x0_hat, x, sigma_from, "epsilon")
            return schedule.add_noise(x0_hat, eps_hat, sigma_to)

        def unit(x, sigma):  # compare on unit-variance samples, whatever the level
            return schedule.rescale(x, sigma, torch.zeros_like(sigma))

        student_s = unit(jump(x_t, sig_t, ctx.roles.student(x_t, sig_t, cond), sig_s), sig_s)
        with torch.no_grad():
            w = o.guidance_min + (o.guidance_max - o.guidance_min) * ctx.rand((1,)).item()
            x0_teacher = ctx.roles.teacher(x_t, sig_t, cond, uncond, w)
            x_n = jump(x_t, sig_t, x0_teacher, sig_n)  # one DDIM step of the guided teacher
            target_s = unit(jump(x_n, sig_n, ctx.roles.student(x_n, sig_n, cond), sig_s), sig_s)
        diff = student_s.float() - target_s.float()
        if o.loss == "huber":
            loss = (torch.sqrt(diff ** 2 + o.huber_c ** 2) - o.huber_c).mean()
        else:
            loss = F.mse_loss(student_s.float(), target_s.float())
        return loss, {"teacher_cfg": w}

