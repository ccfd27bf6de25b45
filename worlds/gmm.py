"""The analytic world: a class-conditional Gaussian mixture and its exact denoiser.

For data x0 ~ sum_k w_k N(mu_k, v_k I) (the components of class c) and the state x = a x0 + s eps,

    x | k        ~ N(a mu_k, (a^2 v_k + s^2) I)
    E[x0 | x, k] = mu_k + a v_k / (a^2 v_k + s^2) * (x - a mu_k)
    E[x0 | x]    = sum_k r_k(x) E[x0 | x, k],   r_k ∝ w_k N(x; a mu_k, (a^2 v_k + s^2) I)

which is exact at every noise level and in every parameterisation (the schedule converts x0 to epsilon,
v or flow velocity). The unconditional model (label NULL = number of classes) is the mixture of all
classes weighted by the class prior, so classifier-free guidance has an exact meaning here too.

A student distilled from this teacher can be compared with the true distribution itself: sliced
Wasserstein distance and per-mode recall, with no training error in the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.models import DiffusionModel
from ..core.schedules import DiscreteVPSchedule, NoiseSchedule


@dataclass
class GaussianMixture:
    """Per class c: components k with means [C, K, d], isotropic stds [C, K], weights [C, K]."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    class_prior: torch.Tensor

    def __post_init__(self):
        c, k, _ = self.means.shape
        if self.stds.shape != (c, k) or self.weights.shape != (c, k) or self.class_prior.shape != (c,):
            raise ValueError("GaussianMixture: means [C,K,d], stds [C,K], weights [C,K], class_prior [C]")
        self.means = self.means.to(torch.float64)
        self.stds = self.stds.to(torch.float64)
        self.weights = self.weights.to(torch.float64) / self.weights.sum(-1, keepdim=True)
        self.class_prior = self.class_prior.to(torch.float64) / self.class_prior.sum()

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def null_label(self) -> int:
        """The label of the unconditional model (classifier-free guidance's empty prompt)."""
        return self.num_classes

    @classmethod
    def default(cls) -> "GaussianMixture":
        """Four classes in 2-D, each with a heavy (0.7) and a light (0.3) mode on a circle of radius 2.

        The light modes are what a mode-seeking student drops first, so per-mode recall sees collapse.
        """
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        ring = 2.0 * torch.stack([angles.cos(), angles.sin()], -1)  # [8, 2]
        means = torch.stack([ring[[c, c + 4]] for c in range(4)])  # class c: opposite points
        stds = torch.full((4, 2), 0.2, dtype=torch.float64)
        weights = torch.tensor([[0.7, 0.3]] * 4, dtype=torch.float64)
        return cls(means, stds, weights, torch.ones(4, dtype=torch.float64))

    @classmethod
    def random(cls, dim: int, num_classes: int, modes_per_class: int, seed: int = 0,
               spread: float = 2.0, std: float = 0.25) -> "GaussianMixture":
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(num_classes, modes_per_class, dim, generator=g, dtype=torch.float64)
        stds = std * (0.5 + torch.rand(num_classes, modes_per_class, generator=g, dtype=torch.float64))
        weights = 0.2 + torch.rand(num_classes, modes_per_class, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, torch.ones(num_classes, dtype=torch.float64))

    # --- components of a label (NULL = every component of every class) -------------------------
    def _components(self, labels: torch.Tensor):
        """Means [B, M, d], variances [B, M] and log-weights [B, M] of each sample's mixture."""
        c, k, d = self.means.shape
        labels = labels.long().cpu()
        if bool(((labels < 0) | (labels > c)).any()):
            raise ValueError(f"labels must be in 0..{c - 1}, or {c} for unconditional")
        all_means = self.means.reshape(1, c * k, d)
        all_vars = (self.stds ** 2).reshape(1, c * k)
        all_logw = (self.weights * self.class_prior[:, None]).log().reshape(1, c * k)
        is_null = labels == c
        cls_idx = labels.clamp(max=c - 1)
        means = self.means[cls_idx].reshape(-1, k, d)
        variances = (self.stds[cls_idx] ** 2).reshape(-1, k)
        logw = self.weights[cls_idx].log().reshape(-1, k)
        # pad per-class mixtures to C*K components (extra ones get weight 0) so one batch can mix both
        pad = c * k - k
        means = torch.cat([means, means[:, :1].expand(-1, pad, -1)], 1)
        variances = torch.cat([variances, variances[:, :1].expand(-1, pad)], 1)
        logw = torch.cat([logw, torch.full((len(labels), pad), -math.inf, dtype=torch.float64)], 1)
        means = torch.where(is_null[:, None, None], all_means.expand_as(means), means)
        variances = torch.where(is_null[:, None], all_vars.expand_as(variances), variances)
        logw = torch.where(is_null[:, None], all_logw.expand_as(logw), logw)
        return means, variances, logw

    def _noisy_terms(self, x, labels, a, s):
        means, variances, logw = self._components(labels)
        means, variances, logw = (t.to(x.device) for t in (means, variances, logw))
        x = x.to(torch.float64)
        a = a.to(torch.float64).reshape(-1, 1)
        s = s.to(torch.float64).reshape(-1, 1)
        var_x = a * a * variances + s * s  # [B, M]
        diff = x[:, None, :] - a[:, :, None] * means  # [B, M, d]
        d = x.shape[-1]
        log_n = -0.5 * (diff ** 2).sum(-1) / var_x - 0.5 * d * (2 * math.pi * var_x).log()
        return means, variances, logw, var_x, diff, log_n, a

    def log_prob_noisy(self, x, labels, a, s) -> torch.Tensor:
        """log p(x) of the noisy state x = a x0 + s eps, x0 from the mixture of `labels`."""
        *_, logw, _, _, log_n, _ = self._noisy_terms(x, labels, a, s)
        return torch.logsumexp(logw + log_n, dim=1)

    def posterior_mean(self, x, labels, a, s) -> torch.Tensor:
        """E[x0 | x] for x = a x0 + s eps (exact, float64)."""
        means, variances, logw, var_x, diff, log_n, a = self._noisy_terms(x, labels, a, s)
        resp = torch.softmax(logw + log_n, dim=1)  # [B, M]
        gain = (a * variances / var_x)[..., None]  # [B, M, 1]
        comp_mean = means + gain * diff
        return (resp[..., None] * comp_mean).sum(1)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None):
        """Exact samples x0 [B, d] for the given labels, and the (class, component) index of each."""
        labels = labels.long().cpu()
        means, variances, logw = self._components(labels)
        comp = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        idx = torch.arange(len(labels))
        noise = torch.randn(len(labels), self.dim, generator=generator, dtype=torch.float64)
        x0 = means[idx, comp] + variances[idx, comp].sqrt()[:, None] * noise
        return x0, comp

    def mode_of(self, x0: torch.Tensor, labels: torch.Tensor, max_z: float = 3.0) -> torch.Tensor:
        """Component index (within the label's class) each point belongs to, or -1 if off-manifold.

        A point belongs to the component with the highest responsibility if it lies within `max_z`
        standard deviations (per coordinate, in RMS) of that component's mean.
        """
        c, k, d = self.means.shape
        labels = labels.long().cpu()
        means = self.means[labels]  # [B, K, d]
        stds = self.stds[labels]
        x0 = x0.detach().cpu().to(torch.float64)
        dist2 = ((x0[:, None, :] - means) ** 2).sum(-1)
        log_r = self.weights[labels].log() - 0.5 * dist2 / stds ** 2 - d * stds.log()
        best = log_r.argmax(1)
        rms_z = (dist2.gather(1, best[:, None]).squeeze(1) / d).sqrt() / stds.gather(1, best[:, None]).squeeze(1)
        return torch.where(rms_z <= max_z, best, torch.full_like(best, -1))


class GaussianMixtureTeacher(DiffusionModel):
    """The exact denoiser of a :class:`GaussianMixture`; cond = labels [B] (NULL for unconditional)."""

    def __init__(self, mixture: GaussianMixture | None = None, schedule: NoiseSchedule | None = None):
        super().__init__(schedule or DiscreteVPSchedule.sd15())
        self.mixture = mixture or GaussianMixture.default()

    def predict_x0(self, x, sigma, cond):
        if cond is None:
            cond = torch.full((x.shape[0],), self.mixture.null_label, dtype=torch.long)
        a, s = self.schedule.scales(sigma.to(torch.float64))
        return self.mixture.posterior_mean(x, cond, a, s).to(x.dtype)


# --- distances to the true distribution ------------------------------------------------------------

def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 512,
                       seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point sets [N, d] and [M, d].

    Average over random unit directions of the W2 distance of the 1-D projections, from their quantile
    functions at common levels (i + 1/2) / n, n = max(N, M). A sorted set of n points *is* its quantile
    function at those levels, so the larger set is only sorted and the smaller one's quantiles are read off
    its sorted values by linear interpolation (torch.quantile's rule): one sort of contiguous rows per set
    (two sets of 20000 points in 16-d, 512 directions: 2.8 s against torch.quantile's 8.9 s, measured side
    by side on this project's 2-core CPU with the other core busy).
    """
    x = x.detach().cpu().to(torch.float64)
    y = y.detach().cpu().to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    n = max(len(x), len(y))
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    # projections as rows [P, N]: sorting contiguous rows is ~8x faster than sorting down columns
    qx, qy = (_quantiles((dirs.t() @ p.t()).sort(dim=1).values, levels) for p in (x, y))
    return float(((qx - qy) ** 2).mean(1).mean().sqrt())


def _quantiles(ordered: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """torch.quantile(values, levels, dim=1, interpolation="linear") of already sorted rows [P, N]."""
    n = ordered.shape[1]
    pos = levels * (n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = pos - lo.to(pos.dtype)
    return ordered[:, lo] * (1 - w) + ordered[:, hi] * w


def per_mode_recall(mixture: GaussianMixture, samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mass recall of every mode, [C, K]: min(1, generated share of the mode / true weight of the mode).

    A generated sample counts for a mode only if it lies on it (see :meth:`GaussianMixture.mode_of`),
    so a dropped mode scores 0, a half-covered one 0.5, and off-manifold samples count for nothing.
    """
    labels = labels.long().cpu()
    modes = mixture.mode_of(samples, labels)
    c, k, _ = mixture.means.shape
    recall = torch.zeros(c, k, dtype=torch.float64)
    for cls in range(c):
        mask = labels == cls
        n = int(mask.sum())
        if n == 0:
            recall[cls] = float("nan")
            continue
        for comp in range(k):
            share = float((modes[mask] == comp).sum()) / n
            recall[cls, comp] = min(1.0, share / float(mixture.weights[cls, comp]))
    return recall


def evaluate_gmm_samples(mixture: GaussianMixture, samples: torch.Tensor, labels: torch.Tensor,
                         seed: int = 1234) -> dict:
    """SWD to fresh exact samples of the same labels, per-class SWD, and per-mode recall."""
    g = torch.Generator().manual_seed(seed)
    truth, _ = mixture.sample(labels, generator=g)
    labels = labels.long().cpu()
    per_class = []
    for cls in range(mixture.num_classes):
        m = labels == cls
        if bool(m.any()):
            per_class.append(sliced_wasserstein(samples[m], truth[m]))
    recall = per_mode_recall(mixture, samples, labels)
    return {
        "swd": sliced_wasserstein(samples, truth),
        "swd_per_class": sum(per_class) / len(per_class),
        "recall_min": float(recall.nan_to_num(1.0).min()),
        "recall_mean": float(recall.nanmean()),
        "recall": recall.tolist(),
    }


__all__ = ["GaussianMixture", "GaussianMixtureTeacher", "sliced_wasserstein", "per_mode_recall",
           "evaluate_gmm_samples"]
