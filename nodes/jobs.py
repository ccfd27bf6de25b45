"""Training-job nodes (ComfyUI V3): start a distillation in the background, watch, stop, resume, load.

Thin: the job machinery is in ../jobs (unit-tested without ComfyUI); this module turns widgets into a job
config, and a finished student back into MODEL + SAMPLER + SIGMAS.

Start returns at once with a DISTILLERY_JOB handle: the training runs in a worker process of its own,
so the queue stays free for generating. Widget order is the saved-workflow format (widgets_values are
positional): append new inputs at the end, never reorder.
"""

from __future__ import annotations

import logging
import math
import os
import time

from ..jobs import options as jo
from ..jobs import store as st
from ..jobs import students
from ..trainers.registry import build as build_options
from ..trainers.registry import option_info, option_infos
from ._api import io, ui
from .methods import MethodSocket, text_validator, widget
from .run_inputs import ImagesSocket, PromptsSocket, TeacherSocket, validation

log = logging.getLogger("distillery")

CATEGORY = "Distillery/training"
JobHandle = io.Custom("DISTILLERY_JOB")
NO_STUDENTS = "(no distilled LoRAs in models/loras yet)"
AdvancedSocket = io.Custom("DISTILL_TRAINING")


def _runtime():
    from . import job_runtime

    return job_runtime


def _status_line(info: dict) -> str:
    state = info.get("state")
    line = f"job {info.get('id')}: {state}"
    if info.get("steps"):
        line += f", step {info.get('step', 0)}/{info.get('steps')}"
    if info.get("phase") and state in st.ACTIVE:
        line += f" ({info['phase']})"
    if info.get("it_per_s"):
        line += f", {info['it_per_s']:.2f} it/s"
    if info.get("eta_s") and state in st.ACTIVE:
        line += f", ETA {int(info['eta_s'] // 60)}m{int(info['eta_s'] % 60):02d}s"
    if info.get("queue_position"):
        line += f", position {info['queue_position']} in the queue"
    if info.get("stop_requested") and state in st.ACTIVE:
        line += ", stopping"
    if info.get("lora_name") and state == st.COMPLETED:
        line += f"; LoRA: {info['lora_name']}"
    if info.get("reason") and state in st.TERMINAL:
        line += f"\nreason: {info['reason']}"
    return line


def _failure_message(info: dict) -> str:
    tail = info.get("log_tail") or ""
    return (f"Distillery job {info.get('id')} failed: {info.get('reason')}\n--- last lines of its log ---\n{tail}"
            if tail else f"Distillery job {info.get('id')} failed: {info.get('reason')}")


def _job_id(job, job_id: str) -> str:
    if isinstance(job, dict) and job.get("id"):
        return st.check_job_id(job["id"])
    if job_id and job_id.strip():
        return st.check_job_id(job_id.strip())
    raise ValueError("connect a DISTILLERY_JOB or type a job id (the Distillery sidebar lists them)")


# --------------------------------------------------------------------------------------------------
def _train_infos(advanced: bool) -> list:
    from ..trainers.engine import TrainConfig

    return [i for i in option_infos(TrainConfig) if i.node and i.advanced == advanced]


class DistilleryAdvancedTraining(io.ComfyNode):
    """The training settings most runs leave alone, from the same declarations as the CLI's."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryAdvancedTraining",
            display_name="Distillery Advanced Training Settings",
            category=CATEGORY,
            description="Optimizer, precision, memory and logging settings for Start Distillation's 'advanced' input.",
            inputs=[widget(i) for i in _train_infos(advanced=True)],
            outputs=[AdvancedSocket.Output(display_name="advanced")],
        )

    validate_inputs = text_validator(_train_infos(advanced=True))

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        from ..trainers.engine import TrainConfig

        return io.NodeOutput(build_options(TrainConfig, values, owner="the advanced training settings",
                                           partial=True))


class DistilleryStartDistillation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryStartDistillation",
            display_name="Distillery Start Distillation",
            category=CATEGORY,
            description=(
                "Distil a teacher into a few-step LoRA student in the background: the job runs in a worker "
                "process of its own (the queue stays free for generating; a crash or OOM never takes ComfyUI "
                "down) and this node returns at once. Connect a teacher, a method node (Distillery DMD2 / SiD / "
                "TCD) and prompts. The whole run is checked before a job is queued. Re-running the same "
                "settings does not start a second job: it returns the existing one (an interrupted one is "
                "resumed). The student is written to models/loras/<lora_name>.safetensors with its card; load it "
                "with 'Distillery Load Distilled LoRA'."),
            inputs=[
                TeacherSocket.Input("teacher", tooltip="from Distillery Teacher Checkpoint or Teacher Diffusion Model"),
                MethodSocket.Input("method", tooltip="from a method node: Distillery DMD2, SiD or TCD"),
                PromptsSocket.Input("prompts", tooltip="from Distillery Prompts"),
                *[widget(i) for i in _train_infos(advanced=False)],
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64,
                             tooltip="square training resolution in pixels; 0 = the model's own (SD1.5 512, "
                                     "SDXL and DiTs 1024)"),
                io.String.Input("lora_name", default="distillery_student",
                                tooltip="output file in models/loras/ (.safetensors is added)"),
                ImagesSocket.Input("real_images", optional=True, tooltip="from Distillery Real Images (optional)"),
                AdvancedSocket.Input("advanced", optional=True,
                                     tooltip="from Distillery Advanced Training Settings (optional)"),
            ],
            outputs=[JobHandle.Output(display_name="job"), io.String.Output(display_name="job_id")],
            is_output_node=True,
        )

    @classmethod
    def _spec(cls, teacher, method, prompts, resolution, lora_name, real_images=None, advanced=None,
              **train):
        import folder_paths

        rt = _runtime()
        for name, value, key, source in (("teacher", teacher, "path", "Distillery Teacher Checkpoint (or Teacher "
                                                                      "Diffusion Model)"),
                                         ("method", method, "options", "a method node (Distillery DMD2, SiD, TCD)"),
                                         ("prompts", prompts, "prompts", "Distillery Prompts")):
            if not isinstance(value, dict) or key not in value:  # an API prompt can put anything here
                raise ValueError(f"{name}: connect {source}")
        lora_file = jo.check_lora_name(lora_name)
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        images = real_images or {}
        resolution = int(resolution) or native_resolution(teacher.get("family"))
        return jo.RunSpec.build(
            method=method["method"], method_options=method["options"], train={**train, **(advanced or {})},
            teacher=jo.TeacherSpec(kind=teacher.get("kind", "checkpoint"), path=teacher["path"], name=teacher["name"],
                                   family=teacher.get("family"), loras=teacher.get("loras", []),
                                   text_encoders=teacher.get("text_encoders", []), clip_type=teacher.get("clip_type"),
                                   vae=teacher.get("vae")),
            data=jo.DataSpec(prompts=prompts["prompts"], negative_prompt=prompts.get("negative_prompt", ""),
                             resolution=resolution, real_images=images.get("folder"),
                             real_images_signature=images.get("signature")),
            output=jo.OutputSpec(lora_name=lora_file, lora_path=os.path.join(loras_dir, lora_file)),
            device=rt.server_device(), comfy_root=rt.comfy_root())

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return validation(jo.check_lora_name, lora_name)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # re-execute when the job these settings map to changed state (e.g. it failed: start anew)
        try:
            fingerprint = cls._spec(**kwargs).fingerprint()
            manager = _runtime().manager()
            job_id = manager.find_equivalent(fingerprint, states=st.STATES)
            return f"{fingerprint}:{job_id}:{manager.store.status(job_id)['state'] if job_id else ''}"
        except Exception:  # noqa: BLE001 - let execute report the problem
            return float("nan")

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        spec = cls._spec(**kwargs)
        fingerprint = spec.fingerprint()
        manager = _runtime().manager()
        job_id = manager.find_equivalent(fingerprint)
        note = ""
        steps = spec.train["steps"]

        def more_steps(job):  # the same run with more steps is trained further; otherwise None
            return steps if steps > int(manager.get(job).get("steps") or 0) else None

        if job_id is not None and manager.get(job_id).get("state") == st.COMPLETED and more_steps(job_id):
            manager.resume(job_id, steps=steps)
            note = f" (completed earlier: training on to {steps} steps from its last checkpoint)"
        if job_id is None:
            interrupted = manager.find_equivalent(fingerprint, states=(st.INTERRUPTED,))
            if interrupted is not None:
                manager.resume(interrupted, steps=more_steps(interrupted))
                job_id, note = interrupted, " (interrupted earlier: resumed from its last checkpoint)"
        if job_id is None:
            if os.path.exists(spec.output.lora_path):
                raise ValueError(f"lora_name: models/loras/{spec.output.lora_name} already exists; choose "
                                 f"another name (or delete the file) so no student is overwritten")
            for other in manager.list():
                if other.get("state") in (st.QUEUED, *st.ACTIVE) and other.get("lora_name") == spec.output.lora_name:
                    raise ValueError(f"lora_name: job {other['id']} ({other['state']}) already writes "
                                     f"{other['lora_name']}; choose another name")
            job_id = manager.create(spec.to_dict())
            note = " (queued)"
        else:
            note = note or " (same settings as this existing job: not started again)"
        info = manager.get(job_id)
        text = _status_line(info) + note
        handle = {"id": job_id, "lora_name": spec.output.lora_name}
        return io.NodeOutput(handle, job_id, ui=ui.PreviewText(text))


def native_resolution(family: str | None) -> int:
    """The resolution a model family was trained at: 1024 for SDXL-class models and DiTs, else 512."""
    return 1024 if family and any(k in family.upper() for k in ("SDXL", "FLUX", "SD3", "AURA", "HIDREAM",
                                                                 "QWEN", "LUMINA", "CHROMA")) else 512


# --------------------------------------------------------------------------------------------------
def _job_inputs():
    return [JobHandle.Input("job", optional=True, tooltip="from Distillery Start Distillation"),
            io.String.Input("job_id", default="", optional=True,
                            tooltip="or a job id from the Distillery sidebar (used when no job is connected)")]


def _more_steps_input():
    """Resume's new total of steps, within the range the training settings declare for steps."""
    from ..trainers.engine import TrainConfig

    declared = option_info(TrainConfig, "steps")
    return io.Int.Input("steps", default=0, min=0, max=int(declared.max), optional=True,
                        tooltip="0: as the job was; else a new total of training steps, more than it has trained "
                                "(the learning-rate schedule goes on from where it was)")


def _settled(info: dict) -> bool:
    """The job has ended and is not about to run again: a Resume on a job whose worker has not been reaped
    yet leaves it completed / stopped with resume_pending set until it is queued again."""
    return info.get("state") in st.TERMINAL and not info.get("resume_pending")


class DistilleryJobStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryJobStatus",
            display_name="Distillery Job Status",
            category=CATEGORY,
            description=(
                "The state of a distillation job. With wait on, this node waits until the job ends and shows "
                "its progress on ComfyUI's progress bar; cancelling the prompt stops only the waiting (the job "
                "keeps training) unless stop_job_if_cancelled is on. A failed job raises its reason and the "
                "last lines of its log."),
            inputs=[*_job_inputs(),
                    io.Boolean.Input("wait", default=False, tooltip="wait until the job has finished"),
                    io.Boolean.Input("stop_job_if_cancelled", default=False,
                                     tooltip="cancelling the prompt while waiting also stops the job"),
                    io.Int.Input("timeout_minutes", default=0, min=0, max=100_000,
                                 tooltip="stop waiting after this long (0 = no limit); the job goes on")],
            outputs=[JobHandle.Output(display_name="job"), io.String.Output(display_name="status"),
                     io.String.Output(display_name="lora_name")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()  # the job changes outside the graph: always look again

    @classmethod
    def execute(cls, job=None, job_id="", wait=False, stop_job_if_cancelled=False, timeout_minutes=0):
        manager = _runtime().manager()
        jid = _job_id(job, job_id)
        info = manager.get(jid)
        if wait and not _settled(info):
            info = cls._wait(manager, jid, stop_job_if_cancelled, timeout_minutes)
        if info.get("state") == st.FAILED:
            raise RuntimeError(_failure_message(manager.get(jid, log_lines=30)))
        text = _status_line(info)
        lora = info.get("lora_name") if info.get("state") == st.COMPLETED else ""
        return io.NodeOutput({"id": jid, "lora_name": info.get("lora_name")}, text, lora or "",
                             ui=ui.PreviewText(text))

    @classmethod
    def _wait(cls, manager, jid, stop_if_cancelled, timeout_minutes):
        """Poll on the executor thread; ComfyUI's progress bar is driven from here only."""
        import comfy.model_management as mm
        import comfy.utils

        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = None
        deadline = time.monotonic() + timeout_minutes * 60 if timeout_minutes else math.inf
        try:
            while True:
                info = manager.get(jid)
                steps = int(info.get("steps") or 0)
                if steps:
                    if bar is None:
                        bar = comfy.utils.ProgressBar(steps, node_id=node_id)
                    bar.update_absolute(min(int(info.get("step") or 0), steps), steps)  # raises on Cancel
                mm.throw_exception_if_processing_interrupted()
                if _settled(info) or time.monotonic() > deadline:
                    return info
                time.sleep(0.5)
        except mm.InterruptProcessingException:
            if stop_if_cancelled and manager.get(jid).get("state") in (st.QUEUED, *st.ACTIVE):
                manager.stop(jid)
                log.info("distillery: prompt cancelled: job %s asked to stop", jid)
            raise


def _job_action(action: str, job, job_id: str, **options):
    """Stop or resume a job (the manager's method of that name) and report its new status."""
    jid = _job_id(job, job_id)
    try:
        info = getattr(_runtime().manager(), action)(jid, **options)
    except st.JobError as err:
        raise ValueError(str(err)) from None
    text = _status_line(info)
    return io.NodeOutput({"id": jid, "lora_name": info.get("lora_name")}, text, ui=ui.PreviewText(text))


class DistilleryStopJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryStopJob",
            display_name="Distillery Stop Job",
            category=CATEGORY,
            description="Stop a queued or running job. A running job saves a checkpoint first; Resume continues it.",
            inputs=_job_inputs(),
            outputs=[JobHandle.Output(display_name="job"), io.String.Output(display_name="status")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()

    @classmethod
    def execute(cls, job=None, job_id=""):
        return _job_action("stop", job, job_id)


class DistilleryResumeJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryResumeJob",
            display_name="Distillery Resume Job",
            category=CATEGORY,
            description=("Queue a stopped, failed or interrupted job again; it continues from its last checkpoint. "
                         "A larger number of steps trains a job further, a completed one too."),
            inputs=[*_job_inputs(), _more_steps_input()],
            outputs=[JobHandle.Output(display_name="job"), io.String.Output(display_name="status")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()

    @classmethod
    def execute(cls, job=None, job_id="", steps=0):
        return _job_action("resume", job, job_id, steps=steps or None)


# --------------------------------------------------------------------------------------------------
def student_names() -> list[str]:
    import folder_paths

    found = []
    for name in folder_paths.get_filename_list("loras"):
        path = folder_paths.get_full_path("loras", name)
        if path and name.endswith(".safetensors") and students.student_card(path):
            found.append(name)
    return found


class DistilleryLoadDistilledLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryLoadDistilledLoRA",
            display_name="Distillery Load Distilled LoRA",
            category=CATEGORY,
            description=(
                "Apply a distilled student (a LoRA with Distillery metadata in models/loras) to a MODEL and get "
                "the sampler and SIGMAS it was trained for, for SamplerCustom / SamplerCustomAdvanced (cfg 1). "
                "Use it on the model it was distilled from; a student of a guidance-distilled model (Flux-dev) "
                "samples with FluxGuidance at the guidance its card names."),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=student_names() or [NO_STUDENTS],
                               tooltip="LoRAs written by Distillery jobs (others are not listed)"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="< 1 for img2img: keeps the last int(steps x denoise) timesteps"),
            ],
            outputs=[io.Model.Output(), io.Sampler.Output(), io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, lora_name, **_):
        if lora_name == NO_STUDENTS:
            return "no distilled LoRA yet: run 'Distillery Start Distillation' and wait until the job completes"
        return True

    @classmethod
    def execute(cls, model, lora_name, strength, denoise) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import folder_paths

        from ..sampling import distilled_sigmas
        from ..comfy_backend import make_ksampler, phased_student_model, schedule_from_model

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        card = students.student_card(path)
        if card is None:
            raise ValueError(f"lora_name: {lora_name} has no Distillery student card: not a distilled student; "
                             f"use ComfyUI's LoraLoader for other LoRAs")
        sampler_name, sampler_options = card.sampler_choice()
        timesteps = card.recommended_timesteps()
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        if card.experts:  # Phased DMD: expert k's LoRA on its own noise levels
            patched, _ = phased_student_model(model, lora, card.experts, float(strength))
        else:
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora, float(strength), 0.0)
        schedule = schedule_from_model(model)
        sigmas = distilled_sigmas(schedule, "custom", timesteps, len(timesteps), float(denoise)).float()
        text = f"{card.method} student, {len(timesteps)} steps ({sampler_name}), cfg {card.cfg:g}"
        if card.experts:
            text += "\nexperts: " + "; ".join(f"{e['expert']} at timesteps {', '.join(map(str, e['timesteps']))}"
                                              for e in card.experts)
        if card.guidance is not None:  # a guidance-distilled base: the student learned at this guidance input
            text += (f"\nguidance-distilled teacher: put FluxGuidance (guidance {card.guidance:g}) on the "
                     f"conditioning, the value the student was trained at, and sample at cfg 1")
        if card.teacher_files:
            files = card.teacher_files
            text += (f"\ndistilled from {files.get('diffusion_model')} with text encoders "
                     f"{', '.join(files.get('text_encoders') or [])} ({files.get('clip_type')}) and VAE "
                     f"{files.get('vae')}: apply it to that diffusion model")
        if card.teacher_loras:  # it learned the teacher with these: it samples as intended with them loaded
            text += "\ntrained on a teacher with LoRAs - load them under this student: " + ", ".join(
                f"{x['name']} (model {x['strength_model']:g}, clip {x['strength_clip']:g})" for x in card.teacher_loras)
        return io.NodeOutput(patched, make_ksampler(sampler_name, **sampler_options), sigmas, ui=ui.PreviewText(text))


NODES = [DistilleryAdvancedTraining, DistilleryStartDistillation, DistilleryJobStatus, DistilleryStopJob,
         DistilleryResumeJob, DistilleryLoadDistilledLoRA]
