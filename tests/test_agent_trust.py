"""Who may take work (issue 34, items 2 and 3): an agent enrolled with the lab's shared
enrollment token waits for an admin; made tokens run out and expire; a secret used from two
places quarantines its agent until an admin clears or rotates it. On both engines."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.scheduler import schedule_once
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import JobRow
from chiffon.schemas.heartbeat import AgentMessage
from chiffon.schemas.jobs import JobSubmit
from tests import factories as f
from tests.auth import API_HEADERS, ENROLL_TOKEN, issue
from tests.conftest import api_client
from tests.jobfleet import desktop


@pytest.fixture
async def api(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(orchestrator, headers=API_HEADERS) as client:
        yield client


async def enroll(api: httpx.AsyncClient, token: str = ENROLL_TOKEN) -> httpx.Response:
    body = {"agent_id": str(uuid.uuid4())}
    return await api.post("/api/v1/enroll", json=body, headers={"authorization": f"Bearer {token}"})


async def job_state(
    orch: Orchestrator, clock: ManualClock, job_id: uuid.UUID | None = None
) -> tuple[str, str]:
    """Submit a job (or take `job_id`), run a scheduler pass: its state and
    why it waits."""
    if job_id is None:
        spec = JobSubmit.model_validate({"command": ["true"]})
        job_id = await jobs.submit(orch.sessions, spec, now=clock.now())
    orch.last_job = job_id  # type: ignore[attr-defined]
    result = await schedule_once(orch.sessions, now=clock.now())
    async with orch.sessions() as s:
        row = await s.get(JobRow, job_id)
    assert row is not None
    return row.state, result.waiting.get(job_id, "")


async def agent(api: httpx.AsyncClient, agent_id: uuid.UUID) -> dict[str, object]:
    got = await api.get(f"/api/v1/agents/{agent_id}")
    assert got.status_code == 200, got.text
    record: dict[str, object] = got.json()
    return record


async def test_an_agent_enrolled_with_the_shared_token_takes_no_job_until_approved(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    got = await enroll(api)
    assert got.status_code == 200 and got.json()["approved"] is False
    agent_id = uuid.UUID(got.json()["agent_id"])
    await desktop(orchestrator, "stranger", (80.0, 80.0), agent=agent_id)
    record = await agent(api, agent_id)
    assert (record["hold"], record["accepts_jobs"]) == ("pending", False)
    assert "chiffon agents approve" in str(record["hold_reason"])
    state, why = await job_state(orchestrator, clock)
    assert state == "queued" and "waiting for an admin" in why, why
    # Only the API token approves; the enrollment token does not.
    refused = await api.post(
        f"/api/v1/agents/{agent_id}/approve",
        headers={"authorization": f"Bearer {ENROLL_TOKEN}"},
    )
    assert refused.status_code == 401
    assert (await api.post(f"/api/v1/agents/{agent_id}/approve")).status_code == 204
    assert (await agent(api, agent_id))["hold"] is None
    # Its next heartbeat does not undo the approval.
    await desktop(orchestrator, "stranger", (80.0, 80.0), agent=agent_id)
    assert (await agent(api, agent_id))["hold"] is None
    waiting = orchestrator.last_job  # type: ignore[attr-defined]
    placed = await job_state(orchestrator, clock, waiting)
    assert placed[0] == "assigned", placed


async def test_approving_before_the_first_heartbeat_holds_and_unknown_agents_are_404(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    agent_id = uuid.UUID((await enroll(api)).json()["agent_id"])
    assert (await api.post(f"/api/v1/agents/{agent_id}/approve")).status_code == 204
    await desktop(orchestrator, "early", (8.0, 8.0), agent=agent_id)
    assert (await agent(api, agent_id))["hold"] is None
    missing = await api.post(f"/api/v1/agents/{uuid.uuid4()}/approve")
    assert missing.status_code == 404 and "no active credential" in missing.json()["detail"]


async def test_auto_approve_is_opt_in(api: httpx.AsyncClient, orchestrator: Orchestrator) -> None:
    orchestrator.settings.auto_approve = True
    got = await enroll(api)
    assert got.json()["approved"] is True
    agent_id = uuid.UUID(got.json()["agent_id"])
    await desktop(orchestrator, "trusted-lab", (8.0, 8.0), agent=agent_id)
    assert (await agent(api, agent_id))["hold"] is None


async def test_a_made_token_runs_out_and_expires(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    made = await api.post("/api/v1/enroll-tokens", json={"uses": 1, "note": "desk-7"})
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    first = await enroll(api, token)
    assert first.status_code == 200 and first.json()["approved"] is False
    spent = await enroll(api, token)
    assert spent.status_code == 401 and "used up or expired" in spent.json()["detail"]
    assert (await api.get("/api/v1/enroll-tokens")).json() == []  # its last use removed it

    hour = await api.post("/api/v1/enroll-tokens", json={"expires_seconds": 3600, "approves": True})
    listed = (await api.get("/api/v1/enroll-tokens")).json()
    assert [t["token_id"] for t in listed] == [hour.json()["token_id"]]
    assert "token" not in listed[0] and listed[0]["uses_left"] is None
    approved = await enroll(api, hour.json()["token"])
    assert approved.status_code == 200 and approved.json()["approved"] is True
    clock.advance(3601)
    late = await enroll(api, hour.json()["token"])
    assert late.status_code == 401
    assert (await api.get("/api/v1/enroll-tokens")).json() == []


async def test_a_withdrawn_token_enrolls_no_one_and_bad_requests_say_why(
    api: httpx.AsyncClient,
) -> None:
    made = (await api.post("/api/v1/enroll-tokens", json={})).json()
    gone = await api.delete(f"/api/v1/enroll-tokens/{made['token_id']}")
    assert gone.status_code == 204
    assert (await enroll(api, made["token"])).status_code == 401
    again = await api.delete(f"/api/v1/enroll-tokens/{made['token_id']}")
    assert again.status_code == 404 and "detail" in again.json()
    bad = await api.post("/api/v1/enroll-tokens", json={"uses": 0})
    assert bad.status_code == 422 and "detail" in bad.json()
    with_read_token = await api.post(
        "/api/v1/enroll-tokens", json={}, headers={"authorization": f"Bearer {ENROLL_TOKEN}"}
    )
    assert with_read_token.status_code == 401


def beat(
    agent_id: uuid.UUID, boot: uuid.UUID, seq: int, clock: ManualClock, after: float
) -> AgentMessage:
    """A heartbeat of run `boot` sent `after` seconds past the manual clock's now, from a
    desktop that takes jobs."""
    sent = clock.now() + timedelta(seconds=after)
    message = f.message(agent_id, boot_id=boot, seq=seq, sent_at=sent)
    return message.model_copy(update={"accepts_jobs": True})


async def enrolled_desktop(orch: Orchestrator, name: str) -> uuid.UUID:
    """An approved agent with a secret (what a thief would copy), beating once."""
    agent_id = uuid.uuid4()
    await issue(orch, agent_id)
    return await desktop(orch, name, (24.0, 24.0), agent=agent_id)


async def test_two_runs_beating_with_one_secret_quarantine_the_agent(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent_id = await enrolled_desktop(orchestrator, "victim")
    clock.advance(60)
    mine, thief = uuid.uuid4(), uuid.uuid4()
    assert await orchestrator.receive(beat(agent_id, mine, 1, clock, -30)) == "applied"
    assert await orchestrator.receive(beat(agent_id, thief, 1, clock, -20)) == "applied"
    # A delayed heartbeat of the run before, sent before the thief's: only late, not two.
    assert await orchestrator.receive(beat(agent_id, mine, 2, clock, -25)) == "stale"
    assert (await agent(api, agent_id))["hold"] is None
    # The first run beats again after the second began: two senders.
    assert await orchestrator.receive(beat(agent_id, mine, 3, clock, -10)) == "suspect"
    record = await agent(api, agent_id)
    assert record["hold"] == "suspect" and "boot ids alternate" in str(record["hold_reason"])
    events = (await api.get(f"/api/v1/agents/{agent_id}/events")).json()
    assert events[0]["to_status"] == "suspect" and events[0]["reason"] == "boot ids alternate"
    counted = orchestrator.metrics.registry.get_sample_value(
        "chiffon_messages_accepted_total", {"kind": "heartbeat", "outcome": "suspect"}
    )
    assert counted == 1
    state, why = await job_state(orchestrator, clock)
    assert state == "queued" and "quarantined" in why, why
    # An admin who knows both were the agent (run twice) clears it.
    assert (await api.post(f"/api/v1/agents/{agent_id}/clear")).status_code == 204
    assert (await agent(api, agent_id))["hold"] is None
    waiting = orchestrator.last_job  # type: ignore[attr-defined]
    placed = await job_state(orchestrator, clock, waiting)
    assert placed[0] == "assigned", placed


async def test_overlapping_sequence_numbers_quarantine_but_a_repeat_does_not(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent_id = await enrolled_desktop(orchestrator, "victim")
    clock.advance(60)
    run = uuid.uuid4()
    copy = beat(agent_id, run, 100, clock, -40)
    assert await orchestrator.receive(copy) == "applied"
    assert await orchestrator.receive(copy) == "stale"  # redelivered: the very same message
    assert await orchestrator.receive(beat(agent_id, run, 99, clock, -41)) == "stale"  # late
    assert (await agent(api, agent_id))["hold"] is None
    # seq 7 of the same run, sent 30 s after seq 100: someone else counts this run's numbers
    assert await orchestrator.receive(beat(agent_id, run, 7, clock, -10)) == "suspect"
    record = await agent(api, agent_id)
    assert record["hold"] == "suspect" and "sequence numbers overlap" in str(record["hold_reason"])


async def test_rotating_a_suspect_agents_secret_shuts_the_old_one_out_and_clears_it(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    got = await enroll(api, token=str(orchestrator.settings.api_token.get_secret_value()))  # type: ignore[union-attr]
    agent_id, old = uuid.UUID(got.json()["agent_id"]), got.json()["secret"]
    await desktop(orchestrator, "desk", (24.0, 24.0), agent=agent_id)
    clock.advance(60)
    a, b = uuid.uuid4(), uuid.uuid4()
    for boot, after in ((a, -30), (b, -20), (a, -10)):
        await orchestrator.receive(beat(agent_id, boot, 1 if after < -15 else 2, clock, after))
    assert (await agent(api, agent_id))["hold"] == "suspect"
    rotated = await api.post(f"/api/v1/agents/{agent_id}/rotate")
    assert rotated.status_code == 200 and rotated.json()["secret"] != old
    assert (await agent(api, agent_id))["hold"] is None  # approval kept, suspicion cleared
    path = f"/api/v1/agents/{agent_id}/heartbeat"
    stale = await api.post(path, content=b"{}", headers={"authorization": f"Bearer {old}"})
    assert stale.status_code == 401
    fresh = beat(agent_id, uuid.uuid4(), 1, clock, 0).model_dump_json().encode()
    headers = {"authorization": f"Bearer {rotated.json()['secret']}",
               "content-type": "application/json"}  # fmt: skip
    assert (await api.post(path, content=fresh, headers=headers)).status_code < 300
