"""The analytic Gaussian-mixture teacher is exact: Tweedie's formula and the true distribution."""

import pytest
import torch

from comfyui_distillery.core.models import Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.worlds.gmm import (
    GaussianMixture, GaussianMixtureTeacher, evaluate_gmm_samples, per_mode_recall, sliced_wasserstein)


@pytest.mark.parametrize("schedule", [DiscreteVPSchedule.sd15(), RectifiedFlowSchedule(shift=3.0)],
                         ids=["vp", "flow"])
def test_denoiser_is_tweedie(schedule):
    """E[x0 | x] = (x + s^2 grad log p(x)) / a, with p the exact noisy density (autograd)."""
    mix = GaussianMixture.random(dim=3, num_classes=3, modes_per_class=2, seed=3)
    teacher = GaussianMixtureTeacher(mix, schedule)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 0, 2])  # 3 = unconditional
    sigma = schedule.sigma(torch.tensor([50.0, 200.0, 400.0, 600.0, 800.0, 950.0], dtype=torch.float64))
    a, s = schedule.scales(sigma)
    x = (a[:, None] * 2 * torch.randn(6, 3, generator=g, dtype=torch.float64)
         + s[:, None] * torch.randn(6, 3, generator=g, dtype=torch.float64)).requires_grad_()
    logp = mix.log_prob_noisy(x, labels, a, s).sum()
    (score,) = torch.autograd.grad(logp, x)
    tweedie = (x + (s ** 2)[:, None] * score) / a[:, None]
    x0 = teacher(x.detach(), sigma, labels)
    assert torch.allclose(x0, tweedie, atol=1e-9)
    # every parameterisation is the same prediction
    for out in ("epsilon", "v_prediction", "flow"):
        pred = teacher(x.detach(), sigma, labels, output=out)
        assert torch.allclose(schedule.to_x0(pred, x.detach(), sigma, out), x0, atol=1e-9)


def test_classifier_free_guidance_is_exact_combination():
    teacher = GaussianMixtureTeacher()
    x = torch.randn(4, 2, dtype=torch.float64) * 3
    sigma = teacher.schedule.sigma(torch.tensor(600.0))
    labels = torch.tensor([0, 1, 2, 3])
    null = torch.full((4,), teacher.mixture.null_label)
    cond, uncond = teacher(x, sigma, labels), teacher(x, sigma, null)
    guided = teacher(x, sigma, labels, uncond=null, cfg_scale=3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-12)
    bound = Guided(teacher, labels, null, 3.0)
    assert torch.allclose(bound(x, sigma), guided) and bound.calls == 2


def test_exact_samples_score_perfectly_and_collapse_is_caught():
    mix = GaussianMixture.default()
    labels = torch.arange(4).repeat_interleave(2000)
    x, _ = mix.sample(labels, torch.Generator().manual_seed(7))
    res = evaluate_gmm_samples(mix, x, labels)
    assert res["recall_min"] > 0.9
    # drop every light mode: recall of those modes is 0, SWD grows a lot
    modes = mix.mode_of(x, labels)
    heavy = x[modes == 0]
    rec = per_mode_recall(mix, heavy, labels[modes == 0])
    assert float(rec[:, 1].max()) == 0.0 and float(rec[:, 0].min()) == 1.0
    truth, _ = mix.sample(labels, torch.Generator().manual_seed(8))
    assert sliced_wasserstein(heavy, truth) > 5 * sliced_wasserstein(x, truth)


def test_the_ode_of_the_exact_teacher_converges_to_the_data():
    """Deterministic Euler (= DDIM) on the exact denoiser: more steps, closer to the true mixture.

    Even at 50 steps the sampler is a few sampling-noise floors away from the data (the N(0, sigma_max^2)
    prior ignores the data's mean at t=999, and Euler's step error moves mass between modes): that is
    why trainers are judged against the teacher's own 50-step sampler, not against zero.
    """
    mix = GaussianMixture.default()
    teacher = GaussianMixtureTeacher(mix)
    sch = teacher.schedule
    labels = torch.arange(4).repeat_interleave(2000)
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    swd = {}
    for steps in (4, 50):
        sigmas = sch.sigmas_from_timesteps(torch.linspace(999, 0, steps + 1)[:-1].round())
        x = noise * sigmas[0]
        for i in range(steps):
            x0 = teacher(x, sigmas[i], labels)
            x = x0 + sigmas[i + 1] / sigmas[i] * (x - x0)
        res = evaluate_gmm_samples(mix, x, labels)
        swd[steps] = res["swd"]
    floor = evaluate_gmm_samples(mix, mix.sample(labels, torch.Generator().manual_seed(9))[0], labels)
    assert res["recall_min"] > 0.9
    assert floor["swd"] < swd[50] < 0.7 * swd[4]
    assert swd[50] < 0.12


def test_sliced_wasserstein_reads_quantiles_off_sorted_projections():
    """The same numbers as torch.quantile's quantile functions, for sets of equal and unequal size."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 3, generator=g, dtype=torch.float64), torch.randn(170, 3, generator=g, dtype=torch.float64) + 0.4

    def reference(a, b, num_projections=512, seed=0):
        dirs = torch.randn(a.shape[1], num_projections, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        n = max(len(a), len(b))
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        qa, qb = torch.quantile(a @ dirs, levels, dim=0), torch.quantile(b @ dirs, levels, dim=0)
        return float(((qa - qb) ** 2).mean(0).mean().sqrt())

    for a, b in ((x, y), (y, x), (x, x[:300].flip(0) + 1.0)):
        assert sliced_wasserstein(a, b) == pytest.approx(reference(a, b), rel=1e-12, abs=1e-12)
