"""Agent configuration layers and identity."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chiffon.agent.identity import IdentityError, default_name, load_or_create_agent_id
from chiffon.agent.settings import FIELDS, AgentSettings, Secret, SettingsError, load_settings


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
        75,  # unset: three of the intervals
    )
    assert loaded.origins["heartbeat_interval_seconds"] == "env CHIFFON_HEARTBEAT_INTERVAL"
    assert loaded.origins["agent_pool_name"] == "flag"
    assert loaded.origins["gpu_detection_timeout_seconds"] == f"file {config}"
    assert loaded.origins["heartbeat_timeout_seconds"] == "default"


def test_the_timeout_follows_a_longer_interval_unless_it_is_set() -> None:
    """An interval of a minute alone is valid: the timeout defaults to three intervals.
    Only a timeout set at or below the interval is refused."""
    alone = load_settings(environ={"CHIFFON_HEARTBEAT_INTERVAL": "60"}).settings
    assert (alone.heartbeat_interval_seconds, alone.heartbeat_timeout_seconds) == (60, 180)
    both = {"CHIFFON_HEARTBEAT_INTERVAL": "60", "CHIFFON_HEARTBEAT_TIMEOUT": "300"}
    assert load_settings(environ=both).settings.heartbeat_timeout_seconds == 300
    with pytest.raises(SettingsError, match="must be greater than"):
        load_settings(environ={**both, "CHIFFON_HEARTBEAT_TIMEOUT": "60"})


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
            ": must be greater than 0 and at most 3600",
        ),
        (
            {"CHIFFON_GPU_TIMEOUT": "soon"},
            "",
            "bad setting gpu_detection_timeout_seconds = 'soon' (from env CHIFFON_GPU_TIMEOUT)"
            ": must be a number",
        ),
        (
            {"CHIFFON_AGENT_ID": "desk-1234abcd"},
            "",
            "bad setting agent_id = 'desk-1234abcd' (from env CHIFFON_AGENT_ID): must be a UUID",
        ),
        (
            {"CHIFFON_ORCHESTRATOR_URL": "orchestrator.lan:8700"},
            "",
            "bad setting orchestrator_url = 'orchestrator.lan:8700' (from env "
            "CHIFFON_ORCHESTRATOR_URL): must be a URL starting http:// or https://",
        ),
        ({"CHIFFON_ORCHESTRATOR_URL": "http://"}, "", "orchestrator_url = 'http://' (from env"),
        ({"CHIFFON_ORCHESTRATOR_URL": "http://h:port"}, "", "must be a URL starting http://"),
        (
            {"CHIFFON_TRANSPORT": "amqp"},
            "amqp_url: http://broker.lan/\n",
            "bad setting amqp_url = 'http://broker.lan/' (from file ",
        ),
        ({}, "heartbeat_intervl: 3\n", "bad setting heartbeat_intervl = 3 (from file "),
        ({}, "heartbeat_intervl: 3\n", "): unknown setting"),
        ({}, "heartbeat_interval_seconds: [1\n", "is not valid YAML"),
        ({}, "- just\n- a list\n", "must hold a mapping"),
        (
            {"CHIFFON_HEARTBEAT_TIMEOUT": "10"},
            "",
            "bad settings: heartbeat_timeout_seconds (10) must be greater than "
            "heartbeat_interval_seconds (15)",
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


def test_urls_keep_their_scheme_port_and_path(tmp_path: Path) -> None:
    env = {
        "CHIFFON_ORCHESTRATOR_URL": "https://chiffon.lab.example:8443/base",
        "CHIFFON_AMQP_URL": "amqps://agent:pw@broker.lab.example/chiffon",
    }
    s = load_settings(config=None, environ=env, home=tmp_path).settings
    assert (s.orchestrator_url, s.amqp_url) == tuple(env.values())


def test_the_broker_url_is_checked_only_for_the_amqp_transport(tmp_path: Path) -> None:
    over_http = load_settings(config=None, environ={"CHIFFON_AMQP_URL": ""}, home=tmp_path)
    assert over_http.settings.amqp_url == ""
    with pytest.raises(SettingsError, match=r"amqp_url = '' \(from env CHIFFON_AMQP_URL\)"):
        load_settings(
            config=None,
            environ={"CHIFFON_AMQP_URL": "", "CHIFFON_TRANSPORT": "amqp"},
            home=tmp_path,
        )


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
    assert {line.split(":")[0] for line in lines} == set(FIELDS)
    assert documented == AgentSettings()


def test_importing_settings_does_not_import_pydantic() -> None:
    code = "import chiffon.agent.settings, sys; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("heartbeat_interval_seconds: yes", "heartbeat_interval_seconds = True"),
        ("heartbeat_interval_seconds: [1, 2]", "heartbeat_interval_seconds = [1, 2]"),
        ("heartbeat_interval_seconds: null", "heartbeat_interval_seconds = None"),
        ("agent_pool_name: 42", "agent_pool_name = 42"),
        ("agent_id: 1234", "agent_id = 1234"),
        ("transport: smoke", "transport = 'smoke'"),
        ("state_dir: 3", "state_dir = 3"),
        ("labels: {rack: 12}", "labels = {'rack': 12}"),
        ("labels: [a, b]", "labels = ['a', 'b']"),
        ("capabilities: cuda", "capabilities = 'cuda'"),
        ("specializations: [1]", "specializations = [1]"),
        ("enroll_token: 12345", "enroll_token = '**********'"),
    ],
)
def test_wrong_yaml_types_are_refused_with_key_value_and_origin(
    tmp_path: Path, line: str, message: str
) -> None:
    config = write(tmp_path / "agent.yml", line + "\n")
    with pytest.raises(SettingsError) as err:
        load_settings(config=config, environ={})
    assert str(err.value).startswith(f"bad setting {message} (from file {config}): ")
    assert "\n" not in str(err.value) and "12345" not in str(err.value)


def test_yaml_values_are_converted_to_the_declared_types(tmp_path: Path) -> None:
    agent_id = uuid.uuid4()
    config = write(
        tmp_path / "agent.yml",
        f"heartbeat_interval_seconds: 2\nagent_id: {agent_id}\nstate_dir: ~/agent\n"
        "enroll_token: tok\n",
    )
    s = load_settings(config=config, environ={}).settings
    assert isinstance(s.heartbeat_interval_seconds, float) and s.agent_id == agent_id
    assert s.state_dir == Path.home() / "agent" and s.enroll_token == Secret("tok")


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        ({"heartbeat_interval_seconds": "3600", "heartbeat_timeout_seconds": "3601"}, None),
        ({"heartbeat_interval_seconds": "3600.001"}, "heartbeat_interval_seconds"),
        ({"heartbeat_interval_seconds": "0.001"}, None),
        ({"heartbeat_interval_seconds": "0"}, "heartbeat_interval_seconds"),
        ({"heartbeat_interval_seconds": "nan"}, "heartbeat_interval_seconds"),
        ({"heartbeat_timeout_seconds": "86400"}, None),
        ({"heartbeat_timeout_seconds": "86401"}, "heartbeat_timeout_seconds"),
        ({"gpu_detection_timeout_seconds": "120"}, None),
        ({"gpu_detection_timeout_seconds": "121"}, "gpu_detection_timeout_seconds"),
        ({"labels": {f"k{i}": "v" for i in range(64)}}, None),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
        ({"capabilities": ["c"] * 64}, None),
        ({"capabilities": ["c"] * 65}, "capabilities"),
        ({"agent_pool_name": "p" * 128}, None),
        ({"agent_pool_name": "p" * 129}, "agent_pool_name"),
        ({"agent_pool_name": ""}, "agent_pool_name"),
        ({"name": "n" * 255}, None),
        ({"name": "n" * 256}, "name"),
    ],
)
def test_bounds_are_inclusive_and_the_next_value_refused(
    tmp_path: Path, values: dict[str, object], refused: str | None
) -> None:
    if refused is None:
        settings = load_settings(flags=values, environ={}, home=tmp_path)
        assert all(settings.origins[key] == "flag" for key in values)
        return
    with pytest.raises(SettingsError) as err:
        load_settings(flags=values, environ={}, home=tmp_path)
    assert str(err.value).startswith(f"bad setting {refused} = ")
    assert "(from flag): " in str(err.value)


def test_secret_is_hidden_but_compared_by_value() -> None:
    token = Secret("hunter2")
    settings = AgentSettings(enroll_token=Secret("hunter2"))
    assert "hunter2" not in repr(token) + str(token) + repr(settings) + str(settings.as_json())
    assert str(token) == "**********" and settings.as_json()["enroll_token"] == "**********"
    assert settings.enroll_token == token and token != Secret("other")
    assert token.get_secret_value() == "hunter2"


def test_as_json_holds_only_json_types() -> None:
    agent_id = uuid.uuid4()
    shown = AgentSettings(agent_id=agent_id, state_dir=Path("/srv/chiffon")).as_json()
    assert list(shown) == list(FIELDS)
    assert (shown["agent_id"], shown["state_dir"], shown["enroll_token"]) == (
        str(agent_id),
        "/srv/chiffon",
        None,
    )


def test_secrets_can_come_from_files_named_in_the_environment(tmp_path: Path) -> None:
    token = write(tmp_path / "token", "from-the-file\n")
    broker = write(tmp_path / "amqp", "amqp://chiffon:pw@broker:5672/\n")
    loaded = load_settings(
        environ={
            "CHIFFON_ENROLL_TOKEN": "from-the-variable",
            "CHIFFON_ENROLL_TOKEN_FILE": str(token),
            "CHIFFON_AMQP_URL_FILE": str(broker),
        },
        home=tmp_path,
    )
    s = loaded.settings
    assert s.enroll_token is not None and s.enroll_token.get_secret_value() == "from-the-file"
    assert s.amqp_url == "amqp://chiffon:pw@broker:5672/"
    assert loaded.origins["enroll_token"] == "env CHIFFON_ENROLL_TOKEN_FILE"
    missing = str(tmp_path / "nope")
    with pytest.raises(SettingsError, match="CHIFFON_ENROLL_TOKEN_FILE\\): cannot read"):
        load_settings(environ={"CHIFFON_ENROLL_TOKEN_FILE": missing}, home=tmp_path)


def test_an_unknown_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.yml", "heartbeat_intervall_seconds: 5\n")
    with pytest.raises(SettingsError) as refused:
        load_settings(config=config, environ={})
    assert str(refused.value) == (
        f"bad setting heartbeat_intervall_seconds = 5 (from file {config}): unknown setting; "
        "did you mean heartbeat_interval_seconds?"
    )


@pytest.mark.parametrize(
    ("given", "policy"),
    [
        ("true", "always"),
        ("yes", "always"),
        ("false", "never"),
        ("when_idle", "when_idle"),
        ("ALWAYS", "always"),
        ("never", "never"),
    ],
)
def test_accept_jobs_is_a_policy_and_the_old_booleans_still_work(given: str, policy: str) -> None:
    settings = load_settings(environ={"CHIFFON_ACCEPT_JOBS": given}, home=Path("/nonexistent"))
    assert settings.settings.accept_jobs == policy


def test_a_bad_policy_or_idle_time_is_one_line_naming_it() -> None:
    with pytest.raises(
        SettingsError, match=r"accept_jobs = 'sometimes'.*never, when_idle or always"
    ):
        load_settings(environ={"CHIFFON_ACCEPT_JOBS": "sometimes"}, home=Path("/nonexistent"))
    with pytest.raises(SettingsError, match="idle_minutes"):
        load_settings(environ={"CHIFFON_IDLE_MINUTES": "-5"}, home=Path("/nonexistent"))


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ("reserve_gpus: [1]", ["1"]),  # docs/owner.md's example: YAML reads an int
        ("reserve_gpus: [0, GPU-5d1c0a44-aaaa]", ["0", "GPU-5d1c0a44-aaaa"]),
        ("reserve_gpus: ['1', 2]", ["1", "2"]),
        ("reserve_gpus: 1", ["1"]),
        ("reserve_gpus: 0, GPU-x", ["0", "GPU-x"]),
        ("reserve_gpus: []", []),
    ],
)
def test_gpus_the_owner_keeps_are_indexes_or_uuids_as_agent_yml_writes_them(
    tmp_path: Path, line: str, kept: list[str]
) -> None:
    config = write(tmp_path / "agent.yml", line + "\n")
    assert load_settings(config=config, environ={}).settings.reserve_gpus == kept
    from_env = load_settings(environ={"CHIFFON_RESERVE_GPUS": " 1, GPU-x"}, home=tmp_path)
    assert from_env.settings.reserve_gpus == ["1", "GPU-x"]


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("reserve_gpus: [-1]", "-1 is not a GPU index (they start at 0)"),
        ("reserve_gpus: [true]", "must be a list of GPU indexes (0, 1) or UUIDs"),
        ("reserve_gpus: [1.5]", "must be a list of GPU indexes (0, 1) or UUIDs"),
        ("reserve_gpus: ['']", "must be a list of GPU indexes (0, 1) or UUIDs"),
        ("reserve_gpus: {gpu: 1}", "must be a list of GPU indexes (0, 1) or UUIDs"),
    ],
)
def test_a_gpu_that_is_no_index_or_uuid_is_refused_in_one_line(
    tmp_path: Path, line: str, said: str
) -> None:
    config = write(tmp_path / "agent.yml", line + "\n")
    with pytest.raises(SettingsError) as err:
        load_settings(config=config, environ={})
    assert str(err.value).startswith("bad setting reserve_gpus = ")
    assert str(err.value).endswith(f"(from file {config}): {said}")


def test_the_agent_keeps_the_gpu_named_by_index_in_agent_yml(tmp_path: Path) -> None:
    """docs/owner.md's own example, `reserve_gpus: [1]`, in a real agent.yml: the agent
    exited with "must be a list of strings"; now it keeps GPU 1 and offers GPU 0."""
    from tests.fakes.nvidia_smi import gpu_row, install, path_with
    from tests.procs import run_cli

    install(tmp_path / "bin", rows=[gpu_row(0), gpu_row(1)])
    config = write(
        tmp_path / "agent.yml",
        "accept_jobs: always\nallow_root_jobs: true\nreserve_gpus: [1]\n",
    )
    env = {"PATH": path_with(tmp_path / "bin"), "HOME": str(tmp_path)}
    shown = run_cli("agent", "--config", str(config), "--print-config", env=env)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r'^reserve_gpus\s+\["1"\]\s+file ', shown.stdout, re.MULTILINE)
    table = run_cli("probe", "--config", str(config), env=env)
    assert table.returncode == 0, table.stderr
    decisions = [row.split("; ")[-1].strip() for row in table.stdout.splitlines() if "; " in row]
    assert decisions == ["jobs welcome", "no new jobs: the owner keeps this GPU"]
