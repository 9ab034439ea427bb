"""How much batching buys heartbeat ingest, and what the metrics history costs it.

Drives `Orchestrator.ingest` in-process (parse, batcher, one transaction per batch, commit)
with many concurrent messages, on SQLite and on the local PostgreSQL, once with the
default batch size and once with batches of one message. The unbatched run is the
machine's own baseline in the same run, so the ratio means something on a noisy box.

Batched runs are repeated `--repeats` times with the metrics history off, on, and on with
every message signed by its (enrolled) agent and checked as one from RabbitMQ, alternating
so that a noisy neighbour hits all alike; the median of each is reported.
History is written by the orchestrator's recorder, not by ingest: with history on, the
recorder ticks concurrently with ingest each time the (manual) clock enters a new
heartbeat interval, so it writes as many rows per heartbeat as in a real fleet, squeezed
into the saturated run's much shorter wall-clock time (a pessimistic case, about 50 times
the real recording rate). With `--realtime` the orchestrator runs on the system clock and
the recorder on its own schedule (a tick every heartbeat interval of wall-clock time), as
in production; use enough `--messages` for each run to last several intervals.

    .venv/bin/python bench/ingest_batching.py [--agents 2000] [--messages 20000] [--repeats 3]

Prints a table and writes bench/results/ingest_batching.json. Needs PostgreSQL at
CHIFFON_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import db
from chiffon.schemas.heartbeat import AgentMessage, GpuInfo, Resources

RESULTS = Path(__file__).parent / "results"
ADMIN_URL = os.environ.get(
    "CHIFFON_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HEARTBEAT_INTERVAL_SECONDS = 15


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


async def record_while(orch: Orchestrator, ticks: asyncio.Queue[bool]) -> int:
    """The history recorder beside ingest: one tick per simulated interval; rows written."""
    rows = 0
    while await ticks.get():
        rows += sum((await orch.recorder.record_once()).values())
    return rows


async def run_once(
    url: str,
    batch_size: int,
    agents: int,
    messages: int,
    *,
    history: bool = True,
    realtime: bool = False,
    signed: bool = False,
) -> tuple[float, int]:
    """Messages per second through parse -> batch -> commit, and history rows recorded.

    `signed`: each agent is enrolled first and each message carries its agent's signature,
    checked as one from RabbitMQ is (credential lookup, HMAC, replay window)."""
    if realtime:
        return await run_realtime(url, batch_size, agents, messages, history=history)
    settings = OrchestratorSettings(
        database_url=url,
        ingest_batch_size=batch_size,
        ingest_batch_delay_ms=5,
        history_enabled=history,
    )
    # Each round of `agents` messages is one 15 s heartbeat period on the orchestrator's
    # clock, so the history's minute and quarter-hour buckets fill as in a real fleet.
    clock = ManualClock(datetime.now(UTC))
    orch = Orchestrator(settings, clock=clock)
    async with orch.engine.begin() as conn:  # every run starts from an empty registry
        for table in ("agent_registry", "agent_events", "agent_metrics"):
            await conn.execute(text(f"DELETE FROM {table}"))
    await orch.start(sweep=False)
    ids = [uuid.uuid4() for _ in range(agents)]
    boot = uuid.uuid4()
    bodies = [heartbeat(ids[i % agents], boot, i // agents) for i in range(messages)]
    signatures: list[str | None] = [None] * messages
    if signed:
        creds = {c.agent_id: c for c in await asyncio.gather(*map(orch.credentials.issue, ids))}
        signatures = [creds[ids[i % agents]].sign(body) for i, body in enumerate(bodies)]
    ticks: asyncio.Queue[bool] = asyncio.Queue()
    recorder = asyncio.create_task(record_while(orch, ticks))
    started = time.perf_counter()
    for chunk in range(0, messages, agents):
        window = slice(chunk, chunk + agents)
        pairs = zip(bodies[window], signatures[window], strict=True)
        outcomes = await asyncio.gather(*(orch.ingest(b, signature=sig) for b, sig in pairs))
        assert all(o == "applied" for o in outcomes), set(outcomes)
        clock.advance(HEARTBEAT_INTERVAL_SECONDS)
        ticks.put_nowait(True)  # does not wait: the tick runs while the next round ingests
    elapsed = time.perf_counter() - started
    ticks.put_nowait(False)
    rows = await recorder
    await orch.stop()
    return messages / elapsed, rows


async def history_rows(orch: Orchestrator) -> int:
    async with orch.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM agent_metrics"))).scalar_one())


async def run_realtime(
    url: str, batch_size: int, agents: int, messages: int, *, history: bool
) -> tuple[float, int]:
    """As `run_once`, on the system clock, the recorder ticking on its own schedule."""
    settings = OrchestratorSettings(
        database_url=url,
        ingest_batch_size=batch_size,
        ingest_batch_delay_ms=5,
        history_enabled=history,
        heartbeat_interval_seconds=HEARTBEAT_INTERVAL_SECONDS,
    )
    orch = Orchestrator(settings)
    async with orch.engine.begin() as conn:
        for table in ("agent_registry", "agent_events", "agent_metrics"):
            await conn.execute(text(f"DELETE FROM {table}"))
    await orch.start(sweep=False)
    recorder = asyncio.create_task(orch.recorder.run()) if history else None
    ids = [uuid.uuid4() for _ in range(agents)]
    boot = uuid.uuid4()
    started = time.perf_counter()
    for chunk in range(0, messages, agents):
        seq = chunk // agents
        window = [heartbeat(agent, boot, seq) for agent in ids[: messages - chunk]]
        outcomes = await asyncio.gather(*(orch.ingest(body) for body in window))
        assert all(o == "applied" for o in outcomes), set(outcomes)
    elapsed = time.perf_counter() - started
    if recorder is not None:
        recorder.cancel()
        with suppress(asyncio.CancelledError):
            await recorder
    rows = await history_rows(orch)
    await orch.stop()
    return messages / elapsed, rows


def spread(runs: list[float]) -> float:
    """(max - min) / median, in percent."""
    return 100 * (max(runs) - min(runs)) / statistics.median(runs)


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


async def bench_engine(engine: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    db.upgrade(url)
    off: list[float] = []
    on: list[float] = []
    signed: list[float] = []
    rows: list[int] = []
    for _ in range(args.repeats):
        mode = {"realtime": args.realtime}
        off.append((await run_once(url, 500, args.agents, args.messages, history=False, **mode))[0])
        rate, written = await run_once(url, 500, args.agents, args.messages, history=True, **mode)
        on.append(rate)
        rows.append(written)
        if not args.realtime:
            rate, _ = await run_once(url, 500, args.agents, args.messages, signed=True)
            signed.append(rate)
    batched = statistics.median(on)
    # One message per transaction: fewer messages, or it takes minutes on SQLite.
    single, _ = await run_once(
        url, 1, args.agents, max(args.agents, min(args.messages // 10, 2000))
    )
    return {
        "history_rows_per_run": rows,
        "batched_per_s": batched,
        "batched_no_history_per_s": statistics.median(off),
        "history_cost_percent": 100 * (1 - batched / statistics.median(off)),
        "spread_no_history_percent": spread(off),
        "spread_history_percent": spread(on),
        "unbatched_per_s": single,
        "speedup": batched / single,
        "runs_no_history_per_s": off,
        "runs_history_per_s": on,
        **(
            {
                "signed_per_s": statistics.median(signed),
                "signature_cost_percent": 100 * (1 - statistics.median(signed) / batched),
                "runs_signed_per_s": signed,
            }
            if signed
            else {}
        ),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--realtime", action="store_true", help="system clock, real recorder")
    parser.add_argument("--results", default="ingest_batching.json")
    args = parser.parse_args()
    engines = args.engines.split(",")
    results: dict[str, dict[str, Any]] = {}
    if "sqlite" in engines:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite_url = db.default_database_url(Path(tmp))
            results["sqlite"] = await bench_engine("sqlite", sqlite_url, args)
    if "postgresql" in engines:
        url, conninfo = fresh_postgres()
        try:
            results["postgresql"] = await bench_engine("postgresql", url, args)
        finally:
            drop_postgres(url, conninfo)
    print(
        f"{'engine':<12}{'no history msg/s':>18}{'history msg/s':>15}{'cost':>7}"
        f"{'spread off/on':>15}{'unbatched msg/s':>17}{'speedup':>9}"
    )
    for engine, r in results.items():
        spreads = f"{r['spread_no_history_percent']:.0f}%/{r['spread_history_percent']:.0f}%"
        print(
            f"{engine:<12}{r['batched_no_history_per_s']:>18,.0f}{r['batched_per_s']:>15,.0f}"
            f"{r['history_cost_percent']:>6.1f}%{spreads:>15}{r['unbatched_per_s']:>17,.0f}"
            f"{r['speedup']:>8.1f}x"
        )
        print(f"  runs off: {[round(x) for x in r['runs_no_history_per_s']]}")
        print(f"  runs on:  {[round(x) for x in r['runs_history_per_s']]}")
        print(f"  history rows recorded per run: {r['history_rows_per_run']}")
        if "signed_per_s" in r:
            print(
                f"  signed (history on): {r['signed_per_s']:,.0f} msg/s, "
                f"{r['signature_cost_percent']:.1f}% below unsigned; "
                f"runs {[round(x) for x in r['runs_signed_per_s']]}"
            )
    RESULTS.mkdir(exist_ok=True)
    record = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "agents": args.agents,
        "messages": args.messages,
        "realtime": args.realtime,
        "results": results,
    }
    (RESULTS / args.results).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
