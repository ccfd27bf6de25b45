"""Sampler overhead beyond the model calls, as a fraction of a step, on a tiny UNet.

    python benchmarks/sampler_overhead.py [--steps 4] [--repeats 30] [--threads 1] [--out overhead.json]

For each sampler the whole sampling call is timed, and so is the time spent inside the model (a timing
wrapper around the model callable); overhead = (total - model) / model, i.e. what the sampler's own work
(input checks, the per-step coefficients from the schedule, x0 -> eps, re-noising, noise draws, callbacks)
adds to each step. "cold" clears the per-SIGMAS coefficient caches before every run (a new schedule);
"warm" re-runs the same SIGMAS (a re-queued ComfyUI prompt). Medians over `repeats` runs after warm-up.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from comfyui_distillery.core.models import DiffusersUNetModel, Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule
from comfyui_distillery.sampling import SAMPLERS, distilled_sigmas
from comfyui_distillery.sampling.deterministic import _ddim_coefficients
from comfyui_distillery.sampling.tcd import _tcd_coefficients
from comfyui_distillery.sampling.x0_renoise import _x0_renoise_coefficients


def clear_caches():
    for cached in (_tcd_coefficients, _ddim_coefficients, _x0_renoise_coefficients):
        cached.cache_clear()

CASES = [  # (sampler, preset, options)
    ("tcd", "lcm_tcd", {"gamma": 0.3}),
    ("x0_renoise", "dmd2_4step", {}),
    ("x0_renoise", "dmd2_4step", {"lcm_boundary": True}),
    ("ddim", "trailing", {}),
]


class Timed:
    """Wraps a model callable and accumulates the seconds spent inside it."""

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, 0.0, 0

    def __call__(self, x, sigma, **kwargs):
        start = time.perf_counter()
        out = self.model(x, sigma, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def tiny_unet(dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).to(dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps of the grid presets")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", default="sampler_overhead.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    unet = tiny_unet(dtype)
    schedule = DiscreteVPSchedule.sd15()
    model = DiffusersUNetModel(unet, schedule)
    cond = torch.randn(args.batch, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    params = sum(p.numel() for p in unet.parameters())

    rows = []
    for name, preset, options in CASES:
        sigmas = distilled_sigmas(schedule, preset, steps=args.steps)
        n_steps = len(sigmas) - 1
        x = torch.randn(args.batch, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        x = x * float((1 + sigmas[0] ** 2).sqrt())
        row = {"sampler": name, "options": options, "preset": preset, "steps": n_steps}
        for mode in ("cold", "warm"):
            totals, inside = [], []
            for rep in range(args.repeats + 3):
                if mode == "cold":
                    clear_caches()
                timed = Timed(Guided(model, cond))
                start = time.perf_counter()
                with torch.no_grad():
                    SAMPLERS[name](timed, x, sigmas, extra_args={"seed": rep}, callback=lambda d: None,
                                   disable=True, schedule=schedule, **options)
                total = time.perf_counter() - start
                if rep >= 3:  # warm-up
                    totals.append(total)
                    inside.append(timed.seconds)
            total_s, model_s = statistics.median(totals), statistics.median(inside)
            row[f"{mode}_step_ms"] = 1000 * model_s / n_steps
            row[f"{mode}_overhead_ms_per_step"] = 1000 * (total_s - model_s) / n_steps
            row[f"{mode}_overhead_fraction"] = statistics.median([(t - m) / m for t, m in zip(totals, inside)])
        rows.append(row)

    print(f"tiny UNet ({params / 1e3:.0f}K params, batch {args.batch}, 8x8 latents, {args.dtype}, "
          f"{torch.get_num_threads()} thread(s)), median of {args.repeats} runs")
    print(f"{'sampler':28s} {'steps':>5s} {'model ms/step':>14s} {'overhead ms/step':>17s} "
          f"{'cold':>7s} {'warm':>7s}")
    for r in rows:
        label = r["sampler"] + ("" if not r["options"] else " " + ",".join(f"{k}={v}" for k, v in r["options"].items()))
        print(f"{label:28s} {r['steps']:5d} {r['cold_step_ms']:14.2f} "
              f"{r['cold_overhead_ms_per_step']:8.3f} /{r['warm_overhead_ms_per_step']:7.3f} "
              f"{100 * r['cold_overhead_fraction']:6.2f}% {100 * r['warm_overhead_fraction']:6.2f}%")
    result = {"model": {"kind": "UNet2DConditionModel", "params": params, "batch": args.batch,
                        "latent": [4, 8, 8], "dtype": args.dtype},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "processor": platform.processor(), "repeats": args.repeats,
              "rows": rows}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
