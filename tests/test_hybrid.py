"""Hybrid base-then-student sampling and diffusion-target collection, on the exact Gaussian-mixture world.

The teacher is the analytic mixture denoiser (no training error), so "the hybrid with a student equal to the
teacher is the teacher's own trajectory" can be checked to float64 round-off: any re-noising or x0 round trip
at the hand-off would show.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_distillery.core.models import Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.sampling import (replay_noise_sampler, sample_ddim, sample_tcd, sample_x0_renoise,
                                         timesteps_to_sigmas)
from comfyui_distillery.sampling.diffusion_targets import DTCollector, dt_grid
from comfyui_distillery.sampling.hybrid import hybrid_sigmas, sample_hybrid
from comfyui_distillery.worlds.gmm import GaussianMixture, GaussianMixtureTeacher
from comfyui_distillery.worlds.plots import scatter_decoder

STUDENT_T = [999, 749, 499, 249]
BASE_T = [999 - 50 * i for i in range(20)]  # ComfyUI's "simple" x 20 on SD1.5: 999, 949, ..., 49
KINDS = ["epsilon", "v_prediction", "flow"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_schedule(kind):
    return RectifiedFlowSchedule(shift=3.0) if kind == "flow" else DiscreteVPSchedule.sd15(kind)


def grids(schedule):
    if schedule.discrete:
        return timesteps_to_sigmas(schedule, BASE_T), timesteps_to_sigmas(schedule, STUDENT_T)
    return (timesteps_to_sigmas(schedule, [1000 - 50 * i for i in range(20)]),
            timesteps_to_sigmas(schedule, [1000, 750, 500, 250]))


def world(kind, cfg=3.0, batch=16):
    schedule = make_schedule(kind)
    teacher = GaussianMixtureTeacher(GaussianMixture.default(), schedule)
    labels = torch.arange(4).repeat(batch // 4)
    guided = Guided(teacher, labels, torch.full_like(labels, 4), cfg)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 2, generator=g, dtype=torch.float64)
    return schedule, teacher, labels, guided, noise


def start_state(schedule, noise, sigma):
    a, s = schedule.scales(torch.as_tensor(float(sigma), dtype=torch.float64))
    return noise * (a * a + s * s).sqrt()


# --- the hand-off ---------------------------------------------------------------------------------------

def test_handoff_snaps_to_a_student_level_and_says_so():
    schedule = DiscreteVPSchedule.sd15()
    base, student = grids(schedule)
    plan = hybrid_sigmas(base, student, schedule=schedule, base_steps=1)  # one step of 20 ends at t=949
    assert plan.snapped and plan.requested_timestep == 949 and plan.timestep == 749
    assert plan.base_steps == 5 and plan.student_steps == 3  # the base runs 999..799, landing on 749
    text = plan.describe(schedule)
    assert "requested at t=949" in text and "snapped to the student's level t=749" in text
    assert "base: 5 step(s) over t = 999, 949, 899, 849, 799, 749" in text
    assert plan.as_dict()["snapped_from"] == 949

    exact = hybrid_sigmas(base, student, schedule=schedule, base_steps=5)  # t=749 is on the base grid
    assert not exact.snapped and exact.timestep == 749 and "exact" in exact.describe(schedule)
    assert torch.equal(exact.base_sigmas, plan.base_sigmas)

    by_t = hybrid_sigmas(base, student, schedule=schedule, timestep=600)  # |600-499| < |600-749|
    assert by_t.snapped and by_t.timestep == 499 and by_t.student_index == 2
    by_index = hybrid_sigmas(base, student, schedule=schedule, student_index=2)
    assert by_index.timestep == 499 and not by_index.snapped
    assert hybrid_sigmas(base, student, schedule=schedule).timestep == 749  # default: the reference's index 1

    student_levels = {round(float(s), 10) for s in student}
    for k in range(1, 20):
        p = hybrid_sigmas(base, student, schedule=schedule, base_steps=k)
        # the hand-off always lands exactly on a student level; the base's part ends on it, the student's starts
        assert round(p.sigma, 10) in student_levels
        assert float(p.base_sigmas[-1]) == float(p.student_sigmas[0]) == p.sigma
        assert bool((p.base_sigmas[:-1] > p.sigma).all())
        merged = p.merged_sigmas()
        assert bool((merged[1:] < merged[:-1]).all()) and float(merged[-1]) == 0


def test_handoff_edges_and_errors():
    schedule = DiscreteVPSchedule.sd15()
    base, student = grids(schedule)
    alone = hybrid_sigmas(base, student, schedule=schedule, base_steps=0)
    assert alone.base_steps == 0 and alone.student_steps == 4 and "student runs" in alone.describe(schedule)
    only_base = hybrid_sigmas(base, student, schedule=schedule, base_steps=20)
    assert only_base.student_steps == 0 and only_base.base_steps == 20
    with pytest.raises(ValueError, match="give one of"):
        hybrid_sigmas(base, student, schedule=schedule, base_steps=2, timestep=500)
    with pytest.raises(ValueError, match="base_steps=21"):
        hybrid_sigmas(base, student, schedule=schedule, base_steps=21)
    with pytest.raises(ValueError, match="student_index=7"):
        hybrid_sigmas(base, student, schedule=schedule, student_index=7)
    low_base = timesteps_to_sigmas(schedule, [500, 250])
    with pytest.raises(ValueError, match="no student level lies below"):
        hybrid_sigmas(low_base, timesteps_to_sigmas(schedule, [999, 749]), schedule=schedule, base_steps=1)
    with pytest.raises(ValueError, match="last sigma must be 0"):
        hybrid_sigmas(base[:-1], student, schedule=schedule, base_steps=1)


# --- noise is added once ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_student_equal_to_teacher_reproduces_the_teachers_trajectory(kind):
    schedule, teacher, labels, guided, noise = world(kind)
    base, student = grids(schedule)
    plan = hybrid_sigmas(base, student, schedule=schedule, base_steps=3)
    x = start_state(schedule, noise, base[0])
    seen = []
    out, info = sample_hybrid(guided, guided, x, base, student, schedule=schedule, base_steps=3,
                              base_sampler="ddim", student_sampler="ddim",
                              callback=lambda d: seen.append((d["stage"], float(d["sigma"]), d["x"].clone())))
    reference_states = []
    ref = sample_ddim(guided, x, plan.merged_sigmas(), schedule=schedule,
                      callback=lambda d: reference_states.append(d["x"].clone()))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12), float((out - ref).abs().max())
    # step by step: the same levels, the same states, the student's first state is the base's last output
    assert [s for _, s, _ in seen] == [float(s) for s in plan.merged_sigmas()[:-1]]
    assert [st for st, _, _ in seen] == ["base"] * plan.base_steps + ["student"] * plan.student_steps
    for (_, _, got), want in zip(seen, reference_states):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert info["handoff_timestep"] == pytest.approx(schedule.timestep(torch.tensor(plan.sigma)).item())


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_student_draws_noise_only_inside_its_own_stage(kind):
    schedule, teacher, labels, guided, noise = world(kind, cfg=1.0)
    base, student = grids(schedule)
    plan = hybrid_sigmas(base, student, schedule=schedule, student_index=1)
    x = start_state(schedule, noise, base[0])
    g = torch.Generator().manual_seed(5)
    zs = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(plan.student_steps - 1)]
    replay = replay_noise_sampler(zs)  # raises if anyone asks for one more tensor (e.g. at the hand-off)
    out, info = sample_hybrid(guided, guided, x, base, student, schedule=schedule, student_index=1,
                              base_sampler="ddim", student_sampler="x0_renoise", noise_sampler=replay)
    assert replay.used == plan.student_steps - 1
    x_handoff = sample_ddim(guided, x, plan.base_sigmas, schedule=schedule)
    ref = sample_x0_renoise(guided, x_handoff, plan.student_sigmas, schedule=schedule,
                            noise_sampler=replay_noise_sampler(zs))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


# --- evaluation counts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_counts(kind):
    schedule, teacher, labels, guided, noise = world(kind, cfg=3.0)
    student_model = Guided(teacher, labels)  # cfg 1: one evaluation per step
    base, student = grids(schedule)
    x = start_state(schedule, noise, base[0])
    for k in (1, 5, 12):
        plan = hybrid_sigmas(base, student, schedule=schedule, base_steps=k)
        guided.calls = student_model.calls = 0
        out, info = sample_hybrid(guided, student_model, x, base, student, schedule=schedule, base_steps=k,
                                  student_sampler="tcd", student_options={"gamma": 0.3}, extra_args={"seed": 1})
        assert info["base_evals"] == 2 * plan.base_steps == guided.calls  # a CFG pair counts 2
        assert info["student_evals"] == plan.student_steps == student_model.calls
        assert info["evals_per_sample"] == 2 * plan.base_steps + plan.student_steps
        assert torch.isfinite(out).all()
    # one guided base step, then the 4-step student from its second level: 2 + 3 = student's 4 + 1
    one = timesteps_to_sigmas(schedule, [STUDENT_T[0], STUDENT_T[1]]) if schedule.discrete else \
        timesteps_to_sigmas(schedule, [1000, 750])
    _, info = sample_hybrid(guided, student_model, x, one, student, schedule=schedule, base_steps=1)
    assert info["evals_per_sample"] == 5 and not info["snapped"]
    # plain callables (no .calls): say whether a call is a CFG pair
    _, info = sample_hybrid(lambda x, s, **k: guided(x, s), lambda x, s, **k: student_model(x, s), x, one, student,
                            schedule=schedule, base_steps=1, base_guided=True, student_guided=False)
    assert info["evals_per_sample"] == 5


# --- diffusion targets ------------------------------------------------------------------------------------

def test_dt_collector_records_every_step_of_any_run_and_grids_them():
    schedule, teacher, labels, guided, noise = world("epsilon", batch=8)
    base, student = grids(schedule)
    x = start_state(schedule, noise, base[0])
    col = DTCollector(max_images=None, schedule=schedule)
    _, info = sample_hybrid(guided, guided, x, base, student, schedule=schedule, base_steps=2, callback=col)
    assert col.stages == ["base", "student"]
    assert len(col.records) == info["base_steps"] + info["student_steps"]
    assert [round(r.timestep) for r in col.records] == [999, 949, 899, 849, 799, 749, 499, 249]
    assert all(r.denoised.shape == (8, 2) and r.denoised.dtype == torch.float32 for r in col.records)
    grid = dt_grid(col, scatter_decoder(size=40, labels=labels), max_images=1)
    assert grid.ndim == 3 and grid.shape[-1] == 3 and 0 <= float(grid.min()) and float(grid.max()) <= 1
    # rows = 8 steps of >= 48 px, columns = 2 stages
    assert grid.shape[0] >= 8 * 48 and grid.shape[1] >= 2 * 48
    # a second run (the student alone) shares the rows of the levels it has in common: 3 columns, 8 rows
    alone = DTCollector(max_images=None, schedule=schedule, stage="student alone")
    sample_x0_renoise(guided, x, student, schedule=schedule, callback=alone, extra_args={"seed": 0})
    both = dt_grid(col.records + alone.records, scatter_decoder(size=40), max_images=1,
                   stages=["base", "student", "student alone"])
    assert both.shape[0] == grid.shape[0] and both.shape[1] > grid.shape[1]

    # a plain sampler run, and the ComfyUI-style callback (step, x0, x, total) with images [B, C, H, W]
    plain = DTCollector(max_images=2, stage="tcd", schedule=schedule)
    sample_tcd(guided, x, student, schedule=schedule, callback=plain, extra_args={"seed": 0})
    assert [r.stage for r in plain.records] == ["tcd"] * 4 and plain.records[0].denoised.shape == (2, 2)
    images = DTCollector(max_images=3)
    sig = torch.tensor([14.6, 4.0, 0.0])
    cb = images.comfy_callback(sig, stage="run", timestep_fn=lambda s: 1000 * s / 14.6)
    for i in range(2):
        cb(i, torch.rand(5, 1, 16, 16) * 2 - 1, None, 2)
    assert len(images.records) == 2 and images.records[1].sigma == pytest.approx(4.0)
    img = dt_grid(images, max_images=3, value_range=(-1, 1))
    assert img.shape[-1] == 3 and img.shape[0] >= 2 * 48
    with pytest.raises(ValueError, match="no steps were recorded"):
        dt_grid(DTCollector())
