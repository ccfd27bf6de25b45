"""Tasks: what is being distilled (the network, its teacher, its prompts) and how progress is shown.

A task gives the loop a base network (a DiffusionModel with trainable modules), the teacher (None: the
base with adapters off), random conditioning batches, optional real images, and a preview renderer.
DistillTask and the diffusers UNet task live here; the offline worlds' tasks (Gaussian mixture, tiny
image world) are in worlds/tasks.py, the ComfyUI checkpoint task in comfy_backend.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.models import DiffusionModel, map_cond


class DistillTask:
    name = "task"
    base: DiffusionModel
    teacher: DiffusionModel | None = None
    sample_shape: tuple = ()
    lora_targets: list | None = None
    image_bank = None  # the user's real images (real_images.ImageBank), when a folder was given
    feature_shape: tuple = (0, False)
    default_guidance = 1.0
    mixed_precision = "no"  # what TrainConfig's mixed_precision="auto" becomes: the weights' own dtype
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
