"""comfy_backend.probe_checkpoint with ComfyUI's own detection (skips without COMFYUI_DIR).

ComfyUI's interpreter builds the diffusion models of SD1.5, SD2.x, SDXL, SD3 and Flux on the meta device
with their real configurations, writes each key set as a .safetensors file whose data section is never
written (a sparse file: the header is all the probe reads, plus the few small tensors set here), and
probes it: first with ComfyUI's detection, then with meta tensors only (PROBE_REAL_NUMEL = -1) to show
which families need real values, then with the key-based guess.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import comfy_harness

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE_CHECK = comfy_harness.PACK_IN_COMFY + r"""
import struct
out = sys.argv[3]
from distillery_pack import comfy_backend as cb
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.flux.model import Flux

ops = comfy.ops.disable_weight_init
DT = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}

def write_sparse(path, shapes, real=None):
    real = real or {}
    header, off = {}, 0
    for k, (shape, dt) in shapes.items():
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": DT[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, t in real.items():
            f.seek(8 + len(raw) + header[k]["data_offsets"][0])
            f.write(t.to(shapes[k][1]).contiguous().numpy().tobytes())
        f.truncate(8 + len(raw) + off)

def shapes_of(make, prefix, dtype=torch.float16):
    with torch.device("meta"):
        module = make()
    return {prefix + k: (tuple(v.shape), dtype) for k, v in module.state_dict().items()}

SD15 = dict(image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
            in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SD21 = {k: v for k, v in SD15.items() if k != "num_heads"}
SD21.update(use_linear_in_transformer=True, context_dim=1024, num_head_channels=64)
SDXL = dict(image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False, num_classes="sequential",
            adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
            use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=True)
SD3 = dict(input_size=None, patch_size=2, in_channels=16, depth=24, adm_in_channels=2048, out_channels=16,
           pos_embed_max_size=192, num_patches=36864, pos_embed_scaling_factor=None,
           context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}})
P = "model.diffusion_model."
clip = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ((49408, 768), torch.float16)}

unet = lambda cfg: (lambda: UNetModel(**cfg, device="meta", operations=ops))
sd15, sd21, sdxl = (shapes_of(unet(c), P) for c in (SD15, SD21, SDXL))
flux = lambda guidance: shapes_of(lambda: Flux(**dict(FLUX, guidance_embed=guidance), device="meta", operations=ops),
                                  "", torch.bfloat16)
v_bias = P + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
edm = {"edm_vpred.sigma_max": ((), torch.float32), "edm_vpred.sigma_min": ((), torch.float32)}
files = {
    "sd15": ({**sd15, **clip}, {}),
    "sd21_eps": (sd21, {}),
    "sd21_v": (sd21, {v_bias: torch.randn(320, generator=torch.Generator().manual_seed(0))}),
    "sdxl": (sdxl, {}),
    "sdxl_v": ({**sdxl, "v_pred": ((), torch.float32)}, {}),
    "sdxl_edm_v": ({**sdxl, **edm}, {"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)}),
    "sd3": ({**shapes_of(lambda: MMDiT(**SD3, device="meta", operations=ops), P), **clip}, {}),
    "flux_dev_alone": (flux(True), {}),
    "flux_schnell_full": ({P + k: v for k, v in flux(False).items()} | clip, {}),
}
for name, (shapes, real) in files.items():
    write_sparse(os.path.join(out, name + ".safetensors"), shapes, real)

result = {}
for label, real_numel, detection in (("comfyui", cb.PROBE_REAL_NUMEL, cb._comfy_model_detection),
                                     ("meta_only", -1, cb._comfy_model_detection), ("keys", 1024, lambda: None)):
    cb.PROBE_REAL_NUMEL, cb._comfy_model_detection = real_numel, detection
    result[label] = {name: cb.probe_checkpoint(os.path.join(out, name + ".safetensors")) for name in files}
print(json.dumps(result))
"""

EXPECTED = {  # name: (family, prediction, unet_prefix)
    "sd15": ("SD15", "epsilon", "model.diffusion_model."),
    "sd21_eps": ("SD20", "epsilon", "model.diffusion_model."),
    "sd21_v": ("SD20", "v_prediction", "model.diffusion_model."),
    "sdxl": ("SDXL", "epsilon", "model.diffusion_model."),
    "sdxl_v": ("SDXL", "v_prediction", "model.diffusion_model."),
    "sdxl_edm_v": ("SDXL", "v_prediction_edm", "model.diffusion_model."),
    "sd3": ("SD3", "flow", "model.diffusion_model."),
    "flux_dev_alone": ("Flux", "flow", ""),
    "flux_schnell_full": ("FluxSchnell", "flow", "model.diffusion_model."),
}


def test_probe_runs_comfyuis_detection_on_meta_tensors(comfy_dir, tmp_path):
    proc = subprocess.run([comfy_harness.comfy_python(comfy_dir), "-c", PROBE_CHECK, str(comfy_dir), str(REPO_ROOT),
                           str(tmp_path)], cwd=str(comfy_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (family, prediction, prefix) in EXPECTED.items():
        assert result["comfyui"][name] == {"family": family, "prediction": prediction, "unet_prefix": prefix,
                                           "detected_by": "comfyui"}, (name, result["comfyui"][name])
    # meta tensors alone: the family still, but not the predictions ComfyUI reads from values (SD2's
    # norm-bias std, SDXL's edm_vpred sigmas); the probe reads those small tensors for real
    for name in EXPECTED:
        assert result["meta_only"][name]["family"] == EXPECTED[name][0]
    assert result["meta_only"]["sd21_v"]["prediction"] is None
    assert result["meta_only"]["sdxl_edm_v"]["prediction"] is None
    # the key-based guess agrees on the families it knows
    for name in ("sd15", "sdxl", "sdxl_v", "sd3", "flux_dev_alone"):
        assert (result["keys"][name]["family"], result["keys"][name]["prediction"]) == EXPECTED[name][:2], name
