"""Jobs' files over HTTP: the content-addressed store (`orchestrator.store`).

The user's side takes the API token (the read-only token downloads, and uploads nothing):
which blobs the store lacks, a blob's upload and its download, and what a job saved.
The agent's side takes the agent's own secret and names the attempt: an agent fetches
only the blobs of a job whose current attempt it holds, and saves that attempt's outputs
and checkpoint. Blobs never travel in a heartbeat or an order: an order names a manifest
by its hash, and the agent fetches the rest here (docs/jobs.md, "Your code and data").

A download answers `Range: bytes=N-` with the rest (206), so a dropped transfer resumes.
An upload is read as a stream after the caller is checked, hashed as it arrives, and
stored only when its hash is the one it was sent as.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep
from chiffon.api.deps import AgentIdDep, JobIdDep, OrchestratorDep
from chiffon.api.routes_work import AttemptVerdict, the_agent
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.store import HashMismatch, StoreFull, current
from chiffon.schemas.api import ErrorDetail
from chiffon.schemas.files import ManifestError, is_sha256
from chiffon.schemas.jobs import (
    BlobHashes,
    BlobStored,
    FileEntry,
    FileSet,
    FilesSaved,
    JobFiles,
    MissingBlobs,
)

router = APIRouter(
    prefix="/api/v1", tags=["files"], dependencies=[ApiTokenDep], responses=UNAUTHORIZED
)
agent_router = APIRouter(prefix="/api/v1/agents/{agent_id}/attempts", tags=["work"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 401, 404, 409, 413, 422, 503, 507)
}
_UPLOAD = re.compile(r"^/api/v1/(agents/[^/]+/attempts/[^/]+/[^/]+/)?blobs/[0-9a-f]{64}$")
_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
    }
}
_HASHES_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": BlobHashes.model_json_schema()}},
    }
}
_SAVED_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": FilesSaved.model_json_schema()}},
    }
}
_BYTES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "the rest"},
}


_ASKS = re.compile(r"^/api/v1/(blobs/missing|agents/[^/]+/attempts/[^/]+/[^/]+/missing)$")
# Which of 100,000 hashes are missing: about 70 bytes each in JSON.
ASK_MAX_BYTES = 8 * 1024 * 1024


def body_limit(scope: Scope) -> int | None:
    """A files route's own body limit (`api.body_limit`): a blob's upload is bounded by
    the store as it is read (0); asking which blobs are missing, by `ASK_MAX_BYTES`."""
    method, path = scope.get("method"), scope.get("path", "")
    if method == "PUT" and _UPLOAD.match(path):
        return 0
    if method == "POST" and _ASKS.match(path):
        return ASK_MAX_BYTES
    return None


async def _sha(
    sha256: Annotated[
        str,
        Path(description="the blob's SHA-256, 64 lowercase hex digits",
             json_schema_extra={"pattern": "^[0-9a-f]{64}$"}),
    ],
) -> str:  # fmt: skip
    if not is_sha256(sha256):
        raise HTTPException(400, f"{sha256[:80]!r} is not a SHA-256 (64 lowercase hex digits)")
    return sha256


ShaDep = Annotated[str, Depends(_sha)]
AttemptNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


# The user's side.


@router.post(
    "/blobs/missing", response_model=MissingBlobs, responses=_ERRORS, openapi_extra=_HASHES_BODY
)
async def missing(orchestrator: OrchestratorDep, request: Request) -> MissingBlobs:
    """Which of these blobs the store lacks: upload only those."""
    asked = await _hashes(request)
    return MissingBlobs(missing=await orchestrator.store.missing(asked.sha256))


@router.put(
    "/blobs/{sha256}", status_code=201, response_model=BlobStored, responses=_ERRORS,
    openapi_extra=_RAW_BODY,
)  # fmt: skip
async def upload(sha256: ShaDep, orchestrator: OrchestratorDep, request: Request) -> BlobStored:
    """A blob's bytes, stored under their SHA-256 once they hash to it."""
    return await _store(orchestrator, sha256, request)


@router.get("/blobs/{sha256}", responses={**_ERRORS, **_BYTES})
async def download(
    sha256: ShaDep, orchestrator: OrchestratorDep, request: Request
) -> StreamingResponse:
    """A blob's bytes; with `Range: bytes=N-`, from byte N (206)."""
    return await _send(orchestrator, sha256, request)


@router.get("/jobs/{job_id}/files", response_model=JobFiles, responses=_ERRORS)
async def job_files(job_id: JobIdDep, orchestrator: OrchestratorDep) -> JobFiles:
    """What the job runs in, its latest outputs and its latest checkpoint, each file with
    its hash (download each with `GET /api/v1/blobs/{sha256}`)."""
    snapshot = await orchestrator.store.job_snapshot(job_id)
    if snapshot is False:
        raise HTTPException(404, f"no job {job_id}")
    saved = await orchestrator.store.saved(job_id)
    latest = {s.kind: s for s in sorted(saved, key=lambda s: (s.saved_at, s.attempt))}
    sets = {}
    for kind, s in latest.items():
        try:
            manifest = await orchestrator.store.manifest(s.manifest)
        except (LookupError, ManifestError):
            continue  # collected: nothing to show
        entries = [FileEntry(path=e.path, sha256=e.sha256, size=e.size, exec=e.executable)
                   for e in manifest.files]  # fmt: skip
        sets[kind] = FileSet(attempt=s.attempt, manifest=s.manifest, bytes=s.bytes,
                             files=s.files, saved_at=s.saved_at, entries=entries)  # fmt: skip
    return JobFiles(job_id=job_id, snapshot=snapshot or None,
                    outputs=sets.get("output"), checkpoint=sets.get("checkpoint"))  # fmt: skip


# The agent's side.


async def _attempt_of(
    orchestrator: Orchestrator, agent_id: uuid.UUID, job_id: uuid.UUID, attempt: int
) -> None:
    """409 unless `attempt` is the job's current one, out on `agent_id`."""
    async with orchestrator.sessions() as session:
        if not await current(session, job_id, attempt, agent_id):
            raise HTTPException(409, f"attempt {attempt} of {job_id} is not out on this agent")


@agent_router.post(
    "/{job_id}/{attempt}/missing", response_model=MissingBlobs, responses=_ERRORS,
    openapi_extra=_HASHES_BODY,
)  # fmt: skip
async def agent_missing(
    agent_id: AgentIdDep, job_id: JobIdDep, attempt: AttemptNumber, request: Request,
    orchestrator: OrchestratorDep,
) -> MissingBlobs:  # fmt: skip
    await the_agent(orchestrator, agent_id, request)
    await _attempt_of(orchestrator, agent_id, job_id, attempt)
    asked = await _hashes(request)
    return MissingBlobs(missing=await orchestrator.store.missing(asked.sha256))


@agent_router.get(
    "/{job_id}/{attempt}/blobs/{sha256}", responses={**_ERRORS, **_BYTES}
)  # fmt: skip
async def agent_download(
    agent_id: AgentIdDep, job_id: JobIdDep, attempt: AttemptNumber, sha256: ShaDep,
    request: Request, orchestrator: OrchestratorDep,
) -> StreamingResponse:  # fmt: skip
    """A blob of the attempt's job (its snapshot, a checkpoint of it), to the agent that
    holds the attempt; with `Range: bytes=N-`, from byte N."""
    await the_agent(orchestrator, agent_id, request)
    await _attempt_of(orchestrator, agent_id, job_id, attempt)
    if not await orchestrator.store.job_has(job_id, sha256):
        raise HTTPException(404, f"blob {sha256} is not one of job {job_id}'s files")
    if sha256 == await orchestrator.store.job_snapshot(job_id):
        await orchestrator.store.fetched(agent_id, sha256)
    return await _send(orchestrator, sha256, request)


@agent_router.put(
    "/{job_id}/{attempt}/blobs/{sha256}", status_code=201, response_model=BlobStored,
    responses=_ERRORS, openapi_extra=_RAW_BODY,
)  # fmt: skip
async def agent_upload(
    agent_id: AgentIdDep, job_id: JobIdDep, attempt: AttemptNumber, sha256: ShaDep,
    request: Request, orchestrator: OrchestratorDep,
) -> BlobStored:  # fmt: skip
    """A file of the attempt's outputs or checkpoint."""
    await the_agent(orchestrator, agent_id, request)
    await _attempt_of(orchestrator, agent_id, job_id, attempt)
    return await _store(orchestrator, sha256, request)


@agent_router.post(
    "/{job_id}/{attempt}/files", response_model=AttemptVerdict, responses=_ERRORS,
    openapi_extra=_SAVED_BODY,
)  # fmt: skip
async def agent_saved(
    agent_id: AgentIdDep, job_id: JobIdDep, attempt: AttemptNumber, request: Request,
    orchestrator: OrchestratorDep,
) -> AttemptVerdict:  # fmt: skip
    """The attempt's outputs or checkpoint are stored whole, as this manifest."""
    await the_agent(orchestrator, agent_id, request)
    try:
        said = FilesSaved.model_validate_json(await request.body())
    except ValidationError as exc:
        raise HTTPException(422, _first(exc)) from None
    try:
        verdict = await orchestrator.store.record(job_id, attempt, agent_id, said.kind,
                                                  said.manifest)  # fmt: skip
    except (LookupError, ManifestError) as exc:
        raise HTTPException(422, f"manifest: {exc}") from None
    return AttemptVerdict(verdict=verdict)


# Shared.


async def _hashes(request: Request) -> BlobHashes:
    try:
        return BlobHashes.model_validate_json(await request.body())
    except ValidationError as exc:
        raise HTTPException(422, _first(exc)) from None


def _first(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


async def _store(orchestrator: Orchestrator, sha256: str, request: Request) -> BlobStored:
    declared = request.headers.get("content-length")
    try:
        size = await orchestrator.store.put(
            sha256, request.stream(), declared=int(declared) if declared and declared.isdigit()
            else None,
        )  # fmt: skip
    except HashMismatch as exc:
        raise HTTPException(400, str(exc)) from None
    except StoreFull as exc:
        raise HTTPException(507, str(exc)) from None
    except ClientDisconnect:
        raise HTTPException(400, "the upload was cut off: nothing stored") from None
    return BlobStored(sha256=sha256, size=size)


async def _send(orchestrator: Orchestrator, sha256: str, request: Request) -> StreamingResponse:
    size = await orchestrator.store.size(sha256)
    if size is None:
        raise HTTPException(404, f"no blob {sha256} in the store")
    start = _range_start(request.headers.get("range"), size)
    body: AsyncIterator[bytes] = orchestrator.store.read(sha256, start)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(size - start)}
    if start:
        headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    return StreamingResponse(body, status_code=206 if start else 200, headers=headers,
                             media_type="application/octet-stream")  # fmt: skip


def _range_start(header: str | None, size: int) -> int:
    """Where `Range: bytes=N-` (or `N-M`, read as `N-`) starts; 0 without one; 416 past
    the end."""
    if not header:
        return 0
    match = re.fullmatch(r"bytes=(\d{1,19})-(\d{0,19})", header.strip())
    if match is None:
        raise HTTPException(416, f"only 'Range: bytes=N-' is served, not {header[:80]!r}")
    start = int(match.group(1))
    if start >= size and size:
        raise HTTPException(416, f"range starts at {start}, past the blob's {size} bytes")
    return min(start, size)
