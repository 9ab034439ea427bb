"""NVIDIA GPUs through NVML (nvidia-ml-py). The only module that imports `pynvml`.

NVML is initialised once and kept for the life of the agent: an init per heartbeat costs
milliseconds and churns driver state. Static facts (name, UUID) are read once per device.
Every query goes through `_query`, which turns "not supported" into `None`; a failing call
of one GPU makes only that number unknown (`PartialRead`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from chiffon.agent.probes.common import PartialRead, ProbeError, gpu_or_bare
from chiffon.agent.report import GpuReading

# NVML's NVML_VALUE_NOT_AVAILABLE for a process's memory, as an unsigned long long.
_NOT_AVAILABLE = 2**64 - 1
# A GPU that reported a critical XID error reads `unhealthy` this long after the last one.
XID_HOLD_SECONDS = 300.0
_MOST_EVENTS_PER_READ = 64


class NvmlUnavailable(ProbeError):
    """No usable NVML here (library or driver missing): try the next backend. `absent`:
    there is no NVIDIA driver library at all, the normal state of a machine without an
    NVIDIA GPU, which is no error."""

    def __init__(self, message: str, *, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    name = "nvml"

    def __init__(
        self, module: ModuleType | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._nvml = module
        self._clock = clock
        self._ready = False
        self._static: dict[int, tuple[Any, str | None, str | None]] = {}
        self._events: Any = None  # NVML's event set for XID errors, once registered
        self._watched: set[int] = set()
        self._xids: dict[str, tuple[int, float]] = {}  # GPU UUID -> (last XID, when)

    def _load(self) -> ModuleType:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NvmlUnavailable(f"nvidia-ml-py is not installed: {exc}") from None
        return self._nvml

    def _init(self) -> ModuleType:
        nvml = self._load()
        if not self._ready:
            try:
                nvml.nvmlInit()
            except nvml.NVMLError_LibraryNotFound:
                raise NvmlUnavailable("no NVIDIA driver library (NVML)", absent=True) from None
            except nvml.NVMLError as exc:
                raise NvmlUnavailable(f"NVML init failed: {exc}") from None
            self._ready = True
        return nvml

    def _query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call; "not supported" (common on consumer cards) means unknown."""
        nvml = self._load()
        try:
            return fn(*args)
        except nvml.NVMLError_NotSupported:
            return None
        except nvml.NVMLError as exc:
            raise ProbeError(f"{fn.__name__}: {exc}") from None

    def _field(self, problems: list[str], index: int, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call of one GPU whose failure (`GPU is lost`, `FunctionNotFound` on a
        driver/library mismatch) makes that number unknown and nothing else."""
        try:
            return self._query(fn, *args)
        except ProbeError as exc:
            problems.append(f"gpu {index} {exc}")
            return None

    def _device(self, index: int, problems: list[str]) -> tuple[Any, str | None, str | None]:
        if index not in self._static:
            nvml = self._load()
            handle = self._field(problems, index, nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:  # not cached: asked again next pass
                return None, None, None
            name = self._field(problems, index, nvml.nvmlDeviceGetName, handle)
            uuid = self._field(problems, index, nvml.nvmlDeviceGetUUID, handle)
            self._static[index] = (
                handle,
                None if name is None else _text(name),
                None if uuid is None else _text(uuid),
            )
        return self._static[index]

    def _watch_xids(self, index: int, handle: Any) -> None:
        """Register the GPU for critical XID events (once); a driver that cannot is left
        unwatched (the other signs of a failing GPU still count)."""
        nvml = self._load()
        if index in self._watched or not hasattr(nvml, "nvmlEventSetCreate"):
            return
        self._watched.add(index)
        try:
            if self._events is None:
                self._events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
        except nvml.NVMLError:
            pass

    def _drain_xids(self) -> None:
        """Take the XID events NVML has queued, without waiting."""
        nvml = self._load()
        if self._events is None:
            return
        for _ in range(_MOST_EVENTS_PER_READ):
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
                uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
            except nvml.NVMLError:  # Timeout: none left
                return
            self._xids[uuid] = (int(event.eventData), self._clock())

    def _fault(self, uuid: str | None, problems: list[str]) -> str | None:
        """Why this GPU reads unhealthy: the driver lost it or fails its basic queries
        (`problems` holds this GPU's failures of this read), or a recent XID error."""
        for problem in problems:
            if any(word in problem for word in ("GetMemoryInfo", "GetHandle", "lost", "reset")):
                return problem[:200]
        xid = self._xids.get(uuid or "")
        if xid is not None and self._clock() - xid[1] < XID_HOLD_SECONDS:
            return f"XID {xid[0]} (a critical error reported by the driver)"
        return None

    def _read_one(self, index: int, all_problems: list[str]) -> GpuReading:
        nvml = self._load()
        problems: list[str] = []
        try:
            return self._read_gpu(nvml, index, problems)
        finally:
            all_problems += problems

    def _read_gpu(self, nvml: ModuleType, index: int, problems: list[str]) -> GpuReading:
        handle, name, uuid = self._device(index, problems)
        if handle is None:
            bare = gpu_or_bare(problems, index=index, vendor="nvidia")
            return dataclasses.replace(bare, fault=self._fault(None, problems))
        self._watch_xids(index, handle)
        memory = self._field(problems, index, nvml.nvmlDeviceGetMemoryInfo, handle)
        rates = self._field(problems, index, nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = self._field(
            problems, index, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        gpu = gpu_or_bare(
            problems,
            index=index,
            vendor="nvidia",
            name=name,
            uuid=uuid,
            vram_total_bytes=None if memory is None else memory.total,
            vram_free_bytes=None if memory is None else memory.free,
            utilization_percent=None if rates is None else float(rates.gpu),
            temperature_c=None if temperature is None else float(temperature),
        )
        processes = self._processes(handle, index, problems)
        return dataclasses.replace(gpu, processes=processes, fault=self._fault(uuid, problems))

    def _processes(
        self, handle: Any, index: int, problems: list[str]
    ) -> tuple[tuple[int, float], ...] | None:
        """Every process holding memory on the GPU, (pid, GB): NVML's compute and graphics
        lists. None (unknown) when either list, or one process's memory, cannot be read
        (the driver hides it: no per-process accounting, another user's container)."""
        nvml = self._load()
        held: dict[int, float] = {}
        for fn in (nvml.nvmlDeviceGetComputeRunningProcesses,
                   nvml.nvmlDeviceGetGraphicsRunningProcesses):  # fmt: skip
            listed = self._field(problems, index, fn, handle)
            if listed is None:
                return None
            for process in listed:
                used = getattr(process, "usedGpuMemory", None)
                if not isinstance(used, int) or used < 0 or used >= _NOT_AVAILABLE:
                    return None
                held[int(process.pid)] = max(held.get(int(process.pid), 0.0), used / 1e9)
        return tuple((pid, round(gb, 3)) for pid, gb in sorted(held.items()))

    def read(self) -> list[GpuReading]:
        nvml = self._init()
        count = self._query(nvml.nvmlDeviceGetCount) or 0
        self._drain_xids()
        problems: list[str] = []
        gpus = [self._read_one(i, problems) for i in range(count)]
        if problems:
            raise PartialRead(gpus, problems)
        return gpus

    def close(self) -> None:
        if self._ready and self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):  # shutting down anyway
                self._nvml.nvmlShutdown()
            self._ready = False
