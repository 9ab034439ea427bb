"""The in-memory transport: an agent in the same process as its orchestrator.

It goes through the same bytes-in path as the network transports (serialise, validate,
ingest, wait for commit), so it is a faithful twin for tests and for single-process use.
"""

from __future__ import annotations

from chiffon.transport.auth import Credentials, credential_for
from chiffon.transport.base import IngestSink, Message, TransportError


class InMemoryPublisher:
    """With a credential, each message is signed as over RabbitMQ and the sink checks it."""

    def __init__(self, sink: IngestSink, *, credential: Credentials | None = None) -> None:
        self._sink = sink
        self._credential = credential
        self._open = False
        self.sent = 0

    async def connect(self) -> None:
        self._open = True

    async def publish(self, message: Message) -> None:
        if not self._open:
            raise TransportError("in-memory transport is closed")
        try:
            raw = message.encode()
            credential = credential_for(self._credential, message.agent_id)
            if credential is None:
                await self._sink(raw)
            else:
                await self._sink(raw, signature=credential.sign(raw))
        except Exception as exc:  # any refusal by the sink means "not delivered"
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        self.sent += 1

    async def close(self) -> None:
        self._open = False
