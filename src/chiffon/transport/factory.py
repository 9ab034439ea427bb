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
) -> Publisher:
    """`http` posts to the orchestrator's REST API; `amqp` publishes to RabbitMQ.

    `credential` proves every message comes from its agent: a bearer secret over HTTP, an
    HMAC signature over RabbitMQ. The orchestrator refuses messages without one.
    """
    if transport == "http":
        return HttpPublisher(
            orchestrator_url, timeout_seconds=timeout_seconds, credential=credential
        )
    if transport == "amqp":
        # Imported here: aio-pika loads only for agents that use it.
        from chiffon.transport.rabbitmq import RabbitPublisher

        return RabbitPublisher(amqp_url, timeout_seconds=timeout_seconds, credential=credential)
    raise ValueError(f"unknown transport {transport!r}; use http or amqp")
