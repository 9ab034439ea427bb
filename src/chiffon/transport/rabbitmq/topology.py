"""Names, queue arguments and declarations: what agents and orchestrators agree on."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from chiffon.backoff import describe
from chiffon.transport.base import Message

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
            describe(exc),
            name.replace(".", "\\."),
        )
    fresh = await connection.channel(publisher_confirms=True)
    return fresh, await fresh.declare_queue(name, passive=True)


async def declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)


async def close_quietly(connection: AbstractConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    try:
        await asyncio.wait_for(connection.close(), 2)
    except Exception as exc:  # a dead socket may refuse even to close; it is gone anyway
        log.debug("closing an AMQP connection failed: %s", describe(exc))


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
