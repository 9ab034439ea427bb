"""Chaos: every job accounted for while agents, an orchestrator and the broker die.

The whole system, each part a real process: two `chiffon orchestrator --amqp-url`
processes on one fresh PostgreSQL database and a private RabbitMQ node of this run's
own (never the machine's); `chiffon simulate --accept-jobs` standing for `--agents`
desktops (heartbeats over RabbitMQ, orders from it, reports over HTTP to orchestrator A;
`--die-fraction` of the attempts kill their agent midway, silently); and `--real-agents`
real `chiffon agent --accept-jobs` processes (reporting to orchestrator B), which run
real `sleep` commands. `--jobs` short jobs (1 to 10 s, a third CPU-only, three retries)
are submitted through the API, spread over the first 80% of `--minutes`. Meanwhile:

- a real agent is SIGKILLed every `--kill-every` seconds and started again 5 s later;
- orchestrator B is SIGKILLed at a third of the run and started again 5 s later;
- the broker is restarted (stop_app, 5 s, start_app) at two thirds of the run.

Then no more jobs are submitted; the run waits (at most `--settle` seconds) until no job is
assigned or running, stops everything, and checks the database's own history
(`check_history`), not any process's word:

- every job is in exactly one final state, or still queued;
- no job ever had two attempts out at once (each attempt was placed after the one before
  it ended, by the attempts' times);
- no GPU's claims ever passed its VRAM, nor any agent's its cores, at any moment (each
  attempt holds its claims from `assigned_at` to `ended_at`);
- no job was lost, nor any attempt ended, without an event saying why.

It prints the counts and exits 1 on any violation.

    .venv/bin/python bench/chaos.py [--minutes 10] [--jobs 5000] [--agents 300]
        [--real-agents 3]

`check_history` also serves `bench/dispatch.py --history` (double-bookings in 100,000
placements) and the short chaos run of the fault suite (tests/faults/test_chaos.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CHIFFON,
    api_headers,
    auth_env,
    fresh_postgres,
    insert_credentials,
    issue_credentials,
    machine,
    simulate_data_dir,
    stop,
    wait_http,
    write_results,
)

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out", "lost"})
LIVENESS = {"CHIFFON_HEARTBEAT_INTERVAL": "2", "CHIFFON_HEARTBEAT_TIMEOUT": "8",
            "CHIFFON_SWEEP_INTERVAL": "1"}  # fmt: skip
SEED = 41


# -- the database's own history


@dataclass
class History:
    jobs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    attempt_outcomes: Counter[str] = field(default_factory=Counter)
    gpus: int = 0  # GPUs that held a claim
    gpus_filled: int = 0  # of those, how many were at some moment too full for one more
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def summary(self) -> dict[str, Any]:
        found = {k: v for k, v in self.violations.items() if v}
        return {"jobs": self.jobs, "states": dict(self.states), "attempts": self.attempts,
                "gpus_claimed": self.gpus, "gpus_filled": self.gpus_filled,
                "attempt_outcomes": dict(self.attempt_outcomes),
                "violations": {k: len(v) for k, v in found.items()},
                "first_violations": {k: v[:3] for k, v in found.items()}}  # fmt: skip


def check_history(database_url: str, *, settled: bool = True) -> History:
    """Read jobs, attempts, events and the registry's GPUs back and check them (see the
    module's text). `settled`: jobs still assigned or running are violations too."""
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as db:
        jobs = db.execute("SELECT job_id, state, spec FROM jobs").fetchall()
        attempts = db.execute(
            "SELECT job_id, attempt, agent_id, state, gpu_uuids, assigned_at, started_at, "
            "ended_at FROM job_attempts ORDER BY job_id, attempt"
        ).fetchall()
        events = db.execute(
            "SELECT job_id, attempt, from_state, to_state, reason FROM job_events ORDER BY id"
        ).fetchall()
        agents = db.execute(
            "SELECT agent_id, cpu_cores_physical, resource_metrics FROM agent_registry"
        ).fetchall()
    h = History(jobs=len(jobs), attempts=len(attempts))
    spec = {job_id: s if isinstance(s, dict) else json.loads(s) for job_id, _, s in jobs}
    for _, state, _ in jobs:
        h.states[state] += 1
    for job_id, state, _ in jobs:
        if state not in TERMINAL and state != "queued" and settled:
            h.violations["not_settled"].append(f"{job_id} {state}")
    _check_events(h, jobs, attempts, events)
    _check_attempts(h, attempts)
    _check_capacity(h, attempts, spec, agents)
    return h


def _check_events(h: History, jobs: list[Any], attempts: list[Any], events: list[Any]) -> None:
    last: dict[Any, tuple[str, str]] = {}
    ended_said: set[tuple[Any, int]] = set()
    for job_id, attempt, from_state, to_state, reason in events:
        last[job_id] = (to_state, reason)
        if from_state in ("assigned", "running") and to_state != "running":
            ended_said.add((job_id, attempt))
    for job_id, state, _ in jobs:
        said = last.get(job_id)
        if said is None or said[0] != state:
            h.violations["state_without_event"].append(f"{job_id} {state}, last event {said}")
        elif state == "lost" and "lost" not in said[1]:
            h.violations["lost_without_why"].append(f"{job_id}: {said[1]!r}")
    for job_id, attempt, _, state, _, _, _, ended_at in attempts:
        h.attempt_outcomes[state] += 1
        if ended_at is not None and (job_id, attempt) not in ended_said:
            h.violations["attempt_end_without_event"].append(f"{job_id} #{attempt} {state}")


def _check_attempts(h: History, attempts: list[Any]) -> None:
    """Per job, each attempt placed only after the one before it ended."""
    before: dict[Any, Any] = {}
    for job_id, attempt, _, _, _, assigned_at, _, ended_at in attempts:
        prev = before.get(job_id)
        if prev is not None and (prev[1] is None or assigned_at < prev[1]):
            h.violations["two_attempts_at_once"].append(
                f"{job_id}: #{prev[0]} ended {prev[1]}, #{attempt} placed {assigned_at}"
            )
        before[job_id] = (attempt, ended_at)


def _check_capacity(
    h: History, attempts: list[Any], spec: dict[Any, Any], agents: list[Any]
) -> None:
    """Sweep each GPU's (and agent's) claims through time: +claim at `assigned_at`,
    -claim at `ended_at` (a release first when both fall on one instant: the placement's
    time is read after the claims it saw, the release's before it committed)."""
    total_gb: dict[str, float] = {}
    cores: dict[Any, float] = {}
    for agent_id, physical, metrics in agents:
        doc = metrics if isinstance(metrics, dict) else json.loads(metrics or "{}")
        for g in doc.get("gpus", []):
            if g.get("uuid") and g.get("vram_total_gb") is not None:
                total_gb[g["uuid"]] = float(g["vram_total_gb"])
        cores[agent_id] = float(physical or 0)
    gpu_moves: dict[Any, list[tuple[datetime, int, float]]] = defaultdict(list)
    core_moves: dict[Any, list[tuple[datetime, int, float]]] = defaultdict(list)
    for job_id, _, agent_id, _, gpus, assigned_at, _, ended_at in attempts:
        req = spec[job_id].get("requirements", {})
        gb, want_cores = float(req.get("vram_gb", 0)), float(req.get("cpu_cores", 0))
        for gpu in gpus if isinstance(gpus, list) else json.loads(gpus):
            _held(gpu_moves[gpu], assigned_at, ended_at, gb)
        _held(core_moves[agent_id], assigned_at, ended_at, want_cores)
    for kind, moves, limit in (("gpu_overbooked", gpu_moves, total_gb),
                               ("cores_overbooked", core_moves, cores)):  # fmt: skip
        for key, changes in moves.items():
            peak = _peak(changes)
            if key in limit and peak > limit[key] + 1e-6:
                h.violations[kind].append(f"{key}: {peak:g} claimed of {limit[key]:g}")
            if kind == "gpu_overbooked" and key in limit:
                h.gpus += 1
                h.gpus_filled += peak + max(c[2] for c in changes) > limit[key] + 1e-6


def _held(moves: list[tuple[datetime, int, float]], start: datetime, end: datetime | None,
          amount: float) -> None:  # fmt: skip
    moves.append((start, 1, amount))
    if end is not None:
        moves.append((end, 0, -amount))


def _peak(moves: list[tuple[datetime, int, float]]) -> float:
    held = peak = 0.0
    for _, _, delta in sorted(moves, key=lambda m: (m[0], m[1])):
        held += delta
        peak = max(peak, held)
    return peak


# -- the system under chaos


@contextmanager
def private_broker() -> Iterator[Any]:
    """A RabbitMQ node of this run's own (tests.private_services): restarting it touches
    nothing of the machine's own broker."""
    from tests.private_services import PrivateRabbit

    rabbit = PrivateRabbit()
    try:
        yield rabbit
    finally:
        rabbit.close()


class Orchestrator:
    """One `chiffon orchestrator` process on a fixed port, to be killed and started again."""

    def __init__(self, name: str, database_url: str, amqp_url: str, tmp: Path,
                 liveness: dict[str, str] = LIVENESS) -> None:  # fmt: skip
        from bench.common import free_port

        self.name, self.port, self.tmp = name, free_port(), tmp
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **auth_env(), **liveness, "CHIFFON_DATABASE_URL": database_url}
        self.args = ["--amqp-url", amqp_url]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with (self.tmp / f"orchestrator-{self.name}.log").open("a") as log:
            self.proc = subprocess.Popen(
                [*CHIFFON, "orchestrator", "--port", str(self.port), *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        wait_http(f"{self.url}/healthz", self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@dataclass
class Run:
    minutes: float
    jobs: int
    agents: int
    real_agents: int
    kill_every: float
    settle: float
    die_fraction: float
    counts: Counter[str] = field(default_factory=Counter)


def submit_one(client: httpx.Client, rng: random.Random) -> None:
    seconds = round(rng.uniform(1, 10), 1)
    cpu_only = rng.random() < 1 / 3
    req = {"cpu_cores": 0.5} if cpu_only else {"gpus": 1, "vram_gb": rng.choice([1, 2, 4, 8]),
                                                "cpu_cores": 0.5}  # fmt: skip
    spec = {"command": ["sh", "-c", 'sleep "$SIMULATE_SECONDS"'], "requirements": req,
            "env": {"SIMULATE_SECONDS": str(seconds)}, "retries": 3}  # fmt: skip
    client.post("/api/v1/jobs", json=spec).raise_for_status()


def in_flight(client: httpx.Client) -> int:
    return sum(len(client.get("/api/v1/jobs", params={"state": s, "limit": 1000}).json())
               for s in ("assigned", "running"))  # fmt: skip


class Chaos:
    """The system under chaos (see the module's text): `run()` starts it, submits and
    kills on schedule, waits for it to settle, and stops it."""

    def __init__(self, run: Run, database_url: str, tmp: Path, say: Callable[[str], None]):
        self.run, self.database_url, self.tmp, self.say = run, database_url, tmp, say
        self.rng = random.Random(SEED)
        self.reals: dict[int, subprocess.Popen[str]] = {}
        self.dead_since: dict[int, float] = {}

    def run_all(self) -> None:
        with ExitStack() as stack:
            self.rabbit = stack.enter_context(private_broker())
            self._start(stack)
            self.client = stack.enter_context(
                httpx.Client(base_url=self.a.url, headers=api_headers(), timeout=30)
            )
            self._wait_registered()
            self._schedule()
            self._settle()

    def _start(self, stack: ExitStack) -> None:
        from chiffon.agent.simulate import agent_id_for

        fleet = [agent_id_for(SEED, i) for i in range(self.run.agents)]
        rows, creds = issue_credentials(fleet)
        insert_credentials(self.database_url, rows)
        self.a, self.b = (Orchestrator(n, self.database_url, self.rabbit.url, self.tmp)
                          for n in "AB")  # fmt: skip
        for o in (self.a, self.b):
            o.start()
            stack.callback(o.stop)
        env = {**os.environ, **auth_env(), **simulate_data_dir(self.tmp / "sim", SEED, creds),
               "CHIFFON_ORCHESTRATOR_URL": self.a.url,
               "CHIFFON_AMQP_URL": self.rabbit.url}  # fmt: skip
        self.sim_log = self.tmp / "simulate.log"
        with self.sim_log.open("w") as log:
            self.sim = subprocess.Popen(
                [*CHIFFON, "simulate", "--agents", str(self.run.agents), "--interval", "2",
                 "--transport", "amqp", "--accept-jobs", "--seed", str(SEED),
                 "--die-fraction", str(self.run.die_fraction), "--timeout", "10"],
                env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        stack.callback(stop, self.sim)
        for n in range(self.run.real_agents):
            self._real(n)
        stack.callback(self._stop_reals)

    def _stop_reals(self) -> None:
        for proc in self.reals.values():
            stop(proc)

    def _real(self, n: int) -> None:
        from bench.dispatch import agent as real_agent

        extra = {**LIVENESS, "CHIFFON_AMQP_URL": self.rabbit.url}
        self.reals[n] = real_agent(self.tmp, self.b.url, "amqp", self.rabbit.url, n, extra)

    def _wait_registered(self) -> None:
        deadline = time.monotonic() + 60
        while len(self.client.get("/api/v1/agents").json()) < self.run.agents * 0.9:
            if time.monotonic() > deadline:
                raise SystemExit("the simulated fleet did not register within 60 s")
            time.sleep(1)

    def _schedule(self) -> None:
        run, start = self.run, time.monotonic()
        length = run.minutes * 60
        submit_for = 0.8 * length
        events = [(length / 3, self._kill_b), (length / 3 + 5, self._start_b),
                  (2 * length / 3, self._restart_broker)]  # fmt: skip
        submitted, next_kill = 0, 0.0
        while (at := time.monotonic() - start) < length:
            due = min(run.jobs, int(run.jobs * at / submit_for) + 1)
            for _ in range(due - submitted):
                submit_one(self.client, self.rng)
            submitted = max(submitted, due)
            if run.real_agents and at >= next_kill:
                self._kill_real(at)
                next_kill = at + run.kill_every
            for n, since in list(self.dead_since.items()):
                if at - since >= 5:
                    self._real(n)
                    del self.dead_since[n]
            while events and at >= events[0][0]:
                events.pop(0)[1]()
                self.say(f"{at:.0f} s: {self.run.counts.most_common(1)}")
            time.sleep(0.05)
        run.counts["submitted"] = submitted

    def _kill_real(self, at: float) -> None:
        n = self.rng.randrange(self.run.real_agents)
        if n not in self.dead_since:
            self.reals[n].kill()
            self.reals[n].wait(10)
            self.dead_since[n] = at
            self.run.counts["real_agents_killed"] += 1

    def _kill_b(self) -> None:
        self.b.kill()
        self.run.counts["orchestrator_killed"] += 1

    def _start_b(self) -> None:
        self.b.start()
        self.run.counts["orchestrator_started_again"] += 1

    def _restart_broker(self) -> None:
        with self.rabbit.stopped():
            time.sleep(5)
        self.run.counts["broker_restarted"] += 1

    def _settle(self) -> None:
        for n in list(self.dead_since):
            self._real(n)
        self.dead_since.clear()
        until = time.monotonic() + self.run.settle
        while (left := in_flight(self.client)) and time.monotonic() < until:
            time.sleep(2)
        self.run.counts["in_flight_at_the_end"] = left
        stop(self.sim)
        said = self.sim_log.read_text().strip().splitlines()
        self.say("simulate: " + " | ".join(said[-3:]))


def chaos(run: Run, database_url: str, tmp: Path, say: Callable[[str], None] = print) -> None:
    Chaos(run, database_url, tmp, say).run_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--agents", type=int, default=300, help="simulated")
    parser.add_argument("--real-agents", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=20, help="seconds")
    parser.add_argument("--die-fraction", type=float, default=0.01)
    parser.add_argument("--settle", type=float, default=180, help="seconds, at most")
    options = parser.parse_args()
    run = Run(options.minutes, options.jobs, options.agents, options.real_agents,
              options.kill_every, options.settle, options.die_fraction)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, fresh_postgres() as url:
        chaos(run, url, Path(tmp))
        history = check_history(url)
    results = {"machine": machine(), "run": {k: v for k, v in vars(run).items() if k != "counts"},
               "chaos": dict(run.counts), "history": history.summary()}  # fmt: skip
    print(json.dumps({"chaos": dict(run.counts), **history.summary()}, indent=1, default=str))
    write_results("chaos", results)
    sys.exit(0 if history.ok else 1)


if __name__ == "__main__":
    main()
