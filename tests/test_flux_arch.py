"""The Flux-class architecture: its config, the one model interface on a Flux transformer, its LoRA targets, and
the VRAM planner on its tiny twin (planned peak against the real CPU peak, as tests/test_planner.py does for the
other families)."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_distillery.core.models import pack_patches, unpack_patches
from comfyui_distillery.trainers import planner
from comfyui_distillery.trainers.architectures import (
    ARCHS, COMFY_FAMILIES, FLUX_DEV_TRANSFORMER, arch_for_family, arch_from_config, diffusion_model, get_arch,
    network_class)
from comfyui_distillery.trainers.lora import targets_for

TINY = get_arch("tiny-flux")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    net = network_class(TINY)(**TINY.config).eval()
    return diffusion_model(TINY, net)


def test_flux_dev_config_has_the_released_parameter_count():
    with torch.device("meta"):
        net = network_class(ARCHS["flux"])(**FLUX_DEV_TRANSFORMER)
    assert sum(p.numel() for p in net.parameters()) == ARCHS["flux"].expected_params == 11_901_408_320
    assert type(net).__name__ == "FluxTransformer2DModel"
    assert len(net.transformer_blocks) == 19 and len(net.single_transformer_blocks) == 38
    flux = ARCHS["flux"]
    # 1024 px -> a 128 x 128 latent of 16 channels -> 64 x 64 packed tokens of 64 values
    assert flux.sample_shape == (16, 128, 128) and flux.pixel_multiple == 16
    assert arch_for_family("Flux") is flux and COMFY_FAMILIES["Flux"] == "flux"


def test_flux_schnell_is_flux_without_the_guidance_embedding():
    """ComfyUI's FluxSchnell family plans as FLUX.1-schnell: the dev blocks less guidance_in (10.2 M)."""
    schnell = arch_for_family("FluxSchnell")
    with torch.device("meta"):
        net = network_class(schnell)(**schnell.config)
    assert sum(p.numel() for p in net.parameters()) == schnell.expected_params == 11_891_178_560
    assert not hasattr(net.time_text_embed, "guidance_embedder") and schnell.guidance_input is None
    assert schnell.sample_shape == ARCHS["flux"].sample_shape and schnell.lora_targets == ARCHS["flux"].lora_targets
    assert get_arch("flux-schnell") is schnell


def test_the_model_interface_calls_flux_as_its_pipeline_does(tiny_model):
    """native() = diffusers' FluxPipeline's own packing, position ids, timestep / 1000 and guidance, unpacked."""
    from diffusers import FluxPipeline

    net = tiny_model.transformer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 6, generator=g)  # not square: rows and columns must not be swapped
    sigma = torch.tensor([0.7, 0.25])
    cond = {"encoder_hidden_states": torch.randn(2, 12, 24, generator=g),
            "pooled_projections": torch.randn(2, 12, generator=g), "guidance": torch.tensor([3.5, 3.5])}
    with torch.no_grad():
        got = tiny_model.native(x, tiny_model.schedule.timestep(sigma), cond)
        packed = FluxPipeline._pack_latents(x, 2, 4, 8, 6)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
        txt_ids = torch.zeros(12, 3)
        ref = net(hidden_states=packed, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, **cond).sample
        # the pipeline's unpack takes pixel sizes and the VAE factor (8): 64 x 48 px is this 8 x 6 latent
        ref = FluxPipeline._unpack_latents(ref, 64, 48, 8)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(unpack_patches(pack_patches(x, 2), 2, 8, 6), x)


def test_guidance_distilled_flux_takes_the_scale_as_an_input_in_one_pass(tiny_model):
    assert tiny_model.guidance_input == "guidance"
    calls = []
    hook = tiny_model.transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 4, 4, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 12, 24, generator=g),
            "pooled_projections": torch.randn(1, 12, generator=g), "guidance": torch.tensor([3.5])}
    uncond = {**cond, "encoder_hidden_states": torch.zeros(1, 12, 24)}
    try:
        with torch.no_grad():
            guided = tiny_model(x, 0.6, cond, uncond, cfg_scale=5.0)
            assert len(calls) == 1  # no CFG pair
            at_five = tiny_model(x, 0.6, {**cond, "guidance": torch.tensor([5.0])})
            at_own = tiny_model(x, 0.6, cond)
    finally:
        hook.remove()
    torch.testing.assert_close(guided, at_five)
    assert not torch.allclose(at_own, at_five)  # the guidance embedding is read
    with pytest.raises(ValueError, match="'guidance'"):
        tiny_model(x, 0.6, {k: v for k, v in cond.items() if k != "guidance"})


def test_flux_lora_targets_cover_both_stream_kinds():
    net = network_class(TINY)(**TINY.config)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]

    def adapted(targets):
        return {n for n in names if any(n == t or n.endswith("." + t) for t in targets)}

    every = adapted(targets_for(TINY.lora_targets, "all"))
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.1.attn.to_q",
            "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out"} <= every
    assert not any("norm" in n or "embed" in n for n in every)  # modulations and embeddings stay frozen
    attention = adapted(targets_for(TINY.lora_targets, "attention"))
    double = {f"transformer_blocks.0.attn.{leaf}" for leaf in
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    single = {f"single_transformer_blocks.{i}.attn.{leaf}" for i in (0, 1) for leaf in ("to_q", "to_k", "to_v")}
    assert attention == double | single


def test_a_diffusers_flux_config_reads_as_the_flux_arch(tmp_path):
    folder = tmp_path / "FLUX.1-dev" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel",
                                                    "_diffusers_version": "0.30.0", "out_channels": None,
                                                    **{k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in FLUX_DEV_TRANSFORMER.items()}}))
    arch = arch_from_config(tmp_path / "FLUX.1-dev")
    flux = ARCHS["flux"]
    for field in ("kind", "class_name", "resolution", "text_tokens", "text_dim", "pooled_dim", "packed_patch",
                  "timestep_scale", "guidance_input", "lora_targets"):
        assert getattr(arch, field) == getattr(flux, field), field
    assert arch.sample_shape == flux.sample_shape


def test_flux_resolution_must_fill_whole_patches():
    with pytest.raises(ValueError, match="multiple of 16"):
        planner.plan(TINY, "tcd", train={"batch_size": 1}, resolution=72, device="cpu", flops=False)


@pytest.mark.parametrize("method, checkpointing", [("dmd2", False), ("sid", True)])
def test_tiny_flux_planned_peak_is_the_real_peak(method, checkpointing, planned_and_real):
    """The dry run on fake tensors predicts the real run's peak on this CPU (tiny Flux twin: both block kinds,
    the guidance input, packed latents). Equal to the byte for these two; the pattern's tolerance is 5%."""
    train = {"batch_size": 2, "lora_rank": 2, "mixed_precision": "bf16", "gradient_checkpointing": checkpointing}
    options = {"student_timesteps": "399", **({"update_ratio": 1} if method == "dmd2" else {})}
    planned, _ = planned_and_real(TINY, method, options, train)
    assert planned.trained_params["student"] > 0 and planned.arch == "tiny-flux"
