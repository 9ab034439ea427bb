"""Three real agents, a real orchestrator, real PostgreSQL, over RabbitMQ and over HTTP.

The seeds' "multiple agents tracked" criterion, end to end: `chiffon orchestrator` and three
`chiffon agent` processes, each with its own state directory and a fake `nvidia-smi` giving
it different GPUs (none, one 8 GB, two 24 GB). Then one is killed, one says goodbye and
comes back, and (RabbitMQ) the broker restarts under them. Every process is ended by its
own pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.auth import API_HEADERS, ENROLL_TOKEN, TOKENS_ENV
from tests.conftest import fresh_postgres_database
from tests.fakes.nvidia_smi import gpu_row, install, path_with
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
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


@contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL on a virtual host of its own, so the default names are safe to use."""
    need("RabbitMQ", "127.0.0.1", 5672)
    vhost = f"chiffon-e2e-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL.rstrip('/')}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@dataclass
class Fleet:
    api: str
    tmp: Path
    agent_env: dict[str, str]
    stack: ExitStack
    procs: dict[str, subprocess.Popen[str]]

    def start_agent(self, name: str) -> subprocess.Popen[str]:
        home = self.tmp / name
        bin_dir = home / "bin"
        rows = DESKTOPS[name]
        path = os.environ["PATH"] if rows is None else path_with(bin_dir)
        if rows is not None:
            install(bin_dir, rows=rows)
        log = self.stack.enter_context((self.tmp / f"{name}.log").open("a"))
        proc = subprocess.Popen(
            [*CHIFFON, "agent", "--name", name, "--state-dir", str(home / "state")],
            env={**os.environ, **self.agent_env, "HOME": str(home), "PATH": path},
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
def fleet_on(transport: str, tmp: Path, amqp_url: str | None) -> Iterator[Fleet]:
    with ExitStack() as stack:
        database_url = stack.enter_context(fresh_postgres_database())
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        orch_env = {
            **os.environ,
            **LIVENESS_ENV,
            **TOKENS_ENV,
            "CHIFFON_DATABASE_URL": database_url,
        }
        args = ["--port", str(port)] + (["--amqp-url", amqp_url] if amqp_url else [])
        log = stack.enter_context((tmp / "orchestrator.log").open("w"))
        orch = subprocess.Popen(
            [*CHIFFON, "orchestrator", *args],
            env=orch_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        stack.callback(stop, orch)
        wait_http(f"{api}/healthz", orch, log=tmp / "orchestrator.log")
        agent_env = {
            **LIVENESS_ENV,
            "CHIFFON_TRANSPORT": transport,
            "CHIFFON_ORCHESTRATOR_URL": api,
            "CHIFFON_AMQP_URL": amqp_url or "",
            "CHIFFON_PUBLISH_TIMEOUT": "2",
            "CHIFFON_ENROLL_TOKEN": ENROLL_TOKEN,
        }
        yield Fleet(api, tmp, agent_env, stack, {})


def all_online(fleet: Fleet) -> bool:
    agents = fleet.agents()
    return all(agents.get(n, {}).get("status") == "online" for n in DESKTOPS)


def check_three_distinct_agents(fleet: Fleet) -> None:
    for name in DESKTOPS:
        fleet.start_agent(name)
    wait_for("three agents online", lambda: all_online(fleet), fleet, within=30)
    agents = fleet.agents()
    assert {n: agents[n]["agent_id"] for n in DESKTOPS} == {n: fleet.agent_id(n) for n in DESKTOPS}
    gpus = {n: agents[n]["resource_metrics"]["gpu_count"] for n in DESKTOPS}
    assert gpus == {"desk-none": 0, "desk-8g": 1, "desk-2x24g": 2}
    assert agents["desk-8g"]["resource_metrics"]["gpu_vram_total_gb"] == pytest.approx(8.59, 0.01)
    assert fleet.capacity(min_gpu_vram_gb=7) == ["desk-2x24g", "desk-8g"]
    assert fleet.capacity(min_single_gpu_vram_gb=22) == ["desk-2x24g"]
    assert "desk-none" in fleet.capacity()


def check_kill_and_goodbye(fleet: Fleet) -> None:
    fleet.procs["desk-none"].send_signal(signal.SIGKILL)
    fleet.procs["desk-none"].wait(5)
    took = wait_for(
        "killed agent offline",
        lambda: fleet.agents()["desk-none"]["status"] == "offline",
        fleet,
        within=TIMEOUT + SWEEP + INTERVAL + 5,
    )
    assert took <= TIMEOUT + SWEEP + INTERVAL + 1  # its last beat was at most INTERVAL ago
    assert fleet.events("desk-none")[0] == ("offline", "timeout")

    first_id = fleet.agent_id("desk-8g")
    fleet.procs["desk-8g"].send_signal(signal.SIGTERM)
    assert fleet.procs["desk-8g"].wait(5) == 0
    assert fleet.agents()["desk-8g"]["status"] == "offline"  # the goodbye is already applied
    assert fleet.events("desk-8g")[0] == ("offline", "goodbye")
    assert "desk-8g" not in fleet.capacity(min_gpu_vram_gb=7)

    fleet.start_agent("desk-8g")
    wait_for(
        "restarted agent online",
        lambda: fleet.agents()["desk-8g"]["status"] == "online",
        fleet,
        within=20,
    )
    assert fleet.agent_id("desk-8g") == first_id
    assert fleet.agents()["desk-8g"]["agent_id"] == first_id


def last_beats(fleet: Fleet) -> dict[str, datetime]:
    return {
        name: datetime.fromisoformat(row["last_heartbeat_at"])
        for name, row in fleet.agents().items()
        if row["status"] == "online"
    }


def check_broker_restart(fleet: Fleet, vhost_url: str) -> None:
    vhost = vhost_url.rsplit("/", 1)[1]
    before = last_beats(fleet)
    rabbitmqctl("stop_app")
    try:
        time.sleep(1.5)
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")

    def beat_again() -> bool:
        now = last_beats(fleet)
        return set(now) == set(before) and all(now[n] > before[n] for n in before)

    wait_for("heartbeats after the broker restart", beat_again, fleet, within=20)
    queues = rabbitmqctl("list_queues", "-p", vhost, "name", "consumers")
    assert "chiffon.orchestrator.agent-events\t1" in queues
    for name in before:
        assert ("offline", "timeout") not in fleet.events(name), name


@pytest.mark.broker_restart
def test_three_agents_over_rabbitmq(tmp_path: Path) -> None:
    with private_vhost() as amqp_url, fleet_on("amqp", tmp_path, amqp_url) as fleet:
        check_three_distinct_agents(fleet)
        check_broker_restart(fleet, amqp_url)
        check_kill_and_goodbye(fleet)


def test_three_agents_over_http(tmp_path: Path) -> None:
    with fleet_on("http", tmp_path, None) as fleet:
        check_three_distinct_agents(fleet)
        check_kill_and_goodbye(fleet)
