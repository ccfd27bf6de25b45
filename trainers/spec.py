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
TEACHER_KINDS = ("checkpoint", "diffusers", "world")
WORLDS = ("gmm", "digits")


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
        self.method_options = registry.to_json(registry.build(info.options, self.method_options,
                                                              owner=f"method {info.name}"))
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
        t.name = t.name or str(t.path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        if t.loras and t.kind != "checkpoint":
            raise ValueError("teacher LoRAs: a LoRA stack is applied by ComfyUI's loader, to a checkpoint teacher; "
                             "give a single-file checkpoint")
        t.loras = [self._check_lora(i, lora) for i, lora in enumerate(t.loras)]

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
        if self.teacher.kind == "checkpoint" and not d.prompts:
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
