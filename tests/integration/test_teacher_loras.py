"""The teacher is what the user samples: a checkpoint with their LoRA stack (skips without COMFYUI_DIR).

A "style" LoRA for the tiny SD1.5 checkpoint is made from a first short run's student (its up-projections
scaled so it visibly changes the model). Then, in ComfyUI's own Python:
* the task built with the LoRA stack predicts exactly what ComfyUI's LoraLoader-patched MODEL predicts
  (the same patches, merged once into the frozen base) and not what the bare checkpoint predicts;
* `distillery train --teacher-lora FILE:MODEL:CLIP` trains on it, and the student's card lists the stack.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

import comfy_harness
from comfyui_distillery.jobs.students import student_card

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

COMPARE = textwrap.dedent('''
    import json, sys, torch
    ckpt, lora_path, comfy_dir = sys.argv[1:4]
    from comfyui_distillery.api import checkpoint_file_task
    lora = {"name": "style.safetensors", "path": lora_path, "strength_model": 0.8, "strength_clip": 1.0}
    plain = checkpoint_file_task(ckpt, ["a cat"], comfyui=comfy_dir, resolution=64)
    styled = checkpoint_file_task(ckpt, ["a cat"], comfyui=comfy_dir, resolution=64, loras=[lora])
    import comfy.model_management as mm, comfy.sd, comfy.utils
    patcher, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)
    reference, _ = comfy.sd.load_lora_for_models(patcher, clip, comfy.utils.load_torch_file(lora_path), 0.8, 1.0)
    mm.load_model_gpu(reference)  # ComfyUI applies the patches as it does before sampling
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=g) * 3
    sigma = torch.tensor([2.5])
    cond = {k: v[:1] for k, v in styled.cond_bank.items()}
    with torch.no_grad():
        ours = styled.base.model.apply_model(x, sigma, transformer_options={}, **cond)
        theirs = reference.model.apply_model(x, sigma, transformer_options={}, **cond)
        bare = plain.base.model.apply_model(x, sigma, transformer_options={},
                                            **{k: v[:1] for k, v in plain.cond_bank.items()})
    print(json.dumps({"vs_comfy": float((ours - theirs).abs().max()), "vs_bare": float((ours - bare).abs().max()),
                      "scale": float(bare.abs().max()),
                      "cond_changed": float((styled.cond_bank["c_crossattn"] - plain.cond_bank["c_crossattn"]).abs().max())}))
''')


def _run(argv, env, cwd):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_a_teacher_with_a_lora_stack_is_the_patched_model(comfy_dir, tiny_sd15_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "comfyui_distillery").symlink_to(REPO_ROOT, target_is_directory=True)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkg"), OMP_NUM_THREADS="1")
    python = comfy_harness.comfy_python(comfy_dir)
    common = ["--model", str(tiny_sd15_checkpoint), "--comfyui", str(comfy_dir), "--prompts",
              str(tmp_path / "prompts.txt"), "--resolution", "64", "--timesteps", "999,499", "--steps", "2",
              "--batch-size", "1", "--rank", "4", "--update-ratio", "1", "--quiet"]
    # a LoRA in ComfyUI's keys for this checkpoint: a first run's student, made strong
    first = tmp_path / "first.safetensors"
    _run([python, "-m", "comfyui_distillery.cli", "train", *common, "--run-dir", str(tmp_path / "run0"),
          "--out", str(first)], env, tmp_path)
    state = load_file(str(first))
    gen = torch.Generator().manual_seed(0)
    style = {k: (torch.randn(v.shape, generator=gen) * 0.05 if k.endswith("lora_up.weight") else v)
             for k, v in state.items()}
    style_path = tmp_path / "style.safetensors"
    save_file(style, str(style_path))

    done = _run([python, "-c", COMPARE, str(tiny_sd15_checkpoint), str(style_path), str(comfy_dir)], env, tmp_path)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["vs_bare"] > 1e-3 * found["scale"], found  # the LoRA changes the teacher
    assert found["vs_comfy"] <= 1e-4 * found["scale"], found  # into exactly what ComfyUI samples
    assert found["cond_changed"] == 0.0  # a UNet-only LoRA leaves the text encoder alone

    out = tmp_path / "student.safetensors"
    done = _run([python, "-m", "comfyui_distillery.cli", "train", *common, "--teacher-lora", f"{style_path}:0.8:1",
                 "--run-dir", str(tmp_path / "run1"), "--out", str(out)], env, tmp_path)
    card = student_card(out)
    assert card.teacher_loras == [{"name": "style.safetensors", "strength_model": 0.8, "strength_clip": 1.0}], card
    assert card.steps_trained == 2 and card.base_checkpoint == tiny_sd15_checkpoint.name
