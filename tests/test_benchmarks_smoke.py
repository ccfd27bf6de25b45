"""The benchmark scripts' CPU smoke modes run, write the JSON / PNG they promise, and count FLOPs sensibly.

The scripts live in benchmarks/ (not in the package); they are loaded from their files. One run of each
smoke mode is shared by the tests (batch 1 for training, to stay fast on a 2-core machine).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """A benchmarks/ module; the scripts import their helpers (archs, report) from that folder."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in ("archs", "report"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"distillery_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_bench")
    payload = _load("train_throughput").main(["--cpu-smoke", "--batches", "1", "--methods", "dmd2",
                                              "--out", str(out)])
    return payload, json.loads(Path(payload["json"]).read_text())


@pytest.fixture(scope="module")
def sampling_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling_bench")
    payload = _load("sampling_latency").main(["--cpu-smoke", "--out", str(out)])
    return payload, json.loads(Path(payload["json"]).read_text())


def test_train_smoke_writes_every_field(train_run):
    payload, data = train_run
    assert Path(payload["png"]).stat().st_size > 0
    assert data["smoke"] is True and "machine" in data and "bf16_peak_tflops" in data
    rows = data["rows"]
    got = {(r["arch"], r["design"]) for r in rows}
    assert got == {(a, d) for a in ("tiny-sd15", "tiny-sdxl", "tiny-sd3m") for d in ("shared_lora", "three_copies")}
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("it_per_s", "samples_per_s", "seconds_per_iteration", "model_tflop_per_iteration",
                    "executed_tflop_per_iteration", "by_kind", "cycle", "base_params", "trainable_params",
                    "peak_mem_gib", "mfu", "hfu", "batch", "method", "resolution"):
            assert key in r, (key, r)
        assert r["it_per_s"] > 0 and r["samples_per_s"] == pytest.approx(r["it_per_s"] * r["batch"])
        assert r["cycle"] == ["student+critic"] + ["critic"] * 4  # DMD2, update ratio 5
        assert r["mfu"] is None  # no GPU peak on a CPU
        # checkpointing recomputes forwards: executed >= model FLOPs, and the recompute was seen
        for kind in r["by_kind"].values():
            assert kind["executed_tflop"] > kind["model_tflop"] > 0
            assert kind["recompute_tflop"] > 0
    # the full copies train every weight; the LoRA design trains a small fraction
    by = {(r["arch"], r["design"]): r for r in rows}
    for arch in ("tiny-sd15", "tiny-sdxl", "tiny-sd3m"):
        lora, full = by[(arch, "shared_lora")], by[(arch, "three_copies")]
        assert full["trainable_params"]["student"] == full["base_params"]
        assert lora["trainable_params"]["student"] < lora["base_params"]


def test_dmd2_student_iteration_costs_more_flops_than_a_critic_only_one(train_run):
    _, data = train_run
    for r in data["rows"]:
        kinds = r["by_kind"]
        student, critic = kinds["student+critic"], kinds["critic"]
        # the student iteration adds the student's graded forward + backward, the critic's and the guided
        # teacher's evaluations, on top of a critic update like the critic-only iteration's
        assert student["model_tflop"] > critic["model_tflop"], r["arch"]
        assert student["executed_tflop"] > critic["executed_tflop"], r["arch"]
        # the cycle average weighs 1 student iteration against 4 critic-only ones
        expected = (student["model_tflop"] + 4 * critic["model_tflop"]) / 5
        assert r["model_tflop_per_iteration"] == pytest.approx(expected)


def test_model_flops_exclude_exactly_the_checkpoint_recomputation(tmp_path):
    """Counted FLOPs minus the recomputation booked by the benchmark's checkpoint function equal the FLOPs
    of the same iteration without checkpointing; and checkpointing works with LoRA roles at all."""
    import torch

    archs, bench = _load("archs"), _load("train_throughput")
    from comfyui_distillery.trainers import api
    from comfyui_distillery.trainers.engine import TrainConfig, Trainer

    arch = archs.TINY_ARCHS["sd3m"]
    counts = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is much faster on a busy machine
    try:
        for ckpt in (True, False):
            task = archs.BenchTask(arch, archs.build_network(arch, "cpu", torch.float32), "cpu")
            cfg = TrainConfig(steps=100, batch_size=2, gradient_checkpointing=ckpt, lora_rank=4,
                              checkpoint_every=0, log_every=10 ** 6, run_dir=str(tmp_path / f"ckpt{ckpt}"))
            bench.fresh_accelerator_state()
            trainer = Trainer(task, api.make_method("dmd2"), cfg, progress=False)
            with bench.flop_counter() as counter:
                task.meter.reset(counter)
                trainer.train(until=1)  # a student+critic iteration, same seed, same draws
            counts[ckpt] = (counter.get_total_flops(), task.meter.flops)
    finally:
        torch.set_num_threads(threads)
        bench.fresh_accelerator_state()
    (with_ckpt, recomputed), (without, none) = counts[True], counts[False]
    assert recomputed > 0 and none == 0
    assert with_ckpt - recomputed == without


def test_sampling_smoke_writes_every_field(sampling_run):
    payload, data = sampling_run
    assert Path(payload["png"]).stat().st_size > 0
    rows = data["rows"]
    for arch in ("tiny-sd15", "tiny-sdxl", "tiny-sd3m"):
        mine = {r["row"]: r for r in rows if r["arch"] == arch}
        assert set(mine) == {"base_25_cfg", "student_4", "student_4_lora", "hybrid"}
        for r in mine.values():
            assert r["status"] == "ok" and r["finite"]
            for key in ("seconds_per_image", "images_per_s", "evals_per_image", "speedup_vs_base", "steps", "cfg"):
                assert key in r, (key, r)
        assert mine["base_25_cfg"]["evals_per_image"] == 50  # 25 guided steps, a CFG pair counts 2
        assert mine["student_4"]["evals_per_image"] == 4
        h = mine["hybrid"]
        # the hand-off is the student's second level, t = 749 (the flow DiT's network timestep is shifted: 3)
        handoff = 749.0 if arch != "tiny-sd3m" else 1000 * 3 * 0.749 / (1 + 2 * 0.749)
        assert h["handoff_timestep"] == pytest.approx(handoff, abs=0.5) and h["student_steps"] == 3
        assert h["evals_per_image"] == 2 * h["base_steps"] + 3


def test_full_size_configs_have_the_published_parameter_counts():
    archs = _load("archs")
    counts = archs.check_param_counts()  # asserts within 1%
    assert abs(counts["sd15"] - 859.5e6) / 859.5e6 < 0.01
    assert abs(counts["sdxl"] - 2567e6) / 2567e6 < 0.01
    assert 1.9e9 < counts["sd3m"] < 2.1e9


def test_gpu_peak_table():
    report = _load("report")
    assert report.bf16_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989
    assert report.bf16_peak_tflops("NVIDIA H200")[0] == 989
    assert report.bf16_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312
    assert report.bf16_peak_tflops("NVIDIA GeForce RTX 4090")[0] == 165
    assert report.bf16_peak_tflops("Some Future GPU")[0] is None
    assert report.bf16_peak_tflops("Some Future GPU", 500.0)[0] == 500.0
