"""comfy_backend's checkpoint probe without ComfyUI: the safetensors header reader, the key-based family guess,
and the one-line refusals of files that are not a diffusion model.

Small .safetensors files are written here with safetensors.torch.save_file, with the key names (and, where
the guess reads them, the shapes) of real checkpoints. ComfyUI's own detection on meta tensors is checked
against full-size key sets in a ComfyUI environment (see the module docstring of comfy_backend.py).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from comfyui_distillery import comfy_backend as cb

P = "model.diffusion_model."


@pytest.fixture(autouse=True)
def without_comfyui(monkeypatch):
    """The key-based guess, even where a ComfyUI checkout happens to be importable."""
    monkeypatch.setattr(cb, "_comfy_model_detection", lambda: None)


def ldm_unet(context_dim: int, adm: int | None = None, prefix: str = P) -> dict:
    sd = {
        prefix + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context_dim),
        prefix + "out.2.weight": torch.zeros(4, 8, 3, 3),
        "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
    }
    if adm is not None:
        sd[prefix + "label_emb.0.0.weight"] = torch.zeros(8, adm)
    return sd


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_safetensors_header_reads_names_shapes_dtypes_and_metadata(tmp_path):
    path = write(tmp_path / "m.safetensors", {"a.weight": torch.zeros(3, 5, dtype=torch.float16),
                                               "b": torch.zeros(2, dtype=torch.bfloat16), "c": torch.zeros(())},
                 metadata={"modelspec.title": "tiny"})
    header = cb.safetensors_header(path)
    assert header["__metadata__"] == {"modelspec.title": "tiny"}
    assert header["a.weight"]["shape"] == [3, 5] and header["a.weight"]["dtype"] == "F16"
    assert header["b"]["dtype"] == "BF16" and header["c"]["shape"] == []
    assert set(header) == {"__metadata__", "a.weight", "b", "c"}


def test_safetensors_header_does_not_read_the_weights(tmp_path):
    """The header alone: a file whose data section was never written (a sparse file) still reads."""
    path = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, 4096 * 4096 * 4]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 4096 * 4096 * 4)
    assert cb.safetensors_header(path)["w"]["shape"] == [4096, 4096]


@pytest.mark.parametrize("content, what", [
    (b"", "an empty file"),
    (b"just some notes\nabout a model\n", "a text file (starts with 'just some notes')"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2132625894\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML page"),
    (b"PK\x03\x04" + b"\x00" * 100, "a zip archive"),
    (b"\x80\x02}q\x00" + b"\x00" * 100, "a Python pickle"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 40, "not a safetensors file"),
])
def test_files_that_are_not_safetensors_are_named(tmp_path, content, what):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors: " + what.replace("(", r"\(").replace(")", r"\)")):
        cb.safetensors_header(path)
    with pytest.raises(ValueError) as err:
        cb.probe_checkpoint(path, name="sd/model.safetensors")
    message = str(err.value)
    assert message.startswith("ckpt_name='sd/model.safetensors': " + what) and "\n" not in message
    assert "; " in message  # what it is; the fix


def test_a_truncated_file_is_told_apart(tmp_path):
    path = write(tmp_path / "m.safetensors", {"w": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="a truncated safetensors file .*download the file again"):
        cb.probe_checkpoint(path)


@pytest.mark.parametrize("context_dim, adm, extra, family, prediction", [
    (768, None, {}, "SD15", "epsilon"),
    (1024, None, {}, "SD20", None),  # eps or v: ComfyUI tells them apart by a weight's values
    (2048, 2816, {}, "SDXL", "epsilon"),
    (2048, 2816, {"v_pred": torch.zeros(()), "ztsnr": torch.zeros(())}, "SDXL", "v_prediction"),
    (1280, 2560, {}, "SDXLRefiner", None),
    (320, None, {}, "LDM UNet", None),
])
def test_ldm_unets_are_guessed_from_their_keys(tmp_path, context_dim, adm, extra, family, prediction):
    path = write(tmp_path / "ckpt.safetensors", {**ldm_unet(context_dim, adm), **extra})
    assert cb.probe_checkpoint(path) == {"family": family, "prediction": prediction,
                                         "unet_prefix": P, "detected_by": "keys"}


def test_transformers_are_guessed_from_their_blocks(tmp_path):
    flux = write(tmp_path / "flux.safetensors", {
        P + "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), P + "single_blocks.0.linear1.weight":
        torch.zeros(4, 2), P + "guidance_in.in_layer.weight": torch.zeros(2, 2),
        "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(2, 2)})
    assert cb.probe_checkpoint(flux) == {"family": "Flux", "prediction": "flow", "unet_prefix": P,
                                         "detected_by": "keys"}
    schnell_alone = write(tmp_path / "schnell.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
                                                             "img_in.weight": torch.zeros(2, 2)})
    assert cb.probe_checkpoint(schnell_alone)["family"] == "Flux-class"
    assert cb.probe_checkpoint(schnell_alone)["unet_prefix"] == ""
    sd3 = write(tmp_path / "sd3.safetensors", {P + "joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(6, 2),
                                               P + "x_embedder.proj.weight": torch.zeros(2, 16, 2, 2)})
    assert cb.probe_checkpoint(sd3) == {"family": "SD3", "prediction": "flow", "unet_prefix": P,
                                        "detected_by": "keys"}


@pytest.mark.parametrize("tensors, what", [
    ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8),
      "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, "a LoRA (2 tensors), not a checkpoint"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}, "a LoRA"),
    ({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)},
     "a VAE (2 tensors) without a diffusion model"),
    ({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)}, "a text encoder"),
    ({"emb_params": torch.zeros(2, 768)}, "a textual-inversion embedding"),
    ({"weight": torch.zeros(3), "bias": torch.zeros(3)},
     "2 tensors, none of them a diffusion model ComfyUI recognises (first key 'bias')"),
])
def test_safetensors_without_a_diffusion_model_are_refused_in_one_line(tmp_path, tensors, what):
    path = write(tmp_path / "thing.safetensors", tensors)
    with pytest.raises(ValueError) as err:
        cb.probe_checkpoint(path, name="thing.safetensors")
    message = str(err.value)
    assert message.startswith(f"ckpt_name='thing.safetensors': {what}") and "\n" not in message
    assert "; " in message


def test_a_missing_file():
    with pytest.raises(FileNotFoundError, match="ckpt_name='nope.safetensors': no such file"):
        cb.probe_checkpoint("/nonexistent/nope.safetensors")


def test_meta_state_dict_keeps_shapes_and_reads_only_small_tensors(tmp_path):
    path = write(tmp_path / "m.safetensors", {"big": torch.ones(64, 64, dtype=torch.float16),
                                               "small": torch.arange(6, dtype=torch.float32)})
    sd = cb._meta_state_dict(path, cb.safetensors_header(path))
    assert sd["big"].is_meta and sd["big"].shape == (64, 64) and sd["big"].dtype == torch.float16
    assert not sd["small"].is_meta and sd["small"].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_failing_comfyui_detection_falls_back_to_the_keys(tmp_path, monkeypatch):
    class Broken:
        @staticmethod
        def unet_prefix_from_state_dict(sd):
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(cb, "_comfy_model_detection", lambda: Broken)
    path = write(tmp_path / "ckpt.safetensors", ldm_unet(768))
    assert cb.probe_checkpoint(path)["family"] == "SD15"
