"""The wire format's bounds as plain numbers, its one cross-field rule, its refusal.

Two readers share them: the pydantic contract the orchestrator validates every message
with (`chiffon.schemas.heartbeat`) and the agent's own builders (`chiffon.agent.report`),
which stay free of pydantic so that the agent is small on the desktop. Generous for real
hardware, tight enough to refuse nonsense (10^9 GPUs, 1e300 GB).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Literal, Protocol

SCHEMA_VERSION = 1

GpuVendor = Literal["nvidia", "amd", "intel", "other"]
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
COLLECTION_MS_MAX = 600_000.0
SLACK = 1e-6  # float sums may overshoot a total by rounding


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
    def gpus(self) -> Sized: ...


def check_resources(r: ResourceTotals) -> None:
    """`ValueError` when a snapshot's amounts contradict each other (one rule, both sides)."""
    check_not_above(r.memory_available_gb, r.memory_total_gb, "memory")
    check_not_above(r.gpu_vram_available_gb, r.gpu_vram_total_gb, "gpu_vram")
    check_not_above(r.gpu_vram_available_max_gb, r.gpu_vram_available_gb, "gpu_vram_available_max")
    if r.gpu_count != len(r.gpus):
        raise ValueError(f"gpu_count ({r.gpu_count}) != number of gpus ({len(r.gpus)})")


class RejectedMessage(ValueError):
    """A message the orchestrator refused, with a short machine-readable reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
