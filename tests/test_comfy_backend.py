"""comfy_backend without ComfyUI: the checkpoint probe (the safetensors header reader, the key-based family
guess, the one-line refusals of files that are not a diffusion model) and the teacher of guidance-distilled
models (Flux-dev-class: the guidance scale is the model's guidance input, one pass, no CFG pair).

Small .safetensors files are written here with safetensors.torch.save_file, with the key names (and, where
the guess reads them, the shapes) of real checkpoints. ComfyUI's own detection on meta tensors is checked
against full-size key sets in a ComfyUI environment (see the module docstring of comfy_backend.py).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from torch import nn
from safetensors.torch import save_file

from comfyui_distillery import comfy_backend as cb

P = "model.diffusion_model."


@pytest.fixture(autouse=True)
def without_comfyui(monkeypatch):
    """The key-based guess, even where a ComfyUI checkout happens to be importable."""
    monkeypatch.setattr(cb, "_comfy_model_detection", lambda: None)


def ldm_unet(context_dim: int, adm: int | None = None, prefix: str = P) -> dict:
    sd = {
        prefix + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context_dim),
        prefix + "out.2.weight": torch.zeros(4, 8, 3, 3),
        "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
    }
    if adm is not None:
        sd[prefix + "label_emb.0.0.weight"] = torch.zeros(8, adm)
    return sd


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_safetensors_header_reads_names_shapes_dtypes_and_metadata(tmp_path):
    path = write(tmp_path / "m.safetensors", {"a.weight": torch.zeros(3, 5, dtype=torch.float16),
                                               "b": torch.zeros(2, dtype=torch.bfloat16), "c": torch.zeros(())},
                 metadata={"modelspec.title": "tiny"})
    header = cb.safetensors_header(path)
    assert header["__metadata__"] == {"modelspec.title": "tiny"}
    assert header["a.weight"]["shape"] == [3, 5] and header["a.weight"]["dtype"] == "F16"
    assert header["b"]["dtype"] == "BF16" and header["c"]["shape"] == []
    assert set(header) == {"__metadata__", "a.weight", "b", "c"}


def test_safetensors_header_does_not_read_the_weights(tmp_path):
    """The header alone: a file whose data section was never written (a sparse file) still reads."""
    path = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, 4096 * 4096 * 4]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 4096 * 4096 * 4)
    assert cb.safetensors_header(path)["w"]["shape"] == [4096, 4096]


@pytest.mark.parametrize("content, what", [
    (b"", "an empty file"),
    (b"just some notes\nabout a model\n", "a text file (starts with 'just some notes')"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2132625894\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML page"),
    (b"PK\x03\x04" + b"\x00" * 100, "a zip archive"),
    (b"\x80\x02}q\x00" + b"\x00" * 100, "a Python pickle"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 40, "not a safetensors file"),
])
def test_files_that_are_not_safetensors_are_named(tmp_path, content, what):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors: " + what.replace("(", r"\(").replace(")", r"\)")):
        cb.safetensors_header(path)
    with pytest.raises(ValueError) as err:
        cb.probe_checkpoint(path, name="sd/model.safetensors")
    message = str(err.value)
    assert message.startswith("ckpt_name='sd/model.safetensors': " + what) and "\n" not in message
    assert "; " in message  # what it is; the fix


def test_a_truncated_file_is_told_apart(tmp_path):
    path = write(tmp_path / "m.safetensors", {"w": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="a truncated safetensors file .*download the file again"):
        cb.probe_checkpoint(path)


@pytest.mark.parametrize("context_dim, adm, extra, family, prediction", [
    (768, None, {}, "SD15", "epsilon"),
    (1024, None, {}, "SD20", None),  # eps or v: ComfyUI tells them apart by a weight's values
    (2048, 2816, {}, "SDXL", "epsilon"),
    (2048, 2816, {"v_pred": torch.zeros(()), "ztsnr": torch.zeros(())}, "SDXL", "v_prediction"),
    (1280, 2560, {}, "SDXLRefiner", None),
    (320, None, {}, "LDM UNet", None),
])
def test_ldm_unets_are_guessed_from_their_keys(tmp_path, context_dim, adm, extra, family, prediction):
    path = write(tmp_path / "ckpt.safetensors", {**ldm_unet(context_dim, adm), **extra})
    assert cb.probe_checkpoint(path) == {"family": family, "prediction": prediction,
                                         "unet_prefix": P, "detected_by": "keys"}


def test_transformers_are_guessed_from_their_blocks(tmp_path):
    flux = write(tmp_path / "flux.safetensors", {
        P + "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), P + "single_blocks.0.linear1.weight":
        torch.zeros(4, 2), P + "guidance_in.in_layer.weight": torch.zeros(2, 2),
        "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(2, 2)})
    assert cb.probe_checkpoint(flux) == {"family": "Flux", "prediction": "flow", "unet_prefix": P,
                                         "detected_by": "keys"}
    schnell_alone = write(tmp_path / "schnell.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
                                                             "img_in.weight": torch.zeros(2, 2)})
    assert cb.probe_checkpoint(schnell_alone)["family"] == "Flux-class"
    assert cb.probe_checkpoint(schnell_alone)["unet_prefix"] == ""
    sd3 = write(tmp_path / "sd3.safetensors", {P + "joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(6, 2),
                                               P + "x_embedder.proj.weight": torch.zeros(2, 16, 2, 2)})
    assert cb.probe_checkpoint(sd3) == {"family": "SD3", "prediction": "flow", "unet_prefix": P,
                                        "detected_by": "keys"}


@pytest.mark.parametrize("tensors, what", [
    ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8),
      "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, "a LoRA (2 tensors), not a checkpoint"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}, "a LoRA"),
    ({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)},
     "a VAE (2 tensors) without a diffusion model"),
    ({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)}, "a text encoder"),
    ({"emb_params": torch.zeros(2, 768)}, "a textual-inversion embedding"),
    ({"weight": torch.zeros(3), "bias": torch.zeros(3)},
     "2 tensors, none of them a diffusion model ComfyUI recognises (first key 'bias')"),
])
def test_safetensors_without_a_diffusion_model_are_refused_in_one_line(tmp_path, tensors, what):
    path = write(tmp_path / "thing.safetensors", tensors)
    with pytest.raises(ValueError) as err:
        cb.probe_checkpoint(path, name="thing.safetensors")
    message = str(err.value)
    assert message.startswith(f"ckpt_name='thing.safetensors': {what}") and "\n" not in message
    assert "; " in message


def test_a_missing_file():
    with pytest.raises(FileNotFoundError, match="ckpt_name='nope.safetensors': no such file"):
        cb.probe_checkpoint("/nonexistent/nope.safetensors")


def test_meta_state_dict_keeps_shapes_and_reads_only_small_tensors(tmp_path):
    path = write(tmp_path / "m.safetensors", {"big": torch.ones(64, 64, dtype=torch.float16),
                                               "small": torch.arange(6, dtype=torch.float32)})
    sd = cb._meta_state_dict(path, cb.safetensors_header(path))
    assert sd["big"].is_meta and sd["big"].shape == (64, 64) and sd["big"].dtype == torch.float16
    assert not sd["small"].is_meta and sd["small"].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_failing_comfyui_detection_falls_back_to_the_keys(tmp_path, monkeypatch):
    class Broken:
        @staticmethod
        def unet_prefix_from_state_dict(sd):
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(cb, "_comfy_model_detection", lambda: Broken)
    path = write(tmp_path / "ckpt.safetensors", ldm_unet(768))
    assert cb.probe_checkpoint(path)["family"] == "SD15"


# --- guidance-distilled models (Flux-dev-class): the teacher's guidance scale is the guidance input --------

class FakeFluxNet(nn.Module):
    """Flux's names where they matter: a guidance embedding (Identity on FluxSchnell) and a block's Linear."""

    def __init__(self, guidance_embed: bool = True):
        super().__init__()
        self.guidance_in = nn.Linear(1, 4) if guidance_embed else nn.Identity()
        self.double_blocks = nn.ModuleList([nn.Module()])
        self.double_blocks[0].img_attn = nn.Module()
        self.double_blocks[0].img_attn.qkv = nn.Linear(4, 4)


class FakeFluxModel(nn.Module):
    """Stands in for comfy's Flux BaseModel: apply_model(x, sigma, c_crossattn=, guidance=) -> x0, recording
    each call's batch size and guidance values."""

    def __init__(self, guidance_embed: bool = True):
        super().__init__()
        self.diffusion_model = FakeFluxNet(guidance_embed)
        self.calls = []

    def apply_model(self, x, sigma, transformer_options=None, c_crossattn=None, guidance=None):
        self.calls.append((x.shape[0], guidance.tolist()))
        h = self.diffusion_model.double_blocks[0].img_attn.qkv(x.movedim(1, -1)).movedim(-1, 1)
        return h + guidance.view(-1, 1, 1, 1) + c_crossattn.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def flux_conds(batch=2):
    cond = {"c_crossattn": torch.randn(batch, 3, 8), "guidance": torch.full((batch,), 3.5)}
    uncond = {"c_crossattn": torch.randn(batch, 3, 8), "guidance": torch.full((batch,), 3.5)}
    return cond, uncond


def test_a_guidance_embedding_is_told_from_cfg_models_and_flux_schnell():
    from comfyui_distillery.comfy_backend import takes_guidance_input

    cond, _ = flux_conds()
    assert takes_guidance_input(FakeFluxModel(), cond)
    assert not takes_guidance_input(FakeFluxModel(guidance_embed=False), cond)  # Identity: ignores the input
    assert not takes_guidance_input(FakeFluxModel(), {"c_crossattn": cond["c_crossattn"]})  # no guidance cond
    assert not takes_guidance_input(nn.Module(), cond)  # no diffusion_model (an LDM UNet has no guidance_in)


def guidance_model(fake):
    from comfyui_distillery.comfy_backend import GUIDANCE_INPUT, ComfyDiffusionModel
    from comfyui_distillery.core.schedules import RectifiedFlowSchedule

    base = ComfyDiffusionModel(fake, RectifiedFlowSchedule(shift=3.16))  # the pack's 0..1000 grid
    base.guidance_input = GUIDANCE_INPUT  # what ComfyCheckpointTask sets when takes_guidance_input
    return base


def test_the_guidance_scale_of_a_guidance_distilled_model_is_its_guidance_input():
    from comfyui_distillery.comfy_backend import ComfyDiffusionModel
    from comfyui_distillery.core.schedules import RectifiedFlowSchedule
    from comfyui_distillery.trainers.roles import AdapterView

    torch.manual_seed(0)
    fake = FakeFluxModel()
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.9, 0.4])
    cond, uncond = flux_conds()

    # a CFG model: a pair of passes (cond + negative prompt), at the cond's own guidance
    ComfyDiffusionModel(fake, RectifiedFlowSchedule(shift=3.16, multiplier=1.0))(x, sigma, cond, uncond, 4.0)
    assert fake.calls == [(4, [3.5] * 4)]
    fake.calls.clear()

    base = guidance_model(fake)
    teacher = AdapterView(base, None)
    assert teacher.guidance_input == "guidance"  # every view of the shared network
    guided = teacher(x, sigma, cond, uncond, 4.0)
    assert fake.calls == [(2, [4.0, 4.0])]  # one pass, the scale as the guidance input
    assert torch.allclose(guided, base(x, sigma, base.with_guidance(cond, 4.0)))
    assert cond["guidance"].tolist() == [3.5, 3.5]  # the caller's cond is left alone
    fake.calls.clear()
    for args in ((cond,), (cond, uncond, 1.0), (cond, None, 4.0)):  # no guidance asked: the cond's own
        assert torch.allclose(teacher(x, sigma, *args), base(x, sigma, cond))
    assert all(call == (2, [3.5, 3.5]) for call in fake.calls), fake.calls
    v = teacher(x, sigma, cond, uncond, 4.0, output="flow")  # conversions as any role's
    assert torch.allclose(v, base.schedule.from_x0(guided, x, sigma, "flow"))

    # the guidance term of Decoupled-DMD: guided - conditional, one batched pass of both guidances
    fake.calls.clear()
    x0_cond, x0_guided = teacher.cond_and_guided(x, sigma, cond, uncond, 4.0)
    assert fake.calls == [(4, [3.5, 3.5, 4.0, 4.0])]
    assert torch.allclose(x0_cond, base(x, sigma, cond)) and torch.allclose(x0_guided, guided)


def test_cond_and_guided_of_a_cfg_model_is_the_cfg_pair():
    from comfyui_distillery.comfy_backend import ComfyDiffusionModel
    from comfyui_distillery.core.schedules import RectifiedFlowSchedule

    torch.manual_seed(0)
    base = ComfyDiffusionModel(FakeFluxModel(), RectifiedFlowSchedule(shift=3.16, multiplier=1.0))
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.9, 0.4])
    cond, uncond = flux_conds()
    x0_cond, x0_guided = base.cond_and_guided(x, sigma, cond, uncond, 4.0)
    assert torch.allclose(x0_cond, base(x, sigma, cond))
    assert torch.allclose(x0_guided, base(x, sigma, cond, uncond, 4.0))
    x0_uncond = base(x, sigma, uncond)
    assert torch.allclose(x0_guided - x0_cond, 3.0 * (x0_cond - x0_uncond), atol=1e-5)


def test_the_fake_score_of_a_guidance_distilled_model_is_guided_by_its_input_and_anti_cfg_is_refused():
    from comfyui_distillery.trainers.methods.sid import SiD
    from comfyui_distillery.trainers.roles import build_roles

    torch.manual_seed(0)
    fake = FakeFluxModel()
    base = guidance_model(fake)
    roles = build_roles(base, None, with_critic=True, rank=2,
                        target_modules=["model.diffusion_model.double_blocks.0.img_attn.qkv"])
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.9, 0.4])
    cond, uncond = flux_conds()
    fake.calls.clear()
    roles.critic(x, sigma, cond, uncond, 1.5)  # SiD-LSG's guided fake score
    assert fake.calls == [(2, [1.5, 1.5])]

    class Task:
        pass

    task = Task()
    task.base = base
    with pytest.raises(ValueError, match="guidance_mode=anti_cfg: .*guidance-distilled.*use lsg or zero_cfg"):
        SiD(guidance_mode="anti_cfg").validate(task, None)


def test_the_teacher_of_a_guidance_distilled_model_is_the_base_with_adapters_off():
    from comfyui_distillery.comfy_backend import lora_target_names
    from comfyui_distillery.trainers.memory import frozen_bytes
    from comfyui_distillery.trainers.roles import build_roles

    torch.manual_seed(0)
    fake = FakeFluxModel()
    base = guidance_model(fake)
    targets = lora_target_names(fake.diffusion_model)
    assert targets == ["model.diffusion_model.double_blocks.0.img_attn.qkv"]
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.9, 0.4])
    cond, uncond = flux_conds()
    roles = build_roles(base, None, with_critic=True, rank=2, target_modules=targets)
    assert list(roles.teacher.parameters()) == [] and frozen_bytes(roles.teacher) == 0  # a view, not a copy
    before = roles.teacher(x, sigma, cond, uncond, 4.0)
    with torch.no_grad():
        for p in roles.trainable["student"]:
            p.add_(0.5)
    assert torch.allclose(roles.teacher(x, sigma, cond, uncond, 4.0), before)  # adapters off
    assert not torch.allclose(roles.student(x, sigma, base.with_guidance(cond, 4.0)), before)


# --- flow schedules: the pack's 0..1000 timestep grid, whatever ComfyUI's multiplier ------------------------

def fake_model_sampling(sampling: str, mixin: str, **attrs):
    """An object whose MRO carries ComfyUI's class names (schedule_from_model_sampling reads those)."""
    ms = type("ModelSampling", (type(sampling, (nn.Module,), {}), type(mixin, (), {})), {})()
    for key, value in attrs.items():
        setattr(ms, key, value)
    return ms


@pytest.mark.parametrize("sampling, attrs, shift", [
    ("ModelSamplingFlux", {"shift": 1.15}, math.exp(1.15)),  # Flux-dev: mu 1.15, timestep = sigma
    ("ModelSamplingDiscreteFlow", {"shift": 1.0, "multiplier": 1.0}, 1.0),  # FluxSchnell, AuraFlow
    ("ModelSamplingDiscreteFlow", {"shift": 3.0, "multiplier": 1000.0}, 3.0),  # SD3
])
def test_flow_models_get_the_1000_timestep_grid_whatever_comfyuis_multiplier(sampling, attrs, shift):
    from comfyui_distillery.core.schedules import RectifiedFlowSchedule
    from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas
    from comfyui_distillery.trainers.registry import make_method

    schedule = cb.schedule_from_model_sampling(fake_model_sampling(sampling, "CONST", **attrs))
    assert isinstance(schedule, RectifiedFlowSchedule) and schedule.prediction_type == "flow"
    assert schedule.shift == pytest.approx(shift) and schedule.num_train_timesteps == 1000
    for t in (999.0, 500.0, 20.0):  # ComfyUI's sigma at its timestep t / 1000 (Flux: exp(mu) / (exp(mu) + 1/s - 1))
        s = t / 1000
        assert float(schedule.training_sigma(t)) == pytest.approx(shift / (shift + 1 / s - 1), rel=1e-12)
    assert timesteps_to_sigmas(schedule, [999, 499]).tolist() == pytest.approx(
        [float(schedule.training_sigma(999.0)), float(schedule.training_sigma(499.0)), 0.0], rel=1e-12)

    class Task:  # what a method's validate reads of a task
        name, has_real_images, feature_shape = "comfy", False, (0, True)
        base = type("Base", (), {"schedule": schedule})

    make_method("dmd2", {"student_timesteps": "999,499"}).validate(Task, None)  # its defaults are on that grid


# --- training through blocks that add to their residual stream in place (ComfyUI's Flux) ---------------------

class SingleStreamBlock(nn.Module):
    """The pattern of comfy/ldm/flux/layers.py: a norm saves the stream for backward, then `x += ...`."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.pre_norm = nn.LayerNorm(4, elementwise_affine=False)
        self.linear = nn.Linear(4, 4)
        self.inplace = inplace

    def forward(self, x):
        out = self.linear(self.pre_norm(x))
        if self.inplace:
            x += out
        else:
            x = x + out
        return x


class DoubleStreamBlock(nn.Module):
    def __init__(self, inplace: bool = True):
        super().__init__()
        self.txt_norm1, self.txt_norm2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.img_norm1 = nn.LayerNorm(4)  # its stream is added to out of place: not guarded
        self.proj = nn.Linear(4, 4)
        self.inplace = inplace

    def forward(self, txt):
        for norm in (self.txt_norm1, self.txt_norm2):
            if self.inplace:
                txt += self.proj(norm(txt))
            else:
                txt = txt + self.proj(norm(txt))
        return txt


def test_norms_before_an_inplace_residual_add_get_a_copy_while_training():
    from comfyui_distillery.comfy_backend import guard_inplace_residuals

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), SingleStreamBlock(), DoubleStreamBlock(), SingleStreamBlock())
    reference = nn.Sequential(nn.Linear(4, 4), SingleStreamBlock(inplace=False), DoubleStreamBlock(inplace=False),
                              SingleStreamBlock(inplace=False))
    reference.load_state_dict(net.state_dict())
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        net(x).sum().backward()
    net.zero_grad()
    assert guard_inplace_residuals(net) == 4  # pre_norm x 2, txt_norm1, txt_norm2 (not img_norm1)
    assert guard_inplace_residuals(net) == 0  # once
    net(x).sum().backward()
    reference(x).sum().backward()  # the same sums, out of place
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-6), name
    with torch.no_grad():  # sampling and the frozen teacher: no copies
        assert torch.allclose(net(x), reference(x), atol=1e-6)


def test_a_dit_gives_the_gan_head_its_middle_blocks_image_tokens():
    """A DiT (ComfyUI's MMDiT names: joint_blocks of JointBlock returning (context, x)): the head reads the image
    tokens after the middle block, averaged over tokens, with their graph; a UNet keeps its feature map."""
    import torch
    from torch import nn

    from comfyui_distillery.comfy_backend import ComfyDiffusionModel
    from comfyui_distillery.core.schedules import RectifiedFlowSchedule

    class JointBlock(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.adaLN_modulation = nn.Linear(width, width)
            self.context_proj, self.x_proj = nn.Linear(width, width), nn.Linear(width, width)

        def forward(self, context, x):
            return self.context_proj(context), self.x_proj(x) + 1.0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.joint_blocks = nn.ModuleList(JointBlock(8) for _ in range(3))
            self.seen = []

        def forward(self, x, context):
            for block in self.joint_blocks:
                context, x = block(context, x)
                self.seen.append(x)
            return x

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = Net()

        def apply_model(self, x, sigma, transformer_options=None, c_crossattn=None):
            tokens = x.flatten(2).transpose(1, 2)  # [B, L, C]
            return self.diffusion_model(tokens, c_crossattn).transpose(1, 2).reshape(x.shape)

    base = Base()
    model = ComfyDiffusionModel(base, RectifiedFlowSchedule(shift=3.0))
    assert model.bottleneck() is base.diffusion_model.joint_blocks[1]
    assert model.feature_shape() == (8, False)
    x = torch.randn(2, 8, 2, 2, requires_grad=True)
    features = model.features(x, torch.tensor([0.5, 0.5]), torch.randn(2, 3, 8))
    seen = base.diffusion_model.seen
    assert len(seen) == 1  # the pass stopped inside the middle block's call, after its output
    after_middle = base.diffusion_model.joint_blocks[1].x_proj(seen[0]) + 1.0
    torch.testing.assert_close(features, after_middle.mean(dim=1))
    features.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def comfy_flux_header(double: int = 19, single: int = 38, hidden: int = 3072, mlp: int = 12288) -> dict:
    """The diffusion model's tensor shapes in a ComfyUI-layout FLUX.1 checkpoint (comfy/ldm/flux), no data."""
    h = {}

    def put(name, *shape):
        h[f"model.diffusion_model.{name}"] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [0, 0]}

    put("img_in.weight", hidden, 64)
    put("time_in.in_layer.weight", hidden, 256)
    put("final_layer.linear.weight", 64, hidden)
    for i in range(double):
        for stream in ("img", "txt"):
            put(f"double_blocks.{i}.{stream}_mod.lin.weight", 6 * hidden, hidden)
            put(f"double_blocks.{i}.{stream}_attn.qkv.weight", 3 * hidden, hidden)
            put(f"double_blocks.{i}.{stream}_attn.norm.query_norm.scale", 128)
            put(f"double_blocks.{i}.{stream}_attn.proj.weight", hidden, hidden)
            put(f"double_blocks.{i}.{stream}_mlp.0.weight", mlp, hidden)
            put(f"double_blocks.{i}.{stream}_mlp.2.weight", hidden, mlp)
    for i in range(single):
        put(f"single_blocks.{i}.modulation.lin.weight", 3 * hidden, hidden)
        put(f"single_blocks.{i}.linear1.weight", 3 * hidden + mlp, hidden)
        put(f"single_blocks.{i}.linear2.weight", hidden, hidden + mlp)
        put(f"single_blocks.{i}.norm.key_norm.scale", 128)
    return h


def test_a_flux_adapter_in_comfyui_has_fewer_values_than_the_reference_layout_and_the_plan_says_so():
    from comfyui_distillery.comfy_backend import adapter_layout_note, dit_adapter_params
    from comfyui_distillery.trainers.architectures import ARCHS

    header = comfy_flux_header()
    # per rank: a double block's two streams of qkv (3072 + 9216), proj (6144), mlp.0 and mlp.2 (15360 each);
    # a single block's linear1 (3072 + 21504) and linear2 (15360 + 3072); the modulations left out
    per_rank = 19 * 2 * (12288 + 6144 + 15360 + 15360) + 38 * (24576 + 18432)
    assert dit_adapter_params(header, "model.diffusion_model.", 64) == 64 * per_rank == 224_133_120
    note = adapter_layout_note(ARCHS["flux"], header, "model.diffusion_model.", {"lora_rank": 64})
    # diffusers' separate q / k / v projections (and the final proj_out its names match): 261.7 M
    assert "224.1 M" in note and "261.7 M" in note and "rank-64" in note
    assert adapter_layout_note(ARCHS["flux"], header, "model.diffusion_model.", {"lora_rank": 64,
                                                                                   "lora_targets": "attention"}) is None
    assert adapter_layout_note(ARCHS["sd15"], header, "model.diffusion_model.", {"lora_rank": 64}) is None
