"""Every method option runs through the engine, in LoRA mode on one shared base, with finite losses."""

import copy
import importlib
import json

import pytest
import torch

from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.trainers import api
from comfyui_distillery.trainers.generator import student_generate
from comfyui_distillery.worlds.tasks import GaussianMixtureTask


@pytest.fixture(scope="module")
def tasks():
    return {
        "vp": GaussianMixtureTask(width=32, fit_steps=20, schedule=DiscreteVPSchedule.sd15("v_prediction")),
        "flow": GaussianMixtureTask(width=32, fit_steps=20, schedule=RectifiedFlowSchedule(shift=3.0)),
    }


CASES = [
    ("dmd2", {"student_timesteps": "999,499"}),
    ("dmd2", {"student_timesteps": "999", "decoupled": True, "guidance_scale": 3.0}),
    ("dmd2", {"student_timesteps": "999", "gan_generator_weight": 0.01}),
    ("dmd2", {"student_timesteps": "999,499", "critic_per_step": True}),
    ("sid", {"guidance_mode": "lsg", "kappa": 2.0}),
    ("sid", {"guidance_mode": "zero_cfg"}),
    ("sid", {"guidance_mode": "anti_cfg", "kappa": 1.5}),
    ("sid", {"student_timesteps": "999,499", "gan_generator_weight": 0.01}),
    ("tcd", {"mode": "tcd"}),
    ("tcd", {"mode": "lcm"}),
    ("tcd", {"mode": "tscd", "segments": [4, 2, 1]}),
]


@pytest.mark.parametrize("schedule", ["vp", "flow"])
@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_method_runs_on_a_shared_base(tasks, tmp_path, schedule, method, options):
    task = copy.deepcopy(tasks[schedule])
    config = api.TrainConfig(steps=6, batch_size=8, lora_rank=4, run_dir=str(tmp_path), checkpoint_every=0,
                             log_every=1)
    trainer = api.Trainer(task, api.make_method(method, **options), config, progress=False)
    base_before = {k: v.detach().clone() for k, v in task.base.named_parameters() if "lora_" not in k}
    probe = torch.randn((16, *task.sample_shape), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((16,), float(task.base.schedule.training_sigma(torch.tensor([500.0]))[0]))
    cond, _ = task.conditioning(16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        student_before = trainer.roles.student(probe, sigma, cond)
    result = trainer.train()
    assert trainer.roles.mode == "lora" and result["step"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in records for k, v in r.items() if k.startswith("loss/")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    if options.get("gan_generator_weight"):  # the diffusion-GAN term ran in both phases
        assert any("gan/student" in r for r in records) and any("gan/critic" in r for r in records)
    # the student's output moved; the frozen base's weights did not
    with torch.no_grad():
        student_after = trainer.roles.student(probe, sigma, cond)
    assert (student_after - student_before).abs().max() > 1e-6
    base_after = {k: v for k, v in task.base.named_parameters() if "lora_" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    if method != "tcd":
        assert "critic" in trainer.roles.trainable


@pytest.mark.parametrize("method", ["dmd2", "sid"])
@pytest.mark.parametrize("exit_step, expected", [("uniform", None), ("last", 2)])
def test_exit_step_picks_the_trained_output(tasks, tmp_path, monkeypatch, method, exit_step, expected):
    """uniform: the generator draws a step per batch (backward simulation); last: always the 3-step output."""
    module = importlib.import_module(f"comfyui_distillery.trainers.methods.{method}")
    asked = []

    def recording(*args, step_index=None, **kwargs):
        asked.append(step_index)
        return student_generate(*args, step_index=step_index, **kwargs)

    monkeypatch.setattr(module, "student_generate", recording)
    config = api.TrainConfig(steps=3, batch_size=8, lora_rank=4, run_dir=str(tmp_path), checkpoint_every=0)
    api.distill(copy.deepcopy(tasks["vp"]), api.make_method(method, student_timesteps="999,749,499", exit_step=exit_step,
                                                           update_ratio=1), config, progress=False)
    assert asked and set(asked) == {expected}
    with pytest.raises(ValueError, match="exit_step='first'"):
        api.make_method(method, exit_step="first")


def test_critic_per_step_queries_the_critic_of_the_trained_step(tasks, tmp_path, monkeypatch):
    """One critic adapter per student step; the student's DMD gradient at exit k reads critic k, and every
    critic update trains each critic once."""
    from comfyui_distillery.trainers.methods import dmd2

    exits, calls = [], []

    def recording(*args, **kwargs):
        x0, k = student_generate(*args, **kwargs)
        exits.append(k)
        return x0, k

    monkeypatch.setattr(dmd2, "student_generate", recording)
    method = api.make_method("dmd2", student_timesteps="999,749,499", critic_per_step=True, update_ratio=1)
    config = api.TrainConfig(steps=8, batch_size=8, lora_rank=4, run_dir=str(tmp_path), checkpoint_every=0)
    trainer = api.Trainer(copy.deepcopy(tasks["vp"]), method, config, progress=False)
    critics = trainer.roles.critics
    assert [c.adapter for c in critics] == ["critic", "critic_step2", "critic_step3"]
    assert trainer.roles.critic is critics[0]
    for k, critic in enumerate(critics):
        forward = critic.predict_x0
        critic.predict_x0 = lambda *a, _k=k, _f=forward, **kw: (calls.append(_k), _f(*a, **kw))[1]
    trainer.train()
    assert len(exits) == 8 and len(set(exits)) > 1  # backward simulation draws the exit
    # each iteration: the student phase's critic, then the critic phase's three
    assert calls == [c for k in exits for c in (k, 0, 1, 2)]
    one = api.Trainer(copy.deepcopy(tasks["vp"]), api.make_method("dmd2", student_timesteps="999,749,499"),
                      api.TrainConfig(steps=1, batch_size=8, lora_rank=4, run_dir=str(tmp_path / "one")),
                      progress=False)
    size = sum(p.numel() for p in one.roles.trainable["critic"])
    assert sum(p.numel() for p in trainer.roles.trainable["critic"]) == 3 * size
    assert trainer.memory_plan.trained_params["critic"] == 3 * size
    for options, field in (({"exit_step": "last"}, "exit_step"),
                           ({"gan_generator_weight": 0.01}, "gan_generator_weight")):
        with pytest.raises(ValueError, match=f"critic_per_step=True: .*set {field}="):
            api.make_method("dmd2", critic_per_step=True, **options)


def test_each_per_step_critic_learns_the_outputs_of_its_own_step(tasks, tmp_path):
    """Critic k's denoising loss on step k's outputs is the lowest of all critics': it has learnt that step's
    distribution, not the mixture of every step's (the student barely moves: only the critics learn)."""
    from comfyui_distillery.trainers.generator import student_chain

    task = copy.deepcopy(tasks["vp"])
    method = api.make_method("dmd2", student_timesteps="999,199", critic_per_step=True, update_ratio=1)
    config = api.TrainConfig(steps=300, batch_size=64, full_finetune=True, student_lr=1e-9, critic_lr=3e-3,
                             run_dir=str(tmp_path), checkpoint_every=0, weight_decay=0.0)
    trainer = api.Trainer(task, method, config, progress=False)
    trainer.train()
    student, schedule = trainer.roles.student, trainer.roles.student.schedule
    g = torch.Generator().manual_seed(7)
    n = 4096
    cond, _ = task.conditioning(n, g)
    noise = torch.randn((n, *task.sample_shape), generator=g)
    sigmas = method.student_sigmas(schedule)
    with torch.no_grad():
        outputs = student_chain(student, cond, sigmas, noise,
                                lambda shape, dtype: torch.randn(shape, generator=g, dtype=dtype))
        t = torch.randint(0, 1000, (n,), generator=g)
        sigma = schedule.training_sigma(t.double()).float()
        eps = torch.randn(noise.shape, generator=g)
        loss = torch.zeros(2, 2)  # [critic, step]
        for k, x in enumerate(outputs):
            x_t = schedule.add_noise(x, eps, sigma)
            target = schedule.from_x0(x, x_t, sigma, "v_prediction")
            for j, critic in enumerate(trainer.roles.critics):
                loss[j, k] = (critic(x_t, sigma, cond, output="v_prediction") - target).pow(2).mean()
    assert loss[0, 0] < loss[1, 0] and loss[1, 1] < loss[0, 1], loss


def test_sid_update_ratio_schedules_the_fake_score_first():
    sid = api.make_method("sid", update_ratio=3)
    assert [sid.phases(step) for step in range(4)] == [["critic", "student"], ["critic"], ["critic"],
                                                       ["critic", "student"]]
    assert api.make_method("sid").phases(1) == ["critic", "student"]  # SiD-LSG's strict 1:1 by default
    with pytest.raises(ValueError, match="update_ratio=0"):
        api.make_method("sid", update_ratio=0)


def test_unknown_method_and_options_are_named():
    with pytest.raises(ValueError, match="method='lcm'"):
        api.make_method("lcm")
    with pytest.raises(ValueError, match="guidance_mode='cfg'"):
        api.make_method("sid", guidance_mode="cfg")
    with pytest.raises(ValueError, match="not_an_option: not an option of method dmd2"):
        api.make_method("dmd2", not_an_option=1)


def test_data_free_tcd_grows_a_teacher_buffer_and_resumes_on_it(tasks, tmp_path):
    """Without real images TCD distils from guided teacher samples, made one batch per iteration."""
    task = copy.deepcopy(tasks["vp"])
    task.has_real_images = False
    method = api.make_method("tcd", teacher_samples=24, teacher_sample_steps=3)
    config = api.TrainConfig(steps=4, batch_size=8, lora_rank=4, run_dir=str(tmp_path), checkpoint_every=2)
    api.distill(task, method, config, progress=False)
    assert len(method.samples) == 24  # 8 + 8 + 8, then full
    resumed = api.make_method("tcd", teacher_samples=24, teacher_sample_steps=3)
    trainer = api.Trainer(copy.deepcopy(tasks["vp"]), resumed, api.TrainConfig(
        steps=4, batch_size=8, lora_rank=4, run_dir=str(tmp_path)), progress=False)
    assert trainer.resume() and torch.equal(resumed.samples.x, method.samples.x)
