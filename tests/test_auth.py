"""Agent credentials and API auth: enrollment, bearer secrets, signatures, replay window."""

from __future__ import annotations

import asyncio
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from chiffon.agent.identity import load_secret, store_secret
from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.credentials import BannedError
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import credentials as repo
from chiffon.schemas.heartbeat import RejectedMessage
from chiffon.transport.auth import secret_digest, signing_key
from tests import factories as f
from tests.auth import API_HEADERS, API_TOKEN, ENROLL_TOKEN, bearer, issue


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC))


@pytest.fixture
async def api(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(orchestrator, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://chiffon") as client:
        yield client


def rejected(orch: Orchestrator, reason: str) -> float:
    value = orch.metrics.registry.get_sample_value(
        "chiffon_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


async def test_every_api_route_wants_the_token_and_health_stays_open(
    api: httpx.AsyncClient,
) -> None:
    for path in ("/api/v1/agents", "/api/v1/fleet/summary", "/api/v1/events"):
        missing = await api.get(path)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "CHIFFON_API_TOKEN" in missing.json()["detail"]
        wrong = await api.get(path, headers={"authorization": f"Bearer {API_TOKEN}x"})
        assert wrong.status_code == 401 and wrong.json() == {"detail": "invalid API token"}
        assert (await api.get(path, headers=API_HEADERS)).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await api.get(path)).status_code == 200, path


async def test_enrollment_gives_a_secret_once_stored_only_as_a_hash(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    agent = uuid.uuid4()
    body = {"agent_id": str(agent)}
    assert (await api.post("/api/v1/enroll", json=body)).status_code == 401
    wrong = await api.post("/api/v1/enroll", json=body, headers={"authorization": "Bearer no"})
    assert wrong.status_code == 401
    token = {"authorization": f"Bearer {ENROLL_TOKEN}"}
    got = await api.post("/api/v1/enroll", json=body, headers=token)
    assert got.status_code == 200 and got.json()["agent_id"] == str(agent)
    secret = got.json()["secret"]
    # A second enrollment would let a token holder take the agent over: refused.
    again = await api.post("/api/v1/enroll", json=body, headers=token)
    assert again.status_code == 409 and "chiffon agents revoke" in again.json()["detail"]
    async with orchestrator.sessions() as session:
        row = await repo.get_credential(session, agent_id=agent)
    assert row is not None and row.secret_sha256 == secret_digest(secret)
    stored = {row.nonce, row.secret_sha256, row.key_id}
    assert secret not in stored and signing_key(secret).hex() not in stored


async def test_a_heartbeat_needs_its_own_agents_secret(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    cred_a, cred_b = await issue(orchestrator, a), await issue(orchestrator, b)
    beat_b = f.raw(f.message(b, name="b", sent_at=clock.now()))
    url = f"/api/v1/agents/{b}/heartbeat"
    assert (await api.post(url, content=beat_b)).status_code == 401
    assert (await api.post(url, content=beat_b, headers=API_HEADERS)).status_code == 401
    spoofed = await api.post(url, content=beat_b, headers=bearer(cred_a))  # A claims to be B
    assert spoofed.status_code == 401 and spoofed.json()["detail"].startswith("bad_credential")
    assert (await api.get(f"/api/v1/agents/{b}", headers=API_HEADERS)).status_code == 404
    assert rejected(orchestrator, "bad_credential") == 2  # the API token is no agent's secret
    assert rejected(orchestrator, "unauthenticated") == 1
    ok = await api.post(url, content=beat_b, headers=bearer(cred_b))
    assert ok.status_code == 200 and ok.json()["outcome"] == "applied"


@pytest.mark.parametrize("offset_seconds", [-3600, 3600, -86400 * 365])
async def test_ancient_or_future_messages_are_refused(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock, offset_seconds: int
) -> None:
    agent = uuid.uuid4()
    cred = await issue(orchestrator, agent)
    msg = f.message(agent, sent_at=f.later(clock.now(), offset_seconds))
    resp = await api.post(
        f"/api/v1/agents/{agent}/heartbeat", content=f.raw(msg), headers=bearer(cred)
    )
    assert resp.status_code == 401 and resp.json()["detail"].startswith("clock_skew")
    assert rejected(orchestrator, "clock_skew") == 1
    assert (await api.get(f"/api/v1/agents/{agent}", headers=API_HEADERS)).status_code == 404


async def test_revoke_bans_the_id_until_an_operator_lifts_it(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """A revoked agent used to enroll again at once with the enrollment token and write
    under its old id. Now the id stays refused until `chiffon agents unban`."""
    agent = uuid.uuid4()
    old = await issue(orchestrator, agent)
    url = f"/api/v1/agents/{agent}/heartbeat"
    beat = f.raw(f.message(agent, seq=1, sent_at=clock.now()))
    assert (await api.post(url, content=beat, headers=bearer(old))).status_code == 200
    revoke = f"/api/v1/agents/{agent}/credential"
    assert (await api.delete(revoke)).status_code == 401  # admin only
    assert (await api.delete(revoke, headers=API_HEADERS)).status_code == 204
    assert (await api.delete(revoke, headers=API_HEADERS)).status_code == 404
    beat = f.raw(f.message(agent, seq=2, sent_at=clock.now()))
    refused = await api.post(url, content=beat, headers=bearer(old))
    assert refused.status_code == 401 and refused.json()["detail"].startswith("revoked")
    token = {"authorization": f"Bearer {ENROLL_TOKEN}"}
    enroll_body = {"agent_id": str(agent)}
    banned = await api.post("/api/v1/enroll", json=enroll_body, headers=token)
    assert banned.status_code == 403 and "chiffon agents unban" in banned.json()["detail"]
    with pytest.raises(BannedError):
        await issue(orchestrator, agent)
    lift = f"/api/v1/agents/{agent}/ban"
    assert (await api.delete(lift)).status_code == 401  # admin only
    assert (await api.delete(lift, headers=API_HEADERS)).status_code == 204
    assert (await api.delete(lift, headers=API_HEADERS)).status_code == 404
    again = await api.post("/api/v1/enroll", json=enroll_body, headers=token)
    assert again.status_code == 200
    new = again.json()["secret"]
    assert new != old.secret
    authed = {"authorization": f"Bearer {new}"}
    assert (await api.post(url, content=beat, headers=authed)).status_code == 200
    metrics = (await api.get("/metrics")).text
    assert 'chiffon_enrollments_total{outcome="banned"} 1.0' in metrics
    assert 'chiffon_enrollments_total{outcome="issued"} 1.0' in metrics


async def test_enrollments_are_logged_and_counted(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    token = {"authorization": f"Bearer {ENROLL_TOKEN}"}
    agents = [uuid.uuid4() for _ in range(3)]
    with caplog.at_level("INFO", logger="chiffon"):
        for agent in agents:
            body = {"agent_id": str(agent)}
            assert (await api.post("/api/v1/enroll", json=body, headers=token)).status_code == 200
        body = {"agent_id": str(agents[0])}
        assert (await api.post("/api/v1/enroll", json=body, headers=token)).status_code == 409
        bad = {"authorization": "Bearer guess"}
        assert (await api.post("/api/v1/enroll", json=body, headers=bad)).status_code == 401
    logged = [r.getMessage() for r in caplog.records]
    for agent in agents:
        assert any(f"enrolled agent {agent} from" in line for line in logged)
    assert any("already enrolled" in line for line in logged)
    assert any("enrollment refused: a wrong enrollment token" in line for line in logged)
    metrics = (await api.get("/metrics")).text
    assert 'chiffon_enrollments_total{outcome="issued"} 3.0' in metrics
    assert 'chiffon_enrollments_total{outcome="already_enrolled"} 1.0' in metrics
    assert 'chiffon_enrollments_total{outcome="bad_token"} 1.0' in metrics


async def test_signed_in_process_messages_are_checked_like_amqp_ones(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    cred_a = await issue(orchestrator, a)
    await issue(orchestrator, b)
    raw_b = f.raw(f.message(b, sent_at=clock.now()))
    with pytest.raises(RejectedMessage, match="signature is not agent"):
        await orchestrator.ingest(raw_b, signature=cred_a.sign(raw_b))
    raw_a = f.raw(f.message(a, sent_at=clock.now()))
    tampered = raw_a.replace(b'"name":"desk"', b'"name":"evil"')
    with pytest.raises(RejectedMessage, match="signature"):
        await orchestrator.ingest(tampered, signature=cred_a.sign(raw_a))
    assert rejected(orchestrator, "bad_signature") == 2
    assert await orchestrator.ingest(raw_a, signature=cred_a.sign(raw_a)) == "applied"


async def test_a_credential_from_another_server_key_is_refused(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    cred = await issue(orchestrator, agent)
    other_key = orchestrator.settings.model_copy(update={"secret_key": None})
    other = Orchestrator(other_key, clock=clock)  # an ephemeral key: not the one that issued
    try:
        raw = f.raw(f.message(agent, sent_at=clock.now()))
        with pytest.raises(RejectedMessage, match="issued under another key"):
            await other.credentials.check_signature(agent, raw, cred.sign(raw))
        await other.credentials.check_bearer(agent, cred.secret)  # the hash still matches
    finally:
        await other.engine.dispose()


def test_the_agent_keeps_its_secret_readable_only_by_its_user(tmp_path: Path) -> None:
    assert load_secret(tmp_path) is None
    path = store_secret(tmp_path / "state", "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(tmp_path / "state") == "s3cret"


async def test_lookups_that_miss_the_cache_together_share_one_query(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """A broker delivering hundreds of messages at once must not cost a query each."""
    from sqlalchemy import event

    agents = [uuid.uuid4() for _ in range(300)]
    creds = [await issue(orchestrator, agent) for agent in agents]
    stranger = uuid.uuid4()
    queries: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "agent_credentials" in statement:
            queries.append(statement)

    sync_engine = orchestrator.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", count)
    try:
        bodies = [f.raw(f.message(a, sent_at=clock.now())) for a in agents]
        checks = [
            orchestrator.credentials.check_signature(a, body, cred.sign(body))
            for a, body, cred in zip(agents, bodies, creds, strict=True)
        ]
        await asyncio.gather(*checks)
        assert len(queries) == 1, queries
        with pytest.raises(RejectedMessage, match="not enrolled"):
            await orchestrator.credentials.check_signature(stranger, b"{}", "v1=00")
        forged = orchestrator.credentials.check_signature(agents[0], bodies[1], creds[0].sign(b"x"))
        with pytest.raises(RejectedMessage, match="signature is not"):
            await forged  # cached now: no query, still checked
        assert len(queries) == 2
    finally:
        event.remove(sync_engine, "before_cursor_execute", count)
