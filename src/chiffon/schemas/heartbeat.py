"""The wire message an agent sends: a heartbeat with its resources, or a goodbye.

This module is the contract between the agent and the orchestrator; `docs/protocol.md`
describes the same thing for people. Every bound below exists so that a broken or hostile
agent cannot store a number no real desktop could report.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from chiffon.schemas import limits, metrics
from chiffon.schemas.limits import GpuType as GpuType  # the API's models use them from here
from chiffon.schemas.limits import GpuVendor as GpuVendor
from chiffon.schemas.limits import MessageKind as MessageKind
from chiffon.schemas.limits import RejectedMessage as RejectedMessage
from chiffon.schemas.limits import check_not_above, check_resources
from chiffon.schemas.sandbox import WHY_MAX, WHY_MAX_CHARS
from chiffon.schemas.sandbox import Processes as SandboxProcesses

# A heartbeat of a desktop with eight GPUs is about 2 KiB; anything past this is not ours.
MAX_MESSAGE_BYTES = 64 * 1024


# Bounds (chiffon.schemas.limits, shared with the agent's pydantic-free builders).
Gigabytes = Annotated[float, Field(ge=0, le=limits.GB_MAX)]
GpuGigabytes = Annotated[float, Field(ge=0, le=limits.GPU_GB_MAX)]
Percent = Annotated[float, Field(ge=0, le=limits.PERCENT_MAX)]
Load = Annotated[float, Field(ge=0, le=limits.LOAD_MAX)]
Cores = Annotated[int, Field(ge=0, le=limits.CORES_MAX)]
# Every string on the wire: no NUL, control or bidi-override character (limits.TEXT_PATTERN).
SafeText = Annotated[str, Field(pattern=limits.TEXT_PATTERN)]
ShortText = Annotated[SafeText, Field(min_length=1, max_length=limits.TEXT_MAX_CHARS)]
LabelKey = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.\-/]+$")]
LabelValue = Annotated[SafeText, Field(max_length=limits.TEXT_MAX_CHARS)]
Tag = Annotated[SafeText, Field(max_length=128)]
RefusalReason = Annotated[str, Field(pattern=limits.REFUSAL_REASON_PATTERN)]
# Stored in UTC: PostgreSQL refuses the offsets past +-15:59 that ISO 8601 allows.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(limits.utc)]


class _Strict(BaseModel):
    """Strict JSON: no NaN/Infinity, no strings where numbers belong."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)


class GpuInfo(_Strict):
    """One GPU as the agent read it. `None` means the driver did not say."""

    index: Annotated[int, Field(ge=0, le=limits.GPU_INDEX_MAX)]
    uuid: Annotated[SafeText, Field(max_length=limits.GPU_UUID_MAX_CHARS)] | None = None
    name: ShortText | None = None
    vendor: GpuVendor
    vram_total_gb: GpuGigabytes | None = None
    vram_free_gb: GpuGigabytes | None = None
    utilization_percent: Percent | None = None
    temperature_c: (
        Annotated[float, Field(ge=limits.TEMPERATURE_C_MIN, le=limits.TEMPERATURE_C_MAX)] | None
    ) = None
    jobs_vram_used_gb: GpuGigabytes | None = Field(
        None, description="VRAM held by the agent's own job processes; null: it cannot see"
    )
    foreign_processes: Annotated[int, Field(ge=0, le=1_000_000)] | None = Field(
        None, description="processes Chiffon did not start holding memory on it; null: unknown"
    )
    foreign_vram_gb: GpuGigabytes | None = Field(None, description="the VRAM they hold")
    foreign_names: Annotated[list[ShortText], Field(max_length=limits.FOREIGN_NAMES_MAX)] | None = (
        Field(None, description="their program names, only when the owner allows it")
    )
    withheld: limits.Withheld | None = Field(
        None, description="why no new job lands on this GPU now; null: it is offered"
    )
    fault: ShortText | None = Field(None, description="what the driver said when it failed")

    @model_validator(mode="after")
    def _free_not_above_total(self) -> Self:
        check_not_above(self.vram_free_gb, self.vram_total_gb, f"gpus[{self.index}].vram")
        return self


class Sandbox(_Strict):
    """Which protections the desktop's job sandbox enforces (`schemas.sandbox`; docs/
    protocol.md). A `processes` value outside the vocabulary refuses the heartbeat."""

    processes: SandboxProcesses = Field(
        description="how a job's processes are kept together: cgroup, pidns (both ended "
        "with the job), subreaper (found by parentage), none"
    )
    memory_limit: bool = Field(False, description="the job's memory is capped")
    home_hidden: bool = Field(False, description="the owner's home is out of the job's sight")
    devices_hidden: bool = Field(False, description="the GPUs not given to it are hidden")
    why: Annotated[
        list[Annotated[SafeText, Field(max_length=WHY_MAX_CHARS)]],
        Field(max_length=WHY_MAX),
    ] = Field([], description="why a protection is missing, one line each")
    required: bool = Field(
        False, description="its owner requires the sandbox: it refuses jobs unless it is full"
    )


class Resources(_Strict):
    """A snapshot of one desktop's capacity: the seeds' metric names plus per-GPU detail.

    Any number may be `None` (unknown): a probe that failed says so in `probe_errors`
    instead of inventing a value.
    """

    cpu_load_1min: Load | None = None
    cpu_load_5min: Load | None = None
    cpu_load_15min: Load | None = None
    cpu_cores_physical: Cores | None = None
    cpu_cores_logical: Cores | None = None
    cpu_cores_available: Cores | None = None
    memory_percent: Percent | None = None
    memory_available_gb: Gigabytes | None = None
    memory_total_gb: Gigabytes | None = None
    gpus: Annotated[list[GpuInfo], Field(max_length=limits.GPUS_MAX)] = []
    gpu_count: Annotated[int, Field(ge=0, le=limits.GPUS_MAX)] = 0
    gpu_type: GpuType = "none"
    gpu_vram_total_gb: Gigabytes | None = None
    gpu_vram_available_gb: Gigabytes | None = None
    gpu_vram_available_max_gb: GpuGigabytes | None = None
    probe_errors: Annotated[
        dict[LabelKey, LabelValue], Field(max_length=limits.PROBE_ERRORS_MAX)
    ] = {}
    collection_ms: Annotated[float, Field(ge=0, le=limits.COLLECTION_MS_MAX)] | None = None
    owner_idle_seconds: Annotated[float, Field(ge=0, le=limits.IDLE_SECONDS_MAX)] | None = Field(
        None, description="seconds since the desktop's owner last used it; null: unknown"
    )
    jobs_withheld: limits.Withheld | None = Field(
        None, description="why no new job lands on this desktop now; null: welcome"
    )
    orders_refused: Annotated[
        dict[RefusalReason, Annotated[int, Field(ge=0, le=limits.REFUSALS_MAX)]],
        Field(max_length=limits.ORDERS_REFUSED_MAX),
    ] = Field(
        {},
        description="orders the agent refused since it started, by reason (docs/security.md); "
        "empty: none, or an agent too old to say",
    )

    attempts_held: (
        Annotated[
            list[Annotated[str, Field(pattern=limits.ATTEMPT_HELD_PATTERN)]],
            Field(max_length=limits.ATTEMPTS_HELD_MAX),
        ]
        | None
    ) = Field(
        None,
        description="the attempts the agent holds, job_id/attempt: running, or ended and not "
        "yet heard; the orchestrator ends what is out there and not listed. null: not said",
    )
    sandbox: Sandbox | None = Field(
        None,
        description="the protections its job sandbox enforces; null: not said (an "
        "older agent), and `--require-sandbox` jobs do not land there",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_resources(self)
        return self


metrics.check_fields(metrics.METRICS, Resources.model_fields)


class AgentMessage(_Strict):
    """What travels from agent to orchestrator (schema_version 1).

    Ordering: within one run of an agent (`boot_id`) the `seq` grows by one per message;
    across runs the agent's own `sent_at` decides. The orchestrator never uses `sent_at`
    as the time it heard the agent: it stamps its own clock at receipt.
    """

    schema_version: Literal[1]
    kind: MessageKind = "heartbeat"
    agent_id: UUID
    boot_id: UUID
    seq: Annotated[int, Field(ge=0, le=2**62)]
    sent_at: UtcDatetime
    name: ShortText
    agent_type: Annotated[SafeText, Field(min_length=1, max_length=64)] = "desktop"
    pool_name: Annotated[SafeText, Field(min_length=1, max_length=128)] = "desktop_pool_1"
    agent_version: Annotated[SafeText, Field(max_length=64)] | None = None
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] = {}
    capabilities: Annotated[list[Tag], Field(max_length=64)] = []
    specializations: Annotated[list[Tag], Field(max_length=64)] = []
    resources: Resources | None = None
    # Its owner lets it run jobs (docs/jobs.md); absent (older agents): it does not.
    accepts_jobs: bool = False

    @model_validator(mode="after")
    def _heartbeat_has_resources(self) -> Self:
        if self.kind == "heartbeat" and self.resources is None:
            raise ValueError("a heartbeat must carry resources")
        return self

    def encode(self) -> bytes:
        """The JSON bytes that travel (the agent's own messages: `chiffon.agent.report`)."""
        return self.model_dump_json().encode()


def parse_message(raw: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> AgentMessage:
    """Validate raw JSON bytes into an `AgentMessage`, or raise `RejectedMessage`."""
    if len(raw) > max_bytes:
        raise RejectedMessage("too_large", f"message is {len(raw)} bytes, limit {max_bytes}")
    try:
        return AgentMessage.model_validate_json(raw)
    except ValidationError as exc:
        raise RejectedMessage(*describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """A (reason, one-line detail) pair for the first thing wrong with a message."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "json_invalid":
        reason = "malformed_json"
    elif first["loc"][:1] == ("schema_version",):
        reason = "unknown_schema_version"
    else:
        reason = "invalid"
    return reason, f"{where}: {first['msg']}"
