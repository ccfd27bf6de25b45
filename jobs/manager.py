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
  the newest checkpoint.
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
                if self.store.config(job_id).get("fingerprint") == fingerprint and \
                        self.store.status(job_id).get("state") in states:
                    return job_id
            except st.JobError:
                continue
        return None

    def list(self) -> list[dict]:
        out = []
        for job_id in reversed(self.store.ids()):  # newest first
            try:
                out.append(self.store.summary(job_id))
            except st.JobError:
                continue
        return out

    def get(self, job_id: str, log_lines: int = 0) -> dict:
        info = self.store.summary(job_id)
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
            if state == st.QUEUED:
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

    def resume(self, job_id: str) -> dict:
        with self._lock:
            status = self.store.status(job_id)
            state = status.get("state")
            if state not in st.RESUMABLE:
                raise st.JobError(f"job {job_id} is {state}; only failed, stopped or interrupted jobs can be "
                                  f"resumed", 409)
            self.store.clear_stop(job_id)
            ckpt = self.store.last_checkpoint_step(job_id)
            self.store.update_status(job_id, state=st.QUEUED, queued_at=time.time(), reason=None, log_tail=None,
                                     exit_code=None, ended_at=None, phase=None, eta_s=None,
                                     step=ckpt or 0)  # where it will continue from
            self.store.append_log(job_id, f"resume requested: continues from "
                                          f"{'the checkpoint of step %d' % ckpt if ckpt is not None else 'step 0'}")
        self._emit_now(job_id)
        self._wake.set()
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.2) -> dict:
        """Block until the job is in a terminal state and its worker has been reaped (tests, scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.store.status(job_id)
            if status.get("state") in st.TERMINAL and job_id not in self._procs:
                return self.store.status(job_id)
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
            if pid and _pid_alive(int(pid)) and job_dir in _cmdline(int(pid)):
                self._procs[job_id] = _Adopted(int(pid))
                log.info("distillery: job %s: adopted its running worker (pid %s)", job_id, pid)
                continue
            ckpt = self.store.last_checkpoint_step(job_id)
            where = f"the checkpoint of step {ckpt}" if ckpt is not None else "step 0 (no checkpoint yet)"
            self.store.update_status(job_id, state=st.INTERRUPTED, ended_at=time.time(), eta_s=None,
                                     reason=f"the worker stopped with ComfyUI; resume continues from {where}",
                                     log_tail=self.store.log_tail(job_id, self.log_tail_lines))
            log.info("distillery: job %s was interrupted; it can be resumed from %s", job_id, where)

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
                    del self._procs[job_id]
                elif job_id in self._stop_deadline and time.time() > self._stop_deadline[job_id]:
                    self.store.append_log(job_id, f"the worker did not stop within {self.stop_grace:.0f} s: "
                                                  f"killing it")
                    proc.kill()
                    del self._stop_deadline[job_id]
            queued = self._queued()
            while queued and len(self._procs) < self.max_running:
                self._start(queued.pop(0))
        for job_id in self._watch_ids():
            self._emit_changes(job_id)

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
        config = self.store.config(job_id)
        status = self.store.status(job_id)
        self.store.clear_stop(job_id)
        attempt = int(status.get("attempt") or 0) + 1
        self.store.update_status(job_id, state=st.STARTING, phase="starting the worker", attempt=attempt,
                                 reason=None, log_tail=None, exit_code=None, pid=None)
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
        if ok and state in (st.COMPLETED, st.STOPPED):
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
        summary = self.store.summary(job_id)
        signature = (summary.get("state"), summary.get("step"), summary.get("phase"), summary.get("reason"),
                     summary.get("stop_requested"), summary.get("latest_preview"), summary.get("attempt"))
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
