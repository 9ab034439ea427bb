"""The psutil adapter: CPU load, cores and memory. The only module that imports psutil.

psutil covers Linux, macOS and Windows; anything it may lack on a platform is guarded
with `hasattr` and reported as unknown rather than crashing the probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil

from chiffon.agent.probes.common import gb


@dataclass(frozen=True, slots=True)
class HostReading:
    cpu_load_1min: float | None
    cpu_load_5min: float | None
    cpu_load_15min: float | None
    cpu_cores_physical: int | None
    cpu_cores_logical: int | None
    cpu_cores_available: int | None
    memory_percent: float | None
    memory_available_gb: float | None
    memory_total_gb: float | None


def cores_available(physical: int | None, load_1min: float | None) -> int | None:
    """Whole cores left after the 1-minute load: `max(0, floor(physical - load_1min))`.

    The seeds used `max(1, ...)`, which tells the scheduler a saturated desktop still has a
    free core; a busy machine must be able to say 0.
    """
    if physical is None or load_1min is None:
        return None
    return max(0, math.floor(physical - load_1min))


def load_averages() -> tuple[float, float, float] | None:
    if not hasattr(psutil, "getloadavg"):
        return None
    one, five, fifteen = psutil.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def core_counts() -> tuple[int | None, int | None]:
    """(physical, logical); physical falls back to logical when the OS does not say."""
    logical = psutil.cpu_count(logical=True)
    physical = psutil.cpu_count(logical=False) or logical
    return physical, logical


def read_host() -> HostReading:
    loads = load_averages()
    physical, logical = core_counts()
    memory = psutil.virtual_memory()
    return HostReading(
        cpu_load_1min=loads[0] if loads else None,
        cpu_load_5min=loads[1] if loads else None,
        cpu_load_15min=loads[2] if loads else None,
        cpu_cores_physical=physical,
        cpu_cores_logical=logical,
        cpu_cores_available=cores_available(physical, loads[0] if loads else None),
        memory_percent=round(memory.percent, 1),
        memory_available_gb=gb(memory.available),
        memory_total_gb=gb(memory.total),
    )
