"""The capacity answer net of claims, on both engines: the seeds' query stays true while
jobs run (a placed job's VRAM, cores and memory are not offered again), with the same
fields and parameters, the claims beside them, and the limit applied after the netting."""

from __future__ import annotations

import uuid
from typing import Any

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import JobRow
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit
from tests import factories as f
from tests.auth import API_HEADERS
from tests.conftest import api_client
from tests.jobfleet import desktop


async def place(
    orch: Orchestrator, clock: ManualClock, policy: str = "best_fit", **requirements: Any
) -> uuid.UUID:
    spec = JobSubmit.model_validate(
        {"command": ["train"], "requirements": requirements, "policy": policy}
    )
    job_id = await jobs.submit(orch.sessions, spec, now=clock.now())
    await orch.dispatcher.tick()
    return job_id


async def capacity(orch: Orchestrator, **query: Any) -> list[dict[str, Any]]:
    async with api_client(orch, API_HEADERS) as api:
        resp = await api.get("/api/v1/agents/available-capacity", params=query)
    assert resp.status_code == 200, resp.text
    found: list[dict[str, Any]] = resp.json()
    return found


async def test_a_placed_job_is_not_offered_again(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0), cores=8)
    [before] = await capacity(orchestrator)
    assert (before["gpu_vram_available_gb"], before["claims"]["jobs"]) == (24.0, 0)
    job_id = await place(orchestrator, clock, gpus=1, vram_gb=16, cpu_cores=2, memory_gb=4)
    [during] = await capacity(orchestrator)
    assert during["gpu_vram_available_gb"] == during["gpu_vram_available_max_gb"] == 8.0
    assert during["cpu_cores_available"] == before["cpu_cores_available"] - 2
    assert during["memory_available_gb"] == before["memory_available_gb"] - 4
    assert during["claims"] == {"jobs": 1, "cpu_cores": 2.0, "memory_gb": 4.0, "vram_gb": 16.0}
    # The seeds' query, unchanged: who has 10 GB free? No one, while the job holds 16.
    assert await capacity(orchestrator, min_gpu_vram_gb=10) == []
    async with api_client(orchestrator, API_HEADERS) as api:
        one = (await api.get(f"/api/v1/agents/{agent}/capacity")).json()
    assert one["gpu_vram_available_gb"] == 8.0 and one["claims"]["jobs"] == 1
    await orchestrator.report_attempt(agent, job_id, 1, Report("ended", "exit", exit_code=0))
    [after] = await capacity(orchestrator, min_gpu_vram_gb=10)
    assert after["gpu_vram_available_gb"] == 24.0 and after["claims"]["jobs"] == 0


async def test_memory_taken_by_something_else_counts_beside_the_claim(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    await place(orchestrator, clock, gpus=1, vram_gb=16)
    # Next heartbeat: 4 GB more in use on that GPU, and no per-process numbers: it may be
    # the job or a game, so it is counted as foreign *and* the claim stays whole.
    res = f.resources(gpus_free_total=[(20.0, 24.0)], cores_physical=8, load_1min=0.0)
    named = [g.model_copy(update={"uuid": "GPU-a-0"}) for g in res.gpus]
    beat = f.message(agent, name="a", res=res.model_copy(update={"gpus": named}))
    assert await orchestrator.receive(beat.model_copy(update={"accepts_jobs": True})) == "applied"
    [c] = await capacity(orchestrator)
    assert c["gpu_vram_available_gb"] == 4.0


async def test_the_limit_counts_only_agents_that_still_qualify(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "big", (24.0, 24.0))
    await desktop(orchestrator, "small", (12.0, 12.0))
    await place(orchestrator, clock, gpus=1, vram_gb=20, policy="spread")  # lands on big
    names = [c["name"] for c in await capacity(orchestrator, min_gpu_vram_gb=10, limit=1)]
    assert names == ["small"]  # big (4 GB left) first by what it sees, but it cannot
    ordered = [c["name"] for c in await capacity(orchestrator)]
    assert ordered == ["small", "big"]  # most free VRAM first, net of the claim


async def beat(orch: Orchestrator, agent: uuid.UUID, free: float, jobs_used: float | None) -> None:
    """A heartbeat of agent "a" with one 24 GB GPU: `free` GB free, of which its own jobs'
    processes hold `jobs_used` (None: it cannot see per-process use)."""
    res = f.resources(gpus_free_total=[(free, 24.0)], cores_physical=8, load_1min=0.0)
    gpu = res.gpus[0].model_copy(update={"uuid": "GPU-a-0", "jobs_vram_used_gb": jobs_used})
    msg = f.message(agent, name="a", res=res.model_copy(update={"gpus": [gpu]}))
    assert await orch.receive(msg.model_copy(update={"accepts_jobs": True})) == "applied"


async def use(orch: Orchestrator, agent: uuid.UUID, job_id: uuid.UUID, gb: float) -> None:
    said = Report("usage", vram_gb={"GPU-a-0": gb})
    assert await orch.report_attempt(agent, job_id, 1, said) == "applied"


async def test_a_job_growing_into_its_claim_and_past_it_is_never_double_booked(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await place(orchestrator, clock, gpus=1, vram_gb=8)
    await orchestrator.report_attempt(agent, job_id, 1, Report("started"))
    for seen_used, expected in [(2.0, 16.0), (8.0, 16.0), (12.0, 12.0)]:
        # its processes hold `seen_used`: the claim holds the larger of it and 8
        await beat(orchestrator, agent, free=24.0 - seen_used, jobs_used=seen_used)
        await use(orchestrator, agent, job_id, seen_used)
        [c] = await capacity(orchestrator)
        assert c["gpu_vram_available_gb"] == expected, (seen_used, c)
    # Placement follows the same ledger: 12 GB fits now, 13 would not.
    big = await place(orchestrator, clock, gpus=1, vram_gb=13)
    async with orchestrator.sessions() as s:
        waiting = await s.get(JobRow, big)
    assert waiting is not None and waiting.state == "queued" and "12.0 GB" in waiting.reason


async def test_a_foreign_process_taking_vram_between_two_heartbeats_is_respected(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await place(orchestrator, clock, gpus=1, vram_gb=8)
    await beat(orchestrator, agent, free=16.0, jobs_used=8.0)
    await use(orchestrator, agent, job_id, 8.0)
    [c] = await capacity(orchestrator)
    assert c["gpu_vram_available_gb"] == 16.0
    await beat(orchestrator, agent, free=10.0, jobs_used=8.0)  # a game took 6 GB
    [c] = await capacity(orchestrator)
    assert c["gpu_vram_available_gb"] == 10.0


async def test_the_fleet_summary_is_net_of_claims_too(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "a", (24.0, 24.0), cores=8)
    await desktop(orchestrator, "b", (12.0, 12.0), cores=8, pool="other")
    async with api_client(orchestrator, API_HEADERS) as api:
        before = (await api.get("/api/v1/fleet/summary")).json()
        await place(orchestrator, clock, gpus=1, vram_gb=16, cpu_cores=2, policy="spread")
        after = (await api.get("/api/v1/fleet/summary")).json()
    assert after["fleet"]["gpu_vram_available_gb"] == before["fleet"]["gpu_vram_available_gb"] - 16
    assert after["fleet"]["cpu_cores_available"] == before["fleet"]["cpu_cores_available"] - 2
    pools = {p["pool_name"]: p for p in after["pools"]}
    assert pools["desktop_pool_1"]["gpu_vram_available_gb"] == 8.0  # a's pool
    assert pools["other"]["gpu_vram_available_gb"] == 12.0  # untouched
