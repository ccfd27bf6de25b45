"""Two processes on the CPU (torchrun, gloo; accelerate's Accelerator picks the environment up): the ranks draw different noise, average their LoRA
gradients, and so hold the same student after every step; rank 0 alone writes metrics, checkpoints and the
LoRA; a relaunch resumes on both ranks. The same code path is what multi-GPU runs take."""

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


def launch(tmp_path, steps):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # torchrun: what `accelerate launch --multi_gpu` runs underneath (accelerate's --cpu launches one process)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(script), str(tmp_path), str(steps)]
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
