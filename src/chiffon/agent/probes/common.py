"""Shared by the probe backends: the error they raise and unit conversions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chiffon.agent.report import GpuReading
from chiffon.schemas import limits
from chiffon.schemas.limits import GpuVendor

BYTES_PER_GB = 1e9  # GB on the wire are 10^9 bytes (docs/protocol.md)
BYTES_PER_MIB = 1024 * 1024


class ProbeError(RuntimeError):
    """A probe that could not read what it should have; named in `probe_errors`."""


class PartialRead(ProbeError):
    """Part of a read failed (one GPU, or one number of one GPU): `gpus` holds what was
    read, with `None` where a number failed, and the message names each failure. One
    failing call never costs the readings of healthy GPUs."""

    def __init__(self, gpus: list[GpuReading], problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.gpus = gpus


def gpu_or_bare(problems: list[str], **reading: Any) -> GpuReading:
    """`make_gpu(**reading)`, or, when the driver's numbers are implausible, the GPU with
    its numbers unknown (it exists: it still counts) and the reason added to `problems`."""
    try:
        return make_gpu(**reading)
    except ProbeError as exc:
        problems.append(str(exc))
        return make_gpu(
            index=reading["index"],
            vendor=reading["vendor"],
            name=reading.get("name"),
            uuid=reading.get("uuid"),
        )


def gb(num_bytes: float | None) -> float | None:
    """Bytes to GB, rounded to the MB; `None` stays unknown."""
    return None if num_bytes is None else round(num_bytes / BYTES_PER_GB, 3)


def make_gpu(
    *,
    index: int,
    vendor: GpuVendor,
    name: str | None = None,
    uuid: str | None = None,
    vram_total_bytes: float | None = None,
    vram_free_bytes: float | None = None,
    utilization_percent: float | None = None,
    temperature_c: float | None = None,
) -> GpuReading:
    """A checked `GpuReading`; a driver answer outside the wire's bounds is a `ProbeError`."""
    try:
        return GpuReading(
            index=index,
            vendor=vendor,
            name=_text(name, limits.TEXT_MAX_CHARS),
            uuid=_text(uuid, limits.GPU_UUID_MAX_CHARS),
            vram_total_gb=gb(vram_total_bytes),
            vram_free_gb=gb(vram_free_bytes),
            utilization_percent=utilization_percent,
            temperature_c=temperature_c,
        )
    except ValueError as exc:
        raise ProbeError(f"gpu {index}: implausible driver answer: {exc}") from None


def _text(value: str | None, max_chars: int) -> str | None:
    """A driver's string as the wire takes it: controls blanked, trimmed, bounded."""
    return limits.clean_text(value).strip()[:max_chars] or None if value else None


def read_text(path: Path) -> str | None:
    """A small sysfs/procfs file stripped, or `None` when absent or unreadable."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_number(path: Path) -> float | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return float(int(text, 0))
    except ValueError:
        return None
