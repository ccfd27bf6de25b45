"""The student card: what a distilled LoRA is and how to sample it, as one versioned, typed object.

It is written once, with the LoRA, as the JSON value of the safetensors metadata key `distillery.card`
(one JSON object, so every value keeps its type: a hex hash stays a string, timesteps stay numbers). The
loader node, the CLI and the LoRA lists read it from the file's header alone. Cards of the first format
(flat `distillery.*` keys, each JSON-encoded on its own) are read too.

Pure Python: no torch, so listing models/loras stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

CARD_KEY = "distillery.card"
CARD_VERSION = 3
# version 3 added `experts` (Phased DMD): only cards that have experts are written as version 3, so readers of
# version 2 keep reading every other card and refuse a phased one instead of loading no expert
EXPERTS_CARD_VERSION = 3


def check_experts(experts) -> None:
    """A card's `experts` as its readers use them: a list of entries in sampling order, each with a non-empty
    key prefix of its own (none the start of another, so every LoRA key belongs to one expert) and a start
    timestep, strictly decreasing. ValueError names what is wrong."""
    if not isinstance(experts, list) or not experts or not all(isinstance(e, dict) for e in experts):
        raise ValueError(f"{CARD_KEY}: experts must be a non-empty list of entries, got {str(experts)[:80]}")
    prefixes = [e.get("prefix") for e in experts]
    if not all(isinstance(p, str) and p for p in prefixes) or len(set(prefixes)) != len(prefixes) or any(
            a != b and b.startswith(a) for a in prefixes for b in prefixes):
        raise ValueError(f"{CARD_KEY}: the experts' key prefixes {prefixes} must be distinct, non-empty and none "
                         f"the start of another")
    starts = [e.get("start_timestep") for e in experts]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in starts) or any(
            b >= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"{CARD_KEY}: the experts' start timesteps {starts} must be numbers, strictly decreasing")


@dataclass
class StudentCard:
    method: str
    sampler: str  # x0_renoise | tcd: the sampler the student was trained for
    timesteps: list  # the recommended timesteps, noisiest first, on the 0..1000 training scale
    prediction_type: str  # of the base model: epsilon | v_prediction | flow | sample
    cfg: float = 1.0  # guidance is baked in: sample at CFG 1
    gamma: float | None = None  # TCD sampler gamma
    # Phased DMD: one entry per expert, in sampling order: {expert (1-based), prefix (its keys in the LoRA file),
    # timesteps (the student timesteps it runs), start_timestep / end_timestep (its subinterval on the training
    # scale: it runs at levels <= start, hands over at end; 0 for the last), sigma_start / sigma_end (the same
    # through the trained schedule; None = the top)}. None: one LoRA for every level
    experts: list | None = None
    method_options: dict = field(default_factory=dict)  # the method's options, every field
    train: dict = field(default_factory=dict)  # the training settings that made it
    steps_trained: int = 0
    lora_rank: int = 0
    task: str = ""  # the kind of teacher: comfy, diffusers, digits, gmm
    base_model_hash: str = ""  # a fingerprint of the frozen base's weights
    base_checkpoint: str | None = None  # the teacher's file name (ComfyUI jobs, single-file checkpoints)
    # the LoRA stack the teacher carried ({name, strength_model, strength_clip}): the student was trained on
    # top of it, so it samples as intended with the same LoRAs loaded under it
    teacher_loras: list = field(default_factory=list)
    # a split teacher's files, by their names in ComfyUI's folders: {diffusion_model, text_encoders, clip_type, vae}
    teacher_files: dict | None = None
    # guidance-distilled bases (Flux-dev-class): the guidance input the student was trained at; sample it with
    # FluxGuidance at this value (and cfg 1). None: a CFG base
    guidance: float | None = None
    resolution: int | None = None
    prompts: int = 0  # how many prompts it was distilled on
    job: str | None = None
    created: str = ""
    card_version: int = 2  # the oldest reader version that understands this card (see EXPERTS_CARD_VERSION)

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata that carries the card (string values, as the format wants)."""
        data = dataclasses.asdict(self)
        if self.experts:  # readers before version 3 would apply no expert at all: make them refuse it
            data["card_version"] = max(int(data["card_version"]), EXPERTS_CARD_VERSION)
        return {CARD_KEY: json.dumps(data, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "StudentCard | None":
        """The card in a LoRA's metadata (raw strings as read from the header), or None if it has none."""
        raw = metadata.get(CARD_KEY)
        if raw is not None:
            data = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(data, dict) or "method" not in data:
                raise ValueError(f"{CARD_KEY} is not a student card (no method)")
            if int(data.get("card_version", 0)) > CARD_VERSION:
                raise ValueError(f"the student card is version {data['card_version']}; this version of "
                                 f"Distillery reads up to {CARD_VERSION}: update the node pack")
            known = {f.name for f in dataclasses.fields(cls)}
            try:
                card = cls(**{k: v for k, v in data.items() if k in known})
            except TypeError as err:  # a field the card must have is missing
                raise ValueError(f"{CARD_KEY} is incomplete ({err})") from None
            if card.experts is not None:
                check_experts(card.experts)
            return card
        if "distillery.method" in metadata:
            return cls._from_flat_keys(metadata)
        return None

    @classmethod
    def _from_flat_keys(cls, metadata: dict) -> "StudentCard":
        """The first format: one `distillery.<name>` key per value, numbers and lists JSON-encoded."""
        def value(name, default=None, text=False):
            raw = metadata.get(f"distillery.{name}", default)
            if text or not isinstance(raw, str):
                return raw
            try:
                return json.loads(raw)
            except ValueError:
                return raw

        timesteps = value("timesteps") or []
        if isinstance(timesteps, str):
            timesteps = [float(s) for s in timesteps.strip("[]").split(",") if s.strip()]
        return cls(method=value("method", text=True), sampler=value("sampler", "x0_renoise", text=True),
                   timesteps=list(timesteps), prediction_type=value("prediction_type", "epsilon", text=True),
                   cfg=float(value("cfg", 1.0) or 1.0), gamma=value("gamma"),
                   steps_trained=int(value("steps_trained", 0) or 0), lora_rank=int(value("lora_rank", 0) or 0),
                   task=value("task", "", text=True) or "", base_model_hash=value("base_model_hash", "", text=True),
                   base_checkpoint=value("base_checkpoint", None, text=True),
                   resolution=value("resolution"), prompts=int(value("prompts", 0) or 0),
                   job=value("job", None, text=True), created=value("created", "", text=True) or "",
                   card_version=int(value("format", 1) or 1))

    def sampler_choice(self) -> tuple[str, dict]:
        """(sampler name in sampling.SAMPLERS, its options) the student was trained for."""
        if self.sampler == "tcd":
            return "tcd", {"gamma": float(self.gamma if self.gamma is not None else 0.3)}
        if self.sampler == "x0_renoise":
            return "x0_renoise", {"lcm_boundary": False}
        if self.sampler == "ddim":
            return "ddim", {}
        raise ValueError(f"the student's card names sampler {self.sampler!r}, which this version does not know")

    def expert_boundaries(self) -> list:
        """The training-scale timesteps where experts 2..K take over (empty for a one-LoRA student)."""
        return [e["start_timestep"] for e in (self.experts or [])[1:]]

    def recommended_timesteps(self) -> list:
        if not self.timesteps:
            raise ValueError("the student's card has no timesteps")
        return [int(s) if float(s).is_integer() else float(s) for s in self.timesteps]
