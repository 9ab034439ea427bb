"""The in-memory transport: an agent in the same process as its orchestrator.

It goes through the same bytes-in path as the network transports (serialise, validate,
ingest, wait for commit), so it is a faithful twin for tests and for single-process use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

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


BLOB_CHUNK_BYTES = 1024 * 1024


class BlobDesk(Protocol):
    """The orchestrator's blob store, as an agent in its process moves its attempts'
    files through it (`orchestrator.store.BlobStore`)."""

    async def missing(self, hashes: Iterable[str]) -> list[str]: ...

    def read(self, sha256: str, start: int = 0) -> AsyncIterator[bytes]: ...

    async def put(
        self, sha256: str, body: AsyncIterator[bytes], *, declared: int | None
    ) -> int: ...

    async def record(
        self, job_id: uuid.UUID, attempt: int, agent_id: uuid.UUID, kind: str, sha256: str
    ) -> str: ...

    async def job_has(self, job_id: uuid.UUID, sha256: str) -> bool: ...

    async def job_snapshot(self, job_id: uuid.UUID) -> str | bool | None: ...

    async def fetched(self, agent_id: uuid.UUID, manifest: str) -> None: ...


class InMemoryWork:
    """The jobs channel of an agent inside its orchestrator's process (`chiffon up`): its
    orders, reports and output go straight to the orchestrator, still signed and fenced;
    its attempts' files through the orchestrator's store (`store`; without one, a job
    with files is refused), the same checks as over HTTP: only its job's blobs, each
    checked on arrival (the agent's cache) and on upload (the store)."""

    def __init__(self, desk: AgentDesk, agent_id: uuid.UUID, store: BlobDesk | None = None) -> None:
        self._desk = desk
        self._agent_id = agent_id
        self._store = store

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

    # An attempt's files (`agent.stage.FileChannel`).

    def _blobs(self) -> BlobDesk:
        if self._store is None:
            raise TransportError("this orchestrator keeps no files")
        return self._store

    async def fetch_blob(
        self, job_id: uuid.UUID, attempt: int, sha256: str, into: Path, *, max_bytes: int
    ) -> None:
        store = self._blobs()
        try:
            if not await store.job_has(job_id, sha256):
                raise TransportError(f"blob {sha256} is not one of job {job_id}'s files")
            if sha256 == await store.job_snapshot(job_id):  # its cache holds it: placement
                await store.fetched(self._agent_id, sha256)
            with into.open("wb") as out:
                got = 0
                async for data in store.read(sha256):
                    got += len(data)
                    if got > max_bytes:
                        raise TransportError("the blob is larger than it may be")
                    await asyncio.to_thread(out.write, data)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def missing_blobs(
        self, job_id: uuid.UUID, attempt: int, sha256s: Sequence[str]
    ) -> list[str]:
        try:
            return await self._blobs().missing(sha256s)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def put_blob(
        self, job_id: uuid.UUID, attempt: int, sha256: str, source: BinaryIO | bytes
    ) -> None:
        async def pieces() -> AsyncIterator[bytes]:
            if isinstance(source, bytes):
                yield source
                return
            while data := await asyncio.to_thread(source.read, BLOB_CHUNK_BYTES):
                yield data

        try:
            await self._blobs().put(sha256, pieces(), declared=None)
        except TransportError:
            raise
        except Exception as exc:  # its bytes are not its hash, the store is full
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def record_files(self, job_id: uuid.UUID, attempt: int, kind: str, manifest: str) -> str:
        try:
            return await self._blobs().record(job_id, attempt, self._agent_id, kind, manifest)
        except TransportError:
            raise
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
