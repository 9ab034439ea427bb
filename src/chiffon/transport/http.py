"""The HTTP transport: POST each message to the orchestrator's ingest route."""

from __future__ import annotations

import httpx

from chiffon.schemas.heartbeat import AgentMessage
from chiffon.transport.base import TransportError


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail) if detail else resp.reason_phrase


class HttpPublisher:
    """`POST {url}/api/v1/agents/{agent_id}/heartbeat` (or `/offline`) with the message JSON."""

    def __init__(self, orchestrator_url: str, *, timeout_seconds: float = 5.0) -> None:
        self.orchestrator_url = orchestrator_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
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
        try:
            resp = await self._client.post(
                path,
                content=message.model_dump_json().encode(),
                headers={"content-type": "application/json"},
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
