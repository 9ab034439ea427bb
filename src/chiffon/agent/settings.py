"""Agent settings: defaults < YAML file < environment (`CHIFFON_*`) < command-line flags.

The layers are gathered explicitly so that every effective value knows where it came from:
`chiffon agent --print-config` shows it, and a bad value is reported with its origin.

Plain dataclasses and hand-written checks rather than pydantic: importing pydantic costs the
agent about 13 MB of its 40 MB budget, for fifteen settings.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

import yaml

DEFAULT_STATE_DIR = Path.home() / ".chiffon"
SYSTEM_CONFIG = Path("/etc/chiffon/agent.yml")
MASK = "**********"
_MOST_ENTRIES = 64

# The seeds' environment variables, and the ones added since (one per setting).
ENV_VARS: dict[str, str] = {
    "heartbeat_interval_seconds": "CHIFFON_HEARTBEAT_INTERVAL",
    "heartbeat_timeout_seconds": "CHIFFON_HEARTBEAT_TIMEOUT",
    "gpu_detection_timeout_seconds": "CHIFFON_GPU_TIMEOUT",
    "agent_id": "CHIFFON_AGENT_ID",
    "agent_pool_name": "CHIFFON_POOL_NAME",
    "name": "CHIFFON_AGENT_NAME",
    "transport": "CHIFFON_TRANSPORT",
    "orchestrator_url": "CHIFFON_ORCHESTRATOR_URL",
    "amqp_url": "CHIFFON_AMQP_URL",
    "publish_timeout_seconds": "CHIFFON_PUBLISH_TIMEOUT",
    "state_dir": "CHIFFON_STATE_DIR",
    "labels": "CHIFFON_LABELS",
    "capabilities": "CHIFFON_CAPABILITIES",
    "specializations": "CHIFFON_SPECIALIZATIONS",
    "enroll_token": "CHIFFON_ENROLL_TOKEN",
    "accept_jobs": "CHIFFON_ACCEPT_JOBS",
    "idle_minutes": "CHIFFON_IDLE_MINUTES",
    "allow_root_jobs": "CHIFFON_ALLOW_ROOT_JOBS",
    "job_grace_seconds": "CHIFFON_JOB_GRACE",
    "jobs_dir": "CHIFFON_JOBS_DIR",
    "schedule": "CHIFFON_SCHEDULE",
    "reserve_gpus": "CHIFFON_RESERVE_GPUS",
    "exclusive_apps": "CHIFFON_EXCLUSIVE_APPS",
    "on_owner_return": "CHIFFON_ON_OWNER_RETURN",
    "report_process_names": "CHIFFON_REPORT_PROCESS_NAMES",
    "cpu_jobs_on_return": "CHIFFON_CPU_JOBS_ON_RETURN",
    "checkpoint_signal": "CHIFFON_CHECKPOINT_SIGNAL",
    "vacate_grace_seconds": "CHIFFON_VACATE_GRACE",
    "vacate_kill_seconds": "CHIFFON_VACATE_KILL_GRACE",
}


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


# Each check takes a value as it arrives (text from the environment and flags, typed values
# from YAML) and returns it converted, or raises ValueError with the reason in plain words.
Check = Callable[[Any], Any]


def _seconds(most: float) -> Check:
    def check(value: Any) -> float:
        # bool is an int to Python, but `interval: yes` in YAML is a mistake, not 1 second.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("must be a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
        if not 0 < number <= most:  # also refuses nan
            raise ValueError(f"must be greater than 0 and at most {most:g}")
        return number

    return check


def _text(longest: int | None = None) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if longest is not None and not 1 <= len(value) <= longest:
            raise ValueError(f"must be 1 to {longest} characters")
        return value

    return check


def _url(*schemes: str) -> Check:
    def check(value: Any) -> str:
        text: str = _text()(value)
        try:
            parts = urlsplit(text)
            usable = parts.scheme in schemes and bool(parts.hostname)
            _ = parts.port  # ValueError when the port is not a number
        except ValueError:
            usable = False
        if not usable:
            raise ValueError("must be a URL starting " + " or ".join(f"{s}://" for s in schemes))
        return text

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("must be " + " or ".join(repr(c) for c in choices))
        return str(value)

    return check


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be true or false")


POLICIES = ("never", "when_idle", "always")


def _policy(value: Any) -> str:
    """never | when_idle | always; true and false (a flag, the old boolean) are always and
    never."""
    if isinstance(value, str) and value.strip().lower() in POLICIES:
        return value.strip().lower()
    try:
        return "always" if _bool(value) else "never"
    except ValueError:
        raise ValueError("must be never, when_idle or always (true or false)") from None


def _schedule(value: Any) -> str:
    """Checked here, kept as the owner wrote it (agent.owner.parse_schedule reads it)."""
    from chiffon.agent.owner import ScheduleError, parse_schedule

    if isinstance(value, list | tuple):
        value = "; ".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ValueError("must be windows like 'mon-fri 19:00-08:00; sat-sun all day'")
    try:
        return parse_schedule(value).text
    except ScheduleError as exc:
        raise ValueError(str(exc)) from None


def _signal_name(value: Any) -> str:
    """A signal to send a job (SIGUSR1, USR1, SIGINT...), by name."""
    import signal

    name = str(value).strip().upper() if isinstance(value, str) else ""
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name in ("SIGKILL", "SIGSTOP") or name not in signal.Signals.__members__:
        raise ValueError("must name a signal a job can catch, such as SIGUSR1 or SIGINT")
    return name


def _names(value: Any) -> list[str]:
    """A list, or comma-separated text (the environment's way)."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    return _strings(value)


def _lower_names(value: Any) -> list[str]:
    return [name.lower() for name in _names(value)]


def _gpus(value: Any) -> list[str]:
    """GPUs by index or UUID: `[1]` or `[0, GPU-5d1c...]` in YAML (an index is a number
    there), `0,GPU-5d1c...` in the environment. Kept as text, an index as its digits,
    which is how `agent.owner` compares them."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value]  # `reserve_gpus: 1`: one GPU
    wrong = "must be a list of GPU indexes (0, 1) or UUIDs"
    if not isinstance(value, list | tuple):
        raise ValueError(wrong)
    gpus = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str) or not str(item).strip():
            raise ValueError(wrong)
        if isinstance(item, int) and item < 0:
            raise ValueError(f"{item} is not a GPU index (they start at 0)")
        gpus.append(str(item).strip())
    if len(gpus) > _MOST_ENTRIES:
        raise ValueError(f"must be at most {_MOST_ENTRIES} entries")
    return gpus


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


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    if len(value) > _MOST_ENTRIES:
        raise ValueError(f"must be at most {_MOST_ENTRIES} entries")
    return list(value)


def _labels(value: Any) -> dict[str, str]:
    # YAML's `rack: 12` gives an int: refused rather than turned into "12", as for any other
    # string setting, so that what is stored is exactly what was written.
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("must map strings to strings")
    if len(value) > _MOST_ENTRIES:
        raise ValueError(f"must be at most {_MOST_ENTRIES} entries")
    return dict(value)


def _secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return Secret(value)


def _optional(check: Check) -> Check:
    """None (YAML `null`, as the example file writes it) means unset."""
    return lambda value: None if value is None else check(value)


def _check(check: Check) -> dict[str, Check]:
    return {"check": check}


class _Refused(ValueError):
    """A value AgentSettings refused; `load_settings` adds where it came from.

    `key` is None when the values are each fine but disagree with one another.
    """

    def __init__(self, key: str | None, value: object, reason: str) -> None:
        self.key, self.reason = key, reason
        self.shown = f"'{MASK}'" if key == "enroll_token" else repr(value)
        super().__init__(reason if key is None else f"{key} = {self.shown}: {reason}")

    def describe(self, origins: Mapping[str, str]) -> str:
        if self.key is None:
            return f"bad settings: {self.reason}"
        origin = origins.get(self.key, "default")
        return f"bad setting {self.key} = {self.shown} (from {origin}): {self.reason}"


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Everything `chiffon agent` can be told; see examples/agent.yml for each default.

    Values may arrive as text (environment, flags) or typed (YAML); each field's check
    converts and bounds it, so a built AgentSettings holds only the types declared here.
    """

    heartbeat_interval_seconds: float = field(default=15.0, metadata=_check(_seconds(3600)))
    # Unset: three intervals (45 s at the default), so a longer interval alone is valid.
    heartbeat_timeout_seconds: float | None = field(
        default=None, metadata=_check(_optional(_seconds(86400)))
    )
    gpu_detection_timeout_seconds: float = field(default=5.0, metadata=_check(_seconds(120)))
    agent_id: UUID | None = field(default=None, metadata=_check(_optional(_uuid)))
    agent_pool_name: str = field(default="desktop_pool_1", metadata=_check(_text(128)))
    name: str | None = field(default=None, metadata=_check(_optional(_text(255))))
    transport: Literal["http", "amqp"] = field(
        default="http", metadata=_check(_one_of("http", "amqp"))
    )
    orchestrator_url: str = field(
        default="http://127.0.0.1:8700", metadata=_check(_url("http", "https"))
    )
    # Checked as a URL only with transport amqp (below): an agent over HTTP ignores it.
    amqp_url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", metadata=_check(_text()))
    publish_timeout_seconds: float = field(default=5.0, metadata=_check(_seconds(120)))
    state_dir: Path = field(default=DEFAULT_STATE_DIR, metadata=_check(_path))
    labels: dict[str, str] = field(default_factory=dict, metadata=_check(_labels))
    capabilities: list[str] = field(default_factory=list, metadata=_check(_strings))
    specializations: list[str] = field(default_factory=list, metadata=_check(_strings))
    # Presented once to get this agent's own secret (kept in state_dir/agent_secret, 0600).
    enroll_token: Secret | None = field(default=None, metadata=_check(_optional(_secret)))
    # Jobs (docs/jobs.md): this desktop runs them only when its owner says so: never,
    # when_idle (the owner away `idle_minutes`; docs/owner.md) or always.
    accept_jobs: str = field(default="never", metadata=_check(_policy))
    idle_minutes: float = field(default=15.0, metadata=_check(_seconds(1440)))
    # An agent running as root refuses jobs unless this is set too.
    allow_root_jobs: bool = field(default=False, metadata=_check(_bool))
    # Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
    job_grace_seconds: float = field(default=10.0, metadata=_check(_seconds(3600)))
    # Each attempt's directory (its log, its state, its work dir). Unset: <state_dir>/jobs.
    jobs_dir: Path | None = field(default=None, metadata=_check(_optional(_path)))
    # The owner's policy (docs/owner.md): when jobs may run (local time), GPUs the owner
    # keeps, programs that clear Chiffon off the GPU they use, and what the owner's return
    # clears (every GPU, or only those their programs use).
    schedule: str | None = field(default=None, metadata=_check(_optional(_schedule)))
    reserve_gpus: list[str] = field(default_factory=list, metadata=_check(_gpus))
    exclusive_apps: list[str] = field(default_factory=list, metadata=_check(_lower_names))
    on_owner_return: str = field(
        default="vacate_all", metadata=_check(_one_of("vacate_all", "vacate_used_gpus"))
    )
    # A CPU-only job when the owner comes back (or the schedule ends): vacated, or stopped
    # (SIGSTOP) and continued after. Never for GPU jobs: a stopped process keeps its VRAM.
    cpu_jobs_on_return: str = field(default="vacate", metadata=_check(_one_of("vacate", "suspend")))
    # Names of the programs on the GPUs, in the heartbeat (counts and VRAM always are).
    report_process_names: bool = field(default=False, metadata=_check(_bool))
    # The vacate ladder: this signal (the job checkpoints), SIGTERM after
    # vacate_grace_seconds, SIGKILL after vacate_kill_seconds more.
    checkpoint_signal: str = field(default="SIGUSR1", metadata=_check(_signal_name))
    vacate_grace_seconds: float = field(default=30.0, metadata=_check(_seconds(3600)))
    vacate_kill_seconds: float = field(default=3.0, metadata=_check(_seconds(600)))

    def __post_init__(self) -> None:
        for spec in fields(self):
            raw = getattr(self, spec.name)
            try:
                value = spec.metadata["check"](raw)
            except ValueError as exc:
                raise _Refused(spec.name, raw, str(exc)) from None
            object.__setattr__(self, spec.name, value)  # frozen: the documented way round
        if self.transport == "amqp":
            try:
                _url("amqp", "amqps")(self.amqp_url)
            except ValueError as exc:
                raise _Refused("amqp_url", self.amqp_url, str(exc)) from None
        if self.heartbeat_timeout_seconds is None:
            timeout = 3 * self.heartbeat_interval_seconds
            object.__setattr__(self, "heartbeat_timeout_seconds", timeout)
        elif self.heartbeat_timeout_seconds <= self.heartbeat_interval_seconds:
            raise _Refused(
                None,
                None,
                f"heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds:g}) must be "
                f"greater than heartbeat_interval_seconds ({self.heartbeat_interval_seconds:g})",
            )

    @property
    def effective_jobs_dir(self) -> Path:
        return self.jobs_dir or self.state_dir / "jobs"

    def as_json(self) -> dict[str, Any]:
        """Every setting as JSON can hold it, in field order; the token masked."""
        return {name: _jsonable(getattr(self, name)) for name in FIELDS}


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, UUID | Path | Secret) else value


FIELDS: tuple[str, ...] = tuple(spec.name for spec in fields(AgentSettings))


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
    layers: list[tuple[str, dict[str, Any]]] = [
        (f"file {path}", read_config_file(path) if path else {}),
        *((origin, {k: v}) for k, (origin, v) in env_layer(environ).items()),
        ("flag", {k: v for k, v in (flags or {}).items() if v is not None}),
    ]
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, values in layers:
        for key, value in values.items():
            merged[key] = value
            origins[key] = origin
    for key, value in merged.items():
        if key not in FIELDS:  # a typo in the file, most likely
            origin = origins[key]
            near = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise SettingsError(
                f"bad setting {key} = {value!r} (from {origin}): unknown setting{hint}"
            )
    try:
        settings = AgentSettings(**merged)
    except _Refused as exc:
        raise SettingsError(exc.describe(origins)) from None
    for name in FIELDS:
        origins.setdefault(name, "default")
    return LoadedSettings(settings, origins, path)
