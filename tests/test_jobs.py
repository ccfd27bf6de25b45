"""Background training jobs without ComfyUI: the on-disk store, the manager's queue / stop / resume /
restart / loud failures (with a tiny stand-in worker, then the real worker on the Gaussian-mixture world),
the option translation, student metadata, and the ComfyUI task's LoRA targets and export keys."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_distillery.jobs import options as jo
from comfyui_distillery.jobs import store as st
from comfyui_distillery.jobs import students
from comfyui_distillery.trainers.spec import OutputSpec, RunSpec, TeacherSpec
from comfyui_distillery.jobs.manager import JobManager, describe_exit

# A stand-in worker speaking the worker's protocol (status.json, metrics.jsonl, stop flag, exit codes);
# it starts in milliseconds, so the manager's behaviour is tested without torch in the child.
FAKE_WORKER = textwrap.dedent('''
    import json, os, signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # like the real worker: finish the step, then stop
    job = sys.argv[1]
    def rd(name):
        with open(os.path.join(job, name)) as f:
            return json.load(f)
    def status(**kw):
        s = rd("status.json"); s.update(kw)
        tmp = os.path.join(job, ".status.tmp"); open(tmp, "w").write(json.dumps(s)); os.replace(tmp, os.path.join(job, "status.json"))
    config = rd("config.json")
    cfg, steps = config["teacher"]["options"]["fake"], config["train"]["steps"]  # train more changes train.steps
    ckd = os.path.join(job, "checkpoints")  # the engine's layout: checkpoints/step-XXXXXXXX/state.pt
    def save(step):
        d = os.path.join(ckd, "step-%08d" % step); os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "state.pt"), "w").write(str(step))
    saved = [int(n[5:]) for n in (os.listdir(ckd) if os.path.isdir(ckd) else [])
             if n.startswith("step-") and os.path.exists(os.path.join(ckd, n, "state.pt"))]
    step = max(saved) if saved else 0
    status(state="running", pid=os.getpid(), step=step, steps=steps)
    print("fake worker starting at step", step, flush=True)
    while step < steps:
        if stop or os.path.exists(os.path.join(job, "stop.request")):
            save(step); status(state="stopped", reason="stopped on request"); sys.exit(0)
        if step == cfg.get("crash_at"):
            print("fake worker: something broke badly", file=sys.stderr, flush=True)
            if cfg.get("say_failed"):
                status(state="failed", reason="ValueError: the fake worker gave up")
            sys.exit(cfg.get("exit_code", 7))
        time.sleep(cfg.get("sleep", 0.01))
        step += 1
        with open(os.path.join(job, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "loss/student": 1.0 / step}) + "\\n")
        if step % 2 == 0:
            save(step)
        status(step=step)
    save(step)
    status(state="completed", step=step)
''')


@pytest.fixture
def fake_worker(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return path


def make_manager(root, worker, **kw):
    env = dict(os.environ)
    kw.setdefault("poll_interval", 0.05)
    return JobManager(root, worker_script=worker, env=env, **kw)


def fake_config(steps=5, **fake):
    """A real run spec (the fake worker reads its settings from the teacher's options)."""
    spec = RunSpec.build(method="dmd2", train={"steps": steps}, name="fake",
                         teacher=TeacherSpec("world", "gmm", options={"fake": {"steps": steps, **fake}}),
                         output=OutputSpec(lora_name="fake.safetensors"))
    return spec.to_dict()


# --- store --------------------------------------------------------------------------------------------
def test_store_validates_ids_and_names_and_stays_inside_job_folders(tmp_path):
    store = st.JobStore(tmp_path / "jobs")
    job_id = store.create({"train": {"steps": 3}})
    assert store.status(job_id)["state"] == st.QUEUED and store.ids() == [job_id]
    for bad in ("..", "../x", "a/b", "A" * 3, "", "x", "..%2f", "job\x00", "a" * 65):
        with pytest.raises(st.JobError) as err:
            store.dir(bad)
        assert err.value.status == 400
    with pytest.raises(st.JobError) as err:
        store.dir("nosuchjob")
    assert err.value.status == 404
    (tmp_path / "jobs" / job_id / "previews").mkdir()
    (tmp_path / "jobs" / job_id / "previews" / "step-00000002.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    assert store.previews(job_id) == ["step-00000002.png"]
    assert store.preview_path(job_id, "step-00000002.png").read_bytes() == b"png"
    for bad in ("../../secret.png", "..", "/etc/passwd", "a/b.png", "x.txt", ".hidden.png"):
        with pytest.raises(st.JobError) as err:
            store.preview_path(job_id, bad)
        assert err.value.status == 400
    with pytest.raises(st.JobError) as err:
        store.preview_path(job_id, "missing.png")
    assert err.value.status == 404


def test_metrics_cursor_is_a_step_and_skips_a_half_written_line(tmp_path):
    store = st.JobStore(tmp_path)
    job_id = store.create({})
    path = store.dir(job_id) / st.METRICS
    path.write_text("".join(json.dumps({"step": s, "loss/student": s / 10}) + "\n" for s in (1, 2, 3)) + '{"step": 4')
    first = store.metrics(job_id, since=-1, limit=2)
    assert [r["step"] for r in first["records"]] == [1, 2] and first["cursor"] == 2 and first["more"]
    rest = store.metrics(job_id, since=first["cursor"])
    assert [r["step"] for r in rest["records"]] == [3] and rest["cursor"] == 3 and not rest["more"]
    assert store.metrics(job_id, since=3)["records"] == [] and store.metrics(job_id, since=3)["cursor"] == 3


def test_log_tail_keeps_the_last_state_of_carriage_return_lines(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("a\nprogress 1%\rprogress 50%\rprogress 100%\nlast\n")
    assert st.tail_lines(path, 2) == "progress 100%\nlast"


# --- manager with the stand-in worker -----------------------------------------------------------------
def test_jobs_run_one_at_a_time_in_order_and_events_carry_progress(tmp_path, fake_worker):
    events = []
    started = []
    manager = make_manager(tmp_path / "jobs", fake_worker, notify=events.append,
                           before_start=lambda job_id, cfg: started.append(job_id) or "asked to free models")
    try:
        a = manager.create(fake_config(steps=6, sleep=0.05))
        b = manager.create(fake_config(steps=2))
        deadline = time.monotonic() + 30
        while manager.store.status(a)["state"] not in st.ACTIVE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert manager.store.status(b)["state"] == st.QUEUED and manager.queue_position(b) == 1
        assert manager.wait(a, 60)["state"] == st.COMPLETED
        assert manager.wait(b, 60)["state"] == st.COMPLETED
        assert started == [a, b]
        assert "asked to free models" in manager.store.log_tail(a)
    finally:
        manager.close()
    states = [e["job"]["state"] for e in events if e["id"] == a]
    assert states[0] == st.QUEUED and states[-1] == st.COMPLETED
    steps = [r["step"] for e in events if e["id"] == a for r in e["metrics"]]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each record once, in order


def test_a_crashing_worker_fails_the_job_with_its_exit_code_and_log_tail(tmp_path, fake_worker):
    manager = make_manager(tmp_path / "jobs", fake_worker)
    try:
        job = manager.create(fake_config(steps=5, crash_at=2, exit_code=7))
        status = manager.wait(job, 60)
        assert status["state"] == st.FAILED and status["exit_code"] == 7
        assert "exited with code 7" in status["reason"]
        assert "something broke badly" in status["log_tail"]
        # a worker that says why keeps its reason; the exit code is added
        job2 = manager.create(fake_config(steps=5, crash_at=1, exit_code=1, say_failed=True))
        status2 = manager.wait(job2, 60)
        assert status2["reason"].startswith("ValueError: the fake worker gave up")
        assert "code 1" in status2["reason"]
    finally:
        manager.close()
    assert "killed by SIGKILL" in describe_exit(-9) and "out-of-memory" in describe_exit(-9)


def test_stop_then_resume_continues_from_the_checkpoint(tmp_path, fake_worker):
    manager = make_manager(tmp_path / "jobs", fake_worker)
    try:
        job = manager.create(fake_config(steps=400, sleep=0.02))
        deadline = time.monotonic() + 30
        while manager.store.status(job).get("step", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        manager.stop(job)
        status = manager.wait(job, 60)
        assert status["state"] == st.STOPPED and not status["stop_requested"]
        stopped_at = status["step"]
        with pytest.raises(st.JobError) as err:
            manager.stop(job)
        assert err.value.status == 409
        manager.resume(job)
        with pytest.raises(st.JobError):
            manager.resume(job)  # queued or running: not resumable
        assert manager.wait(job, 120)["state"] == st.COMPLETED
        assert f"starting at step {stopped_at}" in manager.store.log_tail(job, 200)
        # a queued job stops without a process
        blocker = manager.create(fake_config(steps=400, sleep=0.02))
        queued = manager.create(fake_config(steps=2))
        assert manager.stop(queued)["state"] == st.STOPPED
        manager.stop(blocker)
        manager.wait(blocker, 60)
    finally:
        manager.close()


def tick_until(manager, condition, timeout=60.0):
    """Drive a manager without its thread until condition() holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        manager.tick()
        time.sleep(0.02)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def metric_steps(manager, job):
    return [r["step"] for r in manager.store.metrics(job)["records"]]


def test_resume_before_the_stopped_worker_is_reaped_requeues_it_instead_of_failing(tmp_path, fake_worker):
    """The bug: Stop, the worker exits 0, Resume before the manager has reaped it -> the re-queued job was
    marked failed ("exited with code 0 before the job finished")."""
    manager = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    job = manager.create(fake_config(steps=30, sleep=0.02))
    manager.tick()  # starts the worker
    old = manager._procs[job]
    wait_for(lambda: manager.store.status(job).get("step", 0) >= 3)
    manager.stop(job)
    old.wait(30)  # it has exited; the manager has not reaped it yet
    stopped_at = manager.store.status(job)["step"]
    assert manager.store.status(job)["state"] == st.STOPPED
    info = manager.resume(job)
    assert info["resume_pending"] and info["state"] == st.STOPPED and manager._procs[job] is old
    with pytest.raises(st.JobError) as err:
        manager.resume(job)  # asked once already
    assert err.value.status == 409
    manager.tick()  # reaps the old worker, queues the job again and starts a new worker in one round
    assert manager.store.status(job)["state"] in (st.STARTING, st.RUNNING) and manager._procs[job] is not old
    tick_until(manager, lambda: manager.store.status(job)["state"] in st.TERMINAL and job not in manager._procs)
    status = manager.store.status(job)
    assert status["state"] == st.COMPLETED and status["step"] == 30, status
    log_text = manager.store.log_tail(job, 400)
    assert "FAILED" not in log_text and f"starting at step {stopped_at}" in log_text
    assert metric_steps(manager, job) == list(range(1, 31))


def test_resume_while_the_worker_is_still_stopping_waits_for_it_and_stop_cancels_that(tmp_path, fake_worker):
    manager = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    job = manager.create(fake_config(steps=200, sleep=0.05))
    manager.tick()
    wait_for(lambda: manager.store.status(job).get("step", 0) >= 2)
    manager.stop(job)
    info = manager.resume(job)  # the worker is still running its step: recorded, not a 409
    assert info["resume_pending"] and info["state"] in st.ACTIVE
    assert manager.get(job)["resume_pending"] and [j for j in manager.list() if j["id"] == job][0]["resume_pending"]
    manager.stop(job)  # Stop again: the last word wins, the pending resume is cancelled
    assert not manager.get(job).get("resume_pending")
    tick_until(manager, lambda: job not in manager._procs)
    assert manager.store.status(job)["state"] == st.STOPPED
    # never two workers: a job queued again while its worker lives is not started twice, nor failed when
    # that worker is reaped
    manager.resume(job)
    manager.tick()
    first = manager._procs[job]
    wait_for(lambda: manager.store.status(job).get("state") == st.RUNNING)
    os.kill(first.pid, signal.SIGSTOP)  # frozen: it writes nothing while the state is changed under it
    manager.store.update_status(job, state=st.QUEUED)
    manager.tick()
    assert manager._procs[job] is first
    first.kill()
    first.wait(30)
    manager.tick()  # reaped: the job stays queued, and is started again (after the old worker, not beside it)
    assert manager._procs[job] is not first and manager.store.status(job)["state"] != st.FAILED
    assert "the job stays queued" in manager.store.log_tail(job, 400)
    manager.stop(job)
    tick_until(manager, lambda: job not in manager._procs)
    assert manager.store.status(job)["state"] == st.STOPPED
    assert manager.store.log_tail(job, 400).count("starting the worker") == 3


def test_a_resume_pending_when_comfyui_restarts_is_carried_out_after_the_restart(tmp_path, fake_worker):
    """Stop, then Resume while the worker still stops, then ComfyUI goes down with the worker: the new
    server's manager queues the job again (from its checkpoint) instead of leaving it interrupted."""
    manager = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    job = manager.create(fake_config(steps=200, sleep=0.05))
    manager.tick()
    wait_for(lambda: manager.store.status(job).get("step", 0) >= 3)
    manager.stop(job)
    assert manager.resume(job)["resume_pending"]
    worker = manager._procs[job]
    worker.kill()  # the restart takes the worker down before it has exited on its own
    worker.wait(30)
    again = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    status = again.store.status(job)
    assert status["state"] == st.QUEUED and again.store.requested_resume(job) is None, status
    assert "resume requested: continues from the checkpoint of step" in again.store.log_tail(job, 400)
    assert again.stop(job)["state"] == st.STOPPED  # queued, never started
    # and a Stop that cancelled the pending resume before the restart leaves the job interrupted
    other = again.create(fake_config(steps=150, sleep=0.05))
    again.tick()
    wait_for(lambda: again.store.status(other).get("step", 0) >= 1)
    again.stop(other)
    again.resume(other)
    again.stop(other)
    worker = again._procs[other]
    worker.kill()
    worker.wait(30)
    third = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    assert third.store.status(other)["state"] == st.INTERRUPTED


def test_stop_then_resume_within_100ms_ten_times_ends_completed_with_a_continuous_curve(tmp_path, fake_worker):
    import random

    rng = random.Random(0)
    manager = make_manager(tmp_path / "jobs", fake_worker, poll_interval=0.02)
    steps = 120
    try:
        job = manager.create(fake_config(steps=steps, sleep=0.01))
        for i in range(10):
            if i % 3 != 2:  # mostly while it trains; sometimes right after the last resume (queued / starting)
                before = manager.store.status(job).get("step", 0)
                wait_for(lambda: manager.store.status(job).get("state") == st.RUNNING and
                         manager.store.status(job).get("step", 0) >= before + 2)
            manager.stop(job)
            time.sleep(rng.choice([0.0, 0.005, 0.03, 0.1]))
            manager.resume(job)
        status = manager.wait(job, 120)
    finally:
        manager.close()
    assert status["state"] == st.COMPLETED and status["step"] == steps, status
    assert "FAILED" not in manager.store.log_tail(job, 2000)
    # the curve: every step once, in order (steps after a checkpoint are logged again, not kept twice)
    assert metric_steps(manager, job) == list(range(1, steps + 1))
    raw = [json.loads(line)["step"] for line in (manager.store.dir(job) / st.METRICS).read_text().splitlines()]
    assert raw == list(range(1, steps + 1))


def test_a_completed_job_trains_more_steps(tmp_path, fake_worker, monkeypatch):
    monkeypatch.setattr(jo, "fingerprint", lambda config: f"fp-{config['train']['steps']}-{sorted(config)}")
    manager = make_manager(tmp_path / "jobs", fake_worker)
    try:
        config = fake_config(steps=6)
        config["fingerprint"] = jo.fingerprint(config)
        job = manager.create(config)
        assert manager.wait(job, 60)["state"] == st.COMPLETED
        with pytest.raises(st.JobError) as err:
            manager.resume(job)  # completed: only with more steps
        assert err.value.status == 409 and "larger number of steps" in str(err.value)
        for bad in (6, 3, 0, -1, True, 2.5, "x"):
            with pytest.raises(st.JobError) as err:
                manager.resume(job, steps=bad)
            assert err.value.status == 400, bad
        info = manager.resume(job, steps=10)
        # queued, or already picked up by the manager's thread (it runs concurrently)
        assert info["state"] in (st.QUEUED, *st.ACTIVE) and info["steps"] == 10 and info["step"] == 6
        status = manager.wait(job, 60)
        assert status["state"] == st.COMPLETED and status["step"] == 10 and status["steps"] == 10
        saved = manager.store.config(job)
        assert saved["train"]["steps"] == 10
        # the fingerprint follows, computed by options.fingerprint on the config as made (no id / created)
        assert saved["fingerprint"].startswith("fp-10-") and "'id'" not in saved["fingerprint"]
        assert metric_steps(manager, job) == list(range(1, 11))
        assert "starting at step 6" in manager.store.log_tail(job, 200)
    finally:
        manager.close()


def write_student(path, job_id):
    """A .safetensors file whose card says which job wrote it (no tensors needed)."""
    from comfyui_distillery.trainers.card import StudentCard

    card = StudentCard(method="dmd2", sampler="x0_renoise", timesteps=[999], prediction_type="epsilon", job=job_id)
    header = json.dumps({"__metadata__": card.to_metadata()})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode())


def test_delete_refuses_active_jobs_and_removes_the_lora_only_when_asked_and_when_its_own(tmp_path, fake_worker):
    loras = tmp_path / "loras"
    loras.mkdir()
    events = []
    manager = make_manager(tmp_path / "jobs", fake_worker, start_thread=False, notify=events.append)

    def job_with_lora(name, state=st.COMPLETED, writer=None):
        config = fake_config(steps=2)
        config["output"] = {"lora_name": name, "lora_path": str(loras / name)}
        job = manager.store.create(config)
        manager.store.update_status(job, state=state)
        write_student(loras / name, writer or job)
        return job

    running = job_with_lora("a.safetensors", state=st.RUNNING)
    with pytest.raises(st.JobError) as err:
        manager.delete(running, delete_lora=True)
    assert err.value.status == 409 and "stop it first" in str(err.value)
    assert manager.store.exists(running) and (loras / "a.safetensors").exists()

    kept = job_with_lora("b.safetensors")
    out = manager.delete(kept)
    assert out["deleted"] and not out["lora_deleted"] and (loras / "b.safetensors").exists()
    assert not manager.store.exists(kept) and kept not in [j["id"] for j in manager.list()]
    assert {"id": kept, "deleted": True} in events

    gone = job_with_lora("c.safetensors")
    assert manager.delete(gone, delete_lora=True)["lora_deleted"] and not (loras / "c.safetensors").exists()

    other = job_with_lora("d.safetensors", writer="20990101-000000-abcdef")  # overwritten by another job
    out = manager.delete(other, delete_lora=True)
    assert not out["lora_deleted"] and "another" not in out["lora_note"] and "job 2099" in out["lora_note"]
    assert (loras / "d.safetensors").exists()

    elsewhere = job_with_lora("e.safetensors")  # not in the allowed loras folders
    out = manager.delete(elsewhere, delete_lora=True, lora_dirs=[tmp_path / "other_loras"])
    assert not out["lora_deleted"] and (loras / "e.safetensors").exists()
    allowed = job_with_lora("f.safetensors")
    assert manager.delete(allowed, delete_lora=True, lora_dirs=lambda: [str(loras)])["lora_deleted"]
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [running]  # no leftovers
    with pytest.raises(st.JobError) as err:
        manager.delete(kept)
    assert err.value.status == 404


def test_after_a_restart_a_live_worker_is_adopted_and_a_dead_one_is_interrupted(tmp_path, fake_worker):
    root = tmp_path / "jobs"
    first = make_manager(root, fake_worker)
    job = first.create(fake_config(steps=60, sleep=0.05))
    deadline = time.monotonic() + 30
    while first.store.status(job).get("step", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.close()  # "ComfyUI restarts": the worker lives on
    second = make_manager(root, fake_worker)
    try:
        assert job in second._procs  # adopted
        second.stop(job)
        assert second.wait(job, 60)["state"] == st.STOPPED
    finally:
        second.close()
    # a job that claims to run but whose worker is gone: interrupted, then resumable
    store = st.JobStore(root)
    other = store.create(fake_config(steps=2))
    store.update_status(other, state=st.RUNNING, pid=2 ** 22 + 12345, step=1)
    third = make_manager(root, fake_worker)
    try:
        status = third.store.status(other)
        assert status["state"] == st.INTERRUPTED and "resume" in status["reason"]
        third.resume(other)
        assert third.wait(other, 60)["state"] == st.COMPLETED
    finally:
        third.close()


def test_equivalent_jobs_are_found_by_fingerprint(tmp_path, fake_worker):
    manager = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    config = fake_config(steps=3)
    config["fingerprint"] = jo.fingerprint(config)
    job = manager.create(config)
    assert manager.find_equivalent(config["fingerprint"]) == job
    assert manager.find_equivalent("other") is None


def test_a_job_written_before_an_option_existed_is_still_found(tmp_path, fake_worker):
    """An older version stored a config without today's options and a hash made without them; re-running the
    same workflow today must find that job, not queue the training again."""
    manager = make_manager(tmp_path / "jobs", fake_worker, start_thread=False)
    old = fake_config(steps=3)
    for key in ("regression_weight", "regression_pairs", "regression_steps"):
        del old["method_options"][key]
    old["fingerprint"] = "made-by-an-older-version"
    job = manager.create(old)
    today = fake_config(steps=3)
    assert manager.find_equivalent(jo.fingerprint(today)) == job
    changed = fake_config(steps=3)
    changed["method_options"]["regression_weight"] = 0.5
    assert manager.find_equivalent(jo.fingerprint(changed)) is None


# --- the real worker on the Gaussian-mixture world ------------------------------------------------------
def gmm_config(steps, lr=1e-3, checkpoint_every=2, lora_path=None):
    spec = RunSpec.build(method="dmd2", method_options={"student_timesteps": [999, 499], "guidance_scale": 1.0},
                         teacher=TeacherSpec("world", "gmm", options={"width": 16, "fit_steps": 0}),
                         train={"steps": steps, "batch_size": 4, "student_lr": lr, "critic_lr": lr, "lora_rank": 2,
                                "checkpoint_every": checkpoint_every, "log_every": 1, "preview_every": 0},
                         output=OutputSpec(lora_name=lora_path and os.path.basename(lora_path), lora_path=lora_path),
                         name="gmm")
    return spec.to_dict()


@pytest.mark.slow
def test_real_worker_completes_stops_resumes_and_fails_loudly_on_nan(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    diverging = JobManager(tmp_path / "nan", env=dict(env, DISTILLERY_WORKER_FAULT="nan"), poll_interval=0.1,
                           python=sys.executable)
    try:
        nan = diverging.create(gmm_config(steps=4))
        status = diverging.wait(nan, 300)
        assert status["state"] == st.FAILED and status["exit_code"] == 3
        assert "diverged" in status["reason"] and "TrainingDiverged" in status["log_tail"]
    finally:
        diverging.close()
    manager = JobManager(tmp_path / "jobs", env=env, poll_interval=0.1, python=sys.executable)
    try:
        job = manager.create(gmm_config(steps=6))
        status = manager.wait(job, 300)
        assert status["state"] == st.COMPLETED, status
        steps = [r["step"] for r in manager.store.metrics(job)["records"]]
        assert steps == [1, 2, 3, 4, 5, 6]
        assert manager.store.last_checkpoint_step(job) == 6
        # train more: a completed job resumed with a larger steps continues from its last checkpoint
        assert manager.resume(job, steps=8)["steps"] == 8
        assert manager.store.config(job)["train"]["steps"] == 8
        assert manager.wait(job, 300)["state"] == st.COMPLETED
        assert "resumed from the checkpoint of step 6" in manager.store.log_tail(job, 400)
        assert [r["step"] for r in manager.store.metrics(job)["records"]] == list(range(1, 9))
        # Stop then Resume at once, twice, on the real worker: it ends completed, the curve continuous
        manager.resume(job, steps=40)
        for _ in range(2):
            deadline = time.monotonic() + 120
            while manager.store.status(job).get("state") != st.RUNNING and time.monotonic() < deadline:
                time.sleep(0.02)
            manager.stop(job)
            time.sleep(0.05)
            manager.resume(job)
        status = manager.wait(job, 300)
        assert status["state"] == st.COMPLETED and status["step"] == 40, status
        assert [r["step"] for r in manager.store.metrics(job)["records"]] == list(range(1, 41))
    finally:
        manager.close()


# --- students -------------------------------------------------------------------------------------------
def test_student_card_from_the_header(tmp_path):
    from comfyui_distillery.trainers.card import StudentCard
    from comfyui_distillery.trainers.lora import save_lora

    card = StudentCard(method="tcd", sampler="tcd", gamma=0.2, timesteps=[999, 759, 499, 259],
                       prediction_type="epsilon", base_model_hash="1e999", method_options={"mode": "tcd"})
    path = tmp_path / "s.safetensors"
    save_lora(path, {"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, card.to_metadata())
    read = students.student_card(path)
    assert read == card and read.base_model_hash == "1e999"  # a hex hash that parses as a number stays text
    assert read.sampler_choice() == ("tcd", {"gamma": 0.2})
    assert read.recommended_timesteps() == [999, 759, 499, 259]
    # the first format: one JSON-encoded key per value
    old = tmp_path / "old.safetensors"
    save_lora(old, {"w": torch.zeros(1)}, {"distillery.method": "dmd2", "distillery.sampler": "x0_renoise",
                                          "distillery.timesteps": [999, 499], "distillery.base_model_hash": "7e12",
                                          "distillery.format": 1})
    legacy = students.student_card(old)
    assert legacy.method == "dmd2" and legacy.recommended_timesteps() == [999, 499]
    assert legacy.base_model_hash == "7e12" and legacy.card_version == 1
    assert legacy.sampler_choice() == ("x0_renoise", {"lcm_boundary": False})
    plain = tmp_path / "plain.safetensors"
    save_lora(plain, {"w": torch.zeros(1)}, {"ss_network_dim": 4})
    assert students.student_card(plain) is None
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    assert students.student_card(tmp_path / "junk.safetensors") is None


# --- the ComfyUI task's pieces that need no ComfyUI ------------------------------------------------------
class Downsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.Conv2d(4, 4, 3, stride=2, padding=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(1, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(8, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(1, cout), nn.SiLU(), nn.Dropout(0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.to_out = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0))


class TinyLDM(nn.Module):
    """ldm module names (input_blocks / middle_block / output_blocks), shapes irrelevant."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(4, 8))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Sequential(ResBlock(4, 4), Attn()),
                                           nn.Sequential(Downsample())])
        self.output_blocks = nn.ModuleList([nn.Sequential(ResBlock(8, 4))])
        self.out = nn.Sequential(nn.Conv2d(4, 4, 3))


class FakeBaseModel(nn.Module):
    """Stands in for comfy's BaseModel: apply_model(x, sigma, **conds) -> x0."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = TinyLDM()

    def apply_model(self, x, t, transformer_options=None, **conds):
        self.seen = (t.dtype, sorted(conds))
        return x * 0.5 + conds["c_crossattn"].mean() + self.diffusion_model.input_blocks[1][1].to_q(
            torch.ones(1, 4)).sum() * 0


def test_lora_targets_follow_ldm_names_and_fall_back_to_dit_blocks():
    from comfyui_distillery.comfy_backend import lora_target_names

    names = lora_target_names(TinyLDM())
    short = {n[len("model.diffusion_model."):] for n in names}
    assert short == {"input_blocks.1.0.in_layers.2", "input_blocks.1.0.emb_layers.1", "input_blocks.1.0.out_layers.3",
                     "input_blocks.1.1.to_q", "input_blocks.1.1.to_k", "input_blocks.1.1.to_v",
                     "input_blocks.1.1.to_out.0", "input_blocks.2.0.op", "output_blocks.0.0.in_layers.2",
                     "output_blocks.0.0.emb_layers.1", "output_blocks.0.0.out_layers.3",
                     "output_blocks.0.0.skip_connection"}

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = nn.Linear(4, 4)
            self.double_blocks = nn.ModuleList([nn.Module()])
            self.double_blocks[0].img_attn = nn.Module()
            self.double_blocks[0].img_attn.qkv = nn.Linear(4, 12)
            self.double_blocks[0].img_mod = nn.Module()  # Flux's adaptive-norm projections: left out
            self.double_blocks[0].img_mod.lin = nn.Linear(4, 24)
            self.single_blocks = nn.ModuleList([nn.Module()])
            self.single_blocks[0].linear1 = nn.Linear(4, 20)
            self.single_blocks[0].modulation = nn.Module()
            self.single_blocks[0].modulation.lin = nn.Linear(4, 12)
            self.joint_blocks = nn.ModuleList([nn.Module()])  # SD3's
            self.joint_blocks[0].adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(4, 24))
            self.joint_blocks[0].mod_proj = nn.Linear(4, 4)  # only the exact name parts are modulation
            self.final = nn.Linear(4, 4)

    assert lora_target_names(DiT()) == ["model.diffusion_model." + n for n in (
        "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "joint_blocks.0.mod_proj")]


def test_comfy_model_wrapper_and_export_keys_match_comfyui_key_map():
    from comfyui_distillery.core.schedules import DiscreteVPSchedule
    from comfyui_distillery.comfy_backend import ComfyDiffusionModel, lora_target_names
    from comfyui_distillery.trainers.lora import kohya_unet_state_dict
    from comfyui_distillery.trainers.roles import build_roles

    base_model = FakeBaseModel()
    model = ComfyDiffusionModel(base_model, DiscreteVPSchedule.sd15())
    x = torch.randn(2, 4, 3, 3)
    cond = {"c_crossattn": torch.ones(2, 3, 4)}
    out = model(x, torch.tensor(5.0, dtype=torch.float64), cond)
    assert torch.allclose(out, x * 0.5 + 1.0) and base_model.seen == (torch.float32, ["c_crossattn"])
    roles = build_roles(model, None, with_critic=True, rank=2,
                        target_modules=lora_target_names(base_model.diffusion_model))
    assert roles.trainable["student"] and roles.trainable["critic"]
    state = kohya_unet_state_dict(base_model.diffusion_model, "student")
    # ComfyUI's model_lora_keys_unet: diffusion_model.<k>.weight -> lora_unet_<k with . -> _>
    expected = {"lora_unet_" + n[len("model.diffusion_model."):].replace(".", "_")
                for n in lora_target_names(TinyLDM())}
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert stems == expected
    assert all(f"{s}.lora_down.weight" in state and f"{s}.lora_up.weight" in state and f"{s}.alpha" in state
               for s in stems)


def test_real_images_reach_comfyuis_vae_as_its_pixels_and_come_back_in_model_space(tmp_path):
    """ComfyUI's VAE.encode takes [B, H, W, 3] in [0, 1]; the model's process_latent_in scales the result."""
    from PIL import Image

    from comfyui_distillery.comfy_backend import encode_with_comfy_vae

    Image.new("RGB", (12, 8), (255, 0, 51)).save(tmp_path / "red.png")
    seen = []

    class FakeVAE:
        def encode(self, pixels):
            seen.append(pixels)
            return pixels.movedim(-1, 1)[:, :, ::2, ::2]  # "latents": [B, 3, H/2, W/2]

    class Scaling:
        def process_latent_in(self, z):
            return z * 0.5

    z = encode_with_comfy_vae(FakeVAE(), Scaling(), [tmp_path / "red.png"], 8)
    assert seen[0].shape == (1, 8, 8, 3) and 0 <= seen[0].min() and seen[0].max() <= 1
    assert torch.allclose(z[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]) * 0.5, atol=1e-3)
