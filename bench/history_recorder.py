"""What one tick of the metrics history recorder costs for a large fleet.

Registers `--agents` online agents (one GPU each) through the real ingest path, then
times `HistoryRecorder.record_once` on SQLite and on the local PostgreSQL: ticks that
write the full-resolution tier only (most ticks), and ticks at a quarter-hour boundary
that write all three tiers. Each kind is repeated `--repeats` times on a manual clock and
the median and range are reported.

    .venv/bin/python bench/history_recorder.py [--agents 10000] [--repeats 5]

Prints a table and writes bench/results/history_recorder.json. Needs PostgreSQL at
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ingest_batching import HEARTBEAT_INTERVAL_SECONDS, drop_postgres, fresh_postgres, heartbeat

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import db

RESULTS = Path(__file__).parent / "results"
# A quarter-hour boundary, so the first tick writes every tier.
START = datetime(2026, 1, 1, tzinfo=UTC)


async def timed_tick(orch: Orchestrator, clock: ManualClock, advance: float) -> tuple[float, int]:
    clock.advance(advance)
    started = time.perf_counter()
    written = await orch.recorder.record_once()
    return time.perf_counter() - started, sum(written.values())


async def bench_engine(url: str, args: argparse.Namespace) -> dict[str, Any]:
    db.upgrade(url)
    clock = ManualClock(START - timedelta(seconds=1))
    # A long timeout keeps the whole fleet "recently heard" while the clock runs ahead.
    settings = OrchestratorSettings(database_url=url, heartbeat_timeout_seconds=86400)
    orch = Orchestrator(settings, clock=clock)
    await orch.start(sweep=False)
    try:
        boot = uuid.uuid4()
        bodies = [heartbeat(uuid.uuid4(), boot, 1) for _ in range(args.agents)]
        for chunk in range(0, len(bodies), 2000):
            await asyncio.gather(*(orch.ingest(b) for b in bodies[chunk : chunk + 2000]))
        all_tiers: list[float] = []
        raw_only: list[float] = []
        rows: set[int] = set()
        for _ in range(args.repeats):
            # Onto the next quarter hour: every tier's bucket begins.
            seconds, written = await timed_tick(orch, clock, 1)
            all_tiers.append(seconds)
            rows.add(written)
            for _ in range(3):  # the next intervals of the same minute: the raw tier only
                seconds, written = await timed_tick(orch, clock, HEARTBEAT_INTERVAL_SECONDS)
                raw_only.append(seconds)
                rows.add(written)
            clock.advance(900 - 3 * HEARTBEAT_INTERVAL_SECONDS - 1)
        return {
            "agents": args.agents,
            "all_tiers_ms": [round(1000 * s, 1) for s in all_tiers],
            "raw_only_ms": [round(1000 * s, 1) for s in raw_only],
            "all_tiers_median_ms": 1000 * statistics.median(all_tiers),
            "raw_only_median_ms": 1000 * statistics.median(raw_only),
            "rows_per_tick": sorted(rows),
        }
    finally:
        await orch.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = await bench_engine(db.default_database_url(Path(tmp)), args)
    url, conninfo = fresh_postgres()
    try:
        results["postgresql"] = await bench_engine(url, args)
    finally:
        drop_postgres(url, conninfo)
    print(f"{'engine':<12}{'agents':>8}{'3 tiers (ms)':>14}{'raw only (ms)':>15}  rows/tick")
    for engine, r in results.items():
        print(
            f"{engine:<12}{r['agents']:>8,}{r['all_tiers_median_ms']:>14.1f}"
            f"{r['raw_only_median_ms']:>15.1f}  {r['rows_per_tick']}"
        )
        print(f"  3 tiers: {r['all_tiers_ms']}\n  raw only: {r['raw_only_ms']}")
    RESULTS.mkdir(exist_ok=True)
    record = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    (RESULTS / "history_recorder.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
