"""RabbitMQ transport (the only module that imports aio-pika and its aiormq).

Topology (docs/protocol.md, "RabbitMQ"): agents publish to the durable topic exchange
`chiffon` with routing key `agent.<kind>.<agent_id>`; orchestrators share the durable queue
`chiffon.orchestrator.agent-events` bound to `agent.#` as competing consumers. The queue has
a message TTL (a heartbeat older than the liveness timeout is worthless) and a length limit,
so a stopped orchestrator never lets the broker fill up. A message that fails validation is
acked and copied to the bounded queue `chiffon.rejected` with the reason in a header.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
)
from aio_pika.exceptions import DeliveryError, PublishError

from chiffon.backoff import Backoff as Backoff  # the tests and the consumer's callers use it
from chiffon.backoff import describe, retry
from chiffon.schemas.limits import RejectedMessage
from chiffon.transport.auth import (
    SIGNATURE_HEADER,
    Credentials,
    Proof,
    ProofUnavailableError,
    Signature,
    credential_for,
)
from chiffon.transport.base import Message, TransportError

if TYPE_CHECKING:  # the agent imports this module and must not load pydantic
    from chiffon.schemas.heartbeat import AgentMessage

log = logging.getLogger(__name__)

EXCHANGE = "chiffon"
AGENT_EVENTS_QUEUE = "chiffon.orchestrator.agent-events"
REJECTED_QUEUE = "chiffon.rejected"
BINDING_KEY = "agent.#"
REJECT_REASON_HEADER = "x-chiffon-reject-reason"
REJECT_DETAIL_HEADER = "x-chiffon-reject-detail"
REJECT_BYTES_HEADER = "x-chiffon-original-bytes"  # on a copy cut to `rejected_copy_bytes`
CONTENT_TYPE = "application/json"


def routing_key(message: Message) -> str:
    """`agent.heartbeat.<agent_id>` or `agent.offline.<agent_id>`."""
    return f"agent.{message.kind}.{message.agent_id}"


def agent_events_arguments(*, max_length: int) -> dict[str, Any]:
    """Queue arguments of the orchestrators' queue, applied when it is created; no
    dead-lettering on purpose. No message TTL here: each agent sets its message's expiration
    (its heartbeat timeout), so a changed timeout never meets a queue declared with another
    (RabbitMQ refuses a redeclaration with different arguments: `PRECONDITION_FAILED`)."""
    return {"x-max-length": max_length, "x-overflow": "drop-head"}


def rejected_arguments(*, max_length: int, max_bytes: int) -> dict[str, Any]:
    return {"x-max-length": max_length, "x-max-length-bytes": max_bytes, "x-overflow": "drop-head"}


async def declare_queue(
    connection: AbstractConnection, channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> tuple[AbstractChannel, AbstractQueue]:
    """Declare `name` with `arguments`, or use it as it is when it exists with others.

    Arguments are fixed when a queue is created. A setting changed since (a length limit)
    used to make every later start fail its declaration and retry forever, consuming
    nothing: now the existing queue is used and one line says how to apply the new value
    (a policy, which RabbitMQ recommends for exactly this). The refused declaration closes
    its channel, so the queue is opened on a fresh one, which is returned.
    """
    try:
        return channel, await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue %s exists with other arguments than %s (%s); using it as it is. To apply "
            "these limits, set a policy (rabbitmqctl set_policy NAME '^%s$' "
            '\'{"max-length": N, "overflow": "drop-head"}\' --apply-to queues), or '
            "delete the queue while no orchestrator runs",
            name,
            arguments,
            _describe(exc),
            name.replace(".", "\\."),
        )
    fresh = await connection.channel(publisher_confirms=True)
    return fresh, await fresh.declare_queue(name, passive=True)


async def declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)


_describe = describe


async def _close_quietly(connection: AbstractConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    try:
        await asyncio.wait_for(connection.close(), 2)
    except Exception as exc:  # a dead socket may refuse even to close; it is gone anyway
        log.debug("closing an AMQP connection failed: %s", _describe(exc))


# --------------------------------------------------------------------------- agent side


class RabbitPublisher:
    """The agent's `Publisher` over RabbitMQ, with publisher confirms.

    It holds no buffer: a publish either gets the broker's confirm within `timeout_seconds`
    or raises `TransportError`, and the agent's loop keeps only its newest snapshot for the
    next try. A broken connection is dropped and reopened lazily by the next publish, so the
    agent's backoff (with jitter) paces reconnection.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        timeout_seconds: float = 5.0,
        exchange: str = EXCHANGE,
        credential: Credentials | None = None,
        message_ttl_seconds: float | None = None,
    ) -> None:
        self._url = amqp_url
        self._ttl = message_ttl_seconds
        self._credential = credential
        self._timeout = timeout_seconds
        self._exchange_name = exchange
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._opening = asyncio.Lock()
        self.sent = 0
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def connect(self) -> None:
        """Open connection, confirm channel and exchange, within `timeout_seconds`."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._ensure_open()
        except TransportError:
            raise
        except Exception as exc:
            await self._drop()
            raise TransportError(f"cannot reach the AMQP broker: {_describe(exc)}") from exc

    async def publish(self, message: Message) -> None:
        """Publish and wait for the broker's confirm; `TransportError` on anything else."""
        body = message.encode()
        headers: dict[str, Any] = {}
        credential = credential_for(self._credential, message.agent_id)
        if credential is not None:
            headers[SIGNATURE_HEADER] = credential.sign(body)
        outgoing = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            type=message.kind,
            app_id="chiffon-agent",
            headers=headers,
            expiration=self._ttl,  # a heartbeat older than the timeout is worthless
        )
        try:
            async with asyncio.timeout(self._timeout):
                exchange = await self._ensure_open()
                await exchange.publish(outgoing, routing_key(message), mandatory=True)
        except (PublishError, DeliveryError) as exc:  # unroutable or nacked: channel is fine
            raise TransportError(f"broker refused the message: {_describe(exc)}") from exc
        except Exception as exc:
            await self._drop()
            raise TransportError(f"publish failed: {_describe(exc)}") from exc
        self.sent += 1

    async def close(self) -> None:
        await self._drop()

    async def _ensure_open(self) -> AbstractExchange:
        async with self._opening:  # concurrent publishes must share one connection
            if self._exchange is not None and self.connected:
                return self._exchange
            return await self._open()

    async def _open(self) -> AbstractExchange:
        await self._drop()
        self._connection = await aio_pika.connect(self._url, timeout=self._timeout)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange = await declare_exchange(self._channel, self._exchange_name)
        self.connects += 1
        return self._exchange

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        await _close_quietly(connection)


# --------------------------------------------------------------------- orchestrator side


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


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and limits of what the consumer declares; injectable for isolated tests."""

    exchange: str = EXCHANGE
    queue: str = AGENT_EVENTS_QUEUE
    rejected_queue: str = REJECTED_QUEUE
    max_length: int = 100_000
    rejected_max_length: int = 10_000
    rejected_max_bytes: int = 64 * 1024 * 1024
    # A rejected message is copied with at most this much of its body (a 10 MB one is
    # refused as too_large; its first bytes are enough to see what it was).
    rejected_copy_bytes: int = 64 * 1024


class AckWindow:
    """The acks of one channel, sent as one `basic.ack multiple` per run of settled
    deliveries instead of one frame per message: +31% in drains of a backlog, fewer frames
    for the broker too (docs/performance.md, item 18).

    A multiple ack settles every outstanding delivery up to its tag, so the window sends
    one only up to the highest tag below which every delivery is settled: acked after its
    commit (or its copy to the rejected queue), or already nacked one by one. A message
    still in hand holds back the acks of those after it; none is ever acked before its
    write committed. Acks settled in one turn of the event loop go out together.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel  # aiormq's channel, whose delivery tags these are
        self._in_hand: list[int] = []  # heap: tags not yet covered by an ack
        self._open: set[int] = set()  # tags held and not settled yet
        self._settled: dict[int, bool] = {}  # tag -> True: to ack; False: nacked already
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def hold(self, tag: int) -> None:
        """A delivery arrived: nothing after it is acked until it is settled."""
        heapq.heappush(self._in_hand, tag)
        self._open.add(tag)

    def is_open(self, tag: int) -> bool:
        """Held and neither acked nor nacked yet."""
        return tag in self._open

    def ack(self, tag: int) -> None:
        """Its write committed: ack it with the others settled in this turn."""
        self._settle(tag, True)

    def nacked(self, tag: int) -> None:
        """Its nack was written: later acks may pass it."""
        self._settle(tag, False)

    def _settle(self, tag: int, ack: bool) -> None:
        if tag not in self._open:
            return
        self._open.discard(tag)
        self._settled[tag] = ack
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_settled)

    def _take(self) -> int | None:
        """Pop the settled run at the head; the highest tag in it to ack, if any."""
        last = None
        while self._in_hand and self._in_hand[0] in self._settled:
            tag = heapq.heappop(self._in_hand)
            if self._settled.pop(tag):
                last = tag
        return last

    def _send_settled(self) -> None:
        self._scheduled = False
        tag = self._take()
        if tag is not None:
            task = asyncio.create_task(self._send(tag))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def flush(self) -> None:
        """Send what is settled now and wait until every ack is written."""
        self._send_settled()
        if self._sending:
            await asyncio.wait(set(self._sending))

    async def _send(self, tag: int) -> None:
        try:
            await self.channel.basic_ack(tag, multiple=True)
        except Exception as exc:  # the channel died: the broker redelivers (no ack was lost)
            log.info("AMQP ack not delivered, the broker will redeliver: %s", _describe(exc))


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


class RabbitConsumer:
    """Feeds agent messages from the shared queue into the orchestrator, acking after commit.

    `start()` returns at once and connects in the background, retrying with backoff until
    the broker answers, so the API serves while RabbitMQ is down. Each delivery is checked
    in its own task (aiormq's) and handed to the batcher, so hundreds are in flight and go
    into one transaction; each is acked only when its write committed (acks of one commit
    travel as one frame, `AckWindow`), or nacked with requeue when the write failed, which
    also pauses consuming for a backoff. A watchdog re-consumes
    when a reconnect left the queue without this consumer. `stop()` cancels the consumer,
    lets the messages in hand commit and ack, then closes.
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
        self._stopping = False
        self.consumed = 0

    name = "amqp"  # as a receiver of the orchestrator (`/readyz`)

    @property
    def hearing(self) -> bool:
        """As a receiver: subscribed to its queue."""
        return self.consuming

    @property
    def consuming(self) -> bool:
        """Connected and subscribed: the state `/readyz` reports."""
        return (
            self._channel is not None
            and not self._channel.is_closed
            and self._consumer_tag is not None
        )

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="chiffon-amqp-consumer")

    async def wait_consuming(self, timeout_seconds: float) -> None:
        """Wait until subscribed (tests, and callers that want to know)."""
        async with asyncio.timeout(timeout_seconds):
            # polled: the state has several sources (connection, channel, consumer tag)
            while not self.consuming:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def stop(self, *, drain_timeout_seconds: float = 10.0) -> None:
        """Stop consuming, let in-flight messages commit and ack, then close."""
        self._stopping = True
        if self._resume is not None:
            self._resume.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._cancel_consumer()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=drain_timeout_seconds)
        await self._send_acks()
        connection, self._connection = self._connection, None
        self._channel = self._queue = self._rejected = None
        self._target.metrics.amqp_connected.set(0)
        await _close_quietly(connection)

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
            await _close_quietly(connection)
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
        self._target.metrics.amqp_connected.set(1)

    def _on_reconnect(self, *_args: Any) -> None:
        log.warning("reconnected to the AMQP broker")
        self._target.metrics.amqp_reconnects.inc()
        if not self._stopping:
            self._spawn(self._watchdog())  # channels are restored by now; the consumer is not

    async def _watchdog(self) -> None:
        """Re-subscribe when a reconnect left our channel without its consumer."""
        async with self._checking:  # the timer's and a reconnect's check, one at a time
            connection = self._connection
            healthy = await self._has_consumer()
            self._target.metrics.amqp_connected.set(1 if healthy else 0)
            if healthy or self._paused or connection is None or connection.is_closed:
                return
            log.warning("the AMQP consumer is gone after a reconnect; subscribing again")
            await self._resubscribe(connection)

    async def _resubscribe(
        self, connection: AbstractConnection, *, settle_seconds: float = 5.0
    ) -> None:
        """Consume on a fresh channel, then close the old one: the broker takes back what
        the old channel still held unacknowledged (a delivery that raced a cancel is
        dropped by the client without an ack and would stay there until then). What the old
        channel still has in hand may settle first (up to `settle_seconds`), so a write
        that commits meanwhile is acked, not handed out again."""
        old, in_hand = self._channel, set(self._in_flight)
        try:
            await self._declare_and_consume(connection)
        except Exception as exc:  # the watchdog subscribes again once the broker is back
            log.warning("subscribing failed, will try again: %s", _describe(exc))
            return
        if old is not None and not old.is_closed:
            if in_hand:
                await asyncio.wait(in_hand, timeout=settle_seconds)
            await self._send_acks()
            await old.close()

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

    @property
    def _paused(self) -> bool:
        return self._resume is not None

    def _pause(self) -> None:
        """A write failed: stop taking messages for a backoff, then subscribe again."""
        if self._paused or self._stopping:
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
        if self._stopping or connection is None or self._consumer_tag is not None:
            return
        await self._resubscribe(connection)

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        channel, self._consumer_channel = self._consumer_channel, None
        if tag is None or channel is None or channel.is_closed:
            return
        try:
            await asyncio.wait_for(channel.basic_cancel(tag), 5)
        except Exception as exc:  # a dead channel has no consumer to cancel
            log.debug("cancelling the AMQP consumer failed: %s", _describe(exc))

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

    async def _send_acks(self) -> None:
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
            await self._reject(message, "consumer_error", _describe(exc))
            return None
        return self._target.receive(admitted)

    async def _requeue(self, message: Delivery, exc: BaseException) -> None:
        log.debug("requeueing an AMQP message: %s", _describe(exc))
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
                log.warning("copying a rejected message failed: %s", _describe(exc))
        self._ack(message)

    @staticmethod
    async def _settle(action: Awaitable[None], what: str) -> None:
        try:
            await action
        except Exception as exc:  # the channel died: the broker redelivers (no ack was lost)
            log.info("AMQP %s not delivered, the broker will redeliver: %s", what, _describe(exc))
