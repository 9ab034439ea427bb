"""The fleet as Prometheus metrics: gauges per agent and per GPU, read from the registry at
scrape time, so one scrape target shows the whole fleet (as NVIDIA's DCGM exporter does per
machine).

Prometheus conventions: base units (bytes, seconds, a 0-1 ratio), `_info` metrics for string
attributes, and an unknown number is no sample at all, never a NaN or a 0. Cardinality is
bounded: at most `max_agents` agents (by name) get series of their own, and
`chiffon_fleet_agents_exported` and `chiffon_fleet_agents` say how many did and how many
there are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.persistence.models import AgentRow

BYTES_PER_GB = 1e9  # GB on the wire are 10^9 bytes (docs/protocol.md)
AGENT_LABELS = ("agent_id", "name", "pool")
GPU_LABELS = (*AGENT_LABELS, "gpu", "uuid")
REFUSAL_LABELS = (*AGENT_LABELS, "reason")

_COLUMNS = (
    AgentRow.agent_id,
    AgentRow.name,
    AgentRow.pool_name,
    AgentRow.agent_type,
    AgentRow.agent_version,
    AgentRow.status,
    AgentRow.last_heartbeat_at,
    AgentRow.resource_metrics,
)


@dataclass(frozen=True, slots=True)
class FleetRows:
    rows: Sequence[Any]
    total: int
    now: datetime


async def read_fleet(session: AsyncSession, *, now: datetime, max_agents: int) -> FleetRows:
    """The agents to export (at most `max_agents`, by name) and how many there are."""
    stmt = select(*_COLUMNS).order_by(AgentRow.name, AgentRow.agent_id).limit(max_agents)
    rows = (await session.execute(stmt)).all()
    total = len(rows)
    if total == max_agents:
        total = int(
            (await session.execute(select(func.count()).select_from(AgentRow))).scalar_one()
        )
    return FleetRows(rows, total, now)


def exposition(fleet: FleetRows) -> bytes:
    """The Prometheus text of these agents and their GPUs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FleetCollector(fleet))
    return generate_latest(registry)


# (key, metric name, help) of each family: every agent's, then every GPU's.
_AGENT_GAUGES = (
    ("up", "chiffon_agent_up", "1 while the agent is online, 0 offline"),
    ("age", "chiffon_agent_data_age_seconds", "Seconds since the orchestrator last heard it"),
    ("cores_free", "chiffon_agent_cpu_cores_free", "Free CPU cores (physical - load1, floored)"),
    ("cores", "chiffon_agent_cpu_cores", "Physical CPU cores"),
    ("load1", "chiffon_agent_load1", "1-minute load average"),
    ("mem_free", "chiffon_agent_memory_free_bytes", "Memory available without swapping"),
    ("mem", "chiffon_agent_memory_bytes", "Total memory"),
)
# The heartbeat's `orders_refused`: counted by the agent since it started, so it falls back
# to 0 when the agent restarts (a counter reset, which rate() and increase() allow for).
_ORDERS_REFUSED = (
    "chiffon_agent_orders_refused",
    "Orders the agent refused since it started, by reason (docs/security.md)",
)
_GPU_GAUGES = (
    ("free", "chiffon_gpu_memory_free_bytes", "Free VRAM of one GPU"),
    ("total", "chiffon_gpu_memory_total_bytes", "Total VRAM of one GPU"),
    ("util", "chiffon_gpu_utilization_ratio", "GPU utilization, 0 to 1"),
    ("temp", "chiffon_gpu_temperature_celsius", "GPU temperature"),
)


def _families(
    specs: Sequence[tuple[str, str, str]], labels: Sequence[str]
) -> dict[str, GaugeMetricFamily]:
    return {key: GaugeMetricFamily(name, doc, labels=list(labels)) for key, name, doc in specs}


class _FleetCollector(Collector):
    def __init__(self, fleet: FleetRows) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self._fleet
        agent = _families(_AGENT_GAUGES, AGENT_LABELS)
        gpu = _families(_GPU_GAUGES, GPU_LABELS)
        agent_info = InfoMetricFamily("chiffon_agent", "An agent's attributes", labels=AGENT_LABELS)
        gpu_info = InfoMetricFamily("chiffon_gpu", "A GPU's model", labels=GPU_LABELS)
        refused = CounterMetricFamily(*_ORDERS_REFUSED, labels=REFUSAL_LABELS)
        for row in fleet.rows:
            labels = [str(row.agent_id), row.name, row.pool_name]
            metrics = row.resource_metrics or {}
            _agent_samples(agent, labels, row, fleet.now)
            attributes = {"agent_type": row.agent_type, "version": row.agent_version or ""}
            agent_info.add_metric(labels, {**attributes, "gpu_type": metrics.get("gpu_type", "")})
            for reason, count in (metrics.get("orders_refused") or {}).items():
                refused.add_metric([*labels, reason], float(count))
            for g in metrics.get("gpus", []):
                gpu_labels = [*labels, str(g.get("index")), str(g.get("uuid") or "")]
                _gpu_samples(gpu, gpu_labels, g)
                gpu_info.add_metric(gpu_labels, {"model": str(g.get("name") or "")})
        yield from (*agent.values(), agent_info, refused, *gpu.values(), gpu_info)
        yield GaugeMetricFamily("chiffon_fleet_agents", "Agents registered", value=fleet.total)
        yield GaugeMetricFamily(
            "chiffon_fleet_agents_exported",
            "Agents with series of their own (CHIFFON_METRICS_FLEET_MAX_AGENTS bounds it)",
            value=len(fleet.rows),
        )


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:  # unknown: no sample, never a made-up 0
        family.add_metric(labels, float(value))


def _agent_samples(
    agent: dict[str, GaugeMetricFamily], labels: list[str], row: Any, now: datetime
) -> None:
    m = row.resource_metrics or {}
    agent["up"].add_metric(labels, 1.0 if row.status == "online" else 0.0)
    if row.last_heartbeat_at is not None:
        agent["age"].add_metric(labels, max(0.0, (now - row.last_heartbeat_at).total_seconds()))
    _add(agent["cores_free"], labels, m.get("cpu_cores_available"))
    _add(agent["cores"], labels, m.get("cpu_cores_physical"))
    _add(agent["load1"], labels, m.get("cpu_load_1min"))
    _add(agent["mem_free"], labels, _bytes(m.get("memory_available_gb")))
    _add(agent["mem"], labels, _bytes(m.get("memory_total_gb")))


def _gpu_samples(gpu: dict[str, GaugeMetricFamily], labels: list[str], g: dict[str, Any]) -> None:
    _add(gpu["free"], labels, _bytes(g.get("vram_free_gb")))
    _add(gpu["total"], labels, _bytes(g.get("vram_total_gb")))
    util = g.get("utilization_percent")
    _add(gpu["util"], labels, None if util is None else util / 100)
    _add(gpu["temp"], labels, g.get("temperature_c"))


def _bytes(gb: float | None) -> float | None:
    return None if gb is None else round(gb * BYTES_PER_GB)
