"""Distillation methods against the exact teacher of the Gaussian-mixture world.

The bar (issues 5, 6, 7): the student's sliced Wasserstein distance to the true distribution is within
1.5x of the teacher's own 50-step sampler, and every mode keeps >= 90% of its mass (per-mode recall).
Recall is the likelihood rule of issue 18 (worlds.gmm.mode_report: a sample counts for the highest-posterior
mode of its class if its squared Mahalanobis distance is within the chi-square(d) 0.999 quantile, a radius
of 3.72 stds in this 2-d world; exact samples score 0.999). The numbers below were measured with the former
rule (3 stds per coordinate in RMS, a radius of 4.24 stds here), which the new one only tightens in 2-d;
each test also prints the former rule's recall_rms_min and the off-mode share.
Seeds are fixed, so these are deterministic tests. Status on 2026-11-22 (README): all pass, scored on 20000
samples per class (teacher 50-step DDIM: SWD 0.077, min recall 0.967; DMD2 1 step 0.076 / 0.928, DMD2 4 steps
0.035 / 0.957, SiD 1 step 0.067 / 0.938, SiD 4 steps 0.055 / 0.918, TCD 4 steps 0.073 / 0.962). A 1-step student's only systematic loss is the bridge between
the two modes of a class (3.5-5% of samples in one-off analysis runs), which a continuous map from one Gaussian cannot avoid entirely.
The student network is an MLP that first imitates the exact teacher (as DMD2 initialises from the teacher),
trained in full (the engine's mode for small models).
"""

import copy
import os

import pytest
import torch

from comfyui_distillery.core.models import Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule
from comfyui_distillery.sampling import sample_ddim, sample_tcd, sample_x0_renoise
from comfyui_distillery.sampling.timesteps import lcm_tcd_timesteps, timesteps_to_sigmas, trailing_timesteps
from comfyui_distillery.trainers import api
from comfyui_distillery.worlds.tasks import GaussianMixtureTask
from comfyui_distillery.worlds.gmm import evaluate_gmm_samples

# Each test trains for thousands of iterations (3-15 minutes each on one CPU thread), so they are opt-in:
#     DISTILLERY_QUALITY_TESTS=1 python -m pytest tests/test_methods_gmm.py -s
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("DISTILLERY_QUALITY_TESTS"),
                       reason="quality tests train for minutes; set DISTILLERY_QUALITY_TESTS=1 to run them"),
]

# 20000 samples per class: a 0.3-weight mode's recall then has a standard error of 0.011. With 2000 per class it
# is 0.034, and exact samples of the true mixture score a minimum recall of 0.92, so a 0.9 bar would be read
# off sampling noise rather than off the student.
LABELS = torch.arange(4).repeat_interleave(20000)


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    return GaussianMixtureTask(schedule=DiscreteVPSchedule.sd15("v_prediction"), fit_steps=1500)


def _noise(seed=0):
    return torch.randn(len(LABELS), 2, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher_swd(task):
    schedule = task.teacher.schedule
    sigmas = timesteps_to_sigmas(schedule, trailing_timesteps(50))
    x = sample_ddim(Guided(task.teacher, LABELS), _noise().double() * sigmas[0], sigmas, schedule=schedule,
                    disable=True)
    return evaluate_gmm_samples(task.mixture, x, LABELS)["swd"]


def _train(task, method, tmp_path, steps, **cfg):
    config = api.TrainConfig(steps=steps, full_finetune=True, run_dir=str(tmp_path), checkpoint_every=0,
                             log_every=100, weight_decay=0.0, **cfg)
    result = api.distill(copy.deepcopy(task), method, config, progress=False)
    trainer = result["trainer"]
    trainer.use_exported_student()
    return trainer.roles.student


def _assert_meets_the_bar(task, teacher_swd, x):
    res = evaluate_gmm_samples(task.mixture, x.double(), LABELS)
    print({k: v for k, v in res.items() if isinstance(v, float)}, res["recall"])
    assert res["swd"] < 1.5 * teacher_swd, (res["swd"], teacher_swd)
    assert res["recall_min"] >= 0.9, (res["recall_min"], res["recall_rms_min"], res["off_mode_share"])


def _x0_renoise_sample(student, timesteps=(999,)):
    sigmas = timesteps_to_sigmas(student.schedule, list(timesteps))
    with torch.no_grad():
        return sample_x0_renoise(Guided(student, LABELS), _noise() * sigmas[0], sigmas, schedule=student.schedule,
                                 disable=True, extra_args={"seed": 1})


def test_dmd2_one_step_student_matches_the_data(task, teacher_swd, tmp_path):
    method = api.make_method("dmd2", student_timesteps="999", guidance_scale=1.0, update_ratio=5)
    student = _train(task, method, tmp_path, 6000, batch_size=512, student_lr=1e-3, critic_lr=2e-3,
                     lr_schedule="cosine", ema_decay=0.99)
    _assert_meets_the_bar(task, teacher_swd, _x0_renoise_sample(student))


def test_dmd2_dedicated_four_step_student_matches_the_data(task, teacher_swd, tmp_path):
    """exit_step="last": trained on its 4-step output only. With DMD2's default uniform exit the 4-step output
    misses the bar here (README): one critic for every step's output pins only their mixture."""
    method = api.make_method("dmd2", student_timesteps="999,749,499,249", exit_step="last", guidance_scale=1.0,
                             update_ratio=5)
    student = _train(task, method, tmp_path, 12000, batch_size=512, student_lr=1e-3, critic_lr=2e-3,
                     lr_schedule="cosine", ema_decay=0.99)
    _assert_meets_the_bar(task, teacher_swd, _x0_renoise_sample(student, (999, 749, 499, 249)))


def test_dmd2_four_step_student_with_a_critic_per_step_matches_the_data(task, teacher_swd, tmp_path):
    """exit_step="uniform" (every step trained, the exit drawn per batch) with critic_per_step: each step's
    outputs have a critic of their own, so the 4-step output is matched, not only the mixture of all steps'."""
    method = api.make_method("dmd2", student_timesteps="999,749,499,249", exit_step="uniform", critic_per_step=True,
                             guidance_scale=1.0, update_ratio=5)
    student = _train(task, method, tmp_path, 12000, batch_size=512, student_lr=1e-3, critic_lr=2e-3,
                     lr_schedule="cosine", ema_decay=0.99)
    for steps in (2, 3):  # the shorter runs of its own timesteps, reported
        res = evaluate_gmm_samples(task.mixture, _x0_renoise_sample(student, (999, 749, 499, 249)[:steps]).double(),
                                   LABELS)
        print(f"{steps} steps: swd {res['swd']:.4f} (teacher {teacher_swd:.4f}), recall min {res['recall_min']:.3f}")
    _assert_meets_the_bar(task, teacher_swd, _x0_renoise_sample(student, (999, 749, 499, 249)))


def test_tcd_four_step_student_with_the_tcd_sampler(task, teacher_swd, tmp_path):
    """TCD (no critic) at 4 steps on the TCD grid, sampled with gamma 0.3 as its LoRA metadata says."""
    method = api.make_method("tcd", mode="tcd", guidance_min=1.0, guidance_max=1.0)
    student = _train(task, method, tmp_path, 3000, batch_size=256, student_lr=1e-3, lr_schedule="cosine",
                     ema_decay=0.99)
    assert method.sampler_metadata()["sampler"] == "tcd" and method.sampler_metadata()["gamma"] == 0.3
    sigmas = timesteps_to_sigmas(student.schedule, lcm_tcd_timesteps(4))
    with torch.no_grad():
        x = sample_tcd(Guided(student, LABELS), _noise() * sigmas[0], sigmas, schedule=student.schedule,
                       gamma=0.3, disable=True, extra_args={"seed": 1})
    _assert_meets_the_bar(task, teacher_swd, x)


def test_sid_one_step_student_matches_the_data(task, teacher_swd, tmp_path):
    """SiD as its paper trains it: Adam with beta1 = 0, one fake-score update per generator update."""
    method = api.make_method("sid", student_timesteps="999", guidance_mode="lsg", kappa=1.0, alpha=1.0)
    student = _train(task, method, tmp_path, 12000, batch_size=512, student_lr=3e-4, critic_lr=3e-4,
                     betas=(0.0, 0.999), lr_schedule="cosine", ema_decay=0.99)
    _assert_meets_the_bar(task, teacher_swd, _x0_renoise_sample(student))


def test_sid_dedicated_four_step_student_matches_the_data(task, teacher_swd, tmp_path):
    """Few-step SiD trained on its 4-step output only (exit_step="last"); its uniform mixture misses the bar here."""
    method = api.make_method("sid", student_timesteps="999,749,499,249", exit_step="last", guidance_mode="lsg",
                             kappa=1.0, alpha=1.0)
    student = _train(task, method, tmp_path, 12000, batch_size=512, student_lr=3e-4, critic_lr=3e-4,
                     betas=(0.0, 0.999), lr_schedule="cosine", ema_decay=0.99)
    _assert_meets_the_bar(task, teacher_swd, _x0_renoise_sample(student, (999, 749, 499, 249)))
