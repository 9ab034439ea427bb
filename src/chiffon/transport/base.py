"""What either side needs from a transport, whichever carries the message: the agent's
heartbeats in (`Publisher` to an `IngestSink`), its orders out (`OrderPush`, or its own
poll), and in-process its jobs channel (`AgentDesk`)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import Protocol

from chiffon.schemas.dispatch import Report, Verdict

# An order as it travels: its JSON body, exactly as signed, and the signature
# (`transport.orders.encode`).
SignedOrder = tuple[bytes, str]


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


class OrderPush(Protocol):
    """Pushes an agent's signed orders to it (RabbitMQ: `rabbitmq.orders.OrderSender`).
    Best effort: what is lost the agent's own poll finds, since what it must be told is
    derived from the jobs' state."""

    async def send(self, agent_id: uuid.UUID, orders: list[SignedOrder]) -> bool: ...

    async def close(self) -> None: ...


class AgentDesk(Protocol):
    """The orchestrator's side of an agent's jobs channel, reached in its own process
    (`memory.InMemoryWork`, `chiffon up`): the agent's orders, and its reports of attempts
    and their output, each answered with a verdict (`Orchestrator` fits)."""

    async def wait_orders(
        self, agent_id: uuid.UUID, *, wait_seconds: float
    ) -> list[SignedOrder]: ...

    async def report_attempt(
        self, agent_id: uuid.UUID, job_id: uuid.UUID, attempt: int, said: Report
    ) -> Verdict: ...

    async def ship_log(
        self, agent_id: uuid.UUID, job_id: uuid.UUID, attempt: int, offset: int, data: bytes
    ) -> Verdict: ...


class Receiver(Protocol):
    """A transport bringing agents' messages in (RabbitMQ's consumer; HTTP is the API
    itself), owned by the orchestrator: started and stopped with it, and asked at every
    sweep and by `/readyz` whether it is hearing."""

    name: str

    @property
    def hearing(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
