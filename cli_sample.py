"""`distillery sample`: sample the tiny image world or a diffusers model folder with the few-step samplers.

    distillery sample --model digits --sampler tcd --gamma 0.3 --preset lcm_tcd --steps 4 --out grid.png
    distillery sample --model ./my-sd15 --lora dmd2_lora.safetensors --sampler x0_renoise \\
                      --timesteps 999,749,499,249 --prompt "a fox" --num 4 --out fox.png
    distillery sample --model digits --lora out/students/digits_phased.safetensors   # as its card says

--model digits is the embedded tiny image world (class labels 0-9 as prompts); any other value is a
diffusers StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer, scheduler), whose prompt is
encoded with the pipeline's own encode_prompt and whose latents are decoded with its VAE.

A distilled student given with --lora samples as its card says (sampler, timesteps, gamma) unless --sampler,
--timesteps / --preset or --gamma say otherwise; a Phased DMD student's experts are merged in turn, each on the
noise levels it was trained for (sampling/api.py: sample_phased).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .sampling.timesteps import PRESET_NAMES

SAMPLER_CHOICES = ("tcd", "x0_renoise", "ddim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits",
                        help="'digits' (the embedded tiny image world) or a diffusers pipeline folder")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                        help="default: the --lora student's card's, else tcd")
    parser.add_argument("--gamma", type=float, default=None,
                        help="TCD stochasticity in [0, 1] (tcd only; default: the card's, else 0.3)")
    parser.add_argument("--lcm-boundary", action="store_true",
                        help="apply LCM's c_skip / c_out (x0_renoise only; for LCM-trained students)")
    parser.add_argument("--end-on-t0", action="store_true",
                        help="ddim only: end on the level of timestep 0, like diffusers' SD1.5 DDIM config")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--timesteps", default=None,
                       help="explicit student timesteps, noisiest first, e.g. 999,749,499,249")
    group.add_argument("--preset", choices=PRESET_NAMES, default=None,
                       help="a student's timesteps (default: the --lora student's card's timesteps, else "
                            "lcm_tcd for tcd, dmd2_4step for x0_renoise, trailing for ddim)")
    parser.add_argument("--steps", type=int, default=4, help="steps for the grid presets")
    parser.add_argument("--denoise", type=float, default=1.0, help="< 1 with --init-image (img2img)")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=None,
                        help="number of samples (digits: default 20, two per class; folder: default 4)")
    parser.add_argument("--labels", default=None, help="digits: comma-separated class labels 0-9")
    parser.add_argument("--prompt", default="a photo of a cat", help="diffusers folder: the prompt")
    parser.add_argument("--negative", default="", help="diffusers folder: the negative prompt (cfg > 1)")
    parser.add_argument("--lora", default=None,
                        help="a LoRA file for the UNet; a distilled student samples as its card says, a Phased "
                             "DMD student with its experts switched at the trained boundaries")
    parser.add_argument("--lora-strength", type=float, default=1.0, help="the --lora's strength")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--init-image", default=None, help="img2img: an image to start from (use --denoise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--out", default="grid.png", help="the grid PNG to write")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def default_preset(sampler: str) -> str:
    return {"tcd": "lcm_tcd", "x0_renoise": "dmd2_4step", "ddim": "trailing"}[sampler]


def read_card(path):
    """The student card of the --lora file, or None for a LoRA without one (any other format too)."""
    from .trainers.card import StudentCard
    from .trainers.lora import read_lora_metadata

    if not Path(path).is_file():
        raise FileNotFoundError(f"--lora {path}: no such file")
    if not str(path).endswith(".safetensors"):
        return None
    try:
        metadata = read_lora_metadata(path)
    except Exception as err:  # safetensors' own errors: not a .safetensors file
        raise ValueError(f"--lora {path}: not a readable .safetensors file ({err})") from None
    try:
        return StudentCard.from_metadata(metadata)
    except ValueError as err:
        raise ValueError(f"--lora {path}: {err}") from None


def apply_card(args, card) -> None:
    """Fill what the command line left open from the student's card (else the plain defaults)."""
    if card is None:
        args.sampler = args.sampler or "tcd"
        args.gamma = 0.3 if args.gamma is None else args.gamma
        return
    try:
        sampler, options = card.sampler_choice()
        timesteps = card.recommended_timesteps()
    except ValueError as err:
        raise ValueError(f"--lora {args.lora}: {err}") from None
    args.sampler = args.sampler or sampler
    if args.gamma is None:
        args.gamma = options.get("gamma", 0.3)
    if card.experts:
        if args.sampler != "x0_renoise":
            raise ValueError(f"--sampler {args.sampler}: a Phased DMD student (its card lists {len(card.experts)} "
                             f"experts) samples with x0_renoise, the sampler its experts were trained with")
        if args.lcm_boundary:
            raise ValueError("--lcm-boundary: a Phased DMD student predicts x0 directly; leave the flag off")
    if args.timesteps is None and args.preset is None and args.sampler == sampler:
        args.timesteps = timesteps


def check_card_fits_model(args, card, model) -> None:
    """A student samples only the kind of model it was distilled from (checked before any timestep is read
    through the model's schedule)."""
    kind = model.schedule.prediction_type
    if card is not None and card.prediction_type and card.prediction_type != kind:
        raise ValueError(f"--lora {args.lora}: the student was distilled from a {card.prediction_type} model; "
                         f"--model {args.model} is {kind}")


def sampler_options(args) -> dict:
    if args.sampler == "tcd":
        return {"gamma": args.gamma}
    if args.sampler == "x0_renoise":
        return {"lcm_boundary": bool(args.lcm_boundary)}
    return {"end_on_t0": bool(args.end_on_t0)}


def images_to_grid(images: torch.Tensor, nrow: int | None = None):
    """[N, C, H, W] in [0, 1] -> a PIL grid image."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = img
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


# --- backends ----------------------------------------------------------------------------------------------

class DigitsBackend:
    """The embedded tiny image world (comfyui_distillery.worlds.digits): class labels as prompts."""

    def __init__(self, args):
        try:
            from .worlds import digits
            from .core.models import DiffusersUNetModel
            from .core.schedules import schedule_from_diffusers_config
        except ImportError as err:
            raise ValueError(f"--model digits: the tiny image world is not available in this install "
                             f"({err}); pass a diffusers pipeline folder instead") from None
        self.digits = digits
        unet, self.text_encoder = digits.load_teacher(device=args.device, dtype=getattr(torch, args.dtype))
        self.model = DiffusersUNetModel(unet, schedule_from_diffusers_config(dict(digits.NOISE_SCHEDULE)))
        self.owns_lora = False
        if args.labels:
            try:
                labels = [int(v) for v in args.labels.replace(" ", "").split(",") if v]
            except ValueError:
                raise ValueError(f"--labels {args.labels!r}: expected comma-separated digits 0-9") from None
            if not labels or any(not 0 <= v <= 9 for v in labels):
                raise ValueError(f"--labels {args.labels!r}: every label must be a digit 0-9")
        else:
            labels = [i % 10 for i in range(args.num or 20)]
        self.labels = torch.tensor(labels)

    @property
    def shape(self):
        cfg = self.model.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (len(self.labels), cfg.in_channels, size, size)

    def conditioning(self, args):
        cond = self.digits.encode_labels(self.text_encoder, self.labels)
        if args.cfg == 1.0:
            return cond, None
        return cond, self.digits.encode_labels(self.text_encoder, torch.full_like(self.labels,
                                                                                   self.digits.NULL_LABEL))

    def switched_loras(self, states, strength: float):
        """LoRAs in the kohya format on diffusers names (what the digits world's students are), merged in turn."""
        from .trainers.lora import SwitchedKohyaLoras

        return SwitchedKohyaLoras(self.model.unet, states, strength)

    def encode_image(self, path, args):
        raise ValueError("--init-image is not supported with --model digits (pixel-space world: use a "
                         "diffusers folder for img2img)")

    def save(self, x0: torch.Tensor, path: Path):
        self.digits.image_grid(x0.detach().float().cpu(), nrow=10).save(path)


class DiffusersFolderBackend:
    """A diffusers StableDiffusionPipeline folder: text encoder for the prompt, VAE for the pixels."""

    def __init__(self, args):
        folder = Path(args.model)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"--model {args.model}: not 'digits' and not a diffusers pipeline folder "
                                    f"(no model_index.json)")
        from diffusers import StableDiffusionPipeline

        from .core.models import DiffusersUNetModel
        from .core.schedules import schedule_from_diffusers_config

        dtype = getattr(torch, args.dtype)
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        if args.lora and not experts_of(args):  # any LoRA format diffusers reads (ComfyUI's names too)
            pipe.load_lora_weights(args.lora, adapter_name="lora")
            pipe.fuse_lora(lora_scale=args.lora_strength)
        self.pipe = pipe.to(args.device)
        self.model = DiffusersUNetModel(pipe.unet, schedule_from_diffusers_config(dict(pipe.scheduler.config)))
        self.owns_lora = args.lora is not None and not experts_of(args)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if args.width % self.vae_scale or args.height % self.vae_scale:
            raise ValueError(f"--width/--height must be multiples of {self.vae_scale} for this VAE")
        self.num = args.num or 4
        self.args = args

    @property
    def shape(self):
        a = self.args
        return (self.num, self.pipe.unet.config.in_channels, a.height // self.vae_scale, a.width // self.vae_scale)

    def switched_loras(self, states, strength: float):
        """The experts as diffusers adapters of the pipeline (its loader converts every kohya naming)."""
        return DiffusersAdapters(self.pipe, states, strength)

    def conditioning(self, args):
        guided = args.cfg != 1.0
        cond, uncond = self.pipe.encode_prompt(args.prompt, args.device, self.num, guided,
                                               negative_prompt=args.negative if guided else None)
        return cond, (uncond if guided else None)

    def encode_image(self, path, args):
        from PIL import Image
        import numpy as np

        img = Image.open(path).convert("RGB").resize((args.width, args.height))
        pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
        pixels = pixels[None].to(args.device, self.pipe.vae.dtype)
        latent = self.pipe.vae.encode(pixels).latent_dist.mean * self.pipe.vae.config.scaling_factor
        return latent.expand(self.num, -1, -1, -1)

    @torch.no_grad()
    def save(self, x0: torch.Tensor, path: Path):
        vae = self.pipe.vae
        images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample
        images_to_grid((images.float() + 1) / 2).save(path)


def experts_of(args) -> list | None:
    card = getattr(args, "card", None)
    return card.experts if card is not None else None


class DiffusersAdapters:
    """K LoRA states loaded as adapters of a diffusers pipeline, one active at a time (`use(k)`), removed on
    close: the same interface as trainers.lora.SwitchedKohyaLoras."""

    def __init__(self, pipe, states, strength: float):
        self.pipe, self.strength = pipe, float(strength)
        self.names = [f"distillery_expert_{k + 1}" for k in range(len(states))]
        for name, state in zip(self.names, states):
            pipe.load_lora_weights(dict(state), adapter_name=name)
        self.active = None

    def use(self, k: int) -> None:
        if k != self.active:
            self.pipe.set_adapters([self.names[k]], adapter_weights=[self.strength])
            self.active = k

    def close(self) -> None:
        self.pipe.delete_adapters(self.names)
        self.active = None


def load_backend(args):
    return DigitsBackend(args) if args.model == "digits" else DiffusersFolderBackend(args)


def student_loras(backend, args):
    """The --lora as weights the backend switches (`use(k)` / `close()`) and the experts' boundary sigmas (None
    for one LoRA), or (None, None) when there is none or the backend fused it already."""
    from safetensors.torch import load_file

    from .sampling.phased import boundary_sigmas
    from .trainers.lora import split_prefixed_state

    if args.lora is None or backend.owns_lora:
        return None, None
    try:
        state = load_file(args.lora)
    except Exception as err:  # safetensors' own errors
        raise ValueError(f"--lora {args.lora}: not a readable .safetensors file ({err})") from None
    experts = experts_of(args)
    if not experts:
        return backend.switched_loras([state], args.lora_strength), None
    try:
        states = split_prefixed_state(state, [e["prefix"] for e in experts])
    except ValueError as err:
        raise ValueError(f"--lora {args.lora}: {err}") from None
    boundaries = boundary_sigmas(backend.model.schedule, args.card.expert_boundaries())
    return backend.switched_loras(states, args.lora_strength), boundaries


def run(args) -> int:
    from .sampling.api import make_noise, sample, sample_phased, sigmas_for

    args.card = read_card(args.lora) if args.lora else None
    apply_card(args, args.card)
    backend = load_backend(args)
    model = backend.model
    check_card_fits_model(args, args.card, model)
    preset = "custom" if args.timesteps is not None else (args.preset or default_preset(args.sampler))
    sigmas = sigmas_for(model, preset, args.timesteps, args.steps, args.denoise)
    latents = backend.encode_image(args.init_image, args) if args.init_image else None
    if args.denoise < 1.0 and latents is None:
        print("distillery sample: note: --denoise < 1 without --init-image starts from noise at a lower "
              "level", file=sys.stderr)
    if args.card is not None and args.card.teacher_loras:
        names = ", ".join(str(lora.get("name")) for lora in args.card.teacher_loras)
        print(f"distillery sample: note: the student was distilled on top of the LoRAs {names}, which this "
              f"command does not load", file=sys.stderr)
    dtype = next(model.parameters(), torch.zeros((), dtype=torch.float32)).dtype
    noise = make_noise(backend.shape, args.seed, dtype=dtype if dtype.is_floating_point else torch.float32,
                       device=args.device)
    cond, uncond = backend.conditioning(args)
    loras, boundaries = student_loras(backend, args)
    common = dict(latents=latents, cond=cond, uncond=uncond, cfg_scale=args.cfg, seed=args.seed,
                  progress=args.progress)
    start = time.perf_counter()
    try:
        if boundaries is not None:
            activate = [lambda k=k: loras.use(k) for k in range(len(experts_of(args)))]
            x0 = sample_phased(model, noise, sigmas, activate, boundaries, **common)
        else:
            if loras is not None:
                loras.use(0)
            x0 = sample(model, noise, sigmas, args.sampler, **common, **sampler_options(args))
    finally:
        if loras is not None:
            loras.close()
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    backend.save(x0, out)
    timesteps = [round(float(t), 3) for t in model.schedule.timestep(sigmas[:-1])]
    report = {"out": str(out), "sampler": args.sampler, "options": sampler_options(args), "timesteps": timesteps,
              "samples": int(noise.shape[0]), "seconds": round(seconds, 3)}
    if boundaries is not None:  # the expert (1-based) that ran each step
        from .sampling.phased import expert_index

        report["experts"] = [1 + expert_index(float(s), boundaries) for s in sigmas[:-1]]
    print(json.dumps(report))
    return 0


__all__ = ["add_arguments", "run", "images_to_grid"]
