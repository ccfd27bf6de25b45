"""The on-disk state of training jobs: one folder per job under a root (ComfyUI: output/distillery/jobs).

    <root>/<id>/config.json     what to train (written once, when the job is created)
              /status.json      where it is (state, step, reason, ...), always replaced atomically
              /metrics.jsonl    one JSON record per logged step (written by the engine)
              /checkpoints/     step-XXXXXXXX/state.pt, complete or absent (the engine's atomic saves)
              /previews/        step-XXXXXXXX.png
              /log.txt          the worker's stdout and stderr
              /stop.request     present while a stop is asked for (the worker polls it between steps)
              /resume.request   a Resume asked for while the worker was stopping (the manager's, not the worker's)

Ids and file names coming from outside (HTTP, nodes) are validated here, so nothing can reach outside a
job's folder. Everything is plain files, so the state survives a restart of ComfyUI. The job manager
changes a job's files only while it has no worker: train.steps ("train more"), metrics.jsonl cut back to
the checkpoint a resumed run continues from, or the whole folder (delete).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

JOB_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{2,63}$")
PREVIEW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(png|jpg|jpeg|webp)$")

QUEUED, STARTING, RUNNING = "queued", "starting", "running"
COMPLETED, FAILED, STOPPED, INTERRUPTED = "completed", "failed", "stopped", "interrupted"
STATES = (QUEUED, STARTING, RUNNING, COMPLETED, FAILED, STOPPED, INTERRUPTED)
ACTIVE = frozenset({STARTING, RUNNING})  # a worker process exists (or should)
TERMINAL = frozenset({COMPLETED, FAILED, STOPPED, INTERRUPTED})
RESUMABLE = frozenset({FAILED, STOPPED, INTERRUPTED})

CONFIG, STATUS, METRICS, LOG, STOP_FLAG = "config.json", "status.json", "metrics.jsonl", "log.txt", "stop.request"
RESUME_FLAG = "resume.request"


class JobError(ValueError):
    """A bad request about a job; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_job_id(job_id) -> str:
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise JobError(f"job id {str(job_id)[:80]!r} is not valid: ids are 3-64 characters of a-z, 0-9, '-' "
                       f"and '_'", 400)
    return job_id


def check_preview_name(name) -> str:
    if not isinstance(name, str) or not PREVIEW_NAME.match(name) or ".." in name:
        raise JobError(f"preview name {str(name)[:80]!r} is not valid: a plain .png/.jpg/.webp file name", 400)
    return name


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    for _ in range(3):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return default
        except ValueError:  # only a non-atomic writer could cause this; retry, then give up
            time.sleep(0.05)
    return default


def tail_lines(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a text file (reads at most max_bytes from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    # tqdm-style carriage-return updates: keep the last state of each line
    rows = [row.rsplit("\r", 1)[-1] for row in text.split("\n")]
    return "\n".join(rows[-lines - 1:]).strip("\n")


class JobStore:
    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # --- paths ------------------------------------------------------------------------------------
    def dir(self, job_id: str, must_exist: bool = True) -> Path:
        path = self.root / check_job_id(job_id)
        if must_exist and not (path / CONFIG).is_file():
            raise JobError(f"no job {job_id!r}", 404)
        return path

    def exists(self, job_id: str) -> bool:
        try:
            self.dir(job_id)
            return True
        except JobError:
            return False

    def delete(self, job_id: str) -> None:
        """Remove a job's folder: renamed out of the listing first (atomic), then removed."""
        path = self.dir(job_id)
        trash = self.root / f".deleted-{job_id}-{secrets.token_hex(3)}"
        try:
            os.replace(path, trash)
        except OSError as err:
            raise JobError(f"could not delete job {job_id}: {err}", 500) from None
        shutil.rmtree(trash, ignore_errors=True)

    def ids(self) -> list[str]:
        """All job ids, oldest first (ids start with their creation time)."""
        found = [p.name for p in self.root.iterdir()
                 if p.is_dir() and JOB_ID.match(p.name) and (p / CONFIG).is_file()]
        return sorted(found)

    # --- config and status ------------------------------------------------------------------------
    def create(self, config: dict, job_id: str | None = None) -> str:
        job_id = check_job_id(job_id or new_job_id())
        path = self.root / job_id
        path.mkdir(parents=True, exist_ok=False)
        now = time.time()
        write_json_atomic(path / CONFIG, {**config, "id": job_id, "created": now})
        write_json_atomic(path / STATUS, {"id": job_id, "state": QUEUED, "created": now, "queued_at": now,
                                          "step": 0, "steps": int(config.get("train", {}).get("steps", 0)),
                                          "attempt": 0})
        return job_id

    def config(self, job_id: str) -> dict:
        return read_json(self.dir(job_id) / CONFIG, {})

    def set_train_steps(self, job_id: str, steps: int) -> dict:
        """Change config.json's train.steps ("train more"); a fingerprint, if the config has one, follows."""
        config = self.config(job_id)
        config.setdefault("train", {})["steps"] = int(steps)
        if "fingerprint" in config:
            from .options import fingerprint

            try:  # of the config as it was made (the store adds id and created)
                config["fingerprint"] = fingerprint({k: v for k, v in config.items() if k not in ("id", "created")})
            except (ValueError, TypeError, KeyError):  # a config this version cannot read: the worker says so
                pass
        write_json_atomic(self.dir(job_id) / CONFIG, config)
        return config

    def status(self, job_id: str) -> dict:
        path = self.dir(job_id)
        status = read_json(path / STATUS, None) or {"id": job_id, "state": INTERRUPTED,
                                                    "reason": "status.json is missing or unreadable"}
        status["stop_requested"] = (path / STOP_FLAG).exists()
        return status

    def update_status(self, job_id: str, **changes) -> dict:
        """Read-modify-write status.json (the caller makes sure only one process writes at a time)."""
        path = self.dir(job_id)
        status = read_json(path / STATUS, None) or {"id": job_id}
        status.update(changes)
        status.pop("stop_requested", None)
        write_json_atomic(path / STATUS, status)
        return status

    # --- stop flag --------------------------------------------------------------------------------
    def request_stop(self, job_id: str) -> None:
        (self.dir(job_id) / STOP_FLAG).write_text(str(time.time()))

    def clear_stop(self, job_id: str) -> None:
        try:
            (self.dir(job_id) / STOP_FLAG).unlink()
        except FileNotFoundError:
            pass

    # --- a resume waiting for the worker to exit (a file of its own: the worker owns status.json) -------------
    def request_resume(self, job_id: str, options: dict) -> None:
        write_json_atomic(self.dir(job_id) / RESUME_FLAG, options)

    def requested_resume(self, job_id: str) -> dict | None:
        options = read_json(self.dir(job_id) / RESUME_FLAG, None)
        return options if isinstance(options, dict) else None

    def clear_resume(self, job_id: str) -> None:
        try:
            (self.dir(job_id) / RESUME_FLAG).unlink()
        except FileNotFoundError:
            pass

    # --- metrics, previews, log -------------------------------------------------------------------
    def metrics(self, job_id: str, since: int = -1, limit: int = 5000) -> dict:
        """Records with step > since (oldest first, at most `limit`); `cursor` is the step to ask from next.

        The cursor is a step, not a byte offset: a resumed run rewrites metrics.jsonl from its checkpoint
        on (bit-exact, so the same steps come back) and a step cursor stays valid across that.
        """
        path = self.dir(job_id) / METRICS
        records, last_step = [], -1
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # a line being written right now: next time
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    step = int(record.get("step", -1))
                    last_step = max(last_step, step)
                    if step > since and len(records) < limit:
                        records.append(record)
        except FileNotFoundError:
            pass
        cursor = records[-1]["step"] if records else max(since, -1)
        return {"records": records, "cursor": cursor, "last_step": last_step,
                "more": bool(records) and records[-1]["step"] < last_step}

    def truncate_metrics(self, job_id: str, step: int) -> None:
        """Keep the records of steps <= step: a run continues from its checkpoint and logs the rest again."""
        path = self.dir(job_id) / METRICS
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        kept = []
        for line in lines:
            try:
                if int(json.loads(line).get("step", -1)) <= step:
                    kept.append(line + "\n")
            except (ValueError, TypeError, AttributeError):
                continue
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    def previews(self, job_id: str) -> list[str]:
        folder = self.dir(job_id) / "previews"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and PREVIEW_NAME.match(p.name))

    def preview_path(self, job_id: str, name: str) -> Path:
        check_preview_name(name)
        folder = (self.dir(job_id) / "previews").resolve()
        path = (folder / name).resolve()
        if path.parent != folder or not path.is_file():
            raise JobError(f"job {job_id!r} has no preview {name!r}", 404)
        return path

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        return tail_lines(self.dir(job_id) / LOG, lines)

    def append_log(self, job_id: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.dir(job_id) / LOG, "a", encoding="utf-8") as f:
            f.write(f"[distillery {stamp}] {message}\n")

    def last_checkpoint_step(self, job_id: str) -> int | None:
        folder = self.dir(job_id) / "checkpoints"
        steps = []
        if folder.is_dir():
            for p in folder.iterdir():
                m = re.match(r"^step-(\d{8})$", p.name)
                if m and (p / "state.pt").exists():
                    steps.append(int(m.group(1)))
        return max(steps) if steps else None

    def summary(self, job_id: str) -> dict:
        """Status plus the few config fields a job list shows."""
        status = self.status(job_id)
        config = self.config(job_id)
        task = config.get("task") or {}
        teacher = config.get("teacher") or {}  # the run spec's layout
        out = dict(status)
        out.pop("lora_path", None)  # a machine path (the worker's record): it stays on the server
        out.update(name=config.get("name"), method=config.get("method"),
                   model=task.get("checkpoint") or task.get("world") or teacher.get("name"),
                   lora_name=config.get("output", {}).get("lora_name"),
                   device=config.get("device"))
        previews = self.previews(job_id)
        out["latest_preview"] = previews[-1] if previews else None
        out["checkpoint_step"] = self.last_checkpoint_step(job_id)
        return out
