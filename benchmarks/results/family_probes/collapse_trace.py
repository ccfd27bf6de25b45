"""When and how does a DMD student break on a family world? The family recipe (dmd2:4 on 999,499,199,49,
exit_step=last, regression 0.25; base fitted 3000 it. with fit seed 0) trained on one world with a recipe change
(s2 broke with 24000 iterations and with batch 2048), evaluated every --every iterations: the live student's
and its EMA's off-mode share, spread, recall min and coverage min (20000 samples per class, the same noise each
time, the bench's sampler), with the training metrics averaged over the segment (critic loss, student
gradient norm, the DM gradient's norm, the regression loss).

    python benchmarks/results/family_probes/collapse_trace.py --world 2 --set dmd2:4.steps=24000 --out s2-24k.json
    python benchmarks/results/family_probes/collapse_trace.py --show s2-24k.json
"""
import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser()
p.add_argument("--world", type=int, default=2)
p.add_argument("--train-seed", type=int, default=0)
p.add_argument("--per-class", type=int, default=20000)
p.add_argument("--every", type=int, default=1000)
p.add_argument("--method", default="dmd2:4")
p.add_argument("--set", action="append", default=[], help="recipe changes on top of the family recipe")
p.add_argument("--out", default=None)
p.add_argument("--show", nargs="+", default=None)
a = p.parse_args()
HERE = Path(__file__).resolve().parent
KEYS = ("loss/critic", "loss/student", "grad_norm/student", "grad_norm/critic", "dm_grad_norm", "regression")


def steps_off(scores: dict) -> str:
    """Each step's x0 off-mode share along the chain (absent in runs made before it was recorded)."""
    return " ".join(f"{step['off']:.3f}" for step in scores.get("steps", []))


def show(path):
    r = json.loads(Path(path).read_text())
    print(f"{Path(path).stem}: {r['world']}, {' '.join(r['set'])}, train seed {r['train_seed']}, "
          f"{r['train_seconds']:.0f} s")
    print(f"{'iter':>6} | {'live: off':>9} {'spread':>6} {'recall':>6} {'cover':>6} | {'ema: off':>8} {'spread':>6} "
          f"{'recall':>6} {'cover':>6} | {'steps x0 off':>23} | "
          + " ".join(f"{k.replace('grad_norm', 'gn'):>14}" for k in KEYS))
    for row in r["trace"]:
        live, ema, m = row["live"], row["ema"], row["metrics"]
        print(f"{row['step']:6d} | {live['off']:9.4f} {live['spread']:6.2f} {live['recall']:6.3f} "
              f"{live['coverage']:6.3f} | "
              f"{ema['off']:8.4f} {ema['spread']:6.2f} {ema['recall']:6.3f} {ema['coverage']:6.3f} | "
              f"{steps_off(live):>23} | "
              + " ".join(f"{m.get(k, float('nan')):14.4g}" for k in KEYS))


if a.show:
    for f in a.show:
        show(f)
    raise SystemExit(0)

spec = importlib.util.spec_from_file_location("gmm_family", HERE.parents[1] / "gmm_family.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
from comfyui_distillery.trainers.generator import student_chain  # noqa: E402
from comfyui_distillery.worlds.family import make_world  # noqa: E402
from comfyui_distillery.worlds.gmm import mode_report  # noqa: E402
from comfyui_distillery.worlds.tasks import GaussianMixtureTask  # noqa: E402

torch.set_num_threads(1)
FAMILY = ["dmd2:4.student_timesteps=999,499,199,49", "dmd2:4.regression_weight=0.25"]
world = make_world(a.world)
mix = world.mixture
labels = torch.arange(world.num_classes).repeat_interleave(a.per_class)
noise = torch.randn(len(labels), world.dim, generator=torch.Generator().manual_seed(1000 + a.world))
torch.manual_seed(0)
task = GaussianMixtureTask(mix, world.schedule(), width=256, fit_steps=3000, seed=0)
records = []


class Args:
    one_step_timestep, budget, set = "auto", 1.0, FAMILY + a.set


def scores(x) -> dict:
    m = mode_report(mix, x, labels)
    return {"off": m["off_mode_share"], "spread": m["spread_median"], "spread_max": m["spread_max"],
            "recall": m["recall_min"], "coverage": m["coverage_min"]}


@torch.no_grad()
def evaluate(student) -> dict:
    """The card's sample, and each step's x0 along the chain (which step goes wrong first)."""
    student.eval()
    x, _ = bench.student_sample(student, method, labels, noise, 5)
    sigmas = method.student_sigmas(student.schedule)
    g = torch.Generator().manual_seed(5)
    chain = student_chain(student, labels, sigmas, noise,
                          lambda shape, dtype: torch.randn(shape, generator=g, dtype=dtype))
    student.train()
    return {**scores(x.double()), "steps": [scores(x0.double()) for x0 in chain]}


t0 = time.time()
with tempfile.TemporaryDirectory() as run_dir:
    # every iteration's metrics (a student update's come only on every update_ratio-th), averaged per segment
    trainer, method, _ = bench.student_trainer(task, a.method, Args, a.train_seed, run_dir,
                                               on_metrics=records.append, log_every=1)
    config = trainer.config
    train = {k: getattr(config, k) for k in bench.TRAIN_KEYS}
    result = {"world": world.name, "train_seed": a.train_seed, "set": Args.set, "train": train, "trace": []}
    while trainer.step < config.steps:
        trainer.train(until=trainer.step + a.every)
        seg = records[:]
        records.clear()
        metrics = {k: sum(s[k] for s in seg if k in s) / max(1, sum(k in s for s in seg)) for k in KEYS}
        live = evaluate(trainer.roles.student)
        with trainer.exported_student() as student:
            ema = evaluate(student)
        result["trace"].append({"step": trainer.step, "live": live, "ema": ema, "metrics": metrics})
        print(f"{trainer.step}: steps' x0 off " + " ".join(f"{s['off']:.3f}" for s in live["steps"])
              + " coverage " + " ".join(f"{s['coverage']:.3f}" for s in live["steps"]), flush=True)
        print(f"{trainer.step}: live off {live['off']:.4f} spread {live['spread']:.2f} recall {live['recall']:.3f} | "
              f"ema off {ema['off']:.4f} spread {ema['spread']:.2f} recall {ema['recall']:.3f} | "
              + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
result["train_seconds"] = time.time() - t0
out = Path(a.out or HERE / f"collapse_trace-s{a.world}.json")
out.write_text(json.dumps(result, indent=1))
show(out)
