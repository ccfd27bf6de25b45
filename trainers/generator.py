"""The few-step student as a generator: noise -> x0, with DMD2's backward simulation.

A student trained on conditioning timesteps t_0 > t_1 > ... > t_{N-1} samples as: start from pure noise at
t_0, predict x0, re-noise with fresh noise to t_1, predict x0, ... (the x0 + fresh-noise sampler). To train
step k without a train/test mismatch, the first k steps are run by the student itself under no_grad
("backward simulation", DMD2 Sec. 4.5) and only the last prediction keeps its graph. Fresh, uncorrelated
noise at every re-noise matters (DMD2#9).
"""

from __future__ import annotations

import torch

from ..core.models import DiffusionModel
from ..sampling.api import initial_state
from ..sampling.timesteps import parse_timesteps, timesteps_to_sigmas
from .engine import DistillationMethod
from .registry import option

# Which step's output a multi-step student is trained on (the `exit_step` option of DMD2 and SiD).
EXIT_STEPS = ("uniform", "last")


# --- the options every generator method declares (each in its own dataclass, with these fields) ------------
def student_timesteps_option():
    return option(kind="timesteps", default_factory=lambda: [999, 749, 499, 249], aliases=("timesteps",),
                  help="the student's conditioning timesteps, noisiest first (0..999 on the training scale): "
                       "999,749,499,249 = 4 steps, 399 = 1 step")


def exit_step_option():
    return option("uniform", choices=EXIT_STEPS,
                  help="uniform: train every step's output (backward simulation, the papers' way); last: only "
                       "the N-step output, for a student always sampled with its own N timesteps (the earlier "
                       "steps run without gradients and change only through the shared weights; trained long, "
                       "they drift off the data until the last step breaks: uniform with DMD2's critic_per_step "
                       "trains every step)")


def gan_generator_weight_option():
    return option(0.0, min=0.0, max=10.0, aliases=("gan_weight",),
                  help="diffusion-GAN weight for the student on real images (0 = off, data-free; DMD2's SDXL "
                       "recipe: 0.005); needs a real-images folder")


def gan_critic_weight_option():
    return option(1e-2, min=0.0, max=10.0, advanced=True,
                  help="weight of the discriminator's loss in the critic's (fake score's) update")


def student_generate(student: DiffusionModel, cond, sigmas: torch.Tensor, noise: torch.Tensor,
                     generator: torch.Generator, step_index: int | None = None, grad: bool = True):
    """Run the student's sampler from pure noise; return (x0 of the last step, its level index).

    `sigmas`: the student's conditioning levels (no final 0). If `step_index` is None one is drawn
    uniformly (the same for the whole batch, as in DMD2); steps before it run without gradients.
    """
    schedule = student.schedule
    n = len(sigmas)
    if step_index is None:
        step_index = int(torch.randint(0, n, (1,), generator=generator))
    batch = noise.shape[0]
    # pure noise as the network sees it, at any first level (DMD2 1-step students start at 399 too)
    x = initial_state(student, noise, float(sigmas[0]))
    with torch.no_grad():
        for i in range(step_index):
            x0 = student(x, sigmas[i].expand(batch), cond)
            fresh = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
            x = schedule.add_noise(x0, fresh, sigmas[i + 1].expand(batch))
    with torch.set_grad_enabled(grad):
        x0 = student(x, sigmas[step_index].expand(batch), cond)
    return x0, step_index


def student_chain(student: DiffusionModel, cond, sigmas: torch.Tensor, noise: torch.Tensor, randn) -> list:
    """Every step's x0 along one run of the student's sampler from pure noise (x0 + fresh noise from
    `randn(shape, dtype)` between the steps); gradients as the caller's mode."""
    batch = noise.shape[0]
    x = initial_state(student, noise, float(sigmas[0]))
    outputs = []
    for i in range(len(sigmas)):
        outputs.append(student(x, sigmas[i].expand(batch), cond))
        if i + 1 < len(sigmas):
            x = student.schedule.add_noise(outputs[-1], randn(noise.shape, dtype=noise.dtype),
                                           sigmas[i + 1].expand(batch))
    return outputs


@torch.no_grad()
def student_sample(student: DiffusionModel, cond, sigmas: torch.Tensor, noise: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Full N-step sample of the student (x0 + fresh noise), as the sampler node runs it."""
    x0, _ = student_generate(student, cond, sigmas, noise, generator, step_index=len(sigmas) - 1, grad=False)
    return x0


class GeneratorMethod(DistillationMethod):
    """Shared by the score-distillation methods (DMD2, SiD): a student that generates from noise on its
    conditioning timesteps, scored at training noise levels t in [min_timestep, max_timestep].

    Subclasses keep their options in `self.opt` with `student_timesteps`, `exit_step`, `min_timestep`,
    `max_timestep`, `update_ratio` and `gan_generator_weight`; with a GAN weight > 0 the critic carries a
    discriminator head (methods/gan.py), trained with it.
    """

    head = None  # the discriminator head, when the GAN term is on

    def _parse_student_timesteps(self) -> None:
        # format only here; the range is checked against the model's schedule in validate()
        self.opt.student_timesteps = parse_timesteps(self.opt.student_timesteps, discrete=False,
                                                     field="student_timesteps")

    def exit_index(self, sigmas: torch.Tensor) -> int | None:
        """The step whose output is trained: None draws one per batch (DMD2's backward simulation, few-step
        SiD's uniform mixture), "last" always takes the N-step output.

        One critic learns whatever outputs are trained, so under "uniform" it pins only the mixture of the
        step outputs: on the Gaussian-mixture world the mixture matches the data while the 4-step output
        does not (step 1 over-weights the light modes, later steps compensate). "last" matches the output
        that is actually sampled, at the price of the other step counts. DMD2's critic_per_step gives each
        step a critic of its own, so "uniform" matches every step's output.
        """
        return len(sigmas) - 1 if self.opt.exit_step == "last" else None

    def _check_timesteps(self, task) -> int:
        """Parse the student timesteps and check the loss's noise range on the task's schedule; returns the
        schedule's number of training timesteps."""
        o = self.opt
        schedule = task.base.schedule
        n = schedule.num_train_timesteps
        o.student_timesteps = parse_timesteps(o.student_timesteps, discrete=schedule.discrete,
                                              num_train_timesteps=n, field="student_timesteps")
        if not 0 <= o.min_timestep < o.max_timestep < n:
            raise ValueError(f"min_timestep/max_timestep={o.min_timestep}/{o.max_timestep}: "
                             f"need 0 <= min < max < {n}")
        return n

    def validate(self, task, config) -> None:
        o = self.opt
        self._check_timesteps(task)
        if o.gan_generator_weight > 0:
            if not task.has_real_images:
                raise ValueError(f"gan_generator_weight > 0 needs real images, which the {task.name} task was "
                                 "not given: add a folder of images (--real-images FOLDER / real_images=...) or "
                                 "set gan_generator_weight to 0 for data-free training")
            if task.feature_shape[0] <= 0:
                raise ValueError(f"gan_generator_weight > 0: the {task.name} task's network exposes no "
                                 "bottleneck features for the discriminator head; set gan_generator_weight to 0")

    def setup(self, roles, task, config):
        if self.opt.gan_generator_weight <= 0:
            return {}
        from .methods.gan import DiscriminatorHead

        channels, spatial = task.feature_shape
        self.head = DiscriminatorHead(channels, spatial).to(task.device)
        return {"critic": list(self.head.parameters())}  # trained with the critic

    def student_sigmas(self, schedule) -> torch.Tensor:
        """The student's conditioning levels (no final 0)."""
        return timesteps_to_sigmas(schedule, self.opt.student_timesteps)[:-1]
