"""The ComfyUI backend: everything that knows ComfyUI's objects, in one module that imports without it.

Nothing here imports ComfyUI (comfy, comfy_api, folder_paths, ...) at module level: ComfyUI modules are
imported inside the functions that need a running ComfyUI (or its checkout on sys.path). It may import
core, sampling and trainers; nodes/, jobs/ and the CLI import it, never the other way round.

Schedules. ComfyUI describes a model's noise schedule with a ``model_sampling`` module built from two
pieces (comfy/model_sampling.py): a sampling class that maps sigma <-> timestep and a mixin that gives the
prediction type. schedule_from_model_sampling reads both by duck typing and class names:

* ``ModelSamplingDiscrete`` and subclasses (SD1.5, SDXL; ``sigmas`` buffer, one per training timestep):
  ``DiscreteVPSchedule`` with alpha_bar = 1 / (1 + sigma^2). The LCM-patched variant
  (``ModelSamplingDiscreteDistilled``, only 50 sigmas kept) is rebuilt from its linear_start / linear_end.
* ``ModelSamplingDiscreteFlow`` (SD3, AuraFlow, Wan, ...; ``shift`` and ``multiplier``):
  ``RectifiedFlowSchedule(shift, 1000)``.
* ``ModelSamplingFlux`` (``shift`` is Flux's mu, timestep = sigma): ``RectifiedFlowSchedule(exp(mu), 1000)``,
  since exp(mu) / (exp(mu) + 1/t - 1) is the SD3 shift with shift = exp(mu).
  ComfyUI's multiplier (1000 for SD3 and Wan, 1 for Flux, AuraFlow, Lumina2, Qwen-Image, ...) only scales the
  timestep its own network is fed, which apply_model computes from sigma; the sigmas are the same. Our flow
  timesteps are on the 0..1000 grid that the methods' options (student_timesteps, min / max_timestep), the
  training levels and the students' cards use for every flow model: on a grid of multiplier 1 there is one
  timestep.
* prediction type from the mixin in the class's MRO: ``EPS`` -> epsilon, ``V_PREDICTION`` ->
  v_prediction, ``CONST`` -> flow, ``X0`` -> sample (``LCM``, an EPS whose model output already has LCM's
  boundary condition applied, counts as epsilon).

EDM / continuous-sigma samplings (SVD, Stable Cascade, Cosmos, ...) have no integer training timesteps
or no VP / flow parameterisation, and are refused with a clear error. Schedules are cached per
model_sampling object (weakly, keyed by a cheap signature so a patched shift is picked up).

Samplers. make_ksampler wraps our samplers as comfy.samplers.KSAMPLER; register_tcd_in_ksampler adds
"tcd" to the plain KSampler's dropdown.

The checkpoint task (worker process, or `distillery train --model file.safetensors`). Whatever ComfyUI can
load with `comfy.sd.load_checkpoint_guess_config` can be a teacher: the prompts are encoded with the
checkpoint's own CLIP (then freed), and ComfyUI's BaseModel is wrapped in our DiffusionModel interface:

    predict_x0(x, sigma, cond) = base_model.apply_model(x, sigma, **cond)

ComfyUI's apply_model already works in the k-diffusion state coordinates we use (x = x0 + sigma eps for
eps / v models, x = (1 - sigma) x0 + sigma eps for flow models) and returns the denoised x0; `cond` is the
dict of tensors its extra_conds produce (c_crossattn, and y for SDXL-class models), so SD1.5, SDXL and
DiTs go through the same path. LoRA adapters are injected by trainers/lora.py (peft) into the diffusion
model's Linear / Conv2d layers, chosen by name (lora_target_names); the student is exported with the key
ComfyUI maps for any architecture, `lora_unet_<diffusion_model key with . -> _>` (comfy/lora.py
model_lora_keys_unet).

Guidance-distilled models (Flux-dev-class: a guidance embedding that the `guidance` extra cond feeds) are
sampled with cfg 1 and their guidance as an input: the model's `guidance_input` is set, so every guided call
(the teacher's, the fake score's) puts the method's scale into that input in one pass where a CFG model runs
a cond / uncond pair.

Probing a file. safetensors_header reads a .safetensors header (no weights); probe_checkpoint tells which
model family a checkpoint is (ComfyUI's own detection on meta tensors when ComfyUI is importable, a
key-based guess otherwise) and refuses, with one line, files that are not a diffusion model.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

from .core.models import DiffusionModel, run_until
from .core.schedules import DiscreteVPSchedule, NoiseSchedule, RectifiedFlowSchedule
from .sampling import SAMPLERS
from .sampling.timesteps import TRAIN_SCALE
from .trainers.real_images import ImageBank, caption_rows, list_images, load_image, read_caption
from .trainers.tasks import DistillTask

log = logging.getLogger("distillery")
task_log = logging.getLogger("distillery.worker")  # the checkpoint task logs as the job worker did

# --- schedules from ComfyUI's model_sampling -----------------------------------------------------------

_MIXINS = {"V_PREDICTION": "v_prediction", "EPS": "epsilon", "CONST": "flow", "X0": "sample", "LCM": "epsilon"}
_UNSUPPORTED_MIXINS = {"EDM", "IMG_TO_IMG", "COSMOS_RFLOW"}
_UNSUPPORTED_SAMPLINGS = ("Continuous", "StableCascade", "Cosmos")

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _mro_names(obj) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def prediction_type_of(model_sampling) -> str:
    """epsilon / v_prediction / flow / sample, from the prediction mixin of a model_sampling object."""
    for name in _mro_names(model_sampling):
        if name in _UNSUPPORTED_MIXINS:
            raise ValueError(f"model: the {name} parameterisation ({type(model_sampling).__name__}) is not "
                             f"supported by Distillery samplers; they need an eps, v-prediction, x0 or "
                             f"rectified-flow (CONST) model")
        if name in _MIXINS:
            return _MIXINS[name]
    raise ValueError(f"model: cannot tell the prediction type of {type(model_sampling).__name__} "
                     f"(no EPS / V_PREDICTION / CONST / X0 mixin)")


def _signature(ms) -> tuple:
    sigmas = getattr(ms, "sigmas", None)
    ends = (float(sigmas[0]), float(sigmas[-1]), len(sigmas)) if isinstance(sigmas, torch.Tensor) else ()
    return (type(ms), getattr(ms, "shift", None), getattr(ms, "multiplier", None), ends)


def _build(ms) -> NoiseSchedule:
    names = _mro_names(ms)
    cls_name = type(ms).__name__
    bad = [n for n in names if any(key in n for key in _UNSUPPORTED_SAMPLINGS)]
    if bad:
        raise ValueError(f"model: {bad[0]} sampling is not supported by Distillery samplers; they need a "
                         f"discrete VP model (SD1.5 / SDXL) or a rectified-flow model (SD3 / Flux / Wan)")
    prediction = prediction_type_of(ms)
    if "ModelSamplingFlux" in names:  # the grid is ours, not ComfyUI's multiplier: see the module docstring
        return RectifiedFlowSchedule(shift=math.exp(float(ms.shift)), multiplier=TRAIN_SCALE,
                                     prediction_type=prediction)
    if hasattr(ms, "shift") and hasattr(ms, "multiplier"):
        return RectifiedFlowSchedule(shift=float(ms.shift), multiplier=TRAIN_SCALE, prediction_type=prediction)
    if prediction == "flow":
        raise ValueError(f"model: {cls_name} is a flow (CONST) model without shift / multiplier")
    sigmas = getattr(ms, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"model: {cls_name} has no `sigmas` table; Distillery samplers need a discrete "
                         f"VP or a rectified-flow model")
    num = int(getattr(ms, "num_timesteps", len(sigmas)))
    if len(sigmas) != num and hasattr(ms, "linear_start") and hasattr(ms, "linear_end"):
        # ModelSamplingDiscreteDistilled (ComfyUI's "lcm" sampling) keeps 50 of the 1000 sigmas: rebuild the
        # full table the way ComfyUI's make_beta_schedule("linear") does (sqrt-linspace, float64)
        if getattr(ms, "zsnr", False):
            raise ValueError("model: an LCM-patched zero-terminal-SNR model is not supported; remove the "
                             "ModelSamplingDiscrete (lcm) patch, Distillery samplers take the plain model")
        log.info("distillery: %s keeps %d of %d sigmas (LCM-patched); rebuilding the full schedule",
                 cls_name, len(sigmas), num)
        betas = torch.linspace(float(ms.linear_start) ** 0.5, float(ms.linear_end) ** 0.5, num,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
    else:
        s = sigmas.detach().to("cpu", torch.float64)
        alphas_cumprod = 1.0 / (1.0 + s * s)
    return DiscreteVPSchedule(alphas_cumprod, prediction)


def schedule_from_model_sampling(model_sampling) -> NoiseSchedule:
    """Our NoiseSchedule for a ComfyUI model_sampling object (cached per object)."""
    sig = _signature(model_sampling)
    try:
        cached = _CACHE.get(model_sampling)
    except TypeError:  # not weak-referenceable: no caching
        return _build(model_sampling)
    if cached is not None and cached[0] == sig:
        return cached[1]
    schedule = _build(model_sampling)
    _CACHE[model_sampling] = (sig, schedule)
    return schedule


def schedule_from_model(model) -> NoiseSchedule:
    """Our NoiseSchedule for a ComfyUI MODEL (ModelPatcher), through its own model_sampling."""
    return schedule_from_model_sampling(model.get_model_object("model_sampling"))


def comfy_sampler_function(name: str):
    """A k-diffusion-style sampler function for ComfyUI's KSAMPLER.

    It finds the schedule at call time from the wrapped model
    (``model.inner_model.inner_model.model_sampling``, as ComfyUI's own samplers do) and the seed in
    extra_args["seed"] (the seed-stable noise sampler reads it).
    """
    sampler = SAMPLERS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        schedule = schedule_from_model_sampling(model.inner_model.inner_model.model_sampling)
        return sampler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                       schedule=schedule, **options)

    sample.__name__ = f"sample_distillery_{name}"
    sample.__doc__ = sampler.__doc__
    return sample


def make_ksampler(name: str, **options):
    """comfy.samplers.KSAMPLER running our sampler `name` with `options` (gamma, lcm_boundary, ...)."""
    import comfy.samplers  # only inside a running ComfyUI

    return comfy.samplers.KSAMPLER(comfy_sampler_function(name), extra_options=options)


KSAMPLER_TCD_NAME = "tcd"


def register_tcd_in_ksampler() -> bool:
    """Add "tcd" (gamma 0.3) to the plain KSampler's sampler dropdown. Returns whether it was added.

    ComfyUI 0.3.64: ``comfy.samplers.ksampler(name)`` looks up ``comfy.k_diffusion.sampling.sample_<name>``;
    the dropdown lists ``comfy.samplers.SAMPLER_NAMES`` (the very list ``KSampler.SAMPLERS`` points to,
    built as KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]), read each time /object_info is served.
    """
    import comfy.k_diffusion.sampling as kd_sampling
    import comfy.samplers

    attr = f"sample_{KSAMPLER_TCD_NAME}"
    existing = getattr(kd_sampling, attr, None)
    if existing is not None and getattr(existing, "__name__", "") != "sample_distillery_tcd":
        log.warning("distillery: a sampler named %r is already registered; not replacing it",
                    KSAMPLER_TCD_NAME)
        return False
    setattr(kd_sampling, attr, comfy_sampler_function("tcd"))
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if KSAMPLER_TCD_NAME not in names:
            names.append(KSAMPLER_TCD_NAME)
    if comfy.samplers.KSampler.SAMPLERS is not comfy.samplers.SAMPLER_NAMES and \
            KSAMPLER_TCD_NAME not in comfy.samplers.KSampler.SAMPLERS:
        comfy.samplers.KSampler.SAMPLERS.append(KSAMPLER_TCD_NAME)
    return True

# --- Phased DMD students: the expert LoRA of each call's noise level ----------------------------------

PHASED_ATTACHMENT = "distillery_phased"


class ExpertSwitch:
    """Which expert of a phased student answers the current model call.

    An APPLY_MODEL wrapper (ComfyUI's patcher_extension) reads the call's sigma and sets `expert` with the rule
    the student was trained and is sampled with (sampling.phased.expert_index: expert k owns (s_k, s_{k-1}],
    the boundaries s_k its card's switch timesteps through this model's own model_sampling); the weight
    functions of the LoRA-targeted layers (ExpertLoraWeight) read it when the layer casts its weight.
    `calls` records (sigma, 0-based expert) of every call; a switch is logged with its level."""

    def __init__(self, boundaries: list[float], model_sampling, experts: int):
        from .sampling.phased import check_boundaries

        self.boundaries = check_boundaries(boundaries, experts)
        self.model_sampling = model_sampling
        self.experts = experts
        self.expert: int | None = None
        self.calls: list[tuple[float, int]] = []

    def apply_model(self, executor, x, t, *args, **kwargs):
        from .sampling.phased import expert_indices

        index = expert_indices(t, self.boundaries)
        expert = int(index[0])
        if bool((index != expert).any()):
            raise ValueError("phased student: one model call mixed noise levels of different experts "
                             f"({sorted(set(index.tolist()))}); sample it with one noise level per step")
        sigma = float(t.reshape(-1)[0])
        if expert != self.expert or (self.calls and sigma > self.calls[-1][0]):  # a switch, or a new run
            timestep = float(self.model_sampling.timestep(t.reshape(-1)[:1].float()).reshape(-1)[0])
            log.info("distillery: phased student, expert %d of %d from sigma %.5g (timestep %.1f)",
                     expert + 1, self.experts, sigma, timestep)
        self.expert = expert
        self.calls.append((sigma, expert))
        return executor(x, t, *args, **kwargs)


class ExpertLoraWeight:
    """A ModelPatcher weight function (add_weight_wrapper): the layer's weight plus the current expert's LoRA,
    computed by ComfyUI's own LoRA math (comfy.lora.calculate_weight, as its low-VRAM LoRA patches are)."""

    def __init__(self, key: str, adapters: dict, switch: ExpertSwitch, strength: float):
        self.key, self.adapters, self.switch, self.strength = key, adapters, switch, float(strength)

    def __call__(self, weight):
        import comfy.lora

        adapter = self.adapters.get(self.switch.expert)
        if adapter is None:
            return weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        out = comfy.lora.calculate_weight([(self.strength, adapter, 1.0, None, None)], weight.to(dtype), self.key,
                                          intermediate_dtype=dtype)
        return out.to(weight.dtype)


def phased_student_model(patcher, lora: dict, experts: list[dict], strength: float = 1.0):
    """A clone of `patcher` that applies expert k's LoRA (its keys under the card's prefix) exactly on the noise
    levels it was trained for. Returns (the patched clone, its ExpertSwitch, also attached as
    PHASED_ATTACHMENT).

    Not ComfyUI's LoRA hooks: those belong to conditioning (not to the MODEL a loader outputs) and switch by
    sampling percent through keyframes; here the switch reads the sigma of each call, so it is exact at the
    trained timesteps whatever the sampler or SIGMAS, and it costs no copy of the weights per expert.
    """
    import comfy.lora
    from comfy.patcher_extension import WrappersMP

    from .sampling.phased import boundary_sigmas
    from .trainers.lora import split_prefixed_state

    model = patcher.clone()
    model_sampling = model.get_model_object("model_sampling")
    schedule = schedule_from_model_sampling(model_sampling)
    boundaries = boundary_sigmas(schedule, [e["start_timestep"] for e in experts[1:]])
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    try:
        parts = split_prefixed_state(lora, [e["prefix"] for e in experts])
    except ValueError as err:
        raise ValueError(f"lora_name: {err}") from None
    per_key: dict[str, dict[int, object]] = {}
    for k, part in enumerate(parts):
        for key, adapter in comfy.lora.load_lora(part, key_map).items():
            per_key.setdefault(key, {})[k] = adapter
    switch = ExpertSwitch(boundaries, model_sampling, len(experts))
    for key, adapters in per_key.items():
        model.add_weight_wrapper(key, ExpertLoraWeight(key, adapters, switch, strength))
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, PHASED_ATTACHMENT, switch.apply_model)
    model.set_attachments(PHASED_ATTACHMENT, switch)
    return model, switch


# --- the checkpoint task: ComfyUI's loader, our DiffusionModel interface ------------------------------

# LDM UNets (SD1.x, SD2.x, SDXL): attention, projections, feed-forward, resnet convs / time embedding,
# skip convs; plus the down / up sampler convs (found by their parent's class)
LDM_TARGET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")
LDM_RESAMPLERS = {"Downsample": "op", "Upsample": "conv"}
DIFFUSION_MODEL = "model.diffusion_model"  # where the network sits inside the wrapper below
# A DiT block's adaptive-norm projection (Flux / HunyuanVideo img_mod.lin, txt_mod.lin, modulation.lin; SD3,
# Lumina, HiDream adaLN_modulation.1; Qwen-Image img_mod.1) maps the timestep / guidance vector to the block's
# shifts and scales: the same for every token, and the block's widest layer (Flux's img_mod 3072 -> 18432).
# diffusers' LoRA targets (the planner's, trainers/architectures.py) and kohya's Flux LoRAs leave it out; so do we.
DIT_MODULATION_PARTS = frozenset(("img_mod", "txt_mod", "modulation", "adaLN_modulation"))


def is_dit_target(name: str) -> bool:
    """Whether a DiT's Linear `name` gets an adapter: inside the transformer blocks, not a modulation."""
    return "blocks" in name and not DIT_MODULATION_PARTS.intersection(name.split("."))


def dit_adapter_params(header: dict, prefix: str, rank: int) -> int:
    """Values of one rank-`rank` adapter on a DiT checkpoint, from its safetensors header (no weights read):
    lora_target_names' DiT rule on the 2-d weights (the Linear layers) under `prefix`."""
    total = 0
    for key, entry in header.items():
        shape = entry.get("shape", []) if isinstance(entry, dict) else []
        if key.startswith(prefix) and key.endswith(".weight") and len(shape) == 2 \
                and is_dit_target(key[len(prefix):-len(".weight")]):
            total += rank * (int(shape[0]) + int(shape[1]))
    return total


def adapter_layout_note(arch, header: dict, prefix: str, settings: dict) -> str | None:
    """ComfyUI's DiTs fuse projections diffusers keeps apart (Flux's q/k/v into one qkv, a single-stream block's
    q/k/v and MLP input into linear1), so a LoRA on ComfyUI's layers has fewer values than the reference layout
    the planner builds: said when they differ by more than 1%, with both counts."""
    from .trainers.lora import targets_for
    from .trainers.memory import lora_param_count
    from .trainers.planner import meta_network

    if arch.kind == "unet" or settings.get("full_finetune") or settings.get("lora_targets", "all") != "all":
        return None
    rank = int(settings.get("lora_rank") or 64)
    comfy = dit_adapter_params(header, prefix, rank)
    planned = lora_param_count(meta_network(arch), targets_for(arch.lora_targets), rank)
    if not comfy or abs(comfy - planned) <= 0.01 * planned:
        return None
    return (f"a rank-{rank} adapter on this checkpoint's layers in ComfyUI has {comfy / 1e6:.1f} M values, on the "
            f"reference {arch.name} layout {planned / 1e6:.1f} M (ComfyUI fuses its q/k/v projections): the "
            f"adapters, their gradients and optimizer state are planned for the reference layout")


def lora_target_names(diffusion_model: nn.Module, prefix: str = DIFFUSION_MODEL) -> list[str]:
    """Full module names (under `prefix`) that get LoRA adapters.

    LDM UNets: the DMD2 / LCM-LoRA set of layers under their ldm names. Anything else (a DiT: Flux, SD3,
    Wan, ...): every nn.Linear inside its transformer blocks but the adaptive-norm (modulation) projections.
    """
    modules = dict(diffusion_model.named_modules())
    names = []
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        leaf = name.rsplit(".", 1)[-1]
        if any(name == t or name.endswith("." + t) for t in LDM_TARGET_LEAVES):
            names.append(name)
        elif parent is not None and LDM_RESAMPLERS.get(type(parent).__name__) == leaf:
            names.append(name)
    if not names:
        names = [name for name, module in modules.items() if isinstance(module, nn.Linear) and is_dit_target(name)]
    if not names:
        raise ValueError(f"found no Linear / Conv2d layers to adapt in {type(diffusion_model).__name__}")
    return [f"{prefix}.{name}" for name in names]


# ComfyUI's Flux-family blocks (comfy/ldm/flux/layers.py; Chroma's and HunyuanVideo's alike) add to a residual
# stream in place (`x += ...`, `txt += ...`) after a LayerNorm saved that stream for its backward: autograd refuses
# the backward ("modified by an inplace operation"). While gradients are taken, those norms are given a copy of
# their input (one stream-sized tensor each); sampling and the frozen teacher's passes are untouched.
INPLACE_RESIDUAL_NORMS = {"SingleStreamBlock": ("pre_norm",), "DoubleStreamBlock": ("txt_norm1", "txt_norm2")}


def _copy_input_for_backward(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return (x.clone(), *args[1:])
    return None


def guard_inplace_residuals(diffusion_model: nn.Module) -> int:
    """Give the norms of INPLACE_RESIDUAL_NORMS a copy of their input while training; how many were guarded."""
    guarded = 0
    for module in diffusion_model.modules():
        for name in INPLACE_RESIDUAL_NORMS.get(type(module).__name__, ()):
            norm = getattr(module, name, None)
            if isinstance(norm, nn.Module) and not getattr(norm, "_distillery_input_copy", False):
                norm.register_forward_pre_hook(_copy_input_for_backward)
                norm._distillery_input_copy = True
                guarded += 1
    return guarded


# DiT block lists by their attribute names (SD3's MMDiT, Flux, most others), and, for blocks that return a tuple of
# token streams, the position of the image tokens (MMDiT's JointBlock returns (context, x), Flux's
# DoubleStreamBlock (img, txt))
DIT_BLOCK_LISTS = ("joint_blocks", "double_blocks", "transformer_blocks", "blocks")
IMAGE_TOKENS_AT = {"JointBlock": 1, "DoubleStreamBlock": 0}


class ComfyDiffusionModel(DiffusionModel):
    """ComfyUI's BaseModel (any architecture) behind our DiffusionModel interface."""

    def __init__(self, base_model: nn.Module, schedule):
        super().__init__(schedule)
        self.model = base_model

    def predict_x0(self, x, sigma, cond):
        kwargs = dict(cond) if isinstance(cond, dict) else {"c_crossattn": cond}
        out = self.model.apply_model(x, sigma.to(torch.float32), transformer_options={}, **kwargs)
        return out.to(x.dtype)

    def bottleneck(self) -> nn.Module | None:
        """Where the GAN head reads: the last layer of an LDM UNet's middle block (ComfyUI calls its layers one by
        one), or a DiT's middle transformer block; None when neither is found."""
        network = self.model.diffusion_model
        middle = getattr(network, "middle_block", None)
        if middle is not None and len(middle):
            return middle[-1]
        for name in DIT_BLOCK_LISTS:
            blocks = getattr(network, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return blocks[len(blocks) // 2]
        return None

    def feature_shape(self) -> tuple[int, bool]:
        """(channels, spatial) of `features`: a UNet's feature map, or a DiT's token width (0: none)."""
        block = self.bottleneck()
        if block is None:
            return 0, True
        if hasattr(block, "out_channels"):
            return int(block.out_channels), True
        # a DiT block's conditioning / token width: the input width of its first linear layer
        first = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
        return (int(first.in_features), False) if first is not None else (0, False)

    def features(self, x, sigma, cond):
        """The GAN head's input: a UNet's middle-block feature map (as DiffusersUNetModel.features), or a DiT's
        image tokens after its middle block, averaged over the tokens ([B, C])."""
        block = self.bottleneck()
        out = run_until(block, lambda: self.predict_x0(x, sigma, cond),
                        pick=IMAGE_TOKENS_AT.get(type(block).__name__, 0))
        return out if out.dim() == 4 else out.mean(dim=1)


GUIDANCE_INPUT = "guidance"  # the cond key of ComfyUI's guidance-distilled models (model_base.Flux.extra_conds)


def takes_guidance_input(base_model: nn.Module, conds: dict) -> bool:
    """Whether the model is guidance-distilled (Flux-dev-class): its guidance is an input to a guidance
    embedding, not classifier-free guidance. FluxSchnell has the same extra cond but an Identity embedding,
    which ignores it."""
    embedding = getattr(getattr(base_model, "diffusion_model", None), "guidance_in", None)
    return GUIDANCE_INPUT in conds and isinstance(embedding, nn.Module) and not isinstance(embedding, nn.Identity)


def _take(tree, index):
    if isinstance(tree, dict):
        return {k: _take(v, index) for k, v in tree.items()}
    return tree[index] if isinstance(tree, torch.Tensor) else tree


def _expand(tree, n):
    if isinstance(tree, dict):
        return {k: _expand(v, n) for k, v in tree.items()}
    return tree.expand(n, *tree.shape[1:]) if isinstance(tree, torch.Tensor) else tree


def _rows(bank: dict, uncond: dict, rows: slice) -> dict:
    """Rows of a prompt bank; constants (shared with uncond, see encode_prompt_bank) stay whole."""
    return {k: v if v is uncond[k] else v[rows] for k, v in bank.items()}


@torch.no_grad()
def encode_with_comfy_vae(vae, base_model, paths, resolution: int) -> torch.Tensor:
    """Latents in the model's space (process_latent_in: scale / shift), one image at a time; ComfyUI's VAE
    takes [B, H, W, 3] pixels in [0, 1]."""
    latents = []
    for path in paths:
        pixels = (load_image(path, resolution).movedim(0, -1).unsqueeze(0) + 1) / 2
        latents.append(base_model.process_latent_in(vae.encode(pixels).float().cpu()))
    return torch.cat(latents)


def _to(tree, device):
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def encode_prompt_bank(base_model, clip, prompts: list[str], negative: str, latent_shape, resolution: int):
    """(cond bank [P, ...] per key, uncond [1, ...] per key) through the model's own extra_conds.

    The same steps ComfyUI's sampler takes for a CONDITIONING (CLIP output -> model.extra_conds ->
    cond objects), concatenated with the cond objects' own concat (which pads cross-attention of
    different lengths by repetition), so every prompt and the negative batch together.
    """
    per_key: dict[str, list] = {}
    texts = list(prompts) + [negative]
    noise = torch.zeros((1, *latent_shape))
    for text in texts:
        tokens = clip.tokenize(text)
        (cond, extras), = clip.encode_from_tokens_scheduled(tokens, show_pbar=False)[:1]
        params = dict(extras)
        params.pop("model_conds", None)
        params.update(cross_attn=cond, device=torch.device("cpu"), noise=noise, latent_image=noise,
                      width=resolution, height=resolution)
        for key, value in base_model.extra_conds(**params).items():
            per_key.setdefault(key, []).append(value.process_cond(batch_size=1, device=torch.device("cpu"),
                                                                  area=None))
    bank, uncond = {}, {}
    for key, objs in per_key.items():
        if len(objs) != len(texts):
            raise ValueError(f"conditioning {key!r} exists for some prompts only")
        if not isinstance(objs[0].cond, torch.Tensor):
            raise ValueError(f"conditioning {key!r} of {type(base_model).__name__} is not a tensor "
                             f"({type(objs[0]).__name__}); this model type is not supported yet")
        both = objs[0].concat(objs[1:]) if len(objs) > 1 else objs[0].cond
        if not isinstance(both, torch.Tensor) or both.shape[0] != len(texts):  # a constant
            bank[key] = uncond[key] = objs[0].cond
            continue
        bank[key], uncond[key] = both[:-1].float(), both[-1:].float()
    return bank, uncond


class ComfyCheckpointTask(DistillTask):
    """A teacher loaded by ComfyUI: a single-file checkpoint, or (with `text_encoders` and `vae`) a diffusion-model
    file with its text encoders and VAE, loaded the way UNETLoader, the CLIP loaders and VAELoader load them."""

    name = "comfy"
    trained_guidance = None  # guidance-distilled models: the guidance input the student is trained at

    def __init__(self, checkpoint_path: str, prompts: list[str], resolution: int = 512, negative: str = "",
                 dtype: torch.dtype | None = None, phase=lambda p: None, real_images: str | None = None,
                 loras: list[dict] | tuple = (), text_encoders: list[str] | tuple = (), clip_type: str | None = None,
                 vae_file: str | None = None):
        import comfy.model_management as mm
        import comfy.sd

        if not prompts:
            raise ValueError("no prompts to distill on")
        path = Path(checkpoint_path)
        for file in (path, *map(Path, text_encoders), *([Path(vae_file)] if vae_file else [])):
            if not file.is_file():
                raise FileNotFoundError(f"teacher file {str(file)!r} does not exist (was it moved or renamed?)")
        image_paths = list_images(real_images, "real_images_folder") if real_images else None
        options = {"dtype": dtype} if dtype is not None else {}
        if text_encoders:
            phase("loading the diffusion model, text encoders and VAE")
            patcher, clip, vae = load_split_teacher(str(path), list(text_encoders), clip_type, vae_file, options)
        else:
            phase("loading the checkpoint")
            task_log.info("loading %s with ComfyUI's loader (dtype %s)", path, dtype or "ComfyUI's choice")
            patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=True, model_options=options)
        if clip is None:
            raise ValueError(f"{path.name} has no text encoder: give a full checkpoint, or the diffusion model "
                             f"with its text encoders and VAE")
        if loras:
            phase("applying the teacher's LoRAs")
            patcher, clip = apply_teacher_loras(patcher, clip, loras)
        base_model = patcher.model
        latent_format = base_model.latent_format
        if getattr(latent_format, "latent_dimensions", 2) != 2:
            raise ValueError(f"{type(base_model).__name__} makes {latent_format.latent_dimensions}-D latents; "
                             f"only image models are supported for now")
        scale = int(getattr(vae, "downscale_ratio", 8)) if vae is not None and \
            isinstance(getattr(vae, "downscale_ratio", 8), int) else 8
        if resolution % (scale * 8):
            raise ValueError(f"resolution={resolution}: use a multiple of {scale * 8}")
        self.sample_shape = (int(latent_format.latent_channels), resolution // scale, resolution // scale)
        self.resolution = resolution
        self.prompts = list(prompts)
        captions, cond_index = caption_rows([read_caption(p) for p in image_paths]) if image_paths else ([], None)
        phase("encoding prompts")
        task_log.info("encoding %d prompts (and %d captions) with the checkpoint's text encoder", len(prompts),
                 len(captions))
        with torch.no_grad():  # prompts and captions in one pass; captions split off below
            bank, self.uncond = encode_prompt_bank(base_model, clip, self.prompts + captions, negative,
                                                   self.sample_shape, resolution)
        n = len(self.prompts)
        self.cond_bank = _rows(bank, self.uncond, slice(0, n))
        if image_paths:
            phase("encoding real images")
            task_log.info("encoding %d real images with the checkpoint's VAE", len(image_paths))
            # rows: the captions, then the negative prompt for images without one
            rows = {k: v if v is self.uncond[k] else torch.cat([v[n:], self.uncond[k]]) for k, v in bank.items()}
            self.image_bank = ImageBank(encode_with_comfy_vae(vae, base_model, image_paths, resolution), rows,
                                        cond_index)
        del clip
        mm.unload_all_models()  # the text encoder is not needed any more
        gc.collect()
        mm.soft_empty_cache()
        self.vae = vae
        self.patcher = patcher  # keeps ComfyUI's bookkeeping objects alive; we drive the module directly
        schedule = schedule_from_model_sampling(base_model.model_sampling)
        self.base = ComfyDiffusionModel(base_model, schedule)
        self.teacher = None  # the base with adapters off
        if takes_guidance_input(base_model, self.uncond):
            self.base.guidance_input = GUIDANCE_INPUT
            # the student (and critic) see the prompts' own guidance input, ComfyUI's default for the model (3.5
            # for Flux-dev, as FluxGuidance's): it samples as trained at that value
            self.trained_guidance = float(self.uncond[GUIDANCE_INPUT].flatten()[0])
            task_log.info("%s is guidance-distilled: the teacher's guidance scale goes into its guidance input "
                          "(one pass instead of a CFG pair with the negative prompt); the student is trained at "
                          "guidance %g", type(base_model).__name__, self.trained_guidance)
        self.lora_targets = lora_target_names(base_model.diffusion_model)
        guard_inplace_residuals(base_model.diffusion_model)
        task_log.info("model %s, %s schedule (%s), latent %s, %d layers get LoRA adapters",
                 type(base_model).__name__, type(schedule).__name__, schedule.prediction_type,
                 self.sample_shape, len(self.lora_targets))
        self.feature_shape = self.base.feature_shape()  # the GAN head's input (0 channels: none)
        self.mixed_precision = "bf16" if dtype == torch.bfloat16 else ("fp16" if dtype == torch.float16 else "no")

    def to(self, device):
        self.device = torch.device(device)
        self.base.to(device)
        self.cond_bank = _to(self.cond_bank, device)
        self.uncond = _to(self.uncond, device)
        return self

    def conditioning(self, batch: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.prompts), (batch,), generator=generator)
        return _take(self.cond_bank, idx.to(self.device)), _expand(self.uncond, batch)

    def preview(self, student, sigmas, generator, path):
        from PIL import Image

        from .trainers.generator import student_sample

        n = min(4, len(self.prompts))
        cond = _take(self.cond_bank, torch.arange(n, device=self.device))
        noise = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        x0 = student_sample(student, cond, sigmas.to(self.device), noise, generator)
        with torch.no_grad():
            images = self.vae.decode(self.base.model.process_latent_out(x0.float()))
        if images.ndim == 5:  # video VAEs: first frame
            images = images[:, 0]
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        grid = torch.cat(list(images), dim=1)  # side by side: [H, n*W, 3]
        Image.fromarray(grid.numpy()).save(path)

    def export_lora(self, adapter: str = "student") -> dict:
        """Keys `lora_unet_<diffusion_model key, '.' -> '_'>.lora_down/.lora_up/.alpha`, which ComfyUI's
        model_lora_keys_unet maps for every architecture (and kohya / A1111 read for LDM UNets)."""
        from .trainers.lora import kohya_unet_state_dict

        return kohya_unet_state_dict(self.base.model.diffusion_model, adapter)

    def describe(self) -> dict:
        return {"task": self.name, "prompts": len(self.prompts), "resolution": self.resolution,
                "real_images": len(self.image_bank) if self.image_bank is not None else 0}


def setup_comfy(comfy_root: str | None, device: str) -> None:
    """Make ComfyUI importable in this process, with its device choice matching the server's."""
    if comfy_root:
        root = os.path.abspath(comfy_root)
        if not os.path.isfile(os.path.join(root, "comfy", "sd.py")):
            raise FileNotFoundError(f"{root} is not a ComfyUI checkout (no comfy/sd.py)")
        if root not in sys.path:
            sys.path.insert(0, root)
    import comfy.cli_args  # parses no command line unless ComfyUI's main enabled that

    if device == "cpu" or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported


def apply_teacher_loras(patcher, clip, loras):
    """The teacher the user samples: the checkpoint with their LoRA stack, through ComfyUI's own LoRA loading
    (comfy.sd.load_lora_for_models, as LoraLoader does), each with its model and CLIP strength.

    The diffusion model's patches are merged into its weights once, here: the student LoRA then trains on
    top of exactly the teacher's weights at no extra memory (kept as patches, every forward pass of the
    frozen base would recompute them). The worker never unpatches, so the originals ComfyUI backs up are
    dropped instead of doubling the patched layers' memory. The text encoder keeps its patches, applied when
    it encodes the prompts.
    """
    import comfy.sd
    import comfy.utils

    for lora in loras:
        state = comfy.utils.load_torch_file(lora["path"], safe_load=True)
        patcher, clip = comfy.sd.load_lora_for_models(patcher, clip, state, float(lora["strength_model"]),
                                                      float(lora["strength_clip"]))
        task_log.info("teacher LoRA %s: model %.2f, CLIP %.2f", lora.get("name") or lora["path"],
                      float(lora["strength_model"]), float(lora["strength_clip"]))
    patcher.patch_model(device_to=patcher.offload_device, force_patch_weights=True)
    patcher.backup.clear()
    return patcher, clip


def checkpoint_task(checkpoint_path: str, prompts: list[str], *, resolution: int = 512, negative: str = "",
                    real_images: str | None = None, comfy_root: str | None = None, device: str | None = None,
                    phase=lambda p: None, loras: list[dict] | tuple = (), text_encoders: list[str] | tuple = (),
                    clip_type: str | None = None, vae: str | None = None) -> ComfyCheckpointTask:
    """A single-file checkpoint (or a diffusion model with its `text_encoders` of `clip_type` and `vae`) as a task,
    loaded by ComfyUI's loaders (the job worker and `distillery train --model file.safetensors --comfyui DIR`
    both come here). bf16 (fp16 without bf16) weights on a GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    setup_comfy(comfy_root, device)
    dtype = None
    if device != "cpu" and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return ComfyCheckpointTask(checkpoint_path, prompts, resolution, negative, dtype=dtype, phase=phase,
                               real_images=real_images, loras=loras, text_encoders=text_encoders,
                               clip_type=clip_type, vae_file=vae)


# DualCLIPLoader's name for SDXL's pair, which ComfyUI loads as its default type (STABLE_DIFFUSION) with two files
CLIP_TYPE_ALIASES = {"sdxl": "stable_diffusion"}


def clip_type_names() -> list[str]:
    """The CLIP types ComfyUI's CLIP loaders offer (comfy.sd.CLIPType, lower case), and DualCLIPLoader's sdxl."""
    import comfy.sd

    return [t.name.lower() for t in comfy.sd.CLIPType] + list(CLIP_TYPE_ALIASES)


def comfy_clip_type(name: str | None):
    """comfy.sd.CLIPType for a type name, as ComfyUI's CLIP loaders map their `type` input."""
    import comfy.sd

    name = str(name or "stable_diffusion").strip().lower()
    member = getattr(comfy.sd.CLIPType, CLIP_TYPE_ALIASES.get(name, name).upper(), None)
    if member is None:
        raise ValueError(f"clip_type={name!r}: not one of ComfyUI's CLIP types ({', '.join(clip_type_names())})")
    return member


def load_split_teacher(diffusion_model: str, text_encoders: list[str], clip_type: str | None, vae: str,
                       model_options: dict):
    """(MODEL patcher, CLIP, VAE) from a diffusion-model file, its text encoders and its VAE, the way ComfyUI's
    UNETLoader (comfy.sd.load_diffusion_model), CLIPLoader / DualCLIPLoader / TripleCLIPLoader (comfy.sd.load_clip
    with the CLIP type) and VAELoader (comfy.sd.VAE on the file's weights) load them."""
    import comfy.sd
    import comfy.utils

    task_log.info("loading the diffusion model %s (dtype %s), text encoders %s (type %s) and VAE %s with "
                  "ComfyUI's loaders", diffusion_model, model_options.get("dtype") or "ComfyUI's choice",
                  ", ".join(text_encoders), clip_type, vae)
    patcher = comfy.sd.load_diffusion_model(diffusion_model, model_options=dict(model_options))
    clip = comfy.sd.load_clip(ckpt_paths=list(text_encoders), clip_type=comfy_clip_type(clip_type))
    autoencoder = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae))
    autoencoder.throw_exception_if_invalid()
    return patcher, clip, autoencoder


# --- probing a checkpoint file: its safetensors header, ComfyUI's detection on meta tensors --------------

SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header's size
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                       "U16": "uint16", "U32": "uint32", "U64": "uint64"}
# tensors up to this many elements are read for real when probing: ComfyUI's detection reads the values
# of a few small ones (SD2's v-prediction test takes the std of a 320-element norm bias; SDXL's edm_vpred
# sigmas are scalars), which meta tensors cannot give
PROBE_REAL_NUMEL = 1024
# ComfyUI's ModelType -> our prediction types (anything else, e.g. EDM, is reported by its own name)
_MODEL_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction", "FLOW": "flow", "FLUX": "flow"}
_CHECKPOINT_FIX = "pick a full model checkpoint (diffusion model, text encoder and VAE in one .safetensors)"


class _NotSafetensors(ValueError):
    """A file that is not safetensors; `what` says what it looks like instead, `fix` what to do."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}; {fix}")
        self.what, self.fix = what, fix


def _sniff(head: bytes, size: int) -> _NotSafetensors:
    """What a file that failed to parse as safetensors most likely is."""
    convert = "convert it to .safetensors (or download the .safetensors version)"
    if size == 0:
        return _NotSafetensors("an empty file (an interrupted download?)", "download it again")
    if head.startswith(b"PK\x03\x04"):
        return _NotSafetensors("a zip archive, not safetensors (a PyTorch .ckpt / .pt pickle?)", convert)
    if head[:1] == b"\x80":
        return _NotSafetensors("a Python pickle, not safetensors (an old-style .ckpt?)", convert)
    text = None
    for cut in range(4):  # the first bytes may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            pass
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        if first.startswith("version https://git-lfs"):
            return _NotSafetensors("a Git LFS pointer, not the weights",
                                   "run `git lfs pull` or download the file itself")
        if first.lower().startswith(("<!doctype html", "<html")):
            return _NotSafetensors("an HTML page, not weights (a failed download?)", "download the file again")
        return _NotSafetensors(f"a text file (starts with {first!r}), not safetensors", "pick the model file itself")
    return _NotSafetensors("not a safetensors file (no valid header)", convert)


def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _sniff(head, size)
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise _sniff(head + f.read(504), size)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _sniff((head + raw)[:512], size) from None
    if not isinstance(header, dict):
        raise _NotSafetensors("not a safetensors file (its header is not a JSON object)", "pick the model file")
    data_len, end = size - 8 - length, 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2)
        if not ok:
            raise _NotSafetensors(f"a damaged safetensors header (entry {key!r})", "download the file again")
        end = max(end, int(info["data_offsets"][1]))
    if end > data_len:
        raise _NotSafetensors(f"a truncated safetensors file ({data_len} of {end} data bytes; an interrupted "
                              f"download?)", "download the file again")
    return header


# where a single-file checkpoint keeps its text encoders (SD1.x / SD2.x; SDXL; SD3, Flux and later)
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.embedders.", "text_encoders.")


def _user_file_header(path: Path, name: str, field: str) -> dict:
    """The safetensors header of a file the user named on input `field`; one error naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{field}={name!r}: no such file ({path})")
    try:
        return _read_header(path)
    except _NotSafetensors as err:
        raise ValueError(f"{field}={name!r}: {err.what}; {err.fix}") from None


def has_text_encoder(header: dict) -> bool:
    """Whether a checkpoint's header holds text-encoder weights (the job encodes prompts with them)."""
    return any(key.startswith(TEXT_ENCODER_PREFIXES) for key in header)


def safetensors_header(path) -> dict:
    """The JSON header of a .safetensors file, without reading its weights.

    {tensor name: {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, and "__metadata__":
    {str: str} when the file has one}. The format: an 8-byte little-endian header length, then that many
    bytes of JSON, then the data. A file that is not safetensors (a pickle .ckpt, a Git LFS pointer, a text
    file renamed) or whose header is damaged or promises more data than the file holds raises ValueError
    saying what it looks like.
    """
    path = Path(path)
    try:
        return _read_header(path)
    except _NotSafetensors as err:
        raise ValueError(f"{path.name}: {err}") from None


def _meta_state_dict(path: Path, header: dict) -> dict:
    """Every tensor of the file as a meta tensor of its shape and dtype, except the small ones
    (<= PROBE_REAL_NUMEL elements), read for real (a few KB) because detection reads some values."""
    sd, small = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = getattr(torch, _SAFETENSORS_DTYPES.get(info["dtype"], "float32"), torch.float32)
        shape = [int(d) for d in info["shape"]]
        sd[key] = torch.empty(shape, dtype=dtype, device="meta")
        if math.prod(shape) <= PROBE_REAL_NUMEL:
            small.append(key)
    if small:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in small:
                    sd[key] = f.get_tensor(key)
        except Exception as err:  # a dtype this torch lacks, ...: keep them on meta
            log.debug("distillery: reading the small tensors of %s failed (%s); meta only", path.name, err)
    return sd


def _comfy_model_detection():
    """comfy.model_detection when ComfyUI is importable in this process, else None."""
    try:
        import comfy.model_detection as detection
    except ImportError as err:
        log.debug("distillery: ComfyUI is not importable (%s); probing checkpoints by their keys", err)
        return None
    return detection


def _model_type_name(model_config, sd: dict, prefix: str) -> str | None:
    """ComfyUI's ModelType name for a detected model, without building the model.

    Families whose get_model asks `model_type(state_dict)` (SD1.x, SD2.x, SDXL, ...) answer it; the others
    build a fixed model_base class, whose ModelType is either named in get_model or the class's default.
    None when it cannot be told that way.
    """
    import inspect

    import comfy.model_base as model_base

    get_model = type(model_config).get_model
    names = getattr(get_model, "__code__", None)
    names = names.co_names if names is not None else ()
    if "model_type" in names:
        return model_config.model_type(sd, prefix).name
    named = [n for n in names if n in model_base.ModelType.__members__]
    if len(named) == 1:
        return named[0]
    defaults = set()
    for n in names:
        cls = getattr(model_base, n, None)
        if isinstance(cls, type) and issubclass(cls, model_base.BaseModel):
            param = inspect.signature(cls.__init__).parameters.get("model_type")
            if param is not None and isinstance(param.default, model_base.ModelType):
                defaults.add(param.default.name)
    return defaults.pop() if len(defaults) == 1 else None


def _probe_with_comfy(detection, path: Path, header: dict) -> dict | None:
    """ComfyUI's own detection, as its checkpoint loader runs it; None when it finds no diffusion model."""
    sd = _meta_state_dict(path, header)
    metadata = header.get("__metadata__")
    prefix = detection.unet_prefix_from_state_dict(sd)
    config = detection.model_config_from_unet(sd, prefix, metadata=metadata)
    if config is None:  # a diffusion model alone (UNETLoader's files): no prefix
        bare = detection.model_config_from_unet(sd, "", metadata=metadata)
        if bare is None:
            return None
        config, prefix = bare, ""
    try:
        model_type = _model_type_name(config, sd, prefix)
    except Exception as err:  # a value meta tensors cannot give, or a ComfyUI without these names
        log.info("distillery: cannot tell the prediction type of %s on meta tensors (%s: %s)",
                 type(config).__name__, type(err).__name__, err)
        model_type = None
    prediction = _MODEL_TYPES.get(model_type, model_type.lower() if model_type else None)
    return {"family": type(config).__name__, "prediction": prediction, "unet_prefix": prefix,
            "detected_by": "comfyui"}


def _context_dim(header: dict, prefix: str) -> int | None:
    for key, info in header.items():
        if key.startswith(prefix + "input_blocks.") and key.endswith(".attn2.to_k.weight"):
            return int(info["shape"][1])
    return None


def _guess_from_keys(header: dict) -> dict | None:
    """The family from tell-tale keys (no ComfyUI): LDM UNets (SD1.x / SD2.x / SDXL), Flux-class
    (double_blocks) and SD3-class (joint_blocks) transformers. None when none of them is there."""
    keys = [k for k in header if k != "__metadata__"]

    def prefix_of(marker):  # the shortest prefix under which `marker` starts a key
        found = ["" if k.startswith(marker) else k[:k.index("." + marker) + 1]
                 for k in keys if k.startswith(marker) or "." + marker in k]
        return min(found, key=len) if found else None

    prefix = prefix_of("input_blocks.0.0.weight")
    if prefix is not None:
        ctx = _context_dim(header, prefix)
        if prefix + "label_emb.0.0.weight" in header:  # SDXL-class: a pooled-text (adm) input
            family = {2048: "SDXL", 1280: "SDXLRefiner"}.get(ctx, "LDM UNet (SDXL-like)")
            prediction = ("edm" if "edm_mean" in header or "edm_vpred.sigma_max" in header else
                          "v_prediction" if "v_pred" in header else "epsilon") if family == "SDXL" else None
        else:
            family = {768: "SD15", 1024: "SD20"}.get(ctx, "LDM UNet")
            prediction = "epsilon" if family == "SD15" else None  # SD2.x: eps or v, told by a weight's value
        return {"family": family, "prediction": prediction, "unet_prefix": prefix, "detected_by": "keys"}
    prefix = prefix_of("double_blocks.")
    if prefix is not None:
        family = "Flux" if prefix + "guidance_in.in_layer.weight" in header else "Flux-class"
        return {"family": family, "prediction": "flow", "unet_prefix": prefix, "detected_by": "keys"}
    prefix = prefix_of("joint_blocks.")
    if prefix is not None:
        return {"family": "SD3", "prediction": "flow", "unet_prefix": prefix, "detected_by": "keys"}
    return None


def _what_else(header: dict) -> tuple[str, str]:
    """(what a safetensors file without a diffusion model holds, the fix)."""
    keys = [k for k in header if k != "__metadata__"]
    n = len(keys)
    if not keys:
        return "a safetensors file with no tensors", _CHECKPOINT_FIX
    lora = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1", ".lora.up.", ".lora.down.")
    if any(k.startswith("lora_") or any(m in k for m in lora) for k in keys):
        return (f"a LoRA ({n} tensors), not a checkpoint",
                "load it with a LoRA loader on its base model, and pick the base checkpoint here")
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys) and n <= 4:
        return "a textual-inversion embedding, not a checkpoint", _CHECKPOINT_FIX
    vae = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "vae.")
    if all(k.startswith(vae) for k in keys):
        return f"a VAE ({n} tensors) without a diffusion model", _CHECKPOINT_FIX
    text = ("text_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "encoder.block.", "shared.",
            "transformer.", "logit_scale", "text_projection", "model.layers.", "model.embed_tokens", "lm_head.")
    if all(k.startswith(text) for k in keys):
        return f"a text encoder ({n} tensors) without a diffusion model", _CHECKPOINT_FIX
    return (f"{n} tensors, none of them a diffusion model ComfyUI recognises (first key {sorted(keys)[0]!r})",
            _CHECKPOINT_FIX)


def probe_checkpoint(path, name: str | None = None, field: str = "ckpt_name", fix: str | None = None) -> dict:
    """Which diffusion model a .safetensors checkpoint holds, from its header alone (no weights read).

    Returns {"family": ComfyUI's supported_models class name ("SD15", "SDXL", "Flux", "SD3", ...),
    "prediction": "epsilon" / "v_prediction" / "flow" (ComfyUI's other model types by their lower-case
    name, e.g. "edm"; None when it cannot be told), "unet_prefix": where the diffusion model's keys start
    ("model.diffusion_model." in a full checkpoint, "" for a diffusion model alone), "detected_by":
    "comfyui" or "keys"}.

    With ComfyUI importable, its checkpoint loader's own detection runs (unet_prefix_from_state_dict,
    model_config_from_unet) on meta tensors of the header's shapes (the few tensors of <= PROBE_REAL_NUMEL
    elements are read for real, for the detections that look at values). Without it, a key-based guess:
    model.diffusion_model.input_blocks -> an LDM UNet (SD15 / SD20 / SDXL by the cross-attention width),
    double_blocks -> Flux-class, joint_blocks -> SD3-class. A file that is not safetensors, or holds no
    diffusion model (a LoRA, a VAE, a text encoder, ...), raises ValueError("ckpt_name=...: what it is;
    the fix"). `name` is how the user named the file (the node's ckpt_name; default the file name), `field`
    the input it came from, `fix` what to pick instead of a file that holds no diffusion model (default: a full
    checkpoint).
    """
    path = Path(path)
    name = path.name if name is None else name
    header = _user_file_header(path, name, field)
    detection = _comfy_model_detection()
    if detection is not None:
        try:
            found = _probe_with_comfy(detection, path, header)
        except Exception as err:  # meta tensors where detection needs values, or a detection bug
            log.warning("distillery: ComfyUI's model detection failed on %s (%s: %s); guessing from its keys",
                        name, type(err).__name__, err)
            found = _guess_from_keys(header)
    else:
        found = _guess_from_keys(header)
    if found is None:
        what, default_fix = _what_else(header)
        raise ValueError(f"{field}={name!r}: {what}; {fix if fix and default_fix == _CHECKPOINT_FIX else default_fix}")
    return found


# --- probing a split teacher: a diffusion-model file, its text encoders and its VAE -------------------------------

_LORA_MARKERS = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1", ".lora.up.", ".lora.down.")
# a text encoder's keys as ComfyUI's CLIP loaders take them: CLIP (transformers' or open_clip's layout), T5, LLMs,
# and the text-encoder part of a full checkpoint
_TEXT_ENCODER_STARTS = ("text_model.", "encoder.block.", "model.layers.", "model.embed_tokens.",
                        "transformer.resblocks.", *TEXT_ENCODER_PREFIXES)
# a VAE's decoder (AutoencoderKL, Flux's ae, TAESD), bare or under a checkpoint's prefix
_VAE_DECODER_INPUTS = ("decoder.conv_in.weight", "taesd_decoder.1.weight")
_VAE_PREFIXES = ("", "first_stage_model.", "vae.")


def _what_file_holds(header: dict) -> str | None:
    """'a LoRA', 'a diffusion model', 'a full checkpoint', 'a text encoder' or 'a VAE' from a safetensors header's
    keys; None when it is none of those as far as the keys tell."""
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith("lora_") or any(m in k for m in _LORA_MARKERS) for k in keys):
        return "a LoRA"
    if _guess_from_keys(header) is not None:
        return "a full checkpoint" if has_text_encoder(header) else "a diffusion model"
    if any(k.startswith(_TEXT_ENCODER_STARTS) for k in keys):
        return "a text encoder"
    if _vae_latent_channels(header) is not None:
        return "a VAE"
    return None


def _vae_latent_channels(header: dict) -> int | None:
    """The latent channels a VAE file decodes (its decoder's input width); None when it has no known decoder."""
    for prefix in _VAE_PREFIXES:
        for key in _VAE_DECODER_INPUTS:
            info = header.get(prefix + key)
            if isinstance(info, dict) and len(info.get("shape", [])) == 4:
                return int(info["shape"][1])
    return None


def _family_latent_channels(family: str | None) -> int | None:
    """The latent channels of a ComfyUI model family (its supported_models config's latent format), when ComfyUI
    is importable."""
    try:
        import comfy.supported_models as supported
    except ImportError:
        return None
    config = getattr(supported, family or "", None)
    latent_format = getattr(config, "latent_format", None)
    try:
        return int(latent_format().latent_channels) if latent_format is not None else None
    except Exception:  # noqa: BLE001 - a latent format that needs more to build: unchecked
        return None


def _split_file_header(path, name: str, field: str, wanted: str, fix: str) -> dict:
    """The header of a split teacher's text encoder or VAE; ValueError when it is missing, not safetensors or
    holds something else than `wanted` ("a text encoder" / "a VAE")."""
    header = _user_file_header(Path(path), name, field)
    holds = _what_file_holds(header)
    if holds is not None and holds != wanted:
        raise ValueError(f"{field}={name!r}: {holds}, not {wanted}; {fix}")
    return header


def probe_split_teacher(diffusion_model: tuple, text_encoders: list[tuple], vae: tuple,
                        clip_type: str | None = None) -> dict:
    """A split teacher checked from its files' headers (no weights read): the diffusion model's family as
    probe_checkpoint tells it, each text encoder a text encoder and the VAE a VAE of the model's latent width,
    and the CLIP type the one the family takes (trainers.spec.split_clip_type; "auto": the family's own).

    Each file is (path, how the user named it, the input it came from). Returns probe_checkpoint's dict with
    "clip_type" (the resolved type). ValueError / FileNotFoundError name the input and the fix.
    """
    from .trainers.spec import split_clip_type

    path, name, field = diffusion_model
    found = probe_checkpoint(path, name=name, field=field,
                             fix="pick a diffusion model (ComfyUI's models/diffusion_models, as UNETLoader loads it)")
    for te_path, te_name, te_field in text_encoders:
        _split_file_header(te_path, te_name, te_field, "a text encoder", "pick a text encoder from "
                           "models/text_encoders (e.g. clip_l.safetensors, t5xxl_fp16.safetensors)")
    vae_path, vae_name, vae_field = vae
    header = _split_file_header(vae_path, vae_name, vae_field, "a VAE",
                                "pick a VAE from models/vae (e.g. ae.safetensors for Flux)")
    channels, wanted = _vae_latent_channels(header), _family_latent_channels(found["family"])
    if channels is not None and wanted is not None and channels != wanted:
        raise ValueError(f"{vae_field}={vae_name!r}: a VAE of {channels}-channel latents; the {found['family']} "
                         f"diffusion model {name} works in {wanted} channels: pick its own VAE")
    if clip_type is not None and str(clip_type).strip().lower() not in ("auto", ""):
        try:
            comfy_clip_type(clip_type)
        except ImportError:  # no ComfyUI here: its names are checked where it loads
            pass
    return {**found, "clip_type": split_clip_type(found["family"], clip_type, len(text_encoders))}


__all__ = ["schedule_from_model_sampling", "schedule_from_model", "prediction_type_of", "comfy_sampler_function",
           "make_ksampler", "register_tcd_in_ksampler", "KSAMPLER_TCD_NAME", "lora_target_names",
           "guard_inplace_residuals", "ComfyDiffusionModel", "takes_guidance_input",
           "encode_with_comfy_vae", "encode_prompt_bank", "ComfyCheckpointTask", "setup_comfy", "checkpoint_task",
           "has_text_encoder", "safetensors_header", "probe_checkpoint", "probe_split_teacher", "load_split_teacher",
           "clip_type_names", "comfy_clip_type"]
