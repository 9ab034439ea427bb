"""The orchestrator's side: consume the shared queue, admit, ack after commit."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from chiffon.backoff import Backoff, describe, retry
from chiffon.schemas.limits import RejectedMessage
from chiffon.transport.auth import SIGNATURE_HEADER, Proof, ProofUnavailableError, Signature
from chiffon.transport.rabbitmq.acks import AckWindow
from chiffon.transport.rabbitmq.topology import (
    BINDING_KEY,
    REJECT_BYTES_HEADER,
    REJECT_DETAIL_HEADER,
    REJECT_REASON_HEADER,
    Topology,
    agent_events_arguments,
    close_quietly,
    declare_exchange,
    declare_queue,
    rejected_arguments,
)

if TYPE_CHECKING:
    from chiffon.schemas.heartbeat import AgentMessage

log = logging.getLogger(__name__)


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class ConsumerMetrics(Protocol):
    @property
    def amqp_connected(self) -> _Gauge: ...

    @property
    def amqp_reconnects(self) -> _Counter: ...

    @property
    def amqp_requeued(self) -> _Counter: ...


class IngestTarget(Protocol):
    """What the consumer needs from the orchestrator (`Orchestrator` fits)."""

    @property
    def metrics(self) -> ConsumerMetrics: ...

    def reject(self, reason: str) -> None: ...

    async def admit(self, raw: bytes, proof: Proof) -> AgentMessage: ...

    def receive(self, message: AgentMessage) -> asyncio.Future[Any]: ...


class Delivery:
    """One delivery as aiormq hands it over, with what the consumer reads of it.

    The consumer subscribes on aiormq's channel under aio-pika's robust one: aio-pika's
    `IncomingMessage` and the second task it starts for each message cost ~15% of the
    orchestrator's CPU per heartbeat (docs/performance.md, item 20).
    """

    __slots__ = ("_message", "body", "channel", "delivery_tag")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._message = message
        self.body = message.body
        self.channel = message.channel
        tag = getattr(message.delivery, "delivery_tag", None)
        self.delivery_tag: int = tag if isinstance(tag, int) else 0

    @property
    def headers(self) -> dict[str, Any]:
        return self._message.header.properties.headers or {}

    @property
    def content_type(self) -> str | None:
        return self._message.header.properties.content_type

    @property
    def routing_key(self) -> str:
        return self._message.routing_key or ""


class State(enum.Enum):
    """Where a `RabbitConsumer` is. It moves only along `MOVES`, in `RabbitConsumer._to`."""

    STOPPED = "stopped"  # not started, or stopped: holds no connection
    CONNECTING = "connecting"  # the first connection, retried with backoff
    CONSUMING = "consuming"  # subscribed to its queue: hearing agents
    LOST = "lost"  # the connection dropped, or a reconnect left it unsubscribed
    PAUSED = "paused"  # a write failed: no deliveries taken until the backoff ends
    STOPPING = "stopping"  # unsubscribed; what is in hand commits and is acked, then close


MOVES: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.CONNECTING}),
    State.CONNECTING: frozenset({State.CONSUMING, State.STOPPING}),
    # the watchdog finds the subscription gone; a write fails; stop()
    State.CONSUMING: frozenset({State.LOST, State.PAUSED, State.STOPPING}),
    # the watchdog (or a reconnect) subscribed again; a write of a message in hand fails
    State.LOST: frozenset({State.CONSUMING, State.PAUSED, State.STOPPING}),
    # the backoff ended: subscribed again, or that failed and the watchdog takes over
    State.PAUSED: frozenset({State.CONSUMING, State.LOST, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
}


class RabbitConsumer:
    """Feeds agent messages from the shared queue into the orchestrator, acking after commit.

    `start()` returns at once and connects in the background, retrying with backoff until
    the broker answers, so the API serves while RabbitMQ is down. Each delivery is checked
    in its own task (aiormq's) and handed to the batcher, so hundreds are in flight and go
    into one transaction; each is acked only when its write committed (acks of one commit
    travel as one frame, `AckWindow`), or nacked with requeue when the write failed, which
    also pauses consuming for a backoff. A watchdog re-consumes
    when a reconnect left the queue without this consumer. `stop()` cancels the consumer,
    lets the messages in hand commit and ack, then closes. `state` says which of these it is
    doing (`State`, `MOVES`).
    """

    def __init__(
        self,
        amqp_url: str,
        target: IngestTarget,
        *,
        topology: Topology | None = None,
        prefetch: int = 2000,
        backoff: Backoff | None = None,
        reconnect_interval_seconds: float = 1.0,
        watchdog_interval_seconds: float = 2.0,
        connect_timeout_seconds: float = 5.0,
    ) -> None:
        self._url = amqp_url
        self._target = target
        self.topology = topology or Topology()
        self._prefetch = prefetch
        self._backoff = backoff or Backoff()
        self._reconnect_interval = reconnect_interval_seconds
        self._watchdog_interval = watchdog_interval_seconds
        self._connect_timeout = connect_timeout_seconds
        # Strong references: a robust connection restores only objects still referenced.
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._rejected: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._consumer_channel: aiormq.abc.AbstractChannel | None = None  # where it is
        self._task: asyncio.Task[None] | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()  # deliveries not settled yet
        self._acks: dict[Any, AckWindow] = {}  # by aiormq channel: delivery tags are per channel
        self._tasks: set[asyncio.Task[None]] = set()  # our own background chores
        self._checking = asyncio.Lock()
        self._failures = 0
        self._state = State.STOPPED
        self._subscribed = asyncio.Event()  # set while CONSUMING
        self.consumed = 0

    name = "amqp"  # as a receiver of the orchestrator (`/readyz`)

    @property
    def hearing(self) -> bool:
        """As a receiver: subscribed to its queue."""
        return self.consuming

    @property
    def state(self) -> State:
        return self._state

    @property
    def consuming(self) -> bool:
        """Subscribed, on a channel still open (it closes under us before the watchdog
        notices): what `/readyz` reports."""
        return (
            self._state is State.CONSUMING
            and self._channel is not None
            and not self._channel.is_closed
            and self._consumer_tag is not None
        )

    def _to(self, state: State) -> bool:
        """Move to `state` when `MOVES` allows it; False (and no move) otherwise, as when a
        subscription made by a chore completes after `stop()` began."""
        if state not in MOVES[self._state]:
            log.debug("AMQP consumer: no move from %s to %s", self._state.value, state.value)
            return False
        log.debug("AMQP consumer: %s -> %s", self._state.value, state.value)
        self._state = state
        if state is State.CONSUMING:
            self._subscribed.set()
        else:
            self._subscribed.clear()
        return True

    async def start(self) -> None:
        if self._to(State.CONNECTING):
            self._task = asyncio.create_task(self._run(), name="chiffon-amqp-consumer")

    async def wait_consuming(self, timeout_seconds: float) -> None:
        """Wait until subscribed (tests, and callers that want to know)."""
        async with asyncio.timeout(timeout_seconds):
            while not self.consuming:
                await self._subscribed.wait()
                if not self.consuming:  # its channel closed; the watchdog will see to it
                    await asyncio.sleep(0.05)

    async def stop(self, *, drain_timeout_seconds: float = 10.0) -> None:
        """Stop consuming, let in-flight messages commit and ack, then close."""
        if self._state is State.STOPPED:
            return
        self._to(State.STOPPING)
        if self._resume is not None:
            self._resume.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._cancel_consumer()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=drain_timeout_seconds)
        await self.flush_acks()
        connection, self._connection = self._connection, None
        self._channel = self._queue = self._rejected = None
        self._target.metrics.amqp_connected.set(0)
        await close_quietly(connection)
        self._to(State.STOPPED)

    # -- connection and topology

    async def _run(self) -> None:
        self._connection = await retry(
            "connecting to the AMQP broker", self._connect_once, backoff=self._backoff
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        while True:
            await asyncio.sleep(self._watchdog_interval)
            await self._watchdog()

    async def _connect_once(self) -> aio_pika.abc.AbstractRobustConnection:
        connection = await aio_pika.connect_robust(
            self._url,
            timeout=self._connect_timeout,
            reconnect_interval=self._reconnect_interval,
        )
        try:
            await self._declare_and_consume(connection)
        except BaseException:
            await close_quietly(connection)
            raise
        log.info("consuming %s on %s", self.topology.queue, connection)
        return connection

    async def _declare_and_consume(self, connection: AbstractConnection) -> None:
        top = self.topology
        channel = await connection.channel(publisher_confirms=True)
        rejected_args = rejected_arguments(
            max_length=top.rejected_max_length, max_bytes=top.rejected_max_bytes
        )
        channel, _ = await declare_queue(connection, channel, top.rejected_queue, rejected_args)
        events_args = agent_events_arguments(max_length=top.max_length)
        channel, queue = await declare_queue(connection, channel, top.queue, events_args)
        await channel.set_qos(prefetch_count=self._prefetch)
        exchange = await declare_exchange(channel, top.exchange)
        await queue.bind(exchange, BINDING_KEY)
        self._channel, self._queue, self._rejected = channel, queue, channel.default_exchange
        # On aiormq's channel, not `queue.consume`: see `Delivery`. The robust connection
        # does not restore such a consumer; `_on_reconnect` and the watchdog subscribe again.
        underlay = await channel.get_underlay_channel()
        consumed = await underlay.basic_consume(top.queue, self._on_delivery)
        self._consumer_channel, self._consumer_tag = underlay, consumed.consumer_tag
        if not self._to(State.CONSUMING):  # stop() began meanwhile: take nothing more
            await self._cancel_consumer()
            return
        self._target.metrics.amqp_connected.set(1)

    def _on_reconnect(self, *_args: Any) -> None:
        log.warning("reconnected to the AMQP broker")
        self._target.metrics.amqp_reconnects.inc()
        if self._state not in (State.STOPPING, State.STOPPED):
            self._spawn(self._watchdog())  # channels are restored by now; the consumer is not

    async def _watchdog(self) -> None:
        """Re-subscribe when a reconnect left our channel without its consumer."""
        async with self._checking:  # the timer's and a reconnect's check, one at a time
            connection = self._connection
            healthy = await self._has_consumer()
            self._target.metrics.amqp_connected.set(1 if healthy else 0)
            if healthy or self._state not in (State.CONSUMING, State.LOST):
                return  # paused on purpose, or not yet (or no longer) running
            if self._state is State.CONSUMING and self._to(State.LOST):
                log.warning("the AMQP consumer lost its subscription; subscribing again")
            if connection is None or connection.is_closed:
                return  # the robust connection reconnects, then calls `_on_reconnect`
            await self._resubscribe(connection)

    async def _resubscribe(
        self, connection: AbstractConnection, *, settle_seconds: float = 5.0
    ) -> bool:
        """Consume on a fresh channel, then close the old one: the broker takes back what
        the old channel still held unacknowledged (a delivery that raced a cancel is
        dropped by the client without an ack and would stay there until then). What the old
        channel still has in hand may settle first (up to `settle_seconds`), so a write
        that commits meanwhile is acked, not handed out again."""
        old, in_hand = self._channel, set(self._in_flight)
        try:
            await self._declare_and_consume(connection)
        except Exception as exc:  # the watchdog subscribes again once the broker is back
            log.warning("subscribing failed, will try again: %s", describe(exc))
            return False
        if old is not None and not old.is_closed:
            if in_hand:
                await asyncio.wait(in_hand, timeout=settle_seconds)
            await self.flush_acks()
            await old.close()
        return True

    async def _has_consumer(self) -> bool:
        if self._channel is None or self._channel.is_closed or self._consumer_tag is None:
            return False
        try:
            underlay = await asyncio.wait_for(self._channel.get_underlay_channel(), 1)
        except Exception:  # closed or being restored
            return False
        consumers: dict[str, Any] = getattr(underlay, "consumers", {})
        return underlay is self._consumer_channel and self._consumer_tag in consumers

    # -- pausing after a failed write

    def _pause(self) -> None:
        """A write failed: stop taking messages for a backoff, then subscribe again."""
        if not self._to(State.PAUSED):  # paused already, or stopping
            return
        self._failures += 1
        pause = self._backoff.delay(self._failures)
        log.warning("registry write failed; pausing the AMQP consumer for %.1f s", pause)
        self._spawn(self._cancel_consumer())
        self._resume = asyncio.get_running_loop().call_later(
            pause, lambda: self._spawn(self._resume_consuming())
        )

    def _spawn(self, chore: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(chore)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume_consuming(self) -> None:
        self._resume = None
        connection = self._connection
        if self._state is not State.PAUSED:
            return
        if connection is None or not await self._resubscribe(connection):
            self._to(State.LOST)  # the watchdog subscribes again once it can

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        channel, self._consumer_channel = self._consumer_channel, None
        if tag is None or channel is None or channel.is_closed:
            return
        try:
            await asyncio.wait_for(channel.basic_cancel(tag), 5)
        except Exception as exc:  # a dead channel has no consumer to cancel
            log.debug("cancelling the AMQP consumer failed: %s", describe(exc))

    # -- one delivery

    async def _on_delivery(self, delivered: aiormq.abc.DeliveredMessage) -> None:
        message = Delivery(delivered)
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        window = self._hold(message)
        committed = None
        try:
            committed = await self._handle(message)
        except Exception:  # a bug must not stop the consumer, nor hold back later acks
            log.exception("unexpected error handling an AMQP message")
        finally:
            self._in_flight.discard(task)
            if committed is not None:  # settled when its batch commits, by `_committed`
                self._in_flight.add(committed)
                committed.add_done_callback(functools.partial(self._committed, message))
            elif window is not None and window.is_open(message.delivery_tag):
                self._spawn(self._nack(message))

    def _committed(self, message: Delivery, done: asyncio.Future[Any]) -> None:
        """Ack after the commit; requeue when the write failed (not durable); set aside a
        message the database refused (counted by the batcher as "unstorable")."""
        self._in_flight.discard(done)
        error = None if done.cancelled() else done.exception()
        if isinstance(error, RejectedMessage):  # refused by the database for its values
            self._spawn(self._reject(message, error.reason, error.detail))
            return
        if done.cancelled() or error is not None:
            self._spawn(self._requeue(message, error or asyncio.CancelledError()))
            return
        self._failures = 0
        self.consumed += 1
        self._ack(message)

    def _hold(self, message: Delivery) -> AckWindow | None:
        channel = message.channel
        if channel.is_closed:  # closed already: the broker hands it out again
            return None
        window = self._acks.get(channel)
        if window is None:
            for gone in [c for c in self._acks if c.is_closed]:
                del self._acks[gone]
            window = self._acks[channel] = AckWindow(channel)
        window.hold(message.delivery_tag)
        return window

    def _window(self, message: Delivery) -> AckWindow | None:
        if message.channel.is_closed:  # nothing to settle on it any more
            return None
        return self._acks.get(message.channel)

    def _ack(self, message: Delivery) -> None:
        """Settled: acked with the others of this turn (`AckWindow`)."""
        if (window := self._window(message)) is not None:
            window.ack(message.delivery_tag)

    async def _nack(self, message: Delivery) -> None:
        """Hand it back to the broker, one frame at once; later acks may then pass it."""
        if message.channel.is_closed:  # the broker hands it out again
            return
        await self._settle(message.channel.basic_nack(message.delivery_tag, requeue=True), "nack")
        if (window := self._window(message)) is not None:
            window.nacked(message.delivery_tag)

    async def flush_acks(self) -> None:
        """Write every settled ack now (before a channel or the connection closes)."""
        windows = [w for w in self._acks.values() if not w.channel.is_closed]
        await asyncio.gather(*(w.flush() for w in windows))

    async def _handle(self, message: Delivery) -> asyncio.Future[Any] | None:
        """Settle a bad or refused message; hand a good one to the orchestrator and return
        the future of its commit (no task waits on it: `_committed` runs when it is done).
        """
        signature = message.headers.get(SIGNATURE_HEADER)
        if isinstance(signature, bytes):
            signature = signature.decode(errors="replace")
        proof = Signature(signature if isinstance(signature, str) else None)
        try:
            admitted = await self._target.admit(message.body, proof)
        except RejectedMessage as exc:  # counted by the orchestrator
            await self._reject(message, exc.reason, exc.detail)
            return None
        except ProofUnavailableError as exc:  # the registry is down: not the message's fault
            await self._requeue(message, exc)
            return None
        except Exception as exc:  # a bug must not stop the consumer on one message
            log.exception("unexpected error admitting an AMQP message")
            self._target.reject("consumer_error")
            await self._reject(message, "consumer_error", describe(exc))
            return None
        return self._target.receive(admitted)

    async def _requeue(self, message: Delivery, exc: BaseException) -> None:
        log.debug("requeueing an AMQP message: %s", describe(exc))
        self._target.metrics.amqp_requeued.inc()
        self._pause()
        await self._nack(message)

    async def _reject(self, message: Delivery, reason: str, detail: str) -> None:
        """Copy to the rejected queue with the reason in a header, then ack."""
        body, kept = message.body, self.topology.rejected_copy_bytes
        headers: dict[str, Any] = {
            REJECT_REASON_HEADER: reason,
            REJECT_DETAIL_HEADER: detail[:500],
            "x-chiffon-routing-key": message.routing_key[:255],
        }
        if len(body) > kept:
            headers[REJECT_BYTES_HEADER] = len(body)
            body = body[:kept]
        copy = aio_pika.Message(body, content_type=message.content_type, headers=headers)
        if self._rejected is not None:
            try:
                await self._rejected.publish(copy, self.topology.rejected_queue, timeout=5)
            except Exception as exc:  # the message is counted either way; keep consuming
                log.warning("copying a rejected message failed: %s", describe(exc))
        self._ack(message)

    @staticmethod
    async def _settle(action: Awaitable[None], what: str) -> None:
        try:
            await action
        except Exception as exc:  # the channel died: the broker redelivers (no ack was lost)
            log.info("AMQP %s not delivered, the broker will redeliver: %s", what, describe(exc))
