"""The agent's side: publish with confirms, nothing buffered."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import DeliveryError, PublishError

from chiffon.backoff import describe
from chiffon.transport.auth import SIGNATURE_HEADER, Credentials, credential_for
from chiffon.transport.base import Message, TransportError
from chiffon.transport.rabbitmq.topology import (
    CONTENT_TYPE,
    EXCHANGE,
    close_quietly,
    declare_exchange,
    routing_key,
)


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
            raise TransportError(f"cannot reach the AMQP broker: {describe(exc)}") from exc

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
            raise TransportError(f"broker refused the message: {describe(exc)}") from exc
        except Exception as exc:
            await self._drop()
            raise TransportError(f"publish failed: {describe(exc)}") from exc
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
        await close_quietly(connection)
