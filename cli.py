"""`distillery`: the command line. Each subcommand lives next to the code it drives.

    distillery demo      distill the embedded tiny image world and write a comparison grid
    distillery sample    sample a model (or a distilled student) with the exact few-step samplers
    distillery train     distill a model into a few-step LoRA student (DMD2, SiD, TCD)
    distillery plan      will a run fit on my card? its exact peak VRAM, FLOPs and time, without a GPU
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "demo": (".demo", "distill the embedded tiny image world; write a grid PNG and a metrics table"),
    "sample": (".cli_sample", "sample a diffusers model or the tiny image world with few-step samplers"),
    "train": (".cli_train", "distill a model into a few-step LoRA student"),
    "plan": (".cli_plan", "plan a run's peak GPU memory (per phase), FLOPs and time, without a GPU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name, __package__)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(__package__ or "comfyui_distillery"):
                continue  # subcommand not built yet
            raise
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .cpu_share import share_the_cpu

    share_the_cpu()  # before torch starts its threads
    from .trainers.memory import NotEnoughMemory

    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0], __package__)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, NotEnoughMemory) as err:  # bad input: one clear line, no traceback
        print(f"distillery {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
