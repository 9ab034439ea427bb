"""The HTTP transport: POST each message to the orchestrator's ingest route."""

from __future__ import annotations

import uuid

import httpx

from chiffon.schemas.heartbeat import AgentMessage
from chiffon.transport.auth import AgentCredential, Credentials, credential_for
from chiffon.transport.base import TransportError


class EnrollmentRefusedError(TransportError):
    """The orchestrator answered and said no (bad token, already enrolled): retrying is futile."""


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail) if detail else resp.reason_phrase


class HttpPublisher:
    """`POST {url}/api/v1/agents/{agent_id}/heartbeat` (or `/offline`) with the message JSON,
    and `Authorization: Bearer <agent secret>` when it has a credential."""

    def __init__(
        self,
        orchestrator_url: str,
        *,
        timeout_seconds: float = 5.0,
        credential: Credentials | None = None,
    ) -> None:
        self.orchestrator_url = orchestrator_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self._credential = credential
        self._client: httpx.AsyncClient | None = None

    async def connect(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.orchestrator_url, timeout=self.timeout_seconds
            )

    async def publish(self, message: AgentMessage) -> None:
        if self._client is None:
            raise TransportError("HTTP transport is not connected")
        route = "heartbeat" if message.kind == "heartbeat" else "offline"
        path = f"/api/v1/agents/{message.agent_id}/{route}"
        headers = {"content-type": "application/json"}
        credential = credential_for(self._credential, message.agent_id)
        if credential is not None:
            headers["authorization"] = credential.bearer
        try:
            resp = await self._client.post(
                path, content=message.model_dump_json().encode(), headers=headers
            )
        except httpx.TimeoutException:
            raise TransportError(
                f"{self.orchestrator_url} did not answer within {self.timeout_seconds:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise TransportError(
                f"cannot reach {self.orchestrator_url}: {type(exc).__name__}: {exc}"
            ) from None
        if not resp.is_success:
            raise TransportError(
                f"orchestrator refused it: HTTP {resp.status_code}: {_detail(resp)}"
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def enroll(
    orchestrator_url: str, *, token: str, agent_id: uuid.UUID, timeout_seconds: float = 5.0
) -> AgentCredential:
    """Trade the enrollment token for this agent's own secret (`POST /api/v1/enroll`).

    `EnrollmentRefusedError` when the orchestrator says no; `TransportError` when it cannot
    be reached (worth a retry).
    """
    url = orchestrator_url.rstrip("/")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_seconds) as client:
            resp = await client.post(
                "/api/v1/enroll",
                json={"agent_id": str(agent_id)},
                headers={"authorization": f"Bearer {token}"},
            )
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code >= 500:
        raise TransportError(f"orchestrator could not enroll us: HTTP {resp.status_code}")
    if not resp.is_success:
        raise EnrollmentRefusedError(
            f"enrollment refused: HTTP {resp.status_code}: {_detail(resp)}"
        )
    try:
        body = resp.json()
        return AgentCredential(uuid.UUID(body["agent_id"]), str(body["secret"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"enrollment answer is not understood: {exc}") from None
