"""The tiny image world: an offline test world for diffusion distillation.

A ~2.4M-parameter class-conditional diffusers ``UNet2DConditionModel`` (cross-attention, epsilon
prediction, SD1.5's scaled-linear noise schedule) trained on scikit-learn's 8x8 digits upsampled to
16x16 (1 channel, [-1, 1]), a learned label "text encoder" (label 0..9, ``NULL_LABEL`` = 10 = empty
prompt -> ``encoder_hidden_states [B, 4, 64]``), and an evaluator CNN for Fréchet distance,
conditioning accuracy, per-class diversity and recall. Weights ship in ``weights/``; reproduce them
with ``python -m comfyui_distillery.worlds.digits.train``.
"""

from .data import N_TEST, N_TRAIN, SPLIT_SEED, load_digits_16
from .load import WEIGHTS_DIR, load_evaluator, load_metadata, load_teacher
from .metrics import compute_features, evaluate_samples, frechet_distance
from .models import (
    EVALUATOR_CONFIG,
    NOISE_SCHEDULE,
    NULL_LABEL,
    TEACHER_CONFIG,
    TEXT_ENCODER_CONFIG,
    DigitEvaluator,
    LabelTextEncoder,
)
from .sample import (
    DDIM_CONFIG,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    class_major_labels,
    encode_labels,
    image_grid,
    make_ddim_scheduler,
    make_train_scheduler,
    sample_teacher,
)

__all__ = [
    "DDIM_CONFIG",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "EVALUATOR_CONFIG",
    "NOISE_SCHEDULE",
    "NULL_LABEL",
    "N_TEST",
    "N_TRAIN",
    "SPLIT_SEED",
    "TEACHER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "WEIGHTS_DIR",
    "DigitEvaluator",
    "LabelTextEncoder",
    "class_major_labels",
    "compute_features",
    "encode_labels",
    "evaluate_samples",
    "frechet_distance",
    "image_grid",
    "load_digits_16",
    "load_evaluator",
    "load_metadata",
    "load_teacher",
    "make_ddim_scheduler",
    "make_train_scheduler",
    "sample_teacher",
]
