"""Benchmark (not a test): LoRAs trained on the base, on a distilled student, on the digits world (issue 17).

    python benchmarks/control_transfer.py                   # 25 min of CPU on one thread; results/control_transfer.*
    python benchmarks/control_transfer.py --no-control --strengths 1        # ~19 min (estimated): no control, no 0.5 rows
    python benchmarks/control_transfer.py --per-class 5 --iterations 40 --lora-steps 30 --teacher-steps 10 \
        --no-class-lora --out /tmp/ct                        # a quick look (the numbers mean little)

Two LoRAs are fine-tuned on the shipped digits teacher with its own denoising loss (worlds/digits/style.py,
seeded, cached in --cache as kohya .safetensors): **bold**, a style (the training digits dilated by one
pixel: mean ink 0.305 -> 0.436), and **3->8**, a class LoRA (the prompt "3" draws 8s). Students are 4-step
DMD2 LoRAs with benchmarks/quality.py's recipe (200 iterations at batch 8, rank 16, lr 5e-4, teacher CFG 2,
timesteps 999, 749, 499, 249; quality.train, so the bare student is quality.py's DMD2 student):

* **control transfer**: the LoRA applied at a strength to (a) the base teacher, 50 DDIM steps with CFG 2, and
  (b) the student distilled from the bare base, the LoRA merged under the student's adapter (what ComfyUI's
  LoraLoader stack of the two LoRAs computes: W + s dW_lora + dW_student). Effect = metric with the LoRA minus
  metric without, on the same noise; ratio = student effect / base effect, per metric;
* **a styled teacher**: a student distilled from (base + bold), its adapter trained on the merged weights (as a
  ComfyUI job with a teacher LoRA stack does), sampled with bold under it (as its card says) and without; and
  a control, a student on the *bare* base distilled from a separate (base + bold) teacher: its style can only
  come from the distillation loss, not from the weights it starts from.

Scores on the same samples: ink (mean stroke mass, the style metric; references: the test digits 0.30 and the
bold test digits), Fréchet distance to the test digits and to the bold test digits, accuracy, diversity and
recall (the shipped evaluator), and "3 as 8" (share of the "3" prompts the evaluator calls 8).

Writes control_transfer.json, control_transfer.md and control_transfer.png (rows of samples) into --out.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (the digits students' recipe and the sample grid)

STUDENT_T = quality.STUDENT_T
METRICS = ("ink", "fid", "fid_bold", "accuracy", "diversity", "recall", "three_as_eight")
LABELS = {"ink": "ink", "fid": "Fréchet", "fid_bold": "Fréchet to bold", "accuracy": "accuracy",
          "diversity": "diversity", "recall": "recall", "three_as_eight": "3 as 8"}
# the metrics a LoRA kind is judged on in the transfer table (its own measure first)
TRANSFER_METRICS = {"bold": ("ink", "fid_bold", "fid", "accuracy", "diversity"),
                    "3->8": ("three_as_eight", "accuracy", "fid", "diversity")}


def lora_settings(kind: str, args) -> dict:
    steps = args.lora_steps if kind == "bold" else args.class_lora_steps
    return {"kind": kind, "steps": steps, "batch": args.lora_batch, "rank": args.lora_rank, "lr": args.lora_lr,
            "seed": args.seed}


def make_lora(kind: str, args) -> tuple[dict, dict]:
    """The LoRA of `kind`, trained once per settings and kept in --cache; returns (kohya state, info)."""
    from safetensors.torch import load_file

    from comfyui_distillery.trainers.lora import read_lora_metadata, save_lora
    from comfyui_distillery.worlds.digits import style

    settings = lora_settings(kind, args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(args.cache).expanduser() / f"digits-{kind.replace('->', 'to')}-{key}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        images, labels = style.style_data(kind)
        t0 = time.perf_counter()
        state, losses = style.train_lora(images, labels, steps=settings["steps"], batch=settings["batch"],
                                         rank=settings["rank"], lr=settings["lr"], seed=settings["seed"])
        info = {**settings, "train_seconds": time.perf_counter() - t0,
                "loss_first_10": sum(losses[:10]) / len(losses[:10]), "loss_last_10": sum(losses[-10:]) / 10}
        save_lora(path, state, {"digits_lora": info})
        print(f"LoRA {kind}: {settings['steps']} steps in {info['train_seconds']:.0f} s -> {path}", flush=True)
    info = read_lora_metadata(path)["digits_lora"]
    return load_file(str(path)), {**info, "file": path.name, "hash": key}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=200, help="DMD2 iterations per student")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--guidance", type=float, default=2.0, help="teacher CFG (the digits teacher's default)")
    p.add_argument("--lora-steps", type=int, default=100, help="fine-tuning steps of the bold LoRA")
    p.add_argument("--class-lora-steps", type=int, default=100, help="fine-tuning steps of the 3->8 LoRA")
    p.add_argument("--lora-batch", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--strengths", default="0.5,1", help="LoRA strengths of the bold LoRA's transfer rows")
    p.add_argument("--no-class-lora", dest="class_lora", action="store_false", help="skip the 3->8 LoRA")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the student on the bare base distilled from a separate bold teacher")
    p.add_argument("--teacher-steps", type=int, default=50, help="DDIM steps of the teacher rows")
    p.add_argument("--per-class", type=int, default=20, help="samples per digit, the same noise for every row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="~/.cache/distillery/control_transfer")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    torch.set_num_threads(args.threads)

    from comfyui_distillery.core.models import DiffusersUNetModel, Guided
    from comfyui_distillery.sampling import sample_ddim, sample_x0_renoise
    from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas, trailing_timesteps
    from comfyui_distillery.trainers.lora import merged_kohya_unet_lora
    from comfyui_distillery.worlds import digits
    from comfyui_distillery.worlds.digits import style
    from comfyui_distillery.worlds.tasks import DigitsTask

    started, cpu_started = time.perf_counter(), time.process_time()
    loras = {"bold": make_lora("bold", args)}
    if args.class_lora:
        loras["3->8"] = make_lora("3->8", args)

    labels = torch.arange(10).repeat_interleave(args.per_class)
    test_x, test_y = digits.load_digits_16("test")
    bold_reference = (style.bold(test_x), test_y)
    base_task = DigitsTask(guidance=args.guidance)
    schedule = base_task.base.schedule
    cond, uncond = base_task._labels_to_cond(labels)
    noise = torch.randn((len(labels), *base_task.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    rows, pictures = [], []

    def add(name, model, images, seconds, **extra):
        images = images.float().clamp(-1, 1)
        m = digits.evaluate_samples(images, labels)
        m_bold = digits.evaluate_samples(images, labels, reference=bold_reference)
        row = {"name": name, "model": model, "seconds": seconds,
               "ink": float(style.ink(images).mean()), "fid": m["fid"], "fid_bold": m_bold["fid"],
               "accuracy": m["accuracy"], "diversity": m["diversity"], "recall": m["recall"],
               "three_as_eight": style.drawn_as(images[labels == style.STYLE_SOURCE]), **extra}
        rows.append(row)
        pictures.append((name, images[torch.arange(10) * args.per_class]))
        print(f"{name}: " + ", ".join(f"{k} {row[k]:.3g}" for k in METRICS), flush=True)
        return row

    def sample_teacher(model):
        sig = timesteps_to_sigmas(schedule, trailing_timesteps(args.teacher_steps))
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_ddim(Guided(model, cond, uncond, args.guidance), noise * float(sig[0]), sig,
                            schedule=schedule, disable=True)
        return x, time.perf_counter() - t0

    def sample_student(trainer):
        sig = timesteps_to_sigmas(schedule, STUDENT_T)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_x0_renoise(Guided(trainer.roles.student, cond), noise * float(sig[0]), sig, schedule=schedule,
                                  extra_args={"seed": args.seed + 1}, disable=True)
        return x, time.perf_counter() - t0

    def with_loras(model_name, unet, sample):
        """The model alone, then with each LoRA at each strength merged in (restored after each)."""
        add(model_name, model_name, *sample(), lora=None, strength=0.0)
        for kind, (state, info) in loras.items():
            for s in (strengths if kind == "bold" else [1.0]):
                with merged_kohya_unet_lora(unet, state, s):
                    add(f"{model_name} + {kind} {s:g}", model_name, *sample(), lora=kind, strength=s)

    # (a) the base teacher with its 50-step sampler
    with_loras("teacher", base_task.base.unet, lambda: sample_teacher(base_task.base))

    dmd2 = quality.students(SimpleNamespace(methods=["dmd2"], guidance=args.guidance))[0]
    students = {}

    def distil(name, task):
        _, trainer, seconds = quality.train({**dmd2, "name": name}, args, task=task)
        print(f"{name}: {trainer.step} iterations, {seconds:.0f} s", flush=True)
        students[name] = seconds
        return trainer

    # (b) the student of the bare base, with the base's LoRAs stacked under its adapter
    trainer = distil("DMD2", DigitsTask(guidance=args.guidance))
    with_loras("student", trainer.roles.base.unet, lambda: sample_student(trainer))

    # a student of (base + bold): its adapter trained on the merged weights, sampled with bold under it and without
    bold_state, bold_info = loras["bold"]
    styled = DigitsTask(guidance=args.guidance)
    with merged_kohya_unet_lora(styled.base.unet, bold_state, 1.0):
        trainer = distil(f"DMD2 teacher+bold {bold_info['hash']}", styled)
        add("student of teacher+bold, bold under it", "student of teacher+bold", *sample_student(trainer),
            lora="bold", strength=1.0)
    add("student of teacher+bold, without bold", "student of teacher+bold", *sample_student(trainer),
        lora=None, strength=0.0)

    if args.control:  # the adapter on the bare base, the bold teacher a separate network
        control = DigitsTask(guidance=args.guidance)
        teacher_unet = copy.deepcopy(control.base.unet)
        control.teacher = DiffusersUNetModel(teacher_unet, schedule)
        with merged_kohya_unet_lora(teacher_unet, bold_state, 1.0):
            trainer = distil(f"DMD2 bare base separate teacher+bold {bold_info['hash']}", control)
        add("student on the bare base, distilled from a separate teacher+bold", "control", *sample_student(trainer),
            lora=None, strength=0.0)

    transfer = transfer_rows(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": args.threads, "torch": torch.__version__}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    result = {"world": "digits", "settings": settings, "machine": machine,
              "loras": {k: info for k, (_, info) in loras.items()}, "student_train_seconds": students,
              "references": {"ink_test": float(style.ink(test_x).mean()),
                             "ink_bold_test": float(style.ink(bold_reference[0]).mean())},
              "rows": rows, "transfer": transfer, "wall_seconds": time.perf_counter() - started,
              "cpu_seconds": time.process_time() - cpu_started}
    (out / "control_transfer.json").write_text(json.dumps(result, indent=1) + "\n")
    md = report(result, len(labels))
    (out / "control_transfer.md").write_text(md)
    quality.sample_grid(pictures, out / "control_transfer.png")
    print("\n" + md + f"\nwrote {out}/control_transfer.(json|md|png) in {result['wall_seconds']:.0f} s")
    return result


def transfer_rows(rows) -> list[dict]:
    """Per LoRA and strength: the LoRA's effect on the base teacher and on the bare base's student (metric
    with it minus without, same noise) and their ratio."""
    plain = {r["model"]: r for r in rows if r.get("lora") is None}
    out = []
    for r in rows:
        if r["model"] != "teacher" or r.get("lora") is None:
            continue
        student = next((s for s in rows if s["model"] == "student" and s.get("lora") == r["lora"]
                        and s["strength"] == r["strength"]), None)
        if student is None:
            continue
        for metric in TRANSFER_METRICS[r["lora"]]:
            base_effect = r[metric] - plain["teacher"][metric]
            student_effect = student[metric] - plain["student"][metric]
            out.append({"lora": r["lora"], "strength": r["strength"], "metric": metric,
                        "base_without": plain["teacher"][metric], "base_effect": base_effect,
                        "student_without": plain["student"][metric], "student_effect": student_effect,
                        "ratio": student_effect / base_effect if base_effect else None})
    return out


def report(result, n) -> str:
    s = result["settings"]
    lines = [f"Digits world, {n} samples per row (the same noise for every row); teacher {s['teacher_steps']} DDIM "
             f"steps, CFG {s['guidance']:g}; students 4-step DMD2, {s['iterations']} iterations at batch "
             f"{s['batch']}, rank {s['rank']}, lr {s['lr']:g}. LoRAs: "
             + "; ".join(f"{k} ({v['steps']} steps, batch {v['batch']}, rank {v['rank']}, lr {v['lr']:g})"
                         for k, v in result["loras"].items())
             + f". Ink of the test digits {result['references']['ink_test']:.3f}, of the bold test digits "
             f"{result['references']['ink_bold_test']:.3f}. Run: {result['wall_seconds'] / 60:.0f} min wall, "
             f"{result.get('cpu_seconds', float('nan')) / 60:.0f} min CPU ({s['threads']} torch thread"
             f"{'s' * (s['threads'] > 1)}).", "",
             "| samples | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    formats = {"ink": "{:.3f}", "accuracy": "{:.3f}", "recall": "{:.3f}", "three_as_eight": "{:.2f}"}
    for r in result["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(formats.get(m, "{:.2f}").format(r[m]) for m in METRICS) + " |")
    lines += ["", "Control transfer: the LoRA's effect (with minus without) on the base teacher and on the student "
              "of the bare base (the LoRA merged under its adapter), and the ratio student / base.", "",
              "| LoRA | strength | metric | base without | base effect | student without | student effect | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for t in result["transfer"]:
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['lora']} | {t['strength']:g} | {LABELS[t['metric']]} | {t['base_without']:.3f} | "
                     f"{t['base_effect']:+.3f} | {t['student_without']:.3f} | {t['student_effect']:+.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
