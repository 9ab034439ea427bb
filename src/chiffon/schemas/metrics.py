"""Every number the registry keeps about a desktop, declared once.

A `Metric` names a number of a heartbeat's `Resources`, says where it is stored and whether
the capacity query can bound it. Everything else is derived from `METRICS`:

- the registry's typed columns and the history's columns (`persistence.models`);
- the values ingest copies into them (`orchestrator.ingest.metric_columns`);
- the capacity answer's fields and its filters: the API's query parameters, the SQL
  `WHERE`, the CLI's options and its "closest agent" sentence;
- the history's `INSERT ... SELECT` (`persistence.history`) and its points.

Adding a number the capacity query can filter on touches its field in the wire schema
(`heartbeat.Resources`) and its probe, one `Metric` here, and a migration that adds its
column. Nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from chiffon.schemas import limits
from chiffon.schemas.limits import GpuType

if TYPE_CHECKING:  # the CLI, hence the agent, imports this module and must not load pydantic
    from chiffon.schemas.heartbeat import Resources


@dataclass(frozen=True, slots=True)
class Bound:
    """A capacity requirement on a metric: the agent's number must be at least (`min`) or
    at most (`max`) the value asked. Agents whose number is unknown never match."""

    param: str  # the API's query parameter
    option: str  # the CLI's option
    op: Literal["min", "max"]
    help: str
    label: str  # what the CLI calls it when it names the closest agent
    unit: str
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Metric:
    """One number of a desktop: `name` is its `Resources` field, its column and its API
    field. `read` derives it from the whole `Resources` when it is not a field of its own.
    A metric with a `default` is never unknown (a NOT NULL column)."""

    name: str
    kind: type[int] | type[float] | type[str]
    description: str | None = None
    registry: bool = True  # a typed column of agent_registry, and a capacity answer field
    history: bool = False  # a column of agent_metrics, and a history point field
    bound: Bound | None = None
    read: Callable[[Resources], Any] | None = None
    default: int | str | None = None
    api_type: Any = None  # the API field's type when it is narrower than `kind`

    def value(self, resources: Resources) -> Any:
        return getattr(resources, self.name) if self.read is None else self.read(resources)

    @property
    def annotation(self) -> Any:
        """Its type in the API's models."""
        kind = self.api_type or self.kind
        return kind if self.default is not None else kind | None


def hottest_gpu(resources: Resources) -> float | None:
    """The highest temperature any GPU reported; None when none did."""
    return max(
        (g.temperature_c for g in resources.gpus if g.temperature_c is not None), default=None
    )


_GB = (0.0, limits.GB_MAX)

METRICS: tuple[Metric, ...] = (
    Metric(
        "cpu_cores_available",
        int,
        "floor(physical - load_1min), >= 0",
        history=True,
        bound=Bound(
            "min_cpu_cores", "--min-cpu-cores", "min", "Free CPU cores.", "free cores", "",
            0, limits.CORES_MAX,
        ),
    ),
    Metric("cpu_cores_physical", int, history=True),
    Metric("cpu_load_1min", float, history=True),
    Metric(
        "memory_available_gb",
        float,
        history=True,
        bound=Bound("min_memory_gb", "--min-memory", "min", "Free memory, GB.", "free memory",
                    "GB", *_GB),
    ),
    Metric("memory_total_gb", float, registry=False, history=True),
    Metric(
        "gpu_vram_available_gb",
        float,
        "free VRAM summed over GPUs",
        history=True,
        bound=Bound(
            "min_gpu_vram_gb", "--min-gpu-vram", "min",
            "Free VRAM summed over the agent's GPUs, GB.", "free VRAM", "GB", *_GB,
        ),
    ),
    Metric("gpu_vram_total_gb", float, history=True),
    Metric(
        "gpu_vram_available_max_gb",
        float,
        "free VRAM of the emptiest GPU",
        bound=Bound(
            "min_single_gpu_vram_gb", "--min-single-gpu-vram", "min",
            "Free VRAM on one single GPU, GB (one job, one device).", "best GPU", "GB", *_GB,
        ),
    ),
    Metric(
        "gpu_temperature_max_c",
        float,
        "the hottest GPU's temperature, °C (null: no GPU reported one)",
        read=hottest_gpu,
        bound=Bound(
            "max_gpu_temperature_c", "--max-gpu-temp", "max",
            "The hottest GPU at most this warm, °C.", "hottest GPU", "°C",
            limits.TEMPERATURE_C_MIN, limits.TEMPERATURE_C_MAX,
        ),
    ),
    Metric("gpu_count", int, default=0),
    Metric("gpu_type", str, default="none", api_type=GpuType),
)  # fmt: skip

REGISTRY = tuple(m for m in METRICS if m.registry)
HISTORY = tuple(m for m in METRICS if m.history)
BOUNDS = tuple((m, m.bound) for m in METRICS if m.bound is not None)


def check_fields(metrics: tuple[Metric, ...], fields: Collection[str]) -> None:
    """A metric read from `Resources` by name must be one of its fields: a misspelling
    fails at import (`schemas.heartbeat` checks `METRICS`), not as a NULL column."""
    for m in metrics:
        if m.read is None and m.name not in fields:
            raise ValueError(f"metric {m.name!r} is not a field of Resources")
