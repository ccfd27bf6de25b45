"""LoRAs on the digits teacher and on its students (worlds/digits/style.py, trainers/lora.merged_kohya_unet_lora).

The full measurement is benchmarks/control_transfer.py; here a tiny budget checks the two properties it
rests on: a merged kohya LoRA is exactly peft's adapter, and a style LoRA's effect reaches a DMD2 student
through the distillation loss alone (a student on the bare base, its teacher the styled network).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("sklearn")

from comfyui_distillery.core.models import DiffusersUNetModel, Guided  # noqa: E402
from comfyui_distillery.sampling import sample_ddim, sample_x0_renoise  # noqa: E402
from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas, trailing_timesteps  # noqa: E402
from comfyui_distillery.trainers import api  # noqa: E402
from comfyui_distillery.trainers.lora import (  # noqa: E402
    UNET_TARGET_MODULES, add_lora_adapter, kohya_unet_state_dict, merged_kohya_unet_lora, set_role)
from comfyui_distillery.worlds import digits  # noqa: E402
from comfyui_distillery.worlds.digits import style  # noqa: E402
from comfyui_distillery.worlds.tasks import DigitsTask  # noqa: E402

STUDENT_T = [999, 749, 499, 249]


def test_bold_and_relabelled_data():
    x, y = digits.load_digits_16("train")
    thick = style.bold(x)
    assert (thick >= x).all() and style.ink(thick).mean() > style.ink(x).mean() + 0.1  # 0.305 -> 0.436
    # a lone pixel grows into a plus; the border stays background
    dot = torch.full((1, 1, 5, 5), -1.0)
    dot[0, 0, 2, 2] = 1.0
    assert int((style.bold(dot) > 0).sum()) == 5 and float(style.bold(dot)[0, 0, 0, 0]) == -1.0
    images, labels = style.relabelled(x, y)
    assert int((labels == 3).sum()) == int((y == 8).sum())
    assert torch.equal(images[labels == 3], x[y == 8])


def test_merged_lora_is_the_adapter_and_is_restored(one_torch_thread):
    """W + s dW merged from the kohya file equals peft's adapter at scale s (convs and linears alike), and the
    weights are restored bit for bit on exit."""
    unet, text_encoder = digits.load_teacher()
    torch.manual_seed(0)
    add_lora_adapter(unet, "style", 4, alpha=8, target_modules=UNET_TARGET_MODULES)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # peft starts B at zero: a no-op adapter would prove nothing
    state = kohya_unet_state_dict(unet, "style")
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 700, 500, 300, 100, 10])
    cond = digits.encode_labels(text_encoder, torch.arange(6))
    with torch.no_grad():
        set_role(unet, "style")
        for module in unet.modules():  # strength 0.5 through peft's own scaling
            if hasattr(module, "scaling") and "style" in module.scaling:
                module.scaling["style"] *= 0.5
        adapter = unet(x, t, encoder_hidden_states=cond).sample
        set_role(unet, None)
        plain = unet(x, t, encoder_hidden_states=cond).sample
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        with merged_kohya_unet_lora(unet, state, 0.5):
            merged = unet(x, t, encoder_hidden_states=cond).sample
        after = unet.state_dict()
    assert (adapter - plain).abs().max() > 1e-3  # the adapter does change the output
    assert torch.allclose(merged, adapter, atol=1e-5, rtol=0), (merged - adapter).abs().max()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="LoRA modules not in this network"):
        with merged_kohya_unet_lora(unet, {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                                           "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1)}):
            pass


@pytest.mark.slow
def test_style_lora_reaches_a_student_through_distillation(one_torch_thread, tmp_path):
    """A bold LoRA made on the teacher thickens its samples; a DMD2 student on the bare base distilled for a few
    iterations from (teacher + bold) draws thicker digits than the same student distilled from the bare
    teacher (same seed, same noise: only the teacher differs), by a good part of the teacher's own shift."""
    state, losses = style.train_lora(*style.style_data("bold"), steps=20, batch=8, rank=4, lr=3e-3, seed=0)
    assert all(loss == loss for loss in losses)
    labels = torch.arange(10).repeat_interleave(4)
    noise = torch.randn((len(labels), 1, 16, 16), generator=torch.Generator().manual_seed(0))

    def distilled_ink(strength: float) -> tuple[float, float]:
        """(teacher's ink, student's ink) for the teacher with the LoRA at `strength`."""
        task = DigitsTask(guidance=2.0)
        schedule = task.base.schedule
        cond, uncond = task._labels_to_cond(labels)
        teacher_unet = copy.deepcopy(task.base.unet)
        task.teacher = DiffusersUNetModel(teacher_unet, schedule)
        method = api.make_method("dmd2", student_timesteps=STUDENT_T, guidance_scale=2.0, update_ratio=2)
        config = api.TrainConfig(steps=10, batch_size=4, lora_rank=8, student_lr=1e-3, critic_lr=1e-3,
                                 weight_decay=0.0, seed=0, checkpoint_every=0, log_every=1000,
                                 run_dir=str(tmp_path / f"s{strength:g}"))
        with merged_kohya_unet_lora(teacher_unet, state, strength):
            sig = timesteps_to_sigmas(schedule, trailing_timesteps(4))
            with torch.no_grad():
                teacher = sample_ddim(Guided(task.teacher, cond, uncond, 2.0), noise * float(sig[0]), sig,
                                      schedule=schedule, disable=True)
            trainer = api.distill(task, method, config, progress=False)["trainer"]
        trainer.use_exported_student()
        sig = timesteps_to_sigmas(schedule, STUDENT_T)
        with torch.no_grad():
            student = sample_x0_renoise(Guided(trainer.roles.student, cond), noise * float(sig[0]), sig,
                                        schedule=schedule, extra_args={"seed": 1}, disable=True)
        return float(style.ink(teacher).mean()), float(style.ink(student).mean())

    bare_teacher, bare_student = distilled_ink(0.0)
    bold_teacher, bold_student = distilled_ink(1.0)
    teacher_shift = bold_teacher - bare_teacher
    print(f"ink: teacher {bare_teacher:.3f} -> {bold_teacher:.3f}, students {bare_student:.3f} -> {bold_student:.3f}")
    assert teacher_shift > 0.05, (bare_teacher, bold_teacher)  # the bold training digits: +0.13
    assert bold_student - bare_student > 0.4 * teacher_shift, (bare_student, bold_student, teacher_shift)
