"""Orders over RabbitMQ: the orchestrator publishes each agent's signed orders to the
`chiffon` exchange with the routing key `orders.<agent_id>`; the agent consumes them from a
queue of its own, bound to that key.

The queue is exclusive (only the agent's connection may consume it, or even declare it),
has a name no one can guess (`orders_queue`), and goes with the connection; its orders
expire after `ORDER_TTL_SECONDS` (an order is refused by the agent after 5 minutes
anyway). An order published while the agent has no queue is lost, and found again: what
an agent must be told is derived from the jobs' state, and the agent asks for it over
HTTP at start, every so often, and all the time while it has no queue
(`agent.work.WorkLoop.poll`).

Whoever can publish to the broker can put anything in the queue, and the agent runs
nothing that is not signed with its own key (`transport.orders.verify`). Whoever can bind
a queue to the exchange receives copies of the orders, sealed to their agent: it reads
nothing of them (`transport.orders.seal`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from chiffon.backoff import Backoff, describe
from chiffon.transport.auth import SIGNATURE_HEADER
from chiffon.transport.base import SignedOrder
from chiffon.transport.rabbitmq.topology import EXCHANGE, close_quietly, declare_exchange

log = logging.getLogger(__name__)

ORDER_TTL_SECONDS = 300
ORDER_QUEUE_MAX_LENGTH = 1000
CONTENT_TYPE = "application/json"


def orders_key(agent_id: uuid.UUID) -> str:
    return f"orders.{agent_id}"


def orders_queue(agent_id: uuid.UUID) -> str:
    """A name no one can guess, hence take first: a broker user who declared the agent's
    queue before it (exclusive) made the agent fail with RESOURCE_LOCKED and received its
    orders. A new one for each connection (the queue goes with it)."""
    return f"chiffon.orders.{agent_id}.{secrets.token_hex(8)}"


class OrderSender:
    """The orchestrator's side, an `OrderPush`: publish an agent's signed orders. Best
    effort: a failure is logged and the connection reopened at the next send (the agent's
    poll finds what was lost)."""

    def __init__(self, amqp_url: str, *, exchange: str = EXCHANGE, timeout_seconds: float = 5):
        self._url = amqp_url
        self._exchange_name = exchange
        self._timeout = timeout_seconds
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._opening = asyncio.Lock()
        self.sent = 0

    async def send(self, agent_id: uuid.UUID, orders: list[SignedOrder]) -> bool:
        """Publish each (body, signature), on a new connection once more if the kept one
        failed (the broker restarted since); whether all went."""
        for last_try in (False, True):
            try:
                async with asyncio.timeout(self._timeout):
                    exchange = await self._ensure_open()
                    for body, signature in orders:
                        message = aio_pika.Message(
                            body, content_type=CONTENT_TYPE, type="order", app_id="chiffon",
                            headers={SIGNATURE_HEADER: signature}, expiration=ORDER_TTL_SECONDS,
                        )  # fmt: skip
                        await exchange.publish(message, orders_key(agent_id))
                self.sent += len(orders)
                return True
            except Exception as exc:
                await self.close()
                if last_try:
                    log.warning("orders for %s not published: %s", agent_id, describe(exc))
        return False

    async def _ensure_open(self) -> AbstractExchange:
        async with self._opening:
            if self._exchange is not None:
                return self._exchange
            connection = await aio_pika.connect(self._url, timeout=self._timeout)
            self._connection = connection
            connection.close_callbacks.add(lambda *_: self._lost(connection))
            channel = await connection.channel()
            self._exchange = await declare_exchange(channel, self._exchange_name)
            return self._exchange

    def _lost(self, connection: AbstractConnection) -> None:
        """The broker closed it: open a new one at the next send."""
        if self._connection is connection:
            self._connection = self._exchange = None

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        await close_quietly(connection)


Handler = Callable[[bytes, str | None], Awaitable[object]]
ManyHandler = Callable[[uuid.UUID, bytes, str | None], Awaitable[object]]


async def consume_orders(
    amqp_url: str,
    agent_id: uuid.UUID,
    handle: Handler,
    *,
    exchange: str = EXCHANGE,
    ready: asyncio.Event | None = None,
) -> None:
    """The agent's side: consume its own queue until cancelled, handing each order's body
    and signature to `handle` (which checks it), reconnecting with backoff when the broker
    is away. `ready` is set each time the queue is consumed."""

    async def one(_agent_id: uuid.UUID, body: bytes, signature: str | None) -> object:
        return await handle(body, signature)

    await consume_orders_of(amqp_url, [agent_id], one, exchange=exchange, ready=ready)


async def consume_orders_of(
    amqp_url: str,
    agent_ids: Sequence[uuid.UUID],
    handle: ManyHandler,
    *,
    exchange: str = EXCHANGE,
    ready: asyncio.Event | None = None,
) -> None:
    """`consume_orders` for several agents on one queue (`chiffon simulate`'s hollow
    agents): `handle` is also told whose order it is, by the routing key; still only the
    agent's key proves the order."""
    backoff, failures = Backoff(0.5, max_seconds=30.0), 0
    while True:
        connection: AbstractConnection | None = None
        try:
            connection = await aio_pika.connect(amqp_url, timeout=10)
            channel = await connection.channel()
            await _consume(channel, agent_ids, handle, exchange, ready)
            failures = 0
            await _until_closed(connection)
            log.warning("orders: the broker connection closed; reconnecting")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            delay = backoff.delay(failures)
            log.warning(
                "orders: cannot consume (%s); again in %.1f s, meanwhile they come over HTTP",
                describe(exc),
                delay,
            )
            await asyncio.sleep(delay)
        finally:
            if ready is not None:
                ready.clear()
            await close_quietly(connection)


async def _until_closed(connection: AbstractConnection) -> None:
    """Until the connection closes, by the broker's doing too (aio-pika's `closed()`
    only notices our own `close()`)."""
    lost = asyncio.Event()
    connection.close_callbacks.add(lambda *_: lost.set())
    await lost.wait()


async def _consume(
    channel: AbstractChannel,
    agent_ids: Sequence[uuid.UUID],
    handle: ManyHandler,
    exchange_name: str,
    ready: asyncio.Event | None,
) -> None:
    await channel.set_qos(prefetch_count=16 * min(len(agent_ids), 64))
    exchange = await declare_exchange(channel, exchange_name)
    name = orders_queue(agent_ids[0]) if len(agent_ids) == 1 else f"chiffon.orders.{uuid.uuid4()}"
    queue = await channel.declare_queue(
        name, exclusive=True, auto_delete=True,
        arguments={"x-message-ttl": ORDER_TTL_SECONDS * 1000,
                   "x-max-length": ORDER_QUEUE_MAX_LENGTH * len(agent_ids),
                   "x-overflow": "drop-head"},
    )  # fmt: skip
    for agent_id in agent_ids:
        await queue.bind(exchange, orders_key(agent_id))

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process(ignore_processed=True):
            signature = (message.headers or {}).get(SIGNATURE_HEADER)
            try:
                agent_id = uuid.UUID(str(message.routing_key).removeprefix("orders."))
            except ValueError:
                return  # not an order's key: nothing of it is read
            await handle(agent_id, message.body,
                         signature if isinstance(signature, str) else None)  # fmt: skip

    await queue.consume(on_message)
    if ready is not None:
        ready.set()
