"""What the agent needs from a transport, whichever carries the message."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import Protocol


class IngestSink(Protocol):
    """The orchestrator side of every transport: raw message bytes (and, when the agent
    signed it, the signature) in, an outcome out once the write has committed
    (`Orchestrator.ingest`). It raises when the message is refused."""

    def __call__(self, raw: bytes, /, *, signature: str | None = None) -> Awaitable[str]: ...


class TransportError(RuntimeError):
    """The message could not be delivered now; the agent sends a newer one next beat."""


class Message(Protocol):
    """What a publisher needs of a message: the agent's own `chiffon.agent.report.Outgoing`
    (no pydantic on the desktop, nor in the simulator), or the contract's `AgentMessage`
    (tests, scripts)."""

    @property
    def kind(self) -> str: ...

    @property
    def agent_id(self) -> uuid.UUID: ...

    def encode(self) -> bytes: ...


class Publisher(Protocol):
    """Delivers agent messages to the orchestrator.

    `publish` returns once the message is accepted by the other side (broker confirm,
    HTTP 2xx, or ingest commit for the in-memory twin) and raises `TransportError`
    otherwise. It must never block longer than its own timeout.
    """

    async def connect(self) -> None: ...

    async def publish(self, message: Message) -> None: ...

    async def close(self) -> None: ...
