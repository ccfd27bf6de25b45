"""The user's own model: a diffusers folder trained from the command line, with a folder of real images.

A tiny random Stable Diffusion folder (conftest.py) stands in for the user's model; the checks are the
real ones: the images reach the trainer as the VAE's latents of the center-cropped pixels, captions as the
text encoder's embeddings, the GAN term runs in both phases, and diffusers loads the student LoRA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_distillery.cli import main as cli_main
from comfyui_distillery import api
from comfyui_distillery.trainers.real_images import load_image


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def photos(tmp_path):
    """Three small images of different sizes and modes; one has a caption beside it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(folder / "tall.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(folder / "grey.webp")
    (folder / "wide.txt").write_text("a red fox\n", encoding="utf-8")
    (folder / "notes.md").write_text("not an image")
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog in snow\n")
    return path


def test_load_image_resizes_the_short_side_and_center_crops(tmp_path):
    # a 2:1 image whose left, middle and right thirds are distinct colours: the crop keeps the middle
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:40] = (0, 255, 0)
    pixels[:, 40:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "stripes.png")
    x = load_image(tmp_path / "stripes.png", 15)
    assert x.shape == (3, 15, 15) and x.dtype == torch.float32
    centre = x[:, 5:10, 5:10]
    assert torch.allclose(centre, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1), atol=1e-2)
    assert x.min() >= -1 and x.max() <= 1


def test_real_images_are_the_vae_latents_and_captions_of_the_folder(tiny_pipeline, photos):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    task = api.make_task(str(tiny_pipeline), prompts=["a cat", "a dog in snow"], resolution=16,
                         real_images=str(photos), progress=False)
    assert task.has_real_images and task.describe()["real_images"] == 3
    bank = task.image_bank
    assert bank.latents.shape == (3, 4, 8, 8)  # the tiny VAE downsamples by 2

    vae = AutoencoderKL.from_pretrained(tiny_pipeline / "vae")
    files = ["grey.webp", "tall.jpg", "wide.png"]  # sorted
    with torch.no_grad():
        for i, name in enumerate(files):
            z = vae.encode(load_image(photos / name, 16)[None]).latent_dist.mean * vae.config.scaling_factor
            assert torch.allclose(bank.latents[i], z[0], atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_pipeline / "text_encoder")
    with torch.no_grad():
        ids = tokenizer(["a red fox", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        fox, empty = encoder(ids).last_hidden_state
    rows = bank.cond_bank[bank.cond_index]
    assert torch.allclose(rows[2], fox, atol=1e-5)  # wide.png has a caption
    assert torch.allclose(rows[0], empty, atol=1e-5) and torch.allclose(rows[1], empty, atol=1e-5)

    x0, cond = task.real_images(5, torch.Generator().manual_seed(0))
    assert x0.shape == (5, 4, 8, 8) and cond.shape == (5, 77, 32)
    # every drawn latent travels with its own image's conditioning
    for latent, c in zip(x0, cond):
        i = next(j for j in range(3) if torch.equal(bank.latents[j], latent))
        assert torch.equal(c, rows[i])


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_train_a_diffusers_folder_with_the_gan_term(tiny_pipeline, photos, prompts, tmp_path, capsys, method):
    out = tmp_path / "student.safetensors"
    rc = cli_main(["train", "--method", method, "--model", str(tiny_pipeline), "--prompts", str(prompts),
                   "--real-images", str(photos), "--gan-weight", "0.01", "--resolution", "16",
                   "--timesteps", "999,499", "--update-ratio", "1", "--steps", "2", "--batch-size", "2",
                   "--rank", "4", "--log-every", "1", "--run-dir", str(tmp_path / "run"), "--out", str(out),
                   "--quiet"])
    assert rc == 0 and out.is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gan = [r[k] for r in records for k in ("gan/student", "gan/critic") if k in r]
    assert {k for r in records for k in r if k.startswith("gan/")} == {"gan/student", "gan/critic"}
    assert all(np.isfinite(gan))

    # diffusers loads the student LoRA into the same folder's pipeline, every key used, and it changes the UNet
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden = torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, hidden).sample
        pipe.load_lora_weights(str(out), adapter_name="student")
        after = pipe.unet(x, t, hidden).sample
    from safetensors import safe_open

    from comfyui_distillery.jobs.students import student_card

    assert student_card(out).method == method
    with safe_open(str(out), "pt") as f:
        n_down = sum(k.endswith("lora_down.weight") for k in f.keys())
    layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and "student" in m.lora_A]
    assert len(layers) == n_down > 0
    assert not torch.allclose(before, after)


def test_tcd_trains_on_the_real_images_instead_of_teacher_samples(tiny_pipeline, photos, prompts, tmp_path):
    task = api.make_task(str(tiny_pipeline), prompts=["a cat"], resolution=16, real_images=str(photos),
                         progress=False)
    drawn = []
    real_images = task.real_images

    def recording(batch, generator):
        drawn.append(batch)
        return real_images(batch, generator)

    task.real_images = recording
    config = api.TrainConfig(steps=2, batch_size=2, lora_rank=4, run_dir=str(tmp_path / "run"), checkpoint_every=0)
    result = api.distill(task, api.make_method("tcd"), config, progress=False)
    assert drawn == [2, 2] and len(result["trainer"].method.samples) == 0


@pytest.mark.parametrize("setup, args, match", [
    ("empty", ["--gan-weight", "0.1"], "has no images"),
    ("broken", ["--gan-weight", "0.1"], "broken.png is not a readable image"),
    ("missing", ["--gan-weight", "0.1"], "no such folder"),
    ("ok", ["--method", "dmd2"], "DMD2 uses real images only for its GAN term"),
    ("ok", ["--model", "digits", "--gan-weight", "0.1"], "brings its own real data"),
    ("no_vae", ["--gan-weight", "0.1"], "has no vae/ folder"),
    ("ok", ["--gan-weight", "0.1", "--resolution", "18"], "resolution=18: this model needs a multiple of 4"),
])
def test_bad_real_images_are_one_clear_line(tiny_pipeline, photos, prompts, tmp_path, capsys, setup, args, match):
    import shutil

    model = tiny_pipeline
    folder = photos
    if setup == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif setup == "broken":
        (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif setup == "missing":
        folder = tmp_path / "nowhere"
    elif setup == "no_vae":
        model = tmp_path / "novae"
        shutil.copytree(tiny_pipeline, model)
        shutil.rmtree(model / "vae")
    argv = ["train", "--model", str(model), "--prompts", str(prompts), "--real-images", str(folder),
            "--steps", "1", "--run-dir", str(tmp_path / "run"), "--quiet"]
    rc = cli_main(argv + args)
    err = capsys.readouterr().err
    assert rc != 0 and match in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_unet_features_are_the_mid_block_output_with_their_graph(tiny_pipeline):
    """What the discriminator head reads: the mid block's output, without running the decoder half."""
    from diffusers import UNet2DConditionModel

    from comfyui_distillery.core.models import DiffusersUNetModel
    from comfyui_distillery.core.schedules import DiscreteVPSchedule

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    model = DiffusersUNetModel(unet, DiscreteVPSchedule.sd15())
    x, sigma, cond = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 5.0]), torch.randn(2, 77, 32)
    seen, up_calls = [], []
    unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out))
    unet.up_blocks[0].register_forward_hook(lambda m, a, out: up_calls.append(1))
    x.requires_grad_(True)
    features = model.features(x, sigma, cond)
    assert features.shape == (2, unet.config.block_out_channels[-1], 4, 4) and not up_calls
    model.predict_x0(x, sigma, cond)  # a full pass reaches the same mid-block output
    assert torch.allclose(features, seen[-1]) and up_calls
    features.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_single_file_checkpoint_is_checked_before_comfyui_loads_it(tmp_path, prompts, capsys, monkeypatch):
    """Single files are read by ComfyUI's loader (tests/integration/test_cli_checkpoint.py runs that); the
    header says first whether the file is a diffusion model at all."""
    from safetensors.torch import save_file

    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    rc = cli_main(["train", "--model", str(junk), "--prompts", str(prompts), "--run-dir", str(tmp_path / "run")])
    assert rc == 2 and f"model='{junk}'" in capsys.readouterr().err
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}
    bare = tmp_path / "unet.safetensors"  # a diffusion model alone: it needs its text encoders and VAE
    save_file(unet, str(bare))
    rc = cli_main(["train", "--model", str(bare), "--prompts", str(prompts), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "give them with --text-encoder FILE[:TYPE]" in err and "--vae FILE" in err
    ckpt = tmp_path / "model.safetensors"  # an SD1.5-shaped key set with its text encoder: the header alone passes
    save_file({**unet, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
               torch.zeros(8, 768)}, str(ckpt))
    rc = cli_main(["train", "--model", str(ckpt), "--prompts", str(prompts), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "give --comfyui /path/to/ComfyUI (or set COMFYUI_DIR)" in err
    rc = cli_main(["train", "--model", str(ckpt), "--comfyui", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    assert rc == 2 and "prompts: give at least one prompt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
