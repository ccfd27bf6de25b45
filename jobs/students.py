"""Which LoRA files are distilled students, and how to sample them: from the safetensors header alone.

A student carries `distillery.*` metadata (trainers/api.py student_metadata): method, sampler, timesteps,
gamma, cfg, base model hash. Reading it needs only the file's JSON header (the first few KB), so listing
every LoRA in models/loras is cheap; results are cached by (path, size, mtime).
"""

from __future__ import annotations

import json
import os
import struct

MAX_HEADER = 100 * 1024 * 1024
_CACHE: dict[str, tuple[tuple, dict]] = {}


def safetensors_metadata(path) -> dict:
    """The __metadata__ of a .safetensors file, values JSON-decoded where they are JSON ({} if none)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    meta = header.get("__metadata__") or {}
    out = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def student_metadata(path) -> dict | None:
    """The distillery.* metadata if `path` is a distilled student, else None (cached)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_size, st.st_mtime_ns)
    cached = _CACHE.get(path)
    if cached and cached[0] == key:
        return cached[1] or None
    try:
        meta = safetensors_metadata(path)
    except (OSError, ValueError):
        meta = {}
    student = {k: v for k, v in meta.items() if k.startswith("distillery.")}
    if "distillery.method" not in student:
        student = {}
    _CACHE[path] = (key, student)
    return student or None


def sampler_choice(meta: dict) -> tuple[str, dict]:
    """(sampler name in sampling.SAMPLERS, its options) recommended by a student's metadata."""
    name = meta.get("distillery.sampler") or "x0_renoise"
    if name == "tcd":
        gamma = meta.get("distillery.gamma")
        return "tcd", {"gamma": float(gamma if gamma is not None else 0.3)}
    if name == "x0_renoise":
        return "x0_renoise", {"lcm_boundary": False}
    if name == "ddim":
        return "ddim", {}
    raise ValueError(f"the student's metadata names sampler {name!r}, which this version does not know")


def recommended_timesteps(meta: dict) -> list:
    steps = meta.get("distillery.timesteps")
    if isinstance(steps, str):
        steps = [float(s) for s in steps.replace("[", "").replace("]", "").split(",") if s.strip()]
    if not steps:
        raise ValueError("the student's metadata has no distillery.timesteps")
    return [int(s) if float(s).is_integer() else float(s) for s in steps]
