"""Where a job fits: the VRAM ledger of each GPU, the placement policies, the nearest miss.

Pure functions over what the registry and the claims say; the scheduler reads those in the
transaction that writes the claim, and calls `place` in between (docs/jobs.md).

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
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["best_fit", "spread"]


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


@dataclass(frozen=True, slots=True)
class Requirements:
    gpus: int = 0
    vram_gb: float = 0.0  # on each assigned GPU
    cpu_cores: float = 0.0
    memory_gb: float = 0.0
    pool_name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    gpu_vendor: str | None = None
    # Desktops whose owner took this job back lately: not placed there again for a while.
    avoid: frozenset[str] = frozenset()
    # A long job (no timeout, or one of an hour or more) goes to the most reliable desktop
    # that fits, before the tightest fit.
    long: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    agent_id: str
    gpu_uuids: tuple[str, ...]
    score: float  # lower is better, whichever the policy
    setbacks: int = 0  # the agent's reliability record (Candidate.setbacks)


@dataclass(frozen=True, slots=True)
class Miss:
    """Why nothing fits, in one sentence that names the nearest miss."""

    reason: str


def place(
    want: Requirements, candidates: Sequence[Candidate], policy: Policy = "best_fit"
) -> Placement | Miss:
    """The best agent and GPUs for `want`, or why there is none.

    Score (lower wins, ties broken by agent id): best fit sums, over the GPUs chosen, the
    VRAM each would have left, then adds the cores left as a fraction of the agent's; so
    the tightest fit wins and large GPUs stay free for large jobs. Spread negates the same
    sum: the emptiest GPUs win (the seeds' "most free VRAM first").

    The agents' reliability records (offline events and preemptions over 7 days) come
    first for a long job, and break ties for the others.
    """
    fits = [p for c in candidates if (p := _fit(want, c, policy)) is not None]
    if fits:
        return min(fits, key=lambda p: _key(p, want))
    return Miss(why_not(want, candidates))


def _key(p: Placement, want: Requirements) -> tuple[float, float, str]:
    """`place`'s order: the reliability record first for a long job, the score first for
    the others; the agent's id breaks ties."""
    if want.long:
        return (p.setbacks, p.score, p.agent_id)
    return (p.score, p.setbacks, p.agent_id)


Entry = tuple[float, str, str]  # a GPU in the index: (available GB, agent id, GPU id)


@dataclass(slots=True)
class _Kept:
    """A requirement's kept miss (`Fleet.known_miss`)."""

    want: Requirements
    policy: Policy
    miss: Miss
    held_by: frozenset[str]  # agents left out that could hold it; none: a miss over all


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
        # host requirement -> (a job with it, the index's entries whose host has room)
        self._views: dict[tuple[object, ...], tuple[Requirements, list[Entry]]] = {}
        self._least_setbacks = min((c.setbacks for c in candidates), default=0)
        for c in candidates:
            self.candidates[c.agent_id] = c
            self._gpus.extend(self._entries(c))
            if c.online and c.accepts_jobs:
                self._cores.append(c.cpu_cores_available or 0.0)
        self._gpus.sort()
        self._cores.sort()

    @staticmethod
    def _entries(c: Candidate) -> list[Entry]:
        if not (c.online and c.accepts_jobs):
            return []
        return [(g.available_gb, c.agent_id, g.uuid) for g in c.gpus if g.withheld is None]

    def update(self, c: Candidate, *, placed: bool = False) -> None:
        """`c` as it is now: after a placement on it (`placed`: it only has less room), or
        read again under its lock (it may have more: the misses kept are forgotten)."""
        old = self.candidates.get(c.agent_id)
        if not placed and c != old:
            self._forget_misses_held_by(c)
        gone, new = self._entries(old) if old is not None else [], self._entries(c)
        _remove(self._gpus, gone)
        self.candidates[c.agent_id] = c
        for entry in new:
            bisect.insort(self._gpus, entry)
        for want, view in self._views.values():
            _remove(view, gone)
            if _eligible(want, c) and _host_fits(want, c):
                for entry in new:
                    bisect.insort(view, entry)
        for was, now in ((old, None), (None, c)):
            cand = was or now
            if cand is None or not (cand.online and cand.accepts_jobs):
                continue
            cores = cand.cpu_cores_available or 0.0
            if was is not None:
                at = bisect.bisect_left(self._cores, cores)
                if at < len(self._cores) and self._cores[at] == cores:
                    del self._cores[at]
            else:
                bisect.insort(self._cores, cores)

    def _forget_misses_held_by(self, c: Candidate) -> None:
        """An agent changed (not by a placement, which only takes room): the kept misses it
        could now hold are forgotten; the others still miss everywhere else unchanged."""
        self._missed = {
            memo: kept for memo, kept in self._missed.items()
            if _fit(kept.want, c, kept.policy) is None
        }  # fmt: skip

    def drop(self, agent_id: str) -> None:
        old = self.candidates.get(agent_id)
        if old is not None:
            self.update(dataclasses.replace(old, online=False))
            del self.candidates[agent_id]

    def place(
        self,
        want: Requirements,
        policy: Policy = "best_fit",
        *,
        exclude: frozenset[str] = frozenset(),
    ) -> Placement | Miss:
        """`place(want, candidates not in exclude, policy)`, faster."""
        if (known := self.known_miss(want, policy, exclude=exclude)) is not None:
            return known  # a miss over all agents is a miss over fewer
        if want.gpus == 1 and policy == "best_fit":
            found = self._walk(want, exclude)
            choice: Placement | Miss = (
                found if found is not None else Miss(why_not(want, list(self.candidates.values())))
            )
        else:
            pool = [c for c in self.candidates.values() if c.agent_id not in exclude]
            choice = place(want, pool, policy)
        if isinstance(choice, Miss):
            # Kept with those left out that could hold it (none: a miss over all agents).
            fleet = self.candidates
            held_by = frozenset(a for a in exclude if a in fleet and _fit(want, fleet[a], policy))
            self._missed[(policy, *_memo_key(want))] = _Kept(want, policy, choice, held_by)
        return choice

    def known_miss(
        self,
        want: Requirements,
        policy: Policy = "best_fit",
        *,
        exclude: frozenset[str] = frozenset(),
    ) -> Miss | None:
        """The miss kept for this requirement, said as when it missed: no agent has changed
        since so that it fits there, and the agents left out then that could hold it are
        left out now too."""
        kept = self._missed.get((policy, *_memo_key(want)))
        return kept.miss if kept is not None and kept.held_by <= exclude else None

    def _walk(self, want: Requirements, exclude: frozenset[str]) -> Placement | None:
        if self.lane is not None:
            mine = self._walk_lane(want, exclude, self.lane)
            if mine is not None:
                return mine
        return self._walk_lane(want, exclude, None)

    def _walk_lane(
        self, want: Requirements, exclude: frozenset[str], lane: int | None
    ) -> Placement | None:
        best: Placement | None = None
        bar = math.inf  # the score to beat, once no other agent can win on its record
        seen: set[str] = set()
        view = self._view(want)
        start = bisect.bisect_left(view, (want.vram_gb,))
        least_share = self._least_core_share(want.cpu_cores)
        for available, agent_id, _ in itertools.islice(view, start, None):
            if agent_id in seen or agent_id in exclude:
                continue
            seen.add(agent_id)
            if lane is not None and _lane_of(agent_id) != lane:
                continue
            c = self.candidates[agent_id]
            left = available - want.vram_gb
            if left + least_share > bar:
                break  # no agent further on scores under it: its GPU leaves at least `left`
            # nor this one: this is its tightest GPU with room
            cores = c.cpu_cores_available or 0.0
            if left + ((cores - want.cpu_cores) / cores if cores > 0 else 0.0) > bar:
                continue
            fit = _fit(want, c, "best_fit")
            if fit is not None and (best is None or _key(fit, want) < _key(best, want)):
                best = fit
                if not want.long or best.setbacks == self._least_setbacks:
                    bar = best.score
        return best

    def _view(self, want: Requirements) -> list[Entry]:
        key = _host_key(want)
        if key not in self._views:
            if len(self._views) >= self.MAX_VIEWS:
                del self._views[next(iter(self._views))]
            fits = {
                a for a, c in self.candidates.items() if _eligible(want, c) and _host_fits(want, c)
            }
            self._views[key] = (want, [e for e in self._gpus if e[1] in fits])
        return self._views[key][1]

    def _least_core_share(self, wanted: float) -> float:
        """The least core share (`_fit`'s second term) any agent with room could add:
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


def _remove(index: list[Entry], entries: list[Entry]) -> None:
    for entry in entries:
        at = bisect.bisect_left(index, entry)
        if at < len(index) and index[at] == entry:
            del index[at]


def _host_key(want: Requirements) -> tuple[object, ...]:
    """What `_eligible` and `_host_fits` read of a job."""
    labels = tuple(sorted(want.labels.items()))
    return (want.cpu_cores, want.memory_gb, want.pool_name, labels, want.avoid)


def _memo_key(want: Requirements) -> tuple[object, ...]:
    labels = tuple(sorted(want.labels.items()))
    return (want.gpus, want.vram_gb, want.cpu_cores, want.memory_gb, want.pool_name, labels,
            want.gpu_vendor, want.avoid, want.long)  # fmt: skip


def _eligible(want: Requirements, c: Candidate) -> bool:
    if not (c.online and c.accepts_jobs) or c.agent_id in want.avoid:
        return False
    if want.pool_name is not None and c.pool_name != want.pool_name:
        return False
    return all(c.labels.get(k) == v for k, v in want.labels.items())


def _usable(want: Requirements, gpu: GpuLedger) -> bool:
    vendor_ok = want.gpu_vendor is None or gpu.vendor == want.gpu_vendor
    return vendor_ok and gpu.withheld is None and gpu.available_gb >= want.vram_gb


def _fit(want: Requirements, c: Candidate, policy: Policy) -> Placement | None:
    if not _eligible(want, c) or not _host_fits(want, c):
        return None
    usable = [g for g in c.gpus if _usable(want, g)]
    if len(usable) > 1:
        best_fit = policy == "best_fit"
        usable.sort(key=lambda g: (g.available_gb if best_fit else -g.available_gb, g.index))
    if len(usable) < want.gpus:
        return None
    chosen = usable[: want.gpus]
    left = sum(g.available_gb - want.vram_gb for g in chosen)
    cores = c.cpu_cores_available or 0.0
    core_share = (cores - want.cpu_cores) / cores if cores > 0 else 0.0
    score = left + core_share if policy == "best_fit" else -(left + core_share)
    return Placement(c.agent_id, tuple(g.uuid for g in chosen), score, c.setbacks)


def still_fits(want: Requirements, c: Candidate, gpu_uuids: Sequence[str]) -> bool:
    """Whether `c`, read again under its lock, can still take `want` on those GPUs."""
    by_id = {g.uuid: g for g in c.gpus}
    chosen = [by_id.get(uuid) for uuid in gpu_uuids]
    if len(chosen) != want.gpus or any(g is None or not _usable(want, g) for g in chosen):
        return False
    return _eligible(want, c) and _host_fits(want, c)


def closest(
    want: Requirements,
    candidates: Sequence[Candidate],
    could_hold: Callable[[Candidate], bool] | None = None,
) -> Candidate | None:
    """The eligible agent that misses `want` by the least (summed shortfalls, each as a
    fraction of what was asked); None when no agent is eligible at all. `could_hold`: the
    closest of those it says yes to, asked from the closest on (it may be costly)."""
    eligible = [c for c in candidates if _eligible(want, c)]
    if could_hold is None:
        return min(eligible, key=lambda c: (_shortfall(want, c), c.name), default=None)
    eligible.sort(key=lambda c: (_shortfall(want, c), c.name))
    return next((c for c in eligible if could_hold(c)), None)


def _host_fits(want: Requirements, c: Candidate) -> bool:
    cores, memory = c.cpu_cores_available, c.memory_available_gb
    if want.cpu_cores > 0 and (cores is None or cores < want.cpu_cores):
        return False
    return not (want.memory_gb > 0 and (memory is None or memory < want.memory_gb))


def why_not(want: Requirements, candidates: Sequence[Candidate]) -> str:
    """ "no online agent that accepts jobs has 1 GPU with 8 GB free: closest is render-02
    GPU 0 with 6.1 GB; 2 agents offline; 1 does not accept jobs (its owner is using it)".

    Agents that take no job are counted by the reason their heartbeats give, in words; the
    one a new user meets first says its fix: "the only agent runs as root and refuses
    jobs: restart it with `chiffon up --allow-root-jobs` ..."."""
    offline = sum(1 for c in candidates if not c.online)
    online = len(candidates) - offline
    refusing = Counter(c.withheld for c in candidates if c.online and not c.accepts_jobs)
    avoided = sum(1 for c in candidates if c.online and c.agent_id in want.avoid)
    parts = [f"no online agent that accepts jobs{_where(want)} has {_asked(want)}"]
    if (near := _nearest(want, closest(want, candidates))) is not None:
        parts[0] += f": closest is {near}"
    if offline:
        parts.append(f"{offline} agent{'s' if offline != 1 else ''} offline")
    only = "the only online agent" if offline else "the only agent"
    for reason, count in sorted(refusing.items(), key=_root_first):
        parts.append(_refusing(reason, count, only if count == online == 1 else None))
    if avoided:
        parts.append(f"{avoided} avoided (its owner took this job back lately)")
    held = sorted(g.withheld for c in candidates if c.online and c.accepts_jobs
                  for g in c.gpus if g.withheld is not None)  # fmt: skip
    if held:
        reasons = ", ".join(sorted(set(held)))
        parts.append(f"{len(held)} GPU{'s' if len(held) != 1 else ''} withheld ({reasons})")
    return "; ".join(parts)


# Why online agents take no job, by the reason their heartbeats give (`Candidate.withheld`),
# for one agent and for several. Root is the one a new user meets first (`chiffon up` as
# root), so it says the fix.
_REFUSING: dict[str | None, tuple[str, str]] = {
    "never": (" (its owner did not opt in: accept_jobs)", " (their owners did not opt in)"),
    # An admin's hold (docs/security.md), not the owner's policy.
    "pending": (
        " (enrolled, waiting for an admin: chiffon agents approve ID)",
        " (enrolled, waiting for an admin: chiffon agents approve ID)",
    ),
    "suspect": (
        " (quarantined, its secret seems copied: chiffon agents clear or rotate ID)",
        " (quarantined, their secrets seem copied: chiffon agents clear or rotate ID)",
    ),
    "outside_schedule": (" (outside its owner's schedule)", " (outside their owners' schedules)"),
    "owner_active": (" (its owner is using it)", " (their owners are using them)"),
    "owner_unknown": (
        " (its owner's idle time is unknown, and no schedule is set)",
        " (their owners' idle time is unknown, and no schedule is set)",
    ),
}
_ROOT_FIX = "`chiffon up --allow-root-jobs` (or `chiffon agent --allow-root-jobs`)"


def _root_first(item: tuple[str | None, int]) -> tuple[bool, bool, int, str]:
    """Root first (it says its fix), reasons not said last, the most common first."""
    reason, count = item
    return (reason != "root", reason is None, -count, str(reason))


def _refusing(reason: str | None, count: int, only: str | None) -> str:
    """ "1 does not accept jobs (its owner is using it)"; "the only agent runs as root and
    refuses jobs: restart it with `chiffon up --allow-root-jobs` ..." (`only`: how to
    name the one agent there is, when it is the one refusing)."""
    one = count == 1
    if reason == "root":
        who = only or str(count)
        verbs = "runs as root and refuses" if one else "run as root and refuse"
        return f"{who} {verbs} jobs: restart {'it' if one else 'them'} with {_ROOT_FIX}"
    why = _REFUSING.get(reason, ("", ""))[0 if one else 1]
    return f"{count} {'does' if one else 'do'} not accept jobs{why}"


def never_fits(want: Requirements) -> str:
    """The warning for a job no registered agent's hardware could ever hold."""
    return (
        f"no registered agent{_where(want)} could ever hold {_asked(want)}; the job waits "
        "until one that can joins"
    )


def _where(want: Requirements) -> str:
    where = f" in pool {want.pool_name!r}" if want.pool_name else ""
    if want.labels:
        where += " with " + ", ".join(f"{k}={v}" for k, v in sorted(want.labels.items()))
    return where


def _asked(want: Requirements) -> str:
    asked = []
    if want.gpus:
        vendor = f" {want.gpu_vendor}" if want.gpu_vendor else ""
        each = f" with {want.vram_gb:g} GB free" if want.vram_gb else ""
        asked.append(f"{want.gpus}{vendor} GPU{'s' if want.gpus != 1 else ''}{each}")
    if want.cpu_cores:
        asked.append(f"{want.cpu_cores:g} free cores")
    if want.memory_gb:
        asked.append(f"{want.memory_gb:g} GB free memory")
    return " and ".join(asked) or "room"


def _nearest(want: Requirements, best: Candidate | None) -> str | None:
    """The closest agent, said with its best GPU when GPUs were asked for, else with what
    it lacks."""
    if best is None:
        return None
    if want.gpus:
        gpus = sorted(
            (g for g in best.gpus if want.gpu_vendor in (None, g.vendor)),
            key=lambda g: (g.withheld is not None, -g.available_gb),
        )
        if gpus:
            g = gpus[min(want.gpus, len(gpus)) - 1]
            if g.withheld is not None:
                return f"{best.name} GPU {g.index}, withheld ({g.withheld})"
            return f"{best.name} GPU {g.index} with {g.available_gb:.1f} GB"
        return f"{best.name} (no {want.gpu_vendor or ''} GPU)".replace("  ", " ")
    return f"{best.name} ({_lacks(want, best)})"


def _shortfall(want: Requirements, c: Candidate) -> float:
    total = 0.0
    if want.gpus:
        free = sorted(
            (g.available_gb for g in c.gpus if _usable_vendor(want, g) and g.withheld is None),
            reverse=True,
        )
        free += [0.0] * max(0, want.gpus - len(free))
        for have in free[: want.gpus]:
            total += _miss(want.vram_gb, have) if want.vram_gb else (0.0 if have else 1.0)
    total += _miss(want.cpu_cores, c.cpu_cores_available)
    total += _miss(want.memory_gb, c.memory_available_gb)
    return total


def _usable_vendor(want: Requirements, gpu: GpuLedger) -> bool:
    return want.gpu_vendor is None or gpu.vendor == want.gpu_vendor


def _miss(need: float, have: float | None) -> float:
    if need <= 0:
        return 0.0
    if have is None or math.isnan(have):
        return 1.0
    return max(0.0, need - have) / need


def _lacks(want: Requirements, c: Candidate) -> str:
    lacks = []
    if want.cpu_cores and (c.cpu_cores_available or 0) < want.cpu_cores:
        lacks.append(f"{c.cpu_cores_available or 0:g} free cores")
    if want.memory_gb and (c.memory_available_gb or 0) < want.memory_gb:
        lacks.append(f"{c.memory_available_gb or 0:.1f} GB free memory")
    return ", ".join(lacks) or "busy"
