"""The published network configs of the models the pack distills, and tiny twins of the same structure.

Memory and speed of a training step do not depend on the weights, so the planner (trainers/planner.py) and
the benchmarks (benchmarks/archs.py) build these networks from their configs alone: no hub access, no
checkpoints. The configs are the released models' diffusers unet/config.json and transformer/config.json:

=========  =====================================  ===============  ===================================
name       network                                 parameters       conditioning per sample
=========  =====================================  ===============  ===================================
sd15       SD1.5 UNet2DConditionModel, 512 px      859,520,964      text [77, 768]
sdxl       SDXL UNet2DConditionModel, 1024 px      2,567,463,684    text [77, 2048], text_embeds [1280],
                                                                    time_ids [6]
sd3m       SD3-medium SD3Transformer2DModel,       2,028,328,000    encoder_hidden_states [333, 4096],
           1024 px (16 latent channels, patch 2)                    pooled_projections [2048]
flux       FLUX.1-dev FluxTransformer2DModel,      11,901,408,320   encoder_hidden_states [512, 4096],
           1024 px (128x128x16 latents packed                       pooled_projections [768],
           in 2x2 patches: 4096 tokens of 64)                       guidance (3.5)
flux-      FLUX.1-schnell: the same without the    11,891,178,560   encoder_hidden_states [256, 4096],
schnell    guidance embedding                                       pooled_projections [768]
=========  =====================================  ===============  ===================================

The ``tiny-*`` twins keep each architecture's structure (block types, SDXL's added conditioning, the
joint-attention transformer, Flux's double- and single-stream blocks and guidance embedding) at a size that
runs on a CPU in milliseconds. :func:`arch_from_config` reads a diffusers folder's config.json into the same
description; :func:`diffusion_model` puts a network behind the one model interface (core/models.py) with its
family's schedule and inputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .lora import UNET_TARGET_MODULES

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

# FLUX.1-dev's transformer/config.json: 19 double-stream (MMDiT) blocks, 38 single-stream blocks, a guidance
# embedding (guidance-distilled), RoPE over (index, row, column) with 16 + 56 + 56 = 128 = attention_head_dim.
# in_channels 64: the 16-channel latent in 2x2 patches (FluxPipeline._pack_latents), patch_size 1 after that.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)

FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}

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

TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)

# LoRA targets for the joint-attention transformer: both streams' attention projections and feed-forwards
# (diffusers' SD3 LoRA script targets the attention projections; the feed-forwards are added to match the
# coverage UNET_TARGET_MODULES gives the UNets).
SD3_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
# Flux: the double-stream blocks have SD3's layers under the same names; a single-stream block has the q / k / v
# projections (to_q, to_k, to_v), its MLP's input (proj_mlp) and one output projection for attention and MLP
# together (proj_out). peft matches the last name parts, so the network's final proj_out (3072 -> 64) gets an
# adapter too (0.2 M values at rank 64).
FLUX_TARGET_MODULES = SD3_TARGET_MODULES + ["proj_mlp", "proj_out"]
# FLUX.1-dev's scheduler shifts sigma by exp(mu), mu growing with the image's tokens up to max_shift 1.15 at
# 4096 tokens (1024 px); ComfyUI's ModelSamplingFlux uses the same
FLUX_SHIFT_1024 = math.exp(1.15)


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
    class_name: str = ""  # the diffusers class (empty: UNet2DConditionModel / SD3Transformer2DModel by kind)
    packed_patch: int = 1  # Flux: the latent enters as 2x2 patches packed into tokens (in_channels = 4 x latent's)
    timestep_scale: float = 1.0  # times the schedule's timestep (sigma * 1000); Flux takes sigma: 1e-3
    guidance_input: str | None = None  # guidance-distilled (Flux-dev): the cond key of the guidance scale

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"]) // self.packed_patch ** 2

    @property
    def pixel_multiple(self) -> int:
        """What a training resolution must be a multiple of: the VAE's 8 times the network's downsampling
        (a UNet's levels, a DiT's patch) and any packing."""
        if self.kind == "unet":
            return 8 * 2 ** (len(self.config["block_out_channels"]) - 1)
        return 8 * int(self.config.get("patch_size", 1)) * self.packed_patch

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
    "flux": Arch("flux", "FLUX.1-dev-class flow DiT @1024", "dit", FLUX_DEV_TRANSFORMER, 1024, 512, 4096,
                 pooled_dim=768, guidance=3.5, expected_params=11_901_408_320, lora_targets=list(FLUX_TARGET_MODULES),
                 flow_shift=FLUX_SHIFT_1024, class_name="FluxTransformer2DModel", packed_patch=2,
                 timestep_scale=1e-3, guidance_input="guidance"),
    # FLUX.1-schnell: the same blocks without the guidance embedding (sampled at CFG 1, 256 T5 tokens; ComfyUI's
    # FluxSchnell samples with mu = 1.0)
    "flux-schnell": Arch("flux-schnell", "FLUX.1-schnell-class flow DiT @1024", "dit", FLUX_SCHNELL_TRANSFORMER, 1024,
                         256, 4096, pooled_dim=768, guidance=1.0, expected_params=11_891_178_560,
                         lora_targets=list(FLUX_TARGET_MODULES), flow_shift=math.exp(1.0),
                         class_name="FluxTransformer2DModel", packed_patch=2, timestep_scale=1e-3),
}
TINY_ARCHS = {
    "sd15": Arch("tiny-sd15", "tiny SD1.5-shaped UNet", "unet", TINY_SD15_UNET, 64, 8, 16, guidance=1.75),
    "sdxl": Arch("tiny-sdxl", "tiny SDXL-shaped UNet", "unet", TINY_SDXL_UNET, 64, 8, 24, pooled_dim=16,
                 guidance=8.0),
    "sd3m": Arch("tiny-sd3m", "tiny SD3-shaped flow DiT", "dit", TINY_SD3_TRANSFORMER, 64, 12, 24, pooled_dim=12,
                 guidance=4.5, lora_targets=list(SD3_TARGET_MODULES)),
    "flux": Arch("tiny-flux", "tiny Flux-shaped flow DiT", "dit", TINY_FLUX_TRANSFORMER, 64, 12, 24, pooled_dim=12,
                 guidance=3.5, lora_targets=list(FLUX_TARGET_MODULES), flow_shift=FLUX_SHIFT_1024,
                 class_name="FluxTransformer2DModel", packed_patch=2, timestep_scale=1e-3, guidance_input="guidance"),
}


def get_arch(name: str, tiny: bool = False) -> Arch:
    """A built-in architecture by name (sd15, sdxl, sd3m, flux, flux-schnell; the tiny twins of the first four
    with tiny=True or a "tiny-" prefix)."""
    key = str(name).strip().lower()
    if key.startswith("tiny-"):
        key, tiny = key[5:], True
    table = TINY_ARCHS if tiny else ARCHS
    if key not in table:
        raise ValueError(f"model={name!r}: choose one of {', '.join(ARCHS)} (or tiny-<name>), or give a diffusers "
                         f"folder / its unet or transformer config.json")
    return table[key]


# ComfyUI's model families (supported_models class names) whose layout is one of ours
COMFY_FAMILIES = {"SD15": "sd15", "SDXL": "sdxl", "SD3": "sd3m", "Flux": "flux", "FluxSchnell": "flux-schnell"}


def arch_for_family(family: str | None) -> Arch:
    """The reference architecture of a ComfyUI model family (a fine-tune has its base's layout)."""
    if family not in COMFY_FAMILIES:
        raise ValueError(f"teacher: the planner knows the layouts of {', '.join(COMFY_FAMILIES)} checkpoints, not "
                         f"{family or 'this model'}; plan a diffusers folder with `distillery plan --model DIR`")
    return ARCHS[COMFY_FAMILIES[family]]


def header_params(header: dict, prefix: str) -> int:
    """Parameters of the tensors under `prefix` in a safetensors header (no weights read)."""
    total = 0
    for name, entry in header.items():
        if name != "__metadata__" and name.startswith(prefix):
            count = 1
            for size in entry.get("shape", []):
                count *= int(size)
            total += count
    return total


def network_class(arch: Arch):
    """The diffusers class that builds `arch.config`."""
    import diffusers

    name = arch.class_name or ("UNet2DConditionModel" if arch.kind == "unet" else "SD3Transformer2DModel")
    return getattr(diffusers, name)


def diffusion_model(arch: Arch, network):
    """`network` behind the one model interface: an SD UNet with the SD schedule (epsilon), a flow transformer
    with the rectified-flow schedule at the arch's shift, its timestep scale, patch packing and guidance input."""
    from ..core.models import DiffusersTransformerModel, DiffusersUNetModel
    from ..core.schedules import DiscreteVPSchedule, RectifiedFlowSchedule

    if arch.kind == "unet":
        return DiffusersUNetModel(network, DiscreteVPSchedule.sd15("epsilon"))
    return DiffusersTransformerModel(network, RectifiedFlowSchedule(shift=arch.flow_shift),
                                     timestep_scale=arch.timestep_scale, packed_patch=arch.packed_patch,
                                     guidance_input=arch.guidance_input)


def arch_from_config(path, resolution: int | None = None) -> Arch:
    """An architecture from a diffusers folder (its unet/ or transformer/ config.json) or that config file.

    UNet2DConditionModel (SD1.x / SD2.x / SDXL layouts), SD3Transformer2DModel and FluxTransformer2DModel are
    understood; text conditioning takes the shapes of the released pipelines (77 CLIP tokens; SD3: 77 + 256 T5
    tokens; Flux: 512 T5 tokens, as FLUX.1-dev's pipeline pads them).
    """
    path = Path(path)
    if path.is_dir():
        for sub in ("unet/config.json", "transformer/config.json", "config.json"):
            if (path / sub).is_file():
                path = path / sub
                break
        else:
            raise ValueError(f"model={str(path)!r}: no unet/config.json or transformer/config.json in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"model={str(path)!r}: no such architecture, folder or config.json; choose one "
                                f"of {', '.join(ARCHS)}")
    config = json.loads(path.read_text())
    cls = config.get("_class_name", "")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if not k.startswith("_")}
    kind = "unet" if cls == "UNet2DConditionModel" or "down_block_types" in config else "dit"
    flux = cls == "FluxTransformer2DModel" or "num_single_layers" in config
    # released configs carry keys the constructor does not take (diffusers' from_config drops them too)
    import inspect

    probe = Arch("", "", kind, {}, 0, 0, 0, class_name="FluxTransformer2DModel" if flux else "")
    accepted = inspect.signature(network_class(probe).__init__).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    name = path.parent.parent.name if path.parent.name in ("unet", "transformer") else path.parent.name
    if cls == "UNet2DConditionModel" or "down_block_types" in config:
        sdxl = config.get("addition_embed_type") == "text_time"
        pooled = 0
        if sdxl:
            pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        default_res = 8 * int(config.get("sample_size", 64))
        arch = Arch(name or "unet", f"{cls or 'UNet'} from {path}", "unet", kwargs, default_res, 77,
                    int(config.get("cross_attention_dim", 768)), pooled_dim=pooled, guidance=8.0 if sdxl else 4.5)
    elif flux:
        guided = bool(config.get("guidance_embeds", False))
        patch = 2  # FluxPipeline packs the latent in 2x2 patches: in_channels = 4 x the latent's
        # FLUX.1-schnell-class (no guidance embedding) pipelines encode 256 T5 tokens, dev-class 512
        arch = Arch(name or "transformer", f"{cls or 'FluxTransformer2DModel'} from {path}", "dit", kwargs, 1024,
                    512 if guided else 256, int(config.get("joint_attention_dim", 4096)),
                    pooled_dim=int(config.get("pooled_projection_dim", 768)), guidance=3.5 if guided else 1.0,
                    lora_targets=list(FLUX_TARGET_MODULES), flow_shift=FLUX_SHIFT_1024,
                    class_name="FluxTransformer2DModel", packed_patch=patch, timestep_scale=1e-3,
                    guidance_input="guidance" if guided else None)
    elif cls == "SD3Transformer2DModel" or "joint_attention_dim" in config:
        default_res = 8 * int(config.get("sample_size", 128))
        arch = Arch(name or "transformer", f"{cls or 'SD3Transformer2DModel'} from {path}", "dit", kwargs,
                    default_res, 333, int(config["joint_attention_dim"]), pooled_dim=int(config["pooled_projection_dim"]),
                    lora_targets=list(SD3_TARGET_MODULES))
    else:
        raise ValueError(f"model={str(path)!r}: {cls or 'this network'} is not a UNet2DConditionModel, "
                         f"SD3Transformer2DModel or FluxTransformer2DModel config; the planner knows only those")
    return replace(arch, resolution=resolution) if resolution else arch


__all__ = ["Arch", "ARCHS", "TINY_ARCHS", "SD15_UNET", "SDXL_UNET", "SD3_MEDIUM_TRANSFORMER", "FLUX_DEV_TRANSFORMER",
           "FLUX_SCHNELL_TRANSFORMER",
           "TINY_SD15_UNET", "TINY_SDXL_UNET", "TINY_SD3_TRANSFORMER", "TINY_FLUX_TRANSFORMER", "SD3_TARGET_MODULES",
           "FLUX_TARGET_MODULES", "COMFY_FAMILIES", "get_arch", "network_class", "diffusion_model", "arch_from_config"]
