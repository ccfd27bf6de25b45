"""Seed-stable noise for the stochastic samplers.

A noise sampler is a callable ``(sigma, sigma_next) -> noise`` shaped like the state, the convention of
k-diffusion and ComfyUI. The samplers here call it once for every step that re-noises, in step order.

:func:`default_noise_sampler` draws from a CPU ``torch.Generator`` seeded once, in float32, and only then
moves the draw to the state's device and dtype. The same seed therefore gives the same noise on CPU,
CUDA or MPS and in fp16, fp32 or fp64 runs (ComfyUI's own sampler seeds a generator on the state's
device, whose streams differ between devices).

The seed is salted before use: ComfyUI draws the *initial* noise from ``torch.manual_seed(seed)`` on the
CPU, and a step noise drawn from the same unsalted stream would repeat it exactly (first re-noise equal
to the starting noise), which is not the "fresh noise" that LCM, TCD and DMD2 assume.

:func:`replay_noise_sampler` hands out a given list of tensors instead, so a test can feed the very
noise a reference implementation drew.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: xor-ed into the seed so the step noise is independent of the initial noise drawn from the same seed
SEED_SALT = 0x5D15_7111_E000_0001
_MASK64 = (1 << 64) - 1


def step_noise_seed(seed: int) -> int:
    """The generator seed the step noise of `seed` uses (a fixed salt; still one stream per seed)."""
    return (int(seed) ^ SEED_SALT) & _MASK64


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Noise shaped like `x`, drawn from a CPU generator seeded once from `seed`.

    seed None draws a seed from torch's global generator, so `torch.manual_seed` still controls it.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
    generator = torch.Generator(device="cpu")
    generator.manual_seed(step_noise_seed(seed))
    shape, device, dtype = x.shape, x.device, x.dtype

    def sampler(sigma=None, sigma_next=None) -> torch.Tensor:
        z = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
        return z.to(device=device, dtype=dtype)

    return sampler


def replay_noise_sampler(noises: Sequence[torch.Tensor]) -> NoiseSampler:
    """A noise sampler that returns `noises` in order, unchanged (for exactness tests).

    The returned callable has a `used` attribute: how many tensors were handed out so far.
    """
    queue = list(noises)

    def sampler(sigma=None, sigma_next=None) -> torch.Tensor:
        if sampler.used >= len(queue):
            raise RuntimeError(f"replay_noise_sampler: asked for noise #{sampler.used + 1} "
                               f"but only {len(queue)} tensors were given")
        z = queue[sampler.used]
        sampler.used += 1
        return z

    sampler.used = 0
    return sampler


def initial_noise(shape: Sequence[int], seed: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Unit Gaussian noise for the starting state, from ``torch.Generator().manual_seed(seed)`` on the CPU.

    This is the stream ComfyUI's ``prepare_noise`` draws for batch-size-independent seeds, so a standalone
    run and a ComfyUI run with the same seed start from the same noise.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device="cpu")
    return z.to(device=device, dtype=dtype)


__all__ = ["NoiseSampler", "default_noise_sampler", "replay_noise_sampler", "initial_noise",
           "step_noise_seed", "SEED_SALT"]
