"""The analytic Gaussian-mixture teacher is exact: Tweedie's formula and the true distribution."""

import pytest
import torch

from comfyui_distillery.core.models import Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.worlds.gmm import (
    GaussianMixture, GaussianMixtureTeacher, SlicedW2Reference, evaluate_gmm_samples, mode_report, per_mode_recall,
    sliced_wasserstein)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
        assert SlicedW2Reference(b)(a) == pytest.approx(sliced_wasserstein(a, b), rel=1e-12, abs=1e-12)


# --- the likelihood-based per-mode recall (issue 18) ----------------------------------------------------------

def _stratified(mix, per_class, generator, scale=1.0):
    """Exactly round(per_class * w_k) samples of every mode (no composition noise), each drawn from
    N(mu_k, (scale * s_k)^2 I); returns samples, labels and each sample's mode."""
    xs, labels, comps = [], [], []
    for c in range(mix.num_classes):
        for k in range(mix.means.shape[1]):
            n = int(round(per_class * float(mix.weights[c, k])))
            noise = torch.randn(n, mix.dim, generator=generator, dtype=torch.float64)
            xs.append(mix.means[c, k] + scale * mix.stds[c, k] * noise)
            labels.append(torch.full((n,), c))
            comps.append(torch.full((n,), k))
    return torch.cat(xs), torch.cat(labels), torch.cat(comps)


def _separated(dim, seed=0, classes=2, modes=4, distance=3.0, std=0.2):
    """Modes of every class at `distance` from each other (orthogonal directions), unequal weights."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    means = torch.stack([distance / 2 ** 0.5 * basis[(torch.arange(modes) + c * modes) % dim] for c in range(classes)])
    if dim < modes:  # 2-d: points on a circle instead
        ang = torch.arange(modes, dtype=torch.float64) * 2 * torch.pi / modes
        radius = distance / (2 * torch.sin(torch.tensor(torch.pi / modes, dtype=torch.float64)))
        ring = radius * torch.stack([ang.cos(), ang.sin()], -1)
        means = torch.stack([ring + 10 * c for c in range(classes)])
    stds = std * (0.8 + 0.4 * torch.rand(classes, modes, generator=g, dtype=torch.float64))
    weights = 0.5 + torch.rand(classes, modes, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights, torch.ones(classes, dtype=torch.float64))


def test_chi2_quantile_matches_scipy():
    from comfyui_distillery.worlds.gmm import chi2_quantile

    # scipy.stats.chi2.ppf values, written out so the test does not need scipy
    known = {(0.999, 2): 13.815510557964274, (0.999, 16): 39.252354790768464, (0.999, 32): 62.487219057088474,
             (0.99, 16): 31.999926908815176, (0.5, 16): 15.338498885001608, (0.999, 1): 10.827566170662733}
    for (p, d), v in known.items():
        assert chi2_quantile(p, d) == pytest.approx(v, rel=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")
    for d in (1, 2, 3, 7, 16, 32, 100):
        for p in (0.5, 0.9, 0.99, 0.999, 0.9999):
            assert chi2_quantile(p, d) == pytest.approx(float(scipy_stats.chi2.ppf(p, d)), rel=1e-10)


@pytest.mark.parametrize("dim", [2, 32])
@pytest.mark.parametrize("prob", [0.99, 0.999])
def test_exact_samples_score_the_chosen_probability_in_any_dimension(dim, prob):
    """Exact samples are on their mode with probability `prob` whatever d: recall ~ prob, off-mode ~ 1 - prob."""
    mix = _separated(dim, seed=dim)
    per_class = 40000
    x, labels, comps = _stratified(mix, per_class, torch.Generator().manual_seed(1))
    res = mode_report(mix, x, labels, prob=prob)
    n_mode = per_class * float(mix.weights.min())
    se = (prob * (1 - prob) / n_mode) ** 0.5  # binomial standard error of the lightest mode's recall
    assert res["recall_mean"] == pytest.approx(prob, abs=max(4 * se / mix.weights.numel() ** 0.5, 1e-3))
    assert res["recall_min"] > prob - 5 * se
    assert res["off_mode_share"] == pytest.approx(1 - prob, abs=5 * (prob * (1 - prob) / len(x)) ** 0.5)
    assert res["coverage_min"] > 0.995  # the highest-posterior mode is the true one
    assert res["spread_median"] == pytest.approx(1.0, abs=0.02)
    assert res["other_class_share"] == 0.0
    # the assignment picks the true mode
    best, _ = mix.assign_modes(x, labels)
    assert float((best == comps).double().mean()) > 0.999


def test_modes_drawn_twice_too_wide_fail_the_new_recall_but_passed_the_rms_rule():
    """16-d: each mode drawn with 2x its std. The former rule (3 RMS standard deviations per coordinate, a
    radius of 12 stds) accepts nearly all of them; the chi-square rule accepts P(chi2_16 <= 39.25 / 4) = 12%."""
    mix = _separated(16, seed=3, distance=3.0, std=0.25)
    x, labels, _ = _stratified(mix, 20000, torch.Generator().manual_seed(2), scale=2.0)
    res = mode_report(mix, x, labels)
    old = per_mode_recall(mix, x, labels, rule="rms")
    assert float(old.min()) > 0.95
    assert res["recall_mean"] < 0.2 and res["recall_min"] < 0.2
    assert res["off_mode_share"] > 0.8
    assert res["coverage_min"] > 0.99  # no mode is dropped: every mode keeps its mass, too wide
    assert res["spread_median"] == pytest.approx(2.0, abs=0.05)
    # the same samples at 1x pass both rules
    x1, labels1, _ = _stratified(mix, 20000, torch.Generator().manual_seed(2))
    assert mode_report(mix, x1, labels1)["recall_min"] > 0.99


@pytest.mark.parametrize("dim", [2, 16])
def test_a_bridge_between_two_modes_is_counted_off_mode(dim):
    """Exact samples plus 5% of points on the middle 40% of the segment between two modes of a class,
    25 (nominal) stds apart, with a mode's spread across it: the off-mode share rises by those 5%.

    A bridge point is off-mode when its squared Mahalanobis distance passes the chi-square quantile, the
    same radius exact samples need: 3.7 stds in 2-d, 6.3 in 16-d (with the spread across the bridge
    counted in). So in 16-d a bridge must reach further from the modes to be seen: these points are at
    least 7.5 nominal stds out (6.3 for the widest mode's 1.2 x std)."""
    mix = _separated(dim, seed=5, classes=1, modes=3, distance=5.0, std=0.2)
    x, labels, _ = _stratified(mix, 40000, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    n_bridge = int(0.05 * len(x) / 0.95)
    t = 0.3 + 0.4 * torch.rand(n_bridge, 1, generator=g, dtype=torch.float64)
    a, b = mix.means[0, 0], mix.means[0, 1]
    bridge = a + t * (b - a) + 0.2 * torch.randn(n_bridge, dim, generator=g, dtype=torch.float64)
    xb = torch.cat([x, bridge])
    lb = torch.cat([labels, torch.zeros(n_bridge, dtype=torch.long)])
    res = mode_report(mix, xb, lb)
    base = mode_report(mix, x, labels)
    share = n_bridge / len(xb)
    assert res["off_mode_share"] - base["off_mode_share"] * len(x) / len(xb) == pytest.approx(share, abs=0.002)
    assert res["off_mode_share_per_class"][0] == pytest.approx(res["off_mode_share"])
    # the RMS rule (radius 3 sqrt(d) stds: 12 in 16-d) takes most of those points for mode samples (84%)
    old_modes = mix.mode_of(bridge, torch.zeros(n_bridge, dtype=torch.long))
    if dim == 16:
        assert float((old_modes >= 0).double().mean()) > 0.75
    on = mix.on_mode(bridge, torch.zeros(n_bridge, dtype=torch.long))
    assert float((on >= 0).double().mean()) < 0.02  # 0 in 2-d, 1.3% in 16-d
