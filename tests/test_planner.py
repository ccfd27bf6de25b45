"""The VRAM planner (trainers/planner.py) against the real run, and the memory arithmetic against the planner.

The planner's dry run (fake tensors, no storage) must predict the peak that the same run reaches with real
tensors on this CPU, for a tiny UNet and a tiny DiT, every method, with and without gradient checkpointing
(asserted within 5%; it is exact). The real peak is the same live-storage tracker in real mode, which is
itself checked against an independent count: the bytes of every tensor the garbage collector can see.
"""

from __future__ import annotations

import gc

import pytest
import torch

from comfyui_distillery.trainers import memory, planner
from comfyui_distillery.trainers.architectures import SD3_TARGET_MODULES, Arch

# smaller than the tiny twins: the same kinds of block (resnets, one cross-attention transformer, down / up
# sampling; the joint-attention DiT) in as few modules as possible, so each dry run takes about a second
MICRO_UNET = Arch("micro-unet", "micro UNet", "unet", dict(
    sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    mid_block_type=None, cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4), 32, 4, 8)
MICRO_DIT = Arch("micro-dit", "micro SD3-shaped DiT", "dit", dict(
    sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
    num_attention_heads=1, joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=8,
    pos_embed_max_size=8), 32, 4, 8, pooled_dim=8, lora_targets=list(SD3_TARGET_MODULES))
TRAIN = {"batch_size": 2, "lora_rank": 2, "mixed_precision": "bf16"}
# a 1-step student: the real run draws its backward-simulation exit step at random, the dry run takes 0
ONE_STEP = {"dmd2": {"student_timesteps": "399"}, "sid": {"student_timesteps": "399"}, "tcd": {}}


@pytest.fixture(autouse=True)
def one_thread():
    """Micro networks: threads only cost (and the 2-core CI box may be busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", [MICRO_UNET, MICRO_DIT], ids=lambda a: a.name)
@pytest.mark.parametrize("method", ["dmd2", "sid", "tcd"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_planned_peak_is_the_real_peak(arch, method, checkpointing, planned_and_real):
    train = {**TRAIN, "gradient_checkpointing": checkpointing}
    options = dict(ONE_STEP[method])
    if method == "dmd2" and checkpointing:  # one iteration kind (student + critic) is enough here; saves time
        options["update_ratio"] = 1
    planned, real = planned_and_real(arch, method, options, train)
    assert planned.fake and not real.fake


def test_the_regression_pass_is_planned_to_the_byte(planned_and_real):
    """DMD's regression term (regression_weight) runs the teacher's DDIM for its pairs and keeps a second student
    graph alive at the backward: the dry run plans both."""
    base = {**ONE_STEP["dmd2"], "update_ratio": 1}
    plain = planner.plan(MICRO_UNET, "dmd2", base, train=TRAIN, device="cpu", fake=True, flops=False)
    planned, real = planned_and_real(MICRO_UNET, "dmd2", {**base, "regression_weight": 1.0, "regression_steps": 3},
                                     TRAIN)
    assert [it.peak_bytes for it in planned.iterations] == [it.peak_bytes for it in real.iterations]
    assert planned.iterations[0].peak_bytes > plain.iterations[0].peak_bytes  # the regression costs memory


def test_the_real_mode_tracker_counts_every_live_tensor():
    """At a point where everything alive is reachable from Python (after the iterations: weights, moments,
    the method's cached samples), the tracker's live bytes equal the storages the garbage collector sees."""
    seen = {}

    def probe(tracker, trainer):
        gc.collect()
        seen["tracker"] = tracker.live
        seen["gc"] = planner.live_tensor_bytes() - seen["before"]

    gc.collect()
    seen["before"] = planner.live_tensor_bytes()
    planner.plan(MICRO_UNET, "dmd2", ONE_STEP["dmd2"], train=TRAIN, device="cpu", fake=False, flops=False,
                 probe=probe)
    assert seen["tracker"] > 0 and seen["tracker"] == seen["gc"], seen


def test_static_arithmetic_matches_the_planner_at_the_optimizer_step():
    """memory.plan's arithmetic (every role's weights and AdamW moments, one role's gradients and foreach
    temporary) is what the dry run holds at the critic's optimizer step, part by part."""
    p = planner.plan(MICRO_UNET, "dmd2", {**ONE_STEP["dmd2"], "update_ratio": 1}, train=TRAIN, device="cuda",
                     fake=True, flops=False)
    static = p.static
    trained = static["trained_params"]
    critic_step = p.iterations[0]  # student, then critic (whose step comes after the student's grads are freed)
    assert critic_step.phases == ["student", "critic"]
    at_step = critic_step.stage_breakdowns["critic optimizer step"]
    assert at_step["frozen weights"] == static["frozen_bytes"]
    assert at_step["trainable weights"] == 4 * sum(trained.values())
    # AdamW also keeps a 4-byte step counter per parameter tensor
    assert 0 <= at_step["optimizer state"] - 8 * sum(trained.values()) <= 4 * static["trained_tensors"]
    assert at_step["gradients"] == 4 * trained["critic"] == static["grad_bytes"]
    assert at_step["temporaries"] >= static["temporary_bytes"] == 4 * trained["critic"]
    accounted = sum(at_step[c] for c in ("frozen weights", "trainable weights", "optimizer state", "gradients"))
    assert accounted + static["temporary_bytes"] <= static["static_bytes"] + 4 * static["trained_tensors"]
    assert static["static_bytes"] <= critic_step.stages["critic optimizer step"]


def test_cuda_policy_runs_norms_and_upsampling_in_fp32_like_cuda_autocast():
    x = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    w = torch.randn(8, 8, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with planner.CudaAutocastPolicy():
            assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32
            assert torch.nn.functional.layer_norm(x, (4,)).dtype == torch.float32
            assert torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest").dtype == torch.float32
            assert torch.nn.functional.softmax(x, dim=-1).dtype == torch.float32
            assert torch.nn.functional.conv2d(x.float(), w, padding=1).dtype == torch.bfloat16  # CPU autocast's
            assert torch.einsum("bchw,bchw->b", x.float(), x.float()).dtype == torch.bfloat16
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.bfloat16  # CPU autocast alone differs


def test_memory_arithmetic_counts_one_roles_gradients_and_the_foreach_temporary():
    plan = memory.MemoryPlan(frozen_bytes=100, trained_params={"student": 10, "critic": 20}, ema_params=10)
    assert plan.static_bytes == 100 + 12 * 30 + 4 * 10 + 4 * 20 + 4 * 20
    no_foreach = memory.MemoryPlan(100, {"student": 10, "critic": 20}, 10, foreach=False)
    assert plan.static_bytes - no_foreach.static_bytes == 4 * 20
    assert "foreach AdamW temporary" in plan.describe() and "foreach" not in no_foreach.describe()


@pytest.mark.parametrize("text, gib", [("12GB", 12), ("12 GiB", 12), ("8g", 8), ("11.5", 11.5)])
def test_vram_sizes(text, gib):
    assert planner.parse_size(text) == int(gib * 2 ** 30)


def test_bad_vram_size_is_one_clear_error():
    with pytest.raises(ValueError, match="a size like 12GB"):
        planner.parse_size("twelve")


def test_a_plan_made_in_inference_mode_is_the_same_plan():
    """ComfyUI runs its nodes under torch.inference_mode(); the plan node's dry run still needs autograd."""
    train = {**TRAIN, "gradient_checkpointing": "on"}
    outside = planner.plan(MICRO_UNET, "tcd", train=train, device="cpu", flops=False)
    with torch.inference_mode():
        inside = planner.plan(MICRO_UNET, "tcd", train=train, device="cpu", flops=False)
    assert inside.peak_bytes == outside.peak_bytes > 0
