"""Samples of the guided teacher, kept for training: TCD's data without real images, and the noise -> sample
pairs of DMD's regression loss.

The teacher samples with deterministic DDIM on trailing timesteps, so each sample is a function of the noise it
started from (the pair DMD's regression needs). The store grows by one batch per forward pass (per micro-batch
when the batch is split) until it holds `size` samples, so training (and its progress bar) starts at once
instead of after size x steps evaluations. It lives in host memory (a few hundred SDXL latents with their
T5 / CLIP embeddings would otherwise sit on the GPU, unplanned); each draw moves one batch to the device. It
is saved with the method's checkpoint state, so a resumed run continues on the same samples.
"""

from __future__ import annotations

import torch

from ..core.models import Guided, map_cond
from ..sampling.api import initial_state
from ..sampling.deterministic import ddim_coefficients
from ..sampling.timesteps import timesteps_to_sigmas, trailing_timesteps

GREW = "teacher_samples_grew"  # StepContext.cache key: at most one new batch per forward pass


@torch.no_grad()
def guided_teacher_batch(ctx, batch: int, steps: int, guidance: float):
    """(noise, x0, cond): `batch` samples of the teacher at CFG `guidance` (one pass with the scale as input for
    guidance-distilled teachers), deterministic DDIM over `steps` trailing timesteps from pure noise."""
    task, teacher = ctx.task, ctx.roles.teacher
    schedule = teacher.schedule
    sigmas = timesteps_to_sigmas(schedule, trailing_timesteps(steps)).to(ctx.device)
    cond, uncond = task.conditioning(batch, ctx.generator)
    noise = ctx.randn((batch, *task.sample_shape))
    model = Guided(teacher, cond, uncond, guidance)
    x = initial_state(teacher, noise, float(sigmas[0]))
    # sample_ddim's update without its input checks: these sigmas come from the schedule, and a planner's dry
    # run (fake tensors, every value read as 1.0) still runs the teacher's passes it has to plan
    for i, (c_x0, c_x) in enumerate(ddim_coefficients(schedule, sigmas)):
        x = c_x0 * model(x, sigmas[i].expand(batch)) + c_x * x  # x' = a' x0_hat + s' eps_hat
    return noise, x, cond


class TeacherSamples:
    """Up to `size` guided-teacher samples (with their noise when `keep_noise`), on the host, one batch more per
    forward pass until full."""

    def __init__(self, size: int, steps: int, keep_noise: bool = True):
        self.size, self.steps, self.keep_noise = int(size), int(steps), keep_noise
        self.noise: torch.Tensor | None = None
        self.x: torch.Tensor | None = None
        self.cond = None

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def grow(self, ctx, guidance: float) -> None:
        """Add one batch (the run's batch size, at most what is missing) unless full or grown this iteration."""
        if len(self) >= self.size or (self.x is not None and GREW in ctx.cache):
            return
        noise, x, cond = guided_teacher_batch(ctx, min(ctx.batch, self.size - len(self)), self.steps, guidance)
        noise, x, cond = noise.cpu() if self.keep_noise else None, x.cpu(), map_cond(lambda c: c.cpu(), cond)
        if self.x is None:
            self.noise, self.x, self.cond = noise, x, cond
        else:
            self.x = torch.cat([self.x, x])
            self.noise = None if noise is None else torch.cat([self.noise, noise])
            self.cond = map_cond(lambda a, b: torch.cat([a, b]), self.cond, cond)
        ctx.cache[GREW] = True

    def draw(self, ctx, batch: int):
        """(noise or None, x0, cond) of `batch` stored samples, drawn with replacement, on the run's device."""
        idx = torch.randint(0, len(self), (batch,), generator=ctx.generator)
        noise = None if self.noise is None else self.noise[idx].to(ctx.device)
        return noise, self.x[idx].to(ctx.device), map_cond(lambda c: c[idx].to(ctx.device), self.cond)

    def state_dict(self) -> dict:
        return {"noise": self.noise, "x": self.x, "cond": self.cond}

    def load_state_dict(self, state: dict) -> None:  # checkpoints load on the host, where the store lives
        self.noise, self.x, self.cond = state.get("noise"), state.get("x"), state.get("cond")
