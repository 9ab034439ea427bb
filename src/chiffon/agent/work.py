"""The agent's work loop: verify each order, start an attempt at most once, run it, report.

It takes orders as raw bytes with their signature from whatever delivers them (`poll`
drives the HTTP long-poll), and reports and ships output through a `WorkChannel`, so any
transport can feed it.

The orchestrator's word is checked like any input (docs/jobs.md, "Orders to an agent"):
an order that fails verification, or is for an attempt already started, is dropped, logged
and counted by reason (the counts travel in every heartbeat); an assignment's fields are
bounded before anything runs; an attempt starts at most once (`AttemptLedger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import psutil

from chiffon.agent.bounded import in_daemon_thread
from chiffon.agent.identity import write_private
from chiffon.agent.owner import SAID, Decision, GpuSeen, OwnerPolicy, decide, parse_schedule
from chiffon.agent.report import ATTEMPTS_HELD_MAX, GpuReading, Snapshot
from chiffon.agent.runner import Assignment, CannotStart, Ended, JobRun, Ladder, end_orphans
from chiffon.backoff import Backoff
from chiffon.schemas.limits import clean_text
from chiffon.transport.base import TransportError
from chiffon.transport.orders import (
    AttemptLedger,
    Order,
    OrderRefused,
    gpu_id,
    order_key,
    verify,
)

log = logging.getLogger(__name__)

# A fresh snapshot of this machine (GPUs and their processes), read before a start and,
# while jobs run or a GPU is dirty, every `GPU_CHECK_SECONDS`.
Fresh = Callable[[], Awaitable[Snapshot]]
LOG_CHUNK_BYTES = 32 * 1024  # under the orchestrator's request body limit (64 KiB)
LOG_SHIP_INTERVAL_SECONDS = 0.25  # a line reaches `chiffon logs -f` within about this
# Output further behind than this is skipped (it stays in the log file on the desktop):
# the orchestrator keeps only a tail anyway.
LOG_MOST_BEHIND_BYTES = 4 * 1024 * 1024
# The longest log path a start report carries (schemas.jobs.LOG_PATH_MAX_CHARS: the agent
# does not load pydantic); a longer one is left out of the report.
LOG_PATH_MAX_CHARS = 4096
DETAIL_MAX_CHARS = 1000  # a report's `detail` (api.routes_work.AttemptReport)
POLL_WAIT_SECONDS = 25.0
# How often a running attempt asks whether it is still the job's current one: a desktop
# cut off long enough to be judged offline finds, once back, that its job was placed again
# (the report is answered `stale`) and ends its own attempt.
ALIVE_CHECK_SECONDS = 10.0
# Over RabbitMQ orders are pushed; the agent still asks over HTTP this often, for any
# published while it had no queue (it restarted, the broker was away).
PUSHED_POLL_PAUSE_SECONDS = 30.0
# With accept_jobs: when_idle, how often the owner's idle time is read (the owner's return
# reaches the orchestrator within about this, plus one heartbeat's delivery).
OWNER_CHECK_SECONDS = 1.0
# While a GPU is dirty, or jobs run under a policy that watches the GPUs' processes, how
# often those are read afresh: an exclusive app clears the GPU it starts on within this.
GPU_CHECK_SECONDS = 2.0
# Memory on a GPU that no listed process holds, above what there was before a job: the
# job's leftover (the GPU stays `dirty` until it is back).
DIRTY_SLACK_GB = 0.25
# How long an ended attempt's processes are still recognised (and ended) as leftovers.
ENDED_KEPT_SECONDS = 3600.0
# A poll that brought only orders already in hand asks again once a report was heard, or
# after this long.
REPEAT_PAUSE_SECONDS = 1.0
# In an attempt's directory once the orchestrator heard how it ended (`WorkLoop.recover`).
REPORTED = "reported"
# In an attempt's directory: how it ended, written before it is said (the outbox), so that
# an end the orchestrator did not hear is said again, across restarts, until it is heard.
ENDED = "ended.json"
# The longest wait between two tries of saying an attempt's end (it is tried until heard);
# a stopping agent tries this many times, then leaves it for its next start.
END_RETRY_MAX_SECONDS = 30.0
STOPPING_TRIES = 3
# At start, how long the ends a previous run left unheard may hold it up (they are said
# on, in the background, when the orchestrator is away).
RECOVER_WAIT_SECONDS = 5.0
# In an attempt's directory: the newest `issued_at` of its order seen, kept across restarts,
# so that the orchestrator saying the order again is known for a duplicate (`_in_hand`).
ISSUED = "issued_at"
# Each refused order is counted by reason (`WorkLoop.refused`, in every heartbeat as
# `orders_refused`) and logged as a warning, but for a `duplicate`: an assignment in hand
# that the orchestrator said again (it says each pending order until it hears back, signed
# afresh with a newer `issued_at`, which only the holder of the key can make), logged at
# DEBUG. docs/security.md, "Orders an agent refuses".
DUPLICATE = "duplicate"


class WorkChannel(Protocol):
    """What the work loop says to the orchestrator; each returns its verdict ("applied",
    "stale", "unknown_job") and raises `TransportError` when it could not be said."""

    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str: ...

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str: ...


class OrderSource(Protocol):
    async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]: ...


@dataclass(frozen=True, slots=True)
class WorkSettings:
    accept_jobs: str  # never, when_idle or always (agent.settings.POLICIES)
    jobs_dir: Path
    allow_root: bool = False  # an agent running as root runs jobs only when told to
    grace_seconds: float = 10.0
    max_log_bytes: int = 64 * 1024 * 1024
    max_order_age_seconds: float = 300.0
    alive_check_seconds: float = ALIVE_CHECK_SECONDS
    idle_minutes: float = 15.0  # with when_idle: the owner away this long
    # The rest of the owner's policy (agent.owner.OwnerPolicy; docs/owner.md).
    schedule: str | None = None
    reserve_gpus: tuple[str, ...] = ()
    exclusive_apps: tuple[str, ...] = ()
    on_owner_return: str = "vacate_all"
    report_process_names: bool = False
    cpu_jobs_on_return: str = "vacate"  # or "suspend" (SIGSTOP, then SIGCONT)
    ladder: Ladder = Ladder()  # noqa: RUF009 (frozen, so one shared default is safe)

    @property
    def policy(self) -> OwnerPolicy:
        return OwnerPolicy(
            accept_jobs=self.accept_jobs,
            idle_minutes=self.idle_minutes,
            schedule=None if self.schedule is None else parse_schedule(self.schedule),
            reserve_gpus=frozenset(self.reserve_gpus),
            exclusive_apps=frozenset(a.lower() for a in self.exclusive_apps),
            on_owner_return=self.on_owner_return,
            report_process_names=self.report_process_names,
        )


async def _pause(seconds: float, pushed: asyncio.Event | None) -> None:
    """`seconds`, or less: until orders stop being pushed (checked each second)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if pushed is not None and not pushed.is_set():
            return
        await asyncio.sleep(min(left, 1.0))


class WorkLoop:
    def __init__(
        self,
        settings: WorkSettings,
        *,
        agent_id: uuid.UUID,
        secret: str,
        channel: WorkChannel,
        fresh: Fresh,
        clock: Callable[[], float] = time.time,
        local_time: Callable[[], datetime] = lambda: datetime.now().astimezone(),
    ) -> None:
        self.settings = settings
        self.policy = settings.policy
        self._agent_id = agent_id
        self._key = order_key(secret)
        self._channel = channel
        self._fresh = fresh
        self._clock = clock
        self._local_time = local_time
        self._ledger = AttemptLedger(settings.jobs_dir)
        self._runs: dict[tuple[uuid.UUID, int], JobRun] = {}
        self._claimed: set[tuple[uuid.UUID, int]] = set()  # attempts this run took
        # VRAM each attempt's processes hold, by GPU: as last reported, and at most
        self._used: dict[tuple[uuid.UUID, int], dict[str, float]] = {}
        self._peak: dict[tuple[uuid.UUID, int], dict[str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused: Counter[str] = Counter()  # orders refused, by reason
        self._issued: dict[tuple[uuid.UUID, int], float] = {}  # see ISSUED
        self.owner_idle_seconds: float | None = None  # as last seen (probes.owner)
        self._raw: Snapshot | None = None  # the last snapshot observed, as read
        self._seen: list[GpuSeen] = []  # its GPUs as the decision takes them
        # GPU id -> the memory no listed process holds, as read before each job's start
        self._unaccounted: dict[str, float | None] = {}
        # GPUs an ended job may have left dirty -> the memory no listed process held
        # before that job started
        self._dirt: dict[str, float | None] = {}
        self._ended: dict[tuple[uuid.UUID, int], float] = {}  # attempts ended, and when
        self.killed_leftovers = 0  # processes of ended jobs ended by the hygiene check
        self._guard_reads_idle = False
        self._heard = asyncio.Event()  # set when a report reached the orchestrator
        self._unheard: set[tuple[uuid.UUID, int]] = set()  # ends saved, not yet heard
        self.end_retry_max_seconds = END_RETRY_MAX_SECONDS
        self._stopping = False
        # While jobs run, the GPUs are read afresh only when the policy looks at what runs
        # on them (a GPU read is cheap with NVML, a process or two with nvidia-smi).
        self._watches_gpus = bool(self.policy.exclusive_apps) or (
            self.policy.on_owner_return == "vacate_used_gpus"
        )
        self.decision = self._decide([])

    @property
    def running(self) -> list[tuple[uuid.UUID, int]]:
        return list(self._runs)

    def accepting_now(self) -> bool:
        """Whether new jobs may land here now (the heartbeat's `accepts_jobs`): the
        desktop-wide part of the decision (each GPU's is in its `withheld`)."""
        return self.decision.desktop is None

    def _decide(self, gpus: Sequence[GpuSeen]) -> Decision:
        return decide(
            self.policy,
            local=self._local_time(),
            idle_seconds=self.owner_idle_seconds,
            gpus=gpus,
            root_refused=self.settings.accept_jobs != "never" and not may_run_jobs(self.settings),
        )

    async def recover(self) -> None:
        """At start: end what a previous run of this agent left running, and say so; and
        say `lost` for every attempt a previous run took whose end the orchestrator never
        heard (the agent was killed before it ran it, or before its end was said), so that
        no attempt stays out on a desktop that no longer runs it."""
        taken = [d for d in self.settings.jobs_dir.glob("*-*") if d.is_dir()]
        orphans = await asyncio.to_thread(
            end_orphans, self.settings.jobs_dir, grace_seconds=self.settings.grace_seconds
        )
        ended: dict[tuple[uuid.UUID, int], dict[str, Any]] = {}
        for o in orphans:
            detail = "the agent restarted" + (" and ended it" if o.was_running else "")
            ended[(uuid.UUID(o.job_id), o.attempt)] = _ended("lost", detail)
        for attempt_dir in taken:
            key = _attempt_of(attempt_dir.name)
            if key is None or key in self._claimed or (attempt_dir / REPORTED).exists():
                continue
            # The outcome saved before a restart wins; else it ended unseen.
            lost = _ended("lost", "the agent restarted before its end was said")
            ended[key] = _read_saved(attempt_dir / ENDED) or ended.get(key) or lost
        # Each said until heard; the start waits for them a moment only (they go on).
        saying = [self._spawn(self._say_end(key, said)) for key, said in ended.items()]
        if saying:
            await asyncio.wait(saying, timeout=RECOVER_WAIT_SECONDS)

    async def _say_end(self, key: tuple[uuid.UUID, int], said: dict[str, Any]) -> None:
        """Say how an attempt ended, saved first (`ENDED`), and again with backoff until
        the orchestrator hears it (a stopping agent tries a few times: its next start says
        it again); once heard, its directory is marked so."""
        attempt_dir = self._ledger.attempt_dir(*key)
        if key not in self._unheard:
            await self._save_end(key, said)
        most = self.end_retry_max_seconds
        backoff, tries = Backoff(min(0.5, most), max_seconds=most), 0
        while True:
            try:
                await self._channel.report(*key, said)
                break
            except TransportError as exc:
                tries += 1
                if self._stopping and tries >= STOPPING_TRIES:
                    return  # said again at the next start
                if tries == 1 or tries % 10 == 0:
                    log.warning(
                        "the end of attempt %s of %s is not heard yet (%s); saying it again "
                        "until it is (%d tries)", key[1], key[0], exc, tries,
                    )  # fmt: skip
                await asyncio.sleep(backoff.delay(tries))
        self._heard.set()
        self._unheard.discard(key)
        with contextlib.suppress(OSError):
            (attempt_dir / REPORTED).touch()

    async def _save_end(self, key: tuple[uuid.UUID, int], said: dict[str, Any]) -> None:
        """The outbox: the end written in the attempt's directory (0600), held until heard."""
        self._unheard.add(key)
        path = self._ledger.attempt_dir(*key) / ENDED
        try:
            await asyncio.to_thread(write_private, path, json.dumps(said))
        except OSError as exc:
            log.warning("the end of attempt %s of %s is not saved: %s", key[1], key[0], exc)

    @property
    def held(self) -> list[str]:
        """The attempts this agent holds, as `job_id/attempt`: running, or ended with the
        end not yet heard (every heartbeat carries them: the orchestrator ends what is out
        on this desktop and not among them)."""
        keys = set(self._runs) | self._unheard
        return sorted(f"{job_id}/{attempt}" for job_id, attempt in keys)

    async def handle(self, body: bytes, signature: str | None) -> bool:
        """One delivered order; whether it was news (an attempt started or refused, an end
        begun). Never raises for the order's sake: refusals are counted."""
        try:
            order = verify(
                body,
                signature,
                key=self._key,
                agent_id=self._agent_id,
                now=self._clock(),
                max_age_seconds=self.settings.max_order_age_seconds,
            )
        except OrderRefused as exc:
            self._refuse(exc.reason, _detail(exc))
            return False
        if order.kind == "assign":
            return await self._assign(order)
        # cancel and kill end the attempt the same way (its report says cancelled), in the
        # background: the grace period does not hold up the next order
        run = self._runs.get((order.job_id, order.attempt))
        if run is None or run.ending:
            return False
        self._spawn(run.cancel())
        return True

    def observe(self, snapshot: Snapshot) -> Snapshot:
        """Take in a fresh reading: each GPU's processes split into this agent's jobs' (a
        process is a job's when it is in the job's process group) and foreign ones; an
        ended job's leftovers checked (`dirty`); the decision made again (`agent.owner`)
        and acted on (jobs on a GPU the owner takes back are vacated). Returns the
        snapshot as it is sent: per GPU `jobs_vram_used_gb`, the foreign use, `withheld`;
        the desktop's `jobs_withheld`. Each attempt's use is remembered (its peak goes in
        its end's report) and, when it changed, reported."""
        self._raw = snapshot
        if not self._guard_reads_idle:  # else the guard's reading (every second) stands
            self.owner_idle_seconds = snapshot.owner_idle_seconds
        groups = {run.pid: key for key, run in self._runs.items() if run.pid is not None}
        used: dict[tuple[uuid.UUID, int], dict[str, float]] = {key: {} for key in self._runs}
        gpus, seen = [], []
        for gpu in snapshot.gpus:
            gid = gpu_key(gpu)
            names: list[str] | None = None
            total, leftovers = 0.0, 0
            if gpu.processes is not None:
                names, foreign_gb = [], 0.0
                for pid, gb in gpu.processes:
                    key = self._whose(pid, groups)
                    if key in self._runs:
                        by_gpu = used[key]
                        by_gpu[gid] = round(by_gpu.get(gid, 0.0) + gb, 3)
                        total += gb
                    elif key in self._ended:
                        leftovers += 1
                        self._end_leftover(pid, gid, key)
                    elif gid in self._dirt and _gone(pid):
                        leftovers += 1  # memory of a process that is gone: not back yet
                    else:
                        names.append(_program(pid))
                        foreign_gb += gb
                shown = tuple(sorted(names)) if self.policy.report_process_names else None
                gpu = dataclasses.replace(
                    gpu, jobs_vram_used_gb=round(total, 3), foreign_processes=len(names),
                    foreign_vram_gb=round(foreign_gb, 3), foreign_names=shown,
                )  # fmt: skip
            dirty = self._is_dirty(gpu, leftovers)
            seen.append(GpuSeen(gid, gpu.index, gpu.uuid, names, gpu.fault, dirty))
            gpus.append(gpu)
        self._record_use(used)
        self._seen = seen
        self.decision = self._decide(seen)
        self._enforce()
        gpus = [dataclasses.replace(g, withheld=self.decision.withheld(gpu_key(g))) for g in gpus]
        return dataclasses.replace(snapshot, gpus=gpus, jobs_withheld=self.decision.desktop,
                                   owner_idle_seconds=self.owner_idle_seconds,
                                   orders_refused=dict(sorted(self.refused.items())),
                                   attempts_held=self.held[:ATTEMPTS_HELD_MAX])  # fmt: skip

    def _whose(
        self, pid: int, groups: Mapping[int, tuple[uuid.UUID, int]]
    ) -> tuple[uuid.UUID, int] | None:
        """The attempt a GPU process belongs to: by its process group, else by the
        attempt its environment names (a process that left the group, `setsid`, still
        carries it), if that attempt is one of this agent's, running or ended."""
        group = _group_of(pid)
        if group is not None and group in groups:
            return groups[group]
        named = _attempt_named(pid)
        return named if named in self._runs or named in self._ended else None

    def _end_leftover(self, pid: int, gpu: str, key: tuple[uuid.UUID, int]) -> None:
        log.warning("process %s of ended attempt %s of %s still holds memory on %s: ending it",
                    pid, key[1], key[0], gpu)  # fmt: skip
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            self.killed_leftovers += 1

    def _is_dirty(self, gpu: GpuReading, leftovers: int) -> bool:
        """A GPU an ended job used is clean once no process of an ended job (nor one that
        is gone) is listed there, and the memory no listed process holds is back to what
        it was before the job."""
        gid = gpu_key(gpu)
        if gid not in self._dirt:
            return False
        now, before = _unaccounted(gpu), self._dirt[gid]
        held = now is not None and before is not None and now > before + DIRTY_SLACK_GB
        if leftovers or held:
            return True
        del self._dirt[gid]
        log.info("GPU %s is clean again", gid)
        return False

    def _record_use(self, used: dict[tuple[uuid.UUID, int], dict[str, float]]) -> None:
        for key, now in used.items():
            peak = self._peak.setdefault(key, {})
            for held_on, gb in now.items():
                peak[held_on] = max(peak.get(held_on, 0.0), gb)
            if now != self._used.get(key, {}):
                self._used[key] = now
                self._spawn(self._say_once(*key, {"kind": "usage", "vram_gb": now}))

    def _enforce(self) -> None:
        """Vacate each running job whose GPUs (or, CPU-only, whose desktop) the decision
        takes back; with `cpu_jobs_on_return: suspend`, stop a CPU-only job instead while
        its owner is there or outside the schedule, and continue it after."""
        for key, run in self._runs.items():
            why = self.decision.vacating(run.assignment.gpu_uuids)
            if why is None:
                if run.suspended:
                    log.info("continuing attempt %s of %s", key[1], key[0])
                    run.resume()
                continue
            if run.ending:
                continue
            if self._suspends(run, why):
                if not run.suspended:
                    log.warning("stopping attempt %s of %s: %s", key[1], key[0], SAID[why])
                    run.suspend()
                continue
            on = ", ".join(run.assignment.gpu_uuids) or "this desktop"
            log.warning("vacating attempt %s of %s on %s: %s", key[1], key[0], on, SAID[why])
            self._spawn(run.vacate(f"preempted: {SAID[why]} ({on})"))

    def _suspends(self, run: JobRun, why: str) -> bool:
        return (
            self.settings.cpu_jobs_on_return == "suspend"
            and not run.assignment.gpu_uuids
            and why in ("owner_active", "outside_schedule")
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _say_once(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> None:
        """A usage report, worth no retry: when it fails, the next observation sends it
        again (it is forgotten as sent)."""
        try:
            await self._channel.report(job_id, attempt, said)
        except TransportError as exc:
            self._used.pop((job_id, attempt), None)
            log.info("usage of attempt %s of %s not reported: %s", attempt, job_id, exc)

    async def guard(
        self,
        read_idle: Callable[[], tuple[float | None, str | None]] | None,
        on_change: Callable[[], None],
        *,
        every_seconds: float = OWNER_CHECK_SECONDS,
        gpu_every_seconds: float = GPU_CHECK_SECONDS,
    ) -> None:
        """Decide again every `every_seconds`: the owner's idle time (with `when_idle`,
        read in a daemon thread: a hung session tool never stalls the loop), the clock
        against the schedule and the GPUs' processes read afresh every `gpu_every_seconds`
        while a GPU is dirty, or while jobs run under a policy that looks at the GPUs'
        processes (exclusive apps, `vacate_used_gpus`); else as each heartbeat read them.
        Jobs the decision takes back are vacated at once; `on_change` is called the moment
        what is offered changes (the heartbeat goes out then, not at the next beat)."""
        offered = self._offered()
        last_gpu_read = 0.0
        self._guard_reads_idle = read_idle is not None
        while True:
            if read_idle is not None:
                self.owner_idle_seconds, _ = await in_daemon_thread(read_idle, name="chiffon-owner")
            watch = self._dirt or (self._runs and self._watches_gpus)
            if watch and time.monotonic() - last_gpu_read >= gpu_every_seconds:
                last_gpu_read = time.monotonic()
                self.observe(await self._fresh())
            else:  # the GPUs as last read; only the idle time and the clock moved
                self.decision = self._decide(self._seen)
                self._enforce()
            if self._offered() != offered:
                offered = self._offered()
                log.info("offered now: %s (owner idle %s s)", offered, self.owner_idle_seconds)
                on_change()
            await asyncio.sleep(every_seconds)

    def _offered(self) -> tuple[str | None, tuple[tuple[str, str | None], ...]]:
        return self.decision.desktop, tuple(sorted(self.decision.gpus.items()))

    async def poll(
        self,
        source: OrderSource,
        *,
        wait_seconds: float = POLL_WAIT_SECONDS,
        pause_seconds: float = 0.0,
        pushed: asyncio.Event | None = None,
    ) -> None:
        """Ask `source` for orders (each ask held up to `wait_seconds`, asked again after
        `pause_seconds`) and act on each, until cancelled; while the orchestrator cannot be
        reached, ask again with backoff. `pushed`: set while orders are pushed to the agent
        (its RabbitMQ queue is consumed); while it is not, ask as an agent without a
        broker does (a long-poll, no pause)."""
        backoff, failures = Backoff(0.5, max_seconds=15.0), 0
        while True:
            self._heard.clear()
            alone = pushed is not None and not pushed.is_set()
            try:
                delivered = await source.orders(
                    wait_seconds=POLL_WAIT_SECONDS if alone else wait_seconds
                )
            except TransportError as exc:
                failures += 1
                delay = backoff.delay(failures)
                log.warning("cannot get orders (%s); asking again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            news = [await self.handle(body, signature) for body, signature in delivered]
            if delivered and not any(news):
                # all already in hand (an attempt not yet reported started, a cancel under
                # way): the orchestrator says them again until it hears back, so ask again
                # once a report has been heard (or after a pause), not at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._heard.wait(), REPEAT_PAUSE_SECONDS)
            if pause_seconds and not alone:
                await _pause(pause_seconds, pushed)

    async def stop(self) -> None:
        """The agent is stopping: end every attempt (each reports itself lost, so its job
        is placed again while it has retries) and wait."""
        self._stopping = True
        runs = list(self._runs.values())
        await asyncio.gather(*(run.end("lost", "the agent stopped") for run in runs))
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _assign(self, order: Order) -> bool:
        key = (order.job_id, order.attempt)
        try:
            attempt_dir = self._ledger.claim(*key)
        except OrderRefused as exc:  # said again, replayed, or older than one started
            self._refuse(*self._in_hand(order, exc))
            return False
        self._claimed.add(key)
        self._note_issued(key, order.issued_at)
        why_not = await self._why_not(order)
        try:
            assignment = assignment_from(order)
        except ValueError as exc:
            self._refuse("unusable", f"attempt {order.attempt} of {order.job_id}: {exc}")
            why_not = why_not or f"unusable assignment: {exc}"
            assignment = None
        if why_not is not None or assignment is None:
            log.info("attempt %s of %s declined: %s", order.attempt, order.job_id, why_not)
            await self._say_end(key, _ended("refused", why_not or ""))
            return True
        run = JobRun(assignment, attempt_dir=attempt_dir, grace_seconds=self.settings.grace_seconds,
                     max_log_bytes=self.settings.max_log_bytes,
                     ladder=self.settings.ladder)  # fmt: skip
        try:
            await run.start()
        except (CannotStart, OSError) as exc:  # no such program, a workdir that is not
            # there: it fails without an exit code (it never ran); the orchestrator adds where
            why = str(exc) if isinstance(exc, CannotStart) else f"it could not be started ({exc})"
            await self._say_end(key, _ended("exit", why))
            return True
        self._runs[key] = run
        self._spawn(self._follow(key, run))
        return True

    def _refuse(self, reason: str, detail: str) -> None:
        """Count one refused order and say so (see DUPLICATE)."""
        self.refused[reason] += 1
        level = logging.DEBUG if reason == DUPLICATE else logging.WARNING
        log.log(level, "order refused: %s: %s", reason, detail)

    def _in_hand(self, order: Order, exc: OrderRefused) -> tuple[str, str]:
        """Why the ledger refused an assignment, as (reason, detail): `superseded` when a
        later attempt of the job was started here and this one never was (a late or
        replayed order); `duplicate` when this attempt was started here and its order was
        signed again since (see DUPLICATE); else `replayed`: a copy of an order already
        delivered, no newer than it (or one a previous run took and did not note)."""
        key = (order.job_id, order.attempt)
        attempt_dir = self._ledger.attempt_dir(*key)
        if not attempt_dir.is_dir():
            return "superseded", _detail(exc)
        seen = self._issued.get(key)
        if seen is None:
            seen = _read_issued(attempt_dir / ISSUED)
        where = f"attempt {order.attempt} of {order.job_id} was started here"
        if seen is not None and order.issued_at > seen:
            self._note_issued(key, order.issued_at)
            return DUPLICATE, f"{where}; the orchestrator said its order again"
        return "replayed", f"{where}; this copy of its order is no newer than one delivered"

    def _note_issued(self, key: tuple[uuid.UUID, int], issued_at: float) -> None:
        self._issued[key] = issued_at
        with contextlib.suppress(OSError):
            (self._ledger.attempt_dir(*key) / ISSUED).write_text(repr(issued_at))

    async def _why_not(self, order: Order) -> str | None:
        """Why this desktop cannot honour the assignment now, if it cannot: the decision
        on a fresh reading (`agent.owner`), then the VRAM each of its GPUs has free."""
        if not may_run_jobs(self.settings):
            return SAID["never" if self.settings.accept_jobs == "never" else "root"]
        gpus = [str(g) for g in order.payload.get("gpu_uuids", [])]
        snapshot = await self._fresh() if gpus or self._raw is None else self._raw
        self.observe(snapshot)
        if (why := self.decision.desktop) is not None:
            idle = self.owner_idle_seconds
            seen = "unknown" if idle is None else f"{idle:.0f} s"
            return (f"{SAID[why]} (owner idle {seen}; jobs wait for "
                    f"{self.settings.idle_minutes:g} min)")  # fmt: skip
        free = {gpu_key(g): g for g in snapshot.gpus}
        wanted = float(order.payload.get("vram_gb", 0) or 0)
        for gpu in gpus:
            if (withheld := self.decision.withheld(gpu)) is not None:
                return f"{gpu} is withheld: {SAID[withheld]}"
            have = free[gpu].vram_free_gb if gpu in free else None
            if have is None or have < wanted:
                return f"VRAM gone on {gpu}: {have if have is not None else 'unknown'} GB free"
            self._unaccounted[gpu] = _unaccounted(free[gpu])
        return None

    async def _follow(self, key: tuple[uuid.UUID, int], run: JobRun) -> None:
        shipping = asyncio.create_task(self._ship(key, run))
        watching = asyncio.create_task(self._watch(key, run))
        try:
            verdict = await self._say(*key, _started(run))
            if verdict == "stale":  # placed again elsewhere meanwhile: end this one
                await self._not_current(key, run)
            ended = await run.wait()
            watching.cancel()
            said = _ended_from(ended)
            if self._peak.get(key):  # its processes were seen holding VRAM
                said["peak_vram_gb"] = self._peak[key]
            await self._save_end(key, said)  # kept from now, whatever comes
            await _finish(shipping, run)  # all its output is shipped before its end is said
            await self._say_end(key, said)
        finally:
            shipping.cancel()
            watching.cancel()
            self._runs.pop(key, None)
            self._used.pop(key, None)
            self._peak.pop(key, None)
            now = time.monotonic()
            self._ended = {k: t for k, t in self._ended.items() if now - t < ENDED_KEPT_SECONDS}
            self._ended[key] = now
            for gpu in run.assignment.gpu_uuids:  # checked before it is offered again
                self._dirt[gpu] = self._unaccounted.get(gpu)

    async def _watch(self, key: tuple[uuid.UUID, int], run: JobRun) -> None:
        """Ask now and then whether the attempt is still the job's current one here."""
        while not run.finished.is_set():
            await asyncio.sleep(self.settings.alive_check_seconds)
            try:
                verdict = await self._channel.report(*key, {"kind": "alive"})
            except TransportError:
                continue  # cut off: the orchestrator judges; we ask again
            if verdict in ("stale", "unknown_job"):
                await self._not_current(key, run)
                return

    async def _not_current(self, key: tuple[uuid.UUID, int], run: JobRun) -> None:
        log.warning("attempt %s of %s is no longer the job's current one here: ending it",
                    key[1], key[0])  # fmt: skip
        await run.end("lost", "no longer its job's current attempt (placed again elsewhere)")

    async def _ship(self, key: tuple[uuid.UUID, int], run: JobRun) -> None:
        """Send the attempt's log as it grows, in order, until the run ends and all of it
        is sent (or the orchestrator says the attempt is not current)."""
        sent, failures, backoff = 0, 0, Backoff(0.25, max_seconds=5.0)
        while True:
            ended = run.finished.is_set()
            size = run.log_bytes
            if size - sent > LOG_MOST_BEHIND_BYTES:
                sent = size - LOG_MOST_BEHIND_BYTES
            if sent >= size:
                if ended:
                    return
                run.output.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.output.wait(), LOG_SHIP_INTERVAL_SECONDS)
                continue
            chunk = await asyncio.to_thread(_read_at, run.log_path, sent, LOG_CHUNK_BYTES)
            try:
                verdict = await self._channel.ship_log(*key, sent, chunk)
            except TransportError as exc:
                failures += 1
                # Until heard, as its end (saved already) is: only a stopping agent leaves
                # the rest on the desktop, where the whole log stays.
                if ended and self._stopping and failures >= STOPPING_TRIES:
                    log.warning("output of attempt %s of %s not shipped: %s", *key[::-1], exc)
                    return
                await asyncio.sleep(backoff.delay(failures))
                continue
            failures = 0
            if verdict != "applied":
                if not ended:
                    await self._not_current(key, run)
                return
            sent += len(chunk)

    async def _say(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str:
        """Report, retrying a few times while the orchestrator cannot be reached; an end
        that is never heard is found by the orchestrator (the attempt is lost)."""
        backoff = Backoff(0.5, max_seconds=10.0)
        for failures in range(1, 8):
            try:
                verdict = await self._channel.report(job_id, attempt, said)
                self._heard.set()
                return verdict
            except TransportError as exc:
                log.warning("reporting attempt %s of %s failed: %s", attempt, job_id, exc)
                await asyncio.sleep(backoff.delay(failures))
        return "unreported"


async def _finish(shipping: asyncio.Task[None], run: JobRun) -> None:
    run.output.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(shipping), 30)


def _detail(exc: OrderRefused) -> str:
    return str(exc).removeprefix(f"{exc.reason}: ")


def _read_issued(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def _read_saved(path: Path) -> dict[str, Any] | None:
    """An attempt's saved end (`ENDED`), or None when there is none or it is unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == "ended" else None


def _attempt_of(name: str) -> tuple[uuid.UUID, int] | None:
    """(job, attempt) from an attempt directory's name, `<job_id>-<attempt>`."""
    job_id, _, attempt = name.rpartition("-")
    try:
        return uuid.UUID(job_id), int(attempt)
    except ValueError:
        return None


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _started(run: JobRun) -> dict[str, Any]:
    """The start's report: with where the attempt's whole output is on this desktop, when
    the orchestrator would take the path (an absolute one, of printable characters, within
    its bound); else without it, as an older agent says it."""
    said: dict[str, Any] = {"kind": "started"}
    path = str(run.log_path.absolute())
    if len(path) <= LOG_PATH_MAX_CHARS and clean_text(path) == path:
        said["log_path"] = path
    return said


def _ended(outcome: str, detail: str, *, exit_code: int | None = None) -> dict[str, Any]:
    # within what the orchestrator takes (a path in it may hold any character but NUL)
    detail = clean_text(detail)[:DETAIL_MAX_CHARS]
    return {"kind": "ended", "outcome": outcome, "exit_code": exit_code, "detail": detail}


def _ended_from(ended: Ended) -> dict[str, Any]:
    said = _ended(ended.reason, ended.detail, exit_code=ended.exit_code)
    return {**said, "signal": ended.signal, "runtime_seconds": ended.runtime_seconds}


def _gone(pid: int) -> bool:
    """Whether the process has ended (a zombie has: it holds nothing but its exit code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _attempt_named(pid: int) -> tuple[uuid.UUID, int] | None:
    """The attempt named in a process's environment (CHIFFON_JOB_ID, CHIFFON_ATTEMPT);
    None when it names none or cannot be read (another user's process)."""
    try:
        env = psutil.Process(pid).environ()
        return uuid.UUID(env["CHIFFON_JOB_ID"]), int(env["CHIFFON_ATTEMPT"])
    except (psutil.Error, KeyError, ValueError, OSError):
        return None


def _program(pid: int) -> str:
    """A process's program name, lower case ("?" when it cannot be read). Any local user
    names their own processes: control characters are blanked, the length bounded."""
    try:
        return clean_text(psutil.Process(pid).name().lower()[:64]).strip() or "?"
    except psutil.Error:
        return "?"


def _unaccounted(gpu: GpuReading) -> float | None:
    """Memory in use on the GPU that no listed process holds (the driver's own, and any
    leftover); None when the driver does not say."""
    if gpu.vram_total_gb is None or gpu.vram_free_gb is None:
        return None
    listed = sum(gb for _, gb in gpu.processes or ())
    return max(0.0, gpu.vram_total_gb - gpu.vram_free_gb - listed)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone, or another namespace's pid
        return None


def gpu_key(gpu: GpuReading) -> str:
    """A GPU's id in claims and orders (`transport.orders.gpu_id`)."""
    return gpu_id(gpu.uuid, gpu.index)


def may_run_jobs(settings: WorkSettings) -> bool:
    """Whether this agent runs jobs at all: its owner opted in, and it is not root (or was
    told it may run jobs as root)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return settings.accept_jobs != "never" and (not root or settings.allow_root)


def assignment_from(order: Order) -> Assignment:
    """The order's payload as an `Assignment`, every field checked (`ValueError`)."""
    p = order.payload
    command = _strings(p.get("command"), "command", most=1024)
    if not command or not command[0]:
        raise ValueError("command is empty")
    env = p.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "\x00" not in k + v for k, v in env.items()
    ):
        raise ValueError("env must map names to strings")
    workdir = p.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
        raise ValueError("workdir must be an absolute path")
    timeout = p.get("timeout_seconds")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ValueError("timeout_seconds must be a positive number")
    return Assignment(
        job_id=str(order.job_id),
        attempt=order.attempt,
        command=command,
        env=env,
        workdir=workdir,
        gpu_uuids=_strings(p.get("gpu_uuids", []), "gpu_uuids", most=64),
        gpu_vendor=p.get("gpu_vendor") if isinstance(p.get("gpu_vendor"), str) else None,
        timeout_seconds=None if timeout is None else float(timeout),
    )


def _strings(value: object, name: str, *, most: int) -> Sequence[str]:
    if not isinstance(value, list) or len(value) > most:
        raise ValueError(f"{name} must be a list of at most {most} strings")
    if not all(isinstance(v, str) and "\x00" not in v for v in value):
        raise ValueError(f"{name} must hold strings without NUL")
    return tuple(value)
