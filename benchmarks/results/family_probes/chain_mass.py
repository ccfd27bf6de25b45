"""Where does a 4-step DMD2 student (exit_step=last) decide a light mode's mass? The per-mode coverage (mass in
the mode's basin) and recall of each step's x0 along the student's own chain (the family recipe: 999,499,199,49,
regression 0.25, 12000 it.) on world s4 with the family's base (fit seed 0), 40000 samples; and the same
student trained with its DMD gradient flowing back through the whole chain (--chain: the earlier steps run
with gradients instead of backward simulation's no_grad). Outputs: chain_mass_last.log, chain_mass_chain.log.

    python benchmarks/results/family_probes/chain_mass.py [--chain]
"""
import argparse
import importlib.util
import time
from pathlib import Path
import torch
from comfyui_distillery.sampling.api import initial_state
from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas
from comfyui_distillery.worlds.family import make_world
from comfyui_distillery.worlds.tasks import GaussianMixtureTask
from comfyui_distillery.worlds.gmm import mode_report
from comfyui_distillery.trainers.methods import dmd2 as dmd2mod

p = argparse.ArgumentParser()
p.add_argument("--world", type=int, default=4)
p.add_argument("--chain", action="store_true")
p.add_argument("--budget", type=float, default=1.0)
p.add_argument("--set", action="append", default=[])
a = p.parse_args()

spec = importlib.util.spec_from_file_location("gmm_family", Path(__file__).resolve().parents[2] / "gmm_family.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
torch.set_num_threads(1)

if a.chain:
    def chain_generate(student, cond, sigmas, noise, generator, step_index=None, grad=True):
        schedule = student.schedule
        n = len(sigmas)
        if step_index is None:
            step_index = int(torch.randint(0, n, (1,), generator=generator))
        b = noise.shape[0]
        x = initial_state(student, noise, float(sigmas[0]))
        with torch.set_grad_enabled(grad):
            for i in range(step_index):
                x0 = student(x, sigmas[i].expand(b), cond)
                fresh = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
                x = schedule.add_noise(x0, fresh, sigmas[i + 1].expand(b))
            x0 = student(x, sigmas[step_index].expand(b), cond)
        return x0, step_index
    dmd2mod.student_generate = chain_generate

class Args:
    one_step_timestep, budget = "auto", a.budget
    set = ["dmd2:4.student_timesteps=999,499,199,49", "dmd2:4.regression_weight=0.25"] + a.set

world = make_world(a.world)
torch.manual_seed(0)
task = GaussianMixtureTask(world.mixture, world.schedule(), width=256, fit_steps=3000, seed=0)
N = 40000
labels = torch.randint(0, world.num_classes, (N,), generator=torch.Generator().manual_seed(1))
noise = torch.randn(N, world.dim, generator=torch.Generator().manual_seed(2))
t0 = time.time()
student, method, *_ = bench.train_student(task, "dmd2:4", Args, 0)
print(f"trained in {time.time()-t0:.0f} s", flush=True)
sig = timesteps_to_sigmas(student.schedule, method.opt.student_timesteps)[:-1]
mix = world.mixture

def report(tag, x0):
    r = mode_report(mix, x0.double(), labels)
    print(f"{tag:28s} coverage min {r['coverage_min']:.3f}  recall min {r['recall_min']:.3f}  off {r['off_mode_share']:.4f}",
          flush=True)

def chain(model, steps_model=None):
    g = torch.Generator().manual_seed(5)
    x = initial_state(student, noise, float(sig[0]))
    outs = []
    with torch.no_grad():
        for i in range(len(sig)):
            m = model if steps_model is None else steps_model[i]
            x0 = m(x, sig[i].expand(N), labels)
            outs.append(x0)
            if i + 1 < len(sig):
                x = student.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), sig[i + 1].expand(N))
    return outs

base = task.base.eval()
report('exact samples', mix.sample(labels, torch.Generator().manual_seed(3))[0])
outs = chain(student)
for i, x0 in enumerate(outs):
    report(f"student step {i+1} (t={method.opt.student_timesteps[i]})", x0)
# the student's step 1, then the base's posterior-mean x0 at the later levels, the student's last step
mixed = chain(None, [student, base, base, student])
report("student1, base 2-3, student4", mixed[-1])
mixed = chain(None, [student, student, student, base])
report("student1-3, base 4", mixed[-1])
