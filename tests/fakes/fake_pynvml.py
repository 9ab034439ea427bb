"""A stand-in for the `pynvml` module: the calls the agent makes, on configurable GPUs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0


# Names and signatures follow pynvml exactly, so the agent cannot tell the difference.
class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_Timeout(NVMLError):
    pass


nvmlEventTypeXidCriticalError = 0x8


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total_bytes: int = 24 * 1024**3
    free_bytes: int = 20 * 1024**3
    utilization: int | None = 7  # None: not supported on this card
    temperature: int | None = 41
    failing: dict[str, str] = field(default_factory=dict)  # NVML function -> its NVMLError
    # (pid, bytes used; None: the driver does not say) of each process, compute and graphics
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)


def _fail(handle: FakeGpu, function: str) -> None:
    if function in handle.failing:
        raise NVMLError(handle.failing[function])


@dataclass
class State:
    gpus: list[FakeGpu] = field(default_factory=list)
    missing_library: bool = False
    init_calls: int = 0
    memory_calls: int = 0
    hang: threading.Event | None = None  # when set: memory queries block until it is set
    xids: list[tuple[int, int]] = field(default_factory=list)  # (GPU index, XID) to report
    registered: set[int] = field(default_factory=set)  # GPU indexes watched for XIDs


state = State()


def reset(gpus: list[FakeGpu] | None = None, *, missing_library: bool = False) -> State:
    global state
    state = State(gpus=list(gpus or []), missing_library=missing_library)
    return state


def nvmlInit() -> None:
    state.init_calls += 1
    if state.missing_library:
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(state.gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> FakeGpu:
    _fail(state.gpus[index], "nvmlDeviceGetHandleByIndex")
    return state.gpus[index]


def nvmlDeviceGetName(handle: FakeGpu) -> str:
    return handle.name


def nvmlDeviceGetUUID(handle: FakeGpu) -> bytes:
    return handle.uuid.encode()  # older nvidia-ml-py versions return bytes


def nvmlDeviceGetMemoryInfo(handle: FakeGpu) -> Any:
    state.memory_calls += 1
    _fail(handle, "nvmlDeviceGetMemoryInfo")
    if state.hang is not None:
        state.hang.wait()
    used = handle.total_bytes - handle.free_bytes
    return SimpleNamespace(total=handle.total_bytes, free=handle.free_bytes, used=used)


def nvmlDeviceGetUtilizationRates(handle: FakeGpu) -> Any:
    _fail(handle, "nvmlDeviceGetUtilizationRates")
    if handle.utilization is None:
        raise NVMLError_NotSupported("Not Supported")
    return SimpleNamespace(gpu=handle.utilization, memory=0)


def nvmlDeviceGetTemperature(handle: FakeGpu, sensor: int) -> int:
    _fail(handle, "nvmlDeviceGetTemperature")
    if handle.temperature is None:
        raise NVMLError_NotSupported("Not Supported")
    return handle.temperature


NVML_VALUE_NOT_AVAILABLE = 2**64 - 1


def _listed(processes: list[tuple[int, int | None]]) -> list[Any]:
    return [
        SimpleNamespace(pid=pid, usedGpuMemory=NVML_VALUE_NOT_AVAILABLE if used is None else used)
        for pid, used in processes
    ]


def nvmlDeviceGetComputeRunningProcesses(handle: FakeGpu) -> list[Any]:
    _fail(handle, "nvmlDeviceGetComputeRunningProcesses")
    return _listed(handle.compute)


def nvmlDeviceGetGraphicsRunningProcesses(handle: FakeGpu) -> list[Any]:
    _fail(handle, "nvmlDeviceGetGraphicsRunningProcesses")
    return _listed(handle.graphics)


def nvmlEventSetCreate() -> object:
    return object()


def nvmlDeviceRegisterEvents(handle: FakeGpu, event_types: int, event_set: object) -> None:
    _fail(handle, "nvmlDeviceRegisterEvents")
    state.registered.add(state.gpus.index(handle))


def nvmlEventSetWait_v2(event_set: object, timeout_ms: int) -> Any:
    pending = [(i, x) for i, x in state.xids if i in state.registered]
    if not pending:
        raise NVMLError_Timeout("Timeout")
    state.xids.remove(pending[0])
    index, xid = pending[0]
    return SimpleNamespace(
        device=state.gpus[index], eventType=nvmlEventTypeXidCriticalError, eventData=xid
    )
