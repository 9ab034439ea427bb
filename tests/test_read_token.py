"""The read-only token (CHIFFON_READ_TOKEN) reads every route the API token reads and
changes nothing: walked over every route of the app, so a route added later is covered."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from chiffon.api.app import create_app
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from tests.auth import API_HEADERS
from tests.conftest import api_client
from tests.procs import orchestrator_process, run_cli

READ_TOKEN = "test-read-token-0123456789"
READER = {"authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture
def settings(settings: OrchestratorSettings) -> OrchestratorSettings:
    return settings.model_copy(update={"read_token": SecretStr(READ_TOKEN)})


def token_routes(orch: Orchestrator) -> list[tuple[str, str]]:
    """(method, path with every parameter filled) of each operation behind the API token:
    those whose OpenAPI operation names the bearer scheme (enrollment aside)."""
    spec = create_app(orch, manage_lifecycle=False).openapi()
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if operation.get("security") and path != "/api/v1/enroll":
                found.append((method.upper(), re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)))
    return found


async def test_it_reads_everything_and_changes_nothing(orchestrator: Orchestrator) -> None:
    routes = token_routes(orchestrator)
    assert {m for m, _ in routes} >= {"GET", "POST", "DELETE"} and len(routes) > 10
    async with api_client(orchestrator, READER) as reader:
        for method, path in routes:
            resp = await reader.request(method, path, json={})
            if method in ("GET", "HEAD"):
                assert resp.status_code not in (401, 403), (method, path, resp.text)
            else:
                assert resp.status_code == 403, (method, path, resp.text)
                assert "read-only token" in resp.json()["detail"]
    async with api_client(orchestrator, API_HEADERS) as admin:  # the API token still may
        resp = await admin.post("/api/v1/jobs", json={"command": ["true"]})
        assert resp.status_code == 201
    async with api_client(orchestrator, {"authorization": "Bearer wrong"}) as stranger:
        assert (await stranger.get("/api/v1/jobs")).status_code == 401


def test_the_cli_reads_with_it_and_says_why_it_cannot_submit(tmp_path: Path) -> None:
    with orchestrator_process(tmp_path, env={"CHIFFON_READ_TOKEN": READ_TOKEN}) as url:
        env = {"CHIFFON_ORCHESTRATOR_URL": url, "CHIFFON_API_TOKEN": "",
               "CHIFFON_READ_TOKEN": READ_TOKEN}  # fmt: skip
        listed = run_cli("jobs", env=env)
        assert listed.returncode == 0 and "no jobs" in listed.stdout, listed.stderr
        assert run_cli("agents", env=env).returncode == 0
        refused = run_cli("run", "--", "true", env=env)
        assert refused.returncode == 2
        assert "read-only token" in refused.stderr and "HTTP 403" in refused.stderr
