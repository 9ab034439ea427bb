"""`accept_jobs: when_idle` with a real agent process and a fake `loginctl` (the desktop
session at the OS boundary): while the owner is away new jobs land and run; the moment the
owner is back the agent says so at once (not at its next heartbeat, 30 s away), and a new
job waits with the reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from chiffon.client import Client
from tests.auth import API_TOKEN
from tests.fakes.nvidia_smi import install as smi_install
from tests.fakes.session import install
from tests.fleet import DESKTOPS, Fleet, fleet_on, wait_for
from tests.test_jobs_e2e import GPU0, chiffon

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


def _accepts(fleet: Fleet, name: str = "desk-8g") -> bool | None:
    agents = fleet.agents()
    return agents[name]["accepts_jobs"] if name in agents else None


CHECKPOINTING = """
import os, signal, sys, time
attempt = os.environ["CHIFFON_ATTEMPT"]
print(f"attempt {attempt} on {os.environ['CHIFFON_GPUS']}", flush=True)
if attempt != "1":
    sys.exit(0)
def checkpoint(*_):
    print("checkpoint written, deadline", os.environ["CHIFFON_PREEMPT_DEADLINE"], flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, checkpoint)
time.sleep(120)
"""
QUICK_VACATE = {"CHIFFON_VACATE_GRACE": "3", "CHIFFON_VACATE_KILL_GRACE": "1"}


def test_the_owners_return_vacates_the_job_which_lands_elsewhere_without_using_a_retry(
    tmp_path: Path,
) -> None:
    session_bin = tmp_path / "desk-8g" / "bin"
    away = int((time.time() - 3600) * 1e6)
    install(session_bin, idle_hint="yes", idle_since_us=away)
    with (
        fleet_on("http", tmp_path, None, liveness=SLOW_BEATS) as fleet,
        Client(fleet.api, token=API_TOKEN) as c,
    ):
        fleet.start_agent("desk-8g", **WHEN_IDLE, **QUICK_VACATE)
        wait_for("the agent to welcome jobs", lambda: _accepts(fleet) is True, fleet, 30)
        job = c.submit([sys.executable, "-c", CHECKPOINTING], gpus=1, vram_gb=4, retries=0)
        job_id = job.job.job_id
        wait_for("attempt 1 to run", lambda: _logged(c, job_id, 1, "attempt 1"), fleet, 30)
        fleet.start_agent("desk-2x24g", **{**WHEN_IDLE, "CHIFFON_ACCEPT_JOBS": "always"})
        wait_for("the second desktop", lambda: "desk-2x24g" in fleet.agents(), fleet, 30)

        install(session_bin, idle_hint="no")  # the owner is back at desk-8g
        done = c.wait(job_id, timeout_seconds=60)
        assert done.state == "succeeded", fleet.logs()
        assert (done.attempt, done.preemptions, done.agent_name) == (2, 1, "desk-2x24g")
        first = done.attempts[0]
        assert first.state == "preempted" and "owner is using it" in first.reason
        assert _logged(c, job_id, 1, "checkpoint written, deadline 3")  # the ladder's first step
        back = [e for e in c.get(job_id).events if e.to_state == "queued" and e.attempt == 1]
        assert back and "preempted: the desktop's owner is using it" in back[0].reason
        shown = " ".join(chiffon(fleet, "jobs", "show", str(job_id)).stdout.split())
        assert "taken back 1x by a desktop's owner (no retry used)" in shown
        assert "attempt 1 desk-8g" in shown and "preempted" in shown


def test_an_exclusive_app_on_gpu_0_vacates_only_the_job_on_gpu_0(tmp_path: Path) -> None:
    rows = DESKTOPS["desk-2x24g"]
    assert rows is not None
    bin_dir = tmp_path / "desk-2x24g" / "bin"
    game = tmp_path / "blender"  # a real program named blender: a copy of sleep
    shutil.copy(shutil.which("sleep") or "/bin/sleep", game)
    env = {**WHEN_IDLE, **QUICK_VACATE, "CHIFFON_ACCEPT_JOBS": "always",
           "CHIFFON_EXCLUSIVE_APPS": "blender", "CHIFFON_PREEMPT_AVOID_SECONDS": "1"}  # fmt: skip
    with (
        fleet_on("http", tmp_path, None, liveness={**SLOW_BEATS, **env}) as fleet,
        Client(fleet.api, token=API_TOKEN) as c,
    ):
        fleet.start_agent("desk-2x24g", **env)
        smi_install(bin_dir, rows=rows, apps=[])  # the driver lists GPU processes
        wait_for("the agent to welcome jobs", lambda: _accepts(fleet, "desk-2x24g"), fleet, 30)
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
        on0 = c.submit(sleeper, gpus=1, vram_gb=16).job.job_id  # best fit: GPU 0 (20 GB free)
        on1 = c.submit(sleeper, gpus=1, vram_gb=16).job.job_id  # then GPU 1, the only room
        for job_id in (on0, on1):
            wait_for("both to run", lambda j=job_id: c.get(j).state == "running", fleet, 30)
        assert c.get(on0).gpu_uuids == [GPU0] and c.get(on1).gpu_uuids != [GPU0]

        with subprocess.Popen([str(game), "120"]) as blender:
            try:
                smi_install(bin_dir, rows=rows, apps=[[GPU0, str(blender.pid), "3000"]])
                wait_for("GPU 0's job to be taken back",
                         lambda: c.get(on0).preemptions == 1, fleet, 20)  # fmt: skip
                # kept off this desktop 1 s (CHIFFON_PREEMPT_AVOID_SECONDS), then off GPU 0
                wait_for("the reason", lambda: "withheld (exclusive_app)" in c.get(on0).reason,
                         fleet, 10)  # fmt: skip
                assert c.get(on0).state == "queued"
                assert c.get(on1).state == "running"  # GPU 1 is not the game's: it runs on
                assert c.get(on1).attempt == 1
            finally:
                blender.kill()
        smi_install(bin_dir, rows=rows, apps=[])  # the game is closed
        wait_for("GPU 0's job to run again", lambda: c.get(on0).state == "running", fleet, 30)
        assert c.get(on0).attempt == 2 and c.get(on0).gpu_uuids == [GPU0]
        for job_id in (on0, on1):
            c.cancel(job_id)


def test_a_dirty_gpu_is_not_offered_until_it_is_clean(
    tmp_path: Path, job_visible_dir: Path
) -> None:
    rows = DESKTOPS["desk-8g"]
    assert rows is not None
    bin_dir = tmp_path / "desk-8g" / "bin"
    gpu = rows[0][1]
    release = job_visible_dir / "release"  # made by the test, seen by the sandboxed job
    env = {**WHEN_IDLE, "CHIFFON_ACCEPT_JOBS": "always"}
    with (
        fleet_on("http", tmp_path, None, liveness=SLOW_BEATS) as fleet,
        Client(fleet.api, token=API_TOKEN) as c,
    ):
        fleet.start_agent("desk-8g", **env)
        smi_install(bin_dir, rows=rows, apps=[])
        wait_for("the agent to welcome jobs", lambda: _accepts(fleet, "desk-8g"), fleet, 30)
        wait_until = f"while [ ! -e {release} ]; do sleep 0.1; done"
        first = c.submit(["sh", "-c", wait_until], gpus=1, vram_gb=4).job.job_id
        wait_for("the first job to run", lambda: c.get(first).state == "running", fleet, 30)
        dead_pid = _reaped_pid()  # a pid no process has any more
        # the driver still lists memory of a process that is gone (as after a crash)
        smi_install(bin_dir, rows=rows, apps=[[gpu, str(dead_pid), "2000"]])
        release.touch()
        assert c.wait(first, timeout_seconds=30).state == "succeeded"
        wait_for("the GPU to read dirty", lambda: _gpu_withheld(fleet) == "dirty", fleet, 15)
        second = c.submit(["true"], gpus=1, vram_gb=4).job.job_id
        wait_for("a reason", lambda: "withheld (dirty)" in c.get(second).reason, fleet, 10)
        assert c.get(second).state == "queued"

        smi_install(bin_dir, rows=rows, apps=[])  # its memory is back
        assert c.wait(second, timeout_seconds=30).state == "succeeded"
        assert _gpu_withheld(fleet) is None


def _reaped_pid() -> int:
    with subprocess.Popen(["true"]) as done:
        done.wait()
        return done.pid


def _gpu_withheld(fleet: Fleet) -> str | None:
    gpus = fleet.agents()["desk-8g"]["resource_metrics"]["gpus"]
    return gpus[0].get("withheld")


def _logged(c: Client, job_id: object, attempt: int, text: str) -> bool:
    return text in c.log(str(job_id), attempt=attempt).data
