"""The offline worlds as distillation tasks: the Gaussian mixture (exact teacher, MLP student) and the
tiny image world (a class-conditional 16x16 digits UNet). Built by api.make_task("gmm" / "digits").
"""

from __future__ import annotations

import torch

from ..core.schedules import DiscreteVPSchedule
from ..trainers.tasks import DiffusersUNetTask, DistillTask


class GaussianMixtureTask(DistillTask):
    """Distil the exact mixture teacher into an MLP student (the critic is an MLP too)."""

    name = "gmm"
    has_real_images = True
    default_guidance = 1.0

    def __init__(self, mixture=None, schedule=None, width: int = 256, fit_steps: int = 2000, seed: int = 0,
                 depth: int = 3):
        from .gmm import GaussianMixture, GaussianMixtureTeacher
        from .mlp import MLPDenoiser, fit_to_teacher

        self.mixture = mixture or GaussianMixture.default()
        schedule = schedule or DiscreteVPSchedule.sd15()
        self.teacher = GaussianMixtureTeacher(self.mixture, schedule)
        torch.manual_seed(seed)
        self.base = MLPDenoiser(schedule, self.mixture.dim, self.mixture.num_classes + 1, width=width, depth=depth)
        self.fit_losses = fit_to_teacher(self.base, self.teacher, steps=fit_steps, seed=seed)
        self.sample_shape = (self.mixture.dim,)
        self.lora_targets = ["inp", *(f"hidden.{i}" for i in range(depth)), "out"]
        self.feature_shape = (width, False)

    def conditioning(self, batch, generator):
        labels = torch.randint(0, self.mixture.num_classes, (batch,), generator=generator).to(self.device)
        return labels, torch.full_like(labels, self.mixture.null_label)

    def real_images(self, batch, generator):
        labels = torch.randint(0, self.mixture.num_classes, (batch,), generator=generator)
        x0, _ = self.mixture.sample(labels, generator)
        return x0.float().to(self.device), labels.to(self.device)

    def preview(self, student, sigmas, generator, path):
        from .plots import scatter_png

        labels = torch.arange(self.mixture.num_classes).repeat_interleave(250).to(self.device)
        noise = torch.randn(len(labels), self.mixture.dim, generator=generator).to(self.device)
        from ..trainers.generator import student_sample

        x = student_sample(student, labels, sigmas.to(self.device), noise, generator)
        truth, _ = self.mixture.sample(labels.cpu(), generator)
        scatter_png(path, [("truth", truth, labels), ("student", x, labels)])


class DigitsTask(DiffusersUNetTask):
    """The tiny image world: a class-conditional 16x16 digits UNet with a learned 'text encoder'."""

    name = "digits"
    has_real_images = True  # the digits' training split

    def __init__(self, guidance: float | None = None, prompts: list[str] | None = None):
        from . import digits

        self.labels = torch.arange(10)
        if prompts is not None:  # a prompt here is a digit, e.g. "3" or "digit 3"
            try:
                self.labels = torch.tensor([int(p.split()[-1]) for p in prompts])
            except ValueError:
                raise ValueError("prompts: the digits world takes prompts that end in a digit 0-9, e.g. '3'")
            if bool(((self.labels < 0) | (self.labels > 9)).any()):
                raise ValueError("prompts: the digits world only knows the digits 0-9")

        unet, text_encoder = digits.load_teacher()
        self.digits = digits
        self.text_encoder = text_encoder.requires_grad_(False)
        schedule = DiscreteVPSchedule.sd15(unet.config.get("prediction_type", "epsilon")
                                           if isinstance(unet.config, dict) else "epsilon")
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        super().__init__(unet, schedule, shape, self._encode,
                         default_guidance=guidance if guidance is not None else digits.DEFAULT_GUIDANCE)

    def to(self, device):
        super().to(device)
        self.text_encoder.to(device)
        return self

    def _labels_to_cond(self, labels):
        with torch.no_grad():
            cond = self.digits.encode_labels(self.text_encoder, labels.to(self.device))
            null = torch.full_like(labels, self.digits.NULL_LABEL)
            uncond = self.digits.encode_labels(self.text_encoder, null.to(self.device))
        return cond, uncond

    def _encode(self, batch, generator):
        labels = self.labels[torch.randint(0, len(self.labels), (batch,), generator=generator)]
        return self._labels_to_cond(labels)

    def real_images(self, batch, generator):
        images, labels = self.digits.load_digits_16("train")
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        cond, _ = self._labels_to_cond(labels[idx])
        return images[idx].to(self.device), cond

    def preview(self, student, sigmas, generator, path):
        from ..trainers.generator import student_sample

        labels = torch.arange(10).repeat(4)
        cond, _ = self._labels_to_cond(labels)
        noise = torch.randn((len(labels), *self.sample_shape), generator=generator).to(self.device)
        x = student_sample(student, cond, sigmas.to(self.device), noise, generator)
        self.digits.image_grid(x.cpu(), nrow=10).save(path)
