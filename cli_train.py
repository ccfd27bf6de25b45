"""`distillery train`: distill a model into a few-step LoRA student from the command line.

    distillery train --method dmd2 --model digits --steps 2000 --out digits_dmd2.safetensors
    distillery train --method sid --guidance-mode anti_cfg --kappa 1.5 --model my_model/ --prompts p.txt
    distillery train --method tcd --mode tscd --model my_model.safetensors --comfyui ~/ComfyUI --prompts p.txt
    distillery train --model flux1-dev.safetensors --text-encoder clip_l.safetensors --text-encoder t5xxl.safetensors \
        --vae ae.safetensors --comfyui ~/ComfyUI --prompts p.txt    # a diffusion model with its text encoders and VAE
    distillery train --config my_run.json            # the same names as the flags, e.g. {"steps": 2000}

Every training setting and method option is a flag made from its declaration (trainers/registry.py), so
`--help` lists each with its help and range; a JSON config takes the same names. The command line builds
the same run spec as the ComfyUI node (trainers/spec.py) and checks it completely before any model loads.
A single-file checkpoint (or a diffusion-model file with --text-encoder and --vae) is loaded with ComfyUI's own
loaders (--comfyui or COMFYUI_DIR: a ComfyUI checkout, run with a Python that has ComfyUI's requirements); a
diffusers folder needs nothing else. Runs resume from the newest checkpoint in --run-dir unless --no-resume is
given. Multi-GPU: `accelerate launch -m comfyui_distillery.cli train ...`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .trainers import registry
from .trainers.engine import TrainConfig, low_vram_preset
from .trainers.spec import WORLDS, DataSpec, OutputSpec, RunSpec, TeacherSpec, parse_prompts

# what is not a training setting nor a method option: where things are
RUN_KEYS = ("method", "model", "text_encoder", "vae", "teacher_lora", "prompts", "negative_prompt", "real_images",
            "comfyui", "resolution", "out", "run_dir")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _method_fields() -> dict[str, dict[str, registry.OptionInfo]]:
    """option name -> {method: its declaration}, for every registered method."""
    fields: dict[str, dict[str, registry.OptionInfo]] = {}
    for info in registry.methods().values():
        for option in info.option_infos():
            fields.setdefault(option.name, {})[info.name] = option
    return fields


def _aliases(fields: dict[str, dict[str, registry.OptionInfo]]) -> dict[str, dict[str, str]]:
    """alias -> {method: the option it names there} (e.g. guidance: DMD2's guidance_scale, SiD's kappa)."""
    aliases: dict[str, dict[str, str]] = {}
    for name, per_method in fields.items():
        for method, option in per_method.items():
            for alias in option.aliases:
                aliases.setdefault(alias, {})[method] = name
    return aliases


def _help(option: registry.OptionInfo) -> str:
    """The flag's help for argparse, which %-formats it: a literal % (e.g. "10% at the last step") is escaped."""
    rng = option.describe_range()
    text = f"{option.help} ({rng}; default {option.default!r})" if rng else f"{option.help} (default {option.default!r})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = registry.method_names()
    parser.add_argument("--method", default=None, help=f"{', '.join(names)} (default {registry.default_method()})")
    parser.add_argument("--model", default=None,
                        help=f"a diffusers folder, a .safetensors checkpoint, a diffusion-model file (with "
                             f"--text-encoder and --vae), or a built-in world: {', '.join(WORLDS)}")
    parser.add_argument("--text-encoder", dest="text_encoder", action="append", default=None, metavar="FILE[:TYPE]",
                        help="with a diffusion-model file as --model (Flux, SD3.5 as distributed): its text encoder, "
                             "loaded as ComfyUI's CLIP loaders load it; repeat for each (Flux: clip_l and t5xxl). "
                             "TYPE: ComfyUI's CLIP type (flux, sd3, stable_diffusion, ...; default: the one the "
                             "model's family takes)")
    parser.add_argument("--vae", default=None, metavar="FILE",
                        help="with a diffusion-model file as --model: its VAE (e.g. ae.safetensors for Flux)")
    parser.add_argument("--teacher-lora", dest="teacher_lora", action="append", default=None,
                        metavar="FILE[:MODEL[:CLIP]]",
                        help="a LoRA of yours on a single-file --model, with its model and CLIP strengths (default "
                             "1:1), applied by ComfyUI's loader; repeat for a stack")
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line")
    parser.add_argument("--negative-prompt", dest="negative_prompt", default=None,
                        help="the teacher's negative prompt (single-file checkpoints)")
    parser.add_argument("--real-images", dest="real_images", default=None,
                        help="folder of your own images (captions as name.txt beside them): the GAN term's "
                             "real data (with a GAN weight) and TCD's training data")
    parser.add_argument("--comfyui", default=None,
                        help="a ComfyUI checkout whose loader reads a single-file --model (default: $COMFYUI_DIR)")
    parser.add_argument("--resolution", default=None,
                        help="training resolution in pixels (default: the model's own, 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--config", default=None, help="JSON file with any of these options (flag names with _)")
    parser.add_argument("--out", default=None, help="where to write the student LoRA (.safetensors)")
    parser.add_argument("--run-dir", dest="run_dir", default=None,
                        help="folder for checkpoints, metrics and previews (default runs/<model>-<method>)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if run-dir has checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    add_registry_arguments(parser, "training settings")


def add_registry_arguments(parser: argparse.ArgumentParser, train_title: str) -> None:
    """A flag for every training setting and every method option, from their declarations (and the short
    forms methods share, e.g. --guidance); `distillery plan` takes the same ones."""
    taken = {a.dest for a in parser._actions}
    train = parser.add_argument_group(train_title)
    train.add_argument("--low-vram", dest="low_vram", action="store_true", default=None,
                       help="the low-VRAM preset: --fp8-base and, on a CUDA GPU, --optimizer adamw8bit "
                            "(elsewhere --foreach false); flags given explicitly win")
    for option in registry.option_infos(TrainConfig):
        if option.name in taken:
            continue
        flags = [_flag(option.name)] + [_flag(a) for a in option.aliases]
        switch = option.kind == "bool" or (option.choices and "on" in option.choices)  # a bare flag turns it on
        train.add_argument(*flags, dest=option.name, default=None, help=_help(option),
                           **({"nargs": "?", "const": "true"} if switch else {}))
        taken.add(option.name)

    fields = _method_fields()
    method_group = parser.add_argument_group("method options (each for the methods named)")
    for name, per_method in fields.items():
        if name in taken:
            raise ValueError(f"method option {name!r} has the name of a training setting; rename it")
        first = next(iter(per_method.values()))
        owners = ", ".join(registry.get(m).display_name for m in per_method)
        method_group.add_argument(_flag(name), dest=name, default=None, help=f"{owners}: {_help(first)}",
                                  **({"nargs": "?", "const": "true"} if first.kind == "bool" else {}))
        taken.add(name)
    for alias, targets in _aliases(fields).items():
        described = "; ".join(f"{registry.get(m).display_name}: {_flag(t)}" for m, t in targets.items())
        method_group.add_argument(_flag(alias), dest=f"alias:{alias}", metavar=alias.upper(), default=None,
                                  help=f"short for {described}")


def split_settings(settings: dict, method: str, extra_train: tuple = (), device_type: str = "cuda"
                   ) -> tuple[dict, dict]:
    """(training settings, the method's options) from flag / config-file names; an option of another method
    or an unknown name is refused by name. `extra_train`: other names that go with the training settings.
    `low_vram` (the preset) fills in the settings it sets that were not given, for a run on `device_type`."""
    settings = dict(settings)
    preset = low_vram_preset(device_type) if settings.pop("low_vram", None) else {}
    fields, aliases = _method_fields(), _aliases(_method_fields())
    train_names = {o.name for o in registry.option_infos(TrainConfig)} | set(extra_train)
    train_aliases = {a: o.name for o in registry.option_infos(TrainConfig) for a in o.aliases}
    train, options = {}, {}
    for key, value in settings.items():
        name = key.split(":", 1)[-1]
        if key.startswith("alias:"):
            if method not in aliases[name]:
                raise ValueError(f"{_flag(name)}: --method {method} does not take it (it is for "
                                 f"{_listed(aliases[name])}); remove it or choose that method")
            options[aliases[name][method]] = value
        elif name in train_names or name in train_aliases:
            train[train_aliases.get(name, name)] = value
        elif name in fields:
            if method not in fields[name]:
                raise ValueError(f"{_flag(name)}: --method {method} does not take it (it is for "
                                 f"{_listed(fields[name])}); remove it or choose that method")
            options[name] = value
        else:
            raise ValueError(f"{name}: not an option of distillery train; see distillery train --help")
    return {**preset, **train}, options


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; write one prompt per line")
    try:
        prompts = parse_prompts(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path}: not UTF-8 text; save it as a plain UTF-8 text file") from None
    if not prompts:
        raise ValueError(f"--prompts {path}: the file has no prompts; write one prompt per line")
    return prompts


def _settings(args: argparse.Namespace) -> dict:
    """The config file's keys, then the command line's flags (which win), aliases kept as they are."""
    settings: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}: not valid JSON ({err})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"--config {path}: a JSON object of option names and values, e.g. {{\"steps\": 2000}}")
        settings = {f"alias:{k}" if k in _aliases(_method_fields()) else k: v for k, v in settings.items()}
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "no_resume", "quiet", "command"):
            settings[key] = value
    return settings


def resolve(args: argparse.Namespace) -> tuple[RunSpec, str]:
    """(the run spec, the run folder) from the config file and the command line, checked before any work."""
    settings = _settings(args)
    method = str(settings.pop("method", None) or registry.default_method()).strip().lower()
    info = registry.get(method)
    run = {k: settings.pop(k) for k in RUN_KEYS if k in settings}
    train, options = split_settings(settings, info.name, device_type="cuda" if _cuda() else "cpu")
    model = run.get("model")
    if not model:
        raise ValueError(f"--model is required: a diffusers folder or .safetensors file, or {' / '.join(WORLDS)}")
    model = str(model)
    teacher = _teacher(model, run.get("text_encoder") or [], run.get("vae"))
    teacher.loras = [_teacher_lora(text) for text in run.get("teacher_lora") or []]
    prompts = read_prompts(run["prompts"]) if run.get("prompts") else []
    resolution = run.get("resolution")
    if resolution is not None:
        try:
            resolution = int(resolution)
        except (TypeError, ValueError):
            raise ValueError(f"--resolution {resolution}: a whole number of pixels, e.g. 512 or 1024") from None
    real_images = run.get("real_images")
    if real_images is not None and not Path(real_images).is_dir():
        raise FileNotFoundError(f"--real-images {real_images}: no such folder")
    out = run.get("out")
    spec = RunSpec.build(
        method=info.name, method_options=options, train=train, teacher=teacher,
        data=DataSpec(prompts=prompts, negative_prompt=run.get("negative_prompt") or "", resolution=resolution,
                      real_images=str(Path(real_images).resolve()) if real_images else None),
        output=OutputSpec(lora_name=Path(out).name if out else None, lora_path=str(out) if out else None),
        device="cuda" if _cuda() else "cpu",
        comfy_root=run.get("comfyui") or os.environ.get("COMFYUI_DIR") or None)
    run_dir = run.get("run_dir") or f"runs/{Path(model).stem}-{info.name}"
    if spec.output.lora_path is None:
        spec.output = OutputSpec(lora_name=f"{Path(model).stem}_{info.name}.safetensors",
                                 lora_path=str(Path(run_dir) / f"{Path(model).stem}_{info.name}.safetensors"))
    return spec, run_dir


def _teacher_lora(text: str) -> dict:
    """FILE[:MODEL[:CLIP]] (a Windows drive letter's colon is part of FILE)."""
    path, strengths = str(text), []
    while len(strengths) < 2 and ":" in path and _is_number(path.rsplit(":", 1)[1]):
        path, value = path.rsplit(":", 1)
        strengths.insert(0, value)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--teacher-lora {text}: no such file")
    model_strength = float(strengths[0]) if strengths else 1.0
    clip_strength = float(strengths[1]) if len(strengths) > 1 else model_strength
    return {"path": str(Path(path).resolve()), "strength_model": model_strength, "strength_clip": clip_strength}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _teacher(model: str, text_encoders: list[str] = (), vae: str | None = None) -> TeacherSpec:
    path = Path(model)
    if text_encoders or vae:  # a diffusion-model file with its text encoders and VAE
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such file; with --text-encoder and --vae, give the "
                                    f"diffusion-model file")
        return _split_teacher(path, model, [_text_encoder(text) for text in text_encoders], vae)
    if model in WORLDS:
        return TeacherSpec("world", model)
    if path.is_dir():
        return TeacherSpec("diffusers", str(path))
    if path.is_file():  # its header says whether it is a diffusion model, before anything loads
        from .comfy_backend import has_text_encoder, probe_checkpoint, safetensors_header

        family = probe_checkpoint(path, name=model, field="model")["family"]
        if not has_text_encoder(safetensors_header(path)):
            raise ValueError(f"--model {model}: a diffusion model without its text encoders; give them with "
                             f"--text-encoder FILE[:TYPE] (repeat for each) and its VAE with --vae FILE")
        return TeacherSpec("checkpoint", str(path), family=family)
    raise FileNotFoundError(f"--model {model}: no such file or folder; give a diffusers folder, a .safetensors "
                            f"checkpoint, or one of the built-in worlds: {', '.join(WORLDS)}")


def _text_encoder(text: str) -> tuple[str, str | None]:
    """FILE[:TYPE] -> (file, type or None); a file whose own name has a colon is taken whole."""
    text = str(text)
    if Path(text).is_file() or ":" not in text:
        return text, None
    path, clip_type = text.rsplit(":", 1)
    return path, clip_type.strip().lower() or None


def _split_teacher(path: Path, model: str, text_encoders: list[tuple], vae: str | None) -> TeacherSpec:
    """The diffusion model, its text encoders and VAE, checked from their headers; the spec checks the rest."""
    from .comfy_backend import probe_split_teacher

    if not text_encoders:
        raise ValueError(f"--model {model}: with --vae, give the diffusion model's text encoders too "
                         f"(--text-encoder FILE[:TYPE], repeat for each)")
    if not vae:
        raise ValueError(f"--vae: give the VAE of the diffusion model {model} (e.g. --vae ae.safetensors for Flux)")
    types = sorted({t for _, t in text_encoders if t})
    if len(types) > 1:
        raise ValueError(f"--text-encoder: one CLIP type for all text encoders (ComfyUI loads them together), "
                         f"got {' and '.join(types)}")
    found = probe_split_teacher((path, model, "model"), [(Path(f), f, "--text-encoder") for f, _ in text_encoders],
                                (Path(vae), vae, "--vae"), types[0] if types else None)
    return TeacherSpec("split", str(path.resolve()), name=path.name, family=found["family"],
                       text_encoders=[str(Path(f).resolve()) for f, _ in text_encoders],
                       clip_type=found["clip_type"], vae=str(Path(vae).resolve()))


def _listed(names) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from . import api

    spec, run_dir = resolve(args)
    task = api.task_from_spec(spec, progress=not args.quiet)
    result = api.distill(task, spec.make_method(), spec.train_config(run_dir), lora_path=spec.output.lora_path,
                         resume=not args.no_resume, progress=not args.quiet, card=api.card_extras(spec))
    if not result["trainer"].accelerator.is_main_process:
        return 0  # `accelerate launch`: rank 0 reports
    print(json.dumps({"lora": result.get("lora"), "steps": result["step"], "resumed": result["resumed"],
                      "run_dir": run_dir, "method": spec.method, "method_options": spec.method_options,
                      "train": spec.train}, indent=1))
    return 0
