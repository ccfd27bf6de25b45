"""Tests of the tiny image world (comfyui_distillery.worlds.digits): shipped weights, data split,
evaluator, metrics and the teacher's quality bar."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sklearn")

import comfyui_distillery.worlds.digits as dw  # noqa: E402
from comfyui_distillery.worlds.digits import metrics as dm  # noqa: E402

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2")


@pytest.fixture(scope="module")
def teacher():
    return dw.load_teacher()


@pytest.fixture(scope="module")
def evaluator():
    return dw.load_evaluator()


@pytest.fixture(scope="module")
def test_set():
    return dw.load_digits_16("test")


def test_data_split_is_fixed():
    xtr, ytr = dw.load_digits_16("train")
    xte, yte = dw.load_digits_16("test")
    assert xtr.shape == (dw.N_TRAIN, 1, 16, 16) == (1500, 1, 16, 16)
    assert xte.shape == (dw.N_TEST, 1, 16, 16) == (297, 1, 16, 16)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    for x in (xtr, xte):
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert float(x.min()) == -1.0 and float(x.max()) > 0.9
    assert set(ytr.tolist()) == set(yte.tolist()) == set(range(10))
    x2, y2 = dw.load_digits_16("test")
    assert torch.equal(x2, xte) and torch.equal(y2, yte)
    xa, ya = dw.load_digits_16("all")
    assert xa.shape[0] == 1797 and int(ya.bincount().sum()) == 1797
    # the split is a partition of the full set
    assert torch.equal(torch.cat([ytr, yte]).bincount(), ya.bincount())
    with pytest.raises(ValueError):
        dw.load_digits_16("val")


def test_shipped_weights_load_and_match_config(teacher):
    unet, te = teacher
    meta = dw.load_metadata()
    for k, v in dw.TEACHER_CONFIG.items():
        got = unet.config[k]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == v, k
    assert meta["teacher"]["unet_config"] == dw.TEACHER_CONFIG
    assert meta["teacher"]["text_encoder_config"] == dw.TEXT_ENCODER_CONFIG
    assert meta["teacher"]["noise_schedule"] == dw.NOISE_SCHEDULE
    assert meta["evaluator"]["config"] == dw.EVALUATOR_CONFIG
    assert meta["data"]["split_seed"] == dw.SPLIT_SEED
    n_unet = sum(p.numel() for p in unet.parameters())
    n_te = sum(p.numel() for p in te.parameters())
    assert meta["teacher"]["parameters"] == {"unet": n_unet, "text_encoder": n_te}
    assert 2_000_000 <= n_unet + n_te <= 5_000_000
    assert not any(p.requires_grad for p in unet.parameters())
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    # SD1.5-style LoRA targets exist
    names = [n for n, _ in unet.named_modules()]
    for t in LORA_TARGETS:
        assert any(n.endswith(t) for n in names), t
    assert any("attn2" in n for n in names)  # cross-attention
    size = sum((dw.WEIGHTS_DIR / f).stat().st_size for f in meta["files"].values())
    assert size < 20 * 2**20


def test_encode_labels_and_forward(teacher):
    unet, te = teacher
    ehs = dw.encode_labels(te, [0, 3, dw.NULL_LABEL])
    assert ehs.shape == (3, dw.TEXT_ENCODER_CONFIG["num_tokens"], dw.TEACHER_CONFIG["cross_attention_dim"])
    assert torch.equal(dw.encode_labels(te, torch.tensor([3]))[0], ehs[1])
    with pytest.raises(ValueError):
        dw.encode_labels(te, [11])
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = unet(x, torch.tensor([999, 500, 1]), encoder_hidden_states=ehs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_lora_targets_attach():
    peft = pytest.importorskip("peft")
    unet, te = dw.load_teacher()  # a private copy: add_adapter mutates it
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)))
    lora = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    for t in ("to_q", "attn2.to_k", "proj_in", "ff.net.2", "conv1"):
        assert any(t in n for n in lora), t
    out = unet(torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), encoder_hidden_states=dw.encode_labels(te, [1, 2])).sample
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in unet.named_parameters() if p.requires_grad)


def test_evaluator_test_accuracy(evaluator, test_set):
    x, y = test_set
    _, logits = dw.compute_features(x, evaluator)
    acc = float((logits.argmax(1) == y).double().mean())
    assert acc >= 0.95
    assert acc == pytest.approx(dw.load_metadata()["metrics"]["evaluator_test_accuracy"], abs=1e-3)
    assert evaluator.features(x[:4]).shape == (4, dw.EVALUATOR_CONFIG["feature_dim"])


def test_frechet_distance(evaluator, test_set):
    x, y = test_set
    f, _ = dw.compute_features(x, evaluator)
    assert abs(dw.frechet_distance(f, f)) < 1e-6
    noise = torch.rand(len(x), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fn, _ = dw.compute_features(noise, evaluator)
    d_noise = dw.frechet_distance(f, fn)
    xtr, _ = dw.load_digits_16("train")
    ftr, _ = dw.compute_features(xtr, evaluator)
    d_floor = dw.frechet_distance(ftr, f)
    assert d_noise > 20 * d_floor and d_noise > 10
    # symmetric, and Gaussian closed form on a toy case: N(0, I) vs N(m, 4I) in d dims
    assert dw.frechet_distance(fn, f) == pytest.approx(d_noise, rel=1e-6)
    d = 3
    mu2 = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    got = dm.frechet_distance_from_stats(torch.zeros(d), torch.eye(d), mu2, 4 * torch.eye(d))
    assert got == pytest.approx(5.0 + d * (1 + 4 - 2 * 2), abs=1e-9)


def test_frechet_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    import numpy as np

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g, dtype=torch.float64)
    b = torch.randn(150, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.5 + 1
    mu1, s1 = dm.feature_stats(a)
    mu2, s2 = dm.feature_stats(b)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(covmean))
    assert dw.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_evaluate_samples_on_real_data(test_set):
    x, y = test_set
    m = dw.evaluate_samples(x, y)  # the reference itself: perfect recall/precision, fid 0
    assert m["fid"] < 1e-6
    assert m["recall"] == pytest.approx(1.0) and m["precision"] == pytest.approx(1.0)
    assert m["accuracy"] >= 0.95
    assert m["diversity"] == pytest.approx(m["reference_diversity"])
    assert set(m) >= {"fid", "accuracy", "diversity", "recall"}
    # a collapsed generator (one image per class, repeated) has ~zero diversity and low recall
    idx = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    xc = x[idx].repeat_interleave(8, 0) + 0.01 * torch.randn(80, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    yc = y[idx].repeat_interleave(8, 0)
    mc = dw.evaluate_samples(xc, yc)
    assert mc["diversity"] < 0.05 * m["diversity"]
    assert mc["recall"] < 0.3 and mc["fid"] > 10 * m["fid"] + 1
    # unconditional samples (NULL_LABEL) are ignored by the accuracy
    mu = dw.evaluate_samples(x[:40], torch.cat([y[:20], torch.full((20,), dw.NULL_LABEL)]))
    assert mu["accuracy"] == pytest.approx(float((dw.evaluate_samples(x[:20], y[:20])["accuracy"])))


def test_image_grid():
    imgs = torch.linspace(-1, 1, 10 * 8 * 256).reshape(80, 1, 16, 16)
    im = dw.image_grid(imgs, nrow=8)
    assert im.size == ((8 * 17 + 1) * 4, (10 * 17 + 1) * 4)
    assert im.mode == "L"


@pytest.mark.slow
def test_teacher_cfg_accuracy(teacher, evaluator):
    # 10 per class keeps this at ~20 s on 2 idle CPU cores (the recorded metrics use 50 per class)
    unet, te = teacher
    labels = dw.class_major_labels(10)
    imgs = dw.sample_teacher(unet, te, labels, num_inference_steps=50, guidance_scale=dw.DEFAULT_GUIDANCE,
                             generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (100, 1, 16, 16)
    m = dw.evaluate_samples(imgs, labels, evaluator=evaluator)
    assert m["accuracy"] >= 0.90, m
    assert math.isfinite(m["fid"]) and m["diversity"] > 0
