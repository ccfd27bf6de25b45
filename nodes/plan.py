"""Will it fit on my card? The VRAM plan of a distillation run, as a node beside Start Distillation.

The same inputs as Start Distillation (teacher, method, the settings, advanced): the run is planned with
trainers/planner.py (a dry run on fake tensors: no weights load, no GPU memory is used) for the teacher's
family's reference architecture, and shown as a chart on the node: what is alive at the peak of each
iteration kind, the card's memory as a line. With `fit` on and a run that does not fit, the cheapest change
that fits is planned and named. SDXL takes about a minute on a CPU.
"""

from __future__ import annotations

import json

from ..trainers.registry import build as build_options
from ._api import io, ui
from .jobs import AdvancedSocket, _train_infos, native_resolution
from .methods import MethodSocket, widget
from .run_inputs import TeacherSocket

CATEGORY = "Distillery/training"


def _card_bytes(vram_gb: float) -> int | None:
    """The card's memory: the number given, else this server's GPU's total memory, else None."""
    if vram_gb > 0:
        return int(vram_gb * 2 ** 30)
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def plan_run(teacher: dict, method: dict, train: dict, resolution: int, vram: int | None, fit: bool) -> dict:
    """The plan as JSON (Plan.to_json, with "fits" and the fitted change when asked); ValueError names the
    input to change."""
    from ..cli_plan import find_fit, make_plan
    from ..comfy_backend import adapter_layout_note, safetensors_header
    from ..trainers.architectures import arch_for_family, header_params

    arch = arch_for_family(teacher.get("family"))
    inputs = {"arch": arch, "method": method["method"], "method_options": method["options"], "train": train,
              "resolution": resolution or native_resolution(teacher.get("family")), "device": "cuda",
              "base_dtype": "bf16"}
    plan = make_plan(inputs)
    out = plan.to_json()
    header = safetensors_header(teacher["path"])
    prefix = teacher.get("unet_prefix", "model.diffusion_model.")
    found = header_params(header, prefix)
    expected = arch.expected_params
    if found and expected and abs(found - expected) > 0.01 * expected:
        out["notes"].append(f"the checkpoint's diffusion model has {found / 1e9:.2f} B parameters, the reference "
                            f"{arch.name} {expected / 1e9:.2f} B: the plan is of the reference architecture")
    elif found:  # the reference's size in ComfyUI's layout: its adapters may still differ
        note = adapter_layout_note(arch, header, prefix, plan.settings)
        if note:
            out["notes"].append(note)
    if vram is not None:
        out["vram_bytes"], out["fits"] = vram, plan.fits(vram)
        if fit and not plan.fits(vram):
            fitted = find_fit(inputs, plan, vram)
            out["fit"] = None if fitted is None else {"how": fitted[0], "changes": fitted[1],
                                                      "peak_bytes": fitted[2].peak_bytes,
                                                      "plan": fitted[2].to_json()}
    return out


def report(out: dict) -> str:
    gib = 2 ** 30
    lines = [f"{out['arch']} @ {out['resolution']}px, {out['method']}: peak {out['peak_bytes'] / gib:.2f} GiB at "
             f"{out['peak_at']}"]
    lines += [f"  {k}: {v / gib:.2f} GiB" for k, v in out["phases"].items() if v]
    if "fits" in out:
        lines.append(f"{'FITS' if out['fits'] else 'DOES NOT FIT'} in {out['vram_bytes'] / gib:.1f} GiB (the CUDA "
                     f"context and allocator slack are not counted)")
    if out.get("fit"):
        lines.append(f"fits with: {out['fit']['how']} -> peak {out['fit']['peak_bytes'] / gib:.2f} GiB")
    elif "fit" in out:
        lines.append("no change the planner knows makes it fit")
    lines += [f"note: {n}" for n in out["notes"]]
    return "\n".join(lines)


class DistilleryPlanVRAM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryPlanVRAM",
            display_name="Distillery Plan VRAM (will it fit?)",
            category=CATEGORY,
            description=(
                "Plans the peak GPU memory of the run Start Distillation would start with the same inputs, "
                "without loading weights or using the GPU (a dry run on fake tensors, about a minute for SDXL "
                "on a CPU), and draws it: what is alive at the peak (weights, optimizer state, gradients, "
                "activations) for each kind of iteration, and your card's memory as a line. With fit on, a "
                "run that does not fit gets the cheapest change that does, planned too."),
            inputs=[
                TeacherSocket.Input("teacher", tooltip="from Distillery Teacher Checkpoint"),
                MethodSocket.Input("method", tooltip="from a method node: Distillery DMD2, SiD or TCD"),
                *[widget(i) for i in _train_infos(advanced=False)],
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64,
                             tooltip="as on Start Distillation; 0 = the model's own"),
                io.Float.Input("vram_gb", default=0.0, min=0.0, max=1024.0, step=0.5, round=False,
                               tooltip="your card's memory in GiB; 0 = this server's GPU (none: no verdict)"),
                io.Boolean.Input("fit", default=True, tooltip="if it does not fit, plan the cheapest change that does"),
                AdvancedSocket.Input("advanced", optional=True,
                                     tooltip="from Distillery Advanced Training Settings (optional)"),
            ],
            outputs=[io.Image.Output(display_name="chart"), io.String.Output(display_name="plan_json")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, teacher, method, resolution, vram_gb, fit, advanced=None, **train) -> io.NodeOutput:
        import numpy as np
        import torch

        from ..plan_chart import render
        from ..trainers.engine import TrainConfig

        for name, value, key in (("teacher", teacher, "path"), ("method", method, "options")):
            if not isinstance(value, dict) or key not in value:
                raise ValueError(f"{name}: connect the node Start Distillation takes")
        settings = build_options(TrainConfig, {**train, **(advanced or {})}, owner="the training settings",
                                 partial=True)
        out = plan_run(teacher, method, settings, int(resolution), _card_bytes(float(vram_gb)), bool(fit))
        chart = render(out, out.get("vram_bytes"))
        image = torch.from_numpy(np.asarray(chart, dtype=np.float32) / 255.0)[None]
        shown = ui.PreviewImage(image, cls=cls).as_dict()  # the chart, and the summary as text beside it
        return io.NodeOutput(image, json.dumps(out, default=str), ui={**shown, "text": [report(out)]})


NODES = [DistilleryPlanVRAM]
