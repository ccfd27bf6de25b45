"""SiD: Score identity Distillation, data-free, with long-and-short guidance and Zero- / Anti-CFG.

Generator loss (Zhou et al. 2024, Eq. 9; SiD-LSG for text-to-image; few-step SiD 2025):

    x = G(z),  x_t = a_t x + s_t eps                                   (x keeps its graph)
    f_r = teacher(x_t; CFG kappa_4),   f_f = fake(x_t; CFG kappa_2)      (weights frozen, activations not)
    L_G = (f_r - f_f) . ((f_r - x) - alpha (f_r - f_f)) / mean_per_sample |x - f_r|

with alpha = 1.2 for EDM-style models and 1.0 for Stable Diffusion. Unlike DMD2, the gradient flows
*through* the teacher's and the fake score's forward passes, which is why SiD needs the most memory of
the three methods (gradient checkpointing on both passes helps). The fake score is trained by denoising
the detached generator samples, itself guided with kappa_1: 1:1 with the generator as in SiD-LSG, or
`update_ratio` fake-score updates per generator update (a better-converged critic gives steadier mode weights).

Guidance modes:
* "lsg" (long and short guidance): kappa on the teacher (kappa_4) and on the fake score (kappa_1 = kappa_2).
* "zero_cfg": no guidance on the teacher, and the fake score never sees the text (unconditional).
* "anti_cfg": the fake score is evaluated with negative guidance (kappa_2 = -kappa).
On a guidance-distilled teacher (Flux-dev-class) each kappa is the guidance input of that call (one pass, see
core/models.py), for the teacher and the fake score alike; anti_cfg has no meaning there and is refused.

With real images, gan_generator_weight > 0 adds few-step SiD's diffusion-GAN term (gan.py) on the critic's
features.

Few-step: the generator's outputs after every number of steps 1..N are pushed to the data distribution
together (a uniform mixture, drawn per iteration with backward simulation, see generator.py), or, with
exit_step="last", only the N-step output (see GeneratorMethod.exit_index for why that can matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.models import map_cond
from ..engine import StepContext
from ..generator import (GeneratorMethod, exit_step_option, gan_critic_weight_option, gan_generator_weight_option,
                         student_generate, student_timesteps_option)
from ..registry import check, option, register
from .gan import critic_gan_loss, generator_gan_loss

GUIDANCE_MODES = ("lsg", "zero_cfg", "anti_cfg")


@dataclass
class SiDOptions:
    student_timesteps: list = student_timesteps_option()
    exit_step: str = exit_step_option()
    alpha: float = option(1.0, min=0.01, max=2.0,
                          help="SiD's alpha: 1.0 for Stable Diffusion, 1.2 for EDM-style models")
    guidance_mode: str = option("lsg", choices=GUIDANCE_MODES,
                                help="lsg: long-and-short guidance (kappa on teacher and fake score); zero_cfg: "
                                     "no guidance, text-free fake score; anti_cfg: the fake score anti-guided")
    kappa: float = option(1.5, min=0.0, max=100.0, aliases=("guidance",),
                          help="the guidance scale kappa (SiD-LSG: 1.5 best FID, 2 default, 4.5 best CLIP)")
    min_timestep: int = option(20, min=0, max=999, advanced=True,
                               help="lowest noise level of the score-identity loss (training timestep)")
    max_timestep: int = option(979, min=1, max=999, advanced=True,
                               help="highest noise level of the score-identity loss (training timestep)")
    prompt_dropout: float = option(0.1, min=0.0, max=1.0, advanced=True,
                                   help="share of the fake score's training prompts replaced by the empty "
                                        "prompt (it is evaluated with guidance)")
    update_ratio: int = option(1, min=1, max=100,
                               help="fake-score updates per generator update (SiD-LSG: 1; Self-Forcing's SiD: 5)")
    gan_generator_weight: float = gan_generator_weight_option()
    gan_critic_weight: float = gan_critic_weight_option()


@register("sid", options=SiDOptions, display_name="SiD", sampler="x0_renoise",
          description="Score identity distillation with long-and-short guidance (Zhou et al., 2024-2025): "
                      "data-free 1-4 step students; the gradient flows through the teacher and the fake score, "
                      "so it needs the most memory of the three.")
class SiD(GeneratorMethod):
    needs_critic = True

    def __init__(self, options: SiDOptions | None = None, **kwargs):
        self.opt = check(options or SiDOptions(**kwargs))
        self._parse_student_timesteps()

    def validate(self, task, config) -> None:
        super().validate(task, config)
        key = getattr(task.base, "guidance_input", None)
        if key is not None and self.opt.guidance_mode == "anti_cfg":
            raise ValueError(f"guidance_mode=anti_cfg: this teacher is guidance-distilled (its guidance is the "
                             f"{key!r} input, not CFG), so the fake score cannot be anti-guided: use lsg or zero_cfg")

    # kappa_1 (fake-score training), kappa_2 (fake-score evaluation), kappa_4 (teacher evaluation)
    @property
    def kappas(self) -> tuple[float, float, float]:
        k = self.opt.kappa
        if self.opt.guidance_mode == "lsg":
            return k, k, k
        if self.opt.guidance_mode == "zero_cfg":
            return 1.0, 1.0, 1.0
        return 1.0, -k, k  # anti_cfg: teacher guided, fake score anti-guided

    def phases(self, step: int) -> list[str]:
        # fake score first, so the generator is scored against a critic of its current samples
        return ["critic", "student"] if step % self.opt.update_ratio == 0 else ["critic"]

    def sampler_metadata(self) -> dict:
        return {"sampler": "x0_renoise", "timesteps": self.opt.student_timesteps, "cfg": 1.0,
                "guidance_mode": self.opt.guidance_mode, "kappa": self.opt.kappa}

    def _sigma(self, ctx: StepContext, batch: int) -> torch.Tensor:
        return ctx.sample_sigma(batch, self.opt.min_timestep, self.opt.max_timestep)

    def _fake(self, ctx, x_t, sigma, cond, uncond, scale):
        if self.opt.guidance_mode == "zero_cfg":
            return ctx.roles.critic(x_t, sigma, uncond)  # no text for the fake score
        return ctx.roles.critic(x_t, sigma, cond, uncond, scale)

    def loss(self, role: str, ctx: StepContext):
        k1, k2, k4 = self.kappas
        task = ctx.task
        b = ctx.batch
        schedule = ctx.roles.student.schedule
        sigmas = self.student_sigmas(schedule).to(ctx.device)
        if role == "critic":
            cond, uncond = task.conditioning(b, ctx.generator)
            noise = ctx.randn((b, *task.sample_shape))
            with torch.no_grad():
                x, _ = student_generate(ctx.roles.student, cond, sigmas, noise, ctx.generator,
                                        step_index=self.exit_index(sigmas), grad=False)
            sigma = self._sigma(ctx, b)
            x_t = schedule.add_noise(x, ctx.randn(x.shape, dtype=x.dtype), sigma)
            sample_cond = cond
            if k1 != 1.0 and self.opt.prompt_dropout > 0 and self.opt.guidance_mode != "zero_cfg":
                drop = ctx.rand((b,)) < self.opt.prompt_dropout
                cond = map_cond(lambda u, c: torch.where(drop.reshape(-1, *([1] * (c.ndim - 1))),
                                                          u.expand_as(c), c), uncond, cond)
            pred = self._fake(ctx, x_t, sigma, cond, uncond, k1)
            native = schedule.prediction_type if schedule.prediction_type != "sample" else "epsilon"
            pred_native = schedule.from_x0(pred, x_t, sigma, native)
            target = schedule.from_x0(x, x_t, sigma, native)
            loss = ((pred_native.float() - target.float()) ** 2).mean()
            metrics = {"denoise/critic": loss.item()}
            if self.head is not None:
                gan = critic_gan_loss(self.head, ctx, x, sample_cond)
                loss = loss + self.opt.gan_critic_weight * gan
                metrics["gan/critic"] = float(gan.detach())
            return loss, metrics

        cond, uncond = task.conditioning(b, ctx.generator)
        noise = ctx.randn((b, *task.sample_shape))
        x, _ = student_generate(ctx.roles.student, cond, sigmas, noise, ctx.generator,
                                step_index=self.exit_index(sigmas), grad=True)
        sigma = self._sigma(ctx, b)
        x_t = schedule.add_noise(x, ctx.randn(x.shape, dtype=x.dtype), sigma)
        f_real = ctx.roles.teacher(x_t, sigma, cond, uncond, k4)
        f_fake = self._fake(ctx, x_t, sigma, cond, uncond, k2)
        dims = list(range(1, x.ndim))
        with torch.no_grad():
            weight = (x - f_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
        diff = f_real - f_fake
        per_elem = diff * ((f_real - x) - self.opt.alpha * diff) / weight
        loss = torch.nan_to_num(per_elem.float()).mean()
        metrics = {"score_gap": diff.detach().abs().mean().item()}
        if self.head is not None:  # the diffusion-GAN term on the same (mixture of) step outputs
            gan = generator_gan_loss(self.head, ctx, x, cond)
            loss = loss + self.opt.gan_generator_weight * gan
            metrics["gan/student"] = float(gan.detach())
        return loss, metrics

