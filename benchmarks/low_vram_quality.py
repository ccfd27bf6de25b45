"""Benchmark (not a test): what each low-VRAM setting costs in quality, on the digits world, on a CPU.

    python benchmarks/low_vram_quality.py                 # 6 students of 200 iterations, ~15 min on 2 cores
    python benchmarks/low_vram_quality.py --iterations 60 --per-class 20      # a quick look

One 4-step DMD2 student per setting, all with benchmarks/quality.py's budget and seed (the same data, noise
and initialisation; `micro_batch_size=1` draws the same batch in passes of one sample, so its noise differs),
sampled from the same initial noise (x0 + fresh noise at 999, 749, 499, 249) and scored with the shipped
evaluator: Fréchet distance to the test digits, class accuracy, diversity. Settings: the default; the frozen
base in fp8 (trainers/fp8.py: the teacher is the fp8 model too); LoRA on attention layers only; micro-batches
of 1; AdamW without foreach; the low-VRAM preset on a CPU (fp8 base, foreach off). 8-bit AdamW
(bitsandbytes) runs on CUDA GPUs only: it is not measured here.

Writes low_vram_quality.json and low_vram_quality.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STUDENT_T = [999, 749, 499, 249]
SETTINGS = {
    "default": {},
    "fp8 base": {"fp8_base": True},
    "LoRA on attention only": {"lora_targets": "attention"},
    "micro-batches of 1": {"micro_batch_size": 1},
    "AdamW foreach off": {"foreach": False},
    "low-VRAM preset (CPU: fp8 base, foreach off)": {"fp8_base": True, "foreach": False},
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default=",".join(SETTINGS), help="which rows, by name, comma-separated")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. -seed1)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from comfyui_distillery.core.models import Guided
    from comfyui_distillery.sampling import sample_ddim, sample_x0_renoise
    from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas, trailing_timesteps
    from comfyui_distillery.trainers import api
    from comfyui_distillery.worlds import digits
    from comfyui_distillery.worlds.tasks import DigitsTask

    started = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []

    def score(name, images, **extra):
        m = digits.evaluate_samples(images.float().clamp(-1, 1), labels)
        row = {"name": name, **{k: float(m[k]) for k in ("fid", "accuracy", "diversity")}, **extra}
        rows.append(row)
        print(f"{name}: FD {row['fid']:.3g}, accuracy {row['accuracy']:.3f}, diversity {row['diversity']:.3g}",
              flush=True)

    noise = None
    scratch = tempfile.mkdtemp(prefix="distillery-low-vram-")  # checkpoints of the runs: not results
    chosen = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SETTINGS]
    if unknown:
        p.error(f"--settings: {unknown[0]!r} is none of: {', '.join(SETTINGS)}")
    for name, settings in ((n, SETTINGS[n]) for n in chosen):
        task = DigitsTask(guidance=args.guidance)
        method = api.make_method("dmd2", student_timesteps=STUDENT_T, guidance_scale=args.guidance, update_ratio=2)
        config = api.TrainConfig(steps=args.iterations, batch_size=args.batch, lora_rank=args.rank,
                                 student_lr=args.lr, critic_lr=args.lr, lr_schedule="cosine", weight_decay=0.0,
                                 seed=args.seed, checkpoint_every=0, preview_every=0, log_every=10 ** 9,
                                 run_dir=str(Path(scratch) / name.split(" (")[0].replace(" ", "_")), **settings)
        t0 = time.perf_counter()
        result = api.distill(task, method, config, progress=not args.quiet, resume=False)
        seconds = time.perf_counter() - t0
        trainer = result["trainer"]
        trainer.use_exported_student()
        schedule = task.base.schedule
        cond, uncond = task._labels_to_cond(labels)
        if noise is None:
            noise = torch.randn((len(labels), *task.sample_shape), generator=torch.Generator().manual_seed(args.seed))
            with torch.no_grad():
                sig = timesteps_to_sigmas(schedule, trailing_timesteps(50))
                teacher = Guided(trainer.roles.teacher, cond, uncond, args.guidance)
                score(f"teacher 50 DDIM steps, CFG {args.guidance:g}", sample_ddim(
                    teacher, noise * float(sig[0]), sig, schedule=schedule, disable=True))
        sig = timesteps_to_sigmas(schedule, STUDENT_T)
        with torch.no_grad():
            x = sample_x0_renoise(Guided(trainer.roles.student, cond), noise * float(sig[0]), sig, schedule=schedule,
                                  extra_args={"seed": args.seed + 1}, disable=True)
        trained = sum(p.numel() for p in trainer.roles.trainable["student"])
        score(f"DMD2 4 steps, {name}", x, settings=settings, train_seconds=seconds, student_params=trained)

    shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"world": "digits", "settings": {k: v for k, v in vars(args).items() if k not in ("out", "quiet", "tag")},
              "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
              "rows": rows, "wall_seconds": time.perf_counter() - started}
    (out / f"low_vram_quality{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| student | Fréchet | accuracy | diversity | trained params | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['fid']:.3g} | {r['accuracy']:.3f} | {r['diversity']:.3g} | "
                     f"{r.get('student_params', '')} | {r.get('train_seconds', 0):.0f} |")
    md = "\n".join(lines)
    (out / f"low_vram_quality{args.tag}.md").write_text(
        f"Digits world, {len(labels)} samples; 4-step DMD2 students, {args.iterations} iterations at batch "
        f"{args.batch}, rank {args.rank}, lr {args.lr:g}, seed {args.seed}.\n\n{md}\n")
    print("\n" + md + f"\n\nwrote {out}/low_vram_quality{args.tag}.(json|md) in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
