"""Shared fixtures: a tiny random Stable Diffusion folder, built offline in seconds."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import torch


def build_tiny_pipeline(folder):
    """A random StableDiffusionPipeline (tiny UNet / VAE / CLIP, a character-level tokenizer), offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture
def planned_and_real():
    """plan(arch, method, options, train) -> (planned, real): the planner's dry run on fake tensors and the same
    run on real tensors on this CPU, after the checks every such test makes: the same iteration kinds, each
    planned peak within 5% of the real one, and weights and optimizer state equal to the byte."""
    from comfyui_distillery.trainers import planner

    def plan(arch, method, options, train):
        planned = planner.plan(arch, method, options, train=train, device="cpu", fake=True, flops=False)
        real = planner.plan(arch, method, options, train=train, device="cpu", fake=False, flops=False)
        assert [it.phases for it in planned.iterations] == [it.phases for it in real.iterations]
        for p, r in zip(planned.iterations, real.iterations):
            assert abs(p.peak_bytes - r.peak_bytes) <= 0.05 * r.peak_bytes, (p.phases, p.peak_bytes, r.peak_bytes)
            for category in ("frozen weights", "trainable weights", "optimizer state"):
                assert p.breakdown[category] == r.breakdown[category]
        return planned, real

    return plan


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: extra threads only spin against each other on a small shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    pytest.importorskip("transformers")
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipe"))


REPO_ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package


def _python_files(root: Path) -> list[Path]:
    """The repository's own .py files, relative to it: hidden folders (.git, .venv, .ci-venv), virtual
    environments under any name (a pyvenv.cfg), caches, node_modules and *.egg-info are not the project's."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")
                         and not d.endswith(".egg-info") and not (here / d / "pyvenv.cfg").exists())
        found.extend((here / f).relative_to(root) for f in files if f.endswith(".py"))
    return sorted(found)


@pytest.fixture(scope="session")
def python_files_under():
    """_python_files(root): what the source-tree tests read below a folder."""
    return _python_files


@pytest.fixture(scope="session")
def package_python_files() -> list[Path]:
    return _python_files(REPO_ROOT)
