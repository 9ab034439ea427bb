"""Placement's feasibility checks: what a job asks, and a chain of checks that each say why
a desktop cannot give it, in a word.

A desktop fits when every check of the job's `Chain` passes (`HOST`, then enough GPUs that
pass `GPU_CHECKS`); the first that fails names why it does not (Nomad's feasibility
checkers, `scheduler/feasible/`; GPUStack's filter chain). The same chain decides a
placement (`placement`) and explains a miss (`Findings`, then `reasons.why_not`): "why it
waits" is what filtering found, not a second explanation.

A new check is a function `(want, desktop) -> reason | None` placed in the chain (`HOST`,
with when it applies); a check of one GPU is a function `(want, gpu) -> reason | None` in
`GPU_CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

from chiffon.orchestrator.jobspec import Wants
from chiffon.orchestrator.ledger import Candidate, GpuLedger
from chiffon.schemas import sandbox


@dataclass(frozen=True, slots=True)
class Requirements(Wants):
    """What a job asks of one desktop (its spec's `Wants`), and what the scheduler adds."""

    # Desktops whose owner took this job back lately: not placed there again for a while.
    avoid: frozenset[str] = frozenset()
    # A long job (no timeout, or one of an hour or more) goes to the most reliable desktop
    # that fits, before the tightest fit.
    long: bool = False
    # Desktops that fetched the job's snapshot before: their cache likely holds its
    # files. Among equally good placements, one of these wins (`scorers.rank`).
    warm: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls, wants: Wants, *, avoid: frozenset[str], long: bool, warm: frozenset[str] = frozenset()
    ) -> Requirements:
        return cls(**{name: getattr(wants, name) for name in _ASKED}, avoid=avoid, long=long,
                   warm=warm)  # fmt: skip


_ASKED = tuple(f.name for f in fields(Wants))


class Test(Protocol):
    """A check of a desktop for a job: None when it passes, else why not."""

    def __call__(self, want: Requirements, c: Candidate, /) -> str | None: ...


class GpuTest(Protocol):
    """A check of one GPU for a share of a job: None when it passes, else why not."""

    def __call__(self, want: Requirements, g: GpuLedger, /) -> str | None: ...


def _always(want: Requirements) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Check:
    """A link of the chain: its `test`, and whether it can fail for a job at all (a job
    that names no pool passes the pool check everywhere: it is left out of that job's
    `Chain`, so the many desktops a pass looks at are not asked)."""

    test: Test
    applies: Callable[[Requirements], bool] = _always


@dataclass(frozen=True, slots=True)
class GpuCheck:
    test: GpuTest
    applies: Callable[[Requirements], bool] = _always


# The reasons, as the checks return them.
OFFLINE = "offline"
REFUSES = "refuses"  # the desktop takes no job now (`Candidate.withheld` says why)
AVOIDED = "avoided"  # its owner took this job back lately
POOL = "pool"
LABELS = "labels"
SANDBOX = "sandbox"  # the job requires a full sandbox; the desktop's is not (or not said)
CORES = "cores"
MEMORY = "memory"
GPUS = "gpus"  # fewer GPUs pass `GPU_CHECKS` than the job asks
WITHHELD = "withheld"  # a GPU its desktop offers to no new job (`GpuLedger.withheld`)
VENDOR = "vendor"
VRAM = "vram"


def online(want: Requirements, c: Candidate) -> str | None:
    return None if c.online else OFFLINE


def accepting(want: Requirements, c: Candidate) -> str | None:
    return None if c.accepts_jobs else REFUSES


def not_avoided(want: Requirements, c: Candidate) -> str | None:
    return AVOIDED if c.agent_id in want.avoid else None


def in_pool(want: Requirements, c: Candidate) -> str | None:
    return POOL if want.pool is not None and c.pool_name != want.pool else None


def labelled(want: Requirements, c: Candidate) -> str | None:
    if want.labels and any(c.labels.get(k) != v for k, v in want.labels.items()):
        return LABELS
    return None


def sandboxed(want: Requirements, c: Candidate) -> str | None:
    """A job that requires the sandbox: only where its processes are contained, its memory
    capped and the owner's home hidden (`schemas.sandbox.is_full`)."""
    return SANDBOX if want.require_sandbox and not sandbox.is_full(c.sandbox) else None


def cores(want: Requirements, c: Candidate) -> str | None:
    have = c.cpu_cores_available
    return CORES if want.cpu_cores > 0 and (have is None or have < want.cpu_cores) else None


def memory(want: Requirements, c: Candidate) -> str | None:
    have = c.memory_available_gb
    return MEMORY if want.memory_gb > 0 and (have is None or have < want.memory_gb) else None


def offered(want: Requirements, g: GpuLedger) -> str | None:
    return None if g.withheld is None else WITHHELD


def of_vendor(want: Requirements, g: GpuLedger) -> str | None:
    return VENDOR if want.gpu_vendor is not None and g.vendor != want.gpu_vendor else None


def with_room(want: Requirements, g: GpuLedger) -> str | None:
    return None if g.available_gb >= want.vram_gb else VRAM


GPU_CHECKS: tuple[GpuCheck, ...] = (
    GpuCheck(offered),
    GpuCheck(of_vendor, lambda want: want.gpu_vendor is not None),
    GpuCheck(with_room, lambda want: want.vram_gb > 0),
)
# Who may take the job at all: the closest miss is named among those that pass.
ELIGIBILITY: tuple[Check, ...] = (
    Check(online),
    Check(accepting),
    Check(not_avoided, lambda want: bool(want.avoid)),
    Check(in_pool, lambda want: want.pool is not None),
    Check(labelled, lambda want: bool(want.labels)),
    Check(sandboxed, lambda want: want.require_sandbox),
)
# ... and the host's room: the fleet's index keeps a view of the agents passing these.
HOST: tuple[Check, ...] = (
    *ELIGIBILITY,
    Check(cores, lambda want: want.cpu_cores > 0),
    Check(memory, lambda want: want.memory_gb > 0),
)


@dataclass(frozen=True, slots=True)
class Chain:
    """The checks that apply to one job, in order, ready to run over many desktops: those
    of `checks`, then (with `gpus`) at least `want.gpus` GPUs that pass `GPU_CHECKS`."""

    want: Requirements
    tests: tuple[Test, ...]
    gpu_tests: tuple[GpuTest, ...]
    gpus: bool  # whether the GPUs are checked

    @classmethod
    def of(cls, want: Requirements, checks: Sequence[Check] = HOST, *, gpus: bool = True) -> Chain:
        return cls(want, tuple(c.test for c in checks if c.applies(want)),
                   tuple(c.test for c in GPU_CHECKS if c.applies(want)),
                   gpus and want.gpus > 0)  # fmt: skip

    def miss(self, c: Candidate) -> str | None:
        """Why `c` cannot take the job: the reason of the first check that fails."""
        if (why := self.host_miss(c)) is not None:
            return why
        return GPUS if self.gpus and len(self.usable(c)) < self.want.gpus else None

    def host_miss(self, c: Candidate) -> str | None:
        """`miss`, the GPUs left out."""
        want = self.want
        for test in self.tests:
            if (why := test(want, c)) is not None:
                return why
        return None

    def gpu_miss(self, g: GpuLedger) -> str | None:
        """Why `g` cannot take a share of the job (the first GPU check to fail), or None."""
        for test in self.gpu_tests:
            if (why := test(self.want, g)) is not None:
                return why
        return None

    def usable(self, c: Candidate) -> list[GpuLedger]:
        """The GPUs of `c` that pass every GPU check, in its order."""
        want, usable = self.want, []
        for g in c.gpus:
            for test in self.gpu_tests:
                if test(want, g) is not None:
                    break
            else:
                usable.append(g)
        return usable


@dataclass(slots=True)
class Findings:
    """What the chain found over a fleet (Nomad's `AllocMetric`): each desktop under the
    reason of the first check that rejected it (None: it fits), and the GPUs the GPU checks
    found withheld on the desktops that reached them."""

    rejected: dict[str | None, list[Candidate]] = field(default_factory=dict)
    eligible: list[Candidate] = field(default_factory=list)  # passed ELIGIBILITY, in order
    withheld_gpus: list[str] = field(default_factory=list)  # each one's reason

    @classmethod
    def of(cls, want: Requirements, candidates: Sequence[Candidate]) -> Findings:
        found, chain = cls(), Chain.of(want)
        for c in candidates:
            found.add(c, chain.miss(c))
        return found

    def add(self, c: Candidate, why: str | None) -> None:
        self.rejected.setdefault(why, []).append(c)
        if why in _ROOM:
            self.eligible.append(c)
        if why in _REACHED_GPUS:
            self.withheld_gpus += [g.withheld for g in c.gpus if g.withheld is not None]

    def count(self, why: str) -> int:
        return len(self.rejected.get(why, ()))


_ROOM = frozenset({CORES, MEMORY, GPUS, None})
_REACHED_GPUS = frozenset({GPUS, None})
