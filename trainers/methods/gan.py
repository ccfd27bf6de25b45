"""The diffusion-GAN term shared by DMD2 (Sec. 4.3) and few-step SiD: a discriminator on the critic's features.

Real images and student samples are both diffused to t ~ U[0, T) and classified by a small head on the
critic's bottleneck features (non-saturating logistic loss):

    L_D = softplus(D(fake_t)) + softplus(-D(real_t))        (critic phase; the head trains with the critic)
    L_G = softplus(-D(fake_t))                              (student phase; the graph flows through fake_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiscriminatorHead(nn.Module):
    """A small head on the critic's bottleneck features: conv for feature maps, MLP for vectors."""

    def __init__(self, channels: int, spatial: bool, hidden: int = 256):
        super().__init__()
        if spatial:
            self.net = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, stride=2, padding=1), nn.GroupNorm(min(32, hidden), hidden), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(-1)


def _diffuse_anywhere(ctx, x):
    """x diffused to a level t ~ U[0, T) with fresh noise, and that level."""
    schedule = ctx.roles.critic.schedule
    sigma = ctx.sample_sigma(x.shape[0], 0, schedule.num_train_timesteps - 1)
    return schedule.add_noise(x, ctx.randn(x.shape, dtype=x.dtype), sigma), sigma


def generator_gan_loss(head: DiscriminatorHead, ctx, x: torch.Tensor, cond) -> torch.Tensor:
    """L_G for student samples x (with their graph)."""
    x_t, sigma = _diffuse_anywhere(ctx, x)
    return F.softplus(-head(ctx.roles.critic.features(x_t, sigma, cond))).mean()


def critic_gan_loss(head: DiscriminatorHead, ctx, x: torch.Tensor, cond) -> torch.Tensor:
    """L_D for detached student samples x against a batch of the task's real images."""
    schedule = ctx.roles.critic.schedule
    real, real_cond = ctx.task.real_images(x.shape[0], ctx.generator)
    real = real.to(x.device, x.dtype)
    sig_r = ctx.sample_sigma(x.shape[0], 0, schedule.num_train_timesteps - 1)
    sig_f = ctx.sample_sigma(x.shape[0], 0, schedule.num_train_timesteps - 1)
    real_t = schedule.add_noise(real, ctx.randn(real.shape, dtype=real.dtype), sig_r)
    fake_t = schedule.add_noise(x, ctx.randn(x.shape, dtype=x.dtype), sig_f)
    logit_real = head(ctx.roles.critic.features(real_t, sig_r, real_cond))
    logit_fake = head(ctx.roles.critic.features(fake_t, sig_f, cond))
    return F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
