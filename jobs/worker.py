"""The worker process of one training job:  python <pack>/jobs/worker.py <job_dir>

Why a file path and not `python -m comfyui_distillery.jobs.worker`: inside ComfyUI the pack is imported
from custom_nodes/ under its *folder name* (e.g. "ComfyUI-Distillery", not even an identifier), and the
name `comfyui_distillery` is only importable where the pack was pip-installed - maybe another copy, maybe
not at all in ComfyUI's Python. So the job manager starts this file with ComfyUI's own interpreter, and
the bootstrap below registers the folder this file lives in as the package `comfyui_distillery` before
importing anything relative. The worker therefore always runs exactly the code the server loaded.
(`python -m comfyui_distillery.jobs.worker <job_dir>` works too where the package is installed.)

The worker owns status.json while it runs; the manager writes it only before the start and after the
exit. It never imports ComfyUI unless the job's teacher is loaded by ComfyUI: a single-file checkpoint or a
diffusion model with its text encoders and VAE (comfy_backend.py).

Exit codes: 0 completed or stopped, 1 error, 3 diverged (NaN / inf), 4 out of memory, 2 bad job folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def _bootstrap_and_run() -> int:
    pack_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    # the script's folder is sys.path[0]: take it out so jobs/*.py never shadow top-level modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.util.spec_from_file_location("comfyui_distillery", os.path.join(pack_root, "__init__.py"),
                                                  submodule_search_locations=[pack_root])
    package = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_distillery"] = package
    spec.loader.exec_module(package)
    worker = importlib.import_module("comfyui_distillery.jobs.worker")
    return worker.main(sys.argv[1:])


if __name__ == "__main__" and not __package__:
    sys.exit(_bootstrap_and_run())

# ---------------------------------------------------------------------------------------------------
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from . import store as st  # noqa: E402

log = logging.getLogger("distillery.worker")

EXIT_OK, EXIT_ERROR, EXIT_BAD_JOB, EXIT_DIVERGED, EXIT_OOM = 0, 1, 2, 3, 4
FAULT_ENV = "DISTILLERY_WORKER_FAULT"  # tests: "exit" (hard exit 7 mid-run), "raise", "sleep", "nan"


class StopRequested(Exception):
    pass


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    return isinstance(err, oom_types) or "out of memory" in str(err).lower()


class Worker:
    def __init__(self, job_dir: Path):
        self.job_dir = Path(job_dir).resolve()
        self.store = st.JobStore(self.job_dir.parent)
        self.id = st.check_job_id(self.job_dir.name)
        from ..trainers.spec import RunSpec

        self.spec = RunSpec.from_dict(self.store.config(self.id))  # checked again: a file can be edited
        self.stop_signal = False
        self.last_status_write = 0.0
        self.step_time = None  # EMA of seconds per step
        self.last_metrics: dict = {}
        self.trainer = None

    # --- status -----------------------------------------------------------------------------------
    def status(self, **changes) -> None:
        changes["heartbeat"] = time.time()
        self.store.update_status(self.id, **changes)
        self.last_status_write = time.time()

    def progress(self, force: bool = False) -> None:
        if not force and time.time() - self.last_status_write < 1.0:
            return
        t = self.trainer
        steps = t.config.steps
        it_per_s = 1.0 / self.step_time if self.step_time else None
        eta = (steps - t.step) * self.step_time if self.step_time else None
        self.status(state=st.RUNNING, phase="training", step=t.step, steps=steps, it_per_s=it_per_s, eta_s=eta,
                    last_metrics=self.last_metrics)

    def on_metrics(self, record: dict) -> None:
        self.last_metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}

    def stop_requested(self) -> bool:
        return self.stop_signal or (self.job_dir / st.STOP_FLAG).exists()

    def check_stop(self) -> None:
        if self.stop_requested():
            raise StopRequested()

    # --- building ---------------------------------------------------------------------------------
    def build_task(self):
        from ..api import task_from_spec

        return task_from_spec(self.spec, progress=False, phase=lambda p: self.status(phase=p))

    def build_trainer(self, task):
        from ..trainers.engine import Trainer

        train_cfg = self.spec.train_config(self.job_dir)
        return Trainer(task, self.spec.make_method(), train_cfg, on_metrics=self.on_metrics, progress=False)

    def export(self) -> str | None:
        out = self.spec.output
        if not out.lora_path:
            return None
        from .. import api

        path = api.export_student(self.trainer, out.lora_path, **api.card_extras(self.spec, job=self.id,
                                                                                 task=self.trainer.task))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # like any file the user saves (the atomic temp file was private)
        return str(path)

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        attempt = int(self.store.status(self.id).get("attempt", 0) or 0)
        self.status(state=st.RUNNING, phase="loading", pid=os.getpid(), started_at=time.time(), reason=None,
                    attempt=attempt)
        log.info("job %s: %s, worker pid %d, python %s", self.id, self.spec.method, os.getpid(),
                 sys.executable)
        fault = os.environ.get(FAULT_ENV, "")
        try:
            if fault == "raise":
                raise RuntimeError(f"{FAULT_ENV}=raise: an injected failure")
            task = self.build_task()
            self.check_stop()
            self.status(phase="preparing the trainer")
            self.trainer = t = self.build_trainer(task)
            if fault == "nan":  # a loss that turns NaN, as a diverging run's does
                method_loss = t.method.loss
                t.method.loss = lambda role, ctx: (lambda loss, m: (loss * float("nan"), m))(*method_loss(role, ctx))
            if t.resume():
                log.info("resumed from the checkpoint of step %d", t.step)
                self.status(resumed_from_step=t.step)
            else:
                log.info("starting from step 0")
            self.progress(force=True)
            while t.step < t.config.steps:
                if self.stop_requested():
                    self.status(phase="saving a checkpoint to stop")
                    t.save()
                    raise StopRequested()
                start = time.perf_counter()
                t.train(until=t.step + 1)
                took = time.perf_counter() - start
                self.step_time = took if self.step_time is None else 0.8 * self.step_time + 0.2 * took
                if fault == "exit" and t.step >= 2:
                    os._exit(7)  # a hard crash mid-run (tests of loud failure)
                if fault == "sleep":
                    time.sleep(0.5)
                self.progress(force=t.step == t.config.steps)
            self.status(phase="exporting the LoRA")
            lora = self.export()
            if lora:
                log.info("wrote the student LoRA %s", lora)
            self.status(state=st.COMPLETED, phase="done", step=t.step, lora_path=lora, ended_at=time.time(),
                        eta_s=0)
            return EXIT_OK
        except StopRequested:
            step = self.trainer.step if self.trainer is not None else None
            log.info("stopped on request at step %s", step)
            self.status(state=st.STOPPED, phase="stopped", step=step if step is not None else 0,
                        reason="stopped on request", ended_at=time.time(), eta_s=None)
            return EXIT_OK
        except BaseException as err:  # noqa: BLE001 - every failure must reach status.json
            from ..trainers.engine import TrainingDiverged
            from ..trainers.memory import NotEnoughMemory

            traceback.print_exc()
            if isinstance(err, TrainingDiverged):
                code, reason = EXIT_DIVERGED, f"training diverged (NaN / inf): {err}"
            elif isinstance(err, NotEnoughMemory):
                code, reason = EXIT_OOM, str(err)  # it names the settings that would fit
            elif is_out_of_memory(err):
                code, reason = EXIT_OOM, (f"out of memory: {err}. Plan the run with the Distillery Plan VRAM node "
                                          f"(its fit option names the cheapest change that fits), lower the "
                                          f"resolution, or free the GPU (close other programs)")
            elif isinstance(err, KeyboardInterrupt):
                code, reason = EXIT_ERROR, "interrupted (SIGINT)"
            else:
                code, reason = EXIT_ERROR, f"{type(err).__name__}: {err}"
            step = self.trainer.step if self.trainer is not None else None
            self.status(state=st.FAILED, reason=reason, exit_code=code, ended_at=time.time(), eta_s=None,
                        **({"step": step} if step is not None else {}))
            return code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_signal = True
        log.info("SIGTERM: stopping after the current step")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    if len(argv) != 1:
        print("usage: python <pack>/jobs/worker.py <job_dir>", file=sys.stderr)
        return EXIT_BAD_JOB
    job_dir = Path(argv[0])
    if not (job_dir / st.CONFIG).is_file():
        print(f"{job_dir} is not a job folder (no {st.CONFIG})", file=sys.stderr)
        return EXIT_BAD_JOB
    try:
        worker = Worker(job_dir)
    except (ValueError, json.JSONDecodeError) as err:
        print(f"bad job folder {job_dir}: {err}", file=sys.stderr)
        return EXIT_BAD_JOB
    return worker.run()


if __name__ == "__main__":  # python -m comfyui_distillery.jobs.worker <job_dir>
    sys.exit(main())
