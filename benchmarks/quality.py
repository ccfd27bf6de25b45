"""Benchmark (not a test): student quality of every method on the digits world, on a CPU.

    python benchmarks/quality.py                         # DMD2 (+ GAN), SiD (LSG, Zero-CFG, Anti-CFG), TCD; ~32 min
    python benchmarks/quality.py --methods tcd --iterations 100 --per-class 20       # a quick look
    python benchmarks/quality.py --methods dmd2,phased_dmd --tag -phased             # Phased DMD vs DMD2, ~20 min
    python benchmarks/quality.py --methods dmd2_reg,phased_dmd_reg --phases 4 --iterations 1000   # + regression

The shipped digits teacher (16x16 class-conditional UNet, CFG 2) is distilled into LoRA students with the
project's trainers, one run per method and setting, all with the same budget (iterations, batch, rank,
learning rate). Each student is sampled from the same initial noise as

* DMD2 and SiD (trained on 999, 749, 499, 249 with backward simulation): 1 step (999), 2 steps (999, 499)
  and 4 steps, x0 + fresh noise; "DMD2 + GAN w" adds the diffusion-GAN term (weight w on the student, DMD2's
  1e-2 on the critic) against the digits training images;
* TCD: its own sampler with gamma 0.3 on the TCD grid at 1, 2, 4 and 8 steps;
* hybrid: one guided teacher step 999 -> 749, then the 4-step DMD2 (or Phased DMD) student's 749, 499, 249,
* "+ regression w": DMD's regression loss (option regression_weight w, --regression-weights) on 256 pairs of
  the guided teacher's noise -> 25-step DDIM sample, for DMD2 (dmd2_reg) and Phased DMD (phased_dmd_reg),
* Phased DMD with K experts (--phases): the same timesteps and budget (the iterations split over the phases),
  sampled at its 4 steps only, x0 + fresh noise with each expert on its own levels,

next to the teacher at 50 and at 4 DDIM steps with CFG. Scores (``worlds.digits.evaluate_samples``, the
shipped evaluator CNN): Fréchet distance to the test digits, class accuracy, diversity (per-class feature
variance), recall, model evaluations per sample (a CFG pair counts 2), and sampling seconds per 100 samples.

Writes quality_digits.json (raw numbers and settings), quality_digits.md (the table), quality_digits.png
(Fréchet distance and accuracy against evaluations per sample) and quality_digits_samples.png (the first
samples of every row). Training runs live in --cache and resume, so a second run only samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STUDENT_T = [999, 749, 499, 249]
PREFIXES = {1: [999], 2: [999, 499], 4: STUDENT_T}


def students(args) -> list[dict]:
    """Every trained student: a name, the method and its options."""
    out = []
    g = args.guidance
    for m in args.methods:
        if m == "dmd2":
            out.append({"name": "DMD2", "method": "dmd2", "options": {
                "student_timesteps": STUDENT_T, "guidance_scale": g, "update_ratio": 2}})
        elif m == "dmd2_gan":
            for w in args.gan_weights:
                out.append({"name": f"DMD2 + GAN {w:g}", "method": "dmd2", "options": {
                    "student_timesteps": STUDENT_T, "guidance_scale": g, "update_ratio": 2,
                    "gan_generator_weight": w}})
        elif m == "sid":
            for mode in args.sid_modes:
                label = {"lsg": f"LSG kappa {g:g}", "zero_cfg": "Zero-CFG", "anti_cfg": f"Anti-CFG kappa {g:g}"}
                out.append({"name": f"SiD {label[mode]}", "method": "sid", "options": {
                    "student_timesteps": STUDENT_T, "guidance": mode, "kappa": g}})
        elif m == "phased_dmd":  # Phased DMD: one expert per noise phase, the same budget split over the phases
            for k in args.phases:
                out.append({"name": f"Phased DMD K={k}", "method": "phased_dmd", "options": {
                    "student_timesteps": STUDENT_T, "phases": k, "guidance_scale": g, "update_ratio": 2}})
        elif m in ("dmd2_reg", "phased_dmd_reg"):  # DMD's regression loss on the teacher's noise -> sample pairs
            for w in args.regression_weights:
                if m == "dmd2_reg":
                    out.append({"name": f"DMD2 + regression {w:g}", "method": "dmd2", "options": {
                        "student_timesteps": STUDENT_T, "guidance_scale": g, "update_ratio": 2,
                        "regression_weight": w}})
                    continue
                for k in args.phases:
                    out.append({"name": f"Phased DMD K={k} + regression {w:g}", "method": "phased_dmd", "options": {
                        "student_timesteps": STUDENT_T, "phases": k, "guidance_scale": g, "update_ratio": 2,
                        "regression_weight": w}})
        elif m == "tcd":
            out.append({"name": "TCD", "method": "tcd", "options": {
                "mode": "tcd", "guidance_min": g, "guidance_max": g, "gamma": 0.3}})
        else:
            raise SystemExit(f"--methods: unknown method {m!r}; use dmd2, dmd2_gan, dmd2_reg, phased_dmd, "
                             "phased_dmd_reg, sid, tcd")
    return out


def train(spec: dict, args, task=None) -> tuple:
    """Train (or resume a finished run of) one student; returns (task, trainer, seconds). `task`: a digits task
    made by the caller (e.g. a teacher with a LoRA merged in; spec["name"] must then say so: it names the run)."""
    from comfyui_distillery.trainers import api
    from comfyui_distillery.worlds.tasks import DigitsTask

    task = task if task is not None else DigitsTask(guidance=args.guidance)
    method = api.make_method(spec["method"], **spec["options"])
    tag = spec["name"].lower().replace(" ", "_").replace(".", "")
    seed = f"-seed{args.seed}" if args.seed else ""  # the training seed names the run, so --seed retrains
    run_dir = Path(args.cache).expanduser() / f"{tag}-it{args.iterations}-b{args.batch}-r{args.rank}-lr{args.lr:g}"
    run_dir = run_dir.with_name(run_dir.name + seed)
    config = api.TrainConfig(steps=args.iterations, batch_size=args.batch, lora_rank=args.rank, student_lr=args.lr,
                             critic_lr=args.lr, lr_schedule="cosine", weight_decay=0.0, seed=args.seed,
                             checkpoint_every=50, keep_checkpoints=1, log_every=10, run_dir=str(run_dir))
    t0 = time.perf_counter()
    result = api.distill(task, method, config, progress=not args.quiet)
    trainer = result["trainer"]
    seconds = time.perf_counter() - t0
    times = [json.loads(line).get("time") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if result["resumed"] and len(times) > 1:  # a cached run: report when it trained, not the reload
        seconds = times[-1] - times[0] + (times[1] - times[0])
    trainer.use_exported_student()
    return task, trainer, seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="dmd2,dmd2_gan,sid,tcd")
    p.add_argument("--gan-weights", default="0.005,0.05", help="dmd2_gan: the student's GAN weights to try")
    p.add_argument("--sid-modes", default="lsg,zero_cfg,anti_cfg")
    p.add_argument("--phases", default="2,4", help="phased_dmd: the numbers of experts to train")
    p.add_argument("--regression-weights", default="0.25",
                   help="dmd2_reg / phased_dmd_reg: the regression loss weights to try")
    p.add_argument("--tag", default="", help="suffix of the output files (quality_digits<tag>.*)")
    p.add_argument("--iterations", type=int, default=200, help="training iterations per student")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--guidance", type=float, default=2.0, help="teacher CFG (the digits teacher's default)")
    p.add_argument("--per-class", type=int, default=50, help="samples per digit for the scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="~/.cache/distillery/quality")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    args.sid_modes = [m.strip() for m in args.sid_modes.split(",") if m.strip()]
    args.gan_weights = [float(w) for w in args.gan_weights.split(",") if w.strip()]
    args.phases = [int(k) for k in args.phases.split(",") if k.strip()]
    args.regression_weights = [float(w) for w in args.regression_weights.split(",") if w.strip()]
    torch.set_num_threads(args.threads)

    from comfyui_distillery.core.models import Guided
    from comfyui_distillery.sampling import sample_ddim, sample_tcd, sample_x0_renoise
    from comfyui_distillery.sampling.hybrid import sample_hybrid
    from comfyui_distillery.sampling.timesteps import lcm_tcd_timesteps, timesteps_to_sigmas, trailing_timesteps
    from comfyui_distillery.worlds import digits

    started = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows, pictures = [], []

    def add(name, kind, images, seconds, evals, **extra):
        m = digits.evaluate_samples(images.float().clamp(-1, 1), labels)
        row = {"name": name, "kind": kind, "evals": evals, "seconds_per_100": 100 * seconds / len(labels),
               **{k: float(m[k]) for k in ("fid", "accuracy", "diversity", "recall")}, **extra}
        rows.append(row)
        pictures.append((name, images[torch.arange(10) * args.per_class]))
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)

    def run(fn, model, sigmas, noise, **kw):
        model.calls = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn(model, noise * float(sigmas[0]), sigmas, schedule=schedule, disable=True, **kw)
        return y, time.perf_counter() - t0, model.calls

    trained = []
    for spec in students(args):
        task, trainer, seconds = train(spec, args)
        trained.append((spec, task, trainer, seconds))
        print(f"{spec['name']}: {trainer.step} iterations, {seconds:.0f} s", flush=True)

    from comfyui_distillery.worlds.tasks import DigitsTask

    task0 = trained[0][1] if trained else DigitsTask(guidance=args.guidance)
    schedule = task0.base.schedule
    cond, uncond = task0._labels_to_cond(labels)
    noise = torch.randn((len(labels), *task0.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    teacher_model = trained[0][2].roles.teacher if trained else task0.base
    for n in (50, 4):
        teacher = Guided(teacher_model, cond, uncond, args.guidance)
        add(f"teacher {n} DDIM steps, CFG {args.guidance:g}", "teacher",
            *run(sample_ddim, teacher, timesteps_to_sigmas(schedule, trailing_timesteps(n)), noise), steps=n)

    for spec, task, trainer, seconds in trained:
        student = Guided(trainer.roles.student, cond)
        common = {"student": spec["name"], "method": spec["method"], "options": spec["options"],
                  "train_seconds": seconds,
                  "iterations": trainer.step}
        if spec["method"] == "tcd":
            for n in (1, 2, 4, 8):
                sig = timesteps_to_sigmas(schedule, lcm_tcd_timesteps(n))
                add(f"{spec['name']} {n} step{'s' * (n > 1)} (gamma 0.3)", "student",
                    *run(sample_tcd, student, sig, noise, gamma=0.3, extra_args={"seed": args.seed + 1}),
                    steps=n, **common)
            continue
        # Phased DMD's experts hand over at trained levels: only its full 4 steps
        for n, ts in ({4: STUDENT_T} if spec["method"] == "phased_dmd" else PREFIXES).items():
            add(f"{spec['name']} {n} step{'s' * (n > 1)}", "student",
                *run(sample_x0_renoise, student, timesteps_to_sigmas(schedule, ts), noise,
                     extra_args={"seed": args.seed + 1}), steps=n, **common)
        if spec["name"] == "DMD2" or spec["method"] == "phased_dmd":  # the hybrid hand-off, to each DM student
            base = Guided(trainer.roles.teacher, cond, uncond, args.guidance)
            t0 = time.perf_counter()
            top = timesteps_to_sigmas(schedule, [999, 749])
            with torch.no_grad():
                x, info = sample_hybrid(base, student, noise * float(top[0]), top,
                                        timesteps_to_sigmas(schedule, STUDENT_T), schedule=schedule, base_steps=1,
                                        base_sampler="ddim", student_sampler="x0_renoise",
                                        extra_args={"seed": args.seed + 1}, disable=True)
            add(f"hybrid: 1 teacher step to t={info['handoff_timestep']:.0f}, then {spec['name']}", "hybrid", x,
                time.perf_counter() - t0, info["evals_per_sample"], steps=4, **common)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": args.threads, "torch": torch.__version__}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    result = {"world": "digits", "settings": settings, "machine": machine, "rows": rows,
              "wall_seconds": time.perf_counter() - started}
    stem = f"quality_digits{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(rows) + against_teacher(rows)
    (out / f"{stem}.md").write_text(
        f"Digits world, {len(labels)} samples, teacher CFG {args.guidance:g}; students: {args.iterations} "
        f"iterations at batch {args.batch}, LoRA rank {args.rank}, lr {args.lr:g}.\n\n{md}\n")
    plot(rows, out / f"{stem}.png")
    sample_grid(pictures, out / f"{stem}_samples.png")
    print("\n" + md + f"\n\nwrote {out}/{stem}.(json|md|png) in {result['wall_seconds']:.0f} s")
    return result


def table(rows) -> str:
    cols = [("evals", "{:d}"), ("fid", "{:.2f}"), ("accuracy", "{:.3f}"), ("diversity", "{:.2f}"),
            ("recall", "{:.3f}"), ("seconds_per_100", "{:.2f}"), ("train_seconds", "{:.0f}")]
    lines = ["| sampler | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f.format(r[c]) if c in r else "" for c, f in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against_teacher(rows) -> str:
    """The 4-step students against the teacher's 50 steps: the diversity kept (goal >= 90%) and the Fréchet
    distance as a multiple of the teacher's (goal <= 1.5x), issue 18's bar."""
    ref = next((r for r in rows if r["kind"] == "teacher" and r.get("steps") == 50), None)
    four = [r for r in rows if r["kind"] == "student" and r.get("steps") == 4]
    if ref is None or not four:
        return ""
    lines = ["", "", "4-step students against the teacher's 50 steps (goal: diversity >= 90%, Fréchet <= 1.5x):", "",
             "| student | diversity kept | Fréchet / teacher's | both goals |", "|---|---|---|---|"]
    for r in four:
        kept, ratio = r["diversity"] / ref["diversity"], r["fid"] / ref["fid"]
        lines.append(f"| {r['name']} | {kept:.0%} | {ratio:.2f}x | {'yes' if kept >= 0.9 and ratio <= 1.5 else 'no'} |")
    return "\n".join(lines)


def plot(rows, path) -> None:
    try:
        import matplotlib
    except ImportError:  # the tables are the results; the figure is optional
        print(f"matplotlib is not installed: {path.name} not drawn")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict = {}
    for r in rows:  # one line per student over its step counts; teachers and hybrids as single markers
        groups.setdefault(r["student"] if r["kind"] == "student" else r["name"], []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["evals"])
        style = {"teacher": "*", "hybrid": "D", "student": "o-"}[rs[0]["kind"]]
        for ax, metric in zip(axes, ("fid", "accuracy")):
            ax.plot([r["evals"] for r in rs], [r[metric] for r in rs], style, label=name, markersize=8)
    for ax, metric in zip(axes, ("Fréchet distance (lower is better)", "accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations per sample (CFG pair = 2)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Digits world: students vs teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(pictures, path) -> None:
    from PIL import Image, ImageDraw

    from comfyui_distillery.worlds import digits

    tiles = [digits.image_grid(images.cpu(), nrow=10, scale=3) for _, images in pictures]
    label_w = 300
    w = label_w + max(t.width for t in tiles)
    canvas = Image.new("RGB", (w, sum(t.height + 2 for t in tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (name, _), tile in zip(pictures, tiles):
        draw.text((4, y + tile.height // 2 - 6), name, fill=(0, 0, 0))
        canvas.paste(tile.convert("RGB"), (label_w, y))
        y += tile.height + 2
    canvas.save(path)


if __name__ == "__main__":
    main()
