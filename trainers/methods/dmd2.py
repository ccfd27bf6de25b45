"""DMD2: distribution matching distillation with a two-time-scale critic (Yin et al., 2024).

Student G maps noise to x0. Its gradient is the difference of two scores at a random noise level t:

    x_t = a_t x + s_t eps,        x = G(z)                          (diffuse the student's sample)
    grad = (x0_fake(x_t) - x0_real^cfg(x_t)) / mean_per_sample |x - x0_real^cfg(x_t)|      (DMD Eq. 7-8)
    L_G  = 0.5 * || x - stopgrad(x - grad) ||^2                     (so dL/dx = grad)

x0_real^cfg is the teacher with classifier-free guidance, x0_fake the critic ("fake score"), both without
gradients. The critic is trained every iteration on detached student samples with the plain denoising
loss in the model's own parameterisation (epsilon for SD, flow velocity for flow models); the student
updates once every `update_ratio` iterations (TTUR). Multi-step students train on their conditioning
timesteps with backward simulation (generator.py).

Options: a GAN head on the critic's bottleneck features with real images (DMD2 Sec. 4.3, diffusion-GAN:
real and fake inputs noised at t ~ U[0, T)); and Decoupled-DMD's separate noise levels for the
CFG-augmentation term (teacher cond - uncond) and the distribution-matching term (teacher cond - critic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine import StepContext
from ..generator import (GeneratorMethod, exit_step_option, gan_critic_weight_option, gan_generator_weight_option,
                         student_chain, student_generate, student_timesteps_option)
from ...sampling.api import initial_state
from ..registry import check, option, register
from ..teacher_samples import TeacherSamples
from .gan import critic_gan_loss, generator_gan_loss


# --- the options DMD2 shares with the methods built on it (phased_dmd.py declares the same fields) ----------
def guidance_scale_option():
    return option(4.5, min=0.0, max=100.0, aliases=("guidance",),
                  help="teacher CFG scale in the distribution-matching loss, baked into the "
                       "student (DMD2: 1.75 SD1.5, 8 SDXL; 1 = no guidance)")


def update_ratio_option():
    return option(5, min=1, max=100, help="critic (fake-score) updates per student update (DMD2: 5-10)")


def min_timestep_option():
    return option(20, min=0, max=999, advanced=True,
                  help="lowest noise level of the DM loss (training timestep; DMD2: 0.02 T)")


def max_timestep_option():
    return option(980, min=1, max=999, advanced=True,
                  help="highest noise level of the DM loss (training timestep; DMD2: 0.98 T)")


def regression_weight_option():
    return option(0.0, min=0.0, max=100.0,
                  help="DMD's regression loss (Yin et al., 2023): the student's first step from a noise is pulled "
                       "(L2) to the guided teacher's own sample from the same noise; it anchors the teacher's "
                       "noise-to-image layout and with it the teacher's diversity (0 = off)")


def regression_pairs_option():
    return option(256, min=1, max=1_000_000, advanced=True,
                  help="teacher noise -> sample pairs of the regression loss, made one batch at a time during the "
                       "first student updates until there are this many, and kept with the checkpoints")


def regression_steps_option():
    return option(25, min=1, max=1000, advanced=True, help="DDIM steps of the guided teacher for each regression pair")


@dataclass
class DMD2Options:
    student_timesteps: list = student_timesteps_option()
    exit_step: str = exit_step_option()
    guidance_scale: float = guidance_scale_option()
    update_ratio: int = update_ratio_option()
    min_timestep: int = min_timestep_option()
    max_timestep: int = max_timestep_option()
    gan_generator_weight: float = gan_generator_weight_option()
    gan_critic_weight: float = gan_critic_weight_option()
    decoupled: bool = option(False, advanced=True,
                             help="Decoupled-DMD: the CFG-augmentation term at its own noise levels")
    ca_min_timestep: int = option(500, min=0, max=999, advanced=True,
                                  help="Decoupled-DMD: lowest noise level of the CFG-augmentation term")
    ca_max_timestep: int = option(980, min=1, max=999, advanced=True,
                                  help="Decoupled-DMD: highest noise level of the CFG-augmentation term")
    regression_weight: float = regression_weight_option()
    regression_pairs: int = regression_pairs_option()
    regression_steps: int = regression_steps_option()
    critic_per_step: bool = option(
        False, help="with exit_step=uniform: one critic (fake score) per student step, each learning only its "
                    "step's outputs, so every step's output is matched to the data on its own and not only their "
                    "mixture (one critic adapter per step: that many times the critic's memory and updates)")


@register("dmd2", options=DMD2Options, display_name="DMD2", sampler="x0_renoise", default=True,
          description="Distribution matching distillation with a two-time-scale critic (Yin et al., 2024): "
                      "1-4 step students, the best quality per step; the critic is a second LoRA on the "
                      "same frozen base.")
class DMD2(GeneratorMethod):
    needs_critic = True

    def __init__(self, options: DMD2Options | None = None, **kwargs):
        self.opt = check(options or DMD2Options(**kwargs))
        self._parse_student_timesteps()
        o = self.opt
        if o.critic_per_step and o.exit_step != "uniform":
            raise ValueError(f"critic_per_step=True: only exit_step=uniform trains every step (exit_step="
                             f"{o.exit_step} trains one); set exit_step=uniform or critic_per_step=False")
        if o.critic_per_step and o.gan_generator_weight > 0:
            raise ValueError("critic_per_step=True: the GAN term's discriminator reads one critic; set "
                             "gan_generator_weight=0 or critic_per_step=False")
        self.pairs = TeacherSamples(self.opt.regression_pairs, self.opt.regression_steps)

    # --- checks before any work ---------------------------------------------------------------------
    def validate(self, task, config) -> None:
        super().validate(task, config)
        o = self.opt
        if o.decoupled and not o.ca_min_timestep < o.ca_max_timestep < task.base.schedule.num_train_timesteps:
            raise ValueError(f"ca_min_timestep/ca_max_timestep={o.ca_min_timestep}/{o.ca_max_timestep}: need "
                             f"min < max < {task.base.schedule.num_train_timesteps}")

    # --- schedule -----------------------------------------------------------------------------------
    def phases(self, step: int) -> list[str]:
        return ["student", "critic"] if step % self.opt.update_ratio == 0 else ["critic"]

    def sampler_metadata(self) -> dict:
        return {"sampler": "x0_renoise", "timesteps": self.opt.student_timesteps, "cfg": 1.0}

    def critic_adapters(self) -> list[str]:
        if not self.opt.critic_per_step:
            return ["critic"]
        return ["critic"] + [f"critic_step{k + 1}" for k in range(1, len(self.opt.student_timesteps))]

    # --- helpers --------------------------------------------------------------------------------------
    def _sample_sigma(self, ctx: StepContext, batch: int, lo: int, hi: int) -> torch.Tensor:
        return ctx.sample_sigma(batch, lo, hi)

    def _generate(self, ctx: StepContext, grad: bool):
        task = ctx.task
        cond, uncond = task.conditioning(ctx.batch, ctx.generator)
        noise = ctx.randn((ctx.batch, *task.sample_shape))
        sigmas = self.student_sigmas(ctx.roles.student.schedule).to(ctx.device)
        x, exit_step = student_generate(ctx.roles.student, cond, sigmas, noise, ctx.generator,
                                        step_index=self.exit_index(sigmas), grad=grad)
        ctx.cache.update(x=x.detach(), cond=cond, uncond=uncond, exit_step=exit_step)
        return x, cond, uncond

    def _diffuse(self, ctx, x, sigma):
        noise = ctx.randn(x.shape, dtype=x.dtype)
        return ctx.roles.student.schedule.add_noise(x, noise, sigma), noise

    # --- losses ---------------------------------------------------------------------------------------
    def loss(self, role: str, ctx: StepContext):
        return self._student_loss(ctx) if role == "student" else self._critic_loss(ctx)

    def _student_loss(self, ctx: StepContext):
        o = self.opt
        x, cond, uncond = self._generate(ctx, grad=True)
        b = x.shape[0]
        dims = list(range(1, x.ndim))
        teacher = ctx.roles.teacher
        critic = ctx.roles.critics[ctx.cache["exit_step"]] if o.critic_per_step else ctx.roles.critic
        with torch.no_grad():
            sigma = self._sample_sigma(ctx, b, o.min_timestep, o.max_timestep)
            x_t, _ = self._diffuse(ctx, x.detach(), sigma)
            x0_fake = critic(x_t, sigma, cond)
            if not o.decoupled:
                x0_real = teacher(x_t, sigma, cond, uncond, o.guidance_scale)
                norm = (x.detach() - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
                grad = (x0_fake - x0_real) / norm
            else:  # Decoupled-DMD: DM term at sigma, CFG-augmentation term at its own level
                x0_cond = teacher(x_t, sigma, cond)
                norm = (x.detach() - x0_cond).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
                grad = (x0_fake - x0_cond) / norm
                sigma_ca = self._sample_sigma(ctx, b, o.ca_min_timestep, o.ca_max_timestep)
                x_ca, _ = self._diffuse(ctx, x.detach(), sigma_ca)
                # guided - cond: (w - 1)(cond - uncond) for a CFG teacher, the guidance input's effect for a
                # guidance-distilled one
                ca_cond, ca_guided = teacher.cond_and_guided(x_ca, sigma_ca, cond, uncond, o.guidance_scale)
                norm_ca = (x.detach() - ca_cond).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
                grad = grad - (ca_guided - ca_cond) / norm_ca
            grad = torch.nan_to_num(grad)
        loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        metrics = {"dm_grad_norm": float(grad.norm() / b ** 0.5)}
        if self.head is not None:
            gan = generator_gan_loss(self.head, ctx, x, cond)
            loss = loss + o.gan_generator_weight * gan
            metrics["gan/student"] = float(gan.detach())
        if o.regression_weight > 0:
            reg = self._regression_loss(ctx)
            loss = loss + o.regression_weight * reg
            metrics["regression"] = float(reg.detach())
        return loss, metrics

    def _regression_loss(self, ctx: StepContext) -> torch.Tensor:
        """DMD's regression term (Yin et al., 2023, Eq. 9, with L2 for LPIPS): the mean squared distance between
        the student's first step from a stored noise z and the guided teacher's deterministic sample from z.
        Distribution matching alone is mode-seeking; the pairs pin which noise goes to which sample."""
        self.pairs.grow(ctx, self.opt.guidance_scale)
        noise, target, cond = self.pairs.draw(ctx, ctx.batch)
        student = ctx.roles.student
        sigma0 = self.student_sigmas(student.schedule)[0].to(ctx.device)
        x = initial_state(student, noise, float(sigma0))
        x0 = student(x, sigma0.expand(noise.shape[0]), cond)
        return F.mse_loss(x0.float(), target.float())

    def state_dict(self) -> dict:  # the regression pairs, so a resume continues on the same pairs
        return {"regression_pairs": self.pairs.state_dict()} if len(self.pairs) else {}

    def load_state_dict(self, state: dict) -> None:
        self.pairs.load_state_dict(state.get("regression_pairs", {}))

    def _critic_loss(self, ctx: StepContext):
        o = self.opt
        if o.critic_per_step:
            return self._critic_per_step_loss(ctx)
        if "x" not in ctx.cache:
            with torch.no_grad():
                self._generate(ctx, grad=False)
        x, cond = ctx.cache["x"], ctx.cache["cond"]
        b = x.shape[0]
        schedule = ctx.roles.critic.schedule
        sigma = self._sample_sigma(ctx, b, 0, schedule.num_train_timesteps - 1)
        x_t, noise = self._diffuse(ctx, x, sigma)
        native = schedule.prediction_type if schedule.prediction_type != "sample" else "epsilon"
        pred = ctx.roles.critic(x_t, sigma, cond, output=native)
        target = schedule.from_x0(x, x_t, sigma, native)
        loss = F.mse_loss(pred.float(), target.float())
        metrics = {"denoise/critic": loss.item()}
        if self.head is not None:
            cls = critic_gan_loss(self.head, ctx, x, cond)
            loss = loss + o.gan_critic_weight * cls
            metrics["gan/critic"] = float(cls.detach())
        return loss, metrics

    def _critic_per_step_loss(self, ctx: StepContext):
        """Critic k learns the outputs of student step k (denoising score matching on them, as `_critic_loss`),
        all K from one no-grad chain: every critic sees fresh samples of its own step at each update."""
        task, student = ctx.task, ctx.roles.student
        schedule = student.schedule
        cond, _ = task.conditioning(ctx.batch, ctx.generator)
        noise = ctx.randn((ctx.batch, *task.sample_shape))
        sigmas = self.student_sigmas(schedule).to(ctx.device)
        with torch.no_grad():
            outputs = student_chain(student, cond, sigmas, noise, ctx.randn)
        b = noise.shape[0]
        native = schedule.prediction_type if schedule.prediction_type != "sample" else "epsilon"
        loss = 0.0
        for critic, x in zip(ctx.roles.critics, outputs):
            sigma = self._sample_sigma(ctx, b, 0, schedule.num_train_timesteps - 1)
            x_t, _ = self._diffuse(ctx, x, sigma)
            pred = critic(x_t, sigma, cond, output=native)
            loss = loss + F.mse_loss(pred.float(), schedule.from_x0(x, x_t, sigma, native).float())
        return loss, {"denoise/critic": float(loss.detach()) / len(outputs)}
