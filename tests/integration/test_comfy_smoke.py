"""Smoke tests: a real ComfyUI server runs txt2img on the tiny SD1.5 checkpoint."""
from __future__ import annotations

import random

import pytest

import comfy_harness

pytestmark = pytest.mark.integration


def test_txt2img_64px_one_step(comfy):
    assert "CheckpointLoaderSimple" in comfy.object_info("CheckpointLoaderSimple")
    entry = comfy.run(comfy_harness.txt2img_prompt(filename_prefix="smoke_txt2img"), timeout=300)
    files = comfy.output_files(entry)
    assert len(files) == 1, entry.get("outputs")
    assert files[0].is_file() and files[0].stat().st_size > 0
    assert comfy.view(files[0].name)[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_loader_maps_unet_keys(comfy, tmp_path):
    # A kohya-style rank-4 LoRA on one attention projection of the tiny UNet.
    rng = random.Random(0)
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = comfy_harness.write_safetensors(tmp_path / "smoke_lora.safetensors", {
        base + ".lora_down.weight": ([4, 320], [rng.gauss(0, 0.01) for _ in range(4 * 320)]),
        base + ".lora_up.weight": ([320, 4], [rng.gauss(0, 0.01) for _ in range(320 * 4)]),
        base + ".alpha": ([], [4.0]),
    })
    comfy.link_model("loras", lora)
    prompt = comfy_harness.txt2img_prompt(lora_name=lora.name, filename_prefix="smoke_lora", seed=7)
    entry = comfy.run(prompt, timeout=300)
    assert len(comfy.output_files(entry)) == 1
    assert comfy_harness.lora_key_warnings(comfy.log_text()) == []


def test_pack_imports_without_failure(comfy):
    log = comfy.log_text()
    assert not comfy_harness.custom_node_import_failed(log, "ComfyUI-Distillery"), log[-6000:]
