"""Two processes on the CPU (torchrun, gloo; accelerate's Accelerator picks the environment up): the ranks draw different noise, average their LoRA
gradients, and so hold the same student after every step; rank 0 alone writes metrics, checkpoints and the
LoRA; a relaunch resumes on both ranks. The same code path is what multi-GPU runs take. With shard_base the
frozen base is sharded over the two ranks (FSDP2) and the run takes the same steps as the data-parallel one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys, torch
    from comfyui_distillery import api
    out, steps = sys.argv[1], int(sys.argv[2])
    task = api.make_task("gmm", width=32, fit_steps=20)
    config = api.TrainConfig(steps=steps, batch_size=16, lora_rank=4, run_dir=out + "/run", checkpoint_every=2,
                             log_every=1)
    method = api.make_method("dmd2", student_timesteps="999", update_ratio=1)
    result = api.distill(task, method, config, lora_path=out + "/student.safetensors", progress=False)
    t = result["trainer"]
    torch.save({"student": [p.detach().clone() for p in t.roles.trainable["student"]],
                "critic": [p.detach().clone() for p in t.roles.trainable["critic"]],
                "step": t.step, "resumed": result["resumed"], "world": t.accelerator.num_processes},
               f"{out}/rank{t.accelerator.process_index}.pt")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, steps, script_text=SCRIPT, *args):
    script = tmp_path / "train.py"
    script.write_text(script_text)
    # torchrun: what `accelerate launch --multi_gpu` runs underneath (accelerate's --cpu launches one process)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(script), str(tmp_path), str(steps), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


def test_two_processes_train_one_student_and_resume(tmp_path):
    ranks = launch(tmp_path, 4)
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [4, 4]
    for role in ("student", "critic"):  # different noise per rank, averaged gradients: the same weights
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][role], ranks[1][role]))
    assert any(p.abs().sum() > 0 for p in ranks[0]["student"][1::2])  # lora_B left zero: it trained
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone writes
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (tmp_path / "student.safetensors").is_file()
    assert not list(tmp_path.glob(".student.safetensors.tmp-*"))

    ranks = launch(tmp_path, 6)  # more steps: both ranks resume from step 4
    assert [r["resumed"] for r in ranks] == [True, True] and [r["step"] for r in ranks] == [6, 6]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["student"], ranks[1]["student"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


SHARD_SCRIPT = textwrap.dedent('''
    import sys, weakref, torch
    from comfyui_distillery import api
    from comfyui_distillery.trainers.engine import Trainer
    from comfyui_distillery.trainers.planner import LiveStorageTracker
    from comfyui_distillery.trainers.sharding import local_frozen_bytes
    out, steps, shard = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

    class Tracker(LiveStorageTracker):
        # FSDP frees a gathered weight by resizing its storage to 0 bytes, which no op shows: count what each
        # live storage holds now
        def __init__(self):
            super().__init__(fake=False)
            self.storages = {}

        def track(self, t, category=None):
            super().track(t, category)
            self.storages[id(t.untyped_storage())] = weakref.ref(t.untyped_storage())

        def _bump(self):
            alive = {k: r() for k, r in self.storages.items()}
            self.storages = {k: self.storages[k] for k, st in alive.items() if st is not None}
            self.live = sum(st.nbytes() for st in alive.values() if st is not None)
            self.peak = max(self.peak, self.live)

    results = {}
    for method, options in (("dmd2", {"update_ratio": 1}), ("sid", {})):
        tracker = Tracker()  # every storage made from here on, until it is freed
        with tracker:
            task = api.make_task("gmm", width=256, depth=16, fit_steps=20, seed=0)
            config = api.TrainConfig(steps=steps, batch_size=8, lora_rank=4, run_dir=f"{out}/{method}",
                                     checkpoint_every=0, preview_every=0, shard_base=shard, seed=3)
            trainer = Trainer(task, api.make_method(method, student_timesteps="999", **options), config,
                              progress=False)
            tracker.reset_peak()  # the training steps' peak: weights, adapters, optimizer state, activations
            trainer.train()
        results[method] = {"student": [p.detach().clone() for p in trainer.roles.trainable["student"]],
                           "critic": [p.detach().clone() for p in trainer.roles.trainable["critic"]],
                           "base_bytes": local_frozen_bytes(task.base), "peak": tracker.peak,
                           "hash": trainer.base_model_hash}
    rank = trainer.accelerator.process_index
    torch.save(results, f"{out}/rank{rank}.pt")
''')


def test_a_sharded_base_trains_the_same_student_as_data_parallel_with_half_the_base_per_rank(tmp_path):
    """FSDP (shard_base) against plain data parallelism, two ranks, same seeds: DMD2 and SiD (whose gradient
    flows through the sharded teacher and fake score) end with the same LoRAs; each rank keeps half the base."""
    from comfyui_distillery import api
    from comfyui_distillery.trainers.sharding import largest_unit_bytes, sharded_bytes

    (tmp_path / "ddp").mkdir()
    (tmp_path / "fsdp").mkdir()
    ddp = launch(tmp_path / "ddp", 3, SHARD_SCRIPT, 0)
    fsdp = launch(tmp_path / "fsdp", 3, SHARD_SCRIPT, 1)
    base = api.make_task("gmm", width=256, depth=16, fit_steps=0).base
    full = sum(p.numel() * p.element_size() for p in base.parameters())
    for method in ("dmd2", "sid"):
        for role in ("student", "critic"):
            for a, b in zip(ddp[0][method][role], fsdp[0][method][role]):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (method, role, (a - b).abs().max())
            assert all(torch.equal(a, b) for a, b in zip(fsdp[0][method][role], fsdp[1][method][role]))
        assert any(p.abs().sum() > 0 for p in fsdp[0][method]["student"][1::2])  # lora_B left zero: it trained
        assert [r[method]["base_bytes"] for r in ddp] == [full, full]
        shards = [r[method]["base_bytes"] for r in fsdp]
        assert sum(shards) >= full and max(shards) <= sharded_bytes(base, 2) < 0.51 * full  # dim 0 split in 2
        # what each rank holds at its peak: half the base less, but for the layer being run (gathered: its
        # all-gather buffer and the weight copied out of it; one layer is 1/20 of this base)
        # and what the planner adds up for a sharded run (planner.plan(gpus=2, shard_base)): the data-parallel
        # peak with the base swapped for its shard, plus at most twice the largest layer
        lowest = ddp[0][method]["peak"] - full + sharded_bytes(base, 2)
        for rank in (0, 1):
            peaks = (ddp[rank][method]["peak"], fsdp[rank][method]["peak"], full)
            assert ddp[rank][method]["peak"] - fsdp[rank][method]["peak"] > 0.35 * full, (method, rank, peaks)
            assert lowest - 4096 <= fsdp[rank][method]["peak"] <= lowest + 2 * largest_unit_bytes(base), (method, rank, peaks)
        assert fsdp[0][method]["hash"] == ddp[0][method]["hash"]  # the card names the same base


def test_shard_base_is_refused_in_one_process_and_with_fp8(monkeypatch):
    from comfyui_distillery import api

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="shard_base=True: .*this run has one: launch it with `accelerate launch"):
        api.TrainConfig(shard_base=True).validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    api.TrainConfig(shard_base=True).validate()
    with pytest.raises(ValueError, match="shard_base=True: .*does not combine with fp8_base=True"):
        api.TrainConfig(shard_base=True, fp8_base=True).validate()
