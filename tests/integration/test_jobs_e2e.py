"""Training jobs in a real ComfyUI server (skips without COMFYUI_DIR): a short DMD2 job on the tiny SD1.5
checkpoint runs in its own worker process, its LoRA appears in LoraLoader's list and applies with zero
unmatched keys; failing jobs (NaN, a broken checkpoint) are loud; a job interrupted by a restart resumes
from its checkpoint; and in headless Chromium the sidebar panel follows a job queued from the shipped
workflow (screenshot). The server here is this module's own: fresh folders, and OMP_NUM_THREADS=1 so the
workers share a small CPU politely (DISTILLERY_E2E_THREADS to change)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PACK = "ComfyUI-Distillery"
WORKFLOWS = ["distill_sd15_dmd2.json", "distill_sdxl_dmd2.json", "distill_with_sid.json", "distill_with_tcd.json",
             "compare_base_vs_student.json"]


def start_node(name, *, steps=3, lr=1e-4, ckpt=comfy_harness.TINY_SD15_NAME, preview_every=2, checkpoint_every=2):
    return {"class_type": "DistilleryStartDistillation", "inputs": {
        "method": "dmd2", "ckpt_name": ckpt, "prompts": "a cat\na dog", "prompts_file": "", "steps": steps,
        "batch_size": 1, "learning_rate": lr, "lora_rank": 4, "student_timesteps": "999,499", "guidance": 2.0,
        "resolution": 64, "lora_name": name, "training_seed": 0, "preview_every": preview_every,
        "checkpoint_every": checkpoint_every}}


def status_node(job_ref, wait=True):
    return {"class_type": "DistilleryJobStatus", "inputs": {
        "job": job_ref, "wait": wait, "stop_job_if_cancelled": False, "timeout_minutes": 10, "job_id": ""}}


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
    text = entry["outputs"]["1"]["text"][0]
    return text.split()[1].rstrip(":")


def wait_job(comfy, job_id, states, timeout=600, min_step=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = comfy.get(f"/distillery/jobs/{job_id}")
        if info["state"] in states and (min_step is None or (info.get("step") or 0) >= min_step):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states}: {info}")


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


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
    broken = base / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}!!" + os.urandom(256))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("DISTILLERY_E2E_THREADS", "1"))
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=base, custom_nodes=[(PACK, REPO_ROOT)],
        models={"checkpoints": [tiny_sd15_checkpoint, broken]}, env=env,
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "180")))
    try:
        with server:
            yield server
    finally:
        kill_workers(base)


def test_dmd2_job_runs_in_a_worker_and_its_lora_loads_without_unmatched_keys(jobs_comfy):
    comfy = jobs_comfy
    t0 = time.monotonic()
    entry = finished(comfy, comfy.queue({"1": start_node("it_student", steps=3), "2": status_node(["1", 0])}))
    took = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "completed, step 3/3" in entry["outputs"]["2"]["text"][0], entry["outputs"]
    job_id = job_id_of(entry)
    info = comfy.get(f"/distillery/jobs/{job_id}")
    assert info["state"] == "completed" and info["lora_name"] == "it_student.safetensors"
    assert info["pid"] and info["pid"] != comfy.proc.pid  # trained in a worker process of its own
    assert "ComfyUI runs on the CPU" in info["log_tail"] or "unload" in info["log_tail"]
    metrics = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")
    assert [r["step"] for r in metrics["records"]] == [1, 2, 3]
    previews = comfy.get(f"/distillery/jobs/{job_id}/previews")
    assert previews["latest"] == "step-00000002.png"
    assert comfy.get_bytes(f"/distillery/jobs/{job_id}/previews/{previews['latest']}")[:8] == b"\x89PNG\r\n\x1a\n"

    lora = comfy.models_dir / "loras" / "it_student.safetensors"
    header = safetensors_header(lora)
    meta = header.pop("__metadata__")
    assert meta["distillery.method"] == "dmd2" and json.loads(meta["distillery.timesteps"]) == [999, 499]
    assert meta["distillery.sampler"] == "x0_renoise" and meta["distillery.base_checkpoint"] == "tiny_sd15.safetensors"
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
    print(f"\n[timing] DMD2 job of 3 steps (queue -> LoRA written): {took:.1f} s")


@pytest.mark.parametrize("method, gan_weight", [("dmd2", 0.01), ("tcd", 0.0)])
def test_a_job_with_a_folder_of_real_images(jobs_comfy, method, gan_weight):
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
    node = start_node(f"it_real_{method}", steps=2, preview_every=0)
    node["inputs"].update(method=method, real_images_folder="it_photos", gan_weight=gan_weight)
    entry = finished(comfy, comfy.queue({"1": node, "2": status_node(["1", 0])}))
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy.log_tail())
    job_id = job_id_of(entry)
    info = comfy.get(f"/distillery/jobs/{job_id}")
    assert info["state"] == "completed", info
    assert "encoding 3 real images with the checkpoint's VAE" in info["log_tail"], info["log_tail"]
    records = comfy.get(f"/distillery/jobs/{job_id}/metrics?since=-1")["records"]
    keys = {k for r in records for k in r}
    if gan_weight:
        assert {"gan/student", "gan/critic"} <= keys, keys
    assert (comfy.models_dir / "loras" / f"it_real_{method}.safetensors").is_file()

    # a folder with a broken image fails at the node, before a job is queued
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    bad = start_node(f"it_real_bad_{method}", steps=2)
    bad["inputs"].update(method=method, real_images_folder="it_photos", gan_weight=gan_weight)
    entry = finished(comfy, comfy.queue({"1": bad}))
    assert entry["status"]["status_str"] == "error"
    assert "broken.png is not a readable image" in json.dumps(entry["status"])
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


def test_failing_jobs_are_reported_with_reason_and_log_tail(jobs_comfy):
    comfy = jobs_comfy
    for name, kwargs, expected in (
            ("it_nan", dict(steps=6, lr=1000.0, preview_every=0), "diverged"),
            ("it_broken", dict(ckpt="broken.safetensors"), "Error")):
        entry = finished(comfy, comfy.queue({"1": start_node(name, **kwargs), "2": status_node(["1", 0])}))
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


def test_a_job_interrupted_by_a_restart_resumes_from_its_checkpoint(jobs_comfy):
    comfy = jobs_comfy
    entry = finished(comfy, comfy.queue({"1": start_node("it_long", steps=500, preview_every=0, checkpoint_every=2)}))
    job_id = job_id_of(entry)
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


def test_sidebar_panel_follows_a_job_queued_from_the_workflow(jobs_comfy, comfy_dir, tmp_path):
    browser_dir = Path(os.environ.get("DISTILLERY_BROWSER_DIR", comfy_dir / "browser"))
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not Path(chromium).exists() or not (browser_dir / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs node, chromium and playwright-core (DISTILLERY_BROWSER_DIR/node_modules)")
    shot = Path(os.environ.get("DISTILLERY_E2E_SCREENSHOT", tmp_path / "distillery_jobs_panel.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "url": jobs_comfy.url, "chromium": chromium, "playwright_dir": str(browser_dir), "timeout_ms": 400000,
        "workflows": [str(REPO_ROOT / "workflows" / w) for w in WORKFLOWS],
        "workflow": str(REPO_ROOT / "workflows" / "distill_sd15_dmd2.json"),
        "widgets": {"ckpt_name": comfy_harness.TINY_SD15_NAME, "steps": 8, "batch_size": 1, "resolution": 64,
                    "lora_rank": 4, "preview_every": 2, "checkpoint_every": 4, "lora_name": "it_browser",
                    "prompts": "a cat\na dog\na house\na tree"},
        "screenshot": str(shot),
    }
    (tmp_path / "e2e.json").write_text(json.dumps(config))
    proc = subprocess.run(["node", str(HERE / "jobs_panel_e2e.cjs"), str(tmp_path / "e2e.json")],
                          capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    assert proc.returncode == 0 and result.get("ok"), (result.get("error"), proc.stderr[-3000:])
    assert result["missing"] == {w: [] for w in WORKFLOWS}
    assert result["final_state"] == "completed"
    live = [s for s in result["seen"] if s["state"] == "running" and s["step"] > 0]
    assert live, result["seen"]  # the panel updated while the job ran, not only at the end
    assert result["detail"]["charts"] >= 2 and result["detail"]["preview"].startswith("step-")
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"\n[timing] browser: {json.dumps(result['timings'])}; screenshot {shot}")
