"""Network definitions of the tiny image world: the teacher UNet config, the label "text encoder"
and the evaluator CNN."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NULL_LABEL = 10  # index of the empty / unconditional prompt
NUM_CLASSES = 10

# SD1.5's training noise schedule (epsilon prediction).
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
}

# diffusers.UNet2DConditionModel config. Laid out like a miniature SD1.5 UNet: 3 levels at
# 16x16 / 8x8 / 4x4, cross-attention transformers (attn1/attn2/ff, conv proj_in/proj_out as in
# SD1.5, i.e. use_linear_projection=False) at 8x8, 4x4 and in the mid block; plain ResNet blocks at
# the full resolution (where attention would cost the most CPU time).
# Note: as in SD1.5's config, ``attention_head_dim`` is diffusers' legacy name for the NUMBER of
# heads (4 heads -> head dims 12 / 24).
TEACHER_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 48, 96],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "use_linear_projection": False,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# The label "text encoder": a learned table, 11 rows (0..9 + NULL_LABEL), each row = L tokens of
# width D = cross_attention_dim, followed by a LayerNorm (like CLIP's final layer norm).
TEXT_ENCODER_CONFIG = {
    "num_embeddings": NUM_CLASSES + 1,
    "num_tokens": 4,
    "hidden_size": TEACHER_CONFIG["cross_attention_dim"],
}

EVALUATOR_CONFIG = {
    "channels": [32, 64],
    "feature_dim": 128,
    "num_classes": NUM_CLASSES,
    "dropout": 0.3,
}


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    cfg = dict(TEACHER_CONFIG if config is None else config)
    for k in ("down_block_types", "up_block_types", "block_out_channels"):
        cfg[k] = tuple(cfg[k])
    return UNet2DConditionModel(**cfg)


class LabelTextEncoder(nn.Module):
    """Maps integer labels ``[B]`` (0..9, or NULL_LABEL = 10 for the empty prompt) to
    ``encoder_hidden_states`` of shape ``[B, num_tokens, hidden_size]``."""

    def __init__(self, num_embeddings: int = 11, num_tokens: int = 4, hidden_size: int = 64):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.num_tokens = num_tokens
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(num_embeddings, num_tokens * hidden_size)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.final_layer_norm = nn.LayerNorm(hidden_size)

    @property
    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "num_tokens": self.num_tokens,
                "hidden_size": self.hidden_size}

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        h = self.embedding(labels).view(labels.shape[0], self.num_tokens, self.hidden_size)
        return self.final_layer_norm(h)


class DigitEvaluator(nn.Module):
    """Small CNN classifier on 16x16 digits in [-1, 1].

    conv3x3(1->32) ReLU conv3x3(32->32) ReLU maxpool -> conv3x3(32->64) ReLU conv3x3(64->64) ReLU
    maxpool -> flatten(64*4*4) -> Linear(1024->128) ReLU = ``features(x)`` -> dropout -> Linear(128->10).
    """

    def __init__(self, channels=(32, 64), feature_dim: int = 128, num_classes: int = 10,
                 dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(c2 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` (post-ReLU)."""
        if x.dim() == 3:
            x = x[:, None]
        h = self.conv(x)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def build_evaluator(config: dict | None = None) -> DigitEvaluator:
    cfg = dict(EVALUATOR_CONFIG if config is None else config)
    return DigitEvaluator(tuple(cfg["channels"]), cfg["feature_dim"], cfg["num_classes"], cfg["dropout"])
