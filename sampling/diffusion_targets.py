"""Diffusion-target (DT) visualization: what the model predicts the final image to be, at every step.

"Distilling Diversity and Control in Diffusion Models" (2025) calls the x0 prediction of each step the
diffusion target and shows it step by step to see where a sample's composition is decided (the first
steps) and where only details change. Every sampler here and in ComfyUI hands that prediction to its
callback as ``denoised``, so a collector that records it works for any sampler run:

* :class:`DTCollector` is a k-diffusion callback (``callback(dict)``) and, through
  :meth:`DTCollector.comfy_callback`, a ComfyUI one (``callback(step, x0, x, total_steps)``). It keeps the
  first ``max_images`` samples of each step's prediction on the CPU, with the step's noise level, its
  timestep (given a schedule) and its stage ("base" / "student" in a hybrid run).
* :func:`dt_grid` lays the records out as one picture: one row per noise level (noisiest first, labelled
  with the timestep), one column per stage (base and student side by side, so a hybrid run reads as a
  staircase: the base's rows, then the student's), each cell showing the decoded predictions of the
  first samples side by side. ``decode`` turns a batch of predictions into images (identity for the
  digits world, the VAE in ComfyUI, a scatter plot for point clouds: worlds/plots.py's scatter_decoder).

Pure torch + PIL; nothing here imports ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.schedules import NoiseSchedule


@dataclass
class DTRecord:
    stage: str
    step: int  # the step within the whole run
    sigma: float
    timestep: float | None
    denoised: torch.Tensor  # [n, ...] float32 on the CPU (the first max_images samples)


class DTCollector:
    """Records every step's x0 prediction ('denoised') of one or more sampler runs.

    Use it as the ``callback`` of any sampler in ``sampling/`` (or of :func:`sampling.hybrid.sample_hybrid`,
    whose dicts carry the stage), or wrap it for ComfyUI with :meth:`comfy_callback`. ``transform`` is
    applied to each prediction before it is stored (ComfyUI: ``process_latent_out``).
    """

    def __init__(self, max_images: int | None = 8, stage: str = "sampler", schedule: NoiseSchedule | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images={max_images}: keep at least 1 sample per step (None keeps all)")
        self.max_images, self.stage, self.schedule, self.transform = max_images, stage, schedule, transform
        self.records: list[DTRecord] = []
        self.meta: dict = {}  # what a decoder needs to know about the run (e.g. ComfyUI's latent format)

    def clear(self) -> None:
        self.records.clear()

    def set_stage(self, stage: str) -> None:
        """Label the records that follow (for runs whose callback dicts carry no "stage")."""
        self.stage = stage

    @property
    def stages(self) -> list[str]:
        seen: list[str] = []
        for r in self.records:
            if r.stage not in seen:
                seen.append(r.stage)
        return seen

    def _timestep(self, sigma: float) -> float | None:
        if self.schedule is None:
            return None
        return float(self.schedule.timestep(torch.tensor(sigma, dtype=torch.float64)))

    def record(self, denoised: torch.Tensor, sigma, stage: str | None = None, step: int | None = None,
               timestep: float | None = None) -> None:
        x0 = denoised.detach()
        if self.max_images is not None:
            x0 = x0[: self.max_images]
        if self.transform is not None:
            x0 = self.transform(x0)
        sigma = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        self.records.append(DTRecord(
            stage=stage or self.stage, step=len(self.records) if step is None else int(step), sigma=sigma,
            timestep=self._timestep(sigma) if timestep is None else float(timestep),
            denoised=x0.to("cpu", torch.float32).clone()))

    def __call__(self, info: dict) -> None:
        self.record(info["denoised"], info.get("sigma", float("nan")), info.get("stage"), info.get("i"))

    def comfy_callback(self, sigmas: torch.Tensor, chain: Callable | None = None, stage: str | None = None,
                       offset: int = 0, timestep_fn: Callable[[float], float] | None = None):
        """A ComfyUI sampler callback ``(step, x0, x, total_steps)`` that records x0, then calls ``chain``
        (e.g. ComfyUI's preview / progress callback). ``sigmas``: the run's SIGMAS, to know each step's level."""
        levels = sigmas.detach().to("cpu", torch.float64).flatten()

        def callback(step, x0, x, total_steps):
            sigma = float(levels[min(int(step), len(levels) - 1)])
            t = timestep_fn(sigma) if timestep_fn is not None else None
            self.record(x0, sigma, stage, offset + int(step), t)
            if chain is not None:
                chain(step, x0, x, total_steps)
        return callback


# --- the grid ---------------------------------------------------------------------------------------------

def _to_hwc(images: torch.Tensor, value_range) -> torch.Tensor:
    """Decoded images [n, h, w, c] or [n, c, h, w] (or [h, w, c]) -> [n, h, w, 3] float in [0, 1]."""
    img = images.detach().to("cpu", torch.float32)
    if img.ndim == 2:
        img = img[None, ..., None]
    if img.ndim == 3:
        img = img[None] if img.shape[-1] in (1, 3, 4) else img[..., None]
    if img.ndim != 4:
        raise ValueError(f"decode must return images [n, h, w, c] or [n, c, h, w], got {tuple(images.shape)}")
    if img.shape[-1] not in (1, 3, 4) and img.shape[1] in (1, 3, 4):
        img = img.permute(0, 2, 3, 1)
    if img.shape[-1] == 1:
        img = img.expand(-1, -1, -1, 3)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    lo, hi = value_range
    return ((img - lo) / (hi - lo)).clamp(0, 1)


def _label(t: float | None, sigma: float) -> str:
    if t is not None and math.isfinite(t):
        return f"t={t:.0f}" if abs(t - round(t)) < 1e-3 else f"t={t:.1f}"
    return f"s={sigma:.3g}"


def dt_grid(records: Sequence[DTRecord] | DTCollector, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
            *, max_images: int = 4, value_range=(0.0, 1.0), min_cell: int = 48, gap: int = 2,
            labels: bool = True, stages: Sequence[str] | None = None) -> torch.Tensor:
    """The DT grid as an image tensor [H, W, 3] in [0, 1] (ComfyUI's IMAGE is this with a batch axis).

    Rows: the noise levels of the steps, noisiest first, labelled with their timestep; columns: the stages
    in order of appearance (or ``stages``). A hybrid run shows the base's steps on the left and the
    student's on the right; records of several runs (e.g. a hybrid and the student alone) share the rows
    of the levels they have in common. A cell: the first ``max_images`` decoded images side by side (the
    collector's own ``max_images`` already limits what is recorded and decoded).
    ``decode(x0 [n, ...]) -> images`` (default identity); ``value_range`` is the range of its output
    (e.g. (-1, 1) for raw digits). Cells smaller than ``min_cell`` pixels are enlarged (nearest).
    """
    if isinstance(records, DTCollector):
        records = records.records
    records = list(records)
    if not records:
        raise ValueError("dt_grid: no steps were recorded; attach the collector as the sampler's callback "
                         "and run the sampler first")
    decode = decode or (lambda x: x)
    columns = list(stages) if stages is not None else []
    for r in records:
        if r.stage not in columns:
            columns.append(r.stage)
    # rows: one per noise level (descending); a stage's second prediction at a level it already has gets
    # its own row (e.g. two runs of one collector)
    rows: list[dict] = []
    for r in records:
        row = next((row for row in rows if _same_level(row["sigma"], r.sigma) and r.stage not in row["cells"]),
                   None)
        if row is None:
            row = {"sigma": r.sigma, "timestep": r.timestep, "cells": {}}
            rows.append(row)
        row["cells"][r.stage] = r
    rows.sort(key=lambda row: -row["sigma"] if math.isfinite(row["sigma"]) else 0.0)
    images = {}
    for r in records:
        with torch.no_grad():
            imgs = _to_hwc(decode(r.denoised), value_range)[:max_images]
        images[id(r)] = (torch.cat([torch.cat([im, torch.ones(im.shape[0], gap, 3)], 1) for im in imgs], 1)[:, :-gap]
                         if len(imgs) > 1 else imgs[0])
    ch = max(c.shape[0] for c in images.values())
    cw = max(c.shape[1] for c in images.values())
    scale = max(1, math.ceil(min_cell / ch))
    ch, cw = ch * scale, cw * scale
    label_w, head_h = (64, 14) if labels else (0, 0)
    height = head_h + len(rows) * (ch + gap) + gap
    width = label_w + len(columns) * (cw + gap) + gap
    canvas = torch.full((height, width, 3), 0.85)
    for i, row in enumerate(rows):
        for stage, r in row["cells"].items():
            cell = images[id(r)]
            if scale > 1:
                cell = cell.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            y = head_h + gap + i * (ch + gap)
            x = label_w + gap + columns.index(stage) * (cw + gap)
            canvas[y:y + cell.shape[0], x:x + cell.shape[1]] = cell
    if labels:
        canvas = _draw_labels(canvas, rows, columns, label_w, head_h, ch, cw, gap)
    return canvas


def _same_level(a: float, b: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-8)


def _draw_labels(canvas, rows, columns, label_w, head_h, ch, cw, gap):
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray((canvas.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for col, name in enumerate(columns):
        draw.text((label_w + gap + col * (cw + gap) + 2, 1), str(name), fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = head_h + gap + i * (ch + gap) + max(0, ch // 2 - 6)
        draw.text((3, y), _label(row["timestep"], row["sigma"]), fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)


def dt_grid_image(records, decode=None, **kwargs):
    """:func:`dt_grid` as a PIL image."""
    import numpy as np
    from PIL import Image

    grid = dt_grid(records, decode, **kwargs)
    return Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))


__all__ = ["DTRecord", "DTCollector", "dt_grid", "dt_grid_image"]
