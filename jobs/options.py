"""What a ComfyUI user types, checked at the server's edge: file names confined to ComfyUI's folders,
prompts, the output name, and the run spec a job is made of. Pure Python (no ComfyUI import).

In the server a user-named path may only lead inside the folder it belongs to (prompts files and real
images: ComfyUI's input folder; the student: models/loras), the way ComfyUI's own nodes treat files. An
absolute path or one that climbs out with '..' (or through a link) is refused with the rule, and the
error never says whether something exists outside. The CLI, on the user's own machine, takes any path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..trainers.spec import DataSpec, OutputSpec, RunSpec, TeacherSpec, parse_prompts  # noqa: F401

LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,100}$")
MAX_PROMPTS_BYTES = 20_000_000


def confined_path(path: str, base_dir: str, field: str, folder_name: str = "ComfyUI's input folder") -> Path:
    """`path` (relative) resolved inside `base_dir`; ValueError naming the field and the rule otherwise."""
    text = (path or "").strip().strip('"').strip("'")
    rule = (f"{field}={text!r}: give a path relative to {folder_name} (e.g. my_prompts.txt or "
            f"folder/my_prompts.txt); absolute paths and '..' are not allowed in the server")
    if not text or os.path.isabs(text) or text.startswith("~") or re.match(r"^[A-Za-z]:", text) or \
            ".." in re.split(r"[\\/]", text):
        raise ValueError(rule)
    base = Path(base_dir).resolve()
    resolved = (base / text).resolve()
    if resolved != base and base not in resolved.parents:  # a link that leads out
        raise ValueError(rule)
    return resolved


def read_prompts_file(path: str, input_dir: str) -> str:
    """The text of a prompts file inside ComfyUI's input folder ('' when no file is named)."""
    if not (path or "").strip():
        return ""
    resolved = confined_path(path, input_dir, "prompts_file")
    if not resolved.is_file():
        raise ValueError(f"prompts_file={path.strip()!r}: no such file in ComfyUI's input folder; put the text "
                         f"file there (one prompt per line)")
    if resolved.stat().st_size > MAX_PROMPTS_BYTES:
        raise ValueError(f"prompts_file={path.strip()!r} is larger than 20 MB; use one prompt per line")
    try:
        return resolved.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompts_file={path.strip()!r}: not UTF-8 text; save it as a plain UTF-8 text file") \
            from None


def resolve_images_folder(path: str, input_dir: str, field: str = "real_images_folder") -> str | None:
    """A folder of real images inside ComfyUI's input folder; None when none is named."""
    if not (path or "").strip():
        return None
    resolved = confined_path(path, input_dir, field)
    if not resolved.is_dir():
        raise ValueError(f"{field}={path.strip()!r}: no such folder in ComfyUI's input folder; put your images "
                         f"in a folder there")
    return str(resolved)


def folder_signature(folder: str) -> str:
    """Names, sizes and times of a folder's files: a job trains anew when the images change."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def check_lora_name(name: str) -> str:
    """A file name for models/loras/ (".safetensors" is appended when missing)."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not LORA_NAME.match(name) or ".." in name:
        raise ValueError(f"lora_name={name!r}: use letters, digits, spaces, '-', '_' and '.', "
                         f"no folders (it is written into models/loras/)")
    return name + ".safetensors"


def fingerprint(config: dict) -> str:
    """The fingerprint of a job's config (a run spec's dict)."""
    return RunSpec.from_dict(config).fingerprint()
