"""The PostgreSQL engine's pool: the same few connections serve a light load."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from chiffon.persistence import db


async def test_after_a_burst_sequential_work_stays_on_one_connection(postgres_url: str) -> None:
    # A burst (e.g. many agents enrolling at once) grows the pool; afterwards ingest's one
    # transaction at a time must keep reusing the most recent connection, not cycle
    # through all of them (docs/performance.md, "What each optimisation changed", item 5).
    engine = db.create_engine(postgres_url)
    try:
        held = [await engine.connect() for _ in range(5)]
        burst_pids = {(await c.execute(text("SELECT pg_backend_pid()"))).scalar_one() for c in held}
        assert len(burst_pids) == 5
        for conn in held:
            await conn.close()
        pids = []
        for _ in range(5):
            async with engine.connect() as conn:
                pids.append((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await asyncio.sleep(0)
        assert len(set(pids)) == 1, pids
        assert pids[0] in burst_pids
    finally:
        await engine.dispose()
