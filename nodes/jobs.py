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
from ._api import io, ui

log = logging.getLogger("distillery")

CATEGORY = "Distillery/training"
JobHandle = io.Custom("DISTILLERY_JOB")
NO_STUDENTS = "(no distilled LoRAs in models/loras yet)"
DEFAULT_PROMPTS = ("a photo of a cat sitting on a windowsill, soft morning light\n"
                   "a watercolor painting of a mountain lake at dusk\n"
                   "portrait of an old fisherman, detailed, 85mm photo\n"
                   "a cozy cabin in a snowy forest, digital illustration")


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
class DistilleryStartDistillation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="DistilleryStartDistillation",
            display_name="Distillery Start Distillation",
            category=CATEGORY,
            description=(
                "Distil a checkpoint into a few-step LoRA student in the background: the job runs in a worker "
                "process of its own (the queue stays free for generating; a crash or OOM never takes ComfyUI "
                "down) and this node returns at once. Watch it in the Distillery sidebar. Re-running the same "
                "settings does not start a second job: it returns the existing one (an interrupted one is "
                "resumed). The student is written to models/loras/<lora_name>.safetensors with its sampler "
                "and timesteps; load it with 'Distillery Load Distilled LoRA'."),
            inputs=[
                io.Combo.Input("method", options=jo.available_methods(), default="dmd2",
                               tooltip="dmd2: distribution matching (4 steps, best quality); sid: score identity "
                                       "distillation; tcd: trajectory consistency (any step count)"),
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="the teacher: any checkpoint ComfyUI loads (SD1.5, SDXL, ...)"),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS, dynamic_prompts=False,
                                tooltip="one prompt per line (lines starting with # are skipped); the student "
                                        "learns the teacher's images for prompts like these"),
                io.String.Input("prompts_file", default="",
                                tooltip="optional: a text file with one prompt per line (absolute, or relative "
                                        "to ComfyUI's input folder); added to the prompts above"),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000,
                             tooltip="training iterations (DMD2 on SD1.5: a few thousand)"),
                io.Int.Input("batch_size", default=2, min=1, max=256, tooltip="images per iteration"),
                io.Float.Input("learning_rate", default=0.00005, min=0.0000001, max=1000.0, step=0.000001,
                               round=0.0000001, tooltip="student and critic learning rate (LoRA)"),
                io.Int.Input("lora_rank", default=64, min=1, max=1024, tooltip="rank of the student LoRA"),
                io.String.Input("student_timesteps", default="999,749,499,249",
                                tooltip="the student's timesteps, noisiest first (0..999): 999,749,499,249 = "
                                        "4 steps; 399 = 1 step. TCD uses only their count"),
                io.Float.Input("guidance", default=4.5, min=0.0, max=30.0, step=0.05,
                               tooltip="teacher guidance baked into the student (DMD2: CFG of the teacher, "
                                       "SiD: kappa, TCD: upper end of the CFG range)"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="square training resolution in pixels (SD1.5 512, SDXL 1024)"),
                io.String.Input("lora_name", default="distillery_student",
                                tooltip="output file in models/loras/ (.safetensors is added)"),
                io.Int.Input("training_seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="seed of the run; change it to train the same settings again"),
                io.Int.Input("preview_every", default=100, min=0, max=1_000_000,
                             tooltip="iterations between preview images in the sidebar (0 = none)"),
                io.Int.Input("checkpoint_every", default=200, min=0, max=1_000_000,
                             tooltip="iterations between checkpoints (resume continues from the last one)"),
                io.String.Input("real_images_folder", default="", optional=True,
                                tooltip="optional: a folder of your own images (absolute, or relative to "
                                        "ComfyUI's input folder; captions as name.txt beside them). DMD2 / SiD: "
                                        "the GAN term's real data (set gan_weight); TCD: its training data "
                                        "instead of teacher samples"),
                io.Float.Input("gan_weight", default=0.0, min=0.0, max=10.0, step=0.001, round=0.0001,
                               optional=True,
                               tooltip="DMD2 / SiD: weight of the diffusion-GAN term on real images (0 = off, "
                                       "data-free; DMD2's SDXL recipe uses 0.005)"),
            ],
            outputs=[JobHandle.Output(display_name="job"), io.String.Output(display_name="job_id")],
            is_output_node=True,
        )

    @classmethod
    def _config(cls, method, ckpt_name, prompts, prompts_file, steps, batch_size, learning_rate, lora_rank,
                student_timesteps, guidance, resolution, lora_name, training_seed, preview_every,
                checkpoint_every, real_images_folder="", gan_weight=0.0, **_) -> dict:
        import folder_paths

        rt = _runtime()
        file_text = jo.read_prompts_file(prompts_file, [folder_paths.get_input_directory()])
        lora_file = jo.check_lora_name(lora_name)
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        return jo.comfy_job_config(
            method=method, checkpoint=ckpt_name,
            checkpoint_path=folder_paths.get_full_path_or_raise("checkpoints", ckpt_name),
            prompts=jo.parse_prompts(prompts, file_text), steps=int(steps), batch_size=int(batch_size),
            learning_rate=float(learning_rate), lora_rank=int(lora_rank), timesteps=student_timesteps,
            guidance=float(guidance), resolution=int(resolution), lora_name=lora_file,
            lora_path=os.path.join(loras_dir, lora_file), seed=int(training_seed),
            preview_every=int(preview_every), checkpoint_every=int(checkpoint_every),
            comfy_root=rt.comfy_root(), device=rt.server_device(),
            real_images=jo.resolve_folder(real_images_folder, [folder_paths.get_input_directory()]),
            gan_weight=float(gan_weight or 0.0))

    @classmethod
    def validate_inputs(cls, lora_name, student_timesteps, **_):
        try:
            jo.check_lora_name(lora_name)
            jo.parse_timesteps_text(student_timesteps)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # re-execute when the job these settings map to changed state (e.g. it failed: start anew)
        try:
            config = cls._config(**kwargs)
            manager = _runtime().manager()
            job_id = manager.find_equivalent(config["fingerprint"], states=st.STATES)
            return f"{config['fingerprint']}:{job_id}:{manager.store.status(job_id)['state'] if job_id else ''}"
        except Exception:  # noqa: BLE001 - let execute report the problem
            return float("nan")

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        config = cls._config(**kwargs)
        manager = _runtime().manager()
        job_id = manager.find_equivalent(config["fingerprint"])
        note = ""
        if job_id is None:
            interrupted = manager.find_equivalent(config["fingerprint"], states=(st.INTERRUPTED,))
            if interrupted is not None:
                manager.resume(interrupted)
                job_id, note = interrupted, " (interrupted earlier: resumed from its last checkpoint)"
        if job_id is None:
            lora_path = config["output"]["lora_path"]
            if os.path.exists(lora_path):
                raise ValueError(f"lora_name: models/loras/{config['output']['lora_name']} already exists; choose "
                                 f"another name (or delete the file) so no student is overwritten")
            if config["task"].get("real_images"):  # every image readable, before the job is queued
                from ..trainers.real_images import list_images

                list_images(config["task"]["real_images"], "real_images_folder")
            for other in manager.list():
                if other.get("state") in (st.QUEUED, *st.ACTIVE) and \
                        other.get("lora_name") == config["output"]["lora_name"]:
                    raise ValueError(f"lora_name: job {other['id']} ({other['state']}) already writes "
                                     f"{other['lora_name']}; choose another name")
            job_id = manager.create(config)
            note = " (queued)"
        else:
            note = note or " (same settings as this existing job: not started again)"
        info = manager.get(job_id)
        text = _status_line(info) + note
        handle = {"id": job_id, "lora_name": config["output"]["lora_name"]}
        return io.NodeOutput(handle, job_id, ui=ui.PreviewText(text))


# --------------------------------------------------------------------------------------------------
def _job_inputs():
    return [JobHandle.Input("job", optional=True, tooltip="from Distillery Start Distillation"),
            io.String.Input("job_id", default="", optional=True,
                            tooltip="or a job id from the Distillery sidebar (used when no job is connected)")]


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
        if wait and info.get("state") not in st.TERMINAL:
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
                if info.get("state") in st.TERMINAL or time.monotonic() > deadline:
                    return info
                time.sleep(0.5)
        except mm.InterruptProcessingException:
            if stop_if_cancelled and manager.get(jid).get("state") in (st.QUEUED, *st.ACTIVE):
                manager.stop(jid)
                log.info("distillery: prompt cancelled: job %s asked to stop", jid)
            raise


def _job_action(action: str, job, job_id: str):
    """Stop or resume a job (the manager's method of that name) and report its new status."""
    jid = _job_id(job, job_id)
    try:
        info = getattr(_runtime().manager(), action)(jid)
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
            description="Queue a stopped, failed or interrupted job again; it continues from its last checkpoint.",
            inputs=_job_inputs(),
            outputs=[JobHandle.Output(display_name="job"), io.String.Output(display_name="status")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()

    @classmethod
    def execute(cls, job=None, job_id=""):
        return _job_action("resume", job, job_id)


# --------------------------------------------------------------------------------------------------
def student_names() -> list[str]:
    import folder_paths

    found = []
    for name in folder_paths.get_filename_list("loras"):
        path = folder_paths.get_full_path("loras", name)
        if path and name.endswith(".safetensors") and students.student_metadata(path):
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
                "Use it on the model it was distilled from."),
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
        from ..comfy_backend import make_ksampler, schedule_from_model

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        meta = students.student_metadata(path)
        if not meta:
            raise ValueError(f"{lora_name} has no Distillery metadata (distillery.method): not a distilled "
                             f"student; use ComfyUI's LoraLoader for other LoRAs")
        sampler_name, sampler_options = students.sampler_choice(meta)
        timesteps = students.recommended_timesteps(meta)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, float(strength), 0.0)
        schedule = schedule_from_model(model)
        sigmas = distilled_sigmas(schedule, "custom", timesteps, len(timesteps), float(denoise)).float()
        return io.NodeOutput(patched, make_ksampler(sampler_name, **sampler_options), sigmas)


NODES = [DistilleryStartDistillation, DistilleryJobStatus, DistilleryStopJob, DistilleryResumeJob,
         DistilleryLoadDistilledLoRA]
