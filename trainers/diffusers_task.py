"""A diffusers model folder (SD1.5 / SD2 / SDXL layout) as a distillation task.

Prompts are encoded once, up front, and the text encoders are freed before training: during training
only the UNet (one frozen copy, with the student and critic adapters) and the embeddings stay in memory.
SDXL's second encoder, pooled embeddings and size conditioning (`time_ids`) are handled; DMD2 uses
all-zero embeddings as SDXL's unconditional prompt and the empty prompt for SD1.5.

With `real_images` (a folder), the images are checked first, then encoded by the folder's VAE and their
captions by the same text encoders (real_images.py); they feed the GAN term and TCD.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.models import cat_cond, map_cond
from ..core.schedules import schedule_from_diffusers_config
from .real_images import ImageBank, caption_rows, encode_images, list_images, read_caption
from .tasks import DiffusersUNetTask


def _check_folder(path: Path) -> None:
    if path.is_file():
        raise ValueError(
            f"model={str(path)!r} is a single-file checkpoint, which diffusers cannot read offline (its "
            f"configs come from the Hub): train it with ComfyUI's loader (`distillery train --comfyui DIR`, "
            f"or the 'Distillery Start Distillation' node), or convert it to a diffusers folder once.")
    missing = [p for p in ("unet/config.json", "scheduler/scheduler_config.json", "text_encoder", "tokenizer")
               if not (path / p).exists()]
    if missing:
        raise ValueError(f"model={str(path)!r} is not a diffusers Stable Diffusion folder: missing "
                         f"{', '.join(missing)}")


def check_resolution(resolution: int, unet_config, vae_scale: int = 8) -> int:
    factor = vae_scale * 2 ** (len(unet_config.block_out_channels) - 1)
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution={resolution}: this model needs a multiple of {factor} "
                         f"(e.g. {max(factor, round(max(resolution, 1) / factor) * factor)})")
    return resolution // vae_scale


@torch.no_grad()
def _encode_prompts(path: Path, prompts: list[str], sdxl: bool, resolution: int, device):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    def run(tok_dir, enc_cls, enc_dir, texts):
        tok = AutoTokenizer.from_pretrained(path / tok_dir)
        enc = enc_cls.from_pretrained(path / enc_dir).to(device).eval()
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        del enc
        return out

    if not sdxl:
        out = run("tokenizer", CLIPTextModel, "text_encoder", prompts + [""])
        emb = out.last_hidden_state.float().cpu()
        return emb[:-1], emb[-1:]
    one = run("tokenizer", CLIPTextModel, "text_encoder", prompts)
    two = run("tokenizer_2", CLIPTextModelWithProjection, "text_encoder_2", prompts)
    emb = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], -1).float().cpu()
    pooled = two.text_embeds.float().cpu()
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    cond = {"encoder_hidden_states": emb,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}}
    uncond = {"encoder_hidden_states": torch.zeros_like(emb[:1]),
              "added_cond_kwargs": {"text_embeds": torch.zeros_like(pooled[:1]), "time_ids": time_ids}}
    return cond, uncond


class PromptBank:
    """Pre-encoded prompts; draws a random batch of (cond, uncond)."""

    def __init__(self, cond, uncond, count: int):
        self.cond, self.uncond, self.count = cond, uncond, count

    def __call__(self, batch: int, generator: torch.Generator):
        idx = torch.randint(0, self.count, (batch,), generator=generator)
        return (map_cond(lambda c: c[idx], self.cond),
                map_cond(lambda u: u.expand(batch, *u.shape[1:]), self.uncond))


class DiffusersFolderTask(DiffusersUNetTask):
    name = "diffusers"

    def conditioning(self, batch, generator):
        cond, uncond = self.prompt_encoder(batch, generator)
        return map_cond(lambda c: c.to(self.device), cond), map_cond(lambda u: u.to(self.device), uncond)

    def describe(self) -> dict:
        return {"task": self.name, "real_images": len(self.image_bank) if self.image_bank is not None else 0}


@torch.no_grad()
def _image_bank(path: Path, image_paths: list[Path], cond_index: torch.Tensor, caption_cond, uncond,
                resolution: int, device, progress: bool) -> ImageBank:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path / "vae").float().to(device).eval()  # fp32: fp16 SDXL VAEs overflow
    latents = encode_images(vae, image_paths, resolution, device, progress=progress)
    del vae
    bank = cat_cond(caption_cond, uncond) if caption_cond is not None else uncond
    return ImageBank(latents, bank, cond_index)


def diffusers_task(path, prompts: list[str] | None = None, resolution: int | None = None,
                   dtype: str = "auto", guidance: float | None = None, real_images=None,
                   progress: bool = True) -> DiffusersFolderTask:
    import json

    from diffusers import UNet2DConditionModel

    path = Path(path)
    _check_folder(path)
    if not prompts:
        raise ValueError("prompts: give a text file of prompts (--prompts prompts.txt), one per line")
    image_paths, captions, cond_index = None, [], None
    if real_images is not None:  # every file checked before any model loads
        image_paths = list_images(real_images)
        if not (path / "vae" / "config.json").exists():
            raise ValueError(f"real_images: model={str(path)!r} has no vae/ folder to encode them with; "
                             f"use a complete diffusers folder (with vae/) or drop real_images")
        captions, cond_index = caption_rows([read_caption(p) for p in image_paths])
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    resolution = resolution or (1024 if sdxl else 512)
    vae_config_path = path / "vae" / "config.json"
    vae_blocks = json.loads(vae_config_path.read_text()).get("block_out_channels", [0] * 4) \
        if vae_config_path.exists() else [0] * 4
    latent = check_resolution(resolution, type("C", (), unet_config), vae_scale=2 ** (len(vae_blocks) - 1))
    schedule = schedule_from_diffusers_config(json.loads((path / "scheduler" / "scheduler_config.json").read_text()))
    cuda = torch.cuda.is_available()
    torch_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = torch.device("cuda" if cuda else "cpu")
    texts = list(prompts) + captions  # one pass of the text encoders for prompts and captions
    cond, uncond = _encode_prompts(path, texts, sdxl, resolution, device)
    prompt_cond = map_cond(lambda c: c[:len(prompts)], cond)
    caption_cond = map_cond(lambda c: c[len(prompts):], cond) if captions else None
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype)
    bank = PromptBank(prompt_cond, uncond, len(prompts))
    task = DiffusersFolderTask(unet, schedule, (unet.config.in_channels, latent, latent), bank,
                               default_guidance=guidance if guidance is not None else (8.0 if sdxl else 4.5))
    task.name = "sdxl" if sdxl else "sd"
    task.mixed_precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch_dtype, "no")  # for "auto"
    if image_paths is not None:
        task.image_bank = _image_bank(path, image_paths, cond_index, caption_cond, uncond, resolution, device,
                                      progress)
    return task
