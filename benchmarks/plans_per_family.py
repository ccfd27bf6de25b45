"""What each family needs: `distillery plan` for every row of README's "What each family needs" table.

    python benchmarks/plans_per_family.py                    # every row not in the results file yet
    python benchmarks/plans_per_family.py --only flux-defaults flux-gpus2-shard --redo

Each row is one `distillery plan ... --json` command (DMD2, rank 64, bf16 base, planned for CUDA: the CLI's
defaults), run one at a time with one thread; its JSON is stored under the row's name, with the command, in
benchmarks/results/plans_per_family.json (written after every row, so a long series can stop and resume). The
SD1.5 / SDXL / SD3-medium defaults and --low-vram rows are docs/vram_planner.md's; only their per-GPU rows are
planned here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "plans_per_family.json"

ROWS = {
    "flux-defaults": "distillery plan --model flux --method dmd2 --json",
    "flux-low-vram": "distillery plan --model flux --method dmd2 --low-vram --json",
    "flux-gpus2-shard": "distillery plan --model flux --method dmd2 --gpus 2 --shard-base --json",
    "flux-gpus4-shard": "distillery plan --model flux --method dmd2 --gpus 4 --shard-base --json",
    "sd15-gpus2-shard": "distillery plan --model sd15 --method dmd2 --gpus 2 --shard-base --json",
    "sdxl-gpus2-shard": "distillery plan --model sdxl --resolution 1024 --method dmd2 --gpus 2 --shard-base --json",
    "sd3m-gpus2-shard": "distillery plan --model sd3m --method dmd2 --gpus 2 --shard-base --json",
}


def run_row(command: str) -> dict:
    args = shlex.split(command)
    exe = Path(sys.executable).with_name("distillery")
    args = [str(exe) if exe.exists() else args[0], *args[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    plan = json.loads(done.stdout[done.stdout.index("{"):])
    return {"command": command, "wall_s": round(time.perf_counter() - started, 1), "plan": plan}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(ROWS), help="these rows (default: all)")
    parser.add_argument("--redo", action="store_true", help="plan rows already in the results file again")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.only or list(ROWS):
        if name in results and not args.redo:
            continue
        print(f"{name}: {ROWS[name]}", flush=True)
        results[name] = run_row(ROWS[name])
        plan = results[name]["plan"]
        print(f"  peak {plan['peak_gib']:.2f} GiB at {plan['peak_at']} ({results[name]['wall_s']} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
