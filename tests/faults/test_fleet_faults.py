"""Faults under a real fleet: `chiffon orchestrator` and `chiffon agent` processes on real
PostgreSQL and RabbitMQ (1, 2, 3). Each test restores what it stopped, even when it fails."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.fleet import (
    Fleet,
    all_online,
    check_broker_restart,
    fleet_on,
    last_beats,
    offline_at,
    vhost_on,
    wait_for,
)
from tests.private_services import PrivateRabbit

# Short liveness for 2 and 3 so "several timeouts" is seconds, not minutes.
TIMEOUT = 3.0
FAST = {
    "CHIFFON_HEARTBEAT_INTERVAL": "0.5",
    "CHIFFON_HEARTBEAT_TIMEOUT": str(TIMEOUT),
    "CHIFFON_SWEEP_INTERVAL": "0.25",
}
ALIVE, DEAD = "desk-none", "desk-8g"


def start_two(fleet: Fleet) -> None:
    for name in (ALIVE, DEAD):
        fleet.start_agent(name)
    wait_for("both agents online", lambda: all_online(fleet, (ALIVE, DEAD)), fleet, within=30)


def kill(fleet: Fleet, name: str) -> None:
    fleet.procs[name].send_signal(signal.SIGKILL)
    fleet.procs[name].wait(5)


def check_dead_goes_offline_only_after_grace(
    fleet: Fleet, heard_again: datetime, slack_seconds: float
) -> None:
    """The live agent is never judged; the dead one is, one timeout after hearing resumed.

    `heard_again` is at most `slack_seconds` after the orchestrator's grace began."""
    before = last_beats(fleet)[ALIVE]
    wait_for("the live agent beating again", lambda: _beats_after(fleet, before), fleet, 30)
    wait_for(
        "the dead agent offline",
        lambda: fleet.agents()[DEAD]["status"] == "offline",
        fleet,
        within=TIMEOUT + 20,
    )
    grace = (offline_at(fleet, DEAD) - heard_again).total_seconds()
    assert grace >= TIMEOUT - slack_seconds, f"offline {grace:.1f} s after: inside the grace"
    assert fleet.events(DEAD)[0] == ("offline", "timeout")
    assert ("offline", "timeout") not in fleet.events(ALIVE)
    assert fleet.agents()[ALIVE]["status"] == "online"


def _beats_after(fleet: Fleet, before: object) -> bool:
    now = last_beats(fleet).get(ALIVE)
    return now is not None and now > before  # type: ignore[operator]


@pytest.mark.broker_restart
def test_1_broker_stopped_shorter_than_the_timeout(
    tmp_path: Path, private_broker: PrivateRabbit
) -> None:
    with vhost_on(private_broker) as amqp_url, fleet_on("amqp", tmp_path, amqp_url) as fleet:
        start_two(fleet)
        # no one offline, beats resume, consumer back
        check_broker_restart(fleet, private_broker, amqp_url)


@pytest.mark.broker_restart
def test_2_broker_down_for_several_timeouts(tmp_path: Path, private_broker: PrivateRabbit) -> None:
    with (
        vhost_on(private_broker) as amqp_url,
        fleet_on("amqp", tmp_path, amqp_url, FAST) as fleet,
    ):
        start_two(fleet)
        with private_broker.stopped():
            kill(fleet, DEAD)  # dies while no one can hear it
            time.sleep(3 * TIMEOUT)
            agents = fleet.agents()
            assert agents[ALIVE]["status"] == agents[DEAD]["status"] == "online"
            # Watch from before the broker starts: the orchestrator may be consuming again
            # before `rabbitmqctl await_startup` returns (on a slow machine, most of a second).
            heard = ConsumingAgain(fleet.api)
        heard_again = heard.wait(within=30)
        check_dead_goes_offline_only_after_grace(fleet, heard_again, slack_seconds=0.5)


class ConsumingAgain(threading.Thread):
    """Polls `/readyz` every 50 ms; `wait()` is when it first said the broker's receiver
    was "hearing"."""

    def __init__(self, api: str) -> None:
        super().__init__(daemon=True)
        self._api = api
        self._seen: datetime | None = None
        self._stop_at = time.monotonic() + 60
        self.start()

    def run(self) -> None:
        import httpx

        while self._seen is None and time.monotonic() < self._stop_at:
            try:
                state = httpx.get(f"{self._api}/readyz", timeout=5).json()["checks"].get("amqp")
            except httpx.HTTPError:
                state = None
            if state == "hearing":
                self._seen = datetime.now(UTC)
            time.sleep(0.05)

    def wait(self, within: float) -> datetime:
        self.join(within)
        assert self._seen is not None, f"the orchestrator not consuming again within {within} s"
        return self._seen


def test_3_orchestrator_sigkilled_and_restarted_after_several_timeouts(tmp_path: Path) -> None:
    with fleet_on("http", tmp_path, None, FAST) as fleet:
        start_two(fleet)
        assert fleet.orchestrator is not None
        fleet.orchestrator.send_signal(signal.SIGKILL)
        fleet.orchestrator.wait(5)
        kill(fleet, DEAD)
        time.sleep(3 * TIMEOUT)
        fleet.start_orchestrator()
        restarted = datetime.now(UTC)
        assert ("offline", "timeout") not in fleet.events(DEAD)  # not judged at start
        # The grace began at start-up, up to a second before the API answered.
        check_dead_goes_offline_only_after_grace(fleet, restarted, slack_seconds=1.5)
