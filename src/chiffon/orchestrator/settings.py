"""Orchestrator settings: defaults < environment (`CHIFFON_*`) < command-line flags."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chiffon.orchestrator.history import Tier
from chiffon.persistence.db import default_database_url
from chiffon.schemas.heartbeat import MAX_MESSAGE_BYTES


def _env(name: str, env: str) -> AliasChoices:
    """Accept the seeds' field name and its `CHIFFON_<env>` variable."""
    return AliasChoices(name, f"CHIFFON_{env}")


def default_data_dir() -> Path:
    return Path.home() / ".chiffon"


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHIFFON_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        None, description="sqlite:///path or postgresql://...; default: SQLite in data_dir"
    )
    host: str = "127.0.0.1"
    port: int = Field(8700, ge=1, le=65535)
    amqp_url: str | None = None
    # Trust (docs/security.md). The CLI fills what is unset from files in data_dir.
    api_token: SecretStr | None = Field(
        None, description="Bearer token every /api/v1 read and admin route requires"
    )
    read_token: SecretStr | None = Field(
        None, description="Bearer token that reads every /api/v1 route and changes nothing"
    )
    enroll_token: SecretStr | None = Field(
        None, description="What a new agent presents once to get its own secret"
    )
    auto_approve: bool = Field(
        False,
        description="Agents enrolled with the enrollment token take jobs at once, without an "
        "admin's `chiffon agents approve` (labs where everyone holding the token is trusted)",
    )
    secret_key: SecretStr | None = Field(
        None, description="Server key agent secrets are derived from; unset: ephemeral"
    )
    metrics_require_token: bool = Field(False, description="Put /metrics behind the API token")
    # Agents (by name) with series of their own on /metrics; 0: no per-agent series at all.
    metrics_fleet_max_agents: int = Field(10_000, ge=0, le=1_000_000)
    # A signed message whose sent_at is further than this from our clock is refused.
    max_clock_skew_seconds: float = Field(300, gt=0, le=86400)
    credential_cache_seconds: float = Field(10, ge=0, le=3600)
    amqp_exchange: str = Field("chiffon", min_length=1, max_length=255)
    amqp_queue: str = Field("chiffon.orchestrator.agent-events", min_length=1, max_length=255)
    amqp_rejected_queue: str = Field("chiffon.rejected", min_length=1, max_length=255)
    # Unacked deliveries in hand: several ingest batches (ingest_batch_size), so the next
    # ones are validated while one commits (docs/performance.md).
    amqp_prefetch: int = Field(2000, ge=1, le=65_535)
    amqp_queue_max_length: int = Field(100_000, ge=1)
    amqp_rejected_max_length: int = Field(10_000, ge=1)
    amqp_rejected_max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # Seeds' names; defaults give a killed agent offline <= timeout + sweep = 50 s (< 60 s).
    heartbeat_interval_seconds: float = Field(
        15,
        gt=0,
        le=3600,
        validation_alias=_env("heartbeat_interval_seconds", "HEARTBEAT_INTERVAL"),
    )
    heartbeat_timeout_seconds: float = Field(
        45,
        gt=0,
        le=86400,
        validation_alias=_env("heartbeat_timeout_seconds", "HEARTBEAT_TIMEOUT"),
    )
    sweep_interval_seconds: float = Field(
        5, gt=0, le=3600, validation_alias=_env("sweep_interval_seconds", "SWEEP_INTERVAL")
    )
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1024, le=16 * 1024 * 1024)
    ingest_batch_size: int = Field(500, ge=1, le=10_000)
    ingest_batch_delay_ms: float = Field(20, ge=0, le=10_000)
    # Metrics history (CHIFFON_HISTORY_*): how long each tier is kept; 0 turns a tier off.
    history_enabled: bool = True
    history_raw_retention_seconds: float = Field(3600, ge=0, le=366 * 86400)
    history_1m_retention_seconds: float = Field(86400, ge=0, le=366 * 86400)
    history_15m_retention_seconds: float = Field(30 * 86400, ge=0, le=5 * 366 * 86400)
    history_prune_interval_seconds: float = Field(300, gt=0, le=86400)

    # The longest an agent's order poll or a log follower is held open (a proxy in front
    # may close idle requests sooner): each asks again at once.
    long_poll_max_seconds: float = Field(30, gt=0, le=30)
    # Log follows (`GET /jobs/{id}/logs` with `wait`) one API token may hold open at once;
    # past it, 429 with Retry-After. A waiting follower asks the database nothing, but
    # each chunk of its job wakes it to read: this bounds what one token's readers cost.
    long_polls_per_token: int = Field(64, ge=1, le=100_000)
    # Jobs' output: the tail kept per attempt, and for how long after the job ended.
    job_log_tail_bytes: int = Field(1024 * 1024, ge=4096, le=1024**3)
    job_log_retention_seconds: float = Field(7 * 86400, ge=0, le=5 * 366 * 86400)
    # A job a desktop's owner took back is not placed on that desktop again for this long
    # (CHIFFON_PREEMPT_AVOID_SECONDS; docs/owner.md).
    preempt_avoid_seconds: float = Field(1800, ge=0, le=7 * 86400)
    # Whether this process places queued jobs (CHIFFON_DISPATCH). Off: it serves the API
    # and ingest only, beside orchestrators on the same database that place
    # (docs/jobs.md, "Orchestrators that do not place").
    dispatch: bool = True
    # Jobs' files (docs/jobs.md, "Your code and data"): the blobs' folder (unset: the
    # database itself with PostgreSQL, `<data_dir>/blobs` with SQLite), the store's cap
    # (uploads past it are refused, nothing is deleted for them), and how long a blob no
    # live job refers to is kept.
    store_dir: Path | None = None
    store_max_gb: float = Field(100.0, gt=0, le=1_000_000)
    store_retention_seconds: float = Field(7 * 86400, ge=0, le=5 * 366 * 86400)

    @field_validator("api_token", "read_token", "enroll_token", "secret_key", mode="after")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        """`CHIFFON_API_TOKEN=` means no token, never the empty token."""
        return value if value is not None and value.get_secret_value().strip() else None

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> Self:
        if self.heartbeat_timeout_seconds <= self.heartbeat_interval_seconds:
            raise ValueError(
                f"heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds}) must be greater "
                f"than heartbeat_interval_seconds ({self.heartbeat_interval_seconds})"
            )
        return self

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Each setting's `CHIFFON_*` variable (the seeds' short names where they differ)."""
        names = {}
        for name, spec in cls.model_fields.items():
            alias = spec.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else []
            env = [c for c in choices if isinstance(c, str) and c.startswith("CHIFFON_")]
            names[name] = env[0] if env else f"CHIFFON_{name.upper()}"
        return names

    @property
    def history_tiers(self) -> list[Tier]:
        """The history tiers to record, finest first (none when history is off)."""
        if not self.history_enabled:
            return []
        tiers = [
            # Full resolution: one point per heartbeat interval, whatever the ingest rate.
            Tier(0, self.history_raw_retention_seconds, self.heartbeat_interval_seconds),
            Tier(60, self.history_1m_retention_seconds),
            Tier(900, self.history_15m_retention_seconds),
        ]
        return [tier for tier in tiers if tier.retention_seconds > 0]

    @property
    def is_loopback(self) -> bool:
        """Whether the API listens only on this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def blob_folder(self, dialect: str) -> Path | None:
        """Where the file store keeps its bytes (None: in the database)."""
        if self.store_dir is not None:
            return self.store_dir
        return None if dialect == "postgresql" else self.data_dir / "blobs"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or default_database_url(self.data_dir)
