"""Pick the transport an agent publishes through, by name."""

from __future__ import annotations

from chiffon.transport.auth import Credentials
from chiffon.transport.base import Publisher
from chiffon.transport.http import HttpPublisher


def make_publisher(
    transport: str,
    *,
    amqp_url: str,
    orchestrator_url: str,
    timeout_seconds: float,
    credential: Credentials | None = None,
    message_ttl_seconds: float | None = None,
) -> Publisher:
    """`http` posts to the orchestrator's REST API; `amqp` publishes to RabbitMQ.

    `credential` proves every message comes from its agent: a bearer secret over HTTP, an
    HMAC signature over RabbitMQ. The orchestrator refuses messages without one.
    `message_ttl_seconds`: over RabbitMQ, the broker drops a message not consumed by then.
    """
    if transport == "http":
        return HttpPublisher(
            orchestrator_url, timeout_seconds=timeout_seconds, credential=credential
        )
    if transport == "amqp":
        # Imported here: aio-pika loads only for agents that use it.
        from chiffon.transport.rabbitmq.publisher import RabbitPublisher

        return RabbitPublisher(
            amqp_url,
            timeout_seconds=timeout_seconds,
            credential=credential,
            message_ttl_seconds=message_ttl_seconds,
        )
    raise ValueError(f"unknown transport {transport!r}; use http or amqp")
