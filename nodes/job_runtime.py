"""The one JobManager of a running ComfyUI, wired to its folders, its websocket and its model memory.

* jobs live under <output>/distillery/jobs/ (folder_paths.get_output_directory(), honours --output-directory)
* workers run with ComfyUI's own interpreter (sys.executable) and its checkout on their sys.path
* events go to every browser as "distillery.job" through PromptServer.send_sync (thread-safe: it hands
  the message to the server's event loop with call_soon_threadsafe); never comfy.utils.ProgressBar,
  which belongs to the executor thread
* before a GPU job starts, ComfyUI is asked to unload its models: we set the prompt queue's
  "unload_models" flag, which ComfyUI's prompt worker handles on its own thread between prompts
  (comfy.model_management.unload_all_models, then gc + soft_empty_cache) - the same thing POST /free
  does, and never concurrently with a running prompt (model_management has no lock). Only when no other
  prompt is waiting; the job log says what happened.

Environment: DISTILLERY_MAX_JOBS (default 1) jobs run at the same time.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from ..jobs.manager import JobManager

log = logging.getLogger("distillery")

EVENT = "distillery.job"
_manager: JobManager | None = None
_lock = threading.Lock()


def comfy_root() -> str:
    import folder_paths

    return os.path.dirname(os.path.abspath(folder_paths.__file__))


def jobs_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "distillery" / "jobs"


def server_device() -> str:
    """'cuda', 'cpu', 'mps', 'xpu', ... - the device ComfyUI itself computes on."""
    import comfy.model_management as mm

    if mm.cpu_state == mm.CPUState.CPU:
        return "cpu"
    return getattr(mm.get_torch_device(), "type", "cpu")


def notify(event: dict) -> None:
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(EVENT, event)


def free_comfy_models(job_id: str, config: dict) -> str:
    if config.get("device", "cpu") == "cpu":
        return "ComfyUI runs on the CPU: its models stay loaded (there is no GPU memory to free)"
    from server import PromptServer

    queue = PromptServer.instance.prompt_queue
    running, pending = queue.get_current_queue_volatile()
    if pending:
        return (f"ComfyUI's queue is busy ({len(pending)} prompt(s) waiting): its models were NOT unloaded; "
                f"if the job runs out of memory, resume it when the queue is idle")
    queue.set_flag("unload_models", True)
    when = "now (its queue is idle)" if not running else "as soon as the running prompt ends"
    return (f"asked ComfyUI to unload its models from the GPU and empty its cache before this job starts: "
            f"ComfyUI does it on its own executor thread {when}")


def manager() -> JobManager:
    global _manager
    with _lock:
        if _manager is None:
            _manager = JobManager(jobs_root(), python=sys.executable, notify=notify,
                                  before_start=free_comfy_models,
                                  max_running=int(os.environ.get("DISTILLERY_MAX_JOBS", "1") or 1))
            log.info("distillery: jobs in %s", _manager.store.root)
        return _manager
