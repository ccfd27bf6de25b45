"""A distillation task whose teacher is a checkpoint loaded by ComfyUI's own loaders (worker process only).

Whatever ComfyUI can load with `comfy.sd.load_checkpoint_guess_config` can be a teacher: the worker runs
with ComfyUI's checkout on sys.path, encodes the prompts with the checkpoint's own CLIP (then frees it),
and wraps ComfyUI's BaseModel in our DiffusionModel interface:

    predict_x0(x, sigma, cond) = base_model.apply_model(x, sigma, **cond)

ComfyUI's apply_model already works in the k-diffusion state coordinates we use (x = x0 + sigma eps for
eps / v models, x = (1 - sigma) x0 + sigma eps for flow models) and returns the denoised x0; `cond` is the
dict of tensors its extra_conds produce (c_crossattn, and y for SDXL-class models), so SD1.5, SDXL and
DiTs go through the same path. The noise schedule is ours, read from the model's model_sampling by
nodes/comfy_bridge.py's schedule_from_model_sampling (no ComfyUI import at its module level).

LoRA adapters are injected by trainers/lora.py (peft) into the diffusion model's Linear / Conv2d layers,
chosen by name (lora_target_names); the student is exported with the key ComfyUI maps for any
architecture, `lora_unet_<diffusion_model key with . -> _>` (comfy/lora.py model_lora_keys_unet).

Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..core.models import DiffusionModel, run_until
from ..trainers.real_images import ImageBank, caption_rows, list_images, load_image, read_caption
from ..trainers.tasks import DistillTask

log = logging.getLogger("distillery.worker")

# LDM UNets (SD1.x, SD2.x, SDXL): attention, projections, feed-forward, resnet convs / time embedding,
# skip convs; plus the down / up sampler convs (found by their parent's class)
LDM_TARGET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")
LDM_RESAMPLERS = {"Downsample": "op", "Upsample": "conv"}
DIFFUSION_MODEL = "model.diffusion_model"  # where the network sits inside the wrapper below


def lora_target_names(diffusion_model: nn.Module, prefix: str = DIFFUSION_MODEL) -> list[str]:
    """Full module names (under `prefix`) that get LoRA adapters.

    LDM UNets: the DMD2 / LCM-LoRA set of layers under their ldm names. Anything else (a DiT: Flux, SD3,
    Wan, ...): every nn.Linear inside its transformer blocks.
    """
    modules = dict(diffusion_model.named_modules())
    names = []
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        leaf = name.rsplit(".", 1)[-1]
        if any(name == t or name.endswith("." + t) for t in LDM_TARGET_LEAVES):
            names.append(name)
        elif parent is not None and LDM_RESAMPLERS.get(type(parent).__name__) == leaf:
            names.append(name)
    if not names:
        names = [name for name, module in modules.items()
                 if isinstance(module, nn.Linear) and "blocks" in name]
    if not names:
        raise ValueError(f"found no Linear / Conv2d layers to adapt in {type(diffusion_model).__name__}")
    return [f"{prefix}.{name}" for name in names]


class ComfyDiffusionModel(DiffusionModel):
    """ComfyUI's BaseModel (any architecture) behind our DiffusionModel interface."""

    def __init__(self, base_model: nn.Module, schedule):
        super().__init__(schedule)
        self.model = base_model

    def predict_x0(self, x, sigma, cond):
        kwargs = dict(cond) if isinstance(cond, dict) else {"c_crossattn": cond}
        out = self.model.apply_model(x, sigma.to(torch.float32), transformer_options={}, **kwargs)
        return out.to(x.dtype)

    def bottleneck(self) -> nn.Module | None:
        """The last layer of an LDM UNet's middle block (ComfyUI calls its layers one by one); None for DiTs."""
        middle = getattr(self.model.diffusion_model, "middle_block", None)
        return middle[-1] if middle is not None and len(middle) else None

    def features(self, x, sigma, cond):
        """The middle block's output, as DiffusersUNetModel.features (the GAN head's input)."""
        return run_until(self.bottleneck(), lambda: self.predict_x0(x, sigma, cond))


def _take(tree, index):
    if isinstance(tree, dict):
        return {k: _take(v, index) for k, v in tree.items()}
    return tree[index] if isinstance(tree, torch.Tensor) else tree


def _expand(tree, n):
    if isinstance(tree, dict):
        return {k: _expand(v, n) for k, v in tree.items()}
    return tree.expand(n, *tree.shape[1:]) if isinstance(tree, torch.Tensor) else tree


def _rows(bank: dict, uncond: dict, rows: slice) -> dict:
    """Rows of a prompt bank; constants (shared with uncond, see encode_prompt_bank) stay whole."""
    return {k: v if v is uncond[k] else v[rows] for k, v in bank.items()}


@torch.no_grad()
def encode_with_comfy_vae(vae, base_model, paths, resolution: int) -> torch.Tensor:
    """Latents in the model's space (process_latent_in: scale / shift), one image at a time; ComfyUI's VAE
    takes [B, H, W, 3] pixels in [0, 1]."""
    latents = []
    for path in paths:
        pixels = (load_image(path, resolution).movedim(0, -1).unsqueeze(0) + 1) / 2
        latents.append(base_model.process_latent_in(vae.encode(pixels).float().cpu()))
    return torch.cat(latents)


def _to(tree, device):
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def encode_prompt_bank(base_model, clip, prompts: list[str], negative: str, latent_shape, resolution: int):
    """(cond bank [P, ...] per key, uncond [1, ...] per key) through the model's own extra_conds.

    The same steps ComfyUI's sampler takes for a CONDITIONING (CLIP output -> model.extra_conds ->
    cond objects), concatenated with the cond objects' own concat (which pads cross-attention of
    different lengths by repetition), so every prompt and the negative batch together.
    """
    per_key: dict[str, list] = {}
    texts = list(prompts) + [negative]
    noise = torch.zeros((1, *latent_shape))
    for text in texts:
        tokens = clip.tokenize(text)
        (cond, extras), = clip.encode_from_tokens_scheduled(tokens, show_pbar=False)[:1]
        params = dict(extras)
        params.pop("model_conds", None)
        params.update(cross_attn=cond, device=torch.device("cpu"), noise=noise, latent_image=noise,
                      width=resolution, height=resolution)
        for key, value in base_model.extra_conds(**params).items():
            per_key.setdefault(key, []).append(value.process_cond(batch_size=1, device=torch.device("cpu"),
                                                                  area=None))
    bank, uncond = {}, {}
    for key, objs in per_key.items():
        if len(objs) != len(texts):
            raise ValueError(f"conditioning {key!r} exists for some prompts only")
        if not isinstance(objs[0].cond, torch.Tensor):
            raise ValueError(f"conditioning {key!r} of {type(base_model).__name__} is not a tensor "
                             f"({type(objs[0]).__name__}); this model type is not supported yet")
        both = objs[0].concat(objs[1:]) if len(objs) > 1 else objs[0].cond
        if not isinstance(both, torch.Tensor) or both.shape[0] != len(texts):  # a constant
            bank[key] = uncond[key] = objs[0].cond
            continue
        bank[key], uncond[key] = both[:-1].float(), both[-1:].float()
    return bank, uncond


class ComfyCheckpointTask(DistillTask):
    name = "comfy"

    def __init__(self, checkpoint_path: str, prompts: list[str], resolution: int = 512, negative: str = "",
                 dtype: torch.dtype | None = None, phase=lambda p: None, real_images: str | None = None):
        import comfy.model_management as mm
        import comfy.sd

        from ..nodes.comfy_bridge import schedule_from_model_sampling

        if not prompts:
            raise ValueError("no prompts to distill on")
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (was it moved or renamed?)")
        image_paths = list_images(real_images, "real_images_folder") if real_images else None
        phase("loading the checkpoint")
        log.info("loading %s with ComfyUI's loader (dtype %s)", path, dtype or "ComfyUI's choice")
        options = {"dtype": dtype} if dtype is not None else {}
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, model_options=options)
        if clip is None:
            raise ValueError(f"{path.name} has no text encoder; Distillery needs a full checkpoint for now")
        base_model = patcher.model
        latent_format = base_model.latent_format
        if getattr(latent_format, "latent_dimensions", 2) != 2:
            raise ValueError(f"{type(base_model).__name__} makes {latent_format.latent_dimensions}-D latents; "
                             f"only image models are supported for now")
        scale = int(getattr(vae, "downscale_ratio", 8)) if vae is not None and \
            isinstance(getattr(vae, "downscale_ratio", 8), int) else 8
        if resolution % (scale * 8):
            raise ValueError(f"resolution={resolution}: use a multiple of {scale * 8}")
        self.sample_shape = (int(latent_format.latent_channels), resolution // scale, resolution // scale)
        self.resolution = resolution
        self.prompts = list(prompts)
        captions, cond_index = caption_rows([read_caption(p) for p in image_paths]) if image_paths else ([], None)
        phase("encoding prompts")
        log.info("encoding %d prompts (and %d captions) with the checkpoint's text encoder", len(prompts),
                 len(captions))
        with torch.no_grad():  # prompts and captions in one pass; captions split off below
            bank, self.uncond = encode_prompt_bank(base_model, clip, self.prompts + captions, negative,
                                                   self.sample_shape, resolution)
        n = len(self.prompts)
        self.cond_bank = _rows(bank, self.uncond, slice(0, n))
        if image_paths:
            phase("encoding real images")
            log.info("encoding %d real images with the checkpoint's VAE", len(image_paths))
            # rows: the captions, then the negative prompt for images without one
            rows = {k: v if v is self.uncond[k] else torch.cat([v[n:], self.uncond[k]]) for k, v in bank.items()}
            self.image_bank = ImageBank(encode_with_comfy_vae(vae, base_model, image_paths, resolution), rows,
                                        cond_index)
        del clip
        mm.unload_all_models()  # the text encoder is not needed any more
        gc.collect()
        mm.soft_empty_cache()
        self.vae = vae
        self.patcher = patcher  # keeps ComfyUI's bookkeeping objects alive; we drive the module directly
        schedule = schedule_from_model_sampling(base_model.model_sampling)
        self.base = ComfyDiffusionModel(base_model, schedule)
        self.teacher = None
        self.lora_targets = lora_target_names(base_model.diffusion_model)
        log.info("model %s, %s schedule (%s), latent %s, %d layers get LoRA adapters",
                 type(base_model).__name__, type(schedule).__name__, schedule.prediction_type,
                 self.sample_shape, len(self.lora_targets))
        bottleneck = self.base.bottleneck()
        self.feature_shape = (int(getattr(bottleneck, "out_channels", 0)), True)  # 0: no GAN head (DiTs)
        self.mixed_precision = "bf16" if dtype == torch.bfloat16 else ("fp16" if dtype == torch.float16 else "no")

    def to(self, device):
        self.device = torch.device(device)
        self.base.to(device)
        self.cond_bank = _to(self.cond_bank, device)
        self.uncond = _to(self.uncond, device)
        return self

    def conditioning(self, batch: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.prompts), (batch,), generator=generator)
        return _take(self.cond_bank, idx.to(self.device)), _expand(self.uncond, batch)

    def preview(self, student, sigmas, generator, path):
        from PIL import Image

        from ..trainers.generator import student_sample

        n = min(4, len(self.prompts))
        cond = _take(self.cond_bank, torch.arange(n, device=self.device))
        noise = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        x0 = student_sample(student, cond, sigmas.to(self.device), noise, generator)
        with torch.no_grad():
            images = self.vae.decode(self.base.model.process_latent_out(x0.float()))
        if images.ndim == 5:  # video VAEs: first frame
            images = images[:, 0]
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        grid = torch.cat(list(images), dim=1)  # side by side: [H, n*W, 3]
        Image.fromarray(grid.numpy()).save(path)

    def export_lora(self, adapter: str = "student") -> dict:
        """Keys `lora_unet_<diffusion_model key, '.' -> '_'>.lora_down/.lora_up/.alpha`, which ComfyUI's
        model_lora_keys_unet maps for every architecture (and kohya / A1111 read for LDM UNets)."""
        from ..trainers.lora import kohya_unet_state_dict

        return kohya_unet_state_dict(self.base.model.diffusion_model, adapter)

    def describe(self) -> dict:
        return {"task": self.name, "prompts": len(self.prompts), "resolution": self.resolution,
                "real_images": len(self.image_bank) if self.image_bank is not None else 0}


def setup_comfy(comfy_root: str | None, device: str) -> None:
    """Make ComfyUI importable in this process, with its device choice matching the server's."""
    if comfy_root:
        root = os.path.abspath(comfy_root)
        if not os.path.isfile(os.path.join(root, "comfy", "sd.py")):
            raise FileNotFoundError(f"{root} is not a ComfyUI checkout (no comfy/sd.py)")
        if root not in sys.path:
            sys.path.insert(0, root)
    import comfy.cli_args  # parses no command line unless ComfyUI's main enabled that

    if device == "cpu" or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported


def checkpoint_task(checkpoint_path: str, prompts: list[str], *, resolution: int = 512, negative: str = "",
                    real_images: str | None = None, comfy_root: str | None = None, device: str | None = None,
                    phase=lambda p: None) -> ComfyCheckpointTask:
    """A single-file checkpoint as a task, loaded by ComfyUI's loader (the job worker and `distillery train
    --model file.safetensors --comfyui DIR` both come here). bf16 (fp16 without bf16) weights on a GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    setup_comfy(comfy_root, device)
    dtype = None
    if device != "cpu" and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return ComfyCheckpointTask(checkpoint_path, prompts, resolution, negative, dtype=dtype, phase=phase,
                               real_images=real_images)


def build_comfy_task(config: dict, phase=lambda p: None) -> ComfyCheckpointTask:
    task = config["task"]
    built = checkpoint_task(task["checkpoint_path"], task["prompts"], resolution=int(task.get("resolution", 512)),
                            negative=task.get("negative_prompt", ""), real_images=task.get("real_images"),
                            comfy_root=(config.get("comfy") or {}).get("root"), device=config.get("device", "cpu"),
                            phase=phase)
    built.default_guidance = float(task.get("guidance", 4.5))  # CFG of teacher-made data (TCD)
    return built
