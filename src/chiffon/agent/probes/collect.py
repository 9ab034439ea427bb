"""One snapshot of this machine: host numbers plus every GPU backend, each time-bounded.

GPU backends run concurrently, each in a daemon thread with one shared deadline, so a
pass takes at most about the GPU timeout however many drivers hang. A backend still
blocked from an earlier pass is skipped (and named in `probe_errors`) until it answers,
so hung driver calls never pile up threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from chiffon.agent.bounded import BackgroundCall
from chiffon.agent.probes.amd import AmdSmiProbe, AmdSysfsProbe
from chiffon.agent.probes.common import PartialRead, ProbeError
from chiffon.agent.probes.host import read_host
from chiffon.agent.probes.nvidia_smi import NvidiaSmiProbe
from chiffon.agent.probes.nvml import NvmlProbe, NvmlUnavailable
from chiffon.agent.probes.pci import PciProbe
from chiffon.agent.report import GpuReading, Snapshot
from chiffon.schemas.limits import clean_text, gpu_type_of

log = logging.getLogger(__name__)

# Extra wait for a killed nvidia-smi to report its own timeout before we give up on it.
SUBPROCESS_GRACE_SECONDS = 0.25
MAX_ERROR_CHARS = 255


def _error(exc: object) -> str:
    """A probe's error as `probe_errors` carries it: the driver's text, controls blanked."""
    return clean_text(str(exc))[:MAX_ERROR_CHARS]


class GpuProbe(Protocol):
    name: str

    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class FirstAvailable:
    """A vendor's backends in order: NVML, then nvidia-smi once NVML proves unusable."""

    def __init__(self, name: str, primary: NvmlProbe, fallback: GpuProbe) -> None:
        self.name = name
        self._primary: NvmlProbe | None = primary
        self._fallback = fallback

    def read(self) -> list[GpuReading]:
        if self._primary is not None:
            try:
                return self._primary.read()
            except NvmlUnavailable as exc:
                # No NVIDIA driver at all is how most machines without an NVIDIA GPU are:
                # not worth a line at start-up. A driver that fails to start is.
                level = logging.DEBUG if exc.absent else logging.WARNING
                log.log(level, "%s; using %s instead", exc, self._fallback.name)
                self._primary = None
        return self._fallback.read()

    def close(self) -> None:
        if self._primary is not None:
            self._primary.close()
        self._fallback.close()


class BoundedProbe:
    """A probe whose calls run in a daemon thread; at most one call in flight."""

    def __init__(self, probe: GpuProbe) -> None:
        self.probe = probe
        self.name = probe.name
        self._pending: BackgroundCall[list[GpuReading]] | None = None

    def start(self) -> BackgroundCall[list[GpuReading]]:
        pending = self._pending
        if pending is not None and not pending.done:
            stuck_seconds = time.monotonic() - pending.started_at
            raise ProbeError(f"skipped: still blocked in the driver after {stuck_seconds:.0f} s")
        self._pending = BackgroundCall(self.probe.read, name=f"chiffon-probe-{self.name}")
        return self._pending

    def finish(self, call: BackgroundCall[list[GpuReading]], deadline: float) -> list[GpuReading]:
        if not call.wait(deadline - time.monotonic()):
            raise ProbeError("timed out; skipped until the driver answers")
        self._pending = None
        try:
            return call.result()
        except ProbeError:
            raise
        except Exception as exc:  # a driver binding raising something unexpected
            raise ProbeError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        """Release the driver, unless a call is still blocked in it (that would hang too)."""
        if self._pending is None or self._pending.done:
            self.probe.close()


def default_gpu_probes(
    *, timeout_seconds: float, sysfs_root: Path = Path("/sys"), nvidia_smi: str = "nvidia-smi"
) -> list[GpuProbe]:
    """NVIDIA (NVML, else nvidia-smi), AMD (amdsmi, else sysfs), then Intel and others."""
    smi = NvidiaSmiProbe(timeout_seconds=timeout_seconds, executable=nvidia_smi)
    amd: GpuProbe = AmdSmiProbe.load() or AmdSysfsProbe(sysfs_root=sysfs_root)
    return [
        FirstAvailable("nvidia", NvmlProbe(), smi),
        _Renamed("amd", amd),
        _Renamed("pci", PciProbe(sysfs_root=sysfs_root)),
    ]


class _Renamed:
    """A probe under the vendor name users see in `probe_errors`."""

    def __init__(self, name: str, probe: GpuProbe) -> None:
        self.name = name
        self._probe = probe

    def read(self) -> list[GpuReading]:
        return self._probe.read()

    def close(self) -> None:
        self._probe.close()


def gpu_aggregates(gpus: Sequence[GpuReading], *, failed: bool) -> dict[str, Any]:
    """The seeds' sums over GPUs whose VRAM was read, plus the largest free single GPU.

    GPUs of unknown VRAM add nothing (a lower bound, never an invented number). With no
    GPU read at all: 0 when every backend answered, unknown when one failed.
    """
    known, free = _vram(gpus)
    absent: float | None = None if failed or gpus else 0.0
    return {
        "gpus": list(gpus),
        "gpu_count": len(gpus),
        "gpu_type": gpu_type_of({g.vendor for g in gpus}),
        "gpu_vram_total_gb": _sum(known, absent),
        "gpu_vram_available_gb": _sum(free, absent),
        "gpu_vram_available_max_gb": max(free) if free else absent,
    }


def _vram(gpus: Sequence[GpuReading]) -> tuple[list[float], list[float]]:
    """The total VRAM of each GPU whose VRAM was read, and the free VRAM of those that say."""
    read = [g for g in gpus if g.vram_total_gb is not None]
    known = [g.vram_total_gb or 0.0 for g in read]
    return known, [g.vram_free_gb for g in read if g.vram_free_gb is not None]


def _sum(numbers: list[float], absent: float | None) -> float | None:
    return round(sum(numbers), 3) if numbers else absent


class Collector:
    """Builds `Snapshot`s of this machine; `collect()` blocks for at most about the GPU timeout."""

    def __init__(
        self,
        gpu_probes: Sequence[GpuProbe],
        *,
        timeout_seconds: float,
        owner_idle: Callable[[], tuple[float | None, str | None]] | None = None,
    ) -> None:
        self._probes = [BoundedProbe(p) for p in gpu_probes]
        self.timeout_seconds = timeout_seconds
        self._owner_idle = owner_idle
        self.owner_idle_unknown_because: str | None = None  # what `chiffon probe` says

    def _gpus(self, errors: dict[str, str]) -> list[GpuReading]:
        calls = {}
        for probe in self._probes:
            try:
                calls[probe.name] = (probe, probe.start())
            except ProbeError as exc:
                errors[probe.name] = _error(exc)
        deadline = time.monotonic() + self.timeout_seconds + SUBPROCESS_GRACE_SECONDS
        gpus: list[GpuReading] = []
        for name, (probe, call) in calls.items():
            try:
                gpus.extend(probe.finish(call, deadline))
            except PartialRead as exc:  # what was read counts; what failed is named
                gpus.extend(exc.gpus)
                errors[name] = _error(exc)
            except ProbeError as exc:
                errors[name] = _error(exc)
        return gpus

    def _host(self, errors: dict[str, str]) -> dict[str, Any]:
        try:
            reading = read_host()
        except Exception as exc:  # psutil raising on an odd platform: unknown, not fatal
            errors["host"] = _error(f"{type(exc).__name__}: {exc}")
            return {}
        return asdict(reading)

    def collect(self) -> Snapshot:
        started = time.perf_counter()
        errors: dict[str, str] = {}
        host = self._host(errors)
        gpus = self._gpus(errors)
        for name, error in errors.items():
            log.warning("probe %s: %s", name, error)
        idle = None
        if self._owner_idle is not None:
            idle, self.owner_idle_unknown_because = self._owner_idle()
        return Snapshot(
            **host,
            **gpu_aggregates(gpus, failed=any(k != "host" for k in errors)),
            probe_errors=errors,
            collection_ms=round((time.perf_counter() - started) * 1000, 3),
            owner_idle_seconds=idle,
        )

    def close(self) -> None:
        for probe in self._probes:
            probe.close()
