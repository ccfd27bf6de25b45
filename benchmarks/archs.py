"""Real architectures with random weights, for speed and memory benchmarks (and tiny twins for CPU checks).

Speed and memory of a training step or a sampler do not depend on the weights, so the benchmarks build
the networks from their configs alone: no hub access, no checkpoints. The configs are the published ones,
written out in the package's trainers/architectures.py (the memory planner builds them too):

=========  =====================================  ===============  ===================================
name       network                                 parameters       conditioning per sample
=========  =====================================  ===============  ===================================
sd15       SD1.5 UNet2DConditionModel, 512 px      859,520,964      text [77, 768]
           (64x64x4 latents)
sdxl       SDXL UNet2DConditionModel, 1024 px      2,567,463,684    text [77, 2048], text_embeds [1280],
           (128x128x4 latents)                                      time_ids [6]
sd3m       SD3-medium SD3Transformer2DModel,       2,028,328,000    encoder_hidden_states [333, 4096]
           1024 px (128x128x16 latents, patch 2)                    (77 CLIP + 256 T5 tokens),
                                                                    pooled_projections [2048]
flux       FLUX.1-dev FluxTransformer2DModel,      11,901,408,320   encoder_hidden_states [512, 4096],
           1024 px (128x128x16 latents in 2x2                       pooled_projections [768],
           patches: 4096 tokens of 64)                              guidance (3.5)
=========  =====================================  ===============  ===================================

:func:`check_param_counts` builds each config on the meta device (no memory) and asserts the count
(SD1.5 and SDXL within 1% of 859.5 M / 2567 M; SD3-medium within 1% of 2028 M; FLUX.1-dev of 11.90 B). The
``tiny-*`` twins keep each architecture's structure (block types, SDXL's added conditioning, the
joint-attention transformers, Flux's guidance embedding) at a size that runs on a CPU in milliseconds.

Imported by the scripts next to it (``python benchmarks/train_throughput.py``); it is not part of the
installed package.
"""

from __future__ import annotations

import torch

from comfyui_distillery.core.models import map_cond
from comfyui_distillery.trainers.diffusers_task import PromptBank
from comfyui_distillery.trainers.tasks import DistillTask

# the configs, the Arch description and the tiny twins live in the package (the planner uses them too)
from comfyui_distillery.trainers.architectures import (  # noqa: F401
    ARCHS, SD3_MEDIUM_TRANSFORMER, SD3_TARGET_MODULES, SD15_UNET, SDXL_UNET, TINY_ARCHS, TINY_SD3_TRANSFORMER,
    TINY_SD15_UNET, TINY_SDXL_UNET, Arch, diffusion_model, network_class)


def get_archs(names, tiny: bool) -> list[Arch]:
    table = TINY_ARCHS if tiny else ARCHS
    out = []
    for name in names:
        if name not in table:
            raise ValueError(f"arch={name!r}: choose from {', '.join(table)}")
        out.append(table[name])
    return out


# --- networks ---------------------------------------------------------------------------------------------

def _network_class(arch: Arch):
    return network_class(arch)


def param_count(arch: Arch) -> int:
    """Parameters of the network, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        net = _network_class(arch)(**arch.config)
    return sum(p.numel() for p in net.parameters())


def check_param_counts(archs=None, tolerance: float = 0.01) -> dict[str, int]:
    """Assert the full-size configs have their published parameter counts (within `tolerance`)."""
    counts = {}
    for arch in archs or ARCHS.values():
        n = param_count(arch)
        counts[arch.name] = n
        if arch.expected_params is not None:
            rel = abs(n - arch.expected_params) / arch.expected_params
            assert rel <= tolerance, (f"{arch.name}: {n:,} parameters, expected {arch.expected_params:,} "
                                      f"(off by {100 * rel:.2f}%); the config in trainers/architectures.py is wrong")
    return counts


def build_network(arch: Arch, device, dtype=torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """The network with random weights, created directly on `device` (no CPU copy of a 2.6 B model)."""
    torch.manual_seed(seed)
    with torch.device(device):
        net = _network_class(arch)(**arch.config)
    # nn.Module.to, not ModelMixin.to: the latter warns about from_pretrained's keep-in-fp32 modules, which
    # these configs do not have. `device` again: a buffer made from numpy (SD3's sin-cos position table)
    # ignores the default-device context.
    return torch.nn.Module.to(net, device=device, dtype=dtype).eval()


def make_model(arch: Arch, network: torch.nn.Module):
    """The network behind the package's DiffusionModel interface (SD schedule; flow schedule at the arch's
    shift, with Flux's patch packing, timestep scale and guidance input)."""
    return diffusion_model(arch, network)


# --- conditioning -----------------------------------------------------------------------------------------

def random_conditioning(arch: Arch, count: int, device, generator: torch.Generator | None = None,
                        dtype=torch.float32):
    """(cond, uncond) for `count` random "prompts" of the right shapes; uncond has batch 1.

    sd15: text [N, 77, 768]; sdxl: {encoder_hidden_states [N, 77, 2048], added_cond_kwargs {text_embeds
    [N, 1280], time_ids [N, 6]}} with all-zero unconditional embeddings (as DMD2 does for SDXL); sd3m:
    {encoder_hidden_states [N, 333, 4096], pooled_projections [N, 2048]}; flux: {encoder_hidden_states
    [N, 512, 4096], pooled_projections [N, 768], guidance [N] (3.5)}.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    text = randn(count, arch.text_tokens, arch.text_dim)
    null_text = randn(1, arch.text_tokens, arch.text_dim)
    if arch.kind == "dit":
        cond = {"encoder_hidden_states": text, "pooled_projections": randn(count, arch.pooled_dim)}
        uncond = {"encoder_hidden_states": null_text, "pooled_projections": randn(1, arch.pooled_dim)}
        if arch.guidance_input:  # guidance-distilled: the prompts carry the scale the student is trained at
            cond[arch.guidance_input] = torch.full((count,), arch.guidance, device=device, dtype=dtype)
            uncond[arch.guidance_input] = torch.full((1,), arch.guidance, device=device, dtype=dtype)
        return cond, uncond
    if arch.sdxl_style:
        r = float(arch.resolution)
        time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]], device=device, dtype=dtype)
        cond = {"encoder_hidden_states": text,
                "added_cond_kwargs": {"text_embeds": randn(count, arch.pooled_dim),
                                      "time_ids": time_ids.expand(count, -1).contiguous()}}
        uncond = {"encoder_hidden_states": torch.zeros_like(null_text),
                  "added_cond_kwargs": {"text_embeds": torch.zeros(1, arch.pooled_dim, device=device, dtype=dtype),
                                        "time_ids": time_ids}}
        return cond, uncond
    return text, null_text


def batch_conditioning(arch: Arch, batch: int, device, seed: int = 0):
    """(cond, uncond) with both at batch size `batch` (for samplers)."""
    cond, uncond = random_conditioning(arch, batch, device, torch.Generator().manual_seed(seed))
    return cond, map_cond(lambda u: u.expand(batch, *u.shape[1:]).contiguous(), uncond)


# --- gradient checkpointing that reports its recomputation ----------------------------------------------

class RecomputeMeter:
    """Counts the FLOPs that gradient checkpointing spends recomputing, so model FLOPs = counted - `flops`.

    It wraps the engine's role-preserving checkpoint (`trainers.lora.role_preserving_checkpoint_func`,
    which recomputes each block under the LoRA role of its forward); while `counter` is an active
    `FlopCounterMode`, the FLOPs counted during recomputation are added to `flops`. The function is a
    closure over the meter, so `copy.deepcopy` of a network (full fine-tune copies) keeps the same meter.
    """

    def __init__(self):
        self.counter = None
        self.flops = 0
        self.recomputations = 0

    def reset(self, counter=None) -> None:
        self.counter, self.flops, self.recomputations = counter, 0, 0

    def checkpoint_fn(self):
        from comfyui_distillery.trainers.lora import role_preserving_checkpoint_func

        meter = self

        def on_recompute(thunk):
            before = meter.counter.get_total_flops() if meter.counter is not None else 0
            try:
                return thunk()
            finally:  # non-reentrant checkpoint may stop a recomputation early (by raising)
                if meter.counter is not None:
                    meter.flops += meter.counter.get_total_flops() - before
                    meter.recomputations += 1

        return role_preserving_checkpoint_func(on_recompute)


# --- the benchmark task -----------------------------------------------------------------------------------

class BenchTask(DistillTask):
    """A distillation task for a random-weight network: random prompt embeddings and random "real" latents.

    The real latents stand in for an encoded image folder. Methods that can use data take it instead of
    making their own: TCD would otherwise add a batch of teacher samples (25 guided steps each) per
    iteration until it holds 256, which is data preparation, not the cost of a training step. DMD2 and
    SiD use real images only for their optional GAN term (off by default).
    """

    has_real_images = True

    def __init__(self, arch: Arch, network: torch.nn.Module, device, prompts: int = 16, seed: int = 0):
        self.arch = arch
        self.name = f"bench-{arch.name}"
        self.network = network
        self.base = make_model(arch, network)
        self.teacher = None
        self.sample_shape = arch.sample_shape
        self.lora_targets = list(arch.lora_targets)
        self.default_guidance = arch.guidance
        self.feature_shape = (0, False)
        self.device = torch.device(device)
        cond, uncond = random_conditioning(arch, prompts, device, torch.Generator().manual_seed(seed))
        self.prompt_bank = PromptBank(cond, uncond, prompts)
        self.meter = RecomputeMeter()

    def enable_gradient_checkpointing(self) -> None:
        self.network.enable_gradient_checkpointing(self.meter.checkpoint_fn())

    def conditioning(self, batch, generator):
        return self.prompt_bank(batch, generator)

    def real_images(self, batch, generator):
        x0 = torch.randn((batch, *self.sample_shape), generator=generator).to(self.device)
        cond, _ = self.prompt_bank(batch, generator)
        return x0, cond

    def describe(self) -> dict:
        return {"task": self.name, **self.arch.describe()}


def lora_param_count(arch: Arch, rank: int = 64) -> int:
    """Parameters of one rank-`rank` adapter on `arch`'s LoRA targets (built on meta; slow for SDXL)."""
    from comfyui_distillery.trainers import lora

    with torch.device("meta"):
        net = _network_class(arch)(**arch.config)
    lora.add_lora_adapter(net, "count", rank, None, arch.lora_targets)
    return sum(p.numel() for p in lora.adapter_parameters(net, "count"))
