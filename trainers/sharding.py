"""The frozen base sharded across processes (PyTorch FSDP2), for models larger than one card.

With N processes (`accelerate launch --num_processes N`, or torchrun), each process keeps 1/N of every frozen
weight of the shared base (`fully_shard`: dim 0 split in N, padded to a multiple of N) and gathers a layer's
full weight only while that layer runs, forward and backward, then frees it again:

    per-process base bytes = sum over weights of ceil(rows / N) * (numel / rows) * itemsize      (+ one or two
                             gathered layers at a time)

The units are the modules that own frozen weights themselves (nn.Linear, convolutions, norms, embeddings,
a LoRA-wrapped layer's `base_layer`): their own forward is what uses the weights, whatever order or
helper a network calls its blocks through (ComfyUI's UNet calls a block's layers one by one, the worlds'
MLP calls its layers from a method), so every use of a weight is inside its gather. Finer units mean more,
smaller collectives than block-level FSDP; the gathered peak is one layer, not one block.

The LoRA adapters (and anything else that trains) are *ignored* by FSDP: replicated on every process, their
gradients averaged by the engine exactly as without sharding. So a sharded run takes the same steps as the
data-parallel run with the same seeds: each process computes with the same full weights, only where they are
stored differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The modules that own frozen parameters directly (recurse=False): each becomes one FSDP unit."""
    return [m for m in network.modules()
            if any(not p.requires_grad for p in m.parameters(recurse=False))]


def shard_bytes(p: torch.Tensor, world_size: int) -> int:
    """One process's bytes of a weight sharded over `world_size` processes (dim 0 padded to a multiple)."""
    if p.ndim == 0 or world_size <= 1:
        return p.numel() * p.element_size()
    rows = p.shape[0]
    return math.ceil(rows / world_size) * (p.numel() // max(rows, 1)) * p.element_size()


def sharded_bytes(network: nn.Module, world_size: int) -> int:
    """Bytes of the base one process keeps when it is sharded over `world_size` processes: every parameter
    of `network` (the network before its adapters, as memory.frozen_bytes counts it)."""
    return sum(shard_bytes(p, world_size) for p in network.parameters())


def largest_unit_bytes(network: nn.Module) -> int:
    """The largest unit's full weights (before adapters: every parameter a module owns directly): the most
    one gather holds."""
    return max((sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                for m in network.modules()), default=0)


def local_frozen_bytes(network: nn.Module) -> int:
    """Bytes of frozen weights this process actually stores (a sharded parameter counts its local shard)."""
    total = 0
    for p in network.parameters():
        if p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def shard_frozen_base(network: nn.Module, device: torch.device) -> int:
    """Shard `network`'s frozen weights over the default process group; returns the number of units.

    Call after the LoRA adapters exist (so they are known as trainable and left replicated) and after the
    weights are on `device`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise ValueError("shard_base=True: the frozen base is shared out over several processes; launch the "
                         "run with `accelerate launch --num_processes N` (or torchrun) on N >= 2 GPUs, or turn "
                         "shard_base off")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(network)
    # a unit manages the parameters of its subtree that no inner unit manages: so inner units first, and every
    # trainable parameter of the network ignored (a unit may hold LoRA layers below it)
    trainable = {p for p in network.parameters() if p.requires_grad}
    for unit in reversed(units):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=trainable or None)
        # every unit is its own FSDP root (no enclosing module's forward is ever called), and a root keeps its
        # weights gathered from forward to backward unless told otherwise: free them after each forward
        unit.set_reshard_after_forward(True, recurse=False)
    return len(units)


__all__ = ["shard_units", "shard_bytes", "sharded_bytes", "largest_unit_bytes", "local_frozen_bytes", "shard_frozen_base"]
