"""Hybrid base-then-student sampling and diffusion-target (DT) visualization nodes (ComfyUI V3).

* DistilleryHybridSampler: one node. The base MODEL (with its own conditioning and CFG) runs its own
  scheduler from the top down to a level the student was trained on, then the student MODEL (often the
  same checkpoint with a distilled LoRA, CFG 1) continues on its own timesteps. Both stages go through
  ComfyUI's own sampling (``comfy.sample.sample_custom``: a CFG guider + a SAMPLER each), noise is added
  once (the second stage gets zero noise and the first stage's noisy latent), the snap of the hand-off
  to a student level is reported (UI text and a STRING output), and the x0 prediction of every step is
  laid out as an image grid (base and student side by side).
* DistillerySplitSigmasAtStudentLevel: the same hand-off as SIGMAS pieces, SplitSigmas-style, for graphs
  built from SamplerCustomAdvanced nodes (the second one with DisableNoise).
* DistilleryDTCollect + DistilleryDTGrid: DT visualization for any SamplerCustom(Advanced) run: a SAMPLER
  wrapper that records each step's x0 prediction, and a node that decodes the records (VAE, or a
  latent-to-RGB preview without one) into an image grid.

A LoRA student is the base's ModelPatcher cloned by LoraLoader: both patchers share one diffusion model
(``student.model is base.model``). This node passes the two patchers to ComfyUI's sampler untouched (no
clone, no copy); ComfyUI's loader treats them as clones of one model, detaches the other one and patches
or unpatches the LoRA weights in place (backing up only the patched keys), so the weights exist once.
The integration test checks this inside a real ComfyUI (tests/integration/test_hybrid_workflows.py).

Widget order is part of the saved-workflow format (widgets_values is positional): append, never reorder.
"""

from __future__ import annotations

import logging

import torch

from ..sampling import PRESET_NAMES, distilled_sigmas
from ..sampling.diffusion_targets import DTCollector, dt_grid
from ..sampling.hybrid import Handoff, hybrid_sigmas
from ._api import io, ui
from ..comfy_backend import make_ksampler, schedule_from_model
from .samplers import _validate_timestep_text

log = logging.getLogger("distillery")

CATEGORY = "Distillery/sampling"
STUDENT_SAMPLERS = ["x0_renoise", "tcd", "ddim"]
DT = io.Custom("DISTILLERY_DT")


# --- helpers shared by the nodes ----------------------------------------------------------------------------

def latent_to_rgb(latent_format, x0: torch.Tensor) -> torch.Tensor:
    """A quick preview without a VAE: ComfyUI's per-model latent -> RGB factors, [B, H, W, 3] in [0, 1].

    x0 is in the model's internal latent space (what sampler callbacks see)."""
    factors = getattr(latent_format, "latent_rgb_factors", None)
    x0 = x0.detach().float().cpu()
    if x0.ndim == 5:  # video latents [B, C, T, H, W]: the middle frame
        x0 = x0[:, :, x0.shape[2] // 2]
    if factors is None:  # no factors known: the first three channels
        rgb = x0[:, :3].movedim(1, -1)
        if rgb.shape[-1] < 3:
            rgb = rgb[..., :1].expand(*rgb.shape[:-1], 3)
    else:
        weight = torch.tensor(factors, dtype=torch.float32)  # [C, 3]
        bias = getattr(latent_format, "latent_rgb_factors_bias", None)
        rgb = x0.movedim(1, -1) @ weight
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    return ((rgb + 1.0) / 2.0).clamp(0, 1)


def make_decoder(vae, meta: dict):
    """decode(x0 in the model's internal latent space) -> images [B, H, W, 3], through the VAE if given."""
    latent_format = meta.get("latent_format")
    latent_out = meta.get("process_latent_out")

    def decode(x0: torch.Tensor) -> torch.Tensor:
        if vae is None:
            return latent_to_rgb(latent_format, x0)
        latent = latent_out(x0) if latent_out is not None else x0
        images = vae.decode(latent)
        if images.ndim == 5:  # video VAEs: [B, T, H, W, C], the middle frame
            images = images[:, images.shape[1] // 2]
        return images.float().cpu()
    return decode


def _grid_image(records, vae, meta: dict, max_images: int) -> torch.Tensor:
    return dt_grid(records, make_decoder(vae, meta), max_images=max_images)[None]


# --- the hybrid, as a plain function (the node and the integration test's memory check call it) ---------

def plan_hybrid(base_model, student_model, base_scheduler: str, base_total_steps: int, base_steps: int,
                student_preset: str, student_timesteps: str, student_steps: int) -> tuple[Handoff, str]:
    """The hand-off for a base scheduler grid and a student preset, and the report line."""
    import comfy.samplers

    base_schedule = schedule_from_model(base_model)
    student_schedule = schedule_from_model(student_model)
    base_sigmas = comfy.samplers.calculate_sigmas(base_model.get_model_object("model_sampling"),
                                                  base_scheduler, int(base_total_steps)).cpu()
    student_sigmas = distilled_sigmas(student_schedule, student_preset, student_timesteps, int(student_steps))
    plan = hybrid_sigmas(base_sigmas.double(), student_sigmas, schedule=base_schedule,
                         student_schedule=student_schedule, base_steps=int(base_steps))
    return plan, plan.describe(student_schedule)


def run_hybrid(base_model, base_positive, base_negative, base_cfg, student_model, student_positive,
               student_negative, student_cfg, latent, seed, base_sampler, base_scheduler, base_total_steps,
               base_steps, student_sampler, student_preset, student_timesteps, student_steps,
               dt_max_images: int = 4, student_sampler_override=None, collector: DTCollector | None = None):
    """Both stages through comfy.sample.sample_custom; returns (latent dict, plan, report, collector)."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    plan, report = plan_hybrid(base_model, student_model, base_scheduler, base_total_steps, base_steps,
                               student_preset, student_timesteps, student_steps)
    latent_image = comfy.sample.fix_empty_latent_channels(base_model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, int(seed), latent.get("batch_index"))
    noise_mask = latent.get("noise_mask")
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    collector = collector or DTCollector(max_images=max(1, int(dt_max_images)))
    collector.clear()
    collector.meta = {}
    x = latent_image
    base_evals = student_evals = 0
    if plan.base_steps > 0:
        sampler = dt_sampler(comfy.samplers.sampler_object(base_sampler), collector, "base", clear_on_run=False)
        x = comfy.sample.sample_custom(base_model, noise, float(base_cfg), sampler, plan.base_sigmas.float(),
                                       base_positive, base_negative, x, noise_mask=noise_mask,
                                       callback=latent_preview.prepare_callback(base_model, plan.base_steps),
                                       disable_pbar=disable_pbar, seed=int(seed))
        noise = torch.zeros_like(x)  # noise is added once: the student continues from the noisy latent
        base_evals = sampler.calls * (2 if float(base_cfg) != 1.0 else 1)
    if plan.student_steps > 0:
        inner = student_sampler_override or make_ksampler(student_sampler)
        sampler = dt_sampler(inner, collector, "student", clear_on_run=False)
        x = comfy.sample.sample_custom(student_model, noise, float(student_cfg), sampler,
                                       plan.student_sigmas.float(), student_positive, student_negative, x,
                                       noise_mask=noise_mask,
                                       callback=latent_preview.prepare_callback(student_model, plan.student_steps),
                                       disable_pbar=disable_pbar, seed=int(seed))
        student_evals = sampler.calls * (2 if float(student_cfg) != 1.0 else 1)
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = x.to(comfy.model_management.intermediate_device())
    report = f"{report}; model evaluations per image: {base_evals} base + {student_evals} student " \
             f"= {base_evals + student_evals} (a CFG step counts 2)"
    return out, plan, report, collector


# --- nodes ----------------------------------------------------------------------------------------------

class DistilleryHybridSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="DistilleryHybridSampler",
            display_name="Distillery Hybrid Sampler (base -> student)",
            category=CATEGORY,
            description=(
                "Diversity distillation: the base model (with CFG) runs the first, composition-deciding "
                "steps of its own schedule, then the distilled student finishes from a timestep it was "
                "trained on. base_steps counts steps of the base grid (base_scheduler x base_total_steps); "
                "the hand-off snaps to the nearest student timestep and the snap is reported. Noise is "
                "added once. Outputs the latent, a diffusion-target grid (every step's x0 prediction, "
                "base and student side by side) and the report. base_steps 0 = the student alone. Compare "
                "with the student alone: a multi-step student trained on its own chain (DMD2 exit_step=last) "
                "has not seen the base's states at its later timesteps, and on the Gaussian-mixture family "
                "it lost mode mass from them (README)."),
            inputs=[
                io.Model.Input("base_model", tooltip="the base (teacher) model"),
                io.Conditioning.Input("base_positive"),
                io.Conditioning.Input("base_negative"),
                io.Model.Input("student_model", tooltip="the distilled student, e.g. the base + a DMD2 LoRA "
                                                        "(shares the base's weights; loaded once)"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Float.Input("base_cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="the base's classifier-free guidance"),
                io.Combo.Input("base_sampler", options=list(comfy.samplers.SAMPLER_NAMES), default="euler",
                               tooltip="the base's sampler (euler = deterministic DDIM)"),
                io.Combo.Input("base_scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="simple",
                               tooltip="the base's own schedule (simple x 20 = timesteps 999, 949, ..., 49)"),
                io.Int.Input("base_total_steps", default=20, min=1, max=1000,
                             tooltip="steps of the base's full schedule (its grid)"),
                io.Int.Input("base_steps", default=5, min=0, max=1000,
                             tooltip="hand off after this many steps of the base grid (snapped to the "
                                     "nearest student timestep; 20 x simple, 5 steps -> t=749). 0 = student "
                                     "alone; base_total_steps = base alone"),
                io.Float.Input("student_cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="the student's CFG (distilled students: 1, one evaluation per step)"),
                io.Combo.Input("student_sampler", options=STUDENT_SAMPLERS, default="x0_renoise",
                               tooltip="x0_renoise: DMD2 / LCM students; tcd (gamma 0.3): TCD; ddim: Hyper-SD "
                                       "and flow students. A connected student_sampler_override wins"),
                io.Combo.Input("student_preset", options=PRESET_NAMES, default="dmd2_4step",
                               tooltip="the student's timesteps ('custom': the student_timesteps field)"),
                io.String.Input("student_timesteps", default="999,749,499,249",
                                tooltip="used when student_preset is 'custom': strictly decreasing"),
                io.Int.Input("student_steps", default=4, min=1, max=1000,
                             tooltip="steps for the grid presets (lcm_tcd, trailing, flow_euler)"),
                io.Int.Input("dt_max_images", default=4, min=1, max=64,
                             tooltip="images of the batch shown per step in the diffusion-target grid"),
                io.Conditioning.Input("student_positive", optional=True,
                                      tooltip="the student's own prompt encoding (default: base_positive)"),
                io.Conditioning.Input("student_negative", optional=True,
                                      tooltip="only used when student_cfg != 1 (default: base_negative)"),
                io.Vae.Input("vae", optional=True,
                             tooltip="decodes the diffusion-target grid; without it a latent-RGB preview"),
                io.Sampler.Input("student_sampler_override", optional=True,
                                 tooltip="any SAMPLER for the student stage (e.g. Distillery TCD with gamma)"),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT"),
                io.Image.Output(display_name="dt_grid"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def validate_inputs(cls, student_preset, student_timesteps):
        if student_preset == "custom":
            return _validate_timestep_text(student_timesteps)
        return True

    @classmethod
    def execute(cls, base_model, base_positive, base_negative, student_model, latent_image, seed, base_cfg,
                base_sampler, base_scheduler, base_total_steps, base_steps, student_cfg, student_sampler,
                student_preset, student_timesteps, student_steps, dt_max_images, student_positive=None,
                student_negative=None, vae=None, student_sampler_override=None) -> io.NodeOutput:
        out, plan, report, collector = run_hybrid(
            base_model, base_positive, base_negative, base_cfg, student_model,
            student_positive if student_positive is not None else base_positive,
            student_negative if student_negative is not None else base_negative, student_cfg, latent_image,
            seed, base_sampler, base_scheduler, base_total_steps, base_steps, student_sampler, student_preset,
            student_timesteps, student_steps, dt_max_images, student_sampler_override)
        log.info("distillery hybrid: %s", report)
        grid = _grid_image(collector.records, vae, collector.meta, int(dt_max_images))
        return io.NodeOutput(out, grid, report, ui=ui.PreviewText(report))


class DistillerySplitSigmasAtStudentLevel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistillerySplitSigmasAtStudentLevel",
            display_name="Distillery Split Sigmas at Student Level",
            category=CATEGORY,
            description=(
                "SplitSigmas for hybrid sampling: cut the base's SIGMAS after `base_steps` steps, snapped "
                "to the nearest level of the student's SIGMAS. base_sigmas: the base's levels above the "
                "hand-off, ending exactly on it; student_sigmas: the student's levels from the hand-off "
                "to 0. Run the second part with DisableNoise (noise is added once)."),
            inputs=[
                io.Model.Input("model", tooltip="the student model (its timesteps are reported)"),
                io.Sigmas.Input("base_sigmas", tooltip="the base's full schedule, e.g. BasicScheduler"),
                io.Sigmas.Input("student_sigmas", tooltip="the student's schedule, e.g. Distillery "
                                                          "Distilled Timesteps"),
                io.Int.Input("base_steps", default=5, min=0, max=1000,
                             tooltip="hand off after this many base steps (snapped to a student level)"),
            ],
            outputs=[
                io.Sigmas.Output(display_name="base_sigmas"),
                io.Sigmas.Output(display_name="student_sigmas"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, model, base_sigmas, student_sigmas, base_steps) -> io.NodeOutput:
        schedule = schedule_from_model(model)
        plan = hybrid_sigmas(base_sigmas.detach().cpu().double(), student_sigmas.detach().cpu().double(),
                             schedule=schedule, base_steps=int(base_steps))
        report = plan.describe(schedule)
        student = plan.student_sigmas if plan.student_steps > 0 else plan.base_sigmas[-1:].new_zeros(0)
        base = plan.base_sigmas if plan.base_steps > 0 else plan.base_sigmas.new_zeros(0)
        return io.NodeOutput(base.float(), student.float(), report, ui=ui.PreviewText(report))


class _CountingModel:
    """Proxy for the guider a SAMPLER calls: counts its calls, forwards everything else."""

    def __init__(self, guider):
        self.__dict__["_guider"] = guider
        self.__dict__["calls"] = 0

    def __call__(self, *args, **kwargs):
        self.__dict__["calls"] += 1
        return self._guider(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._guider, name)

    def __setattr__(self, name, value):
        setattr(self._guider, name, value)


_DT_SAMPLER_CLASS = None


def dt_sampler(inner, collector: DTCollector, stage: str, clear_on_run: bool = True):
    """A comfy.samplers.Sampler that runs `inner` and records each step's x0 prediction into `collector`.

    It also counts the guider calls of the run (``.calls``; one call = one guided step evaluation, which
    is 2 network evaluations when CFG != 1). Built lazily: comfy is importable only inside ComfyUI.
    """
    global _DT_SAMPLER_CLASS
    if _DT_SAMPLER_CLASS is None:
        import comfy.samplers

        class DistilleryDTSampler(comfy.samplers.Sampler):
            def __init__(self, inner, collector: DTCollector, stage: str, clear_on_run: bool = True):
                self.inner, self.collector, self.stage, self.clear_on_run = inner, collector, stage, clear_on_run
                self.calls = 0

            def max_denoise(self, model_wrap, sigmas):
                return self.inner.max_denoise(model_wrap, sigmas)

            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False):
                base_model = model_wrap.inner_model
                if self.clear_on_run:  # one run per collector: the grid shows the latest run
                    self.collector.clear()
                    self.collector.meta = {}
                if not self.collector.meta:
                    self.collector.meta = {"latent_format": base_model.latent_format,
                                           "process_latent_out": base_model.process_latent_out}
                ms = base_model.model_sampling

                def timestep(sigma: float):
                    try:
                        return float(ms.timestep(torch.tensor([sigma], dtype=torch.float32,
                                                              device=sigmas.device))[0])
                    except Exception:  # a sampling without timesteps: label with sigma
                        return None

                recording = self.collector.comfy_callback(sigmas, chain=callback, stage=self.stage,
                                                          timestep_fn=timestep)
                counted = _CountingModel(model_wrap)
                try:
                    return self.inner.sample(counted, sigmas, extra_args, recording, noise, latent_image,
                                             denoise_mask, disable_pbar)
                finally:
                    self.calls = counted.calls

        _DT_SAMPLER_CLASS = DistilleryDTSampler
    return _DT_SAMPLER_CLASS(inner, collector, stage, clear_on_run)


class DistilleryDTCollect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryDTCollect",
            display_name="Distillery Diffusion Targets: Collect",
            category=CATEGORY,
            description=(
                "Wrap any SAMPLER so that every step's x0 prediction (the 'diffusion target') is recorded "
                "while SamplerCustom / SamplerCustomAdvanced runs it. Connect `dt` to Distillery Diffusion "
                "Targets: Grid. One collector per sampler run (each run replaces the previous records)."),
            inputs=[
                io.Sampler.Input("sampler"),
                io.String.Input("stage", default="base",
                                tooltip="column title in the grid (e.g. base / student)"),
                io.Int.Input("max_images", default=4, min=1, max=64,
                             tooltip="samples of the batch recorded per step"),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER"), DT.Output(display_name="dt")],
        )

    @classmethod
    def execute(cls, sampler, stage, max_images) -> io.NodeOutput:
        collector = DTCollector(max_images=int(max_images), stage=str(stage) or "run")
        return io.NodeOutput(dt_sampler(sampler, collector, str(stage) or "run"), collector)


class DistilleryDTGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryDTGrid",
            display_name="Distillery Diffusion Targets: Grid",
            category=CATEGORY,
            description=(
                "Decode the recorded x0 predictions into one image: a row per step (noisiest first, "
                "labelled with the timestep), a column per collector (base and student side by side). "
                "`samples` is the sampler's output LATENT; it only makes this node run after the sampler."),
            inputs=[
                io.Latent.Input("samples", tooltip="the output of the (last) sampler whose run was recorded"),
                DT.Input("dt", tooltip="from Distillery Diffusion Targets: Collect"),
                io.Int.Input("max_images", default=4, min=1, max=64,
                             tooltip="images of the batch shown per step"),
                io.Vae.Input("vae", optional=True, tooltip="without a VAE: a latent-RGB preview"),
                DT.Input("dt_2", optional=True, tooltip="a second run shown beside the first (e.g. the student "
                                                        "stage of a hybrid built from parts)"),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, samples, dt, max_images, vae=None, dt_2=None) -> io.NodeOutput:
        runs = [r for r in (dt, dt_2) if r is not None]
        for run in runs:
            if not isinstance(run, DTCollector):
                raise ValueError("dt: connect the `dt` output of Distillery Diffusion Targets: Collect")
        if not any(run.records for run in runs):
            raise ValueError("dt: nothing was recorded; use the collector's SAMPLER output in the sampler node "
                             "whose LATENT output feeds `samples`")
        records = [r for run in runs for r in run.records]  # dt_grid orders the rows by noise level
        meta = next((run.meta for run in runs if run.meta), {})
        return io.NodeOutput(_grid_image(records, vae, meta, int(max_images)))


NODES = [DistilleryHybridSampler, DistillerySplitSigmasAtStudentLevel, DistilleryDTCollect, DistilleryDTGrid]
