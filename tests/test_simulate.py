"""`chiffon simulate`: virtual agents through the real transports into a real orchestrator."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from chiffon.agent.simulate import agent_id_for, make_fleet
from tests.auth import API_HEADERS, TOKENS_ENV
from tests.fleet import private_vhost
from tests.procs import orchestrator_process, run_cli

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
