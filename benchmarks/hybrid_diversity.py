"""Benchmark (not a test): does hybrid base-then-student sampling restore the base model's diversity?

    python benchmarks/hybrid_diversity.py                 # both worlds, cached students when present
    python benchmarks/hybrid_diversity.py --world gmm --train-steps 3000

For each offline world it samples, from the same initial noise:

* base: the teacher with CFG on its own N-step grid (deterministic DDIM),
* student at 1, 2 and 4 steps: a DMD2 student trained with the project's trainer on timesteps
  999, 749, 499, 249 (sampled on 999 / 999, 499 / all four; x0 + fresh noise),
* hybrid: 1 or 2 guided base steps from t=999 down to the student's level 749, then the student's
  749, 499, 249 (and: 1 base step to 499 then the 2-step student's 499; the reference implementation's
  setting, 5 of 20 base steps to 749),

and reports diversity, fidelity and model evaluations per sample (a CFG pair counts 2):

* Gaussian mixture (exact teacher, 4 classes x a heavy 0.7 and a light 0.3 mode): per-mode recall
  (``worlds.gmm``: a sample counts for a mode only if it lies within 3 std of it, so it mixes composition and
  fidelity), mode coverage (the same without the on-manifold test: which mode each sample chose, i.e. the
  composition), the light modes' share (truth 0.3), the share of samples that pick the same mode as the
  base's sample from the same noise, per-class variance, SWD and Fréchet distance to exact samples;
* digits: per-class feature variance and recall, Fréchet distance and accuracy (``worlds.digits``).

The issue's bar, checked for each diversity metric: a hybrid with one guided base step keeps >= 95% of the
base's diversity at no more than its student's evaluations plus one guided base step (2).

Writes benchmarks/results/hybrid_diversity.json and PNGs (scatter panels / image grids, and a
diffusion-target grid of a hybrid run). Students are cached in --cache (default ~/.cache/distillery).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch

from comfyui_distillery.core.models import Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule
from comfyui_distillery.sampling import sample_ddim, sample_x0_renoise, timesteps_to_sigmas
from comfyui_distillery.sampling.diffusion_targets import DTCollector, dt_grid_image
from comfyui_distillery.sampling.hybrid import sample_hybrid
from comfyui_distillery.sampling.api import initial_state

HERE = Path(__file__).resolve().parent
STUDENT_T = [999, 749, 499, 249]
BAR = 0.95


def base_grid(n: int) -> list[int]:
    """ComfyUI's "simple" scheduler grid on a 1000-step VP model: 999, 999 - 1000/n, ..."""
    return [999 - int(i * 1000 / n) for i in range(n)]


def variants(base_steps_n: int) -> list[dict]:
    """Every sampled row: name, kind, student timesteps, base grid and base steps of a hybrid."""
    return [
        {"name": f"base {base_steps_n} steps (CFG)", "kind": "base", "base_t": base_grid(base_steps_n)},
        {"name": "student 1 step", "kind": "student", "student_t": [999]},
        {"name": "student 2 steps", "kind": "student", "student_t": [999, 499]},
        {"name": "student 4 steps", "kind": "student", "student_t": STUDENT_T},
        {"name": "hybrid 1 base step + student 749,499,249", "kind": "hybrid", "base_t": [999, 749],
         "base_steps": 1, "student_t": STUDENT_T, "bar_against": "student 4 steps"},
        {"name": "hybrid 2 base steps + student 749,499,249", "kind": "hybrid", "base_t": [999, 874, 749],
         "base_steps": 2, "student_t": STUDENT_T},
        {"name": "hybrid 1 base step + student 499", "kind": "hybrid", "base_t": [999, 499], "base_steps": 1,
         "student_t": [999, 499], "bar_against": "student 2 steps"},
        {"name": "hybrid 5/20 base steps + student 749,499,249 (reference)", "kind": "hybrid",
         "base_t": base_grid(20), "base_steps": 5, "student_t": STUDENT_T},
    ]


def run_variant(v, schedule, teacher_guided, student_guided, x_init, seed, callback=None):
    """One row: (x0 samples, evaluations per sample, hand-off info or None)."""
    teacher_guided.calls = student_guided.calls = 0
    if v["kind"] == "base":
        x = sample_ddim(teacher_guided, x_init, timesteps_to_sigmas(schedule, v["base_t"]), schedule=schedule,
                        callback=callback, disable=True)
        return x, teacher_guided.calls, None
    if v["kind"] == "student":
        x = sample_x0_renoise(student_guided, x_init, timesteps_to_sigmas(schedule, v["student_t"]),
                              schedule=schedule, extra_args={"seed": seed}, callback=callback, disable=True)
        return x, student_guided.calls, None
    x, info = sample_hybrid(teacher_guided, student_guided, x_init, timesteps_to_sigmas(schedule, v["base_t"]),
                            timesteps_to_sigmas(schedule, v["student_t"]), schedule=schedule,
                            base_steps=v["base_steps"], base_sampler="ddim", student_sampler="x0_renoise",
                            extra_args={"seed": seed}, callback=callback, disable=True)
    return x, info["evals_per_sample"], info


def cache_key(**config) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


# --- Gaussian-mixture world ---------------------------------------------------------------------------------

def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two point sets [N, d] (float64, sqrtm via eigh)."""
    def stats(x):
        x = x.detach().double().cpu()
        return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])

    def sqrtm(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    (m1, s1), (m2, s2) = stats(a), stats(b)
    r1 = sqrtm(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float(((m1 - m2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def gmm_student(args, schedule, guidance):
    """A DMD2 student (full finetune of the MLP fitted to the exact teacher), cached by its config."""
    from comfyui_distillery.trainers import api
    from comfyui_distillery.worlds.tasks import GaussianMixtureTask
    from comfyui_distillery.worlds.mlp import MLPDenoiser

    config = dict(world="gmm", prediction="v_prediction", width=256, fit_steps=2000, steps=args.train_steps,
                  batch=args.train_batch, guidance=guidance, timesteps=STUDENT_T, student_lr=args.lr,
                  critic_lr=2 * args.lr, lr_schedule="cosine", ema=0.99, seed=0, v=2)
    path = Path(args.cache).expanduser() / f"gmm_dmd2_{cache_key(**config)}.pt"
    from comfyui_distillery.worlds.gmm import GaussianMixture

    mixture = GaussianMixture.default()
    if path.exists() and not args.retrain:
        student = MLPDenoiser(schedule, mixture.dim, mixture.num_classes + 1, width=256)
        student.load_state_dict(torch.load(path, weights_only=True))
        print(f"gmm: cached student {path}")
        return student.eval(), config, str(path)
    t0 = time.time()
    fit_path = path.parent / f"gmm_fit_{cache_key(prediction='v_prediction', width=256, fit_steps=2000, seed=0)}.pt"
    if fit_path.exists() and not args.retrain:  # the MLP fitted to the exact teacher (DMD2's initialisation)
        task = GaussianMixtureTask(mixture, schedule, width=256, fit_steps=0, seed=0)
        task.base.load_state_dict(torch.load(fit_path, weights_only=True))
    else:
        task = GaussianMixtureTask(mixture, schedule, width=256, fit_steps=2000, seed=0)
        fit_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(task.base.state_dict(), fit_path)
    method = api.make_method("dmd2", student_timesteps=STUDENT_T, guidance_scale=guidance)
    run_dir = path.with_suffix("")
    result = api.distill(task, method, api.TrainConfig(
        steps=args.train_steps, batch_size=args.train_batch, full_finetune=True, student_lr=args.lr,
        critic_lr=2 * args.lr, lr_schedule="cosine", ema_decay=0.99, weight_decay=0.0, checkpoint_every=0,
        run_dir=str(run_dir), seed=0), resume=False, progress=True)
    trainer = result["trainer"]
    student = trainer.roles.student
    trainer.use_exported_student()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), path)
    print(f"gmm: trained the student in {time.time() - t0:.0f} s -> {path}")
    return student.eval(), config, str(path)


def gmm_world(args) -> dict:
    from comfyui_distillery.worlds.gmm import GaussianMixture, GaussianMixtureTeacher, evaluate_gmm_samples
    from comfyui_distillery.worlds.plots import scatter_decoder, scatter_png

    torch.manual_seed(0)
    schedule = DiscreteVPSchedule.sd15("v_prediction")
    mixture = GaussianMixture.default()
    teacher = GaussianMixtureTeacher(mixture, schedule)
    student, train_config, student_path = gmm_student(args, schedule, args.cfg)
    labels = torch.arange(mixture.num_classes).repeat_interleave(args.n_per_class)
    null = torch.full_like(labels, mixture.null_label)
    teacher_guided = Guided(teacher, labels, null, args.cfg)
    student_guided = Guided(student, labels)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), mixture.dim, generator=g, dtype=torch.float64)
    sigma_top = timesteps_to_sigmas(schedule, [999])[0]
    x_init = initial_state(teacher, noise, float(sigma_top)).float()  # pure noise, as the student was trained
    truth, _ = mixture.sample(labels, generator=torch.Generator().manual_seed(args.seed + 1))

    def variance(x):  # per-class spread: trace of the covariance, mean over classes
        return sum(float(torch.trace(torch.cov(x[labels == c].double().T)))
                   for c in range(mixture.num_classes)) / mixture.num_classes

    def composition(x):
        """Which mode each sample chose (nearest mode of its class, no on-manifold test): the composition."""
        return mixture.mode_of(x, labels, max_z=math.inf)

    def coverage(modes):
        """Per-mode recall of the composition alone: mean over modes of min(1, share / true weight)."""
        cover = [min(1.0, float((modes[labels == c] == k).double().mean()) / float(mixture.weights[c, k]))
                 for c in range(mixture.num_classes) for k in range(mixture.means.shape[1])]
        return sum(cover) / len(cover)

    rows, panels, base_modes = [], [("exact data", truth, labels)], None
    with torch.no_grad():
        for v in variants(args.base_steps):
            x, evals, info = run_variant(v, schedule, teacher_guided, student_guided, x_init, args.seed)
            m = evaluate_gmm_samples(mixture, x, labels, seed=args.seed + 2)
            fd = sum(frechet(x[labels == c], truth[labels == c]) for c in range(mixture.num_classes)) / 4
            modes = composition(x)
            base_modes = modes if base_modes is None else base_modes
            rows.append({"name": v["name"], "kind": v["kind"], "evals": evals, "recall_mean": m["recall_mean"],
                         "recall_min": m["recall_min"], "coverage": coverage(modes),
                         "light_share": float((modes == 1).double().mean()),
                         "same_mode_as_base": float((modes == base_modes).double().mean()),
                         "variance": variance(x), "swd": m["swd_per_class"],
                         "frechet": fd, "handoff": info and {k: info[k] for k in (
                             "handoff_timestep", "snapped_from", "snapped", "base_steps", "student_steps")},
                         "bar_against": v.get("bar_against")})
            panels.append((f"{v['name'].split(' + ')[0]} ({evals} ev)", x, labels))
        # a diffusion-target grid of the one-step hybrid (every step's x0 prediction, base | student)
        dt = DTCollector(max_images=None, schedule=schedule)
        hybrid_1 = next(v for v in variants(args.base_steps) if v.get("bar_against") == "student 4 steps")
        run_variant(hybrid_1, schedule, teacher_guided, student_guided, x_init, args.seed, callback=dt)
        alone = DTCollector(max_images=None, schedule=schedule, stage="student alone")
        run_variant(variants(args.base_steps)[3], schedule, teacher_guided, student_guided, x_init, args.seed,
                    callback=lambda d: alone({**d, "stage": "student alone"}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scatter_png(out / "hybrid_diversity_gmm.png", panels, size=220)
    dt_grid_image(dt.records + alone.records, scatter_decoder(size=96, labels=labels), max_images=1,
                  stages=["base", "student", "student alone"]).save(out / "hybrid_dt_gmm.png")
    return {"world": "gmm", "schedule": "SD1.5 VP, v-prediction", "cfg": args.cfg,
            "samples": len(labels), "student": {"method": "dmd2", "mode": "full_finetune", **train_config,
                                               "cache": student_path},
            "diversity_metrics": ["recall_mean", "coverage"], "rows": rows,
            "pictures": ["hybrid_diversity_gmm.png", "hybrid_dt_gmm.png"]}


# --- digits world -----------------------------------------------------------------------------------------

def digits_available() -> bool:
    try:
        from comfyui_distillery.worlds import digits

        return all(hasattr(digits, n) for n in ("load_teacher", "encode_labels", "NULL_LABEL", "evaluate_samples",
                                                 "image_grid", "NOISE_SCHEDULE"))
    except Exception:
        return False


def digits_schedule():
    from comfyui_distillery.worlds import digits

    ns = digits.NOISE_SCHEDULE
    return DiscreteVPSchedule.from_betas(ns["beta_schedule"], ns["beta_start"], ns["beta_end"],
                                         ns["num_train_timesteps"], ns.get("prediction_type", "epsilon"))


def digits_student(args, schedule, guidance):
    """A DMD2 LoRA student on the digits UNet (shared base), cached as its LoRA parameters."""
    from comfyui_distillery.core.models import DiffusersUNetModel
    from comfyui_distillery.trainers import api, lora
    from comfyui_distillery.trainers.tasks import DiffusersUNetTask
    from comfyui_distillery.worlds import digits

    unet, text_encoder = digits.load_teacher()
    text_encoder.requires_grad_(False)
    config = dict(world="digits", steps=args.digits_train_steps, batch=args.digits_train_batch,
                  guidance=guidance, timesteps=STUDENT_T, lr=args.digits_lr, rank=args.digits_rank, seed=0, v=1)
    path = Path(args.cache).expanduser() / f"digits_dmd2_{cache_key(**config)}.pt"

    def encode(labels):
        with torch.no_grad():
            return (digits.encode_labels(text_encoder, labels),
                    digits.encode_labels(text_encoder, torch.full_like(labels, digits.NULL_LABEL)))

    def prompt_encoder(batch, generator):
        return encode(torch.randint(0, 10, (batch,), generator=generator))

    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if path.exists() and not args.retrain:
        base = DiffusersUNetModel(unet, schedule)
        lora.add_lora_adapter(unet, "student", args.digits_rank, None, lora.UNET_TARGET_MODULES)
        for p, t in zip(lora.adapter_parameters(unet, "student"), torch.load(path, weights_only=True)):
            p.data.copy_(t)
        print(f"digits: cached student {path}")
    else:
        t0 = time.time()
        task = DiffusersUNetTask(unet, schedule, shape, prompt_encoder, default_guidance=guidance)
        method = api.make_method("dmd2", student_timesteps=STUDENT_T, guidance_scale=guidance)
        result = api.distill(task, method, api.TrainConfig(
            steps=args.digits_train_steps, batch_size=args.digits_train_batch, lora_rank=args.digits_rank,
            student_lr=args.digits_lr, critic_lr=args.digits_lr, ema_decay=0.99, checkpoint_every=0, seed=0,
            run_dir=str(path.with_suffix(""))), resume=False, progress=True)
        trainer = result["trainer"]
        trainer.use_exported_student()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([p.detach().cpu() for p in trainer.roles.trainable["student"]], path)
        base = task.base
        print(f"digits: trained the student in {time.time() - t0:.0f} s -> {path}")
    from comfyui_distillery.trainers.roles import AdapterView

    return AdapterView(base, None), AdapterView(base, "student"), encode, shape, config, str(path)


def digits_world(args) -> dict:
    from comfyui_distillery.worlds import digits

    torch.manual_seed(0)
    schedule = digits_schedule()
    teacher, student, encode, shape, train_config, student_path = digits_student(args, schedule, args.digits_cfg)
    labels = digits.class_major_labels(args.digits_per_class)
    cond, uncond = encode(labels)
    teacher_guided = Guided(teacher, cond, uncond, args.digits_cfg)
    student_guided = Guided(student, cond)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(labels), *shape), generator=g)
    sigma_top = timesteps_to_sigmas(schedule, [999])[0]
    x_init = initial_state(teacher, noise, float(sigma_top))
    rows, grids = [], []
    show = torch.cat([torch.arange(c * args.digits_per_class, c * args.digits_per_class + 8) for c in range(10)])
    with torch.no_grad():
        for v in variants(args.digits_base_steps):
            x, evals, info = run_variant(v, schedule, teacher_guided, student_guided, x_init, args.seed)
            m = digits.evaluate_samples(x.clamp(-1, 1), labels)
            rows.append({"name": v["name"], "kind": v["kind"], "evals": evals, "diversity": m["diversity"],
                         "recall": m["recall"], "fid": m["fid"], "accuracy": m["accuracy"],
                         "handoff": info and {k: info[k] for k in (
                             "handoff_timestep", "snapped_from", "snapped", "base_steps", "student_steps")},
                         "bar_against": v.get("bar_against")})
            grids.append((v["name"], x[show]))
        dt = DTCollector(max_images=6, schedule=schedule)
        hybrid_1 = next(v for v in variants(args.digits_base_steps) if v.get("bar_against") == "student 4 steps")
        first = torch.arange(0, 6 * args.digits_per_class, args.digits_per_class)
        t_guided = Guided(teacher, cond[first], uncond[first], args.digits_cfg)
        s_guided = Guided(student, cond[first])
        run_variant(hybrid_1, schedule, t_guided, s_guided, x_init[first], args.seed, callback=dt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picture = [digits.image_grid(imgs, nrow=8, scale=3) for _, imgs in grids]
    _stack_images(picture, [n for n, _ in grids]).save(out / "hybrid_diversity_digits.png")
    dt_grid_image(dt, max_images=6, value_range=(-1, 1)).save(out / "hybrid_dt_digits.png")
    return {"world": "digits", "schedule": "digits world VP (eps)", "cfg": args.digits_cfg, "samples": len(labels),
            "student": {"method": "dmd2", "mode": "lora", **train_config, "cache": student_path},
            "diversity_metrics": ["diversity", "recall"], "rows": rows,
            "pictures": ["hybrid_diversity_digits.png", "hybrid_dt_digits.png"]}


def _stack_images(images, titles):
    from PIL import Image, ImageDraw

    w = max(i.width for i in images)
    h = sum(i.height + 14 for i in images)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for img, title in zip(images, titles):
        draw.text((2, y + 1), title, fill=(0, 0, 0))
        canvas.paste(img.convert("RGB"), (0, y + 14))
        y += img.height + 14
    return canvas


# --- report -----------------------------------------------------------------------------------------------

def verdict(result: dict) -> list[str]:
    """The issue's bar for each hybrid row that names the student it is compared with, per diversity metric."""
    rows = {r["name"]: r for r in result["rows"]}
    base = next(r for r in result["rows"] if r["kind"] == "base")
    lines = []
    for r in result["rows"]:
        if not r.get("bar_against"):
            continue
        ref = rows[r["bar_against"]]
        budget = ref["evals"] + 2
        r["diversity_kept"], r["passes_bar"] = {}, {}
        for key in result["diversity_metrics"]:
            kept = r[key] / base[key] if base[key] else math.nan
            ok = kept >= BAR and r["evals"] <= budget
            r["diversity_kept"][key], r["passes_bar"][key] = kept, ok
            lines.append(f"{result['world']}: {r['name']}: {key} {r[key]:.3f} = {kept:.1%} of the base's "
                         f"{base[key]:.3f} ({ref['name']}: {ref[key]:.3f}) at {r['evals']} evaluations "
                         f"(budget {ref['evals']} + 2 = {budget}) -> {'PASS' if ok else 'FAIL'}")
    return lines


def table(result: dict) -> str:
    if result["world"] == "gmm":
        cols = [("evals", "{:d}"), ("recall_mean", "{:.3f}"), ("recall_min", "{:.3f}"), ("coverage", "{:.3f}"),
                ("light_share", "{:.3f}"), ("same_mode_as_base", "{:.3f}"), ("variance", "{:.2f}"),
                ("swd", "{:.3f}"), ("frechet", "{:.3f}")]
    else:
        cols = [("evals", "{:d}"), ("diversity", "{:.2f}"), ("recall", "{:.3f}"), ("fid", "{:.2f}"),
                ("accuracy", "{:.3f}")]
    head = "| " + " | ".join(["sampler"] + [c for c, _ in cols]) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([r["name"]] + [f.format(r[c]) for c, f in cols]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", choices=["gmm", "digits", "all"], default="all")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cache", default="~/.cache/distillery/benchmarks")
    p.add_argument("--retrain", action="store_true", help="ignore cached students")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models, shared CPUs)")
    # gmm
    p.add_argument("--cfg", type=float, default=3.0, help="teacher CFG (base sampling and DMD2 guidance)")
    p.add_argument("--base-steps", type=int, default=20, help="N: the base's own number of steps")
    p.add_argument("--n-per-class", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=6000)
    p.add_argument("--train-batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4, help="student lr (critic: 2x)")
    # digits
    p.add_argument("--digits-cfg", type=float, default=3.0)
    p.add_argument("--digits-base-steps", type=int, default=20)
    p.add_argument("--digits-per-class", type=int, default=100)
    p.add_argument("--digits-train-steps", type=int, default=1500)
    p.add_argument("--digits-train-batch", type=int, default=32)
    p.add_argument("--digits-lr", type=float, default=1e-4)
    p.add_argument("--digits-rank", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    results, lines = [], []
    if args.world in ("gmm", "all"):
        results.append(gmm_world(args))
    if args.world in ("digits", "all"):
        if digits_available():
            results.append(digits_world(args))
        else:
            print("digits: the digits world (comfyui_distillery.worlds.digits) is not available; skipped")
    for result in results:
        lines += verdict(result)
        print(f"\n## {result['world']}  (CFG {result['cfg']}, {result['samples']} samples)\n")
        print(table(result))
    print()
    for line in lines:
        print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "hybrid_diversity.json"
    if previous.exists():  # keep the other world's results when only one world was run
        ran = {r["world"] for r in results}
        kept = [w for w in json.loads(previous.read_text()).get("worlds", []) if w["world"] not in ran]
        results = kept + results
        lines = [line for w in kept for line in verdict(w)] + lines
    (out / "hybrid_diversity.json").write_text(json.dumps(
        {"bar": f"hybrid keeps >= {BAR:.0%} of the base's diversity at <= the student's evaluations + 2",
         "verdict": lines, "worlds": results}, indent=1) + "\n")
    print(f"\nwrote {out / 'hybrid_diversity.json'}")


if __name__ == "__main__":
    main()
