"""`accept_jobs: when_idle` with a real agent process and a fake `loginctl` (the desktop
session at the OS boundary): while the owner is away new jobs land and run; the moment the
owner is back the agent says so at once (not at its next heartbeat, 30 s away), and a new
job waits with the reason."""

from __future__ import annotations

import time
from pathlib import Path

from chiffon.client import Client
from tests.auth import API_TOKEN
from tests.fakes.session import install
from tests.fleet import DESKTOPS, Fleet, fleet_on, wait_for

SLOW_BEATS = {  # the agent's next scheduled beat is far: only a nudge is quick
    "CHIFFON_HEARTBEAT_INTERVAL": "30",
    "CHIFFON_HEARTBEAT_TIMEOUT": "90",
    "CHIFFON_SWEEP_INTERVAL": "1",
}
WHEN_IDLE = {"CHIFFON_ACCEPT_JOBS": "when_idle", "CHIFFON_IDLE_MINUTES": "10",
             "CHIFFON_ALLOW_ROOT_JOBS": "true"}  # fmt: skip


def test_jobs_land_while_the_owner_is_away_and_stop_the_moment_they_are_back(
    tmp_path: Path,
) -> None:
    session_bin = tmp_path / "desk-8g" / "bin"  # on the agent's PATH, beside its nvidia-smi
    away = int((time.time() - 3600) * 1e6)
    install(session_bin, idle_hint="yes", idle_since_us=away)
    with (
        fleet_on("http", tmp_path, None, liveness=SLOW_BEATS) as fleet,
        Client(fleet.api, token=API_TOKEN) as c,
    ):
        assert DESKTOPS["desk-8g"] is not None
        fleet.start_agent("desk-8g", **WHEN_IDLE)
        wait_for("the agent to welcome jobs", lambda: _accepts(fleet) is True, fleet, 30)
        job = c.submit(["true"]).job.job_id
        assert c.wait(job, timeout_seconds=30).state == "succeeded"

        install(session_bin, idle_hint="no")  # the owner is back at the keyboard
        # within 15 s, where the next scheduled beat is 27-33 s after the first (jitter)
        wait_for("the agent to refuse new jobs", lambda: _accepts(fleet) is False, fleet, 15)
        waiting = c.submit(["true"]).job.job_id
        wait_for("a reason", lambda: bool(c.get(waiting).reason), fleet, 10)
        assert c.get(waiting).state == "queued"
        assert "1 does not accept jobs" in c.get(waiting).reason

        install(session_bin, idle_hint="yes", idle_since_us=away)  # away again
        assert c.wait(waiting, timeout_seconds=30).state == "succeeded"


def _accepts(fleet: Fleet) -> bool | None:
    agents = fleet.agents()
    return agents["desk-8g"]["accepts_jobs"] if "desk-8g" in agents else None
