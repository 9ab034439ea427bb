"""Build heartbeat messages the way an agent would."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from chiffon.schemas.heartbeat import AgentMessage, GpuInfo, Resources

_seq = itertools.count(1)


def resources(
    *,
    gpus_free_total: list[tuple[float, float]] = (),  # type: ignore[assignment]
    cores_physical: int = 8,
    load_1min: float = 1.0,
    memory_available_gb: float = 16.0,
    memory_total_gb: float = 32.0,
    vendor: str = "nvidia",
    temperatures: Sequence[float | None] = (),  # per GPU, in order; unknown past the end
    **overrides: Any,
) -> Resources:
    gpus = [
        GpuInfo(
            index=i,
            vendor=vendor,  # type: ignore[arg-type]
            name=f"GPU {i}",
            vram_free_gb=free,
            vram_total_gb=total,
            temperature_c=temperatures[i] if i < len(temperatures) else None,
        )
        for i, (free, total) in enumerate(gpus_free_total)
    ]
    fields: dict[str, Any] = {
        "cpu_load_1min": load_1min,
        "cpu_load_5min": load_1min,
        "cpu_load_15min": load_1min,
        "cpu_cores_physical": cores_physical,
        "cpu_cores_logical": cores_physical * 2,
        "cpu_cores_available": max(0, int(cores_physical - load_1min)),
        "memory_percent": round(100 * (1 - memory_available_gb / memory_total_gb), 1),
        "memory_available_gb": memory_available_gb,
        "memory_total_gb": memory_total_gb,
        "gpus": gpus,
        "gpu_count": len(gpus),
        "gpu_type": vendor if gpus else "none",
        "gpu_vram_total_gb": sum(t for _, t in gpus_free_total) if gpus else 0.0,
        "gpu_vram_available_gb": sum(f for f, _ in gpus_free_total) if gpus else 0.0,
        "gpu_vram_available_max_gb": max((f for f, _ in gpus_free_total), default=0.0),
    }
    fields.update(overrides)
    return Resources(**fields)


def message(
    agent_id: uuid.UUID | None = None,
    *,
    kind: str = "heartbeat",
    boot_id: uuid.UUID | None = None,
    seq: int | None = None,
    sent_at: datetime | None = None,
    name: str = "desk",
    agent_type: str = "desktop",
    pool_name: str = "desktop_pool_1",
    res: Resources | None = None,
) -> AgentMessage:
    return AgentMessage(
        schema_version=1,
        kind=kind,  # type: ignore[arg-type]
        agent_id=agent_id or uuid.uuid4(),
        boot_id=boot_id or uuid.UUID(int=1),
        seq=next(_seq) if seq is None else seq,
        sent_at=sent_at or datetime.now(UTC),
        name=name,
        agent_type=agent_type,
        pool_name=pool_name,
        resources=(res or resources()) if kind == "heartbeat" else None,
    )


def raw(msg: AgentMessage) -> bytes:
    return msg.model_dump_json().encode()


def later(dt: datetime, seconds: float) -> datetime:
    return dt + timedelta(seconds=seconds)
