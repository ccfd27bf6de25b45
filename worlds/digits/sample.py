"""Reference sampling of the digits teacher (DDIM + classifier-free guidance) and image grids."""

from __future__ import annotations

from typing import Sequence

import torch

from .models import NOISE_SCHEDULE, NULL_LABEL

# Reference sampler used for the recorded quality numbers: diffusers DDIMScheduler with the
# teacher's betas, "trailing" timestep spacing (the first step is t=999), eta=0,
# set_alpha_to_one=True (the last step returns the x0 prediction), no x0 clipping (as SD1.5).
DDIM_CONFIG = {
    **{k: v for k, v in NOISE_SCHEDULE.items()},
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": False,
}
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 2.0  # CFG: eps = uncond + g * (cond - uncond)


def make_train_scheduler():
    """The training (forward-process) scheduler: SD1.5's DDPMScheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE)


def make_ddim_scheduler(**overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**DDIM_CONFIG, **overrides})


def _as_labels(labels, device) -> torch.Tensor:
    if isinstance(labels, int):
        labels = [labels]
    t = torch.as_tensor(labels, dtype=torch.long)
    if t.dim() != 1:
        t = t.reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > NULL_LABEL):
        raise ValueError(f"labels must be in 0..{NULL_LABEL} ({NULL_LABEL} = unconditional)")
    return t.to(device)


def encode_labels(text_encoder, labels) -> torch.Tensor:
    """Labels (int, list, or LongTensor ``[B]``; ``NULL_LABEL`` = 10 = empty prompt) ->
    ``encoder_hidden_states`` ``[B, L, D]`` on the encoder's device and dtype."""
    p = next(text_encoder.parameters())
    return text_encoder(_as_labels(labels, p.device))


@torch.no_grad()
def sample_teacher(
    unet,
    text_encoder,
    labels,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    generator: torch.Generator | int | None = None,
    scheduler=None,
    eta: float = 0.0,
    batch_size: int = 500,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample ``len(labels)`` images with DDIM (``DDIM_CONFIG`` unless ``scheduler`` is given) and
    classifier-free guidance; returns float32 ``[N, 1, 16, 16]`` clamped to [-1, 1] on the CPU.

    ``generator``: a CPU ``torch.Generator`` or an int seed for the initial noise (drawn on the
    CPU in one go, so results do not depend on ``batch_size``). ``guidance_scale`` 1 disables CFG.
    """
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    labels = _as_labels(labels, "cpu")
    n = labels.shape[0]
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    cfg = unet.config
    shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator)
    sched = scheduler if scheduler is not None else make_ddim_scheduler()
    sched.set_timesteps(num_inference_steps)
    outs = []
    iterator = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling", leave=False)
    for s in iterator:
        lab = labels[s : s + batch_size].to(device)
        b = lab.shape[0]
        x = noise[s : s + batch_size].to(device=device, dtype=dtype) * sched.init_noise_sigma
        use_cfg = guidance_scale != 1.0
        cond = encode_labels(text_encoder, lab).to(dtype)
        if use_cfg:
            uncond = encode_labels(text_encoder, torch.full_like(lab, NULL_LABEL)).to(dtype)
            ctx = torch.cat([uncond, cond])
        else:
            ctx = cond
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if use_cfg else x
            xin = sched.scale_model_input(xin, t)
            eps = unet(xin, t, encoder_hidden_states=ctx).sample
            if use_cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
        outs.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(outs) if outs else torch.empty(shape)


def image_grid(images, nrow: int = 8, scale: int = 4, padding: int = 1, pad_value: float = 0.0):
    """Tile images ``[N, 1|3, H, W]`` (or ``[N, H, W]``) in [-1, 1] into a PIL image, ``nrow``
    images per row, upscaled ``scale`` x with nearest-neighbour so 16x16 digits are visible.
    ``pad_value`` is the gap colour in [0, 1] (0 = black, like the digit background)."""
    from PIL import Image

    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"expected [N, C, H, W] images, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    x = ((x.clamp(-1, 1) + 1) / 2)
    nrow = max(1, min(nrow, n)) if n else 1
    ncol = (n + nrow - 1) // nrow if n else 1
    gh, gw = ncol * (h + padding) + padding, nrow * (w + padding) + padding
    grid = torch.full((c, gh, gw), float(pad_value))
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y0 : y0 + h, x0 : x0 + w] = x[i]
    arr = (grid * 255).round().to(torch.uint8)
    if c == 1:
        img = Image.fromarray(arr[0].numpy())
    else:
        img = Image.fromarray(arr.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((gw * scale, gh * scale), Image.NEAREST)
    return img


def class_major_labels(per_class: int, classes: Sequence[int] = range(10)) -> torch.Tensor:
    """``[0]*per_class + [1]*per_class + ...`` (the layout of a class-per-row grid)."""
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
