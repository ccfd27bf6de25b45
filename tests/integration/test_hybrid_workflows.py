"""Hybrid sampling and diffusion-target nodes in a real ComfyUI server (skips without COMFYUI_DIR).

* the four nodes are registered (/object_info);
* workflows/hybrid_diversity.json and workflows/dt_visualization.json run end to end on the tiny random
  SD1.5-shaped checkpoint, with a small LoRA made here as the "student";
* both workflows load in the real frontend (headless Chromium) with no missing node, and the frontend's own
  graphToPrompt gives our nodes the same inputs as our UI -> API conversion (widget order);
* a LoRA student that shares the base's weights is not loaded twice, and the hand-off adds noise once
  (checked inside ComfyUI's interpreter, see SHARED_WEIGHTS_CHECK).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import comfy_harness
from test_sampler_workflows import make_lora, ui_to_api

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = [REPO_ROOT / "workflows" / "hybrid_diversity.json", REPO_ROOT / "workflows" / "dt_visualization.json"]
OUR_NODES = {"DistilleryHybridSampler", "DistillerySplitSigmasAtStudentLevel", "DistilleryDTCollect",
             "DistilleryDTGrid"}
HYBRID_WIDGETS = ["seed", "base_cfg", "base_sampler", "base_scheduler", "base_total_steps", "base_steps",
                  "student_cfg", "student_sampler", "student_preset", "student_timesteps", "student_steps",
                  "dt_max_images"]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def prepare(comfy, prompt: dict, tmp_path: Path, size: int = 64, batch: int = 2) -> dict:
    """Tiny checkpoint, a small LoRA for every LoRA the graph names, small latents."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = comfy_harness.TINY_SD15_NAME
        elif kind in ("LoraLoader", "LoraLoaderModelOnly"):
            if not (comfy.models_dir / "loras" / inputs["lora_name"]).exists():
                comfy.link_model("loras", make_lora(tmp_path / inputs["lora_name"]), name=inputs["lora_name"])
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
            inputs["batch_size"] = min(int(inputs["batch_size"]), batch)
    return prompt


def texts(entry: dict, node_id: str) -> list[str]:
    return list((entry.get("outputs") or {}).get(node_id, {}).get("text", []))


# --------------------------------------------------------------------------- registration and files

def test_workflow_files_are_ui_format_with_notes():
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        assert wf["version"] == 0.4
        types = {n["type"] for n in wf["nodes"]}
        assert "Note" in types and types & OUR_NODES, path.name
        ids = {n["id"] for n in wf["nodes"]}
        assert all(link[1] in ids and link[3] in ids for link in wf["links"])


def test_hybrid_nodes_in_object_info(comfy):
    info = comfy.object_info()
    missing = OUR_NODES - set(info)
    assert not missing, f"not registered: {missing}\n{comfy.log_tail()}"
    for node_id in OUR_NODES:
        assert info[node_id]["category"] == "Distillery/sampling"
        assert info[node_id]["python_module"].startswith("custom_nodes.")
    hybrid = info["DistilleryHybridSampler"]
    assert hybrid["input_order"]["required"] == [
        "base_model", "base_positive", "base_negative", "student_model", "latent_image", *HYBRID_WIDGETS]
    assert hybrid["input_order"]["optional"] == ["student_positive", "student_negative", "vae",
                                                 "student_sampler_override"]
    assert hybrid["output"] == ["LATENT", "IMAGE", "STRING"]
    assert info["DistillerySplitSigmasAtStudentLevel"]["output"] == ["SIGMAS", "SIGMAS", "STRING"]
    assert info["DistilleryDTCollect"]["output"] == ["SAMPLER", "DISTILLERY_DT"]
    assert info["DistilleryDTGrid"]["output"] == ["IMAGE"]


# --------------------------------------------------------------------------- the workflows run

def test_hybrid_diversity_workflow_runs(comfy, tmp_path):
    prompt = prepare(comfy, ui_to_api(json.loads(WORKFLOWS[0].read_text()), comfy.object_info()), tmp_path)
    entry = comfy.run(prompt, timeout=900)
    saved = comfy.output_files(entry)
    assert {p.name.split("_0")[0] for p in saved} == {"distillery_hybrid", "distillery_student_only"}
    report = texts(entry, "6")
    assert report and "hand-off at the student's level t=749" in report[0], entry.get("outputs")
    assert "10 base + 3 student = 13" in report[0]  # 5 guided base steps + 3 student steps
    assert texts(entry, "10") == report  # the STRING output, shown by PreviewAny
    alone = texts(entry, "11")
    assert alone and "the student runs its whole schedule" in alone[0] and "= 4 (" in alone[0]
    # the DT grid (PreviewImage, temp): 8 rows (5 base + 3 student steps), 2 columns
    preview = entry["outputs"]["9"]["images"][0]
    grid = comfy.base_dir / "temp" / preview.get("subfolder", "") / preview["filename"]
    width, height = png_size(grid)
    assert height > 8 * 48 and width > 2 * 48, (width, height)
    assert comfy_harness.lora_key_warnings(comfy.log_text()) == []


def test_dt_visualization_workflow_runs(comfy, tmp_path):
    prompt = prepare(comfy, ui_to_api(json.loads(WORKFLOWS[1].read_text()), comfy.object_info()), tmp_path)
    entry = comfy.run(prompt, timeout=900)
    saved = {p.name.split("_0")[0]: p for p in comfy.output_files(entry)}
    assert set(saved) == {"distillery_dt_grid", "distillery_dt_final"}, entry.get("outputs")
    width, height = png_size(saved["distillery_dt_grid"])
    assert height > 8 * 48 and width > 2 * 48, (width, height)
    report = texts(entry, "23")
    assert report and "t=749" in report[0] and "base: 5 step(s)" in report[0]


def test_snap_is_reported_by_the_node(comfy):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_harness.TINY_SD15_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DistilleryHybridSampler", "inputs": {
            "base_model": ["1", 0], "base_positive": ["2", 0], "base_negative": ["2", 0],
            "student_model": ["1", 0], "latent_image": ["3", 0], "seed": 5, "base_cfg": 2.0,
            "base_sampler": "euler", "base_scheduler": "simple", "base_total_steps": 10, "base_steps": 1,
            "student_cfg": 1.0, "student_sampler": "tcd", "student_preset": "custom",
            "student_timesteps": "999,749,499,249", "student_steps": 4, "dt_max_images": 1}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "snap"}},
    }
    entry = comfy.run(g, timeout=600)
    report = texts(entry, "4")[0]
    # one step of the 10-step grid ends at t=899; the nearest student level is 749
    assert "requested at t=899 (base_steps=1 of 10), snapped to the student's level t=749" in report, report
    assert "base: 3 step(s) over t = 999, 899, 799, 749" in report
    with pytest.raises(comfy_harness.ComfyError, match="strictly decreasing"):
        bad = json.loads(json.dumps(g))
        bad["4"]["inputs"]["student_timesteps"] = "499,999"
        comfy.queue(bad)


# --------------------------------------------------------------------------- the real frontend

FRONTEND_CHECK = r"""
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, ...files] = process.argv.slice(1);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.addInitScript(() => {  // every toast shown (a workflow that fails the zod schema gets one)
    window.__toasts = [];
    const seen = new WeakSet();
    new MutationObserver(() => {
      for (const el of document.querySelectorAll('.p-toast-message')) {
        if (!seen.has(el)) { seen.add(el); window.__toasts.push(el.innerText.replace(/\s+/g, ' ').trim()); }
      }
    }).observe(document, { childList: true, subtree: true });
  });
  await page.goto(url, { waitUntil: 'domcontentloaded', timeout: 90000 });
  await page.waitForSelector('canvas#graph-canvas', { timeout: 90000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 90000 });
  await page.keyboard.press('Escape');
  const results = {};
  for (const file of files) {
    const wf = JSON.parse(fs.readFileSync(file, 'utf8'));
    const toastsBefore = await page.evaluate(() => window.__toasts.length);
    results[file] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const known = window.LiteGraph.registered_node_types;
      const types = window.app.graph._nodes.map(n => n.type);
      const prompt = (await window.app.graphToPrompt()).output;
      return { types, missing: types.filter(t => !(t in known)), nodes: window.app.graph._nodes.length, prompt };
    }, wf);
    await page.waitForTimeout(400);  // toasts are added after the load resolves
    results[file].toasts = await page.evaluate((n) => window.__toasts.slice(n), toastsBefore);
    await page.$$eval('.p-toast-close-button', (els) => els.forEach((e) => e.click())).catch(() => {});
  }
  console.log(JSON.stringify(results));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
"""


def test_workflows_load_in_the_real_frontend(comfy, comfy_dir):
    browser_dir = Path(os.environ.get("COMFYUI_BROWSER_DIR", comfy_dir / "browser"))
    if shutil.which("node") is None or not (browser_dir / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs node and playwright-core in COMFYUI_BROWSER_DIR (default <comfyui>/browser)")
    proc = subprocess.run(["node", "-e", FRONTEND_CHECK, comfy.url, *map(str, WORKFLOWS)], cwd=str(browser_dir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    info = comfy.object_info()
    for path in WORKFLOWS:
        got = results[str(path)]
        wf = json.loads(path.read_text())
        assert got["missing"] == [], f"{path.name}: missing nodes {got['missing']}"
        assert got["toasts"] == [], f"{path.name}: {got['toasts']}"  # e.g. "Invalid workflow against zod schema"
        assert sorted(got["types"]) == sorted(n["type"] for n in wf["nodes"])
        ours = ui_to_api(wf, info)
        for node_id, node in ours.items():
            if node["class_type"] in OUR_NODES:
                theirs = got["prompt"][node_id]
                assert theirs["class_type"] == node["class_type"]
                assert theirs["inputs"] == node["inputs"], (path.name, node_id)


# --------------------------------------------------------------------------- shared weights, noise once

SHARED_WEIGHTS_CHECK = comfy_harness.PACK_IN_COMFY + r"""
import gc
ckpt = sys.argv[3]
from distillery_pack.nodes import hybrid
import comfy.model_base, comfy.model_management as mm, comfy.sample, comfy.samplers, comfy.sd

def diffusion_models():
    return [o for o in gc.get_objects() if isinstance(o, comfy.model_base.BaseModel)]

base, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
g = torch.Generator().manual_seed(0)
lora = {key + ".lora_down.weight": torch.randn(4, 320, generator=g) * 0.3,
        key + ".lora_up.weight": torch.randn(320, 4, generator=g) * 0.3, key + ".alpha": torch.tensor(4.0)}
student, _ = comfy.sd.load_lora_for_models(base, clip, lora, 1.0, 0.0)  # what LoraLoader(ModelOnly) does
pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
latent = {"samples": torch.zeros(1, 4, 8, 8)}
models_before = len(diffusion_models())
param_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
bytes_before = param_bytes(base.model)

def run(student_model, base_steps, student_sampler="x0_renoise", student_cfg=1.0):
    # base grid: simple x 8 = 999, 874, 749, ...; base_steps 2 hands off at t=749
    return hybrid.run_hybrid(base, pos, neg, 4.0, student_model, pos, neg, student_cfg, latent, 3, "euler",
                             "simple", 8, base_steps, student_sampler, "dmd2_4step", "", 4, 1)

base_only = run(base, 8)[0]["samples"]
out, plan, report, collector = run(student, 2)
checks = {
    "student_shares_model": bool(student.is_clone(base)) and student.model is base.model,
    "diffusion_models_before_after": [models_before, len(diffusion_models())],
    "loaded_entries_for_shared_model": len([m for m in mm.current_loaded_models if m.model.model is base.model]),
    "param_bytes_before_after": [bytes_before, param_bytes(base.model)],
    "backup_only_lora_keys": set(student.backup) <= set(student.patches),
    "report": report, "dt_stages": collector.stages, "dt_records": len(collector.records),
}
checks["base_unchanged_after_lora_run"] = float((run(base, 8)[0]["samples"] - base_only).abs().max())
same = run(base, 2, "ddim", 4.0)[0]["samples"]  # student = base, CFG 4, Euler in both stages
noise = comfy.sample.prepare_noise(latent["samples"], 3)
ref = comfy.sample.sample_custom(base, noise, 4.0, comfy.samplers.sampler_object("euler"),
                                 plan.merged_sigmas().float(), pos, neg, latent["samples"], seed=3)
checks["merged_rel_diff"] = float((same - ref).abs().max() / ref.abs().max())
checks["lora_changes_output"] = float((out["samples"] - same).abs().max())
print(json.dumps(checks))
"""


def test_lora_student_shares_the_base_weights_and_noise_is_added_once(comfy_dir, tiny_sd15_checkpoint):
    proc = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", SHARED_WEIGHTS_CHECK, str(comfy_dir),
                           str(REPO_ROOT), str(tiny_sd15_checkpoint)], cwd=str(comfy_dir), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # one diffusion model, one loaded entry, the same parameter bytes: the LoRA student is the base patched in
    # place (ComfyUI backs up only the LoRA's keys), never a second copy
    assert r["student_shares_model"], r
    assert r["diffusion_models_before_after"][0] == r["diffusion_models_before_after"][1] == 1, r
    assert r["loaded_entries_for_shared_model"] == 1, r
    assert r["param_bytes_before_after"][0] == r["param_bytes_before_after"][1], r
    assert r["backup_only_lora_keys"], r
    # the base stage after a LoRA stage sees the plain base again
    assert r["base_unchanged_after_lora_run"] == 0.0, r
    # noise once: base (2 guided Euler steps) + student = base (Euler) == one Euler run on the merged schedule
    assert r["merged_rel_diff"] < 1e-5, r
    assert r["lora_changes_output"] > 1e-3, r
    assert r["dt_stages"] == ["base", "student"] and r["dt_records"] == 5, r
    assert "t=749" in r["report"] and "4 base + 3 student = 7" in r["report"], r
