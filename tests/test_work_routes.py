"""The agent's side of jobs over HTTP, on both engines: orders by long-poll, signed with the
agent's key; reports of attempts; both only with the agent's own secret."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import JobRow
from chiffon.schemas.jobs import JobSubmit
from chiffon.transport.orders import order_key, verify
from tests.auth import API_HEADERS, bearer, issue
from tests.conftest import api_client
from tests.jobfleet import desktop
from tests.services import eventually


async def test_an_agent_long_polls_its_orders_and_gets_one_once_a_job_is_placed(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    async with api_client(orchestrator, bearer(credential)) as api:
        polling = asyncio.create_task(api.get(f"/api/v1/agents/{agent}/orders?wait=20"))
        await eventually(lambda: _waiting(orchestrator, agent))  # nothing is due yet
        assert not polling.done()
        spec = JobSubmit.model_validate({"command": ["true"]})
        job_id = await jobs.submit(orchestrator.sessions, spec, now=clock.now())
        await orchestrator.dispatcher.tick()  # places it, and wakes the poll
        resp = await asyncio.wait_for(polling, 5)
    assert resp.status_code == 200, resp.text
    [signed] = resp.json()["orders"]
    order = verify(
        signed["body"].encode(), signed["signature"], key=order_key(credential.secret),
        agent_id=agent, now=clock.now().timestamp(),
    )  # fmt: skip
    assert (order.kind, order.job_id, order.attempt) == ("assign", job_id, 1)


async def test_reports_move_the_job_and_a_stale_one_is_answered_so(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    job_id = await jobs.submit(
        orchestrator.sessions, JobSubmit.model_validate({"command": ["true"]}), now=clock.now()
    )
    await orchestrator.dispatcher.tick()
    url = f"/api/v1/agents/{agent}/attempts/{job_id}"
    async with api_client(orchestrator, bearer(credential)) as api:
        started = await api.post(f"{url}/1", json={"kind": "started"})
        stale = await api.post(f"{url}/2", json={"kind": "started"})
        used = await api.post(f"{url}/1", json={"kind": "usage", "vram_gb": {"GPU-a-0": 3.5}})
        exited = {"kind": "ended", "outcome": "exit", "exit_code": 0, "runtime_seconds": 1.5,
                  "peak_vram_gb": {"GPU-a-0": 7.25}}  # fmt: skip
        ended = await api.post(f"{url}/1", json=exited)
    verdicts = [r.json()["verdict"] for r in (started, stale, used, ended)]
    assert verdicts == ["applied", "stale", "applied", "applied"]
    async with orchestrator.sessions() as s:
        assert (await s.get(JobRow, job_id)).state == "succeeded"  # type: ignore[union-attr]
    async with api_client(orchestrator, API_HEADERS) as user:
        shown = (await user.get(f"/api/v1/jobs/{job_id}")).json()
    assert shown["attempts"][0]["peak_vram_gb"] == {"GPU-a-0": 7.25}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"kind": "ended"}, "an ended attempt says how it ended"),
        ({"kind": "finished"}, "kind"),
        ({"kind": "ended", "outcome": "exit", "exit_code": 10_000}, "exit_code"),
        ({"kind": "started", "shell": "rm -rf /"}, "Extra inputs are not permitted"),
        ({"kind": "started", "detail": "a\x1b[31m"}, "detail"),
        ({"kind": "usage", "vram_gb": {"GPU-a-0": -1}}, "vram_gb"),
        ({"kind": "usage", "vram_gb": {f"GPU-{i}": 1 for i in range(65)}}, "vram_gb"),
        ({"kind": "started", "log_path": "jobs/x-1/output.log"}, "log_path"),
        ({"kind": "started", "log_path": "/jobs/x-1/\x1b[2Joutput.log"}, "log_path"),
        ({"kind": "started", "log_path": "/" + "d" * 4096}, "log_path"),
    ],
)
async def test_bad_reports_are_refused_with_a_detail(
    orchestrator: Orchestrator, body: dict[str, object], says: str
) -> None:
    agent = uuid.uuid4()
    credential = await issue(orchestrator, agent)
    async with api_client(orchestrator, bearer(credential)) as api:
        resp = await api.post(f"/api/v1/agents/{agent}/attempts/{uuid.uuid4()}/1", json=body)
    assert resp.status_code == 422 and says in resp.json()["detail"], resp.text


async def test_only_the_agent_itself_may_ask_for_its_orders_or_report(
    orchestrator: Orchestrator,
) -> None:
    agent, other = uuid.uuid4(), uuid.uuid4()
    await issue(orchestrator, agent)
    other_credential = await issue(orchestrator, other)
    job = uuid.uuid4()
    async with api_client(orchestrator) as anonymous:
        no_secret = await anonymous.get(f"/api/v1/agents/{agent}/orders")
    async with api_client(orchestrator, bearer(other_credential)) as api:
        wrong_agent = await api.get(f"/api/v1/agents/{agent}/orders")
        report = await api.post(
            f"/api/v1/agents/{agent}/attempts/{job}/1", content=json.dumps({"kind": "started"})
        )
    assert [r.status_code for r in (no_secret, wrong_agent, report)] == [401, 401, 401]
    assert "bad_credential" in wrong_agent.json()["detail"]


async def _waiting(orch: Orchestrator, agent_id: uuid.UUID) -> bool:
    """The agent's long-poll has found nothing and waits to be woken."""
    return orch.orders.waiting(agent_id)


def test_the_agent_bounds_what_it_reports_as_the_orchestrator_does() -> None:
    """The agent does not load pydantic: the report's bounds it applies (the dispatch
    contract's encoders, `started` and `ended`) are the ones the orchestrator validates
    with."""
    from chiffon.api.routes_work import AttemptReport
    from chiffon.schemas import dispatch

    schema = AttemptReport.model_json_schema()["properties"]
    assert schema["detail"]["maxLength"] == dispatch.DETAIL_MAX_CHARS
    assert schema["log_path"]["anyOf"][0]["maxLength"] == dispatch.LOG_PATH_MAX_CHARS
    assert len(dispatch.ended("exit", "x" * 5000)["detail"]) == dispatch.DETAIL_MAX_CHARS
