"""The standalone sampling API and `distillery sample` (tiny image world, tiny random diffusers pipeline)."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_distillery.cli import main as cli_main
from comfyui_distillery.core.models import Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.sampling import sample_x0_renoise
from comfyui_distillery.sampling.api import initial_state, make_noise, sample, sigmas_for
from comfyui_distillery.worlds.gmm import GaussianMixture, GaussianMixtureTeacher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher():
    return GaussianMixtureTeacher(GaussianMixture.default(), DiscreteVPSchedule.sd15())


def test_sample_is_seed_stable_and_matches_the_sampler(teacher):
    labels = torch.tensor([0, 1, 2, 3] * 4)
    sigmas = sigmas_for(teacher, "dmd2_4step")
    noise = make_noise((16, 2), seed=5, dtype=torch.float64)
    a = sample(teacher, noise, sigmas, "x0_renoise", cond=labels, seed=1)
    b = sample(teacher, noise, sigmas, "x0_renoise", cond=labels, seed=1)
    c = sample(teacher, noise, sigmas, "x0_renoise", cond=labels, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # txt2img start: the network sees the unit noise itself (x = noise * sqrt(1 + sigma_0^2))
    x = noise * (1 + float(sigmas[0]) ** 2) ** 0.5
    ref = sample_x0_renoise(Guided(teacher, labels), x, sigmas, extra_args={"seed": 1}, disable=True,
                            schedule=teacher.schedule)
    assert torch.equal(a, ref)
    # the samples land on the mixture (radius-2 ring)
    assert float((a.norm(dim=1) - 2).abs().median()) < 0.5


def test_guidance_and_all_samplers(teacher):
    labels = torch.tensor([0, 1, 2, 3])
    null = torch.full_like(labels, teacher.mixture.null_label)
    noise = make_noise((4, 2), seed=0, dtype=torch.float64)
    for name, preset, opts in [("tcd", "lcm_tcd", {"gamma": 0.3}), ("x0_renoise", "dmd2_4step", {}),
                               ("ddim", "trailing", {"end_on_t0": True})]:
        out = sample(teacher, noise, sigmas_for(teacher, preset, steps=4), name, cond=labels, uncond=null,
                     cfg_scale=2.0, **opts)
        assert out.shape == noise.shape and torch.isfinite(out).all()


def test_img2img_and_partial_sigmas(teacher):
    labels = torch.tensor([0, 1])
    latents = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    sigmas = sigmas_for(teacher, "dmd2_4step", denoise=0.5)  # 499, 249
    noise = make_noise((2, 2), seed=0, dtype=torch.float64)
    x = initial_state(teacher, noise, float(sigmas[0]), latents)
    assert torch.allclose(x, latents + float(sigmas[0]) * noise)
    out = sample(teacher, noise, sigmas, "x0_renoise", latents=latents, cond=labels)
    assert (out - latents).norm(dim=1).max() < 1.5
    with pytest.raises(ValueError, match="sigmas: the last sigma must be 0"):
        sample(teacher, noise, sigmas[:-1], "x0_renoise", cond=labels)
    partial = sample(teacher, noise, sigmas[:-1], "x0_renoise", cond=labels, allow_partial=True)
    assert partial.shape == noise.shape
    with pytest.raises(ValueError, match="sampler='euler'"):
        sample(teacher, noise, sigmas, "euler")


def test_flow_start_is_the_noise():
    flow = GaussianMixtureTeacher(GaussianMixture.default(), RectifiedFlowSchedule(shift=3.0))
    sigmas = sigmas_for(flow, "flow_euler", steps=4)
    noise = make_noise((8, 2), seed=0, dtype=torch.float64)
    assert torch.equal(initial_state(flow, noise, float(sigmas[0])), noise)
    out = sample(flow, noise, sigmas, "ddim", cond=torch.arange(8) % 4)
    assert float((out.norm(dim=1) - 2).abs().median()) < 0.5


# --- the CLI -----------------------------------------------------------------------------------------------------

def _digits():
    try:
        from comfyui_distillery.worlds import digits
    except ImportError:
        return None
    needed = ("load_teacher", "encode_labels", "NULL_LABEL", "image_grid", "NOISE_SCHEDULE", "WEIGHTS_DIR")
    return digits if all(hasattr(digits, name) for name in needed) else None


@pytest.mark.skipif(_digits() is None, reason="the tiny image world (worlds.digits) is not in this tree")
def test_cli_samples_digits(tmp_path, capsys, monkeypatch):
    digits = _digits()
    if not (digits.WEIGHTS_DIR / "teacher_unet.safetensors").is_file():
        # weights not trained yet in this tree: same code path with a random teacher of the same shape
        from comfyui_distillery.worlds.digits import models

        def random_teacher(device="cpu", dtype=torch.float32, weights_dir=None):
            torch.manual_seed(0)
            unet = models.build_unet(models.TEACHER_CONFIG).to(device, dtype).eval()
            te = models.LabelTextEncoder(**models.TEXT_ENCODER_CONFIG).to(device, dtype).eval()
            return unet, te
        monkeypatch.setattr(digits, "load_teacher", random_teacher)
    out = tmp_path / "grid.png"
    rc = cli_main(["sample", "--model", "digits", "--sampler", "tcd", "--gamma", "0.3", "--preset", "lcm_tcd",
                   "--steps", "4", "--num", "10", "--cfg", "2", "--seed", "0", "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["timesteps"] == [999, 759, 499, 259] and report["samples"] == 10


def test_cli_samples_a_diffusers_folder(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = cli_main(["sample", "--model", str(tiny_pipeline), "--sampler", "x0_renoise", "--timesteps",
                   "999,499", "--width", "16", "--height", "16", "--num", "2", "--cfg", "1.5",
                   "--prompt", "a fox", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["timesteps"] == [999, 499] and report["samples"] == 2
    # img2img from that grid's size-matched image
    out2 = tmp_path / "img2img.png"
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    rc = cli_main(["sample", "--model", str(tiny_pipeline), "--sampler", "tcd", "--preset", "lcm_tcd",
                   "--steps", "2", "--denoise", "0.5", "--init-image", str(tmp_path / "init.png"),
                   "--width", "16", "--height", "16", "--num", "1", "--out", str(out2), "--device", "cpu"])
    assert rc == 0 and out2.is_file()


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    rc = cli_main(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.skipif(_digits() is None, reason="the tiny image world (worlds.digits) is not in this tree")
def test_cli_samples_a_phased_student_from_its_card(tmp_path, capsys, monkeypatch):
    """`distillery sample --lora phased.safetensors` takes sampler and timesteps from the card and switches
    the experts at the trained boundary: the grid is the trainer's own phased student, sampled from the same
    noise, up to the merge's float error; with the experts swapped in the file it is not."""
    if not (_digits().WEIGHTS_DIR / "teacher_unet.safetensors").is_file():
        pytest.skip("the digits teacher's weights are not in this tree")
    from safetensors.torch import load_file, save_file

    from comfyui_distillery import cli_sample
    from comfyui_distillery.trainers import api
    from comfyui_distillery.worlds.tasks import DigitsTask

    task = DigitsTask(guidance=1.0)
    method = api.make_method("phased_dmd", student_timesteps="999,749,499,249", phases=2, guidance_scale=1.0)
    config = api.TrainConfig(steps=2, batch_size=2, lora_rank=4, checkpoint_every=0, preview_every=0,
                             log_every=1000, run_dir=str(tmp_path / "run"))
    trainer = api.distill(task, method, config, progress=False)["trainer"]
    with torch.no_grad():  # two clearly different experts, so a wrong switch shows
        torch.manual_seed(0)
        for p in trainer.roles.trainable["student"]:
            p.copy_(torch.randn_like(p) * 0.05)
    path = api.export_student(trainer, tmp_path / "phased.safetensors")

    grids = []
    monkeypatch.setattr(cli_sample.DigitsBackend, "save", lambda self, x0, out: grids.append(x0))
    assert cli_main(["sample", "--model", "digits", "--lora", str(path), "--num", "10", "--seed", "3",
                     "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sampler"] == "x0_renoise" and report["timesteps"] == [999, 749, 499, 249]
    assert report["experts"] == [1, 1, 2, 2]

    labels = torch.arange(10)
    cond = _digits().encode_labels(task.text_encoder, labels)
    student = trainer.roles.student
    sigmas = sigmas_for(student, "custom", [999, 749, 499, 249])
    with torch.no_grad():
        ref = sample(student, make_noise((10, 1, 16, 16), seed=3), sigmas, "x0_renoise", cond=cond, seed=3)
    assert torch.allclose(grids[0], ref, atol=1e-4), float((grids[0] - ref).abs().max())

    state = load_file(str(path))  # the same file with the experts' keys swapped
    swapped = {("student_p2." + k[len("student_p1."):] if k.startswith("student_p1.") else
                "student_p1." + k[len("student_p2."):]): v for k, v in state.items()}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        save_file(swapped, str(tmp_path / "swapped.safetensors"), metadata=f.metadata())
    assert cli_main(["sample", "--model", "digits", "--lora", str(tmp_path / "swapped.safetensors"), "--num", "10",
                     "--seed", "3", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert float((grids[1] - ref).abs().max()) > 1e-2
    # a Phased DMD student needs the sampler its experts were trained with
    assert cli_main(["sample", "--model", "digits", "--lora", str(path), "--sampler", "tcd",
                     "--out", str(tmp_path / "t.png"), "--device", "cpu"]) == 2
    assert "x0_renoise" in capsys.readouterr().err


def test_cli_samples_a_phased_student_on_a_diffusers_folder(tiny_pipeline, tmp_path, capsys, monkeypatch):
    """On a diffusers folder the experts are the pipeline's own adapters, switched by level: the result is the
    phased sampler over the UNet with each expert's LoRA merged into a copy (a second implementation)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from comfyui_distillery import cli_sample
    from comfyui_distillery.core.models import DiffusersUNetModel
    from comfyui_distillery.core.schedules import schedule_from_diffusers_config
    from comfyui_distillery.sampling import sample_phased_x0_renoise
    from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas
    from comfyui_distillery.trainers import lora
    from comfyui_distillery.trainers.card import StudentCard

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)
    unet = copy.deepcopy(pipe.unet)
    states = []
    torch.manual_seed(0)
    for k in (1, 2):
        lora.add_lora_adapter(unet, f"e{k}", rank=4, target_modules=lora.UNET_TARGET_MODULES)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if f".e{k}." in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        states.append(lora.kohya_unet_state_dict(unet, f"e{k}"))
    card = StudentCard(method="phased_dmd", sampler="x0_renoise", timesteps=[999, 749, 499, 249],
                       prediction_type="epsilon", experts=[
                           {"expert": 1, "prefix": "student_p1.", "timesteps": [999, 749], "start_timestep": 999},
                           {"expert": 2, "prefix": "student_p2.", "timesteps": [499, 249], "start_timestep": 499}])
    path = tmp_path / "phased.safetensors"
    save_file({f"student_p{k + 1}.{key}": v.contiguous() for k, st in enumerate(states) for key, v in st.items()},
              str(path), metadata=card.to_metadata())

    grids = []
    monkeypatch.setattr(cli_sample.DiffusersFolderBackend, "save", lambda self, x0, out: grids.append(x0))
    assert cli_main(["sample", "--model", str(tiny_pipeline), "--lora", str(path), "--width", "16", "--height",
                     "16", "--num", "2", "--prompt", "a fox", "--seed", "4", "--out", str(tmp_path / "g.png"),
                     "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["timesteps"] == [999, 749, 499, 249] and report["experts"] == [1, 1, 2, 2]

    schedule = schedule_from_diffusers_config(dict(pipe.scheduler.config))
    cond, _ = pipe.encode_prompt("a fox", "cpu", 2, False)
    experts = []
    for state in states:
        merged = copy.deepcopy(pipe.unet)
        with lora.merged_kohya_unet_lora(merged, state):
            experts.append(Guided(DiffusersUNetModel(copy.deepcopy(merged), schedule), cond))
    sigmas = timesteps_to_sigmas(schedule, [999, 749, 499, 249])
    x = initial_state(experts[0].model, make_noise((2, 4, 8, 8), seed=4), float(sigmas[0]))
    ref = sample_phased_x0_renoise(experts, x, sigmas.double(), extra_args={"seed": 4}, disable=True,
                                   schedule=schedule, boundaries=[float(sigmas[2])])
    assert torch.allclose(grids[0], ref, rtol=1e-4, atol=1e-4), float((grids[0] - ref).abs().max())
    one = copy.deepcopy(experts[0].model)  # and not expert 1 all the way
    alone = sample_x0_renoise(Guided(one, cond), x, sigmas.double(), extra_args={"seed": 4}, disable=True,
                              schedule=schedule)
    assert float((grids[0] - alone).abs().max()) > 1e-3


@pytest.mark.parametrize("change,match", [
    ({"sampler": "lcm"}, "names sampler 'lcm'"),
    ({"prediction_type": "flow", "timesteps": [1000.0, 500.0]}, "distilled from a flow model; --model digits is epsilon"),
    ({"experts": [{"prefix": "a.", "start_timestep": 999}, {"prefix": "a.b.", "start_timestep": 499}]},
     "none the start of another"),
    ({"experts": [{"prefix": "a.", "start_timestep": 499}, {"prefix": "b.", "start_timestep": 999}]},
     "strictly decreasing"),
    ({"experts": "all"}, "non-empty list"),
])
def test_cli_refuses_a_card_it_cannot_follow_with_one_line(tmp_path, capsys, change, match):
    if _digits() is None or not (_digits().WEIGHTS_DIR / "teacher_unet.safetensors").is_file():
        pytest.skip("the digits teacher's weights are not in this tree")
    from safetensors.torch import save_file

    from comfyui_distillery.trainers.card import CARD_KEY

    card = {"method": "dmd2", "sampler": "x0_renoise", "timesteps": [999, 499], "prediction_type": "epsilon",
            **change}
    path = tmp_path / "student.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path), metadata={CARD_KEY: json.dumps(card)})
    assert cli_main(["sample", "--model", "digits", "--lora", str(path), "--out", str(tmp_path / "x.png"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(path) in err[0], err
