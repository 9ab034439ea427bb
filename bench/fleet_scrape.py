"""One Prometheus scrape of /metrics with the whole fleet on it: 10,000 agents with 2 GPUs each.

A fresh PostgreSQL registry is seeded with N agents (rows shaped as ingest writes them, all
online, two GPUs each with UUID, model, utilization and temperature); `chiffon orchestrator`
serves it; a client scrapes `/metrics` back to back `--scrapes` times. Reported: scrape
time p50/p99, bytes and series per scrape, and the orchestrator process's CPU seconds per
scrape (from /proc, so the client's work is not counted).

The machine's own ceiling, in the same run: the same read straight on the database (the
`read_fleet` query, no HTTP), and rendering the same rows with prometheus_client alone (no
database, no HTTP). Their sum is the least a scrape could cost here.

    .venv/bin/python bench/fleet_scrape.py [--agents 10000] [--scrapes 20] [--results NAME]

Takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    api_headers,
    cpu_seconds,
    fresh_postgres,
    machine,
    orchestrator,
    percentile,
    write_results,
)

from chiffon.orchestrator.fleet_metrics import exposition, read_fleet
from chiffon.orchestrator.ingest import metric_columns
from chiffon.persistence import db
from chiffon.persistence.db import session_factory
from chiffon.persistence.models import Base
from chiffon.schemas.heartbeat import GpuInfo, Resources


def two_gpus(i: int) -> Resources:
    gpus = [
        GpuInfo(
            index=n, vendor="nvidia", uuid=f"GPU-{i:08d}-{n}", name="NVIDIA GeForce RTX 4090",
            vram_total_gb=25.757, vram_free_gb=round(5 + (i * 7 + n * 3) % 20, 3),
            utilization_percent=float((i + n) % 100), temperature_c=float(40 + (i + n) % 40),
        )
        for n in range(2)
    ]  # fmt: skip
    free = [g.vram_free_gb or 0.0 for g in gpus]
    return Resources(
        cpu_load_1min=1.5, cpu_cores_physical=16, cpu_cores_logical=32, cpu_cores_available=14,
        memory_percent=40.0, memory_available_gb=38.4, memory_total_gb=64.0, gpus=gpus,
        gpu_count=2, gpu_type="nvidia", gpu_vram_total_gb=51.514,
        gpu_vram_available_gb=round(sum(free), 3), gpu_vram_available_max_gb=max(free),
    )  # fmt: skip


def seed(url: str, count: int) -> None:
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for i in range(count):
        res = two_gpus(i)
        rows.append(
            {
                "agent_id": uuid.UUID(int=i + 1), "name": f"desk-{i:05d}", "agent_type": "desktop",
                "pool_name": f"pool-{i % 10}", "agent_version": "0.1.0", "labels": {},
                "capabilities": [], "specializations": [], "status": "online",
                "last_heartbeat_at": now, "created_at": now, "updated_at": now,
                **metric_columns(res), "resource_metrics": res.model_dump(mode="json"),
                "last_boot_id": None, "last_seq": None, "last_sent_at": None,
            }
        )  # fmt: skip
    engine = create_engine(db.sync_url(url))
    with engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(insert(Base.metadata.tables["agent_registry"]), rows[start : start + 5000])
        conn.execute(text("ANALYZE agent_registry"))
    engine.dispose()


async def ceiling(url: str, count: int, repeats: int) -> dict[str, float]:
    """The read alone and the rendering alone, median of `repeats` each (seconds)."""
    engine = create_async_engine(db.async_url(url))
    sessions = session_factory(engine)
    reads, renders = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        async with sessions() as session:
            fleet = await read_fleet(session, now=datetime.now(UTC), max_agents=count)
        reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        exposition(fleet)
        renders.append(time.perf_counter() - started)
    await engine.dispose()
    return {"read_s": statistics.median(reads), "render_s": statistics.median(renders)}


def scrape(api: str, pid: int, scrapes: int) -> dict[str, Any]:
    times: list[float] = []
    with httpx.Client(timeout=120, headers=api_headers()) as client:
        body = client.get(f"{api}/metrics").content  # warm: imports, statement cache
        cpu_before = cpu_seconds(pid)
        for _ in range(scrapes):
            started = time.perf_counter()
            body = client.get(f"{api}/metrics").content
            times.append(time.perf_counter() - started)
        cpu = (cpu_seconds(pid) - cpu_before) / scrapes
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "p50_s": statistics.median(times), "p99_s": percentile(times, 99),
        "bytes": len(body), "series": series, "orchestrator_cpu_s_per_scrape": cpu,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--results", default="fleet_scrape")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "agents": args.agents, "gpus_per_agent": 2}
    with fresh_postgres() as url:
        seed(url, args.agents)
        results["ceiling"] = asyncio.run(ceiling(url, args.agents, repeats=5))
        env = {"CHIFFON_METRICS_FLEET_MAX_AGENTS": str(args.agents)}
        with orchestrator(url, env=env) as (api, proc):
            results["scrape"] = scrape(api, proc.pid, args.scrapes)
    floor = results["ceiling"]["read_s"] + results["ceiling"]["render_s"]
    results["floor_over_p50"] = round(floor / results["scrape"]["p50_s"], 3)
    s, c = results["scrape"], results["ceiling"]
    print(
        f"{args.agents} agents x 2 GPUs: scrape p50 {s['p50_s']:.3f} s, p99 {s['p99_s']:.3f} s, "
        f"{s['bytes'] / 1e6:.1f} MB, {s['series']} series, orchestrator CPU "
        f"{s['orchestrator_cpu_s_per_scrape']:.3f} s/scrape; ceiling: read {c['read_s']:.3f} s "
        f"+ render {c['render_s']:.3f} s = {results['floor_over_p50']:.0%} of the scrape"
    )
    write_results(args.results, results)


if __name__ == "__main__":
    main()
