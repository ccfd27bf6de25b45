"""Will it fit on my card? An exact VRAM planner: one dry run of each iteration kind, under fake tensors.

The planner builds the network from its config with no weights (fake tensors: shapes, dtypes and devices,
no storage), wires the run exactly as `distillery train` would (the project's own Trainer: roles, LoRA
adapters, AdamW, mixed precision, gradient checkpointing, the method's losses), and runs one iteration of
each kind the method has (DMD2: student + critic, then critic only; SiD: critic + student; TCD: student)
through `Trainer.train`. A live-storage tracker (a TorchDispatchMode that sees every tensor an op makes and
counts its untyped storage until the storage is freed) gives the peak and what is alive at the peak:

    frozen weights     the base network (shared by teacher, student and critic)
    trainable weights  the fp32 LoRA adapters (and the EMA of the student, when kept)
    optimizer state    AdamW's two moments per trained parameter (primed first: the steady state)
    gradients          fp32 gradients of the role being updated (one role at a time)
    activations        what the forward passes keep for backward (and autocast's cached weight casts)
    temporaries        everything else made in backward and the optimizer step (foreach AdamW's
                       full-size sqrt(v) list, gradient buffers of activations, ...)
    data               prompt embeddings and latents of the batch

The same code runs on real tensors (`fake=False`), which is how tests/test_planner.py checks the planner
against the real run on this CPU.

Simulating a GPU on a CPU (`device="cuda"`, the default). Fake tensors live on the CPU here: autograd on
fake CUDA tensors needs a CUDA-linked torch. What differs between a CUDA and a CPU run is reproduced:

* autocast: the run uses CPU autocast (same dtype) plus :class:`CudaAutocastPolicy`, a TorchFunctionMode
  that applies CUDA's autocast lists where CPU's differ: group_norm, layer_norm, upsampling, softmax,
  exp / log / pow, sums and the losses run in fp32 on CUDA (inputs cast to fp32, outputs fp32), einsum / mv /
  addmv / addr in the low precision. Function modes are not active inside the autograd engine, so gradient
  checkpointing's recomputation (for which torch restores the autocast state) enters the policy again
  (FlopMeter.__call__): recomputed tensors match the forward's. Ops that only CPU autocast lists (3-d pooling,
  reflection / replication padding, fft, linalg) are not emulated: these networks do not run them.
* AdamW: on CUDA, torch picks the foreach implementation (one full-size temporary per step); fake tensors
  would make it pick the per-tensor loop, so the planner sets each parameter group's `foreach` to what
  CUDA picks (unless the run's `foreach` setting is off). 8-bit AdamW is planned by its state sizes
  (trainers/optimizers.py's stand-in: bitsandbytes' kernels need a CUDA GPU).
* attention: scaled_dot_product_attention picks the CPU flash kernel here and the flash (bf16 / fp16) or
  memory-efficient (fp32) kernel on CUDA; all keep the output and a logsumexp, nothing of size L x L.
* values: `.item()`, `float(loss)`, `torch.isfinite(loss)` have no value on fake tensors; the tracker
  answers them (floats 1.0, integers 0, booleans True). So the student's backward-simulation exit step is
  drawn as 0 (one student step with its graph); memory does not depend on it (the earlier steps run
  without gradients), the FLOPs count one student step for it.

FLOPs come from torch.utils.flop_counter's per-op formulas, counted by the tracker over the same dry run: executed FLOPs, and model
FLOPs (without gradient checkpointing's recomputation, measured through the role-preserving checkpoint's
`on_recompute`), averaged over the method's update cycle; time per iteration = model FLOPs / (MFU x peak).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .architectures import Arch
from .lora import targets_for

GIB = 2 ** 30
CATEGORIES = ("frozen weights", "trainable weights", "optimizer state", "gradients", "activations",
              "temporaries", "data")
# run settings the planner fixes so one dry iteration has no side effects (no checkpoints, previews, logs)
QUIET = dict(steps=10 ** 9, checkpoint_every=0, preview_every=0, log_every=10 ** 9)
# what the user asks about; the rest of TrainConfig does not change memory or FLOPs
PLANNED_SETTINGS = ("batch_size", "micro_batch_size", "grad_accum", "gradient_checkpointing", "mixed_precision",
                    "lora_rank", "critic_rank", "lora_alpha", "lora_targets", "optimizer", "foreach", "fp8_base",
                    "ema_decay", "full_finetune")


# --- the live-storage tracker ----------------------------------------------------------------------------

def _dummy_scalar(dtype: torch.dtype):
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return 1.0
    return 0


_DEVICE = torch.ops.prim.device.default
# FlopCounterMode's own per-op formulas; the mode itself is not used: its module tracker keeps tensors of the
# backward pass alive (the measured peak grew by a third on a tiny UNet) and it slows a dry run down ~5x
from torch.utils.flop_counter import flop_registry as _FLOP_REGISTRY  # noqa: E402


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of every untyped storage an op creates, until the storage is freed.

    Each storage carries a category (CATEGORIES): the one it is given by :meth:`label`, else the default of
    the stage it was made in (`stage_category`). The peak and the categories alive at the peak are kept, in
    total and per stage (e.g. "student forward"). With `fake=True` scalar reads (`.item()`) are answered
    with dummies, since fake tensors have no values.
    """

    def __init__(self, fake: bool):
        super().__init__()
        self.fake = fake
        self.records: dict[int, list] = {}  # id(storage) -> [nbytes, category]
        self.by_category: dict[str, int] = defaultdict(int)
        self.live = 0
        self.stage = "setup"
        self.stage_category = "data"
        self.count_flops = False
        self.flops = 0  # FLOPs of the ops run while count_flops is on (torch.utils.flop_counter's formulas)
        self.reset_peak()

    # bookkeeping
    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_categories = dict(self.by_category)
        self.peak_stage = self.stage
        self.stage_peaks: dict[str, tuple[int, dict]] = {}

    def set_stage(self, stage: str, category: str) -> None:
        self.stage, self.stage_category = stage, category

    def _free(self, key: int) -> None:
        record = self.records.pop(key, None)
        if record is not None:
            self.live -= record[0]
            self.by_category[record[1]] -= record[0]

    def _bump(self) -> None:
        if self.live > self.peak:
            self.peak, self.peak_categories, self.peak_stage = self.live, dict(self.by_category), self.stage
        best = self.stage_peaks.get(self.stage)
        if best is None or self.live > best[0]:
            self.stage_peaks[self.stage] = (self.live, dict(self.by_category))

    def track(self, t: torch.Tensor, category: str | None = None) -> None:
        st = t.untyped_storage()
        key = id(st)
        record = self.records.get(key)
        if record is None:
            n = st.nbytes()
            record = self.records[key] = [n, category or self.stage_category]
            self.live += n
            self.by_category[record[1]] += n
            weakref.finalize(st, self._free, key)
            self._bump()
        elif category is not None and record[1] != category:
            self.by_category[record[1]] -= record[0]
            record[1] = category
            self.by_category[category] += record[0]

    def label(self, tensors, category: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t, category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # asked tens of thousands of times per iteration; makes nothing
            device = getattr(args[0], "fake_device", None)  # a fake tensor knows: skip the fake mode's dispatch
            return device if device is not None else func(*args, **(kwargs or {}))
        if self.fake and func is torch.ops.aten._local_scalar_dense.default:
            return _dummy_scalar(args[0].dtype)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.count_flops:
            counter = _FLOP_REGISTRY.get(func._overloadpacket)
            if counter is not None:
                self.flops += counter(*args, **kwargs, out_val=out)
        return out


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except Exception:  # noqa: BLE001 - objects whose __class__ lookup fails (lazy modules, proxies)
        return False


def live_tensor_bytes(extra=()) -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can see (and of `extra`): an
    independent count of what is alive, to check the tracker against."""
    import gc
    import warnings

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some torch.distributed aliases warns
        warnings.simplefilter("ignore")
        objects = [o for o in list(gc.get_objects()) + list(extra) if _is_tensor(o)]
    for obj in objects:
        tensors = [obj] + ([obj.grad] if obj.grad is not None else [])
        for t in tensors:
            st = t.untyped_storage()
            if id(st) not in seen:
                seen.add(id(st))
                total += st.nbytes()
    return total


# --- CUDA's autocast policy on a CPU ---------------------------------------------------------------------

# aten ops whose CUDA autocast policy differs from CPU's (torch/aten/src/ATen/autocast_mode.h); matched by
# the name of the torch function (F.group_norm, torch.exp, Tensor.pow, F.interpolate, ...)
CUDA_FP32 = {"group_norm", "layer_norm", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
             "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "pow", "__pow__", "__rpow__",
             "softplus", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "logsumexp", "cosine_similarity",
             "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "nll_loss",
             "binary_cross_entropy_with_logits", "dist", "cdist", "renorm"}
CUDA_FP32_OPT_DTYPE = {"softmax", "log_softmax", "sum", "cumsum", "cumprod", "prod"}
CUDA_LOW = {"einsum", "mv", "addmv", "addr", "chain_matmul"}


class CudaAutocastPolicy(TorchFunctionMode):
    """While CPU autocast is on, run the ops whose CUDA policy differs from CPU's the way CUDA autocast
    would (see the module docstring); every other op goes to CPU autocast, whose lists match CUDA's for
    them (convolutions, linear, matmul / bmm / baddbmm, scaled_dot_product_attention)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not torch.is_autocast_enabled("cpu") or not (name in CUDA_FP32 or name in CUDA_FP32_OPT_DTYPE
                                                          or name in CUDA_LOW):
            return func(*args, **kwargs)
        low = torch.get_autocast_dtype("cpu")
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in CUDA_LOW:
            target = low
        elif not any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
            return func(*args, **kwargs)
        else:
            target = torch.float32
        if name in CUDA_FP32_OPT_DTYPE:
            if kwargs.get("dtype") is None:  # F.softmax passes dtype=None along
                kwargs = {**kwargs, "dtype": torch.float32}
        else:
            def cast(a):
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
                    return a.to(target)
                return a

            args = [cast(a) for a in args]
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        torch.set_autocast_enabled("cpu", False)
        try:
            return func(*args, **kwargs)
        finally:
            torch.set_autocast_enabled("cpu", True)


# --- the network and the task ----------------------------------------------------------------------------

def _fake_like(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace every parameter and buffer (built on the meta device) by an empty tensor of the current
    (fake) mode, floating ones in `dtype`."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                d = dtype if p.is_floating_point() else p.dtype
                sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=d, device="cpu"),
                                                           requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                d = dtype if b.is_floating_point() else b.dtype
                sub._buffers[name] = torch.empty(b.shape, dtype=d, device="cpu")


def meta_network(arch: Arch) -> torch.nn.Module:
    """`arch`'s network on the meta device (no memory). Build it outside any fake / tracking mode: its
    initialisers then cost nothing (inside them, SDXL's take ~15 s)."""
    from .architectures import network_class

    with torch.device("meta"):
        return network_class(arch)(**arch.config)


def build_network(arch: Arch, dtype: torch.dtype, fake: bool, seed: int = 0,
                  meta: torch.nn.Module | None = None) -> torch.nn.Module:
    """`arch`'s network in `dtype`: with no storage (inside a FakeTensorMode: `meta`, or a new meta network,
    given fake tensors) or with random weights."""
    from .architectures import network_class

    if fake:
        net = meta if meta is not None else meta_network(arch)
        _fake_like(net, dtype)
        return net.eval()
    torch.manual_seed(seed)
    net = network_class(arch)(**arch.config)
    return torch.nn.Module.to(net, dtype=dtype).eval()  # ModelMixin.to warns about keep-in-fp32 modules it has none of


class FlopMeter:
    """FLOPs counted while gradient checkpointing recomputes (model FLOPs = counted - recomputed)."""

    def __init__(self):
        self.counter = None  # the LiveStorageTracker counting FLOPs
        self.recomputed = 0
        self.policy = None  # CudaAutocastPolicy, re-entered for the recomputation (see __call__)

    def __call__(self, thunk):
        """Run a checkpointed block's recomputation (in backward). Torch restores the block's autocast state
        for it, but the function-mode stack is not active inside the autograd engine, so the CUDA policy is
        entered again here: the recomputed tensors must match the forward's (dtype included)."""
        before = self.counter.flops if self.counter is not None else 0
        try:
            with self.policy() if self.policy is not None else contextlib.nullcontext():
                return thunk()
        finally:
            if self.counter is not None:
                self.recomputed += self.counter.flops - before


class PlanTask:
    """A distillation task for a weightless network: fixed random prompt embeddings and latents.

    Like the benchmark task, it has "real images" (random latents), so TCD trains on data instead of first
    growing a buffer of teacher samples (data preparation, not the cost of a step).
    """

    name = "plan"
    teacher = None
    image_bank = None
    has_real_images = True
    dry_run = True  # the engine's preflight is about the host's memory; a plan is not limited by it
    device = torch.device("cpu")

    def __init__(self, arch: Arch, network: torch.nn.Module, resolution: int, batch: int, lora_targets: list):
        from .architectures import diffusion_model

        self.arch, self.network = arch, network
        self.base = diffusion_model(arch, network)
        # the GAN head reads a UNet's mid block; the diffusers transformers expose no features to it
        self.feature_shape = ((int(arch.config["block_out_channels"][-1]), True) if arch.kind == "unet" else (0, False))
        latent = resolution // 8
        self.sample_shape = (arch.latent_channels, latent, latent)  # Flux: packed into tokens by the model
        self.lora_targets = list(lora_targets)
        self.default_guidance = arch.guidance
        self.meter = FlopMeter()
        g = torch.Generator().manual_seed(0)
        self.cond, self.uncond = self._conditioning(batch, g, resolution)

    def _conditioning(self, batch, g, resolution):
        """Random prompt embeddings of the shapes the pipelines make: (cond of `batch` rows, uncond of 1).
        A guidance-distilled network's prompts carry their guidance input (Flux-dev: 3.5, FluxGuidance's
        default), which the student is trained at; the teacher's guided calls replace it by the method's
        scale (core/models.py)."""
        arch = self.arch

        def randn(*shape):
            return torch.randn(shape, generator=g)

        if arch.kind == "dit":
            cond = {"encoder_hidden_states": randn(batch, arch.text_tokens, arch.text_dim),
                    "pooled_projections": randn(batch, arch.pooled_dim)}
            uncond = {"encoder_hidden_states": randn(1, arch.text_tokens, arch.text_dim),
                      "pooled_projections": randn(1, arch.pooled_dim)}
            if arch.guidance_input:
                cond[arch.guidance_input] = torch.full((batch,), float(arch.guidance))
                uncond[arch.guidance_input] = torch.full((1,), float(arch.guidance))
            return cond, uncond
        if arch.config.get("addition_embed_type") == "text_time":
            r = float(resolution)
            time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]])
            return ({"encoder_hidden_states": randn(batch, arch.text_tokens, arch.text_dim),
                     "added_cond_kwargs": {"text_embeds": randn(batch, arch.pooled_dim),
                                           "time_ids": time_ids.expand(batch, -1).contiguous()}},
                    {"encoder_hidden_states": torch.zeros(1, arch.text_tokens, arch.text_dim),
                     "added_cond_kwargs": {"text_embeds": torch.zeros(1, arch.pooled_dim), "time_ids": time_ids}})
        return randn(batch, arch.text_tokens, arch.text_dim), randn(1, arch.text_tokens, arch.text_dim)

    def data_tensors(self) -> list:
        return [t for t in tree_leaves((self.cond, self.uncond)) if isinstance(t, torch.Tensor)]

    def to(self, device):  # the planner never moves weights: fake tensors stay where they were made
        return self

    def enable_gradient_checkpointing(self) -> None:
        from .lora import role_preserving_checkpoint_func

        self.network.enable_gradient_checkpointing(role_preserving_checkpoint_func(self.meter))

    def conditioning(self, batch, generator):
        from ..core.models import map_cond

        return map_cond(lambda c: c[:batch], self.cond), map_cond(lambda u: u.expand(batch, *u.shape[1:]), self.uncond)

    def real_images(self, batch, generator):
        from ..core.models import map_cond

        return torch.randn((batch, *self.sample_shape), generator=generator), map_cond(lambda c: c[:batch], self.cond)

    def preview(self, *args, **kwargs):
        pass

    def describe(self) -> dict:
        return {"task": self.name, "arch": self.arch.name}


# --- the plan ---------------------------------------------------------------------------------------------

@dataclass
class IterationPlan:
    phases: list
    step: int  # the iteration number it ran as
    peak_bytes: int
    peak_stage: str
    breakdown: dict  # category -> bytes alive at the peak
    stages: dict  # stage -> peak bytes
    flops: int  # executed
    recomputed_flops: int
    stage_breakdowns: dict = field(default_factory=dict)  # stage -> category -> bytes at that stage's peak

    @property
    def model_flops(self) -> int:
        return self.flops - self.recomputed_flops


@dataclass
class Plan:
    arch: str
    method: str
    resolution: int
    device: str
    settings: dict  # the TrainConfig fields that matter for memory, as the run resolves them
    method_options: dict
    fake: bool
    iterations: list  # IterationPlan per iteration kind
    cycle: int  # iterations per update cycle (DMD2: update_ratio)
    counts: dict  # iteration kind (index) -> how often it runs per cycle
    trained_params: dict
    static: dict  # memory.plan's arithmetic, for comparison
    wall_s: float
    notes: list = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(it.peak_bytes for it in self.iterations)

    @property
    def peak_iteration(self) -> IterationPlan:
        return max(self.iterations, key=lambda it: it.peak_bytes)

    @property
    def model_flops_per_iteration(self) -> float:
        return sum(self.iterations[i].model_flops * n for i, n in self.counts.items()) / self.cycle

    @property
    def flops_per_iteration(self) -> float:
        return sum(self.iterations[i].flops * n for i, n in self.counts.items()) / self.cycle

    def seconds_per_iteration(self, peak_tflops: float, mfu: float) -> float:
        return self.model_flops_per_iteration / (mfu * peak_tflops * 1e12)

    def fits(self, vram_bytes: int) -> bool:
        return self.peak_bytes <= vram_bytes

    def to_json(self, peak_tflops: float | None = None, mfu: float | None = None) -> dict:
        out = {
            "arch": self.arch, "method": self.method, "resolution": self.resolution, "device": self.device,
            "settings": self.settings, "method_options": self.method_options, "fake": self.fake,
            "peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / GIB, 3),
            "peak_at": f"{'+'.join(self.peak_iteration.phases)} iteration, {self.peak_iteration.peak_stage}",
            "phases": dict(self.peak_iteration.breakdown),
            "iterations": [{"phases": it.phases, "peak_bytes": it.peak_bytes, "peak_stage": it.peak_stage,
                            "breakdown": it.breakdown, "stages": it.stages, "flops": it.flops,
                            "model_flops": it.model_flops, "runs_per_cycle": self.counts.get(i, 0)}
                           for i, it in enumerate(self.iterations)],
            "trained_params": self.trained_params, "static_arithmetic": self.static,
            "flops_per_iteration": self.flops_per_iteration,
            "model_flops_per_iteration": self.model_flops_per_iteration, "wall_s": round(self.wall_s, 2),
            "notes": self.notes,
        }
        if peak_tflops and mfu:
            out.update(peak_tflops=peak_tflops, mfu=mfu,
                       seconds_per_iteration=self.seconds_per_iteration(peak_tflops, mfu))
        return out

    def table(self, peak_tflops: float | None = None, mfu: float | None = None) -> str:
        unit, scale = ("GiB", GIB) if self.peak_bytes >= GIB / 4 else ("MiB", 2 ** 20)

        def gib(n):
            return f"{n / scale:8.2f}"

        its = self.iterations
        head = f"{unit + ' at the peak of':<20}" + "".join(f"{'+'.join(it.phases)[:16]:>18}" for it in its)
        lines = [f"{self.arch} @ {self.resolution}px, {self.method}, planned for {self.device} "
                 f"({'fake tensors' if self.fake else 'real tensors'}, {self.wall_s:.1f} s)",
                 "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
                 "", head]
        for cat in CATEGORIES:
            lines.append(f"{cat:<20}" + "".join(f"{gib(it.breakdown.get(cat, 0)):>18}" for it in its))
        lines.append(f"{'total':<20}" + "".join(f"{gib(it.peak_bytes):>18}" for it in its))
        lines.append(f"{'reached in':<20}" + "".join(f"{it.peak_stage[:17]:>18}" for it in its))
        lines.append("")
        for it in its:
            stages = ", ".join(f"{s} {b / scale:.2f}" for s, b in it.stages.items())
            lines.append(f"{'+'.join(it.phases)} iteration, peak per stage ({unit}): {stages}")
        lines.append("")
        lines.append(f"PEAK {self.peak_bytes / GIB:.2f} GiB ({self.peak_bytes:,} bytes), "
                     f"in the {'+'.join(self.peak_iteration.phases)} iteration, {self.peak_iteration.peak_stage}")
        lines.append(f"FLOPs per iteration (average over a cycle of {self.cycle}): "
                     f"{self.flops_per_iteration / 1e12:.2f} T executed, "
                     f"{self.model_flops_per_iteration / 1e12:.2f} T model")
        if peak_tflops and mfu:
            lines.append(f"time per iteration at {100 * mfu:.0f}% MFU of {peak_tflops:g} TFLOP/s: "
                         f"{self.seconds_per_iteration(peak_tflops, mfu):.3f} s")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _swappable(fake_mode):
    """Let nn.Module.to / _apply cast and move fake parameters (peft's adapter injection does).

    _apply replaces a fake parameter with torch.utils.swap_tensors, which refuses a tensor that a weak
    reference points to, and the fake mode's meta-converter memo keeps weak references to the tensors it
    wraps ("_apply(): Couldn't swap Linear.weight"). The memo only saves re-converting the same real tensor,
    so it is emptied before each swap, for the duration of the plan."""
    if fake_mode is None:
        yield
        return
    original = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def swap_tensors(t1, t2):
        memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def _settings(config, **extra) -> dict:
    return {**{k: getattr(config, k) for k in PLANNED_SETTINGS if hasattr(config, k)}, **extra}


def _kinds(method) -> tuple[list, dict, int]:
    """The distinct iteration kinds of the method's update cycle: [(step, phases)], counts, cycle."""
    cycle = int(getattr(getattr(method, "opt", None), "update_ratio", 1) or 1)
    kinds, counts = [], defaultdict(int)
    for step in range(cycle):
        phases = list(method.phases(step))
        for i, (_, seen) in enumerate(kinds):
            if seen == phases:
                counts[i] += 1
                break
        else:
            kinds.append((step, phases))
            counts[len(kinds) - 1] += 1
    return kinds, dict(counts), cycle


def _instrument(trainer, tracker: LiveStorageTracker) -> None:
    """Stage labels around the Trainer's own loss, backward and optimizer step (instance attributes of this
    trainer only: the class is untouched)."""
    method, acc = trainer.method, trainer.accelerator
    current = {"role": "?"}
    loss, backward = method.loss, acc.backward

    def staged_loss(role, ctx):
        current["role"] = role
        tracker.set_stage(f"{role} forward", "activations")
        out = loss(role, ctx)
        tracker.set_stage(f"{role} loss done", "temporaries")
        return out

    def staged_backward(value, **kwargs):
        tracker.set_stage(f"{current['role']} backward", "temporaries")
        backward(value, **kwargs)
        tracker.set_stage(f"{current['role']} clip", "temporaries")

    method.loss, acc.backward = staged_loss, staged_backward
    for role, opt in trainer.optimizers.items():
        step = opt.step

        def staged_step(*args, _step=step, _role=role, _opt=opt, **kwargs):
            tracker.set_stage(f"{_role} optimizer step", "temporaries")
            try:
                return _step(*args, **kwargs)
            finally:
                tracker.label([t for s in _opt.optimizer.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor)], "optimizer state")
                tracker.set_stage(f"{_role} after step", "temporaries")

        opt.step = staged_step


def _prime_optimizers(trainer, tracker) -> None:
    """One zero-gradient AdamW step per role, so the moments of every role exist, as after the first
    iterations of a run (the steady state, not the lighter first iteration)."""
    for role, opt in trainer.optimizers.items():
        params = trainer.roles.trainable[role]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.optimizer.step()
        opt.optimizer.zero_grad(set_to_none=True)
        tracker.label([t for s in opt.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)],
                      "optimizer state")


def plan(arch: Arch, method: str | None = None, method_options: dict | None = None, train: dict | None = None,
         resolution: int | None = None, device: str = "cuda", base_dtype: torch.dtype = torch.bfloat16,
         fake: bool = True, flops: bool = True, lora_targets: list | None = None, probe=None,
         gpus: int = 1) -> Plan:
    """Plan (fake=True) or measure (fake=False, tiny networks only) the memory of one iteration of each kind.

    train: TrainConfig values (e.g. {"batch_size": 1, "gradient_checkpointing": True}); defaults are the
    defaults of `distillery train`. device: "cuda" simulates a CUDA run (autocast lists, foreach AdamW),
    "cpu" plans the run on this CPU (what the real-mode check measures). probe(tracker, trainer): called after
    the iterations, while the run is alive (tests). gpus: processes of the run (accelerate launch): the plan
    is per GPU; each runs the same iteration on its own batch, so only a sharded base (`shard_base`) changes
    it: the frozen weights become each GPU's shard (trainers/sharding.py) plus the layer being run, gathered
    (its all-gather buffer and the weight copied out of it, at most twice the largest layer's bytes).
    """
    from . import memory, registry
    from .engine import TrainConfig, Trainer

    method = method or registry.default_method()
    started = time.perf_counter()
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: plan for cuda (a GPU) or cpu")
    resolution = int(resolution or arch.resolution)
    factor = arch.pixel_multiple
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution={resolution}: {arch.name} needs a multiple of {factor}")
    notes = []
    values = dict(train or {})
    if values.get("mixed_precision") == "fp16" or (base_dtype == torch.float16
                                                   and values.get("mixed_precision", "auto") == "auto"):
        notes.append("fp16 is planned as bf16 (same sizes; the fp16 loss scaler's few scalars are left out)")
        values["mixed_precision"] = "bf16"
    if values.get("optimizer") == "adamw8bit":
        notes.append("adamw8bit is planned with its state sizes (bitsandbytes' kernels need a CUDA GPU)")
    shard = bool(values.pop("shard_base", False))
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: plan for one GPU or more")
    if shard and gpus < 2:
        raise ValueError("shard_base=True: the frozen base is shared out over several GPUs; plan it with "
                         "--gpus N (N >= 2)")
    if shard and values.get("fp8_base"):
        raise ValueError("shard_base=True: does not combine with fp8_base=True: turn one off")
    config = registry.build(TrainConfig, {**values, **QUIET}, owner="the training settings")
    info = registry.get(method)
    meth = info.make(method_options or {})
    targets = lora_targets or targets_for(arch.lora_targets, config.lora_targets)
    if config.lora_targets == "attention":
        notes.append("LoRA on the attention projections only")

    fake_mode = _fake_mode() if fake else None
    meta = meta_network(arch) if fake else None
    tracker = LiveStorageTracker(fake)
    policy = CudaAutocastPolicy() if device == "cuda" else contextlib.nullcontext()
    autocast_was = torch.is_autocast_enabled("cpu")
    # a host may call in inference mode (ComfyUI runs its nodes so); a training iteration needs autograd
    with torch.inference_mode(False), torch.enable_grad(), tempfile.TemporaryDirectory() as run_dir, \
            _swappable(fake_mode), fake_mode or contextlib.nullcontext(), tracker, policy:
        config.run_dir = run_dir
        network = build_network(arch, base_dtype, fake, meta=meta)
        if shard:  # of the network before its adapters: all of it is frozen base
            from .sharding import largest_unit_bytes, sharded_bytes

            params_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
            shard_delta = sharded_bytes(network, gpus) + 2 * largest_unit_bytes(network) - params_bytes
        task = PlanTask(arch, network, resolution, config.batch_size, targets)
        task.meter.policy = CudaAutocastPolicy if device == "cuda" else None
        # what mixed_precision="auto" becomes for a loaded model: its weights' dtype (fp16 planned as bf16)
        task.mixed_precision = "bf16" if base_dtype in (torch.bfloat16, torch.float16) else "no"
        # what torch.optim.AdamW picks: its multi-tensor step for CUDA tensors (unless the run turns it off),
        # the per-tensor loop for CPU ones
        foreach = config.foreach and device == "cuda"
        # the arithmetic, for comparison: on the network before the adapters are injected, as the engine does
        static = memory.plan(task.base, targets, full_finetune=config.full_finetune, rank=config.lora_rank,
                             critic_rank=config.critic_rank, with_critic=meth.needs_critic,
                             ema=config.ema_decay > 0, foreach=foreach, optimizer=config.optimizer,
                             fp8_base=config.fp8_base, student_adapters=len(meth.student_adapters()),
                             critic_adapters=len(meth.critic_adapters()))
        trainer = Trainer(task, meth, config, progress=False)
        # a GPU host would give the CPU-side fake tensors CUDA autocast; the dry run is on the CPU
        trainer.device = torch.device("cpu")
        if config.mixed_precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
            trainer.accelerator.autocast = lambda *a, **k: torch.autocast("cpu", dtype=dtype)
        for opt in trainer.optimizers.values():
            if isinstance(opt.optimizer, torch.optim.AdamW):
                for group in opt.optimizer.param_groups:
                    group["foreach"] = foreach
        tracker.label([p for p in network.parameters()] + list(network.buffers()), "frozen weights")
        trained = [p for ps in trainer.roles.trainable.values() for p in ps]
        tracker.label(trained + list(trainer.ema or []), "trainable weights")
        tracker.label(task.data_tensors(), "data")
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.label([p.grad], "gradients"))
                 for p in trained]
        _prime_optimizers(trainer, tracker)
        _instrument(trainer, tracker)
        kinds, counts, cycle = _kinds(meth)
        results = []
        for step, phases in kinds:
            trainer.step = step
            tracker.set_stage("start", "temporaries")
            tracker.reset_peak()
            task.meter.recomputed, tracker.flops = 0, 0
            task.meter.counter, tracker.count_flops = (tracker, True) if flops else (None, False)
            trainer.train(until=step + 1)
            task.meter.counter, tracker.count_flops = None, False
            results.append(IterationPlan(
                phases, step, tracker.peak, tracker.peak_stage,
                {c: max(0, tracker.peak_categories.get(c, 0)) for c in CATEGORIES},
                {s: b for s, (b, _) in tracker.stage_peaks.items()},
                tracker.flops, task.meter.recomputed,
                {s: {c: max(0, cats.get(c, 0)) for c in CATEGORIES} for s, (_, cats) in tracker.stage_peaks.items()}))
        if probe is not None:
            probe(tracker, trainer)
        for h in hooks:
            h.remove()
        trained_params = {r: sum(p.numel() for p in ps) for r, ps in trainer.roles.trainable.items()}
        trained_tensors = sum(len(ps) for ps in trainer.roles.trainable.values())
        settings = _settings(config)
    torch.set_autocast_enabled("cpu", autocast_was)
    if gpus > 1:
        settings["gpus"] = gpus
    if shard:
        settings["shard_base"] = True
        for it in results:
            it.peak_bytes += shard_delta
            it.breakdown["frozen weights"] += shard_delta
            it.stages = {stage: b + shard_delta for stage, b in it.stages.items()}
            for cats in it.stage_breakdowns.values():
                cats["frozen weights"] += shard_delta
        notes.append(f"per GPU of {gpus}: the frozen weights are this GPU's shard plus the layer being run, "
                     f"gathered (counted at twice the largest layer: its all-gather buffer and its weight)")
    elif gpus > 1:
        notes.append(f"per GPU of {gpus}: each runs this iteration on its own batch of batch_size (data "
                     f"parallel); --shard-base splits the frozen base over them")
    static_json = {"frozen_bytes": static.frozen_bytes, "trained_params": static.trained_params,
                   "trained_tensors": trained_tensors, "trained_bytes": static.trained_bytes,
                   "grad_bytes": static.grad_bytes, "temporary_bytes": static.temporary_bytes,
                   "ema_bytes": 4 * static.ema_params, "static_bytes": static.static_bytes}
    return Plan(arch.name, info.name, resolution, device, settings, registry.to_json(meth.opt), fake, results,
                cycle, counts, trained_params, static_json, time.perf_counter() - started, notes)


def static_bytes(arch: Arch, method: str | None = None, method_options: dict | None = None,
                 train: dict | None = None, device: str = "cuda", base_dtype: torch.dtype = torch.bfloat16,
                 meta: torch.nn.Module | None = None, gpus: int = 1) -> int:
    """trainers/memory.py's arithmetic for a run (weights, optimizer state, one role's gradients, foreach's
    temporary): a lower bound of its planned peak, in well under a second, no dry run."""
    from . import memory, registry
    from .engine import TrainConfig, resolve_auto

    values = dict(train or {})
    shard_over = gpus if values.pop("shard_base", False) else 1
    config = registry.build(TrainConfig, {**values, **QUIET}, owner="the training settings")
    meth = registry.get(method or registry.default_method()).make(method_options or {})
    network = torch.nn.Module.to(meta if meta is not None else meta_network(arch), base_dtype)
    resolve_auto(config, sum(p.numel() for p in network.parameters()))
    static = memory.plan(network, targets_for(arch.lora_targets, config.lora_targets),
                         full_finetune=config.full_finetune, rank=config.lora_rank, critic_rank=config.critic_rank,
                         with_critic=meth.needs_critic, ema=config.ema_decay > 0,
                         foreach=config.foreach and device == "cuda", optimizer=config.optimizer,
                         fp8_base=config.fp8_base, shard_over=shard_over,
                         student_adapters=len(meth.student_adapters()), critic_adapters=len(meth.critic_adapters()))
    return static.static_bytes


def describe_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def parse_size(text: str) -> int:
    """'12GB', '12 GiB', '12g', '11.5' (GiB) -> bytes. GB and GiB both mean 2**30 bytes here (cards are sold in
    GiB-sized memories named GB)."""
    s = str(text).strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
            break
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"--vram {text!r}: a size like 12GB or 24GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--vram {text!r}: a positive size like 12GB")
    return int(value * GIB)


__all__ = ["plan", "Plan", "IterationPlan", "LiveStorageTracker", "CudaAutocastPolicy", "PlanTask",
           "build_network", "live_tensor_bytes", "parse_size", "CATEGORIES", "json"]
