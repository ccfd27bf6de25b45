"""The parts of a run that come from the user's files, each a node with a typed output for Start
Distillation: the teacher (DISTILL_TEACHER: a checkpoint, or a diffusion model with its text encoders and VAE, and
the user's LoRAs on it), the prompts (DISTILL_PROMPTS) and a folder of real images (DISTILL_IMAGES). Each checks
its own input in validate_inputs, so ComfyUI shows an error on that input, before anything is queued or loaded;
user-named paths stay inside ComfyUI's folders (models/* for model files, input/ for prompts and images).
"""

from __future__ import annotations

from ..jobs import options as jo
from ..trainers.spec import AUTO_CLIP_TYPE
from ._api import io, ui

CATEGORY = "Distillery/training"
TeacherSocket = io.Custom("DISTILL_TEACHER")
PromptsSocket = io.Custom("DISTILL_PROMPTS")
ImagesSocket = io.Custom("DISTILL_IMAGES")
DEFAULT_PROMPTS = ("a photo of a cat sitting on a windowsill, soft morning light\n"
                   "a watercolor painting of a mountain lake at dusk\n"
                   "portrait of an old fisherman, detailed, 85mm photo\n"
                   "a cozy cabin in a snowy forest, digital illustration")


def validation(check, value):
    """validate_inputs' answer: True, or the ValueError's message (None: the input comes by a link and is
    checked when the node runs)."""
    if value is None:
        return True
    try:
        check(value)
    except ValueError as err:
        return str(err)
    return True


def _input_dir() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def probe_teacher(ckpt_name: str) -> dict:
    """The checkpoint's family from its header (no weights loaded); ValueError names the file."""
    import folder_paths

    from ..comfy_backend import has_text_encoder, probe_checkpoint, safetensors_header

    path = folder_paths.get_full_path("checkpoints", ckpt_name)
    if path is None:
        raise ValueError(f"ckpt_name={ckpt_name!r}: not in models/checkpoints; pick one from the list")
    found = probe_checkpoint(path, name=ckpt_name)
    if not has_text_encoder(safetensors_header(path)):  # the prompts are encoded by the checkpoint's own
        raise ValueError(f"ckpt_name={ckpt_name!r}: holds a diffusion model but no text encoder; give a full "
                         f"checkpoint (model, text encoders and VAE in one file), or put the file in "
                         f"models/diffusion_models and use Distillery Teacher Diffusion Model with its text "
                         f"encoders and VAE")
    return {"kind": "checkpoint", "name": ckpt_name, "path": path, **found}


class DistilleryTeacherCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="DistilleryTeacherCheckpoint",
            display_name="Distillery Teacher Checkpoint",
            category=CATEGORY,
            description=("The teacher to distil: a checkpoint in models/checkpoints (SD1.5, SDXL, ...). Its file "
                         "header is read to check that ComfyUI detects it as a diffusion model (no weights are "
                         "loaded here; the job's worker loads them)."),
            inputs=[io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                                   tooltip="the checkpoint you sample with; the student learns its images")],
            outputs=[TeacherSocket.Output(display_name="teacher")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name=None):
        return validation(probe_teacher, ckpt_name)

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        teacher = probe_teacher(ckpt_name)
        return io.NodeOutput(teacher, ui=ui.PreviewText(f"{ckpt_name}: {teacher.get('family') or 'a diffusion model'}"))


NO_FILE = "none"  # an unused text-encoder input
CLIP_INPUTS = ("clip_name1", "clip_name2", "clip_name3")


def _in_folder(folder: str, name: str, field: str) -> tuple[str, str, str]:
    """(path, name, input) of a file picked from one of ComfyUI's model folders, found the way its loaders find
    it (folder_paths.get_full_path: the name cannot lead out of the folder)."""
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{field}={name!r}: not in models/{folder}; pick one from the list")
    return path, name, field


def probe_split_teacher(unet_name: str, clip_name1: str, clip_name2: str, clip_name3: str, type: str,
                        vae_name: str) -> dict:
    """A diffusion model with its text encoders and VAE, checked from the files' headers (no weights loaded):
    the model's family, each file what its input says, the CLIP type the family takes; ValueError names the
    input."""
    from ..comfy_backend import probe_split_teacher as probe

    model = _in_folder("diffusion_models", unet_name, "unet_name")
    encoders = [_in_folder("text_encoders", name, field)
                for field, name in zip(CLIP_INPUTS, (clip_name1, clip_name2, clip_name3)) if name and name != NO_FILE]
    if not encoders:
        raise ValueError("clip_name1: pick the model's text encoder from models/text_encoders")
    vae = _in_folder("vae", vae_name, "vae_name")
    found = probe(model, encoders, vae, type)
    return {"kind": "split", "name": unet_name, "path": model[0], **found,
            "text_encoders": [{"name": name, "path": path} for path, name, _ in encoders],
            "vae": {"name": vae_name, "path": vae[0]}}


class DistilleryTeacherDiffusionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        from ..comfy_backend import clip_type_names

        encoders = folder_paths.get_filename_list("text_encoders")
        return io.Schema(
            node_id="DistilleryTeacherDiffusionModel",
            display_name="Distillery Teacher Diffusion Model (+ text encoders, VAE)",
            category=CATEGORY,
            description=("The teacher to distil as split files, the way Flux and SD3.5 are distributed: a diffusion "
                         "model from models/diffusion_models (as UNETLoader loads it), its text encoders from "
                         "models/text_encoders with their CLIP type (as CLIPLoader / DualCLIPLoader / "
                         "TripleCLIPLoader load them; auto: the type the model's family takes) and its VAE from "
                         "models/vae. The files' headers are checked here (no weights are loaded; the job's worker "
                         "loads them with ComfyUI's loaders)."),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="the diffusion model you sample with (e.g. flux1-dev.safetensors)"),
                io.Combo.Input("clip_name1", options=encoders,
                               tooltip="its text encoder (e.g. clip_l.safetensors)"),
                io.Combo.Input("clip_name2", options=[NO_FILE, *encoders], default=NO_FILE,
                               tooltip="a second text encoder, for models with two (Flux: t5xxl; SDXL: clip_g)"),
                io.Combo.Input("clip_name3", options=[NO_FILE, *encoders], default=NO_FILE,
                               tooltip="a third text encoder (SD3 / SD3.5: clip_l, clip_g and t5xxl)"),
                io.Combo.Input("type", options=[AUTO_CLIP_TYPE, *clip_type_names()], default=AUTO_CLIP_TYPE,
                               tooltip="the CLIP type you load these text encoders with in ComfyUI; auto: the one "
                                       "the diffusion model's family takes (flux, sd3, stable_diffusion, ...)"),
                io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae"),
                               tooltip="its VAE (e.g. ae.safetensors for Flux)"),
            ],
            outputs=[TeacherSocket.Output(display_name="teacher")],
        )

    @classmethod
    def validate_inputs(cls, unet_name=None, clip_name1=None, clip_name2=None, clip_name3=None, type=None,
                        vae_name=None):
        values = (unet_name, clip_name1, clip_name2, clip_name3, type, vae_name)
        if any(v is None for v in values):  # one comes by a link: checked when the node runs
            return True
        return validation(lambda v: probe_split_teacher(*v), values)

    @classmethod
    def execute(cls, unet_name, clip_name1, clip_name2, clip_name3, type, vae_name) -> io.NodeOutput:
        teacher = probe_split_teacher(unet_name, clip_name1, clip_name2, clip_name3, type, vae_name)
        encoders = ", ".join(te["name"] for te in teacher["text_encoders"])
        return io.NodeOutput(teacher, ui=ui.PreviewText(
            f"{unet_name}: {teacher.get('family') or 'a diffusion model'}; text encoders {encoders} "
            f"({teacher['clip_type']}); VAE {vae_name}"))


def lora_path(lora_name: str) -> str:
    """A LoRA in models/loras, checked by its header (no weights read); ValueError names the input."""
    import folder_paths

    from ..comfy_backend import safetensors_header

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise ValueError(f"lora_name={lora_name!r}: not in models/loras; pick one from the list")
    try:
        safetensors_header(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"lora_name={lora_name!r}: not a readable LoRA file ({err})") from None
    return path


class DistilleryTeacherLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="DistilleryTeacherLoRA",
            display_name="Distillery Teacher LoRA",
            category=CATEGORY,
            description=("Adds one of your LoRAs to the teacher, as LoraLoader adds it to a MODEL and CLIP: the "
                         "student learns what you sample, the checkpoint with your LoRA stack. Chain several. The "
                         "job's worker applies them with ComfyUI's own LoRA loading and merges them into the "
                         "frozen base; the student's card lists them, so load the same LoRAs under the student."),
            inputs=[TeacherSocket.Input("teacher", tooltip="from Distillery Teacher Checkpoint, Teacher Diffusion "
                                                         "Model or another Teacher LoRA"),
                    io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="a LoRA from models/loras"),
                    io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                    io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01)],
            outputs=[TeacherSocket.Output(display_name="teacher")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return validation(lora_path, lora_name)

    @classmethod
    def execute(cls, teacher, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        lora = {"name": lora_name, "path": lora_path(lora_name), "strength_model": float(strength_model),
                "strength_clip": float(strength_clip)}
        stacked = {**teacher, "loras": [*teacher.get("loras", []), lora]}
        text = " + ".join([teacher["name"]] + [f"{x['name']} ({x['strength_model']:g})" for x in stacked["loras"]])
        return io.NodeOutput(stacked, ui=ui.PreviewText(text))


class DistilleryPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryPrompts",
            display_name="Distillery Prompts",
            category=CATEGORY,
            description=("The prompts the student is distilled on: one per line (lines starting with # are "
                         "skipped), plus an optional text file in ComfyUI's input folder."),
            inputs=[
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS, dynamic_prompts=False,
                                tooltip="one prompt per line; the student learns the teacher's images for prompts "
                                        "like these"),
                io.String.Input("prompts_file", default="",
                                tooltip="optional: a text file with one prompt per line, relative to ComfyUI's "
                                        "input folder; added to the prompts above"),
                io.String.Input("negative_prompt", default="",
                                tooltip="the teacher's negative prompt for classifier-free guidance"),
            ],
            outputs=[PromptsSocket.Output(display_name="prompts")],
        )

    @classmethod
    def validate_inputs(cls, prompts_file=None):
        return validation(lambda name: jo.read_prompts_file(name, _input_dir()), prompts_file)

    @classmethod
    def execute(cls, prompts, prompts_file, negative_prompt) -> io.NodeOutput:
        found = jo.parse_prompts(prompts, jo.read_prompts_file(prompts_file, _input_dir()))
        if not found:
            raise ValueError("prompts: give at least one prompt (one per line), or a prompts file")
        return io.NodeOutput({"prompts": found, "negative_prompt": negative_prompt or ""},
                             ui=ui.PreviewText(f"{len(found)} prompts"))


class DistilleryRealImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DistilleryRealImages",
            display_name="Distillery Real Images",
            category=CATEGORY,
            description=("A folder of your own images in ComfyUI's input folder (captions as name.txt beside "
                         "them). DMD2 / SiD: the GAN term's real data (set the method's gan_generator_weight); "
                         "TCD: its training data instead of teacher samples."),
            inputs=[io.String.Input("folder", default="",
                                    tooltip="a folder inside ComfyUI's input folder, e.g. my_style")],
            outputs=[ImagesSocket.Output(display_name="real_images")],
        )

    @classmethod
    def _images(cls, folder: str) -> tuple[str, int]:
        from ..trainers.real_images import list_images

        resolved = jo.resolve_images_folder(folder, _input_dir(), "folder")
        if resolved is None:
            raise ValueError("folder: name a folder of images inside ComfyUI's input folder")
        return resolved, len(list_images(resolved, "folder"))  # every image readable, before anything is queued

    @classmethod
    def validate_inputs(cls, folder=None):
        return validation(cls._images, folder)

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        resolved, count = cls._images(folder)
        return io.NodeOutput({"folder": resolved, "signature": jo.folder_signature(resolved)},
                             ui=ui.PreviewText(f"{count} images"))


NODES = [DistilleryTeacherCheckpoint, DistilleryTeacherDiffusionModel, DistilleryTeacherLoRA, DistilleryPrompts,
         DistilleryRealImages]
