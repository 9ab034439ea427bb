"""`chiffon probe` and `chiffon agent` as real processes, against a real orchestrator."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from chiffon.schemas.heartbeat import AgentMessage, Resources
from chiffon.transport.base import TransportError
from chiffon.transport.http import HttpPublisher
from tests.auth import API_HEADERS, ENROLL_TOKEN, enroll
from tests.fakes.nvidia_smi import gpu_row, install, path_with
from tests.procs import CHIFFON, free_port, orchestrator_process, run_cli


@pytest.fixture(scope="module")
def orchestrator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with orchestrator_process(tmp_path_factory.mktemp("orch")) as url:
        yield url


@pytest.fixture
def smi_env(tmp_path: Path) -> dict[str, str]:
    install(tmp_path / "bin", rows=[gpu_row(0, free_mib="20000"), gpu_row(1, util="[N/A]")])
    return {"PATH": path_with(tmp_path / "bin"), "HOME": str(tmp_path)}


def test_probe_json_is_the_resources_of_a_heartbeat(smi_env: dict[str, str]) -> None:
    out = run_cli("probe", "--json", env=smi_env)
    assert out.returncode == 0, out.stderr
    res = Resources.model_validate_json(out.stdout)
    assert (res.gpu_count, res.gpu_type, res.probe_errors) == (2, "nvidia", {})
    assert res.gpus[1].utilization_percent is None and res.gpu_vram_available_max_gb == 25.14
    table = run_cli("probe", env=smi_env)
    assert "nvidia #1" in table.stdout and "CPU load 1/5/15" in table.stdout


def test_probe_shows_the_owners_policy_decided_per_gpu_and_the_other_programs(
    tmp_path: Path,
) -> None:
    rows = [gpu_row(0, free_mib="20000"), gpu_row(1)]
    install(tmp_path / "bin", rows=rows, apps=[[rows[0][1], str(os.getpid()), "1024"]])
    me = psutil.Process().name()  # this test's process, listed on GPU 0
    env = {"PATH": path_with(tmp_path / "bin"), "HOME": str(tmp_path),
           "CHIFFON_ACCEPT_JOBS": "always", "CHIFFON_ALLOW_ROOT_JOBS": "true",
           "CHIFFON_RESERVE_GPUS": "1", "CHIFFON_EXCLUSIVE_APPS": me}  # fmt: skip
    table = run_cli("probe", env=env)
    assert table.returncode == 0, table.stderr
    lines = [" ".join(line.split()) for line in table.stdout.splitlines()]
    assert (
        "other programs on it: 1, 1.1 GB; no new jobs: a program the owner named runs on it"
        in lines
    )
    assert "other programs on it: 0, 0.0 GB; no new jobs: the owner keeps this GPU" in lines
    assert "New jobs jobs welcome" in lines
    res = Resources.model_validate_json(run_cli("probe", "--json", env=env).stdout)
    assert [g.withheld for g in res.gpus] == ["exclusive_app", "reserved"]
    assert res.gpus[0].foreign_names is None  # names only when the owner allows it
    named = run_cli("probe", "--json", env={**env, "CHIFFON_REPORT_PROCESS_NAMES": "true"})
    assert Resources.model_validate_json(named.stdout).gpus[0].foreign_names == [me.lower()]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"CHIFFON_HEARTBEAT_INTERVAL": "-1"}, "heartbeat_interval_seconds = '-1'"),
        ((), {"CHIFFON_GPU_TIMEOUT": "fast"}, "(from env CHIFFON_GPU_TIMEOUT)"),
        (("--label", "no-equals"), {}, "want key=value"),
        (("--config", "BROKEN"), {}, "line 2 is not valid YAML"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    broken = tmp_path / "agent.yml"
    broken.write_text("heartbeat_interval_seconds: 5\n  transport: [http\n")
    args = tuple(str(broken) if a == "BROKEN" else a for a in args)
    out = run_cli("agent", *args, env={"HOME": str(tmp_path), **env})
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_print_config_shows_each_origin(tmp_path: Path) -> None:
    (tmp_path / ".chiffon").mkdir()
    (tmp_path / ".chiffon" / "agent.yml").write_text("agent_pool_name: lab\n")
    out = run_cli(
        "agent", "--print-config", "--interval", "7",
        env={"HOME": str(tmp_path), "CHIFFON_GPU_TIMEOUT": "2"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert lines["agent_pool_name"][1:] == ["lab", "file", str(tmp_path / ".chiffon/agent.yml")]
    assert lines["heartbeat_interval_seconds"][1:] == ["7.0", "flag"]
    assert lines["gpu_detection_timeout_seconds"][1:] == ["2.0", "env", "CHIFFON_GPU_TIMEOUT"]


def agents(url: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v1/agents", timeout=5, headers=API_HEADERS)
    result: list[dict[str, Any]] = resp.json()
    return result


def test_agent_registers_over_http_and_sigterm_makes_it_offline(
    orchestrator_url: str, smi_env: dict[str, str], tmp_path: Path
) -> None:
    log = (tmp_path / "agent.log").open("w")
    token_file = tmp_path / "enroll_token"
    token_file.write_text(ENROLL_TOKEN + "\n")
    proc = subprocess.Popen(
        [*CHIFFON, "agent", "--transport", "http", "--orchestrator-url", orchestrator_url,
         "--interval", "0.5", "--state-dir", str(tmp_path / "state"), "--name", "desk-e2e"],
        env={**os.environ, **smi_env, "CHIFFON_ENROLL_TOKEN_FILE": str(token_file)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        # the token reached the agent from its file: nothing secret in what `ps` shows
        assert ENROLL_TOKEN not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        deadline = time.monotonic() + 20
        mine: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not mine:
            mine = [a for a in agents(orchestrator_url) if a["name"] == "desk-e2e"]
            time.sleep(0.1)
        assert mine, (tmp_path / "agent.log").read_text()
        agent_id = (tmp_path / "state" / "agent_id").read_text().strip()
        assert mine[0]["agent_id"] == agent_id and mine[0]["status"] == "online"
        assert mine[0]["resource_metrics"]["gpu_count"] == 2
        secret = tmp_path / "state" / "agent_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
    (me,) = [a for a in agents(orchestrator_url) if a["agent_id"] == agent_id]
    assert me["status"] == "offline"
    # no NVIDIA driver library here (nvidia-smi is the fake): not an error, not a line
    assert "NVML" not in (tmp_path / "agent.log").read_text()


def message(**changes: Any) -> AgentMessage:
    base = AgentMessage(
        schema_version=1,
        agent_id=uuid.uuid4(),
        boot_id=uuid.uuid4(),
        seq=0,
        sent_at=datetime.now(UTC),
        name="http-test",
        resources=Resources(),
    )
    return base.model_copy(update=changes)


async def test_http_publisher_delivers_and_reports_refusals(orchestrator_url: str) -> None:
    good = message()
    credential = enroll(orchestrator_url, good.agent_id)
    publisher = HttpPublisher(orchestrator_url, timeout_seconds=2, credential=credential)
    await publisher.connect()
    try:
        await publisher.publish(good)
        assert any(a["agent_id"] == str(good.agent_id) for a in agents(orchestrator_url))
        with pytest.raises(TransportError, match=r"HTTP 422: invalid: seq"):
            await publisher.publish(message(agent_id=good.agent_id, seq=-1))  # unvalidated copy
        with pytest.raises(TransportError, match=r"HTTP 401: not_enrolled"):
            await publisher.publish(message(agent_id=uuid.uuid4()))  # not its own agent
    finally:
        await publisher.close()


def test_agent_without_a_credential_or_token_says_how_to_enroll(tmp_path: Path) -> None:
    out = run_cli(
        "agent",
        "--state-dir",
        str(tmp_path),
        env={"HOME": str(tmp_path), "CHIFFON_ENROLL_TOKEN": ""},
    )
    assert out.returncode == 2
    assert "no credential yet" in out.stderr and "CHIFFON_ENROLL_TOKEN_FILE" in out.stderr


async def test_http_publisher_unreachable_is_a_transport_error() -> None:
    publisher = HttpPublisher(f"http://127.0.0.1:{free_port()}", timeout_seconds=1)
    await publisher.connect()
    with pytest.raises(TransportError, match="cannot reach"):
        await publisher.publish(message())
    await publisher.close()


def test_secrets_on_the_command_line_are_warned_about_and_a_kept_secret_needs_no_token(
    orchestrator_url: str, smi_env: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = subprocess.Popen(
        [*CHIFFON, "agent", "--orchestrator-url", orchestrator_url, "--state-dir", str(state),
         "--interval", "0.5", "--enroll-token", ENROLL_TOKEN,
         "--amqp-url", "amqp://chiffon:hunter2@broker:5672/"],
        env={**os.environ, **smi_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    _until_secret_kept(first, state)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=10)
    assert "--enroll-token and --amqp-url with a password on the command line" in err
    assert "CHIFFON_ENROLL_TOKEN_FILE" in err
    again = subprocess.Popen(
        [*CHIFFON, "agent", "--orchestrator-url", orchestrator_url, "--state-dir", str(state),
         "--interval", "0.5"],
        env={**os.environ, **smi_env, "CHIFFON_ENROLL_TOKEN": ENROLL_TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(2)
    again.send_signal(signal.SIGTERM)
    out, err = again.communicate(timeout=10)
    assert again.returncode == 0, err
    assert "already enrolled: the enrollment token is not needed any more" in out
    assert "warning" not in err  # a variable is not in argv


def _until_secret_kept(proc: subprocess.Popen[str], state: Path) -> None:
    deadline = time.monotonic() + 20
    while not (state / "agent_secret").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
