"""Phased DMD: the subinterval score-matching target against the exact mixture, progressive training of the
experts, bit-exact resume mid-phase, the export (one file, K prefixed adapters, the card's expert table), and
the phased sampler against a hand-computed trajectory."""

import copy
import json

import pytest
import torch

from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.sampling.phased import PhasedExperts, expert_index, sample_phased_x0_renoise
from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas
from comfyui_distillery.trainers import api, lora
from comfyui_distillery.trainers.card import StudentCard
from comfyui_distillery.trainers.engine import Trainer, TrainConfig
from comfyui_distillery.trainers.methods.phased_dmd import subinterval_target
from comfyui_distillery.worlds.gmm import GaussianMixture, GaussianMixtureTeacher
from comfyui_distillery.worlds.tasks import GaussianMixtureTask

SCHEDULES = {
    "epsilon": lambda: DiscreteVPSchedule.sd15("epsilon"),
    "v_prediction": lambda: DiscreteVPSchedule.sd15("v_prediction"),
    "flow": lambda: RectifiedFlowSchedule(shift=3.0),
}


def _diffused_mixture(mixture: GaussianMixture, a: float, s: float) -> GaussianMixture:
    """The law of a x0 + s eps for x0 from `mixture`: a mixture with means a mu and stds sqrt(a^2 v + s^2)."""
    return GaussianMixture(mixture.means * a, (a * a * mixture.stds ** 2 + s * s).sqrt(), mixture.weights,
                           mixture.class_prior)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("t_start,t", [(499, 500), (499, 700), (249, 499), (0, 300)])
def test_subinterval_target_is_the_exact_score_of_the_diffused_phase_output(kind, t_start, t):
    """When the phase output x_s has the data's own law at level s, the fake score's optimum at t in (s, ...] is
    the teacher. The target is linear in x_s, so E[target | x_t] = target(E[x_s | x_t]), and E[x_s | x_t] is the
    exact posterior mean of the diffused mixture observed through q(x_t | x_s): an exact, noise-free check."""
    schedule = SCHEDULES[kind]()
    mixture = GaussianMixture.default()
    teacher = GaussianMixtureTeacher(mixture, schedule)
    n = 512
    labels = torch.arange(4).repeat_interleave(n // 4)
    gen = torch.Generator().manual_seed(0)
    sigma_s = float(schedule.training_sigma(torch.tensor(float(t_start)))) if t_start else 0.0
    sigma_t = float(schedule.training_sigma(torch.tensor(float(t))))
    x0, _ = mixture.sample(labels, gen)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), sigma_t)
    a_s, s_s = (float(v) for v in schedule.scales(torch.tensor(sigma_s, dtype=torch.float64)))
    a_t, s_t = (float(v) for v in schedule.scales(torch.tensor(sigma_t, dtype=torch.float64)))
    ratio = a_t / a_s
    std = (s_t ** 2 - ratio ** 2 * s_s ** 2) ** 0.5
    posterior_x_s = _diffused_mixture(mixture, a_s, s_s).posterior_mean(
        x_t, labels, torch.full((n,), ratio, dtype=torch.float64), torch.full((n,), std, dtype=torch.float64))
    sig_t = torch.full((n,), sigma_t, dtype=torch.float64)
    target, weight = subinterval_target(schedule, posterior_x_s, sigma_s, x_t, sig_t, kind)
    exact = teacher(x_t, sig_t, labels, output=kind)
    assert torch.allclose(target, exact, rtol=0, atol=1e-8 * max(1.0, float(exact.abs().max()))), \
        float((target - exact).abs().max())
    assert torch.allclose(weight, torch.full_like(weight, std ** 2 / s_t ** 2))
    if t_start:
        # the DMD2 critic's target, which treats the (noisy) phase output as clean data, is not the score here
        naive = schedule.from_x0(posterior_x_s, x_t, sig_t, kind)
        assert float((naive - exact).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_last_phase_target_is_plain_denoising(kind):
    """s_K = 0: the subinterval target is the ordinary denoising target of x0 (DMD2's critic), weight 1."""
    schedule = SCHEDULES[kind]()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    sigma = schedule.training_sigma(torch.tensor([100.0, 300.0, 500.0, 700.0] * 2, dtype=torch.float64))
    x_t = schedule.add_noise(x0, torch.randn(8, 3, generator=gen, dtype=torch.float64), sigma)
    target, weight = subinterval_target(schedule, x0, 0.0, x_t, sigma, kind)
    assert torch.allclose(target, schedule.from_x0(x0, x_t, sigma, kind), atol=1e-10)
    assert torch.allclose(weight, torch.ones_like(weight))


# --- the sampler --------------------------------------------------------------------------------------------

def test_expert_index_switches_exactly_at_the_boundary():
    schedule = DiscreteVPSchedule.sd15()
    sigmas = timesteps_to_sigmas(schedule, [999, 749, 499, 249])
    boundaries = [float(sigmas[2])]  # expert 2 from timestep 499
    assert [expert_index(s, boundaries) for s in sigmas[:-1]] == [0, 0, 1, 1]
    # ComfyUI's float32 table gives the same levels to ~1e-7: still the trained switch
    assert [expert_index(float(torch.tensor(float(s), dtype=torch.float32)), boundaries)
            for s in sigmas[:-1]] == [0, 0, 1, 1]
    # the neighbouring integer timesteps are on their own sides
    assert expert_index(float(schedule.sigma(torch.tensor(500.0))), boundaries) == 0
    assert expert_index(float(schedule.sigma(torch.tensor(498.0))), boundaries) == 1


def test_phased_sampler_matches_a_hand_computed_trajectory():
    """Two affine 'experts' on 4 steps, switching at the third: the trajectory by hand, step by step."""
    schedule = DiscreteVPSchedule.sd15()
    sigmas = timesteps_to_sigmas(schedule, [999, 749, 499, 249]).to(torch.float64)
    s = [float(v) for v in sigmas]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64) * s[0]
    z = [torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    calls = []

    def expert_a(x, sigma, **_):
        calls.append(("a", round(float(sigma[0]), 6)))
        return 0.1 * x

    def expert_b(x, sigma, **_):
        calls.append(("b", round(float(sigma[0]), 6)))
        return 0.5 * x - 1.0

    steps = iter(z)
    seen = []
    out = sample_phased_x0_renoise([expert_a, expert_b], x.clone(), sigmas, schedule=schedule,
                                   boundaries=[s[2]], noise_sampler=lambda *_: next(steps), disable=True,
                                   callback=lambda info: seen.append(info["expert"]))
    # by hand: VP states x = x0 + sigma z (a = 1, s = sigma)
    x0 = 0.1 * x
    x1 = x0 + s[1] * z[0]
    x0 = 0.1 * x1
    x2 = x0 + s[2] * z[1]
    x0 = 0.5 * x2 - 1.0  # expert b from the boundary on
    x3 = x0 + s[3] * z[2]
    expected = 0.5 * x3 - 1.0
    assert torch.allclose(out, expected, atol=1e-12)
    assert [c[0] for c in calls] == ["a", "a", "b", "b"] and seen == [0, 0, 1, 1]


def test_phased_experts_split_a_batch_that_straddles_a_boundary():
    model = PhasedExperts([lambda x, s, **_: x * 0 + 1.0, lambda x, s, **_: x * 0 + 2.0], boundaries=[1.0])
    out = model(torch.zeros(3, 2), torch.tensor([2.0, 1.0, 0.5]))
    assert out[:, 0].tolist() == [1.0, 2.0, 2.0]


# --- training -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_task():
    return GaussianMixtureTask(width=32, fit_steps=30, schedule=DiscreteVPSchedule.sd15("v_prediction"))


def _method(**kw):
    opts = dict(student_timesteps="999,749,499,249", phases=2, update_ratio=2, guidance_scale=1.0)
    opts.update(kw)
    return api.make_method("phased_dmd", **opts)


def _trainer(task, run_dir, steps, method=None, **kw):
    cfg = TrainConfig(steps=steps, batch_size=16, student_lr=1e-3, critic_lr=1e-3, lora_rank=4, run_dir=str(run_dir),
                      checkpoint_every=3, log_every=1, keep_checkpoints=2, preview_every=0, **kw)
    return Trainer(task, method or _method(), cfg, progress=False)


def _expert(trainer, k):
    return [p.detach().clone() for p in lora.adapter_parameters(trainer.roles.base, f"student_p{k}")]


def test_experts_train_in_order(small_task, tmp_path):
    trainer = _trainer(copy.deepcopy(small_task), tmp_path, steps=8)
    start = [_expert(trainer, k) for k in (1, 2)]
    trainer.train(until=4)  # phase 1: iterations 0-3
    mid = [_expert(trainer, k) for k in (1, 2)]
    trainer.train()
    end = [_expert(trainer, k) for k in (1, 2)]
    changed = lambda a, b: any(not torch.equal(p, q) for p, q in zip(a, b))  # noqa: E731
    assert changed(start[0], mid[0]) and not changed(start[1], mid[1])  # phase 1 trains expert 1 only
    assert not changed(mid[0], end[0]) and changed(mid[1], end[1])  # phase 2: expert 1 frozen, expert 2 trains
    phases = [json.loads(line).get("phase") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert phases == [1, 1, 1, 1, 2, 2, 2, 2]
    # the critic is trained on each phase's subinterval, the student's DM levels inside it
    assert trainer.method.phase_range(0) == (999, 499.0) and trainer.method.phase_range(1) == (499.0, None)
    assert trainer.method._levels(0, clip=True) == (500, 980) and trainer.method._levels(1, clip=True) == (20, 499)


@pytest.mark.parametrize("kill_at", [3, 6])  # mid phase 1, mid phase 2
def test_resume_mid_phase_is_bit_exact(small_task, tmp_path, kill_at):
    straight = _trainer(copy.deepcopy(small_task), tmp_path / "a", steps=8, ema_decay=0.9)
    straight.train()
    first = _trainer(copy.deepcopy(small_task), tmp_path / "b", steps=8, ema_decay=0.9)
    first.train(until=kill_at)
    first.save()
    resumed = _trainer(copy.deepcopy(small_task), tmp_path / "b", steps=8, ema_decay=0.9)
    assert resumed.resume() and resumed.step == kill_at
    resumed.train()
    for role in ("student", "critic"):
        for p, q in zip(straight.roles.trainable[role], resumed.roles.trainable[role]):
            assert torch.equal(p, q)
    for e, f in zip(straight.ema, resumed.ema):
        assert torch.equal(e, f)


def test_more_steps_on_a_finished_run_go_to_the_last_phase(small_task, tmp_path):
    _trainer(copy.deepcopy(small_task), tmp_path, steps=4).train()
    more = _trainer(copy.deepcopy(small_task), tmp_path, steps=6)
    assert more.resume() and more.method._phase_ends == [2, 6]
    assert more.method.phase_at(4) == 1


def test_export_is_one_file_with_k_prefixed_experts_and_their_ranges(small_task, tmp_path):
    method = _method(student_timesteps="999,749,499,249", phases=3, phase_boundaries="749,249")
    result = api.distill(copy.deepcopy(small_task), method,
                         TrainConfig(steps=6, batch_size=8, lora_rank=4, run_dir=str(tmp_path / "run"),
                                     checkpoint_every=0, preview_every=0),
                         lora_path=tmp_path / "phased.safetensors", progress=False)
    trainer = result["trainer"]
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tmp_path / "phased.safetensors"), framework="pt") as f:
        card = StudentCard.from_metadata(f.metadata())
    assert card.method == "phased_dmd" and card.sampler == "x0_renoise" and card.card_version == 3
    assert [e["timesteps"] for e in card.experts] == [[999], [749, 499], [249]]
    assert [(e["start_timestep"], e["end_timestep"]) for e in card.experts] == [(999, 749), (749, 249), (249, 0)]
    assert card.expert_boundaries() == [749, 249]
    sig = timesteps_to_sigmas(small_task.base.schedule, [749, 249])
    assert card.experts[1]["sigma_start"] == pytest.approx(float(sig[0]), rel=1e-12)
    assert card.experts[2]["sigma_end"] == 0.0 and card.experts[0]["sigma_start"] is None
    state = load_file(str(tmp_path / "phased.safetensors"))
    for k, expert in enumerate(card.experts, start=1):
        part = {key[len(expert["prefix"]):]: v for key, v in state.items() if key.startswith(expert["prefix"])}
        assert part and len(part) * 3 == len(state)
        ref = lora.lora_state_dict(trainer.roles.base, f"student_p{k}")
        assert part.keys() == ref.keys() and all(torch.equal(part[key], ref[key]) for key in ref)
    # a one-LoRA card is still version 2 and has no experts
    plain = StudentCard(method="dmd2", sampler="x0_renoise", timesteps=[999], prediction_type="epsilon")
    again = StudentCard.from_metadata(plain.to_metadata())
    assert again.experts is None and again.card_version == 2 and again.expert_boundaries() == []


def test_the_trained_student_samples_with_the_experts_switched(small_task, tmp_path):
    """The trainer's student view and the pure phased sampler over the experts agree step for step."""
    trainer = _trainer(copy.deepcopy(small_task), tmp_path, steps=4)
    trainer.train()
    student = trainer.roles.student
    schedule = student.schedule
    sigmas = timesteps_to_sigmas(schedule, [999, 749, 499, 249])
    labels = torch.arange(4).repeat(8)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))

    def expert(k):
        def run(x, sigma, **_):
            with lora.role(trainer.roles.base, f"student_p{k}"):
                return trainer.roles.base(x, sigma, labels)
        return run

    from comfyui_distillery.sampling import sample_x0_renoise

    a = sample_phased_x0_renoise([expert(1), expert(2)], noise * sigmas[0], sigmas, schedule=schedule,
                                 boundaries=[float(sigmas[2])], extra_args={"seed": 5}, disable=True)
    b = sample_x0_renoise(lambda x, s, **_: student(x, s, labels), noise * sigmas[0], sigmas, schedule=schedule,
                          extra_args={"seed": 5}, disable=True)
    assert torch.equal(a, b)
    assert not torch.equal(_expert(trainer, 1)[1], _expert(trainer, 2)[1])


@pytest.mark.parametrize("kw,match", [
    (dict(phases=5), r"phases=5: each expert needs"),
    (dict(phases=2, phase_boundaries="500"), r"phase_boundaries: 500 is not one of the student timesteps"),
    (dict(phases=3, phase_boundaries="499"), r"phases=3 needs 2 boundaries"),
    (dict(phases=3, phase_boundaries="249,749"), r"noisiest first"),
])
def test_bad_phase_options_fail_before_training(small_task, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _trainer(copy.deepcopy(small_task), tmp_path, steps=4, method=_method(**kw))


def test_bad_phase_split_and_too_few_steps_are_refused(small_task, tmp_path):
    with pytest.raises(ValueError, match=r"phase_split=\[1, 2, 3\]: give 1"):
        _method(phase_split="1,2,3")
    with pytest.raises(ValueError, match=r"steps=1: too few iterations for 2 phases"):
        _trainer(copy.deepcopy(small_task), tmp_path, steps=1)


def test_full_finetune_trains_one_copy_per_expert_in_order(small_task, tmp_path):
    trainer = _trainer(copy.deepcopy(small_task), tmp_path, steps=4, full_finetune=True,
                       method=_method(phase_split="1,3"))
    assert trainer.method._phase_ends == [1, 4] and len(trainer.roles.experts) == 2
    copies = [[p.detach().clone() for p in e.parameters()] for e in trainer.roles.experts]
    trainer.train(until=1)
    after_1 = [[p.detach().clone() for p in e.parameters()] for e in trainer.roles.experts]
    trainer.train()
    after_2 = [[p.detach().clone() for p in e.parameters()] for e in trainer.roles.experts]
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a, b))  # noqa: E731
    assert not same(copies[0], after_1[0]) and same(copies[1], after_1[1])
    assert same(after_1[0], after_2[0]) and not same(after_1[1], after_2[1])
