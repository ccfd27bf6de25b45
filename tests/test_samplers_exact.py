"""Each sampler reproduces its diffusers reference scheduler step by step.

Same model, same timesteps, same noise: the reference runs diffusers' scheduler loop on its unit-variance
`sample`, ours runs the k-diffusion-style sampler on the state x = a x0 + s eps; every intermediate latent
is compared in diffusers' coordinates (sample = schedule.scale_model_input(x, sigma), i.e. x / sqrt(1 +
sigma^2) for VP, x itself for flow). Bounds: 1e-5 in float64, 1e-4 in float32.

Models: the exact Gaussian-mixture teacher (flat 6-d data, labels as cond) and a tiny random diffusers
UNet2DConditionModel (362K parameters, 8x8 latents), each as an epsilon, v-prediction and flow model.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_distillery.core.models import DiffusersUNetModel, Guided
from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.sampling import (SAMPLERS, distilled_sigmas, replay_noise_sampler, sample_ddim,
                                         sample_tcd, sample_x0_renoise, timesteps_to_sigmas)
from comfyui_distillery.sampling.tcd import tcd_levels
from comfyui_distillery.worlds.gmm import GaussianMixture, GaussianMixtureTeacher

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FLOW_SHIFT = 3.0
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
MAX_DIFFS: dict[str, float] = {}  # filled by the tests, printed at the end (pytest -s)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: threads only add contention (and noise to timings) on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if MAX_DIFFS:
        print("\nmax |ours - diffusers| per case:")
        for k, v in sorted(MAX_DIFFS.items()):
            print(f"  {k:60s} {v:.2e}")


# --- models -------------------------------------------------------------------------------------------------

class World:
    """A model seen two ways: as our Guided (x, sigma) -> x0, and as diffusers' native(sample, t)."""

    def __init__(self, kind: str, prediction: str, dtype: torch.dtype):
        self.kind, self.prediction, self.dtype = kind, prediction, dtype
        if prediction == "flow":
            self.schedule = RectifiedFlowSchedule(shift=FLOW_SHIFT)
        else:
            self.schedule = DiscreteVPSchedule.sd15(prediction)
        if kind == "gmm":
            self.teacher = GaussianMixtureTeacher(GaussianMixture.random(6, 3, 2, seed=0), self.schedule)
            self.cond = torch.tensor([0, 1, 2, 3])  # 3 = the unconditional label
            self.guided = Guided(self.teacher, self.cond)
            self.shape = (4, 6)
        else:
            self.unet = tiny_unet(dtype)
            g = torch.Generator().manual_seed(1)
            self.cond = torch.randn(2, 5, 32, generator=g, dtype=torch.float64).to(dtype)
            self.guided = Guided(DiffusersUNetModel(self.unet, self.schedule), self.cond)
            self.shape = (2, 4, 8, 8)

    def sigma_of(self, t) -> float:
        """The noise level of a diffusers timestep (integer for VP, sigma * 1000 for flow)."""
        if self.prediction == "flow":
            return float(t) / 1000.0
        return float(self.schedule.sigmas[int(t)])

    @torch.no_grad()
    def native(self, sample: torch.Tensor, t) -> torch.Tensor:
        if self.kind == "unet":
            return self.unet(sample, t, encoder_hidden_states=self.cond).sample
        sigma = self.sigma_of(t)
        x = to_state(self.schedule, sample, sigma)
        x0 = self.teacher.predict_x0(x, torch.full((len(x),), sigma, dtype=torch.float64), self.cond)
        return self.schedule.from_x0(x0, x, sigma, self.prediction).to(sample.dtype)


_UNETS: dict = {}


def tiny_unet(dtype):
    if dtype not in _UNETS:
        from diffusers import UNet2DConditionModel
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        _UNETS[dtype] = unet.to(dtype).eval()
    return _UNETS[dtype]


def to_state(schedule, sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """diffusers' network input -> our state at sigma (x = sample * sqrt(1 + sigma^2) for VP)."""
    return sample / schedule.scale_model_input(torch.ones((), dtype=torch.float64), sigma).to(sample.dtype)


# --- the two loops --------------------------------------------------------------------------------------------

def noise_list(world: World, n: int, seed: int, dtype=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(world.shape, generator=g, dtype=dtype or world.dtype) for _ in range(n)]


def run_reference(world: World, scheduler, sample0: torch.Tensor, seed: int, **step_kwargs):
    if world.dtype == torch.float64 and hasattr(scheduler, "alphas_cumprod"):
        # diffusers keeps alpha_bar in float32 and takes its sqrt there, ~1e-7 relative error that a
        # float64 reference should not carry (the values are the same float32 cumprod we use)
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    generator = torch.Generator().manual_seed(seed)
    sample, traj = sample0, [sample0]
    for t in scheduler.timesteps:
        out = world.native(sample, t)
        sample = scheduler.step(out, t, sample, generator=generator, **step_kwargs).prev_sample
        traj.append(sample)
    return traj


def run_ours(world: World, sampler, sample0: torch.Tensor, sigmas: torch.Tensor, noises, **options):
    xs = []
    x = to_state(world.schedule, sample0, float(sigmas[0]))
    out = sampler(world.guided, x, sigmas, callback=lambda d: xs.append(d["x"]), disable=True,
                  schedule=world.schedule, noise_sampler=replay_noise_sampler(noises), **options)
    xs.append(out)
    assert len(xs) == len(sigmas)
    return [world.schedule.scale_model_input(x, float(s)) for x, s in zip(xs, sigmas)]


def max_diff(ours, ref) -> float:
    assert len(ours) == len(ref)
    return max(float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) for a, b in zip(ours, ref))


def check(name: str, world: World, ours, ref):
    diff = max_diff(ours, ref)
    MAX_DIFFS[f"{name} [{world.kind} {world.prediction} {str(world.dtype)[6:]}]"] = diff
    assert diff < TOL[world.dtype], f"{name}: max abs diff {diff:.3e} >= {TOL[world.dtype]:.0e}"
    # the trajectory must actually move (guards against comparing a thing with itself)
    assert float((ref[0] - ref[-1]).abs().max()) > 0.1


def start_sample(world: World, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(world.shape, generator=g, dtype=world.dtype)


WORLDS = [(k, p, d) for k in ("gmm", "unet") for p in ("epsilon", "v_prediction")
          for d in (torch.float64, torch.float32)]


def world_id(w):
    return f"{w[0]}-{w[1]}-{str(w[2])[6:]}"


@pytest.fixture(scope="module")
def worlds():
    cache = {}

    def get(kind, prediction, dtype):
        key = (kind, prediction, dtype)
        if key not in cache:
            cache[key] = World(*key)
        return cache[key]
    return get


# --- TCD ---------------------------------------------------------------------------------------------------------

TCD_TIMESTEPS = {
    "default4": None,  # TCDScheduler's own 4-step grid: 999, 759, 499, 259
    # off the 50-step grid; at t' = 90, gamma 0.3: diffusers' float32 floor((1 - 0.3) * 90) is 63, float64's is 62
    "custom": [999, 800, 611, 377, 90],
}


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("grid", list(TCD_TIMESTEPS))
@pytest.mark.parametrize("spec", WORLDS, ids=world_id)
def test_tcd_matches_diffusers(worlds, spec, grid, gamma):
    from diffusers import TCDScheduler
    world = worlds(*spec)
    sched = TCDScheduler(**SD_BETAS, prediction_type=world.prediction)
    if TCD_TIMESTEPS[grid] is None:
        sched.set_timesteps(4)
        assert sched.timesteps.tolist() == [999, 759, 499, 259]
    else:
        sched.set_timesteps(timesteps=TCD_TIMESTEPS[grid])
    sigmas = timesteps_to_sigmas(world.schedule, sched.timesteps.tolist())
    sample0 = start_sample(world)
    ref = run_reference(world, sched, sample0, seed=7, eta=gamma)
    ours = run_ours(world, sample_tcd, sample0, sigmas, noise_list(world, len(sigmas), 7), gamma=gamma)
    check(f"TCD {grid} gamma={gamma}", world, ours, ref)


def test_tcd_s_rounds_like_diffusers():
    # (1 - 0.3) * 90 is 62.99999999999999 in float64 but 63 in diffusers' float32 long-tensor product
    schedule = DiscreteVPSchedule.sd15()
    sigmas = timesteps_to_sigmas(schedule, [999, 90])
    levels = tcd_levels(schedule, sigmas, 0.3)
    assert float(levels[0]) == pytest.approx(float(schedule.sigmas[63]), rel=1e-12)
    assert float(levels[1]) == pytest.approx(float(schedule.sigmas[0]), rel=1e-12)  # last step: timestep 0
    # float32 SIGMAS (what ComfyUI passes) give the same levels
    levels32 = tcd_levels(schedule, sigmas.float(), 0.3)
    assert float(levels32[0]) == pytest.approx(float(levels[0]), rel=1e-12)


# --- LCM (x0 + fresh noise with the boundary condition) ---------------------------------------------------------

@pytest.mark.parametrize("spec", WORLDS, ids=world_id)
def test_lcm_custom_timesteps_matches_diffusers(worlds, spec):
    from diffusers import LCMScheduler
    world = worlds(*spec)
    sched = LCMScheduler(**SD_BETAS, prediction_type=world.prediction)
    sched.set_timesteps(timesteps=[999, 749, 499, 249])
    sigmas = distilled_sigmas(world.schedule, "dmd2_4step")
    sample0 = start_sample(world)
    ref = run_reference(world, sched, sample0, seed=11)
    noises = noise_list(world, 4, 11)
    ours = run_ours(world, sample_x0_renoise, sample0, sigmas, noises, lcm_boundary=True)
    check("LCM [999,749,499,249] boundary", world, ours, ref)
    # DMD2 students run without the boundary condition: at these timesteps it changes nothing visible
    plain = run_ours(world, sample_x0_renoise, sample0, sigmas, noises)
    check("x0_renoise (no boundary) vs LCM", world, plain, ref)


# --- DDIM trailing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("spec", WORLDS, ids=world_id)
def test_ddim_trailing_matches_diffusers(worlds, spec, steps, set_alpha_to_one):
    from diffusers import DDIMScheduler
    world = worlds(*spec)
    sched = DDIMScheduler(**SD_BETAS, prediction_type=world.prediction, timestep_spacing="trailing",
                          set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    sched.set_timesteps(steps)
    sigmas = distilled_sigmas(world.schedule, "trailing", steps=steps)
    assert sched.timesteps.tolist() == [round(float(t)) for t in world.schedule.timestep(sigmas[:-1])]
    sample0 = start_sample(world)
    ref = run_reference(world, sched, sample0, seed=0, eta=0.0)
    ours = run_ours(world, sample_ddim, sample0, sigmas, [], end_on_t0=not set_alpha_to_one)
    check(f"DDIM trailing {steps} steps set_alpha_to_one={set_alpha_to_one}", world, ours, ref)
    if not set_alpha_to_one:  # TCD with gamma = 0 is the same DDIM
        tcd = run_ours(world, sample_tcd, sample0, sigmas, [], gamma=0.0)
        check(f"TCD gamma=0 = DDIM trailing {steps}", world, tcd, ref)


# --- flow models --------------------------------------------------------------------------------------------------

FLOW_WORLDS = [(k, "flow", d) for k in ("gmm", "unet") for d in (torch.float64, torch.float32)]


def flow_reference_setup(world, steps=4, stochastic=False):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT,
                                            stochastic_sampling=stochastic)
    sched.set_timesteps(steps)
    # our preset gives diffusers' sigmas (float32 there); run on diffusers' own timesteps so the UNet sees
    # the very same float32 timestep values
    preset = distilled_sigmas(world.schedule, "flow_euler", steps=steps)
    assert float((preset - sched.sigmas.double()).abs().max()) < 1e-6
    sigmas = torch.cat([sched.timesteps.double() / 1000.0, torch.zeros(1, dtype=torch.float64)])
    return sched, sigmas


@pytest.mark.parametrize("spec", FLOW_WORLDS, ids=world_id)
def test_flow_euler_matches_diffusers(worlds, spec):
    world = worlds(*spec)
    sched, sigmas = flow_reference_setup(world)
    sample0 = start_sample(world)
    ref = run_reference(world, sched, sample0, seed=0)
    for name, sampler, opts in [("DDIM/Euler", sample_ddim, {}), ("TCD gamma=0", sample_tcd, {"gamma": 0.0})]:
        ours = run_ours(world, sampler, sample0, sigmas, [], **opts)
        check(f"flow {name} = FlowMatchEuler shift {FLOW_SHIFT}", world, ours, ref)


@pytest.mark.parametrize("spec", FLOW_WORLDS, ids=world_id)
def test_flow_x0_renoise_matches_stochastic_flow_match(worlds, spec):
    world = worlds(*spec)
    sched, sigmas = flow_reference_setup(world, stochastic=True)
    sample0 = start_sample(world)
    ref = run_reference(world, sched, sample0, seed=5)
    noises = noise_list(world, 4, 5, dtype=torch.float32)  # diffusers draws flow noise in float32
    for name, sampler, opts in [("x0_renoise", sample_x0_renoise, {}),
                                ("TCD gamma=1", sample_tcd, {"gamma": 1.0})]:
        ours = run_ours(world, sampler, sample0, sigmas, noises, **opts)
        check(f"flow {name} = stochastic FlowMatchEuler", world, ours, ref)


def test_flow_tcd_intermediate_gamma_formula():
    # no diffusers reference for TCD on flow: check one step against the formula written out by hand
    world = World("gmm", "flow", torch.float64)
    sigmas = torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64)
    x = start_sample(world) * 1.0
    z = noise_list(world, 1, 3)[0]
    gamma = 0.4
    out = sample_tcd(world.guided, x, sigmas[:2], disable=True, schedule=world.schedule, gamma=gamma,
                     noise_sampler=replay_noise_sampler([z]))
    x0 = world.guided(x, torch.full((4,), 0.9, dtype=torch.float64))
    eps = (x - 0.1 * x0) / 0.9
    s = (1 - gamma) * 0.5
    x_s = (1 - s) * x0 + s * eps
    ratio = (1 - 0.5) / (1 - s)
    expected = ratio * x_s + math.sqrt(0.5 ** 2 - ratio ** 2 * s ** 2) * z
    assert float((out - expected).abs().max()) < 1e-12


# --- splitting, denoise, bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tcd", "x0_renoise", "ddim"])
def test_split_sigmas_continue_exactly(name):
    """First half (ends above 0) then second half == one run, with the same noise stream."""
    world = World("gmm", "epsilon", torch.float64)
    sigmas = distilled_sigmas(world.schedule, "lcm_tcd", steps=6)
    x = to_state(world.schedule, start_sample(world), float(sigmas[0]))
    noises = noise_list(world, 6, 9)
    sampler = SAMPLERS[name]
    opts = {"gamma": 0.5} if name == "tcd" else {}
    full = sampler(world.guided, x, sigmas, disable=True, schedule=world.schedule,
                   noise_sampler=replay_noise_sampler(noises), **opts)
    replay = replay_noise_sampler(noises)
    mid = sampler(world.guided, x, sigmas[:4], disable=True, schedule=world.schedule, noise_sampler=replay,
                  **opts)
    both = sampler(world.guided, mid, sigmas[3:], disable=True, schedule=world.schedule, noise_sampler=replay,
                   **opts)
    assert float((full - both).abs().max()) < 1e-12


def test_seeded_noise_is_reproducible_and_fresh():
    world = World("gmm", "epsilon", torch.float64)
    sigmas = distilled_sigmas(world.schedule, "dmd2_4step")
    x = to_state(world.schedule, start_sample(world), float(sigmas[0]))
    runs = [sample_x0_renoise(world.guided, x, sigmas, extra_args={"seed": s}, disable=True,
                              schedule=world.schedule) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "a lot"])
def test_gamma_out_of_range_names_gamma(gamma):
    world = World("gmm", "epsilon", torch.float64)
    sigmas = distilled_sigmas(world.schedule, "dmd2_4step")
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(world.guided, torch.zeros(world.shape, dtype=torch.float64), sigmas, disable=True,
                   schedule=world.schedule, gamma=gamma)


@pytest.mark.parametrize("name", ["tcd", "x0_renoise", "ddim"])
def test_bad_sigmas_name_the_field(name):
    world = World("gmm", "epsilon", torch.float64)
    x = torch.zeros(world.shape, dtype=torch.float64)
    for bad in (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, float("nan"), 0.0]),
                torch.tensor([[1.0, 0.0]])):
        with pytest.raises(ValueError, match="sigmas"):
            SAMPLERS[name](world.guided, x, bad, disable=True, schedule=world.schedule)


def test_callback_reports_every_step():
    world = World("gmm", "v_prediction", torch.float64)
    sigmas = distilled_sigmas(world.schedule, "lcm_tcd", steps=4)
    for name, sampler in SAMPLERS.items():
        seen = []
        x = to_state(world.schedule, start_sample(world), float(sigmas[0]))
        sampler(world.guided, x, sigmas, callback=seen.append, disable=True, schedule=world.schedule,
                extra_args={"seed": 0})
        assert [d["i"] for d in seen] == [0, 1, 2, 3], name
        assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert seen[0]["denoised"].shape == x.shape
