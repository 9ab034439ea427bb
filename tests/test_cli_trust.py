"""A stranger holding the lab's enrollment token, with real processes (issue 34, item 2): its
desktop enrolls `pending`, `chiffon agents` says so, a job waits saying why, and `chiffon
agents approve` lets the job run; a token made with `--uses 1 --expires 1h` enrolls one
desktop only."""

from __future__ import annotations

from pathlib import Path

from chiffon.client import Client
from tests.auth import API_TOKEN
from tests.fleet import Fleet, fleet_on, wait_for
from tests.test_jobs_e2e import chiffon

APPROVAL = {"CHIFFON_AUTO_APPROVE": "0"}
JOBS = {"CHIFFON_ACCEPT_JOBS": "true", "CHIFFON_ALLOW_ROOT_JOBS": "true"}


def test_a_desktop_enrolled_with_the_shared_token_runs_nothing_until_approved(
    tmp_path: Path,
) -> None:
    with (
        fleet_on("http", tmp_path, None, sqlite=True, orchestrator_env=APPROVAL) as fleet,
        Client(fleet.api, token=API_TOKEN) as c,
    ):
        fleet.start_agent("desk-8g", **JOBS)
        wait_for("the desktop to register", lambda: "desk-8g" in fleet.agents(), fleet, 30)
        assert fleet.agents()["desk-8g"]["hold"] == "pending"
        assert "pending: this desktop takes no jobs" in (tmp_path / "desk-8g.log").read_text()
        listed = chiffon(fleet, "agents")
        assert "online, pending" in listed.stdout, listed.stdout + listed.stderr
        job = c.submit(["true"]).job.job_id
        wait_for("a reason", lambda: bool(c.get(job).reason), fleet, 10)
        assert c.get(job).state == "queued"
        assert "waiting for an admin: chiffon agents approve" in c.get(job).reason

        approved = chiffon(fleet, "agents", "approve", "desk-8g")
        assert approved.returncode == 0, approved.stderr
        assert "approved" in approved.stdout
        assert c.wait(job, timeout_seconds=30).state == "succeeded"

        unknown = chiffon(fleet, "agents", "approve", "no-such-desk")
        assert unknown.returncode != 0 and len(unknown.stderr.strip().splitlines()) == 1
        assert "no-such-desk" in unknown.stderr


def _made_token(fleet: Fleet, *args: str) -> str:
    made = chiffon(fleet, "tokens", "create", *args)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


def test_a_token_made_for_one_desktop_enrolls_it_approved_and_no_other(tmp_path: Path) -> None:
    with (
        fleet_on("http", tmp_path, None, sqlite=True, orchestrator_env=APPROVAL) as fleet,
        Client(fleet.api, token=API_TOKEN) as c,
    ):
        token = _made_token(fleet, "--uses", "1", "--expires", "1h", "--approve")
        fleet.start_agent("desk-8g", CHIFFON_ENROLL_TOKEN=token, **JOBS)
        wait_for("the desktop to register", lambda: "desk-8g" in fleet.agents(), fleet, 30)
        assert fleet.agents()["desk-8g"]["hold"] is None
        assert c.wait(c.submit(["true"]).job.job_id, timeout_seconds=30).state == "succeeded"
        second = fleet.start_agent("desk-2x24g", CHIFFON_ENROLL_TOKEN=token, **JOBS)
        assert second.wait(30) != 0
        assert "used up or expired" in (tmp_path / "desk-2x24g.log").read_text()
        listed = chiffon(fleet, "tokens")
        assert listed.returncode == 0 and "no enrollment tokens" in listed.stdout
        bad = chiffon(fleet, "tokens", "create", "--expires", "soon")
        assert bad.returncode == 2 and "--expires wants a duration" in bad.stderr
