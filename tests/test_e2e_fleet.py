"""Three real agents, a real orchestrator, real PostgreSQL, over RabbitMQ and over HTTP.

The seeds' "multiple agents tracked" criterion, end to end: `chiffon orchestrator` and three
`chiffon agent` processes, each with its own state directory and a fake `nvidia-smi` giving
it different GPUs (none, one 8 GB, two 24 GB). Then one is killed, one says goodbye and
comes back, and (RabbitMQ) the broker restarts under them. Every process is ended by its
own pid.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.fleet import (
    DESKTOPS,
    INTERVAL,
    SWEEP,
    TIMEOUT,
    Fleet,
    all_online,
    check_broker_restart,
    fleet_on,
    vhost_on,
    wait_for,
)
from tests.private_services import PrivateRabbit


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


@pytest.mark.broker_restart
def test_three_agents_over_rabbitmq(tmp_path: Path, private_broker: PrivateRabbit) -> None:
    with vhost_on(private_broker) as amqp_url, fleet_on("amqp", tmp_path, amqp_url) as fleet:
        check_three_distinct_agents(fleet)
        check_broker_restart(fleet, private_broker, amqp_url)
        check_kill_and_goodbye(fleet)


def test_three_agents_over_http(tmp_path: Path) -> None:
    with fleet_on("http", tmp_path, None) as fleet:
        check_three_distinct_agents(fleet)
        check_kill_and_goodbye(fleet)
