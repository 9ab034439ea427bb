"""What a desktop has left for a new job: its GPUs' VRAM ledgers and its host's room, net of
the claims on it. Placement (`placement`, through `Candidate`) and the capacity answer
(`capacity`) both read an agent through here, so the rule is written once (docs/jobs.md).

The VRAM rule, per GPU (all in GB):

    foreign   = max(0, (total - free) - jobs_used)      # memory held by anything not ours
    held      = sum over the GPU's claims of max(claim, claim_used)
    available = total - foreign - held

`free` is the driver's; `jobs_used` is what the agent saw Chiffon's own job processes hold
on that GPU (NVML's process lists, or `nvidia-smi --query-compute-apps`), and
`claim_used` the part of it each claim's job holds. A job that has not yet grown into its
claim still holds the whole claim; one that outgrew it holds what it uses. Where the agent
could not see per-process use (`jobs_used` unknown, as for AMD through sysfs), every byte
in use counts as foreign *and* every claim counts whole: memory is counted twice rather
than promised twice. An unknown `total` or `free` makes the GPU unusable.

Cores and memory: the lower of what the agent sees free and what its total leaves after
the host claims (cores); what it sees free less the host claims (memory, on the safe side
as VRAM without per-process numbers: a job may not yet have grown into its claim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chiffon.persistence import jobs as repo
from chiffon.schemas import dispatch


@dataclass(frozen=True, slots=True)
class Claim:
    """VRAM a placed job holds on one GPU: what was promised, and what its processes were
    last seen using (None: not seen yet, or not visible)."""

    vram_gb: float
    used_gb: float | None = None

    @property
    def held_gb(self) -> float:
        return self.vram_gb if self.used_gb is None else max(self.vram_gb, self.used_gb)


@dataclass(frozen=True, slots=True)
class GpuLedger:
    uuid: str
    index: int
    vendor: str
    total_gb: float | None
    free_gb: float | None
    jobs_used_gb: float | None = 0.0  # None: the agent cannot see per-process use
    claims: tuple[Claim, ...] = ()
    withheld: str | None = None  # why its desktop offers it to no new job (docs/owner.md)
    # `available_gb`, worked out once (placement asks it many times per pass)
    _available: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_available", self._work_out_available())

    @property
    def known(self) -> bool:
        """Whether the driver said both its total and its free VRAM."""
        return self.total_gb is not None and self.free_gb is not None

    @property
    def foreign_gb(self) -> float | None:
        if self.total_gb is None or self.free_gb is None:
            return None
        used = max(0.0, self.total_gb - self.free_gb)
        return used if self.jobs_used_gb is None else max(0.0, used - self.jobs_used_gb)

    @property
    def available_gb(self) -> float:
        """What a new claim may take: the rule in the module's docstring (0 when unknown)."""
        return self._available

    def _work_out_available(self) -> float:
        foreign = self.foreign_gb
        if self.total_gb is None or foreign is None:
            return 0.0
        held = sum(c.held_gb for c in self.claims)
        return max(0.0, self.total_gb - foreign - held)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One agent as placement sees it: its numbers net of the claims already on it."""

    agent_id: str
    name: str
    online: bool
    accepts_jobs: bool
    pool_name: str
    labels: Mapping[str, str]
    cpu_cores_available: float | None  # net of claims
    memory_available_gb: float | None  # net of claims
    gpus: tuple[GpuLedger, ...] = ()
    # Its reliability record: offline events and preemptions over the last 7 days.
    setbacks: int = 0
    # Why its desktop takes no new job now, as its heartbeat says (`jobs_withheld`:
    # `root`, `never`, `owner_active`...; docs/owner.md); None: welcome, or not said.
    withheld: str | None = None
    # Its job sandbox as its heartbeat says it (`resources.sandbox`, `schemas.sandbox`);
    # None: not said. Read only for a job that requires the sandbox.
    sandbox: Mapping[str, Any] | None = None


def gpu_id(gpu: Mapping[str, Any]) -> str:
    """A reported GPU's id for claims and orders (`schemas.dispatch.gpu_id`)."""
    return dispatch.gpu_id(gpu.get("uuid"), gpu.get("index"))


def gpu_ledgers(
    gpus: Sequence[Mapping[str, Any]], claims: Sequence[repo.Claimed]
) -> tuple[GpuLedger, ...]:
    """Each GPU a heartbeat reported (`resource_metrics["gpus"]`), with the claims on it."""
    by_gpu: dict[str, list[Claim]] = {}
    for c in claims:
        if c.resource != repo.HOST and c.vram_gb is not None:
            by_gpu.setdefault(c.resource, []).append(Claim(c.vram_gb, c.used_gb))
    return tuple(_gpu_ledger(g, by_gpu.get(dispatch.gpu_resource(gpu_id(g)), ())) for g in gpus)


def _gpu_ledger(gpu: Mapping[str, Any], claims: Sequence[Claim]) -> GpuLedger:
    reported = gpu.get("jobs_vram_used_gb")
    # No claim on it: no job of ours can hold memory there. Claims but no per-process
    # numbers: unknown, and the rule counts on the safe side.
    jobs_used = reported if reported is not None else (None if claims else 0.0)
    return GpuLedger(
        uuid=gpu_id(gpu),
        index=int(gpu.get("index", 0)),
        vendor=str(gpu.get("vendor", "other")),
        total_gb=gpu.get("vram_total_gb"),
        free_gb=gpu.get("vram_free_gb"),
        jobs_used_gb=jobs_used,
        claims=tuple(claims),
        withheld=gpu.get("withheld"),
    )


def whole_gpu(gpu: Mapping[str, Any]) -> GpuLedger:
    """A reported GPU as if nothing ran on it: all of its VRAM free."""
    total = gpu.get("vram_total_gb")
    return GpuLedger(gpu_id(gpu), int(gpu.get("index", 0)), str(gpu.get("vendor", "other")),
                     total, total)  # fmt: skip


def cores_left(
    available: float | None, total: float | None, claims: Sequence[repo.Claimed]
) -> float | None:
    """What is free and not promised: the lower of what the agent sees free and what its
    total leaves after the host claims (a job's own use is in `available` already)."""
    if available is None or total is None:
        return None
    claimed = sum(c.cpu_cores or 0.0 for c in claims if c.resource == repo.HOST)
    return max(0.0, min(float(available), float(total) - claimed))


def memory_left(available: float | None, claims: Sequence[repo.Claimed]) -> float | None:
    """What the agent sees free less its host claims, counted whole (see the module)."""
    if available is None:
        return None
    claimed = sum(c.memory_gb or 0.0 for c in claims if c.resource == repo.HOST)
    return max(0.0, float(available) - claimed)
