"""Models the REST API returns. Never the ORM row on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, create_model

from chiffon.schemas.heartbeat import GpuInfo, Sandbox
from chiffon.schemas.jobs import INTEGRAL
from chiffon.schemas.limits import TEXT_PATTERN
from chiffon.schemas.metrics import HISTORY, REGISTRY, Metric

AgentStatus = Literal["online", "offline"]
AgentHold = Literal["pending", "suspect"]


def _metric_fields(metrics: tuple[Metric, ...]) -> dict[str, Any]:
    """The API fields of declared metrics: required, null when unknown."""
    return {m.name: (m.annotation, Field(description=m.description)) for m in metrics}


class ClaimTotals(BaseModel):
    """What live jobs hold on one agent (their claims). The free numbers beside it are net
    of it: what a new job could still be given."""

    jobs: int = Field(0, description="attempts holding claims here")
    cpu_cores: float = 0.0
    memory_gb: float = 0.0
    vram_gb: float = Field(0.0, description="over all its GPUs")


class _AgentCapacityBase(BaseModel):
    """The seeds' capacity fields for one agent, plus per-GPU detail and freshness."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "agent_id": "6f1c2a8e-3b6d-4b0e-9a51-0c8f1d2e3a4b",
                    "name": "render-02",
                    "pool_name": "desktop_pool_1",
                    "agent_type": "desktop",
                    "status": "online",
                    "cpu_cores_available": 6,
                    "cpu_cores_physical": 8,
                    "cpu_load_1min": 1.7,
                    "memory_available_gb": 41.2,
                    "gpu_vram_available_gb": 22.5,
                    "gpu_vram_total_gb": 24.0,
                    "gpu_vram_available_max_gb": 22.5,
                    "gpu_temperature_max_c": 54.0,
                    "gpu_count": 1,
                    "gpu_type": "nvidia",
                    "gpus": [
                        {
                            "index": 0,
                            "vendor": "nvidia",
                            "name": "NVIDIA GeForce RTX 4090",
                            "vram_total_gb": 24.0,
                            "vram_free_gb": 22.5,
                            "temperature_c": 54.0,
                        }
                    ],
                    "timestamp": "2026-11-22T15:04:05.123456Z",
                    "age_seconds": 3.2,
                    "probe_errors": {},
                }
            ]
        }
    )

    agent_id: UUID
    name: str
    pool_name: str
    agent_type: str
    status: AgentStatus
    claims: ClaimTotals = Field(
        default_factory=ClaimTotals,
        description="what running jobs hold here; cores, memory and VRAM free are net of it",
    )


# Its numbers are the registry's metrics (schemas.metrics.REGISTRY), in declared order. The
# type checker sees the base, whose fields it can list; at run time the model is made.
if TYPE_CHECKING:

    class AgentCapacity(_AgentCapacityBase):
        # the metrics code outside reads by name (orchestrator.capacity)
        cpu_cores_available: int | None
        memory_available_gb: float | None
        gpu_vram_available_gb: float | None
        gpu_vram_available_max_gb: float | None
else:
    AgentCapacity = create_model(
        "AgentCapacity",
        __base__=_AgentCapacityBase,
        __module__=__name__,
        __doc__=_AgentCapacityBase.__doc__,
        **_metric_fields(REGISTRY),
        gpus=(list[GpuInfo], ...),
        timestamp=(
            datetime | None,
            Field(description="when the orchestrator received these metrics (its own clock, UTC)"),
        ),
        age_seconds=(float | None, Field(description="seconds since `timestamp`")),
        probe_errors=(dict[str, str], ...),
    )


class Reliability(BaseModel):
    """How often the desktop was lost or taken back by its owner lately (docs/owner.md);
    placement keeps long jobs on the desktops with the fewest."""

    offline_events_7d: int = Field(0, description="times it went offline in the last 7 days")
    preemptions_7d: int = Field(0, description="attempts its owner took back in the last 7 days")


class AgentRecord(BaseModel):
    """One agent's full registry record."""

    agent_id: UUID
    name: str
    agent_type: str
    pool_name: str
    agent_version: str | None
    labels: dict[str, str]
    capabilities: list[str]
    specializations: list[str]
    status: AgentStatus
    accepts_jobs: bool = Field(
        False, description="new jobs may land there now (its owner's policy; docs/jobs.md)"
    )
    hold: AgentHold | None = Field(
        None,
        description="why it takes no new jobs whatever it reports: 'pending' (enrolled, not "
        "yet approved by an admin), 'suspect' (its secret seems used from two places)",
    )
    hold_reason: str | None = None
    last_heartbeat_at: datetime | None
    age_seconds: float | None
    resource_metrics: dict[str, Any]
    sandbox: Sandbox | None = Field(
        None,
        description="the protections its job sandbox enforces, as its last heartbeat said "
        "(`resource_metrics.sandbox`); null: not said (an older agent). `--require-sandbox` "
        "jobs land only where processes are contained (cgroup, pidns), memory is capped and "
        "the owner's home is hidden",
    )
    reliability: Reliability = Reliability()
    created_at: datetime
    updated_at: datetime


class AgentEvent(BaseModel):
    agent_id: UUID
    at: datetime
    from_status: AgentStatus | None
    to_status: AgentStatus | Literal["deregistered", "suspect"]
    reason: str


class IngestResult(BaseModel):
    """What happened to one accepted message."""

    agent_id: UUID
    outcome: Literal["applied", "stale", "unknown_agent", "suspect"] = Field(
        description="suspect: not applied, the agent's secret seems used from two places "
        "(docs/security.md)"
    )


class ErrorDetail(BaseModel):
    detail: str


class GpuPoint(BaseModel):
    """One GPU in one history point."""

    index: int
    vram_free_gb: float | None
    vram_total_gb: float | None
    utilization_percent: float | None


class _MetricPointBase(BaseModel):
    """An agent's numbers (its latest heartbeat) when one history bucket began."""

    at: datetime = Field(description="start of the bucket")


# Its numbers are the history's metrics (schemas.metrics.HISTORY), in declared order.
if TYPE_CHECKING:

    class MetricPoint(_MetricPointBase):
        pass
else:
    MetricPoint = create_model(
        "MetricPoint",
        __base__=_MetricPointBase,
        __module__=__name__,
        __doc__=_MetricPointBase.__doc__,
        **_metric_fields(HISTORY),
        gpus=(list[GpuPoint], ...),
    )


class AgentMetrics(BaseModel):
    """An agent's history over a window, oldest point first."""

    agent_id: UUID
    since: datetime
    until: datetime
    step_seconds: float = Field(description="at most one point per this many seconds")
    resolution_seconds: int = Field(
        description="the stored tier read (0: one point per heartbeat interval)"
    )
    points: list[MetricPoint]


class PoolSummary(BaseModel):
    """Agents of one pool (or the whole fleet); capacity counts online agents only."""

    pool_name: str | None = Field(description="null for the whole fleet")
    agents_online: int
    agents_offline: int
    cpu_cores_physical: int
    cpu_cores_available: int
    gpu_count: int
    gpu_vram_total_gb: float
    gpu_vram_available_gb: float


class FleetSummary(BaseModel):
    generated_at: datetime
    heartbeat_timeout_seconds: float
    registry_stale_seconds: float | None = Field(
        None,
        description="seconds since the offline sweep last completed, when it is behind (the "
        "database refuses writes, or no transport can hear agents): statuses may be stale",
    )
    fleet: PoolSummary
    pools: list[PoolSummary]


class EnrollRequest(BaseModel):
    """What a new agent sends once, with the enrollment token as its bearer credential."""

    model_config = ConfigDict(extra="forbid")

    agent_id: UUID


class EnrollResponse(BaseModel):
    """The agent's own secret: shown once, kept by the agent (mode 0600), never again here."""

    agent_id: UUID
    secret: str
    approved: bool = Field(
        True, description="false: it takes no jobs until an admin runs `chiffon agents approve`"
    )


class TokenCreate(BaseModel):
    """An enrollment token to make: limited in uses, in time, or both."""

    model_config = ConfigDict(extra="forbid", strict=True)

    uses: Annotated[int, Field(ge=1, le=1_000_000), INTEGRAL] | None = Field(
        None, description="enrollments it allows"
    )
    expires_seconds: float | None = Field(
        None, gt=0, le=366 * 86400, description="it expires this long after it is made"
    )
    approves: bool = Field(False, description="agents enrolled with it take jobs at once")
    note: str = Field("", max_length=255, pattern=TEXT_PATTERN)


class TokenInfo(BaseModel):
    """A made enrollment token, without the token itself (only its SHA-256 is kept)."""

    token_id: UUID
    uses_left: int | None
    expires_at: datetime | None
    approves: bool
    note: str
    created_at: datetime


class TokenCreated(TokenInfo):
    token: str = Field(description="shown once; give it to the desktop as CHIFFON_ENROLL_TOKEN")


class RotatedSecret(BaseModel):
    """An agent's new secret: shown once. Its old one is refused from now on."""

    agent_id: UUID
    secret: str
