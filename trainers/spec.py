"""A run, described once: the typed spec the CLI and the ComfyUI node build through the same code.

    spec = RunSpec.build(method="dmd2", method_options={"student_timesteps": "399"},
                         train={"steps": 2000}, teacher=TeacherSpec("world", "digits"))

`RunSpec.build` checks everything that can be checked before a model loads, completely and once: the
method and every one of its options (trainers/registry.py), the training settings, the teacher's kind,
the prompts, the resolution, the real-images folder and whether the method uses it, the output. A job's
config.json is `spec.to_dict()`; the worker only reads it back (`RunSpec.from_dict`, which checks it again,
since a file on disk can be edited) and builds the method and settings from it. Resuming compares specs
(`changes_from`): only a larger `steps` may differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

from . import registry
from .engine import TrainConfig
from .optimizers import check_available

SPEC_VERSION = 2
STORE_KEYS = ("fingerprint", "id", "created")  # what a job's config.json adds around the spec
TEACHER_KINDS = ("checkpoint", "split", "diffusers", "world")
WORLDS = ("gmm", "digits")
# A split teacher's text encoders, by the family of its diffusion model (ComfyUI's supported_models class name): the
# CLIP type ComfyUI's loaders take them with (CLIPLoader / DualCLIPLoader / TripleCLIPLoader's `type`) and how many
# files that type loads together. Families not listed are loaded with the type given, unchecked.
SPLIT_TEXT_ENCODERS = {
    "SD15": ("stable_diffusion", (1,), "CLIP-L"),
    "SD20": ("stable_diffusion", (1,), "CLIP-H"),
    "SDXL": ("sdxl", (2,), "CLIP-L and CLIP-G"),
    "SDXLRefiner": ("stable_diffusion", (1,), "CLIP-G"),
    "SD3": ("sd3", (1, 2, 3), "CLIP-L, CLIP-G and / or T5-XXL"),
    "Flux": ("flux", (2,), "CLIP-L and T5-XXL"),
    "FluxSchnell": ("flux", (2,), "CLIP-L and T5-XXL"),
    "Chroma": ("chroma", (1,), "T5-XXL"),
    "Lumina2": ("lumina2", (1,), "Gemma-2-2B"),
    "QwenImage": ("qwen_image", (1,), "Qwen2.5-VL-7B"),
}
AUTO_CLIP_TYPE = "auto"  # the type of the family's row above


def _file_name(path) -> str:
    return str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _te_example(family: str | None) -> str:
    row = SPLIT_TEXT_ENCODERS.get(family or "")
    return f"{row[2]} for {family}" if row else "clip_l.safetensors for SD1.5, clip_l + t5xxl for Flux"


def split_clip_type(family: str | None, clip_type: str | None, count: int) -> str:
    """The CLIP type a split teacher's `count` text encoders load with: `clip_type` ("auto" or None: the family's
    own), checked against the diffusion model's family; ValueError names the input and the fix."""
    clip_type = str(clip_type or AUTO_CLIP_TYPE).strip().lower()
    row = SPLIT_TEXT_ENCODERS.get(family or "")
    if row is None:
        if clip_type == AUTO_CLIP_TYPE:
            raise ValueError(f"clip_type: Distillery does not know which CLIP type a {family or 'this'} diffusion "
                             f"model takes; pick the type you load its text encoders with in ComfyUI's CLIP loader")
        return clip_type
    own, counts, encoders = row
    if clip_type == AUTO_CLIP_TYPE:
        clip_type = own
    if clip_type != own:
        raise ValueError(f"clip_type={clip_type!r}: a {family} diffusion model takes its text encoders ({encoders}) "
                         f"as type {own!r}; pick {own} (or auto)")
    if count not in counts:
        wanted = " or ".join(str(n) for n in counts)
        raise ValueError(f"text_encoders: a {family} diffusion model takes {wanted} text-encoder file"
                         f"{'s' if counts[-1] > 1 else ''} ({encoders}), {count} given; give {encoders}")
    return clip_type


def parse_prompts(*texts: str | None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    prompts = []
    for text in texts:
        for line in (text or "").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    return prompts


@dataclass
class TeacherSpec:
    kind: str  # checkpoint: a single file read by ComfyUI's loader | diffusers: a folder | world: gmm, digits
    path: str  # the file, the folder, or the world's name
    name: str = ""  # what the user picked (ComfyUI's ckpt_name); the path's name when empty
    family: str | None = None  # what the checkpoint's header says it is (SD15, SDXL, Flux, ...)
    options: dict = field(default_factory=dict)  # the task's own settings (a world's size, a folder's dtype)
    # the user's LoRA stack on the checkpoint, in order: {name, path, strength_model, strength_clip}
    loras: list = field(default_factory=list)
    # a split teacher (kind "split"; `path` is its diffusion-model file, as UNETLoader loads it): its text encoders
    # ({name, path}, loaded together as ComfyUI's CLIP loaders do, with the CLIP type `clip_type`) and its VAE
    # ({name, path}, as VAELoader loads it)
    text_encoders: list = field(default_factory=list)
    clip_type: str | None = None
    vae: dict | None = None


@dataclass
class DataSpec:
    prompts: list = field(default_factory=list)
    negative_prompt: str = ""
    resolution: int | None = None  # pixels; None: the model's own (worlds have a fixed size)
    real_images: str | None = None  # a folder of the user's images
    real_images_signature: str | None = None  # names, sizes and times of its files: a new set trains anew


@dataclass
class OutputSpec:
    lora_name: str | None = None
    lora_path: str | None = None


@dataclass
class RunSpec:
    method: str
    method_options: dict
    train: dict
    teacher: TeacherSpec
    data: DataSpec = field(default_factory=DataSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    device: str = "cpu"
    comfy_root: str | None = None
    name: str = ""
    version: int = SPEC_VERSION

    # --- building and checking ----------------------------------------------------------------------
    @classmethod
    def build(cls, *, method: str, method_options: dict | None = None, train: dict | None = None,
              teacher: TeacherSpec, data: DataSpec | None = None, output: OutputSpec | None = None,
              device: str = "cpu", comfy_root: str | None = None, name: str = "") -> "RunSpec":
        spec = cls(method=str(method or "").strip().lower(), method_options=dict(method_options or {}),
                   train=dict(train or {}), teacher=teacher, data=data or DataSpec(), output=output or OutputSpec(),
                   device=device, comfy_root=comfy_root, name=name)
        return spec.validate()

    def validate(self) -> "RunSpec":
        """Check and complete every part (defaults filled in, values typed); ValueError names the field."""
        info = registry.get(self.method)
        self.method = info.name
        options = registry.build(info.options, self.method_options, owner=f"method {info.name}")
        info.make(options)  # the method's checks across its options (e.g. DMD2's critic_per_step with exit_step)
        self.method_options = registry.to_json(options)
        train = {k: v for k, v in self.train.items() if k != "run_dir"}  # the job's folder is the run's
        self.train = registry.to_json(TrainConfig(**registry.build(TrainConfig, train, owner="the training "
                                                                   "settings", partial=True)).validate())
        self.train.pop("run_dir", None)
        self._check_teacher()
        self._check_data(info)
        if self.output.lora_name is not None and not str(self.output.lora_name).endswith(".safetensors"):
            raise ValueError(f"lora_name={self.output.lora_name!r}: a .safetensors file name")
        if self.device not in ("cpu", "cuda", "mps", "xpu") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: cpu, cuda, cuda:N, mps or xpu")
        check_available(SimpleNamespace(optimizer=self.train["optimizer"]), self.device)
        if not self.name:
            self.name = (self.output.lora_name or "")[: -len(".safetensors")] or \
                f"{self.teacher.name or self.teacher.path}-{self.method}"
        return self

    def _check_teacher(self) -> None:
        t = self.teacher
        if isinstance(t, dict):
            self.teacher = t = TeacherSpec(**t)
        if t.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher.kind={t.kind!r}: one of {', '.join(TEACHER_KINDS)}")
        if t.kind == "world" and t.path not in WORLDS:
            raise ValueError(f"model={t.path!r}: the built-in worlds are {', '.join(WORLDS)}")
        if not t.path:
            raise ValueError("model: give a checkpoint, a diffusers folder or a built-in world")
        t.name = t.name or _file_name(t.path)
        if t.loras and t.kind not in ("checkpoint", "split"):
            raise ValueError("teacher LoRAs: a LoRA stack is applied by ComfyUI's loader, to a checkpoint teacher; "
                             "give a single-file checkpoint, or a diffusion model with its text encoders and VAE")
        t.loras = [self._check_lora(i, lora) for i, lora in enumerate(t.loras)]
        if t.kind == "split":
            self._check_split(t)
        elif t.text_encoders or t.vae or t.clip_type:
            given = "text_encoders" if t.text_encoders else "vae" if t.vae else "clip_type"
            raise ValueError(f"{given}: only a split teacher (a diffusion-model file) takes separate text encoders "
                             f"and a VAE; a {t.kind} teacher brings its own")

    @staticmethod
    def _check_split(t: TeacherSpec) -> None:
        """A diffusion model's text encoders and VAE: each a file, their CLIP type the one its family takes."""
        files = []
        for i, te in enumerate(t.text_encoders):
            te = {"path": te} if isinstance(te, str) else te
            if not isinstance(te, dict) or not te.get("path"):
                raise ValueError(f"text encoder {i + 1}: give the text-encoder file (models/text_encoders)")
            files.append({"name": str(te.get("name") or _file_name(te["path"])), "path": str(te["path"])})
        if not files:
            raise ValueError(f"text_encoders: the diffusion model {t.name} needs its text-encoder files (ComfyUI's "
                             f"models/text_encoders, as CLIPLoader loads them), e.g. "
                             f"{_te_example(t.family)}")
        t.text_encoders = files
        vae = {"path": t.vae} if isinstance(t.vae, str) else t.vae
        if not isinstance(vae, dict) or not vae.get("path"):
            raise ValueError(f"vae: the diffusion model {t.name} needs its VAE file (ComfyUI's models/vae, as "
                             f"VAELoader loads it)")
        t.vae = {"name": str(vae.get("name") or _file_name(vae["path"])), "path": str(vae["path"])}
        t.clip_type = split_clip_type(t.family, t.clip_type, len(files))

    @staticmethod
    def _check_lora(index: int, lora: dict) -> dict:
        where = f"teacher LoRA {index + 1}"
        if not isinstance(lora, dict) or not lora.get("path"):
            raise ValueError(f"{where}: give the LoRA file")
        checked = {"name": str(lora.get("name") or str(lora["path"]).replace("\\", "/").rsplit("/", 1)[-1]),
                   "path": str(lora["path"])}
        for key in ("strength_model", "strength_clip"):
            value = lora.get(key, 1.0)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where} ({checked['name']}): {key}={value!r}: use a number, e.g. 1.0") from None
            if not -100 <= value <= 100:
                raise ValueError(f"{where} ({checked['name']}): {key}={value}: use a strength in [-100, 100]")
            checked[key] = value
        return checked

    def _check_data(self, info: registry.MethodInfo) -> None:
        d = self.data
        if isinstance(d, dict):
            self.data = d = DataSpec(**d)
        d.prompts = [str(p).strip() for p in d.prompts if str(p).strip()]
        if self.teacher.kind in ("checkpoint", "split") and not d.prompts:
            raise ValueError("prompts: give at least one prompt (one per line), or a prompts file")
        if d.resolution is not None:
            if self.teacher.kind == "world":
                raise ValueError(f"resolution: the built-in {self.teacher.path} world has a fixed size; leave it "
                                 f"unset")
            d.resolution = int(d.resolution)
            if not 8 <= d.resolution <= 8192:  # the model's own multiple is checked when its task is built
                raise ValueError(f"resolution={d.resolution}: use the model's size in pixels, e.g. 512 for SD1.5, "
                                 f"1024 for SDXL")
        if d.real_images is not None and self.teacher.kind == "world":
            raise ValueError(f"real_images: the built-in {self.teacher.path} world brings its own real data; "
                             f"real images are for your own model")
        gan = float(self.method_options.get("gan_generator_weight") or 0.0)
        if self.teacher.kind != "world":  # the worlds bring their own real images
            if gan > 0 and not d.real_images:
                raise ValueError(f"gan_generator_weight={gan:g}: the GAN term needs real images; give a "
                                 f"real-images folder, or set the weight to 0 for data-free training")
            if d.real_images and info.real_images == "gan" and gan <= 0:
                raise ValueError(f"real_images: {info.display_name} uses real images only for its GAN term; set "
                                 f"gan_generator_weight > 0 (e.g. 0.005) or remove the folder")

    # --- what the worker builds -----------------------------------------------------------------------
    def make_method(self):
        return registry.make_method(self.method, self.method_options)

    def train_config(self, run_dir: str, **overrides) -> TrainConfig:
        values = dict(self.train, run_dir=str(run_dir), **overrides)
        values["betas"] = tuple(values["betas"])
        return TrainConfig(**values).validate()

    # --- (de)serialising, identity, resume --------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fingerprint"] = self.fingerprint()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        data = {k: v for k, v in dict(data).items() if k not in STORE_KEYS}
        version = int(data.get("version", 0) or 0)
        if version != SPEC_VERSION:
            raise ValueError(f"run spec version {version}: this version of Distillery reads version "
                             f"{SPEC_VERSION}; start the run again")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"run spec: unknown keys {unknown}")
        data["teacher"] = TeacherSpec(**data["teacher"])
        data["data"] = DataSpec(**data.get("data", {}))
        data["output"] = OutputSpec(**data.get("output", {}))
        return cls(**data).validate()

    def fingerprint(self) -> str:
        """A stable hash of what the run trains: not where it runs or what it is called, and not how long (the
        same run with more steps is that run, trained further)."""
        what = dataclasses.asdict(self)
        for volatile in ("name", "device", "comfy_root"):
            what.pop(volatile)
        if self.teacher.kind != "split":  # other teachers' identity is what it is without a split teacher's fields
            for key in ("text_encoders", "clip_type", "vae"):
                what["teacher"].pop(key)
        what["train"].pop("steps")
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def changes_from(self, earlier: "RunSpec") -> list[str]:
        """What differs from `earlier` other than a larger step count: a run cannot resume across these."""
        now, then = dataclasses.asdict(self), dataclasses.asdict(earlier)
        changes = []
        for part in ("method", "method_options", "train", "teacher", "data", "output"):
            a, b = then[part], now[part]
            if isinstance(a, dict):
                for key in sorted(set(a) | set(b)):
                    if a.get(key) == b.get(key):
                        continue
                    if part == "train" and key == "steps" and int(b.get(key)) >= int(a.get(key)):
                        continue
                    changes.append(f"{part}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
            elif a != b:
                changes.append(f"{part}: {a!r} -> {b!r}")
        return changes
