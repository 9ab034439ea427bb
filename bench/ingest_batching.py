"""How much batching buys heartbeat ingest: batched vs one-transaction-per-message.

Drives `Orchestrator.ingest` in-process (parse, batcher, one transaction per batch, commit)
with many concurrent messages, on SQLite and on the local PostgreSQL, once with the
default batch size and once with batches of one message. The unbatched run is the
machine's own baseline in the same run, so the ratio means something on a noisy box.

    .venv/bin/python bench/ingest_batching.py [--agents 2000] [--messages 20000]

Prints a table and writes bench/results/ingest_batching.json. Needs PostgreSQL at
CHIFFON_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import db
from chiffon.schemas.heartbeat import AgentMessage, GpuInfo, Resources

RESULTS = Path(__file__).parent / "results"
ADMIN_URL = os.environ.get(
    "CHIFFON_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_FLIGHT = 2000  # messages submitted concurrently, as a busy consumer would


def heartbeat(agent_id: uuid.UUID, boot_id: uuid.UUID, seq: int) -> bytes:
    free = float(seq % 24)
    gpu = GpuInfo(index=0, vendor="nvidia", name="GPU", vram_total_gb=24.0, vram_free_gb=free)
    res = Resources(
        cpu_load_1min=1.0,
        cpu_cores_physical=8,
        cpu_cores_logical=16,
        cpu_cores_available=7,
        memory_available_gb=16.0,
        memory_total_gb=32.0,
        gpus=[gpu],
        gpu_count=1,
        gpu_type="nvidia",
        gpu_vram_total_gb=24.0,
        gpu_vram_available_gb=free,
        gpu_vram_available_max_gb=free,
    )
    msg = AgentMessage(
        schema_version=1,
        agent_id=agent_id,
        boot_id=boot_id,
        seq=seq,
        sent_at=datetime.now(UTC),
        name=f"desk-{agent_id.hex[:6]}",
        resources=res,
    )
    return msg.model_dump_json().encode()


async def run_once(url: str, batch_size: int, agents: int, messages: int) -> float:
    """Messages per second through parse -> batch -> commit."""
    settings = OrchestratorSettings(
        database_url=url, ingest_batch_size=batch_size, ingest_batch_delay_ms=5
    )
    orch = Orchestrator(settings)
    await orch.start(sweep=False)
    ids = [uuid.uuid4() for _ in range(agents)]
    boot = uuid.uuid4()
    bodies = [heartbeat(ids[i % agents], boot, i // agents) for i in range(messages)]
    started = time.perf_counter()
    for chunk in range(0, messages, IN_FLIGHT):
        window = bodies[chunk : chunk + IN_FLIGHT]
        outcomes = await asyncio.gather(*(orch.ingest(body) for body in window))
        assert all(o == "applied" for o in outcomes), set(outcomes)
    elapsed = time.perf_counter() - started
    await orch.stop()
    return messages / elapsed


def fresh_postgres() -> tuple[str, str]:
    admin = make_url(ADMIN_URL)
    name = f"chiffon_bench_{uuid.uuid4().hex[:10]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin.set(database=name).render_as_string(hide_password=False), conninfo


def drop_postgres(url: str, conninfo: str) -> None:
    name = make_url(url).database
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def bench_engine(engine: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    db.upgrade(url)
    batched = await run_once(url, 500, args.agents, args.messages)
    # One message per transaction: fewer messages, or it takes minutes on SQLite.
    single = await run_once(url, 1, args.agents, max(args.agents, args.messages // 10))
    return {"batched_per_s": batched, "unbatched_per_s": single, "speedup": batched / single}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = await bench_engine("sqlite", db.default_database_url(Path(tmp)), args)
    url, conninfo = fresh_postgres()
    try:
        results["postgresql"] = await bench_engine("postgresql", url, args)
    finally:
        drop_postgres(url, conninfo)
    print(f"{'engine':<12}{'batched msg/s':>15}{'unbatched msg/s':>17}{'speedup':>9}")
    for engine, r in results.items():
        print(
            f"{engine:<12}{r['batched_per_s']:>15,.0f}{r['unbatched_per_s']:>17,.0f}"
            f"{r['speedup']:>8.1f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    record = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "agents": args.agents,
        "messages": args.messages,
        "results": results,
    }
    (RESULTS / "ingest_batching.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
