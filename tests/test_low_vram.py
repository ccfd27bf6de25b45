"""The low-VRAM run options (TrainConfig): what each one does to the run, and that the planner predicts it.

micro_batch_size and "auto" gradient checkpointing, lora_targets=attention, the fp8 base (trainers/fp8.py),
foreach off, and 8-bit AdamW (trainers/optimizers.py: bitsandbytes on CUDA only; its state sizes are checked
against bitsandbytes' own when it is installed).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from comfyui_distillery.trainers import memory, planner
from comfyui_distillery.trainers.engine import LARGE_NETWORK_PARAMS, TrainConfig, resolve_auto
from comfyui_distillery.trainers.fp8 import FP8, dequantize, quantize, store_frozen_in_fp8
from comfyui_distillery.trainers.lora import UNET_TARGET_MODULES, targets_for
from comfyui_distillery.trainers.optimizers import AdamW8bitState, check_available, make_optimizer


def _planner_tests():
    """tests/test_planner.py's micro networks (pytest imports test modules by path, not as a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("planner_tests", Path(__file__).with_name("test_planner.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MICRO_UNET, MICRO_DIT = _planner_tests().MICRO_UNET, _planner_tests().MICRO_DIT


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- auto: checkpointing and micro-batches by the network's size -----------------------------------------

def test_auto_means_checkpointing_and_single_samples_for_image_size_networks_only():
    big = resolve_auto(TrainConfig(batch_size=4).validate(), LARGE_NETWORK_PARAMS)
    small = resolve_auto(TrainConfig(batch_size=4).validate(), LARGE_NETWORK_PARAMS - 1)
    assert (big.gradient_checkpointing, big.micro_batch_size, big.passes()) == ("on", 1, 4)
    assert (small.gradient_checkpointing, small.micro_batch_size, small.passes()) == ("off", 4, 1)
    chosen = resolve_auto(TrainConfig(batch_size=4, gradient_checkpointing="off", micro_batch_size=2,
                                      grad_accum=3).validate(), 10 ** 10)
    assert (chosen.gradient_checkpointing, chosen.micro_batch_size, chosen.passes()) == ("off", 2, 6)


def test_old_true_false_values_of_gradient_checkpointing_still_read():
    assert TrainConfig(gradient_checkpointing=True).validate().gradient_checkpointing == "on"
    assert TrainConfig(gradient_checkpointing="false").validate().gradient_checkpointing == "off"
    with pytest.raises(ValueError, match="gradient_checkpointing='sometimes': choose one of auto, on, off"):
        TrainConfig(gradient_checkpointing="sometimes").validate()


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused_by_name():
    with pytest.raises(ValueError, match=r"micro_batch_size=4: batch_size=6 .* \(1, 2, 3, 6\)"):
        TrainConfig(batch_size=6, micro_batch_size=4).validate()


def test_micro_batches_run_as_passes_of_that_many_samples(tmp_path):
    from comfyui_distillery import api

    task = api.make_task("gmm")
    method = api.make_method("dmd2", student_timesteps="399", update_ratio=1)
    config = TrainConfig(steps=1, batch_size=6, micro_batch_size=2, lora_rank=2, checkpoint_every=0,
                         preview_every=0, run_dir=str(tmp_path), full_finetune=False)
    seen = []
    original = method.loss

    def recording(role, ctx):
        seen.append((role, ctx.batch))
        return original(role, ctx)

    method.loss = recording
    from comfyui_distillery.trainers.engine import Trainer

    Trainer(task, method, config, progress=False).train()
    assert seen == [("student", 2)] * 3 + [("critic", 2)] * 3


def test_micro_batches_and_checkpointing_lower_the_planned_activations():
    train = {"batch_size": 2, "lora_rank": 2, "mixed_precision": "bf16", "gradient_checkpointing": "off"}
    whole = planner.plan(MICRO_UNET, "tcd", train=train, device="cpu", flops=False)
    assert whole.settings["micro_batch_size"] == 2
    single = planner.plan(MICRO_UNET, "tcd", train={**train, "micro_batch_size": 1}, device="cpu", flops=False)
    assert single.peak_iteration.breakdown["activations"] < whole.peak_iteration.breakdown["activations"]


# --- LoRA on attention only ---------------------------------------------------------------------------------

def test_attention_targets_of_each_naming():
    assert targets_for(None, "attention") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert targets_for(UNET_TARGET_MODULES) == UNET_TARGET_MODULES
    comfy_unet = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                  "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2",
                  "diffusion_model.input_blocks.1.0.in_layers.2"]
    assert targets_for(comfy_unet, "attention") == comfy_unet[:1]
    comfy_dits = ["diffusion_model.joint_blocks.0.x_block.attn.qkv", "diffusion_model.joint_blocks.0.x_block.attn.proj",
                  "diffusion_model.joint_blocks.0.x_block.mlp.fc1", "diffusion_model.double_blocks.0.img_attn.qkv",
                  "diffusion_model.double_blocks.0.img_mlp.0", "diffusion_model.single_blocks.0.linear1"]
    assert targets_for(comfy_dits, "attention") == [comfy_dits[0], comfy_dits[1], comfy_dits[3]]
    with pytest.raises(ValueError, match="lora_targets='attention': this model's LoRA targets .* use lora_targets=all"):
        targets_for(["inp", "hidden.0", "out"], "attention")


def test_attention_only_adapters_have_fewer_parameters_as_planned():
    train = {"batch_size": 1, "lora_rank": 2, "mixed_precision": "bf16"}
    full = planner.plan(MICRO_UNET, "tcd", train=train, device="cpu", flops=False)
    attention = planner.plan(MICRO_UNET, "tcd", train={**train, "lora_targets": "attention"}, device="cpu",
                             flops=False)
    assert 0 < attention.trained_params["student"] < full.trained_params["student"]
    assert attention.static["trained_params"]["student"] == attention.trained_params["student"]


# --- the fp8 base -------------------------------------------------------------------------------------------

def test_fp8_codes_round_trip_within_e4m3_precision():
    w = torch.randn(64, 48) * 0.02
    codes, scale = quantize(w)
    assert codes.dtype == FP8 and float(codes.float().abs().max()) == 448.0
    back = dequantize(codes, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
    normal = w.abs() >= scale * 2 ** -6
    assert ((back - w).abs()[normal] <= w.abs()[normal] * 2 ** -4 + 1e-12).all()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def test_an_fp8_layer_computes_the_dequantized_weights_and_passes_exact_input_gradients():
    net = _net().requires_grad_(False)
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            codes, scale = quantize(m.weight)
            m.weight.copy_(dequantize(codes, scale, torch.float32))
    assert store_frozen_in_fp8(net) == 3
    assert all(m.weight.dtype == FP8 for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = net(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # close to the unquantized network too
    plain = _net()
    with torch.no_grad():
        assert float((plain(x) - y).abs().max()) < 0.05 * float(plain(x).abs().max())


def test_fp8_leaves_trainable_layers_and_lora_matrices_alone():
    from comfyui_distillery.trainers.lora import add_lora_adapter, adapter_parameters, set_role

    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)).requires_grad_(False)
    add_lora_adapter(net, "student", 2, target_modules=["0"])
    store_frozen_in_fp8(net)
    set_role(net, "student")
    assert net[0].base_layer.weight.dtype == FP8 and net[1].weight.dtype == FP8
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter_parameters(net, "student"))
    x = torch.randn(3, 16)
    net(x).sum().backward()
    assert all(p.grad is not None for p in adapter_parameters(net, "student"))


def test_fp8_base_halves_the_frozen_weights_as_planned_and_measured():
    train = {"batch_size": 1, "lora_rank": 2, "mixed_precision": "bf16", "gradient_checkpointing": "on",
             "fp8_base": True}
    base = planner.plan(MICRO_DIT, "tcd", train={**train, "fp8_base": False}, device="cpu", flops=False)
    planned = planner.plan(MICRO_DIT, "tcd", train=train, device="cpu", flops=False)
    real = planner.plan(MICRO_DIT, "tcd", train=train, device="cpu", fake=False, flops=False)
    frozen = planned.peak_iteration.breakdown["frozen weights"]
    assert frozen == real.peak_iteration.breakdown["frozen weights"]
    # the arithmetic counts parameters; the dry run also the buffers (a positional embedding here)
    buffers = base.peak_iteration.breakdown["frozen weights"] - base.static["frozen_bytes"]
    assert frozen == planned.static["frozen_bytes"] + buffers
    assert frozen < 0.75 * base.peak_iteration.breakdown["frozen weights"]
    assert abs(planned.peak_bytes - real.peak_bytes) <= 0.05 * real.peak_bytes


def test_fp8_base_with_full_finetuning_is_refused():
    with pytest.raises(ValueError, match="fp8_base=True: .* full_finetune=True"):
        TrainConfig(fp8_base=True, full_finetune=True).validate()


def test_a_world_student_trains_on_an_fp8_base(tmp_path):
    from comfyui_distillery import api
    from comfyui_distillery.trainers.engine import Trainer

    task = api.make_task("digits")
    method = api.make_method("dmd2", student_timesteps="399", update_ratio=1)
    config = TrainConfig(steps=2, batch_size=2, lora_rank=2, fp8_base=True, checkpoint_every=0, preview_every=0,
                         run_dir=str(tmp_path))
    trainer = Trainer(task, method, config, progress=False)
    before = [p.detach().clone() for p in trainer.roles.trainable["student"]]
    trainer.train()
    moved = any(not torch.equal(a, p) for a, p in zip(before, trainer.roles.trainable["student"]))
    assert moved and any(p.dtype == FP8 for p in task.base.parameters())


# --- AdamW: foreach and 8 bits --------------------------------------------------------------------------------

def test_foreach_off_is_the_per_tensor_loop():
    p = [nn.Parameter(torch.zeros(3))]
    assert make_optimizer(p, TrainConfig(foreach=False), 1e-3).defaults["foreach"] is False
    assert make_optimizer(p, TrainConfig(), 1e-3).defaults["foreach"] is None  # torch's choice


def test_8bit_adamw_is_refused_off_cuda_before_anything_loads():
    with pytest.raises(ValueError, match="optimizer='adamw8bit': bitsandbytes' 8-bit AdamW runs on CUDA GPUs only"):
        check_available(SimpleNamespace(optimizer="adamw8bit"), "cpu")
    from comfyui_distillery.trainers.spec import RunSpec

    with pytest.raises(ValueError, match="optimizer='adamw8bit'"):
        RunSpec.build(method="dmd2", train={"optimizer": "adamw8bit"}, teacher={"kind": "world", "path": "gmm"},
                      device="cpu")


@pytest.mark.parametrize("numel", [100, 4095, 4096, 10_000, 1_000_003])
def test_8bit_state_sizes_are_bitsandbytes_own(numel):
    p = nn.Parameter(torch.zeros(numel))
    ours = AdamW8bitState([p], lr=1e-3)
    p.grad = torch.zeros_like(p)
    ours.step()
    ours_bytes = sum(t.numel() * t.element_size() for t in ours.state[p].values())
    expected = 8 * numel if numel < 4096 else 2 * numel + 8 * math.ceil(numel / 256)
    assert ours_bytes == expected
    bnb = pytest.importorskip("bitsandbytes")
    theirs = bnb.optim.AdamW8bit([p], lr=1e-3)
    group = theirs.param_groups[0]
    theirs.init_state(group, p, 0, 0)
    shared = ("qmap1", "qmap2", "unorm_vec", "step")  # one code book per optimizer, scalars
    their_bytes = sum(t.numel() * t.element_size() for k, t in theirs.state[p].items()
                      if isinstance(t, torch.Tensor) and k not in shared)
    assert their_bytes == ours_bytes


def test_8bit_adamw_is_planned_at_a_quarter_of_the_state():
    big_rank = {"batch_size": 1, "lora_rank": 512, "mixed_precision": "bf16", "gradient_checkpointing": "on"}
    fp32 = planner.plan(MICRO_DIT, "tcd", train=big_rank, device="cuda", flops=False)
    eight = planner.plan(MICRO_DIT, "tcd", train={**big_rank, "optimizer": "adamw8bit"}, device="cuda", flops=False)
    state32 = fp32.peak_iteration.breakdown["optimizer state"]
    state8 = eight.peak_iteration.breakdown["optimizer state"]
    assert state8 == eight.static["trained_bytes"] - 4 * sum(eight.trained_params.values())
    assert 0.25 <= state8 / state32 < 0.3
    assert eight.settings["optimizer"] == "adamw8bit" and any("adamw8bit" in n for n in eight.notes)


def test_the_arithmetic_counts_fp8_and_8bit():
    net = nn.Sequential(nn.Linear(100, 100), nn.LayerNorm(100)).to(torch.bfloat16)
    plain = memory.plan(net, ["0"], full_finetune=False, rank=64, critic_rank=None, with_critic=True, ema=False)
    low = memory.plan(net, ["0"], full_finetune=False, rank=64, critic_rank=None, with_critic=True, ema=False,
                      optimizer="adamw8bit", fp8_base=True)
    assert plain.frozen_bytes - low.frozen_bytes == 100 * 100 - 4
    lora = 64 * 100  # each of the two matrices: 6400 values, >= 4096: quantized
    assert low.trained_bytes == 2 * (4 * 2 * lora + 2 * (2 * lora + 8 * math.ceil(lora / 256)))
    assert low.temporary_bytes == 0 and plain.temporary_bytes == 4 * 2 * lora
