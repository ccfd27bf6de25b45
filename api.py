"""The Python API: build a task and a method, train, and export the student LoRA with its metadata.

    from comfyui_distillery import api
    result = api.distill(api.make_task("digits"), api.make_method("dmd2", student_timesteps="999,749,499,249"),
                         api.TrainConfig(steps=2000, run_dir="runs/digits-dmd2"), lora_path="digits_dmd2.safetensors")

Task dispatch lives here, above the layers it picks from: the offline worlds (worlds/), a diffusers folder
(trainers/diffusers_task.py) and a single-file checkpoint, or a diffusion model with its text encoders and VAE, through
ComfyUI's loaders (comfy_backend.py).
The trainers never import those; the rest (make_method, distill, export_student, TrainConfig, Trainer,
TrainingDiverged) is trainers.api's, re-exported.
"""

from __future__ import annotations

from pathlib import Path

from .trainers.api import (TrainConfig, Trainer, TrainingDiverged, distill, export_student,  # noqa: F401
                           make_method)  # re-exported
from .trainers.spec import WORLDS, RunSpec


def make_task(model: str, **options):
    """'gmm' (analytic mixture), 'digits' (tiny image world), a diffusers model folder, or a single-file
    checkpoint (.safetensors, read by ComfyUI's loader: options as checkpoint_file_task's, which also takes a
    diffusion-model file with its text_encoders and vae)."""
    if model in WORLDS and options.get("real_images") is not None:
        raise ValueError(f"real_images: the built-in {model} world brings its own real data; "
                         f"real_images is for your own model (a diffusers folder)")
    options = {k: v for k, v in options.items() if not (k == "real_images" and v is None)}
    if model == "gmm":
        from .worlds.tasks import GaussianMixtureTask

        return GaussianMixtureTask(**options)
    if model == "digits":
        from .worlds.tasks import DigitsTask

        return DigitsTask(**options)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model={model!r}: no such file or folder; give a diffusers folder, "
                                f"a .safetensors checkpoint, or one of the built-in worlds: gmm, digits")
    if path.is_file():
        return checkpoint_file_task(path, **options)
    from .trainers.diffusers_task import diffusers_task

    return diffusers_task(path, **options)


def checkpoint_file_task(path, prompts=None, comfyui=None, resolution=None, real_images=None, negative="",
                         device=None, phase=lambda p: None, loras=(), text_encoders=(), clip_type=None, vae=None):
    """A .safetensors / .ckpt checkpoint through ComfyUI's loader (comfy_backend.py; ComfyUI imported there); with
    `text_encoders` (paths, loaded together with ComfyUI's CLIP type `clip_type`) and `vae` (a path), `path` is a
    diffusion-model file and the three are loaded as ComfyUI's UNETLoader, CLIP loaders and VAELoader do.
    `comfyui`: a ComfyUI checkout to import it from, when it is not importable already."""
    what = "a diffusion-model file" if text_encoders else "a single-file checkpoint"
    if not prompts:
        raise ValueError(f"model={str(path)!r} is {what}: give the prompts to distill it on")
    if not comfyui:
        try:
            import comfy.sd  # noqa: F401  (already importable: run from inside a ComfyUI checkout)
        except ImportError:
            raise ValueError(f"model={str(path)!r} is {what}, which ComfyUI's loader reads: "
                             f"give --comfyui /path/to/ComfyUI (or set COMFYUI_DIR), or convert it to a "
                             f"diffusers folder") from None
    from .comfy_backend import checkpoint_task

    task = checkpoint_task(str(path), prompts, resolution=resolution or 512, negative=negative,
                           real_images=real_images, comfy_root=comfyui, device=device, phase=phase, loras=loras,
                           text_encoders=list(text_encoders), clip_type=clip_type, vae=vae)
    # the guidance of teacher-made data (TCD): CFG 4.5, or Flux-dev's usual guidance input for such a teacher
    task.default_guidance = 4.5 if task.base.guidance_input is None else 3.5
    return task


def task_from_spec(spec: RunSpec, progress: bool = True, phase=lambda p: None):
    """The task a run spec describes (the job worker and `distillery train` both come here)."""
    teacher, data = spec.teacher, spec.data
    if teacher.kind == "world":
        return make_task(teacher.path, **teacher.options)
    if teacher.kind == "diffusers":
        from .trainers.diffusers_task import diffusers_task

        return diffusers_task(teacher.path, prompts=data.prompts, resolution=data.resolution,
                              real_images=data.real_images, progress=progress, **teacher.options)
    split = teacher.kind == "split"  # a diffusion-model file with its text encoders and VAE
    return checkpoint_file_task(teacher.path, data.prompts, comfyui=spec.comfy_root, resolution=data.resolution,
                                real_images=data.real_images, negative=data.negative_prompt, device=spec.device,
                                phase=phase, loras=teacher.loras,
                                text_encoders=[te["path"] for te in teacher.text_encoders] if split else (),
                                clip_type=teacher.clip_type if split else None,
                                vae=teacher.vae["path"] if split else None)


def card_extras(spec: RunSpec, job: str | None = None, task=None) -> dict:
    """What the student's card records of the run beyond the trainer's own state (`task`: the run's task, for
    the guidance a guidance-distilled student was trained at)."""
    teacher = spec.teacher
    files = None
    if teacher.kind == "split":  # the files by their names in ComfyUI's folders, as the user picked them
        files = {"diffusion_model": teacher.name, "text_encoders": [te["name"] for te in teacher.text_encoders],
                 "clip_type": teacher.clip_type, "vae": teacher.vae["name"]}
    return {"job": job, "base_checkpoint": teacher.name if teacher.kind == "checkpoint" else None,
            "teacher_files": files,
            "teacher_loras": [{k: v for k, v in lora.items() if k != "path"} for lora in teacher.loras],
            "guidance": getattr(task, "trained_guidance", None),
            "resolution": spec.data.resolution, "prompts": len(spec.data.prompts)}


__all__ = ["make_task", "checkpoint_file_task", "task_from_spec", "card_extras", "make_method", "distill",
           "export_student", "TrainConfig", "Trainer", "TrainingDiverged", "WORLDS"]
