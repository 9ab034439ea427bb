"""Capacity queries and heartbeat ingest while a queue of jobs is being placed.

One PostgreSQL database holds `--agents` desktops (rows as `chiffon simulate` reports
them, all taking jobs). Throughout the run:

- **ingest**: this process publishes those desktops' heartbeats to a private RabbitMQ
  vhost at their steady rate (one every 15 s each: 667/s for 10,000), each signed with
  its agent's own key, and consumes them with the orchestrator's own ingest
  (`Orchestrator` + `RabbitConsumer`, as `bench/ingest.py` does, without the sweep and
  the dispatcher; the garbage collector set as `chiffon orchestrator` sets it). The
  latency of a heartbeat is its commit time minus its `sent_at`.
- **placing**: two `chiffon orchestrator` processes (API and dispatcher each, no broker)
  on the same database.
- **capacity queries**: a separate client process sends
  `GET /api/v1/agents/available-capacity?min_gpu_vram_gb=8&min_cpu_cores=2&limit=10` to
  orchestrator A back to back, one at a time; with `--serving`, to a third orchestrator
  started with `--no-dispatch` (it serves, A and B place). `--nice N` starts A and B N
  lower in the CPU scheduler's priority.

Two windows of `--seconds` each:

1. **without dispatch**: nothing queued (the dispatchers' passes find nothing);
2. **with dispatch**: the orchestrators are stopped, `--queue` jobs (1 GPU, 2 GB, half a
   core each) are queued, the two are started again, and the window counts from then.
   Its latencies are those of queries and heartbeats that ended while placements were
   being made (between the first attempt's `assigned_at` and the last one's). With
   `--rate R`, nothing is queued before: R jobs are queued each second of the window
   instead, by a process of its own (a steady load rather than a backlog drained as fast
   as the machine allows). With `--alternate S` as well, only in every other S seconds:
   the window's samples are then also split into those that ended within 0.5 s of a
   placement and those more than 2 s from any, and their p99s compared ("interleaved":
   the machine's drift between two windows, twofold between runs here, falls out).

It prints p50/p99 of each in both windows, their ratio, the placements per second the
two orchestrators made in the second window, and each process's CPU.
Target (issue 24): each p99 with dispatch at most twice its p99 without.

    .venv/bin/python bench/dispatch_load.py [--agents 10000] [--queue 20000] [--seconds 60]
        [--rate R] [--serving] [--nice N]

Takes about 5 minutes. Needs PostgreSQL and RabbitMQ as the other benchmarks do.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity_query import QUERY, SEED, seed, seed_rows
from bench.common import (
    CpuWatch,
    api_headers,
    fresh_postgres,
    insert_credentials,
    issue_credentials,
    machine,
    orchestrator,
    percentile,
    private_vhost,
    write_results,
)
from bench.dispatch import SMALL_JOB, _queue
from bench.ingest import chiffon_consumer

from chiffon.agent.simulate import VirtualAgent, make_fleet
from chiffon.cli.orchestrator_cmd import GC_THRESHOLDS
from chiffon.transport.auth import SIGNATURE_HEADER, AgentCredential
from chiffon.transport.rabbitmq.topology import EXCHANGE, declare_exchange

INTERVAL_SECONDS = 15.0  # each desktop's heartbeat, as a real fleet's at its default
TICK_SECONDS = 0.05


def _queries(api: str, seconds: float) -> list[tuple[float, float]]:
    """One client querying back to back for `seconds` (its own process): (ended at, ms)."""
    samples: list[tuple[float, float]] = []
    url = f"{api}/api/v1/agents/available-capacity"
    with httpx.Client(timeout=10, headers=api_headers()) as http:
        for _ in range(20):  # warm the connection and the server's caches
            http.get(url, params=QUERY).raise_for_status()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            http.get(url, params=QUERY).raise_for_status()
            samples.append((time.time(), (time.perf_counter() - started) * 1000))
    return samples


async def _beat(
    amqp_url: str,
    fleet: list[VirtualAgent],
    creds: dict[Any, AgentCredential],
    rate: float,
    running: Callable[[], bool],
) -> int:
    """Publish the fleet's heartbeats round after round at `rate`/s while `running()`;
    returns how many were sent."""
    sent = 0
    owed = 0.0
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_exchange(channel, EXCHANGE)
        next_at = time.monotonic()
        while running():
            owed += rate * TICK_SECONDS
            publishes = []
            while owed >= 1:
                agent = fleet[sent % len(fleet)]
                body = agent.message().encode()  # sent_at: now
                message = aio_pika.Message(
                    body,
                    content_type="application/json",
                    headers={SIGNATURE_HEADER: creds[agent.agent_id].sign(body)},
                )
                publishes.append(exchange.publish(message, f"agent.heartbeat.{agent.agent_id}"))
                sent += 1
                owed -= 1
            await asyncio.gather(*publishes)
            next_at += TICK_SECONDS
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def _feed(
    url: str, per_second: float, running: Callable[[], bool], alternate: float = 0
) -> int:
    """Queue `per_second` jobs each second (one transaction) while `running()`; with
    `alternate`, only in every other stretch of that many seconds."""
    from chiffon.persistence import jobs as repo
    from chiffon.persistence.db import create_engine, session_factory
    from chiffon.schemas.jobs import JobSubmit

    engine = create_engine(url)
    sessions = session_factory(engine)
    spec = JobSubmit.model_validate({"command": ["train"], "requirements": SMALL_JOB}).model_dump(
        mode="json"
    )
    queued, owed, began = 0, 0.0, time.monotonic()
    next_at = began
    while running():
        if not alternate or int((time.monotonic() - began) / alternate) % 2 == 0:
            owed += per_second
        async with sessions.begin() as session:
            while owed >= 1:
                await repo.add_job(session, job_id=uuid.uuid4(), name=None, spec=spec,
                                   now=datetime.now(UTC))  # fmt: skip
                queued, owed = queued + 1, owed - 1
        next_at += 1.0
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await engine.dispose()
    return queued


def _feeder(url: str, per_second: float, seconds: float, alternate: float) -> int:
    """`_feed` for `seconds`, in a process of its own (not the one ingesting)."""
    end = time.monotonic() + seconds
    return asyncio.run(_feed(url, per_second, lambda: time.monotonic() < end, alternate))


def _summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"count": 0}
    return {"count": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms), 2)}  # fmt: skip


def _within(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [ms for at, ms in samples if start <= at <= end]


NEAR_SECONDS = 0.5  # a sample "while placing": a placement this close to its end
FAR_SECONDS = 2.0  # a sample "not placing": no placement this close to its end


def _interleaved(
    queries: list[tuple[float, float]],
    heartbeats: list[tuple[float, float]],
    placements: list[float],
    window: tuple[float, float],
    alternate: float,
) -> dict[str, Any]:
    """The same minute's samples, taken while placing and while not: the machine's drift
    between two windows (twofold between runs) falls out."""
    beats_ms = [(at, seconds * 1000) for at, seconds in heartbeats]
    start, end = window
    busy_seconds = {int(at) for at in placements if start <= at <= end}
    split: dict[str, Any] = {
        "alternate_seconds": alternate,
        # placements over the whole seconds in which any was made
        "placements_per_busy_second": round(
            sum(start <= at <= end for at in placements) / max(len(busy_seconds), 1), 1
        ),
    }
    for part, samples in (("capacity_query", queries), ("ingest", beats_ms)):
        placing, quiet = _split(samples, placements, *window)
        split[part] = {"placing": _summary(placing), "not_placing": _summary(quiet)}
        if placing and quiet:
            split[f"{part}_p99_ratio"] = round(percentile(placing, 99) / percentile(quiet, 99), 2)
    return split


def _split(
    samples: list[tuple[float, float]], placements: list[float], start: float, end: float
) -> tuple[list[float], list[float]]:
    """The samples between `start` and `end` that ended while placements were being made
    (one within NEAR_SECONDS), and those that ended far from any (FAR_SECONDS)."""
    placing, quiet = [], []
    for at, ms in samples:
        if not start <= at <= end:
            continue
        i = bisect.bisect_left(placements, at - FAR_SECONDS)
        nearest = min((abs(p - at) for p in placements[i : i + 64]), default=math.inf)
        if nearest <= NEAR_SECONDS:
            placing.append(ms)
        elif nearest > FAR_SECONDS:
            quiet.append(ms)
    return placing, quiet


async def run(
    agents: int,
    queue: int,
    seconds: float,
    rate: float,
    serving: bool,
    nice: int,
    alternate: float,
    tmp: Path,
) -> dict[str, Any]:
    with ExitStack() as stack:
        url = stack.enter_context(fresh_postgres())
        rows = seed_rows(agents)
        for row in rows:
            row["accepts_jobs"] = True
        seed(url, rows)
        fleet = make_fleet(agents, seed=SEED, accept_jobs=True)  # the seeded desktops
        cred_rows, creds = issue_credentials([a.agent_id for a in fleet])
        insert_credentials(url, cred_rows)
        amqp_url = stack.enter_context(private_vhost())
        conninfo = url.replace("postgresql+psycopg://", "postgresql://")

        orch, consumer, ingest = await chiffon_consumer(url, amqp_url, sweep=False)
        beating = True
        beats = asyncio.create_task(_beat(amqp_url, fleet, creds, agents / INTERVAL_SECONDS,
                                          lambda: beating))  # fmt: skip
        pool = stack.enter_context(
            ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        )
        loop = asyncio.get_running_loop()
        env = {"CHIFFON_HEARTBEAT_TIMEOUT": "3600"}
        # Ingest here as in `chiffon orchestrator`: the heap so far frozen, the young
        # generation raised (orchestrator_cmd.serve).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            await asyncio.sleep(INTERVAL_SECONDS + 2)  # every desktop has beaten once

            async def window(
                name: str, rate: float = 0
            ) -> tuple[list[tuple[float, float]], dict[str, float], int]:
                # Started and stopped in a thread: ingest runs in this loop meanwhile.
                two = ExitStack()
                try:
                    a, a_proc = await asyncio.to_thread(
                        two.enter_context,
                        orchestrator(url, env=env, log=tmp / f"{name}-a.log", nice=nice),
                    )
                    _, b_proc = await asyncio.to_thread(
                        two.enter_context,
                        orchestrator(url, env=env, log=tmp / f"{name}-b.log", nice=nice),
                    )
                    watched = {"orchestrator_a": a_proc.pid, "orchestrator_b": b_proc.pid,
                               "this_process_publish_and_ingest": os.getpid()}  # fmt: skip
                    asked = a
                    if serving:
                        asked, c_proc = await asyncio.to_thread(
                            two.enter_context,
                            orchestrator(url, "--no-dispatch", env=env,
                                         log=tmp / f"{name}-c.log"),
                        )  # fmt: skip
                        watched["orchestrator_c_not_placing"] = c_proc.pid
                    cpu = CpuWatch(watched)
                    feeder = (
                        loop.run_in_executor(pool, _feeder, url, rate, seconds, alternate)
                        if rate
                        else None
                    )
                    queries = await loop.run_in_executor(pool, _queries, asked, seconds)
                    fed = await feeder if feeder is not None else 0
                    return queries, cpu.shares(), fed
                finally:
                    await asyncio.to_thread(two.close)

            started = time.time()
            quiet_queries, quiet_cpu, _ = await window("quiet")
            quiet_ingest = _within(ingest.latencies, started, time.time())

            if not rate:
                await _queue(url, queue)
            started = time.time()
            busy_queries, busy_cpu, fed = await window("busy", rate)
            ended = time.time()
            with psycopg.connect(conninfo) as db:
                first, last, placed = db.execute(
                    "SELECT extract(epoch FROM min(assigned_at)), "
                    "extract(epoch FROM max(assigned_at)), count(*) FROM job_attempts"
                ).fetchone()  # type: ignore[misc]
                left = db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()
                placements = sorted(
                    float(at) for (at,) in db.execute(
                        "SELECT extract(epoch FROM assigned_at) FROM job_attempts"
                    )
                )  # fmt: skip
        finally:
            beating = False
            sent = await beats
            await consumer.stop()
            await orch.stop()
    if not placed:
        raise SystemExit("nothing was placed in the window with dispatch")
    first, last = float(first), float(last)
    busy_ingest = _within(ingest.latencies, first, last)
    result: dict[str, Any] = {
        "agents": agents,
        "heartbeats_per_second": round(agents / INTERVAL_SECONDS, 1),
        "heartbeats_sent": sent,
        "heartbeats_rejected": ingest.rejected,
        "window_seconds": seconds,
        "placing_orchestrators_nice": nice,
        "queries_to": "orchestrator C (--no-dispatch)" if serving else "orchestrator A (placing)",
        "without_dispatch": {
            "capacity_query": _summary([ms for _, ms in quiet_queries]),
            "ingest": _summary([s * 1000 for s in quiet_ingest]),
            "cpu": quiet_cpu,
        },
        "with_dispatch": {
            "queued": fed if rate else queue,
            "queued_per_second": rate or None,
            "placed": placed,
            "still_queued": left[0] if left else None,
            "placing_seconds": round(last - first, 1),
            "placements_per_second": round(placed / max(last - first, 1e-9), 1),
            "from_window_start_to_first_placement_s": round(first - started, 1),
            "capacity_query": _summary(_within(busy_queries, first, last)),
            "ingest": _summary([s * 1000 for s in busy_ingest]),
            "cpu": busy_cpu,
        },
        "window_end_after_last_placement_s": round(ended - last, 1),
    }
    for part in ("capacity_query", "ingest"):
        quiet = result["without_dispatch"][part].get("p99_ms")
        busy = result["with_dispatch"][part].get("p99_ms")
        if quiet and busy:
            result[f"{part}_p99_ratio"] = round(busy / quiet, 2)
    if alternate:
        result["interleaved"] = _interleaved(
            busy_queries, ingest.latencies, placements, (started, ended), alternate
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--queue", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=60, help="each window")
    parser.add_argument("--rate", type=float, default=0, help="jobs queued a second instead")
    parser.add_argument(
        "--serving", action="store_true",
        help="query a third orchestrator, started with --no-dispatch, instead of A",
    )  # fmt: skip
    parser.add_argument("--nice", type=int, default=0, help="added to A's and B's priority")
    parser.add_argument(
        "--alternate", type=float, default=0,
        help="with --rate: queue only in every other stretch of this many seconds, and "
        "compare the samples taken while placing with those taken while not",
    )  # fmt: skip
    options = parser.parse_args()
    if options.alternate and not options.rate:
        parser.error("--alternate needs --rate")
    with tempfile.TemporaryDirectory() as tmp:
        got = asyncio.run(
            run(
                options.agents,
                options.queue,
                options.seconds,
                options.rate,
                options.serving,
                options.nice,
                options.alternate,
                Path(tmp),
            )
        )
    print(json.dumps(got, indent=1))
    name = f"dispatch_load_rate_{options.rate:g}" if options.rate else "dispatch_load"
    name += "_serving" if options.serving else ""
    name += f"_nice_{options.nice}" if options.nice else ""
    name += f"_alternate_{options.alternate:g}" if options.alternate else ""
    write_results(name, {"machine": machine(), **got})


if __name__ == "__main__":
    main()
