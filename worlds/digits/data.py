"""Deterministic data for the tiny image world: scikit-learn's 8x8 digits upsampled to 16x16.

``sklearn.datasets.load_digits`` ships inside scikit-learn (no download). The 1797 images (values
0..16) are mapped to [-1, 1], upsampled to 16x16 with ``torch.nn.functional.interpolate``
(bilinear, ``align_corners=False``, ``antialias=False``) and split with a fixed permutation
(``numpy.random.RandomState(SPLIT_SEED).permutation``, stable across numpy versions) into the first
``N_TRAIN`` = 1500 images (train) and the remaining 297 (test).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 20240611
N_TRAIN = 1500
N_TOTAL = 1797
N_TEST = N_TOTAL - N_TRAIN
IMAGE_SIZE = 16
NUM_CLASSES = 10

SPLITS = ("train", "test", "all")

DATA_INFO = {
    "source": "sklearn.datasets.load_digits (1797 8x8 images, values 0..16)",
    "scaling": "x / 16 * 2 - 1 -> [-1, 1]",
    "upsampling": "torch.nn.functional.interpolate(size=16, mode='bilinear', align_corners=False, antialias=False)",
    "split": "numpy.random.RandomState(split_seed).permutation(1797); first n_train = train, rest = test",
    "split_seed": SPLIT_SEED,
    "n_train": N_TRAIN,
    "n_test": N_TEST,
}


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits world needs scikit-learn for its data "
            "(pip install scikit-learn; a dependency of comfyui-distillery)."
        ) from e
    digits = load_digits()
    x8 = torch.from_numpy(np.asarray(digits.images, dtype=np.float32))  # [1797, 8, 8], 0..16
    y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    if x8.shape[0] != N_TOTAL:  # pragma: no cover
        raise RuntimeError(f"expected {N_TOTAL} digits, got {x8.shape[0]}")
    x8 = x8 / 16.0 * 2.0 - 1.0
    x16 = F.interpolate(
        x8[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=False
    )
    perm = np.random.RandomState(SPLIT_SEED).permutation(N_TOTAL)
    return x16.contiguous(), y, perm


def load_digits_16(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split.

    images: float32 ``[N, 1, 16, 16]`` in [-1, 1]; labels: int64 ``[N]`` in 0..9.
    ``split`` is ``"train"`` (1500), ``"test"`` (297) or ``"all"`` (1797, original order).
    Fresh tensors are returned on every call (safe to modify).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    x, y, perm = _load_all()
    if split == "all":
        return x.clone(), y.clone()
    idx = torch.from_numpy(perm[:N_TRAIN] if split == "train" else perm[N_TRAIN:])
    return x[idx].clone(), y[idx].clone()


def random_shift(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                 max_shift: int = 1, vertical: bool = False) -> torch.Tensor:
    """Augmentation: with probability ``p`` shift each image by +-``max_shift`` px horizontally
    (and vertically if ``vertical``), filling with the background value -1. No flips."""
    b = x.shape[0]
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    shift = torch.randint(-m, m + 1, (b, 2), generator=generator)
    keep = torch.rand(b, generator=generator) >= p
    shift[keep] = 0
    if not vertical:
        shift[:, 1] = 0
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(b):
        dx, dy = int(shift[i, 0]), int(shift[i, 1])
        out[i] = padded[i, :, m + dy : m + dy + h, m + dx : m + dx + w]
    return out
