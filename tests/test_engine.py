"""The shared training engine: roles on one base, kill-safe checkpoints, bit-exact resume, loud failures."""

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from comfyui_distillery.core.models import DiffusersUNetModel
from comfyui_distillery.core.schedules import DiscreteVPSchedule
from comfyui_distillery.trainers import checkpoint as ckpt
from comfyui_distillery.trainers import lora
from comfyui_distillery.trainers.engine import Trainer, TrainConfig, TrainingDiverged
from comfyui_distillery.trainers.methods.dmd2 import DMD2
from comfyui_distillery.trainers.roles import build_roles
from comfyui_distillery.worlds.tasks import GaussianMixtureTask


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


@pytest.fixture(scope="module")
def small_task():
    return GaussianMixtureTask(width=32, fit_steps=30, schedule=DiscreteVPSchedule.sd15("v_prediction"))


def test_roles_share_one_base_and_switch_without_touching_requires_grad():
    base = DiffusersUNetModel(tiny_unet(), DiscreteVPSchedule.sd15())
    n_base = sum(p.numel() for p in base.parameters())
    roles = build_roles(base, None, with_critic=True, rank=4)
    x = torch.randn(2, 2, 8, 8)
    sigma = torch.tensor([3.0, 0.5])
    cond = torch.randn(2, 3, 16)
    # LoRA B starts at zero: student and critic equal the teacher until trained
    teacher = roles.teacher(x, sigma, cond)
    assert torch.allclose(roles.student(x, sigma, cond), teacher)
    flags = [p.requires_grad for p in base.parameters()]
    for params in roles.trainable.values():
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
    s, c, t = roles.student(x, sigma, cond), roles.critic(x, sigma, cond), roles.teacher(x, sigma, cond)
    assert not torch.allclose(s, t) and not torch.allclose(c, t) and not torch.allclose(s, c)
    assert torch.allclose(t, teacher)  # the frozen base is untouched
    assert [p.requires_grad for p in base.parameters()] == flags  # switching never flips requires_grad
    # gradients reach only the active adapter
    roles.student(x, sigma, cond).square().mean().backward()
    assert all(p.grad is not None for p in roles.trainable["student"])
    assert all(p.grad is None for p in roles.trainable["critic"])
    n_lora = sum(p.numel() for ps in roles.trainable.values() for p in ps)
    assert sum(p.numel() for p in base.parameters()) == n_base + n_lora  # one base, two adapters


def test_kohya_export_round_trip_and_scale_folding(tmp_path):
    unet = tiny_unet()
    lora.add_lora_adapter(unet, "student", rank=4, alpha=2.0)  # scale 0.5, folded into lora_up on export
    with torch.no_grad():
        for p in lora.adapter_parameters(unet, "student"):
            p.add_(0.1 * torch.randn_like(p))
    state = lora.kohya_unet_state_dict(unet, "student")
    assert all(k.startswith("lora_unet_") for k in state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert float(state["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 4.0
    lora.save_lora(tmp_path / "s.safetensors", state, {"distillery.method": "dmd2", "distillery.timesteps": [999]})
    assert lora.read_lora_metadata(tmp_path / "s.safetensors")["distillery.timesteps"] == [999]
    # merged weights: W + up @ down must equal the adapter's effect
    x = torch.randn(1, 2, 8, 8)
    cond = torch.randn(1, 3, 16)
    with lora.role(unet, "student"):
        expected = unet(x, 10, encoder_hidden_states=cond).sample
    fresh = tiny_unet()
    lora.add_lora_adapter(fresh, "student", rank=4, alpha=2.0)
    lora.load_kohya_unet_state_dict(fresh, "student", state)
    with lora.role(fresh, "student"):
        assert torch.allclose(fresh(x, 10, encoder_hidden_states=cond).sample, expected, atol=1e-5)


def _trainer(task, tmp_path, steps, **kw):
    cfg = TrainConfig(steps=steps, batch_size=16, student_lr=1e-3, critic_lr=1e-3, lora_rank=4,
                      run_dir=str(tmp_path), checkpoint_every=3, log_every=1, keep_checkpoints=2, **kw)
    return Trainer(task, DMD2(student_timesteps="999,499", guidance_scale=2.0, update_ratio=2), cfg,
                   progress=False)


def test_resume_after_a_kill_is_bit_exact(small_task, tmp_path):
    import copy

    straight = _trainer(copy.deepcopy(small_task), tmp_path / "a", steps=8, ema_decay=0.9)
    straight.train()
    # the same run, killed after step 6 (its last checkpoint), then resumed by a new process
    first = _trainer(copy.deepcopy(small_task), tmp_path / "b", steps=7, ema_decay=0.9)
    first.train()  # writes step 6 then a final step-7 checkpoint
    ckpt_dir = tmp_path / "b" / "checkpoints"
    (ckpt_dir / "step-00000007" / "state.pt").unlink()  # the kill: step 7 never completed
    (ckpt_dir / "step-00000007").rmdir()
    resumed = _trainer(copy.deepcopy(small_task), tmp_path / "b", steps=8, ema_decay=0.9)
    assert resumed.resume() and resumed.step == 6
    resumed.train()
    for role in ("student", "critic"):
        for p, q in zip(straight.roles.trainable[role], resumed.roles.trainable[role]):
            assert torch.equal(p, q)
    for e, f in zip(straight.ema, resumed.ema):
        assert torch.equal(e, f)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # metrics after the resumed step were rewritten, not duplicated
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["step-00000006", "step-00000008"]


def test_more_steps_continue_the_cosine_schedule_without_a_jump(small_task, tmp_path):
    """A cosine run resumed with more steps goes on from its own learning rate down to 10% at the new last
    step (recomputing the cosine over the new horizon would jump a finished run's rate from 10% back up).
    The rate logged at step s is the one set after iteration s - 1, at progress (s - 1) / steps."""
    import copy
    import math

    def cosine(progress):
        return 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    def rates(run_dir):
        return [json.loads(line)["lr/critic"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    _trainer(copy.deepcopy(small_task), tmp_path, steps=6, lr_schedule="cosine").train()
    assert rates(tmp_path) == pytest.approx([cosine(i / 6) for i in range(6)])
    more = _trainer(copy.deepcopy(small_task), tmp_path, steps=12, lr_schedule="cosine")
    assert more.resume() and more.step == 6
    more.train()
    assert rates(tmp_path)[6:] == pytest.approx([1e-4] * 6)  # a finished schedule keeps its final rate

    # resumed mid-run with more steps: the old schedule's rate at the resume, then stretched to the new end
    mid = tmp_path / "mid"
    _trainer(copy.deepcopy(small_task), mid, steps=8, lr_schedule="cosine").train(until=3)
    more = _trainer(copy.deepcopy(small_task), mid, steps=13, lr_schedule="cosine")
    assert more.resume() and more.step == 3
    more.train()
    expected = [cosine(i / 8) for i in range(3)] + [cosine(3 / 8 + 5 / 8 * i / 10) for i in range(10)]
    assert rates(mid) == pytest.approx(expected)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_task, tmp_path):
    import copy

    trainer = _trainer(copy.deepcopy(small_task), tmp_path, steps=10)
    original = trainer.method.loss

    def poisoned(role, ctx):
        loss, metrics = original(role, ctx)
        return (loss * math.nan if ctx.step == 4 else loss), metrics

    trainer.method.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 4: the \w+ loss is nan.*step-00000003"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(t).all() for ts in state["trainable"].values() for t in ts)


def test_atomic_checkpoint_leaves_no_partial_state(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ckpt.save_checkpoint(tmp_path, 1, {"x": 1, "rng": ckpt.rng_state(gen)})
    (tmp_path / "checkpoints" / ".step-00000002.partial").mkdir()  # a write that died half-way
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"


@pytest.mark.parametrize("value,match", [
    ("1000,749", "out of range"), ("249,499", "strictly decreasing"), ("", "is empty"), ("9x9", "not a number"),
])
def test_bad_timesteps_fail_before_training(small_task, tmp_path, value, match):
    with pytest.raises(ValueError, match="student_timesteps.*" + match):
        Trainer(small_task, DMD2(student_timesteps=value), TrainConfig(run_dir=str(tmp_path)), progress=False)


def test_bad_config_fails_before_any_work(small_task, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        _trainer(small_task, tmp_path, steps=1, mixed_precision="fp8")
    with pytest.raises(ValueError, match="update_ratio=0"):
        Trainer(small_task, DMD2(update_ratio=0), TrainConfig(run_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="needs real images"):
        class NoImages(GaussianMixtureTask):
            has_real_images = False
        task = NoImages.__new__(NoImages)
        task.__dict__.update(small_task.__dict__)
        Trainer(task, DMD2(gan_generator_weight=0.1), TrainConfig(run_dir=str(tmp_path)), progress=False)


def _unet_task():
    from comfyui_distillery.trainers.tasks import DiffusersUNetTask

    def prompts(batch, generator):
        cond = torch.randn(batch, 3, 16, generator=generator)
        return cond, torch.zeros(batch, 3, 16)

    return DiffusersUNetTask(tiny_unet(), DiscreteVPSchedule.sd15(), (2, 8, 8), prompts, default_guidance=2.0)


def test_gradient_checkpointing_recomputes_under_the_forward_role(tmp_path):
    """DMD2 and SiD switch adapters between forward and backward; checkpointing must not mix them up."""
    results = []
    for ckpt_on in (False, True):
        cfg = TrainConfig(steps=2, batch_size=2, lora_rank=4, run_dir=str(tmp_path / str(ckpt_on)),
                          checkpoint_every=0, gradient_checkpointing=ckpt_on)
        from comfyui_distillery.trainers.methods.sid import SiD

        trainer = Trainer(_unet_task(), SiD(student_timesteps="999,499"), cfg, progress=False)
        trainer.train()
        results.append([p.detach().clone() for ps in trainer.roles.trainable.values() for p in ps])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_memory_plan_counts_exactly_what_peft_trains():
    from comfyui_distillery.trainers.memory import TRAINED_BYTES, plan

    base = DiffusersUNetModel(tiny_unet(), DiscreteVPSchedule.sd15())
    frozen = sum(p.numel() * p.element_size() for p in base.parameters())
    expected = plan(base, lora.UNET_TARGET_MODULES, full_finetune=False, rank=4, critic_rank=8, with_critic=True,
                    ema=True)
    roles = build_roles(base, None, with_critic=True, rank=4, critic_rank=8, target_modules=lora.UNET_TARGET_MODULES)
    trained = {r: sum(p.numel() for p in ps) for r, ps in roles.trainable.items()}
    assert expected.trained_params == trained and trained["critic"] == 2 * trained["student"]
    assert expected.frozen_bytes == frozen
    # every role's weights and moments, one role's gradients and foreach temporary at a time, the EMA
    assert expected.static_bytes == (frozen + TRAINED_BYTES * sum(trained.values()) + 4 * trained["student"]
                                     + (4 + 4) * max(trained.values()))


def test_a_run_that_cannot_fit_fails_before_the_weights_move(small_task, tmp_path, monkeypatch):
    import copy

    from comfyui_distillery.trainers import memory

    task = copy.deepcopy(small_task)
    before = [n for n, _ in task.base.named_parameters()]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 ** 10)
    with pytest.raises(memory.NotEnoughMemory,
                       match=r"not enough memory on cpu: frozen base .* only 0\.00 GiB is free.*close other programs"):
        _trainer(task, tmp_path, steps=3)
    assert [n for n, _ in task.base.named_parameters()] == before  # no adapter was even added
    assert not (tmp_path / "checkpoints").exists()


def test_out_of_memory_in_a_step_says_what_would_fit_and_keeps_the_checkpoint(small_task, tmp_path):
    import copy

    from comfyui_distillery.trainers.memory import NotEnoughMemory

    trainer = _trainer(copy.deepcopy(small_task), tmp_path, steps=10)
    original = trainer.method.loss

    def too_big(role, ctx):
        if ctx.step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(role, ctx)

    trainer.method.loss = too_big
    bs = trainer.config.batch_size
    with pytest.raises(NotEnoughMemory, match=rf"step 5 with batch_size={bs}.*gradient_checkpointing=on.*"
                                              rf"micro_batch_size=1"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"


def test_resuming_a_run_dir_with_other_settings_names_what_changed(small_task, tmp_path):
    import copy

    _trainer(copy.deepcopy(small_task), tmp_path, steps=3).train()
    cfg = TrainConfig(steps=6, batch_size=16, lora_rank=8, run_dir=str(tmp_path), checkpoint_every=3, log_every=1)
    other = Trainer(copy.deepcopy(small_task), DMD2(student_timesteps="999", guidance_scale=2.0, update_ratio=2),
                    cfg, progress=False)
    with pytest.raises(ValueError, match=r"step-00000003 is a different run \(student_timesteps \[999, 499\] -> "
                                         r"\[999\]; lora_rank 4 -> 8\).*--no-resume"):
        other.resume()
    longer = _trainer(copy.deepcopy(small_task), tmp_path, steps=6, grad_clip=5.0)  # more steps, new clip: fine
    assert longer.resume() and longer.step == 3


def test_the_exported_student_is_the_ema_and_training_weights_come_back(small_task, tmp_path):
    """export_student writes the EMA's LoRA; inside `exported_student()` the live student is the EMA, and after
    it (and after export) the trained weights are back bit for bit, so a run can go on or be evaluated again."""
    import copy

    from safetensors.torch import load_file

    from comfyui_distillery.trainers import api

    trainer = _trainer(copy.deepcopy(small_task), tmp_path / "run", steps=6, ema_decay=0.5)
    trainer.train()
    params = trainer.roles.trainable["student"]
    trained = [p.detach().clone() for p in params]
    trained_lora = trainer.task.export_lora("student")
    assert any(not torch.equal(p, e) for p, e in zip(trained, trainer.ema))  # the EMA lags: the two differ

    saved = load_file(str(api.export_student(trainer, tmp_path / "student.safetensors")))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    with trainer.exported_student() as student:
        assert student is trainer.roles.student
        assert all(torch.equal(p, e) for p, e in zip(params, trainer.ema))
        ema_lora = trainer.task.export_lora("student")
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    assert saved.keys() == ema_lora.keys()
    assert all(torch.equal(saved[k], ema_lora[k].contiguous()) for k in saved)
    assert any(not torch.equal(saved[k], trained_lora[k].contiguous()) for k in saved)
