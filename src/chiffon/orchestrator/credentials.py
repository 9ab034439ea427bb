"""Agent credentials on the orchestrator: issue at enrollment, check, revoke.

An agent's secret is `HMAC-SHA256(server key, agent_id || nonce)`. The database keeps the
nonce and the secret's SHA-256, never the secret or the AMQP signing key derived from it:
a stolen database without the server key lets no one impersonate an agent.

A verified credential is cached in memory, so ingest does not read the database for every
message. On PostgreSQL the store follows the database's change notices (migration 0005):
a changed or revoked credential leaves every orchestrator's cache as soon as the notice
arrives, and a cached one is kept for `LISTENING_CACHE_SECONDS`, longer than any heartbeat
interval. Without notices (SQLite, or while the listening connection is down) an entry
lives `cache_seconds`, and a revocation reaches the other orchestrators within that time.
Lookups that miss the cache at the same moment (a broker delivering hundreds of messages
at once) are answered by one query together.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.clock import Clock
from chiffon.persistence import credentials as repo
from chiffon.persistence import registry
from chiffon.persistence.models import EnrollTokenRow
from chiffon.schemas.heartbeat import RejectedMessage
from chiffon.transport.auth import (
    AgentCredential,
    secret_digest,
    signature_matches,
    signing_key,
)
from chiffon.transport.orders import order_key

log = logging.getLogger(__name__)

_SECRET_LABEL = b"chiffon agent secret v1|"
_CACHE_LIMIT = 100_000
_LOAD_CHUNK = 1_000  # agent ids per query when many lookups miss the cache together
# How long a cached credential lives while change notices arrive: they drop it the moment
# it changes; this bounds only a notice lost in ways the connection did not report.
LISTENING_CACHE_SECONDS = 300.0

Listen = Callable[[], AbstractAsyncContextManager[AsyncIterator[str]]]


class AlreadyEnrolledError(RuntimeError):
    """The agent holds a credential already; revoke it before enrolling again."""


class BannedError(AlreadyEnrolledError):
    """The agent's credential was revoked: it may not enroll until the ban is lifted."""


class TokenSpentError(RuntimeError):
    """The made enrollment token ran out of uses or expired meanwhile."""


def key_id(server_key: bytes) -> str:
    """A short public name of the server key (so a changed key is noticed, not guessed)."""
    return hashlib.sha256(b"chiffon key id|" + server_key).hexdigest()[:16]


def derive_secret(server_key: bytes, agent_id: uuid.UUID, nonce: str) -> str:
    """The agent's secret: `HMAC-SHA256(server key, label || agent_id || nonce)`, base64url."""
    mac = hmac.new(server_key, _SECRET_LABEL + agent_id.bytes + bytes.fromhex(nonce), "sha256")
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def new_credential(
    server_key: bytes, agent_id: uuid.UUID, created_at: datetime
) -> tuple[dict[str, Any], AgentCredential]:
    """A fresh secret for the agent, and the `agent_credentials` row that recognises it
    (its nonce and the secret's SHA-256, never the secret)."""
    nonce = secrets.token_hex(16)
    secret = derive_secret(server_key, agent_id, nonce)
    row = {
        "agent_id": agent_id,
        "nonce": nonce,
        "secret_sha256": secret_digest(secret),
        "key_id": key_id(server_key),
        "created_at": created_at,
    }
    return row, AgentCredential(agent_id, secret)


@dataclass(frozen=True, slots=True)
class _Known:
    secret_sha256: str
    signing_key: bytes | None  # None: issued under another server key
    fetched_at: float
    revoked: bool = False
    order_key: bytes | None = None  # signs orders to the agent (transport.orders)


class CredentialStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        server_key: bytes,
        *,
        cache_seconds: float = 10.0,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._server_key = server_key
        self.key_id = key_id(server_key)
        self.cache = CredentialCache(sessions, server_key, cache_seconds=cache_seconds)

    @property
    def listening(self) -> bool:
        """Whether the cache hears the database's change notices now."""
        return self.cache.listening

    async def follow_changes(self, listen: Listen, *, retry_seconds: float = 1.0) -> None:
        """`CredentialCache.follow_changes`."""
        await self.cache.follow_changes(listen, retry_seconds=retry_seconds)

    async def issue(
        self, agent_id: uuid.UUID, *, approved: bool = True, token_sha256: str | None = None
    ) -> AgentCredential:
        """A new secret for an agent without one; `AlreadyEnrolledError` when it holds one,
        `BannedError` when its credential was revoked and the ban not lifted,
        `TokenSpentError` when the made token `token_sha256` (spent in the same
        transaction) has no use left. Not `approved`: it takes no jobs until an admin
        approves it."""
        now = self._clock.now()
        row, credential = new_credential(self._server_key, agent_id, now)
        row["approved_at"] = now if approved else None
        try:
            async with self._sessions.begin() as session:
                if token_sha256 is not None and (
                    await repo.use_enroll_token(session, token_sha256=token_sha256, now=now) is None
                ):
                    raise TokenSpentError("the enrollment token is used up or expired")
                await repo.add_credential(session, row=row)
                await registry.sync_holds(session, agent_ids=[agent_id], now=now)
        except IntegrityError:
            async with self._sessions() as session:
                held = await repo.get_credential(session, agent_id=agent_id)
            if held is not None and held.revoked_at is not None:
                raise BannedError(f"agent {agent_id} was revoked") from None
            raise AlreadyEnrolledError(f"agent {agent_id} is already enrolled") from None
        self.cache.forget(agent_id)
        return credential

    async def replace(self, agent_id: uuid.UUID) -> AgentCredential:
        """A new secret in place of any the agent had, ban included: only for the agent an
        orchestrator runs in its own process (`chiffon up`), never over the API."""
        async with self._sessions.begin() as session:
            await repo.delete_credential(session, agent_id=agent_id)
        self.cache.forget(agent_id)
        return await self.issue(agent_id)

    async def rotate(self, agent_id: uuid.UUID) -> AgentCredential | None:
        """A new secret in place of the agent's (the old one is refused from now on, on
        every orchestrator), its approval kept and any suspicion cleared; None when it holds
        no credential that is not revoked."""
        now = self._clock.now()
        row, credential = new_credential(self._server_key, agent_id, now)
        async with self._sessions.begin() as session:
            held = await repo.get_credential(session, agent_id=agent_id)
            if held is None or held.revoked_at is not None:
                return None
            row["approved_at"] = held.approved_at
            await repo.delete_credential(session, agent_id=agent_id)
            await repo.add_credential(session, row=row)
            await registry.sync_holds(session, agent_ids=[agent_id], now=now)
        self.cache.forget(agent_id)
        return credential

    async def trust(self, agent_id: uuid.UUID, *, approve: bool, clear: bool) -> bool:
        """Approve the agent and/or clear its suspicion: it takes jobs again (the scheduler
        reads its row again at once). Whether it holds a credential that is not revoked."""
        now = self._clock.now()
        async with self._sessions.begin() as session:
            held = await repo.set_trust(
                session, agent_id=agent_id, approved_at=now if approve else None, clear=clear
            )
            await registry.sync_holds(session, agent_ids=[agent_id], now=now)
        return held

    async def made_token(self, token: str) -> EnrollTokenRow | None:
        """The made enrollment token `token` is, if it is unexpired with uses left (not
        spent here: `issue` spends it)."""
        async with self._sessions() as session:
            return await repo.find_enroll_token(
                session, token_sha256=secret_digest(token), now=self._clock.now()
            )

    async def make_token(
        self, *, uses: int | None, expires_at: datetime | None, approves: bool, note: str
    ) -> tuple[str, uuid.UUID]:
        """A new enrollment token (shown once: only its SHA-256 is kept) and its id."""
        token = "chiffon-enroll-" + secrets.token_urlsafe(24)
        token_id = uuid.uuid4()
        row = {
            "token_id": token_id,
            "token_sha256": secret_digest(token),
            "uses_left": uses,
            "expires_at": expires_at,
            "approves": approves,
            "note": note,
            "created_at": self._clock.now(),
        }
        async with self._sessions.begin() as session:
            await repo.add_enroll_token(session, row=row)
        return token, token_id

    async def revoke(self, agent_id: uuid.UUID) -> bool:
        """Ban the agent's credential: its messages are refused, and it cannot enroll again
        until `lift_ban`. Whether it held an active one."""
        async with self._sessions.begin() as session:
            had = await repo.revoke_credential(session, agent_id=agent_id, at=self._clock.now())
        self.cache.forget(agent_id)
        return had

    async def lift_ban(self, agent_id: uuid.UUID) -> bool:
        """Let a revoked agent enroll again; whether it was banned."""
        async with self._sessions.begin() as session:
            was = await repo.delete_credential(session, agent_id=agent_id, banned_only=True)
        self.cache.forget(agent_id)
        return was

    async def check_bearer(self, agent_id: uuid.UUID, token: str | None) -> None:
        """`RejectedMessage` unless `token` is this agent's secret."""
        if not token:
            raise RejectedMessage("unauthenticated", "no agent credential (Authorization: Bearer)")
        known = await self.cache.known(agent_id)
        if not hmac.compare_digest(known.secret_sha256, secret_digest(token)):
            raise RejectedMessage("bad_credential", f"wrong credential for agent {agent_id}")

    async def check_signature(
        self, agent_id: uuid.UUID, body: bytes, signature: str | None
    ) -> None:
        """`RejectedMessage` unless `signature` is this agent's HMAC of `body`."""
        if not signature:
            raise RejectedMessage("unauthenticated", "no x-chiffon-signature header")
        known = await self.cache.known(agent_id)
        if known.signing_key is None:
            raise RejectedMessage(
                "bad_signature", f"agent {agent_id}'s credential was issued under another key"
            )
        if not signature_matches(known.signing_key, body, signature):
            raise RejectedMessage("bad_signature", f"signature is not agent {agent_id}'s")

    async def order_key(self, agent_id: uuid.UUID) -> bytes:
        """The key this agent checks its orders with; `RejectedMessage` when it has none
        that this orchestrator can derive (not enrolled, revoked, another server key)."""
        known = await self.cache.known(agent_id)
        if known.order_key is None:
            raise RejectedMessage(
                "bad_signature", f"agent {agent_id}'s credential was issued under another key"
            )
        return known.order_key


class CredentialCache:
    """Agents' credentials as the checks read them: each read from the database at most
    once a turn of the event loop (every lookup that missed in that turn shares one query),
    then kept for `cache_seconds`, or for `LISTENING_CACHE_SECONDS` while the database's
    change notices are heard (`follow_changes`) and drop what changed."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        server_key: bytes,
        *,
        cache_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._server_key = server_key
        self.key_id = key_id(server_key)
        self._cache_seconds = cache_seconds
        self._ttl = cache_seconds
        self._cache: dict[uuid.UUID, _Known] = {}
        # Bumped whenever entries are dropped: a lookup that was in flight meanwhile may
        # have read the old row, so its answer is used once but not cached.
        self._generation = 0
        self.listening = False
        self._waiting: dict[uuid.UUID, asyncio.Future[_Known | None]] = {}
        self._loader: asyncio.Task[None] | None = None

    async def known(self, agent_id: uuid.UUID) -> _Known:
        cached = self._cache.get(agent_id)
        if cached is not None and time.monotonic() - cached.fetched_at < self._ttl:
            return cached
        known = await self._load(agent_id)
        if known is None:
            raise RejectedMessage("not_enrolled", f"agent {agent_id} is not enrolled")
        if known.revoked:
            raise RejectedMessage("revoked", f"agent {agent_id}'s credential was revoked")
        return known

    def _load(self, agent_id: uuid.UUID) -> asyncio.Future[_Known | None]:
        """This agent's credential from the database, in one query with every lookup that
        missed the cache in the same turn of the event loop."""
        waiting = self._waiting.get(agent_id)
        if waiting is None:
            waiting = asyncio.get_running_loop().create_future()
            self._waiting[agent_id] = waiting
        if self._loader is None or self._loader.done():
            self._loader = asyncio.create_task(self._load_waiting())
        return waiting

    async def _load_waiting(self) -> None:
        await asyncio.sleep(0)  # let the other deliveries of this turn ask too
        while self._waiting:
            batch = dict(list(self._waiting.items())[:_LOAD_CHUNK])
            for agent_id in batch:
                del self._waiting[agent_id]
            generation, fetched_at = self._generation, time.monotonic()
            try:
                async with self._sessions() as session:
                    rows = await repo.get_credentials(session, agent_ids=batch.keys())
            except Exception as exc:  # database down: every waiter hears it (and requeues)
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            keep = generation == self._generation
            for agent_id, future in batch.items():
                if not future.done():
                    known = self._known_from(agent_id, rows.get(agent_id), fetched_at)
                    if keep:
                        self._remember(agent_id, known)
                    future.set_result(known)

    def _known_from(self, agent_id: uuid.UUID, row: Row[Any] | None, at: float) -> _Known | None:
        if row is None:
            return None
        if row.revoked_at is not None:
            return _Known("", None, at, revoked=True)
        if row.key_id != self.key_id:
            return _Known(row.secret_sha256, None, at)
        secret = derive_secret(self._server_key, agent_id, row.nonce)
        return _Known(row.secret_sha256, signing_key(secret), at, order_key=order_key(secret))

    def _remember(self, agent_id: uuid.UUID, known: _Known | None) -> None:
        if known is None:
            self._cache.pop(agent_id, None)
            return
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[agent_id] = known

    async def follow_changes(self, listen: Listen, *, retry_seconds: float = 1.0) -> None:
        """Run until cancelled: while `listen()` delivers the database's change notices
        (agent ids, '*' for all), drop what changed and cache for `LISTENING_CACHE_SECONDS`;
        while it cannot, cache for `cache_seconds` and try again every `retry_seconds`."""
        while True:
            try:
                async with listen() as changes:
                    self._set_listening(True)
                    log.info("credential cache follows the database's change notices")
                    async for notice in changes:
                        self._forget_notice(notice)
                    raise ConnectionError("the notices ended")
            except Exception as exc:  # connection lost or refused: never the end of ingest
                if self.listening:
                    log.warning(
                        "credential change notices lost (%s); caching credentials for %g s "
                        "until they are back",
                        exc,
                        self._cache_seconds,
                    )
                else:
                    log.debug("cannot listen for credential changes: %s", exc)
            finally:
                if self.listening:  # deaf already: what it cached meanwhile keeps cache_seconds
                    self._set_listening(False)
            await asyncio.sleep(retry_seconds)

    def _set_listening(self, listening: bool) -> None:
        """Entries cached under the other regime may have changed unheard: forget them."""
        self.listening = listening
        self._ttl = LISTENING_CACHE_SECONDS if listening else self._cache_seconds
        self.forget(None)

    def forget(self, agent_id: uuid.UUID | None) -> None:
        """Drop one agent's entry (None: every entry)."""
        self._generation += 1
        if agent_id is None:
            self._cache.clear()
        else:
            self._cache.pop(agent_id, None)

    def _forget_notice(self, notice: str) -> None:
        if notice == "*":
            self.forget(None)
            return
        try:
            self.forget(uuid.UUID(notice))
        except ValueError:  # not ours: forget everything rather than keep something stale
            log.warning("credential change notice names no agent: %r", notice)
            self.forget(None)
