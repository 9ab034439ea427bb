"""Agents that accept jobs, for the scheduler and job lifecycle tests."""

from __future__ import annotations

import uuid

from chiffon.orchestrator.service import Orchestrator
from tests import factories as f


async def desktop(
    orch: Orchestrator, name: str, *gpus: tuple[float, float], accepts: bool = True,
    cores: int = 8, pool: str = "desktop_pool_1", withheld: dict[int, str] | None = None,
    agent: uuid.UUID | None = None,
) -> uuid.UUID:  # fmt: skip
    """An online agent with GPUs (free, total GB) named `GPU-<name>-<i>`; `withheld`: the
    reason each of those GPUs (by index) is kept from new jobs (docs/owner.md). With
    `agent`: that agent's next heartbeat."""
    agent = agent or uuid.uuid4()
    res = f.resources(gpus_free_total=list(gpus), cores_physical=cores, load_1min=0.0)
    named = [g.model_copy(update={"uuid": f"GPU-{name}-{g.index}",
                                  "withheld": (withheld or {}).get(g.index)})
             for g in res.gpus]  # fmt: skip
    msg = f.message(agent, name=name, pool_name=pool, res=res.model_copy(update={"gpus": named}))
    assert await orch.receive(msg.model_copy(update={"accepts_jobs": accepts})) == "applied"
    return agent
