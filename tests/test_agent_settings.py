"""Agent configuration layers and identity."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from chiffon.agent.identity import IdentityError, default_name, load_or_create_agent_id
from chiffon.agent.settings import AgentSettings, SettingsError, load_settings


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_file_env_flags_in_that_order(tmp_path: Path) -> None:
    config = write(
        tmp_path / "agent.yml",
        "heartbeat_interval_seconds: 20\nagent_pool_name: lab\ngpu_detection_timeout_seconds: 3\n"
        "labels: {room: b12}\n",
    )
    loaded = load_settings(
        config=config,
        environ={"CHIFFON_HEARTBEAT_INTERVAL": "25", "CHIFFON_POOL_NAME": "studio"},
        flags={"agent_pool_name": "render", "name": None},
    )
    s = loaded.settings
    assert (s.heartbeat_interval_seconds, s.agent_pool_name) == (25, "render")
    assert (s.gpu_detection_timeout_seconds, s.labels, s.heartbeat_timeout_seconds) == (
        3,
        {"room": "b12"},
        45,
    )
    assert loaded.origins["heartbeat_interval_seconds"] == "env CHIFFON_HEARTBEAT_INTERVAL"
    assert loaded.origins["agent_pool_name"] == "flag"
    assert loaded.origins["gpu_detection_timeout_seconds"] == f"file {config}"
    assert loaded.origins["heartbeat_timeout_seconds"] == "default"


def test_user_file_found_in_home(tmp_path: Path) -> None:
    write(tmp_path / ".chiffon" / "agent.yml", "transport: amqp\n")
    loaded = load_settings(environ={}, home=tmp_path)
    assert loaded.settings.transport == "amqp"
    assert loaded.config_file == tmp_path / ".chiffon" / "agent.yml"


def test_env_lists_and_labels(tmp_path: Path) -> None:
    s = load_settings(
        environ={"CHIFFON_CAPABILITIES": "cuda, rocm", "CHIFFON_LABELS": "room=b12,os=linux"},
        home=tmp_path,
    ).settings
    assert s.capabilities == ["cuda", "rocm"] and s.labels == {"room": "b12", "os": "linux"}


@pytest.mark.parametrize(
    ("env", "file", "message"),
    [
        (
            {"CHIFFON_HEARTBEAT_INTERVAL": "-5"},
            "",
            "bad setting heartbeat_interval_seconds = '-5' (from env CHIFFON_HEARTBEAT_INTERVAL)"
            ": Input should be greater than 0",
        ),
        (
            {"CHIFFON_GPU_TIMEOUT": "soon"},
            "",
            "bad setting gpu_detection_timeout_seconds = 'soon' (from env CHIFFON_GPU_TIMEOUT)",
        ),
        (
            {"CHIFFON_AGENT_ID": "desk-1234abcd"},
            "",
            "bad setting agent_id = 'desk-1234abcd' (from env CHIFFON_AGENT_ID): Input should be "
            "a valid UUID",
        ),
        ({}, "heartbeat_intervl: 3\n", "bad setting heartbeat_intervl = 3 (from file "),
        ({}, "heartbeat_interval_seconds: [1\n", "is not valid YAML"),
        ({}, "- just\n- a list\n", "must hold a mapping"),
        (
            {"CHIFFON_HEARTBEAT_TIMEOUT": "10"},
            "",
            "heartbeat_timeout_seconds (10) must be greater than heartbeat_interval_seconds (15)",
        ),
    ],
)
def test_bad_values_name_key_value_and_origin(
    tmp_path: Path, env: dict[str, str], file: str, message: str
) -> None:
    config = write(tmp_path / "agent.yml", file)
    with pytest.raises(SettingsError) as err:
        load_settings(config=config, environ=env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_explicit_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(config=tmp_path / "nope.yml", environ={})


def test_agent_id_is_created_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_agent_id(tmp_path / "state")
    assert load_or_create_agent_id(tmp_path / "state") == first
    assert (tmp_path / "state" / "agent_id").read_text().strip() == str(first)
    explicit = uuid.uuid4()
    assert load_or_create_agent_id(tmp_path / "state", explicit) == explicit


def test_corrupt_identity_file_is_refused_not_replaced(tmp_path: Path) -> None:
    write(tmp_path / "agent_id", "desk-1234abcd\n")
    with pytest.raises(IdentityError, match="does not hold a UUID"):
        load_or_create_agent_id(tmp_path)
    assert (tmp_path / "agent_id").read_text() == "desk-1234abcd\n"


def test_default_name_is_the_seeds_shape_but_stable() -> None:
    agent_id = uuid.UUID("1234abcd-0000-4000-8000-000000000000")
    assert default_name(agent_id, "render-01.lab.example") == "render-01-1234abcd"


def test_example_config_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "agent.yml"
    lines = [
        line.removeprefix("# ")
        for line in example.read_text().splitlines()
        if re.match(r"^# [a-z_]+:", line)
    ]
    uncommented = write(tmp_path / "agent.yml", "\n".join(lines))
    documented = load_settings(config=uncommented, environ={}).settings
    assert {line.split(":")[0] for line in lines} == set(AgentSettings.model_fields)
    assert documented == AgentSettings()
