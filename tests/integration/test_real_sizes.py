"""Real model sizes through the real job path, on the CPU (opt-in: DISTILLERY_REAL_SIZES=1 and COMFYUI_DIR).

    DISTILLERY_REAL_SIZES=1 COMFYUI_DIR=/work/comfyui python -m pytest -q tests/integration/test_real_sizes.py -s

For each of three teachers at their real layouts, random weights (built here with ComfyUI's own classes, fp16,
one at a time, deleted afterwards; nothing is downloaded or shipped):

* SD15: the 860 M-parameter LDM UNet (ComfyUI's SD1.5 config) + CLIP-L + TAESD;
* SDXL: the 2.6 B UNet (ComfyUI's SDXL config) + CLIP-L + CLIP-G (ComfyUI's SDXLClipModel) + TAESD;
* SD3: an SD3-medium MMDiT (depth 24, hidden 1536, 2 B; ComfyUI detects it as SD3, a rectified-flow model)
  + CLIP-L alone, the smallest text encoder ComfyUI's SD3 accepts (the pack needs one to encode prompts;
  ComfyUI pads the missing CLIP-G / T5 parts with zeros) + a 16-channel TAESD,

a ComfyUI server with this pack runs a job per method (DMD2, SiD, TCD) queued through the training nodes
(Teacher Checkpoint + method node + Prompts + Advanced Training Settings -> Start Distillation, as
test_jobs_e2e.py): 2 iterations, batch 1, gradient checkpointing asked for, rank 4, at RESOLUTION px. The job's
worker is watched for its peak RSS (VmHWM of /proc/<pid>/status, and the ru_maxrss it logs with its
metrics). Then the exported LoRA is applied by ComfyUI's LoraLoader (KSampler, 1 step) and by the pack's
Distillery Load Distilled LoRA with the sampler and sigmas of its card (SamplerCustom); the log must hold no
"lora key not loaded", every LoRA module must name a diffusion-model weight of the checkpoint (ComfyUI's
model_lora_keys_unet map), the latents must be finite, and the student's sample must differ from the bare
model's under the same noise, sampler and sigmas.

On a CPU ComfyUI keeps its diffusion model in fp32 and a LoRA patches a second fp32 copy of every weight it
touches; when that cannot fit in the memory available, the sampling server gets --fp16-unet (the weights as
stored in the file, computed in fp32) and the table says so. Timings and memory are printed as a markdown
table (docs/real_sizes.md holds one run's) and written to DISTILLERY_REAL_SIZES_REPORT when set.
Environment: DISTILLERY_REAL_SIZES_MODELS (default "sd15,sdxl,sd3"), DISTILLERY_REAL_SIZES_RESOLUTION (256),
DISTILLERY_REAL_SIZES_TIMEOUT (seconds per job, 7200), DISTILLERY_REAL_SIZES_ADVANCED (JSON of more Advanced
Training Settings, e.g. '{"fp8_base": true}'), DISTILLERY_REAL_SIZES_KEEP=1 keeps the files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import comfy_harness

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("DISTILLERY_REAL_SIZES") != "1",
                       reason="slow: set DISTILLERY_REAL_SIZES=1 (and COMFYUI_DIR) to run the real-size jobs"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-Distillery"
GIB = 2 ** 30
RESOLUTION = int(os.environ.get("DISTILLERY_REAL_SIZES_RESOLUTION", "256"))
JOB_TIMEOUT = float(os.environ.get("DISTILLERY_REAL_SIZES_TIMEOUT", "7200"))
KEEP = os.environ.get("DISTILLERY_REAL_SIZES_KEEP") == "1"
STEPS, RANK, LR = 2, 4, 1e-4
# more Advanced Training Settings for every job, e.g. '{"fp8_base": true}' (JSON)
ADVANCED_EXTRA = json.loads(os.environ.get("DISTILLERY_REAL_SIZES_ADVANCED", "") or "{}")
PROMPTS = "a photo of a cat on a windowsill\na watercolor painting of a mountain lake"
METHODS = ("dmd2", "sid", "tcd")
METHOD_NODES = {"dmd2": "DistilleryDMD2", "sid": "DistillerySiD", "tcd": "DistilleryTCD"}
# 2-step students; DMD2 updates the student every iteration; TCD's teacher data made with 2 DDIM steps
METHOD_OPTIONS = {"dmd2": {"student_timesteps": "999,499", "update_ratio": 1},
                  "sid": {"student_timesteps": "999,499"},
                  "tcd": {"sample_steps": 2, "teacher_sample_steps": 2}}
TEACHER, METHOD, PROMPTS_NODE, ADVANCED, START = "11", "12", "13", "15", "1"


@dataclass
class Case:
    key: str
    family: str  # what ComfyUI's detection must call it
    prediction: str
    scheduler: str  # KSampler's scheduler for the LoraLoader check
    latent_node: str
    params: dict = field(default_factory=dict)  # filled by the build


CASES = {
    "sd15": Case("sd15", "SD15", "epsilon", "normal", "EmptyLatentImage"),
    "sdxl": Case("sdxl", "SDXL", "epsilon", "normal", "EmptyLatentImage"),
    "sd3": Case("sd3", "SD3", "flow", "simple", "EmptySD3LatentImage"),
}
SELECTED = [k.strip() for k in os.environ.get("DISTILLERY_REAL_SIZES_MODELS", "sd15,sdxl,sd3").split(",") if k.strip()]


# --------------------------------------------------------------------------- building a checkpoint

# Runs with ComfyUI's interpreter, cwd = the checkout: argv family (SD15 / SDXL / SD3), output path, seed.
# The diffusion model, text encoders and VAE are ComfyUI's own classes at the real configs (ComfyUI's
# model_detection lists the same UNet configs), in fp16 with torch's default init (ComfyUI's ops skip it);
# the file's keys come from ComfyUI's own process_*_state_dict_for_saving of the family's supported_models
# config, so the layout is the one ComfyUI writes. The file is streamed (no second copy in memory).
BUILD_SCRIPT = r'''
import gc, json, os, resource, struct, sys, time
sys.path.insert(0, os.getcwd())
import torch

family, out_path = sys.argv[1], sys.argv[2]
torch.manual_seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
t0 = time.time()
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
import comfy.ops
import comfy.supported_models as sm
from comfy.taesd.taesd import TAESD

DT = torch.float16
NN = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.GroupNorm,
      torch.nn.LayerNorm, torch.nn.Embedding)

def init_random(module):
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        for m in module.modules():
            for cls in NN:
                if isinstance(m, cls):
                    cls.reset_parameters(m)
                    break
    return module

def fp16(sd):
    return {k: v.detach().to(DT).contiguous() for k, v in sd.items()}

UNETS = {
    "SD15": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
                 use_linear_in_transformer=False, adm_in_channels=None, use_spatial_transformer=True, legacy=False),
    "SDXL": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64, context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                 use_spatial_transformer=True, legacy=False),
}
params = {}
if family in UNETS:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    config = sm.SD15({}) if family == "SD15" else sm.SDXL({})
    net = init_random(UNetModel(**UNETS[family], dtype=DT, device="cpu", operations=comfy.ops.disable_weight_init))
    latent_channels = 4
else:  # SD3-medium: depth 24 (hidden 24 x 64), patch 2, 16 channels, sin-cos pos_embed of 192 x 192 patches
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed
    config = sm.SD3({})
    net = init_random(OpenAISignatureMMDITWrapper(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=24, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
        num_patches=36864, pos_embed_max_size=192, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
        dtype=DT, device="cpu", operations=comfy.ops.disable_weight_init))
    with torch.no_grad():
        net.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(1536, 192)).unsqueeze(0).to(DT))
    latent_channels = 16
unet_sd = config.process_unet_state_dict_for_saving(fp16(net.state_dict()))
params["diffusion_model"] = sum(v.numel() for v in unet_sd.values())
del net
gc.collect()

if family == "SD15":
    import comfy.sd1_clip
    te = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=DT)
elif family == "SDXL":
    import comfy.sdxl_clip
    te = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=DT)
else:  # the smallest text encoder ComfyUI's SD3 accepts: CLIP-L alone
    import comfy.text_encoders.sd3_clip
    te = comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)(device="cpu", dtype=DT)
te_sd = fp16(init_random(te).state_dict())
for k in te_sd:
    if k.endswith("logit_scale"):
        te_sd[k] = torch.tensor(4.6055, dtype=DT)
clip_sd = config.process_clip_state_dict_for_saving(te_sd)
params["text_encoders"] = sum(v.numel() for k, v in clip_sd.items() if not k.endswith("position_ids"))
del te, te_sd
gc.collect()

vae_sd = config.process_vae_state_dict_for_saving(fp16(init_random(TAESD(latent_channels=latent_channels)).state_dict()))
params["vae"] = sum(v.numel() for v in vae_sd.values())

sd = {**unet_sd, **clip_sd, **vae_sd}
bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
if bad:
    raise SystemExit("non-finite tensors: %s" % bad[:5])
NAMES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
header, offset, keys = {}, 0, sorted(sd)
for k in keys:
    n = sd[k].numel() * sd[k].element_size()
    header[k] = {"dtype": NAMES[sd[k].dtype], "shape": list(sd[k].shape), "data_offsets": [offset, offset + n]}
    offset += n
header["__metadata__"] = {"format": "pt", "note": "random %s-layout test checkpoint, not a model" % family}
head = json.dumps(header, separators=(",", ":")).encode()
head += b" " * (-len(head) % 8)
with open(out_path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    for k in keys:
        f.write(sd[k].reshape(-1).view(torch.uint8).numpy().data)
print(json.dumps({"family": family, "tensors": len(keys), "params": params, "bytes": 8 + len(head) + offset,
                  "seconds": round(time.time() - t0, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}))
'''

# What the pack says of a file (ComfyUI's detection on meta tensors): argv comfy_dir, pack_dir, paths...
PROBE_SCRIPT = comfy_harness.PACK_IN_COMFY + r'''
from distillery_pack.comfy_backend import has_text_encoder, probe_checkpoint, safetensors_header
out = {}
for path in sys.argv[3:]:
    try:
        found = probe_checkpoint(path)
    except Exception as err:
        found = {"error": "%s: %s" % (type(err).__name__, err)}
    found["has_text_encoder"] = has_text_encoder(safetensors_header(path))
    out[os.path.basename(path)] = found
print(json.dumps(out))
'''


def build_checkpoint(comfy_dir: Path, family: str, out_path: Path) -> dict:
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp")
    try:
        done = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", BUILD_SCRIPT, family, str(tmp), "0"],
                              cwd=str(comfy_dir), capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"building the {family} checkpoint failed (rc={done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def header_only_copy(src: Path, dst: Path, keep) -> Path:
    """A sparse copy holding only the tensors whose key passes `keep` (their bytes read as zeros): enough for
    the header-based probe, at no disk cost."""
    header = read_header(src)
    out, offset = {}, 0
    for key in sorted(k for k in header if k != "__metadata__" and keep(k)):
        a, b = header[key]["data_offsets"]
        out[key] = {**header[key], "data_offsets": [offset, offset + b - a]}
        offset += b - a
    head = json.dumps(out, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + offset)
    return dst


def probe(comfy_dir: Path, *paths: Path) -> dict:
    done = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", PROBE_SCRIPT, str(comfy_dir), str(REPO_ROOT),
                           *map(str, paths)], cwd=str(comfy_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (0 when it is gone): contention-free work, unlike wall time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_status(pid: int, field_name: str) -> int:
    """A /proc/<pid>/status field in bytes (VmHWM: peak RSS, VmRSS), 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- per model: file + server

@dataclass
class RealModel:
    case: Case
    comfy: comfy_harness.ComfyServer
    ckpt: Path
    build: dict
    probe: dict
    server_args: list
    unet_keys: set  # lora_unet_<...> names of the checkpoint's diffusion-model weights
    rows: list = field(default_factory=list)


REPORT: list[dict] = []


def _kill_workers(base: Path) -> None:
    for status in (base / "output" / "distillery" / "jobs").glob("*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("pid")
            if pid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module", params=SELECTED)
def real(request, comfy_dir, tmp_path_factory):
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(f"real_{case.key}")
    ckpt = folder / f"real_{case.key}.safetensors"
    t0 = time.monotonic()
    built = build_checkpoint(comfy_dir, case.family, ckpt)
    print(f"\n[real sizes] built {ckpt.name}: {built['bytes'] / GIB:.2f} GiB, params {built['params']}, "
          f"{time.monotonic() - t0:.0f} s, peak RSS {built['peak_rss_gib']} GiB")
    unet_only = header_only_copy(ckpt, folder / f"real_{case.key}_unet_only.safetensors",
                                 lambda k: k.startswith("model.diffusion_model."))
    probed = probe(comfy_dir, ckpt, unet_only)
    header = read_header(ckpt)
    prefix = "model.diffusion_model."
    unet_keys = {"lora_unet_" + k[len(prefix):-len(".weight")].replace(".", "_")
                 for k in header if k.startswith(prefix) and k.endswith(".weight")}
    # ComfyUI on a CPU holds the diffusion model in fp32, and a LoRA patches an fp32 copy of what it touches
    fp32_bytes = 4 * built["params"]["diffusion_model"]
    need = 2 * fp32_bytes + 2 * built["params"]["text_encoders"] + 3 * GIB
    server_args = [] if mem_available() >= need else ["--fp16-unet"]
    base = folder / "comfy"
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=base, custom_nodes=[(PACK, REPO_ROOT)],
        models={"checkpoints": [ckpt, unet_only]}, extra_args=server_args,
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "180")))
    model = RealModel(case, server, ckpt, built, probed, server_args, unet_keys)
    try:
        with server:
            yield model
    finally:
        _kill_workers(base)
        if not KEEP:
            ckpt.unlink(missing_ok=True)
            unet_only.unlink(missing_ok=True)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield REPORT
    if REPORT:
        table = markdown_table(REPORT)
        print("\n[real sizes] results\n" + table)
        out = os.environ.get("DISTILLERY_REAL_SIZES_REPORT")
        if out:
            Path(out).write_text(table + "\n```json\n" + json.dumps(REPORT, indent=1) + "\n```\n")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | params (diffusion / text enc.) | method | res. | settings | job | job wall s (load + train) "
             "| s / iteration "
             "| worker CPU s | load avg. | worker peak RSS GiB | LoRA modules matched / unmatched "
             "| sample (steps, sampler) | server UNet | server peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        state = r.get("state") if r.get("state") == "completed" else f"{r.get('state')} at step {r.get('steps_done')}"
        settings = ", ".join(f"{k}={v}" for k, v in (r.get("train_settings") or {}).items()
                             if v not in (None, False, "all")) or "-"
        lines.append(
            f"| {r['model']} | {r['params_diffusion'] / 1e9:.2f} B / {r['params_text'] / 1e9:.2f} B | {r['method']} "
            f"| {r['resolution']} | {settings} | {state} | {r['job_s']:.0f} ({r['load_s']:.0f} + {r['train_s']:.0f}) "
            f"| {', '.join(f'{s:.0f}' for s in r['s_per_iter'])} | {r.get('worker_cpu_s', 0):.0f} "
            f"| {r.get('load_average', '-')} | {r['worker_peak_rss_gib']:.2f} "
            f"| {r.get('lora_matched', '-')} / {r.get('lora_unmatched', '-')} "
            f"| {r.get('sample', '-')} | {r.get('server_unet', '-')} | {r.get('server_peak_rss_gib', '-')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- graphs

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


def checkpointing_on(comfy):
    """The Advanced node's value for "gradient checkpointing on": True (a boolean) or "on" (a choice)."""
    spec = comfy.object_info("DistilleryAdvancedTraining")["DistilleryAdvancedTraining"]["input"]
    spec = {**spec.get("required", {}), **spec.get("optional", {})}["gradient_checkpointing"]
    choices = spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options") if len(spec) > 1 else None
    return "on" if choices and "on" in choices else True


def job_graph(comfy, ckpt_name: str, method: str, lora_name: str) -> dict:
    node = METHOD_NODES[method]
    advanced = {**widget_defaults(comfy, "DistilleryAdvancedTraining"), "log_every": 1,
                "gradient_checkpointing": checkpointing_on(comfy), **ADVANCED_EXTRA}
    start = {**widget_defaults(comfy, "DistilleryStartDistillation"),
             "steps": STEPS, "batch_size": 1, "student_lr": LR, "critic_lr": LR, "ema_decay": 0.0, "seed": 0,
             "lora_rank": RANK, "checkpoint_every": STEPS, "preview_every": STEPS, "resolution": RESOLUTION,
             "lora_name": lora_name, "teacher": [TEACHER, 0], "method": [METHOD, 0], "prompts": [PROMPTS_NODE, 0],
             "advanced": [ADVANCED, 0]}
    return {
        TEACHER: {"class_type": "DistilleryTeacherCheckpoint", "inputs": {"ckpt_name": ckpt_name}},
        METHOD: {"class_type": node, "inputs": {**widget_defaults(comfy, node), **METHOD_OPTIONS[method]}},
        PROMPTS_NODE: {"class_type": "DistilleryPrompts", "inputs": {
            "prompts": PROMPTS, "prompts_file": "", "negative_prompt": ""}},
        ADVANCED: {"class_type": "DistilleryAdvancedTraining", "inputs": advanced},
        START: {"class_type": "DistilleryStartDistillation", "inputs": start},
    }


def sample_graph(case: Case, ckpt_name: str, lora: str, prefix: str) -> dict:
    """LoraLoader -> KSampler (1 step) -> SaveLatent; Distillery Load Distilled LoRA -> SamplerCustom with its
    card's sampler and sigmas -> SaveLatent + VAEDecode -> SaveImage; the bare model with the same sampler,
    sigmas and noise -> SaveLatent."""
    latent = {"width": RESOLUTION, "height": RESOLUTION, "batch_size": 1}
    custom = {"add_noise": True, "noise_seed": 7, "cfg": 1.0, "sampler": ["20", 1], "sigmas": ["20", 2],
              "latent_image": ["4", 0]}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "4": {"class_type": case.latent_node, "inputs": latent},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["10", 1]}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "positive": ["11", 0], "negative": ["11", 0], "latent_image": ["4", 0],
            "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": case.scheduler,
            "denoise": 1.0}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": f"{prefix}_loraloader"}},
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


# --------------------------------------------------------------------------- server helpers

def finished(comfy, prompt_id, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (comfy.get(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
            return entry
        assert comfy.running, comfy.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not end within {timeout} s\n{comfy.log_tail()}")


def run_job(comfy, graph: dict) -> tuple[dict, dict]:
    """Queue the job graph, follow the job to its end while watching the worker's peak RSS; (status, timing)."""
    t0 = time.monotonic()
    entry = finished(comfy, comfy.queue(graph))
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy.log_tail())
    job_id = entry["outputs"][START]["text"][0].split()[1].rstrip(":")
    hwm, cpu, loads, pid, t_train, info = 0, 0.0, [], None, None, {}
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        info = comfy.get(f"/distillery/jobs/{job_id}")
        pid = info.get("pid") or pid
        if pid:
            hwm = max(hwm, proc_status(int(pid), "VmHWM"))
            cpu = max(cpu, cpu_seconds(int(pid)))
            loads.append(load_average())
        if t_train is None and info.get("phase") == "training":
            t_train = time.monotonic()
        if info.get("state") in ("completed", "failed", "stopped", "interrupted") and not info.get("resume_pending"):
            break
        time.sleep(0.5)
    else:
        comfy.post(f"/distillery/jobs/{job_id}/stop")
        raise AssertionError(f"job {job_id} did not end within {JOB_TIMEOUT:.0f} s: {info}")
    t_end = time.monotonic()
    return info, {"job_id": job_id, "job_s": t_end - t0, "load_s": (t_train or t_end) - t0,
                  "train_s": t_end - (t_train or t_end), "hwm": hwm, "cpu_s": cpu,
                  "load_avg": sum(loads) / max(len(loads), 1)}


def lora_modules(path: Path) -> set:
    return {k.rsplit(".", 2)[0] if k.endswith((".lora_down.weight", ".lora_up.weight")) else k.rsplit(".", 1)[0]
            for k in read_header(path) if k != "__metadata__"}


def read_latent(path: Path):
    from safetensors.numpy import load_file

    return load_file(str(path))["latent_tensor"]


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("method", METHODS)
def test_a_job_trains_at_the_real_size(real, method):
    comfy, case = real.comfy, real.case
    if method == METHODS[0]:  # once per model: what the pack says of the file, with and without text encoders
        full = real.probe[real.ckpt.name]
        assert full["family"] == case.family and full["prediction"] == case.prediction, full
        assert full["detected_by"] == "comfyui" and full["has_text_encoder"], full
        bare = real.probe[f"real_{case.key}_unet_only.safetensors"]
        assert bare["family"] == case.family and not bare["has_text_encoder"], bare
        print(f"\n[real sizes] {case.key}: probe {full}; diffusion model alone: {bare}")
    name = f"real_{case.key}_{method}"
    info, timing = run_job(comfy, job_graph(comfy, real.ckpt.name, method, name))
    job_id = timing["job_id"]
    log = comfy.get(f"/distillery/jobs/{job_id}/log?lines=2000")["log"]
    records = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")["records"]
    logged_peak = max([(r.get("mem_gb") or 0.0) for r in records] + [0.0]) * GIB
    layers = re.search(r"model (\w+), (\w+) schedule \((\w+)\), latent \(([^)]*)\), (\d+) layers get LoRA", log)
    lora = comfy.models_dir / "loras" / f"{name}.safetensors"
    config = info.get("config") or {}
    row = {"model": case.family, "params_diffusion": real.build["params"]["diffusion_model"],
           "params_text": real.build["params"]["text_encoders"], "method": method, "resolution": RESOLUTION,
           "state": info.get("state"), "reason": info.get("reason"), "steps_done": info.get("step"),
           "job_s": timing["job_s"], "load_s": timing["load_s"], "train_s": timing["train_s"],
           "worker_cpu_s": timing["cpu_s"], "load_average": round(timing["load_avg"], 2), "cpus": os.cpu_count(),
           "s_per_iter": [1.0 / r["it_per_s"] for r in records if r.get("it_per_s")],
           "worker_peak_rss_gib": max(timing["hwm"], logged_peak) / GIB,
           "worker_vmhwm_gib": timing["hwm"] / GIB, "logged_maxrss_gib": logged_peak / GIB,
           "model_class": layers and layers.group(1), "schedule": layers and f"{layers.group(2)} ({layers.group(3)})",
           "latent": layers and layers.group(4), "lora_layers": layers and int(layers.group(5)),
           "train_settings": {k: (config.get("train") or {}).get(k) for k in
                              ("gradient_checkpointing", "micro_batch_size", "fp8_base", "lora_targets")},
           "lora_bytes": lora.stat().st_size if lora.is_file() else None, "lora": lora.name, "job_id": job_id,
           "checkpoint_gib": real.build["bytes"] / GIB}
    REPORT.append(row)  # a failed job is a result too: its reason, time and peak memory are reported
    print(f"\n[real sizes] {case.key} {method}: {json.dumps(row)}")
    assert info["state"] == "completed", f"{info.get('state')}: {info.get('reason')}\n{log[-6000:]}"
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    assert all(json.dumps(r).lower().find("nan") < 0 for r in records), records
    assert config["teacher"]["family"] == case.family and config["data"]["resolution"] == RESOLUTION
    assert layers, log[-4000:]
    assert lora.is_file()
    real.rows.append(row)


@pytest.mark.parametrize("method", METHODS)
def test_its_lora_loads_with_every_key_and_the_card_sampler_samples_it(real, method):
    comfy, case = real.comfy, real.case
    row = next((r for r in real.rows if r["method"] == method), None)
    if row is None:
        pytest.skip(f"the {method} job of {case.key} did not complete")
    modules = lora_modules(comfy.models_dir / "loras" / row["lora"])
    unmatched = sorted(modules - real.unet_keys)
    row.update(lora_matched=len(modules) - len(unmatched), lora_unmatched=len(unmatched))
    assert len(modules) == row["lora_layers"], (len(modules), row["lora_layers"])
    before = len(comfy.log_text())
    prefix = f"rs_{case.key}_{method}"
    t0 = time.monotonic()
    entry = comfy.run(sample_graph(case, real.ckpt.name, row["lora"], prefix), timeout=3600)
    row["sample_s"] = time.monotonic() - t0
    new_log = comfy.log_text()[before:]
    not_loaded = comfy_harness.lora_key_warnings(new_log)
    row["comfy_lora_keys_not_loaded"] = len(not_loaded)
    row["server_unet"] = "fp16 (--fp16-unet)" if real.server_args else "fp32 (default)"
    row["server_peak_rss_gib"] = round(proc_status(comfy.proc.pid, "VmHWM") / GIB, 2)
    latents = {p.name.split("_")[-3]: read_latent(p) for p in comfy.output_files(entry, key="latents")}
    import numpy as np

    from comfyui_distillery.jobs.students import student_card

    student = student_card(comfy.models_dir / "loras" / row["lora"])
    row["sample"] = f"{len(student.recommended_timesteps())}, {student.sampler_choice()[0]}"
    diff = float(np.abs(latents["student"] - latents["base"]).max())
    scale = float(np.abs(latents["base"]).max())
    row["student_vs_base_max_abs"] = diff
    row["base_max_abs"] = scale
    print(f"\n[real sizes] {case.key} {method}: sampled in {row['sample_s']:.0f} s; LoRA modules "
          f"{row['lora_matched']} matched / {row['lora_unmatched']} unmatched, ComfyUI 'lora key not loaded': "
          f"{len(not_loaded)}; student vs base max |diff| {diff:.3g} (base max {scale:.3g}); "
          f"server VmHWM {row['server_peak_rss_gib']} GiB ({row['server_unet']})")
    assert unmatched == [], unmatched[:10]
    assert not_loaded == [], not_loaded[:10]
    assert "clip missing" not in new_log, new_log[-3000:]  # the text encoders' layout is complete
    assert set(latents) == {"loraloader", "student", "base"}, sorted(latents)
    for key, value in latents.items():
        assert np.isfinite(value).all(), key
    assert diff > 0.0, "the student's LoRA does not change what the model samples"
    assert len(comfy.output_files(entry)) == 1  # the decoded student image
