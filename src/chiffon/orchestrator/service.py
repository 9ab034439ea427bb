"""The orchestrator's core, free of any web framework: ingest, sweep, queries."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from sqlalchemy import Row, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from chiffon.orchestrator import jobs
from chiffon.orchestrator.batcher import IngestBatcher
from chiffon.orchestrator.clock import Clock, SystemClock
from chiffon.orchestrator.credentials import CredentialStore
from chiffon.orchestrator.history import HistoryPruner, HistoryRecorder
from chiffon.orchestrator.ingest import Outcome, Received
from chiffon.orchestrator.liveness import Sweeper
from chiffon.orchestrator.longpoll import Bells, LongPolls, SharedReads
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.periodic import run_every
from chiffon.orchestrator.placement import Requirements, never_fits
from chiffon.orchestrator.scheduler import Dispatcher, could_ever_hold, requirements
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import jobs as jobs_repo
from chiffon.persistence import registry
from chiffon.persistence.credentials import credential_changes
from chiffon.persistence.db import check_schema, create_engine, session_factory
from chiffon.persistence.models import JobRow
from chiffon.persistence.registry import StatusEvent
from chiffon.schemas.heartbeat import AgentMessage, MessageKind, RejectedMessage, parse_message
from chiffon.schemas.dispatch import Report, Verdict
from chiffon.schemas.jobs import JobLog, JobSubmit
from chiffon.transport.auth import (
    IN_PROCESS,
    Bearer,
    Proof,
    ProofUnavailableError,
    Signature,
)
from chiffon.transport.orders import encode as encode_order

if TYPE_CHECKING:
    from chiffon.transport.rabbitmq.orders import OrderSender

log = logging.getLogger(__name__)
LOG_PRUNE_INTERVAL_SECONDS = 300.0
PUSHES_AT_ONCE = 4  # order pushes reading the database at once (Orchestrator._push)
HARDWARE_READ_SECONDS = 10.0  # a submission's "could any agent ever hold it" reads this old
CORE_POOL_SIZE = 4  # connections of ingest, the sweep and the scheduler (PostgreSQL)
READER_POOL_SIZE = 4  # connections of the job-log readers (and as many more at a burst)


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
        # Ingest, the offline sweep and the scheduler have connections of their own on
        # PostgreSQL, so that a burst of API requests (a thousand desktops reporting
        # at once) can never starve them: heartbeats unwritten for the pool's timeout
        # would have their desktops judged offline and their jobs lost.
        self._core_engine: AsyncEngine | None = None
        self.core_sessions = self.sessions
        if engine is None and self.engine.dialect.name == "postgresql":
            self._core_engine = create_engine(settings.effective_database_url,
                                              pool_size=CORE_POOL_SIZE, max_overflow=2)  # fmt: skip
            self.core_sessions = session_factory(self._core_engine)
        # Log readers too (both engines): a burst of followers woken at once, or reading
        # slowly, waits for its own connections, never for the ones of a submission, a
        # report or a heartbeat (on SQLite ingest shares the API's pool).
        self._reader_engine: AsyncEngine | None = None
        self.reader_sessions = self.sessions
        if engine is None and _file_or_server(self.engine):
            self._reader_engine = create_engine(settings.effective_database_url,
                                                pool_size=READER_POOL_SIZE,
                                                max_overflow=READER_POOL_SIZE)  # fmt: skip
            self.reader_sessions = session_factory(self._reader_engine)
        self.metrics = OrchestratorMetrics()
        self.batcher = IngestBatcher(
            self.core_sessions,
            self.metrics,
            max_batch=settings.ingest_batch_size,
            max_delay_seconds=settings.ingest_batch_delay_ms / 1000,
            # What went unwritten proves no silence: the sweep waits for the database.
            unavailable=lambda: self.sweeper.database_failed(),
        )
        self.receivers: list[Receiver] = list(_receivers_from(settings, self))
        self.sweeper = Sweeper(
            self.core_sessions,
            self.clock,
            self.metrics,
            timeout_seconds=settings.heartbeat_timeout_seconds,
            interval_seconds=settings.heartbeat_interval_seconds,
            hearing=self.hearing,
            went_offline=lambda: self.dispatcher.wake(),
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
        # Jobs: the loop placing queued jobs (docs/jobs.md).
        self.dispatcher = Dispatcher(self.core_sessions, self.clock, placed_on=self._tell,
                                     lost=self._log_changed,
                                     avoid_seconds=settings.preempt_avoid_seconds)  # fmt: skip
        # An agent's order long-poll waits on its bell: rung when this orchestrator places
        # or cancels there and, on PostgreSQL, at the database's notice (migration 0016).
        self._order_bells = Bells()
        self.order_notices = False  # whether those notices are heard now
        self.order_sender = _order_sender(settings)  # RabbitMQ: orders pushed to the agent
        self._pushes: set[asyncio.Task[None]] = set()
        self._pushing: set[UUID] = set()  # agents with a push waiting for its turn
        self._push_slots = asyncio.Semaphore(PUSHES_AT_ONCE)
        # A reader following a job's log waits on its bell, bounded per API token.
        self._log_bells = Bells()
        self._log_reads: SharedReads[JobLog | None] = SharedReads()
        self.long_polls = LongPolls(settings.long_polls_per_token)
        self._tasks: list[asyncio.Task[None]] = []
        self._hardware: Sequence[Row[Any]] = ()  # the registry as `could_ever_hold` reads it
        self._hardware_at = -math.inf
        self.sweeping = False
        self.closing = False  # a stop has begun: judge no one, hold no long-poll

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
            self._tasks.append(
                asyncio.create_task(
                    self.credentials.follow_changes(lambda: credential_changes(self.engine)),
                    name="chiffon-credential-changes",
                )
            )
            self._tasks.append(
                asyncio.create_task(self._follow_log_notices(), name="chiffon-log-notices")
            )
            self._tasks.append(
                asyncio.create_task(self._follow_order_notices(), name="chiffon-order-notices")
            )
        self.sweeping = sweep
        if sweep:
            self._tasks.append(
                asyncio.create_task(
                    self.sweeper.run(self.settings.sweep_interval_seconds), name="chiffon-sweep"
                )
            )
            if self.settings.dispatch:
                self._tasks.append(
                    asyncio.create_task(self.dispatcher.run(), name="chiffon-dispatch")
                )
                if self.engine.dialect.name == "postgresql":
                    self._tasks.append(
                        asyncio.create_task(self._follow_queue(), name="chiffon-queue-notices")
                    )
            self._tasks.append(
                asyncio.create_task(
                    run_every(LOG_PRUNE_INTERVAL_SECONDS, self.prune_job_logs, "pruning job logs"),
                    name="chiffon-log-prune",
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

    async def _follow_queue(self, *, retry_seconds: float = 1.0) -> None:
        """Wake the dispatcher at each notice that a job was queued or an attempt's claims
        were released, by any process on the registry (migration 0012), not only this
        one: a job submitted to an orchestrator that does not place (`--no-dispatch`), or
        that another orchestrator's agent finished making room for, is placed at once
        rather than at the next tick. While the notices cannot be heard, the tick (every
        second) still places."""
        while True:
            try:
                async with jobs_repo.queue_changes(self.engine) as changes:
                    async for _ in changes:
                        self.dispatcher.wake()
                    raise ConnectionError("the notices ended")
            except Exception as exc:  # the database is away: the tick places meanwhile
                log.debug("cannot listen for queue changes: %s", exc)
            await asyncio.sleep(retry_seconds)

    async def _follow_log_notices(self) -> None:
        """Ring a job's bell at each notice that its log changed (PostgreSQL), whichever
        orchestrator stored the chunk or ended the attempt. While it cannot listen, a
        follower hears this orchestrator's own changes, and another's at the end of its
        wait."""
        await self._ring_at_notices(jobs_repo.log_changes, self._log_bells, "job-log")

    async def _follow_order_notices(self) -> None:
        """Ring an agent's order bell at each notice that a job was placed on it or a
        cancel asked there (PostgreSQL, any orchestrator); while it cannot listen, a
        waiting poll asks again every second (`order_notices` says which)."""

        def hearing(now: bool) -> None:
            self.order_notices = now

        await self._ring_at_notices(jobs_repo.order_changes, self._order_bells, "order",
                                    hearing=hearing)  # fmt: skip

    async def _ring_at_notices(
        self,
        listen: Callable[[AsyncEngine], AbstractAsyncContextManager[AsyncIterator[str]]],
        bells: Bells,
        what: str,
        *,
        hearing: Callable[[bool], None] = lambda _: None,
        retry_seconds: float = 1.0,
    ) -> None:
        """Until cancelled: ring the bell each notice names. At each (re)connection every
        bell rings: a notice sent while this one was not listening is lost, so its
        waiters read once more. `hearing` is told when notices start and stop."""
        while True:
            try:
                async with listen(self.engine) as changes:
                    hearing(True)
                    bells.ring_all()
                    async for payload in changes:
                        _ring_named(bells, payload, what)
                    raise ConnectionError("the notices ended")
            except Exception as exc:  # the database is away: waiters fall back meanwhile
                log.debug("cannot listen for %s changes: %s", what, exc)
            finally:
                hearing(False)
            await asyncio.sleep(retry_seconds)

    def begin_stop(self) -> None:
        """A stop was asked (SIGTERM): from now on this process can no longer hear agents,
        so it judges no one silent and places nothing (another orchestrator, or this one
        restarted, does), and every long-poll answers at once so the server can close."""
        self.closing = True
        for task in self._tasks:
            if task.get_name() in ("chiffon-sweep", "chiffon-dispatch"):
                task.cancel()
        self._order_bells.ring_all()
        self._log_bells.ring_all()

    async def stop(self) -> None:
        """Receivers first (their messages in hand commit and are acked), then the loops,
        the last batch and the database. Long-polls still open answer now."""
        self.begin_stop()
        for receiver in self.receivers:
            await receiver.stop()
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.order_sender is not None:
            for push in list(self._pushes):
                push.cancel()
            await self.order_sender.close()
        await self.batcher.stop()
        await self.engine.dispose()
        for own in (self._core_engine, self._reader_engine):
            if own is not None:
                await own.dispose()

    def registry_stale_seconds(self) -> float | None:
        """Seconds since the offline sweep last completed, when it is behind (the database
        refuses writes, or no transport can hear): statuses are then not being kept, and the
        API and dashboard say so. None while sweeps complete, or when this process does not
        sweep."""
        if not self.sweeping:
            return None
        return self.sweeper.stale_seconds(self.settings.sweep_interval_seconds)

    async def readiness(self) -> dict[str, str]:
        """What `/readyz` reports, one entry per check; ready when every one says "ok" or
        "hearing": the database answers, the last ingest write committed, the sweep keeps
        up, and every receiver hears its agents."""
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
        for receiver in self.receivers:
            checks[receiver.name] = "hearing" if receiver.hearing else "not hearing"
        return checks

    async def submit_job(
        self, spec: JobSubmit, *, idempotency_key: str | None = None
    ) -> tuple[UUID, str | None]:
        """Queue a job and wake the dispatcher; with a warning when no registered agent
        could ever hold it (it is kept: a bigger desktop may join). A key given in the
        last day returns its job and creates none (`jobs.submit`)."""
        job_id = await jobs.submit(
            self.sessions, spec, now=self.clock.now(), idempotency_key=idempotency_key
        )
        self.dispatcher.wake()
        want = requirements(spec.model_dump(mode="json"))
        return job_id, None if await self._could_ever_hold(want) else never_fits(want)

    async def _could_ever_hold(self, want: Requirements) -> bool:
        """`could_ever_hold` against the registry as read at most `HARDWARE_READ_SECONDS`
        ago (a full read at 10,000 agents costs more than the submission), and against a
        fresh read when that says no: a desktop that could may have just joined."""
        if time.monotonic() - self._hardware_at < HARDWARE_READ_SECONDS and could_ever_hold(
            want, self._hardware
        ):
            return True
        async with self.sessions() as session:
            self._hardware = await jobs_repo.agent_rows(session)
        self._hardware_at = time.monotonic()
        return could_ever_hold(want, self._hardware)

    async def cancel_job(self, job_id: UUID) -> str | None:
        """`jobs.cancel`, and the agent running it is told at once (a queued job's log
        followers too: it is over)."""
        state = await jobs.cancel(self.sessions, job_id, now=self.clock.now())
        if state is not None:
            self._log_changed(job_id)
        if state in ("assigned", "running"):
            async with self.sessions() as session:
                job = await session.get(JobRow, job_id)
            if job is not None and job.agent_id is not None:
                self._tell(job.agent_id)
        return state

    def _tell(self, agent_id: UUID) -> None:
        """There may be an order for `agent_id`: wake its long-poll, and over RabbitMQ
        push what it must be told to its queue."""
        self._order_bells.ring(agent_id)
        if self.order_sender is not None and not self.closing and agent_id not in self._pushing:
            self._pushing.add(agent_id)  # one push an agent at a time: it says all that is due
            push = asyncio.create_task(self._push(agent_id), name="chiffon-push-orders")
            self._pushes.add(push)
            push.add_done_callback(self._pushes.discard)

    async def _push(self, agent_id: UUID) -> None:
        """Push what `agent_id` must be told. At most `PUSHES_AT_ONCE` read the database at
        once, so that a pass placing thousands of jobs leaves the connection pool to
        ingest and the API."""
        assert self.order_sender is not None
        try:
            async with self._push_slots:
                self._pushing.discard(agent_id)  # a placement from now on pushes again
                orders = await self.orders_for(agent_id)
        except Exception as exc:  # the database is away: the agent's own poll finds them
            log.warning("orders for %s not pushed: %s", agent_id, exc)
            return
        finally:
            self._pushing.discard(agent_id)
        if orders:
            await self.order_sender.send(agent_id, orders)

    async def wait_orders(self, agent_id: UUID, *, wait_seconds: float) -> list[tuple[bytes, str]]:
        """`orders_for`, waiting up to `wait_seconds` for one when there is none, asking
        the database nothing meanwhile: woken by the agent's bell (this orchestrator's
        placements and cancels, and on PostgreSQL every orchestrator's, by notice). Where
        notices are not heard (SQLite, a lost listening connection) it asks again every
        second, for what another orchestrator sharing the database decided."""
        deadline = time.monotonic() + min(wait_seconds, self.settings.long_poll_max_seconds)
        bell = self._order_bells.bell(agent_id)
        while True:
            seen = bell.rings
            orders = await self.orders_for(agent_id)
            left = deadline - time.monotonic()
            if orders or left <= 0 or self.closing:
                return orders
            await bell.wait(seen, left if self.order_notices else min(left, 1.0))

    async def report_attempt(
        self, agent_id: UUID, job_id: UUID, attempt: int, said: Report
    ) -> Verdict:
        """An agent's report of one attempt; an end frees capacity, so the dispatcher runs."""
        verdict = await jobs.report(
            self.sessions, agent_id=agent_id, job_id=job_id, attempt=attempt, said=said,
            now=self.clock.now(),
        )  # fmt: skip
        if verdict == "applied" and said.kind == "ended":
            self.dispatcher.wake()
            self._log_changed(job_id)
        return verdict

    async def ship_log(
        self, agent_id: UUID, job_id: UUID, attempt: int, offset: int, data: bytes
    ) -> Verdict:
        """A chunk of an attempt's output from its agent; readers following it wake."""
        verdict = await jobs.ship_log(
            self.sessions, agent_id=agent_id, job_id=job_id, attempt=attempt, offset=offset,
            data=data, tail_bytes=self.settings.job_log_tail_bytes,
        )  # fmt: skip
        if verdict == "applied":
            self._log_changed(job_id)
        return verdict

    async def read_log(
        self, job_id: UUID, *, attempt: int | None, offset: int, limit: int, wait_seconds: float
    ) -> JobLog | None:
        """Output of the job's attempt (its current one by default) from `offset`; when
        there is none yet and the attempt still runs, wait up to `wait_seconds` for some.
        Waiting asks the database nothing: the job's bell wakes it (a chunk, the attempt's
        end, a cancel; on PostgreSQL from any orchestrator), and then it reads again, one
        read for all the followers asking the same. Reads go through connections of their
        own (`READER_POOL_SIZE`). None when there is no such job."""
        deadline = time.monotonic() + min(wait_seconds, self.settings.long_poll_max_seconds)
        bell = self._log_bells.bell(job_id)
        key = (job_id, attempt, offset, limit)
        read = partial(self._read_log_once, job_id, attempt, offset, limit)
        while True:
            seen, log = await self._log_reads.read(key, bell, read)
            left = deadline - time.monotonic()
            if log is None or log.data or log.done or left <= 0 or self.closing:
                return log
            await bell.wait(seen, left)

    async def _read_log_once(
        self, job_id: UUID, attempt: int | None, offset: int, limit: int
    ) -> JobLog | None:
        async with self.reader_sessions() as session:
            return await jobs.log_piece(
                session, job_id=job_id, attempt=attempt, offset=offset, limit=limit
            )

    def _log_changed(self, job_id: UUID) -> None:
        """This orchestrator committed a change to the job's log: its followers here read
        again (on PostgreSQL the notice of it wakes those of every orchestrator)."""
        self._log_bells.ring(job_id)

    async def prune_job_logs(self) -> int:
        """Drop the logs of jobs that ended longer ago than the retention (and forget the
        idempotency keys older than a day)."""
        await jobs.forget_idempotency_keys(self.sessions, now=self.clock.now())
        cutoff = self.clock.now() - timedelta(seconds=self.settings.job_log_retention_seconds)
        async with self.sessions.begin() as session:
            return await jobs_repo.prune_logs(session, ended_before=cutoff)

    async def orders_for(self, agent_id: UUID) -> list[tuple[bytes, str]]:
        """What `agent_id` must be told now, each order signed with its own key (jobs,
        the long-poll and the RabbitMQ push carry them)."""
        orders = await jobs.pending_orders(self.sessions, agent_id=agent_id, now=self.clock.now())
        if not orders:
            return []
        key = await self.credentials.order_key(agent_id)
        return [encode_order(order, key) for order in orders]

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

    def reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    def receive(self, message: AgentMessage) -> asyncio.Future[Outcome]:
        """Stamp receipt time now and queue; resolves once the write has committed. A
        goodbye (`offline`) wakes the dispatcher once written: that agent's jobs are
        placed again now."""
        done = self.batcher.submit_nowait(Received(message, self.clock.now()))
        if message.kind == "offline":
            done.add_done_callback(lambda _: self.dispatcher.wake())
        return done

    async def check_bearer(self, agent_id: UUID, bearer: str | None) -> None:
        """Refuse (`RejectedMessage`, counted) a bearer that is not `agent_id`'s secret:
        the HTTP path checks it before it reads a byte of the body, then admits the body
        with `Bearer(agent_id)`."""
        try:
            await self.credentials.check_bearer(agent_id, bearer)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise
        except (OSError, DBAPIError):  # the registry is away: this beat goes unwritten
            self.sweeper.database_failed()
            raise

    async def admit(
        self, raw: bytes, proof: Proof, *, kind: MessageKind | None = None
    ) -> AgentMessage:
        """The one way a message gets in, whatever carried it: parse, check its proof and
        its send time. A refusal is counted here, once, and raised as `RejectedMessage`
        (each transport maps it to its own protocol); `ProofUnavailableError` when the
        credentials could not be read (the registry is down: not the message's fault).

        `proof`: `Bearer(agent_id)`, a bearer secret the transport already checked for that
        agent (the message must be that agent's, and of `kind` when given); `Signature`,
        the HMAC header to check against the body; `IN_PROCESS`, code in this process.
        """
        try:
            message = parse_message(raw, max_bytes=self.settings.max_message_bytes)
            if isinstance(proof, Bearer):
                _check_path(message, proof.agent_id, kind)
            if proof is not IN_PROCESS:  # a replay window against the outside only
                self._check_window(message)
            if isinstance(proof, Signature):
                await self.credentials.check_signature(message.agent_id, raw, proof.value)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise
        except (OSError, DBAPIError) as exc:
            self.sweeper.database_failed()
            raise ProofUnavailableError(str(exc)) from exc
        return message

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
        """Admit and apply one message, waiting for its commit (tests, in-process agents).

        Without `signature` the caller is trusted (code in this process); with one, the
        message must be signed by its agent like one from RabbitMQ.
        """
        proof: Proof = IN_PROCESS if signature is None else Signature(signature)
        return await self.receive(await self.admit(raw, proof))


def _file_or_server(engine: AsyncEngine) -> bool:
    """Whether a second engine on the same URL reaches the same database (not so for an
    in-memory SQLite one)."""
    return engine.dialect.name != "sqlite" or engine.url.database not in (None, "", ":memory:")


def _check_path(message: AgentMessage, agent_id: UUID, kind: MessageKind | None) -> None:
    if message.agent_id != agent_id or (kind is not None and message.kind != kind):
        raise RejectedMessage(
            "path_mismatch",
            f"body is a {message.kind} of agent {message.agent_id}, "
            f"the path a {kind or message.kind} of {agent_id}",
        )


class Receiver(Protocol):
    """A transport bringing agents' messages in, owned by the orchestrator."""

    name: str

    @property
    def hearing(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _order_sender(settings: OrchestratorSettings) -> OrderSender | None:
    if not settings.amqp_url:
        return None
    from chiffon.transport.rabbitmq.orders import OrderSender

    return OrderSender(settings.amqp_url, exchange=settings.amqp_exchange)


def _receivers_from(settings: OrchestratorSettings, target: Orchestrator) -> list[Receiver]:
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


def _ring_named(bells: Bells, payload: str, what: str) -> None:
    """Ring the bell a notice names (a UUID); a payload that names none is someone else's
    NOTIFY on the channel."""
    try:
        bells.ring(UUID(payload))
    except ValueError:
        log.debug("%s notice that names nothing: %r", what, payload[:100])
