"""GPUs found by PCI vendor id under /sys/class/drm (Linux only; elsewhere: none).

Intel and other vendors have no VRAM counter common to their drivers; a card is listed
with the memory its driver exposes (the amdgpu-style `mem_info_vram_*` files) or with
unknown VRAM, never an invented number.
"""

from __future__ import annotations

import re
from pathlib import Path

from chiffon.agent.probes.common import make_gpu, read_number, read_text
from chiffon.agent.report import GpuReading
from chiffon.schemas.limits import GpuVendor

PCI_VENDORS: dict[int, GpuVendor] = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel"}
_CARD = re.compile(r"card(\d+)$")


def drm_cards(sysfs_root: Path) -> list[tuple[int, Path]]:
    """(card number, its PCI device directory), in card order; connectors are skipped."""
    drm = sysfs_root / "class" / "drm"
    try:
        entries = list(drm.iterdir())
    except OSError:  # no /sys: macOS, Windows, containers without it
        return []
    cards = []
    for entry in entries:
        match = _CARD.match(entry.name)
        if match and (entry / "device").is_dir():
            cards.append((int(match.group(1)), entry / "device"))
    return sorted(cards)


def vendor_of(device: Path) -> GpuVendor | None:
    """The vendor from the PCI id; `None` when the file is missing or unreadable."""
    vendor_id = read_number(device / "vendor")
    if vendor_id is None:
        return None
    return PCI_VENDORS.get(int(vendor_id), "other")


def vram_bytes(device: Path) -> tuple[float | None, float | None]:
    """(total, free) from the amdgpu-style counters, each `None` when not exposed."""
    total = read_number(device / "mem_info_vram_total")
    used = read_number(device / "mem_info_vram_used")
    free = None if total is None or used is None else max(0.0, total - used)
    return total, free


class PciProbe:
    """Cards of the vendors in `vendors` (default: Intel and unknown vendors)."""

    name = "pci"

    def __init__(
        self,
        *,
        sysfs_root: Path = Path("/sys"),
        vendors: frozenset[GpuVendor] = frozenset({"intel", "other"}),
    ) -> None:
        self.sysfs_root = sysfs_root
        self.vendors = vendors

    def read(self) -> list[GpuReading]:
        gpus: list[GpuReading] = []
        for _card, device in drm_cards(self.sysfs_root):
            vendor = vendor_of(device)
            if vendor not in self.vendors:
                continue
            total, free = vram_bytes(device)
            gpus.append(
                make_gpu(
                    index=sum(g.vendor == vendor for g in gpus),
                    vendor=vendor,
                    name=read_text(device / "product_name") or read_text(device / "label"),
                    vram_total_bytes=total,
                    vram_free_bytes=free,
                )
            )
        return gpus

    def close(self) -> None:
        pass
