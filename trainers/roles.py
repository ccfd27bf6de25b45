"""Roles (teacher, student, critic) as views of one model.

A role is a :class:`DiffusionModel`, so methods call `roles.student(x, sigma, cond)` and never care
whether the student is an adapter on a shared base or a separate network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
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


class PhasedStudent(DiffusionModel):
    """Phased DMD's student: K experts (adapter views of one base, or whole copies in full mode), the expert of
    each sample's noise level answering; expert k owns the levels (s_{k+1}, s_k], the boundaries
    s_1 > ... > s_{K-1} as in sampling/phased.py."""

    def __init__(self, experts: list[DiffusionModel], boundaries: list[float]):
        from ..sampling.phased import check_boundaries

        super().__init__(experts[0].schedule)
        self.experts = nn.ModuleList(experts)
        self.boundaries = check_boundaries(boundaries, len(experts))

    @property
    def guidance_input(self) -> str | None:
        return self.experts[0].guidance_input

    def predict_x0(self, x, sigma, cond):
        from ..core.models import map_cond
        from ..sampling.phased import expert_indices

        index = expert_indices(sigma, self.boundaries)
        first = int(index[0])
        if bool((index == first).all()):
            return self.experts[first].predict_x0(x, sigma, cond)
        outputs, order = [], []
        for k in index.unique().tolist():  # a batch across a boundary: each expert on its own rows
            rows = (index == k).nonzero().squeeze(1)
            part = map_cond(lambda c: c[rows] if c.ndim and c.shape[0] == len(x) else c, cond)
            outputs.append(self.experts[k].predict_x0(x[rows], sigma[rows], part))
            order.append(rows)
        return torch.cat(outputs)[torch.argsort(torch.cat(order))]


@dataclass
class Roles:
    teacher: DiffusionModel
    student: DiffusionModel
    critic: DiffusionModel | None
    trainable: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    base: DiffusionModel | None = None  # the shared network (LoRA mode)
    mode: str = "lora"
    experts: list = field(default_factory=list)  # the student's models, one per student adapter
    critics: list = field(default_factory=list)  # the critic's models, one per critic adapter (critic first)

    def get(self, name: str) -> DiffusionModel:
        return getattr(self, name)


def build_roles(base: DiffusionModel, teacher: DiffusionModel | None, *, with_critic: bool,
                full_finetune: bool = False, rank: int = 64, alpha: float | None = None,
                critic_rank: int | None = None, target_modules=None,
                student_adapters: tuple | list = ("student",), critic_adapters: tuple | list = ("critic",)) -> Roles:
    """Wire the roles.

    LoRA mode (default): the student and the critic are adapters on `base`, whose own weights stay
    frozen; the teacher is `teacher` if given (e.g. the analytic mixture) else `base` with adapters off.
    Full mode (small models): the student and the critic are trainable copies of `base`.
    student_adapters: the student's adapter names; several (Phased DMD's experts) are one role whose
    parameters are all of theirs (in full mode, one copy each), in `Roles.experts`; the student is the first
    until the method wires its own view. critic_adapters: likewise the critic's (DMD2's critic per student
    step), in `Roles.critics`; `Roles.critic` is the first.
    """
    for p in base.parameters():
        p.requires_grad_(False)
    if full_finetune:
        experts = [copy.deepcopy(base) for _ in student_adapters]
        critics = [copy.deepcopy(base) for _ in critic_adapters] if with_critic else []
        trainable = {"student": [p for expert in experts for p in expert.parameters()]}
        if critics:
            trainable["critic"] = [p for critic in critics for p in critic.parameters()]
        for params in trainable.values():
            for p in params:
                p.requires_grad_(True)
        return Roles(teacher or base, experts[0], critics[0] if critics else None, trainable, base=None,
                     mode="full", experts=experts, critics=critics)

    trainable = {"student": []}
    for name in student_adapters:
        lora.add_lora_adapter(base, name, rank, alpha, target_modules)
        trainable["student"] += lora.adapter_parameters(base, name)
    critics = []
    if with_critic:
        trainable["critic"] = []
        for name in critic_adapters:
            lora.add_lora_adapter(base, name, critic_rank or rank, alpha, target_modules)
            trainable["critic"] += lora.adapter_parameters(base, name)
            critics.append(AdapterView(base, name))
    experts = [AdapterView(base, name) for name in student_adapters]
    return Roles(teacher or AdapterView(base, None), experts[0], critics[0] if critics else None, trainable,
                 base=base, mode="lora", experts=experts, critics=critics)
