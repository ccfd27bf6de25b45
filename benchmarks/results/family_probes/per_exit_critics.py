"""Does a fake score per exit step let `exit_step=uniform` keep the light modes' mass? Under `last` only the
N-step output is matched and the steps that decide the mass (the mode is chosen where the noised modes still
overlap, t >= 199 on the family recipe's 999,499,199,49) train only through the shared weights; under
`uniform` every step is trained but one critic learns the mixture of the step outputs, so only the mixture is
pinned. Here each exit step k gets its own critic, trained on step k's outputs of one no-grad chain (every
step's output from the same chain, so every critic sees fresh samples each critic update), and the student's
DMD gradient at exit k uses critic k: every step's output is matched to the data on its own.

Runs the family bench (benchmarks/gmm_family.py, its arguments) with DMD2 replaced by this variant. It became
DMD2's `critic_per_step` option, which draws the same random numbers in the same order: `gmm_family.py ...
--set dmd2:4.critic_per_step=true` prints the same rows (checked at --budget 0.01); the ten-world run
(results/family_probes/per_exit/) was made with this probe, started before the option existed.

    python benchmarks/results/family_probes/per_exit_critics.py --seed 4 --worlds 1 --fit-seed 0 --budget 1 \
        --methods dmd2:4 --set dmd2:4.student_timesteps=999,499,199,49 --set dmd2:4.regression_weight=0.25 \
        --set dmd2:4.exit_step=uniform --out benchmarks/results/family_probes --tag -s4-per-exit
"""
import copy
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from comfyui_distillery.sampling.api import initial_state
from comfyui_distillery.trainers import api
from comfyui_distillery.trainers.methods.dmd2 import DMD2

spec = importlib.util.spec_from_file_location("gmm_family", Path(__file__).resolve().parents[2] / "gmm_family.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


class PerExitDMD2(DMD2):
    def setup(self, roles, task, config):
        extra = super().setup(roles, task, config)
        n = len(self.student_sigmas(roles.student.schedule))
        self.critics = [roles.critic] + [copy.deepcopy(roles.critic) for _ in range(n - 1)]
        params = [p for c in self.critics[1:] for p in c.parameters()]
        for p in params:
            p.requires_grad_(True)
        extra.setdefault("critic", []).extend(params)
        print(f"per-exit critics: {len(self.critics)}", flush=True)
        return extra

    def _generate(self, ctx, grad):
        from comfyui_distillery.trainers.methods import dmd2 as dmd2mod

        task = ctx.task
        cond, uncond = task.conditioning(ctx.batch, ctx.generator)
        noise = ctx.randn((ctx.batch, *task.sample_shape))
        sigmas = self.student_sigmas(ctx.roles.student.schedule).to(ctx.device)
        x, k = dmd2mod.student_generate(ctx.roles.student, cond, sigmas, noise, ctx.generator,
                                        step_index=self.exit_index(sigmas), grad=grad)
        ctx.roles.critic = self.critics[k]  # the student's DMD gradient at exit k: critic k
        return x, cond, uncond

    def _critic_loss(self, ctx):
        task = ctx.task
        student = ctx.roles.student
        schedule = student.schedule
        cond, _ = task.conditioning(ctx.batch, ctx.generator)
        noise = ctx.randn((ctx.batch, *task.sample_shape))
        sigmas = self.student_sigmas(schedule).to(ctx.device)
        b = noise.shape[0]
        outs = []
        with torch.no_grad():
            x = initial_state(student, noise, float(sigmas[0]))
            for i in range(len(sigmas)):
                x0 = student(x, sigmas[i].expand(b), cond)
                outs.append(x0)
                if i + 1 < len(sigmas):
                    x = schedule.add_noise(x0, ctx.randn(noise.shape, dtype=noise.dtype), sigmas[i + 1].expand(b))
        native = schedule.prediction_type if schedule.prediction_type != "sample" else "epsilon"
        loss = 0.0
        for critic, x0 in zip(self.critics, outs):
            sigma = self._sample_sigma(ctx, b, 0, schedule.num_train_timesteps - 1)
            x_t, _ = self._diffuse(ctx, x0, sigma)
            pred = critic(x_t, sigma, cond, output=native)
            loss = loss + F.mse_loss(pred.float(), schedule.from_x0(x0, x_t, sigma, native).float())
        return loss, {"denoise/critic": float(loss) / len(outs)}


_make_method = api.make_method


def make_method(name, **options):
    method = _make_method(name, **options)  # the registry's checked options
    return PerExitDMD2(method.opt) if name == "dmd2" else method


api.make_method = make_method

if __name__ == "__main__":
    bench.main(sys.argv[1:])
