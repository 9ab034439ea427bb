"""Every order an agent refuses is logged with its reason, counted, and reported in its
heartbeat (`orders_refused`), so that the orchestrator's /metrics and the agent page show
it (issue 34: an exact replay of a captured order was dropped without a word).

An honest repeat is told apart from a replay: the orchestrator says each pending order
again until it hears back, signed afresh (a newer `issued_at`, which only the holder of the
key can make); that is a `duplicate`, counted and logged at DEBUG. A copy of an order
already delivered is `replayed`, and an order for an older attempt than one started is
`superseded`, both warnings."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from chiffon.agent.loop import AgentIdentity, AgentLoop
from chiffon.agent.report import Snapshot
from chiffon.agent.work import WorkLoop, WorkSettings
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.heartbeat import Resources
from chiffon.schemas.jobs import JobDetail, JobSubmit
from chiffon.transport.auth import SIGNATURE_VERSION
from chiffon.transport.memory import InMemoryPublisher, InMemoryWork
from chiffon.transport.orders import MAX_ORDER_BYTES, Order, encode, order_key, seal
from tests import factories as f
from tests.auth import API_HEADERS, issue
from tests.conftest import api_client
from tests.jobfleet import desktop
from tests.services import eventually

AGENT, SECRET = uuid.uuid4(), "r" * 43
WORK_LOG = "chiffon.agent.work"


class Channel:
    """What a loop reports to, outside an orchestrator: every report heard."""

    def __init__(self) -> None:
        self.reports: list[tuple[uuid.UUID, int, dict[str, Any]]] = []

    async def report(self, job_id: uuid.UUID, attempt: int, said: Mapping[str, Any]) -> str:
        self.reports.append((job_id, attempt, dict(said)))
        return "applied"

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str:
        return "applied"


def work_loop(jobs_dir: Path, channel: Channel) -> WorkLoop:
    settings = WorkSettings(accept_jobs="always", jobs_dir=jobs_dir, allow_root=True,
                            grace_seconds=0.5)  # fmt: skip

    async def fresh() -> Snapshot:
        return Snapshot()

    return WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=channel, fresh=fresh)


def signed(job_id: uuid.UUID, *, attempt: int = 1, issued_at: float | None = None,
           agent_id: uuid.UUID = AGENT, secret: str = SECRET,
           **payload: Any) -> tuple[bytes, str]:  # fmt: skip
    """An assignment as the orchestrator signs it (at `issued_at`, now by default)."""
    body = {"command": [sys.executable, "-c", "pass"], **payload}
    when = time.time() if issued_at is None else issued_at
    return encode(Order("assign", agent_id, job_id, attempt, when, body), order_key(secret))


def sign_bytes(body: bytes) -> tuple[bytes, str]:
    """Any body, signed with the agent's own order key."""
    return body, SIGNATURE_VERSION + hmac.new(order_key(SECRET), body, hashlib.sha256).hexdigest()


@contextlib.contextmanager
def refusals(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """The work loop's `order refused` lines logged inside the block, at any level."""
    caplog.clear()
    found: list[logging.LogRecord] = []
    with caplog.at_level(logging.DEBUG, logger=WORK_LOG):
        yield found
    found.extend(
        r
        for r in caplog.records
        if r.name == WORK_LOG and r.getMessage().startswith("order refused")
    )


# --- the whole path: agent, orchestrator, /metrics, the agent's API view --------------


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _ended(orch: Orchestrator, job_id: uuid.UUID) -> JobDetail:
    async with api_client(orch, API_HEADERS) as user:

        async def shown() -> JobDetail:
            return JobDetail.model_validate((await user.get(f"/api/v1/jobs/{job_id}")).json())

        async def ended() -> bool:
            return (await shown()).ended_at is not None

        await eventually(ended, within_seconds=20)
        return await shown()


async def test_a_replayed_order_is_logged_counted_sent_in_the_heartbeat_and_shown_on_metrics(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone captured the signed order of a job that ran, and sends it again: the agent
    runs nothing, logs one warning naming `replayed`, counts it, says so in its next
    heartbeat, and the orchestrator shows it on /metrics and in the agent's record."""
    agent_id = await desktop(orchestrator, "render-07")
    credential = await issue(orchestrator, agent_id)
    settings = WorkSettings(accept_jobs="always", jobs_dir=tmp_path / "jobs", allow_root=True,
                            grace_seconds=0.5)  # fmt: skip

    async def fresh() -> Snapshot:
        return Snapshot()

    work = WorkLoop(settings, agent_id=agent_id, secret=credential.secret,
                    channel=InMemoryWork(orchestrator, agent_id), fresh=fresh,
                    clock=lambda: orchestrator.clock.now().timestamp())  # fmt: skip
    job_id, _ = await orchestrator.submit_job(
        JobSubmit.model_validate({"command": [sys.executable, "-c", "pass"]})
    )
    await orchestrator.dispatcher.tick()
    [captured] = await orchestrator.orders_for(agent_id)  # as the long-poll carried it
    assert await work.handle(*captured)
    ran = await _ended(orchestrator, job_id)
    assert (ran.state, ran.attempt) == ("succeeded", 1)

    with refusals(caplog) as lines:
        assert not await work.handle(*captured)  # the replay
    [line] = lines
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"order refused: replayed: attempt 1 of {job_id}")
    assert work.refused == {"replayed": 1} and work.running == []
    again = await _ended(orchestrator, job_id)
    assert (again.state, again.attempt, len(again.attempts)) == ("succeeded", 1, 1)

    async with api_client(orchestrator, API_HEADERS) as api:
        before = _samples((await api.get("/metrics")).text)
        # the registration came from an agent too old to say: no series, never a made-up 0
        assert not [name for name, _ in before if name.startswith("chiffon_agent_orders")]

        sent: list[bytes] = []

        async def sink(raw: bytes, *, signature: str | None = None) -> str:
            sent.append(raw)
            return await orchestrator.ingest(raw, signature=signature)

        async def collect() -> Snapshot:
            return work.observe(Snapshot())

        clock.advance(5)  # the agent's beat, a little after its registration
        beating = AgentLoop(
            AgentIdentity(agent_id, "render-07"), InMemoryPublisher(sink),  # in process
            collect, interval_seconds=60, accepts_jobs=work.accepting_now,
        )  # fmt: skip
        await asyncio.wait_for(beating.run(max_beats=1), 10)
        heartbeat = json.loads(sent[0])
        assert heartbeat["kind"] == "heartbeat"
        assert heartbeat["resources"]["orders_refused"] == {"replayed": 1}

        samples = _samples((await api.get("/metrics")).text)
        labels = {"agent_id": str(agent_id), "name": "render-07", "pool": "desktop_pool_1"}
        key = frozenset({**labels, "reason": "replayed"}.items())
        assert samples[("chiffon_agent_orders_refused_total", key)] == 1.0
        record = (await api.get(f"/api/v1/agents/{agent_id}")).json()
        assert record["resource_metrics"]["orders_refused"] == {"replayed": 1}
    await work.stop()


# --- each refusal, told apart ---------------------------------------------------------


async def test_the_orchestrator_saying_an_order_again_is_a_quiet_duplicate_and_a_copy_a_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The orchestrator re-signs a pending order each time it says it (long-poll and push
    may both carry one), so a newer `issued_at` is its own repeat: counted as `duplicate`
    at DEBUG, never a warning. A byte-for-byte copy is `replayed`, a warning, and so is a
    copy of the repeat. The record of what was seen survives a restart of the agent."""
    channel, job = Channel(), uuid.uuid4()
    work = work_loop(tmp_path / "jobs", channel)
    now = time.time()
    first, said_again = signed(job, issued_at=now - 2), signed(job, issued_at=now - 1)

    assert await work.handle(*first)
    with refusals(caplog) as lines:
        assert not await work.handle(*said_again)
    assert [r.levelno for r in lines] == [logging.DEBUG]
    assert "duplicate" in lines[0].getMessage()

    with refusals(caplog) as lines:
        assert not await work.handle(*first)
        assert not await work.handle(*said_again)
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]
    assert all(r.getMessage().startswith("order refused: replayed: ") for r in lines)
    assert work.refused == {"duplicate": 1, "replayed": 2}
    await eventually(lambda: _said(channel, job, ["started", "ended"]))
    await work.stop()

    restarted = work_loop(tmp_path / "jobs", channel)  # a new run: counts start again
    with refusals(caplog) as lines:
        assert not await restarted.handle(*said_again)  # still a copy
        assert not await restarted.handle(*signed(job, issued_at=now))  # said once more
    assert [r.levelno for r in lines] == [logging.WARNING, logging.DEBUG]
    assert restarted.refused == {"replayed": 1, "duplicate": 1}
    assert _kinds(channel, job) == ["started", "ended"]  # it ran once


async def test_an_order_for_an_older_attempt_than_one_started_is_superseded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    channel, job = Channel(), uuid.uuid4()
    work = work_loop(tmp_path / "jobs", channel)
    assert await work.handle(*signed(job, attempt=2))
    with refusals(caplog) as lines:
        assert not await work.handle(*signed(job, attempt=1))
    [line] = lines
    assert line.levelno == logging.WARNING
    assert line.getMessage() == f"order refused: superseded: attempt 1 of {job}: 2 was started"
    assert work.refused == {"superseded": 1}
    await work.stop()


def _unsigned(job: uuid.UUID) -> tuple[bytes, str]:
    return signed(job)[0], ""


def _forged(job: uuid.UUID) -> tuple[bytes, str]:
    return signed(job, secret="someone else's secret")


def _for_another_agent(job: uuid.UUID) -> tuple[bytes, str]:
    return signed(job, agent_id=uuid.uuid4())


def _ten_minutes_old(job: uuid.UUID) -> tuple[bytes, str]:
    return signed(job, issued_at=time.time() - 600)


def _not_an_order(job: uuid.UUID) -> tuple[bytes, str]:
    doc = json.dumps({"v": 1, "kind": "assign", "job_id": str(job)}).encode()
    return sign_bytes(seal(doc, order_key(SECRET)))


def _not_sealed(job: uuid.UUID) -> tuple[bytes, str]:
    """Signed, but in plain text: the orchestrator seals every order to its agent."""
    return sign_bytes(json.dumps({"v": 1, "kind": "assign", "job_id": str(job)}).encode())


def _too_large(job: uuid.UUID) -> tuple[bytes, str]:
    return sign_bytes(b" " * (MAX_ORDER_BYTES + 1))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_unsigned, "bad_signature"),
        (_forged, "bad_signature"),
        (_for_another_agent, "not_mine"),
        (_ten_minutes_old, "stale"),
        (_not_an_order, "malformed"),
        (_not_sealed, "bad_seal"),
        (_too_large, "too_large"),
    ],
)
async def test_every_order_failing_verification_is_one_warning_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Any, reason: str
) -> None:
    channel, job = Channel(), uuid.uuid4()
    work = work_loop(tmp_path / "jobs", channel)
    with refusals(caplog) as lines:
        assert not await work.handle(*make(job))
    [line] = lines
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"order refused: {reason}: ")
    assert work.refused == {reason: 1}
    assert work.observe(Snapshot()).orders_refused == {reason: 1}
    assert channel.reports == [] and not (tmp_path / "jobs").exists()  # nothing ran


async def test_an_unusable_assignment_is_counted_warned_about_and_reported_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Signed and fresh, but its fields are out of bounds (another version's orchestrator,
    or a bug): the orchestrator hears `refused` with why, and the agent counts it."""
    channel, job = Channel(), uuid.uuid4()
    work = work_loop(tmp_path / "jobs", channel)
    with refusals(caplog) as lines:
        assert await work.handle(*signed(job, command="echo not a list"))
    [line] = lines
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"order refused: unusable: attempt 1 of {job}: ")
    assert work.refused == {"unusable": 1}
    [(_, _, said)] = channel.reports
    assert (said["outcome"], said["detail"][:20]) == ("refused", "unusable assignment:")


async def _said(channel: Channel, job: uuid.UUID, kinds: list[str]) -> bool:
    return _kinds(channel, job) == kinds


def _kinds(channel: Channel, job: uuid.UUID) -> list[str]:
    return [said["kind"] for j, _, said in channel.reports if j == job and said["kind"] != "usage"]


# --- the heartbeat field: one contract on both sides ----------------------------------


def test_orders_refused_travels_as_the_contract_writes_it_and_older_agents_omit_it() -> None:
    sent = Snapshot(orders_refused={"bad_signature": 2, "replayed": 1}).as_json()
    assert Resources.model_validate(sent).orders_refused == {"bad_signature": 2, "replayed": 1}
    older = {k: v for k, v in Snapshot().as_json().items() if k != "orders_refused"}
    assert Resources.model_validate(older).orders_refused == {}


@pytest.mark.parametrize(
    "counts",
    [
        {"Replayed": 1},  # not a reason word
        {"replayed\n": 1},
        {"replayed": -1},
        {"replayed": 2**63},
        {f"reason_{i}": 1 for i in range(17)},  # more reasons than any agent has
    ],
)
def test_implausible_refusal_counts_are_refused_by_both(counts: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="orders_refused"):
        Snapshot(orders_refused=counts)
    wire = {**Snapshot().as_json(), "orders_refused": counts}
    with pytest.raises(ValidationError, match="orders_refused"):
        Resources.model_validate_json(json.dumps(wire))


async def test_the_metric_is_declared_once_with_its_labels(
    orchestrator: Orchestrator,
) -> None:
    """A heartbeat carrying counts from several reasons: one counter family, one series a
    reason, labelled like every other per-agent series."""
    res = f.resources().model_copy(update={"orders_refused": {"bad_signature": 3, "stale": 1}})
    agent = uuid.uuid4()
    assert await orchestrator.receive(f.message(agent, name="desk-9", res=res)) == "applied"
    async with api_client(orchestrator) as scrape:
        text = (await scrape.get("/metrics")).text
    families = [f for f in text_string_to_metric_families(text) if "orders_refused" in f.name]
    [family] = families
    assert (family.name, family.type) == ("chiffon_agent_orders_refused", "counter")
    got = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert got == {"bad_signature": 3.0, "stale": 1.0}
    assert {frozenset(s.labels) for s in family.samples} == {
        frozenset({"agent_id", "name", "pool", "reason"})
    }
