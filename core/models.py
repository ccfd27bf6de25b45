"""The one model interface every sampler and trainer sees.

    model(x, sigma, cond, uncond=None, cfg_scale=1.0, output="x0") -> prediction

`x` is the state at noise level `sigma` in the schedule's coordinates (see schedules.py), `cond` /
`uncond` are whatever conditioning the backend takes (class labels, text embeddings, a dict of them),
and the output is converted to x0, epsilon, v or flow velocity on demand. Classifier-free guidance is
part of the interface, in the form uncond + cfg_scale * (cond - uncond). CFG is linear in the network
output and the conversions to x0 are affine with the same coefficients for both branches, so guiding x0
is the same as guiding epsilon or v. A guidance-distilled network (Flux-dev-class: distilled from its CFG
teacher, sampled at cfg 1) takes the scale as a conditioning input instead: `guidance_input` names that
cond key, and every guided call of such a model is one pass with the scale there, never a CFG pair.

Backends implement one method, :meth:`DiffusionModel.native`: (network input, timestep, cond) -> the
network's native output. The analytic Gaussian-mixture teacher overrides :meth:`predict_x0` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .schedules import NoiseSchedule

OUTPUTS = ("x0", "sample", "epsilon", "v_prediction", "flow")


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch axis (tensors, dicts / lists of tensors)."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    if a == b:  # non-batched settings (e.g. a guidance scalar) shared by both halves
        return a
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__} with {type(b).__name__}")


def map_cond(fn, *conds: Any) -> Any:
    """Apply fn to the tensors of one or more conditionings of the same structure (dicts, lists, tensors)."""
    first = conds[0]
    if isinstance(first, dict):
        return {k: map_cond(fn, *(c[k] for c in conds)) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(map_cond(fn, *items) for items in zip(*conds))
    if isinstance(first, torch.Tensor):
        return fn(*conds)
    return first


def as_batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Noise level as a [B] tensor (a scalar is shared by the whole batch)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


class DiffusionModel(nn.Module):
    """A denoiser with a noise schedule. Subclasses implement :meth:`native` (or :meth:`predict_x0`)."""

    # the cond key a guidance-distilled network reads its guidance scale from; None: classifier-free guidance
    guidance_input: str | None = None

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.schedule = schedule

    def with_guidance(self, cond: Any, scale: float) -> Any:
        """`cond` with its guidance input set to `scale` on every row (a new dict; the caller's is kept)."""
        key = self.guidance_input
        return {**cond, key: torch.full_like(cond[key], float(scale))}

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def native(self, x_in: torch.Tensor, timestep: torch.Tensor, cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """One unguided evaluation, returned as x0."""
        x_in = self.schedule.scale_model_input(x, sigma)
        out = self.native(x_in, self.schedule.timestep(sigma), cond)
        return self.schedule.to_x0(out.to(x.dtype), x, sigma)

    def features(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network's bottleneck activations at (x, sigma): what a GAN discriminator head reads."""
        raise NotImplementedError(f"{type(self).__name__} exposes no features for a discriminator head")

    def forward(self, x: torch.Tensor, sigma, cond: Any = None, uncond: Any = None,
                cfg_scale: float = 1.0, output: str = "x0") -> torch.Tensor:
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: expected one of {OUTPUTS}")
        sigma = as_batch_sigma(sigma, x)
        if uncond is not None and cfg_scale != 1.0 and self.guidance_input is None:
            both = self.predict_x0(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond, uncond))
            x0_cond, x0_uncond = both.chunk(2)
            x0 = x0_uncond + cfg_scale * (x0_cond - x0_uncond)
        elif uncond is not None and cfg_scale != 1.0:  # guidance-distilled: the scale is an input
            x0 = self.predict_x0(x, sigma, self.with_guidance(cond, cfg_scale))
        else:
            x0 = self.predict_x0(x, sigma, cond)
        if output in ("x0", "sample"):
            return x0
        return self.schedule.from_x0(x0, x, sigma, output)

    def cond_and_guided(self, x: torch.Tensor, sigma, cond: Any, uncond: Any, cfg_scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 conditional, x0 guided at `cfg_scale`) from one batched pass.

        guided - conditional is the guidance term (cfg_scale - 1) (x0_cond - x0_uncond) of a CFG model; for a
        guidance-distilled one it is the prediction at the scale minus the one at the cond's own guidance.
        """
        sigma = as_batch_sigma(sigma, x)
        other = uncond if self.guidance_input is None else self.with_guidance(cond, cfg_scale)
        first, second = self.predict_x0(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                        cat_cond(cond, other)).chunk(2)
        if self.guidance_input is not None:
            return first, second
        return first, second + cfg_scale * (first - second)


class Guided:
    """A model with its conditioning bound: callable as k-diffusion's model(x, sigma) -> x0.

    This is what the samplers in `sampling/` call, so the same sampler code serves a diffusers model,
    the analytic teacher and ComfyUI's model wrapper (which has the same (x, sigma) -> x0 signature).
    """

    def __init__(self, model: DiffusionModel, cond: Any = None, uncond: Any = None, cfg_scale: float = 1.0):
        self.model, self.cond, self.uncond, self.cfg_scale = model, cond, uncond, cfg_scale
        self.schedule = model.schedule
        self.calls = 0  # network evaluations, counting a CFG pair as 2

    def __call__(self, x: torch.Tensor, sigma, **_extra) -> torch.Tensor:
        guided = self.uncond is not None and self.cfg_scale != 1.0
        self.calls += 2 if guided else 1
        return self.model(x, sigma, self.cond, self.uncond, self.cfg_scale)


class DiffusersUNetModel(DiffusionModel):
    """diffusers `UNet2DConditionModel` (SD1.5, SDXL, the tiny image world).

    cond: encoder_hidden_states [B, L, D], or a dict with `encoder_hidden_states` and optionally
    `added_cond_kwargs` (SDXL's text_embeds / time_ids) and `class_labels`.
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.unet = unet

    def native(self, x_in, timestep, cond):
        if not isinstance(cond, dict):
            cond = {"encoder_hidden_states": cond}
        dtype = self.unet.dtype  # diffusers: the compute dtype (also with an fp8 base, trainers/fp8.py)
        cond = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in cond.items()}
        if isinstance(cond.get("added_cond_kwargs"), dict):
            cond["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cond["added_cond_kwargs"].items()}
        return self.unet(x_in.to(dtype), timestep, **cond).sample

    def features(self, x, sigma, cond):
        """The mid block's output [B, C, h, w] (C = block_out_channels[-1]), as DMD2's discriminator reads
        the fake score's encoder. The decoder half is skipped: a hook stops the forward pass there."""
        return run_until(self.unet.mid_block, lambda: self.native(
            self.schedule.scale_model_input(x, as_batch_sigma(sigma, x)),
            self.schedule.timestep(as_batch_sigma(sigma, x)), cond))


class _Reached(Exception):
    def __init__(self, output):
        super().__init__("module reached")
        self.output = output


def run_until(module: nn.Module | None, forward, pick: int = 0) -> torch.Tensor:
    """Call `forward()` and return `module`'s output (item `pick` of a tuple), abandoning the rest of the pass
    (the output keeps its graph, so gradients flow back through everything that ran)."""
    if module is None:
        raise ValueError("this network has no bottleneck block to read features from")

    def stop(_module, _args, output):
        raise _Reached(output[pick] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(stop)
    try:
        forward()
    except _Reached as reached:
        return reached.output
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} did not run during the forward pass")


def pack_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Latent [B, C, H, W] -> tokens [B, (H/p)(W/p), C p p], row-major over the patch grid, each token the
    patch's channels then its p x p pixels (diffusers' FluxPipeline._pack_latents, BFL's
    "b c (h ph) (w pw) -> b (h w) (c ph pw)")."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_patches(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_patches`: tokens [B, (H/p)(W/p), C p p] -> latent [B, C, H, W]."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def patch_position_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """Position ids [rows * cols, 3] of packed image tokens for Flux's 3-axis RoPE: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


class DiffusersTransformerModel(DiffusionModel):
    """diffusers flow transformers: SD3-class `SD3Transformer2DModel`, Flux-class `FluxTransformer2DModel`.

    x is the latent [B, C, H, W] for both. cond: a dict of keyword arguments for the transformer
    (encoder_hidden_states, pooled_projections; Flux-dev also guidance [B], the scale itself, e.g. 3.5).
    `timestep_scale` multiplies the schedule's timestep, sigma * 1000: SD3 takes that (1.0); Flux multiplies
    by 1000 itself and takes sigma (1e-3), as FluxPipeline passes t / 1000. `packed_patch` > 1: the network
    reads the latent as packed p x p patches (Flux: 2, in_channels = 4 x 16) with position ids (0, row,
    column) per image token and zeros per text token; its output is unpacked to the latent's layout.
    `guidance_input`: the cond key of a guidance-distilled network's scale (Flux-dev: "guidance").
    """

    def __init__(self, transformer: nn.Module, schedule: NoiseSchedule, timestep_scale: float = 1.0,
                 packed_patch: int = 1, guidance_input: str | None = None):
        super().__init__(schedule)
        self.transformer = transformer
        self.timestep_scale = timestep_scale
        self.packed_patch = int(packed_patch)
        if guidance_input is not None:
            self.guidance_input = guidance_input

    def native(self, x_in, timestep, cond):
        dtype = self.transformer.dtype
        kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in (cond or {}).items()}
        if self.guidance_input is not None and self.guidance_input not in kwargs:
            raise ValueError(f"cond has no {self.guidance_input!r}: this guidance-distilled network takes its "
                             f"guidance scale as that input (e.g. 3.5 for Flux-dev)")
        t = (timestep * self.timestep_scale).to(dtype)
        p = self.packed_patch
        if p == 1:
            return self.transformer(hidden_states=x_in.to(dtype), timestep=t, **kwargs).sample
        height, width = x_in.shape[-2:]
        img_ids = patch_position_ids(height // p, width // p, x_in.device)
        txt_ids = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=x_in.device)
        out = self.transformer(hidden_states=pack_patches(x_in.to(dtype), p), timestep=t, img_ids=img_ids,
                               txt_ids=txt_ids, **kwargs).sample
        return unpack_patches(out, p, height, width)


__all__ = ["DiffusionModel", "Guided", "DiffusersUNetModel", "DiffusersTransformerModel",
           "cat_cond", "map_cond", "as_batch_sigma", "run_until", "pack_patches", "unpack_patches",
           "patch_position_ids", "OUTPUTS"]
