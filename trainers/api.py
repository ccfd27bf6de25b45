"""The Python API: build a task and a method, train, and export the student LoRA with its metadata.

    from comfyui_distillery import api      # the top-level API adds the tasks (worlds, folders, checkpoints)
    result = api.distill(api.make_task("digits"), api.make_method("dmd2", student_timesteps="999,749,499,249"),
                         api.TrainConfig(steps=2000, run_dir="runs/digits-dmd2"), lora_path="digits_dmd2.safetensors")
"""

from __future__ import annotations

import time
from pathlib import Path

from .engine import Trainer, TrainConfig, TrainingDiverged  # noqa: F401  (re-exported)
from .card import StudentCard
from .lora import save_lora
from .registry import make_method, method_names, to_json  # noqa: F401  (re-exported)


def student_card(trainer: Trainer, **extra) -> StudentCard:
    """The student's card from the trainer (method, sampler, schedule, settings); `extra` adds what only the
    caller knows (the job, the teacher's file name, the prompt count)."""
    method, task = trainer.method, trainer.task
    sampler = method.sampler_metadata()
    train = to_json(trainer.config)
    train.pop("run_dir", None)  # where it ran, not what it is
    return StudentCard(
        method=method.name, sampler=sampler["sampler"], timesteps=list(sampler.get("timesteps") or []),
        prediction_type=task.base.schedule.prediction_type, cfg=float(sampler.get("cfg", 1.0)),
        gamma=sampler.get("gamma"), method_options=to_json(method.opt), train=train,
        steps_trained=trainer.step, lora_rank=trainer.config.lora_rank, task=task.name,
        base_model_hash=trainer.base_model_hash, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        experts=sampler.get("experts"), **extra)


def export_student(trainer: Trainer, path, **card_extra) -> Path:
    """Write the student LoRA (EMA weights if kept) with its card, atomically, once."""
    if trainer.roles.mode != "lora":
        raise ValueError("full_finetune students are whole networks, not LoRAs; save them with torch.save")
    with trainer.exported_student():
        card = student_card(trainer, **card_extra)
        if card.experts:  # one file, each expert's keys under its own prefix (card.py: experts)
            state = {}
            for adapter, expert in zip(trainer.method.student_adapters(), card.experts):
                state.update({expert["prefix"] + k: v for k, v in trainer.task.export_lora(adapter).items()})
        else:
            state = trainer.task.export_lora("student")
    path = Path(path)
    save_lora(path, state, card.to_metadata())
    return path


def distill(task, method, config: TrainConfig, lora_path=None, resume: bool = True, progress: bool = True,
            on_metrics=None, card: dict | None = None) -> dict:
    """Train (resuming from run_dir's newest checkpoint unless resume=False) and write the student with its
    card (`card`: what the caller adds to it, e.g. api.card_extras(spec))."""
    trainer = Trainer(task, method, config, on_metrics=on_metrics, progress=progress)
    resumed = trainer.resume() if resume else False
    result = trainer.train()
    result["resumed"] = resumed
    result["trainer"] = trainer
    if lora_path is not None:
        if trainer.accelerator.is_main_process:  # the ranks hold the same student; one writes it
            result["lora"] = str(export_student(trainer, lora_path, **(card or {})))
        trainer.accelerator.wait_for_everyone()
    return result
