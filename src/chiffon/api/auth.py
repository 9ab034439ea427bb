"""Bearer credentials: the API token for reads and admin, the enrollment token, and the
agents' own secrets for ingest (checked by the orchestrator). All compared in constant time."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from chiffon.api.deps import OrchestratorDep
from chiffon.schemas.api import ErrorDetail

log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False, description="CHIFFON_API_TOKEN")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
# Every API route answers 400 (a parameter it refuses), 401 (no or a wrong credential) and
# 403 (the read-only token, for a change).
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail},
    401: {"model": ErrorDetail},
    403: {"model": ErrorDetail},
}


def token_matches(presented: str, expected: SecretStr | None) -> bool:
    """Constant time; an unset expected token matches nothing."""
    if expected is None or not expected.get_secret_value():
        return False
    return hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str | None:
    """The credential of `Authorization: Bearer <credential>`, if any."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None


READ_METHODS = frozenset({"GET", "HEAD"})


async def require_api_token(
    request: Request, orchestrator: OrchestratorDep, credentials: BearerDep
) -> None:
    """401 unless the request carries the API token (CHIFFON_API_TOKEN), or the read-only
    token (CHIFFON_READ_TOKEN) for a read; 403 when the read-only token asks for a change."""
    if credentials is None:
        raise unauthorized("missing Authorization: Bearer <CHIFFON_API_TOKEN>")
    settings = orchestrator.settings
    if token_matches(credentials.credentials, settings.api_token):
        return
    if token_matches(credentials.credentials, settings.read_token):
        if request.method in READ_METHODS:
            return
        raise HTTPException(403, "the read-only token (CHIFFON_READ_TOKEN) changes nothing")
    raise unauthorized("invalid API token")


@dataclass(frozen=True, slots=True)
class EnrollGrant:
    """What an enrollment presented: the API token or an approving token make the agent
    approved at once; a made token (`chiffon tokens create`) is spent when the agent's
    credential is written, in that transaction."""

    approved: bool
    made_token_sha256: str | None = None


async def require_enroll_token(
    orchestrator: OrchestratorDep, credentials: BearerDep
) -> EnrollGrant:
    """401 unless the request carries the enrollment token, a token made by `chiffon
    tokens create` (checked, not yet spent), or the API token."""
    settings = orchestrator.settings
    presented = "" if credentials is None else credentials.credentials
    if token_matches(presented, settings.api_token):
        return EnrollGrant(approved=True)
    if token_matches(presented, settings.enroll_token):
        return EnrollGrant(approved=settings.auto_approve)
    if presented and (made := await orchestrator.credentials.made_token(presented)) is not None:
        return EnrollGrant(approved=made.approves or settings.auto_approve,
                           made_token_sha256=made.token_sha256)  # fmt: skip
    orchestrator.metrics.enrollments.labels("bad_token").inc()
    log.warning(
        "enrollment refused: %s enrollment token", "no" if credentials is None else "a wrong"
    )
    if credentials is None:
        raise unauthorized("missing Authorization: Bearer <CHIFFON_ENROLL_TOKEN>")
    raise unauthorized("invalid, used up or expired enrollment token")


ApiTokenDep = Depends(require_api_token)
EnrollGrantDep = Annotated[EnrollGrant, Depends(require_enroll_token)]
