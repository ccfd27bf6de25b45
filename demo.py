"""`distillery demo`: the whole story on the embedded tiny image world, on a CPU, in minutes.

Distils the shipped 16x16 digits teacher into a 1-step and a 4-step DMD2 LoRA student, then samples the
teacher (50 steps with CFG), both students, and the hybrid (one guided teacher interval, then the
4-step student), scores them with the shipped evaluator, and writes:

    <out>/comparison.png   rows: teacher 50 steps | student 1 step | student 4 steps | hybrid
    <out>/metrics.md       Fréchet distance, accuracy, diversity, recall, evaluations per sample, time
    <out>/metrics.json     the same numbers
    <out>/students/*.safetensors, <out>/runs/*   the LoRAs and their training runs (resumable)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# sized for a 2-core CPU (the tiny digits UNet costs ~1 s per DMD2 iteration at batch 8 there)
DEFAULT_STEPS = 200
DEFAULT_BATCH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="distillery_demo", help="output folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training iterations per student (default {DEFAULT_STEPS}; more is better on a GPU)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="training batch")
    parser.add_argument("--samples-per-class", type=int, default=20, help="samples per digit for the metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")


def _train_student(name: str, timesteps: str, steps: int, batch: int, out: Path, seed: int, quiet: bool):
    from .trainers import api
    from .worlds.tasks import DigitsTask

    task = DigitsTask()
    method = api.make_method("dmd2", student_timesteps=timesteps, guidance_scale=task.default_guidance,
                             update_ratio=2)
    config = api.TrainConfig(steps=steps, batch_size=batch, student_lr=5e-4, critic_lr=5e-4, lora_rank=16,
                             lr_schedule="cosine", seed=seed, checkpoint_every=50, preview_every=0, log_every=10,
                             run_dir=str(out / "runs" / name), weight_decay=0.0)
    t0 = time.perf_counter()
    result = api.distill(task, method, config, lora_path=out / "students" / f"digits_dmd2_{name}.safetensors",
                         progress=not quiet)
    result["seconds"] = time.perf_counter() - t0
    return task, method, result


def run(args: argparse.Namespace) -> int:
    from .core.models import Guided
    from .sampling import sample_ddim, sample_x0_renoise
    from .sampling.api import initial_state
    from .sampling.hybrid import sample_hybrid
    from .sampling.timesteps import timesteps_to_sigmas, trailing_timesteps
    from .worlds import digits

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    students = {}
    for name, ts in (("1step", "999"), ("4step", "999,749,499,249")):
        task, method, result = _train_student(name, ts, args.steps, args.batch_size, out, args.seed, args.quiet)
        trainer = result["trainer"]
        # sample with the exported (EMA) weights
        trainer.use_exported_student()
        students[name] = (task, trainer, result)

    task4, trainer4, _ = students["4step"]
    schedule = task4.base.schedule
    n = args.samples_per_class
    labels = torch.arange(10).repeat_interleave(n)
    cond, uncond = task4._labels_to_cond(labels)
    noise = torch.randn((len(labels), *task4.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    cfg = task4.default_guidance

    def run_sampler(fn, model, sigmas, **kw):
        x = initial_state(model, noise, float(sigmas[0]))
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn(model, x.clone(), sigmas, schedule=schedule, disable=True, **kw)
        return y, time.perf_counter() - t0

    rows = {}
    teacher = Guided(trainer4.roles.teacher, cond, uncond, cfg)
    teacher_sigmas = timesteps_to_sigmas(schedule, trailing_timesteps(50))
    rows["teacher 50 steps, CFG %.1f" % cfg] = (*run_sampler(sample_ddim, teacher, teacher_sigmas), teacher)
    for name, ts in (("1step", [999]), ("4step", [999, 749, 499, 249])):
        student = Guided(students[name][1].roles.student, cond)
        sig = timesteps_to_sigmas(schedule, ts)
        gen_seed = args.seed + 1
        rows[f"DMD2 student, {name[0]} step{'s' if name[0] != '1' else ''}"] = (
            *run_sampler(sample_x0_renoise, student, sig, extra_args={"seed": gen_seed}), student)
    # hybrid: the guided teacher covers the student's first interval (999 -> 749) on its own 50-step grid,
    # then the 4-step student continues from 749; the noisy latent is handed over, noise is added once
    base = Guided(trainer4.roles.teacher, cond, uncond, cfg)
    student4 = Guided(trainer4.roles.student, cond)
    t0 = time.perf_counter()
    with torch.no_grad():
        hybrid, info = sample_hybrid(base, student4, initial_state(base, noise, float(teacher_sigmas[0])),
                                     teacher_sigmas,
                                     timesteps_to_sigmas(schedule, [999, 749, 499, 249]), schedule=schedule,
                                     base_sampler="ddim", student_sampler="x0_renoise", student_index=1,
                                     extra_args={"seed": args.seed + 2}, disable=True)
    rows[f"hybrid: teacher to t={info['handoff_timestep']:.0f}, then student"] = (
        hybrid, time.perf_counter() - t0, (base, student4))

    metrics = {}
    for name, (images, seconds, model) in rows.items():
        models = model if isinstance(model, tuple) else (model,)
        m = digits.evaluate_samples(images.float(), labels)
        m["evals_per_sample"] = sum(mm.calls for mm in models)  # each call evaluates the whole batch once
        m["seconds_per_100"] = 100 * seconds / len(labels)
        metrics[name] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}

    grid_rows = []
    for images, _, _ in rows.values():
        picked = torch.stack([images[c * n + i] for i in range(2) for c in range(10)])
        grid_rows.append(picked)
    digits.image_grid(torch.cat(grid_rows).cpu(), nrow=20).save(out / "comparison.png")

    keys = ["fid", "accuracy", "diversity", "recall", "evals_per_sample", "seconds_per_100"]
    lines = ["| sampler | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3g}" for k in keys) + " |")
    train_info = {name: {"iterations": r[2]["step"], "seconds": round(r[2].get("seconds", 0.0), 1),
                         "lora": r[2].get("lora")} for name, r in students.items()}
    table = "\n".join(lines)
    (out / "metrics.md").write_text(
        f"# distillery demo\n\nRows of comparison.png, top to bottom: {', '.join(rows)}.\n\n{table}\n\n"
        f"Training: {json.dumps(train_info)}\nTotal wall time: {time.perf_counter() - started:.0f} s\n")
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "training": train_info}, indent=1))
    print(table)
    print(f"\nwrote {out / 'comparison.png'}, {out / 'metrics.md'} in {time.perf_counter() - started:.0f} s")
    return 0
