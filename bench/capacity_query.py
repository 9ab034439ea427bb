"""Capacity query latency with 1,000, 10,000 and 100,000 agents, while ingest runs.

For each engine (PostgreSQL, SQLite) and fleet size N: a fresh registry is seeded with N
simulated desktops (bulk insert of rows shaped exactly as ingest writes them, all online),
`chiffon orchestrator --amqp-url` serves it, and `chiffon simulate --transport amqp` beats
for the first min(N, 10,000) of those same agents at 10,000 agents' steady rate (about
667 heartbeats/s). Meanwhile a separate client process sends
`GET /api/v1/agents/available-capacity?min_gpu_vram_gb=8&min_cpu_cores=2&limit=10`
for `--seconds`: latency p50/p99 from one client querying back to back for the first
half, requests/s (and the latency under that load) from `--concurrency` clients for the
second half.
The orchestrator's heartbeat timeout is raised to an hour so the seeded agents that do not
beat stay online (the query then filters N online agents).

For the machine's own ceiling in the same run, the same query's SQL is also timed
directly on the database (`--raw`, one connection, no HTTP), so the API's share shows.

    .venv/bin/python bench/capacity_query.py [--sizes 1000,10000,100000] [--seconds 20]
                                             [--split] [--no-ingest] [--results NAME]

`--split` sends the queries to a second `chiffon orchestrator` on the same database that
does not consume from RabbitMQ, so ingest and queries run in separate processes (the
deployment docs/performance.md recommends for a busy fleet).

Takes about 6 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CHIFFON,
    CpuWatch,
    api_headers,
    fresh_postgres,
    insert_credentials,
    issue_credentials,
    machine,
    messages_counted,
    orchestrator,
    percentile,
    private_vhost,
    simulate_data_dir,
    stop,
    write_results,
)

from chiffon.agent.simulate import make_fleet
from chiffon.orchestrator.ingest import metric_columns
from chiffon.persistence import db
from chiffon.persistence.models import Base
from chiffon.persistence.registry import CapacityFilter, capacity_statement
from chiffon.schemas.heartbeat import parse_message

QUERY = {"min_gpu_vram_gb": 8, "min_cpu_cores": 2, "limit": 10}
SEED = 5
STEADY_AGENTS, STEADY_INTERVAL = 10_000, 15.0


def seed_rows(count: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    rows = []
    for agent in make_fleet(count, seed=SEED):
        msg = parse_message(agent.message().encode())  # as the orchestrator reads it
        assert msg.resources is not None
        rows.append(
            {
                "agent_id": msg.agent_id,
                "name": msg.name,
                "agent_type": msg.agent_type,
                "pool_name": msg.pool_name,
                "agent_version": msg.agent_version,
                "labels": dict(msg.labels),
                "capabilities": [],
                "specializations": [],
                "status": "online",
                "last_heartbeat_at": now,
                "created_at": now,
                "updated_at": now,
                **metric_columns(msg.resources),
                "resource_metrics": msg.resources.model_dump(mode="json"),  # plain engine
                "last_boot_id": None,
                "last_seq": None,
                "last_sent_at": None,
            }
        )
    return rows


def seed(url: str, rows: list[dict[str, Any]]) -> float:
    engine = create_engine(db.sync_url(url))
    started = time.perf_counter()
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(insert(Base.metadata.tables["agent_registry"]), rows[i : i + 5000])
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE agent_registry"))
    engine.dispose()
    return time.perf_counter() - started


def raw_query_ms(url: str, repeats: int = 200) -> dict[str, float]:
    """The same SQL straight on the database: the floor under the API's latency."""
    engine = create_engine(db.sync_url(url))
    want = CapacityFilter(bounds={"min_gpu_vram_gb": 8, "min_cpu_cores": 2}, limit=10)
    samples = []
    with engine.connect() as conn:
        for _ in range(repeats):
            started = time.perf_counter()
            conn.execute(*capacity_statement(want)).all()
            samples.append((time.perf_counter() - started) * 1000)
    engine.dispose()
    return {"p50_ms": statistics.median(samples), "p99_ms": percentile(samples, 99)}


async def client(api: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """Latency with one client querying back to back for half the time, then requests/s
    with `concurrency` clients for the other half (run in its own process)."""
    alone = await load(api, seconds / 2, 1)
    loaded = await load(api, seconds / 2, concurrency)
    return {
        **{k: alone[k] for k in ("p50_ms", "p99_ms")},
        "requests": alone["requests"] + loaded["requests"],
        "errors": alone["errors"] + loaded["errors"],
        "per_s": loaded["per_s"],
        "loaded_p50_ms": loaded["p50_ms"],
        "loaded_p99_ms": loaded["p99_ms"],
        "concurrency": concurrency,
    }


async def load(api: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """`concurrency` workers querying back to back for `seconds`."""
    samples: list[float] = []
    errors = 0
    url = f"{api}/api/v1/agents/available-capacity"
    async with httpx.AsyncClient(timeout=10, headers=api_headers()) as http:
        for _ in range(20):  # warm the connection pool and the server's caches
            await http.get(url, params=QUERY)
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < end:
                started = time.perf_counter()
                resp = await http.get(url, params=QUERY)
                if resp.status_code != 200:
                    errors += 1
                samples.append((time.perf_counter() - started) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {
        "requests": len(samples),
        "errors": errors,
        "per_s": len(samples) / elapsed,
        "p50_ms": statistics.median(samples),
        "p99_ms": percentile(samples, 99),
    }


def one_case(engine: str, size: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        if engine == "postgresql":
            url = stack.enter_context(fresh_postgres())
        else:
            url = db.default_database_url(tmp / f"sqlite-{size}")
            db.upgrade(url)
        seed_seconds = seed(url, seed_rows(size))
        beating = min(size, STEADY_AGENTS)
        # The beating agents hold credentials, as if they had enrolled.
        rows, creds = issue_credentials([a.agent_id for a in make_fleet(beating, seed=SEED)])
        insert_credentials(url, rows)
        sim_env = simulate_data_dir(tmp / f"sim-{engine}-{size}", SEED, creds)
        raw = raw_query_ms(url)
        amqp = stack.enter_context(private_vhost())
        env = {"CHIFFON_HEARTBEAT_TIMEOUT": "3600"}
        log = tmp / f"orch-{engine}-{size}.log"
        ingest_api, ingest_proc = stack.enter_context(
            orchestrator(url, "--amqp-url", amqp, env=env, log=log)
        )
        api, pids = ingest_api, {"orchestrator": ingest_proc.pid}
        if args.split:  # queries go to a second orchestrator that does not consume
            log = tmp / f"orch-api-{engine}-{size}.log"
            api, api_proc = stack.enter_context(orchestrator(url, env=env, log=log))
            pids["api_orchestrator"] = api_proc.pid
        interval = STEADY_INTERVAL * beating / STEADY_AGENTS
        sim = (
            None
            if args.no_ingest
            else subprocess.Popen(
                [
                    *CHIFFON,
                    "simulate",
                    "--agents",
                    str(beating),
                    "--interval",
                    f"{interval:g}",
                    "--transport",
                    "amqp",
                    "--seed",
                    str(SEED),
                ],
                env={**os.environ, **sim_env, "CHIFFON_AMQP_URL": amqp},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        if sim is not None:
            pids["simulate"] = sim.pid
        try:
            time.sleep(args.warmup)
            cpu = CpuWatch(pids)
            load = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--client",
                    api,
                    "--seconds",
                    str(args.seconds),
                    "--concurrency",
                    str(args.concurrency),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            cpu_shares = cpu.shares()
        finally:
            if sim is not None:
                stop(sim, timeout=30)
        counted = messages_counted(ingest_api)
        output = sim.stdout.read() if sim is not None and sim.stdout else ""
        sim_out = [line for line in output.splitlines() if line.startswith("sent ")]
        result: dict[str, Any] = json.loads(load.stdout)
        if result["errors"] or counted["rejected"]:
            raise SystemExit(
                f"{engine}/{size}: {result['errors']} queries failed, "
                f"{counted['rejected']:.0f} heartbeats rejected"
            )
        result.update(
            seed_seconds=seed_seconds,
            raw_sql=raw,
            simulate=sim_out[-1:],
            heartbeats=counted,
            cpu_during_queries=cpu_shares,
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--engines", default="postgresql,sqlite")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-ingest", action="store_true", help="no simulate meanwhile")
    parser.add_argument(
        "--split",
        action="store_true",
        help="query a second orchestrator process (no --amqp-url) while the first ingests",
    )
    parser.add_argument("--results", default="capacity_query", help="name of the JSON file")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client(args.client, args.seconds, args.concurrency))))
        return
    info = machine()
    results: dict[str, dict[str, Any]] = {}
    print(
        f"{'engine':<12}{'agents':>8}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}"
        f"{'loaded p50/p99':>16}{'SQL p50':>9}{'SQL p99':>9}  ingest meanwhile"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                r = one_case(engine, size, args, Path(tmp))
                results[f"{engine}/{size}"] = r
                print(
                    f"{engine:<12}{size:>8,}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
                    f"{r['per_s']:>8.0f}{r['loaded_p50_ms']:>8.1f}/{r['loaded_p99_ms']:<7.1f}"
                    f"{r['raw_sql']['p50_ms']:>9.2f}{r['raw_sql']['p99_ms']:>9.2f}"
                    f"  {' '.join(r['simulate'])}",
                    flush=True,
                )
                shares = ", ".join(
                    f"{k.removesuffix('_of_one_core')} {v:.0%}"
                    for k, v in r["cpu_during_queries"].items()
                )
                print(f"{'':<20}CPU while querying: {shares}", flush=True)
    write_results(
        args.results,
        {"machine": info, "args": vars(args), "query": QUERY, "results": results},
    )


if __name__ == "__main__":
    main()
