"""Real architectures with random weights, for speed and memory benchmarks (and tiny twins for CPU checks).

Speed and memory of a training step or a sampler do not depend on the weights, so the benchmarks build
the networks from their configs alone: no hub access, no checkpoints. The configs are the published ones,
written out here:

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
=========  =====================================  ===============  ===================================

:func:`check_param_counts` builds each config on the meta device (no memory) and asserts the count
(SD1.5 and SDXL within 1% of 859.5 M / 2567 M; SD3-medium within 1% of 2028 M). The ``tiny-*`` twins keep
each architecture's structure (block types, SDXL's added conditioning, the joint-attention transformer)
at a size that runs on a CPU in milliseconds.

Imported by the scripts next to it (``python benchmarks/train_throughput.py``); it is not part of the
installed package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from comfyui_distillery.core.models import DiffusersTransformerModel, DiffusersUNetModel, map_cond
from comfyui_distillery.core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule
from comfyui_distillery.trainers.diffusers_task import PromptBank
from comfyui_distillery.trainers.lora import UNET_TARGET_MODULES
from comfyui_distillery.trainers.tasks import DistillTask

# --- the real configs (diffusers' unet/config.json and transformer/config.json of the released models) ---

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    use_linear_projection=False,
)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)

# --- tiny twins (same block types and conditioning structure) ---------------------------------------------

TINY_SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
)

TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    cross_attention_dim=24, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)

TINY_SD3_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
    pos_embed_max_size=8,
)

# LoRA targets for the joint-attention transformer: both streams' attention projections and feed-forwards
# (diffusers' SD3 LoRA script targets the attention projections; the feed-forwards are added to match the
# coverage UNET_TARGET_MODULES gives the UNets).
SD3_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]


@dataclass(frozen=True)
class Arch:
    name: str
    label: str
    kind: str  # "unet" | "dit"
    config: dict
    resolution: int  # pixels; latents are resolution // 8
    text_tokens: int
    text_dim: int
    pooled_dim: int = 0  # SDXL text_embeds / SD3 pooled_projections width (0: none)
    guidance: float = 4.5  # the teacher CFG scale used for sampling and DMD2's real score
    expected_params: int | None = None
    lora_targets: list = field(default_factory=lambda: list(UNET_TARGET_MODULES))
    flow_shift: float = 3.0

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    @property
    def sample_shape(self) -> tuple:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def sdxl_style(self) -> bool:
        return self.config.get("addition_embed_type") == "text_time"

    def describe(self) -> dict:
        return {"arch": self.name, "label": self.label, "kind": self.kind, "resolution": self.resolution,
                "latent_shape": list(self.sample_shape), "text_tokens": self.text_tokens, "text_dim": self.text_dim}


ARCHS = {
    "sd15": Arch("sd15", "SD1.5 UNet @512", "unet", SD15_UNET, 512, 77, 768, guidance=1.75,
                 expected_params=859_520_964),
    "sdxl": Arch("sdxl", "SDXL UNet @1024", "unet", SDXL_UNET, 1024, 77, 2048, pooled_dim=1280, guidance=8.0,
                 expected_params=2_567_463_684),
    "sd3m": Arch("sd3m", "SD3-medium-class flow DiT @1024", "dit", SD3_MEDIUM_TRANSFORMER, 1024, 333, 4096,
                 pooled_dim=2048, guidance=4.5, expected_params=2_028_328_000,
                 lora_targets=list(SD3_TARGET_MODULES)),
}
TINY_ARCHS = {
    "sd15": Arch("tiny-sd15", "tiny SD1.5-shaped UNet", "unet", TINY_SD15_UNET, 64, 8, 16, guidance=1.75),
    "sdxl": Arch("tiny-sdxl", "tiny SDXL-shaped UNet", "unet", TINY_SDXL_UNET, 64, 8, 24, pooled_dim=16,
                 guidance=8.0),
    "sd3m": Arch("tiny-sd3m", "tiny SD3-shaped flow DiT", "dit", TINY_SD3_TRANSFORMER, 64, 12, 24, pooled_dim=12,
                 guidance=4.5, lora_targets=list(SD3_TARGET_MODULES)),
}


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
    if arch.kind == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


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
                                      f"(off by {100 * rel:.2f}%); the config in benchmarks/archs.py is wrong")
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
    """The network behind the package's DiffusionModel interface (SD schedule / flow schedule, shift 3)."""
    if arch.kind == "unet":
        return DiffusersUNetModel(network, DiscreteVPSchedule.sd15("epsilon"))
    return DiffusersTransformerModel(network, RectifiedFlowSchedule(shift=arch.flow_shift), timestep_scale=1.0)


# --- conditioning -----------------------------------------------------------------------------------------

def random_conditioning(arch: Arch, count: int, device, generator: torch.Generator | None = None,
                        dtype=torch.float32):
    """(cond, uncond) for `count` random "prompts" of the right shapes; uncond has batch 1.

    sd15: text [N, 77, 768]; sdxl: {encoder_hidden_states [N, 77, 2048], added_cond_kwargs {text_embeds
    [N, 1280], time_ids [N, 6]}} with all-zero unconditional embeddings (as DMD2 does for SDXL); sd3m:
    {encoder_hidden_states [N, 333, 4096], pooled_projections [N, 2048]}.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    text = randn(count, arch.text_tokens, arch.text_dim)
    null_text = randn(1, arch.text_tokens, arch.text_dim)
    if arch.kind == "dit":
        cond = {"encoder_hidden_states": text, "pooled_projections": randn(count, arch.pooled_dim)}
        uncond = {"encoder_hidden_states": null_text, "pooled_projections": randn(1, arch.pooled_dim)}
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
