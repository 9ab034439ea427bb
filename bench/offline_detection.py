"""How long until a dead agent is offline, at default settings.

`chiffon orchestrator` on a fresh PostgreSQL database with the defaults (heartbeat 15 s,
timeout 45 s, sweep 5 s) and `--agents` real `chiffon agent` processes at the default
interval over HTTP. Once all are online, each one is ended at a random moment in the next
`--spread` seconds: two out of three by SIGKILL (nothing said: the sweep must notice) and
the rest by SIGTERM (the agent says goodbye). The time of each signal is taken just
before it is sent; the time it went offline is the `at` of its offline event (the
orchestrator's clock, the same machine). Bounds: a killed agent within timeout + sweep
(50 s), a goodbye within 2 s.

    .venv/bin/python bench/offline_detection.py [--agents 18] [--spread 60] [--seed 1]

Takes about spread + 75 s (2.5 minutes by default).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CHIFFON,
    api_headers,
    auth_env,
    fresh_postgres,
    machine,
    orchestrator,
    percentile,
    stop,
    write_results,
)

TIMEOUT_SECONDS, SWEEP_SECONDS = 45.0, 5.0


def start_agents(api: str, tmp: Path, count: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        home = tmp / f"agent-{i}"
        home.mkdir()
        procs.append(
            subprocess.Popen(
                [*CHIFFON, "agent", "--orchestrator-url", api, "--name", f"off-{i}"],
                env={**os.environ, **auth_env(), "HOME": str(home)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def agent_ids(api: str) -> dict[str, str]:
    rows = httpx.get(f"{api}/api/v1/agents", headers=api_headers()).json()
    return {r["name"]: r["agent_id"] for r in rows}


def wait_online(api: str, count: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = httpx.get(
            f"{api}/api/v1/agents", params={"status": "online"}, headers=api_headers()
        ).json()
        if len(rows) == count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"not all {count} agents came online")


def offline_at(api: str, agent_id: str) -> tuple[float, str] | None:
    rows = httpx.get(
        f"{api}/api/v1/events", params={"agent_id": agent_id}, headers=api_headers()
    ).json()
    for row in rows:  # newest first
        if row["to_status"] == "offline":
            return datetime.fromisoformat(row["at"]).timestamp(), row["reason"]
    return None


def run(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    with fresh_postgres() as db_url, orchestrator(db_url, log=tmp / "orch.log") as (api, _):
        procs = start_agents(api, tmp, args.agents)
        try:
            wait_online(api, args.agents)
            ids = agent_ids(api)
            plan = sorted(
                (rng.uniform(0, args.spread), i, signal.SIGKILL if i % 3 else signal.SIGTERM)
                for i in range(args.agents)
            )
            t0 = time.monotonic()
            ended: list[dict[str, Any]] = []
            for delay, i, sig in plan:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                at = time.time()
                procs[i].send_signal(sig)
                ended.append({"agent": f"off-{i}", "signal": sig.name, "signalled_at": at})
            time.sleep(TIMEOUT_SECONDS + SWEEP_SECONDS + 5)
            for row in ended:
                seen = offline_at(api, ids[row["agent"]])
                row["offline_after_seconds"] = (
                    None if seen is None else seen[0] - row["signalled_at"]
                )
                row["reason"] = None if seen is None else seen[1]
            return ended
        finally:
            for proc in procs:
                stop(proc, signal.SIGKILL)


def summarise(rows: list[dict[str, Any]], sig: str) -> dict[str, Any]:
    took = [r["offline_after_seconds"] for r in rows if r["signal"] == sig]
    done = [t for t in took if t is not None]
    return {
        "samples": len(took),
        "never_offline": len(took) - len(done),
        "min_s": min(done),
        "p50_s": statistics.median(done),
        "p99_s": percentile(done, 99),
        "max_s": max(done),
        "reasons": sorted({str(r["reason"]) for r in rows if r["signal"] == sig}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=18)
    parser.add_argument("--spread", type=float, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(tmp))
    killed, goodbye = summarise(rows, "SIGKILL"), summarise(rows, "SIGTERM")
    print(f"{'event':<22}{'n':>4}{'min s':>8}{'p50 s':>8}{'p99 s':>8}{'max s':>8}  bound")
    for name, s, bound in (("SIGKILL -> offline", killed, 50), ("goodbye -> offline", goodbye, 2)):
        print(
            f"{name:<22}{s['samples']:>4}{s['min_s']:>8.2f}{s['p50_s']:>8.2f}"
            f"{s['p99_s']:>8.2f}{s['max_s']:>8.2f}  {bound} s, reasons {s['reasons']}"
        )
    write_results(
        "offline_detection",
        {"machine": info, "args": vars(args), "killed": killed, "goodbye": goodbye, "runs": rows},
    )


if __name__ == "__main__":
    main()
