"""The agent's work loop: orders in, attempts run, ends said; it only wires its parts.

It takes orders as raw bytes with their signature from whatever delivers them (`poll`
drives the HTTP long-poll), and reports and ships output through a `WorkChannel`, so any
transport can feed it. Its parts:

- order intake (`agent.intake`): the orchestrator's word is checked like any input
  (docs/jobs.md, "Orders to an agent"): an order that fails verification, or is for an
  attempt already started, is dropped, logged and counted by reason (the counts travel in
  every heartbeat); an assignment's fields are bounded before anything runs; an attempt
  starts at most once (`AttemptLedger`);
- the attempts this agent holds, each in one state (`agent.attempts`), each run by an
  `AttemptRunner` (`agent.attempt_runner`) whose concerns are hooks (`agent.hooks`);
- the outbox (`agent.outbox`): an end is saved, then said until heard;
- the reading (`agent.reading`), which only reads; the owner's guard (`agent.guard`) and
  GPU hygiene (`agent.hygiene`), which act on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from chiffon.agent.attempt_runner import AttemptRunner
from chiffon.agent.attempts import ENDED, REPORTED, Attempt, AttemptTable
from chiffon.agent.bounded import in_daemon_thread
from chiffon.agent.cache import GB, BlobCache
from chiffon.agent.guard import OwnerGuard, may_run_jobs
from chiffon.agent.hooks import HOOKS, HookParts
from chiffon.agent.hooks.disk import remove_old
from chiffon.agent.hygiene import GpuHygiene, gpu_key
from chiffon.agent.intake import OrderIntake, assignment_from
from chiffon.agent.outbox import Outbox, unheard
from chiffon.agent.owner import SAID, Decision, OwnerRules
from chiffon.agent.reading import Jobs, Reading, read
from chiffon.agent.report import ATTEMPTS_HELD_MAX, Snapshot
from chiffon.agent.runner import JobRun, Ladder, end_orphans
from chiffon.agent.sandbox import AttemptUnit, Sandbox
from chiffon.agent.stage import FileChannel
from chiffon.backoff import Backoff
from chiffon.schemas.dispatch import Work, ended, usage
from chiffon.transport.base import TransportError
from chiffon.transport.orders import Order

__all__ = ["ENDED", "REPORTED", "WorkChannel", "WorkLoop", "WorkSettings", "assignment_from",
           "gpu_key", "may_run_jobs"]  # fmt: skip

log = logging.getLogger(__name__)

# A fresh snapshot of this machine (GPUs and their processes), read before a start and,
# while jobs run or a GPU is dirty, every `GPU_CHECK_SECONDS`.
Fresh = Callable[[], Awaitable[Snapshot]]
Key = tuple[uuid.UUID, int]
POLL_WAIT_SECONDS = 25.0
# How often a running attempt asks whether it is still the job's current one: a desktop
# cut off long enough to be judged offline finds, once back, that its job was placed again
# (the report is answered `stale`) and ends its own attempt (`hooks.alive`).
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
# A poll that brought only orders already in hand asks again once a report was heard, or
# after this long.
REPEAT_PAUSE_SECONDS = 1.0
# At start, how long the ends a previous run left unheard may hold it up (they are said
# on, in the background, when the orchestrator is away).
RECOVER_WAIT_SECONDS = 5.0


class WorkChannel(Protocol):
    """What the work loop says to the orchestrator; each returns its verdict ("applied",
    "stale", "unknown_job") and raises `TransportError` when it could not be said."""

    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str: ...

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str: ...


class OrderSource(Protocol):
    async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]: ...


@dataclass(frozen=True, kw_only=True)
class WorkSettings(OwnerRules):
    """What the work loop is told: the owner's rules (`agent.owner.OwnerRules`, declared
    there once and handed over whole) and how jobs run here."""

    jobs_dir: Path
    allow_root: bool = False  # an agent running as root runs jobs only when told to
    grace_seconds: float = 10.0
    max_log_bytes: int = 64 * 1024 * 1024
    max_order_age_seconds: float = 300.0
    alive_check_seconds: float = ALIVE_CHECK_SECONDS
    ladder: Ladder = Ladder()  # noqa: RUF009 (frozen, so one shared default is safe)
    cache_dir: Path | None = None  # the blob cache (`agent.cache`); None: beside jobs_dir
    cache_max_gb: float = 20.0

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.jobs_dir.parent / "cache"


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
        sandbox: Sandbox | None = None,
        files: FileChannel | None = None,
    ) -> None:
        """`files`: how attempts' files move; unset, the channel when it can move them
        (`transport.http.HttpWork`), else none (an attempt with files is refused)."""
        self.settings = settings
        self.sandbox = sandbox  # where each attempt is contained (agent.sandbox)
        self.intake = OrderIntake(settings.jobs_dir, agent_id=agent_id, secret=secret,
                                  max_order_age_seconds=settings.max_order_age_seconds,
                                  clock=clock)  # fmt: skip
        self.attempts = AttemptTable()
        self.outbox = Outbox(self.attempts, channel)
        self.hygiene = GpuHygiene()
        self.owner = OwnerGuard(settings, local_time=local_time)
        if sandbox is not None and sandbox.protections.refusal() is not None:
            self.owner.unsandboxed = True
            self.owner.decide()
        self.refused = self.intake.refused  # orders refused, by reason
        self._channel = channel
        self._fresh = fresh
        self._tasks: set[asyncio.Task[None]] = set()
        self._raw: Snapshot | None = None  # the last snapshot observed, as read
        if files is None and isinstance(channel, FileChannel):
            files = channel
        cache = BlobCache(settings.effective_cache_dir,
                          max_bytes=int(settings.cache_max_gb * GB))  # fmt: skip
        self._parts = HookParts(settings=settings, channel=channel, outbox=self.outbox,
                                hygiene=self.hygiene, spawn=self._spawn,
                                last_reading=lambda: self._raw, files=files,
                                cache=cache)  # fmt: skip

    # What the heartbeat and the tests see.

    @property
    def decision(self) -> Decision:
        return self.owner.decision

    @property
    def owner_idle_seconds(self) -> float | None:
        return self.owner.idle_seconds

    @property
    def killed_leftovers(self) -> int:
        """Processes of ended jobs ended by the hygiene check."""
        return self.hygiene.killed_leftovers

    @property
    def runs(self) -> dict[Key, JobRun]:
        return self.attempts.running()

    @property
    def running(self) -> list[Key]:
        return list(self.runs)

    @property
    def held(self) -> list[str]:
        """The attempts this agent holds, as `job_id/attempt`: starting, running, or ended
        with the end not yet heard (every heartbeat carries them: the orchestrator ends
        what is out on this desktop and not among them)."""
        return [f"{job_id}/{attempt}" for job_id, attempt in self.attempts.held()]

    def accepting_now(self) -> bool:
        """Whether new jobs may land here now (the heartbeat's `accepts_jobs`): the
        desktop-wide part of the decision (each GPU's is in its `withheld`)."""
        return self.decision.desktop is None

    # Orders.

    async def handle(self, body: bytes, signature: str | None) -> bool:
        """One delivered order; whether it was news (an attempt started or refused, an end
        begun). Never raises for the order's sake: refusals are counted."""
        order = self.intake.verified(body, signature)
        if order is None:
            return False
        if order.kind == "assign":
            return await self._assign(order)
        # cancel and kill end the attempt the same way (its report says cancelled), in the
        # background: the grace period does not hold up the next order
        run = self.runs.get((order.job_id, order.attempt))
        if run is None or run.ending:
            return False
        self._spawn(run.cancel())
        return True

    async def _handled(self, body: bytes, signature: str | None) -> bool:
        """`handle`, and a failure of the agent's own while handling one order is logged
        and counted, never the end of the order loop (it once ended it, silently: the
        desktop went on saying it accepts jobs and started none)."""
        try:
            return await self.handle(body, signature)
        except Exception:
            log.exception("handling an order failed")
            self.intake.refused["failed"] += 1
            return False

    async def _assign(self, order: Order) -> bool:
        attempt_dir = self.intake.claim(order)
        if attempt_dir is None:  # said again, replayed, or older than one started
            return False
        attempt = self.attempts.add((order.job_id, order.attempt), attempt_dir)
        work, unusable = self._decode(order)
        attempt.work = work
        why_not = await self._why_not(work) or unusable
        if why_not is not None:
            log.info("attempt %s of %s declined: %s", order.attempt, order.job_id, why_not)
            await self.outbox.say(attempt, ended("refused", why_not))
            return True
        assert work is not None  # an unusable one was refused above
        run = JobRun(assignment_from(order, work), attempt_dir=attempt_dir,
                     grace_seconds=self.settings.grace_seconds,
                     max_log_bytes=self.settings.max_log_bytes,
                     ladder=self.settings.ladder, unit=self._unit(order, work))  # fmt: skip
        runner = AttemptRunner(attempt, run, table=self.attempts, parts=self._parts, hooks=HOOKS)
        if work.snapshot or work.checkpoint or work.python_env:
            # its files are fetched first (minutes for a big folder): in the background,
            # so that the next order (a cancel, another job) is not held up behind them
            self._spawn(self._start_and_follow(runner))
        elif await runner.start():
            self._spawn(runner.follow())
        return True

    async def _start_and_follow(self, runner: AttemptRunner) -> None:
        if await runner.start():
            await runner.follow()

    def _unit(self, order: Order, work: Work) -> AttemptUnit | None:
        """The attempt's contained unit, bounded by its claims; its GPUs by index."""
        if self.sandbox is None:
            return None
        wanted = set(work.gpu_uuids)
        gpus = [g.index for g in (self._raw.gpus if self._raw else ()) if gpu_key(g) in wanted]
        return self.sandbox.unit(f"{order.job_id}-{order.attempt}",
                                 memory_gb=getattr(work, "memory_gb", 0.0), gpus=gpus)  # fmt: skip

    def _decode(self, order: Order) -> tuple[Work | None, str | None]:
        """The assignment's payload, or why it is unusable (refused, and counted)."""
        try:
            return Work.from_payload(order.payload), None
        except ValueError as exc:
            self.intake.refuse("unusable", f"attempt {order.attempt} of {order.job_id}: {exc}")
            return None, f"unusable assignment: {exc}"

    async def _why_not(self, work: Work | None) -> str | None:
        """Why this desktop cannot honour the assignment now, if it cannot: the decision
        on a fresh reading (`agent.owner`), then the VRAM each of its GPUs has free."""
        if not may_run_jobs(self.settings):
            return self.owner.why_not_desktop()
        if self.sandbox is not None and (why := self.sandbox.protections.refusal()):
            return why
        gpus = list(work.gpu_uuids) if work else []
        snapshot = await self._fresh() if gpus or self._raw is None else self._raw
        self.observe(snapshot)
        why = self.owner.why_not_desktop()
        if why is not None:
            return why
        wanted = work.vram_gb if work else 0.0
        free = {gpu_key(g): g.vram_free_gb for g in snapshot.gpus}
        return next((w for g in gpus if (w := self._why_not_on(g, free, wanted))), None)

    def _why_not_on(self, gpu: str, free: dict[str, float | None], wanted: float) -> str | None:
        if (withheld := self.decision.withheld(gpu)) is not None:
            return f"{gpu} is withheld: {SAID[withheld]}"
        have = free.get(gpu)
        if have is None or have < wanted:
            return f"VRAM gone on {gpu}: {have if have is not None else 'unknown'} GB free"
        return None

    # Readings, and what is done on them.

    def observe(self, snapshot: Snapshot) -> Snapshot:
        """Take in a fresh reading (`agent.reading`, which only reads) and act on it: an
        ended job's leftovers are ended and a clean GPU offered again (`agent.hygiene`),
        each attempt's use remembered (its peak goes in its end's report) and, when it
        changed, reported; the decision made again (`agent.owner`) and acted on (jobs on a
        GPU the owner takes back are vacated). Returns the snapshot as it is sent: per GPU
        `jobs_vram_used_gb`, the foreign use, `withheld`; the desktop's `jobs_withheld`."""
        self._raw = snapshot
        if not self.owner.reads_idle:  # else the guard's reading (every second) stands
            self.owner.idle_seconds = snapshot.owner_idle_seconds
        reading = read(snapshot, self._jobs(), show_names=self.owner.policy.report_process_names)
        self._tidy(reading)
        self._record_use(reading.used)
        self.owner.decide(reading.seen)
        self.owner.enforce(self.runs, self._spawn)
        return self._as_sent(reading.snapshot)

    def _jobs(self) -> Jobs:
        groups = {run.pid: key for key, run in self.runs.items() if run.pid is not None}
        members = {pid: key for key, run in self.runs.items() if run.unit is not None
                   for pid in run.unit.pids()}  # fmt: skip
        return Jobs(groups, self.attempts.ended_keys(), dict(self.hygiene.dirt), members)

    def _tidy(self, reading: Reading) -> None:
        for pid, gpu, key in reading.leftovers:
            self.hygiene.end_leftover(pid, gpu, key)
        for gpu in reading.clean:
            self.hygiene.clean(gpu)

    def _as_sent(self, snapshot: Snapshot) -> Snapshot:
        sandbox = None if self.sandbox is None else self.sandbox.protections.report()
        return dataclasses.replace(self.owner.annotate(snapshot),
                                   orders_refused=dict(sorted(self.refused.items())),
                                   attempts_held=self.held[:ATTEMPTS_HELD_MAX],
                                   sandbox=sandbox)  # fmt: skip

    def _record_use(self, used: dict[Key, dict[str, float]]) -> None:
        for key, now in used.items():
            attempt = self.attempts.get(key)
            if attempt is None:
                continue
            for held_on, gb in now.items():
                attempt.peak[held_on] = max(attempt.peak.get(held_on, 0.0), gb)
            if now != attempt.used:
                attempt.used = now
                self._spawn(self._say_once(attempt, usage(now)))

    async def _say_once(self, attempt: Attempt, said: dict[str, Any]) -> None:
        """A usage report, worth no retry: when it fails, the next observation sends it
        again (it is forgotten as sent)."""
        try:
            await self._channel.report(*attempt.key, said)
        except TransportError as exc:
            attempt.used = {}
            log.info("usage of attempt %s of %s not reported: %s", attempt.number,
                     attempt.job_id, exc)  # fmt: skip

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        offered = self.owner.offered()
        last_gpu_read = 0.0
        self.owner.reads_idle = read_idle is not None
        while True:
            if read_idle is not None:
                idle, _ = await in_daemon_thread(read_idle, name="chiffon-owner")
                self.owner.idle_seconds = idle
            watch = self.hygiene.dirt or (self.runs and self.owner.watches_gpus)
            if watch and time.monotonic() - last_gpu_read >= gpu_every_seconds:
                last_gpu_read = time.monotonic()
                self.observe(await self._fresh())
            else:  # the GPUs as last read; only the idle time and the clock moved
                self.owner.decide()
                self.owner.enforce(self.runs, self._spawn)
            if self.owner.offered() != offered:
                offered = self.owner.offered()
                log.info("offered now: %s (owner idle %s s)", offered, self.owner_idle_seconds)
                on_change()
            await asyncio.sleep(every_seconds)

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
            self.outbox.heard.clear()
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
            news = [await self._handled(body, signature) for body, signature in delivered]
            if delivered and not any(news):
                # all already in hand (an attempt not yet reported started, a cancel under
                # way): the orchestrator says them again until it hears back, so ask again
                # once a report has been heard (or after a pause), not at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.outbox.heard.wait(), REPEAT_PAUSE_SECONDS)
            if pause_seconds and not alone:
                await _pause(pause_seconds, pushed)

    # Start and stop.

    async def recover(self) -> None:
        """At start: end what a previous run of this agent left running, and say so; and
        say `lost` for every attempt a previous run took whose end the orchestrator never
        heard (the agent was killed before it ran it, or before its end was said), so that
        no attempt stays out on a desktop that no longer runs it (`outbox.unheard`)."""
        jobs_dir = self.settings.jobs_dir
        taken = [d for d in jobs_dir.glob("*-*") if d.is_dir()]
        orphans = await asyncio.to_thread(end_orphans, jobs_dir,
                                          grace_seconds=self.settings.grace_seconds)  # fmt: skip
        await asyncio.to_thread(remove_old, jobs_dir, self.settings.keep_attempt_files_seconds,
                                time.time())  # fmt: skip
        ends = unheard(taken, orphans, self.attempts)
        # Each said until heard; the start waits for them a moment only (they go on).
        saying = [self._spawn(self.outbox.say(attempt, said)) for attempt, said in ends]
        if saying:
            await asyncio.wait(saying, timeout=RECOVER_WAIT_SECONDS)

    async def stop(self) -> None:
        """The agent is stopping: end every attempt (each reports itself lost, so its job
        is placed again while it has retries) and wait."""
        self.outbox.stopping = True
        runs = list(self.runs.values())
        await asyncio.gather(*(run.end("lost", "the agent stopped") for run in runs))
        if self._tasks:
            await asyncio.wait(set(self._tasks))
