"""The jobs API, on both engines: submit, list, show, cancel; bad input refused with
nothing stored; and a job followed through the agent's routes to its exit code."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime
from typing import Any

import pytest

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.orders import order_key, verify
from tests.auth import API_HEADERS, bearer, issue
from tests.conftest import api_client
from tests.jobfleet import desktop


async def test_a_submitted_job_waits_with_its_reason_until_an_agent_can_take_it(
    orchestrator: Orchestrator,
) -> None:
    await desktop(orchestrator, "render-02", (6.1, 8.0))
    await desktop(orchestrator, "private", (24.0, 24.0), accepts=False)
    async with api_client(orchestrator, API_HEADERS) as api:
        resp = await api.post("/api/v1/jobs", json={
            "command": ["python", "train.py"], "name": "train",
            "requirements": {"gpus": 1, "vram_gb": 8},
        })  # fmt: skip
        assert resp.status_code == 201, resp.text
        accepted = resp.json()
        assert accepted["warning"] is None  # private's 24 GB GPU could hold it one day
        job_id = accepted["job"]["job_id"]
        assert accepted["job"]["state"] == "queued"
        await orchestrator.dispatcher.tick()
        shown = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert shown["state"] == "queued" and shown["name"] == "train"
    assert shown["reason"] == (
        "no online agent that accepts jobs has 1 GPU with 8 GB free: closest is render-02 "
        "GPU 0 with 6.1 GB; 1 does not accept jobs"
    )
    assert [e["to_state"] for e in shown["events"]] == ["queued"] and shown["attempts"] == []


async def test_a_job_no_registered_agent_could_ever_hold_is_accepted_with_a_warning(
    orchestrator: Orchestrator,
) -> None:
    await desktop(orchestrator, "small", (8.0, 8.0))
    async with api_client(orchestrator, API_HEADERS) as api:
        resp = await api.post("/api/v1/jobs", json={
            "command": ["x"], "requirements": {"gpus": 2, "vram_gb": 40},
        })  # fmt: skip
    assert resp.status_code == 201
    assert resp.json()["warning"] == (
        "no registered agent could ever hold 2 GPUs with 40 GB free; the job waits until one "
        "that can joins"
    )


async def test_a_submission_reads_the_registry_again_only_when_its_last_read_says_no(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full read at 10,000 agents costs more than the submission: it is kept 10 s, and
    # a "no" is checked against a fresh read, since a desktop that could may just have come.
    from chiffon.persistence import jobs as jobs_repo

    reads = 0
    real = jobs_repo.agent_rows

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        if kwargs.get("agent_ids") is None:
            reads += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(jobs_repo, "agent_rows", counted)
    await desktop(orchestrator, "small", (8.0, 8.0))
    small = {"command": ["x"], "requirements": {"gpus": 1, "vram_gb": 4}}
    big = {"command": ["x"], "requirements": {"gpus": 1, "vram_gb": 40}}
    async with api_client(orchestrator, API_HEADERS) as api:
        for _ in range(3):
            assert (await api.post("/api/v1/jobs", json=small)).json()["warning"] is None
        assert reads == 1
        assert (await api.post("/api/v1/jobs", json=big)).json()["warning"] is not None
        assert reads == 2
        await desktop(orchestrator, "big", (48.0, 48.0))  # joins within the 10 s
        assert (await api.post("/api/v1/jobs", json=big)).json()["warning"] is None
        assert reads == 3


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"command": []}, "command"),
        ({"command": ["x"], "requirements": {"gpus": 1, "vram_gb": math.nan}}, "vram_gb"),
        ({"command": ["x"], "requirements": {"cpu_cores": -1}}, "cpu_cores"),
        ({"command": ["x"], "env": {"NOT A NAME": "1"}}, "is not a variable name"),
        ({"command": ["x"], "gpus": 1}, "Extra inputs are not permitted"),
        ({"command": ["x"], "workdir": "proj"},
         "body.workdir: workdir must be an absolute path on the desktop, not 'proj'"),
    ],
)  # fmt: skip
async def test_bad_submissions_get_a_422_and_store_nothing(
    orchestrator: Orchestrator, body: dict[str, Any], says: str
) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        content = json.dumps(body)  # NaN as JavaScript writes it, which JSON does not allow
        resp = await api.post(
            "/api/v1/jobs", content=content, headers={"content-type": "application/json"}
        )
        assert resp.status_code == 422 and says in resp.json()["detail"], resp.text
        assert (await api.get("/api/v1/jobs")).json() == []


async def test_submitting_and_cancelling_need_the_api_token(orchestrator: Orchestrator) -> None:
    async with api_client(orchestrator) as anonymous:
        submit = await anonymous.post("/api/v1/jobs", json={"command": ["id"]})
        cancel = await anonymous.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel")
        listing = await anonymous.get("/api/v1/jobs")
    assert [r.status_code for r in (submit, cancel, listing)] == [401, 401, 401]
    async with api_client(orchestrator, API_HEADERS) as api:
        assert (await api.get("/api/v1/jobs")).json() == []  # nothing was queued


async def test_cancel_lists_and_unknown_ids(orchestrator: Orchestrator) -> None:
    async with api_client(orchestrator, API_HEADERS) as api:
        job_id = (await api.post("/api/v1/jobs", json={"command": ["id"]})).json()["job"]["job_id"]
        first = await api.post(f"/api/v1/jobs/{job_id}/cancel")
        again = await api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert (first.json()["state"], again.json()["state"]) == ("cancelled", "cancelled")
        assert [j["job_id"] for j in (await api.get("/api/v1/jobs?state=cancelled")).json()] == [
            job_id
        ]
        assert (await api.get("/api/v1/jobs?state=queued")).json() == []
        assert (await api.get(f"/api/v1/jobs/{uuid.uuid4()}")).status_code == 404
        assert (await api.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel")).status_code == 404
        assert (await api.get("/api/v1/jobs/not-a-uuid")).status_code == 400


async def test_a_job_followed_through_the_agents_routes_to_its_exit_code(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        api_client(orchestrator, bearer(credential)) as desk,
    ):
        job_id = (await user.post("/api/v1/jobs", json={
            "command": ["sh", "-c", "exit 3"], "requirements": {"gpus": 1, "vram_gb": 4},
        })).json()["job"]["job_id"]  # fmt: skip
        await orchestrator.dispatcher.tick()
        [order] = (await desk.get(f"/api/v1/agents/{agent}/orders")).json()["orders"]
        assert order["body"].startswith("c1.") and job_id not in order["body"]  # sealed
        key = order_key(credential.secret)
        opened = verify(order["body"].encode(), order["signature"], key=key, agent_id=agent,
                        now=clock.now().timestamp())  # fmt: skip
        assert (str(opened.job_id), opened.kind) == (job_id, "assign")
        url = f"/api/v1/agents/{agent}/attempts/{job_id}/1"
        await desk.post(url, json={"kind": "started"})
        await desk.post(url, json={"kind": "ended", "outcome": "exit", "exit_code": 3})
        shown = (await user.get(f"/api/v1/jobs/{job_id}")).json()
    assert (shown["state"], shown["exit_code"], shown["agent_id"]) == ("failed", 3, str(agent))
    [attempt] = shown["attempts"]
    assert (attempt["gpu_uuids"], attempt["exit_code"]) == (["GPU-a-0"], 3)
    assert [e["to_state"] for e in shown["events"]] == ["queued", "assigned", "running", "failed"]


SECRET_VALUE = "hunter2-not-for-the-api"


async def test_a_job_shows_its_folder_timeout_and_start_and_only_the_names_of_its_env(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    spec = {
        "command": ["python", "train.py"],
        "workdir": "/home/me/proj",
        "timeout_seconds": 7200,
        "env": {"WANDB_API_KEY": SECRET_VALUE, "EPOCHS": "3"},
    }
    log_path = "/home/me/.local/state/chiffon/jobs/x-1/output.log"
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        api_client(orchestrator, bearer(credential)) as desk,
    ):
        accepted = await user.post("/api/v1/jobs", json=spec)
        job_id = accepted.json()["job"]["job_id"]
        queued = (await user.get(f"/api/v1/jobs/{job_id}")).json()
        await orchestrator.dispatcher.tick()
        started_at = clock.advance(5)
        url = f"/api/v1/agents/{agent}/attempts/{job_id}/1"
        said = await desk.post(url, json={"kind": "started", "log_path": log_path})
        assert said.json()["verdict"] == "applied", said.text
        clock.advance(5)
        views = [await user.get("/api/v1/jobs"), await user.get(f"/api/v1/jobs/{job_id}"),
                 await user.post(f"/api/v1/jobs/{job_id}/cancel")]  # fmt: skip
    for resp in (accepted, *views):
        assert resp.status_code in (200, 201) and SECRET_VALUE not in resp.text, resp.text
    [listed], shown, cancelled = (r.json() for r in views)
    assert queued["started_at"] is None and queued["attempts"] == []
    for job in (accepted.json()["job"], queued, listed, shown, cancelled):
        assert job["env_names"] == ["EPOCHS", "WANDB_API_KEY"]  # sorted, names only
        assert (job["workdir"], job["timeout_seconds"]) == ("/home/me/proj", 7200)
        assert "env" not in job
    for job in (listed, shown, cancelled):
        assert _at(job["started_at"]) == started_at
    [attempt] = shown["attempts"]
    assert _at(attempt["started_at"]) == started_at
    assert (attempt["log_path"], attempt["log_bytes_cut"]) == (log_path, 0)


async def test_a_job_without_a_folder_timeout_or_env_shows_them_empty(
    orchestrator: Orchestrator,
) -> None:
    async with api_client(orchestrator, API_HEADERS) as user:
        job = (await user.post("/api/v1/jobs", json={"command": ["id"]})).json()["job"]
    assert (job["workdir"], job["timeout_seconds"], job["env_names"]) == (None, None, [])


async def test_an_attempt_says_how_much_of_its_output_is_no_longer_kept(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """The agent skipped output far behind (its first chunk is at 5 MB), then the
    orchestrator dropped all but a tail: the cut is where the oldest kept byte is, as
    the logs route says too. An older agent says no log path."""
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    chunk, first = b"y" * 32768, 5_000_000
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        api_client(orchestrator, bearer(credential)) as desk,
    ):
        job_id = (await user.post("/api/v1/jobs", json={"command": ["x"]})).json()["job"]["job_id"]
        await orchestrator.dispatcher.tick()
        url = f"/api/v1/agents/{agent}/attempts/{job_id}/1"
        await desk.post(url, json={"kind": "started"})  # an agent older than log paths
        await desk.post(f"{url}/log?offset={first}", content=chunk)
        [attempt] = (await user.get(f"/api/v1/jobs/{job_id}")).json()["attempts"]
        assert (attempt["log_path"], attempt["log_bytes_cut"]) == (None, first)
        tail = orchestrator.settings.job_log_tail_bytes
        for n in range(1, tail // len(chunk) + 8):
            at = first + n * len(chunk)
            verdict = await orchestrator.ship_log(agent, uuid.UUID(job_id), 1, at, chunk)
            assert verdict == "applied"
        [attempt] = (await user.get(f"/api/v1/jobs/{job_id}")).json()["attempts"]
        oldest = (await user.get(f"/api/v1/jobs/{job_id}/logs?offset=0&limit=1")).json()
    assert attempt["log_bytes_cut"] == oldest["offset"] > first
    end = first + (tail // len(chunk) + 8) * len(chunk)
    assert end - tail - len(chunk) < attempt["log_bytes_cut"] <= end - tail


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
