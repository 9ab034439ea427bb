"""The store of jobs' files: blobs named by their SHA-256 (`schemas.files`), shared by
every orchestrator on the registry.

Where the bytes are:

- with PostgreSQL, in the database itself, in 1 MiB rows of `blob_chunks` (`bytea`). Every
  orchestrator on the registry sees them with no other server to run, an upload is one
  transaction (a body whose hash does not match is rolled back: nothing half-stored), a
  read resumes at any offset by its chunk number, and the registry's backup holds them.
  Large objects were the other choice: they need their own unlinking (`lo_unlink`, or
  orphans), have no per-row ownership, and stream no better through the driver;
- with SQLite (`chiffon up`, one machine), in files under the store's folder
  (`<data_dir>/blobs`), written to a temporary file and renamed in once verified.

Which blobs exist, their sizes and when each was last wanted are rows of `blobs` in both
cases; what each attempt saved (outputs, checkpoints) are rows of `job_files`.

A blob no live job refers to (queued, out, or ended within `store_retention_seconds`),
and not wanted for as long, is deleted by `collect`. A store at `store_max_gb` refuses
new uploads (`StoreFull`) and deletes nothing to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.clock import Clock
from chiffon.persistence.models import (
    AgentSnapshotRow,
    BlobChunkRow,
    BlobRow,
    JobFilesRow,
    JobRow,
)
from chiffon.schemas.dispatch import OUT
from chiffon.schemas.files import MAX_MANIFEST_BYTES, Manifest, ManifestError, is_sha256

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
READ_CHUNKS = 8  # chunks read from the database per query
# Manifests kept parsed (a blob never changes), bounded by the paths they hold: a
# snapshot's 100,000 files are asked about once per file while an agent fetches them.
MANIFEST_PATHS_CACHED = 1_000_000
IN_CLAUSE = 1000
USED_SECONDS = 5.0
FILE_KINDS = ("output", "checkpoint")


class StoreFull(Exception):
    """The store is at its size cap: the upload is refused, nothing is deleted for it."""


class HashMismatch(ValueError):
    """The bytes sent are not the blob they were sent as."""


@dataclass(frozen=True, slots=True)
class Saved:
    """What an attempt saved (`job_files`)."""

    attempt: int
    kind: str
    manifest: str
    bytes: int
    files: int
    saved_at: datetime


class BlobStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        *,
        folder: Path | None,
        max_bytes: int,
        retention_seconds: float,
    ) -> None:
        """`folder`: keep the bytes in files there (`chiffon up`); None: in the database."""
        self._sessions = sessions
        self._clock = clock
        self.folder = folder
        self.max_bytes = max_bytes
        self.retention_seconds = retention_seconds
        self._manifests: OrderedDict[str, tuple[Manifest, frozenset[str]]] = OrderedDict()
        self._cached_paths = 0
        self._used: tuple[float, int] | None = None  # (when summed, bytes): `_used_lately`

    # What is there.

    async def missing(self, hashes: Iterable[str]) -> list[str]:
        """Those of `hashes` the store lacks, in the order given; the others are marked
        wanted now (a blob a new submission names again is not collected under it)."""
        wanted = list(dict.fromkeys(hashes))
        have: set[str] = set()
        now = self._clock.now()
        async with self._sessions() as session:
            for part in _parts(wanted):
                have |= set((await session.scalars(
                    select(BlobRow.sha256).where(BlobRow.sha256.in_(part)))).all())  # fmt: skip
                await session.execute(
                    update(BlobRow).where(BlobRow.sha256.in_(part)).values(used_at=now)
                )
            await session.commit()
        return [h for h in wanted if h not in have]

    async def size(self, sha256: str) -> int | None:
        async with self._sessions() as session:
            return await session.scalar(select(BlobRow.size).where(BlobRow.sha256 == sha256))

    async def used_bytes(self) -> int:
        async with self._sessions() as session:
            return int(await session.scalar(select(func.coalesce(func.sum(BlobRow.size), 0))) or 0)

    # In.

    async def put(self, sha256: str, body: AsyncIterator[bytes], *, declared: int | None) -> int:
        """Store `body` as the blob `sha256`; its size. `HashMismatch` when its bytes are
        another blob, `StoreFull` past the cap: either way nothing is stored. A blob
        already there is not read again."""
        if (size := await self.size(sha256)) is not None:
            return size
        room = self.max_bytes - await self._used_lately()
        if declared is not None and declared > room:
            raise StoreFull(self._full(declared))
        if self.folder is None:
            return self._stored(await self._put_rows(sha256, body, room))
        return self._stored(await self._put_file(sha256, body, room))

    async def _used_lately(self) -> int:
        """The store's size as summed at most `USED_SECONDS` ago, plus what this process
        stored since: the sum is a scan of every blob's row, once per upload it was most
        of a small upload's cost. Orchestrators beside this one add theirs within that."""
        now = time.monotonic()
        if self._used is None or now - self._used[0] > USED_SECONDS:
            self._used = (now, await self.used_bytes())
        return self._used[1]

    def _stored(self, size: int) -> int:
        if self._used is not None:
            self._used = (self._used[0], self._used[1] + size)
        return size

    def _full(self, size: int) -> str:
        cap = self.max_bytes / 1e9
        return (f"the file store is full: {size} more bytes would pass its cap of {cap:g} GB "
                "(store_max_gb); ask the orchestrator's admin")  # fmt: skip

    async def _put_rows(self, sha256: str, body: AsyncIterator[bytes], room: int) -> int:
        digest, size, seq, buffer = hashlib.sha256(), 0, 0, bytearray()
        async with self._sessions() as session:
            async for data in body:
                digest.update(data)
                size += len(data)
                if size > room:
                    raise StoreFull(self._full(size))
                buffer += data
                while len(buffer) >= CHUNK_BYTES:
                    session.add(BlobChunkRow(sha256=sha256, seq=seq,
                                             data=bytes(buffer[:CHUNK_BYTES])))  # fmt: skip
                    del buffer[:CHUNK_BYTES]
                    seq += 1
                    await session.flush()
            if digest.hexdigest() != sha256:
                raise HashMismatch(_mismatch(sha256, digest.hexdigest()))
            if buffer or seq == 0:
                session.add(BlobChunkRow(sha256=sha256, seq=seq, data=bytes(buffer)))
            now = self._clock.now()
            session.add(BlobRow(sha256=sha256, size=size, stored_at=now, used_at=now))
            try:
                await session.commit()
            except IntegrityError:  # the same blob, stored meanwhile by another upload
                await session.rollback()
        return size

    async def _put_file(self, sha256: str, body: AsyncIterator[bytes], room: int) -> int:
        assert self.folder is not None
        temp = self.folder / "incoming" / uuid.uuid4().hex
        temp.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with temp.open("wb") as f:
                async for data in body:
                    digest.update(data)
                    size += len(data)
                    if size > room:
                        raise StoreFull(self._full(size))
                    await asyncio.to_thread(f.write, data)
                await asyncio.to_thread(os.fsync, f.fileno())
            if digest.hexdigest() != sha256:
                raise HashMismatch(_mismatch(sha256, digest.hexdigest()))
            final = self._path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        now = self._clock.now()
        async with self._sessions() as session:
            session.add(BlobRow(sha256=sha256, size=size, stored_at=now, used_at=now))
            with contextlib.suppress(IntegrityError):
                await session.commit()
        return size

    def _path(self, sha256: str) -> Path:
        assert self.folder is not None and is_sha256(sha256)
        return self.folder / sha256[:2] / sha256

    # Out.

    async def read(self, sha256: str, start: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `start`, in pieces (`FileNotFoundError` when gone)."""
        if self.folder is not None:
            path = self._path(sha256)
            with path.open("rb") as f:
                f.seek(start)
                while data := await asyncio.to_thread(f.read, CHUNK_BYTES):
                    yield data
            return
        seq, skip = divmod(start, CHUNK_BYTES)
        while True:
            async with self._sessions() as session:
                chunks = (await session.scalars(
                    select(BlobChunkRow.data)
                    .where(BlobChunkRow.sha256 == sha256, BlobChunkRow.seq >= seq,
                           BlobChunkRow.seq < seq + READ_CHUNKS)
                    .order_by(BlobChunkRow.seq))).all()  # fmt: skip
            for data in chunks:
                yield data[skip:] if skip else data
                skip = 0
            if len(chunks) < READ_CHUNKS:
                return
            seq += READ_CHUNKS

    async def manifest(self, sha256: str) -> Manifest:
        """The stored manifest `sha256`, parsed (and kept: a blob never changes).
        `LookupError` when it is not stored, `ManifestError` when it is no manifest."""
        return (await self._parsed(sha256))[0]

    async def _parsed(self, sha256: str) -> tuple[Manifest, frozenset[str]]:
        """The manifest and the blobs it names, parsed in a thread (100,000 paths take
        seconds: never on the loop that serves the API)."""
        if (cached := self._manifests.get(sha256)) is not None:
            self._manifests.move_to_end(sha256)
            return cached
        size = await self.size(sha256)
        if size is None:
            raise LookupError(f"manifest {sha256} is not in the store")
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{sha256} is too large to be a manifest")
        raw = b"".join([data async for data in self.read(sha256)])
        parsed = await asyncio.to_thread(Manifest.parse, raw)
        kept = (Manifest(parsed.files, parsed.links), frozenset(parsed.blobs()))  # no raw
        self._manifests[sha256] = kept
        self._cached_paths += len(parsed.files) + len(parsed.links)
        while self._cached_paths > MANIFEST_PATHS_CACHED and len(self._manifests) > 1:
            _, (old, _) = self._manifests.popitem(last=False)
            self._cached_paths -= len(old.files) + len(old.links)
        return kept

    async def complete(self, sha256: str) -> Manifest:
        """The manifest `sha256`, when it and every blob it names are stored; else
        `LookupError` naming what is missing."""
        manifest = await self.manifest(sha256)
        lacking = await self.missing(sorted(manifest.blobs()))
        if lacking:
            raise LookupError(f"{len(lacking)} of the files manifest {sha256[:12]} names are "
                              f"not in the store (first: {lacking[0]})")  # fmt: skip
        return manifest

    # What jobs saved.

    async def record(
        self, job_id: uuid.UUID, attempt: int, agent_id: uuid.UUID, kind: str, sha256: str
    ) -> str:
        """An attempt's outputs or checkpoint, saved as the complete manifest `sha256`:
        "applied", or "stale" when the attempt is not its job's current one on that
        agent (`LookupError`, `ManifestError`: the manifest is not stored whole)."""
        manifest = await self.complete(sha256)
        async with self._sessions() as session:
            if not await current(session, job_id, attempt, agent_id):
                return "stale"
            await session.merge(JobFilesRow(
                job_id=job_id, attempt=attempt, kind=kind, manifest=sha256,
                bytes=manifest.total_bytes, files=len(manifest.files),
                saved_at=self._clock.now()))  # fmt: skip
            await session.commit()
        return "applied"

    async def saved(self, job_id: uuid.UUID) -> list[Saved]:
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(JobFilesRow).where(JobFilesRow.job_id == job_id)
                .order_by(JobFilesRow.attempt))).all()  # fmt: skip
        return [Saved(r.attempt, r.kind, r.manifest, r.bytes, r.files, r.saved_at) for r in rows]

    async def fetched(self, agent_id: uuid.UUID, manifest: str) -> None:
        """`agent_id` fetched the snapshot `manifest`: its cache holds it now (placement
        prefers it for the snapshot's next jobs). The first fetch is what is kept."""
        async with self._sessions() as session:
            known = await session.get(AgentSnapshotRow, (agent_id, manifest))
            if known is None:
                session.add(AgentSnapshotRow(agent_id=agent_id, manifest=manifest,
                                             fetched_at=self._clock.now()))  # fmt: skip
                with contextlib.suppress(IntegrityError):
                    await session.commit()

    async def fetched_by(self, manifest: str) -> dict[uuid.UUID, datetime]:
        """When each agent first fetched the snapshot `manifest`."""
        async with self._sessions() as session:
            rows = await session.execute(select(AgentSnapshotRow.agent_id,
                                                AgentSnapshotRow.fetched_at)
                                         .where(AgentSnapshotRow.manifest == manifest))  # fmt: skip
        return {agent_id: at for agent_id, at in rows}

    async def job_snapshot(self, job_id: uuid.UUID) -> str | bool | None:
        """The job's snapshot manifest, None when it has none, False when there is no
        such job."""
        async with self._sessions() as session:
            spec = await session.scalar(select(JobRow.spec).where(JobRow.job_id == job_id))
        if spec is None:
            return False
        snapshot = spec.get("snapshot")
        return snapshot if is_sha256(snapshot) else None

    async def job_has(self, job_id: uuid.UUID, sha256: str) -> bool:
        """Whether an agent running `job_id` may fetch `sha256`: its snapshot or one of its
        checkpoints, a manifest or a file one names."""
        async with self._sessions() as session:
            spec = await session.scalar(select(JobRow.spec).where(JobRow.job_id == job_id))
            mine = (JobFilesRow.job_id == job_id) & (JobFilesRow.kind == "checkpoint")
            checkpoints = (await session.scalars(select(JobFilesRow.manifest).where(mine))).all()
        manifests = list(checkpoints)
        if spec and is_sha256(spec.get("snapshot")):
            manifests.append(spec["snapshot"])
        if sha256 in manifests:
            return True
        for sha in manifests:
            with contextlib.suppress(LookupError, ManifestError):
                if sha256 in (await self._parsed(sha))[1]:
                    return True
        return False

    # Garbage.

    async def collect(self) -> int:
        """Delete every blob that no live job refers to and that nobody wanted within the
        retention; how many. Live: queued or out, or ended within the retention."""
        cutoff = self._clock.now() - timedelta(seconds=self.retention_seconds)
        async with self._sessions() as session:
            live = or_(JobRow.ended_at.is_(None), JobRow.ended_at > cutoff)
            specs: Sequence[dict[str, Any]] = (
                await session.scalars(select(JobRow.spec).where(live))
            ).all()
            saved = (await session.scalars(
                select(JobFilesRow.manifest).join(JobRow, JobRow.job_id == JobFilesRow.job_id)
                .where(live))).all()  # fmt: skip
            old = (await session.scalars(
                select(BlobRow.sha256).where(BlobRow.used_at < cutoff))).all()  # fmt: skip
        if not old:
            return 0
        manifests = {s["snapshot"] for s in specs if is_sha256(s.get("snapshot"))} | set(saved)
        keep = set(manifests)
        for sha in manifests:
            try:
                keep |= (await self._parsed(sha))[1]
            except (LookupError, ManifestError):
                continue
        doomed = [sha for sha in old if sha not in keep]
        for part in _parts(doomed):
            async with self._sessions() as session:
                await session.execute(delete(BlobRow).where(BlobRow.sha256.in_(part)))
                await session.execute(delete(BlobChunkRow).where(BlobChunkRow.sha256.in_(part)))
                await session.commit()
            if self.folder is not None:
                for sha in part:
                    self._path(sha).unlink(missing_ok=True)
        if doomed:
            log.info("file store: %d blobs no job refers to deleted", len(doomed))
        return len(doomed)


async def current(
    session: AsyncSession, job_id: uuid.UUID, attempt: int, agent_id: uuid.UUID
) -> bool:
    """Whether `attempt` is `job_id`'s current attempt, out on `agent_id`."""
    found = await session.scalar(select(JobRow.job_id).where(
        JobRow.job_id == job_id, JobRow.attempt == attempt, JobRow.agent_id == agent_id,
        JobRow.state.in_(OUT)))  # fmt: skip
    return found is not None


async def warm_agents(session: AsyncSession, manifests: set[str]) -> dict[str, frozenset[str]]:
    """For each snapshot, the agents that fetched it (`BlobStore.fetched`)."""
    found: dict[str, set[str]] = {}
    for part in _parts(sorted(manifests)):
        rows = await session.execute(select(AgentSnapshotRow.manifest, AgentSnapshotRow.agent_id)
                                     .where(AgentSnapshotRow.manifest.in_(part)))  # fmt: skip
        for manifest, agent_id in rows:
            found.setdefault(manifest, set()).add(str(agent_id))
    return {m: frozenset(agents) for m, agents in found.items()}


async def latest_checkpoint(
    session: AsyncSession, job_id: uuid.UUID, before: int
) -> JobFilesRow | None:
    """The checkpoint the job's attempt `before` starts from: the one saved last by an
    earlier attempt."""
    return await session.scalar(
        select(JobFilesRow)
        .where(JobFilesRow.job_id == job_id, JobFilesRow.kind == "checkpoint",
               JobFilesRow.attempt < before)
        .order_by(JobFilesRow.saved_at.desc(), JobFilesRow.attempt.desc())
        .limit(1)
    )  # fmt: skip


def _mismatch(claimed: str, actual: str) -> str:
    return f"the bytes sent hash to {actual}, not {claimed}: nothing stored"


def _parts(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), IN_CLAUSE):
        yield items[i : i + IN_CLAUSE]
