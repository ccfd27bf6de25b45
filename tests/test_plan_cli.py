"""`distillery plan`: a diffusers folder's config planned from the command line, its JSON, and --vram / --fit."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_distillery import cli
from comfyui_distillery.trainers import planner
from comfyui_distillery.trainers.architectures import arch_from_config

MICRO_DIT_CONFIG = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 4, "patch_size": 2, "in_channels": 4, "out_channels": 4,
    "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 1, "joint_attention_dim": 8,
    "caption_projection_dim": 8, "pooled_projection_dim": 8, "pos_embed_max_size": 8}
FLAGS = ["--method", "tcd", "--rank", "2", "--device", "cpu"]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(MICRO_DIT_CONFIG))
    torch.set_num_threads(1)
    return tmp_path


def _plan(folder, capsys, *extra) -> dict:
    assert cli.main(["plan", "--model", str(folder), *FLAGS, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_peak_the_phases_and_the_settings_planned(folder, capsys):
    out = _plan(folder, capsys, "--vram", "1GB")
    assert out["peak_bytes"] > 0 and out["fits"] is True
    assert set(out["phases"]) == set(planner.CATEGORIES)
    assert out["settings"]["batch_size"] == 4 and out["settings"]["lora_rank"] == 2  # distillery train's defaults
    # a small network: "auto" resolves to no checkpointing and the whole batch in one pass
    assert out["settings"]["gradient_checkpointing"] == "off" and out["settings"]["micro_batch_size"] == 4
    assert out["method"] == "tcd"
    assert out["resolution"] == 32 and out["model_flops_per_iteration"] > 0


def test_vram_too_small_plans_the_cheapest_change_that_fits(folder, capsys):
    arch = arch_from_config(folder)
    target = planner.plan(arch, "tcd", train={"lora_rank": 2, "gradient_checkpointing": "on",
                                              "micro_batch_size": 1}, device="cpu", flops=False)
    out = _plan(folder, capsys, "--vram", f"{(target.peak_bytes + 1) / 2 ** 30}", "--fit")
    assert out["fits"] is False
    assert out["fit"]["changes"] == {"gradient_checkpointing": "on", "micro_batch_size": 1}
    assert out["fit"]["peak_bytes"] == target.peak_bytes == out["fit"]["plan"]["peak_bytes"]


def test_nothing_fits_says_so(folder, capsys):
    out = _plan(folder, capsys, "--vram", "0.000001")
    assert out["fits"] is False and out["fit"] is None


def test_unknown_model_is_one_clear_error(capsys):
    assert cli.main(["plan", "--model", "no-such-model"]) == 2
    assert "choose one of sd15, sdxl, sd3m" in capsys.readouterr().err


def test_the_low_vram_preset_and_explicit_flags(folder, capsys):
    out = _plan(folder, capsys, "--low-vram")
    assert out["settings"]["fp8_base"] is True and out["settings"]["foreach"] is False  # --device cpu: no 8 bits
    explicit = _plan(folder, capsys, "--low-vram", "--fp8-base", "false")
    assert explicit["settings"]["fp8_base"] is False


def test_png_draws_each_iteration_and_the_card(folder, capsys, tmp_path):
    from PIL import Image

    png = tmp_path / "plan.png"
    _plan(folder, capsys, "--vram", "0.000001", "--png", str(png))
    image = Image.open(png).convert("RGB")
    assert image.size[0] == 960 and image.size[1] > 200
    colors = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    from comfyui_distillery.plan_chart import COLORS, DOES_NOT_FIT, FITS

    assert COLORS["frozen weights"] in colors and COLORS["trainable weights"] in colors
    assert DOES_NOT_FIT in colors and FITS not in colors  # the card's line: it does not fit


def test_per_gpu_plans_for_several_gpus_and_a_sharded_base(folder, capsys):
    from comfyui_distillery.trainers.sharding import largest_unit_bytes, sharded_bytes

    one = _plan(folder, capsys)
    data_parallel = _plan(folder, capsys, "--gpus", "2")
    assert data_parallel["peak_bytes"] == one["peak_bytes"]  # each GPU runs the same iteration on its batch
    assert data_parallel["settings"]["gpus"] == 2 and "shard_base" not in data_parallel["settings"]
    sharded = _plan(folder, capsys, "--gpus", "4", "--shard-base")
    network = planner.build_network(arch_from_config(folder), torch.bfloat16, fake=False)
    full = sum(p.numel() * p.element_size() for p in network.parameters())
    delta = sharded_bytes(network, 4) + 2 * largest_unit_bytes(network) - full
    assert sharded["peak_bytes"] == one["peak_bytes"] + delta
    assert sharded["phases"]["frozen weights"] == one["phases"]["frozen weights"] + delta
    assert sharded["settings"]["shard_base"] is True and any("per GPU of 4" in n for n in sharded["notes"])


def test_a_sharded_base_needs_several_gpus_and_is_a_change_to_try_on_them(capsys):
    from comfyui_distillery.cli_plan import changes_to_try

    assert cli.main(["plan", "--model", "sd15", "--shard-base"]) == 2
    assert "shard_base=True: the frozen base is shared out over several GPUs; plan it with --gpus N" \
        in capsys.readouterr().err
    settings = {"gradient_checkpointing": "on", "micro_batch_size": 1, "mixed_precision": "bf16", "lora_rank": 8}
    assert ("shard_base", True) in changes_to_try(settings, "cuda", gpus=2)[-1][1].items()
    assert all("fp8_base" not in changes for _, changes in changes_to_try(settings, "cuda", gpus=2))
    assert "shard_base" not in changes_to_try(settings, "cuda", gpus=1)[-1][1]
