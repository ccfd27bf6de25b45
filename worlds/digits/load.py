"""Loading the shipped (or re-trained) weights of the tiny image world."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import (
    EVALUATOR_CONFIG,
    TEACHER_CONFIG,
    TEXT_ENCODER_CONFIG,
    LabelTextEncoder,
    build_evaluator,
    build_unet,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_UNET_FILE = "teacher_unet.safetensors"
TEXT_ENCODER_FILE = "teacher_text_encoder.safetensors"
EVALUATOR_FILE = "evaluator.safetensors"
META_FILE = "digits_world.json"


def _dir(weights_dir) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def _load_sd(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; run `python -m comfyui_distillery.worlds.digits.train` to create it"
        )
    return load_file(str(path))


def load_metadata(weights_dir=None) -> dict:
    """The JSON written by the training script (configs, hyper-parameters, split seed, metrics)."""
    with open(_dir(weights_dir) / META_FILE, encoding="utf-8") as f:
        return json.load(f)


def load_teacher(device="cpu", dtype=torch.float32, weights_dir=None):
    """Return ``(unet, text_encoder)``: the diffusers ``UNet2DConditionModel`` (``TEACHER_CONFIG``,
    epsilon prediction, SD1.5 noise schedule; EMA weights) and the ``LabelTextEncoder``.

    Both are in eval mode with ``requires_grad`` off (a frozen teacher); call
    ``.requires_grad_(True)`` / ``.train()`` to fine-tune. Use ``encode_labels`` for the
    conditioning tensor."""
    d = _dir(weights_dir)
    unet = build_unet(TEACHER_CONFIG)
    unet.load_state_dict(_load_sd(d / TEACHER_UNET_FILE), strict=True)
    te = LabelTextEncoder(**TEXT_ENCODER_CONFIG)
    te.load_state_dict(_load_sd(d / TEXT_ENCODER_FILE), strict=True)
    for m in (unet, te):
        m.to(device)
        if dtype != torch.float32:  # (diffusers warns on every .to(dtype) call, so only when needed)
            m.to(dtype=dtype)
        m.eval().requires_grad_(False)
    return unet, te


def load_evaluator(device="cpu", weights_dir=None):
    """Return the frozen evaluator CNN (``DigitEvaluator``, eval mode, float32)."""
    ev = build_evaluator(EVALUATOR_CONFIG)
    ev.load_state_dict(_load_sd(_dir(weights_dir) / EVALUATOR_FILE), strict=True)
    return ev.to(device).eval().requires_grad_(False)
