"""The agent's work loop: verify each order, start an attempt at most once, run it, report.

Part of issue 22 (jobs); no transport feeds it orders yet (docs/jobs.md). It takes orders
as raw bytes with their signature from whatever delivers them, and reports through a
callable, so the HTTP long-poll and the RabbitMQ queue can both feed it.

The orchestrator's word is checked like any input (docs/jobs.md, "Orders to an agent"):
an order that fails verification is counted and dropped; an assignment's fields are
bounded before anything runs; an attempt starts at most once (`AttemptLedger`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chiffon.agent.runner import Assignment, Ended, JobRun, end_orphans
from chiffon.transport.orders import AttemptLedger, Order, OrderRefused, order_key, verify

log = logging.getLogger(__name__)

# (job id, attempt, what to say) -> the orchestrator's verdict: "applied", "stale", ...
Reporter = Callable[[uuid.UUID, int, Mapping[str, Any]], Awaitable[str]]
# The GPUs' free VRAM now (GB by GPU id), for the check just before a start.
FreeVram = Callable[[], Mapping[str, float | None]]


@dataclass(frozen=True, slots=True)
class WorkSettings:
    accept_jobs: bool
    jobs_dir: Path
    allow_root: bool = False  # an agent running as root runs jobs only when told to
    grace_seconds: float = 10.0
    max_log_bytes: int = 64 * 1024 * 1024
    max_order_age_seconds: float = 300.0


class WorkLoop:
    def __init__(
        self,
        settings: WorkSettings,
        *,
        agent_id: uuid.UUID,
        secret: str,
        report: Reporter,
        free_vram: FreeVram,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._agent_id = agent_id
        self._key = order_key(secret)
        self._report = report
        self._free_vram = free_vram
        self._clock = clock
        self._ledger = AttemptLedger(settings.jobs_dir)
        self._runs: dict[tuple[uuid.UUID, int], JobRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused: Counter[str] = Counter()  # orders dropped, by reason

    @property
    def running(self) -> list[tuple[uuid.UUID, int]]:
        return list(self._runs)

    async def recover(self) -> None:
        """At start: end what a previous run of this agent left running, and say so."""
        orphans = await asyncio.to_thread(
            end_orphans, self.settings.jobs_dir, grace_seconds=self.settings.grace_seconds
        )
        for o in orphans:
            detail = "the agent restarted" + (" and ended it" if o.was_running else "")
            await self._say(uuid.UUID(o.job_id), o.attempt, _ended("lost", detail))

    async def handle(self, body: bytes, signature: str | None) -> None:
        """One delivered order. Never raises for the order's sake: refusals are counted."""
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
            self.refused[exc.reason] += 1
            log.warning("order refused: %s", exc)
            return
        if order.kind == "assign":
            await self._assign(order)
        else:  # cancel and kill end the attempt the same way; its report says cancelled
            run = self._runs.get((order.job_id, order.attempt))
            if run is not None:
                await run.cancel()

    async def stop(self) -> None:
        """The agent is stopping: end every attempt (each reports itself) and wait."""
        await asyncio.gather(*(run.cancel() for run in list(self._runs.values())))
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _assign(self, order: Order) -> None:
        try:
            attempt_dir = self._ledger.claim(order.job_id, order.attempt)
        except OrderRefused as exc:  # delivered twice, replayed, or older than one started
            self.refused[exc.reason] += 1
            return
        key = (order.job_id, order.attempt)
        why_not = self._why_not(order)
        try:
            assignment = assignment_from(order)
        except ValueError as exc:
            why_not = why_not or f"unusable assignment: {exc}"
            assignment = None
        if why_not is not None or assignment is None:
            await self._say(*key, _ended("refused", why_not or ""))
            return
        run = JobRun(assignment, attempt_dir=attempt_dir, grace_seconds=self.settings.grace_seconds,
                     max_log_bytes=self.settings.max_log_bytes)  # fmt: skip
        try:
            await run.start()
        except OSError as exc:  # no such program, a workdir that is not there: its failure
            await self._say(*key, _ended("exit", f"cannot start: {exc}", exit_code=127))
            return
        self._runs[key] = run
        task = asyncio.create_task(self._follow(key, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _why_not(self, order: Order) -> str | None:
        """Why this desktop cannot honour the assignment now, if it cannot."""
        if not self.settings.accept_jobs:
            return "this desktop does not accept jobs"
        if os.geteuid() == 0 and not self.settings.allow_root:
            return "the agent runs as root, and runs jobs as root only when started to"
        wanted = float(order.payload.get("vram_gb", 0) or 0)
        free = self._free_vram()
        for gpu in order.payload.get("gpu_uuids", []):
            have = free.get(str(gpu))
            if have is None or have < wanted:
                return f"VRAM gone on {gpu}: {have if have is not None else 'unknown'} GB free"
        return None

    async def _follow(self, key: tuple[uuid.UUID, int], run: JobRun) -> None:
        try:
            verdict = await self._say(*key, {"kind": "started"})
            if verdict == "stale":  # placed again elsewhere meanwhile: end this one
                await run.cancel()
            ended = await run.wait()
            await self._say(*key, _ended_from(ended))
        finally:
            self._runs.pop(key, None)

    async def _say(self, job_id: uuid.UUID, attempt: int, said: Mapping[str, Any]) -> str:
        try:
            return await self._report(job_id, attempt, said)
        except Exception as exc:  # the orchestrator's view converges at the next report
            log.warning("reporting attempt %s of %s failed: %s", attempt, job_id, exc)
            return "unreported"


def _ended(outcome: str, detail: str, *, exit_code: int | None = None) -> dict[str, Any]:
    return {"kind": "ended", "outcome": outcome, "exit_code": exit_code, "detail": detail}


def _ended_from(ended: Ended) -> dict[str, Any]:
    said = _ended(ended.reason, ended.detail, exit_code=ended.exit_code)
    return {**said, "signal": ended.signal, "runtime_seconds": ended.runtime_seconds}


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
