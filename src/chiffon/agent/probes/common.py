"""Shared by the probe backends: the error they raise and unit conversions."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from chiffon.schemas.heartbeat import GpuInfo, GpuVendor

BYTES_PER_GB = 1e9  # GB on the wire are 10^9 bytes (docs/protocol.md)
BYTES_PER_MIB = 1024 * 1024


class ProbeError(RuntimeError):
    """A probe that could not read what it should have; named in `probe_errors`."""


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
) -> GpuInfo:
    """A validated `GpuInfo`; a driver answer the schema refuses becomes a `ProbeError`."""
    try:
        return GpuInfo(
            index=index,
            vendor=vendor,
            name=name.strip()[:255] or None if name else None,
            uuid=uuid.strip()[:128] or None if uuid else None,
            vram_total_gb=gb(vram_total_bytes),
            vram_free_gb=gb(vram_free_bytes),
            utilization_percent=utilization_percent,
            temperature_c=temperature_c,
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ProbeError(f"gpu {index}: implausible driver answer: {first['msg']}") from None


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
