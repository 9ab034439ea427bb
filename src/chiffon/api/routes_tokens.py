"""Enrollment tokens an admin makes: limited in uses, in time, or both (`chiffon tokens`)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep
from chiffon.api.deps import OrchestratorDep, SessionDep, TokenIdDep
from chiffon.persistence import credentials as repo
from chiffon.schemas.api import ErrorDetail, TokenCreate, TokenCreated, TokenInfo

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/api/v1", tags=["tokens"], dependencies=[ApiTokenDep], responses=UNAUTHORIZED
)
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorDetail}}
_REFUSED: dict[int | str, dict[str, Any]] = {422: {"model": ErrorDetail}}


@router.post("/enroll-tokens", response_model=TokenCreated, status_code=201, responses=_REFUSED)
async def create_token(want: TokenCreate, orchestrator: OrchestratorDep) -> TokenCreated:
    """A new enrollment token, shown once (only its SHA-256 is kept). A desktop enrolled
    with it waits for `chiffon agents approve` unless it `approves`."""
    now = orchestrator.clock.now()
    expires_at = (
        None if want.expires_seconds is None else now + timedelta(seconds=want.expires_seconds)
    )
    token, token_id = await orchestrator.credentials.make_token(
        uses=want.uses, expires_at=expires_at, approves=want.approves, note=want.note
    )
    log.warning(
        "enrollment token %s made (uses %s, expires %s, approves %s)",
        token_id,
        want.uses or "unlimited",
        expires_at or "never",
        want.approves,
    )
    return TokenCreated(
        token=token,
        token_id=token_id,
        uses_left=want.uses,
        expires_at=expires_at,
        approves=want.approves,
        note=want.note,
        created_at=now,
    )


@router.get("/enroll-tokens", response_model=list[TokenInfo])
async def list_tokens(session: SessionDep, orchestrator: OrchestratorDep) -> list[TokenInfo]:
    """The made tokens that can still enroll (expired and used-up ones are gone)."""
    now = orchestrator.clock.now()
    rows = await repo.list_enroll_tokens(session)
    return [
        TokenInfo.model_validate(row, from_attributes=True)
        for row in rows
        if row.expires_at is None or row.expires_at > now
    ]


@router.delete("/enroll-tokens/{token_id}", status_code=204, responses=_NOT_FOUND)
async def delete_token(token_id: TokenIdDep, session: SessionDep) -> Response:
    """Withdraw a made token: it enrolls no one from now on."""
    if not await repo.delete_enroll_token(session, token_id=token_id):
        raise HTTPException(404, f"no enrollment token {token_id}")
    await session.commit()
    return Response(status_code=204)
