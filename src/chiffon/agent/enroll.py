"""Enrollment: the agent trades the orchestrator's enrollment token for its own secret, once,
retrying while the orchestrator cannot be reached (never when it said no)."""

from __future__ import annotations

import uuid

from chiffon.backoff import Backoff, retry
from chiffon.transport.auth import AgentCredential
from chiffon.transport.base import TransportError
from chiffon.transport.http import EnrollmentRefusedError, enroll

ENROLL_ATTEMPTS = 8
# 1 s, 2 s, 4 s ... 30 s: about two minutes for an orchestrator that is still starting
ENROLL_BACKOFF = Backoff(initial_seconds=1.0, max_seconds=30.0)


def _outage(exc: Exception) -> bool:
    return isinstance(exc, TransportError) and not isinstance(exc, EnrollmentRefusedError)


async def enroll_with_retries(
    orchestrator_url: str, *, token: str, agent_id: uuid.UUID, timeout_seconds: float
) -> AgentCredential:
    """The agent's credential; `EnrollmentRefusedError` at once when the orchestrator
    refuses, `TransportError` when it could not be reached in `ENROLL_ATTEMPTS` tries."""
    return await retry(
        "enrolling with the orchestrator",
        lambda: enroll(
            orchestrator_url, token=token, agent_id=agent_id, timeout_seconds=timeout_seconds
        ),
        backoff=ENROLL_BACKOFF,
        attempts=ENROLL_ATTEMPTS,
        worth_retrying=_outage,
    )
