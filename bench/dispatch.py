"""Jobs: submit to process start on an idle fleet, and placements per second at scale.

1. **Submit to start**, over HTTP and over RabbitMQ: `chiffon orchestrator` on a fresh
   PostgreSQL database and three real `chiffon agent --accept-jobs` processes; `--jobs`
   jobs submitted one after the other through the API (`chiffon.client`), each running
   `date +%s.%N`, whose printed time minus the submit time is the latency (one clock: all
   on this machine). Beside it, in the same run, the floor: one API round trip on a kept
   connection (`GET /healthz`) and one fork+exec of `date` from Python. Target (issue
   22): p99 under 1 s. With 100 jobs, p99 is the slowest (nearest rank).
2. **Placements per second** with 1,000 agents (rows as `chiffon simulate` would report
   them, all accepting jobs) and `--queue` queued jobs on PostgreSQL: the scheduler's
   passes (`scheduler.schedule_once`, in process) until the queue is placed or nothing
   more fits. Beside it, the raw SQL of one claim transaction (lock the job, lock the
   agent, insert the attempt, the claims and the event, update the job) with psycopg, as
   the floor. Anchors: Slurm sustains about 500 jobs/s, the Kubernetes scheduler 100
   pods/s.

    .venv/bin/python bench/dispatch.py [--jobs 100] [--queue 2000] [--agents 1000]
        [--placements-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity_query import seed, seed_rows
from bench.common import (
    CHIFFON,
    api_headers,
    auth_env,
    fresh_postgres,
    insert_credentials,
    issue_credentials,
    machine,
    orchestrator,
    percentile,
    private_vhost,
    simulate_data_dir,
    stop,
    timed,
    write_results,
)

from chiffon.client import Client
from chiffon.orchestrator.scheduler import BATCH

AGENTS = 3


def start_agents(
    tmp: Path, api: str, transport: str, amqp_url: str | None, extra: dict[str, str] | None = None
) -> list[Any]:
    return [agent(tmp, api, transport, amqp_url, n, extra) for n in range(AGENTS)]


def agent(tmp: Path, api: str, transport: str, amqp_url: str | None, n: int,
          extra: dict[str, str] | None = None) -> Any:  # fmt: skip
    """`chiffon agent --accept-jobs` number `n` (started again with the same identity)."""
    env = {**os.environ, **(extra or {}), **auth_env(), "CHIFFON_ORCHESTRATOR_URL": api,
           "CHIFFON_TRANSPORT": transport, "CHIFFON_AMQP_URL": amqp_url or "",
           "CHIFFON_ACCEPT_JOBS": "true", "CHIFFON_ALLOW_ROOT_JOBS": "true"}  # fmt: skip
    home = tmp / f"agent-{n}"
    home.mkdir(exist_ok=True)
    with (tmp / f"agent-{n}.log").open("a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*CHIFFON, "agent", "--name", f"bench-{n}", "--state-dir", str(home)],
            env={**env, "HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


def wait_online(api: str, count: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = httpx.get(f"{api}/api/v1/agents", headers=api_headers(), timeout=5).json()
        if sum(1 for r in rows if r["status"] == "online") >= count:
            return
        time.sleep(0.2)
    raise SystemExit(f"{count} agents did not come online within {within} s")


def submit_to_start(transport: str, jobs: int) -> dict[str, Any]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = stack.enter_context(fresh_postgres())
        amqp_url = stack.enter_context(private_vhost()) if transport == "amqp" else None
        args = ["--amqp-url", amqp_url] if amqp_url else []
        api, _ = stack.enter_context(orchestrator(database, *args, log=tmp / "orch.log"))
        for proc in start_agents(tmp, api, transport, amqp_url):
            stack.callback(stop, proc)
        wait_online(api, AGENTS)
        client = stack.enter_context(Client(api, token=auth_env()["CHIFFON_API_TOKEN"]))
        latencies = []
        for _ in range(jobs):
            submitted = time.time()
            job_id = client.submit(["date", "+%s.%N"]).job.job_id
            done = client.wait(job_id, timeout_seconds=30)
            if done.state != "succeeded":
                raise SystemExit(f"job {job_id} {done.state}: {done.reason}")
            started = float("".join(p.data for p in client.logs(job_id)).strip())
            latencies.append(started - submitted)
        kept = stack.enter_context(httpx.Client(base_url=api, timeout=5))  # kept alive
        floor_http = timed(lambda: kept.get("/healthz"), 100)
    floor_exec = timed(lambda: subprocess.run(["date", "+%s.%N"], capture_output=True), 100)
    return {
        "transport": transport, "jobs": jobs,
        "submit_to_start_ms": _summary(latencies),
        "floor_api_round_trip_ms": _summary(floor_http),
        "floor_fork_exec_ms": _summary(floor_exec),
    }  # fmt: skip


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50": round(percentile(ms, 50), 1), "p99": round(percentile(ms, 99), 1),
            "max": round(max(ms), 1)}  # fmt: skip


SMALL_JOB = {"gpus": 1, "vram_gb": 2, "cpu_cores": 0.5}


async def _queue(url: str, queue: int, requirements: dict[str, Any] = SMALL_JOB) -> None:
    """`queue` jobs (by default of 1 GPU, 2 GB, half a core) as the API would write them
    (a thousand to a transaction, so that queueing 100,000 takes seconds, not minutes)."""
    from chiffon.persistence import jobs as repo
    from chiffon.persistence.db import create_engine, session_factory
    from chiffon.schemas.jobs import JobSubmit

    engine = create_engine(url)
    sessions = session_factory(engine)
    spec = JobSubmit.model_validate(
        {"command": ["train"], "requirements": requirements}
    ).model_dump(mode="json")
    for first in range(0, queue, 1000):
        async with sessions.begin() as session:
            for _ in range(min(1000, queue - first)):
                await repo.add_job(session, job_id=uuid.uuid4(), name=None, spec=spec,
                                   now=datetime.now(UTC))  # fmt: skip
    await engine.dispose()


async def _drain(url: str, batch: int) -> tuple[int, int]:
    """One orchestrator's scheduler: passes until nothing is queued or nothing more fits
    (the passes of the other orchestrators placing the rest). (placed, passes)"""
    from chiffon.orchestrator.scheduler import FleetCache, schedule_once
    from chiffon.persistence.db import create_engine, session_factory

    engine = create_engine(url)
    sessions = session_factory(engine)
    placed = passes = 0
    cache = FleetCache()  # as the orchestrator's Dispatcher keeps it between passes
    while True:
        now = datetime.now(UTC)
        result = await schedule_once(sessions, now=now, batch=batch, cache=cache,
                                     clock=lambda: datetime.now(UTC))  # fmt: skip
        passes += 1
        placed += len(result.placed)
        if not result.placed and not result.waits and await _queued(sessions) == 0:
            break  # nothing queued
        if not result.placed and result.waits:
            break  # what is left does not fit
    await engine.dispose()
    return placed, passes


async def _queued(sessions: Any) -> int:
    from sqlalchemy import func, select

    from chiffon.persistence.models import JobRow

    async with sessions() as session:
        return int(await session.scalar(select(func.count()).where(JobRow.state == "queued")))


def _orchestrator(url: str, batch: int, start_at: float) -> tuple[int, int, float]:
    """A process of its own, as a second `chiffon orchestrator` is: starts at `start_at`
    (time.time()), returns (placed, passes, when it finished)."""
    time.sleep(max(0.0, start_at - time.time()))
    placed, passes = asyncio.run(_drain(url, batch))
    return placed, passes, time.time()


def _place_all(url: str, queue: int, batch: int, processes: int) -> dict[str, Any]:
    asyncio.run(_queue(url, queue))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=spawn) as pool:
        start_at = time.time() + 3.0  # each process imported and waiting
        done = [f.result() for f in [pool.submit(_orchestrator, url, batch, start_at)
                                     for _ in range(processes)]]  # fmt: skip
    placed = sum(d[0] for d in done)
    elapsed = max(d[2] for d in done) - start_at
    rate = round(placed / elapsed, 1)
    return {"queued": queue, "placed": placed, "orchestrators": processes, "batch": batch,
            "passes": sum(d[1] for d in done), "seconds": round(elapsed, 2),
            "placements_per_second": rate}  # fmt: skip


def raw_claim_ms(url: str, repeats: int = 300) -> dict[str, float]:
    """The floor: one claim transaction's SQL with psycopg, on the same database."""
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        agents = [r[0] for r in conn.execute("SELECT agent_id FROM agent_registry LIMIT 100")]
        times = []
        for i in range(repeats):
            job, agent, now = uuid.uuid4(), agents[i % len(agents)], datetime.now(UTC)
            conn.execute(
                "INSERT INTO jobs (job_id, state, reason, spec, attempt, retries_used, "
                "submitted_at, updated_at) VALUES (%s, 'queued', '', '{}', 0, 0, %s, %s)",
                (job, now, now),
            )
            conn.commit()
            started = time.perf_counter()
            with conn.transaction():
                conn.execute("SELECT job_id FROM jobs WHERE job_id = %s AND state = 'queued' "
                             "FOR UPDATE SKIP LOCKED", (job,))  # fmt: skip
                conn.execute("SELECT agent_id FROM agent_registry WHERE agent_id = %s "
                             "FOR UPDATE", (agent,))  # fmt: skip
                conn.execute("SELECT * FROM job_claims WHERE agent_id = %s", (agent,))
                conn.execute(
                    "INSERT INTO job_attempts (job_id, attempt, agent_id, state, gpu_uuids, "
                    "assigned_at, reason) VALUES (%s, 1, %s, 'assigned', '[]', %s, '')",
                    (job, agent, now),
                )
                for resource in ("host", "gpu:bench"):
                    conn.execute(
                        "INSERT INTO job_claims (job_id, attempt, resource, agent_id, vram_gb) "
                        "VALUES (%s, 1, %s, %s, 2)", (job, resource, agent),
                    )  # fmt: skip
                conn.execute(
                    "INSERT INTO job_events (job_id, at, attempt, from_state, to_state, reason)"
                    " VALUES (%s, %s, 1, 'queued', 'assigned', 'bench')", (job, now),
                )  # fmt: skip
                conn.execute("UPDATE jobs SET state = 'assigned', attempt = 1, agent_id = %s "
                             "WHERE job_id = %s", (agent, job))  # fmt: skip
            times.append(time.perf_counter() - started)
    return _summary(times)


def raw_batch_per_second(url: str, batch: int = BATCH, batches: int = 40) -> float:
    """The floor of the batched scheduler: placements per second of the same batch
    transaction in bare SQL with psycopg (lock `batch` queued jobs in one statement, lock
    their agents in one, read those agents' claims, insert the attempts, claims and events,
    update the jobs: one round trip each, rows sent with executemany), no choosing."""
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        agents = [r[0] for r in conn.execute("SELECT agent_id FROM agent_registry LIMIT 2000")]
        elapsed = 0.0
        for b in range(batches):
            now, jobs = datetime.now(UTC), [uuid.uuid4() for _ in range(batch)]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO jobs (job_id, state, reason, spec, attempt, retries_used, "
                    "submitted_at, updated_at) VALUES (%s, 'queued', '', '{}', 0, 0, %s, %s)",
                    [(j, now, now) for j in jobs],
                )
            conn.commit()
            mine = [agents[(b * batch + i) % len(agents)] for i in range(batch)]
            started = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT job_id FROM jobs WHERE job_id = ANY(%s) AND state = 'queued' "
                            "FOR UPDATE SKIP LOCKED", (jobs,))  # fmt: skip
                cur.execute("SELECT agent_id FROM agent_registry WHERE agent_id = ANY(%s) "
                            "FOR UPDATE SKIP LOCKED", (mine,))  # fmt: skip
                cur.execute("SELECT * FROM job_claims WHERE agent_id = ANY(%s)", (mine,))
                cur.executemany(
                    "INSERT INTO job_attempts (job_id, attempt, agent_id, state, gpu_uuids, "
                    "assigned_at, reason) VALUES (%s, 1, %s, 'assigned', '[]', %s, '')",
                    [(j, a, now) for j, a in zip(jobs, mine, strict=True)],
                )
                cur.executemany(
                    "INSERT INTO job_claims (job_id, attempt, resource, agent_id, vram_gb) "
                    "VALUES (%s, 1, %s, %s, 2)",
                    [(j, r, a) for j, a in zip(jobs, mine, strict=True) for r in ("host", "gpu:b")],
                )
                cur.executemany(
                    "INSERT INTO job_events (job_id, at, attempt, from_state, to_state, reason)"
                    " VALUES (%s, %s, 1, 'queued', 'assigned', 'bench')", [(j, now) for j in jobs],
                )  # fmt: skip
                cur.executemany(
                    "UPDATE jobs SET state = 'assigned', attempt = 1, agent_id = %s "
                    "WHERE job_id = %s", [(a, j) for j, a in zip(jobs, mine, strict=True)],
                )  # fmt: skip
            elapsed += time.perf_counter() - started
    return round(batches * batch / elapsed, 1)


def placements(queue: int, agents: int = 1000, batch: int = BATCH, processes: int = 1
               ) -> dict[str, Any]:  # fmt: skip
    with fresh_postgres() as url:
        rows = seed_rows(agents)
        for row in rows:
            row["accepts_jobs"] = True
        seed(url, rows)
        result = _place_all(url, queue, batch, processes)
        result["raw_claim_transaction_ms"] = raw_claim_ms(url)
        result["raw_batch_placements_per_second"] = raw_batch_per_second(url)
        result["fraction_of_raw_batch"] = round(
            result["placements_per_second"] / result["raw_batch_placements_per_second"], 2
        )
    return result


def placements_in_history(placements: int, agents: int, job_seconds: str,
                          within_minutes: float) -> dict[str, Any]:  # fmt: skip
    """Double-bookings, from the database's own history, in `placements` placements made
    by two `chiffon orchestrator` processes on one PostgreSQL while they ingest the
    heartbeats of `agents` simulated desktops that run the jobs (two `chiffon simulate
    --accept-jobs` processes, each reporting to one of the orchestrators, each attempt
    `job_seconds` long): 4 GB and a quarter of a core each, so that GPUs fill up (how
    many were ever too full for one more job is printed: `gpus_filled`). The queue is kept
    at `placements` jobs; the run ends once that many attempts were placed (or after
    `within_minutes`), then `bench/chaos.check_history` sweeps every GPU's and agent's
    claims through time."""
    from bench.chaos import Orchestrator, check_history

    from chiffon.agent.simulate import agent_id_for

    liveness = {"CHIFFON_HEARTBEAT_INTERVAL": "15", "CHIFFON_HEARTBEAT_TIMEOUT": "45"}
    need = {"gpus": 1, "vram_gb": 4, "cpu_cores": 0.25}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        url = stack.enter_context(fresh_postgres())
        amqp_url = stack.enter_context(private_vhost())
        # Half the desktops talk to each orchestrator (seeds 7 and 8), as a fleet behind
        # two addresses would: one orchestrator alone could not answer all their reports.
        halves = [(7, agents // 2), (8, agents - agents // 2)]
        ids = [agent_id_for(seed, i) for seed, n in halves for i in range(n)]
        rows, creds = issue_credentials(ids)
        insert_credentials(url, rows)
        two = [Orchestrator(n, url, amqp_url, tmp, liveness) for n in "AB"]
        for o in two:
            o.start()
            stack.callback(o.stop)
        sims = []
        for (seed, n), o in zip(halves, two, strict=True):
            data = simulate_data_dir(tmp / f"sim-{seed}", seed, creds)
            env = {**os.environ, **auth_env(), **data, "CHIFFON_ORCHESTRATOR_URL": o.url,
                   "CHIFFON_AMQP_URL": amqp_url}  # fmt: skip
            with (tmp / f"simulate-{seed}.log").open("w") as log:
                sim = subprocess.Popen(
                    [*CHIFFON, "simulate", "--agents", str(n), "--interval", "15",
                     "--transport", "amqp", "--accept-jobs", "--seed", str(seed),
                     "--job-seconds", job_seconds, "--timeout", "10"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
            stack.callback(stop, sim)
            sims.append(sim)
        conninfo = url.replace("postgresql+psycopg://", "postgresql://")
        asyncio.run(_queue(url, placements, need))
        started = time.monotonic()
        placed = 0
        with psycopg.connect(conninfo, autocommit=True) as db:
            while placed < placements and time.monotonic() - started < within_minutes * 60:
                time.sleep(5)
                placed = db.execute("SELECT count(*) FROM job_attempts").fetchone()[0]
                print(f"  {time.monotonic() - started:.0f} s: {placed} placements", flush=True)
        elapsed = time.monotonic() - started
        for sim in sims:
            stop(sim)
        simulated = [(tmp / f"simulate-{seed}.log").read_text().strip().splitlines()[-1:]
                     for seed, _ in halves]  # fmt: skip
        for o in two:
            o.stop()
        history = check_history(url, settled=False)
    return {"agents": agents, "placements": placed, "seconds": round(elapsed, 1),
            "placements_per_second": round(placed / elapsed, 1), "job_seconds": job_seconds,
            "simulate": simulated, "history": history.summary()}  # fmt: skip


FAST_LIVENESS = {"CHIFFON_HEARTBEAT_INTERVAL": "1", "CHIFFON_HEARTBEAT_TIMEOUT": "3",
                 "CHIFFON_SWEEP_INTERVAL": "0.5"}  # fmt: skip


def placed_again_after_offline(rounds: int) -> dict[str, Any]:
    """A job's desktop is SIGKILLed: from the offline event the sweep writes to the job's
    next attempt assigned elsewhere, both stamped by the orchestrator's clock (the
    database's own record). Liveness made fast (1 s beats, 3 s timeout, 0.5 s sweep) so
    that the rounds are short; what is measured starts once the desktop is marked offline."""
    gaps = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = stack.enter_context(fresh_postgres())
        api, _ = stack.enter_context(orchestrator(database, env=FAST_LIVENESS,
                                                  log=tmp / "orch.log"))  # fmt: skip
        procs = dict(enumerate(start_agents(tmp, api, "http", None, FAST_LIVENESS)))
        for proc in procs.values():
            stack.callback(stop, proc)
        wait_online(api, AGENTS)
        client = stack.enter_context(Client(api, token=auth_env()["CHIFFON_API_TOKEN"]))
        names = {f"bench-{n}": n for n in procs}
        for _ in range(rounds):
            job = client.submit(["sleep", "600"], retries=1).job.job_id
            _until(lambda job=job: client.get(job).state == "running", 30)
            victim = names[str(client.get(job).agent_name)]
            procs[victim].kill()  # its desktop loses power
            procs[victim].wait()
            _until(lambda job=job: client.get(job).attempt == 2, 60)
            with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as db:
                offline_at = db.execute(
                    "SELECT max(at) FROM agent_events e JOIN jobs j ON j.job_id = %s "
                    "JOIN job_attempts a ON a.job_id = j.job_id AND a.attempt = 1 "
                    "WHERE e.agent_id = a.agent_id AND e.to_status = 'offline'", (job,)
                ).fetchone()[0]  # fmt: skip
                assigned_at = db.execute(
                    "SELECT assigned_at FROM job_attempts WHERE job_id = %s AND attempt = 2",
                    (job,),
                ).fetchone()[0]
            gaps.append((assigned_at - offline_at).total_seconds())
            client.cancel(job)
            procs[victim] = agent(tmp, api, "http", None, victim, FAST_LIVENESS)
            stack.callback(stop, procs[victim])
            wait_online(api, AGENTS)
    return {"rounds": rounds, "offline_to_placed_again_ms": _summary(gaps),
            "sweep_interval_seconds": 0.5}  # fmt: skip


def _until(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {within} s")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--queue", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=1000, help="for the placements")
    parser.add_argument("--batch", type=int, default=BATCH, help="jobs a transaction")
    parser.add_argument("--orchestrators", type=int, default=1, help="placing processes")
    parser.add_argument("--placements-only", action="store_true")
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        metavar="N",
        help="only: double-bookings in N placements (bench/chaos.check_history)",
    )
    parser.add_argument("--history-agents", type=int, default=400)
    parser.add_argument("--history-job-seconds", default="2-8")
    parser.add_argument("--history-minutes", type=float, default=30, help="at most")
    parser.add_argument("--lost-rounds", type=int, default=5, help="0: skip that part")
    options = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    if options.history:
        got = placements_in_history(
            options.history,
            options.history_agents,
            options.history_job_seconds,
            options.history_minutes,
        )
        print(json.dumps(got, indent=1))
        write_results("dispatch_history", {**results, "history": got})
        return
    for transport in () if options.placements_only else ("http", "amqp"):
        got = submit_to_start(transport, options.jobs)
        results[f"submit_to_start_{transport}"] = got
        print(f"{transport}: submit to start {got['submit_to_start_ms']} ms over {got['jobs']} "
              f"jobs; API round trip {got['floor_api_round_trip_ms']}, fork+exec "
              f"{got['floor_fork_exec_ms']}")  # fmt: skip
    if options.lost_rounds and not options.placements_only:
        got = placed_again_after_offline(options.lost_rounds)
        results["placed_again_after_offline"] = got
        print(f"a lost job placed again after its desktop is marked offline: "
              f"{got['offline_to_placed_again_ms']} ms")  # fmt: skip
    got = placements(options.queue, options.agents, options.batch, options.orchestrators)
    results[f"placements_{options.agents}_agents_postgresql"] = got
    print(f"placements ({got['orchestrators']} orchestrators, {options.agents} agents): "
          f"{got['placed']} of {got['queued']} in {got['seconds']} s = "
          f"{got['placements_per_second']}/s ({got['passes']} passes); raw claim transaction "
          f"{got['raw_claim_transaction_ms']} ms; the same batch in bare SQL "
          f"{got['raw_batch_placements_per_second']}/s, so "
          f"{got['fraction_of_raw_batch']} of it")  # fmt: skip
    write_results("dispatch" + ("_placements" if options.placements_only else ""), results)


if __name__ == "__main__":
    main()
