"""FastAPI dependencies: the orchestrator and a database session per request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.orchestrator.service import Orchestrator


# Dependencies that do no I/O are still `async def`: FastAPI runs a plain `def` one in a
# worker thread, a round trip through the thread pool for every request.
async def get_orchestrator(request: Request) -> Orchestrator:
    orchestrator: Orchestrator = request.app.state.orchestrator
    return orchestrator


OrchestratorDep = Annotated[Orchestrator, Depends(get_orchestrator)]


async def get_session(orchestrator: OrchestratorDep) -> AsyncIterator[AsyncSession]:
    async with orchestrator.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


# Documented as what the server accepts: a UUID (a 400 names anything else).
UUID_TEXT: dict[str, Any] = {"format": "uuid"}


def _path_uuid(name: str, text: str) -> uuid.UUID:
    """A path id, or 400 (not FastAPI's 422) when it is not a UUID."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise HTTPException(400, f"{name} {text[:64]!r} is not a UUID") from None


async def parse_agent_id(
    agent_id: Annotated[str, Path(json_schema_extra=UUID_TEXT, description="the agent's UUID")],
) -> uuid.UUID:
    return _path_uuid("agent_id", agent_id)


async def parse_job_id(
    job_id: Annotated[str, Path(json_schema_extra=UUID_TEXT, description="the job's UUID")],
) -> uuid.UUID:
    return _path_uuid("job_id", job_id)


async def parse_token_id(
    token_id: Annotated[str, Path(json_schema_extra=UUID_TEXT, description="the token's id")],
) -> uuid.UUID:
    return _path_uuid("token_id", token_id)


AgentIdDep = Annotated[uuid.UUID, Depends(parse_agent_id)]
TokenIdDep = Annotated[uuid.UUID, Depends(parse_token_id)]
JobIdDep = Annotated[uuid.UUID, Depends(parse_job_id)]
