"""A diffusers model folder (SD1.5 / SD2 / SDXL layout) as a distillation task.

Prompts are encoded once, up front, and the text encoders are freed before training: during training
only the UNet (one frozen copy, with the student and critic adapters) and the embeddings stay in memory.
SDXL's second encoder, pooled embeddings and size conditioning (`time_ids`) are handled; DMD2 uses
all-zero embeddings as SDXL's unconditional prompt and the empty prompt for SD1.5.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.models import map_cond
from ..core.schedules import schedule_from_diffusers_config
from .tasks import DiffusersUNetTask


def _check_folder(path: Path) -> None:
    if path.is_file():
        raise ValueError(
            f"model={str(path)!r} is a single-file checkpoint. Without internet the matching diffusers "
            f"configs cannot be fetched: convert it to a diffusers folder once, or start the job from "
            f"ComfyUI's 'Distillery Start Distillation' node, which loads it with ComfyUI's own loader.")
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


def diffusers_task(path, prompts: list[str] | None = None, resolution: int | None = None,
                   dtype: str = "auto", guidance: float | None = None) -> DiffusersFolderTask:
    import json

    from diffusers import UNet2DConditionModel

    path = Path(path)
    _check_folder(path)
    if not prompts:
        raise ValueError("prompts: give a text file of prompts (--prompts prompts.txt), one per line")
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    resolution = resolution or (1024 if sdxl else 512)
    latent = check_resolution(resolution, type("C", (), unet_config))
    schedule = schedule_from_diffusers_config(json.loads((path / "scheduler" / "scheduler_config.json").read_text()))
    cuda = torch.cuda.is_available()
    torch_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = torch.device("cuda" if cuda else "cpu")
    cond, uncond = _encode_prompts(path, prompts, sdxl, resolution, device)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype)
    bank = PromptBank(cond, uncond, len(prompts))
    task = DiffusersFolderTask(unet, schedule, (unet.config.in_channels, latent, latent), bank,
                               default_guidance=guidance if guidance is not None else (8.0 if sdxl else 4.5))
    task.name = "sdxl" if sdxl else "sd"
    return task
