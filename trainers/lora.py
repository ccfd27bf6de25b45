"""One frozen base, several LoRA adapters: the memory design of every trainer in the pack.

The teacher is the base with adapters off, the student is the base with adapter "student", the critic
(DMD2's fake score, SiD's fake score) is the base with adapter "critic". The base weights are stored once;
each role adds only its low-rank matrices and their optimizer state. For SDXL (2.6 B UNet parameters):

    three separate copies (DMD2's reference code):  teacher bf16 5.1 GB + 2 x (fp32 weights 10.3 GB
                                                    + AdamW 20.5 GB) + one copy's grads 10.3  ~ 77 GB
    shared base + two rank-64 LoRAs (197 M params): base bf16 5.1 GB + 2 x (fp32 LoRA 0.79 GB
                                                    + AdamW 1.57 GB) + one LoRA's grads 0.79   ~ 10.6 GB

plus activations (checkpointed); benchmarks/README.md has the arithmetic per model.

Adapters are injected with peft. Switching roles sets the active adapter on every LoRA layer without
touching requires_grad (peft's own set_adapter / enable_adapters flip requires_grad, which would break a
graph that was recorded under another role, as SiD needs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from typing import Iterable

import torch
from torch import nn

# DMD2 / diffusers LCM-LoRA target modules for SD-style UNets (attention, feed-forward, resnets, resamplers)
UNET_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


# attention projections by their last name parts: diffusers' (to_q ... to_add_out) and ComfyUI's DiTs' (qkv,
# proj under an attention block); ComfyUI's ldm UNet names them to_q ... under attn1 / attn2
ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _is_attention(name: str) -> bool:
    if any(name == leaf or name.endswith("." + leaf) for leaf in ATTENTION_LEAVES):
        return True
    parts = name.split(".")
    return len(parts) > 1 and ("attn" in parts[-2] or "attention" in parts[-2]) and parts[-1] in ("qkv", "proj")


def targets_for(targets: Iterable[str] | None, choice: str = "all") -> list[str]:
    """The LoRA target modules of a run: a task's targets (None: the SD UNet set), all of them or
    (choice="attention", the low-VRAM choice) only the attention projections."""
    targets = list(targets) if targets is not None else list(UNET_TARGET_MODULES)
    if choice == "all":
        return targets
    if choice != "attention":
        raise ValueError(f"lora_targets={choice!r}: all or attention")
    kept = [t for t in targets if _is_attention(t)]
    if not kept:
        raise ValueError(f"lora_targets='attention': this model's LoRA targets ({', '.join(targets[:6])}"
                         f"{', ...' if len(targets) > 6 else ''}) have no attention projection; use lora_targets=all")
    return kept


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def add_lora_adapter(model: nn.Module, name: str, rank: int, alpha: float | None = None,
                     target_modules: Iterable[str] | None = None, init: str | bool = True) -> None:
    """Inject a LoRA adapter called `name` into `model` (in place). alpha defaults to rank (scale 1)."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora rank={rank}: must be >= 1")
    targets = list(target_modules) if target_modules is not None else UNET_TARGET_MODULES
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=targets, init_lora_weights=init, lora_dropout=0.0)
    with warnings.catch_warnings():  # several adapters on one model is the design, not an accident
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(config, model, adapter_name=name)
    for p in adapter_parameters(model, name):
        p.requires_grad_(True)
    set_role(model, None)


def adapter_names(model: nn.Module) -> set[str]:
    names = set()
    for layer in _tuner_layers(model):
        names.update(layer.lora_A.keys())
    return names


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    params = []
    for layer in _tuner_layers(model):
        if name in layer.lora_A:
            params += list(layer.lora_A[name].parameters()) + list(layer.lora_B[name].parameters())
    return params


def set_role(model: nn.Module, adapter: str | None) -> None:
    """Activate one adapter (or none: the frozen base, i.e. the teacher)."""
    for layer in _tuner_layers(model):
        layer._disable_adapters = adapter is None
        if adapter is not None:
            layer._active_adapter = [adapter]


@contextlib.contextmanager
def role(model: nn.Module, adapter: str | None):
    previous = [(layer, layer._disable_adapters, layer._active_adapter) for layer in _tuner_layers(model)]
    set_role(model, adapter)
    try:
        yield
    finally:
        for layer, disabled, active in previous:
            layer._disable_adapters, layer._active_adapter = disabled, active


def lora_state_dict(model: nn.Module, name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter as a diffusers / PEFT-format state dict with the LoRA scale folded into B.

    Keys: `<prefix><module>.lora_A.weight` (down) and `.lora_B.weight` (up), scale alpha / r folded into
    lora_B so the file needs no alpha and means the same thing to diffusers' load_lora_weights and to
    ComfyUI's LoraLoader (which use scale 1 when no alpha is stored).
    """
    out = {}
    for module_name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or name not in lora_a:
            continue
        clean = module_name.replace(".base_layer", "")
        scale = module.scaling[name]
        out[f"{prefix}{clean}.lora_A.weight"] = module.lora_A[name].weight.detach().float().cpu().contiguous()
        out[f"{prefix}{clean}.lora_B.weight"] = (module.lora_B[name].weight.detach().float().cpu()
                                                 * scale).contiguous()
    if not out:
        raise ValueError(f"model has no LoRA adapter named {name!r} (it has {sorted(adapter_names(model))})")
    return out


def load_lora_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Inverse of :func:`lora_state_dict` (the folded scale is divided back out)."""
    seen = 0
    for module_name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or name not in lora_a:
            continue
        clean = module_name.replace(".base_layer", "")
        with torch.no_grad():
            module.lora_A[name].weight.copy_(state[f"{prefix}{clean}.lora_A.weight"])
            module.lora_B[name].weight.copy_(state[f"{prefix}{clean}.lora_B.weight"] / module.scaling[name])
        seen += 2
    if seen != len(state):
        raise ValueError(f"LoRA file has {len(state)} tensors but the model's adapter {name!r} has {seen}")


def model_hash(model: nn.Module, max_tensors: int = 64) -> str:
    """A short, stable fingerprint of the base weights (adapters excluded) recorded in LoRA metadata."""
    h = hashlib.sha256()
    count = 0
    for key, tensor in sorted(model.state_dict().items()):
        if "lora_" in key:
            continue
        h.update(key.encode())
        flat = tensor.detach().float().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 256)].cpu().numpy().tobytes())
        count += 1
        if count >= max_tensors:
            break
    return h.hexdigest()[:16]


def save_lora(path, state: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a LoRA .safetensors atomically; metadata values are JSON-encoded strings."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_path

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_lora_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def kohya_unet_state_dict(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter in kohya format on diffusers module names: `lora_unet_<path_with_underscores>`.

    This is the format of community SD1.5 / SDXL LoRAs: ComfyUI's LoraLoader maps every diffusers UNet
    weight to it, A1111 / kohya read it natively, and diffusers' load_lora_weights converts it. The LoRA
    scale is folded into lora_up and `.alpha` = rank, so strength 1.0 means the trained student everywhere.
    """
    peft_sd = lora_state_dict(unet, name)
    out = {}
    for key, tensor in peft_sd.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        if kind == "A.weight":
            out[f"{stem}.lora_down.weight"] = tensor
            out[f"{stem}.alpha"] = torch.tensor(float(tensor.shape[0]))
        else:
            out[f"{stem}.lora_up.weight"] = tensor
    return out


def load_kohya_unet_state_dict(unet: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`kohya_unet_state_dict` for resuming or evaluating a student."""
    peft_sd = {}
    for module_name, module in unet.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or name not in lora_a:
            continue
        clean = module_name.replace(".base_layer", "")
        stem = "lora_unet_" + clean.replace(".", "_")
        scale = float(state[f"{stem}.alpha"]) / state[f"{stem}.lora_down.weight"].shape[0]
        peft_sd[f"{clean}.lora_A.weight"] = state[f"{stem}.lora_down.weight"]
        peft_sd[f"{clean}.lora_B.weight"] = state[f"{stem}.lora_up.weight"] * scale
    load_lora_state_dict(unet, name, peft_sd)


def kohya_lora_delta(state: dict[str, torch.Tensor], stem: str, weight: torch.Tensor) -> torch.Tensor:
    """One module's weight change from a kohya LoRA: (alpha / rank) up @ down, shaped as `weight`
    (conv LoRAs: down is a k x k conv to rank channels, up a 1x1 conv from them, as peft and kohya make them)."""
    down = state[f"{stem}.lora_down.weight"].float()
    up = state[f"{stem}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(state[f"{stem}.alpha"]) if f"{stem}.alpha" in state else float(rank)
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (alpha / rank) * delta.reshape(weight.shape)


@contextlib.contextmanager
def merged_kohya_unet_lora(unet: nn.Module, state: dict[str, torch.Tensor], strength: float = 1.0):
    """Merge a kohya-format LoRA on diffusers module names into the UNet's own weights, W + strength * dW, the
    way ComfyUI's LoraLoader patches a model, and restore the weights on exit.

    The merge goes into the frozen base layers (inside peft's wrappers if adapters are injected), so it sits
    under every adapter: a student adapter on top samples as ComfyUI's stack of the two LoRAs does. A LoRA
    module that matches no layer of `unet` is an error (a LoRA made for another network).
    """
    stems = {k.split(".", 1)[0] for k in state}
    backups = []
    try:
        with torch.no_grad():
            for module_name, module in unet.named_modules():
                if not isinstance(module, (nn.Linear, nn.Conv2d)) or ".lora_" in module_name:
                    continue
                stem = "lora_unet_" + module_name.replace(".base_layer", "").replace(".", "_")
                if stem not in stems:
                    continue
                stems.discard(stem)
                backups.append((module.weight, module.weight.detach().clone()))
                delta = kohya_lora_delta(state, stem, module.weight)
                module.weight.add_(strength * delta.to(module.weight.device, module.weight.dtype))
        if stems:
            raise ValueError(f"LoRA modules not in this network: {', '.join(sorted(stems)[:4])}"
                             f"{' ...' if len(stems) > 4 else ''} ({len(stems)} of them); it was made for another "
                             f"model")
        yield unet
    finally:
        with torch.no_grad():
            for weight, original in backups:
                weight.copy_(original)


class SwitchedKohyaLoras:
    """Several kohya LoRAs of one UNet (e.g. a Phased DMD student's experts), at most one merged at a time:
    `use(k)` restores the base weights and merges LoRA k (:func:`merged_kohya_unet_lora`); `close()` restores
    the base. Each LoRA is checked against the network when it is first merged."""

    def __init__(self, unet: nn.Module, states: list[dict[str, torch.Tensor]], strength: float = 1.0):
        self.unet, self.states, self.strength = unet, list(states), float(strength)
        self.active: int | None = None
        self._merged = None

    def use(self, k: int) -> None:
        if k == self.active:
            return
        self.close()
        merged = merged_kohya_unet_lora(self.unet, self.states[k], self.strength)
        merged.__enter__()
        self._merged, self.active = merged, k

    def close(self) -> None:
        if self._merged is not None:
            merged, self._merged, self.active = self._merged, None, None
            merged.__exit__(None, None, None)


def split_prefixed_state(state: dict[str, torch.Tensor], prefixes: list[str]) -> list[dict[str, torch.Tensor]]:
    """One state dict per prefix (the prefix stripped), e.g. a Phased DMD student file's experts (card.experts'
    `prefix`); a key under none of the prefixes is an error (the file is not what its card says)."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in prefixes]
    for key, value in state.items():
        for part, prefix in zip(parts, prefixes):
            if key.startswith(prefix):
                part[key[len(prefix):]] = value
                break
        else:
            raise ValueError(f"LoRA key {key!r} is under none of the card's expert prefixes {prefixes}: a damaged "
                             f"or edited file; export the student again")
    empty = [p for p, part in zip(prefixes, parts) if not part]
    if empty:
        raise ValueError(f"the LoRA file has no keys for the expert(s) {empty} its card names: a damaged or edited "
                         f"file; export the student again")
    return parts


def role_preserving_checkpoint_func(on_recompute=None):
    """A diffusers `gradient_checkpointing_func` that recomputes each block under the LoRA role it ran with.

    With one base serving several roles, a block may run as the student, then the loop switches to the
    critic or the teacher, then backward recomputes the block. A stock checkpoint would recompute it under
    the role active *then* (torch: "A different number of tensors was saved ..."; with same-shape adapters,
    silently the wrong weights). Here the forward's adapter state of the block's LoRA layers is restored for
    the recomputation. `on_recompute(thunk)` may wrap the recomputation (e.g. to count its FLOPs).
    """
    import torch.utils.checkpoint

    cache: dict[int, list] = {}

    def layers_of(module):
        if id(module) not in cache:
            cache[id(module)] = _tuner_layers(module) if isinstance(module, nn.Module) else []
        return cache[id(module)]

    def gradient_checkpointing_func(module, *args, **kwargs):
        layers = layers_of(module)
        forward_state = [(m._disable_adapters, m._active_adapter) for m in layers]
        calls = [0]

        def run(*a, **kw):
            calls[0] += 1
            if calls[0] == 1:
                return module(*a, **kw)
            now = [(m._disable_adapters, m._active_adapter) for m in layers]
            for m, (disabled, active) in zip(layers, forward_state):
                m._disable_adapters, m._active_adapter = disabled, active
            try:
                return on_recompute(lambda: module(*a, **kw)) if on_recompute else module(*a, **kw)
            finally:
                for m, (disabled, active) in zip(layers, now):
                    m._disable_adapters, m._active_adapter = disabled, active

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return gradient_checkpointing_func
