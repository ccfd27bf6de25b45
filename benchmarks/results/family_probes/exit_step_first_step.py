"""Does exit_step=last leave a 4-step student's earlier steps untrained? The step-1 x0 (from pure noise at 999)
of a dmd2:4 student, 3000 iterations on the recipe's 999,749,499,249, against the fitted base's, with
exit_step=last and =uniform, on world s4 (base fitted with seed 0). Its output is exit_step_first_step.log.

    python benchmarks/results/family_probes/exit_step_first_step.py
"""
import importlib.util
from pathlib import Path

import torch

from comfyui_distillery.sampling.api import initial_state
from comfyui_distillery.sampling.timesteps import timesteps_to_sigmas
from comfyui_distillery.worlds.family import make_world
from comfyui_distillery.worlds.tasks import GaussianMixtureTask

spec = importlib.util.spec_from_file_location("gmm_family", Path(__file__).resolve().parents[2] / "gmm_family.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
torch.set_num_threads(1)


class Args:  # what train_student reads of the bench's arguments
    one_step_timestep, budget, set = "auto", 0.25, []


world = make_world(4)
torch.manual_seed(0)
task = GaussianMixtureTask(world.mixture, world.schedule(), width=256, fit_steps=3000, seed=0)
labels = torch.randint(0, world.num_classes, (4000,), generator=torch.Generator().manual_seed(1))
noise = torch.randn(4000, world.dim, generator=torch.Generator().manual_seed(2))
base = task.base.eval()
sigma = timesteps_to_sigmas(base.schedule, [999])[0]
x = initial_state(base, noise, float(sigma))
with torch.no_grad():
    x0_base = base(x, sigma.expand(4000), labels)
data = world.mixture.sample(labels, torch.Generator().manual_seed(3))[0]
for exit_step in ("last", "uniform"):
    Args.set = [f"dmd2:4.exit_step={exit_step}"]
    student, *_ = bench.train_student(task, "dmd2:4", Args, 0)
    with torch.no_grad():
        x0 = student(x, sigma.expand(4000), labels)
    print(f"{exit_step}: step-1 x0 mean |student - base| {float((x0 - x0_base).norm(dim=1).mean()):.3f}; "
          f"spread over noises (norm of per-coordinate std): base {float(x0_base.std(0).norm()):.3f}, "
          f"student {float(x0.std(0).norm()):.3f}, data {float(data.std(0).norm()):.3f}", flush=True)
