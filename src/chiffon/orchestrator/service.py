"""The orchestrator's core, free of any web framework: ingest, sweep, queries."""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import suppress
from datetime import timedelta
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from chiffon.orchestrator.batcher import IngestBatcher
from chiffon.orchestrator.clock import Clock, SystemClock
from chiffon.orchestrator.credentials import CredentialStore
from chiffon.orchestrator.history import HistoryPruner, HistoryRecorder
from chiffon.orchestrator.ingest import Outcome, Received
from chiffon.orchestrator.liveness import Sweeper
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import registry
from chiffon.persistence.credentials import credential_changes
from chiffon.persistence.db import check_schema, create_engine, session_factory
from chiffon.persistence.registry import StatusEvent
from chiffon.schemas.heartbeat import AgentMessage, RejectedMessage, parse_message

log = logging.getLogger(__name__)


class Orchestrator:
    """Owns the database engine, the ingest batcher, the offline sweep and the history.

    Transports hand raw bytes (or parsed messages) to `receive`; the API reads through
    `sessions`. `start(sweep=False)` leaves sweeping, history recording and pruning to the
    caller (tests drive `sweeper.sweep_once()`, `recorder.record_once()` and
    `pruner.prune_once()` with a manual clock).
    """

    def __init__(
        self,
        settings: OrchestratorSettings,
        *,
        clock: Clock | None = None,
        engine: AsyncEngine | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.engine = engine or create_engine(settings.effective_database_url)
        self.sessions = session_factory(self.engine)
        self.metrics = OrchestratorMetrics()
        self.batcher = IngestBatcher(
            self.sessions,
            self.metrics,
            max_batch=settings.ingest_batch_size,
            max_delay_seconds=settings.ingest_batch_delay_ms / 1000,
        )
        self.sweeper = Sweeper(
            self.sessions,
            self.clock,
            self.metrics,
            timeout_seconds=settings.heartbeat_timeout_seconds,
        )
        self.credentials = CredentialStore(
            self.sessions,
            self.clock,
            _server_key(settings),
            cache_seconds=settings.credential_cache_seconds,
        )
        self.recorder = HistoryRecorder(
            self.sessions,
            self.clock,
            self.metrics,
            settings.history_tiers,
            heard_within_seconds=settings.heartbeat_timeout_seconds,
        )
        self.pruner = HistoryPruner(self.sessions, self.clock, settings.history_tiers)
        self._tasks: list[asyncio.Task[None]] = []
        self.sweeping = False

    async def start(self, *, sweep: bool = True) -> None:
        """Refuse a stale schema, then start ingest and (optionally) the periodic tasks."""
        await check_schema(self.engine)
        self.batcher.start()
        self.sweeper.grant_grace()
        if self.engine.dialect.name == "postgresql":
            self._tasks.append(
                asyncio.create_task(
                    self.credentials.follow_changes(lambda: credential_changes(self.engine)),
                    name="chiffon-credential-changes",
                )
            )
        self.sweeping = sweep
        if sweep:
            self._tasks.append(
                asyncio.create_task(
                    self.sweeper.run(self.settings.sweep_interval_seconds), name="chiffon-sweep"
                )
            )
            if self.recorder.tiers:
                self._tasks += [
                    asyncio.create_task(self.recorder.run(), name="chiffon-history-record"),
                    asyncio.create_task(
                        self.pruner.run(self.settings.history_prune_interval_seconds),
                        name="chiffon-history-prune",
                    ),
                ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.batcher.stop()
        await self.engine.dispose()

    def registry_stale_seconds(self) -> float | None:
        """Seconds since the offline sweep last completed, when it is behind (the database
        refuses writes, or no transport can hear): statuses are then not being kept, and the
        API and dashboard say so. None while sweeps complete, or when this process does not
        sweep."""
        if not self.sweeping:
            return None
        return self.sweeper.stale_seconds(self.settings.sweep_interval_seconds)

    async def readiness(self, *, amqp_consuming: bool | None = None) -> dict[str, str]:
        """What `/readyz` reports, one entry per check; ready when every one says "ok"
        (or "consuming"): the database answers, the last ingest write committed, the sweep
        keeps up, and the RabbitMQ consumer (when there is one) is subscribed."""
        checks = {"database": "ok", "ingest": "ok", "sweep": "ok"}
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (OSError, DBAPIError) as exc:
            checks["database"] = f"unavailable: {str(exc).splitlines()[0][:200]}"
        if not self.batcher.healthy:
            checks["ingest"] = "the last write failed"
        stale = self.registry_stale_seconds()
        if stale is not None:
            checks["sweep"] = f"no completed sweep for {stale:.0f} s"
        if amqp_consuming is not None:
            checks["amqp"] = "consuming" if amqp_consuming else "not consuming"
        return checks

    async def deregister(self, agent_id: UUID) -> bool:
        """Remove an agent from the registry, keeping its events (and adding one); whether
        it was registered."""
        async with self.sessions.begin() as session:
            was = await registry.delete_agent(session, agent_id=agent_id)
            if was is None:
                return False
            event = StatusEvent(agent_id, self.clock.now(), was, "deregistered", "deregistered")
            await registry.add_events(session, events=[event])
        return True

    def parse(self, raw: bytes) -> AgentMessage:
        """Validate raw bytes; a refusal is counted and raised as `RejectedMessage`."""
        try:
            return parse_message(raw, max_bytes=self.settings.max_message_bytes)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise

    def reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    def receive(self, message: AgentMessage) -> asyncio.Future[Outcome]:
        """Stamp receipt time now and queue; resolves once the write has committed."""
        return self.batcher.submit_nowait(Received(message, self.clock.now()))

    async def authenticate(
        self,
        message: AgentMessage,
        raw: bytes,
        *,
        bearer: str | None = None,
        signature: str | None = None,
    ) -> None:
        """Refuse (`RejectedMessage`, counted) a message its agent did not send, or one whose
        `sent_at` is outside the replay window. Exactly one of `bearer` (HTTP) and
        `signature` (AMQP, in-process) is checked: the bearer when given."""
        try:
            self._check_window(message)
            if bearer is not None or signature is None:
                await self.credentials.check_bearer(message.agent_id, bearer)
            else:
                await self.credentials.check_signature(message.agent_id, raw, signature)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise

    async def authenticate_bearer(self, agent_id: UUID, bearer: str | None) -> None:
        """Refuse (`RejectedMessage`, counted) a bearer that is not `agent_id`'s secret:
        checked before the HTTP body is read."""
        try:
            await self.credentials.check_bearer(agent_id, bearer)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise

    def check_window(self, message: AgentMessage) -> None:
        """Refuse (`RejectedMessage`, counted) a `sent_at` outside the replay window."""
        try:
            self._check_window(message)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise

    def _check_window(self, message: AgentMessage) -> None:
        skew = message.sent_at - self.clock.now()
        limit = timedelta(seconds=self.settings.max_clock_skew_seconds)
        if abs(skew) > limit:
            raise RejectedMessage(
                "clock_skew",
                f"sent_at is {skew.total_seconds():+.0f} s from the orchestrator's clock "
                f"(limit +-{limit.total_seconds():.0f} s)",
            )

    async def ingest(self, raw: bytes, *, signature: str | None = None) -> Outcome:
        """Parse and apply one message, waiting for its commit (tests, in-process agents).

        Without `signature` the caller is trusted (code in this process); with one, the
        message must be signed by its agent like one from RabbitMQ.
        """
        message = self.parse(raw)
        if signature is not None:
            await self.authenticate(message, raw, signature=signature)
        return await self.receive(message)


def _server_key(settings: OrchestratorSettings) -> bytes:
    """CHIFFON_SECRET_KEY, else a key for this process only (credentials die with it)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    log.debug("no CHIFFON_SECRET_KEY: agent credentials last only as long as this process")
    return secrets.token_bytes(32)
