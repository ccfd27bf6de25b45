"""Which LoRA files are distilled students, and how to sample them: from the safetensors header alone.

A student carries its card (trainers/card.py) in the safetensors metadata. Reading it needs only the file's
JSON header (the first few KB), so listing every LoRA in models/loras is cheap; results are cached by
(path, size, mtime).
"""

from __future__ import annotations

import os

from ..comfy_backend import safetensors_header
from ..trainers.card import StudentCard

_CACHE: dict[str, tuple[tuple, StudentCard | None]] = {}


def safetensors_metadata(path) -> dict[str, str]:
    """The __metadata__ of a .safetensors file as written: string values ({} if none). The header is read and
    checked by comfy_backend.safetensors_header (ValueError for a file that is not safetensors)."""
    meta = safetensors_header(path).get("__metadata__") or {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def student_card(path) -> StudentCard | None:
    """The student card if `path` is a distilled student, else None (cached by size and time)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_size, st.st_mtime_ns)
    cached = _CACHE.get(path)
    if cached and cached[0] == key:
        return cached[1]
    try:
        card = StudentCard.from_metadata(safetensors_metadata(path))
    except (OSError, ValueError, TypeError):
        card = None
    _CACHE[path] = (key, card)
    return card
