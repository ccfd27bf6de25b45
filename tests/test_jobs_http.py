"""The /distillery/jobs HTTP handlers on a plain aiohttp app (aiohttp's test utilities, no ComfyUI):
listing, metrics with a cursor, previews, stop / resume, and 4xx with a reason for bad requests."""

from __future__ import annotations

import asyncio
import json

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from comfyui_distillery.jobs import store as st  # noqa: E402
from comfyui_distillery.jobs.http import add_routes  # noqa: E402
from comfyui_distillery.jobs.manager import JobManager  # noqa: E402


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs", start_thread=False, python="/nonexistent/python")
    yield m
    m.close()


def run_with_client(manager, scenario):
    async def main():
        routes = web.RouteTableDef()
        add_routes(routes, lambda: manager)
        app = web.Application()
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def seed_job(manager, state=st.RUNNING, steps=4):
    job_id = manager.store.create({"name": "demo", "method": "dmd2", "train": {"steps": steps},
                                   "task": {"kind": "comfy_checkpoint", "checkpoint": "m.safetensors",
                                            "checkpoint_path": "/secret/path/m.safetensors", "prompts": ["a"]},
                                   "output": {"lora_name": "demo.safetensors", "lora_path": "/secret/demo.safetensors"},
                                   "comfy": {"root": "/secret/comfy"}})
    manager.store.update_status(job_id, state=state, step=2)
    folder = manager.store.dir(job_id)
    (folder / st.METRICS).write_text("".join(json.dumps({"step": s, "loss/student": 1.0 / s}) + "\n"
                                             for s in (1, 2, 3)))
    (folder / "previews").mkdir()
    (folder / "previews" / "step-00000002.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (folder / st.LOG).write_text("line 1\nline 2\n")
    return job_id


def test_list_get_metrics_previews_and_log(manager):
    job_id = seed_job(manager)

    async def scenario(client):
        r = await client.get("/distillery/jobs")
        assert r.status == 200
        jobs = (await r.json())["jobs"]
        assert [j["id"] for j in jobs] == [job_id] and jobs[0]["latest_preview"] == "step-00000002.png"
        r = await client.get(f"/distillery/jobs/{job_id}")
        info = await r.json()
        assert info["state"] == st.RUNNING and info["config"]["task"]["checkpoint"] == "m.safetensors"
        assert "/secret" not in json.dumps(info)  # no machine paths leave the server
        assert "line 2" in info["log_tail"]
        r = await client.get(f"/distillery/jobs/{job_id}/metrics?since=1")
        body = await r.json()
        assert [x["step"] for x in body["records"]] == [2, 3] and body["cursor"] == 3
        r = await client.get(f"/distillery/jobs/{job_id}/metrics?since={body['cursor']}")
        assert (await r.json())["records"] == []
        r = await client.get(f"/distillery/jobs/{job_id}/previews")
        assert await r.json() == {"previews": ["step-00000002.png"], "latest": "step-00000002.png"}
        r = await client.get(f"/distillery/jobs/{job_id}/previews/step-00000002.png")
        assert r.status == 200 and (await r.read()).startswith(b"\x89PNG")
        r = await client.get(f"/distillery/jobs/{job_id}/log?lines=1")
        assert (await r.json())["log"] == "line 2"

    run_with_client(manager, scenario)


def test_bad_requests_get_4xx_with_a_reason(manager, tmp_path):
    job_id = seed_job(manager)
    (tmp_path / "jobs" / "outside.png").write_bytes(b"no")

    async def scenario(client):
        cases = [
            ("GET", "/distillery/jobs/NOT_VALID", 400),
            ("GET", "/distillery/jobs/no-such-job", 404),
            ("GET", f"/distillery/jobs/{job_id}/metrics?since=abc", 400),
            ("GET", f"/distillery/jobs/{job_id}/metrics?since=-5", 400),
            ("GET", f"/distillery/jobs/{job_id}/metrics?limit=0", 400),
            ("GET", f"/distillery/jobs/{job_id}/previews/..%2F..%2Foutside.png", 400),
            ("GET", f"/distillery/jobs/{job_id}/previews/%2Eoutside.png", 400),
            ("GET", f"/distillery/jobs/{job_id}/previews/notes.txt", 400),
            ("GET", f"/distillery/jobs/{job_id}/previews/missing.png", 404),
            ("GET", "/distillery/jobs/..%2F..%2Fetc/previews", 400),
            ("POST", f"/distillery/jobs/{job_id}/resume", 409),  # running: not resumable
            ("POST", "/distillery/jobs/no-such-job/stop", 404),
        ]
        for method, path, expected in cases:
            r = await client.request(method, path)
            assert r.status == expected, (method, path, r.status, await r.text())
            assert (await r.json())["error"], path
        # the traversal never reached the file outside
        r = await client.get(f"/distillery/jobs/{job_id}/previews/../../outside.png")
        assert r.status in (400, 404) and await r.read() != b"no"

    run_with_client(manager, scenario)


def test_stop_and_resume_through_http(manager):
    queued = seed_job(manager, state=st.QUEUED)
    failed = seed_job(manager, state=st.FAILED)

    async def scenario(client):
        r = await client.post(f"/distillery/jobs/{queued}/stop")
        assert r.status == 200 and (await r.json())["state"] == st.STOPPED
        r = await client.post(f"/distillery/jobs/{queued}/stop")
        assert r.status == 409 and "only queued or running" in (await r.json())["error"]
        r = await client.post(f"/distillery/jobs/{failed}/resume")
        body = await r.json()
        assert r.status == 200 and body["state"] == st.QUEUED and body["queue_position"] == 1

    run_with_client(manager, scenario)
