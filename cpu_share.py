"""How many CPU threads torch should use: one per core that no other process is busy on.

torch's OpenMP pool takes every core by default and its threads spin while they wait for each other. When
another process keeps a core busy, each parallel region then waits for the thread that lost its core:
`distillery demo` went from ~1.3 it/s to 13-27 s/it on a 2-core machine with one core busy. So the command
line measures the cores' recent use (/proc/stat over a fifth of a second, Linux) and starts torch with the
idle ones only, with OpenMP's passive wait so that a core taken later costs its share and no more.
Set OMP_NUM_THREADS to choose yourself.
"""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores together, from /proc/stat's first line."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def idle_cores(window: float = 0.2) -> int:
    """Cores of this process's affinity set that were idle over `window` seconds (all of them if unknown)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    first = _cpu_times()
    if first is None:
        return cores
    time.sleep(window)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return cores
    machine = os.cpu_count() or cores
    busy_cores = busy / total * machine  # cores' worth of work other processes did
    return max(1, min(cores, round(cores - busy_cores)))


def share_the_cpu() -> int | None:
    """Before torch is imported: passive OpenMP waits, and torch's threads set to the idle cores. Returns the
    thread count chosen (None when the user set OMP_NUM_THREADS)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = idle_cores()
    import torch

    torch.set_num_threads(threads)
    return threads
