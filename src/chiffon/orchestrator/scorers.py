"""Placement's policies, as scorers behind one interface (GPUStack's scorers, Nomad's rank
iterators): which of a desktop's usable GPUs a job takes, and how the desktops that pass
every check rank (lower wins).

A new policy is one `Scorer` in `SCORERS` (and its name in the API's `schemas.jobs.Policy`).

The desktops' reliability records (offline events and preemptions over 7 days) are not a
policy: they order the placements of every policy (`rank`), first for a long job and as
the tie-break for the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from chiffon.orchestrator.checks import Requirements
from chiffon.orchestrator.ledger import Candidate, GpuLedger
from chiffon.schemas.jobs import Policy


@dataclass(frozen=True, slots=True)
class Placement:
    agent_id: str
    gpu_uuids: tuple[str, ...]
    score: float  # lower is better, whichever the policy
    setbacks: int = 0  # the agent's reliability record (Candidate.setbacks)


class Scorer(Protocol):
    """A placement policy.

    `gpu_key` orders the usable GPUs of one desktop: the job takes the first. `score`
    ranks a desktop (lower wins) from what the GPUs taken would have left (the sum over
    them of available minus asked, GB) and the share of its free cores left. A scorer
    that takes the tightest GPU first and scores the leftover plus the core share, as
    best fit does, says `tightest_first`: the fleet's index (`placement.Fleet`) then
    finds its best one-GPU placement by walking up from the tightest GPU with room, and
    stops once that sum passes the best score found, not visiting every desktop. Any
    other scorer is asked about every desktop that passes the checks."""

    @property
    def tightest_first(self) -> bool: ...

    def gpu_key(self, g: GpuLedger) -> tuple[float, int]: ...

    def score(self, left_gb: float, core_share: float) -> float: ...


class BestFit:
    """The tightest fit wins, so large GPUs stay free for large jobs (the default)."""

    tightest_first = True

    def gpu_key(self, g: GpuLedger) -> tuple[float, int]:
        return (g.available_gb, g.index)

    def score(self, left_gb: float, core_share: float) -> float:
        return left_gb + core_share


class Spread:
    """The emptiest wins (the seeds' "most free VRAM first")."""

    tightest_first = False

    def gpu_key(self, g: GpuLedger) -> tuple[float, int]:
        return (-g.available_gb, g.index)

    def score(self, left_gb: float, core_share: float) -> float:
        return -(left_gb + core_share)


SCORERS: dict[Policy, Scorer] = {"best_fit": BestFit(), "spread": Spread()}
DEFAULT: Policy = "best_fit"


def policy_of(value: object) -> Policy:
    """A job's stored policy by name; the default for none, or one not known."""
    return value if value in SCORERS else DEFAULT


def core_share(want: Requirements, c: Candidate) -> float:
    """The share of the desktop's free cores the job would leave."""
    cores = c.cpu_cores_available or 0.0
    return (cores - want.cpu_cores) / cores if cores > 0 else 0.0


def score(want: Requirements, c: Candidate, usable: list[GpuLedger], scorer: Scorer) -> Placement:
    """The placement of `want` on `c`, whose `usable` GPUs (at least `want.gpus`) pass
    every check, as `scorer` chooses and scores it."""
    if len(usable) > 1:
        usable.sort(key=scorer.gpu_key)
    chosen = usable[: want.gpus]
    left = sum(g.available_gb - want.vram_gb for g in chosen)
    return Placement(c.agent_id, tuple(g.uuid for g in chosen),
                     scorer.score(left, core_share(want, c)), c.setbacks)  # fmt: skip


def rank(p: Placement, want: Requirements) -> tuple[float, float, bool, str]:
    """The order of placements: the reliability record first for a long job, the score
    first for the others; then a desktop whose cache holds the job's files; the agent's
    id breaks ties."""
    cold = p.agent_id not in want.warm
    if want.long:
        return (p.setbacks, p.score, cold, p.agent_id)
    return (p.score, p.setbacks, cold, p.agent_id)


def first(placements: Sequence[Placement], want: Requirements) -> Placement | None:
    return min(placements, key=lambda p: rank(p, want), default=None)
