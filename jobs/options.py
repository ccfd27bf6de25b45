"""From what a user types (node widgets, HTTP) to a job config and a method's options. Pure Python.

The node exposes one set of settings for every method (student timesteps, guidance); each method names
them its own way, so they are translated here, once:

    dmd2:  timesteps -> student_timesteps,  guidance -> guidance_scale (teacher CFG in the DM loss)
    sid:   timesteps -> student_timesteps,  guidance -> kappa (SiD-LSG scale)
    tcd:   timesteps -> sample_steps (= how many),  guidance -> guidance_max (CFG range upper end)

A method added later gets `student_timesteps` and `guidance_scale`; options it does not take are dropped
with a note in the job log rather than failing the job (see worker.make_method_lenient).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

CANDIDATE_METHODS = ("dmd2", "sid", "tcd")
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,100}$")

# TrainConfig fields a job config may set (the rest keep the engine's defaults)
TRAIN_FIELDS = ("steps", "batch_size", "student_lr", "critic_lr", "lora_rank", "seed", "preview_every",
                "checkpoint_every", "log_every", "keep_checkpoints", "mixed_precision", "warmup_steps",
                "grad_clip", "gradient_checkpointing", "ema_decay", "lr_schedule", "grad_accum")


def available_methods() -> list[str]:
    """The method names trainers.api.make_method accepts now (sid / tcd appear once they exist)."""
    from ..trainers import api

    found = []
    for name in CANDIDATE_METHODS:
        try:
            api.make_method(name)
        except ValueError as err:
            if str(err).startswith(f"method={name!r}"):
                continue
        except (ImportError, TypeError):
            continue
        found.append(name)
    return found or ["dmd2"]


def parse_prompts(text: str | None, file_text: str | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    prompts = []
    for source in (text or "", file_text or ""):
        for line in source.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    return prompts


def read_prompts_file(path: str, base_dirs: list[str] | tuple = ()) -> str:
    """The text of a prompts file: an absolute path, or relative to one of base_dirs (e.g. ComfyUI's input)."""
    path = (path or "").strip().strip('"').strip("'")
    if not path:
        return ""
    candidates = [Path(path).expanduser()] if Path(path).expanduser().is_absolute() else \
        [Path(d) / path for d in base_dirs] + [Path(path)]
    for candidate in candidates:
        if candidate.is_file():
            if candidate.stat().st_size > 20_000_000:
                raise ValueError(f"prompts_file={path!r} is larger than 20 MB; use one prompt per line")
            return candidate.read_text(encoding="utf-8", errors="replace")
    raise ValueError(f"prompts_file={path!r}: no such file (looked in: "
                     f"{', '.join(str(c) for c in candidates)})")


def resolve_folder(path: str, base_dirs: list[str] | tuple = (), field: str = "real_images_folder") -> str | None:
    """A folder given as an absolute path or relative to one of base_dirs (e.g. ComfyUI's input); None if empty."""
    path = (path or "").strip().strip('"').strip("'")
    if not path:
        return None
    candidates = [Path(path).expanduser()] if Path(path).expanduser().is_absolute() else \
        [Path(d) / path for d in base_dirs] + [Path(path)]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    raise ValueError(f"{field}={path!r}: no such folder (looked in: {', '.join(str(c) for c in candidates)})")


def folder_signature(folder: str) -> str:
    """Names, sizes and times of a folder's files: a job trains anew when the images change."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def check_lora_name(name: str) -> str:
    """A file name for models/loras/ (".safetensors" is appended when missing)."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not LORA_NAME.match(name) or ".." in name:
        raise ValueError(f"lora_name={name!r}: use letters, digits, spaces, '-', '_' and '.', "
                         f"no folders (it is written into models/loras/)")
    return name + ".safetensors"


def parse_timesteps_text(text: str) -> list[int | float]:
    from ..sampling.timesteps import parse_timesteps

    return parse_timesteps(text, discrete=False, field="student_timesteps")


def method_options(method: str, timesteps, guidance: float, gan_weight: float = 0.0) -> dict:
    """The method's own option names for the node's shared settings."""
    steps = parse_timesteps_text(timesteps) if isinstance(timesteps, str) else list(timesteps)
    guidance = float(guidance)
    gan = {"gan_generator_weight": float(gan_weight)} if gan_weight else {}
    if method == "dmd2":
        return {"student_timesteps": steps, "guidance_scale": guidance, **gan}
    if method == "sid":
        return {"student_timesteps": steps, "kappa": guidance, **gan}
    if method == "tcd":
        return {"sample_steps": len(steps), "guidance_max": guidance, "guidance_min": min(2.0, guidance)}
    return {"student_timesteps": steps, "guidance_scale": guidance}


def fingerprint(config: dict) -> str:
    """A stable hash of what a job trains (not when or where it was asked for)."""
    volatile = {"id", "created", "fingerprint"}
    clean = {k: v for k, v in config.items() if k not in volatile}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:20]


def comfy_job_config(*, method: str, checkpoint: str, checkpoint_path: str, prompts: list[str], steps: int,
                     batch_size: int, learning_rate: float, lora_rank: int, timesteps: str, guidance: float,
                     resolution: int, lora_name: str, lora_path: str, seed: int = 0, preview_every: int = 100,
                     checkpoint_every: int = 200, comfy_root: str | None = None, device: str = "cpu",
                     negative_prompt: str = "", real_images: str | None = None, gan_weight: float = 0.0) -> dict:
    """The config.json of a job that distills a ComfyUI checkpoint."""
    if not prompts:
        raise ValueError("prompts: give at least one prompt (one per line), or a prompts file")
    from ..trainers.real_images import check_use  # torch: not at ComfyUI start-up

    check_use(method, bool(real_images), gan_weight, "real_images_folder", "gan_weight")
    if steps < 1 or batch_size < 1 or lora_rank < 1:
        raise ValueError("steps, batch_size and lora_rank must be >= 1")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate}: must be > 0")
    if resolution < 64 or resolution % 64:
        raise ValueError(f"resolution={resolution}: use a multiple of 64 (512 for SD1.5, 1024 for SDXL)")
    config = {
        "version": 1,
        "name": lora_name[: -len(".safetensors")] if lora_name.endswith(".safetensors") else lora_name,
        "method": method,
        "method_options": method_options(method, timesteps, guidance, gan_weight),
        "task": {"kind": "comfy_checkpoint", "checkpoint": checkpoint, "checkpoint_path": checkpoint_path,
                 "prompts": prompts, "negative_prompt": negative_prompt, "resolution": int(resolution),
                 "guidance": float(guidance)},
        "train": {"steps": int(steps), "batch_size": int(batch_size), "student_lr": float(learning_rate),
                  "critic_lr": float(learning_rate), "lora_rank": int(lora_rank), "seed": int(seed),
                  "preview_every": int(preview_every), "checkpoint_every": int(checkpoint_every),
                  "log_every": max(1, int(steps) // 1000)},
        "output": {"lora_name": lora_name, "lora_path": lora_path},
        "comfy": {"root": comfy_root},
        "device": device,
    }
    if real_images:
        config["task"].update(real_images=real_images, real_images_signature=folder_signature(real_images))
    config["fingerprint"] = fingerprint(config)
    return config
