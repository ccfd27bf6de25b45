"""Teachers from split files, the way Flux and SD3.5 are distributed (skips without COMFYUI_DIR): a diffusion
model in models/diffusion_models, its text encoders in models/text_encoders and its VAE in models/vae.

The files are cut from the tiny random checkpoints the other integration tests build with ComfyUI's own classes
(comfy_harness's SD1.5; test_model_families' Flux-dev-class, whose one-layer T5 of T5-XXL's width ComfyUI builds
through the test-only sitecustomize there): each part's keys without the checkpoint's prefix, in the layout of
the released files (flux1-dev.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors). Then, in
a real ComfyUI server:

* Distillery Teacher Diffusion Model (+ DMD2 + Prompts -> Start) trains a 2-step DMD2 job in its worker, which
  loads the three with ComfyUI's loaders (UNETLoader / CLIPLoader or DualCLIPLoader / VAELoader semantics); the
  LoRA names only weights of the diffusion-model file, LoraLoaderModelOnly on UNETLoader's MODEL applies it with
  zero unmatched keys and it changes the output, and the student card records the files; for Flux-dev also the
  guidance the student was trained at (ComfyUI's default 3.5), which Load Distilled LoRA tells the user to give
  FluxGuidance, and the student samples with it at cfg 1;
* the Plan VRAM node plans from the diffusion-model file (SD1.5);
* a text encoder of the wrong type or a VAE of another latent width is refused on the node before any job;
* `distillery train --model UNET --text-encoder CLIP --vae VAE` trains the SD1.5 split from the command line.

One server for the module, OMP_NUM_THREADS=1 (DISTILLERY_E2E_THREADS to change).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import comfy_harness
from test_jobs_e2e import post_prompt
from test_model_families import (build_checkpoint, builder_version, hook_env, kill_workers, lora_modules,
                                 read_header, read_latent, run_job, widget_defaults, T5_HOOK)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-Distillery"
RESOLUTION, STEPS, RANK, LR = 64, 2, 4, 1e-3
PROMPTS = "a photo of a cat\na red house by a lake"
TEACHER, METHOD, PROMPTS_NODE, ADVANCED, START, PLAN = "11", "12", "13", "15", "1", "30"
WRONG_FOLDER = "ae_in_the_wrong_folder.safetensors"

# each split: the checkpoint's prefixes -> (ComfyUI model folder, file, the prefix the released file has)
SPLITS = {
    "sd15": {"model.diffusion_model.": ("diffusion_models", "unet", ""),
             "cond_stage_model.transformer.text_model.": ("text_encoders", "clip_l", "text_model."),
             "cond_stage_model.transformer.": ("text_encoders", "clip_l", "text_model."),
             "first_stage_model.": ("vae", "vae", "")},
    "flux_dev": {"model.diffusion_model.": ("diffusion_models", "unet", ""),
                 "text_encoders.clip_l.transformer.": ("text_encoders", "clip_l", ""),
                 "text_encoders.clip_l.": ("text_encoders", "clip_l", ""),
                 "text_encoders.t5xxl.transformer.": ("text_encoders", "t5xxl", ""),
                 "text_encoders.t5xxl.": ("text_encoders", "t5xxl", ""),
                 "vae.": ("vae", "ae", "")},
}
CASES = {  # how ComfyUI's own nodes load each split for sampling, and what the job must report
    "sd15": {"family": "SD15", "model": "BaseModel", "prediction": "epsilon", "clip_type": "stable_diffusion",
             "latent": "EmptyLatentImage", "scheduler": "normal", "guidance": None},
    "flux_dev": {"family": "Flux", "model": "Flux", "prediction": "flow", "clip_type": "flux",
                 "latent": "EmptySD3LatentImage", "scheduler": "simple", "guidance": 3.5},
}


# --------------------------------------------------------------------------- the split files

def split_checkpoint(source: Path, key: str, out_dir: Path) -> dict:
    """{folder: [paths]} of the checkpoint's parts (cached beside it, keyed by its size and time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stamp = f"{source.stat().st_size}-{source.stat().st_mtime_ns}-{json.dumps(SPLITS[key], sort_keys=True)}"
    index = out_dir / "split.json"
    if index.exists() and json.loads(index.read_text()).get("stamp") == stamp:
        return {k: [Path(p) for p in v] for k, v in json.loads(index.read_text())["files"].items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = sorted(SPLITS[key].items(), key=lambda rule: -len(rule[0]))  # the longest prefix first
    parts: dict[tuple, dict] = {}
    with safe_open(str(source), framework="pt") as f:
        for name in f.keys():
            if name.endswith("position_ids"):
                continue
            prefix, (folder, stem, new) = next((r for r in rules if name.startswith(r[0])), (None, (None,) * 3))
            assert prefix is not None, f"{source.name}: no part takes {name}"
            parts.setdefault((folder, stem), {})[new + name[len(prefix):]] = f.get_tensor(name)
    clip_l = parts.get(("text_encoders", "clip_l"), {})
    if "text_model.final_layer_norm.weight" in clip_l and "text_projection.weight" not in clip_l:
        # a released clip_l file has CLIP's text projection, which the tiny SD1.5's transformers CLIPTextModel
        # lacks (SD1.5 does not use the pooled output): the identity, so ComfyUI's CLIP loader finds every weight
        import torch

        width = clip_l["text_model.final_layer_norm.weight"].shape[0]
        clip_l["text_projection.weight"] = torch.eye(width, dtype=clip_l["text_model.final_layer_norm.weight"].dtype)
    files: dict[str, list] = {}
    for (folder, stem), tensors in sorted(parts.items()):
        path = out_dir / f"tiny_{key}_{stem}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"note": f"part of a random tiny {key} test checkpoint, not a model"})
        os.replace(tmp, path)
        files.setdefault(folder, []).append(path)
    index.write_text(json.dumps({"stamp": stamp, "files": {k: [str(p) for p in v] for k, v in files.items()}}))
    return files


@pytest.fixture(scope="module")
def splits(comfy_dir, tiny_sd15_checkpoint, tmp_path_factory) -> dict:
    cache = comfy_harness.test_model_cache(tmp_path_factory)
    flux = cache / f"tiny_flux_dev_{builder_version()}.safetensors"
    build_checkpoint(comfy_dir, "flux_dev", flux)
    out = {}
    for key, source in (("sd15", tiny_sd15_checkpoint), ("flux_dev", flux)):
        t0 = time.monotonic()
        out[key] = split_checkpoint(source, key, cache / f"split_{source.stem}")
        print(f"\n[split] {source.name} -> {[p.name for ps in out[key].values() for p in ps]} "
              f"({time.monotonic() - t0:.0f} s)")
    return out


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t5_hook")
    (folder / "sitecustomize.py").write_text(T5_HOOK)
    return folder


@pytest.fixture(scope="module")
def split_comfy(comfy_dir, splits, hook_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("split_comfy")
    models: dict[str, list] = {}
    for files in splits.values():
        for folder, paths in files.items():
            models.setdefault(folder, []).extend(paths)
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=base, custom_nodes=[(PACK, REPO_ROOT)], models=models,
        env=hook_env(hook_dir, os.environ.get("DISTILLERY_E2E_THREADS", "1")),
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "180")))
    server.link_model("text_encoders", splits["flux_dev"]["vae"][0], WRONG_FOLDER)  # a VAE put in the wrong folder
    try:
        with server:
            yield server
    finally:
        kill_workers(base)


# --------------------------------------------------------------------------- graphs

def names(splits, key) -> dict:
    files = splits[key]
    encoders = sorted(p.name for p in files["text_encoders"])  # clip_l before t5xxl, as DualCLIPLoader's recipe
    return {"unet": files["diffusion_models"][0].name, "encoders": encoders, "vae": files["vae"][0].name}


def teacher_node(splits, key, **changes) -> dict:
    n = names(splits, key)
    inputs = {"unet_name": n["unet"], "clip_name1": n["encoders"][0],
              "clip_name2": n["encoders"][1] if len(n["encoders"]) > 1 else "none", "clip_name3": "none",
              "type": "auto", "vae_name": n["vae"], **changes}
    return {"class_type": "DistilleryTeacherDiffusionModel", "inputs": inputs}


def job_graph(comfy, splits, key, lora_name: str, plan: bool = False) -> dict:
    start = {**widget_defaults(comfy, "DistilleryStartDistillation"),
             "steps": STEPS, "batch_size": 1, "student_lr": LR, "critic_lr": LR, "ema_decay": 0.0, "seed": 0,
             "lora_rank": RANK, "checkpoint_every": STEPS, "preview_every": 0, "resolution": RESOLUTION,
             "lora_name": lora_name, "teacher": [TEACHER, 0], "method": [METHOD, 0], "prompts": [PROMPTS_NODE, 0],
             "advanced": [ADVANCED, 0]}
    graph = {
        TEACHER: teacher_node(splits, key),
        METHOD: {"class_type": "DistilleryDMD2", "inputs": {
            **widget_defaults(comfy, "DistilleryDMD2"), "student_timesteps": "999,499", "update_ratio": 1}},
        PROMPTS_NODE: {"class_type": "DistilleryPrompts", "inputs": {
            "prompts": PROMPTS, "prompts_file": "", "negative_prompt": ""}},
        ADVANCED: {"class_type": "DistilleryAdvancedTraining", "inputs": {
            **widget_defaults(comfy, "DistilleryAdvancedTraining"), "log_every": 1}},
        START: {"class_type": "DistilleryStartDistillation", "inputs": start},
    }
    if plan:  # the same inputs as Start, planned from the diffusion-model file
        inputs = {k: v for k, v in start.items() if k not in ("lora_name", "prompts")}
        graph[PLAN] = {"class_type": "DistilleryPlanVRAM", "inputs": {**inputs, "vram_gb": 8.0, "fit": False}}
    return graph


def sample_graph(case: dict, n: dict, lora: str, guidance: float | None, prefix: str) -> dict:
    """ComfyUI's split loaders (UNETLoader, CLIPLoader / DualCLIPLoader, VAELoader); LoraLoaderModelOnly ->
    KSampler (1 step) and the bare MODEL with the same KSampler -> SaveLatent each; Load Distilled LoRA ->
    SamplerCustom with its card's sampler and sigmas -> SaveLatent + VAEDecode -> SaveImage, and the bare MODEL
    with that sampler, sigmas and noise -> SaveLatent. For Flux-dev the conditioning goes through FluxGuidance
    at the card's guidance."""
    if len(n["encoders"]) == 1:
        clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": n["encoders"][0], "type": case["clip_type"]}}
    else:
        clip = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": n["encoders"][0],
                                                           "clip_name2": n["encoders"][1], "type": case["clip_type"]}}
    cond = ["5", 0]
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": n["unet"], "weight_dtype": "default"}},
        "2": clip,
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": n["vae"]}},
        "4": {"class_type": case["latent"], "inputs": {"width": RESOLUTION, "height": RESOLUTION, "batch_size": 1}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
    }
    if guidance is not None:
        graph["6"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": guidance}}
        cond = ["6", 0]
    ksampler = {"latent_image": ["4", 0], "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": case["scheduler"], "denoise": 1.0, "positive": cond, "negative": cond}
    custom = {"add_noise": True, "noise_seed": 7, "cfg": 1.0, "sampler": ["20", 1], "sigmas": ["20", 2],
              "latent_image": ["4", 0], "positive": cond, "negative": cond}
    graph.update({
        "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                               "strength_model": 1.0}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["10", 0], **ksampler}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": f"{prefix}_loraloader"}},
        "14": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **ksampler}},
        "15": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"{prefix}_bare"}},
        "20": {"class_type": "DistilleryLoadDistilledLoRA", "inputs": {
            "model": ["1", 0], "lora_name": lora, "strength": 1.0, "denoise": 1.0}},
        "22": {"class_type": "SamplerCustom", "inputs": {"model": ["20", 0], **custom}},
        "23": {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": f"{prefix}_student"}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["3", 0]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": f"{prefix}_student"}},
        "30": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], **custom}},
        "31": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": f"{prefix}_base"}},
    })
    return graph


def refused(comfy, graph) -> dict:
    """The server's validation answer for a prompt it refuses (HTTP 400)."""
    status, answer, text = post_prompt(comfy, graph)
    assert status == 400, (status, text[:3000])
    return answer


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("key", list(CASES))
def test_a_split_teacher_trains_and_its_lora_loads_on_the_diffusion_model(split_comfy, splits, key):
    from comfyui_distillery.jobs.students import student_card
    import numpy as np

    comfy, case, n = split_comfy, CASES[key], names(splits, key)
    name = f"split_{key}"
    info = run_job(comfy, job_graph(comfy, splits, key, name),
                   timeout=float(os.environ.get("DISTILLERY_FAMILIES_JOB_TIMEOUT", "2400")))
    log = comfy.get(f"/distillery/jobs/{info['id']}/log?lines=2000")["log"]
    print(f"\n[split] {key}: DMD2 job of {STEPS} steps, {info['wall_s']:.0f} s (queue -> LoRA written)")
    assert info["state"] == "completed", f"{info.get('state')}: {info.get('reason')}\n{log[-6000:]}"
    teacher = info["config"]["teacher"]
    assert (teacher["kind"], teacher["name"], teacher["family"], teacher["clip_type"]) == \
        ("split", n["unet"], case["family"], case["clip_type"]), teacher
    assert teacher["text_encoders"] == n["encoders"] and teacher["vae"] == n["vae"], teacher  # names, no paths
    assert "loading the diffusion model" in log and "with ComfyUI's loaders" in log, log[-4000:]
    found = re.search(r"model (\w+), (\w+) schedule \((\w+)\), latent \(([^)]*)\), (\d+) layers get LoRA", log)
    assert found and found.group(1) == case["model"] and found.group(3) == case["prediction"], log[-4000:]
    assert ("the student is trained at guidance 3.5" in log) == (case["guidance"] is not None), log[-4000:]

    lora = comfy.models_dir / "loras" / f"{name}.safetensors"
    card = student_card(lora)
    assert card is not None and card.steps_trained == STEPS and card.prediction_type == case["prediction"], card
    assert card.teacher_files == {"diffusion_model": n["unet"], "text_encoders": n["encoders"],
                                  "clip_type": case["clip_type"], "vae": n["vae"]}, card.teacher_files
    assert card.base_checkpoint is None and card.guidance == case["guidance"], card
    unet = splits[key]["diffusion_models"][0]
    weights = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in read_header(unet)
               if k.endswith(".weight")}
    modules = lora_modules(lora)
    assert len(modules) == int(found.group(5)) and sorted(modules - weights) == [], sorted(modules - weights)[:10]

    before = len(comfy.log_text())
    entry = comfy.run(sample_graph(case, n, lora.name, card.guidance, name), timeout=1800)
    new_log = comfy.log_text()[before:]
    assert comfy_harness.lora_key_warnings(new_log) == [], comfy_harness.lora_key_warnings(new_log)[:10]
    assert "clip missing" not in new_log, new_log[-3000:]  # the text-encoder files load complete
    latents = {p.name.split("_")[-3]: read_latent(p) for p in comfy.output_files(entry, key="latents")}
    assert set(latents) == {"loraloader", "bare", "student", "base"}, sorted(latents)
    assert all(np.isfinite(v).all() for v in latents.values())
    images = comfy.output_files(entry)  # the student's sample through the split VAE
    assert len(images) == 1 and images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", images
    lora_effect = float(np.abs(latents["loraloader"] - latents["bare"]).max())
    student_effect = float(np.abs(latents["student"] - latents["base"]).max())
    told = " ".join(entry["outputs"].get("20", {}).get("text", []))
    print(f"[split] {key}: LoraLoaderModelOnly vs bare max |diff| {lora_effect:.3g}; student card sampler vs bare "
          f"{student_effect:.3g}; Load Distilled LoRA says: {told!r}")
    assert lora_effect > 0 and student_effect > 0
    if case["guidance"] is None:
        assert "FluxGuidance" not in told, told
    else:
        assert f"FluxGuidance (guidance {case['guidance']:g})" in told, told
    assert n["unet"] in told, told
    comfy.post("/free", {"unload_models": True, "free_memory": True})


def test_the_plan_node_plans_from_the_diffusion_model_file(split_comfy, splits):
    """Plan VRAM with a split teacher: the family from the diffusion-model file, its parameters from its header."""
    comfy = split_comfy
    graph = job_graph(comfy, splits, "sd15", "split_plan", plan=True)
    graph.pop(START)
    graph.pop(PROMPTS_NODE)
    entry = comfy.run(graph, timeout=900)
    summary = entry["outputs"][PLAN]["text"][0]
    print(f"\n[split plan]\n{summary}")
    assert summary.startswith("sd15 @ 64px, dmd2: peak ") and "FITS in 8.0 GiB" in summary, summary
    assert "the checkpoint's diffusion model has 0." in summary  # read from the diffusion-model file alone


def test_a_split_teacher_that_does_not_fit_is_refused_before_any_job(split_comfy, splits):
    comfy = split_comfy
    sd15, flux = names(splits, "sd15"), names(splits, "flux_dev")
    for changes, message in [
        ({"type": "sd3"}, "clip_type='sd3': a Flux diffusion model takes its text encoders (CLIP-L and T5-XXL) "
                          "as type 'flux'"),
        ({"clip_name2": "none"}, "text_encoders: a Flux diffusion model takes 2 text-encoder files"),
        ({"vae_name": sd15["vae"]}, f"vae_name='{sd15['vae']}': a VAE of 4-channel latents; the Flux diffusion "
                                    f"model {flux['unet']} works in 16 channels"),
        ({"clip_name2": WRONG_FOLDER}, f"clip_name2='{WRONG_FOLDER}': a VAE, not a text encoder"),
        ({"clip_name1": sd15["unet"]}, f"clip_name1='{sd15['unet']}': not in models/text_encoders"),
    ]:
        graph = job_graph(comfy, splits, "flux_dev", "split_refused")
        graph[TEACHER]["inputs"].update(changes)
        answer = refused(comfy, graph)
        errors = answer.get("node_errors") or {}
        assert list(errors) == [TEACHER], answer
        details = {e["details"] for e in errors[TEACHER]["errors"]}
        assert any(message in d for d in details), (message, details)
    assert not (comfy.models_dir / "loras" / "split_refused.safetensors").exists()


def test_the_command_line_trains_a_split_teacher(comfy_dir, splits, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "comfyui_distillery").symlink_to(REPO_ROOT, target_is_directory=True)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    files = splits["sd15"]
    out = tmp_path / "student.safetensors"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkg"), OMP_NUM_THREADS="1")
    argv = [comfy_harness.comfy_python(comfy_dir), "-m", "comfyui_distillery.cli", "train",
            "--model", str(files["diffusion_models"][0]), "--text-encoder", f"{files['text_encoders'][0]}:auto",
            "--vae", str(files["vae"][0]), "--comfyui", str(comfy_dir), "--prompts", str(tmp_path / "prompts.txt"),
            "--resolution", "64", "--timesteps", "999,499", "--steps", "2", "--batch-size", "1", "--rank", "4",
            "--update-ratio", "1", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--quiet"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    from comfyui_distillery.jobs.students import student_card

    card = student_card(out)
    assert card.steps_trained == 2 and card.task == "comfy" and card.guidance is None, card
    assert card.teacher_files == {"diffusion_model": "tiny_sd15_unet.safetensors",
                                  "text_encoders": ["tiny_sd15_clip_l.safetensors"], "clip_type": "stable_diffusion",
                                  "vae": "tiny_sd15_vae.safetensors"}, card.teacher_files
    header = read_header(out)
    header.pop("__metadata__")
    assert sum(k.endswith(".alpha") for k in header) == 65  # every adapted layer, as from the checkpoint
