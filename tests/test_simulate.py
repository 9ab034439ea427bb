"""`chiffon simulate`: virtual agents through the real transports into a real orchestrator."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from chiffon.agent.simulate import agent_id_for, make_fleet
from tests.auth import API_HEADERS, TOKENS_ENV
from tests.fleet import LIVENESS_ENV, private_vhost
from tests.procs import CHIFFON, orchestrator_process, run_cli, stop

AGENTS = 40


def simulate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = run_cli("simulate", "--agents", str(AGENTS), "--interval", "1", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def sim_env(tmp_path: Path) -> dict[str, str]:
    """The enrollment token, and a data dir of its own where simulate keeps the secrets."""
    return {
        "CHIFFON_ENROLL_TOKEN": TOKENS_ENV["CHIFFON_ENROLL_TOKEN"],
        "CHIFFON_DATA_DIR": str(tmp_path / "sim"),
    }


def sent_count(output: str) -> int:
    match = re.search(r"sent (\d+) heartbeats from (\d+) agents", output)
    assert match, output
    assert int(match.group(2)) == AGENTS
    return int(match.group(1))


def accepted_heartbeats(api: str) -> float:
    text = httpx.get(f"{api}/metrics", timeout=5).text
    pattern = r'chiffon_messages_accepted_total\{kind="heartbeat",outcome="applied"\} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def simulated(api: str, seed: int) -> list[dict[str, object]]:
    rows = httpx.get(
        f"{api}/api/v1/agents",
        params={"pool_name": "simulated"},
        headers=API_HEADERS,
        timeout=5,
    ).json()
    return [r for r in rows if str(r["name"]).startswith(f"sim-{seed}-")]


def test_fleet_is_stable_and_varied() -> None:
    first, again = make_fleet(200, seed=7), make_fleet(200, seed=7)
    assert [a.agent_id for a in first] == [a.agent_id for a in again]
    assert [a.hardware for a in first] == [a.hardware for a in again]
    assert first[3].agent_id == agent_id_for(7, 3) != agent_id_for(8, 3)
    assert len({a.agent_id for a in first}) == 200
    assert {len(a.hardware.gpus) for a in first} >= {0, 1, 2}
    assert len({gpu for a in first for gpu in a.hardware.gpus}) >= 3
    loads = {first[0].resources().cpu_load_1min for _ in range(5)}
    assert len(loads) > 1  # load changes from beat to beat


@pytest.mark.parametrize("transport", ["http", "amqp"])
def test_simulated_agents_register_with_varied_hardware(tmp_path: Path, transport: str) -> None:
    with private_vhost() as amqp_url, orchestrator_process(tmp_path, "--amqp-url", amqp_url) as api:
        env = {"CHIFFON_ORCHESTRATOR_URL": api, "CHIFFON_AMQP_URL": amqp_url, **sim_env(tmp_path)}
        done = simulate("--transport", transport, "--duration", "3", "--seed", "11", env=env)
        sent = sent_count(done.stdout)
        assert sent >= 2 * AGENTS, done.stdout  # at least two beats each in 3 s at 1 s
        assert accepted_heartbeats(api) == sent  # every confirmed message was applied
        rows = simulated(api, 11)
        assert len(rows) == AGENTS
        assert {r["agent_id"] for r in rows} == {str(agent_id_for(11, i)) for i in range(AGENTS)}
        assert all(r["status"] == "online" for r in rows)
        metrics = [r["resource_metrics"] for r in rows]
        assert len({m["gpu_count"] for m in metrics}) >= 3  # type: ignore[index]
        assert len({m["gpu_vram_total_gb"] for m in metrics}) >= 3  # type: ignore[index]


def test_offline_fraction_says_goodbye_midway(tmp_path: Path) -> None:
    with orchestrator_process(tmp_path) as api:
        env = {"CHIFFON_ORCHESTRATOR_URL": api, **sim_env(tmp_path)}
        args = ("--duration", "3", "--offline-fraction", "0.25", "--offline-mode", "goodbye")
        done = simulate(*args, env=env)
        assert "10 agents stopped midway, 10 with a goodbye" in done.stdout
        statuses = [r["status"] for r in simulated(api, 0)]
        assert statuses.count("offline") == 10
        assert statuses.count("online") == AGENTS - 10


def test_bad_input_is_one_line() -> None:
    done = run_cli("simulate", "--agents", "5", "--offline-fraction", "2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --offline-fraction must be in 0..1, not 2"]


def test_agents_enroll_once_and_keep_their_secrets(tmp_path: Path) -> None:
    with orchestrator_process(tmp_path) as api:
        env = {"CHIFFON_ORCHESTRATOR_URL": api, **sim_env(tmp_path)}
        simulate("--duration", "1", "--seed", "5", env=env)
        kept = tmp_path / "sim" / "simulate" / "seed-5.json"
        assert kept.stat().st_mode & 0o777 == 0o600
        # A second run of the same fleet proves itself with the kept secrets, no token.
        again = simulate("--duration", "1", "--seed", "5", env={**env, "CHIFFON_ENROLL_TOKEN": ""})
        assert sent_count(again.stdout) >= AGENTS and ", 0 failed" in again.stdout
        # A new fleet without the token is one line, not a traceback.
        new = run_cli(
            "simulate", "--agents", "3", "--seed", "6", "--duration", "1",
            env={**env, "CHIFFON_ENROLL_TOKEN": ""},
        )  # fmt: skip
        assert new.returncode == 1
        assert new.stderr.strip().splitlines() == [
            "error: 3 simulated agents need the orchestrator's enrollment token "
            "(--enroll-token or CHIFFON_ENROLL_TOKEN)"
        ]


def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.1)


@contextmanager
def simulating(*args: str, env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], str]]:
    """`chiffon simulate --accept-jobs ...` in the background until the block ends; yields
    a function that stops it (SIGTERM, as Ctrl-C) and returns what it printed."""
    out = (tmp_path / "simulate.out").open("w+")
    proc = subprocess.Popen(
        [*CHIFFON, "simulate", "--agents", str(AGENTS), "--interval", "1", "--transport", "amqp",
         "--accept-jobs", *args],
        env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def finish() -> str:
        assert stop(proc) == 0
        out.seek(0)
        return out.read()

    try:
        yield finish
    finally:
        stop(proc)
        out.close()


def submit(api: str, **spec: object) -> str:
    resp = httpx.post(f"{api}/api/v1/jobs", json={"command": ["train"], **spec},
                      headers=API_HEADERS, timeout=5)  # fmt: skip
    assert resp.status_code == 201, resp.text
    return str(resp.json()["job"]["job_id"])


def job(api: str, job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{api}/api/v1/jobs/{job_id}", headers=API_HEADERS, timeout=5)
    return dict(resp.json())


def test_simulated_agents_take_jobs_and_report_their_exit(tmp_path: Path) -> None:
    """Jobs placed on hollow agents run as simulated attempts: each job's own duration and
    exit code, reported over HTTP with each agent's credential; a cancel ends one."""
    with private_vhost() as amqp_url, orchestrator_process(tmp_path, "--amqp-url", amqp_url) as api:
        env = {"CHIFFON_ORCHESTRATOR_URL": api, "CHIFFON_AMQP_URL": amqp_url, **sim_env(tmp_path)}
        with simulating("--seed", "5", env=env, tmp_path=tmp_path) as finish:
            wait_for(lambda: len(simulated(api, 5)) == AGENTS, 30, "the fleet registered")
            need = {"gpus": 1, "vram_gb": 2}
            fine = [submit(api, requirements=need, env={"SIMULATE_SECONDS": "0.5"})
                    for _ in range(12)]  # fmt: skip
            bad = submit(api, requirements=need, env={"SIMULATE_SECONDS": "0.2",
                                                      "SIMULATE_EXIT": "3"})  # fmt: skip
            long = submit(api, requirements=need, env={"SIMULATE_SECONDS": "600"})
            ends = ("succeeded", "failed", "cancelled", "lost")
            wait_for(lambda: all(job(api, j)["state"] in ends for j in [*fine, bad]), 30,
                     "the short jobs ended")  # fmt: skip
            wait_for(lambda: job(api, long)["state"] == "running", 30, "the long job started")
            assert httpx.post(f"{api}/api/v1/jobs/{long}/cancel", headers=API_HEADERS,
                              timeout=5).status_code == 200  # fmt: skip
            wait_for(lambda: job(api, long)["state"] == "cancelled", 30, "the cancel")
            printed = finish()
        assert [job(api, j)["state"] for j in fine] == ["succeeded"] * 12
        assert all(job(api, j)["exit_code"] == 0 for j in fine)
        assert (job(api, bad)["state"], job(api, bad)["exit_code"]) == ("failed", 3)
        agents = {str(agent_id_for(5, i)) for i in range(AGENTS)}
        assert {job(api, j)["agent_id"] for j in fine} <= agents
    assert "simulated attempts: 14 assigned, 1 cancelled, 1 failed, 12 succeeded" in printed, (
        printed
    )


def test_a_simulated_agent_dies_mid_job_and_its_job_is_lost(tmp_path: Path) -> None:
    """With --die-fraction 1 every attempt kills its agent midway: the job's two attempts
    (one retry) each lose a desktop, found by the orchestrator's own liveness sweep."""
    with (
        private_vhost() as amqp_url,
        orchestrator_process(tmp_path, "--amqp-url", amqp_url, env=LIVENESS_ENV) as api,
    ):
        env = {"CHIFFON_ORCHESTRATOR_URL": api, "CHIFFON_AMQP_URL": amqp_url, **sim_env(tmp_path)}
        with simulating("--seed", "6", "--die-fraction", "1", "--job-seconds", "1",
                        env=env, tmp_path=tmp_path) as finish:  # fmt: skip
            wait_for(lambda: len(simulated(api, 6)) == AGENTS, 30, "the fleet registered")
            doomed = submit(api, retries=1)
            wait_for(lambda: job(api, doomed)["state"] == "lost", 60, "the job lost twice")
            printed = finish()
        assert job(api, doomed)["attempt"] == 2
        statuses = [r["status"] for r in simulated(api, 6)]
        assert statuses.count("offline") == 2, statuses
    assert "2 assigned, 2 died" in printed, printed
