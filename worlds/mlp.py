"""A small MLP denoiser: the trainable network of the Gaussian-mixture world.

The analytic teacher has no weights to adapt, so the student and the critic start, as in DMD2, from a
network that imitates the teacher: this MLP, regressed onto the exact denoiser's epsilon at random noise
levels and labels (10% unconditional, so CFG works). `features` exposes the last hidden layer for a
discriminator head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.models import DiffusionModel
from ..core.schedules import NoiseSchedule


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


class MLPDenoiser(DiffusionModel):
    """MLP in the schedule's parameterisation: (x_in [B, d], timestep, label) -> eps / v / flow. Linear layers are LoRA targets."""

    lora_targets = ["inp", "hidden.0", "hidden.1", "hidden.2", "out"]

    def __init__(self, schedule: NoiseSchedule, dim: int, num_labels: int, width: int = 256, depth: int = 3):
        super().__init__(schedule)
        self.dim, self.width = dim, width
        self.label_emb = nn.Embedding(num_labels, width)
        self.time_mlp = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, dim)
        self.act = nn.SiLU()

    def _trunk(self, x_in, timestep, cond):
        h = self.inp(x_in.float()) + self.time_mlp(timestep_embedding(timestep, 64)) + self.label_emb(cond.long())
        for layer in self.hidden:
            h = h + layer(self.act(h))
        return self.act(h)

    def native(self, x_in, timestep, cond):
        return self.out(self._trunk(x_in, timestep, cond))

    def features(self, x, sigma, cond):
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return self._trunk(self.schedule.scale_model_input(x, sigma), self.schedule.timestep(sigma), cond)


def fit_to_teacher(net: MLPDenoiser, teacher: DiffusionModel, steps: int = 3000, batch: int = 512,
                   lr: float = 2e-3, seed: int = 0, null_label: int | None = None) -> list[float]:
    """Regress the MLP onto the exact teacher's epsilon (noise levels uniform in timestep)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mixture = teacher.mixture
    null = mixture.null_label if null_label is None else null_label
    losses = []
    schedule = net.schedule
    for _ in range(steps):
        labels = torch.randint(0, mixture.num_classes, (batch,), generator=g)
        x0, _ = mixture.sample(labels, generator=g)
        drop = torch.rand(batch, generator=g) < 0.1
        labels = torch.where(drop, torch.full_like(labels, null), labels)
        t = torch.randint(1, schedule.num_train_timesteps, (batch,), generator=g).double()  # t=0 is sigma=0 for flow
        sigma = schedule.sigma(t)
        x = schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), sigma)
        with torch.no_grad():
            target = teacher(x, sigma, labels, output=net.prediction_type).float()
        pred = net.native(schedule.scale_model_input(x, sigma).float(), schedule.timestep(sigma), labels)
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
