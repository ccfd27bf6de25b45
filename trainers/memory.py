"""Will the run fit? Memory arithmetic before any work, and advice when a step does not fit.

Static memory is exact arithmetic over the parameters the run will hold:

    frozen base (shared by teacher, student and critic)     numel x its element size (1 byte for the linear /
                                                              conv weights of an fp8 base, trainers/fp8.py)
    each trained parameter (LoRA or full fine-tune)          4 (fp32 master) + 8 (AdamW m, v) bytes, every role
                                                              (8-bit AdamW: 2 + 8/256, trainers/optimizers.py)
    gradients                                                 + 4 bytes per parameter of the largest role: the
                                                              engine updates one role at a time and frees its
                                                              gradients after its step
    foreach AdamW's temporary                                 + 4 bytes per parameter of that role: torch's
                                                              multi-tensor AdamW (its choice on GPUs) makes a
                                                              full-size sqrt(v) list during the step
    EMA of the student                                        + 4 bytes per student parameter

so `static_bytes` is the memory at the optimizer step, when the activations are gone: for SDXL with two rank-64
LoRAs (196.75 M parameters each), 4.78 + 2 x 2.20 + 0.73 + 0.73 = 10.66 GiB, the peak the planner measures.
A LoRA of rank r on a Linear(in, out) has r (in + out) parameters; on a Conv2d, r (in k_h k_w / groups + out).
Activations depend on the network, the method and the batch: trainers/planner.py measures them with a dry run
under fake tensors (`distillery plan`). Here the preflight refuses runs whose static part alone cannot fit,
and the first step that runs out of memory is turned into the same clear error with the measured peak and the
changes that would make it fit (nothing is saved over the last good checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2 ** 30
TRAINED_BYTES = 12  # stored per trained parameter, every role: fp32 weight + two fp32 AdamW moments
GRAD_BYTES = 4  # fp32 gradient, of the role being updated only
FOREACH_BYTES = 4  # foreach AdamW's full-size temporary, during the step of the role being updated


class NotEnoughMemory(MemoryError):
    """The run cannot fit in the device's memory with these settings; the message says what to change."""


@dataclass
class MemoryPlan:
    frozen_bytes: int
    trained_params: dict  # role -> number of trained parameters
    ema_params: int
    foreach: bool = True  # AdamW's multi-tensor implementation (torch's default on GPUs)
    optimizer_bytes: int | None = None  # the optimizers' state of every role (None: fp32 AdamW, 8 bytes a value)

    @property
    def trained_bytes(self) -> int:
        """fp32 weights and optimizer state of every role (held for the whole run)."""
        params = sum(self.trained_params.values())
        if self.optimizer_bytes is None:
            return TRAINED_BYTES * params
        return 4 * params + self.optimizer_bytes

    @property
    def step_params(self) -> int:
        """Parameters of the largest role: its gradients (and foreach temporary) are the ones that coexist."""
        return max(self.trained_params.values(), default=0)

    @property
    def grad_bytes(self) -> int:
        return GRAD_BYTES * self.step_params

    @property
    def temporary_bytes(self) -> int:
        return FOREACH_BYTES * self.step_params if self.foreach else 0

    @property
    def static_bytes(self) -> int:
        """Memory at the optimizer step of the largest role: everything but activations."""
        return (self.frozen_bytes + self.trained_bytes + 4 * self.ema_params + self.grad_bytes
                + self.temporary_bytes)

    def describe(self) -> str:
        roles = ", ".join(f"{r} {n / 1e6:.1f} M params" for r, n in self.trained_params.items())
        return (f"frozen base {self.frozen_bytes / GIB:.2f} GiB + trained ({roles}) "
                f"{self.trained_bytes / GIB:.2f} GiB with AdamW + one role's grads {self.grad_bytes / GIB:.2f} GiB"
                + (f" + foreach AdamW temporary {self.temporary_bytes / GIB:.2f} GiB" if self.temporary_bytes else "")
                + (f" + EMA {4 * self.ema_params / GIB:.2f} GiB" if self.ema_params else "")
                + f" = {self.static_bytes / GIB:.2f} GiB before activations")


def _matches(name: str, targets) -> bool:
    """peft's rule for a list of target module names: the full name or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_tensor_sizes(network: torch.nn.Module, targets, rank: int) -> list[int]:
    """Values of each LoRA matrix (down, up) a rank-`rank` adapter on `targets` adds."""
    sizes = []
    for name, module in network.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            sizes += [rank * module.in_features, rank * module.out_features]
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            sizes += [rank * module.in_channels * kh * kw // module.groups, rank * module.out_channels]
    return sizes


def lora_param_count(network: torch.nn.Module, targets, rank: int) -> int:
    return sum(lora_tensor_sizes(network, targets, rank))


def frozen_bytes(network: torch.nn.Module, fp8: bool = False) -> int:
    """The base's bytes; with fp8, its linear / conv weights as trainers/fp8.py stores them (1 byte a value
    and a 4-byte scale)."""
    from .fp8 import storable

    total = sum(p.numel() * p.element_size() for p in network.parameters())
    if fp8:  # the network before its adapters: every storable layer is frozen base
        for module in network.modules():
            if storable(module):
                total -= module.weight.numel() * (module.weight.element_size() - 1) - 4
    return total


def plan(network: torch.nn.Module, targets, *, full_finetune: bool, rank: int, critic_rank: int | None,
         with_critic: bool, ema: bool, separate_teacher: torch.nn.Module | None = None,
         foreach: bool = True, optimizer: str = "adamw", fp8_base: bool = False,
         shard_over: int = 1, student_adapters: int = 1, critic_adapters: int = 1) -> MemoryPlan:
    """The static memory of a run whose roles share `network` (see roles.build_roles). foreach: whether AdamW
    runs its multi-tensor implementation (torch's choice for CUDA tensors), which holds one role-sized
    temporary during the step (8-bit AdamW's fused step holds none). shard_over: the processes the frozen
    base is sharded over (trainers/sharding.py): each keeps its share, plus one gathered layer.
    student_adapters: LoRAs the student role trains (Phased DMD: one per expert); critic_adapters: the critic's
    (DMD2's critic_per_step: one per student step)."""
    from .optimizers import state_bytes_per_param
    from .sharding import largest_unit_bytes, sharded_bytes

    def base_bytes(module):
        if shard_over > 1:
            return sharded_bytes(module, shard_over) + largest_unit_bytes(module)
        return frozen_bytes(module, fp8_base)

    frozen = base_bytes(network)
    if separate_teacher is not None:
        frozen += base_bytes(separate_teacher)
    if full_finetune:
        sizes = {"student": [p.numel() for p in network.parameters()] * student_adapters}
        if with_critic:
            sizes["critic"] = [p.numel() for p in network.parameters()] * critic_adapters
    else:
        sizes = {"student": lora_tensor_sizes(network, targets, rank) * student_adapters}
        if with_critic:
            sizes["critic"] = lora_tensor_sizes(network, targets, critic_rank or rank) * critic_adapters
    trained = {role: sum(s) for role, s in sizes.items()}
    state = round(sum(n * state_bytes_per_param(optimizer, n) for s in sizes.values() for n in s))
    return MemoryPlan(frozen, trained, trained["student"] if ema else 0, foreach and optimizer == "adamw", state)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device: CUDA's free bytes, or MemAvailable of a Linux host for CPU runs."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def advice(config, device: torch.device, static_only: bool = False) -> list[str]:
    """Changes that lower memory, most effective and least harmful first, skipping those already made."""
    tips = []
    if not static_only:
        if config.gradient_checkpointing != "on":
            tips.append("gradient_checkpointing=on (--gradient-checkpointing on): recomputes activations, "
                        "about 30% slower")
        if config.mixed_precision == "no" and device.type == "cuda":
            tips.append("mixed_precision='bf16' (--mixed-precision bf16)")
        if config.micro_batch_size != 1 and config.batch_size > 1:
            tips.append("micro_batch_size=1 (--micro-batch-size 1): the same batch in passes of one sample")
    if not config.fp8_base and not config.full_finetune:
        tips.append("fp8_base=True (--fp8-base): the frozen base in fp8, half its memory")
    if config.optimizer == "adamw" and device.type == "cuda":
        tips.append("optimizer=adamw8bit (--optimizer adamw8bit, needs bitsandbytes): a quarter of AdamW's state")
    if config.full_finetune:
        tips.append("full_finetune=False: train LoRA adapters on the shared base instead of full copies")
    else:
        if config.lora_targets == "all":
            tips.append("lora_targets=attention (--lora-targets attention): adapters on attention layers only")
        if config.lora_rank > 8:
            tips.append(f"lora_rank={config.lora_rank // 2} (--rank {config.lora_rank // 2})")
    if config.ema_decay > 0:
        tips.append("ema_decay=0 (--ema 0: no EMA copy of the student)")
    tips.append("close other programs using this device, or use a device with more memory")
    return tips


def not_enough(what: str, config, device, static_only: bool) -> NotEnoughMemory:
    tips = advice(config, device, static_only)
    return NotEnoughMemory(f"{what}. To make it fit, try: " + "; ".join(tips))


def preflight(memory_plan: MemoryPlan, config, device: torch.device, available: int | None = None) -> None:
    """Refuse, before the weights move, a run whose weights and optimizer state alone exceed free memory."""
    available = available_bytes(device) if available is None else available
    if available is None or memory_plan.static_bytes <= available:
        return
    raise not_enough(f"not enough memory on {device}: {memory_plan.describe()}, but only "
                     f"{available / GIB:.2f} GiB is free", config, device, static_only=True)
