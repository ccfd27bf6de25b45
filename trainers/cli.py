"""`distillery train`: distill a model into a few-step LoRA student from the command line.

    distillery train --method dmd2 --model digits --steps 2000 --out digits_dmd2.safetensors
    distillery train --method sid --guidance-mode anti_cfg --guidance 1.5 --model my_model/ --prompts p.txt
    distillery train --method tcd --mode tscd --model my_model.safetensors --comfyui ~/ComfyUI --prompts p.txt
    distillery train --config my_run.json            # same keys as the long options, e.g. {"steps": 2000}

A single-file checkpoint is loaded with ComfyUI's own loader (--comfyui or COMFYUI_DIR: a ComfyUI checkout,
run with a Python that has ComfyUI's requirements); a diffusers folder needs nothing else.
Runs resume from the newest checkpoint in --run-dir unless --no-resume is given. Multi-GPU:
`accelerate launch -m comfyui_distillery.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from .engine import TrainConfig

METHODS = ("dmd2", "sid", "tcd")  # api.METHODS, without importing peft for --help (a test keeps them equal)

# option -> (TrainConfig field, or {method: that method's option}, type, help)
OPTIONS = {
    "steps": ("steps", int, "training iterations"),
    "batch_size": ("batch_size", int, "samples per iteration and process"),
    "lr": ("student_lr", float, "student learning rate"),
    "critic_lr": ("critic_lr", float, "critic (fake score) learning rate"),
    "rank": ("lora_rank", int, "LoRA rank of the student (and critic)"),
    "critic_rank": ("critic_rank", int, "LoRA rank of the critic (default: --rank)"),
    "warmup_steps": ("warmup_steps", int, "linear learning-rate warm-up"),
    "lr_schedule": ("lr_schedule", str, "constant or cosine"),
    "grad_clip": ("grad_clip", float, "max gradient norm (0 = off)"),
    "grad_accum": ("grad_accum", int, "gradient accumulation steps"),
    "mixed_precision": ("mixed_precision", str, "no, bf16 or fp16"),
    "ema": ("ema_decay", float, "EMA decay of the student (0 = off)"),
    "seed": ("seed", int, "random seed"),
    "checkpoint_every": ("checkpoint_every", int, "iterations between checkpoints"),
    "preview_every": ("preview_every", int, "iterations between preview images (0 = off)"),
    "log_every": ("log_every", int, "iterations between metrics lines"),
    "run_dir": ("run_dir", str, "folder for checkpoints, metrics and previews"),
    "timesteps": ({"dmd2": "student_timesteps", "sid": "student_timesteps"}, str,
                  "DMD2 / SiD: student conditioning timesteps, e.g. 999,749,499,249 or 399"),
    "guidance": ({"dmd2": "guidance_scale", "sid": "kappa"}, float,
                 "DMD2: teacher CFG scale in the distillation loss; SiD: the guidance scale kappa"),
    "update_ratio": ({"dmd2": "update_ratio", "sid": "update_ratio"}, int,
                     "DMD2 / SiD: critic (fake-score) updates per student update"),
    "exit_step": ({"dmd2": "exit_step", "sid": "exit_step"}, str,
                  "DMD2 / SiD: uniform (train every step count, the papers' way) or last (a dedicated "
                  "student for exactly --timesteps)"),
    "gan_weight": ({"dmd2": "gan_generator_weight", "sid": "gan_generator_weight"}, float,
                   "DMD2 / SiD: diffusion-GAN weight for the student (needs real images: --real-images, or "
                   "the offline worlds' own)"),
    "guidance_mode": ({"sid": "guidance"}, str, "SiD: lsg, zero_cfg or anti_cfg"),
    "alpha": ({"sid": "alpha"}, float, "SiD: 1.0 for Stable Diffusion, 1.2 for EDM-style models"),
    "mode": ({"tcd": "mode"}, str, "TCD: lcm, tcd, or tscd (Hyper-SD segments)"),
    "gamma": ({"tcd": "gamma"}, float, "TCD: the sampler gamma written into the LoRA"),
    "cfg_min": ({"tcd": "guidance_min"}, float, "TCD: lowest teacher CFG scale drawn per sample"),
    "cfg_max": ({"tcd": "guidance_max"}, float, "TCD: highest teacher CFG scale drawn per sample"),
    "loss": ({"tcd": "loss"}, str, "TCD: huber or l2"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, help="dmd2 (default), sid or tcd")
    parser.add_argument("--model", default=None,
                        help="a diffusers folder / .safetensors file, or a built-in world: digits, gmm")
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line")
    parser.add_argument("--real-images", dest="real_images", default=None,
                        help="folder of your own images (captions as name.txt beside them): the GAN term's "
                             "real data (--gan-weight) and TCD's training data")
    parser.add_argument("--comfyui", default=None,
                        help="a ComfyUI checkout whose loader reads a single-file --model (default: $COMFYUI_DIR)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training resolution in pixels for a diffusers folder (default 512, SDXL 1024)")
    parser.add_argument("--config", default=None, help="JSON file with any of these options")
    parser.add_argument("--out", default=None, help="where to write the student LoRA (.safetensors)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if run-dir has checkpoints")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--full-finetune", action="store_true", default=None,
                        help="train whole copies instead of LoRAs (small models only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, (_, typ, help_text) in OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_text)


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; write one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path}: not UTF-8 text; save it as a plain UTF-8 text file")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file has no prompts; write one prompt per line")
    return prompts


def resolve(args: argparse.Namespace) -> tuple[str, str, TrainConfig, dict, dict]:
    """Merge the config file and the command line (the command line wins) and check everything."""
    settings: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}: not valid JSON ({err})")
        unknown = set(settings) - set(OPTIONS) - {"method", "model", "prompts", "real_images", "resolution",
                                                  "comfyui", "out", "gradient_checkpointing", "full_finetune"}
        if unknown:
            raise ValueError(f"--config {path}: unknown keys {sorted(unknown)}; use {sorted(OPTIONS)}")
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "no_resume", "quiet"):
            settings[key] = value
    method = str(settings.pop("method", None) or "dmd2").lower()
    if method not in METHODS:
        raise ValueError(f"--method {method}: choose one of {', '.join(METHODS)}")
    model = settings.pop("model", None)
    if not model:
        raise ValueError("--model is required: a diffusers folder or .safetensors file, or 'digits' / 'gmm'")
    config_fields, method_options = {}, {}
    task_options = {}
    if settings.get("prompts"):
        task_options["prompts"] = read_prompts(settings.pop("prompts"))
    if settings.get("real_images"):
        task_options["real_images"] = settings.pop("real_images")
    if str(model) not in ("gmm", "digits"):  # the worlds bring their own real images
        from .real_images import check_use

        check_use(method, "real_images" in task_options, float(settings.get("gan_weight") or 0.0),
                  "--real-images", "--gan-weight")
    comfyui = settings.pop("comfyui", None) or os.environ.get("COMFYUI_DIR")
    if Path(str(model)).is_file():  # a single-file checkpoint: ComfyUI's loader reads it
        if not task_options.get("prompts"):
            raise ValueError("--prompts: give a text file of prompts (one per line) to distill the checkpoint on")
        task_options["comfyui"] = comfyui
    if settings.get("resolution") is not None:
        if str(model) in ("gmm", "digits"):
            raise ValueError(f"--resolution: the built-in {model} world has a fixed size; drop --resolution")
        task_options["resolution"] = int(settings.pop("resolution"))
    for key, value in list(settings.items()):
        if key in OPTIONS:
            target = OPTIONS[key][0]
            if isinstance(target, dict):
                if method not in target:
                    flag = "--" + key.replace("_", "-")
                    raise ValueError(f"{flag}: --method {method} does not take it (it is for "
                                     f"{' and '.join(target)}); remove it or choose that method")
                method_options[target[method]] = value
            else:
                config_fields[target] = value
        elif key in ("gradient_checkpointing", "full_finetune"):
            config_fields[key] = bool(value)
    config_fields.setdefault("run_dir", f"runs/{Path(str(model)).stem}-{method}")
    config = TrainConfig(**config_fields).validate()
    return method, model, config, method_options, task_options


def run(args: argparse.Namespace) -> int:
    from ..api import checkpoint_file_task, make_task  # task dispatch (worlds, ComfyUI) lives above trainers/
    from . import api

    method_name, model, config, method_options, task_options = resolve(args)
    method = api.make_method(method_name, **method_options)  # validates its options before loading
    if Path(str(model)).is_file():
        task = checkpoint_file_task(model, **task_options)
        if config.mixed_precision == "no" and args.mixed_precision is None:
            config.mixed_precision = task.mixed_precision  # bf16 weights on a GPU train in bf16
    else:
        if "real_images" in task_options:
            task_options["progress"] = not args.quiet  # the VAE-encoding bar
        task = make_task(model, **task_options)
    out = args.out or str(Path(config.run_dir) / f"{Path(str(model)).stem}_{method_name}.safetensors")
    result = api.distill(task, method, config, lora_path=out, resume=not args.no_resume,
                         progress=not args.quiet)
    if not result["trainer"].accelerator.is_main_process:
        return 0  # `accelerate launch`: rank 0 reports
    print(json.dumps({"lora": result.get("lora"), "steps": result["step"], "resumed": result["resumed"],
                      "run_dir": config.run_dir, "config": dataclasses.asdict(config)}, indent=1))
    return 0
