"""Log followers (issue 34, item 9): a follower waiting for output asks the database
nothing until its job's log changes, whichever orchestrator on the same PostgreSQL heard
the change; readers never hold the connections of submits, reports and heartbeats; and
one token holds a bounded number of long-polls open (429 and Retry-After past it)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import event
from sqlalchemy.engine import Engine

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.longpoll import Bell
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobLog, JobSubmit
from tests import factories as f
from tests.auth import API_HEADERS
from tests.conftest import api_client
from tests.jobfleet import desktop
from tests.services import eventually

READ_TOKEN = "test-read-token-0123456789"
READER = {"authorization": f"Bearer {READ_TOKEN}"}
PER_TOKEN = 2


@pytest.fixture
def settings(settings: OrchestratorSettings) -> OrchestratorSettings:
    return settings.model_copy(
        update={"read_token": SecretStr(READ_TOKEN), "long_polls_per_token": PER_TOKEN}
    )


@contextmanager
def job_queries() -> Iterator[list[str]]:
    """Every statement any engine in this process sends that reads or writes jobs or
    their logs, as it is sent."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = str(args[2])
        if "jobs" in statement or "job_logs" in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


async def running_job(orch: Orchestrator, clock: ManualClock) -> tuple[uuid.UUID, uuid.UUID]:
    agent = await desktop(orch, "a", (24.0, 24.0))
    job_id = await queued_job(orch, clock)
    await orch.dispatcher.tick()
    assert await orch.report_attempt(agent, job_id, 1, Report("started")) == "applied"
    return agent, job_id


async def queued_job(orch: Orchestrator, clock: ManualClock) -> uuid.UUID:
    spec = JobSubmit.model_validate({"command": ["true"]})
    return await jobs.submit(orch.sessions, spec, now=clock.now())


def follow(
    orch: Orchestrator, job_id: uuid.UUID, offset: int = 0, limit: int = 1 << 20
) -> asyncio.Task[JobLog]:
    """A follower of the job's current attempt from `offset`, waiting up to 20 s."""

    async def read() -> JobLog:
        log = await orch.read_log(job_id, attempt=None, offset=offset, limit=limit,
                                  wait_seconds=20)  # fmt: skip
        assert log is not None
        return log

    return asyncio.create_task(read())


async def waiting_quietly(follower: asyncio.Task[JobLog], seen: list[str]) -> None:
    """Once the follower has read and waits, it sends nothing for 1.5 s (a follower that
    asks again each second is caught)."""

    async def has_read() -> bool:
        return any("job_logs" in s for s in seen)

    await eventually(has_read)
    await asyncio.sleep(0.1)
    seen.clear()
    await asyncio.sleep(1.5)
    assert not follower.done()
    assert seen == [], f"{len(seen)} queries while waiting, the first: {seen[:1]}"


async def test_a_waiting_follower_asks_nothing_until_a_chunk_arrives(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    with job_queries() as seen:
        follower = follow(orchestrator, job_id)
        await waiting_quietly(follower, seen)
        await asyncio.sleep(1.0)  # 2.5 s in all
        assert seen == []
        shipped = time.monotonic()
        await orchestrator.ship_log(agent, job_id, 1, 0, b"line\n")
        assert (await asyncio.wait_for(follower, 5)).data == "line\n"
    assert time.monotonic() - shipped < 2


async def test_followers_asking_the_same_share_one_read(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    with job_queries() as seen:
        followers = [follow(orchestrator, job_id) for _ in range(500)]
        await asyncio.sleep(0.5)
        seen.clear()
        await orchestrator.ship_log(agent, job_id, 1, 0, b"for everyone\n")
        written = len(seen)  # the chunk's own statements
        answers = await asyncio.wait_for(asyncio.gather(*followers), 10)
        reads = sum("FROM job_logs" in s for s in seen[written:])
    assert {a.data for a in answers} == {"for everyone\n"}
    assert reads <= 4, f"{reads} reads of the log for 500 followers"


async def lose(orch: Orchestrator, agent: uuid.UUID) -> None:
    await orch.receive(f.message(agent, kind="offline"))  # its goodbye: the pass loses it
    await orch.dispatcher.tick()


async def stop(orch: Orchestrator) -> None:
    orch.begin_stop()  # SIGTERM: every long-poll answers so that the server can close


@pytest.mark.parametrize("how", ["ended", "lost", "cancelled while queued", "stopping"])
async def test_a_follower_is_answered_at_once_when_the_attempt_is_over(
    orchestrator: Orchestrator, clock: ManualClock, how: str
) -> None:
    ends: dict[str, Callable[[uuid.UUID, uuid.UUID], Awaitable[object]]] = {
        "ended": lambda agent, job_id: orchestrator.report_attempt(
            agent, job_id, 1, Report("ended", "exit", exit_code=0)
        ),
        "lost": lambda agent, _job_id: lose(orchestrator, agent),
        "cancelled while queued": lambda _agent, job_id: orchestrator.cancel_job(job_id),
        "stopping": lambda _agent, _job_id: stop(orchestrator),
    }
    if how == "cancelled while queued":
        agent, job_id = uuid.uuid4(), await queued_job(orchestrator, clock)
    else:
        agent, job_id = await running_job(orchestrator, clock)
    with job_queries() as seen:
        follower = follow(orchestrator, job_id)
        await waiting_quietly(follower, seen)
        over = time.monotonic()
        await ends[how](agent, job_id)
        log = await asyncio.wait_for(follower, 5)
    assert time.monotonic() - over < 2
    assert log.done or how == "stopping"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_change_heard_by_one_orchestrator_wakes_a_follower_on_another(
    orchestrator: Orchestrator, settings: OrchestratorSettings, clock: ManualClock
) -> None:
    other = Orchestrator(settings, clock=clock)
    await other.start(sweep=False)
    try:
        agent, job_id = await running_job(orchestrator, clock)
        with job_queries() as seen:
            follower = follow(other, job_id)
            await waiting_quietly(follower, seen)
            shipped = time.monotonic()
            await orchestrator.ship_log(agent, job_id, 1, 0, b"from the first\n")
            assert (await asyncio.wait_for(follower, 5)).data == "from the first\n"
            assert time.monotonic() - shipped < 2
            # The attempt's end, reported to the first, answers the second's follower.
            follower = follow(other, job_id, offset=15)
            await waiting_quietly(follower, seen)
            ended = time.monotonic()
            said = Report("ended", "exit", exit_code=0)
            await orchestrator.report_attempt(agent, job_id, 1, said)
            assert (await asyncio.wait_for(follower, 5)).done
            assert time.monotonic() - ended < 2
    finally:
        await other.stop()


async def test_submits_reports_and_heartbeats_never_wait_behind_log_readers(
    orchestrator: Orchestrator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 followers, all reading at once and slowly (each read held open until the end,
    its connection with it: far more than any pool has), and the writers go on. (Each
    asks for a length of its own: followers asking the same share one read.)"""
    agent, job_id = await running_job(orchestrator, clock)
    gate, reading, read_piece = asyncio.Event(), [0], jobs.log_piece

    async def slow_read(*args: Any, **kwargs: Any) -> JobLog | None:
        piece = await read_piece(*args, **kwargs)  # its session keeps the connection
        reading[0] += 1
        await gate.wait()
        return piece

    monkeypatch.setattr(jobs, "log_piece", slow_read)
    followers = [follow(orchestrator, job_id, limit=1000 + n) for n in range(300)]
    try:

        async def some_reading() -> bool:
            return reading[0] >= 4

        await eventually(some_reading)
        await asyncio.sleep(0.5)  # every connection the readers may take is taken
        async with api_client(orchestrator, API_HEADERS) as client:
            took = {
                "heartbeat": await timed(desktop(orchestrator, "a", (24.0, 24.0), agent=agent)),
                "report": await timed(
                    orchestrator.report_attempt(agent, job_id, 1, Report("alive"))
                ),
                "submit": await timed(client.post("/api/v1/jobs", json={"command": ["true"]})),
                "list agents": await timed(client.get("/api/v1/agents")),
            }
        # Behind the readers they waited out the pool's 30 s timeout; apart, a write takes
        # milliseconds. 5 s tells the two apart on a loaded CI machine (a submit on SQLite
        # once took 2.2 s there, waiting for the one writer).
        assert max(took.values()) < 5, took
    finally:
        gate.set()
        await orchestrator.ship_log(agent, job_id, 1, 0, b"all of you\n")
        answers = await asyncio.wait_for(asyncio.gather(*followers), 60)
    assert {a.data for a in answers} == {"all of you\n"}


async def timed(work: Awaitable[object]) -> float:
    """Seconds `work` took; it fails the test after 10 (the pool's own wait is 30)."""
    started = time.monotonic()
    result = await asyncio.wait_for(work, 10)
    assert getattr(result, "status_code", 200) < 300, getattr(result, "text", result)
    return time.monotonic() - started


async def test_a_token_holds_at_most_its_long_polls_and_is_told_when_to_ask_again(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent, job_id = await running_job(orchestrator, clock)
    path = f"/api/v1/jobs/{job_id}/logs"
    async with (
        api_client(orchestrator, READER) as reader,
        api_client(orchestrator, API_HEADERS) as admin,
    ):
        with job_queries() as seen:
            followers = [  # each asks for a length of its own: no read is shared
                asyncio.create_task(reader.get(path, params={"wait": 20, "limit": 1000 + n}))
                for n in range(PER_TOKEN)
            ]

            async def both_read() -> bool:  # each read asks for its chunks and the log's end
                return sum("job_logs" in s for s in seen) >= 2 * PER_TOKEN

            await eventually(both_read)
        await asyncio.sleep(0.1)  # and waits
        third = await reader.get(path, params={"wait": 20})
        assert third.status_code == 429
        assert "CHIFFON_LONG_POLLS_PER_TOKEN" in third.json()["detail"]
        assert int(third.headers["retry-after"]) >= 1
        # Another token has slots of its own; a read that does not wait is no long-poll.
        assert (await admin.get(path, params={"wait": 0.05})).status_code == 200
        assert (await reader.get(path)).status_code == 200
        await orchestrator.ship_log(agent, job_id, 1, 0, b"line\n")
        answers = await asyncio.wait_for(asyncio.gather(*followers), 5)
        assert [a.json()["data"] for a in answers] == ["line\n"] * PER_TOKEN
        # Answered, they gave their slots back.
        again = await reader.get(path, params={"wait": 0.05, "offset": 5})
        assert again.status_code == 200


async def test_a_ring_while_a_reader_reads_is_not_missed() -> None:
    bell = Bell()
    seen = bell.rings  # noted before reading
    bell.ring()  # a chunk stored while it read
    started = time.monotonic()
    await bell.wait(seen, 5)
    assert time.monotonic() - started < 1
    seen = bell.rings
    waiter = asyncio.create_task(bell.wait(seen, 5))
    await asyncio.sleep(0.05)
    bell.ring()
    await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_client_past_its_tokens_bound_reads_on_without_waiting_instead_of_failing(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """`chiffon logs -f` and `Client.log` told 429 read once without waiting and pause as
    `Retry-After` says, rather than end with an error."""
    from chiffon.client import Client
    from tests.conftest import serving

    agent, job_id = await running_job(orchestrator, clock)
    path = f"/api/v1/jobs/{job_id}/logs"
    async with serving(orchestrator) as url, api_client(orchestrator, READER) as reader:
        held = [  # the token's every long-poll slot taken
            asyncio.create_task(reader.get(path, params={"wait": 20, "limit": 1000 + n}))
            for n in range(PER_TOKEN)
        ]
        await orchestrator.ship_log(agent, job_id, 1, 0, b"first\n")
        await asyncio.wait_for(asyncio.gather(*held), 5)
        held = [
            asyncio.create_task(reader.get(path, params={"wait": 20, "offset": 6, "limit": 9 + n}))
            for n in range(PER_TOKEN)
        ]
        await asyncio.sleep(0.3)
        with Client(url, token=READ_TOKEN) as c:
            piece = await asyncio.to_thread(c.log, job_id, offset=0, wait_seconds=10)
            assert piece.data == "first\n"  # read at once, no 429
            started = time.monotonic()
            quiet = await asyncio.to_thread(c.log, job_id, offset=6, wait_seconds=10)
            assert quiet.data == "" and 0.5 <= time.monotonic() - started < 8
        await orchestrator.ship_log(agent, job_id, 1, 6, b"second\n")
        await asyncio.wait_for(asyncio.gather(*held), 5)
