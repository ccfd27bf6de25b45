"""Roles (teacher, student, critic) as views of one model.

A role is a :class:`DiffusionModel`, so methods call `roles.student(x, sigma, cond)` and never care
whether the student is an adapter on a shared base or a separate network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ..core.models import DiffusionModel
from . import lora


class AdapterView(DiffusionModel):
    """The base model with one adapter active (None: adapters off)."""

    def __init__(self, base: DiffusionModel, adapter: str | None):
        super().__init__(base.schedule)
        self.__dict__["base"] = base  # a view: not registered as a submodule (no duplicated parameters)
        self.adapter = adapter

    @property
    def guidance_input(self) -> str | None:  # the shared network's, whatever the adapter
        return self.base.guidance_input

    def predict_x0(self, x, sigma, cond):
        with lora.role(self.base, self.adapter):
            return self.base.predict_x0(x, sigma, cond)

    def features(self, *args, **kwargs):
        with lora.role(self.base, self.adapter):
            return self.base.features(*args, **kwargs)


@dataclass
class Roles:
    teacher: DiffusionModel
    student: DiffusionModel
    critic: DiffusionModel | None
    trainable: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    base: DiffusionModel | None = None  # the shared network (LoRA mode)
    mode: str = "lora"

    def get(self, name: str) -> DiffusionModel:
        return getattr(self, name)


def build_roles(base: DiffusionModel, teacher: DiffusionModel | None, *, with_critic: bool,
                full_finetune: bool = False, rank: int = 64, alpha: float | None = None,
                critic_rank: int | None = None, target_modules=None) -> Roles:
    """Wire the roles.

    LoRA mode (default): the student and the critic are adapters on `base`, whose own weights stay
    frozen; the teacher is `teacher` if given (e.g. the analytic mixture) else `base` with adapters off.
    Full mode (small models): the student and the critic are trainable copies of `base`.
    """
    for p in base.parameters():
        p.requires_grad_(False)
    if full_finetune:
        student = copy.deepcopy(base)
        critic = copy.deepcopy(base) if with_critic else None
        trainable = {"student": list(student.parameters())}
        if critic is not None:
            trainable["critic"] = list(critic.parameters())
        for params in trainable.values():
            for p in params:
                p.requires_grad_(True)
        return Roles(teacher or base, student, critic, trainable, base=None, mode="full")

    lora.add_lora_adapter(base, "student", rank, alpha, target_modules)
    trainable = {"student": lora.adapter_parameters(base, "student")}
    critic = None
    if with_critic:
        lora.add_lora_adapter(base, "critic", critic_rank or rank, alpha, target_modules)
        trainable["critic"] = lora.adapter_parameters(base, "critic")
        critic = AdapterView(base, "critic")
    return Roles(teacher or AdapterView(base, None), AdapterView(base, "student"), critic, trainable,
                 base=base, mode="lora")
