"""Train (reproduce) the tiny image world: the evaluator CNN and the teacher UNet, then measure.

    python -m comfyui_distillery.worlds.digits.train [--out DIR] [--seed 0]

Writes ``evaluator.safetensors``, ``teacher_unet.safetensors`` (EMA weights),
``teacher_text_encoder.safetensors`` (EMA) and ``digits_world.json`` (configs, hyper-parameters,
data split, measured metrics) to ``--out`` (default: the package's ``weights/`` folder).
Seeded; CPU-only by design (``--threads``, default 2). On a CPU shared with other processes, run
with ``OMP_WAIT_POLICY=PASSIVE`` in the environment: spinning OpenMP threads otherwise slow every
step down many times over whenever one of them is preempted.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DATA_INFO, load_digits_16, random_shift
from .load import (
    EVALUATOR_FILE,
    META_FILE,
    TEACHER_UNET_FILE,
    TEXT_ENCODER_FILE,
    WEIGHTS_DIR,
)
from .metrics import compute_features, evaluate_samples, frechet_distance
from .models import (
    EVALUATOR_CONFIG,
    NOISE_SCHEDULE,
    NULL_LABEL,
    TEACHER_CONFIG,
    TEXT_ENCODER_CONFIG,
    LabelTextEncoder,
    build_evaluator,
    build_unet,
)
from .sample import (
    DDIM_CONFIG,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    class_major_labels,
    image_grid,
    make_train_scheduler,
    sample_teacher,
)


def _tqdm(*a, **k):
    from tqdm.auto import tqdm

    return tqdm(*a, **k)


def _lr_lambda(warmup: int, total: int, final_frac: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _save(tensors: dict, path: Path, meta: dict | None = None):
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata=meta)


def _nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- evaluator


def train_evaluator(hp: dict, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_16("train")
    model = build_evaluator(EVALUATOR_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps_per_epoch = math.ceil(len(x) / hp["batch_size"])
    total = hp["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps_per_epoch, total, 0.0))
    model.train()
    bar = _tqdm(range(hp["epochs"]), desc="evaluator", unit="epoch")
    for _ in bar:
        perm = torch.randperm(len(x), generator=g)
        tot = 0.0
        for s in range(0, len(x), hp["batch_size"]):
            idx = perm[s : s + hp["batch_size"]]
            xb = random_shift(x[idx], g, p=hp["shift_p"], vertical=True)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=hp["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        bar.set_postfix(loss=f"{tot / len(x):.4f}")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- teacher


@torch.no_grad()
def _ema_update(ema_params, params, decay: float):
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def train_teacher(hp: dict, seed: int, log_every: int = 50, checkpoint=None, checkpoint_every: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = load_digits_16("train")
    unet = build_unet(TEACHER_CONFIG)
    te = LabelTextEncoder(**TEXT_ENCODER_CONFIG)
    unet.train()
    te.train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(hp["warmup_steps"], hp["steps"], hp["final_lr_fraction"]))
    noise_sched = make_train_scheduler()
    T = NOISE_SCHEDULE["num_train_timesteps"]
    bs = hp["batch_size"]
    perm, pos = torch.randperm(len(x), generator=g), 0
    bar = _tqdm(range(hp["steps"]), desc="teacher", unit="step")
    run_loss, history = None, []
    for step in bar:
        if pos + bs > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos : pos + bs]
        pos += bs
        x0 = random_shift(x[idx], g, p=hp["shift_p"], vertical=False)
        lab = y[idx].clone()
        lab[torch.rand(bs, generator=g) < hp["label_dropout"]] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (bs,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=te(lab)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        opt.step()
        sched.step()
        decay = min(hp["ema_decay"], (1 + step) / (10 + step))
        _ema_update(ema_params, params, decay)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if step % log_every == 0 or step == hp["steps"] - 1:
            bar.set_postfix(loss=f"{run_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            history.append([step, round(run_loss, 5)])
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(step + 1, ema_unet, ema_te)
    return ema_unet.requires_grad_(False), ema_te.requires_grad_(False), history


# ----------------------------------------------------------------------------- main


def _round(d, sig=6):
    """Round floats to ``sig`` significant digits for the JSON (configs stay exact); NaN -> null."""
    if isinstance(d, float):
        return float(f"{d:.{sig}g}") if d == d else None
    if isinstance(d, dict):
        return {k: _round(v, sig) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v, sig) for v in d]
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--evaluator-epochs", type=int, default=40)
    ap.add_argument("--eval-per-class", type=int, default=50, help="teacher samples per class for the metrics")
    ap.add_argument("--guidance", type=str, default="2,3,4", help="CFG scales to measure (comma list)")
    ap.add_argument("--grid", type=Path, default=None, help="also write a 10x8 teacher sample grid PNG here")
    ap.add_argument("--skip-evaluator", action="store_true", help="reuse the evaluator in --out")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="also save the EMA teacher every N steps to OUT/checkpoints/step_N/")
    ap.add_argument("--measure-only", action="store_true",
                    help="train nothing: re-measure the weights in --out and rewrite the JSON's metrics")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY") is None:
        print("hint: on a shared CPU set OMP_WAIT_POLICY=PASSIVE (see the module docstring)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    ev_hp = {"epochs": args.evaluator_epochs, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4,
             "optimizer": "AdamW", "schedule": "1 epoch linear warmup, cosine to 0",
             "label_smoothing": 0.05, "augmentation": "random +-1 px shift (x and y), p=0.5, fill -1",
             "shift_p": 0.5}
    te_hp = {"steps": args.teacher_steps, "batch_size": args.batch_size, "lr": args.lr,
             "warmup_steps": 100, "final_lr_fraction": 0.05, "weight_decay": 0.01,
             "optimizer": "AdamW(betas=(0.9, 0.99))", "schedule": "linear warmup, cosine to final_lr_fraction",
             "grad_clip": 1.0, "ema_decay": args.ema_decay,
             "ema_warmup": "decay_t = min(ema_decay, (1+t)/(10+t))",
             "label_dropout": 0.1, "loss": "MSE(eps_pred, eps), t ~ U{0..999}",
             "augmentation": "random +-1 px horizontal shift, p=0.5, fill -1 (no flips)",
             "shift_p": 0.5}
    timings = {}
    history = []
    if args.measure_only and (out / META_FILE).is_file():
        from .load import load_metadata

        old = load_metadata(out)
        ev_hp, te_hp = old["evaluator"]["training"], old["teacher"]["training"]
        history, timings = old["teacher"].get("loss_history", []), old.get("timings_s", {})

    # ---- evaluator
    t0 = time.time()
    if args.skip_evaluator or args.measure_only:
        from .load import load_evaluator

        evaluator = load_evaluator(weights_dir=out)
    else:
        evaluator = train_evaluator(ev_hp, args.seed)
        _save(evaluator.state_dict(), out / EVALUATOR_FILE, {"config": json.dumps(EVALUATOR_CONFIG)})
        timings["evaluator_s"] = time.time() - t0
    xte, yte = load_digits_16("test")
    xtr, ytr = load_digits_16("train")
    _, lte = compute_features(xte, evaluator)
    ftr, ltr = compute_features(xtr, evaluator)
    fte, _ = compute_features(xte, evaluator)
    ev_test_acc = float((lte.argmax(1) == yte).double().mean())
    ev_train_acc = float((ltr.argmax(1) == ytr).double().mean())
    print(f"evaluator: test acc {ev_test_acc:.4f}  train acc {ev_train_acc:.4f}")
    n_eval = 10 * args.eval_per_class
    sub = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1234))[:n_eval]
    floor = {
        "fid_train1500_vs_test": frechet_distance(ftr, fte),
        f"train{n_eval}_vs_test": evaluate_samples(xtr[sub], ytr[sub], reference=(xte, yte), evaluator=evaluator),
    }
    print(f"floor: FID(train 1500 vs test) {floor['fid_train1500_vs_test']:.3f}  "
          f"FID(train {n_eval} vs test) {floor[f'train{n_eval}_vs_test']['fid']:.3f}")

    # ---- teacher
    t0 = time.time()
    def _ckpt(step, u, t):
        d = out / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        _save(u.state_dict(), d / TEACHER_UNET_FILE)
        _save(t.state_dict(), d / TEXT_ENCODER_FILE)

    if args.measure_only:
        from .load import load_teacher

        unet, te = load_teacher(weights_dir=out)
    else:
        unet, te, history = train_teacher(te_hp, args.seed, checkpoint=_ckpt,
                                          checkpoint_every=args.checkpoint_every)
        timings["teacher_s"] = time.time() - t0
        timings["teacher_s_per_step"] = timings["teacher_s"] / te_hp["steps"]
        _save(unet.state_dict(), out / TEACHER_UNET_FILE, {"config": json.dumps(TEACHER_CONFIG)})
        _save(te.state_dict(), out / TEXT_ENCODER_FILE, {"config": json.dumps(TEXT_ENCODER_CONFIG)})
        print(f"teacher trained in {timings['teacher_s']:.0f}s ({_nparams(unet) + _nparams(te)} params)")

    # ---- teacher quality
    t0 = time.time()
    labels = class_major_labels(args.eval_per_class)
    teacher_metrics = {}
    for gs in [float(s) for s in args.guidance.split(",") if s.strip()]:
        imgs = sample_teacher(unet, te, labels, num_inference_steps=DEFAULT_STEPS, guidance_scale=gs,
                              generator=torch.Generator().manual_seed(args.seed + 100))
        m = evaluate_samples(imgs, labels, reference=(xte, yte), evaluator=evaluator)
        teacher_metrics[f"cfg_{gs:g}"] = m
        print(f"teacher DDIM-{DEFAULT_STEPS} cfg {gs:g}: acc {m['accuracy']:.4f} fid {m['fid']:.3f} "
              f"div {m['diversity']:.2f} recall {m['recall']:.3f} precision {m['precision']:.3f}")
    timings["teacher_eval_s"] = time.time() - t0
    if args.grid is not None:
        imgs = sample_teacher(unet, te, class_major_labels(8), guidance_scale=DEFAULT_GUIDANCE,
                              generator=torch.Generator().manual_seed(args.seed + 200))
        image_grid(imgs, nrow=8).save(args.grid)
    if not args.measure_only:
        timings["total_s"] = time.time() - t_start

    meta = {
        "format_version": 1,
        "files": {"teacher_unet": TEACHER_UNET_FILE, "text_encoder": TEXT_ENCODER_FILE,
                  "evaluator": EVALUATOR_FILE},
        "data": DATA_INFO,
        "teacher": {
            "unet_config": TEACHER_CONFIG,
            "text_encoder_config": TEXT_ENCODER_CONFIG,
            "noise_schedule": NOISE_SCHEDULE,
            "null_label": NULL_LABEL,
            "weights": "EMA",
            "parameters": {"unet": _nparams(unet), "text_encoder": _nparams(te)},
            "training": te_hp,
            "loss_history": history,
        },
        "evaluator": {"config": EVALUATOR_CONFIG, "parameters": _nparams(evaluator), "training": ev_hp},
        "sampling": {"scheduler": "DDIMScheduler", "config": DDIM_CONFIG, "eta": 0.0,
                     "num_inference_steps": DEFAULT_STEPS, "default_guidance": DEFAULT_GUIDANCE,
                     "cfg_formula": "uncond + g * (cond - uncond)"},
        "metrics": {
            "evaluator_test_accuracy": ev_test_acc,
            "evaluator_train_accuracy": ev_train_acc,
            "floor": floor,
            "teacher": {"num_inference_steps": DEFAULT_STEPS, "per_class": args.eval_per_class,
                        "noise_seed": args.seed + 100, "reference": "test split", "by_guidance": teacher_metrics},
        },
        "seed": args.seed,
        "environment": {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
                        "machine": platform.machine()},
        "timings_s": timings,
    }
    (out / META_FILE).write_text(json.dumps(_round(meta), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / META_FILE} after {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
