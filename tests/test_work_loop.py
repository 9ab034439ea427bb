"""The agent's work loop with real processes: only verified orders run, an attempt at
most once, refusals reported with their reason, cancel, stale verdicts, and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from chiffon.agent.report import GpuReading, Snapshot
from chiffon.agent.runner import Assignment, JobRun
from chiffon.agent.work import WorkLoop, WorkSettings
from chiffon.transport.base import TransportError
from chiffon.transport.orders import Order, encode, order_key
from tests.services import eventually

AGENT, SECRET = uuid.uuid4(), "k" * 43


class Orchestrator:
    """What the loop reports to: records every report, answers with `verdict`."""

    def __init__(self) -> None:
        self.reports: list[tuple[uuid.UUID, int, dict[str, Any]]] = []
        self.logs: dict[tuple[uuid.UUID, int], bytearray] = {}
        self.shipped_at_end: dict[uuid.UUID, int] = {}
        self.verdict = "applied"
        self.unreachable_for_usage = 0  # this many usage reports fail first
        self.changed = asyncio.Event()

    async def report(self, job_id: uuid.UUID, attempt: int, said: Mapping[str, Any]) -> str:
        if said["kind"] == "usage" and self.unreachable_for_usage:
            self.unreachable_for_usage -= 1
            raise TransportError("unreachable")
        self.reports.append((job_id, attempt, dict(said)))
        if said["kind"] == "ended":
            self.shipped_at_end[job_id] = len(self.logs.get((job_id, attempt), b""))
        self.changed.set()
        return self.verdict

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str:
        log = self.logs.setdefault((job_id, attempt), bytearray())
        assert offset == len(log), "chunks arrive in order, without gaps"
        log += data
        return self.verdict

    def said(self, job_id: uuid.UUID) -> list[str]:
        return [r[2].get("outcome") or r[2]["kind"] for r in self.reports if r[0] == job_id]

    async def until(self, job_id: uuid.UUID, n: int) -> None:
        async with asyncio.timeout(20):
            while len(self.said(job_id)) < n:
                self.changed.clear()
                await self.changed.wait()


def loop(tmp_path: Path, orch: Orchestrator, *, accept: bool = True, allow_root: bool = True,
         free: Mapping[str, float | None] | None = None,
         alive: float = 10.0) -> WorkLoop:  # fmt: skip
    settings = WorkSettings(accept_jobs="always" if accept else "never",
                            jobs_dir=tmp_path / "jobs", allow_root=allow_root,
                            grace_seconds=0.5, alive_check_seconds=alive)  # fmt: skip

    async def fresh() -> Snapshot:
        return machine(free or {})

    return WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=orch, fresh=fresh)


def machine(free: Mapping[str, float | None]) -> Snapshot:
    """A desktop whose GPUs (24 GB each) have `free` GB free, by UUID."""
    gpus = [GpuReading(index=i, uuid=u, vendor="nvidia", vram_total_gb=24.0, vram_free_gb=gb,
                       processes=()) for i, (u, gb) in enumerate(free.items())]  # fmt: skip
    free_gb = [g.vram_free_gb or 0 for g in gpus]
    return Snapshot(gpus=gpus, gpu_count=len(gpus), gpu_type="nvidia" if gpus else "none",
                    gpu_vram_total_gb=24.0 * len(gpus) if gpus else None,
                    gpu_vram_available_gb=sum(free_gb) if gpus else None,
                    gpu_vram_available_max_gb=max(free_gb, default=None))  # fmt: skip


def order(
    job_id: uuid.UUID, kind: str = "assign", attempt: int = 1, **payload: Any
) -> tuple[bytes, str]:
    body = {"command": [sys.executable, "-c", "print('hi')"], **payload} if kind == "assign" else {}
    return encode(Order(kind, AGENT, job_id, attempt, time.time(), body), order_key(SECRET))  # type: ignore[arg-type]


async def test_a_signed_assignment_runs_once_and_its_start_and_end_are_reported(
    tmp_path: Path,
) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch)
    body, signature = order(job, command=["sh", "-c", "exit 3"])
    await work.handle(body, signature)
    await orch.until(job, 2)
    assert orch.said(job) == ["started", "exit"]
    assert orch.reports[-1][2]["exit_code"] == 3
    await work.handle(body, signature)  # the same order again: nothing runs twice
    await asyncio.sleep(0)
    assert orch.said(job) == ["started", "exit"] and work.refused["replayed"] == 1


async def test_an_order_not_signed_with_this_agents_secret_runs_nothing(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch)
    body, _ = order(job)
    forged, forged_signature = encode(
        Order("assign", AGENT, job, 1, time.time(), {"command": ["touch", str(tmp_path / "x")]}),
        order_key("another secret"),
    )
    await work.handle(body, None)
    await work.handle(forged, forged_signature)
    assert work.refused["bad_signature"] == 2 and orch.reports == [] and work.running == []
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("kwargs", "payload", "reason"),
    [
        ({"accept": False}, {}, "this desktop does not accept jobs"),
        ({"free": {"GPU-a": 3.0}}, {"gpu_uuids": ["GPU-a"], "vram_gb": 8}, "VRAM gone on GPU-a"),
        ({}, {"gpu_uuids": ["GPU-x"], "vram_gb": 1}, "VRAM gone on GPU-x: unknown"),
        ({}, {"command": "rm -rf /"}, "unusable assignment: command must be a list"),
        ({}, {"workdir": "relative"}, "unusable assignment: workdir must be an absolute path"),
    ],
)
async def test_an_assignment_it_cannot_honour_goes_back_with_the_reason(
    tmp_path: Path, kwargs: dict[str, Any], payload: dict[str, Any], reason: str
) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    await loop(tmp_path, orch, **kwargs).handle(*order(job, **payload))
    [(_, _, said)] = orch.reports
    assert (said["outcome"], said["detail"].startswith(reason)) == ("refused", True), said


async def test_an_agent_running_as_root_refuses_jobs_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chiffon.agent.guard.os.geteuid", lambda: 0)
    orch, job, allowed = Orchestrator(), uuid.uuid4(), uuid.uuid4()
    await loop(tmp_path, orch, allow_root=False).handle(*order(job))
    assert orch.reports[0][2]["detail"].startswith("the agent runs as root")
    await loop(tmp_path / "b", orch, allow_root=True).handle(*order(allowed))
    await orch.until(allowed, 2)
    assert orch.said(allowed) == ["started", "exit"]


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ({"command": ["/no/such/program"]}, "the program '/no/such/program' was not found"),
        ({"command": ["no-such-program-x"]}, "the program 'no-such-program-x' was not found"),
        ({"workdir": "/nonexistent/dir"}, "the folder /nonexistent/dir does not exist"),
        # said in what a report may hold (no control characters)
        ({"workdir": "/no/such\ndir"}, "the folder /no/such dir does not exist"),
    ],
)
async def test_a_program_that_cannot_start_ends_without_an_exit_code_and_says_why(
    tmp_path: Path, payload: dict[str, Any], detail: str
) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    await loop(tmp_path, orch).handle(*order(job, **payload))
    [(_, _, said)] = orch.reports  # no "started": it never ran
    assert (said["outcome"], said["exit_code"], said["detail"]) == ("exit", None, detail)
    assert "signal" not in said


async def test_the_start_report_says_where_the_whole_output_is(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    await loop(tmp_path, orch).handle(*order(job, command=["sh", "-c", "echo kept"]))
    await orch.until(job, 2)
    started = orch.reports[0][2]
    assert started["kind"] == "started"
    log_path = Path(started["log_path"])
    assert log_path.is_absolute() and log_path == tmp_path / "jobs" / f"{job}-1" / "output.log"
    assert await asyncio.to_thread(log_path.read_text) == "kept\n"


async def test_a_cancel_order_ends_the_attempt_and_it_reports_cancelled(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch)
    await work.handle(*order(job, command=["sleep", "60"]))
    await orch.until(job, 1)
    await work.handle(*order(job, kind="cancel"))
    await orch.until(job, 2)
    assert orch.said(job) == ["started", "cancelled"] and work.running == []


async def test_a_stale_verdict_ends_what_it_runs(tmp_path: Path) -> None:
    """The orchestrator placed the job again while this desktop was cut off."""
    orch, job = Orchestrator(), uuid.uuid4()
    orch.verdict = "stale"
    await loop(tmp_path, orch).handle(*order(job, command=["sleep", "60"]))
    await orch.until(job, 2)
    assert orch.said(job) == ["started", "lost"]


async def test_a_restarted_agent_ends_and_reports_what_its_last_run_left(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    left = JobRun(
        Assignment(str(job), 4, ["sleep", "60"]), attempt_dir=tmp_path / "jobs" / f"{job}-4"
    )
    await left.start()  # the previous agent process was SIGKILLed here
    await loop(tmp_path, orch).recover()
    [(job_id, attempt, said)] = orch.reports
    assert (job_id, attempt, said["outcome"]) == (job, 4, "lost")
    assert said["detail"] == "the agent restarted and ended it"
    assert (await left.wait()).signal is not None  # it was ended (and its pipes are closed)


async def test_a_restarted_agent_says_lost_for_what_its_last_run_took_but_never_ended(
    tmp_path: Path,
) -> None:
    """The last run was SIGKILLed after it took an attempt but before it started it (no
    process left), and another whose end the orchestrator never heard; a third ended and
    was heard. Only the first two are said `lost`, each once, however often it restarts."""
    orch = Orchestrator()
    taken, unheard, heard = (uuid.uuid4() for _ in range(3))
    first = loop(tmp_path, orch)
    await first.handle(*order(heard, command=["true"]))
    await orch.until(heard, 2)
    (tmp_path / "jobs" / f"{taken}-2").mkdir()  # taken by the last run, then SIGKILLed
    (tmp_path / "jobs" / f"{unheard}-1").mkdir()
    orch.reports.clear()
    orch.verdict = "applied"
    await loop(tmp_path, orch).recover()
    said = sorted((str(j), a, r["outcome"]) for j, a, r in orch.reports)
    assert said == sorted([(str(taken), 2, "lost"), (str(unheard), 1, "lost")])
    assert all(r["detail"] == "the agent restarted before its end was said"
               for _, _, r in orch.reports)  # fmt: skip
    orch.reports.clear()
    await loop(tmp_path, orch).recover()  # and again: nothing more to say
    assert orch.reports == []


async def test_all_output_is_shipped_in_order_before_the_end_is_reported(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    script = "import sys\nfor i in range(20000): print(f'line {i:05d}', flush=i % 997 == 0)"
    await loop(tmp_path, orch).handle(*order(job, command=[sys.executable, "-c", script]))
    await orch.until(job, 2)
    shipped = bytes(orch.logs[(job, 1)])
    assert shipped == "".join(f"line {i:05d}\n" for i in range(20000)).encode()
    assert len(shipped) > 4 * 32 * 1024  # several chunks
    assert orch.shipped_at_end[job] == len(shipped)


async def test_observe_counts_the_vram_of_its_jobs_processes_and_reports_the_peak(
    tmp_path: Path,
) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch, free={"GPU-x": 24.0})
    # the job's own child holds the memory: it is in the job's process group
    script = "import subprocess; subprocess.run(['sleep', '30'])"
    await work.handle(*order(job, command=[sys.executable, "-c", script], gpu_uuids=["GPU-x"]))
    await orch.until(job, 1)
    [(_, run)] = list(work.runs.items())
    child = await _child_of(run.pid)

    def snapshot(job_gb: float) -> Snapshot:
        gpus = [
            GpuReading(index=0, uuid="GPU-x", vendor="nvidia", vram_total_gb=24.0,
                       vram_free_gb=24.0 - job_gb - 3, processes=((child, job_gb), (1, 3.0))),
            GpuReading(index=1, uuid="GPU-y", vendor="nvidia", vram_total_gb=24.0,
                       vram_free_gb=24.0),  # the driver lists no processes: unknown
        ]  # fmt: skip
        return Snapshot(gpus=gpus, gpu_count=2, gpu_type="nvidia", gpu_vram_total_gb=48.0,
                        gpu_vram_available_gb=sum(g.vram_free_gb or 0 for g in gpus),
                        gpu_vram_available_max_gb=24.0)  # fmt: skip

    orch.unreachable_for_usage = 1
    seen = work.observe(snapshot(6.0))
    assert [g.jobs_vram_used_gb for g in seen.gpus] == [6.0, None]  # pid 1 is foreign
    await _reports_sent()  # that one failed: the next observation sends it again
    work.observe(snapshot(6.0))
    await _reports_sent()
    work.observe(snapshot(9.5))
    work.observe(snapshot(9.5))  # unchanged: not reported again
    work.observe(snapshot(4.0))
    await work.handle(*order(job, kind="cancel"))
    await orch.until(job, 5)
    usage = [r[2]["vram_gb"] for r in orch.reports if r[2]["kind"] == "usage"]
    assert usage == [{"GPU-x": 6.0}, {"GPU-x": 9.5}, {"GPU-x": 4.0}]
    assert orch.reports[-1][2]["peak_vram_gb"] == {"GPU-x": 9.5}


async def _reports_sent() -> None:
    """Let the usage reports `observe` started run: the fake answers without waiting."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _child_of(pid: int | None) -> int:
    assert pid is not None
    process = psutil.Process(pid)

    async def started() -> bool:
        return bool(process.children())

    await eventually(started)
    return int(process.children()[0].pid)


async def test_an_attempt_placed_again_elsewhere_is_ended_when_its_desktop_is_back(
    tmp_path: Path,
) -> None:
    """A partition: the orchestrator judged this desktop offline and placed the job again;
    the attempt still running here learns it at its next check and ends itself."""
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch, alive=0.1)
    await work.handle(*order(job, command=["sleep", "60"]))
    await orch.until(job, 1)
    orch.verdict = "stale"  # the orchestrator's answer from now on

    async def ended() -> bool:
        return any(r[2]["kind"] == "ended" for r in orch.reports)

    await eventually(ended)
    kinds = [r[2]["kind"] for r in orch.reports]
    assert kinds[0] == "started" and kinds[-1] == "ended" and "alive" in kinds
    ended = orch.reports[-1][2]
    assert ended["outcome"] == "lost" and "no longer its job's current attempt" in ended["detail"]


async def test_a_stopping_agent_ends_its_jobs_and_reports_them_lost(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch)
    await work.handle(*order(job, command=["sleep", "60"]))
    await orch.until(job, 1)
    await work.stop()
    assert orch.said(job) == ["started", "lost"] and work.running == []
    assert orch.reports[-1][2]["detail"].startswith("the agent stopped")


async def test_a_poll_bringing_only_orders_in_hand_waits_before_asking_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestrator says an assignment again until it hears the start: the agent does
    not turn that into a busy loop of polls. It asks again at once only when a report was
    heard since it last asked (the orchestrator may know more now); else after a pause."""
    monkeypatch.setattr("chiffon.agent.work.REPEAT_PAUSE_SECONDS", 0.2)
    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch)
    same = order(job, command=["sleep", "60"])
    asked: list[float] = []

    class Source:
        async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]:
            asked.append(time.monotonic())
            if len(asked) == 5:
                raise asyncio.CancelledError
            return [same]

    with pytest.raises(asyncio.CancelledError):
        await work.poll(Source(), wait_seconds=0)
    assert orch.said(job) == ["started"]  # started once, from the first delivery
    # the start was heard while the second ask was out: the third follows at once; after
    # that nothing more is heard, so each repeat waits
    assert asked[2] - asked[1] < 0.2
    assert asked[3] - asked[2] >= 0.2 and asked[4] - asked[3] >= 0.2
    assert work.refused["replayed"] == 3
    await work.stop()


async def test_when_idle_welcomes_jobs_only_while_the_owner_is_away(tmp_path: Path) -> None:
    orch, job = Orchestrator(), uuid.uuid4()
    settings = WorkSettings(accept_jobs="when_idle", jobs_dir=tmp_path / "jobs",
                            allow_root=True, idle_minutes=10)  # fmt: skip

    async def fresh() -> Snapshot:
        return machine({})

    work = WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=orch, fresh=fresh)
    assert not work.accepting_now()  # the owner's idle time is not known yet: no
    readings = itertools.chain(
        [(1200.0, None), (1300.0, None), (0.0, None)], itertools.repeat((None, "no session"))
    )
    changes: list[bool] = []
    watching = asyncio.create_task(
        work.guard(
            lambda: next(readings), lambda: changes.append(work.accepting_now()), every_seconds=0
        )
    )

    async def all_read() -> bool:
        return work.owner_idle_seconds is None and len(changes) == 3

    await eventually(all_read)
    watching.cancel()
    # away 20 min: welcome; back: refused at once; then unknown: refused, for another reason
    assert changes == [True, False, False]
    assert work.decision.desktop == "owner_unknown"
    await work.handle(*order(job))  # an order already on its way when the owner came back
    [(_, _, said)] = orch.reports
    assert said["outcome"] == "refused" and "idle time is unknown" in said["detail"]


class Asks:
    """An order source that records how long each ask may be held."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.asked = asyncio.Event()

    async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]:
        self.waits.append(wait_seconds)
        self.asked.set()
        await asyncio.sleep(0.01)
        return []

    async def until(self, check: Callable[[], bool], seconds: float = 3.0) -> None:
        async with asyncio.timeout(seconds):
            while not check():
                self.asked.clear()
                await self.asked.wait()


async def test_while_its_queue_is_not_consumed_the_agent_long_polls_over_http(
    tmp_path: Path,
) -> None:
    """Issue 34, item 1: a queue the broker refuses (or a broker away) must not leave
    orders waiting for the next 30 s ask: the agent long-polls at once, and goes back to
    the pushed rhythm once its queue is consumed; a queue lost during the 30 s pause ends
    the pause within a second."""
    from chiffon.agent.work import POLL_WAIT_SECONDS

    work, asks, consumed = loop(tmp_path, Orchestrator()), Asks(), asyncio.Event()
    polling = asyncio.create_task(
        work.poll(asks, wait_seconds=0, pause_seconds=30, pushed=consumed)  # type: ignore[arg-type]
    )
    try:
        await asks.until(lambda: len(asks.waits) >= 3)
        assert set(asks.waits) == {POLL_WAIT_SECONDS}, asks.waits  # no pause between
        consumed.set()
        await asks.until(lambda: asks.waits[-1] == 0)
        before = len(asks.waits)
        await asyncio.sleep(1.2)
        assert len(asks.waits) == before  # pushed: the next ask is 30 s away
        consumed.clear()  # the broker dropped the queue
        await asks.until(lambda: asks.waits[-1] == POLL_WAIT_SECONDS)
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling


async def test_a_failure_of_the_agents_own_on_one_order_is_counted_and_the_next_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The order loop once died of a bug of the agent's own (a race in its blob cache) and
    # the desktop went on saying it accepted jobs while it started none.
    orch, broken, fine = Orchestrator(), uuid.uuid4(), uuid.uuid4()
    work = loop(tmp_path, orch)
    real = work._assign

    async def assign(o: Order) -> bool:
        if o.job_id == broken:
            raise RuntimeError("dictionary changed size during iteration")
        return await real(o)

    monkeypatch.setattr(work, "_assign", assign)
    asks = 0

    class Source:
        async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]:
            nonlocal asks
            asks += 1
            if asks == 3:
                raise asyncio.CancelledError
            return [order(broken), order(fine)] if asks == 1 else []

    with pytest.raises(asyncio.CancelledError):
        await work.poll(Source(), wait_seconds=0)
    await orch.until(fine, 2)
    assert orch.said(fine) == ["started", "exit"] and work.refused["failed"] == 1
    await work.stop()
