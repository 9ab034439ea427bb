"""The fleet on /metrics, per agent and per GPU, on both registry engines; and the whole
exposition checked by Prometheus' own `promtool` (from Debian's prometheus package, which
`.ci/run` unpacks into `.tools/bin`, nothing installed or started)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.heartbeat import GpuInfo
from tests import factories as f
from tests.conftest import api_client
from tests.services import require_services

PROMTOOL = Path(__file__).resolve().parents[1] / ".tools" / "bin" / "promtool"
RULES = Path(__file__).resolve().parents[1] / "examples" / "prometheus-rules.yml"


@pytest.fixture
async def scrape(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(orchestrator) as client:
        yield client


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_every_agent_and_gpu_in_base_units(
    orchestrator: Orchestrator, scrape: httpx.AsyncClient, clock: ManualClock
) -> None:
    rich, gone = uuid.uuid4(), uuid.uuid4()
    res = f.resources(gpus_free_total=[(20.0, 24.0), (4.5, 24.0)], memory_available_gb=16.0)
    gpus = [
        GpuInfo.model_validate({**g.model_dump(), "uuid": f"GPU-{g.index}", "temperature_c": 61})
        for g in res.gpus
    ]
    gpus[1] = GpuInfo.model_validate({**gpus[1].model_dump(), "utilization_percent": 37.0})
    await orchestrator.receive(
        f.message(rich, name="rich", pool_name="studio", sent_at=clock.now(),
                  res=res.model_copy(update={"gpus": gpus}))
    )  # fmt: skip
    await orchestrator.receive(f.message(gone, name="gone", sent_at=clock.now()))
    await orchestrator.receive(f.message(gone, kind="offline", sent_at=clock.now()))
    clock.advance(7)
    samples = _samples((await scrape.get("/metrics")).text)
    agent = frozenset({"agent_id": str(rich), "name": "rich", "pool": "studio"}.items())
    gpu1 = frozenset({*agent, ("gpu", "1"), ("uuid", "GPU-1")})
    assert samples[("chiffon_agent_up", agent)] == 1.0
    assert samples[("chiffon_agent_data_age_seconds", agent)] == 7.0
    assert samples[("chiffon_agent_memory_free_bytes", agent)] == 16e9
    assert samples[("chiffon_gpu_memory_free_bytes", gpu1)] == 4.5e9
    assert samples[("chiffon_gpu_memory_total_bytes", gpu1)] == 24e9
    assert samples[("chiffon_gpu_utilization_ratio", gpu1)] == 0.37
    assert samples[("chiffon_gpu_temperature_celsius", gpu1)] == 61.0
    gpu0 = frozenset({*agent, ("gpu", "0"), ("uuid", "GPU-0")})
    assert ("chiffon_gpu_utilization_ratio", gpu0) not in samples  # unknown: no sample
    assert samples[("chiffon_gpu_info", frozenset({*gpu1, ("model", "GPU 1")}))] == 1.0
    off = frozenset({"agent_id": str(gone), "name": "gone", "pool": "desktop_pool_1"}.items())
    assert samples[("chiffon_agent_up", off)] == 0.0
    assert samples[("chiffon_fleet_agents", frozenset())] == 2.0


async def test_cardinality_is_bounded_and_says_so(
    orchestrator: Orchestrator, scrape: httpx.AsyncClient
) -> None:
    for name in ("a-desk", "b-desk", "c-desk"):
        await orchestrator.receive(f.message(name=name))
    orchestrator.settings.metrics_fleet_max_agents = 2
    samples = _samples((await scrape.get("/metrics")).text)
    names = {dict(labels)["name"] for metric, labels in samples if metric == "chiffon_agent_up"}
    assert names == {"a-desk", "b-desk"}
    assert samples[("chiffon_fleet_agents", frozenset())] == 3.0
    assert samples[("chiffon_fleet_agents_exported", frozenset())] == 2.0
    orchestrator.settings.metrics_fleet_max_agents = 0
    text = (await scrape.get("/metrics")).text
    assert "chiffon_agent_up" not in text and "chiffon_messages_accepted_total" in text


def _promtool() -> Path:
    if PROMTOOL.exists():
        return PROMTOOL
    message = f"{PROMTOOL} is missing (.ci/run unpacks it from Debian's prometheus package)"
    if require_services():
        pytest.fail(f"{message} and CHIFFON_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


async def test_promtool_finds_the_exposition_and_the_example_rules_clean(
    orchestrator: Orchestrator, scrape: httpx.AsyncClient
) -> None:
    await orchestrator.receive(f.message(name="desk", res=f.resources(gpus_free_total=[(1, 2)])))
    text = (await scrape.get("/metrics")).text
    assert "chiffon_gpu_memory_free_bytes" in text
    checked = await asyncio.to_thread(_run, "check", "metrics", stdin=text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    rules = await asyncio.to_thread(_run, "check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_promtool()), *args], input=stdin, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
