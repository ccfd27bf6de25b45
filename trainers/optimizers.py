"""The optimizer of each role: torch's AdamW, or bitsandbytes' 8-bit AdamW (the low-VRAM choice).

AdamW keeps two fp32 moments per trained parameter (8 bytes). Block-wise 8-bit AdamW (Dettmers et al., 2022,
"8-bit Optimizers via Block-wise Quantization") keeps each moment as uint8 codes with one fp32 absmax per
block of 256 values: 2 + 8 / 256 bytes per parameter; tensors of fewer than 4096 values keep fp32 moments.
Its update is one fused kernel (no full-size temporaries). bitsandbytes runs it on CUDA GPUs only.
"""

from __future__ import annotations

import math

import torch

# bitsandbytes' AdamW8bit: block size of its quantization statistics, and the smallest tensor it quantizes
BLOCK = 256
MIN_8BIT_SIZE = 4096


def check_available(config, device) -> None:
    """Refuse, before any weights load, an optimizer that cannot run on `device` (names the field and the fix)."""
    if config.optimizer != "adamw8bit":
        return
    device_type = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if device_type != "cuda":
        raise ValueError(f"optimizer='adamw8bit': bitsandbytes' 8-bit AdamW runs on CUDA GPUs only, this run is on "
                         f"{device_type}; use optimizer=adamw")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("optimizer='adamw8bit': needs the bitsandbytes package (pip install bitsandbytes); "
                         "or use optimizer=adamw") from None


def make_optimizer(params, config, lr: float, simulate: bool = False) -> torch.optim.Optimizer:
    """The optimizer `config` asks for. simulate: a stand-in with 8-bit AdamW's exact state sizes, for the
    planner's dry run on fake tensors (where bitsandbytes' kernels cannot run)."""
    kwargs = dict(lr=lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        if simulate:
            return AdamW8bitState(params, **kwargs)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # foreach=None lets torch choose (multi-tensor on GPUs); False forces the per-tensor loop
    return torch.optim.AdamW(params, foreach=None if config.foreach else False, **kwargs)


class AdamW8bitState(torch.optim.Optimizer):
    """The memory of bitsandbytes' AdamW8bit without its kernels (the planner's stand-in; it does not train):
    per parameter two uint8 moment tensors and two fp32 absmax vectors of ceil(n / 256) blocks, or two fp32
    moments below 4096 values; the step updates in place, as the fused kernel does."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    n = p.numel()
                    if n < MIN_8BIT_SIZE:
                        state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    else:
                        blocks = math.ceil(n / BLOCK)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                p.add_(p.grad, alpha=0.0)  # in place, like the fused kernel: no temporaries
        return None


def state_bytes_per_param(optimizer: str, numel: int) -> float:
    """Bytes of optimizer state for a tensor of `numel` values (trainers/memory.py's arithmetic)."""
    if optimizer == "adamw8bit" and numel >= MIN_8BIT_SIZE:
        return 2 + 8 * math.ceil(numel / BLOCK) / numel
    return 8.0
