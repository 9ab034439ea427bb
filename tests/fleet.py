"""Real `chiffon orchestrator` and `chiffon agent` processes on real PostgreSQL (and
RabbitMQ): the fleet the end-to-end and fault tests drive. Every process is ended by its
own pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from chiffon.persistence import db
from tests.auth import API_HEADERS, ENROLL_TOKEN, TOKENS_ENV
from tests.conftest import fresh_postgres_database
from tests.fakes.nvidia_smi import gpu_row, install, path_with
from tests.private_services import PrivateRabbit
from tests.procs import CHIFFON, free_port, stop, wait_http
from tests.services import AMQP_URL, need

INTERVAL = 1.0
TIMEOUT = 6.0  # longer than a RabbitMQ stop_app/start_app cycle on a busy 2-core box
SWEEP = 0.5
LIVENESS_ENV = {
    "CHIFFON_HEARTBEAT_INTERVAL": str(INTERVAL),
    "CHIFFON_HEARTBEAT_TIMEOUT": str(TIMEOUT),
    "CHIFFON_SWEEP_INTERVAL": str(SWEEP),
}
# name -> fake nvidia-smi rows (None: no nvidia-smi at all)
DESKTOPS: dict[str, list[list[str]] | None] = {
    "desk-none": None,
    "desk-8g": [gpu_row(0, total_mib="8192", free_mib="7629", name="NVIDIA RTX 4060")],
    "desk-2x24g": [gpu_row(0, free_mib="20000"), gpu_row(1, free_mib="23975")],
}


def rabbitmqctl(*args: str) -> str:
    """The system broker's rabbitmqctl (used, never stopped)."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


@contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL on a virtual host of its own on the system broker, so the default names
    are safe to use."""
    need("RabbitMQ", "127.0.0.1", 5672)
    vhost = f"chiffon-e2e-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL.rstrip('/')}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@contextmanager
def vhost_on(broker: PrivateRabbit) -> Iterator[str]:
    """A fresh virtual host on the test run's private broker (one fleet each)."""
    vhost = f"chiffon-e2e-{uuid.uuid4().hex[:8]}"
    broker.ctl("add_vhost", vhost)
    try:
        broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{broker.url.rstrip('/')}/{vhost}"
    finally:
        broker.ctl("delete_vhost", vhost)


@dataclass
class Fleet:
    api: str
    tmp: Path
    agent_env: dict[str, str]
    stack: ExitStack
    procs: dict[str, subprocess.Popen[str]]
    orchestrator_cmd: tuple[list[str], dict[str, str]] = ([], {})
    orchestrator: subprocess.Popen[str] | None = None

    def start_orchestrator(self) -> None:
        """Start (or start again, on the same port and database) the orchestrator."""
        command, env = self.orchestrator_cmd
        log = self.stack.enter_context((self.tmp / "orchestrator.log").open("a"))
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.stack.callback(stop, proc)
        self.orchestrator = proc
        wait_http(f"{self.api}/healthz", proc, log=self.tmp / "orchestrator.log")

    def start_agent(
        self, name: str, *, gpus: list[list[str]] | None = None, **env: str
    ) -> subprocess.Popen[str]:
        """One of `DESKTOPS` by its name, or any name with the nvidia-smi rows `gpus`."""
        home = self.tmp / name
        bin_dir = home / "bin"
        rows = gpus if gpus is not None else DESKTOPS[name]
        path = os.environ["PATH"] if rows is None else path_with(bin_dir)
        if rows is not None:
            install(bin_dir, rows=rows)
        log = self.stack.enter_context((self.tmp / f"{name}.log").open("a"))
        proc = subprocess.Popen(
            [*CHIFFON, "agent", "--name", name, "--state-dir", str(home / "state")],
            env={**os.environ, **self.agent_env, "HOME": str(home), "PATH": path, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.stack.callback(stop, proc, signal.SIGKILL)
        self.procs[name] = proc
        return proc

    def agent_id(self, name: str) -> str:
        return (self.tmp / name / "state" / "agent_id").read_text().strip()

    def agents(self) -> dict[str, dict[str, Any]]:
        rows = httpx.get(f"{self.api}/api/v1/agents", timeout=5, headers=API_HEADERS).json()
        return {row["name"]: row for row in rows}

    def capacity(self, **query: float) -> list[str]:
        rows = httpx.get(
            f"{self.api}/api/v1/agents/available-capacity", params=query, headers=API_HEADERS
        ).json()
        return [row["name"] for row in rows]

    def events(self, name: str) -> list[tuple[str, str]]:
        rows = httpx.get(
            f"{self.api}/api/v1/events",
            params={"agent_id": self.agent_id(name)},
            headers=API_HEADERS,
        ).json()
        return [(row["to_status"], row["reason"]) for row in rows]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.tmp.glob("*.log"))


def wait_for(what: str, check: Callable[[], bool], fleet: Fleet, within: float) -> float:
    """Seconds until `check()` held; fails with every process's log after `within`."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {within} s\n{fleet.logs()}")


@contextmanager
def fleet_on(
    transport: str,
    tmp: Path,
    amqp_url: str | None,
    liveness: dict[str, str] | None = None,
    *,
    sqlite: bool = False,
    orchestrator_env: dict[str, str] | None = None,
) -> Iterator[Fleet]:
    """An orchestrator on a fresh PostgreSQL database (or, with `sqlite`, a SQLite file);
    `orchestrator_env` over the test tokens' settings."""
    liveness = liveness or LIVENESS_ENV
    with ExitStack() as stack:
        if sqlite:
            database_url = f"sqlite:///{tmp / 'registry.db'}"
            db.upgrade(database_url)
        else:
            database_url = stack.enter_context(fresh_postgres_database())
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        orch_env = {
            **os.environ,
            **liveness,
            **TOKENS_ENV,
            "CHIFFON_DATABASE_URL": database_url,
            **(orchestrator_env or {}),
        }
        args = ["--port", str(port)] + (["--amqp-url", amqp_url] if amqp_url else [])
        fleet = Fleet(api, tmp, {}, stack, {})
        fleet.orchestrator_cmd = ([*CHIFFON, "orchestrator", *args], orch_env)
        fleet.start_orchestrator()
        fleet.agent_env = {
            **liveness,
            "CHIFFON_TRANSPORT": transport,
            "CHIFFON_ORCHESTRATOR_URL": api,
            "CHIFFON_AMQP_URL": amqp_url or "",
            "CHIFFON_PUBLISH_TIMEOUT": "2",
            "CHIFFON_ENROLL_TOKEN": ENROLL_TOKEN,
        }
        yield fleet


def last_beats(fleet: Fleet) -> dict[str, datetime]:
    return {
        name: datetime.fromisoformat(row["last_heartbeat_at"])
        for name, row in fleet.agents().items()
        if row["status"] == "online"
    }


def check_broker_restart(fleet: Fleet, broker: PrivateRabbit, vhost_url: str) -> None:
    vhost = vhost_url.rsplit("/", 1)[1]
    before = last_beats(fleet)
    with broker.stopped():
        time.sleep(1.5)

    def beat_again() -> bool:
        now = last_beats(fleet)
        return set(now) == set(before) and all(now[n] > before[n] for n in before)

    wait_for("heartbeats after the broker restart", beat_again, fleet, within=20)
    queues = broker.ctl("list_queues", "-p", vhost, "name", "consumers")
    assert "chiffon.orchestrator.agent-events\t1" in queues
    for name in before:
        assert ("offline", "timeout") not in fleet.events(name), name


def all_online(fleet: Fleet, names: Iterable[str] = tuple(DESKTOPS)) -> bool:
    agents = fleet.agents()
    return all(agents.get(n, {}).get("status") == "online" for n in names)


def offline_at(fleet: Fleet, name: str) -> datetime:
    """When the orchestrator marked the agent offline for silence (its latest such event)."""
    rows = httpx.get(
        f"{fleet.api}/api/v1/events",
        params={"agent_id": fleet.agent_id(name)},
        headers=API_HEADERS,
        timeout=5,
    ).json()
    return next(datetime.fromisoformat(r["at"]) for r in rows if r["reason"] == "timeout")
