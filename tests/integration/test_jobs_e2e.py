"""Training jobs in a real ComfyUI server (skips without COMFYUI_DIR), queued through the typed graph of the
training nodes: Distillery Teacher Checkpoint + a method node (Distillery DMD2 / SiD / TCD) + Distillery Prompts
[+ Real Images, + Advanced Training Settings] -> Distillery Start Distillation.

A short DMD2 job on the tiny SD1.5 checkpoint runs in its own worker process; its LoRA carries its student card,
appears in LoraLoader's list and applies with zero unmatched keys. A bad input (a file that is no model, a prompts
file outside the input folder, a method option out of range) is refused by ComfyUI's validation with HTTP 400 and
one error on that input alone, and no job folder is created; a run that cannot be built fails at Start without a
job. Failing jobs are loud; Stop then Resume in quick succession never fails a job; a job interrupted by a restart
resumes from its checkpoint. In headless Chromium every shipped workflow loads without a missing node or a schema
error, the distillation workflow converted by the frontend queues a job the sidebar follows (screenshot), and the
node search box is asked what it finds. The server is this module's own: fresh folders, and OMP_NUM_THREADS=1 so
the workers share a small CPU politely (DISTILLERY_E2E_THREADS to change)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PACK = "ComfyUI-Distillery"
WORKFLOWS = sorted(p.name for p in (REPO_ROOT / "workflows").glob("*.json"))
METHOD_NODES = {"dmd2": "DistilleryDMD2", "sid": "DistillerySiD", "tcd": "DistilleryTCD",
                "phased_dmd": "DistilleryPhasedDMD"}
FAST = {"dmd2": {"student_timesteps": "999,499", "guidance_scale": 2.0, "update_ratio": 1},
        "sid": {"student_timesteps": "999,499"}, "tcd": {},
        "phased_dmd": {"student_timesteps": "999,749,499,249", "phases": 2, "guidance_scale": 2.0, "update_ratio": 1}}
# node ids of the graph distill_graph builds ("1": Start, "2": Job Status, as the job tests have always used)
START, STATUS, TEACHER, METHOD, PROMPTS, IMAGES, ADVANCED = "1", "2", "11", "12", "13", "14", "15"


def student_card(path):
    """The LoRA's student card, read the way the pack reads it (imported here: collecting needs no pack)."""
    from comfyui_distillery.jobs.students import student_card as read

    return read(path)


# --------------------------------------------------------------------------- graphs

_DEFAULTS: dict[str, dict] = {}


def widget_defaults(comfy, class_type: str) -> dict:
    """{input: default} of a node's widgets, from the server's /object_info (so a new option needs no edit)."""
    if class_type not in _DEFAULTS:
        info = comfy.object_info(class_type)[class_type]
        out = {}
        for part in ("required", "optional"):
            for name, spec in info["input"].get(part, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if "default" in opts:
                    out[name] = opts["default"]
                elif isinstance(spec[0], list) and spec[0]:
                    out[name] = spec[0][0]
        _DEFAULTS[class_type] = out
    return dict(_DEFAULTS[class_type])


def distill_graph(comfy, name, *, method="dmd2", steps=3, lr=1e-4, ckpt=comfy_harness.TINY_SD15_NAME,
                  prompts="a cat\na dog", prompts_file="", resolution=64, preview_every=2, checkpoint_every=2,
                  log_every=1, advanced=True, real_images=None, **options) -> dict:
    """Teacher + method node + Prompts [+ Real Images] [+ Advanced] -> Start: a tiny run on the tiny checkpoint.
    options: the method node's widgets (its options), over its defaults and FAST."""
    node = METHOD_NODES[method]
    graph = {
        TEACHER: {"class_type": "DistilleryTeacherCheckpoint", "inputs": {"ckpt_name": ckpt}},
        METHOD: {"class_type": node, "inputs": {**widget_defaults(comfy, node), **FAST[method], **options}},
        PROMPTS: {"class_type": "DistilleryPrompts", "inputs": {
            "prompts": prompts, "prompts_file": prompts_file, "negative_prompt": ""}},
        START: {"class_type": "DistilleryStartDistillation", "inputs": {
            "teacher": [TEACHER, 0], "method": [METHOD, 0], "prompts": [PROMPTS, 0],
            "steps": steps, "batch_size": 1, "student_lr": lr, "critic_lr": lr, "ema_decay": 0.0, "seed": 0,
            "lora_rank": 4, "checkpoint_every": checkpoint_every, "preview_every": preview_every,
            "resolution": resolution, "lora_name": name}},
    }
    if advanced:  # log every step, so the metrics have one record per step
        graph[ADVANCED] = {"class_type": "DistilleryAdvancedTraining", "inputs": {
            **widget_defaults(comfy, "DistilleryAdvancedTraining"), "log_every": log_every}}
        graph[START]["inputs"]["advanced"] = [ADVANCED, 0]
    if real_images is not None:
        graph[IMAGES] = {"class_type": "DistilleryRealImages", "inputs": {"folder": real_images}}
        graph[START]["inputs"]["real_images"] = [IMAGES, 0]
    return graph


def status_node(job_ref, wait=True):
    return {"class_type": "DistilleryJobStatus", "inputs": {
        "job": job_ref, "wait": wait, "stop_job_if_cancelled": False, "timeout_minutes": 10, "job_id": ""}}


# --------------------------------------------------------------------------- server helpers

def finished(comfy, prompt_id, timeout=600):
    """The history entry of a prompt once it ended (success or error), without raising."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (comfy.get(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
            return entry
        assert comfy.running, comfy.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not end within {timeout} s\n{comfy.log_tail()}")


def job_id_of(entry):
    return entry["outputs"][START]["text"][0].split()[1].rstrip(":")


def wait_job(comfy, job_id, states, timeout=600, min_step=None):
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = comfy.get(f"/distillery/jobs/{job_id}")
        if info["state"] in states and (min_step is None or (info.get("step") or 0) >= min_step):
            return info
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} not in {states}: {info}")


def post_prompt(comfy, prompt):
    """POST /prompt: (HTTP status, decoded answer, raw text), a 400 included (the harness raises on it)."""
    body = json.dumps({"prompt": prompt, "client_id": comfy.client_id}).encode()
    req = urllib.request.Request(comfy.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    text = raw.decode(errors="replace")
    return status, json.loads(text), text


def jobs_root(comfy) -> Path:
    return comfy.output_dir / "distillery" / "jobs"


def job_dirs(comfy) -> list[str]:
    root = jobs_root(comfy)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def worker_pids(comfy) -> list[int]:
    """Live worker processes of this server's jobs (a worker's command line names its job folder)."""
    root, pids = str(jobs_root(comfy)), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root in cmd and "worker" in cmd:
            pids.append(int(proc.name))
    return pids


def no_worker_within(comfy, seconds=15.0) -> list[int]:
    """[] once no worker of this server runs (a finished job's worker may take a moment to exit)."""
    deadline = time.monotonic() + seconds
    while (pids := worker_pids(comfy)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def assert_refused(comfy, prompt, node_id, input_name):
    """The server's validation refuses the prompt: HTTP 400, node_errors on `node_id` alone with exactly one
    error, attached to `input_name`; and no job folder appeared. Returns (the error, the raw answer)."""
    before = job_dirs(comfy)
    status, answer, text = post_prompt(comfy, prompt)
    assert status == 400, (status, text[:3000])
    errors = answer.get("node_errors") or {}
    assert list(errors) == [node_id], errors
    found = errors[node_id]["errors"]
    assert len(found) == 1, found
    assert found[0]["extra_info"]["input_name"] == input_name, found
    assert job_dirs(comfy) == before
    return found[0], text


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def unet_only_copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint with its diffusion model alone (no text encoder, no VAE), standard library only:
    its header says SD1.5, and the Teacher node refuses it for the missing text encoder."""
    header = safetensors_header(src)
    (n,) = struct.unpack("<Q", src.open("rb").read(8))
    keep = sorted((k for k in header if k.startswith("model.diffusion_model.")),
                  key=lambda k: header[k]["data_offsets"][0])
    out, offset = {}, 0
    for key in keep:
        a, b = header[key]["data_offsets"]
        out[key] = {**header[key], "data_offsets": [offset, offset + b - a]}
        offset += b - a
    head = json.dumps(out, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with src.open("rb") as f, dst.open("wb") as g:
        g.write(struct.pack("<Q", len(head)) + head)
        for key in keep:
            a, b = header[key]["data_offsets"]
            f.seek(8 + n + a)
            g.write(f.read(b - a))
    return dst


def kill_workers(base: Path):
    for status in (base / "output" / "distillery" / "jobs").glob("*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("pid")
            if pid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def jobs_comfy(comfy_dir, tiny_sd15_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs_comfy")
    files = tmp_path_factory.mktemp("jobs_models")
    broken = files / "broken.safetensors"  # not even a safetensors header
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}!!" + os.urandom(256))
    rng = random.Random(0)  # a valid safetensors file whose tensors are no model at all
    not_a_model = comfy_harness.write_safetensors(files / "not_a_model.safetensors", {
        "qzx.weight": ([4, 4], [rng.gauss(0, 1) for _ in range(16)]),
        "blorp.bias": ([7], [rng.gauss(0, 1) for _ in range(7)])})
    unet_only = unet_only_copy(Path(tiny_sd15_checkpoint), files / "unet_only.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("DISTILLERY_E2E_THREADS", "1"))
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=base, custom_nodes=[(PACK, REPO_ROOT)],
        models={"checkpoints": [tiny_sd15_checkpoint, broken, not_a_model, unet_only]}, env=env,
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "180")))
    try:
        with server:
            yield server
    finally:
        kill_workers(base)


def browser_tools(comfy_dir):
    browser_dir = Path(os.environ.get("DISTILLERY_BROWSER_DIR", comfy_dir / "browser"))
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not Path(chromium).exists() or \
            not (browser_dir / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs node, chromium and playwright-core (DISTILLERY_BROWSER_DIR/node_modules)")
    return browser_dir, chromium


def run_node_script(script: str, config: dict, tmp_path: Path, timeout=600) -> dict:
    (tmp_path / "e2e.json").write_text(json.dumps(config))
    proc = subprocess.run(["node", str(HERE / script), str(tmp_path / "e2e.json")],
                          capture_output=True, text=True, timeout=timeout)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    assert proc.returncode == 0 and result.get("ok"), (result.get("error"), proc.stderr[-3000:])
    return result


# --------------------------------------------------------------------------- a job, end to end

def test_dmd2_job_runs_in_a_worker_and_its_lora_loads_without_unmatched_keys(jobs_comfy):
    comfy = jobs_comfy
    t0 = time.monotonic()
    graph = distill_graph(comfy, "it_student", steps=3)
    entry = finished(comfy, comfy.queue({**graph, STATUS: status_node([START, 0])}))
    took = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "completed, step 3/3" in entry["outputs"][STATUS]["text"][0], entry["outputs"]
    job_id = job_id_of(entry)
    info = comfy.get(f"/distillery/jobs/{job_id}")
    assert info["state"] == "completed" and info["lora_name"] == "it_student.safetensors"
    started = [line for line in comfy.log_text().splitlines() if f"job {job_id} started (worker pid" in line]
    assert started and f"worker pid {comfy.proc.pid})" not in started[0], started  # a worker process of its own
    assert "ComfyUI runs on the CPU" in info["log_tail"] or "unload" in info["log_tail"]
    config = info["config"]  # the run spec, as the browser may see it
    assert config["method"] == "dmd2" and config["method_options"]["student_timesteps"] == [999, 499]
    assert config["method_options"]["update_ratio"] == 1 and config["train"]["steps"] == 3
    assert config["train"]["log_every"] == 1  # from the Advanced node
    assert config["teacher"] == {"kind": "checkpoint", "name": comfy_harness.TINY_SD15_NAME, "family": "SD15"}
    assert config["data"]["resolution"] == 64 and config["data"]["prompt_count"] == 2
    assert config["output"] == {"lora_name": "it_student.safetensors"}
    assert str(comfy.base_dir) not in json.dumps(config)  # no machine paths go out
    on_disk = json.loads((jobs_root(comfy) / job_id / "config.json").read_text())
    assert {"method", "method_options", "train", "teacher", "data", "output"} <= set(on_disk)
    assert on_disk["teacher"]["path"].endswith(comfy_harness.TINY_SD15_NAME)
    metrics = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")
    assert [r["step"] for r in metrics["records"]] == [1, 2, 3]
    previews = comfy.get(f"/distillery/jobs/{job_id}/previews")
    assert previews["latest"] == "step-00000002.png"
    assert comfy.get_bytes(f"/distillery/jobs/{job_id}/previews/{previews['latest']}")[:8] == b"\x89PNG\r\n\x1a\n"

    lora = comfy.models_dir / "loras" / "it_student.safetensors"
    header = safetensors_header(lora)
    assert set(header.pop("__metadata__")) == {"distillery.card"}  # one JSON card, no flat distillery.* keys
    card = student_card(lora)
    assert card is not None, "the student has no card"
    assert card.method == "dmd2" and card.timesteps == [999, 499] and card.sampler == "x0_renoise"
    assert card.base_checkpoint == comfy_harness.TINY_SD15_NAME and card.job == job_id
    assert card.steps_trained == 3 and card.lora_rank == 4 and card.resolution == 64 and card.prompts == 2
    assert card.method_options["guidance_scale"] == 2.0 and card.prediction_type == "epsilon" and card.cfg == 1.0
    assert all(k.startswith("lora_unet_") for k in header)
    assert sum(k.endswith(".alpha") for k in header) == 65  # every adapted layer of the tiny UNet

    assert "it_student.safetensors" in comfy.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    loader = comfy.object_info("DistilleryLoadDistilledLoRA")["DistilleryLoadDistilledLoRA"]
    assert loader["input"]["required"]["lora_name"][1]["options"] == ["it_student.safetensors"]
    before = len(comfy_harness.lora_key_warnings(comfy.log_text()))
    comfy.run(comfy_harness.txt2img_prompt(lora_name="it_student.safetensors", filename_prefix="it_lora", seed=5))
    student = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_harness.TINY_SD15_NAME}},
        "2": {"class_type": "DistilleryLoadDistilledLoRA", "inputs": {
            "model": ["1", 0], "lora_name": "it_student.safetensors", "strength": 1.0, "denoise": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "SamplerCustom", "inputs": {
            "model": ["2", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["3", 0],
            "negative": ["3", 0], "sampler": ["2", 1], "sigmas": ["2", 2], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "it_student"}},
    }
    assert len(comfy.output_files(comfy.run(student))) == 1
    assert comfy_harness.lora_key_warnings(comfy.log_text())[before:] == []

    # the same settings again: the existing job, not a second one
    dirs = job_dirs(comfy)
    again = finished(comfy, comfy.queue(distill_graph(comfy, "it_student", steps=3)))
    assert job_id_of(again) == job_id and job_dirs(comfy) == dirs
    print(f"\n[timing] DMD2 job of 3 steps (queue -> LoRA written): {took:.1f} s")


def test_a_phased_dmd_job_samples_with_its_experts_switched_at_the_trained_boundary(jobs_comfy):
    """A 2-phase student (experts at 999, 749 and at 499, 249) through the job path; the loader node applies
    expert 1 down to timestep 749 and expert 2 from exactly 499 on, as the log of every switch shows."""
    comfy = jobs_comfy
    entry = finished(comfy, comfy.queue({**distill_graph(comfy, "it_phased", method="phased_dmd", steps=4),
                                         STATUS: status_node([START, 0])}))
    assert entry["status"]["status_str"] == "success", (entry["outputs"], comfy.log_tail())
    job_id = job_id_of(entry)
    metrics = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")
    assert [r.get("phase") for r in metrics["records"]] == [1, 1, 2, 2]  # expert 1 first, then expert 2
    lora = comfy.models_dir / "loras" / "it_phased.safetensors"
    card = student_card(lora)
    assert card.method == "phased_dmd" and card.sampler == "x0_renoise" and card.timesteps == [999, 749, 499, 249]
    assert [(e["timesteps"], e["prefix"]) for e in card.experts] == [([999, 749], "student_p1."),
                                                                     ([499, 249], "student_p2.")]
    header = safetensors_header(lora)
    header.pop("__metadata__")
    assert {k.split(".", 1)[0] for k in header} == {"student_p1", "student_p2"}
    assert sum(k.endswith(".alpha") for k in header) == 2 * 65  # every adapted layer, once per expert

    def sample(model_ref, prefix):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_harness.TINY_SD15_NAME}},
            "2": {"class_type": "DistilleryLoadDistilledLoRA", "inputs": {
                "model": ["1", 0], "lora_name": "it_phased.safetensors", "strength": 1.0, "denoise": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "SamplerCustom", "inputs": {
                "model": model_ref, "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["3", 0],
                "negative": ["3", 0], "sampler": ["2", 1], "sigmas": ["2", 2], "latent_image": ["4", 0]}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        }

    before_log = comfy.log_text().splitlines()
    before_warnings = len(comfy_harness.lora_key_warnings(comfy.log_text()))
    student = comfy.output_files(comfy.run(sample(["2", 0], "it_phased_student")))
    switches = [line.split("distillery: ")[1] for line in comfy.log_text().splitlines()[len(before_log):]
                if "distillery: phased student" in line]
    assert switches == ["phased student, expert 1 of 2 from sigma 14.615 (timestep 999.0)",
                        "phased student, expert 2 of 2 from sigma 1.6129 (timestep 499.0)"], switches
    assert comfy_harness.lora_key_warnings(comfy.log_text())[before_warnings:] == []
    base = comfy.output_files(comfy.run(sample(["1", 0], "it_phased_base")))  # same sampler, no experts
    import numpy as np
    from PIL import Image

    pixels = [np.asarray(Image.open(path[0])) for path in (student, base)]
    assert pixels[0].shape == pixels[1].shape and not np.array_equal(*pixels)  # the experts change the sample


def test_a_dmd2_job_with_the_regression_loss_makes_its_pairs_with_the_comfyui_teacher(jobs_comfy):
    """regression_weight > 0 from the method node: the worker's guided ComfyUI teacher makes the noise -> sample
    pairs (one batch per student update) and every student update logs the regression term."""
    comfy = jobs_comfy
    graph = distill_graph(comfy, "it_regression", steps=3, regression_weight=0.5, regression_pairs=2,
                          regression_steps=2)
    entry = finished(comfy, comfy.queue({**graph, STATUS: status_node([START, 0])}))
    assert entry["status"]["status_str"] == "success", (entry["outputs"], comfy.log_tail())
    job_id = job_id_of(entry)
    info = comfy.get(f"/distillery/jobs/{job_id}")
    assert info["config"]["method_options"]["regression_weight"] == 0.5
    records = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")["records"]
    assert len(records) == 3 and all(r["regression"] > 0 for r in records), records  # update_ratio 1: 3 updates
    assert student_card(comfy.models_dir / "loras" / "it_regression.safetensors").method == "dmd2"


def test_a_dmd2_job_with_a_critic_per_step_trains_one_critic_adapter_per_student_step(jobs_comfy):
    """critic_per_step from the DMD2 node's widget: the worker's ComfyUI model carries a critic adapter per
    student step (2 here), every critic update trains them, and the LoRA holds the student alone."""
    comfy = jobs_comfy
    graph = distill_graph(comfy, "it_critic_per_step", steps=3, exit_step="uniform", critic_per_step=True)
    entry = finished(comfy, comfy.queue({**graph, STATUS: status_node([START, 0])}))
    assert entry["status"]["status_str"] == "success", (entry["outputs"], comfy.log_tail())
    info = comfy.get(f"/distillery/jobs/{job_id_of(entry)}")
    assert info["config"]["method_options"]["critic_per_step"] is True
    records = comfy.get(f"/distillery/jobs/{job_id_of(entry)}/metrics?since=-1")["records"]
    assert len(records) == 3 and all(r["denoise/critic"] > 0 for r in records), records
    lora = comfy.models_dir / "loras" / "it_critic_per_step.safetensors"
    keys = safetensors_header(lora).keys() - {"__metadata__"}
    assert keys and not [k for k in keys if "critic" in k], sorted(keys)[:5]
    assert student_card(lora).method == "dmd2"


def test_a_low_vram_job_fp8_base_attention_lora_micro_batches(jobs_comfy):
    """The low-VRAM settings through the real job path: ComfyUI's own layers stored in fp8 (computed in the
    run's precision), adapters on attention only, batch 2 in passes of 1; the LoRA holds attention layers
    only and loads with zero unmatched keys."""
    comfy = jobs_comfy
    graph = distill_graph(comfy, "it_low_vram", steps=2, preview_every=0)
    graph[START]["inputs"]["batch_size"] = 2
    graph[ADVANCED]["inputs"].update(fp8_base=True, lora_targets="attention", micro_batch_size=1, foreach=False)
    entry = finished(comfy, comfy.queue({**graph, STATUS: status_node([START, 0])}))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "completed, step 2/2" in entry["outputs"][STATUS]["text"][0], entry["outputs"]
    job_id = job_id_of(entry)
    train = comfy.get(f"/distillery/jobs/{job_id}")["config"]["train"]
    assert (train["fp8_base"], train["lora_targets"], train["micro_batch_size"]) == (True, "attention", 1)
    lora = comfy.models_dir / "loras" / "it_low_vram.safetensors"
    header = safetensors_header(lora)
    header.pop("__metadata__")
    layers = {k.split(".")[0] for k in header}
    assert layers and all("_attn1_" in k or "_attn2_" in k for k in layers), sorted(layers)[:5]
    before = len(comfy_harness.lora_key_warnings(comfy.log_text()))
    comfy.run(comfy_harness.txt2img_prompt(lora_name="it_low_vram.safetensors", filename_prefix="it_lowvram", seed=3))
    assert comfy_harness.lora_key_warnings(comfy.log_text())[before:] == []


def test_plan_node_draws_the_plan_of_the_run(jobs_comfy):
    """Distillery Plan VRAM on the same inputs as Start: a chart on the node, the plan as JSON (the teacher's
    family's reference layout, here SD1.5 at 64 px), and the change that fits a card too small."""
    comfy = jobs_comfy
    graph = distill_graph(comfy, "it_plan", steps=2, advanced=True)
    start = graph.pop(START)["inputs"]
    plan_inputs = {k: v for k, v in start.items() if k not in ("lora_name", "prompts")}
    graph["30"] = {"class_type": "DistilleryPlanVRAM", "inputs": {**plan_inputs, "vram_gb": 1.5, "fit": True}}
    graph.pop(PROMPTS)
    entry = finished(comfy, comfy.queue(graph), timeout=900)
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy.log_tail())
    images = entry["outputs"]["30"]["images"]
    assert len(images) == 1 and comfy.view(images[0]["filename"], images[0].get("subfolder", ""),
                                           images[0]["type"])[:8] == b"\x89PNG\r\n\x1a\n"
    summary = entry["outputs"]["30"]["text"][0]
    assert summary.startswith("sd15 @ 64px, dmd2: peak ") and "DOES NOT FIT in 1.5 GiB" in summary, summary
    assert "fits with: " in summary and "fp8_base=true" in summary, summary
    assert "the plan is of the reference architecture" in summary  # the tiny checkpoint is not SD1.5's size
    print(f"\n[plan node]\n{summary}")


# --------------------------------------------------------------------------- refused before any job exists

@pytest.mark.parametrize("ckpt", ["not_a_model.safetensors", "broken.safetensors", "missing.safetensors",
                                  "unet_only.safetensors"])
def test_a_file_that_is_no_model_is_refused_on_ckpt_name(jobs_comfy, ckpt):
    comfy = jobs_comfy
    error, _ = assert_refused(comfy, distill_graph(comfy, "it_no_model", ckpt=ckpt), TEACHER, "ckpt_name")
    assert ckpt in error["details"], error
    assert not (comfy.models_dir / "loras" / "it_no_model.safetensors").exists()


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.txt"])
def test_a_prompts_file_outside_the_input_folder_is_refused(jobs_comfy, path):
    comfy = jobs_comfy
    (comfy.base_dir / "x.txt").write_text("root:x:0:0:a line of a file beside the input folder\n")
    error, text = assert_refused(comfy, distill_graph(comfy, "it_passwd", prompts_file=path), PROMPTS,
                                 "prompts_file")
    assert path in error["details"], error
    assert "root:x" not in text  # nothing of the file comes back


@pytest.mark.parametrize("option, value", [
    ("update_ratio", 0), ("update_ratio", 101), ("guidance_scale", -1.0), ("regression_weight", -0.5),
    ("student_timesteps", "249,999"), ("student_timesteps", "999,-5"), ("student_timesteps", "999,abc")])
def test_a_bad_method_option_is_one_error_on_its_input(jobs_comfy, option, value):
    comfy = jobs_comfy
    assert_refused(comfy, distill_graph(comfy, "it_bad_option", **{option: value}), METHOD, option)


def test_a_bad_lora_name_is_one_error_on_its_input(jobs_comfy):
    comfy = jobs_comfy
    graph = distill_graph(comfy, "../outside")
    error, _ = assert_refused(comfy, graph, START, "lora_name")
    assert not (comfy.models_dir / "outside.safetensors").exists()


@pytest.mark.parametrize("case", ["method_is_text", "resolution_4", "gan_without_images", "exit_step_not_a_choice",
                                  "critic_per_step_with_last"])
def test_a_run_that_cannot_be_built_never_creates_a_job(jobs_comfy, case):
    """What passes ComfyUI's validation but not the run spec fails at Start (or at the method node), before a
    job exists: a `method` input that is a literal string instead of a link, a resolution of 4 pixels, a GAN
    weight without real images, a method option that is not one of its choices, two options that conflict
    (ComfyUI's validate_inputs puts its one message on every input it reads, so a check across options runs
    when the method node does)."""
    comfy = jobs_comfy
    graph = distill_graph(comfy, f"it_{case}")
    if case == "method_is_text":
        graph[START]["inputs"]["method"] = "foo"
        del graph[METHOD]
    elif case == "resolution_4":
        graph[START]["inputs"]["resolution"] = 4
    elif case == "gan_without_images":
        graph[METHOD]["inputs"]["gan_generator_weight"] = 0.01
    elif case == "critic_per_step_with_last":
        graph[METHOD]["inputs"].update(exit_step="last", critic_per_step=True)
    else:
        graph[METHOD]["inputs"]["exit_step"] = "sometimes"
    assert no_worker_within(comfy) == []
    before = job_dirs(comfy)
    status, answer, text = post_prompt(comfy, graph)
    if status == 200:
        entry = finished(comfy, answer["prompt_id"], timeout=120)
        assert entry["status"]["status_str"] == "error", entry["status"]
        error = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
        message = error["exception_message"]
        if case == "method_is_text":
            assert message.startswith("method: connect"), message  # named, not a TypeError
        if case == "exit_step_not_a_choice":
            assert error["node_type"] == "DistilleryDMD2" and "exit_step='sometimes'" in message, error
        elif case == "critic_per_step_with_last":
            assert error["node_type"] == "DistilleryDMD2" and "set exit_step=uniform" in message, error
        else:
            assert error["node_type"] == "DistilleryStartDistillation", error
        if case == "resolution_4":
            assert "resolution=4" in message, message
        elif case == "gan_without_images":
            assert "gan_generator_weight" in message and "real images" in message, message
    else:
        assert status == 400, (status, text[:2000])
    time.sleep(1.0)  # the job watcher would have started a worker by now
    assert job_dirs(comfy) == before
    assert worker_pids(comfy) == []
    assert not [j for j in comfy.get("/distillery/jobs")["jobs"] if j["name"] == f"it_{case}"]
    assert not (comfy.models_dir / "loras" / f"it_{case}.safetensors").exists()


# --------------------------------------------------------------------------- real images

@pytest.mark.parametrize("method, options", [("dmd2", {"gan_generator_weight": 0.01}), ("tcd", {})])
def test_a_job_with_a_folder_of_real_images(jobs_comfy, method, options):
    """DMD2: the GAN head reads the critic's middle block, real images from ComfyUI's VAE; TCD: trains on them."""
    import numpy as np
    from PIL import Image

    comfy = jobs_comfy
    photos = comfy.input_dir / "it_photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 96), (80, 64), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(photos / f"photo{i}.png")
    (photos / "photo0.txt").write_text("a red fox")
    graph = distill_graph(comfy, f"it_real_{method}", method=method, steps=2, preview_every=0,
                          real_images="it_photos", **options)
    entry = finished(comfy, comfy.queue({**graph, STATUS: status_node([START, 0])}))
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy.log_tail())
    job_id = job_id_of(entry)
    info = comfy.get(f"/distillery/jobs/{job_id}")
    assert info["state"] == "completed", info
    assert info["config"]["data"]["real_images"] is True
    assert "encoding 3 real images with the checkpoint's VAE" in info["log_tail"], info["log_tail"]
    records = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")["records"]
    keys = {k for r in records for k in r}
    if options.get("gan_generator_weight"):
        assert {"gan/student", "gan/critic"} <= keys, keys
    card = student_card(comfy.models_dir / "loras" / f"it_real_{method}.safetensors")
    assert card is not None and card.method == method
    assert card.sampler == ("tcd" if method == "tcd" else "x0_renoise")

    # a folder with a broken image is refused by the Real Images node, before a job is queued
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    try:
        bad = distill_graph(comfy, f"it_real_bad_{method}", method=method, steps=2, real_images="it_photos",
                            **options)
        error, _ = assert_refused(comfy, bad, IMAGES, "folder")
        assert "broken.png is not a readable image" in error["details"], error
    finally:
        (photos / "broken.png").unlink()


def test_compare_workflow_runs_base_student_and_hybrid_on_the_trained_student(jobs_comfy):
    from test_sampler_workflows import ui_to_api  # the shared UI -> API converter of the sampler tests

    comfy = jobs_comfy
    if not (comfy.models_dir / "loras" / "it_student.safetensors").exists():
        pytest.skip("needs the student of the DMD2 job test")
    workflow = json.loads((REPO_ROOT / "workflows" / "compare_base_vs_student.json").read_text())
    prompt = ui_to_api(workflow, comfy.object_info())
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = comfy_harness.TINY_SD15_NAME
        elif kind == "DistilleryLoadDistilledLoRA":
            inputs["lora_name"] = "it_student.safetensors"
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=2)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "DistilleryHybridSampler":
            inputs.update(base_total_steps=4, base_steps=1)
    files = comfy.output_files(comfy.run(prompt, timeout=600))
    assert sorted(f.parent.name + "/" + f.name.split("_")[0] for f in files) == \
        ["distillery_compare/base"] * 2 + ["distillery_compare/hybrid"] * 2 + ["distillery_compare/student"] * 2


# --------------------------------------------------------------------------- failures, stop / resume, restart

def test_failing_jobs_are_reported_with_reason_and_log_tail(jobs_comfy):
    comfy = jobs_comfy
    for name, kwargs, expected in (
            ("it_nan", dict(steps=6, lr=10.0, preview_every=0), "diverged"),):
        graph = distill_graph(comfy, name, **kwargs)
        entry = finished(comfy, comfy.queue({**graph, STATUS: status_node([START, 0])}))
        assert entry["status"]["status_str"] == "error", name
        error = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
        assert error["node_type"] == "DistilleryJobStatus"
        assert expected in error["exception_message"] and "last lines of its log" in error["exception_message"]
        job_id = [j["id"] for j in comfy.get("/distillery/jobs")["jobs"] if j["name"] == name][0]
        info = wait_job(comfy, job_id, {"failed"})
        deadline = time.monotonic() + 30
        while not info.get("exit_code") and time.monotonic() < deadline:  # the watcher adds exit code + tail
            time.sleep(0.3)
            info = comfy.get(f"/distillery/jobs/{job_id}")
        assert expected in info["reason"] and info["exit_code"] in (1, 3) and info["log_tail"]
        assert not (comfy.models_dir / "loras" / f"{name}.safetensors").exists()
    assert comfy.running  # the server never went down


def test_stop_then_resume_within_100_ms_ten_times_completes_the_job(jobs_comfy):
    """POST .../stop then .../resume (sent 0-50 ms after the stop's answer), 10 times, with the job queued,
    starting or running: it never fails, never runs two workers, and ends completed with every step's metrics
    once."""
    comfy = jobs_comfy
    steps = 30
    t0 = time.monotonic()
    entry = finished(comfy, comfy.queue(distill_graph(comfy, "it_stop_resume", steps=steps, preview_every=0,
                                                      checkpoint_every=10)))
    job_id = job_id_of(entry)
    rng = random.Random(1)
    seen, gaps = [], []

    def poll_until(ok, timeout):  # the job's status once ok(status), else the last one after `timeout` s
        deadline = time.monotonic() + timeout
        while True:
            info = comfy.get(f"/distillery/jobs/{job_id}")
            if ok(info) or time.monotonic() > deadline:
                return info
            time.sleep(0.02)

    for i in range(10):
        when = ("training", "queued or starting", "loading", "at once")[i % 4]
        if when == "training":  # a step after the last one it has now
            done = comfy.get(f"/distillery/jobs/{job_id}").get("step") or 0
            running = wait_job(comfy, job_id, {"running"}, min_step=done + 1, timeout=300)
            assert running["pid"] in worker_pids(comfy), (running, worker_pids(comfy))
            assert len(worker_pids(comfy)) == 1
        elif when == "queued or starting":  # the old worker reaped, the new one not yet running
            poll_until(lambda s: s["state"] in ("queued", "starting") and not s.get("resume_pending"), 20)
        elif when == "loading":  # the new worker runs and loads the model, or has just begun training
            poll_until(lambda s: s["state"] == "running" and not s.get("stop_requested"), 30)
            time.sleep(rng.uniform(0.0, 1.0))
        # "at once": while the previous stop is still in flight and its resume pending
        before = comfy.get(f"/distillery/jobs/{job_id}")
        stopped = comfy.post(f"/distillery/jobs/{job_id}/stop")
        t_stop = time.monotonic()
        time.sleep(rng.uniform(0.0, 0.05))
        resumed = comfy.post(f"/distillery/jobs/{job_id}/resume")
        gaps.append(time.monotonic() - t_stop)
        seen.append((when, before["state"] + ("+pending" if before.get("resume_pending") else ""),
                     stopped["state"], resumed["state"] + ("+pending" if resumed.get("resume_pending") else "")))
        assert stopped["state"] != "failed" and resumed["state"] != "failed", seen
        assert len(worker_pids(comfy)) <= 1
    # the resume is sent 0-50 ms after the stop's answer; how long the server takes to answer it is the
    # machine's load, not the behaviour under test, so it is reported rather than asserted
    print(f"\n[timing] stop answered -> resume answered, s: {[round(g, 3) for g in gaps]}")
    deadline = time.monotonic() + 900
    while True:  # "stopped" with resume_pending is the old worker's end, before the job is queued again
        final = comfy.get(f"/distillery/jobs/{job_id}")
        if final["state"] in ("completed", "failed", "stopped", "interrupted") and not final.get("resume_pending"):
            break
        assert time.monotonic() < deadline, final
        time.sleep(0.25)
    log = comfy.get(f"/distillery/jobs/{job_id}/log?lines=2000")["log"]
    if final["state"] != "completed":
        final.pop("config", None)
        pytest.fail(f"after Stop then Resume x10 the job ended {final['state']!r}, not completed\n"
                    f"status: {json.dumps(final, indent=1)}\n(when, state before, after stop, after resume): {seen}\n"
                    f"--- its log ---\n{log[-8000:]}", pytrace=False)
    assert final["step"] == steps and final["steps"] == steps, final
    assert final["attempt"] >= 2, final
    records = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")["records"]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), [r["step"] for r in records]
    card = student_card(comfy.models_dir / "loras" / "it_stop_resume.safetensors")
    assert card is not None and card.steps_trained == steps
    assert no_worker_within(comfy) == []
    print(f"\n[timing] 10x stop/resume (gaps {min(gaps) * 1000:.0f}-{max(gaps) * 1000:.0f} ms), "
          f"{final['attempt']} attempts, job of {steps} steps: {time.monotonic() - t0:.1f} s; states {seen}")


def test_the_resume_node_trains_a_completed_job_further_with_more_steps(jobs_comfy):
    """Resume with steps=0 on a completed job is one error naming steps; with steps=4 the job trains on
    from its checkpoint at 2 and its student's card says 4 steps."""
    comfy = jobs_comfy
    entry = finished(comfy, comfy.queue({**distill_graph(comfy, "it_more_steps", steps=2),
                                         STATUS: status_node([START, 0])}))
    assert entry["status"]["status_str"] == "success", entry["status"]
    job_id = job_id_of(entry)
    resume = {"1": {"class_type": "DistilleryResumeJob", "inputs": {"job_id": job_id, "steps": 0}}}
    refused = finished(comfy, comfy.queue(resume))
    assert refused["status"]["status_str"] == "error"
    assert "larger number of steps" in json.dumps(refused["status"]["messages"])
    resume["1"]["inputs"]["steps"] = 4
    resume["2"] = {"class_type": "DistilleryJobStatus", "inputs": {
        "job": ["1", 0], "wait": True, "stop_job_if_cancelled": False, "timeout_minutes": 10, "job_id": ""}}
    again = finished(comfy, comfy.queue(resume))
    assert again["status"]["status_str"] == "success", again["status"]
    assert "completed, step 4/4" in again["outputs"]["2"]["text"][0], again["outputs"]
    records = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    card = student_card(comfy.models_dir / "loras" / "it_more_steps.safetensors")
    assert card is not None and card.steps_trained == 4


def test_a_job_interrupted_by_a_restart_resumes_from_its_checkpoint(jobs_comfy):
    comfy = jobs_comfy
    graph = distill_graph(comfy, "it_long", steps=500, preview_every=0, checkpoint_every=2, advanced=False)
    job_id = job_id_of(finished(comfy, comfy.queue(graph)))
    running = wait_job(comfy, job_id, {"running"}, min_step=3)
    # cancelling a prompt that waits on the job ends the waiting, not the job
    waiting = comfy.queue({"9": {"class_type": "DistilleryJobStatus", "inputs": {
        "wait": True, "stop_job_if_cancelled": False, "timeout_minutes": 10, "job_id": job_id}}})
    time.sleep(3)
    comfy.post("/interrupt")
    entry = finished(comfy, waiting, timeout=60)
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    running = wait_job(comfy, job_id, {"running"}, min_step=running["step"] + 1)
    comfy.stop()  # ComfyUI goes down; the worker lives in its own session ...
    os.kill(int(running["pid"]), signal.SIGKILL)  # ... until it dies too
    comfy.start()
    info = comfy.get(f"/distillery/jobs/{job_id}")
    assert info["state"] == "interrupted" and "resume continues from the checkpoint of step" in info["reason"]
    ckpt = info["checkpoint_step"]
    assert ckpt >= 2
    with pytest.raises(comfy_harness.ComfyError, match="HTTP 400"):  # ids are validated
        comfy.get("/distillery/jobs/..%2F..%2Fsecret")
    comfy.post(f"/distillery/jobs/{job_id}/resume")
    wait_job(comfy, job_id, {"running"}, min_step=ckpt + 1)
    with pytest.raises(comfy_harness.ComfyError, match="409"):
        comfy.post(f"/distillery/jobs/{job_id}/resume")
    log = comfy.get(f"/distillery/jobs/{job_id}/log?lines=400")["log"]
    assert f"resumed from the checkpoint of step {ckpt}" in log
    comfy.post(f"/distillery/jobs/{job_id}/stop")
    stopped = wait_job(comfy, job_id, {"stopped"}, timeout=180)
    assert stopped["checkpoint_step"] == stopped["step"]  # stop saved a checkpoint


# --------------------------------------------------------------------------- the frontend

def test_sidebar_panel_follows_a_job_queued_from_the_workflow(jobs_comfy, comfy_dir, tmp_path):
    browser_dir, chromium = browser_tools(comfy_dir)
    comfy = jobs_comfy
    shot = Path(os.environ.get("DISTILLERY_E2E_SCREENSHOT", tmp_path / "distillery_jobs_panel.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "url": comfy.url, "chromium": chromium, "playwright_dir": str(browser_dir), "timeout_ms": 400000,
        "workflows": [str(REPO_ROOT / "workflows" / w) for w in WORKFLOWS],
        "workflow": str(REPO_ROOT / "workflows" / "distill_sd15_dmd2.json"),
        "widgets": {
            "DistilleryTeacherCheckpoint": {"ckpt_name": comfy_harness.TINY_SD15_NAME},
            "DistilleryDMD2": {"student_timesteps": "999,499", "update_ratio": 1},
            "DistilleryPrompts": {"prompts": "a cat\na dog\na house\na tree"},
            "DistilleryStartDistillation": {"steps": 8, "batch_size": 1, "resolution": 64, "lora_rank": 4,
                                            "preview_every": 2, "checkpoint_every": 4, "lora_name": "it_browser"}},
        "screenshot": str(shot),
    }
    result = run_node_script("jobs_panel_e2e.cjs", config, tmp_path)
    assert result["missing"] == {w: [] for w in WORKFLOWS}
    toasts = {w: [t for t in shown if "Node definitions updated" not in t]  # a job that completed meanwhile
              for w, shown in result["toasts"].items()}
    assert toasts == {w: [] for w in WORKFLOWS}, toasts  # e.g. "Invalid workflow against zod schema"
    schema = {w: [line for line in lines if "zod" in line.lower() or "invalid workflow" in line.lower()]
              for w, lines in result["console"].items()}
    assert schema == {w: [] for w in WORKFLOWS}, schema

    # what the frontend's graphToPrompt made of the workflow, and the job it started
    queued = result["queued"]
    assert queued["status"] == 200 and not queued["answer"].get("node_errors"), queued["answer"]
    prompt = queued["prompt"]
    types = {node["class_type"] for node in prompt.values()}
    assert {"DistilleryTeacherCheckpoint", "DistilleryDMD2", "DistilleryPrompts", "DistilleryStartDistillation",
            "DistilleryJobStatus"} <= types, types
    start = next(node["inputs"] for node in prompt.values() if node["class_type"] == "DistilleryStartDistillation")
    for socket, kind in (("teacher", "DistilleryTeacherCheckpoint"), ("method", "DistilleryDMD2"),
                         ("prompts", "DistilleryPrompts")):
        assert isinstance(start[socket], list) and prompt[start[socket][0]]["class_type"] == kind, start
    assert result["final_state"] == "completed"
    job = comfy.get(f"/distillery/jobs/{result['job_id']}")
    assert job["lora_name"] == "it_browser.safetensors" and job["config"]["method"] == "dmd2"
    assert job["config"]["method_options"]["student_timesteps"] == [999, 499] and job["steps"] == 8
    live = [s for s in result["seen"] if s["state"] == "running" and s["step"] > 0]
    assert live, result["seen"]  # the panel updated while the job ran, not only at the end
    assert result["detail"]["charts"] >= 2 and result["detail"]["preview"].startswith("step-")
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"\n[timing] browser: {json.dumps(result['timings'])}; screenshot {shot}; "
          f"page errors: {result['pageerrors']}")


SEARCHES = ["dmd2", "sid", "tcd", "lcm", "hyper", "hyper-sd", "distill"]


@pytest.fixture(scope="module")
def node_search(jobs_comfy, comfy_dir, tmp_path_factory):
    """{query: [node ids]} as the frontend's node search box lists them (ComfyUI frontend 1.27: a fuzzy
    search over the node id and its display name only, not the category nor the description)."""
    browser_dir, chromium = browser_tools(comfy_dir)
    config = {"url": jobs_comfy.url, "chromium": chromium, "playwright_dir": str(browser_dir),
              "timeout_ms": 120000, "queries": SEARCHES}
    results = run_node_script("node_search_e2e.cjs", config, tmp_path_factory.mktemp("search"))["results"]
    print(f"\n[search] {json.dumps(results)}")
    return results


def test_node_search_finds_the_method_nodes(node_search):
    assert "DistilleryDMD2" in node_search["dmd2"], node_search["dmd2"]
    assert "DistillerySiD" in node_search["sid"], node_search["sid"]
    assert "DistilleryTCD" in node_search["tcd"], node_search["tcd"]
    assert {"DistilleryStartDistillation", "DistilleryLoadDistilledLoRA"} <= set(node_search["distill"])


def test_node_search_finds_tcd_by_lcm_and_hyper(node_search):
    assert "DistilleryTCD" in node_search["lcm"], node_search["lcm"]
    assert {"DistilleryTCD", "DistillerySamplerDDIM"} & set(node_search["hyper"]), node_search["hyper"]
