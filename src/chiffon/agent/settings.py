"""Agent settings: defaults < YAML file < environment (`CHIFFON_*`) < command-line flags.

The layers are gathered explicitly (rather than by pydantic-settings' own sources) so that
every effective value knows where it came from: `chiffon agent --print-config` shows it,
and a bad value is reported with its origin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self
from uuid import UUID

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_STATE_DIR = Path.home() / ".chiffon"
SYSTEM_CONFIG = Path("/etc/chiffon/agent.yml")

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
}


class AgentSettings(BaseSettings):
    """Everything `chiffon agent` can be told; see examples/agent.yml for each default."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    heartbeat_interval_seconds: float = Field(15, gt=0, le=3600)
    heartbeat_timeout_seconds: float = Field(45, gt=0, le=86400)
    gpu_detection_timeout_seconds: float = Field(5, gt=0, le=120)
    agent_id: UUID | None = None
    agent_pool_name: str = Field("desktop_pool_1", min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1, max_length=255)
    transport: Literal["http", "amqp"] = "http"
    orchestrator_url: str = "http://127.0.0.1:8700"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    publish_timeout_seconds: float = Field(5, gt=0, le=120)
    state_dir: Path = DEFAULT_STATE_DIR
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    capabilities: list[str] = Field(default_factory=list, max_length=64)
    specializations: list[str] = Field(default_factory=list, max_length=64)
    # Presented once to get this agent's own secret (kept in state_dir/agent_secret, 0600).
    enroll_token: SecretStr | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` has already merged file, environment and flags in order.
        return (init_settings,)

    @field_validator("state_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> Self:
        if self.heartbeat_timeout_seconds <= self.heartbeat_interval_seconds:
            raise ValueError(
                f"heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds:g}) must be "
                f"greater than heartbeat_interval_seconds ({self.heartbeat_interval_seconds:g})"
            )
        return self


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


def _env_value(field: str, raw: str) -> Any:
    """Lists are comma separated, labels `key=value,key=value`; the rest pydantic parses."""
    if field in ("capabilities", "specializations"):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if field == "labels":
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


def env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        field: _env_value(field, environ[var]) for field, var in ENV_VARS.items() if var in environ
    }


def describe(exc: ValidationError, origins: Mapping[str, str]) -> str:
    first = exc.errors(include_url=False)[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    if not key:  # a check across fields, such as timeout > interval
        return f"bad settings: {first['msg'].removeprefix('Value error, ')}"
    shown = first.get("input")
    value = "" if isinstance(shown, dict) and key != "labels" else f" = {shown!r}"
    origin = origins.get(key, "file" if key not in AgentSettings.model_fields else "default")
    return f"bad setting {key}{value} (from {origin}): {first['msg']}"


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
        *((f"env {ENV_VARS[k]}", {k: v}) for k, v in env_layer(environ).items()),
        ("flag", {k: v for k, v in (flags or {}).items() if v is not None}),
    ]
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for origin, values in layers:
        for key, value in values.items():
            merged[key] = value
            origins[key] = origin
    try:
        settings = AgentSettings(**merged)
    except ValidationError as exc:
        raise SettingsError(describe(exc, origins)) from None
    for field in AgentSettings.model_fields:
        origins.setdefault(field, "default")
    return LoadedSettings(settings, origins, path)
