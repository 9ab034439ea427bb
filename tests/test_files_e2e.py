"""Code in, results and checkpoints out, with real agent processes: `chiffon run` from a
folder that is not on the desktop's path sends it, the job runs in its copy, what `--out`
names comes back byte for byte; a job vacated by its owner's return resumes on the other
desktop from its checkpoint, and one whose desktop was killed resumes from its last
periodic save, the work done once in all."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from chiffon.client import Client
from tests.auth import API_TOKEN, TOKENS_ENV
from tests.fakes.session import install
from tests.fleet import Fleet, fleet_on, vhost_on, wait_for
from tests.procs import CHIFFON
from tests.test_jobs_e2e import ACCEPTS
from tests.test_owner_e2e import QUICK_VACATE, SLOW_BEATS, WHEN_IDLE

TRAIN = """
import os, pathlib, sys
data = pathlib.Path("data/input.bin").read_bytes()
assert not pathlib.Path("secret.env").exists(), "an ignored file was sent"
pathlib.Path("results/deep").mkdir(parents=True, exist_ok=True)
pathlib.Path("results/sum.txt").write_text(str(sum(data)))
pathlib.Path("results/deep/reversed.bin").write_bytes(data[::-1])
pathlib.Path("model.pt").write_bytes(b"weights:" + data[:1000])
pathlib.Path("scratch.tmp").write_text("not asked for")
print("trained in", os.getcwd(), flush=True)
"""


MAKE = """\
import hashlib, os, pathlib, sys
rows = pathlib.Path("data.csv").read_text().split()
print("rows", len(rows), "secret here:", os.path.exists("secret.log"))
pathlib.Path("results/plots").mkdir(parents=True, exist_ok=True)
pathlib.Path("results/sum.txt").write_text(str(sum(int(r) for r in rows)))
pathlib.Path("results/plots/p.bin").write_bytes(bytes(range(256)) * 40)
pathlib.Path("model.bin").write_bytes(hashlib.sha256(b"w").digest() * 1000)
pathlib.Path("not-asked-for.txt").write_text("stays on the desktop")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module", params=["sqlite-http", "postgresql-http", "postgresql-amqp"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    database, transport = request.param.split("-")
    tmp = tmp_path_factory.mktemp(f"files-{request.param}")
    with ExitStack() as stack:
        amqp_url = None
        if transport == "amqp":
            amqp_url = stack.enter_context(vhost_on(request.getfixturevalue("private_broker")))
        f = stack.enter_context(fleet_on(transport, tmp, amqp_url, sqlite=database == "sqlite"))
        f.start_agent("desk-2x24g", **ACCEPTS)
        wait_for("the agent", lambda: "desk-2x24g" in f.agents(), f, 30)
        yield f


def chiffon_in(
    folder: Path, f: Fleet, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """`chiffon ...` run by a user in `folder`, with an empty HOME."""
    home = folder.parent / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "CHIFFON_API_TOKEN": TOKENS_ENV["CHIFFON_API_TOKEN"],
           "CHIFFON_ORCHESTRATOR_URL": f.api, "HOME": str(home), "COLUMNS": "400"}  # fmt: skip
    return subprocess.run([*CHIFFON, *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def project(tmp: Path) -> tuple[Path, bytes]:
    folder = tmp / "my-project"
    (folder / "data").mkdir(parents=True)
    data = os.urandom(300_000)
    (folder / "data" / "input.bin").write_bytes(data)
    (folder / "train.py").write_text(TRAIN)
    (folder / "secret.env").write_text("TOKEN=do-not-send\n")
    (folder / ".gitignore").write_text("secret.env\n")
    return folder, data


def test_run_from_a_folder_sends_it_and_brings_the_outputs_back_byte_for_byte(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder, data = project(tmp_path)
    done = chiffon_in(folder, fleet, "run", "--out", "results/**", "--out", "model.pt", "--",
                      sys.executable, "train.py")  # fmt: skip
    assert done.returncode == 0, done.stderr + fleet.logs()
    assert "sending 3 files" in done.stderr and ".gitignore honoured" in done.stderr
    assert str(folder) not in done.stdout  # it ran in its copy on the desktop
    job_id = re.search(r"job ([0-9a-f-]{36})", done.stderr).group(1)  # type: ignore[union-attr]
    out = folder / "chiffon-out" / job_id
    assert (out / "results" / "sum.txt").read_text() == str(sum(data))
    assert (out / "results" / "deep" / "reversed.bin").read_bytes() == data[::-1]
    assert (out / "model.pt").read_bytes() == b"weights:" + data[:1000]
    assert not (out / "scratch.tmp").exists() and not (out / "train.py").exists()

    # the same folder again: nothing new to send; `chiffon get` fetches the outputs later
    again = chiffon_in(folder, fleet, "run", "--detach", "--", sys.executable, "train.py")
    assert again.returncode == 0 and "; 0 new" in again.stderr, again.stderr
    with Client(fleet.api, token=API_TOKEN) as c:
        assert c.wait(again.stdout.strip(), timeout_seconds=60).state == "succeeded"
    shown = chiffon_in(folder, fleet, "jobs", "show", again.stdout.strip()).stdout
    assert "files in its cache" in " ".join(shown.split())  # the desktop had them
    shown = chiffon_in(folder, fleet, "jobs", "show", job_id).stdout
    assert "files fetched" in " ".join(shown.split())
    fetched = chiffon_in(folder, fleet, "get", job_id, "--to", str(tmp_path / "later"))
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "later" / "model.pt").read_bytes() == b"weights:" + data[:1000]
    escaped = chiffon_in(folder, fleet, "run", "--out", "../../etc/*", "--", "true")
    assert escaped.returncode != 0 and len(escaped.stderr.strip().splitlines()) == 1
    assert "'..'" in escaped.stderr


# Twelve steps, each counted into the checkpoint with its log (one file, written then
# renamed, so a save reads a step and its log together); a save is asked after each step.
# On the owner's signal (SIGUSR1) it stops after the step in hand.
STEPS = """
import json, os, pathlib, signal, sys, time
cp = pathlib.Path(os.environ["CHIFFON_CHECKPOINT_DIR"])
state = json.loads((cp / "state.json").read_text()) if (cp / "state.json").exists() else {
    "step": 0, "log": []}
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
print(f"attempt {os.environ['CHIFFON_ATTEMPT']} starts at step {state['step']}", flush=True)
while state["step"] < 12 and not stop:
    time.sleep(float(sys.argv[1]))
    state["log"].append(f"step {state['step']} by attempt {os.environ['CHIFFON_ATTEMPT']}")
    state["step"] += 1
    (cp / "state.new").write_text(json.dumps(state))
    os.replace(cp / "state.new", cp / "state.json")
    pathlib.Path(os.environ["CHIFFON_CHECKPOINT_SAVE"]).touch()
if state["step"] == 12:
    pathlib.Path("done.log").write_text("\\n".join(state["log"]) + "\\n")
"""
STATE_BYTES_PER_STEP = len('"step 10 by attempt 1", ')


def _steps(folder: Path) -> list[str]:
    return (folder / "done.log").read_text().splitlines()


def test_a_job_vacated_by_the_owner_resumes_elsewhere_from_its_checkpoint(tmp_path: Path) -> None:
    session_bin = tmp_path / "desk-8g" / "bin"
    away = int((time.time() - 3600) * 1e6)
    install(session_bin, idle_hint="yes", idle_since_us=away)
    folder = tmp_path / "steps"
    folder.mkdir()
    (folder / "steps.py").write_text(STEPS)
    with (
        fleet_on("http", tmp_path, None, liveness=SLOW_BEATS) as f,
        Client(f.api, token=API_TOKEN) as c,
    ):
        f.start_agent("desk-8g", **WHEN_IDLE, **QUICK_VACATE)
        wait_for("desk-8g", lambda: f.agents().get("desk-8g", {}).get("accepts_jobs"), f, 30)
        sent = chiffon_in(folder, f, "run", "--detach", "--gpus", "1", "--vram", "4", "--out",
                          "done.log", "--", sys.executable, "steps.py", "1.0")  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        job_id = sent.stdout.strip()
        wait_for("some steps saved", lambda: _saved_steps(c, job_id) >= 3, f, 60)
        f.start_agent("desk-2x24g", **{**WHEN_IDLE, "CHIFFON_ACCEPT_JOBS": "always"})
        wait_for("desk-2x24g", lambda: "desk-2x24g" in f.agents(), f, 30)
        install(session_bin, idle_hint="no")  # the owner is back at desk-8g
        done = c.wait(job_id, timeout_seconds=90)
        assert done.state == "succeeded", f.logs()
        assert (done.attempt, done.preemptions, done.agent_name) == (2, 1, "desk-2x24g")
        second = done.attempts[1]
        assert second.resumed_from == 1 and second.resumed_bytes
        got = chiffon_in(folder, f, "get", job_id)
        assert got.returncode == 0, got.stderr
        steps = _steps(folder / "chiffon-out" / job_id)
    # every step once, in order, the first ones by attempt 1 and the rest by attempt 2
    assert [s.split(" by ")[0] for s in steps] == [f"step {i}" for i in range(12)]
    by = [s.split(" by ")[1] for s in steps]
    assert by[0] == "attempt 1" and by[-1] == "attempt 2" and by == sorted(by)


def _saved_steps(c: Client, job_id: str) -> float:
    """About how many steps the latest saved checkpoint holds (by its size)."""
    checkpoint = c.job_files(job_id).checkpoint
    sizes = [e.size for e in checkpoint.entries if e.path == "state.json"] if checkpoint else []
    return sizes[0] / STATE_BYTES_PER_STEP if sizes else 0


FAST_LIVENESS = {"CHIFFON_HEARTBEAT_INTERVAL": "1", "CHIFFON_HEARTBEAT_TIMEOUT": "4",
                 "CHIFFON_SWEEP_INTERVAL": "1"}  # fmt: skip


def test_a_killed_desktops_job_resumes_from_its_last_periodic_save(tmp_path: Path) -> None:
    folder = tmp_path / "steps"
    folder.mkdir()
    (folder / "steps.py").write_text(STEPS)
    with (
        fleet_on("http", tmp_path, None, liveness=FAST_LIVENESS, sqlite=True) as f,
        Client(f.api, token=API_TOKEN) as c,
    ):
        f.start_agent("desk-8g", **ACCEPTS)
        wait_for("desk-8g", lambda: "desk-8g" in f.agents(), f, 30)
        sent = chiffon_in(folder, f, "run", "--detach", "--retries", "1", "--gpus", "1",
                          "--out", "done.log", "--", sys.executable, "steps.py", "0.4")  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        job_id = sent.stdout.strip()
        wait_for("some steps saved", lambda: _saved_steps(c, job_id) >= 1, f, 60)
        time.sleep(1.5)
        f.procs["desk-8g"].kill()  # SIGKILL: the job dies with it, unsaved steps are lost
        f.procs["desk-8g"].wait(10)
        f.start_agent("desk-2x24g", **ACCEPTS)
        done = c.wait(job_id, timeout_seconds=120)
        assert done.state == "succeeded", f.logs()
        assert done.agent_name == "desk-2x24g" and done.attempts[0].state == "lost"
        assert done.attempts[1].resumed_from == 1
        got = chiffon_in(folder, f, "get", job_id)
        assert got.returncode == 0, got.stderr
        steps = _steps(folder / "chiffon-out" / job_id)
    numbers = [int(s.split()[1]) for s in steps]
    # the saved steps are not done again: attempt 2 starts where the last save stood (the
    # log is in the checkpoint, so steps after that save are not in it either)
    assert numbers == list(range(12)), steps
    assert any(s.endswith("by attempt 1") for s in steps)
    assert any(s.endswith("by attempt 2") for s in steps)


def git_project(root: Path) -> Path:
    root.mkdir()
    (root / "make.py").write_text(MAKE)
    (root / "data.csv").write_text("1\n2\n3\n4\n")
    (root / ".gitignore").write_text("*.log\nchiffon-out/\n")
    (root / "secret.log").write_text("never leaves this machine")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def run_make(fleet: Fleet, folder: Path, code: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHIFFON, "run", "--out", "results/**", "--out", "model.bin", "--",
         "python3", "make.py", str(code)],
        cwd=folder, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **TOKENS_ENV, "CHIFFON_ORCHESTRATOR_URL": fleet.api},
    )  # fmt: skip


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.parametrize("code", [0, 3])
def test_a_script_from_a_folder_runs_and_its_outputs_come_back_whatever_its_end(
    fleet: Fleet, tmp_path: Path, code: int
) -> None:
    folder = git_project(tmp_path / "proj")
    done = run_make(fleet, folder, code)
    assert done.returncode == code, done.stderr + fleet.logs()
    assert done.stdout.splitlines()[-1] == "rows 4 secret here: False"
    assert "sending 3 files" in done.stderr and ".gitignore honoured" in done.stderr
    [job_dir] = (folder / "chiffon-out").iterdir()
    expected = {"model.bin": hashlib.sha256(hashlib.sha256(b"w").digest() * 1000).hexdigest(),
                "results/plots/p.bin": hashlib.sha256(bytes(range(256)) * 40).hexdigest(),
                "results/sum.txt": hashlib.sha256(b"10").hexdigest()}  # fmt: skip
    assert tree(job_dir) == expected
    assert f"3 output files, 42.2 kB, in chiffon-out/{job_dir.name}" in done.stderr
