"""PostgreSQL's change notices keep every orchestrator's credential cache true at once.

Each orchestrator here caches a verified credential for an hour when it hears nothing
(`credential_cache_seconds=3600`), so only a notice can make it refuse a revoked secret
in time: these tests fail if the trigger (migration 0005) or the listener stops working.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence.credentials import CHANGES_CHANNEL
from chiffon.schemas.heartbeat import RejectedMessage
from chiffon.transport.auth import AgentCredential
from tests import factories as f
from tests.auth import SECRET_KEY, issue
from tests.services import eventually


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC))


def hour_cache(database_url: str, tmp_path: Path) -> OrchestratorSettings:
    """Settings whose fallback cache keeps a credential for an hour."""
    return OrchestratorSettings(
        database_url=database_url,
        data_dir=tmp_path,
        secret_key=SECRET_KEY,  # type: ignore[arg-type]
        credential_cache_seconds=3600,
    )


@pytest.fixture
async def pair(
    postgres_url: str, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[tuple[Orchestrator, Orchestrator]]:
    """Two orchestrators on one PostgreSQL registry, both listening."""
    settings = hour_cache(postgres_url, tmp_path)
    a, b = Orchestrator(settings, clock=clock), Orchestrator(settings, clock=clock)
    async with a.engine.begin() as conn:
        await conn.execute(text("DELETE FROM agent_credentials"))
    for orch in (a, b):
        await orch.start(sweep=False)

    async def listening() -> bool:
        return a.credentials.listening and b.credentials.listening

    await eventually(listening)
    yield a, b
    for orch in (a, b):
        await orch.stop()


async def accepted(orch: Orchestrator, credential: AgentCredential, clock: ManualClock) -> bool:
    """Whether `orch` takes a message signed with `credential` now."""
    body = f.raw(f.message(credential.agent_id, sent_at=clock.now()))
    try:
        await orch.credentials.check_signature(credential.agent_id, body, credential.sign(body))
    except RejectedMessage:
        return False
    return True


async def test_a_revocation_on_one_orchestrator_is_refused_by_the_other_at_once(
    pair: tuple[Orchestrator, Orchestrator], clock: ManualClock
) -> None:
    a, b = pair
    agent = uuid.uuid4()
    old = await issue(a, agent)
    assert await accepted(b, old, clock)  # b has it cached now
    assert await a.credentials.revoke(agent)

    async def refused_by_b() -> bool:
        return not await accepted(b, old, clock)

    await eventually(refused_by_b, within_seconds=2)
    assert await a.credentials.lift_ban(agent)
    new = await issue(a, agent)  # enrolled again: b takes the new secret, not the old
    await eventually(refused_by_b, within_seconds=2)

    async def new_taken_by_b() -> bool:  # once b has heard of the new one (a notice)
        return await accepted(b, new, clock)

    await eventually(new_taken_by_b, within_seconds=2)


async def test_a_credential_deleted_by_hand_in_the_database_is_refused_too(
    pair: tuple[Orchestrator, Orchestrator], postgres_url: str, clock: ManualClock
) -> None:
    a, b = pair
    agents = [uuid.uuid4() for _ in range(3)]
    creds = [await issue(a, agent) for agent in agents]
    for cred in creds:
        assert await accepted(b, cred, clock)
    conninfo = make_url(postgres_url).render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DELETE FROM agent_credentials WHERE agent_id = %s", (agents[0],))
        # Not an agent id: the store forgets everything rather than guess, and listens on.
        conn.execute(f"NOTIFY {CHANGES_CHANNEL}, 'not-an-agent'")

    async def first_refused() -> bool:
        return not await accepted(b, creds[0], clock)

    await eventually(first_refused, within_seconds=2)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE agent_credentials")

    async def all_refused() -> bool:
        return not any([await accepted(b, cred, clock) for cred in creds[1:]])

    await eventually(all_refused, within_seconds=2)
    assert b.credentials.listening


async def test_a_cut_listener_reconnects_and_trusts_nothing_it_cached_before(
    pair: tuple[Orchestrator, Orchestrator],
    postgres_url: str,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pair
    agent = uuid.uuid4()
    cred = await issue(a, agent)
    assert await accepted(b, cred, clock)
    conninfo = make_url(postgres_url).render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Cut every listener (a's and b's), then revoke behind their backs with no
        # trigger, as if the notice had been lost with the connection.
        cut = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = %s",
            (f"LISTEN {CHANGES_CHANNEL}",),
        ).fetchall()
        assert len(cut) == 2
        conn.execute("ALTER TABLE agent_credentials DISABLE TRIGGER agent_credentials_notify")
        try:
            conn.execute("DELETE FROM agent_credentials WHERE agent_id = %s", (agent,))
        finally:
            conn.execute("ALTER TABLE agent_credentials ENABLE TRIGGER agent_credentials_notify")

    async def both_heard_the_cut_and_listen_again() -> bool:
        lost = [r for r in caplog.records if "credential change notices lost" in r.message]
        return len(lost) == 2 and a.credentials.listening and b.credentials.listening

    await eventually(both_heard_the_cut_and_listen_again, within_seconds=5)
    assert not await accepted(b, cred, clock)  # forgotten when the notices stopped


async def test_a_lookup_that_crossed_a_change_answers_once_and_is_not_cached(
    sqlite_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    """A query that read the row just before a change must not keep the old row cached.
    (On SQLite: no listener whose own notices could land in the middle of the count.)"""
    from sqlalchemy import event

    orchestrator = Orchestrator(hour_cache(sqlite_url, tmp_path), clock=clock)
    await orchestrator.start(sweep=False)
    agent = uuid.uuid4()
    cred = await issue(orchestrator, agent)
    store = orchestrator.credentials
    lookups: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "FROM agent_credentials" in statement:
            lookups.append(statement)

    def notice_meanwhile(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "FROM agent_credentials" in statement:
            store.cache.forget(agent)  # as if the change notice arrived while the query ran

    sync_engine = orchestrator.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", count)
    event.listen(sync_engine, "after_cursor_execute", notice_meanwhile)
    try:
        assert await accepted(orchestrator, cred, clock)  # answered from the row it read
        event.remove(sync_engine, "after_cursor_execute", notice_meanwhile)
        assert await accepted(orchestrator, cred, clock)
        assert len(lookups) == 2  # the crossed answer was not cached
        assert await accepted(orchestrator, cred, clock)
        assert len(lookups) == 2  # this one was
    finally:
        event.remove(sync_engine, "before_cursor_execute", count)
        await orchestrator.stop()
