"""HTTP handlers for the jobs (aiohttp), kept here so they are tested without ComfyUI.

    GET  /distillery/jobs                          {"jobs": [summary, ...]} newest first
    GET  /distillery/jobs/{id}                     summary + queue position + config + log tail
    GET  /distillery/jobs/{id}/metrics?since=N     {"records": [...], "cursor": step, "more": bool}
    GET  /distillery/jobs/{id}/previews            {"previews": [names], "latest": name}
    GET  /distillery/jobs/{id}/previews/{name}     the image
    GET  /distillery/jobs/{id}/log?lines=N         {"log": text}
    POST /distillery/jobs/{id}/stop                summary after the request
    POST /distillery/jobs/{id}/resume              summary after the request

Ids and names are validated by the store (no path traversal, nothing outside a job folder); a bad
request gets 400, an unknown job or file 404, an action that does not fit the job's state 409, each with
{"error": reason}. nodes/routes.py registers `route_table(get_manager)` on ComfyUI's PromptServer
(which also serves every route under /api/...).
"""

from __future__ import annotations

from typing import Callable

from aiohttp import web

from . import store as st

PREFIX = "/distillery"


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise st.JobError(f"{name}={raw[:40]!r} is not an integer", 400)
    if not lo <= value <= hi:
        raise st.JobError(f"{name}={value} is out of range [{lo}, {hi}]", 400)
    return value


def _guard(handler):
    async def wrapped(request: web.Request):
        try:
            return await handler(request)
        except st.JobError as err:
            return _error(str(err), err.status)

    wrapped.__name__ = handler.__name__
    return wrapped


def handlers(get_manager: Callable[[], object]) -> dict:
    """name -> aiohttp handler, each resolving the manager lazily (ComfyUI creates it on first use)."""

    @_guard
    async def list_jobs(request):
        return web.json_response({"jobs": get_manager().list()})

    @_guard
    async def get_job(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        info = manager.get(job_id, log_lines=_int_query(request, "log_lines", 40, 0, 2000))
        info["config"] = _public_config(manager.store.config(job_id))
        return web.json_response(info)

    @_guard
    async def get_metrics(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        since = _int_query(request, "since", -1, -1, 10 ** 12)
        limit = _int_query(request, "limit", 5000, 1, 100_000)
        return web.json_response(manager.store.metrics(job_id, since=since, limit=limit))

    @_guard
    async def list_previews(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        names = manager.store.previews(job_id)
        return web.json_response({"previews": names, "latest": names[-1] if names else None})

    @_guard
    async def get_preview(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        path = manager.store.preview_path(job_id, request.match_info["name"])
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    @_guard
    async def get_log(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        lines = _int_query(request, "lines", 200, 1, 5000)
        return web.json_response({"log": manager.store.log_tail(job_id, lines)})

    @_guard
    async def stop_job(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        return web.json_response(manager.stop(job_id))

    @_guard
    async def resume_job(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        return web.json_response(manager.resume(job_id))

    return {"list_jobs": list_jobs, "get_job": get_job, "get_metrics": get_metrics,
            "list_previews": list_previews, "get_preview": get_preview, "get_log": get_log,
            "stop_job": stop_job, "resume_job": resume_job}


ROUTES = [
    ("GET", "/jobs", "list_jobs"),
    ("GET", "/jobs/{job_id}", "get_job"),
    ("GET", "/jobs/{job_id}/metrics", "get_metrics"),
    ("GET", "/jobs/{job_id}/previews", "list_previews"),
    ("GET", "/jobs/{job_id}/previews/{name}", "get_preview"),
    ("GET", "/jobs/{job_id}/log", "get_log"),
    ("POST", "/jobs/{job_id}/stop", "stop_job"),
    ("POST", "/jobs/{job_id}/resume", "resume_job"),
]


def route_table(get_manager: Callable[[], object], prefix: str = PREFIX) -> list[tuple[str, str, object]]:
    """[(method, path, handler)] for any aiohttp router."""
    fns = handlers(get_manager)
    return [(method, prefix + path, fns[name]) for method, path, name in ROUTES]


def add_routes(routes: web.RouteTableDef, get_manager: Callable[[], object], prefix: str = PREFIX) -> None:
    """Register on an aiohttp RouteTableDef (ComfyUI: PromptServer.instance.routes)."""
    for method, path, handler in route_table(get_manager, prefix):
        routes.route(method, path)(handler)


def _public_config(config: dict) -> dict:
    """The config without machine paths (they stay on the server)."""
    out = {k: v for k, v in config.items() if k not in ("comfy",)}
    task = dict(out.get("task") or {})
    task.pop("checkpoint_path", None)
    if isinstance(task.get("prompts"), list) and len(task["prompts"]) > 50:
        task["prompts"] = task["prompts"][:50] + [f"... {len(task['prompts']) - 50} more"]
    out["task"] = task
    output = dict(out.get("output") or {})
    output.pop("lora_path", None)
    out["output"] = output
    return out
