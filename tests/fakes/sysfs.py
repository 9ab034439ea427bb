"""A fake /sys tree with DRM cards, as amdgpu, i915 and others lay it out."""

from __future__ import annotations

from pathlib import Path

AMD, INTEL, NVIDIA = 0x1002, 0x8086, 0x10DE


def add_card(
    root: Path,
    number: int,
    *,
    vendor: int,
    vram_total: int | None = None,
    vram_used: int | None = None,
    busy_percent: int | None = None,
    product_name: str | None = None,
    temp_millidegrees: int | None = None,
) -> Path:
    """`root/class/drm/cardN/device/...` plus a connector entry, like the real tree."""
    drm = root / "class" / "drm"
    device = drm / f"card{number}" / "device"
    device.mkdir(parents=True)
    (drm / f"card{number}-DP-1").mkdir()  # connectors must not count as GPUs
    (device / "vendor").write_text(f"0x{vendor:04x}\n")
    files = {
        "mem_info_vram_total": vram_total,
        "mem_info_vram_used": vram_used,
        "gpu_busy_percent": busy_percent,
        "product_name": product_name,
    }
    for name, value in files.items():
        if value is not None:
            (device / name).write_text(f"{value}\n")
    if temp_millidegrees is not None:
        hwmon = device / "hwmon" / "hwmon3"
        hwmon.mkdir(parents=True)
        (hwmon / "temp1_input").write_text(f"{temp_millidegrees}\n")
    return device
