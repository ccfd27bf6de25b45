"""A teacher from split files (a diffusion model, its text encoders and VAE, as Flux and SD3.5 are distributed),
without ComfyUI: the run spec's checks (the CLIP type the family takes, how many text encoders, the VAE), the
header checks of each file (what it holds against the input it was given on, the VAE's latent width), the
command line's --text-encoder / --vae, and the student card's teacher files and trained guidance.

Small .safetensors files with the key names (and where read, the shapes) of real ones are written here; the
integration tests (tests/integration/test_split_teachers.py) load real tiny ones with ComfyUI's loaders.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from comfyui_distillery import api, cli
from comfyui_distillery import cli_train as train_cli
from comfyui_distillery import comfy_backend as cb
from comfyui_distillery.trainers.card import CARD_KEY, StudentCard
from comfyui_distillery.trainers.spec import DataSpec, RunSpec, TeacherSpec


@pytest.fixture(autouse=True)
def without_comfyui(monkeypatch):
    """The key-based family guess and no latent-width table, even where ComfyUI happens to be importable."""
    monkeypatch.setattr(cb, "_comfy_model_detection", lambda: None)
    monkeypatch.setattr(cb, "_family_latent_channels", lambda family: None)


def write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture()
def files(tmp_path):
    """Bare SD1.5 and Flux-dev diffusion models, CLIP-L and T5 text encoders, 4- and 16-channel VAEs, a full
    checkpoint and a LoRA."""
    z = torch.zeros
    return SimpleNamespace(
        sd15=write(tmp_path / "sd15_unet.safetensors", {
            "input_blocks.0.0.weight": z(8, 4, 3, 3), "out.2.weight": z(4, 8, 3, 3),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(8, 768)}),
        flux=write(tmp_path / "flux1-dev.safetensors", {
            "double_blocks.0.img_attn.qkv.weight": z(6, 2), "single_blocks.0.linear1.weight": z(4, 2),
            "guidance_in.in_layer.weight": z(2, 2)}),
        clip_l=write(tmp_path / "clip_l.safetensors", {
            "text_model.embeddings.token_embedding.weight": z(10, 8), "text_model.final_layer_norm.weight": z(8)}),
        t5=write(tmp_path / "t5xxl.safetensors", {"encoder.block.0.layer.0.SelfAttention.k.weight": z(8, 8),
                                                  "shared.weight": z(10, 8)}),
        vae4=write(tmp_path / "sd_vae.safetensors", {"encoder.conv_in.weight": z(8, 3, 3, 3),
                                                     "decoder.conv_in.weight": z(8, 4, 3, 3)}),
        vae16=write(tmp_path / "ae.safetensors", {"encoder.conv_in.weight": z(8, 3, 3, 3),
                                                  "decoder.conv_in.weight": z(8, 16, 3, 3)}),
        checkpoint=write(tmp_path / "full.safetensors", {
            "model.diffusion_model.input_blocks.0.0.weight": z(8, 4, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": z(8),
            "first_stage_model.decoder.conv_in.weight": z(8, 4, 3, 3)}),
        lora=write(tmp_path / "style.safetensors", {"lora_unet_out_2.lora_down.weight": z(2, 8)}),
        prompts=tmp_path / "prompts.txt")


def split(family="Flux", **changes) -> RunSpec:
    teacher = dict(kind="split", path="/m/flux1-dev.safetensors", family=family,
                   text_encoders=["/t/clip_l.safetensors", {"name": "t5", "path": "/t/t5xxl.safetensors"}],
                   vae="/v/ae.safetensors")
    teacher.update(changes)
    return RunSpec.build(method="dmd2", teacher=TeacherSpec(**teacher), data=DataSpec(prompts=["a cat"]))


# --- the run spec ----------------------------------------------------------------------------------------------
def test_a_split_teacher_is_typed_completed_and_round_trips():
    spec = split()
    t = spec.teacher
    assert (t.kind, t.name, t.clip_type) == ("split", "flux1-dev.safetensors", "flux")  # auto: the family's type
    assert t.text_encoders == [{"name": "clip_l.safetensors", "path": "/t/clip_l.safetensors"},
                               {"name": "t5", "path": "/t/t5xxl.safetensors"}]
    assert t.vae == {"name": "ae.safetensors", "path": "/v/ae.safetensors"}
    data = json.loads(json.dumps(spec.to_dict()))
    assert RunSpec.from_dict(data) == spec and RunSpec.from_dict(data).fingerprint() == spec.fingerprint()
    # another VAE or text encoder is another teacher: another run
    assert split(vae="/v/other.safetensors").fingerprint() != spec.fingerprint()
    assert split(text_encoders=["/t/clip_l.safetensors", "/t/t5xxl_fp8.safetensors"]).fingerprint() != \
        spec.fingerprint()
    assert split(family="SD3", clip_type="sd3").teacher.clip_type == "sd3"
    assert split(family="SD15", text_encoders=["/t/clip_l.safetensors"]).teacher.clip_type == "stable_diffusion"
    # a family Distillery has no row for loads with the type given, as ComfyUI's loader would
    assert split(family="HiDream", clip_type="HiDream", text_encoders=["/a", "/b", "/c", "/d"]).teacher.clip_type \
        == "hidream"


def test_a_checkpoint_teachers_identity_does_not_hold_the_split_fields():
    """A job made before split teachers existed has a config without their fields: it reads, and its
    fingerprint (what finds the same job again) is what the same spec gives now."""
    spec = RunSpec.build(method="dmd2", teacher=TeacherSpec("checkpoint", "/c/m.safetensors", family="SD15"),
                         data=DataSpec(prompts=["a"]))
    old = spec.to_dict()
    for key in ("text_encoders", "clip_type", "vae"):
        del old["teacher"][key]
    assert RunSpec.from_dict(old).fingerprint() == spec.fingerprint()


@pytest.mark.parametrize("changes, message", [
    ({"clip_type": "sd3"}, "clip_type='sd3': a Flux diffusion model takes its text encoders (CLIP-L and T5-XXL) "
                           "as type 'flux'; pick flux (or auto)"),
    ({"text_encoders": ["/t/clip_l.safetensors"]},
     "text_encoders: a Flux diffusion model takes 2 text-encoder files (CLIP-L and T5-XXL), 1 given"),
    ({"family": "SD15"}, "text_encoders: a SD15 diffusion model takes 1 text-encoder file (CLIP-L), 2 given"),
    ({"family": "SD3", "text_encoders": ["/a", "/b", "/c", "/d"]}, "takes 1 or 2 or 3 text-encoder files"),
    ({"text_encoders": []}, "text_encoders: the diffusion model flux1-dev.safetensors needs its text-encoder files"),
    ({"text_encoders": [{"name": "x"}]}, "text encoder 1: give the text-encoder file"),
    ({"vae": None}, "vae: the diffusion model flux1-dev.safetensors needs its VAE file"),
    ({"family": "Chroma2", "clip_type": None}, "clip_type: Distillery does not know which CLIP type a Chroma2 "
                                               "diffusion model takes"),
])
def test_a_split_teacher_that_does_not_fit_is_refused_naming_the_input(changes, message):
    with pytest.raises(ValueError) as err:
        split(**changes)
    assert message in str(err.value), str(err.value)


def test_only_a_split_teacher_takes_text_encoders_and_a_vae():
    for changes, field in (({"text_encoders": ["/t/clip_l.safetensors"]}, "text_encoders"),
                           ({"vae": "/v/ae.safetensors"}, "vae"), ({"clip_type": "flux"}, "clip_type")):
        with pytest.raises(ValueError, match=f"^{field}: only a split teacher"):
            RunSpec.build(method="dmd2", teacher=TeacherSpec("checkpoint", "/c/m.safetensors", **changes),
                          data=DataSpec(prompts=["a"]))
    with pytest.raises(ValueError, match="prompts: give at least one prompt"):
        RunSpec.build(method="dmd2", teacher=split().teacher, data=DataSpec())
    lora = {"path": "/l/style.safetensors", "strength_model": 0.5}  # a LoRA stack goes on a split teacher too
    assert split(loras=[lora]).teacher.loras[0]["strength_clip"] == 1.0


# --- the files' headers ------------------------------------------------------------------------------------------
def probe(model, encoders, vae, clip_type=None):
    return cb.probe_split_teacher((model, model.name, "unet_name"),
                                  [(p, p.name, f"clip_name{i + 1}") for i, p in enumerate(encoders)],
                                  (vae, vae.name, "vae_name"), clip_type)


def test_the_files_of_a_split_teacher_are_checked_from_their_headers(files, monkeypatch):
    assert probe(files.sd15, [files.clip_l], files.vae4) == {
        "family": "SD15", "prediction": "epsilon", "unet_prefix": "", "detected_by": "keys",
        "clip_type": "stable_diffusion"}
    assert probe(files.flux, [files.clip_l, files.t5], files.vae16)["clip_type"] == "flux"
    refusals = [
        ((files.clip_l, [files.clip_l], files.vae4), "unet_name='clip_l.safetensors': a text encoder (2 tensors) "
         "without a diffusion model; pick a diffusion model (ComfyUI's models/diffusion_models"),
        ((files.sd15, [files.vae4], files.vae4), "clip_name1='sd_vae.safetensors': a VAE, not a text encoder; pick "
         "a text encoder from models/text_encoders"),
        ((files.sd15, [files.checkpoint], files.vae4), "clip_name1='full.safetensors': a full checkpoint, not a "
         "text encoder"),
        ((files.sd15, [files.lora], files.vae4), "clip_name1='style.safetensors': a LoRA, not a text encoder"),
        ((files.sd15, [files.clip_l], files.clip_l), "vae_name='clip_l.safetensors': a text encoder, not a VAE; "
         "pick a VAE from models/vae"),
        ((files.sd15, [files.clip_l], files.sd15), "vae_name='sd15_unet.safetensors': a diffusion model, not a VAE"),
        ((files.flux, [files.clip_l], files.vae16), "text_encoders: a Flux diffusion model takes 2"),
        ((files.flux, [files.clip_l, files.t5], files.vae16, "sd3"), "clip_type='sd3': a Flux diffusion model"),
    ]
    for args, message in refusals:
        with pytest.raises(ValueError) as err:
            probe(*args)
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="vae_name='gone.safetensors': no such file"):
        probe(files.sd15, [files.clip_l], files.vae4.with_name("gone.safetensors"))
    # with ComfyUI, the family's latent width (its supported_models latent format) checks the VAE
    monkeypatch.setattr(cb, "_family_latent_channels", lambda family: {"Flux": 16, "SD15": 4}[family])
    with pytest.raises(ValueError, match="vae_name='sd_vae.safetensors': a VAE of 4-channel latents; the Flux "
                                         "diffusion model flux1-dev.safetensors works in 16 channels"):
        probe(files.flux, [files.clip_l, files.t5], files.vae4)
    assert probe(files.flux, [files.clip_l, files.t5], files.vae16)["family"] == "Flux"


# --- the command line -------------------------------------------------------------------------------------------
def _resolve(*argv):
    return train_cli.resolve(cli.build_parser().parse_args(["train", *argv]))


def test_the_command_line_takes_a_diffusion_model_with_its_text_encoders_and_vae(files):
    files.prompts.write_text("a cat\n")
    spec, run_dir = _resolve("--model", str(files.flux), "--text-encoder", str(files.clip_l), "--text-encoder",
                             f"{files.t5}:FLUX", "--vae", str(files.vae16), "--prompts", str(files.prompts))
    t = spec.teacher
    assert (t.kind, t.path, t.name, t.family, t.clip_type) == ("split", str(files.flux), "flux1-dev.safetensors",
                                                                "Flux", "flux")
    assert [te["path"] for te in t.text_encoders] == [str(files.clip_l), str(files.t5)]
    assert t.vae == {"name": "ae.safetensors", "path": str(files.vae16)} and run_dir == "runs/flux1-dev-dmd2"
    for argv, message in [
        (["--model", str(files.flux), "--text-encoder", str(files.clip_l), "--vae", str(files.vae16)],
         "text_encoders: a Flux diffusion model takes 2 text-encoder files"),
        (["--model", str(files.flux), "--text-encoder", f"{files.clip_l}:sd3", "--text-encoder", f"{files.t5}:flux",
          "--vae", str(files.vae16)], "--text-encoder: one CLIP type for all text encoders"),
        (["--model", str(files.flux), "--text-encoder", str(files.clip_l), "--text-encoder", str(files.t5)],
         "--vae: give the VAE of the diffusion model"),
        (["--model", str(files.flux), "--text-encoder", str(files.clip_l), "--text-encoder", str(files.vae16),
          "--vae", str(files.vae16)], "ae.safetensors': a VAE, not a text encoder"),
        (["--model", str(files.flux)], "a diffusion model without its text encoders; give them with "
                                        "--text-encoder FILE[:TYPE]"),
        (["--model", "digits", "--vae", str(files.vae16)], "--model digits: no such file"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            _resolve(*argv, "--prompts", str(files.prompts))
        assert message in str(err.value), (argv, str(err.value))


# --- the student card ---------------------------------------------------------------------------------------------
def test_the_card_records_the_teacher_files_and_the_trained_guidance():
    spec = split(loras=[{"name": "style.safetensors", "path": "/l/style.safetensors"}])
    extras = api.card_extras(spec, job="j1", task=SimpleNamespace(trained_guidance=3.5))
    assert extras["teacher_files"] == {"diffusion_model": "flux1-dev.safetensors",
                                       "text_encoders": ["clip_l.safetensors", "t5"], "clip_type": "flux",
                                       "vae": "ae.safetensors"}
    assert extras["guidance"] == 3.5 and extras["base_checkpoint"] is None
    assert extras["teacher_loras"] == [{"name": "style.safetensors", "strength_model": 1.0, "strength_clip": 1.0}]
    card = StudentCard(method="dmd2", sampler="x0_renoise", timesteps=[999, 499], prediction_type="flow", **extras)
    assert StudentCard.from_metadata(card.to_metadata()) == card
    # a CFG teacher's task has no trained guidance; a card written before these fields reads with None
    assert api.card_extras(spec, task=SimpleNamespace())["guidance"] is None
    old = json.loads(card.to_metadata()[CARD_KEY])
    for key in ("teacher_files", "guidance"):
        del old[key]
    read = StudentCard.from_metadata({CARD_KEY: json.dumps(old)})
    assert read.teacher_files is None and read.guidance is None and read.timesteps == [999, 499]


def test_the_jobs_panel_shows_the_split_files_by_name_never_their_paths():
    from comfyui_distillery.jobs.http import _public_config

    shown = _public_config(split().to_dict())["teacher"]
    assert shown == {"kind": "split", "name": "flux1-dev.safetensors", "family": "Flux", "clip_type": "flux",
                     "text_encoders": ["clip_l.safetensors", "t5"], "vae": "ae.safetensors"}
    assert "/t/" not in json.dumps(shown) and "/v/" not in json.dumps(shown)
