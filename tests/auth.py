"""Credentials for tests: the tokens test orchestrators use, and agents' secrets."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import httpx

from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.auth import AgentCredential

API_TOKEN = "test-api-token-0123456789"
ENROLL_TOKEN = "test-enroll-token-0123456789"
SECRET_KEY = "test-secret-key-0123456789"
API_HEADERS = {"authorization": f"Bearer {API_TOKEN}"}
# What a test orchestrator process is started with.
TOKENS_ENV = {
    "CHIFFON_API_TOKEN": API_TOKEN,
    "CHIFFON_ENROLL_TOKEN": ENROLL_TOKEN,
    "CHIFFON_SECRET_KEY": SECRET_KEY,
    # Their agents enroll with the shared token and run jobs at once; the approval step
    # itself is tested in tests/test_agent_trust.py and tests/test_cli_trust.py.
    "CHIFFON_AUTO_APPROVE": "1",
}


async def issue(orch: Orchestrator, agent_id: uuid.UUID) -> AgentCredential:
    """Enroll an agent in process (as `chiffon up` does for its own)."""
    return await orch.credentials.issue(agent_id)


async def keyring(
    orch: Orchestrator, agent_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, AgentCredential]:
    """A credential for each agent, for a publisher that carries many agents' messages."""
    return {agent_id: await issue(orch, agent_id) for agent_id in set(agent_ids)}


def enroll(url: str, agent_id: uuid.UUID) -> AgentCredential:
    """Enroll over HTTP with the test enrollment token."""
    resp = httpx.post(
        f"{url}/api/v1/enroll",
        json={"agent_id": str(agent_id)},
        headers={"authorization": f"Bearer {ENROLL_TOKEN}"},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    return AgentCredential(agent_id, resp.json()["secret"])


def bearer(credential: AgentCredential) -> dict[str, str]:
    return {"authorization": credential.bearer}
