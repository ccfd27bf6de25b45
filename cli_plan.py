"""`distillery plan`: will a distillation run fit on my card? An exact VRAM plan without a GPU.

    distillery plan --model sdxl --resolution 1024 --method dmd2
    distillery plan --model sdxl --vram 8GB --lora-targets attention --fp8-base
    distillery plan --model sdxl --vram 12GB --fit          # apply the cheapest change that fits, and plan it
    distillery plan --model path/to/diffusers_folder --method tcd --json

The plan is a dry run of one iteration of each kind the method has (DMD2: student + critic, critic only)
through the real trainer, on fake tensors (no weights, no GPU; trainers/planner.py says how CUDA's behaviour
is reproduced): the peak memory, what is alive at the peak (frozen weights, trainable weights, optimizer
state, gradients, activations, temporaries), the FLOPs per iteration and the time at a given MFU. The run
settings are `distillery train`'s flags with its defaults (batch size 4, rank 64, gradient checkpointing and
micro-batches of 1 for image-size networks), so what is planned is what `distillery train` with the same
flags would run.
"""

from __future__ import annotations

import argparse
import json
import sys

from .trainers import registry

# GPU peaks for the time estimate: dense bf16 tensor-core TFLOP/s
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM
DEFAULT_MFU = 0.4
# the plan's own flags (the rest are distillery train's settings and method options)
PLAN_KEYS = ("command", "model", "method", "resolution", "device", "base_dtype", "vram", "fit", "gpus", "peak_tflops",
             "mfu", "json", "png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_train import add_registry_arguments
    from .trainers.architectures import ARCHS

    names = registry.method_names()
    parser.add_argument("--model", required=True,
                        help=f"an architecture: {', '.join(ARCHS)} (tiny-<name> for their tiny twins), or a diffusers "
                             f"folder / its unet or transformer config.json")
    parser.add_argument("--method", default=None, help=f"{', '.join(names)} (default {registry.default_method()})")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training resolution in pixels (default: the model's own, 512 SD1.5, 1024 SDXL / SD3 / "
                             "Flux)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="plan a GPU run (CUDA's autocast lists, foreach AdamW; default) or a run on this CPU")
    parser.add_argument("--base-dtype", dest="base_dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the frozen base weights (default bf16, as the trainer loads them on a GPU)")
    parser.add_argument("--vram", default=None, help="the card's memory, e.g. 12GB: say whether the run fits and, if "
                                                     "not, the cheapest change that does (planned too)")
    parser.add_argument("--fit", action="store_true", help="with --vram: print the plan of the change that fits")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs of the run (accelerate launch --num_processes N): the plan is per GPU; with "
                             "--shard-base the frozen base is split over them")
    parser.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"the GPU's dense bf16 peak in TFLOP/s for the time estimate (default "
                             f"{DEFAULT_PEAK_TFLOPS:g}: H100 / H200; RTX 4090: 165, A100: 312)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilization assumed for the time estimate (default {DEFAULT_MFU})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--png", default=None, help="also draw the plan (what is alive at each peak) to this PNG file")
    add_registry_arguments(parser, "training settings (as distillery train)")


def resolve(args: argparse.Namespace) -> dict:
    """The plan's inputs from the flags: architecture, method and its options, training settings."""
    from .cli_train import split_settings
    from .trainers.architectures import ARCHS, arch_from_config, get_arch

    method = registry.get(args.method or registry.default_method()).name
    settings = {dest: value for dest, value in vars(args).items() if value is not None and dest not in PLAN_KEYS}
    train, options = split_settings(settings, method, device_type=args.device)
    key = str(args.model).strip().lower()
    arch = get_arch(key) if key in ARCHS or key.startswith("tiny-") else arch_from_config(args.model)
    return {"arch": arch, "method": method, "method_options": options, "train": train,
            "resolution": args.resolution or arch.resolution, "device": args.device,
            "base_dtype": args.base_dtype, "gpus": int(args.gpus)}


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def make_plan(inputs: dict, train_changes: dict | None = None):
    from .trainers.planner import plan

    return plan(inputs["arch"], inputs["method"], inputs["method_options"],
                train={**inputs["train"], **(train_changes or {})}, resolution=inputs["resolution"],
                device=inputs["device"], base_dtype=_dtype(inputs["base_dtype"]), gpus=inputs.get("gpus", 1))


def changes_to_try(settings: dict, device: str = "cuda", gpus: int = 1) -> list[tuple[str, dict]]:
    """Memory-saving changes, cheapest first (the first ones cost only time, the later ones some quality),
    each cumulative over the ones before, skipping what the run already does. `settings`: the run's
    resolved settings (a plan's, where "auto" is already made definite)."""
    steps, current = [], {}

    def add(text, **change):
        current.update(change)
        steps.append((text, dict(current)))

    if settings.get("gradient_checkpointing") != "on":
        add("gradient_checkpointing=on (--gradient-checkpointing on): recomputes activations, ~30% slower",
            gradient_checkpointing="on")
    if int(settings.get("micro_batch_size") or settings.get("batch_size", 1)) > 1:
        add("micro_batch_size=1 (--micro-batch-size 1): the same batch in passes of one sample, slower",
            micro_batch_size=1)
    if settings.get("mixed_precision") in ("no", "auto"):
        add("mixed_precision=bf16 (--mixed-precision bf16)", mixed_precision="bf16")
    if device == "cuda" and settings.get("foreach", True) and settings.get("optimizer", "adamw") == "adamw":
        add("foreach=false (--foreach false): AdamW without its full-size temporary, a little slower", foreach=False)
    if device == "cuda" and settings.get("optimizer", "adamw") == "adamw":
        add("optimizer=adamw8bit (--optimizer adamw8bit, needs bitsandbytes): 8-bit AdamW moments",
            optimizer="adamw8bit")
    if settings.get("ema_decay", 0) > 0:
        add("ema_decay=0 (--ema 0): no EMA copy of the student", ema_decay=0.0)
    if gpus > 1 and not settings.get("shard_base") and not settings.get("fp8_base") \
            and not settings.get("full_finetune"):
        add(f"shard_base=true (--shard-base): the frozen base split over the {gpus} GPUs (no quality cost)",
            shard_base=True)
    elif not settings.get("fp8_base") and not settings.get("full_finetune") and not settings.get("shard_base"):
        add("fp8_base=true (--fp8-base): the frozen base in fp8 (the teacher too: a small quality cost)",
            fp8_base=True)
    if settings.get("lora_targets", "all") != "attention" and not settings.get("full_finetune"):
        add("lora_targets=attention (--lora-targets attention): adapters on attention only (changes what the "
            "student can learn)", lora_targets="attention")
    rank = int(settings.get("lora_rank", 64))
    while rank > 8:
        rank //= 2
        add(f"lora_rank={rank} (--rank {rank}): a smaller adapter", lora_rank=rank)
    return steps


def find_fit(inputs: dict, first, vram: int):
    """The first of `changes_to_try` whose plan fits in `vram` bytes: (description, changes, plan), or None.
    A change whose weights and optimizer state alone (memory.py's arithmetic, a lower bound of the peak)
    exceed `vram` is skipped without a dry run."""
    from .trainers.planner import meta_network, static_bytes

    meta = meta_network(inputs["arch"])
    described = []
    gpus = inputs.get("gpus", 1)
    for text, changes in changes_to_try(first.settings, inputs["device"], gpus):
        described.append(text)
        if static_bytes(inputs["arch"], inputs["method"], inputs["method_options"],
                        {**inputs["train"], **changes}, inputs["device"], _dtype(inputs["base_dtype"]),
                        meta=meta, gpus=gpus) > vram:
            continue
        fitted = make_plan(inputs, changes)
        if fitted.fits(vram):
            return "; then ".join(described), changes, fitted
    return None


def run(args: argparse.Namespace) -> int:
    from .trainers.planner import GIB, parse_size

    inputs = resolve(args)
    vram = parse_size(args.vram) if args.vram else None
    if args.fit and vram is None:
        raise ValueError("--fit needs --vram, e.g. --vram 12GB")
    first = make_plan(inputs)
    out = first.to_json(args.peak_tflops, args.mfu)
    text = [first.table(args.peak_tflops, args.mfu)]
    if vram is not None:
        out["vram_bytes"] = vram
        out["fits"] = first.fits(vram)
        if first.fits(vram):
            text.append(f"\nFITS in {vram / GIB:.2f} GiB ({(vram - first.peak_bytes) / GIB:.2f} GiB to spare; "
                        f"allocator fragmentation and the CUDA context, ~0.3-1 GiB, are not counted)")
        else:
            found = find_fit(inputs, first, vram)
            if found is None:
                text.append(f"\nDOES NOT FIT in {vram / GIB:.2f} GiB, and no change the planner knows makes it fit")
                out["fit"] = None
            else:
                how, changes, fitted = found
                text.append(f"\nDOES NOT FIT in {vram / GIB:.2f} GiB (peak {first.peak_bytes / GIB:.2f} GiB). "
                            f"Cheapest change that fits (planned): {how} -> peak {fitted.peak_bytes / GIB:.2f} GiB")
                out["fit"] = {"changes": changes, "how": how, "peak_bytes": fitted.peak_bytes,
                              "plan": fitted.to_json(args.peak_tflops, args.mfu) if args.fit else None}
                if args.fit:
                    text.append("\n" + fitted.table(args.peak_tflops, args.mfu))
    if args.png:
        from .plan_chart import render

        shown = out["fit"]["plan"] if args.fit and out.get("fit") else out
        render(shown, vram).save(args.png)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    else:
        print("\n".join(text))
    return 0


def main(argv=None) -> int:  # pragma: no cover - `python -m comfyui_distillery.cli_plan`
    parser = argparse.ArgumentParser(prog="distillery plan")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
