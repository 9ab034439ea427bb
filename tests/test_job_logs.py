"""Jobs' output on the orchestrator, on both engines: chunks kept in order (a resent one
harmless), a bounded tail, never half a character, `done` only when the attempt is over,
a follower woken by a chunk, stale attempts refused, retention; and the routes' auth."""

from __future__ import annotations

import asyncio
import time
import uuid

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.jobs import utf8_complete
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit
from tests.auth import API_HEADERS, bearer, issue
from tests.conftest import api_client
from tests.jobfleet import desktop


async def running_job(orch: Orchestrator, clock: ManualClock) -> tuple[uuid.UUID, uuid.UUID]:
    agent = await desktop(orch, "a", (24.0, 24.0))
    spec = JobSubmit.model_validate({"command": ["true"]})
    job_id = await jobs.submit(orch.sessions, spec, now=clock.now())
    await orch.dispatcher.tick()
    assert await orch.report_attempt(agent, job_id, 1, Report("started")) == "applied"
    return agent, job_id


async def read(
    orch: Orchestrator, job_id: uuid.UUID, offset: int = 0, **kw: float
) -> tuple[int, str, int, bool]:
    log = await orch.read_log(job_id, attempt=None, offset=offset,
                              limit=int(kw.get("limit", 1 << 20)),
                              wait_seconds=kw.get("wait", 0))  # fmt: skip
    assert log is not None
    return log.offset, log.data, log.next_offset, log.done


async def test_chunks_are_kept_in_order_and_a_resent_one_changes_nothing(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    assert await orchestrator.ship_log(agent, job_id, 1, 0, b"hello ") == "applied"
    assert await orchestrator.ship_log(agent, job_id, 1, 6, b"world\n") == "applied"
    assert await orchestrator.ship_log(agent, job_id, 1, 0, b"hello world\nmore") == "applied"
    assert await read(orchestrator, job_id) == (0, "hello world\nmore", 16, False)
    assert await read(orchestrator, job_id, 6) == (6, "world\nmore", 16, False)
    assert await read(orchestrator, job_id, 16) == (16, "", 16, False)


async def test_only_a_bounded_tail_is_kept(orchestrator: Orchestrator, clock: ManualClock) -> None:
    tail = orchestrator.settings.job_log_tail_bytes
    agent, job_id = await running_job(orchestrator, clock)
    chunk = b"x" * 32768
    for n in range(tail // len(chunk) + 8):
        assert await orchestrator.ship_log(agent, job_id, 1, n * len(chunk), chunk) == "applied"
    end = (tail // len(chunk) + 8) * len(chunk)
    start, data, next_offset, _ = await read(orchestrator, job_id)
    assert start > 0 and next_offset == end  # the oldest bytes were dropped
    assert tail <= len(data) < tail + len(chunk)


async def test_a_character_split_between_chunks_is_never_cut(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    text = "héllo €\n".encode()
    await orchestrator.ship_log(agent, job_id, 1, 0, text[:2])  # ends inside "é"
    assert await read(orchestrator, job_id) == (0, "h", 1, False)
    await orchestrator.ship_log(agent, job_id, 1, 2, text[2:9])  # ends inside "€"
    _, data, next_offset, _ = await read(orchestrator, job_id)
    assert data == "héllo " and text[:next_offset].decode() == data
    await orchestrator.ship_log(agent, job_id, 1, 9, text[9:])
    assert (await read(orchestrator, job_id, next_offset))[1] == "€\n"
    assert [utf8_complete(b) for b in (b"", b"a", "é".encode()[:1], "€".encode()[:2])] == [
        0,
        1,
        0,
        0,
    ]


async def test_done_only_when_the_attempt_is_over_and_everything_was_read(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    await orchestrator.ship_log(agent, job_id, 1, 0, b"0123456789")
    await orchestrator.report_attempt(agent, job_id, 1, Report("ended", "exit", exit_code=0))
    assert await read(orchestrator, job_id, limit=4) == (0, "0123", 4, False)
    assert await read(orchestrator, job_id, 4) == (4, "456789", 10, True)
    # An attempt that is over takes no more output.
    assert await orchestrator.ship_log(agent, job_id, 1, 10, b"late") == "stale"


async def test_a_follower_is_woken_by_the_next_chunk(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    started = time.monotonic()
    following = asyncio.create_task(read(orchestrator, job_id, wait=20))
    await asyncio.sleep(0.3)
    assert not following.done()
    await orchestrator.ship_log(agent, job_id, 1, 0, b"line\n")
    assert (await asyncio.wait_for(following, 5))[1] == "line\n"
    assert time.monotonic() - started < 5


async def test_output_from_another_agent_or_attempt_is_refused(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    other = await desktop(orchestrator, "b", (24.0, 24.0))
    assert await orchestrator.ship_log(other, job_id, 1, 0, b"forged") == "stale"
    assert await orchestrator.ship_log(agent, job_id, 2, 0, b"forged") == "stale"
    assert await orchestrator.ship_log(agent, uuid.uuid4(), 1, 0, b"x") == "unknown_job"
    assert (await read(orchestrator, job_id))[1] == ""


async def test_logs_of_jobs_ended_long_ago_are_pruned(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    await orchestrator.ship_log(agent, job_id, 1, 0, b"kept a while")
    await orchestrator.report_attempt(agent, job_id, 1, Report("ended", "exit", exit_code=0))
    assert await orchestrator.prune_job_logs() == 0
    clock.advance(orchestrator.settings.job_log_retention_seconds + 1)
    assert await orchestrator.prune_job_logs() == 1
    assert (await read(orchestrator, job_id))[1] == ""


async def test_the_routes_want_the_agents_secret_and_the_api_token(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    credential = await issue(orchestrator, agent)
    url = f"/api/v1/agents/{agent}/attempts/{job_id}/1/log?offset=0"
    async with api_client(orchestrator, {}) as anonymous:
        assert (await anonymous.post(url, content=b"x")).status_code == 401
        assert (await anonymous.get(f"/api/v1/jobs/{job_id}/logs")).status_code == 401
    async with api_client(orchestrator, bearer(credential)) as agent_api:
        resp = await agent_api.post(url, content=b"out\n")
        assert resp.json() == {"verdict": "applied"}
        # The agent's secret reads nothing of the user's side.
        assert (await agent_api.get(f"/api/v1/jobs/{job_id}/logs")).status_code == 401
    async with api_client(orchestrator, API_HEADERS) as user:
        resp = await user.get(f"/api/v1/jobs/{job_id}/logs", params={"offset": 0})
        assert resp.status_code == 200 and resp.json()["data"] == "out\n"
        missing = await user.get(f"/api/v1/jobs/{uuid.uuid4()}/logs")
        assert missing.status_code == 404 and "no job" in missing.json()["detail"]
