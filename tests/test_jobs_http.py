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


def test_a_job_shows_its_prompt_count_and_a_few_short_prompts_never_a_prompts_files_content(manager):
    prompts = [f"prompt {i} from the user's file " + "x" * 500 for i in range(10)]
    job_id = manager.store.create({
        "name": "demo", "method": "dmd2", "train": {"steps": 4},
        "task": {"kind": "comfy_checkpoint", "checkpoint": "m.safetensors", "checkpoint_path": "/secret/m.safetensors",
                 "prompts": prompts, "negative_prompt": "blurry", "resolution": 512,
                 "real_images": "/secret/photos", "real_images_signature": "abc123", "captions": ["private"]},
        "output": {"lora_name": "demo.safetensors", "lora_path": "/secret/loras/demo.safetensors"},
        "comfy": {"root": "/secret/comfy"}, "notes_from_a_file": "private"})

    async def scenario(client):
        info = await (await client.get(f"/distillery/jobs/{job_id}")).json()
        task = info["config"]["task"]
        assert task["prompt_count"] == 10 and len(task["prompts"]) == 3
        assert all(len(p) <= 200 for p in task["prompts"]) and task["prompts"][0].startswith("prompt 0 ")
        assert task["real_images"] is True and task["checkpoint"] == "m.safetensors"
        text = json.dumps(info)
        for leaked in ("/secret", "prompt 3 ", "abc123", "private", "x" * 200):
            assert leaked not in text, leaked
        assert info["config"]["output"] == {"lora_name": "demo.safetensors"}
        # the listing and the job's own summary carry no machine paths either
        manager.store.update_status(job_id, state=st.COMPLETED, lora_path="/secret/loras/demo.safetensors")
        for path in ("/distillery/jobs", f"/distillery/jobs/{job_id}"):
            assert "/secret" not in await (await client.get(path)).text()

    run_with_client(manager, scenario)


def test_resume_with_more_steps_and_delete_through_http(manager, tmp_path):
    completed = seed_job(manager, state=st.COMPLETED)
    manager.store.update_status(completed, step=4, steps=4)
    running = seed_job(manager, state=st.RUNNING)
    loras = tmp_path / "loras"
    loras.mkdir()
    config = manager.store.config(completed)
    config["output"] = {"lora_name": "demo.safetensors", "lora_path": str(loras / "demo.safetensors")}
    st.write_json_atomic(manager.store.dir(completed) / st.CONFIG, config)
    from comfyui_distillery.trainers.card import StudentCard

    card = StudentCard(method="dmd2", sampler="x0_renoise", timesteps=[999], prediction_type="epsilon", job=completed)
    header = json.dumps({"__metadata__": card.to_metadata()})
    (loras / "demo.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode())

    async def scenario(client):
        r = await client.post(f"/distillery/jobs/{completed}/resume")
        assert r.status == 409 and "larger number of steps" in (await r.json())["error"]
        for body, status in ((b"not json", 400), (b"[1]", 400), (b'{"steps": 4}', 400), (b'{"steps": "x"}', 400)):
            r = await client.post(f"/distillery/jobs/{completed}/resume", data=body)
            assert r.status == status, (body, await r.text())
        r = await client.post(f"/distillery/jobs/{completed}/resume", json={"steps": 9})
        body = await r.json()
        assert r.status == 200 and body["state"] == st.QUEUED and body["steps"] == 9
        assert manager.store.config(completed)["train"]["steps"] == 9
        manager.stop(completed)  # queued -> stopped, so it can be deleted

        r = await client.delete(f"/distillery/jobs/{running}")
        assert r.status == 409 and "stop it first" in (await r.json())["error"]
        r = await client.delete(f"/distillery/jobs/{completed}?delete_lora=2")
        assert r.status == 400
        r = await client.delete(f"/distillery/jobs/{completed}?delete_lora=1")
        body = await r.json()
        assert r.status == 200 and body["deleted"] and body["lora_deleted"], body
        assert not (loras / "demo.safetensors").exists()
        assert [j["id"] for j in (await (await client.get("/distillery/jobs")).json())["jobs"]] == [running]
        r = await client.delete(f"/distillery/jobs/{completed}")
        assert r.status == 404
        r = await client.delete("/distillery/jobs/..%2F..%2Fetc")
        assert r.status in (400, 404)

    run_with_client(manager, scenario)
