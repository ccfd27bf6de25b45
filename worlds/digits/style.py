"""LoRAs made on the digits teacher, and the measures of what they do: the control-transfer experiments.

Two kinds of LoRA, each fine-tuned on the shipped teacher with its own denoising loss
(eps-MSE at a uniform timestep, SD1.5's training schedule, 10% empty prompts as the teacher was trained):

* a **style** LoRA: the training digits drawn bolder (`bold`: grayscale dilation with the 3 x 3 plus-shaped
  element, which takes the training set's mean ink from 0.305 to 0.436 and keeps every digit legible);
  measured by `ink` (the mean pixel intensity in [0, 1] per sample: how much of the image is stroke);
* a **class** LoRA: the prompt "3" draws 8s (`relabelled`: the 3s of the training split are replaced by its
  8s labelled 3); measured by `drawn_as` (the share of samples the evaluator calls 8).

Exported in kohya format on diffusers module names (trainers/lora.py), the same files ComfyUI's LoraLoader
reads; `trainers.lora.merged_kohya_unet_lora` applies one to a network at a strength.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import load_digits_16
from .models import NULL_LABEL

STYLE_SOURCE, STYLE_TARGET = 3, 8  # the class LoRA: the prompt "3" draws 8s
P_UNCOND = 0.1  # share of empty prompts while fine-tuning: CFG needs the unconditional branch styled too


def bold(images: torch.Tensor) -> torch.Tensor:
    """Grayscale dilation with the plus-shaped 3 x 3 element (the pixel and its 4 neighbours, background -1
    outside): every stroke about one pixel wider, the digit's shape unchanged."""
    p = F.pad(images, (1, 1, 1, 1), value=-1.0)
    return torch.stack([p[..., 1:-1, 1:-1], p[..., :-2, 1:-1], p[..., 2:, 1:-1],
                        p[..., 1:-1, :-2], p[..., 1:-1, 2:]]).amax(0)


def ink(images: torch.Tensor) -> torch.Tensor:
    """Ink mass per image: the mean of (x + 1) / 2 over its pixels (0 = empty, 1 = all stroke) -> [N]."""
    return ((images.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def drawn_as(images: torch.Tensor, target: int = STYLE_TARGET, evaluator=None) -> float:
    """Share of `images` the digits evaluator classifies as `target`."""
    from .metrics import compute_features

    _, logits = compute_features(images, evaluator)
    return float((logits.argmax(1) == target).double().mean())


def relabelled(images: torch.Tensor, labels: torch.Tensor, source: int = STYLE_SOURCE,
               target: int = STYLE_TARGET) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set of the class LoRA: the `source` digits replaced by the `target` digits, labelled `source`
    (the `target` digits keep their own label too)."""
    keep = labels != source
    moved = labels == target
    return (torch.cat([images[keep], images[moved]]),
            torch.cat([labels[keep], torch.full((int(moved.sum()),), source, dtype=labels.dtype)]))


def style_data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training data of a LoRA kind: "bold" (the style) or "3->8" (the class)."""
    images, labels = load_digits_16("train")
    if kind == "bold":
        return bold(images), labels
    if kind == "3->8":
        return relabelled(images, labels)
    raise ValueError(f"kind={kind!r}: bold or 3->8")


def train_lora(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 300, batch: int = 32, rank: int = 8,
               lr: float = 1e-3, seed: int = 0, progress=None) -> tuple[dict, list]:
    """Fine-tune a LoRA on the shipped teacher with the plain denoising loss; returns (kohya state, losses).

    loss = E_{x0, c, t, eps} || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) - eps ||^2
    (DDPM, Ho et al. 2020, Eq. 14), c the empty prompt with probability P_UNCOND.
    """
    from ...trainers.lora import UNET_TARGET_MODULES, add_lora_adapter, kohya_unet_state_dict, set_role
    from .load import load_teacher
    from .sample import encode_labels, make_train_scheduler

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the adapter's initial A matrices
    unet, text_encoder = load_teacher()
    add_lora_adapter(unet, "style", rank, target_modules=UNET_TARGET_MODULES)
    set_role(unet, "style")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    abar = make_train_scheduler().alphas_cumprod.float()
    losses = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0, c = images[idx], labels[idx].clone()
        c[torch.rand(batch, generator=gen) < P_UNCOND] = NULL_LABEL
        t = torch.randint(0, len(abar), (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            ctx = encode_labels(text_encoder, c)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, float(loss))
    unet.eval()
    return kohya_unet_state_dict(unet, "style"), losses


__all__ = ["STYLE_SOURCE", "STYLE_TARGET", "bold", "drawn_as", "ink", "relabelled", "style_data", "train_lora"]
