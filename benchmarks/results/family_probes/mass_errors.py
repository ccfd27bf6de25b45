"""Is a DMD student's missing mode mass systematic or noise? Per-mode mass ratios (share of a class's samples in
the mode's basin / the mode's weight, uncapped, unlike the bench's coverage) of one family world, for exact
samples, the teacher's and the fitted base's 50-step samplers, and the family recipe's student (dmd2:4 on
999,499,199,49, exit_step=last, regression 0.25, 12000 it., base fitted 3000 it. with fit seed 0) trained with
one training seed. Two runs with different --train-seed, compared, say whether the students' per-mode errors
repeat (a bias: of the critic, the base, the function class) or not (training noise), and whether they follow
the base's errors or the weights.

    python benchmarks/results/family_probes/mass_errors.py --world 4 --train-seed 0 --out s4-t0.json &
    python benchmarks/results/family_probes/mass_errors.py --world 4 --train-seed 1 --out s4-t1.json
    python benchmarks/results/family_probes/mass_errors.py --compare s4-t0.json s4-t1.json
"""
import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser()
p.add_argument("--world", type=int, default=4)
p.add_argument("--train-seed", type=int, default=0)
p.add_argument("--per-class", type=int, default=100000)
p.add_argument("--budget", type=float, default=1.0)
p.add_argument("--method", default="dmd2:4")
p.add_argument("--set", action="append", default=None,
               help="recipe changes (default: the family recipe's 999,499,199,49 and regression 0.25)")
p.add_argument("--out", default=None)
p.add_argument("--compare", nargs="+", default=None)
p.add_argument("--worst-mode", nargs="+", default=None, metavar="BENCH_JSON",
               help="for gmm_family.py results: per world and student row, the mode of smallest recall (or, on "
                    "rows that fail, of smallest coverage with --by coverage) and its weight rank in its class "
                    "(0 = the class's lightest)")
p.add_argument("--by", choices=("recall", "coverage"), default="recall")
a = p.parse_args()
HERE = Path(__file__).resolve().parent


def ratios(mixture, x, labels):
    """[C][K] share of class-c samples in mode k's basin / w_ck, uncapped (the bench's coverage is min(1, this))."""
    from comfyui_distillery.worlds.gmm import mass_ratios

    labels = labels.long().cpu()
    return mass_ratios(mixture, mixture.assign_modes(x, labels, "class")[0], labels).tolist()


def flat(table):
    return torch.tensor([v for row in table for v in row], dtype=torch.float64)


def corr(u, v):
    u, v = u - u.mean(), v - v.mean()
    return float((u * v).sum() / (u.norm() * v.norm()).clamp(min=1e-12))


if a.worst_mode:
    from comfyui_distillery.worlds.family import make_world
    for path in a.worst_mode:
        lightest = {}
        for w in json.loads(Path(path).read_text())["worlds"]:
            weights = make_world(w["world"]["seed"]).mixture.weights
            for r in w["rows"]:
                if r["kind"] != "student" or (a.by == "coverage" and r["pass"]):
                    continue
                table = torch.tensor(r[a.by], dtype=torch.float64).nan_to_num(2.0)
                cls, k = divmod(int(table.argmin()), table.shape[1])
                rank = int((weights[cls] < weights[cls, k]).sum())
                n, hits = lightest.get(r["method"], (0, 0))
                lightest[r["method"]] = (n + 1, hits + (rank == 0))
                print(f"{Path(path).stem} {w['world']['name']} {r['method']}: worst {a.by} {float(table.min()):.3f}, "
                      f"weight {float(weights[cls, k]):.3f}, rank {rank} of {table.shape[1]}")
        for method, (n, hits) in lightest.items():
            print(f"{Path(path).stem} {method}: the worst mode is its class's lightest on {hits} of {n} worlds")
    raise SystemExit(0)

if a.compare:
    runs = [json.loads(Path(f).read_text()) for f in a.compare]
    first = runs[0]
    w = flat(first["weights"])
    light = w / w.mean()
    from comfyui_distillery.worlds.family import make_world
    log_std = make_world(int(first["world"].split("-")[0][1:])).mixture.stds.double().log().flatten()
    print(f"world {first['world']}: {len(w)} modes, {first['per_class']} samples per class "
          f"(counting error of the lightest mode {first['counting_error_lightest']:.3f})")
    rows = {k: flat(v) for k, v in first["ratios"].items() if k not in ("student", "pairs")}
    for f, r in zip(a.compare, runs):
        rows[f"student {Path(f).stem}"] = flat(r["ratios"]["student"])
        if "pairs" in r["ratios"]:
            own = flat(r["ratios"]["pairs"])
            print(f"{Path(f).stem}: its {r['pairs']} regression pairs' mass error rms "
                  f"{float((own - 1).pow(2).mean().sqrt()):.3f}; corr with its student's error "
                  f"{corr(flat(r['ratios']['student']) - 1, own - 1):+.2f}")
    for name, v in rows.items():
        err = v - 1
        print(f"{name:32s} rms error {float(err.pow(2).mean().sqrt()):.3f}  min {float(v.min()):.3f}  "
              f"max {float(v.max()):.3f}  corr with log weight {corr(err, light.log()):+.2f}  "
              f"with base error {corr(err, rows['base'] - 1):+.2f}  with log std {corr(err, log_std):+.2f}")
    seeds = [k for k in rows if k.startswith("student ")]
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            print(f"corr of errors, {seeds[i]} vs {seeds[j]}: {corr(rows[seeds[i]] - 1, rows[seeds[j]] - 1):+.2f}")
    if len(seeds) > 1:
        mean = torch.stack([rows[s] for s in seeds]).mean(0)
        print(f"the mean of these runs' ratios: rms error {float((mean - 1).pow(2).mean().sqrt()):.3f}  min {float(mean.min()):.3f}")
    raise SystemExit(0)

spec = importlib.util.spec_from_file_location("gmm_family", HERE.parents[1] / "gmm_family.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
from comfyui_distillery.worlds.family import make_world, teacher_sample  # noqa: E402
from comfyui_distillery.worlds.tasks import GaussianMixtureTask  # noqa: E402

torch.set_num_threads(1)


class Args:
    one_step_timestep, budget = "auto", a.budget
    set = a.set if a.set is not None else ["dmd2:4.student_timesteps=999,499,199,49", "dmd2:4.regression_weight=0.25"]


world = make_world(a.world)
mix = world.mixture
labels = torch.arange(world.num_classes).repeat_interleave(a.per_class)
noise = torch.randn(len(labels), world.dim, generator=torch.Generator().manual_seed(1000 + a.world), dtype=torch.float64)
torch.manual_seed(0)
task = GaussianMixtureTask(mix, world.schedule(), width=256, fit_steps=3000, seed=0)
result = {"world": world.name, "train_seed": a.train_seed, "per_class": a.per_class, "method": a.method,
          "set": Args.set, "weights": mix.weights.tolist(),
          "counting_error_lightest": 1 / math.sqrt(a.per_class * float(mix.weights.min())), "ratios": {}}
result["ratios"]["exact"] = ratios(mix, mix.sample(labels, torch.Generator().manual_seed(3))[0], labels)
result["ratios"]["teacher"] = ratios(mix, teacher_sample(world, labels, noise), labels)
result["ratios"]["base"] = ratios(mix, teacher_sample(world, labels, noise, model=task.base.eval()), labels)
t0 = time.time()
student, method, *_ = bench.train_student(task, a.method, Args, a.train_seed)
result["train_seconds"] = time.time() - t0
x, how = bench.student_sample(student, method, labels, noise.float(), 5)
result["sampler"] = how
result["ratios"]["student"] = ratios(mix, x, labels)
pairs = getattr(method, "pairs", None)
if pairs is not None and len(pairs):  # the regression targets: few per mode, so their own mass is off by ~1/sqrt(n)
    result["ratios"]["pairs"] = ratios(mix, pairs.x.double(), pairs.cond.long())
    result["pairs"] = len(pairs)
for k, v in result["ratios"].items():
    f = flat(v)
    print(f"{k:8s} min {float(f.min()):.3f} rms error {float((f - 1).pow(2).mean().sqrt()):.3f}", flush=True)
out = Path(a.out or HERE / f"mass_errors-s{a.world}-t{a.train_seed}.json")
out.write_text(json.dumps(result, indent=1))
print(f"wrote {out} ({result['train_seconds']:.0f} s of training)")
