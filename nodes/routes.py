"""HTTP routes under /distillery/ (and /api/distillery/, which ComfyUI mirrors): the training jobs.

The handlers live in ../jobs/http.py (unit-tested with aiohttp's test utilities, without ComfyUI); this
module only attaches them to the running PromptServer and creates the job manager at startup, so jobs
are listed again after a restart, surviving workers are adopted and queued jobs start in order.
"""

import logging

log = logging.getLogger("distillery")
_registered = False


def register() -> None:
    """Attach our routes to the running PromptServer; a no-op outside a server (and when called twice)."""
    global _registered
    if _registered:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    from ..jobs.http import add_routes
    from .job_runtime import manager

    def lora_dirs():  # a job's LoRA file is deleted only from one of ComfyUI's loras folders
        import folder_paths

        return folder_paths.get_folder_paths("loras")

    add_routes(server.routes, manager, lora_dirs=lora_dirs)
    _registered = True
    try:
        manager()  # recover the jobs on disk now, not on the first request
    except Exception:  # noqa: BLE001 - a broken jobs folder must not break the pack's import
        log.exception("distillery: could not start the job manager")
