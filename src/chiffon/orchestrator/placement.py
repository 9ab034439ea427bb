"""Where a job fits: the chain of checks (`checks`), the policies' scorers (`scorers`) and
the nearest miss (`reasons`) put together, over a list of desktops (`place`) or through a
pass's index of the fleet (`Fleet`).

Pure functions over what the registry and the claims say (`ledger`: the VRAM rule); the
scheduler reads those in the transaction that writes the claim, and calls `place` in
between (docs/jobs.md).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from chiffon.orchestrator.checks import Chain, Requirements
from chiffon.orchestrator.ledger import Candidate, Claim, GpuLedger
from chiffon.orchestrator.reasons import closest, never_fits, why_not
from chiffon.orchestrator.scorers import (
    SCORERS,
    Placement,
    Scorer,
    core_share,
    first,
    policy_of,
    rank,
    score,
)
from chiffon.schemas.jobs import Policy

__all__ = [
    "LANES",
    "Candidate",
    "Claim",
    "Fleet",
    "GpuLedger",
    "Miss",
    "Placement",
    "Policy",
    "Requirements",
    "closest",
    "never_fits",
    "place",
    "still_fits",
    "why_not",
]

Agents = frozenset[str]
NO_ONE: Agents = frozenset()


@dataclass(frozen=True, slots=True)
class Miss:
    """Why nothing fits, in one sentence that names the nearest miss."""

    reason: str


def place(
    want: Requirements, candidates: Sequence[Candidate], policy: Policy = "best_fit"
) -> Placement | Miss:
    """The best agent and GPUs for `want`, or why there is none.

    Every desktop that passes the job's chain of checks (`checks.Chain`) is scored by the
    policy's scorer (`scorers`: best fit, the default, or spread), and the placements are
    ranked (`scorers.rank`: the reliability record first for a long job); a miss says
    what the checks found (`reasons.why_not`).
    """
    return _place(want, candidates, _scorer(policy))


def _place(want: Requirements, candidates: Sequence[Candidate], scorer: Scorer) -> Placement | Miss:
    chain = Chain.of(want)
    found = first([p for c in candidates if (p := _fit(chain, c, scorer)) is not None], want)
    return found if found is not None else Miss(why_not(want, candidates))


def _scorer(policy: str) -> Scorer:
    return SCORERS[policy_of(policy)]


def _fit(chain: Chain, c: Candidate, scorer: Scorer) -> Placement | None:
    """`c`'s placement of the job, when it passes every check of `chain`."""
    return _fit_gpus(chain, c, scorer) if chain.host_miss(c) is None else None


def _fit_gpus(chain: Chain, c: Candidate, scorer: Scorer) -> Placement | None:
    """`_fit` on a desktop known to pass the host's checks."""
    want = chain.want
    usable = chain.usable(c) if want.gpus else []
    return score(want, c, usable, scorer) if len(usable) >= want.gpus else None


def still_fits(want: Requirements, c: Candidate, gpu_uuids: Sequence[str]) -> bool:
    """Whether `c`, read again under its lock, can still take `want` on those GPUs."""
    chain = Chain.of(want)
    by_id = {g.uuid: g for g in c.gpus}
    chosen = [by_id.get(uuid) for uuid in gpu_uuids]
    if len(chosen) != want.gpus or any(g is None or chain.gpu_miss(g) for g in chosen):
        return False
    return chain.host_miss(c) is None


Entry = tuple[float, str, str]  # a GPU in the index: (available GB, agent id, GPU id)
_T = TypeVar("_T", Entry, float)


@dataclass(slots=True)
class _Kept:
    """A requirement's kept miss (`Fleet.known_miss`)."""

    chain: Chain
    policy: Policy
    miss: Miss
    held_by: Agents  # agents left out that could hold it; none: a miss over all


class Fleet:
    """The candidates of one scheduling pass, indexed so that placing a one-GPU job
    (nearly every job) visits a few agents, not all of them: every offered GPU of every
    online agent that accepts jobs, by the VRAM a new claim may take there.

    Best fit walks up from the smallest GPU with room and stops once a GPU's own leftover
    (a lower bound of its agent's score) passes the best score found: the same answer as
    `place` over every candidate (`tests/test_placement.py` holds them equal). Spread,
    several GPUs and CPU-only jobs take `place` over every candidate. A requirement that
    missed misses again until an agent changes so that it fits there: the miss is kept
    (`known_miss`), across passes while the scheduler keeps the fleet, and said again
    without a search; an agent that changed is tried against each kept miss, and those
    it could now hold are forgotten (HTCondor's autoclusters, Kubernetes' unschedulable
    queue). A miss with agents left out (`exclude`) that could hold it holds while they
    are left out.

    A queue holds few shapes of job, so the walk goes through a view of the index per
    host requirement (cores, memory, pool, labels, desktops to avoid): only the GPUs of
    agents whose host has room for it, kept up to date as agents change. Without it a
    fleet of busy desktops with free GPUs makes every walk step over all of them."""

    MAX_VIEWS = 16  # host requirements kept at once; the oldest view goes first

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        # None: the best fit over the fleet. A lane (0 to LANES - 1): a one-GPU job goes to
        # the best fit among the agents of that lane (by their id), and only when none
        # fits there to the best over all; the scheduler takes a lane at random while it
        # finds its choices taken by another orchestrator, so that two part ways (as
        # Nomad's schedulers each pick from their own random sample of nodes).
        self.lane: int | None = None
        self.candidates: dict[str, Candidate] = {}
        self._gpus: list[Entry] = []  # (available GB, agent id, GPU id)
        self._missed: dict[tuple[object, ...], _Kept] = {}
        self._cores: list[float] = []  # free cores of each agent that takes jobs, sorted
        # host requirement -> (its checks, the index's entries whose host has room)
        self._views: dict[tuple[object, ...], tuple[Chain, list[Entry]]] = {}
        self._least_setbacks = min((c.setbacks for c in candidates), default=0)
        for c in candidates:
            self.candidates[c.agent_id] = c
            self._gpus.extend(_entries(c))
            if _takes_jobs(c):
                self._cores.append(c.cpu_cores_available or 0.0)
        self._gpus.sort()
        self._cores.sort()

    def update(self, c: Candidate, *, placed: bool = False) -> None:
        """`c` as it is now: after a placement on it (`placed`: it only has less room), or
        read again under its lock (it may have more: the misses kept are forgotten)."""
        old = self.candidates.get(c.agent_id)
        if not placed and c != old:
            self._forget_misses_held_by(c)
        gone, new = _entries(old), _entries(c)
        self.candidates[c.agent_id] = c
        _reindex(self._gpus, gone, new)
        for host, view in self._views.values():
            _reindex(view, gone, new if host.host_miss(c) is None else [])
        _reindex(self._cores, _free_cores(old), _free_cores(c))

    def _forget_misses_held_by(self, c: Candidate) -> None:
        """An agent changed (not by a placement, which only takes room): the kept misses it
        could now hold are forgotten; the others still miss everywhere else unchanged."""
        self._missed = {
            memo: kept for memo, kept in self._missed.items()
            if _fit(kept.chain, c, _scorer(kept.policy)) is None
        }  # fmt: skip

    def drop(self, agent_id: str) -> None:
        old = self.candidates.get(agent_id)
        if old is not None:
            self.update(dataclasses.replace(old, online=False))
            del self.candidates[agent_id]

    def place(
        self, want: Requirements, policy: Policy = "best_fit", *, exclude: Agents = NO_ONE
    ) -> Placement | Miss:
        """`place(want, candidates not in exclude, policy)`, faster."""
        if (known := self.known_miss(want, policy, exclude=exclude)) is not None:
            return known  # a miss over all agents is a miss over fewer
        scorer, chain = _scorer(policy), Chain.of(want)
        if want.gpus == 1 and scorer.tightest_first:
            found = self._walk(chain, scorer, exclude)
            choice = found or Miss(why_not(want, list(self.candidates.values())))
        else:
            choice = _place(want, [c for c in self.candidates.values()
                                   if c.agent_id not in exclude], scorer)  # fmt: skip
        if isinstance(choice, Miss):
            self._keep(chain, policy, choice, exclude)
        return choice

    def _keep(self, chain: Chain, policy: Policy, miss: Miss, exclude: Agents) -> None:
        """A miss is kept with those left out that could hold it (none: a miss over all)."""
        fleet, scorer = self.candidates, _scorer(policy)
        held_by = frozenset(a for a in exclude if a in fleet and _fit(chain, fleet[a], scorer))
        self._missed[(policy, *_memo_key(chain.want))] = _Kept(chain, policy, miss, held_by)

    def known_miss(
        self, want: Requirements, policy: Policy = "best_fit", *, exclude: Agents = NO_ONE
    ) -> Miss | None:
        """The miss kept for this requirement, said as when it missed: no agent has changed
        since so that it fits there, and the agents left out then that could hold it are
        left out now too."""
        kept = self._missed.get((policy, *_memo_key(want)))
        return kept.miss if kept is not None and kept.held_by <= exclude else None

    def _walk(self, chain: Chain, scorer: Scorer, exclude: Agents) -> Placement | None:
        if self.lane is not None:
            mine = self._walk_lane(chain, scorer, exclude, self.lane)
            if mine is not None:
                return mine
        return self._walk_lane(chain, scorer, exclude, None)

    def _walk_lane(
        self, chain: Chain, scorer: Scorer, exclude: Agents, lane: int | None
    ) -> Placement | None:
        """The best placement of a one-GPU job, walking up from the tightest GPU with room
        and stopping once a GPU's own leftover (with the least core share any agent could
        add: a lower bound of its agent's score) passes the best score found."""
        want, best = chain.want, cast("Placement | None", None)
        # The score to beat, once no other agent can win on its record: the walk's scorer
        # scores the leftover plus the core share (`Scorer.tightest_first`).
        bar = math.inf
        least_share = self._least_core_share(want.cpu_cores)
        skip = set(exclude)  # left out, or seen already (at its tightest GPU with room)
        for available, agent_id, _ in self._from_tightest(want):
            if agent_id in skip:
                continue
            skip.add(agent_id)
            if lane is not None and _lane_of(agent_id) != lane:
                continue
            left = available - want.vram_gb
            if left + least_share > bar:
                break  # no agent further on scores under it: its GPU leaves at least `left`
            c = self.candidates[agent_id]
            if left + core_share(want, c) > bar:
                continue  # nor this one: this is its tightest GPU with room
            # the view's agents pass the host's checks
            best, bar = self._better(_fit_gpus(chain, c, scorer), best, bar, want)
        return best

    def _better(
        self, fit: Placement | None, best: Placement | None, bar: float, want: Requirements
    ) -> tuple[Placement | None, float]:
        """The better of `fit` and `best`, and the score to beat after it: the best's, once
        no agent can win on its reliability record (always, but for a long job)."""
        if fit is None or (best is not None and rank(fit, want) >= rank(best, want)):
            return best, bar
        if not want.long or fit.setbacks == self._least_setbacks:
            return fit, fit.score
        return fit, bar

    def _from_tightest(self, want: Requirements) -> Iterator[Entry]:
        """The GPUs of the agents whose host has room for `want` that have room for it too,
        the tightest first."""
        view = self._view(want)
        return itertools.islice(view, bisect.bisect_left(view, (want.vram_gb,)), None)

    def _view(self, want: Requirements) -> list[Entry]:
        key = _host_key(want)
        if key not in self._views:
            if len(self._views) >= self.MAX_VIEWS:
                del self._views[next(iter(self._views))]
            host = Chain.of(want, gpus=False)
            fits = {a for a, c in self.candidates.items() if host.host_miss(c) is None}
            self._views[key] = (host, [e for e in self._gpus if e[1] in fits])
        return self._views[key][1]

    def _least_core_share(self, wanted: float) -> float:
        """The least core share (`scorers.core_share`) any agent with room could add:
        `(cores - wanted) / cores` grows with `cores`, so the fewest cores that fit."""
        at = bisect.bisect_left(self._cores, wanted)
        if at == len(self._cores):
            return 0.0
        cores = self._cores[at]
        return (cores - wanted) / cores if cores > 0 else 0.0


LANES = 4


def _lane_of(agent_id: str) -> int:
    """An agent's lane: from the last hex digit of its id (uniform for UUIDs)."""
    try:
        return int(agent_id[-1], 16) % LANES
    except ValueError:
        return 0


def _takes_jobs(c: Candidate) -> bool:
    return c.online and c.accepts_jobs


def _entries(c: Candidate | None) -> list[Entry]:
    """`c`'s GPUs in the index: those it offers, if it takes jobs."""
    if c is None or not _takes_jobs(c):
        return []
    return [(g.available_gb, c.agent_id, g.uuid) for g in c.gpus if g.withheld is None]


def _free_cores(c: Candidate | None) -> list[float]:
    """`c`'s free cores in the index of them, if it takes jobs."""
    return [] if c is None or not _takes_jobs(c) else [c.cpu_cores_available or 0.0]


def _reindex(index: list[_T], gone: list[_T], new: list[_T]) -> None:
    _remove(index, gone)
    for entry in new:
        bisect.insort(index, entry)


def _remove(index: list[_T], entries: list[_T]) -> None:
    for entry in entries:
        at = bisect.bisect_left(index, entry)
        if at < len(index) and index[at] == entry:
            del index[at]


def _host_key(want: Requirements) -> tuple[object, ...]:
    """What the host checks (`checks.HOST`) read of a job."""
    labels = tuple(sorted(want.labels.items()))
    return (want.cpu_cores, want.memory_gb, want.pool, labels, want.avoid, want.require_sandbox)


def _memo_key(want: Requirements) -> tuple[object, ...]:
    labels = tuple(sorted(want.labels.items()))
    return (want.gpus, want.vram_gb, want.cpu_cores, want.memory_gb, want.pool, labels,
            want.gpu_vendor, want.avoid, want.long, want.require_sandbox)  # fmt: skip
