"""The in-memory transport: an agent in the same process as its orchestrator.

It goes through the same bytes-in path as the network transports (serialise, validate,
ingest, wait for commit), so it is a faithful twin for tests and for single-process use.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from chiffon.transport.auth import Credentials, credential_for
from chiffon.transport.base import IngestSink, Message, TransportError

if TYPE_CHECKING:
    from chiffon.orchestrator.service import Orchestrator


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

    def __init__(self, orchestrator: Orchestrator, agent_id: uuid.UUID) -> None:
        self._orchestrator = orchestrator
        self._agent_id = agent_id

    async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]:
        try:
            return await self._orchestrator.wait_orders(self._agent_id, wait_seconds=wait_seconds)
        except Exception as exc:  # the database is away: the poller retries
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str:
        from chiffon.orchestrator.jobs import Report

        vram = said.get("vram_gb") if said["kind"] == "usage" else said.get("peak_vram_gb")
        report = Report(said["kind"], said.get("outcome"), said.get("exit_code"),
                        said.get("signal"), str(said.get("detail", ""))[:1000], vram,
                        said.get("log_path") if said["kind"] == "started" else None)  # fmt: skip
        try:
            return await self._orchestrator.report_attempt(self._agent_id, job_id, attempt, report)
        except Exception as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str:
        try:
            return await self._orchestrator.ship_log(self._agent_id, job_id, attempt, offset, data)
        except Exception as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
