"""What `/readyz` reports: whether this orchestrator keeps the registry now."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from chiffon.transport.base import Receiver


async def readiness(
    engine: AsyncEngine,
    *,
    ingest_healthy: bool,
    stale_seconds: float | None,
    receivers: Iterable[Receiver],
) -> dict[str, str]:
    """One entry per check; ready when every one says "ok" or "hearing": the database
    answers, the last ingest write committed, the sweep keeps up (`stale_seconds` is
    None), and every receiver hears its agents."""
    checks = {"database": "ok", "ingest": "ok", "sweep": "ok"}
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (OSError, DBAPIError) as exc:
        checks["database"] = f"unavailable: {str(exc).splitlines()[0][:200]}"
    if not ingest_healthy:
        checks["ingest"] = "the last write failed"
    if stale_seconds is not None:
        checks["sweep"] = f"no completed sweep for {stale_seconds:.0f} s"
    for receiver in receivers:
        checks[receiver.name] = "hearing" if receiver.hearing else "not hearing"
    return checks
