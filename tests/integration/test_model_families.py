"""Model families beyond SD1.5 through the real job path (skips without COMFYUI_DIR).

Three tiny random checkpoints are built here with ComfyUI's own classes (in ComfyUI's interpreter, fp16, cached
next to the tiny SD1.5 one; nothing is downloaded or shipped), each detected by ComfyUI's model_detection as its
family, with the text encoders and VAE its checkpoint loader builds for that family:

* ``Flux`` (Flux-dev-class): ``comfy.ldm.flux.model.Flux`` with a guidance embedding, at the sizes detection pins
  (hidden 3072, 24 heads, 4096-wide text input) but one double and one single block; ModelSamplingFlux (mu
  1.15). Text encoders: ComfyUI's Flux loader always builds CLIP-L and T5-XXL (4.8 B parameters, 9.5 GB in
  fp16) from fixed configs, and a checkpoint without T5 weights loads with them uninitialised ("clip missing");
  the pack's Teacher Checkpoint needs the text encoders in the file (the worker encodes the prompts with
  them). So the file holds CLIP-L and a T5 of T5-XXL's layout and width (4096, what Flux's txt_in takes) with
  one narrow layer, which the server and the job's worker build through ComfyUI's own per-encoder config
  option (``model_options["t5xxl_model_config"]``, read by comfy/sd1_clip.py): a ``sitecustomize`` on the
  server's PYTHONPATH (inherited by the worker) adds that option when comfy.text_encoders.sd3_clip's
  T5XXLModel is built. Nothing else of ComfyUI is changed, and only Flux builds a T5 here.
* ``SD3``: ComfyUI's MMDiT (depth 2: hidden 128) with CLIP-L alone, the smallest text encoder ComfyUI's SD3
  loader accepts (it pads the missing CLIP-G / T5 parts with zeros); ModelSamplingDiscreteFlow, shift 3.
* ``SDXL`` v-prediction with zero terminal SNR: an LDM UNet at the sizes SDXL's detection pins (320 channels,
  transformer depths 0, 0, 2, 2, 10, 10, context 2048, adm 2816) with channel_mult 1, 1, 1 and shallow output
  blocks, CLIP-L + CLIP-G (SDXL's loader builds both; complete, random), and the ``v_pred`` / ``ztsnr`` keys
  ComfyUI reads (its sigmas then end at about 4500, alpha_bar 4.9e-8).

Each has a TAESD VAE of its latent width. For each family: ComfyUI's detection (as the pack's probe runs it)
names the family; in ComfyUI's interpreter the schedule the pack infers (schedule_from_model_sampling) is checked
against the model's own model_sampling (flow with its shift on the pack's 0..1000 grid; v-prediction with the
zero-terminal-SNR sigmas) and the first step of the pack's sampler from the top level (sigma 1 for flow, about
4500 for the SDXL one, and 1e9, ComfyUI's "infinite" start) through ComfyUI's model is finite; for Flux the
teacher runs the guidance scale as the guidance input in one pass, where a CFG model's teacher runs a cond /
uncond pair. Then a DMD2 job of 2 steps at 64 px (batch 1, rank 4) queued through the training nodes (Teacher
Checkpoint + DMD2 + Prompts + Advanced -> Start) completes in its worker (for Flux: gradients through ComfyUI's
Flux blocks, which add to their residual streams in place); its LoRA names only weights of the checkpoint's
diffusion model, ComfyUI's
LoraLoader applies it with zero unmatched keys and it changes the model's output (KSampler, 1 step, same
noise), and the student card's sampler (Distillery Load Distilled LoRA -> SamplerCustom, 2 steps) gives a
finite latent and image. The server is this module's own, OMP_NUM_THREADS=1 (DISTILLERY_E2E_THREADS to change).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-Distillery"
RESOLUTION, STEPS, RANK, LR = 64, 2, 4, 1e-3
PROMPTS = "a photo of a cat\na red house by a lake"
TEACHER, METHOD, PROMPTS_NODE, ADVANCED, START = "11", "12", "13", "15", "1"
# T5-XXL's layout at its width (Flux's txt_in takes 4096) with one narrow layer: ComfyUI's config keys
TINY_T5 = {"num_layers": 1, "num_heads": 2, "d_kv": 32, "d_ff": 64}
T5_CONFIG_ENV = "DISTILLERY_TEST_T5XXL_CONFIG"

FAMILIES = {  # key: what detection calls it, (ComfyUI's model class, where it differs), model type, latent node,
    # KSampler scheduler
    "sd3": {"family": "SD3", "prediction": "flow", "latent": "EmptySD3LatentImage", "scheduler": "simple"},
    "sdxl_vpred_ztsnr": {"family": "SDXL", "prediction": "v_prediction", "latent": "EmptyLatentImage",
                         "scheduler": "normal"},
    "flux_dev": {"family": "Flux", "prediction": "flow", "latent": "EmptySD3LatentImage", "scheduler": "simple"},
    # FLUX.1-schnell's layout: Flux without the guidance embedding (ComfyUI's FluxSchnell)
    "flux_schnell": {"family": "FluxSchnell", "model": "Flux", "prediction": "flow", "latent": "EmptySD3LatentImage",
                     "scheduler": "simple"},
}


# --------------------------------------------------------------------------- building the checkpoints

# Runs with ComfyUI's interpreter, cwd = the checkout: argv family key, output path, T5 config (JSON). The
# diffusion model, text encoders and VAE are ComfyUI's own classes, initialised with torch's default init (ComfyUI's
# ops skip it; its own norm scales are set to 1), in fp16; the keys come from the family's supported_models config
# (process_*_state_dict_for_saving), so the layout is the one ComfyUI writes. Detection is run on the result.
BUILD_SCRIPT = r'''
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
from safetensors.torch import save_file

key, out_path, tiny_t5 = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
t0 = time.time()
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
import comfy.ops
import comfy.model_detection
import comfy.supported_models as sm
from comfy.taesd.taesd import TAESD

OPS = comfy.ops.disable_weight_init
NN = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.GroupNorm,
      torch.nn.LayerNorm, torch.nn.Embedding)
KEEP = ("logit_scale", "vae_scale", "vae_shift")  # created with real values

def init_random(module):
    """torch's init for the torch layers; ComfyUI's own parameters (RMS / T5 norm scales) to 1, others to 0."""
    done = set()
    with torch.no_grad():
        for m in module.modules():
            for cls in NN:
                if isinstance(m, cls):
                    cls.reset_parameters(m)
                    done.update(id(p) for p in m.parameters(recurse=False))
                    break
        others = []
        for name, p in module.named_parameters():
            if id(p) in done or name.endswith(KEEP):
                continue
            if name.endswith((".scale", "norm.weight", "ln_q.weight", "ln_k.weight")):
                p.fill_(1.0)
            else:
                p.zero_()
            others.append(name)
    return module, others

def fp16(sd):
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}

others = {}
if key in ("flux_dev", "flux_schnell"):
    from comfy.ldm.flux.model import Flux
    import comfy.text_encoders.flux
    config = sm.Flux({}) if key == "flux_dev" else sm.FluxSchnell({})
    net, others["diffusion_model"] = init_random(Flux(
        in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
        num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=key == "flux_dev", dtype=torch.float32, device="cpu", operations=OPS))
    te = comfy.text_encoders.flux.flux_clip(dtype_t5=torch.float32)(
        device="cpu", dtype=torch.float32, model_options={"t5xxl_model_config": tiny_t5})
    latent_channels = 16
elif key == "sd3":
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed
    import comfy.text_encoders.sd3_clip
    config = sm.SD3({})
    hidden, grid = 128, 16  # depth 2 (detection: hidden = 64 x depth), pos_embed of 16 x 16 patches
    net, others["diffusion_model"] = init_random(OpenAISignatureMMDITWrapper(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=hidden // 64, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        num_patches=grid * grid, pos_embed_max_size=grid, pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[], dtype=torch.float32, device="cpu", operations=OPS))
    with torch.no_grad():
        net.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).unsqueeze(0))
    te = comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)(device="cpu", dtype=torch.float32)
    latent_channels = 16
elif key == "sdxl_vpred_ztsnr":
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.sdxl_clip
    config = sm.SDXL({})
    net, others["diffusion_model"] = init_random(UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
        channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=1,
        transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], num_head_channels=64, context_dim=2048,
        use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
        use_spatial_transformer=True, legacy=False, dtype=torch.float32, device="cpu", operations=OPS))
    te = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
    latent_channels = 4
else:
    raise SystemExit("unknown family " + key)

unet_sd = config.process_unet_state_dict_for_saving(fp16(net.state_dict()))
te, others["text_encoders"] = init_random(te)
clip_sd = config.process_clip_state_dict_for_saving(fp16(te.state_dict()))
vae, others["vae"] = init_random(TAESD(latent_channels=latent_channels))
vae_sd = config.process_vae_state_dict_for_saving(fp16(vae.state_dict()))
sd = {**unet_sd, **clip_sd, **vae_sd}
if key == "sdxl_vpred_ztsnr":  # what ComfyUI's SDXL.model_type reads: v-prediction, zero terminal SNR
    sd["v_pred"] = torch.tensor([])
    sd["ztsnr"] = torch.tensor([])
bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
if bad:
    raise SystemExit("non-finite tensors: %s" % bad[:5])
params = {"diffusion_model": sum(v.numel() for v in unet_sd.values()),
          "text_encoders": sum(v.numel() for k, v in clip_sd.items() if not k.endswith("position_ids")),
          "vae": sum(v.numel() for v in vae_sd.values())}
prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
found = comfy.model_detection.model_config_from_unet(sd, prefix)
model_type = found.get_model(sd, prefix, device="meta").model_type.name if found is not None else None
save_file(sd, out_path, metadata={"format": "pt", "note": "random tiny %s test checkpoint, not a model" % key})
print(json.dumps({"family": type(found).__name__ if found is not None else None, "model_type": model_type,
                  "unet_prefix": prefix, "params": params, "bytes": os.path.getsize(out_path),
                  "others": others, "seconds": round(time.time() - t0, 1)}))
'''


def builder_version() -> str:
    return hashlib.sha256((BUILD_SCRIPT + json.dumps(TINY_T5)).encode()).hexdigest()[:10]


def build_checkpoint(comfy_dir: Path, key: str, out_path: Path) -> dict:
    """Build (or reuse) the tiny checkpoint of `key`; {family, model_type, params, ...} as the build saw it."""
    info_path = out_path.with_suffix(".json")
    if out_path.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("DISTILLERY_E2E_THREADS", "2"))
    try:
        done = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", BUILD_SCRIPT, key, str(tmp),
                               json.dumps(TINY_T5)], cwd=str(comfy_dir), capture_output=True, text=True,
                              timeout=1800, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"building the tiny {key} checkpoint failed (rc={done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
        info_path.write_text(json.dumps(info))
    finally:
        if tmp.exists():
            tmp.unlink()
    return info


# Put on the PYTHONPATH of the server (and so of its job workers) and of the inspection script, as
# sitecustomize: when comfy.text_encoders.sd3_clip is imported, its T5XXLModel gets ComfyUI's own per-encoder
# config option (sd1_clip.SDClipModel reads model_options["t5xxl_model_config"]) from $DISTILLERY_TEST_T5XXL_CONFIG.
T5_HOOK = r'''"""Test-only (ComfyUI-Distillery tests/integration/test_model_families.py): ComfyUI's T5-XXL is built with
the config overrides in $DISTILLERY_TEST_T5XXL_CONFIG, through ComfyUI's t5xxl_model_config model option."""
import importlib.abc
import importlib.machinery
import json
import os
import sys

_TARGET = "comfy.text_encoders.sd3_clip"
_CONFIG = json.loads(os.environ.get("DISTILLERY_TEST_T5XXL_CONFIG") or "null")


class _T5Config(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET or not _CONFIG:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_configure(module):
            exec_module(module)
            init = module.T5XXLModel.__init__

            def __init__(self, *args, model_options={}, **kwargs):
                init(self, *args, model_options={**model_options, "t5xxl_model_config": dict(_CONFIG)}, **kwargs)

            module.T5XXLModel.__init__ = __init__

        spec.loader.exec_module = exec_and_configure
        return spec


sys.meta_path.insert(0, _T5Config())
'''


def hook_env(hook_dir: Path, threads: str = "1") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=threads, **{T5_CONFIG_ENV: json.dumps(TINY_T5)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
    return env


# In ComfyUI's interpreter with the pack (argv: comfy_dir, pack_dir, family key, checkpoint): what the pack
# infers of the loaded model and the first step of its sampler through ComfyUI's model.
INSPECT_SCRIPT = comfy_harness.PACK_IN_COMFY + r'''
import math
key, path = sys.argv[3], sys.argv[4]
from distillery_pack import comfy_backend as cb
from distillery_pack.core.schedules import RectifiedFlowSchedule
from distillery_pack.sampling.api import initial_state, sample
from distillery_pack.sampling.timesteps import timesteps_to_sigmas
from distillery_pack.trainers.roles import AdapterView
import comfy.sd

out = {"probe": cb.probe_checkpoint(path)}
patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
base = patcher.model
ms = base.model_sampling
sch = cb.schedule_from_model(patcher)
out.update(model=type(base).__name__, model_type=base.model_type.name, sampling=[c.__name__ for c in type(ms).__mro__],
           schedule=type(sch).__name__, prediction=sch.prediction_type, num_train_timesteps=sch.num_train_timesteps)
ts = [999.0, 749.0, 499.0, 20.0]  # the pack's grid: student_timesteps, training levels
ours = torch.stack([sch.training_sigma(t) for t in ts]).double()
if isinstance(sch, RectifiedFlowSchedule):  # ComfyUI's timestep for those levels: t / 1000 of its multiplier
    scale = float(getattr(ms, "multiplier", 1.0)) / 1000.0
    theirs = ms.sigma(torch.tensor(ts) * scale).double()
    out.update(shift=sch.shift, comfy_shift=float(ms.shift), comfy_multiplier=getattr(ms, "multiplier", None))
else:
    theirs = ms.sigmas[torch.tensor(ts).long()].double()
    out.update(zsnr=bool(getattr(ms, "zsnr", False)), sigma_max=sch.sigma_max, comfy_sigma_max=float(ms.sigma_max),
               alpha_bar_last=float(sch.alphas_cumprod[-1]))
out["sigma_rel"] = float(((ours - theirs).abs() / theirs).max())
out["sigmas_match_grid"] = bool(torch.allclose(timesteps_to_sigmas(sch, ts)[:-1], ours, rtol=1e-9))

channels = int(base.latent_format.latent_channels)
bank, uncond = cb.encode_prompt_bank(base, clip, ["a photo of a cat"], "", (channels, 8, 8), 64)
out["conds"] = sorted(bank)
model = cb.ComfyDiffusionModel(base, sch)
noise = torch.randn((1, channels, 8, 8), generator=torch.Generator().manual_seed(0))
first = {}
with torch.no_grad():
    levels = {"top": float(timesteps_to_sigmas(sch, [999])[0]), "sigma_max": sch.sigma_max}
    if not isinstance(sch, RectifiedFlowSchedule):  # what ComfyUI's percent_to_sigma(0) gives: "infinite"
        levels["huge"] = 1e9
    for label, sigma in levels.items():
        x = initial_state(model, noise, sigma)
        x0 = model(x, torch.tensor([sigma]), bank)
        first[label] = {"sigma": sigma, "x_finite": bool(torch.isfinite(x).all()),
                        "x0_finite": bool(torch.isfinite(x0).all()), "x0_absmax": float(x0.abs().max())}
    sigmas = timesteps_to_sigmas(sch, [999, 499])
    latent = sample(model, noise, sigmas, "x0_renoise", cond=bank, seed=0)
out["first_step"] = first
out["sample"] = {"sigmas": sigmas.tolist(), "finite": bool(torch.isfinite(latent).all()),
                 "absmax": float(latent.abs().max())}

out["guidance_input"] = cb.takes_guidance_input(base, uncond)
if out["guidance_input"]:  # the teacher's guidance scale: what reaches the network
    calls = []
    hook = base.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((int(args[0].shape[0]), kwargs["guidance"].tolist())), with_kwargs=True)
    x_t, sigma = sch.add_noise(noise, torch.randn_like(noise), torch.tensor([0.8])), torch.tensor([0.8])
    with torch.no_grad():
        guidance_model = cb.ComfyDiffusionModel(base, sch)
        guidance_model.guidance_input = cb.GUIDANCE_INPUT  # what the job's task sets for this model
        guided = AdapterView(guidance_model, None)(x_t, sigma, bank, uncond, 2.5)
        out["teacher_calls"] = list(calls)
        calls.clear()
        AdapterView(model, None)(x_t, sigma, bank, uncond, 2.5)  # what a CFG model's teacher runs
        out["cfg_teacher_calls"] = list(calls)
        calls.clear()
        default = model(x_t, sigma, bank)
        out["default_calls"] = list(calls)
    hook.remove()
    out["guidance_changes_output"] = float((guided - default).abs().max())
print(json.dumps(out))
'''


def inspect(comfy_dir: Path, hook_dir: Path, key: str, path: Path) -> dict:
    done = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", INSPECT_SCRIPT, str(comfy_dir), str(REPO_ROOT),
                           key, str(path)], cwd=str(comfy_dir), capture_output=True, text=True, timeout=1200,
                          env=hook_env(hook_dir, os.environ.get("DISTILLERY_E2E_THREADS", "1")))
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoints(comfy_dir, tmp_path_factory) -> dict:
    """{key: (path, build info)}, cached beside the tiny SD1.5 checkpoint (comfy_harness.test_model_cache; under
    the builder's version, older versions removed)."""
    cache = comfy_harness.test_model_cache(tmp_path_factory)
    version = builder_version()
    out = {}
    for key in FAMILIES:
        path = cache / f"tiny_{key}_{version}.safetensors"
        for old in cache.glob(f"tiny_{key}_*.safetensors"):
            if old != path and re.fullmatch(rf"tiny_{key}_[0-9a-f]{{10}}\.safetensors", old.name):
                old.unlink()
                old.with_suffix(".json").unlink(missing_ok=True)
        t0 = time.monotonic()
        info = build_checkpoint(comfy_dir, key, path)
        print(f"\n[families] {path.name}: {info['family']} {info['model_type']}, params {info['params']}, "
              f"{info['bytes'] / 2 ** 30:.2f} GiB ({time.monotonic() - t0:.0f} s)")
        out[key] = (path, info)
    return out


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t5_hook")
    (folder / "sitecustomize.py").write_text(T5_HOOK)
    return folder


def kill_workers(base: Path):
    for status in (base / "output" / "distillery" / "jobs").glob("*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("pid")
            if pid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def families_comfy(comfy_dir, checkpoints, hook_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("families_comfy")
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=base, custom_nodes=[(PACK, REPO_ROOT)],
        models={"checkpoints": [path for path, _ in checkpoints.values()]},
        env=hook_env(hook_dir, os.environ.get("DISTILLERY_E2E_THREADS", "1")),
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "180")))
    try:
        with server:
            yield server
    finally:
        kill_workers(base)


# --------------------------------------------------------------------------- helpers

def widget_defaults(comfy, class_type: str) -> dict:
    info = comfy.object_info(class_type)[class_type]
    out = {}
    for part in ("required", "optional"):
        for name, spec in info["input"].get(part, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(spec[0], list) and spec[0]:
                out[name] = spec[0][0]
    return out


def job_graph(comfy, ckpt_name: str, lora_name: str) -> dict:
    """Teacher Checkpoint + DMD2 (2-step student, the student updated every iteration) + Prompts + Advanced (a
    log record per step) -> Start: 2 iterations, batch 1, rank 4, 64 px, no previews."""
    start = {**widget_defaults(comfy, "DistilleryStartDistillation"),
             "steps": STEPS, "batch_size": 1, "student_lr": LR, "critic_lr": LR, "ema_decay": 0.0, "seed": 0,
             "lora_rank": RANK, "checkpoint_every": STEPS, "preview_every": 0, "resolution": RESOLUTION,
             "lora_name": lora_name, "teacher": [TEACHER, 0], "method": [METHOD, 0], "prompts": [PROMPTS_NODE, 0],
             "advanced": [ADVANCED, 0]}
    return {
        TEACHER: {"class_type": "DistilleryTeacherCheckpoint", "inputs": {"ckpt_name": ckpt_name}},
        METHOD: {"class_type": "DistilleryDMD2", "inputs": {
            **widget_defaults(comfy, "DistilleryDMD2"), "student_timesteps": "999,499", "update_ratio": 1}},
        PROMPTS_NODE: {"class_type": "DistilleryPrompts", "inputs": {
            "prompts": PROMPTS, "prompts_file": "", "negative_prompt": ""}},
        ADVANCED: {"class_type": "DistilleryAdvancedTraining", "inputs": {
            **widget_defaults(comfy, "DistilleryAdvancedTraining"), "log_every": 1}},
        START: {"class_type": "DistilleryStartDistillation", "inputs": start},
    }


def sample_graph(case: dict, ckpt_name: str, lora: str, prefix: str) -> dict:
    """LoraLoader -> KSampler (1 step) and the bare model with the same KSampler -> SaveLatent each; Distillery
    Load Distilled LoRA -> SamplerCustom with its card's sampler and sigmas -> SaveLatent + VAEDecode ->
    SaveImage, and the bare model with that sampler, sigmas and noise -> SaveLatent."""
    ksampler = {"latent_image": ["4", 0], "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": case["scheduler"], "denoise": 1.0}
    custom = {"add_noise": True, "noise_seed": 7, "cfg": 1.0, "sampler": ["20", 1], "sigmas": ["20", 2],
              "latent_image": ["4", 0]}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "4": {"class_type": case["latent"], "inputs": {"width": RESOLUTION, "height": RESOLUTION, "batch_size": 1}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["10", 1]}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["11", 0],
                                                    "negative": ["11", 0], **ksampler}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": f"{prefix}_loraloader"}},
        "14": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["21", 0],
                                                    "negative": ["21", 0], **ksampler}},
        "15": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"{prefix}_bare"}},
        "20": {"class_type": "DistilleryLoadDistilledLoRA", "inputs": {
            "model": ["1", 0], "lora_name": lora, "strength": 1.0, "denoise": 1.0}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "22": {"class_type": "SamplerCustom", "inputs": {
            "model": ["20", 0], "positive": ["21", 0], "negative": ["21", 0], **custom}},
        "23": {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": f"{prefix}_student"}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["1", 2]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": f"{prefix}_student"}},
        "30": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "positive": ["21", 0], "negative": ["21", 0], **custom}},
        "31": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": f"{prefix}_base"}},
    }


def finished(comfy, prompt_id, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (comfy.get(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
            return entry
        assert comfy.running, comfy.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not end within {timeout} s\n{comfy.log_tail()}")


def run_job(comfy, graph: dict, timeout: float) -> dict:
    """Queue the job graph and follow the job to its end; its status (with its id and wall time)."""
    t0 = time.monotonic()
    entry = finished(comfy, comfy.queue(graph))
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy.log_tail())
    job_id = entry["outputs"][START]["text"][0].split()[1].rstrip(":")
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = comfy.get(f"/distillery/jobs/{job_id}")
        if info.get("state") in ("completed", "failed", "stopped", "interrupted") and not info.get("resume_pending"):
            return {**info, "id": job_id, "wall_s": time.monotonic() - t0}
        time.sleep(0.5)
    comfy.post(f"/distillery/jobs/{job_id}/stop")
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {info}")


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def lora_modules(path: Path) -> set:
    return {k.rsplit(".", 2)[0] if k.endswith((".lora_down.weight", ".lora_up.weight")) else k.rsplit(".", 1)[0]
            for k in read_header(path) if k != "__metadata__"}


def unet_lora_names(ckpt: Path) -> set:
    """lora_unet_<key> of every diffusion-model weight (ComfyUI's model_lora_keys_unet map)."""
    prefix = "model.diffusion_model."
    return {"lora_unet_" + k[len(prefix):-len(".weight")].replace(".", "_")
            for k in read_header(ckpt) if k.startswith(prefix) and k.endswith(".weight")}


def read_latent(path: Path):
    from safetensors.numpy import load_file

    return load_file(str(path))["latent_tensor"]


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("key", list(FAMILIES))
def test_detection_schedule_and_first_step_from_the_top(comfy_dir, checkpoints, hook_dir, key):
    case = FAMILIES[key]
    path, built = checkpoints[key]
    assert (built["family"], built["unet_prefix"]) == (case["family"], "model.diffusion_model."), built
    t0 = time.monotonic()
    got = inspect(comfy_dir, hook_dir, key, path)
    print(f"\n[families] {key} ({time.monotonic() - t0:.0f} s): {json.dumps(got)}")
    assert got["probe"] == {"family": case["family"], "prediction": case["prediction"],
                            "unet_prefix": "model.diffusion_model.", "detected_by": "comfyui"}, got["probe"]
    assert got["model"] == case.get("model", case["family"]) and got["prediction"] == case["prediction"], got
    # the pack's levels on its 0..1000 grid are ComfyUI's own sigmas at the matching timesteps
    assert got["num_train_timesteps"] == 1000 and got["sigma_rel"] < 1e-5 and got["sigmas_match_grid"], got
    if key == "flux_dev":
        assert got["model_type"] == "FLUX" and "ModelSamplingFlux" in got["sampling"]
        assert got["comfy_shift"] == pytest.approx(1.15) and got["shift"] == pytest.approx(2.718281828 ** 1.15)
        assert got["conds"] == ["c_crossattn", "guidance", "y"], got["conds"]
        assert got["guidance_input"]
        assert got["teacher_calls"] == [[1, [2.5]]], got  # one pass, the scale as the guidance input
        assert got["cfg_teacher_calls"] == [[2, [3.5, 3.5]]], got  # what a CFG teacher would run: a pair
        assert got["default_calls"] == [[1, [3.5]]], got  # the student's and critic's: ComfyUI's default
        assert got["guidance_changes_output"] > 0
    elif key == "flux_schnell":  # ComfyUI samples it as a plain flow model: no shift, timesteps t in 0..1
        assert got["model_type"] == "FLOW" and "ModelSamplingDiscreteFlow" in got["sampling"]
        assert got["shift"] == pytest.approx(1.0) and got["comfy_shift"] == pytest.approx(1.0)
        assert got["comfy_multiplier"] == pytest.approx(1.0)
        # ComfyUI's Flux conds always carry a guidance value; without guidance_in the network ignores it
        assert got["conds"] == ["c_crossattn", "guidance", "y"], got["conds"]
        assert not got["guidance_input"]
    elif key == "sd3":
        assert got["model_type"] == "FLOW" and "ModelSamplingDiscreteFlow" in got["sampling"]
        assert got["shift"] == pytest.approx(3.0) and got["comfy_multiplier"] == pytest.approx(1000.0)
        assert not got["guidance_input"]
    else:
        assert got["model_type"] == "V_PREDICTION" and got["zsnr"] is True
        assert got["sigma_max"] == pytest.approx(got["comfy_sigma_max"], rel=1e-5) and got["sigma_max"] > 4000
        assert got["alpha_bar_last"] < 1e-7  # zero terminal SNR (ComfyUI keeps 4.9e-8, not 0)
        assert not got["guidance_input"]
    for label, step in got["first_step"].items():
        assert step["x_finite"] and step["x0_finite"], (label, step)
    assert got["sample"]["finite"], got["sample"]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_a_dmd2_job_trains_and_its_lora_loads_changes_the_model_and_samples(families_comfy, checkpoints, key):
    from comfyui_distillery.jobs.students import student_card
    import numpy as np

    comfy, case = families_comfy, FAMILIES[key]
    path, built = checkpoints[key]
    name = f"mf_{key}"
    info = run_job(comfy, job_graph(comfy, path.name, name),
                   timeout=float(os.environ.get("DISTILLERY_FAMILIES_JOB_TIMEOUT", "2400")))
    log = comfy.get(f"/distillery/jobs/{info['id']}/log?lines=2000")["log"]
    print(f"\n[families] {key}: DMD2 job of {STEPS} steps, {info['wall_s']:.0f} s (queue -> LoRA written)")
    assert info["state"] == "completed", f"{info.get('state')}: {info.get('reason')}\n{log[-6000:]}"
    assert info["config"]["teacher"]["family"] == case["family"], info["config"]["teacher"]
    records = comfy.get(f"/distillery/jobs/{info['id']}/metrics?since=-1")["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    assert "nan" not in json.dumps(records).lower(), records
    found = re.search(r"model (\w+), (\w+) schedule \((\w+)\), latent \(([^)]*)\), (\d+) layers get LoRA", log)
    assert found, log[-4000:]
    schedule = {"flow": "RectifiedFlowSchedule", "v_prediction": "DiscreteVPSchedule"}[case["prediction"]]
    assert found.groups()[:3] == (case.get("model", case["family"]), schedule, case["prediction"]), found.groups()
    assert ("is guidance-distilled" in log) == (key == "flux_dev"), log[-4000:]

    lora = comfy.models_dir / "loras" / f"{name}.safetensors"
    card = student_card(lora)
    assert card is not None and card.method == "dmd2" and card.sampler == "x0_renoise", card
    assert card.timesteps == [999, 499] and card.prediction_type == case["prediction"] and card.steps_trained == STEPS
    assert card.base_checkpoint == path.name and card.lora_rank == RANK and card.resolution == RESOLUTION
    modules = lora_modules(lora)
    assert len(modules) == int(found.group(5)), (len(modules), found.group(5))
    unmatched = sorted(modules - unet_lora_names(path))
    assert unmatched == [], unmatched[:10]  # every module names a weight of the checkpoint's diffusion model

    before = len(comfy.log_text())
    t0 = time.monotonic()
    entry = comfy.run(sample_graph(case, path.name, lora.name, name), timeout=1800)
    new_log = comfy.log_text()[before:]
    assert comfy_harness.lora_key_warnings(new_log) == [], comfy_harness.lora_key_warnings(new_log)[:10]
    assert "clip missing" not in new_log, new_log[-3000:]  # the text encoders' layout is complete
    latents = {p.name.split("_")[-3]: read_latent(p) for p in comfy.output_files(entry, key="latents")}
    assert set(latents) == {"loraloader", "bare", "student", "base"}, sorted(latents)
    for label, value in latents.items():
        assert np.isfinite(value).all(), label
    lora_effect = float(np.abs(latents["loraloader"] - latents["bare"]).max())
    student_effect = float(np.abs(latents["student"] - latents["base"]).max())
    images = comfy.output_files(entry)
    assert len(images) == 1 and images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    pixels = np.asarray(Image.open(images[0]))
    print(f"[families] {key}: sampled in {time.monotonic() - t0:.0f} s; LoraLoader vs bare model max |diff| "
          f"{lora_effect:.3g} (bare max {float(np.abs(latents['bare']).max()):.3g}); student card sampler "
          f"({card.sampler_choice()[0]}, {len(card.recommended_timesteps())} steps) vs bare max |diff| "
          f"{student_effect:.3g}; image {pixels.shape}")
    assert lora_effect > 0, "LoraLoader's LoRA does not change what the model samples"
    assert student_effect > 0, "the student's LoRA does not change what its card's sampler samples"
    assert pixels.shape == (RESOLUTION, RESOLUTION, 3)
    comfy.post("/free", {"unload_models": True, "free_memory": True})  # the next family's job has the memory


@pytest.mark.parametrize("key", ["sd3", "flux_dev"])
def test_dmd2_with_the_gan_term_on_a_dit_reads_its_middle_blocks_tokens(families_comfy, checkpoints, key):
    """DMD2's diffusion-GAN term on a DiT: the discriminator head reads the image tokens after the middle
    transformer block (ComfyDiffusionModel.features); the job trains with it and the head's loss is logged."""
    from PIL import Image

    comfy = families_comfy
    path, _ = checkpoints[key]
    photos = comfy.input_dir / f"gan_{key}"
    photos.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (RESOLUTION, RESOLUTION), (40 * i, 200 - 30 * i, 90)).save(photos / f"p{i}.png")
    graph = job_graph(comfy, path.name, f"mf_gan_{key}")
    graph[METHOD]["inputs"]["gan_generator_weight"] = 0.05
    graph["40"] = {"class_type": "DistilleryRealImages", "inputs": {"folder": photos.name}}
    graph[START]["inputs"]["real_images"] = ["40", 0]
    info = run_job(comfy, graph, timeout=float(os.environ.get("DISTILLERY_FAMILIES_JOB_TIMEOUT", "2400")))
    log = comfy.get(f"/distillery/jobs/{info['id']}/log?lines=2000")["log"]
    assert info["state"] == "completed", f"{info.get('state')}: {info.get('reason')}\n{log[-6000:]}"
    records = comfy.get(f"/distillery/jobs/{info['id']}/metrics?since=-1")["records"]
    gan = [r[k] for r in records for k in r if "gan" in k]
    assert gan and all(math.isfinite(v) for v in gan), records
    print(f"\n[families] {key}: DMD2 + GAN job of {STEPS} steps, {info['wall_s']:.0f} s; GAN metrics {gan}")
