"""SQLAlchemy tables: the agent registry and its status history.

The capacity query filters on typed columns (one per `schemas.metrics.REGISTRY` metric:
`cpu_cores_available`, `memory_available_gb`, `gpu_vram_available_gb`...) that ingest keeps
in step with the `resource_metrics` JSON, so "who has 8 GB free" is plain SQL, not a scan of
JSON in Python. Those columns, and the history's, are made from the metric declarations.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    Uuid,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from chiffon.schemas.dispatch import LOG_PATH_MAX_CHARS
from chiffon.schemas.metrics import HISTORY, REGISTRY, Metric


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both engines.

    SQLite has no timezone type; values are stored as naive UTC text (which sorts and
    compares correctly) and come back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JsonDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JsonDocument,
    }


_SQL_TYPES: dict[type, TypeEngine[Any]] = {int: Integer(), float: Float(), str: String(16)}


def _metric_columns(metrics: tuple[Metric, ...], name: str) -> Any:
    """A declarative mixin with one typed column per metric (NULL: unknown)."""
    columns = {
        m.name: mapped_column(_SQL_TYPES[m.kind], nullable=m.default is None, default=m.default)
        for m in metrics
    }
    return type(name, (), columns)


# Typed as Any: their columns are made from the declarations, so mypy cannot list them.
_RegistryMetrics: Any = _metric_columns(REGISTRY, "_RegistryMetrics")
_HistoryMetrics: Any = _metric_columns(HISTORY, "_HistoryMetrics")


class AgentRow(_RegistryMetrics, Base):  # type: ignore[misc]
    __tablename__ = "agent_registry"
    __table_args__ = (
        Index("ix_agent_registry_status_type", "status", "agent_type"),
        Index("ix_agent_registry_pool", "pool_name"),
        # The seeds' GIN index; PostgreSQL can only build it on JSONB, SQLite has no GIN.
        # No capacity query needs it (they filter typed columns); it serves ad-hoc JSON
        # queries by operators, and costs ingest ~5% (docs/performance.md).
        Index(
            "idx_agent_registry_resource_metrics",
            "resource_metrics",
            postgresql_using="gin",
        ).ddl_if(dialect="postgresql"),
        # The capacity query's order over online agents, so "the best 10" reads 10 index
        # entries instead of sorting the table (PostgreSQL; migration 0004).
        Index(
            "ix_agent_registry_online_capacity",
            text("gpu_vram_available_gb DESC NULLS LAST"),
            text("cpu_cores_available DESC NULLS LAST"),
            text("memory_available_gb DESC NULLS LAST"),
            text("agent_id"),
            postgresql_where=text("status = 'online'"),
        ).ddl_if(dialect="postgresql"),
        # Room on each page so the every-15-s update stays a HOT update on PostgreSQL.
        {"postgresql_with": {"fillfactor": 70}},
    )

    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    agent_type: Mapped[str] = mapped_column(String(64), default="desktop")
    pool_name: Mapped[str] = mapped_column(String(128), default="desktop_pool_1")
    agent_version: Mapped[str | None] = mapped_column(String(64))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    capabilities: Mapped[list[str]] = mapped_column(JsonDocument, default=list)
    specializations: Mapped[list[str]] = mapped_column(JsonDocument, default=list)
    status: Mapped[str] = mapped_column(String(16))
    # Its owner lets it run jobs (heartbeat's `accepts_jobs`); only such agents get any.
    accepts_jobs: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_heartbeat_at: Mapped[datetime | None]
    resource_metrics: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")

    # The typed copies of the numbers (schemas.metrics.REGISTRY) come from _RegistryMetrics.

    # Why it takes no new jobs whatever it reports: 'pending' (enrolled, not yet approved
    # by an admin) or 'suspect' (its secret seems to be used from two places), with the
    # reason. A copy of its credential's state for placement (orchestrator.trust).
    hold: Mapped[str | None] = mapped_column(String(16))
    hold_reason: Mapped[str | None] = mapped_column(String(255))

    # Ordering of the agent's own messages (see schemas.heartbeat.AgentMessage).
    last_boot_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # The run before the last one: a message from it after the last one's began means two
    # processes beat with one secret (orchestrator.ingest).
    prev_boot_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_sent_at: Mapped[datetime | None]

    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class AgentEventRow(Base):
    """One status change. Kept after an agent is deregistered: it is history."""

    __tablename__ = "agent_events"
    __table_args__ = (Index("ix_agent_events_agent_at", "agent_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    at: Mapped[datetime]
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))


class AgentMetricsRow(_HistoryMetrics, Base):  # type: ignore[misc]
    """One point of an agent's history: its registry numbers when a time bucket began.

    `resolution_seconds` names the tier: 0 keeps one point per heartbeat interval, 60 and
    900 one per minute and per quarter hour. The key lets the history recorder copy the
    whole online fleet into a bucket with one INSERT ... SELECT ... ON CONFLICT DO NOTHING,
    from as many orchestrators as share the database.
    """

    __tablename__ = "agent_metrics"
    __table_args__ = (
        # Pruning deletes one tier's old buckets across all agents.
        Index("ix_agent_metrics_resolution_bucket", "resolution_seconds", "bucket_start"),
    )

    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    resolution_seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    sampled_at: Mapped[datetime]
    # One column per schemas.metrics.HISTORY metric comes from _HistoryMetrics.
    # [{"index", "vram_free_gb", "vram_total_gb", "utilization_percent"}, ...]
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JsonDocument, default=list)


class AgentCredentialRow(Base):
    """An enrolled agent's credential: what proves a message comes from that agent.

    Neither the secret nor the AMQP signing key is stored: `secret_sha256` recognises the
    bearer secret, and the secret (hence the signing key) is re-derived from the server key
    and `nonce` when a signature is checked. docs/security.md: what a database thief can do.
    """

    __tablename__ = "agent_credentials"

    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    # Which server key issued it (a short digest of the key, never the key).
    key_id: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    # Set by a revocation: the id is banned (refused, cannot enroll) until it is lifted.
    revoked_at: Mapped[datetime | None]
    # When an admin approved it (or enrollment did: `chiffon up`'s own agent, a
    # pre-approving token, CHIFFON_AUTO_APPROVE); until then it takes no jobs.
    approved_at: Mapped[datetime | None]
    # Set when its secret seemed to be used from two places: no new jobs until cleared.
    suspect_at: Mapped[datetime | None]
    suspect_reason: Mapped[str | None] = mapped_column(String(255))


class EnrollTokenRow(Base):
    """An enrollment token made by `chiffon tokens create`: limited in uses, in time, or
    both, beside the one CHIFFON_ENROLL_TOKEN. Only its SHA-256 is kept."""

    __tablename__ = "enroll_tokens"

    token_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    uses_left: Mapped[int | None] = mapped_column(Integer)  # None: no limit
    expires_at: Mapped[datetime | None]
    approves: Mapped[bool] = mapped_column(Boolean, default=False)  # agents enrolled are
    note: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime]


class JobRow(Base):
    """A submitted job. `state` moves only along `schemas.jobs.MOVES`; `attempt` is the
    current attempt's number, the fencing token every order and report carries."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The scheduler's hot path: the queue in submission order.
        Index("ix_jobs_state_submitted", "state", "submitted_at"),
        Index("ix_jobs_agent_state", "agent_id", "state"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1000), default="")
    # The submission as validated (schemas.jobs.JobSubmit): command, env, requirements...
    spec: Mapped[dict[str, Any]]
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    retries_used: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts taken back by a desktop's owner (they use no retry).
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    agent_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # Cancel asked while an attempt was out: the agent is told, and its report ends it.
    cancel_requested_at: Mapped[datetime | None]
    submitted_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    exit_code: Mapped[int | None] = mapped_column(Integer)


class JobAttemptRow(Base):
    """One placement of a job on one agent, from assignment to its end."""

    __tablename__ = "job_attempts"
    __table_args__ = (
        Index("ix_job_attempts_agent_state", "agent_id", "state"),
        # The scheduler's changes since its last pass (FleetCache).
        Index("ix_job_attempts_assigned", "assigned_at"),
        Index("ix_job_attempts_ended", "ended_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    state: Mapped[str] = mapped_column(String(16))  # a job state, for this attempt
    gpu_uuids: Mapped[list[str]] = mapped_column(JsonDocument, default=list)
    assigned_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(1000), default="")
    # The most VRAM its processes held, by GPU id, when the agent could see them.
    peak_vram_gb: Mapped[dict[str, float] | None] = mapped_column(JsonDocument)
    # Where its whole output is on the desktop, as the agent said in its start report.
    log_path: Mapped[str | None] = mapped_column(String(LOG_PATH_MAX_CHARS))


class JobClaimRow(Base):
    """What a live attempt holds on its agent: one row for the host (cores, memory) and
    one per GPU (VRAM, by the GPU's id). Deleted when the attempt ends: the table holds
    exactly the claims placement must respect."""

    __tablename__ = "job_claims"
    __table_args__ = (Index("ix_job_claims_agent", "agent_id"),)

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource: Mapped[str] = mapped_column(String(160), primary_key=True)  # "host", "gpu:<id>"
    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    vram_gb: Mapped[float | None] = mapped_column(Float)
    cpu_cores: Mapped[float | None] = mapped_column(Float)
    memory_gb: Mapped[float | None] = mapped_column(Float)
    used_gb: Mapped[float | None] = mapped_column(Float)  # VRAM its processes were seen using


class JobEventRow(Base):
    """One change of a job's state, with why."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_at", "job_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    at: Mapped[datetime]
    attempt: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1000))


class JobLogRow(Base):
    """A chunk of an attempt's output at its byte `offset` in the log on the desktop. Only
    a tail is kept (`job_log_tail_bytes`), and only for `job_log_retention_seconds` after
    the job ended."""

    __tablename__ = "job_logs"

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


# An `Idempotency-Key` header's longest value (the API refuses longer ones).
IDEMPOTENCY_KEY_MAX_CHARS = 128


class JobIdempotencyKeyRow(Base):
    """A submission's idempotency key and the job it created: the same key given again
    within a day returns that job and creates none (`orchestrator.jobs.submit`). The key
    is the primary key, so two submissions racing with one key create one job; rows
    older than a day are deleted with the job logs' pruning."""

    __tablename__ = "job_idempotency_keys"
    __table_args__ = (Index("ix_job_idempotency_keys_created", "created_at"),)

    key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_MAX_CHARS), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # SHA-256 of the submission as validated (canonical JSON): the same key with another
    # submission is refused, not answered with a job that is not what was asked for.
    request_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class BlobRow(Base):
    """A file's content in the store, named by its SHA-256 (`orchestrator.store`): a file
    of a snapshot, an output or a checkpoint, or a manifest naming such files. Its bytes
    are in `blob_chunks` (PostgreSQL) or a file under the store's folder (`chiffon up`)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime]
    # Last asked for or named by a new upload: what garbage collection's retention counts
    # from for a blob no job refers to.
    used_at: Mapped[datetime]


class BlobChunkRow(Base):
    """One piece (`store.CHUNK_BYTES`, the last shorter) of a blob kept in the database."""

    __tablename__ = "blob_chunks"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class JobFilesRow(Base):
    """What an attempt saved: its outputs (the files its `--out` patterns named) or its
    checkpoint folder, as a manifest in the store. One row per attempt and kind; a newer
    save of the same attempt (a periodic checkpoint) replaces it."""

    __tablename__ = "job_files"

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # output | checkpoint
    manifest: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[int] = mapped_column(Integer)
    saved_at: Mapped[datetime]


class AgentSnapshotRow(Base):
    """An agent fetched a job's snapshot (its manifest): its cache likely holds those
    files, so placement prefers it, among equally good desktops, for jobs of the same
    snapshot (`orchestrator.store.warm_agents`)."""

    __tablename__ = "agent_snapshots"
    __table_args__ = (Index("ix_agent_snapshots_manifest", "manifest"),)

    agent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    manifest: Mapped[str] = mapped_column(String(64), primary_key=True)
    fetched_at: Mapped[datetime]
