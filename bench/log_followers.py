"""What log followers cost the orchestrator while they wait, and whether writers wait
behind them (issue 34, item 9).

`--followers` (3,000) followers of one running job, each `Orchestrator.read_log` with a
30 s wait, in-process (no HTTP, `CHIFFON_LONG_POLLS_PER_TOKEN` lifted out of the way), on
SQLite and on the local PostgreSQL: `same`, all asking for the same bytes (people
watching one job), and `distinct`, each asking for a length of its own (no read can be
shared: as costly as followers of 3,000 jobs). How long a heartbeat, an attempt report, a
submission and `GET /agents` take a second after the followers began (while their first
reads go on) and again once they all wait; how long their first reads took (until a
second passes without a statement: none within 25 s when they keep asking); the
statements every engine sends in five seconds of waiting; then a chunk is stored, and
how many followers had it, how soon. `--notify-cost`: what the job-log notice costs the
transaction storing a chunk (PostgreSQL; on a tree with item 9 only).

    .venv/bin/python bench/log_followers.py [--followers 3000] [--modes same,distinct]
        [--engines sqlite,postgresql] [--name log_followers]

Prints one line a run and writes bench/results/<name>.json. Runs on any tree of
the repository (a tree from before item 9 ignores the lifted bound it does not have).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_postgres, machine, write_results
from tests.auth import API_HEADERS, API_TOKEN, ENROLL_TOKEN, SECRET_KEY
from tests.jobfleet import desktop

from chiffon.api.app import create_app
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import db
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit

QUIET_WITHIN_SECONDS = 25.0  # under the pools' 30 s: the followers still wait after it
WINDOW_SECONDS = 5.0


async def timed(work: Any) -> float | str:
    """Seconds `work` took, or what it raised (after 60 s at most)."""
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(work, 60)
    except Exception as exc:
        return type(exc).__name__
    status = getattr(result, "status_code", 200)
    return round(time.monotonic() - started, 3) if status < 300 else f"HTTP {status}"


async def writers(orch: Orchestrator, agent: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
    app = create_app(orch, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://chiffon", headers=API_HEADERS
    ) as client:
        await client.get("/api/v1/agents")  # the app's first request builds its schema
        return {
            "heartbeat": await timed(desktop(orch, "a", (24.0, 24.0), agent=agent)),
            "report": await timed(orch.report_attempt(agent, job_id, 1, Report("alive"))),
            "submit": await timed(client.post("/api/v1/jobs", json={"command": ["true"]})),
            "list_agents": await timed(client.get("/api/v1/agents")),
        }


async def run(url: str, followers: int, distinct: bool) -> dict[str, Any]:
    settings = OrchestratorSettings(
        database_url=url, data_dir=Path(tempfile.mkdtemp()), api_token=API_TOKEN,
        enroll_token=ENROLL_TOKEN, secret_key=SECRET_KEY, long_polls_per_token=100_000,
    )  # fmt: skip
    orch = Orchestrator(settings)
    await orch.start(sweep=False)
    try:
        agent = await desktop(orch, "a", (24.0, 24.0))
        job_id, _ = await orch.submit_job(JobSubmit.model_validate({"command": ["true"]}))
        await orch.dispatcher.tick()
        await orch.report_attempt(agent, job_id, 1, Report("started"))
        return await _measure(orch, agent, job_id, followers, distinct)
    finally:
        await orch.stop()


async def _measure(
    orch: Orchestrator, agent: uuid.UUID, job_id: uuid.UUID, followers: int, distinct: bool
) -> dict[str, Any]:
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    event.listen(Engine, "before_cursor_execute", count)
    try:
        began = time.monotonic()
        limits = [(1 << 20) - (n if distinct else 0) for n in range(followers)]
        tasks = [
            asyncio.create_task(
                orch.read_log(job_id, attempt=None, offset=0, limit=limit, wait_seconds=30)
            )
            for limit in limits
        ]
        await asyncio.sleep(1.0)
        during_first_reads = await writers(orch, agent, job_id)
        quiet = await _quiet(statements, QUIET_WITHIN_SECONDS - (time.monotonic() - began))
        first_reads = round(time.monotonic() - began, 1) if quiet else None
        statements[0], started = 0, time.monotonic()
        await asyncio.sleep(WINDOW_SECONDS)
        waiting = statements[0] / (time.monotonic() - started)
        while_waiting = await writers(orch, agent, job_id)
        shipped = time.monotonic()
        await orch.ship_log(agent, job_id, 1, 0, b"line\n")
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        answered = sum(1 for a in answers if getattr(a, "data", None) == "line\n")
        return {
            "writers_s_during_first_reads": during_first_reads,
            "first_reads_done_s": first_reads,
            "statements_per_s_while_waiting": round(waiting, 1),
            "writers_s_while_waiting": while_waiting,
            "answered_after_chunk": answered,
            "all_answered_s": round(time.monotonic() - shipped, 2),
        }
    finally:
        event.remove(Engine, "before_cursor_execute", count)


async def _quiet(statements: list[int], within_seconds: float) -> bool:
    """Wait until a second passes without a statement (the followers' first reads are
    done, and they wait); False if that did not happen within `within_seconds`."""
    deadline = time.monotonic() + within_seconds
    while time.monotonic() < deadline:
        before = statements[0]
        await asyncio.sleep(1.0)
        if statements[0] == before:
            return True
    return False


async def notify_cost(url: str, jobs: int = 16, chunks: int = 150) -> dict[str, list[float]]:
    """Chunks stored a second by `jobs` jobs shipping 100-byte chunks at once, with the
    job-log notice in each chunk's transaction and without it, alternating twice."""
    from chiffon.persistence import jobs as repo

    settings = OrchestratorSettings(database_url=url, data_dir=Path(tempfile.mkdtemp()),
                                    api_token=API_TOKEN, enroll_token=ENROLL_TOKEN,
                                    secret_key=SECRET_KEY)  # fmt: skip
    orch = Orchestrator(settings)
    await orch.start(sweep=False)
    announce, rates = repo.announce_log, {"with": [], "without": []}
    try:
        agent = await desktop(orch, "a", (24.0, 24.0), cores=64)
        ids = [(await orch.submit_job(JobSubmit.model_validate({"command": ["true"]})))[0]
               for _ in range(jobs)]  # fmt: skip
        await orch.dispatcher.tick()
        for job_id in ids:
            await orch.report_attempt(agent, job_id, 1, Report("started"))
        for run, notice in enumerate(("without", "with") * 2):
            repo.announce_log = announce if notice == "with" else _no_notice
            started = time.monotonic()
            await asyncio.gather(*(_ship(orch, agent, job_id, run * chunks, chunks)
                                   for job_id in ids))  # fmt: skip
            rates[notice].append(round(jobs * chunks / (time.monotonic() - started)))
    finally:
        repo.announce_log = announce
        await orch.stop()
    return rates


async def _no_notice(*_: Any, **__: Any) -> None:
    return None


async def _ship(orch: Orchestrator, agent: uuid.UUID, job_id: uuid.UUID, first: int,
                chunks: int) -> None:  # fmt: skip
    for n in range(first, first + chunks):
        await orch.ship_log(agent, job_id, 1, n * 100, b"x" * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=3000)
    parser.add_argument("--modes", default="same,distinct")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--name", default="log_followers", help="bench/results/NAME.json")
    parser.add_argument(
        "--notify-cost", action="store_true", help="only what the notice costs a chunk"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "followers": args.followers, "runs": {}}
    if args.notify_cost:
        with fresh_postgres() as url:
            results["chunks_per_s"] = asyncio.run(notify_cost(url))
        print(results["chunks_per_s"])
        write_results(args.name, results)
        return
    for engine in args.engines.split(","):
        for mode in args.modes.split(","):
            with ExitStack() as stack:
                if engine == "sqlite":
                    url = db.default_database_url(Path(stack.enter_context(
                        tempfile.TemporaryDirectory())))  # fmt: skip
                    db.upgrade(url)
                else:
                    url = stack.enter_context(fresh_postgres())
                got = asyncio.run(run(url, args.followers, mode == "distinct"))
            results["runs"][f"{engine}/{mode}"] = got
            print(f"{engine:10} {mode:8} {got}", flush=True)
    write_results(args.name, results)


if __name__ == "__main__":
    main()
