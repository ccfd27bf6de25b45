"""The sampler nodes and the shipped workflows in a real ComfyUI server (skips without COMFYUI_DIR).

Each workflows/*.json (UI format, as the frontend saves it) is converted to the API format here, using the
server's own /object_info for the positional widgets_values, and run end to end on the tiny random
SD1.5-shaped checkpoint (latents shrunk to 64x64 px so a run takes seconds on a CPU). Every LoRA a
workflow names is created as a small valid kohya LoRA on the tiny UNet (a Distillery student's with its card).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("distillery_*.json"))
OUR_NODES = {"DistillerySamplerTCD", "DistillerySamplerX0Renoise", "DistillerySamplerDDIM",
             "DistilleryDistilledTimesteps"}
STUDENT_LOADER = "DistilleryLoadDistilledLoRA"  # the card's sampler and SIGMAS instead of OUR_NODES'
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# --------------------------------------------------------------------------- UI -> API format

def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format (v0.4) workflow to an API prompt, like the frontend's graphToPrompt.

    widgets_values are positional over the node's widget inputs in input_order; an INT with
    control_after_generate carries one extra value (the "fixed" / "randomize" mode) right after it.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        if node["type"] not in object_info:
            raise AssertionError(f"workflow node {node['id']} has type {node['type']!r}, unknown to the server "
                                 f"(a missing node)")
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        inputs = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        pos = 0
        for name in order:
            spec = specs[name]
            if not _is_widget(spec):
                continue
            if pos >= len(values):
                raise AssertionError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
            if name not in inputs:
                inputs[name] = values[pos]
            pos += 1
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                pos += 1
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------- fixtures for the workflows

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def make_lora(path: Path, seed: int = 0, metadata: dict | None = None) -> Path:
    rng = random.Random(seed)
    return comfy_harness.write_safetensors(path, {
        LORA_KEY + ".lora_down.weight": ([4, 320], [rng.gauss(0, 0.01) for _ in range(4 * 320)]),
        LORA_KEY + ".lora_up.weight": ([320, 4], [rng.gauss(0, 0.01) for _ in range(320 * 4)]),
        LORA_KEY + ".alpha": ([], [4.0]),
    }, metadata)


def make_student(path: Path) -> Path:
    """A LoRA with a DMD2 student's card (4 steps, x0 + fresh noise), as a Distillery job writes it."""
    from comfyui_distillery.trainers.card import StudentCard

    card = StudentCard(method="dmd2", sampler="x0_renoise", timesteps=[999, 749, 499, 249],
                       prediction_type="epsilon", lora_rank=4, task="comfy")
    return make_lora(path, seed=1, metadata=card.to_metadata())


def write_png(path: Path, width: int = 64, height: int = 64) -> Path:
    """A small RGB gradient PNG with the standard library only."""
    raw = bytearray()
    for y in range(height):
        raw.append(0)  # filter type 0 for this row
        for x in range(width):
            raw += bytes((x * 255 // width, y * 255 // height, 128))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def prepare(comfy, prompt: dict, tmp_path: Path, size: int = 64) -> dict:
    """Point the prompt at the tiny checkpoint, create the LoRAs / images it names, shrink latents."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = comfy_harness.TINY_SD15_NAME
        elif kind in ("LoraLoader", STUDENT_LOADER):
            target = comfy.models_dir / "loras" / inputs["lora_name"]
            if not target.exists():
                make = make_student if kind == STUDENT_LOADER else make_lora
                comfy.link_model("loras", make(tmp_path / inputs["lora_name"]), name=inputs["lora_name"])
        elif kind == "LoadImage":
            target = comfy.input_dir / inputs["image"]
            if not target.exists():
                write_png(target, size, size)
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
    return prompt


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- tests

def test_workflow_files_are_ui_format_v04():
    assert len(WORKFLOWS) == 5, WORKFLOWS
    for path in WORKFLOWS:
        wf = load_workflow(path)
        assert wf["version"] == 0.4
        types = {n["type"] for n in wf["nodes"]}
        assert "Note" in types, f"{path.name}: no note on the canvas"
        assert types & (OUR_NODES | {STUDENT_LOADER}), path.name
        ids = {n["id"] for n in wf["nodes"]}
        for link in wf["links"]:
            assert link[1] in ids and link[3] in ids


def test_our_nodes_in_object_info(comfy):
    info = comfy.object_info()
    missing = OUR_NODES - set(info)
    assert not missing, f"not registered: {missing}\n{comfy.log_tail()}"
    for node_id in OUR_NODES:
        assert info[node_id]["category"] == "Distillery/sampling"
        assert info[node_id]["python_module"].startswith("custom_nodes.")
    assert info["DistilleryDistilledTimesteps"]["input_order"]["required"] == [
        "model", "preset", "timesteps", "steps", "denoise"]
    assert info["DistillerySamplerTCD"]["output"] == ["SAMPLER"]
    assert info["DistilleryDistilledTimesteps"]["output"] == ["SIGMAS"]
    # the KSampler dropdown switch is off by default
    assert "tcd" not in info["KSampler"]["input"]["required"]["sampler_name"][0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_end_to_end(comfy, path, tmp_path):
    info = comfy.object_info()
    prompt = prepare(comfy, ui_to_api(load_workflow(path), info), tmp_path)
    entry = comfy.run(prompt, timeout=600)
    files = comfy.output_files(entry)
    assert len(files) == 1, entry.get("outputs")
    assert comfy.view(files[0].name)[:8] == b"\x89PNG\r\n\x1a\n"
    assert comfy_harness.lora_key_warnings(comfy.log_text()) == []


def test_workflows_load_in_the_real_frontend(comfy, comfy_dir, tmp_path):
    """Headless Chromium: no missing node, our widgets in order, and the frontend's own API export of each
    workflow equals ours (so the end-to-end runs above ran what the UI would queue)."""
    browser_dir = Path(os.environ.get("DISTILLERY_BROWSER_DIR", comfy_dir / "browser"))
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not Path(chromium).exists() or \
            not (browser_dir / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs node, chromium and playwright-core (DISTILLERY_BROWSER_DIR/node_modules)")
    info = comfy.object_info()
    for path in WORKFLOWS:  # files the workflows name must exist for the combos to accept them
        prepare(comfy, ui_to_api(load_workflow(path), info), tmp_path)
    config = {"url": comfy.url, "chromium": chromium, "playwright_dir": str(browser_dir), "timeout_ms": 180000,
              "workflows": [str(p) for p in WORKFLOWS]}
    (tmp_path / "e2e.json").write_text(json.dumps(config))
    proc = subprocess.run(["node", str(HERE / "sampler_workflows_e2e.cjs"), str(tmp_path / "e2e.json")],
                          capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    assert proc.returncode == 0 and result.get("ok"), (result.get("error"), proc.stderr[-3000:])
    assert result["missing"] == {p.name: [] for p in WORKFLOWS}
    assert result["toasts"] == {p.name: [] for p in WORKFLOWS}  # e.g. "Invalid workflow against zod schema"
    info = comfy.object_info()
    for path in WORKFLOWS:
        ours = ui_to_api(load_workflow(path), info)
        theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                  for k, v in result["prompts"][path.name].items()}
        assert theirs == ours, path.name
        for node_id, widgets in result["widgets"][path.name].items():
            node = next(n for n in load_workflow(path)["nodes"] if str(n["id"]) == str(node_id))
            assert [v for _, v in widgets] == node["widgets_values"], (path.name, node["type"], widgets)


def _graph(sampler_node: dict, sigmas_node: dict, *, split: int | None = None, seed: int = 3) -> dict:
    """API graph: ckpt -> (sampler, sigmas) -> SamplerCustom [-> second SamplerCustom on a split] -> save."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_harness.TINY_SD15_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": sampler_node,
        "5": sigmas_node,
    }
    sigmas = ["5", 0]
    if split is not None:
        g["6"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["5", 0], "step": split}}
        sigmas = ["6", 0]

    def custom(latent, sig, add_noise):
        return {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": add_noise, "noise_seed": seed, "cfg": 1.0, "positive": ["2", 0],
            "negative": ["2", 0], "sampler": ["4", 0], "sigmas": sig, "latent_image": latent}}
    g["7"] = custom(["3", 0], sigmas, True)
    out = ["7", 0]
    if split is not None:
        g["8"] = custom(["7", 0], ["6", 1], False)
        out = ["8", 0]
    g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": out, "vae": ["1", 2]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"dist_{seed}"}}
    return g


def _timesteps(preset="lcm_tcd", timesteps="999,749,499,249", steps=4, denoise=1.0):
    return {"class_type": "DistilleryDistilledTimesteps", "inputs": {
        "model": ["1", 0], "preset": preset, "timesteps": timesteps, "steps": steps, "denoise": denoise}}


@pytest.mark.parametrize("sampler", [
    {"class_type": "DistillerySamplerTCD", "inputs": {"gamma": 0.5}},
    {"class_type": "DistillerySamplerX0Renoise", "inputs": {"lcm_boundary": True}},
    {"class_type": "DistillerySamplerDDIM", "inputs": {"end_on_t0": True}},
], ids=["tcd", "x0_renoise", "ddim"])
def test_samplers_on_split_sigmas_and_basic_scheduler(comfy, sampler):
    # a SplitSigmas first half ends above 0; the second SamplerCustom continues without adding noise
    entry = comfy.run(_graph(sampler, _timesteps(steps=4), split=2, seed=11), timeout=300)
    assert len(comfy.output_files(entry)) == 1
    # any core SIGMAS: karras with denoise < 1 (fractional timesteps)
    basic = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras",
                                                        "steps": 3, "denoise": 0.7}}
    entry = comfy.run(_graph(sampler, basic, seed=12), timeout=300)
    assert len(comfy.output_files(entry)) == 1


def test_bad_input_is_named(comfy):
    tcd = {"class_type": "DistillerySamplerTCD", "inputs": {"gamma": 0.3}}
    with pytest.raises(comfy_harness.ComfyError, match="strictly decreasing"):
        comfy.queue(_graph(tcd, _timesteps("custom", "749,999"), seed=21))
    with pytest.raises(comfy_harness.ComfyError, match="value_bigger_than_max|bigger than max"):
        comfy.queue(_graph({"class_type": "DistillerySamplerTCD", "inputs": {"gamma": 1.5}}, _timesteps(),
                           seed=22))
    # 1000 is a valid flow timestep, so it passes validation; the SD1.5 model refuses it at run time
    with pytest.raises(comfy_harness.ComfyError, match="timesteps: 1000 is out of range"):
        comfy.run(_graph(tcd, _timesteps("custom", "1000,500"), seed=23), timeout=300)


def test_ksampler_tcd_switch(comfy_dir, tiny_sd15_checkpoint, tmp_path_factory):
    env = dict(os.environ, DISTILLERY_KSAMPLER_TCD="1")
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=tmp_path_factory.mktemp("comfy_tcd_switch"),
        custom_nodes=[("ComfyUI-Distillery", REPO_ROOT)], models={"checkpoints": [tiny_sd15_checkpoint]},
        env=env, startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "120")))
    with server:
        names = server.object_info("KSampler")["KSampler"]["input"]["required"]["sampler_name"][0]
        assert "tcd" in names
        select = server.object_info("KSamplerSelect")["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
        assert "tcd" in select
        entry = server.run(comfy_harness.txt2img_prompt(steps=4, sampler_name="tcd", scheduler="simple",
                                                        filename_prefix="ksampler_tcd"), timeout=300)
        assert len(server.output_files(entry)) == 1


BRIDGE_CHECK = comfy_harness.PACK_IN_COMFY + r"""
from distillery_pack import comfy_backend
import comfy.model_sampling as m
from comfy_extras.nodes_model_advanced import LCM, ModelSamplingDiscreteDistilled

def make(base, mixin):
    return type("MS", (base, mixin), {})()

sd3 = make(m.ModelSamplingDiscreteFlow, m.CONST)
sd3.set_parameters(shift=3.0)
cases = {"eps": (make(m.ModelSamplingDiscrete, m.EPS), [999., 749., 499., 249., 0.]),
         "v": (make(m.ModelSamplingDiscrete, m.V_PREDICTION), [999., 500., 1.]),
         "lcm": (make(ModelSamplingDiscreteDistilled, LCM), [999., 759., 499., 19.]),
         "sd3": (sd3, [1000., 750., 500., 1.]),
         "flux": (make(m.ModelSamplingFlux, m.CONST), [1.0, 0.75, 0.5, 0.1])}
grid = {"flux": 1000.0}  # our flow timesteps are on the 0..1000 grid; Flux's own timestep is sigma
out = {}
for name, (ms, ts) in cases.items():
    sch = comfy_backend.schedule_from_model_sampling(ms)
    assert comfy_backend.schedule_from_model_sampling(ms) is sch  # cached
    t, scale = torch.tensor(ts), grid.get(name, 1.0)
    ours = sch.sigmas_from_timesteps([v * scale for v in ts])[:-1]
    theirs = ms.sigma(t).double()
    out[name] = {"prediction": sch.prediction_type, "kind": type(sch).__name__,
                 "sigma_rel": float(((ours - theirs).abs() / theirs).max()),
                 "timestep_abs": float((sch.timestep(theirs)
                                        - scale * ms.timestep(theirs.float()).double()).abs().max())}
print(json.dumps(out))
"""


def test_bridge_matches_real_model_sampling(comfy_dir):
    proc = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", BRIDGE_CHECK, str(comfy_dir),
                           str(REPO_ROOT)], cwd=str(comfy_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"eps": "epsilon", "v": "v_prediction", "lcm": "epsilon", "sd3": "flow", "flux": "flow"}
    for name, prediction in expected.items():
        assert result[name]["prediction"] == prediction, result
        assert result[name]["sigma_rel"] < 1e-6, result  # ComfyUI computes in float32
        assert result[name]["timestep_abs"] < 1e-3, result
