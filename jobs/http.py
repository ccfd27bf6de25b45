"""HTTP handlers for the jobs (aiohttp), kept here so they are tested without ComfyUI.

    GET  /distillery/jobs                          {"jobs": [summary, ...]} newest first
    GET  /distillery/jobs/{id}                     summary + queue position + config + log tail
    GET  /distillery/jobs/{id}/metrics?since=N     {"records": [...], "cursor": step, "more": bool}
    GET  /distillery/jobs/{id}/previews            {"previews": [names], "latest": name}
    GET  /distillery/jobs/{id}/previews/{name}     the image
    GET  /distillery/jobs/{id}/log?lines=N         {"log": text}
    POST /distillery/jobs/{id}/stop                summary after the request
    POST /distillery/jobs/{id}/resume              summary after the request; body {"steps": N} (optional):
                                                   a new total, e.g. to train a completed student further
    DELETE /distillery/jobs/{id}?delete_lora=0|1   remove a job that has no worker (409 for an active one),
                                                   and with delete_lora=1 the LoRA file it wrote

Ids and names are validated by the store (no path traversal, nothing outside a job folder); a bad
request gets 400, an unknown job or file 404, an action that does not fit the job's state 409, each with
{"error": reason}. nodes/routes.py registers `route_table(get_manager)` on ComfyUI's PromptServer
(which also serves every route under /api/...).

Nothing read from a user-named file goes out beyond what the run needs: a job's config comes back with
the prompt count and the first few prompts (shortened), no machine paths and no folder contents.
"""

from __future__ import annotations

import json
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


def handlers(get_manager: Callable[[], object], lora_dirs: Callable[[], list] | None = None) -> dict:
    """name -> aiohttp handler, each resolving the manager lazily (ComfyUI creates it on first use).

    lora_dirs: the folders a job's LoRA may be deleted from (ComfyUI: its loras folders); None = the
    folder the job wrote it to, whatever it is."""

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
        body = await _json_body(request)
        steps = body.get("steps")
        if steps is None:
            return web.json_response(manager.resume(job_id))
        return web.json_response(manager.resume(job_id, steps=steps))

    @_guard
    async def delete_job(request):
        manager = get_manager()
        job_id = st.check_job_id(request.match_info["job_id"])
        delete_lora = _int_query(request, "delete_lora", 0, 0, 1) == 1
        return web.json_response(manager.delete(job_id, delete_lora=delete_lora, lora_dirs=lora_dirs))

    return {"list_jobs": list_jobs, "get_job": get_job, "get_metrics": get_metrics,
            "list_previews": list_previews, "get_preview": get_preview, "get_log": get_log,
            "stop_job": stop_job, "resume_job": resume_job, "delete_job": delete_job}


async def _json_body(request: web.Request) -> dict:
    """The request's JSON object; {} for an empty body."""
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise st.JobError("the body is not JSON", 400) from None
    if not isinstance(body, dict):
        raise st.JobError("the body must be a JSON object", 400)
    return body


ROUTES = [
    ("GET", "/jobs", "list_jobs"),
    ("GET", "/jobs/{job_id}", "get_job"),
    ("GET", "/jobs/{job_id}/metrics", "get_metrics"),
    ("GET", "/jobs/{job_id}/previews", "list_previews"),
    ("GET", "/jobs/{job_id}/previews/{name}", "get_preview"),
    ("GET", "/jobs/{job_id}/log", "get_log"),
    ("POST", "/jobs/{job_id}/stop", "stop_job"),
    ("POST", "/jobs/{job_id}/resume", "resume_job"),
    ("DELETE", "/jobs/{job_id}", "delete_job"),
]


def route_table(get_manager: Callable[[], object], prefix: str = PREFIX,
                lora_dirs: Callable[[], list] | None = None) -> list[tuple[str, str, object]]:
    """[(method, path, handler)] for any aiohttp router."""
    fns = handlers(get_manager, lora_dirs)
    return [(method, prefix + path, fns[name]) for method, path, name in ROUTES]


def add_routes(routes: web.RouteTableDef, get_manager: Callable[[], object], prefix: str = PREFIX,
               lora_dirs: Callable[[], list] | None = None) -> None:
    """Register on an aiohttp RouteTableDef (ComfyUI: PromptServer.instance.routes)."""
    for method, path, handler in route_table(get_manager, prefix, lora_dirs):
        routes.route(method, path)(handler)


PUBLIC_PROMPTS, PROMPT_CHARS, TEXT_CHARS = 3, 200, 200
# what a job's config may show: names and numbers, never machine paths nor the content of user files
PUBLIC_CONFIG_FIELDS = ("id", "created", "version", "name", "method", "method_options", "train", "device",
                        "fingerprint")
PUBLIC_TASK_FIELDS = ("kind", "checkpoint", "world", "resolution", "guidance", "options")  # config "task"
PUBLIC_TEACHER_FIELDS = ("kind", "name", "family")  # a run spec's "teacher" (its path stays here)
PUBLIC_DATA_FIELDS = ("resolution",)  # a run spec's "data", besides the prompts


def _short(text, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _public_config(config: dict) -> dict:
    """What the browser may see of a job's config: no machine paths, and of the user's prompts (maybe a
    prompts file's content) only their count and the first few, shortened; nothing of an images folder
    but whether there is one."""
    out = {k: config[k] for k in PUBLIC_CONFIG_FIELDS if k in config}
    for part, fields in (("task", PUBLIC_TASK_FIELDS), ("teacher", PUBLIC_TEACHER_FIELDS),
                         ("data", PUBLIC_DATA_FIELDS)):
        given = config.get(part)
        if not isinstance(given, dict):
            continue
        shown = {k: given[k] for k in fields if k in given}
        if part != "teacher":
            _public_prompts(given, shown)
        elif given.get("kind") == "split":  # the split teacher's other files, by name
            shown["clip_type"] = given.get("clip_type")
            shown["text_encoders"] = [te.get("name") for te in given.get("text_encoders") or [] if isinstance(te, dict)]
            shown["vae"] = (given.get("vae") or {}).get("name")
        out[part] = shown
    output = config.get("output") or {}
    out["output"] = {"lora_name": output["lora_name"]} if output.get("lora_name") else {}
    return out


def _public_prompts(given: dict, shown: dict) -> None:
    prompts = given.get("prompts")
    if isinstance(prompts, list):
        shown["prompt_count"] = len(prompts)
        shown["prompts"] = [_short(p, PROMPT_CHARS) for p in prompts[:PUBLIC_PROMPTS]]
    if given.get("negative_prompt"):
        shown["negative_prompt"] = _short(given["negative_prompt"], TEXT_CHARS)
    if "real_images" in given:
        shown["real_images"] = bool(given.get("real_images"))  # whether there is a folder, not its name
