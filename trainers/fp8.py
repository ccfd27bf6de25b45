"""The frozen base stored in fp8, computed in the training precision (the `fp8_base` low-VRAM choice).

Each frozen nn.Linear / nn.Conv2d keeps its weight as float8_e4m3fn codes with one fp32 scale per tensor,

    W8 = round_e4m3(W / s),   s = max|W| / 448   (448: e4m3's largest finite value)

and computes with W8.to(dtype) * s, as ComfyUI's scaled-fp8 weights do; 1 byte per weight instead of 2.
The layer runs through its own autograd function that saves W8 (which is stored anyway), not the
upcast copy: the weight is frozen, so the backward pass needs it only to pass the gradient to the input,
and recasts it there. Saving the copy would keep a 16-bit version of every layer alive until backward,
more than the unquantized base.

Layers with trainable weights (LoRA matrices, full fine-tuning) are left alone; a LoRA-wrapped layer's
frozen `base_layer` is converted like any other.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 codes, fp32 scale) of a weight: per-tensor absmax scaling into e4m3's range."""
    w = weight.detach().float()
    scale = (w.abs().amax() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * scale.to(dtype)


def _compute_dtype(x: torch.Tensor, stored: torch.dtype) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return stored if x.dtype == stored else x.dtype


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scale, bias, dtype):
        ctx.save_for_backward(codes, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        with torch.autocast(x.device.type, enabled=False):
            w = dequantize(codes, scale, dtype)
            return F.linear(x.to(dtype), w, bias.to(dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale = ctx.saved_tensors
        w = dequantize(codes, scale, ctx.dtype)
        return (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype), None, None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(codes, scale)
        ctx.x_shape, ctx.x_dtype, ctx.dtype = x.shape, x.dtype, dtype
        ctx.conv = (stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            w = dequantize(codes, scale, dtype)
            return F.conv2d(x.to(dtype), w, bias.to(dtype) if bias is not None else None,
                            stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale = ctx.saved_tensors
        w = dequantize(codes, scale, ctx.dtype)
        stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad_out.to(ctx.dtype), stride, padding, dilation, groups)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None, None


def _linear_forward(self, x, *args, **kwargs):
    return _Fp8Linear.apply(x, self.weight, self.weight_scale, self.bias, _compute_dtype(x, self.compute_dtype))


def _conv_forward(self, x, *args, **kwargs):
    return _Fp8Conv2d.apply(x, self.weight, self.weight_scale, self.bias, _compute_dtype(x, self.compute_dtype),
                            self.stride, self.padding, self.dilation, self.groups)


def storable(module: nn.Module) -> bool:
    """A layer kind this module can store in fp8 (Linear; Conv2d with zero padding given as numbers)."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dtype == FP8:
        return False
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _convertible(module: nn.Module) -> bool:
    return storable(module) and not module.weight.requires_grad


def _keep_reported_dtype(model: nn.Module) -> None:
    """diffusers' and transformers' models report the dtype of their first floating parameter (`.dtype`) and
    cast inputs to it (e.g. the time embedding); after the conversion that would be fp8. Each such module
    keeps reporting the dtype it computes in."""
    for module in model.modules():
        cls = type(module)
        if isinstance(getattr(cls, "dtype", None), property) and not getattr(cls, "_fp8_reported_dtype", False):
            dtype = module.dtype
            module.__class__ = type(cls.__name__, (cls,), {"dtype": property(lambda self, _d=dtype: _d),
                                                           "_fp8_reported_dtype": True})


def store_frozen_in_fp8(model: nn.Module) -> int:
    """Convert every frozen Linear / Conv2d of `model` in place; returns how many layers were converted."""
    _keep_reported_dtype(model)
    converted = 0
    for module in model.modules():
        if not _convertible(module):
            continue
        codes, scale = quantize(module.weight)
        module.compute_dtype = module.weight.dtype
        module.weight = nn.Parameter(codes, requires_grad=False)
        module.register_buffer("weight_scale", scale, persistent=False)
        if module.bias is not None:
            module.bias.requires_grad_(False)
        forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        converted += 1
    return converted
