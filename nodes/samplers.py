"""Sampler and SIGMAS nodes for distilled students (ComfyUI V3).

SAMPLER nodes return ``comfy.samplers.KSAMPLER`` objects for SamplerCustom / SamplerCustomAdvanced; each
derives everything from the SIGMAS it is given, so img2img, denoise < 1 and SplitSigmas work. The SIGMAS
node turns a student's training timesteps into SIGMAS through the model's own model_sampling.

Widget order is part of the saved-workflow format (widgets_values is positional): append new inputs at
the end, never reorder.

Opt-in: with the environment variable DISTILLERY_KSAMPLER_TCD=1 (read when the pack loads) the TCD
sampler (gamma 0.3) also appears as "tcd" in the plain KSampler's sampler dropdown.
"""

from __future__ import annotations

import logging
import os

from ..sampling import PRESET_NAMES, PRESETS, distilled_sigmas, parse_timesteps
from ._api import io
from ..comfy_backend import make_ksampler, register_tcd_in_ksampler, schedule_from_model

log = logging.getLogger("distillery")

CATEGORY = "Distillery/sampling"
KSAMPLER_TCD_ENV = "DISTILLERY_KSAMPLER_TCD"


class DistillerySamplerTCD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistillerySamplerTCD",
            display_name="Distillery TCD Sampler",
            category=CATEGORY,
            description=(
                "TCD's strategic stochastic sampling, exactly diffusers' TCDScheduler, on any SIGMAS. "
                "gamma 0 = deterministic DDIM, 1 = full re-noise (LCM / DMD2 style), 0.3 = TCD's default; "
                "Hyper-SD's unified 1-step LoRA uses gamma near 1. For eps, v and flow models."),
            inputs=[
                io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="stochasticity (diffusers' eta): the share of each step that is "
                                       "re-noised with fresh noise"),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        return io.NodeOutput(make_ksampler("tcd", gamma=float(gamma)))


class DistillerySamplerX0Renoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistillerySamplerX0Renoise",
            display_name="Distillery DMD2 / LCM Sampler (x0 + fresh noise)",
            category=CATEGORY,
            description=(
                "Multistep sampling of DMD2 and LCM students: predict the clean image, re-noise it with "
                "fresh seed-stable noise to the next level. lcm_boundary applies LCM's c_skip / c_out "
                "(for LCM-LoRAs; exactly diffusers' LCMScheduler); leave it off for DMD2."),
            inputs=[
                io.Boolean.Input("lcm_boundary", default=False,
                                 tooltip="apply LCM's boundary condition (timestep_scaling 10, "
                                         "sigma_data 0.5); only for LCM-trained students"),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, lcm_boundary) -> io.NodeOutput:
        return io.NodeOutput(make_ksampler("x0_renoise", lcm_boundary=bool(lcm_boundary)))


class DistillerySamplerDDIM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistillerySamplerDDIM",
            display_name="Distillery Hyper-SD DDIM / Euler Sampler (deterministic)",
            category=CATEGORY,
            description=(
                "Deterministic DDIM (Euler in ComfyUI's coordinates) for Hyper-SD N-step LoRAs on "
                "'trailing' timesteps and for flow models (= FlowMatchEuler). end_on_t0 ends on the "
                "level of timestep 0 like diffusers' DDIMScheduler with the SD1.5/SDXL config."),
            inputs=[
                io.Boolean.Input("end_on_t0", default=False,
                                 tooltip="last step lands on alpha_bar[0] (diffusers' set_alpha_to_one="
                                         "False) instead of the clean estimate"),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, end_on_t0) -> io.NodeOutput:
        return io.NodeOutput(make_ksampler("ddim", end_on_t0=bool(end_on_t0)))


def _validate_timestep_text(text: str):
    """True, or the error message (format and ordering only: the model's range is checked at run time)."""
    try:
        parse_timesteps(text, discrete=True)
        return True
    except ValueError as vp_error:
        try:
            parse_timesteps(text, discrete=False)  # a flow model may take fractional timesteps
            return True
        except ValueError:
            return str(vp_error)


class DistilleryDistilledTimesteps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        preset_help = "; ".join(f"{name}: {spec.description}" for name, spec in PRESETS.items())
        return io.Schema(
            node_id="DistilleryDistilledTimesteps",
            display_name="Distillery Distilled Timesteps",
            category=CATEGORY,
            description=(
                "SIGMAS on a distilled student's own timesteps (0..999 training scale), converted "
                "through the model's model_sampling. Presets: " + preset_help),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("preset", options=PRESET_NAMES, default="dmd2_4step",
                               tooltip="a student's timesteps, or 'custom' to use the timesteps field"),
                io.String.Input("timesteps", default="999,749,499,249",
                                tooltip="used when preset is 'custom': strictly decreasing, comma "
                                        "separated, integers 0..999 for SD1.5/SDXL"),
                io.Int.Input("steps", default=4, min=1, max=1000,
                             tooltip="number of steps for the grid presets (lcm_tcd, trailing, "
                                     "flow_euler); fixed lists ignore it"),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="< 1 for img2img: grids work like BasicScheduler (lcm_tcd like "
                                       "diffusers' strength), fixed lists keep their last "
                                       "int(len x denoise) timesteps"),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset, timesteps):
        if preset == "custom":
            return _validate_timestep_text(timesteps)
        return True

    @classmethod
    def execute(cls, model, preset, timesteps, steps, denoise) -> io.NodeOutput:
        schedule = schedule_from_model(model)
        sigmas = distilled_sigmas(schedule, preset, timesteps, int(steps), float(denoise))
        return io.NodeOutput(sigmas.float())


NODES = [DistillerySamplerTCD, DistillerySamplerX0Renoise, DistillerySamplerDDIM, DistilleryDistilledTimesteps]

KSAMPLER_TCD = os.environ.get(KSAMPLER_TCD_ENV, "").strip() == "1"
if KSAMPLER_TCD:
    try:
        if register_tcd_in_ksampler():
            log.info("distillery: %s=1, 'tcd' added to the KSampler sampler list", KSAMPLER_TCD_ENV)
    except Exception:  # never break the pack's import over an optional extra
        log.exception("distillery: could not add 'tcd' to the KSampler sampler list")
