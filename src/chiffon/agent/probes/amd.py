"""AMD GPUs: amdsmi when importable, else the amdgpu sysfs counters (Linux only).

The only module that imports `amdsmi`. Every amdsmi call goes through `_query`, which
turns a failed or unsupported query into `None`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from chiffon.agent.probes.common import BYTES_PER_MIB, ProbeError, make_gpu, read_number, read_text
from chiffon.agent.probes.pci import drm_cards, vendor_of, vram_bytes
from chiffon.agent.report import GpuReading


def hwmon_temperature_c(device: Path) -> float | None:
    """The first hwmon `temp1_input` (millidegrees C), if the driver exposes one."""
    try:
        monitors = sorted((device / "hwmon").glob("hwmon*/temp1_input"))
    except OSError:
        return None
    millidegrees = read_number(monitors[0]) if monitors else None
    return None if millidegrees is None else millidegrees / 1000


class AmdSysfsProbe:
    name = "amd-sysfs"

    def __init__(self, *, sysfs_root: Path = Path("/sys")) -> None:
        self.sysfs_root = sysfs_root

    def read(self) -> list[GpuReading]:
        gpus: list[GpuReading] = []
        for _card, device in drm_cards(self.sysfs_root):
            if vendor_of(device) != "amd":
                continue
            total, free = vram_bytes(device)
            gpus.append(
                make_gpu(
                    index=len(gpus),
                    vendor="amd",
                    name=read_text(device / "product_name"),
                    uuid=read_text(device / "unique_id"),
                    vram_total_bytes=total,
                    vram_free_bytes=free,
                    utilization_percent=read_number(device / "gpu_busy_percent"),
                    temperature_c=hwmon_temperature_c(device),
                )
            )
        return gpus

    def close(self) -> None:
        pass


class AmdSmiProbe:
    """ROCm's amdsmi library. Not exercised by the test suite (no fake of it yet)."""

    name = "amdsmi"

    def __init__(self, module: ModuleType) -> None:
        self._smi = module
        self._ready = False

    @classmethod
    def load(cls) -> AmdSmiProbe | None:
        try:
            return cls(importlib.import_module("amdsmi"))
        except Exception:  # a broken ROCm install raises more than ImportError
            return None

    def _query(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._smi.AmdSmiException:
            return None

    def _read_one(self, index: int, handle: Any) -> GpuReading:
        smi = self._smi
        asic = self._query(smi.amdsmi_get_gpu_asic_info, handle) or {}
        vram = self._query(smi.amdsmi_get_gpu_vram_usage, handle) or {}
        activity = self._query(smi.amdsmi_get_gpu_activity, handle) or {}
        total_mib, used_mib = vram.get("vram_total"), vram.get("vram_used")
        return make_gpu(
            index=index,
            vendor="amd",
            name=asic.get("market_name"),
            uuid=self._query(smi.amdsmi_get_gpu_device_uuid, handle),
            vram_total_bytes=None if total_mib is None else total_mib * BYTES_PER_MIB,
            vram_free_bytes=(
                None
                if total_mib is None or used_mib is None
                else max(0, total_mib - used_mib) * BYTES_PER_MIB
            ),
            utilization_percent=_percent(activity.get("gfx_activity")),
        )

    def read(self) -> list[GpuReading]:
        smi = self._smi
        if not self._ready:
            try:
                smi.amdsmi_init()
            except smi.AmdSmiException as exc:
                raise ProbeError(f"amdsmi init failed: {exc}") from None
            self._ready = True
        handles = self._query(smi.amdsmi_get_processor_handles) or []
        return [self._read_one(i, h) for i, h in enumerate(handles)]

    def close(self) -> None:
        if self._ready:
            with contextlib.suppress(self._smi.AmdSmiException):
                self._smi.amdsmi_shut_down()
            self._ready = False


def _percent(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and 0 <= value <= 100 else None
