"""Agent settings: defaults < YAML file < environment (`CHIFFON_*`) < command-line flags.

The layers are gathered explicitly so that every effective value knows where it came from:
`chiffon agent --print-config` shows it, and a bad value is reported with its origin.

Each setting is declared once, with its check, variable and help (`agent.declare`); plain
dataclasses and hand-written checks rather than pydantic: importing pydantic costs the agent
about 13 MB of its 40 MB budget.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import yaml

from chiffon.agent.declare import (
    MASK,
    MOST_ENTRIES,
    Declared,
    Refused,
    boolean,
    env_vars,
    one_of,
    optional,
    positive,
    seconds,
    setting,
    strings,
    text,
    url,
)
from chiffon.agent.owner import OwnerRules

DEFAULT_STATE_DIR = Path.home() / ".chiffon"
SYSTEM_CONFIG = Path("/etc/chiffon/agent.yml")

# Secrets may come from a file named in the environment instead (systemd's LoadCredential,
# a Docker or Kubernetes secret): a value in argv is visible to every local user in `ps`
# for the agent's whole life. The file wins over the plain variable.
FILE_ENV_VARS: dict[str, str] = {
    "enroll_token": "CHIFFON_ENROLL_TOKEN_FILE",
    "amqp_url": "CHIFFON_AMQP_URL_FILE",
}


class Secret:
    """A string that stays out of reprs, logs and `--print-config`; read it on purpose."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _signal_name(value: Any) -> str:
    """A signal to send a job (SIGUSR1, USR1, SIGINT...), by name."""
    import signal

    name = str(value).strip().upper() if isinstance(value, str) else ""
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name in ("SIGKILL", "SIGSTOP") or name not in signal.Signals.__members__:
        raise ValueError("must name a signal a job can catch, such as SIGUSR1 or SIGINT")
    return name


def _uuid(value: Any) -> UUID:
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise ValueError("must be a UUID")


def _path(value: Any) -> Path:
    if not isinstance(value, str | Path):
        raise ValueError("must be a path")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~someone, where no such user exists
        raise ValueError("names the home of an unknown user") from None


def _labels(value: Any) -> dict[str, str]:
    # YAML's `rack: 12` gives an int: refused rather than turned into "12", as for any other
    # string setting, so that what is stored is exactly what was written.
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("must map strings to strings")
    if len(value) > MOST_ENTRIES:
        raise ValueError(f"must be at most {MOST_ENTRIES} entries")
    return dict(value)


def _secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return Secret(value)


@dataclass(frozen=True, kw_only=True)
class AgentBasics(Declared):
    """Who the agent is, where it reports and how often (the first settings shown)."""

    heartbeat_interval_seconds: float = setting(
        15.0, seconds(3600), env="CHIFFON_HEARTBEAT_INTERVAL", help="Seconds between heartbeats."
    )
    heartbeat_timeout_seconds: float | None = setting(
        None, optional(seconds(86400)), env="CHIFFON_HEARTBEAT_TIMEOUT",
        help="Unset: three intervals (45 s at the default), so a longer interval alone is "
        "valid.",
    )  # fmt: skip
    gpu_detection_timeout_seconds: float = setting(
        5.0, seconds(120), env="CHIFFON_GPU_TIMEOUT", help="Seconds each GPU backend may take."
    )
    agent_id: UUID | None = setting(  # noqa: RUF009 (a field: declare.setting)
        None, optional(_uuid), env="CHIFFON_AGENT_ID",
        help="Unset: kept in the state directory (made at the first start).",
    )  # fmt: skip
    agent_pool_name: str = setting(
        "desktop_pool_1", text(128), env="CHIFFON_POOL_NAME", help="Pool name."
    )
    name: str | None = setting(
        None, optional(text(255)), env="CHIFFON_AGENT_NAME", help="Shown name."
    )
    transport: Literal["http", "amqp"] = setting(
        "http", one_of("http", "amqp"), env="CHIFFON_TRANSPORT", help="http or amqp."
    )
    orchestrator_url: str = setting(
        "http://127.0.0.1:8700", url("http", "https"), env="CHIFFON_ORCHESTRATOR_URL",
        help="The orchestrator's API (enrollment, reports; heartbeats with transport http).",
    )  # fmt: skip
    # Checked as a URL only with transport amqp (below): an agent over HTTP ignores it.
    amqp_url: str = setting(
        "amqp://guest:guest@127.0.0.1:5672/", text(), env="CHIFFON_AMQP_URL",
        help="For transport amqp; or CHIFFON_AMQP_URL_FILE.",
    )  # fmt: skip
    publish_timeout_seconds: float = setting(
        5.0, seconds(120), env="CHIFFON_PUBLISH_TIMEOUT", help="Seconds a heartbeat may take."
    )
    state_dir: Path = setting(  # noqa: RUF009 (a field: declare.setting)
        DEFAULT_STATE_DIR, _path, env="CHIFFON_STATE_DIR",
        help="Where the agent id and secret are kept.",
    )  # fmt: skip
    labels: dict[str, str] = setting(  # noqa: RUF009 (a field: declare.setting)
        factory=dict, check=_labels, env="CHIFFON_LABELS", help="key=value,key=value."
    )
    capabilities: list[str] = setting(  # noqa: RUF009 (a field: declare.setting)
        factory=list, check=strings, env="CHIFFON_CAPABILITIES", help="Comma separated."
    )
    specializations: list[str] = setting(  # noqa: RUF009 (a field: declare.setting)
        factory=list, check=strings, env="CHIFFON_SPECIALIZATIONS", help="Comma separated."
    )
    enroll_token: Secret | None = setting(  # noqa: RUF009 (a field: declare.setting)
        None, optional(_secret), env="CHIFFON_ENROLL_TOKEN", secret=True,
        help="Presented once to get this agent's own secret (kept in state_dir/agent_secret, "
        "0600); or CHIFFON_ENROLL_TOKEN_FILE.",
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AgentSettings(OwnerRules, AgentBasics):
    """Everything `chiffon agent` can be told; see examples/agent.yml for each default.

    Each setting is declared once (`agent.declare.setting`): here, in `AgentBasics`, or,
    for the owner's rules, in `agent.owner.OwnerRules`. Values may arrive as text
    (environment, flags) or typed (YAML); each field's check converts and bounds it, so a
    built AgentSettings holds only the types declared here.
    """

    allow_root_jobs: bool = setting(
        False, boolean, env="CHIFFON_ALLOW_ROOT_JOBS",
        help="An agent running as root refuses jobs unless this is set too.",
    )  # fmt: skip
    job_grace_seconds: float = setting(
        10.0, seconds(3600), env="CHIFFON_JOB_GRACE",
        help="Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.",
    )  # fmt: skip
    jobs_dir: Path | None = setting(  # noqa: RUF009 (a field: declare.setting)
        None, optional(_path), env="CHIFFON_JOBS_DIR",
        help="Each attempt's directory (its log, its state, its work dir). Unset: "
        "<state_dir>/jobs.",
    )  # fmt: skip
    cache_dir: Path | None = setting(  # noqa: RUF009 (a field: declare.setting)
        None, optional(_path), env="CHIFFON_CACHE_DIR",
        help="Where the files of jobs (their snapshots and checkpoints, by hash) are kept "
        "between attempts; hidden from jobs. Unset: beside jobs_dir (<jobs_dir>/../cache).",
    )  # fmt: skip
    cache_max_gb: float = setting(
        20.0, positive(1 << 20), env="CHIFFON_CACHE_MAX_GB",
        help="The cache's bound, GB; past it the least recently used files go first.",
    )  # fmt: skip
    # The vacate ladder: this signal (the job checkpoints), SIGTERM after
    # vacate_grace_seconds, SIGKILL after vacate_kill_seconds more.
    checkpoint_signal: str = setting(
        "SIGUSR1", _signal_name, env="CHIFFON_CHECKPOINT_SIGNAL",
        help="The signal a vacated job gets first, to checkpoint.",
    )  # fmt: skip
    vacate_grace_seconds: float = setting(
        30.0, seconds(3600), env="CHIFFON_VACATE_GRACE", help="Checkpoint signal to SIGTERM, s."
    )
    vacate_kill_seconds: float = setting(
        3.0, seconds(600), env="CHIFFON_VACATE_KILL_GRACE", help="SIGTERM to SIGKILL, s."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transport == "amqp":
            try:
                url("amqp", "amqps")(self.amqp_url)
            except ValueError as exc:
                raise Refused("amqp_url", self.amqp_url, str(exc)) from None
        if self.heartbeat_timeout_seconds is None:
            timeout = 3 * self.heartbeat_interval_seconds
            object.__setattr__(self, "heartbeat_timeout_seconds", timeout)
        elif self.heartbeat_timeout_seconds <= self.heartbeat_interval_seconds:
            raise Refused(
                None,
                None,
                f"heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds:g}) must be "
                f"greater than heartbeat_interval_seconds ({self.heartbeat_interval_seconds:g})",
            )

    @property
    def effective_jobs_dir(self) -> Path:
        return self.jobs_dir or self.state_dir / "jobs"

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.effective_jobs_dir.parent / "cache"

    def as_json(self) -> dict[str, Any]:
        """Every setting as JSON can hold it, in field order; the token masked."""
        return {name: _jsonable(getattr(self, name)) for name in FIELDS}


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, UUID | Path | Secret) else value


FIELDS: tuple[str, ...] = tuple(spec.name for spec in fields(AgentSettings))
# Each setting's environment variable, as declared with it.
ENV_VARS: dict[str, str] = env_vars(AgentSettings)


class SettingsError(ValueError):
    """One line naming the key, the bad value and where it came from."""


@dataclass(frozen=True)
class LoadedSettings:
    settings: AgentSettings
    origins: dict[str, str]  # field -> "default" | "file PATH" | "env VAR" | "flag"
    config_file: Path | None


def find_config_file(explicit: Path | None, home: Path | None = None) -> Path | None:
    """--config PATH, else ~/.chiffon/agent.yml, else /etc/chiffon/agent.yml, else none."""
    if explicit is not None:
        if not explicit.is_file():
            raise SettingsError(f"config file {explicit} does not exist")
        return explicit
    user = (home or Path.home()) / ".chiffon" / "agent.yml"
    for candidate in (user, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SettingsError(f"config file {path}{line} is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of setting: value")
    return data


def _env_value(key: str, raw: str) -> Any:
    """Lists are comma separated, labels `key=value,key=value`; AgentSettings parses the rest."""
    if key in ("capabilities", "specializations"):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if key == "labels":
        return parse_labels([item for item in raw.split(",") if item.strip()], "CHIFFON_LABELS")
    return raw


def parse_labels(items: list[str], origin: str) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"bad setting labels = {item!r} (from {origin}): want key=value")
        labels[key.strip()] = value.strip()
    return labels


def env_layer(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """Each setting the environment gives: (origin, value)."""
    layer = {
        key: (f"env {var}", _env_value(key, environ[var]))
        for key, var in ENV_VARS.items()
        if var in environ
    }
    for key, var in FILE_ENV_VARS.items():
        if var in environ:
            layer[key] = (f"env {var}", _read_secret_file(key, var, environ[var]))
    return layer


def _read_secret_file(key: str, var: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(
            f"bad setting {key} (from env {var}): cannot read {path}: {exc.__class__.__name__}"
        ) from None


def load_settings(
    *,
    config: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> LoadedSettings:
    """The effective settings and each value's origin; `SettingsError` when one is bad."""
    environ = os.environ if environ is None else environ
    path = find_config_file(config, home)
    merged, origins = _merged(_layers(path, environ, flags or {}))
    for key, value in merged.items():
        if key not in FIELDS:  # a typo in the file, most likely
            raise SettingsError(_unknown(key, value, origins[key]))
    try:
        settings = AgentSettings(**merged)
    except Refused as exc:
        raise SettingsError(exc.describe(origins)) from None
    for name in FIELDS:
        origins.setdefault(name, "default")
    return LoadedSettings(settings, origins, path)


def _layers(
    path: Path | None, environ: Mapping[str, str], flags: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """(origin, values) from the lowest layer to the highest: file, environment, flags."""
    return [
        (f"file {path}", read_config_file(path) if path else {}),
        *((origin, {k: v}) for k, (origin, v) in env_layer(environ).items()),
        ("flag", {k: v for k, v in flags.items() if v is not None}),
    ]


def _merged(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The layers, each over the one before: every value, and where it came from."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, values in layers:
        for key, value in values.items():
            merged[key] = value
            origins[key] = origin
    return merged, origins


def _unknown(key: str, value: object, origin: str) -> str:
    near = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"bad setting {key} = {value!r} (from {origin}): unknown setting{hint}"
