"""Fixtures for integration tests against a real ComfyUI server.

Set ``COMFYUI_DIR`` to a ComfyUI checkout (its interpreter: ``COMFYUI_PYTHON``, else
``<checkout>/venv/bin/python``); without it every test here is skipped. The session starts one
server with this repository linked as ``custom_nodes/ComfyUI-Distillery`` and a tiny random
SD1.5-shaped checkpoint (``tiny_sd15.safetensors``) in its ``models/checkpoints``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PACK_FOLDER = "ComfyUI-Distillery"

if str(HERE) not in sys.path:  # --import-mode=importlib: make the harness importable as a module
    sys.path.insert(0, str(HERE))

import comfy_harness  # noqa: E402

SKIP_REASON = "set COMFYUI_DIR to a ComfyUI checkout to run integration tests"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    path = comfy_harness.comfy_dir()
    if path is None:
        pytest.skip(SKIP_REASON)
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={path} is not a ComfyUI checkout (no main.py)")
    return path


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint, built once and cached (comfy_harness.test_model_cache; each test server links it)."""
    cache_dir = comfy_harness.test_model_cache(tmp_path_factory)
    return comfy_harness.make_tiny_sd15_checkpoint(comfy_dir, cache_dir / comfy_harness.TINY_SD15_NAME)


@pytest.fixture(scope="session")
def comfy(comfy_dir, tiny_sd15_checkpoint, tmp_path_factory):
    """A running ComfyServer with this pack and the tiny checkpoint."""
    base = tmp_path_factory.mktemp("comfy_base")
    server = comfy_harness.ComfyServer(
        comfy_dir, base_dir=base,
        custom_nodes=[(PACK_FOLDER, REPO_ROOT)],
        models={"checkpoints": [tiny_sd15_checkpoint]},
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "120")),
    )
    with server:
        yield server
