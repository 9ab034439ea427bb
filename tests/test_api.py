"""The seeds' capacity scenarios through the REST API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.heartbeat import Resources, Sandbox
from chiffon.schemas.metrics import REGISTRY
from tests import factories as f
from tests.auth import API_HEADERS, ENROLL_TOKEN, bearer, issue

GPU_RICH = uuid.UUID("00000000-0000-0000-0000-000000000001")
MODERATE = uuid.UUID("00000000-0000-0000-0000-000000000002")
CPU_ONLY = uuid.UUID("00000000-0000-0000-0000-000000000003")


@pytest.fixture
async def api(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(orchestrator, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://chiffon", headers=API_HEADERS
    ) as client:
        yield client


@pytest.fixture
async def three_agents(orchestrator: Orchestrator) -> None:
    """The seeds' fleet: GPU-rich, moderate GPU, CPU-only."""
    fleet = [
        (
            GPU_RICH,
            "rich",
            f.resources(
                gpus_free_total=[(20.0, 24.0), (4.0, 24.0)],
                temperatures=[48.0, 71.0],
                cores_physical=12,
                load_1min=0.5,
            ),
        ),
        (
            MODERATE,
            "moderate",
            f.resources(
                gpus_free_total=[(6.0, 8.0)], temperatures=[83.0], cores_physical=4, load_1min=1.2
            ),
        ),
        (CPU_ONLY, "cpu-only", f.resources(cores_physical=4, load_1min=0.8)),
    ]
    for agent, name, res in fleet:
        await orchestrator.receive(f.message(agent, name=name, res=res))


def _ids(body: list[dict[str, object]]) -> list[str]:
    return [str(a["agent_id"]) for a in body]


@pytest.mark.usefixtures("three_agents")
async def test_list_all_three_with_distinct_resources(api: httpx.AsyncClient) -> None:
    resp = await api.get("/api/v1/agents")
    assert resp.status_code == 200
    by_name = {a["name"]: a for a in resp.json()}
    assert set(by_name) == {"rich", "moderate", "cpu-only"}
    assert by_name["rich"]["resource_metrics"]["gpu_vram_available_gb"] == 24.0
    assert by_name["cpu-only"]["resource_metrics"]["gpu_type"] == "none"


@pytest.mark.usefixtures("three_agents")
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", [GPU_RICH, MODERATE, CPU_ONLY]),  # most free VRAM first
        ("min_gpu_vram_gb=5", [GPU_RICH, MODERATE]),
        ("min_gpu_vram_gb=10", [GPU_RICH]),
        ("min_cpu_cores=4", [GPU_RICH]),
        ("min_cpu_cores=3", [GPU_RICH, CPU_ONLY]),  # moderate: floor(4 - 1.2) = 2
        ("min_gpu_vram_gb=5&min_cpu_cores=3", [GPU_RICH]),
        ("min_gpu_vram_gb=5&min_cpu_cores=2", [GPU_RICH, MODERATE]),
        ("min_single_gpu_vram_gb=21", []),  # 24 GB free in total, but 20 on the best GPU
        ("min_single_gpu_vram_gb=6", [GPU_RICH, MODERATE]),
        ("min_memory_gb=16", [GPU_RICH, MODERATE, CPU_ONLY]),
        ("min_memory_gb=17", []),
        ("min_gpu_vram_gb=100", []),
        ("pool_name=elsewhere", []),
        # A maximum: the hottest GPU decides; no GPU temperature known (cpu-only) never fits.
        ("max_gpu_temperature_c=90", [GPU_RICH, MODERATE]),
        ("max_gpu_temperature_c=80", [GPU_RICH]),
        ("max_gpu_temperature_c=71", [GPU_RICH]),
        ("max_gpu_temperature_c=70.9", []),
        ("max_gpu_temperature_c=90&min_cpu_cores=3", [GPU_RICH]),
    ],
)
async def test_available_capacity_filters(
    api: httpx.AsyncClient, query: str, expected: list[uuid.UUID]
) -> None:
    resp = await api.get(f"/api/v1/agents/available-capacity?{query}")
    assert resp.status_code == 200, resp.text
    assert _ids(resp.json()) == [str(a) for a in expected]


@pytest.mark.usefixtures("three_agents")
async def test_one_shape_of_query_with_other_values_gets_its_own_answer(
    api: httpx.AsyncClient,
) -> None:
    """The statement is built once per combination of requirements; values are bound."""
    answers = []
    for query in ("min_gpu_vram_gb=5&limit=1", "min_gpu_vram_gb=0.5&limit=2"):
        resp = await api.get(f"/api/v1/agents/available-capacity?{query}")
        assert resp.status_code == 200, resp.text
        answers.append(_ids(resp.json()))
    assert answers == [[str(GPU_RICH)], [str(GPU_RICH), str(MODERATE)]]


@pytest.mark.usefixtures("three_agents")
async def test_capacity_answers_carry_every_declared_metric(api: httpx.AsyncClient) -> None:
    """Each registry metric is a field of the answer, read from its own column."""
    resp = await api.get("/api/v1/agents/available-capacity")
    by_id = {a["agent_id"]: a for a in resp.json()}
    rich, cpu_only = by_id[str(GPU_RICH)], by_id[str(CPU_ONLY)]
    assert [m.name for m in REGISTRY if m.name not in rich] == []
    assert (rich["gpu_temperature_max_c"], cpu_only["gpu_temperature_max_c"]) == (71.0, None)
    assert (rich["cpu_cores_available"], rich["cpu_cores_physical"]) == (11, 12)
    assert (rich["gpu_vram_available_gb"], rich["gpu_vram_available_max_gb"]) == (24.0, 20.0)
    assert (rich["gpu_count"], cpu_only["gpu_type"]) == (2, "none")


@pytest.mark.usefixtures("three_agents")
async def test_offline_agents_are_excluded(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    await orchestrator.receive(f.message(GPU_RICH, kind="offline"))
    resp = await api.get("/api/v1/agents/available-capacity?min_gpu_vram_gb=1")
    assert _ids(resp.json()) == [str(MODERATE)]
    listed = await api.get("/api/v1/agents?status=offline")
    assert _ids(listed.json()) == [str(GPU_RICH)]


@pytest.mark.usefixtures("three_agents")
async def test_non_desktop_agent_types_are_excluded_by_default(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    infra = uuid.uuid4()
    big = f.resources(gpus_free_total=[(80.0, 80.0)])
    await orchestrator.receive(f.message(infra, agent_type="infra", res=big))
    default = await api.get("/api/v1/agents/available-capacity")
    assert str(infra) not in _ids(default.json())
    anyone = await api.get("/api/v1/agents/available-capacity?agent_type=any")
    assert _ids(anyone.json())[0] == str(infra)
    only_infra = await api.get("/api/v1/agents?agent_type=infra")
    assert _ids(only_infra.json()) == [str(infra)]


async def test_agent_with_unreadable_metrics_never_matches(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    blind = uuid.uuid4()
    await orchestrator.receive(
        f.message(blind, res=Resources(probe_errors={"cpu": "psutil failed"}))
    )
    cap = await api.get(f"/api/v1/agents/{blind}/capacity")
    assert cap.status_code == 200
    body = cap.json()
    assert body["cpu_cores_available"] is None and body["gpu_vram_available_gb"] is None
    assert body["probe_errors"] == {"cpu": "psutil failed"}
    found = await api.get("/api/v1/agents/available-capacity")
    assert str(blind) not in _ids(found.json())


@pytest.mark.usefixtures("three_agents")
async def test_single_agent_capacity_has_the_seeds_fields(
    api: httpx.AsyncClient, clock: ManualClock
) -> None:
    clock.advance(12.5)
    resp = await api.get(f"/api/v1/agents/{MODERATE}/capacity")
    assert resp.status_code == 200
    body = resp.json()
    assert {
        "agent_id",
        "status",
        "cpu_cores_available",
        "cpu_cores_physical",
        "cpu_load_1min",
        "memory_available_gb",
        "gpu_vram_available_gb",
        "gpu_vram_total_gb",
        "gpu_type",
        "timestamp",
        "gpus",
        "age_seconds",
    } <= set(body)
    assert (body["cpu_cores_available"], body["cpu_cores_physical"]) == (2, 4)
    assert body["gpu_vram_total_gb"] == 8.0 and body["gpu_type"] == "nvidia"
    stamp = datetime.fromisoformat(body["timestamp"])
    assert stamp.utcoffset() is not None  # ISO 8601 with a timezone
    assert body["age_seconds"] == pytest.approx(12.5)
    assert len(body["gpus"]) == 1 and body["gpus"][0]["vram_free_gb"] == 6.0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/agents/not-a-uuid/capacity", 400),
        ("/api/v1/agents/not-a-uuid", 400),
        (f"/api/v1/agents/{uuid.uuid4()}/capacity", 404),
        (f"/api/v1/agents/{uuid.uuid4()}", 404),
        ("/api/v1/agents/available-capacity?min_gpu_vram_gb=-1", 400),
        ("/api/v1/agents/available-capacity?min_gpu_vram_gb=nan", 400),
        ("/api/v1/agents/available-capacity?min_gpu_vram_gb=inf", 400),
        ("/api/v1/agents/available-capacity?min_cpu_cores=two", 400),
        ("/api/v1/agents/available-capacity?min_memory_gb=abc", 400),
        ("/api/v1/agents/available-capacity?max_gpu_temperature_c=500", 400),
        ("/api/v1/agents/available-capacity?max_gpu_temperature_c=nan", 400),
        ("/api/v1/agents?status=sleeping", 400),
        # a NUL PostgreSQL cannot compare: the client's mistake, never a 503 "unavailable"
        ("/api/v1/agents?pool_name=a%00b", 400),
        ("/api/v1/agents/available-capacity?pool_name=%00", 400),
        (
            "/api/v1/agents/00000000-0000-0000-0000-000000000001/metrics"
            "?since=9999-12-31T22:00:00-14:00&until=9999-12-31T23:00:00-14:00",
            400,
        ),
    ],
)
async def test_bad_requests_get_a_json_detail(
    api: httpx.AsyncClient, path: str, status: int
) -> None:
    resp = await api.get(path)
    assert resp.status_code == status, resp.text
    assert isinstance(resp.json()["detail"], str)


@pytest.mark.usefixtures("three_agents")
async def test_deregister_removes_agent_and_keeps_history(api: httpx.AsyncClient) -> None:
    assert (await api.delete(f"/api/v1/agents/{CPU_ONLY}")).status_code == 204
    assert (await api.get(f"/api/v1/agents/{CPU_ONLY}")).status_code == 404
    assert (await api.delete(f"/api/v1/agents/{CPU_ONLY}")).status_code == 404
    events = (await api.get(f"/api/v1/agents/{CPU_ONLY}/events")).json()
    assert [e["reason"] for e in events] == ["deregistered", "registered"]


async def test_http_heartbeat_and_goodbye_use_the_same_ingest(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    auth = bearer(await issue(orchestrator, agent))
    beat = f.message(agent, seq=1, sent_at=clock.now())
    resp = await api.post(f"/api/v1/agents/{agent}/heartbeat", content=f.raw(beat), headers=auth)
    assert resp.status_code == 200 and resp.json()["outcome"] == "applied"
    bye = f.message(agent, kind="offline", seq=2, sent_at=clock.now())
    resp = await api.post(f"/api/v1/agents/{agent}/offline", content=f.raw(bye), headers=auth)
    assert resp.json()["outcome"] == "applied"
    assert (await api.get(f"/api/v1/agents/{agent}")).json()["status"] == "offline"


async def test_http_ingest_refuses_bad_bodies_and_counts_them(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    agent = uuid.uuid4()
    auth = bearer(await issue(orchestrator, agent))
    url = f"/api/v1/agents/{agent}/heartbeat"
    too_big = await api.post(url, content=b"{" + b" " * 70_000 + b"}", headers=auth)
    assert too_big.status_code == 413
    broken = await api.post(url, content=b"{not json", headers=auth)
    assert broken.status_code == 422 and broken.json()["detail"].startswith("malformed_json")
    other = f.message(uuid.uuid4())
    assert (await api.post(url, content=f.raw(other), headers=auth)).status_code == 422
    nan = f.raw(f.message(agent)).replace(b'"cpu_load_1min":1.0', b'"cpu_load_1min":NaN')
    assert (await api.post(url, content=nan, headers=auth)).status_code == 422
    assert (await api.get(f"/api/v1/agents/{agent}")).status_code == 404
    metrics = (await api.get("/metrics")).text
    assert 'chiffon_messages_rejected_total{reason="too_large"} 1.0' in metrics
    assert 'chiffon_messages_rejected_total{reason="malformed_json"} 1.0' in metrics
    assert 'chiffon_messages_rejected_total{reason="path_mismatch"} 1.0' in metrics


async def test_a_strangers_body_is_never_read_and_no_body_is_read_past_the_limit(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    """The credential is checked before the body, and every route refuses a body over the
    limit, declared or chunked, before reading it whole."""
    read: list[int] = []

    async def endless() -> AsyncIterator[bytes]:  # chunked: no Content-Length
        for _ in range(1000):
            read.append(1)
            yield b" " * 65_536

    anonymous = {"authorization": "Bearer nobody"}
    agent = uuid.uuid4()
    stranger = await api.post(
        f"/api/v1/agents/{agent}/heartbeat", content=endless(), headers=anonymous
    )
    assert stranger.status_code == 401
    assert len(read) <= 1  # refused before its body was read
    enroll = await api.post("/api/v1/enroll", content=endless(), headers=anonymous)
    assert enroll.status_code == 401
    assert len(read) <= 2
    read.clear()
    # with the right token, the body is read only up to the limit (64 KiB: two chunks)
    big = await api.post(
        "/api/v1/enroll", content=endless(), headers={"authorization": f"Bearer {ENROLL_TOKEN}"}
    )
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    assert len(read) <= 3
    declared = await api.post(
        "/api/v1/enroll",
        content=b"x" * 300_000,
        headers={"authorization": f"Bearer {ENROLL_TOKEN}"},
    )
    assert declared.status_code == 413
    for route in ("/api/v1/agents", "/metrics", "/"):  # routes that take no body at all
        resp = await api.post(route, content=b"x" * 300_000)
        assert resp.status_code == 413, route
    metrics = (await api.get("/metrics")).text
    assert 'chiffon_messages_rejected_total{reason="too_large"} 5.0' in metrics


@pytest.mark.usefixtures("three_agents")
async def test_health_ready_metrics_and_openapi(
    api: httpx.AsyncClient, orchestrator: Orchestrator
) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json()["status"] == "ready"
    await orchestrator.sweeper.sweep_once()
    metrics = (await api.get("/metrics")).text
    assert 'chiffon_agents{status="online"} 3.0' in metrics
    assert 'chiffon_messages_accepted_total{kind="heartbeat",outcome="applied"} 3.0' in metrics
    spec = (await api.get("/openapi.json")).json()
    assert "/api/v1/agents/available-capacity" in spec["paths"]
    assert (await api.get("/docs")).status_code == 200


async def test_no_database_connection_free_within_the_pool_timeout_is_a_503(
    api: httpx.AsyncClient, orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a burst every pooled connection is busy: the caller is told to retry, not
    handed a 500 (and no traceback is logged per request)."""

    def exhausted() -> None:
        raise PoolTimeoutError("QueuePool limit of size 10 overflow 10 reached")

    monkeypatch.setattr(orchestrator, "sessions", exhausted)
    resp = await api.get("/api/v1/jobs")
    assert resp.status_code == 503
    assert resp.json() == {"detail": "registry database unavailable: TimeoutError"}


async def test_a_heartbeats_sandbox_is_kept_and_served_and_a_bad_one_refused_and_counted(
    api: httpx.AsyncClient, orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """The desktop's job sandbox rides in `resources` (an older agent's heartbeat has none);
    /agents and /agents/{id} serve it; a bad one (an unknown `processes`, too many or too
    long why lines, a flag that is not a boolean) is a counted rejection, not stored."""
    agent, older = uuid.uuid4(), uuid.uuid4()
    auth = bearer(await issue(orchestrator, agent))
    said = {"processes": "pidns", "memory_limit": False, "home_hidden": True,
            "devices_hidden": True, "why": ["cgroup v2 memory controller not delegated"],
            "required": True}  # fmt: skip
    res = f.resources().model_copy(update={"sandbox": Sandbox.model_validate(said)})
    url = f"/api/v1/agents/{agent}/heartbeat"
    beat = f.message(agent, seq=1, sent_at=clock.now(), res=res)
    assert (await api.post(url, content=f.raw(beat), headers=auth)).status_code == 200
    await orchestrator.receive(f.message(older, name="older"))
    one = (await api.get(f"/api/v1/agents/{agent}")).json()
    assert one["sandbox"] == said and one["resource_metrics"]["sandbox"] == said
    listed = {a["agent_id"]: a for a in (await api.get("/api/v1/agents")).json()}
    assert listed[str(agent)]["sandbox"] == said and listed[str(older)]["sandbox"] is None
    bad = [{"processes": "docker"}, {"why": ["x"] * 9}, {"why": ["x" * 201]},
           {"memory_limit": "yes"}, {"why": ["\x1b[2J"]}]  # fmt: skip
    for seq, change in enumerate(bad, start=2):
        body = json.loads(f.raw(f.message(agent, seq=seq, sent_at=clock.now(), res=res)))
        body["resources"]["sandbox"].update(change)
        refused = await api.post(url, content=json.dumps(body).encode(), headers=auth)
        assert refused.status_code == 422, (change, refused.text)
        assert refused.json()["detail"].startswith("invalid: resources.sandbox"), refused.text
    metrics = (await api.get("/metrics")).text
    assert f'chiffon_messages_rejected_total{{reason="invalid"}} {len(bad)}.0' in metrics
    assert (await api.get(f"/api/v1/agents/{agent}")).json()["sandbox"] == said
