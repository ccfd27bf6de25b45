"""`distillery train` on a single-file checkpoint (skips without COMFYUI_DIR): ComfyUI's loader reads the
tiny SD1.5 checkpoint, the DMD2 student trains with the GAN term on a folder of images, and the LoRA it writes
carries ComfyUI's keys for every adapted layer. Runs with ComfyUI's interpreter (it has ComfyUI's
requirements), the package imported from this checkout through a `comfyui_distillery` link."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def student_card(path):
    """The LoRA's student card, read the way the pack reads it (imported here: collecting needs no pack)."""
    from comfyui_distillery.jobs.students import student_card as read

    return read(path)


def test_train_a_single_file_checkpoint_with_comfyuis_loader(comfy_dir, tiny_sd15_checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "comfyui_distillery").symlink_to(REPO_ROOT, target_is_directory=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    out = tmp_path / "student.safetensors"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkg"), OMP_NUM_THREADS="1")
    env.pop("COMFYUI_DIR", None)  # the flag alone must be enough
    argv = [comfy_harness.comfy_python(comfy_dir), "-m", "comfyui_distillery.cli", "train", "--method", "dmd2",
            "--model", str(tiny_sd15_checkpoint), "--comfyui", str(comfy_dir), "--prompts",
            str(tmp_path / "prompts.txt"), "--resolution", "64", "--timesteps", "999,499", "--steps", "2",
            "--batch-size", "1", "--rank", "4", "--update-ratio", "1", "--real-images", str(photos),
            "--gan-weight", "0.01", "--log-every", "1", "--run-dir", str(tmp_path / "run"), "--out", str(out),
            "--quiet"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"gan/student", "gan/critic"} <= {k for r in records for k in r}
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8:8 + header_len])
    assert set(header.pop("__metadata__")) == {"distillery.card"}  # one JSON card, no flat keys
    card = student_card(out)
    assert card is not None and card.method == "dmd2" and card.task == "comfy", card
    assert card.timesteps == [999, 499] and card.sampler == "x0_renoise" and card.steps_trained == 2
    assert all(k.startswith("lora_unet_") for k in header)
    assert sum(k.endswith(".alpha") for k in header) == 65  # every adapted layer, as the ComfyUI job's LoRA

    # without --comfyui (and no ComfyUI importable) a single file is one clear line
    argv_no = [a for a in argv if a not in ("--comfyui", str(comfy_dir))]
    done = subprocess.run(argv_no, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "give --comfyui /path/to/ComfyUI" in done.stderr, done.stderr[-2000:]
