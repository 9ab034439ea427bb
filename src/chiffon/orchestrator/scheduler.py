"""The scheduler's pass: place queued jobs, claims written in the transaction that decides.

The orchestrator runs it in a loop (`Dispatcher`); docs/jobs.md describes it.

One pass:

1. read the queue grouped by shape (`repo.queued_shapes`: one row per requirements,
   policy and timeout, however many jobs), and bring the picture of the fleet (every
   agent and its live claims as placement's `Candidate`s) up to date: the agents changed
   since the last pass, or all of them every 10 s (`FleetCache`). A shape that missed
   (in this pass or an earlier one: the picture keeps its misses) and that no agent has
   changed since so that it fits there is not read job by job (`_Queue`);
2. the jobs of the other shapes in submission order, read `PAGE` at a time, `BATCH` (32)
   to a transaction, at most `limit` a pass: lock those still queued
   (one statement; `SKIP LOCKED` on PostgreSQL: jobs another orchestrator is placing are
   skipped, never waited for); choose for each with the pass's `Fleet`, in memory, each
   choice promised there before the next job is chosen for; then take the chosen agents'
   placement locks (`repo.lock_agents`: one statement, again skipping those another
   orchestrator holds), read their rows and claims again (what another orchestrator or
   a finished job changed meanwhile included) and write each choice that still fits there
   (`placement.still_fits`), in the order chosen. A job whose agent was skipped or no
   longer has room is chosen for again in the next batch, up to three times a pass. A job
   whose shape missed meanwhile is not locked to miss again, and the next pages leave
   that shape out;
3. give the queued jobs of each shape that missed the reason it missed, one statement a
   shape (`_say_why`), so that a job never read one by one says why it waits too.

Two placements on one agent are thus decided one after the other: a lock per agent,
not serializable transactions, because the conflict is always on one known agent and a
lock costs a short wait where a serialization failure costs a retry. The scheduler never
waits for a lock (it skips), so two orchestrators cannot deadlock, and neither waits on
the other's batch: each places elsewhere, or again a moment later. Ingest never takes
the placement lock, nor placement the registry row's: neither waits for the other.

A job that does not fit keeps waiting with the reason naming the nearest miss, and later,
smaller jobs may pass it (backfill), however many wait ahead of them: a pass costs the
shapes queued and the jobs it can place, not the jobs that cannot be placed. So that a
large job is not passed forever, the oldest job that has waited `starvation_seconds`
reserves the agent closest to fitting it (read or not: its shape's oldest submission
stands for it): no later job is placed there in that pass, so what frees up there is
left for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator import ledger
from chiffon.orchestrator.clock import Clock
from chiffon.orchestrator.jobs import lose_forgotten, lose_offline
from chiffon.orchestrator.jobspec import JobSpec, Wants
from chiffon.orchestrator.placement import (
    LANES,
    Candidate,
    Fleet,
    Miss,
    Placement,
    Policy,
    Requirements,
    closest,
    place,
    still_fits,
)
from chiffon.orchestrator.scorers import policy_of
from chiffon.orchestrator.store import warm_agents
from chiffon.persistence import jobs as repo
from chiffon.persistence.models import JobRow

log = logging.getLogger(__name__)
RETRIES_PER_JOB = 3
BATCH = 32  # jobs placed in one transaction
FULL_READ_SECONDS = 10.0  # FleetCache: the whole fleet read again at least this often
CHANGES_MARGIN = timedelta(seconds=5)
RECENT_MARGIN = timedelta(seconds=0.2)  # mid-pass: placements stamped before they committed
CONTENDED_SECONDS = 10.0
# The scheduler hands the event loop back (to the API and ingest beside it) this often:
# choosing for 32 jobs, or reading 1,000 changed agents, held it for up to 0.5 s at once.
YIELD_EVERY_JOBS = 8
YIELD_EVERY_AGENTS = 64
PAGE = 500  # queued jobs read at a time
SKIP_MAX = 1000  # shapes a page's statement leaves out by name; those past it are read
# The jobs of a shape told its reason are told a newer one (a bulk update of them all) no
# sooner than this, nor than one second per REASON_ROWS_PER_SECOND of them (capped): the
# nearest miss a reason names moves with the heartbeats, and rewriting 20,000 rows took
# PostgreSQL 0.75-1 s. A job told nothing yet, or something else (handed back), is told
# at the pass.
REASON_SECONDS = 10.0
REASON_ROWS_PER_SECOND = 1000
REASON_MAX_SECONDS = 300.0


@dataclass
class PassResult:
    placed: dict[uuid.UUID, Placement] = field(default_factory=dict)
    waiting: dict[uuid.UUID, str] = field(default_factory=dict)  # job -> why, those read
    # Queued jobs of shapes that missed before the pass and still did after it, not read
    # one by one (as the queue was grouped when the pass began).
    blocked: int = 0

    @property
    def waits(self) -> bool:
        """Whether the pass left a job waiting for room."""
        return bool(self.waiting) or self.blocked > 0


# A job without a timeout, or with one at least this long, is long: it goes to the most
# reliable desktop that fits (placement.place).
LONG_JOB_SECONDS = 3600.0


def requirements(
    spec: JobSpec, avoid: frozenset[str] = frozenset(), warm: frozenset[str] = frozenset()
) -> Requirements:
    """What a job asks of a desktop (its parsed spec's wants), with the desktops to
    avoid and those whose cache holds its files."""
    return Requirements.of(spec.wants, avoid=avoid, long=_long(spec.timeout_seconds),
                           warm=warm)  # fmt: skip


def _long(timeout_seconds: float | None) -> bool:
    return timeout_seconds is None or timeout_seconds >= LONG_JOB_SECONDS


def shape_want(shape: repo.Shape) -> tuple[Requirements, Policy]:
    """What a job of this shape asks for (with no desktop to avoid), as `requirements`
    reads it from the job's spec, and its policy."""
    wanted, policy, timeout = shape
    wants = Wants.parse(json.loads(wanted) if wanted else {})
    long = _long(float(timeout) if timeout else None)
    return Requirements.of(wants, avoid=frozenset(), long=long), policy_of(policy)


def candidate(row: Row[Any], claims: Sequence[repo.Claimed], setbacks: int = 0) -> Candidate:
    """An agent's registry row and live claims as placement sees them: cores and memory
    net of the host claims, each GPU's ledger with its claims (`ledger`)."""
    metrics: dict[str, Any] = row.resource_metrics or {}
    return Candidate(
        agent_id=str(row.agent_id),
        name=row.name,
        online=row.status == "online",
        # An admin's hold (pending approval, suspect) outranks the owner's yes.
        accepts_jobs=bool(row.accepts_jobs) and row.hold is None,
        pool_name=row.pool_name,
        labels=row.labels or {},
        cpu_cores_available=ledger.cores_left(
            row.cpu_cores_available, row.cpu_cores_physical, claims
        ),
        memory_available_gb=ledger.memory_left(row.memory_available_gb, claims),
        gpus=ledger.gpu_ledgers(metrics.get("gpus", []), claims),
        setbacks=setbacks,
        withheld=row.hold or metrics.get("jobs_withheld"),
        sandbox=metrics.get("sandbox"),
    )


async def schedule_once(
    sessions: async_sessionmaker[AsyncSession],
    *,
    now: datetime,
    limit: int = 1000,
    starvation_seconds: float = 300,
    avoid_seconds: float = 1800,
    batch: int = BATCH,
    clock: Callable[[], datetime] | None = None,
    cache: FleetCache | None = None,
) -> PassResult:
    """One pass over the queue, `batch` jobs a transaction, choosing for at most `limit`
    jobs (see the module's text). A job is not placed again on a desktop whose owner took
    it back in the last `avoid_seconds`. `cache`: the fleet as the last pass left it,
    with the misses it keeps (default: read whole, nothing known to miss).
    An attempt's `assigned_at` is read from `clock` (default: `now`)
    once the claims it was checked against are read, so that the attempts' times are a
    true history of the claims (bench/dispatch.py checks them)."""
    cache = cache or FleetCache()
    avoided_since = now - timedelta(seconds=avoid_seconds)
    async with sessions() as session:
        shapes = await repo.queued_shapes(session, avoided_since=avoided_since)
        if not shapes:
            return PassResult()
        fleet = await cache.read(session, now)
    one_pass = _Pass(fleet, {}, now, clock or (lambda: now), starvation_seconds)
    queue = _Queue(sessions, one_pass, shapes, avoided_since)
    try:
        await _drain(sessions, one_pass, queue, _Contention(cache, fleet, one_pass.clock()),
                     limit=limit, batch=batch)  # fmt: skip
        await _say_why(sessions, one_pass, queue, cache)
    except BaseException:
        cache.forget()  # promises may be left in it that were never written
        raise
    return one_pass.result


async def _drain(
    sessions: async_sessionmaker[AsyncSession], one_pass: _Pass, queue: _Queue,
    contention: _Contention, *, limit: int, batch: int,
) -> None:  # fmt: skip
    """Choose for the queue's jobs, `batch` a transaction, until `limit` were chosen for
    or none is left to take."""
    while queue.chosen_for < limit:
        ids = await queue.take(min(batch, limit - queue.chosen_for))
        if not ids:
            return
        async with sessions.begin() as session:
            jobs = await repo.take_queued_many(session, job_ids=ids)
            again = await one_pass.batch(session, jobs)
        if again:
            await contention.choose_again(sessions, one_pass, queue, again)


@dataclass
class _Contention:
    """Jobs chosen for again in the next batch, each up to RETRIES_PER_JOB times a pass:
    another orchestrator is placing on the agents chosen for them."""

    cache: FleetCache
    fleet: _PassFleet
    looked: datetime  # when this pass last read the agents others placed on
    seen: int = 0
    tries: Counter[uuid.UUID] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.seen = self.fleet.others_seen

    async def choose_again(
        self, sessions: async_sessionmaker[AsyncSession], one_pass: _Pass, queue: _Queue,
        again: list[uuid.UUID],
    ) -> None:  # fmt: skip
        self.tries.update(again)
        queue.again([j for j in again if self.tries[j] < RETRIES_PER_JOB])
        if one_pass.busy or self.fleet.others_seen > self.seen:
            self.cache.contended()  # not when only a heartbeat took the room
        self.seen = self.fleet.others_seen
        # First read again the agents others placed on since we last looked.
        async with sessions() as session:
            since, self.looked = self.looked - RECENT_MARGIN, one_pass.clock()
            await self.cache.refresh(session, await repo.agents_placed_on(session, since=since))


class _Queue:
    """A pass's queue: its shapes as the pass began (`repo.queued_shapes`), and the jobs of
    those not known to miss, read in submission order a page at a time. A shape known to
    miss (`Fleet.known_miss`, with the agents the pass leaves out) is left out of each
    page's statement, so 20,000 jobs that cannot be placed cost one row of the grouping,
    not 20,000 rows read and passed over, and a job behind them is reached at once."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        one_pass: _Pass,
        shapes: list[repo.QueuedShape],
        avoided_since: datetime,
    ) -> None:
        self._sessions, self._pass, self.avoided_since = sessions, one_pass, avoided_since
        self.shapes = shapes
        self.wants = {s.shape: shape_want(s.shape) for s in shapes}
        missed = {shape for shape, (want, policy) in self.wants.items()
                  if one_pass.fleet.known_miss(want, policy) is not None}  # fmt: skip
        self.unread = set(missed)  # left out of every page read so far
        read, blocked = _split(shapes, missed)
        self._after = _from_oldest(read)
        self._ahead: deque[repo.Queued] = deque()
        self._read: dict[uuid.UUID, repo.Queued] = {}
        self.chosen_for = 0
        if blocked:  # its oldest job stands for it in the starvation guard (`_Pass.reach`)
            oldest = min(blocked, key=lambda s: s.oldest)
            one_pass.unread_oldest = (oldest.oldest, self.wants[oldest.shape][0])

    async def take(self, most: int) -> list[uuid.UUID]:
        """The next jobs to choose for, at most `most`; those of shapes known to miss by
        now wait with its reason, not locked to miss again."""
        ids: list[uuid.UUID] = []
        while len(ids) < most and (job := await self._next()) is not None:
            self._pass.reach(job.submitted_at)
            if (miss := self._pass.known_miss(job.job_id, job.spec)) is not None:
                self._pass.result.waiting[job.job_id] = miss.reason
            else:
                ids.append(job.job_id)
        self.chosen_for += len(ids)
        return ids

    def again(self, job_ids: list[uuid.UUID]) -> None:
        """These jobs are chosen for again next, in this order (counted once in `limit`)."""
        self._ahead.extendleft(reversed([self._read[j] for j in job_ids]))
        self.chosen_for -= len(job_ids)

    async def _next(self) -> repo.Queued | None:
        if not self._ahead and self._after is not None:
            await self._read_page()
        return self._ahead.popleft() if self._ahead else None

    async def _read_page(self) -> None:
        assert self._after is not None
        skip = self._skip()
        self.unread &= set(skip)
        async with self._sessions() as session:
            page = await repo.queued(session, after=self._after, limit=PAGE, skip=skip,
                                     avoided_since=self.avoided_since)  # fmt: skip
            ids = [job.job_id for job in page]
            taken = await repo.taken_back(session, job_ids=ids, since=self.avoided_since)
            snapshots = {s for job in page if (s := job.spec.get("snapshot"))}
            warm = await warm_agents(session, snapshots) if snapshots else {}
        self._pass.taken.update(taken)
        self._pass.warm.update(warm)
        self._ahead.extend(page)
        self._read.update((job.job_id, job) for job in page)
        last = page[-1] if len(page) == PAGE else None  # a shorter page: the queue's end
        self._after = None if last is None else (last.submitted_at, last.job_id)

    def _skip(self) -> list[repo.Shape]:
        """The shapes known to miss now, those with the most jobs first."""
        known = [s for s in sorted(self.shapes, key=lambda s: -s.jobs)
                 if self._pass.shape_misses(*self.wants[s.shape]) is not None]  # fmt: skip
        return list(dict.fromkeys(s.shape for s in known))[:SKIP_MAX]


def _split(
    shapes: list[repo.QueuedShape], missed: set[repo.Shape]
) -> tuple[list[repo.QueuedShape], list[repo.QueuedShape]]:
    """The shapes whose jobs are read, and those known to miss that are not (the jobs taken
    back lately are read whatever their shape: each says a reason of its own)."""
    read: list[repo.QueuedShape] = []
    blocked: list[repo.QueuedShape] = []
    for s in shapes:
        (blocked if s.shape in missed and not s.avoided else read).append(s)
    return read, blocked


def _from_oldest(shapes: list[repo.QueuedShape]) -> tuple[datetime, uuid.UUID] | None:
    """Where the reading of these shapes' jobs starts: at the oldest (None: no job)."""
    start = min((s.oldest for s in shapes), default=None)
    return None if start is None else (start, uuid.UUID(int=0))


async def _say_why(
    sessions: async_sessionmaker[AsyncSession], one_pass: _Pass, queue: _Queue, cache: FleetCache
) -> None:
    """Give the queued jobs of each shape that missed the reason it missed (those taken
    back lately have their own, said when each is read), one statement for each group of
    jobs told something else: not yet told (new, handed back), or told another reason,
    unless that reason was written to them lately (`FleetCache.told_lately`)."""
    told: list[tuple[repo.QueuedShape, str]] = []
    for group in queue.shapes:
        miss = one_pass.shape_misses(*queue.wants[group.shape])
        if miss is None or group.avoided:
            continue
        if group.shape in queue.unread:
            one_pass.result.blocked += group.jobs
        said = miss.reason[: repo.REASON_MAX_CHARS]
        if group.reason != said and not cache.told_lately(group.shape, group.reason, group.jobs):
            told.append((group, said))
    if not told:
        return
    async with sessions.begin() as session:
        for group, said in told:
            await repo.say_why(session, shape=group.shape, was=group.reason, reason=said,
                               now=one_pass.now, avoided_since=queue.avoided_since)  # fmt: skip
    for group, said in told:
        cache.told(group.shape, said)


class FleetCache:
    """The scheduler's picture of the fleet between passes (the `Dispatcher` keeps one).

    A pass reads again only the agents that changed since the one before
    (`repo.agents_changed`: a registry row written, an attempt placed or ended there,
    looked for from `CHANGES_MARGIN` before that pass began, for transactions stamped
    before they committed; an agent whose latest change it has read already is not
    read again), and everything every `full_read_seconds` (agents removed, reliability
    records). At 10,000 agents a full read costs about 0.5 s of CPU; an
    empty change set, one query. Staleness costs choices, never correctness: every choice
    is checked again under the chosen agent's lock before it is written.

    The picture keeps the misses of the shapes of job that fitted nowhere
    (`placement.Fleet.known_miss`) until an agent read again could hold one, and until
    the next full read, which starts without them: each shape is tried again at least
    every `full_read_seconds`, and its reason (as it was when it missed) said anew."""

    def __init__(
        self,
        full_read_seconds: float = FULL_READ_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full_read_seconds = full_read_seconds
        self._monotonic = monotonic
        self._fleet: _PassFleet | None = None
        self._read_at: datetime | None = None
        self._full_at = -math.inf
        self._contended_at = -math.inf
        self._lane: int | None = None
        self._rng = random.Random()
        self._seen: dict[uuid.UUID, datetime] = {}  # agent -> its latest change read
        # (shape, reason) -> when that reason was written to the shape's waiting jobs
        self._told: dict[tuple[repo.Shape, str], float] = {}

    def forget(self) -> None:
        self._fleet = None
        self._seen = {}

    @property
    def lane(self) -> int | None:
        """The lane this orchestrator places in while it contends with another."""
        return self._lane

    def contended(self) -> None:
        """A batch found its choices taken (most likely by another orchestrator): for
        `CONTENDED_SECONDS`, one-GPU jobs go to the best fit in a lane taken at random
        (`placement.Fleet.lane`), a new one at each such batch, so that two schedulers
        soon place on different agents."""
        self._contended_at = self._monotonic()
        self._lane = self._rng.randrange(LANES)
        if self._fleet is not None:
            self._fleet.lane = self._lane

    async def read(self, session: AsyncSession, now: datetime) -> _PassFleet:
        fleet, read_at = self._fleet, self._read_at
        if fleet is None or read_at is None or self._stale():
            fleet = await self._read_whole(session, now)
        else:
            await self._read_changed(session, fleet, read_at)
        if self._monotonic() - self._contended_at >= CONTENDED_SECONDS:
            self._lane = None
        fleet.lane = self._lane
        self._fleet, self._read_at = fleet, now
        return fleet

    async def _read_whole(self, session: AsyncSession, now: datetime) -> _PassFleet:
        held: dict[uuid.UUID, list[repo.Claimed]] = {
            a: list(c) for a, c in (await repo.claims_by_agent(session)).items()
        }
        record = await repo.setbacks(session, now=now)
        rows = {row.agent_id: row for row in await repo.agent_rows(session)}
        # Built in a thread: a third of a second of CPU at 10,000 agents, during which
        # the event loop (the API, ingest) would otherwise stand still.
        fleet = await asyncio.to_thread(
            _PassFleet, rows, held, {a: sum(n) for a, n in record.items()}
        )
        self._full_at = self._monotonic()
        self._seen = {a: at for a, at in self._seen.items() if a in rows}  # not removed
        return fleet

    async def _read_changed(
        self, session: AsyncSession, fleet: _PassFleet, read_at: datetime
    ) -> None:
        changed = await repo.agents_changed(session, since=read_at - CHANGES_MARGIN)
        # An agent is not read again at every pass that the margin still covers its
        # change (passes run back to back through a long queue, and each read 5 s of
        # heartbeats again: 3,300 agents at 10,000), only when its latest change is
        # newer than the one read, or stamped since the last pass began (it may have
        # committed after that read; and equal stamps tell nothing apart). A change
        # older than the margin is never returned, so older entries need no pruning.
        fresh = {
            a for a, at in changed.items()
            if at >= read_at or a not in self._seen or at > self._seen[a]
        }  # fmt: skip
        await self._read(session, fleet, fresh)
        self._seen.update((a, changed[a]) for a in fresh)

    async def refresh(self, session: AsyncSession, agent_ids: set[uuid.UUID]) -> None:
        """Read these agents again (mid-pass: those another orchestrator placed on)."""
        if self._fleet is not None:
            await self._read(session, self._fleet, agent_ids)

    @staticmethod
    async def _read(session: AsyncSession, fleet: _PassFleet, agent_ids: set[uuid.UUID]) -> None:
        if not agent_ids:
            return
        changed = sorted(agent_ids)
        claims = await repo.claims_by_agent(session, agent_ids=changed)
        for n, row in enumerate(await repo.agent_rows(session, agent_ids=changed), 1):
            fleet.read(row, claims.get(row.agent_id, []))
            if n % YIELD_EVERY_AGENTS == 0:
                await asyncio.sleep(0)  # the API and ingest share this event loop

    def _stale(self) -> bool:
        return self._monotonic() - self._full_at >= self.full_read_seconds

    def told(self, shape: repo.Shape, reason: str) -> None:
        """`reason` was written to the waiting jobs of `shape` (`_say_why`)."""
        now = self._monotonic()
        self._told = {k: at for k, at in self._told.items() if now - at < REASON_MAX_SECONDS}
        self._told[(shape, reason)] = now

    def told_lately(self, shape: repo.Shape, reason: str, jobs: int) -> bool:
        """Whether `reason` was written to these `jobs` waiting jobs of `shape` too lately
        to write a newer one to them all: within `REASON_SECONDS`, or a second per
        `REASON_ROWS_PER_SECOND` of them (at most `REASON_MAX_SECONDS`)."""
        at = self._told.get((shape, reason))
        wait = min(max(REASON_SECONDS, jobs / REASON_ROWS_PER_SECOND), REASON_MAX_SECONDS)
        return at is not None and self._monotonic() - at < wait


@dataclass
class _Pass:
    fleet: _PassFleet
    taken: dict[uuid.UUID, set[uuid.UUID]]  # job -> desktops whose owner took it back
    now: datetime
    clock: Callable[[], datetime]
    starvation_seconds: float
    reserved: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)  # agents another transaction held: skipped
    result: PassResult = field(default_factory=PassResult)
    # The oldest job of the shapes not read (known to miss), by its submission: the
    # starvation guard's candidate once the walk passes it (`reach`).
    unread_oldest: tuple[datetime, Requirements] | None = None
    # snapshot -> the desktops that fetched it (`store.warm_agents`)
    warm: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def excluded(self) -> frozenset[str]:
        """The agents left out of the rest of the pass."""
        return frozenset(self.reserved | self.busy)

    def want(self, job: JobRow) -> Requirements:
        return self._want(job.job_id, JobSpec.parse(job.spec))

    def _want(self, job_id: uuid.UUID, spec: JobSpec) -> Requirements:
        warm = self.warm.get(spec.snapshot, frozenset()) if spec.snapshot else frozenset()
        return requirements(spec, frozenset(str(a) for a in self.taken.get(job_id, ())), warm)

    def known_miss(self, job_id: uuid.UUID, stored: dict[str, Any]) -> Miss | None:
        """The kept miss for this job's shape (`Fleet.known_miss`)."""
        spec = JobSpec.parse(stored)
        return self.shape_misses(self._want(job_id, spec), spec.policy)

    def shape_misses(self, want: Requirements, policy: Policy) -> Miss | None:
        """The kept miss for this requirement, with the agents the pass leaves out now."""
        return self.fleet.known_miss(want, policy, exclude=self.excluded)

    def reach(self, submitted_at: datetime) -> None:
        """The walk reached a job submitted at `submitted_at`: a job not read that is older
        (`unread_oldest`) is guarded against starvation now, as if it had been read."""
        if self.unread_oldest is not None and submitted_at > self.unread_oldest[0]:
            oldest, want = self.unread_oldest
            self.unread_oldest = None
            self._guard(oldest, want)

    async def batch(self, session: AsyncSession, jobs: Sequence[JobRow]) -> list[uuid.UUID]:
        """Choose for each job in memory, each choice promised before the next, then
        write them all (`_claim`). The jobs to choose for again are returned."""
        chosen: dict[uuid.UUID, list[tuple[JobRow, Requirements, Placement]]] = {}
        for n, job in enumerate(jobs):
            if n and n % YIELD_EVERY_JOBS == 0:
                await asyncio.sleep(0)  # the API and ingest share this event loop
            spec = JobSpec.parse(job.spec)
            want = self._want(job.job_id, spec)
            choice = self.fleet.place(want, spec.policy, exclude=self.excluded)
            if isinstance(choice, Miss):
                self.missed(job, want, choice)
                continue
            chosen.setdefault(uuid.UUID(choice.agent_id), []).append((job, want, choice))
            self.fleet.promise(job, want, choice)
        if not chosen:
            return []
        placed, again, busy = await _claim(session, chosen, self.fleet, self.clock)
        self.busy.update(str(a) for a in busy)
        for job in jobs:  # in the order of the queue
            if job.job_id in placed:
                self.result.placed[job.job_id] = placed[job.job_id]
        return again

    def missed(self, job: JobRow, want: Requirements, miss: Miss) -> None:
        """The job waits, with the reason kept. So that a large job is not passed forever,
        the first one that has waited `starvation_seconds` reserves the agent closest to
        fitting it for the rest of the pass."""
        self.result.waiting[job.job_id] = miss.reason
        if job.reason != miss.reason:
            job.reason, job.updated_at = miss.reason, self.now
        self._guard(job.submitted_at, want)

    def _guard(self, submitted_at: datetime, want: Requirements) -> None:
        """A job submitted at `submitted_at` misses: if it is the first such job to have
        waited `starvation_seconds`, the agent closest to fitting it is reserved, among
        those whose whole hardware could hold it (room freed on the others would never
        be enough: reserving one for a job that asks more than any desktop has stopped
        all placement there)."""
        waited = (self.now - submitted_at).total_seconds()
        if self.reserved or waited < self.starvation_seconds:
            return
        rows = self.fleet.rows

        def could_hold(c: Candidate) -> bool:
            return could_ever_hold(want, [rows[uuid.UUID(c.agent_id)]])

        if (nearest := closest(want, list(self.fleet.candidates.values()), could_hold)) is not None:
            self.reserved.add(nearest.agent_id)


class _PassFleet(Fleet):
    """The pass's `Fleet`, with each agent's registry row and claims as last read, so
    that a batch's choices can be promised in memory (`promise`) before they are checked
    and written under the agents' locks (`_claim`)."""

    def __init__(
        self,
        rows: dict[uuid.UUID, Row[Any]],
        held: dict[uuid.UUID, list[repo.Claimed]],
        setbacks: dict[uuid.UUID, int],
    ) -> None:
        self.rows, self.held, self.setbacks = rows, held, setbacks
        self.promised: dict[uuid.UUID, list[repo.Claimed]] = {}  # chosen, not yet written
        self.others_seen = 0
        super().__init__([self.candidate_of(a) for a in rows])

    def candidate_of(self, agent_id: uuid.UUID) -> Candidate:
        claims = self.held.get(agent_id, [])
        if promised := self.promised.get(agent_id):
            claims = [*claims, *promised]
        return candidate(self.rows[agent_id], claims, self.setbacks.get(agent_id, 0))

    def promise(self, job: JobRow, want: Requirements, choice: Placement) -> None:
        agent_id = uuid.UUID(choice.agent_id)
        promised = repo.claim_rows(
            job_id=job.job_id, attempt=job.attempt + 1, agent_id=agent_id,
            gpus=[(gpu, want.vram_gb) for gpu in choice.gpu_uuids],
            cpu_cores=want.cpu_cores, memory_gb=want.memory_gb,
        )  # fmt: skip
        self.promised[agent_id] = [*self.promised.get(agent_id, []), *promised]
        self.update(self.candidate_of(agent_id), placed=True)

    def read(self, row: Row[Any], claims: Sequence[repo.Claimed]) -> Candidate:
        """The agent as read under its lock; the promises made on it are dropped. Claims
        it did not know of are counted (`others_seen`): another orchestrator placed there."""
        known = {_claim_key(c) for c in self.held.get(row.agent_id, [])}
        self.others_seen += sum(_claim_key(c) not in known for c in claims)
        self.rows[row.agent_id], self.held[row.agent_id] = row, list(claims)
        self.promised.pop(row.agent_id, None)
        fresh = self.candidate_of(row.agent_id)
        self.update(fresh)
        return fresh

    def wrote(self, agent_id: uuid.UUID, claims: Sequence[repo.Claimed]) -> Candidate:
        """Claims written on an agent read under its lock."""
        self.held[agent_id] = [*self.held.get(agent_id, []), *claims]
        fresh = self.candidate_of(agent_id)
        self.update(fresh, placed=True)
        return fresh

    def unpromise(self, agent_id: uuid.UUID) -> None:
        """The promises on an agent that could not be locked are dropped."""
        if self.promised.pop(agent_id, None) is not None and agent_id in self.rows:
            self.update(self.candidate_of(agent_id))

    def gone(self, agent_id: uuid.UUID) -> None:
        self.rows.pop(agent_id, None)
        self.held.pop(agent_id, None)
        self.promised.pop(agent_id, None)
        self.drop(str(agent_id))


_Choice = tuple[JobRow, Requirements, Placement]  # a job, what it asks, where it goes


async def _claim(
    session: AsyncSession,
    chosen: dict[uuid.UUID, list[_Choice]],
    fleet: _PassFleet,
    clock: Callable[[], datetime],
) -> tuple[dict[uuid.UUID, Placement], list[uuid.UUID], list[uuid.UUID]]:
    """Write a batch's choices: lock the chosen agents (one statement, skipping those
    another orchestrator is placing on), read them and their claims again, and write each
    choice that still fits there, in the order chosen. Returns what was placed, and the
    jobs to choose for again (still queued): those whose agent was skipped, or left, or
    no longer has room for them; and the agents skipped (left alone for the rest of the
    pass)."""
    agent_ids = sorted(chosen)
    rows = {row.agent_id: row for row in await repo.lock_agents(session, agent_ids=agent_ids)}
    claims = await repo.claims_by_agent(session, agent_ids=list(rows))
    stamp = clock()  # after the claims were read: see schedule_once
    registered: set[uuid.UUID] = set()
    if missing := [a for a in agent_ids if a not in rows]:
        registered = await repo.registered(session, agent_ids=missing)
    batch = _Written()
    for agent_id in agent_ids:
        row = rows.get(agent_id)
        if row is None:  # held by another transaction, or it left the registry
            batch.left_out(agent_id, chosen[agent_id], fleet, held=agent_id in registered)
        else:
            batch.write(row, chosen[agent_id], fleet, claims.get(agent_id, []))
    await repo.assign_many(session, batch.placings, now=stamp)
    return batch.placed, batch.again, batch.busy


@dataclass
class _Written:
    """What `_claim` writes of a batch, and what it leaves for the next."""

    placed: dict[uuid.UUID, Placement] = field(default_factory=dict)
    placings: list[repo.Placing] = field(default_factory=list)
    again: list[uuid.UUID] = field(default_factory=list)  # jobs to choose for again
    busy: list[uuid.UUID] = field(default_factory=list)  # agents another pass is placing on

    def left_out(
        self, agent_id: uuid.UUID, choices: list[_Choice], fleet: _PassFleet, *, held: bool
    ) -> None:
        """The agent's row could not be locked: another transaction holds it (`held`), or
        it left the registry."""
        if held:
            fleet.unpromise(agent_id)
            self.busy.append(agent_id)
        else:
            fleet.gone(agent_id)
        self.again += [job.job_id for job, _, _ in choices]

    def write(
        self, row: Row[Any], choices: list[_Choice], fleet: _PassFleet,
        claims: Sequence[repo.Claimed],
    ) -> None:  # fmt: skip
        """Each choice that still fits the agent as read again, in the order chosen."""
        agent_id = row.agent_id
        fresh = fleet.read(row, claims)
        for job, want, choice in choices:
            if not still_fits(want, fresh, choice.gpu_uuids):
                self.again.append(job.job_id)
                continue
            gpus = [(gpu, want.vram_gb) for gpu in choice.gpu_uuids]
            fresh = fleet.wrote(agent_id, repo.claim_rows(
                job_id=job.job_id, attempt=job.attempt + 1, agent_id=agent_id, gpus=gpus,
                cpu_cores=want.cpu_cores, memory_gb=want.memory_gb))  # fmt: skip
            self.placings.append(
                repo.Placing(job, agent_id, gpus, want.cpu_cores, want.memory_gb, row.name)
            )
            self.placed[job.job_id] = choice


def _claim_key(c: repo.Claimed) -> tuple[object, object, str]:
    return (getattr(c, "job_id", None), getattr(c, "attempt", None), c.resource)


# How often the dispatcher looks for attempts their agent no longer holds
# (`jobs.lose_forgotten`): well inside its 30 s margin, and not at every pass.
FORGOTTEN_CHECK_SECONDS = 5.0


class Dispatcher:
    """The scheduler's loop: a pass when woken (a job submitted, an attempt ended) and at
    least every `interval_seconds` (capacity seen in a heartbeat, an agent back online),
    after losing the attempts of agents gone offline (`orchestrator.jobs.lose_offline`).
    A pass that placed work is followed at once by the next: a pass chooses for at most
    `limit` queued jobs, and a longer queue must not wait out the interval between them.
    Tests call `tick()` with a manual clock."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        *,
        interval_seconds: float = 1.0,
        starvation_seconds: float = 300.0,
        avoid_seconds: float = 1800.0,
        placed_on: Callable[[uuid.UUID], None] = lambda _agent_id: None,
        lost: Callable[[uuid.UUID], None] = lambda _job_id: None,
        limit: int = 1000,
    ) -> None:
        self._placed_on = placed_on  # told of each agent a pass placed an attempt on
        self._lost = lost  # told of each job whose attempt a pass lost or handed back
        self._limit = limit
        self._sessions = sessions
        self._clock = clock
        self.interval_seconds = interval_seconds
        self._starvation = starvation_seconds
        self._avoid = avoid_seconds
        self._woken = asyncio.Event()
        self.cache = FleetCache()
        self._forgotten_due = -math.inf  # the next look for attempts no agent holds

    def wake(self) -> None:
        self._woken.set()

    async def tick(self) -> PassResult:
        now = self._clock.now()
        for job_id in await lose_offline(self._sessions, now=now):
            self._lost(job_id)
        if time.monotonic() >= self._forgotten_due:  # reads every busy agent's heartbeat:
            self._forgotten_due = time.monotonic() + FORGOTTEN_CHECK_SECONDS  # not each pass
            for job_id in await lose_forgotten(self._sessions, now=now):
                self._lost(job_id)
        result = await schedule_once(self._sessions, now=now, limit=self._limit,
                                     starvation_seconds=self._starvation,
                                     avoid_seconds=self._avoid, clock=self._clock.now,
                                     cache=self.cache)  # fmt: skip
        for agent_id in {uuid.UUID(p.agent_id) for p in result.placed.values()}:
            self._placed_on(agent_id)
        return result

    async def run(self) -> None:
        placed = False
        while True:
            if not placed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), self.interval_seconds)
            self._woken.clear()
            try:
                placed = bool((await self.tick()).placed)
            except Exception as exc:  # the database is down: the next pass tries again
                log.warning("scheduling pass failed: %s", exc)
                placed = False


def could_ever_hold(want: Requirements, rows: Sequence[Row[Any]]) -> bool:
    """Whether any registered agent's hardware (whatever its status, load and claims)
    could hold `want`: its pool and labels, its GPUs' total VRAM, its physical cores and
    its total memory. A job none could hold is still accepted (a bigger desktop may
    join), with a warning. A sandbox is not hardware: its owner may set it up later."""
    hardware = dataclasses.replace(want, require_sandbox=False)
    for row in rows:
        metrics: dict[str, Any] = row.resource_metrics or {}
        whole = Candidate(
            agent_id=str(row.agent_id), name=row.name, online=True, accepts_jobs=True,
            pool_name=row.pool_name, labels=row.labels or {},
            cpu_cores_available=row.cpu_cores_physical,
            memory_available_gb=metrics.get("memory_total_gb"),
            gpus=tuple(ledger.whole_gpu(g) for g in metrics.get("gpus", [])),
        )  # fmt: skip
        if isinstance(place(hardware, [whole]), Placement):
            return True
    return False
