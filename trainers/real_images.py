"""A folder of the user's own images: the real data of the diffusion-GAN term (DMD2 Sec. 4.3, few-step SiD)
and TCD's training data.

Every image is checked when the task is built, before any model loads, so a bad file is named at once.
Images are resized so the short side is the training resolution and center-cropped (the usual Stable
Diffusion fine-tuning crop), then encoded once by the model's own VAE,

    z = scaling_factor * (E(x).mean - shift_factor),     x in [-1, 1]

(the posterior mean, so the cache is deterministic); the VAE is freed before training. A caption beside an image (`cat.png` -> `cat.txt`, the
kohya / dataset-folder convention) conditions the critic on it; an image without one gets the
unconditional embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.models import map_cond

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder, field: str = "real_images") -> list[Path]:
    """The folder's image files (sorted), each checked to be a readable image."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{field}={str(folder)!r} is not a folder; give a folder of images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{field}={str(folder)!r} has no images; put {', '.join(IMAGE_EXTENSIONS)} files in it")
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()  # reads the whole file's structure without decoding the pixels
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{field}: {path.name} is not a readable image ({err}); fix or remove it") from None
    return paths


def read_caption(path: Path) -> str | None:
    text_path = path.with_suffix(".txt")
    if not text_path.is_file():
        return None
    try:
        caption = text_path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"real_images: {text_path.name} is not UTF-8 text; save the caption as UTF-8") from None
    return caption or None


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """[3, resolution, resolution] in [-1, 1]: short side resized to `resolution`, then center-cropped."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_images(vae, paths: list[Path], resolution: int, device, progress: bool = True) -> torch.Tensor:
    """Latents [N, C, h, w] (float32, on the CPU) of the images, one at a time (flat memory at any size)."""
    from tqdm.auto import tqdm

    config = vae.config
    scaling = float(config.scaling_factor)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    dtype = next(vae.parameters()).dtype
    latents = []
    for path in tqdm(paths, desc="encoding real images", disable=not progress, unit="img"):
        x = load_image(path, resolution).unsqueeze(0).to(device, dtype)
        z = vae.encode(x).latent_dist.mean
        latents.append(((z.float() - shift) * scaling).cpu())
    return torch.cat(latents)


class ImageBank:
    """Encoded real images with their conditioning; draws random (latents, cond) batches.

    `cond_bank` holds one row per distinct caption plus, last, the unconditional embedding; `cond_index`
    says which row each image uses (so N images share K << N text embeddings)."""

    def __init__(self, latents: torch.Tensor, cond_bank, cond_index: torch.Tensor):
        if len(latents) != len(cond_index):
            raise ValueError(f"{len(latents)} latents but {len(cond_index)} conditioning indices")
        self.latents, self.cond_bank, self.cond_index = latents, cond_bank, cond_index

    def __len__(self) -> int:
        return len(self.latents)

    def __call__(self, batch: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.latents), (batch,), generator=generator)
        rows = self.cond_index[idx]
        return self.latents[idx], map_cond(lambda c: c[rows], self.cond_bank)


def caption_rows(captions: list[str | None]) -> tuple[list[str], torch.Tensor]:
    """(distinct captions to encode, each image's row in [those captions..., uncond])."""
    distinct = sorted({c for c in captions if c is not None})
    row = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([row[c] if c is not None else len(distinct) for c in captions])
