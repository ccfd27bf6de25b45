"""Tasks: what is being distilled (the network, its teacher, its prompts) and how progress is shown.

A task gives the loop a base network (a DiffusionModel with trainable modules), the teacher (None: the
base with adapters off), random conditioning batches, optional real images, and a preview renderer.
The Gaussian-mixture task and the tiny image world are the offline tasks; diffusers and ComfyUI models
plug in the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.models import DiffusionModel, map_cond
from ..core.schedules import DiscreteVPSchedule


class DistillTask:
    name = "task"
    base: DiffusionModel
    teacher: DiffusionModel | None = None
    sample_shape: tuple = ()
    lora_targets: list | None = None
    image_bank = None  # the user's real images (real_images.ImageBank), when a folder was given
    feature_shape: tuple = (0, False)
    default_guidance = 1.0
    device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        self.base.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def enable_gradient_checkpointing(self) -> None:
        pass

    def conditioning(self, batch: int, generator: torch.Generator):
        """(cond, uncond) for a random batch of prompts."""
        raise NotImplementedError

    @property
    def has_real_images(self) -> bool:
        return self.image_bank is not None

    def real_images(self, batch: int, generator: torch.Generator):
        """(x0, cond) real data: the GAN term's, and TCD's instead of teacher samples."""
        if self.image_bank is None:
            raise ValueError(f"the {self.name} task has no real images (give a folder of images)")
        x0, cond = self.image_bank(batch, generator)
        return x0.to(self.device), map_cond(lambda c: c.to(self.device), cond)

    def preview(self, student: DiffusionModel, sigmas: torch.Tensor, generator: torch.Generator, path: Path):
        pass

    def describe(self) -> dict:
        return {"task": self.name}

    def export_lora(self, adapter: str = "student") -> dict:
        """The adapter in peft's key format (`<module>.lora_A.weight`, scale folded into lora_B); image
        tasks override this with the kohya format that ComfyUI loads."""
        from .lora import lora_state_dict

        return lora_state_dict(self.base, adapter)


class GaussianMixtureTask(DistillTask):
    """Distil the exact mixture teacher into an MLP student (the critic is an MLP too)."""

    name = "gmm"
    has_real_images = True
    default_guidance = 1.0

    def __init__(self, mixture=None, schedule=None, width: int = 256, fit_steps: int = 2000, seed: int = 0):
        from ..worlds.gmm import GaussianMixture, GaussianMixtureTeacher
        from ..worlds.mlp import MLPDenoiser, fit_to_teacher

        self.mixture = mixture or GaussianMixture.default()
        schedule = schedule or DiscreteVPSchedule.sd15()
        self.teacher = GaussianMixtureTeacher(self.mixture, schedule)
        torch.manual_seed(seed)
        self.base = MLPDenoiser(schedule, self.mixture.dim, self.mixture.num_classes + 1, width=width)
        self.fit_losses = fit_to_teacher(self.base, self.teacher, steps=fit_steps, seed=seed)
        self.sample_shape = (self.mixture.dim,)
        self.lora_targets = MLPDenoiser.lora_targets
        self.feature_shape = (width, False)

    def conditioning(self, batch, generator):
        labels = torch.randint(0, self.mixture.num_classes, (batch,), generator=generator).to(self.device)
        return labels, torch.full_like(labels, self.mixture.null_label)

    def real_images(self, batch, generator):
        labels = torch.randint(0, self.mixture.num_classes, (batch,), generator=generator)
        x0, _ = self.mixture.sample(labels, generator)
        return x0.float().to(self.device), labels.to(self.device)

    def preview(self, student, sigmas, generator, path):
        from ..worlds.plots import scatter_png

        labels = torch.arange(self.mixture.num_classes).repeat_interleave(250).to(self.device)
        noise = torch.randn(len(labels), self.mixture.dim, generator=generator).to(self.device)
        from .generator import student_sample

        x = student_sample(student, labels, sigmas.to(self.device), noise, generator)
        truth, _ = self.mixture.sample(labels.cpu(), generator)
        scatter_png(path, [("truth", truth, labels), ("student", x, labels)])


class DiffusersUNetTask(DistillTask):
    """A diffusers UNet2DConditionModel teacher (SD1.5-class or the tiny image world).

    The teacher is the base with adapters off; conditioning comes from `prompt_encoder(batch, generator)`
    which returns (cond, uncond) embeddings, so text encoders run once per batch and can live elsewhere.
    """

    name = "diffusers-unet"

    def __init__(self, unet, schedule, sample_shape, prompt_encoder, default_guidance: float = 1.0):
        from ..core.models import DiffusersUNetModel
        from .lora import UNET_TARGET_MODULES

        self.base = DiffusersUNetModel(unet, schedule)
        self.teacher = None
        self.sample_shape = tuple(sample_shape)
        self.prompt_encoder = prompt_encoder
        self.lora_targets = UNET_TARGET_MODULES
        self.default_guidance = default_guidance
        channels = unet.config.block_out_channels[-1]
        self.feature_shape = (channels, True)

    def enable_gradient_checkpointing(self):
        from .lora import role_preserving_checkpoint_func

        self.base.unet.enable_gradient_checkpointing(role_preserving_checkpoint_func())

    def conditioning(self, batch, generator):
        cond, uncond = self.prompt_encoder(batch, generator)
        return cond.to(self.device), uncond.to(self.device)

    def export_lora(self, adapter: str = "student") -> dict:
        """The student as a kohya-format state dict (ComfyUI, A1111, kohya, diffusers all load it)."""
        from .lora import kohya_unet_state_dict

        return kohya_unet_state_dict(self.base.unet, adapter)


class DigitsTask(DiffusersUNetTask):
    """The tiny image world: a class-conditional 16x16 digits UNet with a learned 'text encoder'."""

    name = "digits"
    has_real_images = True  # the digits' training split

    def __init__(self, guidance: float | None = None, prompts: list[str] | None = None):
        from ..worlds import digits

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
        from .generator import student_sample

        labels = torch.arange(10).repeat(4)
        cond, _ = self._labels_to_cond(labels)
        noise = torch.randn((len(labels), *self.sample_shape), generator=generator).to(self.device)
        x = student_sample(student, cond, sigmas.to(self.device), noise, generator)
        self.digits.image_grid(x.cpu(), nrow=10).save(path)
