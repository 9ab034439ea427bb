"""What the agent reads and sends, as plain dataclasses: the agent never imports pydantic.

pydantic and its compiled core are about 13 MB of the agent's memory, on every desktop,
for checking numbers the agent itself just read. The one definition of the wire format
stays `chiffon.schemas.heartbeat`, which the orchestrator validates every message with;
these classes hold the same fields under the same bounds (`chiffon.schemas.limits`) and
write the same JSON, and `tests/test_agent_report.py` holds them to that contract field by
field. A reading outside the bounds raises `ValueError` here, before it could be sent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from chiffon.schemas import limits, sandbox
from chiffon.schemas.limits import (
    GpuType,
    GpuVendor,
    MessageKind,
    Withheld,
    check_not_above,
    check_resources,
    check_text,
)


def _check_ranges(obj: object, ranges: Mapping[str, tuple[float, float]]) -> None:
    """Each named number, when known, is a finite int/float within its bounds."""
    for name, (low, high) in ranges.items():
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: {value!r} is not a number")
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{name}: {value!r} is outside {low:g}..{high:g}")


_GPU_GB = (0, limits.GPU_GB_MAX)
_GPU_RANGES = {
    "index": (0, limits.GPU_INDEX_MAX),
    **dict.fromkeys(("vram_total_gb", "vram_free_gb"), _GPU_GB),
    "utilization_percent": (0, limits.PERCENT_MAX),
    "temperature_c": (limits.TEMPERATURE_C_MIN, limits.TEMPERATURE_C_MAX),
    "jobs_vram_used_gb": _GPU_GB,
    "foreign_processes": (0, 1_000_000),
    "foreign_vram_gb": _GPU_GB,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuReading:
    """One GPU as the agent read it (wire: `GpuInfo`). `None`: the driver did not say."""

    index: int
    uuid: str | None = None
    name: str | None = None
    vendor: GpuVendor
    vram_total_gb: float | None = None
    vram_free_gb: float | None = None
    utilization_percent: float | None = None
    temperature_c: float | None = None
    # VRAM held by this agent's own job processes (set by the work loop); None: unknown.
    jobs_vram_used_gb: float | None = None
    # Processes Chiffon did not start holding memory on it, their VRAM, and (only when the
    # owner allows it) their names; None: the driver cannot list them (set by the work loop).
    foreign_processes: int | None = None
    foreign_vram_gb: float | None = None
    foreign_names: tuple[str, ...] | None = None
    # Why no new job lands on it now (agent.owner), None: offered; and what the driver
    # said when it failed (the GPU is then `unhealthy`).
    withheld: Withheld | None = None
    fault: str | None = None
    # Every process holding memory on it, (pid, GB), as the driver listed them; None when
    # it cannot say (nvidia-smi, sysfs). Kept on the desktop: never sent.
    processes: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        _check_ranges(self, _GPU_RANGES)
        if isinstance(self.index, float):
            raise ValueError(f"index: {self.index!r} is not a whole number")
        check_text("uuid", self.uuid, limits.GPU_UUID_MAX_CHARS)
        check_text("name", self.name, limits.TEXT_MAX_CHARS)
        check_text("fault", self.fault, limits.TEXT_MAX_CHARS)
        if self.foreign_names is not None:
            if len(self.foreign_names) > limits.FOREIGN_NAMES_MAX:
                raise ValueError(f"foreign_names: more than {limits.FOREIGN_NAMES_MAX}")
            for name in self.foreign_names:
                check_text("foreign_names", name or " ", limits.TEXT_MAX_CHARS)
        check_not_above(self.vram_free_gb, self.vram_total_gb, f"gpus[{self.index}].vram")


_REFUSAL_REASON = re.compile(limits.REFUSAL_REASON_PATTERN)


def _check_refusals(counts: Mapping[str, int]) -> None:
    if len(counts) > limits.ORDERS_REFUSED_MAX:
        raise ValueError(f"orders_refused: more than {limits.ORDERS_REFUSED_MAX} reasons")
    for reason, count in counts.items():
        if not _REFUSAL_REASON.fullmatch(reason):
            raise ValueError(f"orders_refused: {reason!r} is not a reason")
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"orders_refused[{reason}]: {count!r} is not a whole number")
        if not 0 <= count <= limits.REFUSALS_MAX:
            raise ValueError(f"orders_refused[{reason}]: {count} is out of range")


ATTEMPTS_HELD_MAX = limits.ATTEMPTS_HELD_MAX
_HELD = re.compile(limits.ATTEMPT_HELD_PATTERN)


def _check_held(held: list[str] | None) -> None:
    if held is None:
        return
    if len(held) > limits.ATTEMPTS_HELD_MAX:
        raise ValueError(f"attempts_held: more than {limits.ATTEMPTS_HELD_MAX}")
    for item in held:
        if not isinstance(item, str) or not _HELD.fullmatch(item):
            raise ValueError(f"attempts_held: {item!r} is not job_id/attempt")


_SNAPSHOT_RANGES = {
    **dict.fromkeys(("cpu_load_1min", "cpu_load_5min", "cpu_load_15min"), (0, limits.LOAD_MAX)),
    **dict.fromkeys(
        ("cpu_cores_physical", "cpu_cores_logical", "cpu_cores_available"), (0, limits.CORES_MAX)
    ),
    "memory_percent": (0, limits.PERCENT_MAX),
    **dict.fromkeys(("memory_available_gb", "memory_total_gb"), (0, limits.GB_MAX)),
    "gpu_count": (0, limits.GPUS_MAX),
    **dict.fromkeys(("gpu_vram_total_gb", "gpu_vram_available_gb"), (0, limits.GB_MAX)),
    "gpu_vram_available_max_gb": _GPU_GB,
    "collection_ms": (0, limits.COLLECTION_MS_MAX),
    "owner_idle_seconds": (0, limits.IDLE_SECONDS_MAX),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    """One desktop's capacity (wire: `resources`); a failed probe is named in
    `probe_errors` and its numbers stay `None` rather than invented."""

    cpu_load_1min: float | None = None
    cpu_load_5min: float | None = None
    cpu_load_15min: float | None = None
    cpu_cores_physical: int | None = None
    cpu_cores_logical: int | None = None
    cpu_cores_available: int | None = None
    memory_percent: float | None = None
    memory_available_gb: float | None = None
    memory_total_gb: float | None = None
    gpus: list[GpuReading] = field(default_factory=list)
    gpu_count: int = 0
    gpu_type: GpuType = "none"
    gpu_vram_total_gb: float | None = None
    gpu_vram_available_gb: float | None = None
    gpu_vram_available_max_gb: float | None = None
    probe_errors: dict[str, str] = field(default_factory=dict)
    collection_ms: float | None = None
    # Seconds since the desktop's owner last used it (probes.owner); None: unknown.
    owner_idle_seconds: float | None = None
    # Why no new job lands here now (agent.owner), None: welcome (GPUs say their own).
    jobs_withheld: Withheld | None = None
    # The orders refused since the agent started, by reason (set by the work loop).
    orders_refused: dict[str, int] = field(default_factory=dict)
    # The attempts it holds, `job_id/attempt`: running, or ended and not yet heard (set by
    # the work loop; None: it runs no work loop, the orchestrator reconciles nothing).
    attempts_held: list[str] | None = None
    # The protections this desktop's job sandbox enforces (`schemas.sandbox`: processes,
    # memory_limit, home_hidden, devices_hidden, why, required), set by the caller that
    # knows them (the daemon); None: not said, and `--require-sandbox` jobs go elsewhere.
    sandbox: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_ranges(self, _SNAPSHOT_RANGES)
        check_resources(self)
        _check_refusals(self.orders_refused)
        _check_held(self.attempts_held)
        if self.sandbox is not None:
            sandbox.check(self.sandbox)
        if len(self.probe_errors) > limits.PROBE_ERRORS_MAX:
            raise ValueError(f"probe_errors: more than {limits.PROBE_ERRORS_MAX}")
        for key, error in self.probe_errors.items():
            check_text(f"probe_errors[{key}]", error or " ", limits.TEXT_MAX_CHARS)

    def as_json(self) -> dict[str, Any]:
        """The `resources` object as it travels (the process lists stay here)."""
        doc = dataclasses.asdict(self)
        for gpu in doc["gpus"]:
            del gpu["processes"]
            if gpu["foreign_names"] is not None:
                gpu["foreign_names"] = list(gpu["foreign_names"])
        if self.sandbox is not None:  # its keys in the contract's order, as pydantic writes
            doc["sandbox"] = sandbox.check(self.sandbox)
        return doc


@dataclass(frozen=True, kw_only=True, slots=True)
class Outgoing:
    """A message as the agent sends it (wire: `AgentMessage`, schema_version 1)."""

    kind: MessageKind
    agent_id: UUID
    boot_id: UUID
    seq: int
    sent_at: datetime
    name: str
    pool_name: str
    agent_version: str | None
    labels: dict[str, str]
    capabilities: list[str]
    specializations: list[str]
    resources: Snapshot | None
    agent_type: str = "desktop"
    accepts_jobs: bool = False

    def __post_init__(self) -> None:
        if self.sent_at.tzinfo is None:
            raise ValueError("sent_at must carry its time zone")
        if self.kind == "heartbeat" and self.resources is None:
            raise ValueError("a heartbeat must carry resources")
        check_text("name", self.name, limits.TEXT_MAX_CHARS)
        check_text("pool_name", self.pool_name, 128)
        check_text("agent_type", self.agent_type, 64)
        for key, value in self.labels.items():
            check_text(f"labels[{key}]", value or " ", limits.TEXT_MAX_CHARS)

    def encode(self) -> bytes:
        """Compact JSON, byte for byte the shape pydantic writes for `AgentMessage`."""
        body = {
            "schema_version": limits.SCHEMA_VERSION,
            "kind": self.kind,
            "agent_id": str(self.agent_id),
            "boot_id": str(self.boot_id),
            "seq": self.seq,
            "sent_at": self.sent_at.isoformat().replace("+00:00", "Z"),
            "name": self.name,
            "agent_type": self.agent_type,
            "pool_name": self.pool_name,
            "agent_version": self.agent_version,
            "labels": self.labels,
            "capabilities": self.capabilities,
            "specializations": self.specializations,
            "resources": None if self.resources is None else self.resources.as_json(),
            "accepts_jobs": self.accepts_jobs,
        }
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
