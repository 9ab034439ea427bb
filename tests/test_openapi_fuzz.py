"""The OpenAPI document is a contract, checked as an outside client would check it, against a
real `chiffon orchestrator` with its API token:

- schemathesis 4's own CLI, every phase (examples, coverage, fuzzing, stateful) and every
  check, must find 0 failures (broken `$ref`s, undocumented status codes, a schema-valid
  request refused, a wrong `Allow` header were all found this way);
- a typed client generated from `/openapi.json` by a real generator (openapi-python-client,
  in its own venv `.tools/`, which `scripts/test` makes) is imported and used.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.auth import API_TOKEN, ENROLL_TOKEN, bearer, enroll
from tests.procs import orchestrator_process
from tests.services import require_services

ROOT = Path(__file__).resolve().parents[1]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
GENERATOR = ROOT / ".tools" / "bin" / "openapi-python-client"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Long-polls answer within half a second: schemathesis waits for every answer.
    with orchestrator_process(
        tmp_path_factory.mktemp("contract"), env={"CHIFFON_LONG_POLL_MAX_SECONDS": "0.5"}
    ) as url:
        agent = uuid.uuid4()
        beat = f.raw(f.message(agent, name="contract-desk"))
        resp = httpx.post(
            f"{url}/api/v1/agents/{agent}/heartbeat",
            content=beat,
            headers=bearer(enroll(url, agent)),
        )
        assert resp.status_code == 200, resp.text
        yield url


def test_every_ref_in_the_document_resolves(live: str) -> None:
    spec = httpx.get(f"{live}/openapi.json").json()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    schemas = spec["components"]["schemas"]
    assert refs and all(r.startswith("#/components/schemas/") for r in refs), refs
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)
    body = spec["paths"]["/api/v1/agents/{agent_id}/heartbeat"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AgentMessage"
    }


def test_schemathesis_all_phases_all_checks_find_nothing(live: str, tmp_path: Path) -> None:
    command = [
        str(SCHEMATHESIS), "run", f"{live}/openapi.json",
        "--phases=examples,coverage,fuzzing,stateful", "--checks", "all",
        "-H", f"Authorization: Bearer {API_TOKEN}",
        "--max-examples", "30", "--workers", "1", "--seed", "20261202",
        "--continue-on-failure", "--no-color",
    ]  # fmt: skip
    # A body over the API's 64 KiB limit is refused with 413 before it is read: as much a
    # rejection of invalid data as a 400 or a 422.
    # What the schema cannot say is refused for what it is: bytes uploaded as a blob that
    # they do not hash to (400), a submission naming a snapshot the store does not hold
    # (422), an Idempotency-Key sent again with another submission (409).
    (tmp_path / "schemathesis.toml").write_text(
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "413", "422"]\n'
        "[[operations]]\n"
        "include-path-regex = '/blobs/\\{sha256\\}$'\n"
        'include-method = "PUT"\n'
        'checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409"]\n'
        "[[operations]]\n"
        'include-path = "/api/v1/jobs"\n'
        'include-method = "POST"\n'
        'checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", '
        '"422"]\n'
    )
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    summary = "\n".join(line[:300] for line in done.stdout.splitlines())[-6000:]
    assert done.returncode == 0, summary
    assert "passed" in summary and "failure" not in summary.split("SUMMARY")[-1], summary


def _generator() -> Path:
    if GENERATOR.exists():
        return GENERATOR
    message = f"{GENERATOR} is missing (scripts/test installs it)"
    if require_services():
        pytest.fail(f"{message} and CHIFFON_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def test_a_client_generated_from_the_document_calls_the_api(live: str, tmp_path: Path) -> None:
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(httpx.get(f"{live}/openapi.json").json()))
    env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    generated = subprocess.run(
        [str(_generator()), "generate", "--path", str(spec), "--meta", "none",
         "--output-path", str(tmp_path / "chiffon_generated")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stdout + generated.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        client_mod = importlib.import_module("chiffon_generated.client")
        list_agents = importlib.import_module("chiffon_generated.api.agents.list_agents")
        capacity = importlib.import_module("chiffon_generated.api.agents.available_capacity")
        enroll_op = importlib.import_module("chiffon_generated.api.ingest.enroll")
        models = importlib.import_module("chiffon_generated.models")
        desk = uuid.uuid4()  # its own agent: the schemathesis run may have deleted others
        beat = f.raw(
            f.message(desk, name="generated-client-desk", res=f.resources(cores_physical=64))
        )
        headers = bearer(enroll(live, desk))
        httpx.post(f"{live}/api/v1/agents/{desk}/heartbeat", content=beat, headers=headers)
        with client_mod.AuthenticatedClient(base_url=live, token=API_TOKEN) as client:
            agents = {a.name: a for a in list_agents.sync(client=client)}
            assert agents["generated-client-desk"].status.value == "online"
            assert agents["generated-client-desk"].agent_id == desk
            best = capacity.sync(client=client, min_cpu_cores=60)
            assert [c.name for c in best] == ["generated-client-desk"]
        with client_mod.AuthenticatedClient(base_url=live, token=ENROLL_TOKEN) as enrolling:
            new = uuid.uuid4()
            answer = enroll_op.sync(client=enrolling, body=models.EnrollRequest(agent_id=new))
            assert answer.agent_id == new and len(answer.secret) > 20
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("chiffon_generated")]:
            del sys.modules[name]


# Bodies on the edge of a rule: the document and the server must agree on each.
EDGE_BODIES: list[dict[str, Any]] = [
    {"command": ["true"]},
    {"command": ["a\u0000b"]},  # a NUL in the program's name (prefixItems hid `items`)
    {"command": ["true", "x\u0000"]},
    {"command": [""]},
    {"command": ["true", ""]},
    {"command": []},
    {"command": ["x" * 4097]},
    {"command": ["true"], "workdir": "proj"},
    {"command": ["true"], "workdir": "/tmp"},
    {"command": ["true"], "workdir": "/a\u0000b"},
    {"command": ["true"], "env": {"CHIFFON_X": "1"}},
    {"command": ["true"], "env": {"OK": "a\u0000"}},
    {"command": ["true"], "env": {"OK": "fine"}},
    {"command": ["true"], "retries": -1},
    {"command": ["true"], "timeout_seconds": 0},
    {"command": ["true"], "requirements": {"gpus": 1, "vram_gb": 8}},
    {"command": ["true"], "requirements": {"gpus": -1}},
    {"command": ["true"], "surprise": 1},
]


def test_the_document_and_the_server_agree_on_every_edge_of_a_job(live: str) -> None:
    """Every rule the server applies to a submitted job is in the document: a client that
    validates against `/openapi.json` sends exactly what the server accepts."""
    import jsonschema_rs

    spec = httpx.get(f"{live}/openapi.json").json()
    # The body's schema as a standalone JSON Schema 2020-12 document, its refs kept.
    text = json.dumps({"$ref": "#/$defs/JobSubmit", "$defs": spec["components"]["schemas"]})
    schema = json.loads(text.replace("#/components/schemas/", "#/$defs/"))
    validator = jsonschema_rs.Draft202012Validator(schema)
    disagree = []
    for body in EDGE_BODIES:
        resp = httpx.post(f"{live}/api/v1/jobs", json=body,
                          headers={"authorization": f"Bearer {API_TOKEN}"})  # fmt: skip
        assert resp.status_code in (201, 200, 422), resp.text
        if validator.is_valid(body) != resp.is_success:
            disagree.append((body, validator.is_valid(body), resp.status_code))
    assert not disagree, disagree
