"""The orchestrator's core, free of any web framework: its parts, wired and run.

`Orchestrator` builds the parts and hands them out: `admission` (agents' messages in,
for every transport), the ingest `batcher`, the offline `sweeper`, the `dispatcher`
placing queued jobs, the jobs `desk` (submissions, cancels, reports, log followers),
order delivery (`orders`: long-poll and push), `credentials`, and the history's
`recorder` and `pruner`. It starts and stops them together; its methods that the API
routes call pass through to the part that answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from contextlib import suppress
from functools import partial
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from chiffon.orchestrator.admission import Admission
from chiffon.orchestrator.batcher import IngestBatcher
from chiffon.orchestrator.clock import Clock, SystemClock
from chiffon.orchestrator.credentials import CredentialStore
from chiffon.orchestrator.delivery import OrderPost
from chiffon.orchestrator.desk import JobDesk
from chiffon.orchestrator.history import HistoryPruner, HistoryRecorder
from chiffon.orchestrator.ingest import Outcome
from chiffon.orchestrator.liveness import Sweeper
from chiffon.orchestrator.longpoll import LongPolls, follow_notices
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.periodic import run_every
from chiffon.orchestrator.readiness import readiness
from chiffon.orchestrator.scheduler import Dispatcher
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.orchestrator.store import BlobStore
from chiffon.persistence import jobs as jobs_repo
from chiffon.persistence import registry
from chiffon.persistence.credentials import credential_changes
from chiffon.persistence.db import check_schema, create_engine, session_factory
from chiffon.persistence.registry import StatusEvent
from chiffon.schemas.dispatch import Report, Verdict
from chiffon.schemas.heartbeat import AgentMessage, MessageKind
from chiffon.schemas.jobs import JobLog, JobSubmit
from chiffon.transport.auth import Proof
from chiffon.transport.base import OrderPush, Receiver, SignedOrder

log = logging.getLogger(__name__)
LOG_PRUNE_INTERVAL_SECONDS = 300.0
CORE_POOL_SIZE = 4  # connections of ingest, the sweep and the scheduler (PostgreSQL)
READER_POOL_SIZE = 4  # connections of the job-log readers (and as many more at a burst)


class Engines:
    """The orchestrator's database engines. `sessions` serve the API. On PostgreSQL,
    ingest, the offline sweep and the scheduler have connections of their own
    (`core_sessions`), so that a burst of API requests (a thousand desktops reporting at
    once) can never starve them: heartbeats unwritten for the pool's timeout would have
    their desktops judged offline and their jobs lost. Log readers too, on both engines
    (`reader_sessions`): a burst of followers woken at once, or reading slowly, waits for
    its own connections, never for the ones of a submission, a report or a heartbeat (on
    SQLite ingest shares the API's pool). A given `engine` serves all three."""

    def __init__(self, url: str, engine: AsyncEngine | None = None) -> None:
        self.main = engine or create_engine(url)
        self.sessions = self.core_sessions = self.reader_sessions = session_factory(self.main)
        self._own: list[AsyncEngine] = []
        if engine is None and self.main.dialect.name == "postgresql":
            core = create_engine(url, pool_size=CORE_POOL_SIZE, max_overflow=2)
            self.core_sessions = session_factory(core)
            self._own.append(core)
        if engine is None and _file_or_server(self.main):
            reader = create_engine(url, pool_size=READER_POOL_SIZE, max_overflow=READER_POOL_SIZE)
            self.reader_sessions = session_factory(reader)
            self._own.append(reader)

    async def dispose(self) -> None:
        for engine in (self.main, *self._own):
            await engine.dispose()


class Orchestrator:
    """Owns the database engines and the parts, and starts and stops them.

    Transports hand raw bytes (or parsed messages) to `admission`; the API reads through
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
        self.clock = clock = clock or SystemClock()
        self.engines = Engines(settings.effective_database_url, engine)
        self.engine, self.sessions = self.engines.main, self.engines.sessions
        core = self.engines.core_sessions
        self.metrics = OrchestratorMetrics()
        self.batcher = IngestBatcher(
            core, self.metrics, max_batch=settings.ingest_batch_size,
            max_delay_seconds=settings.ingest_batch_delay_ms / 1000,
            # What went unwritten proves no silence: the sweep waits for the database.
            unavailable=lambda: self.sweeper.database_failed(),
        )  # fmt: skip
        self.sweeper = Sweeper(
            core, clock, self.metrics, timeout_seconds=settings.heartbeat_timeout_seconds,
            interval_seconds=settings.heartbeat_interval_seconds, hearing=self.hearing,
            went_offline=lambda: self.dispatcher.wake(),
        )  # fmt: skip
        self.credentials = CredentialStore(
            self.sessions, clock, _server_key(settings),
            cache_seconds=settings.credential_cache_seconds,
        )  # fmt: skip
        self.admission = Admission(
            self.batcher, self.credentials, clock, self.metrics, settings,
            database_failed=self.sweeper.database_failed,
            went_offline=lambda: self.dispatcher.wake(),
        )  # fmt: skip
        self.receivers: list[Receiver] = list(_receivers_from(settings, self.admission))
        self.recorder = HistoryRecorder(
            self.sessions, clock, self.metrics, settings.history_tiers,
            heard_within_seconds=settings.heartbeat_timeout_seconds,
        )  # fmt: skip
        self.pruner = HistoryPruner(self.sessions, clock, settings.history_tiers)
        self.orders = OrderPost(self.sessions, clock, self.credentials.order_key,
                                long_poll_max_seconds=settings.long_poll_max_seconds,
                                push=_order_push(settings))  # fmt: skip
        self.desk = JobDesk(self.sessions, self.engines.reader_sessions, clock, settings,
                            wake=lambda: self.dispatcher.wake(), orders=self.orders)  # fmt: skip
        # Jobs: the loop placing queued jobs (docs/jobs.md).
        self.dispatcher = Dispatcher(core, clock, placed_on=self.orders.tell,
                                     lost=self.desk.log_changed,
                                     avoid_seconds=settings.preempt_avoid_seconds)  # fmt: skip
        self.store = BlobStore(self.sessions, clock,
                               folder=settings.blob_folder(self.engine.dialect.name),
                               max_bytes=int(settings.store_max_gb * 1e9),
                               retention_seconds=settings.store_retention_seconds)  # fmt: skip
        self.long_polls = LongPolls(settings.long_polls_per_token)  # log followers per token
        self._tasks: list[asyncio.Task[None]] = []
        self.sweeping = False

    def add_receiver(self, receiver: Receiver) -> None:
        """A transport that brings agents' messages in (RabbitMQ; HTTP is the API itself):
        started and stopped with the orchestrator, and asked at every sweep and by
        `/readyz` whether it is hearing."""
        self.receivers.append(receiver)

    def hearing(self) -> bool:
        return all(receiver.hearing for receiver in self.receivers)

    async def start(self, *, sweep: bool = True) -> None:
        """Refuse a stale schema, then start ingest, the receivers and (optionally) the
        periodic tasks."""
        await check_schema(self.engine)
        self.batcher.start()
        for receiver in self.receivers:
            await receiver.start()
        self.sweeper.grant_grace()
        if self.engine.dialect.name == "postgresql":
            credentials = partial(credential_changes, self.engine)
            self._spawn("chiffon-credential-changes", self.credentials.follow_changes(credentials))
            self._spawn("chiffon-log-notices", self.desk.follow_log_notices(self.engine))
            self._spawn("chiffon-order-notices", self.orders.follow_notices(self.engine))
        self.sweeping = sweep
        if sweep:
            self._start_chores()

    def _start_chores(self) -> None:
        """The periodic tasks: the sweep, the dispatcher (and, on PostgreSQL, its waking
        at every process's queue notices: migration 0012), pruning and history."""
        settings = self.settings
        self._spawn("chiffon-sweep", self.sweeper.run(settings.sweep_interval_seconds))
        if settings.dispatch:
            self._spawn("chiffon-dispatch", self.dispatcher.run())
            if self.engine.dialect.name == "postgresql":
                self._spawn("chiffon-queue-notices", self._follow_queue())
        prune = run_every(LOG_PRUNE_INTERVAL_SECONDS, self.prune_job_logs, "pruning job logs")
        self._spawn("chiffon-log-prune", prune)
        collect = run_every(LOG_PRUNE_INTERVAL_SECONDS, self.store.collect, "collecting blobs")
        self._spawn("chiffon-blob-collect", collect)
        if self.recorder.tiers:
            self._spawn("chiffon-history-record", self.recorder.run())
            self._spawn("chiffon-history-prune",
                        self.pruner.run(settings.history_prune_interval_seconds))  # fmt: skip

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(work, name=name))

    async def _follow_queue(self) -> None:
        """Wake the dispatcher at each notice that a job was queued or an attempt's claims
        were released, by any process on the registry (migration 0012), not only this
        one: a job submitted to an orchestrator that does not place (`--no-dispatch`), or
        that another orchestrator's agent finished making room for, is placed at once
        rather than at the next tick. While the notices cannot be heard, the tick (every
        second) still places."""
        await follow_notices(partial(jobs_repo.queue_changes, self.engine),
                             lambda _: self.dispatcher.wake(), "queue")  # fmt: skip

    def begin_stop(self) -> None:
        """A stop was asked (SIGTERM): from now on this process can no longer hear agents,
        so it judges no one silent and places nothing (another orchestrator, or this one
        restarted, does), and every long-poll answers at once so the server can close."""
        for task in self._tasks:
            if task.get_name() in ("chiffon-sweep", "chiffon-dispatch"):
                task.cancel()
        self.orders.close()
        self.desk.close()

    async def stop(self) -> None:
        """Receivers first (their messages in hand commit and are acked), then the loops,
        the pushes, the last batch and the database. Long-polls still open answer now."""
        self.begin_stop()
        for receiver in self.receivers:
            await receiver.stop()
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.orders.stop()
        await self.batcher.stop()
        await self.engines.dispose()

    def registry_stale_seconds(self) -> float | None:
        """Seconds since the offline sweep last completed, when it is behind (the database
        refuses writes, or no transport can hear): statuses are then not being kept, and the
        API and dashboard say so. None while sweeps complete, or when this process does not
        sweep."""
        if not self.sweeping:
            return None
        return self.sweeper.stale_seconds(self.settings.sweep_interval_seconds)

    async def readiness(self) -> dict[str, str]:
        """What `/readyz` reports (`readiness.readiness`)."""
        return await readiness(self.engine, ingest_healthy=self.batcher.healthy,
                               stale_seconds=self.registry_stale_seconds(),
                               receivers=self.receivers)  # fmt: skip

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

    # What the API routes call, passed through to the part that answers.

    def reject(self, reason: str) -> None:
        self.admission.reject(reason)

    def receive(self, message: AgentMessage) -> asyncio.Future[Outcome]:
        return self.admission.receive(message)

    async def check_bearer(self, agent_id: UUID, bearer: str | None) -> None:
        await self.admission.check_bearer(agent_id, bearer)

    async def admit(
        self, raw: bytes, proof: Proof, *, kind: MessageKind | None = None
    ) -> AgentMessage:
        return await self.admission.admit(raw, proof, kind=kind)

    async def ingest(self, raw: bytes, *, signature: str | None = None) -> Outcome:
        return await self.admission.ingest(raw, signature=signature)

    async def submit_job(
        self, spec: JobSubmit, *, idempotency_key: str | None = None
    ) -> tuple[UUID, str | None]:
        return await self.desk.submit_job(spec, idempotency_key=idempotency_key)

    async def cancel_job(self, job_id: UUID) -> str | None:
        return await self.desk.cancel_job(job_id)

    async def report_attempt(
        self, agent_id: UUID, job_id: UUID, attempt: int, said: Report
    ) -> Verdict:
        return await self.desk.report_attempt(agent_id, job_id, attempt, said)

    async def ship_log(
        self, agent_id: UUID, job_id: UUID, attempt: int, offset: int, data: bytes
    ) -> Verdict:
        return await self.desk.ship_log(agent_id, job_id, attempt, offset, data)

    async def read_log(
        self, job_id: UUID, *, attempt: int | None, offset: int, limit: int, wait_seconds: float
    ) -> JobLog | None:
        return await self.desk.read_log(job_id, attempt=attempt, offset=offset, limit=limit,
                                        wait_seconds=wait_seconds)  # fmt: skip

    async def prune_job_logs(self) -> int:
        return await self.desk.prune_job_logs()

    async def orders_for(self, agent_id: UUID) -> list[SignedOrder]:
        return await self.orders.orders_for(agent_id)

    async def wait_orders(self, agent_id: UUID, *, wait_seconds: float) -> list[SignedOrder]:
        return await self.orders.wait_orders(agent_id, wait_seconds=wait_seconds)


def _file_or_server(engine: AsyncEngine) -> bool:
    """Whether a second engine on the same URL reaches the same database (not so for an
    in-memory SQLite one)."""
    return engine.dialect.name != "sqlite" or engine.url.database not in (None, "", ":memory:")


def _order_push(settings: OrchestratorSettings) -> OrderPush | None:
    """RabbitMQ with `CHIFFON_AMQP_URL`: orders pushed to the agent's queue."""
    if not settings.amqp_url:
        return None
    from chiffon.transport.rabbitmq.orders import OrderSender

    return OrderSender(settings.amqp_url, exchange=settings.amqp_exchange)


def _receivers_from(settings: OrchestratorSettings, target: Admission) -> list[Receiver]:
    """The receivers the settings ask for: RabbitMQ with `CHIFFON_AMQP_URL` (HTTP is the
    API, always there)."""
    if not settings.amqp_url:
        return []
    # aio-pika, on demand
    from chiffon.transport.rabbitmq.consumer import RabbitConsumer
    from chiffon.transport.rabbitmq.topology import Topology

    topology = Topology(
        exchange=settings.amqp_exchange,
        queue=settings.amqp_queue,
        rejected_queue=settings.amqp_rejected_queue,
        max_length=settings.amqp_queue_max_length,
        rejected_max_length=settings.amqp_rejected_max_length,
        rejected_max_bytes=settings.amqp_rejected_max_bytes,
    )
    return [
        RabbitConsumer(
            settings.amqp_url, target, topology=topology, prefetch=settings.amqp_prefetch
        )
    ]


def _server_key(settings: OrchestratorSettings) -> bytes:
    """CHIFFON_SECRET_KEY, else a key for this process only (credentials die with it)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    log.debug("no CHIFFON_SECRET_KEY: agent credentials last only as long as this process")
    return secrets.token_bytes(32)
