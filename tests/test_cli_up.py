"""`chiffon up`: orchestrator, API and this machine's own agent in one process."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import CHIFFON, free_port, run_cli, stop, wait_http


@contextmanager
def chiffon_up(home: Path, port: int, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = {
        **os.environ,
        "HOME": str(home),
        # `up` is embedded: neither of these may be used.
        "CHIFFON_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "CHIFFON_AMQP_URL": "amqp://nobody@127.0.0.1:1/",
    }
    for var in ("CHIFFON_DATA_DIR", "CHIFFON_API_TOKEN", "CHIFFON_ENROLL_TOKEN"):
        env.pop(var, None)
    out = (home / f"up-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(
        [*CHIFFON, "up", "--port", str(port), *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log=Path(out.name))
        yield proc
    finally:
        stop(proc, signal.SIGKILL)
        out.close()


TOKEN_HOME: list[Path] = []  # the HOME whose ~/.chiffon/api_token `get` presents


def get(port: int, path: str) -> Any:
    token = (TOKEN_HOME[-1] / ".chiffon" / "api_token").read_text().strip()
    headers = {"authorization": f"Bearer {token}"}
    return httpx.get(f"http://127.0.0.1:{port}/api/v1{path}", timeout=5, headers=headers).json()


def wait_agent_online(port: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        agents: list[dict[str, Any]] = get(port, "/agents")
        if agents and agents[0]["status"] == "online":
            return agents
        time.sleep(0.1)
    raise AssertionError("this machine's agent did not come online")


def test_up_serves_the_api_with_this_machine_registered(tmp_path: Path) -> None:
    port = free_port()
    TOKEN_HOME.append(tmp_path)
    with chiffon_up(tmp_path, port) as proc:
        (me,) = wait_agent_online(port)
        agent_id = (tmp_path / ".chiffon" / "agent_id").read_text().strip()
        # Zero set-up, but not open: the API wants the token `up` wrote (0600), which the
        # CLI finds by itself.
        token_file = tmp_path / ".chiffon" / "api_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        unauthenticated = httpx.get(f"http://127.0.0.1:{port}/api/v1/agents", timeout=5)
        assert unauthenticated.status_code == 401
        listed = run_cli(
            "agents", "--orchestrator-url", f"http://127.0.0.1:{port}",
            env={"HOME": str(tmp_path), "CHIFFON_API_TOKEN": ""},
        )  # fmt: skip
        assert listed.returncode == 0 and me["name"] in listed.stdout, listed.stderr
        assert me["agent_id"] == agent_id
        assert me["resource_metrics"]["cpu_cores_physical"] >= 1
        assert (tmp_path / ".chiffon" / "chiffon.db").is_file()

        # A second `up` on the same data directory would cancel this one's local agent:
        # refused before it touches anything, whatever its port.
        second = run_cli("up", "--port", str(free_port()), env={"HOME": str(tmp_path)})
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"error: another `chiffon up` (pid {proc.pid}) is running on "
            f"{tmp_path / '.chiffon'}; stop it first, or give this one its own --data-dir"
        )
        other_home = tmp_path / "other"
        busy = run_cli("up", "--port", str(port), env={"HOME": str(other_home)})
        assert busy.returncode == 1
        assert busy.stderr.strip() == (
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
        )
        assert get(port, f"/agents/{agent_id}")["status"] == "online"  # still heard

        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 5
    log = next(tmp_path.glob("up-*.log")).read_text()
    assert f"http://127.0.0.1:{port}/#token={token_file.read_text().strip()}" in log
    assert "chiffon agent --orchestrator-url" in log and "CHIFFON_ENROLL_TOKEN=" in log
    assert "then approve each here: chiffon agents approve <its name>" in log  # pending
    assert "--enroll-token" not in log  # never a secret in argv
    assert "Traceback" not in log

    assert "issued this machine's agent a new credential (none kept yet)" in log
    secret = (tmp_path / ".chiffon" / "agent_secret").read_text()
    with chiffon_up(tmp_path, port):  # run twice: the registry and the identity stay
        (again,) = wait_agent_online(port)
        assert again["agent_id"] == agent_id
        # and so does the credential: nothing re-issued behind anyone's back
        assert (tmp_path / ".chiffon" / "agent_secret").read_text() == secret
        reasons = [e["reason"] for e in get(port, f"/events?agent_id={agent_id}")]
        assert reasons[:3] == ["heartbeat", "goodbye", "registered"]


def test_an_api_on_the_network_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "CHIFFON_API_TOKEN": "", "CHIFFON_DATA_DIR": str(tmp_path)}
    for command in (["up"], ["orchestrator"]):
        out = run_cli(*command, "--host", "0.0.0.0", "--port", str(free_port()), env=env)
        assert out.returncode == 2, out.stderr
        assert "refusing to serve the API on 0.0.0.0 without an API token" in out.stderr
        assert "CHIFFON_API_TOKEN" in out.stderr


def test_an_orchestrator_told_not_to_place_says_so_and_on_sqlite_warns(tmp_path: Path) -> None:
    """`--no-dispatch` or CHIFFON_DISPATCH=false; on SQLite only another orchestrator on
    the same file places its jobs, and without notices."""
    env = {"HOME": str(tmp_path), "CHIFFON_DATA_DIR": str(tmp_path)}
    for args, extra in ((["--no-dispatch"], {}), ([], {"CHIFFON_DISPATCH": "false"})):
        out = run_cli("orchestrator", *args, "--port", str(free_port()), env={**env, **extra})
        assert out.returncode == 1 and "chiffon db upgrade" in out.stderr  # no schema yet
        assert "placing no jobs (--no-dispatch)" in out.stdout
        assert "note: on SQLite, jobs submitted here are placed only by" in out.stdout
    out = run_cli("orchestrator", "--port", str(free_port()), env=env)
    assert "placing no jobs" not in out.stdout


def test_a_bad_setting_is_worded_like_the_agents(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "CHIFFON_HEARTBEAT_INTERVAL": "-1"}
    out = run_cli("up", "--port", str(free_port()), env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: bad setting heartbeat_interval_seconds = '-1' "
        "(from env CHIFFON_HEARTBEAT_INTERVAL): must be greater than 0"
    )


def test_the_enrollment_token_is_never_printed_only_by_a_start_that_failed(
    tmp_path: Path,
) -> None:
    """It was printed once, by the first start, even when that start then failed: the
    operator never saw it again. Now a failed start generates nothing, and every later
    start says where the token is."""
    env = {**os.environ, "HOME": str(tmp_path)}
    for var in ("CHIFFON_DATA_DIR", "CHIFFON_API_TOKEN", "CHIFFON_ENROLL_TOKEN"):
        env.pop(var, None)
    token_file = tmp_path / ".chiffon" / "enroll_token"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        failed = run_cli("orchestrator", "--port", str(port), env=env)
    assert failed.returncode == 1 and "cannot listen" in failed.stderr
    assert not token_file.exists()

    # The first real start generates and prints the token, then stops: the schema is not
    # there yet (`chiffon db upgrade`), as on a new user's first try.
    first = run_cli("orchestrator", "--port", str(free_port()), env=env)
    token = token_file.read_text().strip()
    assert f"enrollment token (give it to new agents once): {token}" in first.stdout
    assert "chiffon db upgrade" in first.stderr and first.returncode == 1
    assert run_cli("db", "upgrade", env=env).returncode == 0
    port = free_port()
    log = tmp_path / "orchestrator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CHIFFON, "orchestrator", "--port", str(port)], env=env, stdout=out,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, log=log)
        finally:
            stop(proc)
    second = log.read_text()
    assert token not in second  # not printed again (it lives in logs and journals)...
    assert f"enrollment token: in {token_file}" in second  # ...but where it is, every time


def _waiting_reason(port: int, home: Path) -> tuple[str, str]:
    """A job submitted the README's way (`chiffon run`, here detached): its reason, by the
    API and as `chiffon jobs show` prints it."""
    env = {"HOME": str(home), "CHIFFON_API_TOKEN": ""}
    url = ("--orchestrator-url", f"http://127.0.0.1:{port}")
    submitted = run_cli("run", "--detach", *url, "--", "true", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 20
    while not (job := get(port, f"/jobs/{job_id}"))["reason"]:
        assert time.monotonic() < deadline, "the job got no reason"
        time.sleep(0.1)
    assert job["state"] == "queued"
    shown = run_cli("jobs", "show", job_id, *url, env=env)
    assert shown.returncode == 0, shown.stderr
    return job["reason"], shown.stdout


def _banner_line(home: Path, what: str) -> str:
    log = next(home.glob("up-*.log")).read_text()
    (line,) = [row.rstrip() for row in log.splitlines() if row.startswith(what)]
    return line


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="`chiffon up` as root: run as root"
)
def test_up_as_root_says_it_runs_no_jobs_and_a_waiting_job_says_why_and_the_fix(
    tmp_path: Path,
) -> None:
    """The README's first two commands, as root: the banner said "jobs welcome", and the
    job waited with "1 does not accept jobs", saying neither why nor what to do."""
    port = free_port()
    TOKEN_HOME.append(tmp_path)
    with chiffon_up(tmp_path, port):
        wait_agent_online(port)
        reason, shown = _waiting_reason(port, tmp_path)
    assert reason == (
        "no online agent that accepts jobs has room; the only agent runs as root and refuses "
        "jobs: restart it with `chiffon up --allow-root-jobs` "
        "(or `chiffon agent --allow-root-jobs`)"
    )
    assert "the only agent runs as root and refuses jobs" in shown
    assert _banner_line(tmp_path, "New jobs").split(maxsplit=2)[2] == (
        "no new jobs: the agent runs as root, and runs jobs only with --allow-root-jobs"
    )
    assert "restart it with `chiffon up --allow-root-jobs`" in _banner_line(tmp_path, "It does")


def test_up_told_to_run_no_jobs_says_so_and_a_waiting_job_says_why(tmp_path: Path) -> None:
    port = free_port()
    TOKEN_HOME.append(tmp_path)
    with chiffon_up(tmp_path, port, "--no-accept-jobs"):
        wait_agent_online(port)
        reason, _ = _waiting_reason(port, tmp_path)
    assert reason == (
        "no online agent that accepts jobs has room; "
        "1 does not accept jobs (its owner did not opt in: accept_jobs)"
    )
    assert _banner_line(tmp_path, "New jobs").split(maxsplit=2)[2] == (
        "no new jobs: this desktop does not accept jobs"
    )


@pytest.fixture
def home_outside_tmp() -> Iterator[Path]:
    """A HOME outside /tmp (a job's /tmp is its own anyway): the data directory is then
    hidden only by the sandbox's list, as on a desktop where it sits under /home."""
    home = Path("/var/lib") / f"chiffon-test-up-{time.monotonic_ns()}"
    home.mkdir(mode=0o700)
    yield home
    subprocess.run(["rm", "-rf", str(home)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs its job as chiffon-job: needs root (as CI)")
def test_a_job_under_up_cannot_read_the_data_directory_or_the_agent(home_outside_tmp: Path) -> None:
    """Issue 37: under `chiffon up` a job read the API token, the enrollment token and the
    signing key from the data directory and rewrote chiffon.db. Now the job runs as the
    unprivileged job user, in its sandbox, and sees none of it; the agent's heartbeat says
    which protections it had, and `chiffon agents -o wide` shows them."""
    home, port = home_outside_tmp, free_port()
    data = home / ".chiffon"
    TOKEN_HOME.append(home)
    with chiffon_up(home, port, "--allow-root-jobs"):
        [agent] = wait_agent_online(port)
        assert agent["sandbox"]["processes"] == "cgroup", agent["sandbox"]
        env = {"HOME": str(home), "CHIFFON_API_TOKEN": ""}
        url = ("--orchestrator-url", f"http://127.0.0.1:{port}")
        wide = run_cli("agents", "-o", "wide", *url, env=env)
        assert "cgroup+mem+home+dev" in wide.stdout, wide.stdout + wide.stderr
        script = (
            f"id -un; echo data=$(ls -A {data}); cat {data}/api_token {data}/signing_key; "
            f"echo x >> {data}/chiffon.db; ls /proc | grep -c '^[0-9]'"
        )
        done = run_cli("run", *url, "--", "sh", "-c", script, env=env, timeout=60)
    token = (data / "api_token").read_text().strip()
    assert token not in done.stdout + done.stderr
    lines = done.stdout.split()
    assert lines and lines[0] == "chiffon-job", done.stdout + done.stderr
    # the data directory is a read-only cover holding only the way to the job's own folder
    assert lines[1] == "data=jobs"
    assert "Read-only file system" in done.stdout + done.stderr
    assert int(lines[-1]) <= 4  # only the job's own processes, not the agent's
