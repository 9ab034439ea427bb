"""The wire format's bounds as plain numbers, its one cross-field rule, its refusal.

Two readers share them: the pydantic contract the orchestrator validates every message
with (`chiffon.schemas.heartbeat`) and the agent's own builders (`chiffon.agent.report`),
which stay free of pydantic so that the agent is small on the desktop. Generous for real
hardware, tight enough to refuse nonsense (10^9 GPUs, 1e300 GB).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal, Protocol

SCHEMA_VERSION = 1

GpuVendor = Literal["nvidia", "amd", "intel", "other"]
# Why no new job lands on a desktop, or on one of its GPUs (agent.owner; docs/owner.md).
Withheld = Literal[
    "never", "root", "unsandboxed", "outside_schedule", "owner_active", "owner_unknown",
    "reserved", "unhealthy", "exclusive_app", "dirty",
]  # fmt: skip
FOREIGN_NAMES_MAX = 32
GpuType = Literal["nvidia", "amd", "intel", "other", "mixed", "none"]
MessageKind = Literal["heartbeat", "offline"]

GPU_INDEX_MAX = 255
GPU_UUID_MAX_CHARS = 128
TEXT_MAX_CHARS = 255  # names, label values, probe errors
GPU_GB_MAX = 4096.0  # one GPU's VRAM
GB_MAX = 1_000_000.0  # a desktop's memory, or its GPUs' VRAM together
PERCENT_MAX = 100.0
LOAD_MAX = 100_000.0
CORES_MAX = 16_384
TEMPERATURE_C_MIN = -50.0
TEMPERATURE_C_MAX = 200.0
GPUS_MAX = 64
PROBE_ERRORS_MAX = 32
IDLE_SECONDS_MAX = 10 * 366 * 86400  # ten years: longer is a broken clock
COLLECTION_MS_MAX = 600_000.0
# The orders an agent refused since it started, by reason (`orders_refused`): a reason is
# a short word (agent.work names them), counted up to a number no agent reaches.
ORDERS_REFUSED_MAX = 16
REFUSAL_REASON_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
REFUSALS_MAX = 2**62
# The attempts an agent holds, in each heartbeat (`attempts_held`): `job_id/attempt`.
ATTEMPTS_HELD_MAX = 256
ATTEMPT_HELD_PATTERN = (
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[1-9][0-9]{0,8}$"
)
SLACK = 1e-6  # float sums may overshoot a total by rounding
# An aggregate is a sum of per-GPU numbers each rounded to the MB by the agent.
AGGREGATE_SLACK_GB = 0.001

# Characters no text on the wire may hold. NUL: PostgreSQL's text and jsonb refuse it, so
# one such string failed the write of a whole ingest batch. The other C0 and C1 controls:
# an escape sequence reaches an operator's terminal, a newline forges a table row. The
# bidirectional embeddings, overrides and isolates: a name that reorders the text around
# it. (Lone surrogates, the other thing a database cannot store, are refused by the JSON
# parser and by UTF-8 encoding.)
FORBIDDEN_CHARS = r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
TEXT_PATTERN = f"^[^{FORBIDDEN_CHARS}]*$"
_FORBIDDEN = re.compile(f"[{FORBIDDEN_CHARS}]")


def check_text(name: str, value: str | None, max_chars: int) -> None:
    """`ValueError` unless `value` (when given) is 1 to `max_chars` storable characters."""
    if value is None:
        return
    if not 0 < len(value) <= max_chars:
        raise ValueError(f"{name}: must be 1 to {max_chars} characters")
    if _FORBIDDEN.search(value):
        raise ValueError(f"{name}: control or bidirectional-override characters are refused")


def clean_text(value: str) -> str:
    """`value` with every forbidden character replaced by a space (driver and OS text the
    agent passes on: a GPU's name, a probe's error)."""
    return _FORBIDDEN.sub(" ", value)


def utc(at: datetime) -> datetime:
    """An aware time in UTC, or `ValueError`. PostgreSQL refuses UTC offsets past +-15:59
    (Python allows +-23:59), and a time near year 1 or 9999 may leave Python's range."""
    offset = at.utcoffset()
    if offset is None:
        raise ValueError("a time zone is required")
    if not offset:  # UTC already (what agents send): no new object for every heartbeat
        return at
    try:
        return at.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


def check_not_above(free: float | None, total: float | None, what: str) -> None:
    """`ValueError` when a free amount exceeds its total (both known)."""
    if free is not None and total is not None and free > total + SLACK:
        raise ValueError(f"{what}: free ({free}) is greater than total ({total})")


class ResourceTotals(Protocol):
    """What `check_resources` reads: the agent's `Snapshot` and the wire `Resources` both
    have it."""

    @property
    def memory_available_gb(self) -> float | None: ...
    @property
    def memory_total_gb(self) -> float | None: ...
    @property
    def gpu_vram_available_gb(self) -> float | None: ...
    @property
    def gpu_vram_total_gb(self) -> float | None: ...
    @property
    def gpu_vram_available_max_gb(self) -> float | None: ...
    @property
    def gpu_count(self) -> int: ...
    @property
    def gpu_type(self) -> str: ...
    @property
    def gpus(self) -> Sequence[GpuTotals]: ...


class GpuTotals(Protocol):
    """What the aggregates are checked against: one GPU of either side."""

    @property
    def vendor(self) -> GpuVendor: ...
    @property
    def vram_total_gb(self) -> float | None: ...
    @property
    def vram_free_gb(self) -> float | None: ...


def check_resources(r: ResourceTotals) -> None:
    """`ValueError` when a snapshot's amounts contradict each other (one rule, both sides)."""
    check_not_above(r.memory_available_gb, r.memory_total_gb, "memory")
    check_not_above(r.gpu_vram_available_gb, r.gpu_vram_total_gb, "gpu_vram")
    check_not_above(r.gpu_vram_available_max_gb, r.gpu_vram_available_gb, "gpu_vram_available_max")
    if r.gpu_count != len(r.gpus):
        raise ValueError(f"gpu_count ({r.gpu_count}) != number of gpus ({len(r.gpus)})")
    _check_aggregates(r)


def gpu_type_of(vendors: set[GpuVendor]) -> GpuType:
    """A desktop's `gpu_type`: its GPUs' one vendor, "mixed", or "none"."""
    if not vendors:
        return "none"
    return next(iter(vendors)) if len(vendors) == 1 else "mixed"


def _check_aggregates(r: ResourceTotals) -> None:
    """The sums must be the sums of the per-GPU list, as the agent builds them
    (`chiffon.agent.probes.collect.gpu_aggregates`): a hostile agent sending `gpus: []`
    with 10^6 GB free ranked first for every capacity query. One pass over the GPUs: this
    runs for every heartbeat."""
    vendors: set[GpuVendor] = set()
    known = 0  # GPUs whose total is known
    total = free = 0.0
    largest: float | None = None
    free_known = 0
    for g in r.gpus:
        vendors.add(g.vendor)
        if g.vram_total_gb is None:
            continue
        known += 1
        total += g.vram_total_gb
        if g.vram_free_gb is not None:
            free_known += 1
            free += g.vram_free_gb
            largest = g.vram_free_gb if largest is None else max(largest, g.vram_free_gb)
    if r.gpu_type != gpu_type_of(vendors):
        raise ValueError(f"gpu_type {r.gpu_type!r} does not match the GPUs' vendors")
    if not r.gpus:  # none found: 0, or unknown when a GPU backend failed
        for what in ("gpu_vram_total_gb", "gpu_vram_available_gb", "gpu_vram_available_max_gb"):
            if getattr(r, what) not in (None, 0):
                raise ValueError(f"{what} is {getattr(r, what)} with no GPU listed")
        return
    _check_sum("gpu_vram_total_gb", r.gpu_vram_total_gb, total, known)
    _check_sum("gpu_vram_available_gb", r.gpu_vram_available_gb, free, free_known)
    _check_sum("gpu_vram_available_max_gb", r.gpu_vram_available_max_gb, largest, free_known)


def _check_sum(what: str, stated: float | None, expected: float | None, parts: int) -> None:
    if not parts or expected is None:
        if stated is not None:
            raise ValueError(f"{what} is {stated} but no GPU's VRAM is known")
        return
    if stated is None or abs(stated - expected) > AGGREGATE_SLACK_GB * parts + SLACK:
        raise ValueError(f"{what} is {stated}, the GPUs say {round(expected, 3)}")


class RejectedMessage(ValueError):
    """A message the orchestrator refused, with a short machine-readable reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
