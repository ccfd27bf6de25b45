"""JobManager: a queue of training jobs, each run by a worker process of its own.

* In order, `max_running` at a time (1 by default: one GPU job). A job that waits is "queued".
* Each job runs `python <pack>/jobs/worker.py <job_dir>` with the server's own interpreter, stdout and
  stderr into the job's log.txt, in a session of its own: a crash, an OOM or a kill of the worker never
  reaches the server, and the worker's GPU memory is returned to the driver when it exits.
* Failure is loud: when a worker exits, its exit code and status are checked; anything but a clean
  completed / stopped marks the job failed with the reason (the worker's own, or the exit code / signal)
  and the last lines of its log.
* Stop: a flag file the worker polls between steps (it saves a checkpoint and exits), plus SIGTERM (same
  effect), escalated to a kill after `stop_grace` seconds. Resume: re-queue; the worker continues from
  the newest checkpoint. A resume that comes while the old worker is still stopping (or has exited but
  is not reaped yet) is recorded and done when that worker is reaped: one job never has two workers, and
  Stop then Resume at any speed ends with the job running from its checkpoint. Resume of a completed job
  with a larger `steps` trains the student further ("train more").
* Delete: only a job without a worker; its folder, and its LoRA file when asked (only the file this job
  wrote, in the folder it wrote it to).
* Restart: jobs are listed again from disk. A worker that outlived the server is adopted (its pid and
  command line are checked); a job whose worker is gone is marked interrupted (resumable). Queued jobs
  stay queued and start in order.
* One watcher thread does it all (start, reap, watch): it tails status.json / metrics.jsonl / previews
  of active jobs and hands events to `notify` (ComfyUI: PromptServer.send_sync, which is thread-safe).

`before_start(job_id, config)` runs before a worker is spawned (ComfyUI: ask it to free its models); the
message it returns goes into the job's log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import store as st

log = logging.getLogger("distillery.jobs")

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
SIGNAL_NAMES = {getattr(signal, n): n for n in ("SIGKILL", "SIGTERM", "SIGSEGV", "SIGABRT", "SIGINT", "SIGBUS")
                if hasattr(signal, n)}


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends
        return False
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        import psutil

        return " ".join(psutil.Process(pid).cmdline())
    except ImportError:
        pass
    except Exception:  # noqa: BLE001
        return ""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pid: int, sig=None) -> None:
    try:
        import psutil

        proc = psutil.Process(pid)
        proc.kill() if sig is None else proc.send_signal(sig)
        return
    except ImportError:
        pass
    except Exception:  # noqa: BLE001
        return
    try:
        os.kill(pid, sig if sig is not None else getattr(signal, "SIGKILL", signal.SIGTERM))
    except OSError:
        pass


class _Adopted:
    """A worker started by an earlier server: we can signal it and see it end, not wait() for it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None and not _pid_alive(self.pid):
            self.returncode = "unknown"
        return self.returncode

    def send_signal(self, sig):
        _kill(self.pid, sig)

    def kill(self):
        _kill(self.pid)


def describe_exit(code) -> str:
    if code == "unknown":
        return "the worker process ended (it was started before a restart of ComfyUI; exit code unknown)"
    if isinstance(code, int) and code < 0:
        name = SIGNAL_NAMES.get(-code, f"signal {-code}")
        hint = " - often the system's out-of-memory killer" if -code == getattr(signal, "SIGKILL", 9) else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with code {code}"


def lora_job_id(path) -> str | None:
    """The id of the job that wrote a LoRA file, from its student card (either format); None when it names
    none. A file whose header cannot be read raises (OSError / ValueError)."""
    from ..trainers.card import StudentCard
    from .students import safetensors_metadata

    card = StudentCard.from_metadata(safetensors_metadata(path))
    return card.job if card is not None and card.job else None


class JobManager:
    def __init__(self, root, *, python: str | None = None, worker_script=WORKER_SCRIPT, max_running: int = 1,
                 notify: Callable[[dict], None] | None = None,
                 before_start: Callable[[str, dict], str | None] | None = None,
                 poll_interval: float = 0.5, stop_grace: float = 120.0, env: dict | None = None,
                 start_thread: bool = True, log_tail_lines: int = 30):
        self.store = st.JobStore(root)
        self.python = python or sys.executable
        self.worker_script = str(worker_script)
        self.max_running = max(1, int(max_running))
        self.notify = notify
        self.before_start = before_start
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        self.env = env
        self.log_tail_lines = log_tail_lines
        self._procs: dict[str, object] = {}
        self._stop_deadline: dict[str, float] = {}
        self._resume_after: dict[str, dict] = {}  # job id -> resume options, once its old worker is reaped
        self._seen: dict[str, tuple] = {}  # job id -> (status signature, metrics cursor, latest preview)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = None
        self.recover()
        if start_thread:
            self._thread = threading.Thread(target=self._loop, name="distillery-jobs", daemon=True)
            self._thread.start()

    # --- public API (any thread) ------------------------------------------------------------------
    def create(self, config: dict) -> str:
        with self._lock:
            job_id = self.store.create(config)
        log.info("distillery: job %s queued (%s)", job_id, config.get("name"))
        self._emit_now(job_id)
        self._wake.set()
        return job_id

    def find_equivalent(self, fingerprint: str, states=(st.QUEUED, st.STARTING, st.RUNNING, st.COMPLETED)):
        """The newest job with this config fingerprint in one of `states` (re-running a workflow must
        not start the same training twice)."""
        for job_id in reversed(self.store.ids()):
            try:
                config = self.store.config(job_id)
                if self.store.status(job_id).get("state") in states and \
                        fingerprint in (config.get("fingerprint"), self._current_fingerprint(config)):
                    return job_id
            except st.JobError:
                continue
        return None

    @staticmethod
    def _current_fingerprint(config: dict) -> str | None:
        """The fingerprint this version gives a stored config: a job written before an option existed stored
        a hash without it, and reading the spec back fills the option's default (None: unreadable config)."""
        from .options import fingerprint

        try:
            return fingerprint({k: v for k, v in config.items() if k != "fingerprint"})
        except (ValueError, TypeError, KeyError):
            return None

    def list(self) -> list[dict]:
        out = []
        for job_id in reversed(self.store.ids()):  # newest first
            try:
                out.append(self._summary(job_id))
            except st.JobError:
                continue
        return out

    def _summary(self, job_id: str) -> dict:
        info = self.store.summary(job_id)
        info["resume_pending"] = job_id in self._resume_after  # queued again once its old worker has exited
        return info

    def get(self, job_id: str, log_lines: int = 0) -> dict:
        info = self._summary(job_id)
        info["queue_position"] = self.queue_position(job_id)
        if log_lines:
            info["log_tail"] = self.store.log_tail(job_id, log_lines)
        return info

    def queue_position(self, job_id: str) -> int | None:
        queued = self._queued()
        return queued.index(job_id) + 1 if job_id in queued else None

    def stop(self, job_id: str) -> dict:
        with self._lock:
            state = self.store.status(job_id).get("state")
            if self._drop_pending_resume(job_id) is not None:
                # Stop, Resume, Stop while the old worker still exits: the last word is "stopped"
                self.store.append_log(job_id, "stop requested: the pending resume is cancelled")
                if state in st.ACTIVE:
                    self.store.request_stop(job_id)
            elif state == st.QUEUED:
                self.store.update_status(job_id, state=st.STOPPED, reason="stopped before it started",
                                         ended_at=time.time())
            elif state in st.ACTIVE:
                self.store.request_stop(job_id)
                proc = self._procs.get(job_id)
                if proc is not None:
                    try:
                        proc.send_signal(signal.SIGTERM)
                    except (OSError, ValueError):
                        pass
                self._stop_deadline[job_id] = time.time() + self.stop_grace
                self.store.append_log(job_id, "stop requested: the worker saves a checkpoint and exits")
            else:
                raise st.JobError(f"job {job_id} is {state}; only queued or running jobs can be stopped", 409)
        self._emit_now(job_id)
        self._wake.set()
        return self.get(job_id)

    def resume(self, job_id: str, steps: int | None = None) -> dict:
        """Queue a failed, stopped or interrupted job again; it continues from its newest checkpoint.

        steps: a new total of training steps (more than the job has trained), e.g. to train a completed
        student further; config.json's train.steps is changed when the job is queued again.
        A job whose worker is still stopping (or has exited and is not reaped yet) is queued again as soon
        as that worker is reaped, so Stop then Resume never runs two workers nor fails the job.
        """
        with self._lock:
            status = self.store.status(job_id)
            state = status.get("state")
            if steps is not None:
                steps = self._check_more_steps(job_id, status, steps)
            if job_id in self._procs:
                stopping = state in st.ACTIVE and status.get("stop_requested")
                if job_id in self._resume_after or not (stopping or state in st.TERMINAL):
                    raise st.JobError(f"job {job_id} is {state}; only failed, stopped, interrupted (or stopping) "
                                      f"jobs can be resumed", 409)
                if state == st.COMPLETED and steps is None:
                    raise st.JobError(self._completed_message(job_id, status), 409)
                self._set_pending_resume(job_id, {"steps": steps})
                self.store.append_log(job_id, "resume requested: the job is queued again as soon as its worker "
                                              "has exited")
            else:
                if state == st.COMPLETED and steps is None:
                    raise st.JobError(self._completed_message(job_id, status), 409)
                if state not in st.RESUMABLE and state != st.COMPLETED:
                    raise st.JobError(f"job {job_id} is {state}; only failed, stopped or interrupted jobs can be "
                                      f"resumed", 409)
                self._requeue(job_id, steps)
        self._emit_now(job_id)
        self._wake.set()
        return self.get(job_id)

    @staticmethod
    def _completed_message(job_id: str, status: dict) -> str:
        return (f"job {job_id} is completed; to train it further, resume it with a larger number of steps "
                f"(now {status.get('steps')})")

    def _check_more_steps(self, job_id: str, status: dict, steps) -> int:
        from ..trainers.engine import TrainConfig
        from ..trainers.registry import coerce, option_info

        declared = option_info(TrainConfig, "steps")
        if isinstance(steps, float) or isinstance(steps, str) and not steps.strip().isdigit():
            raise st.JobError(f"steps={str(steps)[:40]!r} is not a whole number", 400)
        try:
            steps = coerce(declared, steps)  # the range the training settings declare
        except ValueError as err:
            raise st.JobError(str(err), 400) from None
        done = max(int(status.get("step") or 0), self.store.last_checkpoint_step(job_id) or 0)
        current = int(self.store.config(job_id).get("train", {}).get("steps") or 0)
        if status.get("state") == st.COMPLETED:
            done = max(done, current)
        if not done < steps:
            raise st.JobError(f"steps={steps}: give a total larger than the {done} steps job {job_id} has "
                              f"already trained", 400)
        return steps

    def _requeue(self, job_id: str, steps: int | None = None) -> None:
        """Queue a job without a worker again, from its newest checkpoint (the caller holds the lock)."""
        self.store.clear_stop(job_id)
        ckpt = self.store.last_checkpoint_step(job_id)
        changes = {}
        if steps is not None:
            old = self.store.config(job_id).get("train", {}).get("steps")
            self.store.set_train_steps(job_id, steps)
            changes["steps"] = steps
            self.store.append_log(job_id, f"train more: steps {old} -> {steps}")
        # the steps after the checkpoint are trained (and logged) again: the curve has no stale tail
        self.store.truncate_metrics(job_id, ckpt or 0)
        seen = self._seen.get(job_id)
        if seen:
            self._seen[job_id] = (seen[0], min(seen[1], ckpt if ckpt is not None else -1))
        self.store.update_status(job_id, state=st.QUEUED, queued_at=time.time(), reason=None, log_tail=None,
                                 exit_code=None, ended_at=None, phase=None, eta_s=None, it_per_s=None,
                                 step=ckpt or 0, **changes)  # where it will continue from
        self.store.append_log(job_id, f"resume requested: continues from "
                                      f"{'the checkpoint of step %d' % ckpt if ckpt is not None else 'step 0'}")

    def delete(self, job_id: str, delete_lora: bool = False, lora_dirs=None) -> dict:
        """Remove a job without a worker: its folder and, when asked, the LoRA file it wrote.

        The LoRA goes only if it is the file this job wrote (its metadata names the job) in the folder the
        job wrote it to, and - when `lora_dirs` (e.g. ComfyUI's loras folders) are given - one of those.
        """
        with self._lock:
            status = self.store.status(job_id)
            state = status.get("state")
            if job_id in self._procs or state in st.ACTIVE or job_id in self._resume_after:
                raise st.JobError(f"job {job_id} is {state if state in st.ACTIVE else 'still stopping'}: "
                                  f"stop it first, then delete it", 409)
            config = self.store.config(job_id)
            lora, note = self._lora_of(job_id, config, lora_dirs) if delete_lora else (None, None)
            self.store.delete(job_id)
            self._seen.pop(job_id, None)
            self._stop_deadline.pop(job_id, None)
            lora_deleted = False
            if lora is not None:
                try:
                    lora.unlink()
                    lora_deleted = True
                except OSError as err:
                    note = f"the LoRA file could not be deleted: {err}"
        log.info("distillery: job %s deleted%s", job_id, " with its LoRA" if lora_deleted else "")
        if self.notify is not None:
            try:
                self.notify({"id": job_id, "deleted": True})
            except Exception:  # noqa: BLE001
                log.exception("distillery: job event listener failed")
        out = {"id": job_id, "deleted": True, "lora_deleted": lora_deleted}
        if note:
            out["lora_note"] = note
        return out

    @staticmethod
    def _lora_of(job_id: str, config: dict, lora_dirs=None):
        """(path, None) of the LoRA file this job wrote, or (None, why it is kept)."""
        out = config.get("output") or {}
        if not out.get("lora_path"):
            return None, "the job has no LoRA file"
        path = Path(out["lora_path"])
        name = out.get("lora_name") or path.name
        if path.name != name or not name.endswith(".safetensors") or "/" in name or "\\" in name:
            return None, "the LoRA file was kept: its name does not match the job's lora_name"
        folder = path.parent.resolve()
        if lora_dirs is not None:
            allowed = {Path(d).resolve() for d in (lora_dirs() if callable(lora_dirs) else lora_dirs)}
            if folder not in allowed:
                return None, "the LoRA file was kept: it is not in a loras folder"
        target = folder / name
        if target.is_symlink() or not target.is_file():
            return None, "the LoRA file was not found (already deleted?)"
        try:
            written_by = lora_job_id(target)
        except (OSError, ValueError) as err:
            return None, f"the LoRA file was kept: its header could not be read ({err})"
        if written_by != job_id:
            return None, (f"the LoRA file was kept: it was written by "
                          f"{'job ' + str(written_by) if written_by else 'something else'}, not by this job")
        return target, None

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.2) -> dict:
        """Block until the job is in a terminal state and its worker has been reaped (tests, scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.store.status(job_id)
            if status.get("state") in st.TERMINAL and job_id not in self._procs and \
                    job_id not in self._resume_after:
                status = self.store.status(job_id)  # read after the checks: a pending resume has re-queued it
                if status.get("state") in st.TERMINAL:
                    return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {status.get('state')} after {timeout} s")
            time.sleep(poll)

    def close(self) -> None:
        """Stop the watcher thread (workers keep running; a new manager adopts them)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- recovery ---------------------------------------------------------------------------------
    def _set_pending_resume(self, job_id: str, pending: dict) -> None:
        """Resume once the job's worker has exited; kept on disk too, so a restart does not lose it."""
        self._resume_after[job_id] = pending
        self.store.request_resume(job_id, pending)

    def _drop_pending_resume(self, job_id: str) -> dict | None:
        self.store.clear_resume(job_id)
        return self._resume_after.pop(job_id, None)

    def recover(self) -> None:
        for job_id in self.store.ids():
            try:
                status = self.store.status(job_id)
            except st.JobError:
                continue
            if status.get("state") not in st.ACTIVE:
                continue
            pid = status.get("pid")
            job_dir = str(self.store.dir(job_id))
            pending = self.store.requested_resume(job_id)
            if pid and _pid_alive(int(pid)) and job_dir in _cmdline(int(pid)):
                self._procs[job_id] = _Adopted(int(pid))
                if pending is not None:  # Stop then Resume before the restart: still to do
                    self._resume_after[job_id] = pending
                log.info("distillery: job %s: adopted its running worker (pid %s)", job_id, pid)
                continue
            ckpt = self.store.last_checkpoint_step(job_id)
            where = f"the checkpoint of step {ckpt}" if ckpt is not None else "step 0 (no checkpoint yet)"
            self.store.update_status(job_id, state=st.INTERRUPTED, ended_at=time.time(), eta_s=None,
                                     reason=f"the worker stopped with ComfyUI; resume continues from {where}",
                                     log_tail=self.store.log_tail(job_id, self.log_tail_lines))
            log.info("distillery: job %s was interrupted; it can be resumed from %s", job_id, where)
            if pending is not None:  # its worker was stopping for a Resume the restart cut off
                self.store.clear_resume(job_id)
                self._resume_reaped(job_id, pending)

    # --- the watcher thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the watcher must never die
                log.exception("distillery: job watcher error")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def tick(self) -> None:
        """One round: reap finished workers, start queued jobs, emit progress. (Tests call it directly.)"""
        with self._lock:
            for job_id, proc in list(self._procs.items()):
                code = proc.poll()
                if code is not None:
                    self._finalize(job_id, code)
                    pending = self._resume_after.get(job_id)
                    if pending is not None:
                        self._resume_reaped(job_id, pending)
                        self._drop_pending_resume(job_id)
                    del self._procs[job_id]
                elif job_id in self._stop_deadline and time.time() > self._stop_deadline[job_id]:
                    self.store.append_log(job_id, f"the worker did not stop within {self.stop_grace:.0f} s: "
                                                  f"killing it")
                    proc.kill()
                    del self._stop_deadline[job_id]
            queued = [job_id for job_id in self._queued() if job_id not in self._procs]
            while queued and len(self._procs) < self.max_running:
                self._start(queued.pop(0))
        for job_id in self._watch_ids():
            try:
                self._emit_changes(job_id)
            except st.JobError:  # deleted meanwhile
                self._seen.pop(job_id, None)

    def _resume_reaped(self, job_id: str, pending: dict) -> None:
        """A resume asked for while the old worker was stopping: queue the job now that it has exited."""
        status = self.store.status(job_id)
        state = status.get("state")
        steps = pending.get("steps")
        if steps is not None and steps <= max(int(status.get("step") or 0),
                                              self.store.last_checkpoint_step(job_id) or 0):
            self.store.append_log(job_id, f"steps={steps} is no more than the job has trained: not changed")
            steps = None
        if state in st.RESUMABLE or (state == st.COMPLETED and steps is not None):
            self._requeue(job_id, steps)
            self._emit_now(job_id)
        else:
            self.store.append_log(job_id, f"the worker ended {state}: the pending resume is dropped")

    def _queued(self) -> list[str]:
        found = []
        for job_id in self.store.ids():
            try:
                status = self.store.status(job_id)
            except st.JobError:
                continue
            if status.get("state") == st.QUEUED:
                found.append((status.get("queued_at") or 0, job_id))
        return [job_id for _, job_id in sorted(found)]

    def _start(self, job_id: str) -> None:
        if job_id in self._procs:  # never a second worker for one job
            return
        config = self.store.config(job_id)
        status = self.store.status(job_id)
        self.store.clear_stop(job_id)
        attempt = int(status.get("attempt") or 0) + 1
        self.store.update_status(job_id, state=st.STARTING, phase="starting the worker", attempt=attempt,
                                 reason=None, log_tail=None, exit_code=None, pid=None, it_per_s=None, eta_s=None,
                                 started_at=time.time())  # speed and ETA are of this attempt only
        self.store.append_log(job_id, f"attempt {attempt}: starting the worker ({self.python})")
        if self.before_start is not None:
            try:
                message = self.before_start(job_id, config)
            except Exception as err:  # noqa: BLE001 - freeing memory is best effort
                message = f"could not ask ComfyUI to free its models: {type(err).__name__}: {err}"
            if message:
                self.store.append_log(job_id, message)
        job_dir = self.store.dir(job_id)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # Ctrl+C in ComfyUI's terminal does not reach the worker
        elif hasattr(subprocess, "CREATE_NEW_PROCESS_GROUP"):
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        try:
            with open(job_dir / st.LOG, "ab") as logf:
                proc = subprocess.Popen([self.python, self.worker_script, str(job_dir)], cwd=str(job_dir),
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                        **kwargs)
        except OSError as err:
            self.store.update_status(job_id, state=st.FAILED, reason=f"could not start the worker: {err}",
                                     ended_at=time.time(), log_tail=self.store.log_tail(job_id))
            return
        self._procs[job_id] = proc  # from here on the worker owns status.json (it records its own pid)
        log.info("distillery: job %s started (worker pid %d)", job_id, proc.pid)

    def _finalize(self, job_id: str, code) -> None:
        """The worker is gone: make its end explicit in status.json."""
        self._stop_deadline.pop(job_id, None)
        status = self.store.status(job_id)
        state = status.get("state")
        stop_asked = status.get("stop_requested")
        self.store.clear_stop(job_id)
        tail = self.store.log_tail(job_id, self.log_tail_lines)
        ok = code == 0 or code == "unknown"
        if state == st.QUEUED:  # queued again since this worker was started (it never runs twice): keep that
            self.store.update_status(job_id, pid=None)
            self.store.append_log(job_id, f"the previous worker has exited ({describe_exit(code)}); the job "
                                          f"stays queued")
        elif ok and state in (st.COMPLETED, st.STOPPED):
            self.store.update_status(job_id, exit_code=code if code != "unknown" else None, pid=None)
        elif stop_asked and state not in (st.FAILED,):
            self.store.update_status(job_id, state=st.STOPPED, pid=None, ended_at=time.time(), eta_s=None,
                                     reason=f"stopped on request ({describe_exit(code)})", exit_code=code)
        else:
            worker_reason = status.get("reason") if state == st.FAILED else None
            reason = worker_reason or (describe_exit(code) + " before the job finished")
            if worker_reason and code not in (0, "unknown"):
                reason = f"{worker_reason} [{describe_exit(code)}]"
            self.store.update_status(job_id, state=st.FAILED, reason=reason, log_tail=tail, pid=None,
                                     exit_code=code, ended_at=status.get("ended_at") or time.time(), eta_s=None)
            self.store.append_log(job_id, f"FAILED: {reason}")
            log.error("distillery: job %s failed: %s\n%s", job_id, reason, tail)
        self._emit_now(job_id)

    # --- events -----------------------------------------------------------------------------------
    def _watch_ids(self) -> list[str]:
        ids = set(self._procs)
        ids.update(job_id for job_id, seen in self._seen.items() if seen and seen[0][0] in st.ACTIVE)
        return sorted(ids)

    def _emit_now(self, job_id: str) -> None:
        try:
            self._emit_changes(job_id, force=True)
        except st.JobError:
            pass

    def _emit_changes(self, job_id: str, force: bool = False) -> None:
        if self.notify is None:
            return
        summary = self._summary(job_id)
        signature = (summary.get("state"), summary.get("step"), summary.get("phase"), summary.get("reason"),
                     summary.get("stop_requested"), summary.get("latest_preview"), summary.get("attempt"),
                     summary.get("resume_pending"), summary.get("steps"))
        previous = self._seen.get(job_id)
        cursor = previous[1] if previous else -1
        metrics = self.store.metrics(job_id, since=cursor, limit=2000)
        if not force and previous and previous[0] == signature and not metrics["records"]:
            return
        self._seen[job_id] = (signature, metrics["cursor"])
        event = {"id": job_id, "job": summary, "metrics": metrics["records"], "cursor": metrics["cursor"]}
        try:
            self.notify(event)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the jobs
            log.exception("distillery: job event listener failed")
