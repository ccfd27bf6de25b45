"""The method-agnostic training loop shared by DMD2, SiD and TCD.

A method says which roles update at a given iteration (`phases`) and computes each role's loss; the loop
owns everything else: per-role AdamW and warm-up, update ratios, gradient accumulation, mixed precision
and fp16 loss scaling (accelerate), gradient clipping, EMA of the student, seeded noise, atomic
checkpoints with bit-exact resume, JSON-lines metrics, previews, and a loud stop on NaN / inf.

Multi-GPU: every process runs the same loop on its own noise stream (seed + rank); gradients of the
trainable (LoRA) parameters are averaged across processes before each optimizer step, so
`accelerate launch` works without wrapping the shared base in DDP. With `shard_base` the frozen base is
also split over the processes (FSDP, trainers/sharding.py) for models larger than one card.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .registry import build, option, to_json
from .roles import Roles, build_roles


class TrainingDiverged(RuntimeError):
    """A loss became NaN / inf; the run stopped and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    steps: int = option(1000, min=1, max=10 ** 9, help="training iterations")
    batch_size: int = option(4, min=1, max=4096, help="samples per iteration (and process)")
    student_lr: float = option(1e-4, min=1e-9, max=10.0, aliases=("lr",), help="student learning rate (AdamW)")
    critic_lr: float = option(1e-4, min=1e-9, max=10.0, help="critic (fake score) learning rate (AdamW)")
    betas: tuple = option((0.9, 0.999), kind="float_pair", min=0.0, max=0.999999, advanced=True,
                          help="AdamW betas, e.g. 0.9,0.999 (SiD uses 0,0.999)")
    weight_decay: float = option(0.01, min=0.0, max=1.0, advanced=True, help="AdamW weight decay")
    warmup_steps: int = option(0, min=0, max=10_000_000, advanced=True, help="linear learning-rate warm-up")
    lr_schedule: str = option("constant", choices=("constant", "cosine"), advanced=True,
                              help="constant, or cosine (decays to 10% at the last step; a run resumed with more steps "
                                   "goes on from the rate it had down to 10% at its new last step)")
    grad_clip: float = option(10.0, min=0.0, max=1e6, advanced=True, help="max gradient norm (0 = off)")
    grad_accum: int = option(1, min=1, max=1024, advanced=True, help="gradient accumulation steps")
    mixed_precision: str = option("auto", choices=("auto", "no", "bf16", "fp16"), advanced=True,
                                  help="auto follows the model's weights (bf16 weights on a GPU train in bf16, "
                                       "fp32 weights in fp32), or no, bf16, fp16")
    gradient_checkpointing: str = option("auto", choices=("auto", "on", "off"), advanced=True,
                                         help="recompute activations in the backward pass (less memory, ~30% "
                                              "slower); auto: on for image-size networks (>= 100 M parameters)")
    micro_batch_size: int = option(0, min=0, max=4096, advanced=True,
                                   help="samples per forward / backward pass: batch_size runs as passes of this "
                                        "many whose gradients add up (the same update, less memory); 0 = auto: "
                                        "1 for image-size networks, else all of batch_size")
    lora_targets: str = option("all", choices=("all", "attention"), advanced=True,
                               help="layers that get LoRA adapters: all the model's usual targets, or the "
                                    "attention projections only (less memory; the student can learn less)")
    optimizer: str = option("adamw", choices=("adamw", "adamw8bit"), advanced=True,
                            help="adamw (fp32 moments), or adamw8bit: bitsandbytes' 8-bit AdamW (moments in 8 "
                                 "bits, a quarter of the memory; CUDA GPUs only)")
    foreach: bool = option(True, advanced=True,
                           help="AdamW's multi-tensor step where torch uses it (GPUs): faster, but holds one "
                                "full-size temporary during the step; off saves it")
    fp8_base: bool = option(False, advanced=True,
                            help="store the frozen base's linear / conv weights in fp8 (e4m3, one scale per "
                                 "tensor), computed in the training precision: half a 16-bit base's memory; the "
                                 "teacher is the fp8 model too (a small quality cost)")
    shard_base: bool = option(False, advanced=True, node=False,
                              help="with several processes (accelerate launch --num_processes N): shard the "
                                   "frozen base over them with PyTorch FSDP, each GPU keeping 1/N of it; the "
                                   "LoRAs stay replicated, so the run takes the same steps as without")
    ema_decay: float = option(0.0, min=0.0, max=0.999999, aliases=("ema",),
                              help="EMA decay of the student (0 = off, e.g. 0.999)")
    seed: int = option(0, min=0, max=2 ** 31 - 1, help="random seed of the run")
    full_finetune: bool = option(False, advanced=True, node=False,
                                 help="train whole copies instead of LoRAs (small models only)")
    lora_rank: int = option(64, min=1, max=1024, aliases=("rank",), help="LoRA rank of the student (and critic)")
    lora_alpha: float = option(0.0, min=0.0, max=4096.0, advanced=True,
                               help="LoRA alpha (0 = the rank, i.e. scale 1)")
    critic_rank: int = option(0, min=0, max=1024, advanced=True,
                              help="LoRA rank of the critic (0 = the student's rank)")
    checkpoint_every: int = option(500, min=0, max=10 ** 9,
                                   help="iterations between checkpoints (0 = only at the end)")
    keep_checkpoints: int = option(3, min=1, max=1000, advanced=True, help="checkpoints kept on disk")
    preview_every: int = option(100, min=0, max=10 ** 9, help="iterations between preview images (0 = off)")
    log_every: int = option(10, min=1, max=10 ** 9, advanced=True, help="iterations between metrics lines")
    run_dir: str = option("runs/distill", node=False, help="folder for checkpoints, metrics and previews")

    def validate(self) -> "TrainConfig":
        """Every field checked by its declared range (trainers/registry.py); raises ValueError naming it."""
        checked = build(TrainConfig, to_json(self), owner="the training settings")
        for name, value in to_json(checked).items():
            setattr(self, name, tuple(value) if name == "betas" else value)
        micro = self.micro_batch_size
        if micro and self.batch_size % micro:
            divisors = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            raise ValueError(f"micro_batch_size={micro}: batch_size={self.batch_size} runs in passes of "
                             f"micro_batch_size samples; use a divisor of it ({', '.join(map(str, divisors))}) "
                             f"or 0 (auto)")
        if self.fp8_base and self.full_finetune:
            raise ValueError("fp8_base=True: the fp8 base is frozen, but full_finetune=True trains it; turn one off")
        if self.shard_base:
            if self.full_finetune or self.fp8_base:
                raise ValueError(f"shard_base=True: shards a bf16 / fp32 frozen base; it does not combine with "
                                 f"{'full_finetune' if self.full_finetune else 'fp8_base'}=True: turn one off")
            if world_size() < 2:
                raise ValueError("shard_base=True: shares the frozen base out over several processes, and this "
                                 "run has one: launch it with `accelerate launch --num_processes N` (or torchrun) "
                                 "on N >= 2 GPUs, or turn shard_base off")
        return self

    def passes(self) -> int:
        """Forward / backward passes per update: the micro-batches of one batch, times grad_accum."""
        return self.grad_accum * (self.batch_size // (self.micro_batch_size or self.batch_size))


def world_size() -> int:
    """Processes of this run, as the launcher (accelerate launch, torchrun) tells them, before any set-up."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def low_vram_preset(device_type: str = "cuda") -> dict:
    """The low-VRAM preset (`--low-vram`): the frozen base in fp8 and, on a CUDA GPU, 8-bit AdamW (elsewhere
    AdamW without its foreach temporary). Neither changes which layers learn; gradient checkpointing and
    micro-batches of 1 are already the defaults for image-size networks."""
    return {"fp8_base": True, **({"optimizer": "adamw8bit"} if device_type == "cuda" else {"foreach": False})}


# image-size networks: SD1.5's UNet has 860 M parameters, SDXL's 2.6 B; the worlds' networks a few million
LARGE_NETWORK_PARAMS = 100_000_000


def resolve_auto(config: TrainConfig, network_params: int) -> TrainConfig:
    """The run's memory settings made definite (one rule, for the trainer and the planner): "auto" gradient
    checkpointing and micro-batches of 1 for image-size networks, whose activations dominate memory, and
    neither for small ones, where they only cost time."""
    large = network_params >= LARGE_NETWORK_PARAMS
    if config.gradient_checkpointing == "auto":
        config.gradient_checkpointing = "on" if large else "off"
    if config.micro_batch_size == 0:
        config.micro_batch_size = 1 if large else config.batch_size
    return config


@dataclass
class StepContext:
    """What a method's loss function sees."""

    step: int
    roles: Roles
    task: object
    config: TrainConfig
    generator: torch.Generator
    device: torch.device
    cache: dict = field(default_factory=dict)  # shared by the phases of one iteration
    batch: int = 0  # samples of one forward / backward pass (the micro-batch)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=dtype).to(self.device)

    def rand(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=dtype).to(self.device)

    def sample_sigma(self, batch: int, lo: int, hi: int) -> torch.Tensor:
        """Training noise levels: integer timesteps uniform in [lo, hi] through the student's schedule.

        Flow schedules map timestep t to sigma = shift(t / 1000); t = 0 would be sigma = 0, where the
        noise (and epsilon) is undefined, so flow levels start at t = 1.
        """
        schedule = self.roles.student.schedule
        if not schedule.discrete:
            lo = max(lo, 1)
        t = torch.randint(lo, hi + 1, (batch,), generator=self.generator).to(torch.float64)
        return schedule.training_sigma(t).to(self.device)


class DistillationMethod:
    """A method: its roles, which of them update when, and each role's loss."""

    name = "method"
    needs_critic = True

    def validate(self, task, config: TrainConfig) -> None:
        """Raise ValueError (naming the field and the fix) before any work starts."""

    def setup(self, roles: Roles, task, config: TrainConfig) -> dict[str, list]:
        """Extra trainable parameters per role (e.g. a GAN head on the critic)."""
        return {}

    def phases(self, step: int) -> list[str]:
        raise NotImplementedError

    def loss(self, role: str, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def sampler_metadata(self) -> dict:
        """How the student should be sampled (read by the sampler / LoRA loader nodes)."""
        return {}

    def state_dict(self) -> dict:
        """Method state that must survive a resume (beyond the trainable parameters)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def student_sigmas(self, schedule) -> torch.Tensor:
        raise NotImplementedError

    def student_adapters(self) -> list[str]:
        """The student's LoRA adapters: one, or one per expert (Phased DMD), all trained as the student role."""
        return ["student"]

    def critic_adapters(self) -> list[str]:
        """The critic's (fake score's) adapters when `needs_critic`: one, or one per student step (DMD2's
        critic_per_step), all trained as the critic role; the first is `roles.critic`."""
        return ["critic"]


def _memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


class Trainer:
    def __init__(self, task, method: DistillationMethod, config: TrainConfig,
                 on_metrics: Callable[[dict], None] | None = None, progress: bool = True):
        from accelerate import Accelerator

        self.config = config.validate()
        if config.mixed_precision == "auto":
            config.mixed_precision = getattr(task, "mixed_precision", "no")  # tasks are duck-typed
        method.validate(task, config)  # bad input fails here, before any model work
        self.task, self.method = task, method
        self.on_metrics = on_metrics
        self.progress = progress
        cpu = not torch.cuda.is_available()
        from accelerate.state import AcceleratorState

        # accelerate keeps one process-wide state and refuses a second Accelerator with another precision
        # (several trainers in one process: tests, benchmarks, a notebook); start from a clean state then
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.device = self.accelerator.device
        self.run_dir = Path(config.run_dir)
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed + 1000 * self.accelerator.process_index)

        from .fp8 import store_frozen_in_fp8
        from .lora import targets_for
        from .memory import plan, preflight
        from .optimizers import check_available, make_optimizer

        resolve_auto(config, sum(p.numel() for p in task.base.parameters()))
        dry_run = getattr(task, "dry_run", False)  # a planner's dry run: fake tensors, a simulated GPU
        if not dry_run:
            check_available(config, self.device)
        teacher = task.teacher if isinstance(task.teacher, torch.nn.Module) else None
        targets = targets_for(task.lora_targets, config.lora_targets)
        self.memory_plan = plan(task.base, targets, full_finetune=config.full_finetune,
                                rank=config.lora_rank, critic_rank=config.critic_rank,
                                with_critic=method.needs_critic, ema=config.ema_decay > 0,
                                student_adapters=len(method.student_adapters()),
                                critic_adapters=len(method.critic_adapters()),
                                separate_teacher=teacher, foreach=config.foreach and self.device.type == "cuda",
                                optimizer=config.optimizer, fp8_base=config.fp8_base,
                                shard_over=self.accelerator.num_processes if config.shard_base else 1)
        if not dry_run:  # a plan is not limited by this host's memory
            preflight(self.memory_plan, config, self.device)  # before the weights move to the device
        task.to(self.device)
        from .lora import model_hash

        # of the weights as loaded (before fp8 or sharding); a dry run's fake weights have no values
        self.base_model_hash = "" if dry_run else model_hash(task.base)
        if config.gradient_checkpointing == "on":
            task.enable_gradient_checkpointing()
        self.roles = build_roles(task.base, task.teacher, with_critic=method.needs_critic,
                                 student_adapters=method.student_adapters(),
                                 critic_adapters=method.critic_adapters(),
                                 full_finetune=config.full_finetune, rank=config.lora_rank,
                                 alpha=config.lora_alpha or None, critic_rank=config.critic_rank or None,
                                 target_modules=targets)
        if config.fp8_base:  # after the adapters exist: only the frozen layers are stored in fp8
            store_frozen_in_fp8(task.base)
            if teacher is not None:
                store_frozen_in_fp8(teacher)
        if config.shard_base:  # after the adapters exist: they stay replicated, the frozen weights are split
            from .sharding import shard_frozen_base

            for network in (task.base, teacher):
                if network is not None and any(True for _ in network.parameters()):
                    shard_frozen_base(network, self.device)
        for role, params in method.setup(self.roles, task, config).items():
            self.roles.trainable.setdefault(role, []).extend(params)
        for params in self.roles.trainable.values():
            for p in params:
                p.data = p.data.float()  # fp32 master weights for what we train
        self.step = 0
        self.lr_anchor = (0, 0.0)  # see _lr_progress
        self.optimizers, self.schedulers = {}, {}
        for role, params in self.roles.trainable.items():
            lr = config.student_lr if role == "student" else config.critic_lr
            opt = make_optimizer(params, config, lr, simulate=dry_run)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda(role))
            self.optimizers[role] = self.accelerator.prepare_optimizer(opt)
            self.schedulers[role] = sched
        self.ema = ([p.detach().clone() for p in self.roles.trainable["student"]]
                    if config.ema_decay > 0 else None)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.last_checkpoint: Path | None = None

    def _lr_lambda(self, role: str):
        """Warm-up then constant or cosine, as a function of the *iteration* (not this role's updates)."""
        cfg = self.config
        warm = max(1, cfg.warmup_steps)

        def factor(_updates: int) -> float:
            it = self.step
            f = min(1.0, (it + 1) / warm)
            if cfg.lr_schedule == "cosine":
                f *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self._lr_progress(it)))
            return f

        return factor

    def _lr_progress(self, it: int, steps: int | None = None, anchor: tuple | None = None) -> float:
        """How far along the cosine iteration `it` is, 0..1. A run resumed with another `steps` goes on from
        the progress it had (the anchor: (iteration, progress) at the resume) to 1 at its new last step, so
        the learning rate does not jump: a finished run given more steps keeps its final rate."""
        steps = self.config.steps if steps is None else steps
        start, done = self.lr_anchor if anchor is None else anchor
        return min(1.0, max(0.0, done + (1.0 - done) * (it - start) / max(1, steps - start)))

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "trainable": {r: [p.detach().cpu().clone() for p in ps] for r, ps in self.roles.trainable.items()},
            "optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
            "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
            "ema": [t.cpu() for t in self.ema] if self.ema is not None else None,
            "rng": ckpt.rng_state(self.generator),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "config": asdict(self.config),
            "lr_anchor": list(self.lr_anchor),
            "method": self.method.name,
            "method_options": self._method_options(),
            "method_state": self.method.state_dict(),
        }

    # what a checkpoint's weights mean; resuming under other values would silently train something else
    STRUCTURAL = ("full_finetune", "lora_rank", "lora_alpha", "critic_rank", "lora_targets", "optimizer")

    def _method_options(self) -> dict:
        import dataclasses
        import json

        opt = getattr(self.method, "opt", None)
        return json.loads(json.dumps(dataclasses.asdict(opt), default=str)) if dataclasses.is_dataclass(opt) else {}

    def _check_same_run(self, state: dict, where) -> None:
        changed = [f"method {state.get('method')!r} -> {self.method.name!r}"] \
            if state.get("method") != self.method.name else []
        old_options = state.get("method_options")
        if old_options is not None:
            changed += [f"{k} {old_options.get(k)!r} -> {v!r}" for k, v in self._method_options().items()
                        if k in old_options and old_options[k] != v]
        old_config = state.get("config", {})
        changed += [f"{k} {old_config[k]!r} -> {getattr(self.config, k)!r}" for k in self.STRUCTURAL
                    if k in old_config and old_config[k] != getattr(self.config, k)]
        if changed:
            raise ValueError(f"run_dir {self.run_dir}: its checkpoint {where} is a different run ("
                             + "; ".join(changed) + "). Resume it with its own settings, or start over with a "
                             "new run_dir (--run-dir) or without resuming (--no-resume)")

    def load_state_dict(self, state: dict, where: str = "") -> None:
        self._check_same_run(state, where)
        for role, tensors in state["trainable"].items():
            for p, t in zip(self.roles.trainable[role], tensors):
                p.data.copy_(t.to(p.device))
        for role, s in state["optimizers"].items():
            self.optimizers[role].load_state_dict(s)
        for role, s in state["schedulers"].items():
            self.schedulers[role].load_state_dict(s)
        if self.ema is not None and state.get("ema") is not None:
            self.ema = [t.to(self.device) for t in state["ema"]]
        if state.get("scaler") and self.accelerator.scaler:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state.get("method_state", {}))
        ckpt.set_rng_state(state["rng"], self.generator)
        self.step = int(state["step"])
        anchor = tuple(state.get("lr_anchor", (0, 0.0)))
        old_steps = state.get("config", {}).get("steps", self.config.steps)
        if old_steps != self.config.steps:  # go on from the schedule's progress, not from where the new one is
            anchor = (self.step, self._lr_progress(self.step, old_steps, anchor))
        self.lr_anchor = (int(anchor[0]), float(anchor[1]))

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in run_dir, if any. Returns True if resumed."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            return False
        self.load_state_dict(ckpt.load_checkpoint(latest), where=latest.name)
        self.last_checkpoint = latest
        self._truncate_metrics(self.step)
        return True

    def save(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.state_dict(),
                                                    keep_last=self.config.keep_checkpoints)
        return self.last_checkpoint

    # --- metrics ----------------------------------------------------------------------------------
    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(record)

    # --- the loop ---------------------------------------------------------------------------------
    def _accumulate(self, role: str, ctx: StepContext, metrics: dict) -> float:
        """Forward/backward over the accumulation micro-batches; returns the mean loss."""
        cfg = self.config
        total = 0.0
        passes = cfg.passes()
        for micro in range(passes):
            if micro > 0:
                ctx.cache.clear()
            with self.accelerator.autocast():
                loss, extra = self.method.loss(role, ctx)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"step {self.step}: the {role} loss is {loss.item()}; the run stopped. The last good "
                    f"checkpoint is {self.last_checkpoint or 'none (no checkpoint was written yet)'}. "
                    f"Lower the learning rate, use bf16 instead of fp16, or lower grad_clip.")
            self.accelerator.backward(loss / passes)
            total += loss.item() / passes
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / passes
        return total

    def _update(self, role: str, ctx: StepContext) -> dict:
        cfg = self.config
        opt = self.optimizers[role]
        params = self.roles.trainable[role]
        metrics: dict = {}
        opt.zero_grad(set_to_none=True)
        # only this role's parameters collect gradients (SiD backpropagates through the critic's
        # activations during the student update; its weights must neither train nor cost memory)
        frozen = [p for r, ps in self.roles.trainable.items() if r != role for p in ps if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            total = self._accumulate(role, ctx, metrics)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        grad_norm = self.accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        self.schedulers[role].step()
        opt.zero_grad(set_to_none=True)
        metrics[f"loss/{role}"] = total
        metrics[f"grad_norm/{role}"] = float(grad_norm)
        metrics[f"lr/{role}"] = self.schedulers[role].get_last_lr()[0]
        if role == "student" and self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, params):
                    e.lerp_(p.detach(), 1 - cfg.ema_decay)
        return metrics

    def train(self, until: int | None = None) -> dict:
        """Train to config.steps (or stop early at iteration `until`, e.g. to evaluate in between)."""
        from tqdm.auto import tqdm

        cfg = self.config
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        start_step = self.step
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or not self.accelerator.is_main_process,
                   desc=f"{self.method.name}", unit="it", dynamic_ncols=True)
        t_last, steps_since = time.perf_counter(), 0
        while self.step < stop:
            ctx = StepContext(self.step, self.roles, self.task, cfg, self.generator, self.device,
                              batch=cfg.micro_batch_size)
            record: dict = {}
            try:
                for role in self.method.phases(self.step):
                    record.update(self._update(role, ctx))
            except torch.OutOfMemoryError as err:
                raise self._out_of_memory(err) from err
            self.step += 1
            steps_since += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                record.update(step=self.step, time=time.time(), it_per_s=steps_since / max(now - t_last, 1e-9),
                              mem_gb=_memory_gb(self.device))
                t_last, steps_since = now, 0
                self._log(record)
                bar.set_postfix({k.split("/")[-1][:1] + k.split("/")[0][:4]: f"{v:.3g}"
                                 for k, v in record.items() if k.startswith("loss/")})
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if cfg.preview_every and self.step % cfg.preview_every == 0 and (
                    self.accelerator.is_main_process or cfg.shard_base):  # a sharded base: every rank gathers
                self.preview()
        bar.close()
        if self.step == cfg.steps and self.step != start_step and (not self.last_checkpoint or not self.last_checkpoint.name.endswith(f"{self.step:08d}")):
            self.save()
        return {"step": self.step, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def _out_of_memory(self, err: BaseException) -> Exception:
        """A step ran out of memory: say what the run holds and what would make it fit (nothing is saved,
        so the last good checkpoint stays the one to resume from)."""
        from .memory import not_enough

        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        peak = f", peak {_memory_gb(self.device):.2f} GiB" if self.device.type == "cuda" else ""
        return not_enough(f"out of memory at step {self.step + 1} with batch_size={self.config.batch_size} on "
                          f"{self.device} ({self.memory_plan.describe()}{peak}; {str(err).splitlines()[0]})",
                          self.config, self.device, static_only=False)

    # --- using the student -------------------------------------------------------------------------
    def student_params_for_export(self):
        """The student's weights to export: the EMA if one is kept."""
        return self.ema if self.ema is not None else [p.detach() for p in self.roles.trainable["student"]]

    @torch.no_grad()
    def use_exported_student(self) -> None:
        """Make the live student the exported one (its EMA, if kept), to sample it as users will; training
        should not continue after this."""
        for p, e in zip(self.roles.trainable["student"], self.student_params_for_export()):
            p.copy_(e)

    @contextlib.contextmanager
    def exported_student(self):
        """The exported student (its EMA, if kept) live for the block, the trained weights back after it: to
        export or evaluate it in the middle of a run."""
        params = self.roles.trainable["student"]
        backup = [p.detach().clone() for p in params]
        self.use_exported_student()
        try:
            yield self.roles.student
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def preview(self) -> Path | None:
        """Sample the student with fixed noise into run_dir/previews (the main process's file; with a sharded
        base every process runs the sampler, since each layer's weights are gathered from all of them)."""
        import tempfile

        gen = torch.Generator().manual_seed(self.config.seed + 777)  # fixed: previews are comparable
        sigmas = self.method.student_sigmas(self.roles.student.schedule)
        if not self.accelerator.is_main_process:
            with tempfile.TemporaryDirectory() as scratch:
                self.task.preview(self.roles.student, sigmas, gen, Path(scratch) / "preview.png")
            return None
        previews = self.run_dir / "previews"
        previews.mkdir(exist_ok=True)
        path = previews / f"step-{self.step:08d}.png"
        self.task.preview(self.roles.student, sigmas, gen, path)
        return path
