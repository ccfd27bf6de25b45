"""Benchmark (not a test): the VRAM planner's peak against the real peak of the same run on this CPU.

    python benchmarks/planner_accuracy.py                      # the tiny twins, every method and setting, ~5 min
    python benchmarks/planner_accuracy.py --archs tiny-sd15 --methods dmd2

For each architecture that trains here (the tiny SD1.5-, SDXL- and SD3-shaped twins of trainers/
architectures.py), each method and each memory setting (gradient checkpointing off / on, fp8 base, LoRA on
attention only, micro-batches of 1), one iteration of each kind runs twice through the real trainer: on fake
tensors (the plan) and on real ones, both counted by the same live-storage tracker (which tests/test_planner.py
checks against the garbage collector's view). Prints the table and writes planner_accuracy.json / .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "no checkpointing": {"gradient_checkpointing": "off"},
    "checkpointing": {"gradient_checkpointing": "on"},
    "fp8 base": {"gradient_checkpointing": "on", "fp8_base": True},
    "LoRA on attention": {"gradient_checkpointing": "on", "lora_targets": "attention"},
    "micro-batches of 1": {"gradient_checkpointing": "on", "micro_batch_size": 1},
}
ONE_STEP = {"dmd2": {"student_timesteps": "399"}, "sid": {"student_timesteps": "399"}, "tcd": {}}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="tiny-sd15,tiny-sdxl,tiny-sd3m")
    p.add_argument("--methods", default="dmd2,sid,tcd")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from comfyui_distillery.trainers import planner
    from comfyui_distillery.trainers.architectures import get_arch

    rows = []
    for arch_name in [a.strip() for a in args.archs.split(",") if a.strip()]:
        arch = get_arch(arch_name)
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            for label, settings in SETTINGS.items():
                train = {"batch_size": args.batch, "lora_rank": args.rank, "mixed_precision": "bf16", **settings}
                t0 = time.perf_counter()
                planned = planner.plan(arch, method, ONE_STEP[method], train=train, device="cpu", flops=False)
                t1 = time.perf_counter()
                real = planner.plan(arch, method, ONE_STEP[method], train=train, device="cpu", fake=False,
                                    flops=False)
                row = {"arch": arch.name, "method": method, "settings": label, "planned_bytes": planned.peak_bytes,
                       "real_bytes": real.peak_bytes, "ratio": planned.peak_bytes / real.peak_bytes,
                       "plan_s": round(t1 - t0, 2)}
                rows.append(row)
                print(f"{arch.name:10} {method:5} {label:20} planned {planned.peak_bytes / 2 ** 20:8.2f} MiB, "
                      f"real {real.peak_bytes / 2 ** 20:8.2f} MiB, ratio {row['ratio']:.4f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planner_accuracy.json").write_text(json.dumps({"batch": args.batch, "rank": args.rank, "rows": rows},
                                                          indent=1) + "\n")
    lines = ["| model | method | settings | planned MiB | real MiB | planned / real |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['method']} | {r['settings']} | {r['planned_bytes'] / 2 ** 20:.2f} | "
              f"{r['real_bytes'] / 2 ** 20:.2f} | {r['ratio']:.4f} |" for r in rows]
    worst = max(abs(r["ratio"] - 1) for r in rows)
    md = "\n".join(lines) + f"\n\nlargest difference: {100 * worst:.2f}% over {len(rows)} runs\n"
    (out / "planner_accuracy.md").write_text(f"Batch {args.batch}, rank {args.rank}, bf16 autocast, on this CPU.\n\n"
                                             + md)
    print("\n" + md)
    return rows


if __name__ == "__main__":
    main()
