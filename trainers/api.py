"""The Python API: build a task and a method, train, and export the student LoRA with its metadata.

    from comfyui_distillery.trainers import api
    result = api.distill(api.make_task("digits"), api.make_method("dmd2", student_timesteps="999,749,499,249"),
                         api.TrainConfig(steps=2000, run_dir="runs/digits-dmd2"), lora_path="digits_dmd2.safetensors")
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .engine import Trainer, TrainConfig, TrainingDiverged  # noqa: F401  (re-exported)
from .lora import model_hash, save_lora

METHODS = ("dmd2", "sid", "tcd")
FORMAT_VERSION = 1


def make_method(name: str, **options):
    name = name.lower()
    if name == "dmd2":
        from .methods.dmd2 import DMD2, DMD2Options

        return DMD2(DMD2Options(**options))
    if name == "sid":
        from .methods.sid import SiD, SiDOptions

        return SiD(SiDOptions(**options))
    if name == "tcd":
        from .methods.tcd import TCD, TCDOptions

        return TCD(TCDOptions(**options))
    raise ValueError(f"method={name!r}: choose one of {', '.join(METHODS)}")


def student_metadata(trainer: Trainer) -> dict:
    method, task = trainer.method, trainer.task
    sampler = method.sampler_metadata()
    base = trainer.roles.base if trainer.roles.base is not None else task.base
    return {
        "distillery.format": FORMAT_VERSION,
        "distillery.method": method.name,
        "distillery.task": task.name,
        "distillery.base_model_hash": model_hash(base),
        "distillery.prediction_type": task.base.schedule.prediction_type,
        "distillery.timesteps": sampler.get("timesteps"),
        "distillery.sampler": sampler.get("sampler"),
        "distillery.gamma": sampler.get("gamma"),
        "distillery.cfg": sampler.get("cfg", 1.0),
        "distillery.steps_trained": trainer.step,
        "distillery.lora_rank": trainer.config.lora_rank,
        "distillery.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_student(trainer: Trainer, path) -> Path:
    """Write the student LoRA (EMA weights if kept) with sampler metadata, atomically."""
    if trainer.roles.mode != "lora":
        raise ValueError("full_finetune students are whole networks, not LoRAs; save them with torch.save")
    params = trainer.roles.trainable["student"]
    export = trainer.student_params_for_export()
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, export):
            p.copy_(e)
    try:
        state = trainer.task.export_lora("student")
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    path = Path(path)
    save_lora(path, state, student_metadata(trainer))
    return path


def distill(task, method, config: TrainConfig, lora_path=None, resume: bool = True, progress: bool = True,
            on_metrics=None) -> dict:
    trainer = Trainer(task, method, config, on_metrics=on_metrics, progress=progress)
    resumed = trainer.resume() if resume else False
    result = trainer.train()
    result["resumed"] = resumed
    result["trainer"] = trainer
    if lora_path is not None:
        if trainer.accelerator.is_main_process:  # the ranks hold the same student; one writes it
            result["lora"] = str(export_student(trainer, lora_path))
        trainer.accelerator.wait_for_everyone()
    return result
