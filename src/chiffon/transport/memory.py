"""The in-memory transport: an agent in the same process as its orchestrator.

It goes through the same bytes-in path as the network transports (serialise, validate,
ingest, wait for commit), so it is a faithful twin for tests and for single-process use.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict
from typing import Any

from chiffon.schemas.dispatch import DETAIL_MAX_CHARS, report_from
from chiffon.transport.auth import Credentials, credential_for
from chiffon.transport.base import AgentDesk, IngestSink, Message, SignedOrder, TransportError


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


class InMemoryWork:
    """The jobs channel of an agent inside its orchestrator's process (`chiffon up`): its
    orders, reports and output go straight to the orchestrator, still signed and fenced."""

    def __init__(self, desk: AgentDesk, agent_id: uuid.UUID) -> None:
        self._desk = desk
        self._agent_id = agent_id

    async def orders(self, *, wait_seconds: float) -> list[SignedOrder]:
        try:
            return await self._desk.wait_orders(self._agent_id, wait_seconds=wait_seconds)
        except Exception as exc:  # the database is away: the poller retries
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str:
        report = report_from(said)
        # cut as HTTP bounds it (there a longer one is refused)
        report = dataclasses.replace(report, detail=str(report.detail)[:DETAIL_MAX_CHARS])
        try:
            return await self._desk.report_attempt(self._agent_id, job_id, attempt, report)
        except Exception as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str:
        try:
            return await self._desk.ship_log(self._agent_id, job_id, attempt, offset, data)
        except Exception as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc


class InMemoryOrderPush:
    """An `OrderPush` that keeps what it was given to push, by agent (tests: the
    orchestrator's push without a broker)."""

    def __init__(self) -> None:
        self.sent: defaultdict[uuid.UUID, list[SignedOrder]] = defaultdict(list)
        self.closed = False

    async def send(self, agent_id: uuid.UUID, orders: list[SignedOrder]) -> bool:
        if self.closed:
            return False
        self.sent[agent_id] += orders
        return True

    async def close(self) -> None:
        self.closed = True
