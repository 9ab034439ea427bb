"""The heartbeat loop: collect on a steady schedule, deliver the newest snapshot.

Collection never waits on the transport. A single-slot mailbox holds the latest snapshot;
a sender task publishes it and, while the orchestrator cannot be reached, retries with
exponential backoff (capped at the interval), always with the newest snapshot: a long
outage costs nothing but stale data, never a growing buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chiffon import __version__
from chiffon.agent.report import Outgoing, Snapshot
from chiffon.backoff import Backoff
from chiffon.schemas.limits import MessageKind
from chiffon.transport.base import Publisher, TransportError

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.10  # ±10% so a fleet restarted together does not beat in lockstep
BACKOFF_FIRST_SECONDS = 0.5
GOODBYE_TIMEOUT_SECONDS = 1.5  # goodbye + close stay inside the 2 s stop budget
CLOSE_TIMEOUT_SECONDS = 0.3


@dataclass(frozen=True)
class AgentIdentity:
    """What every message says about the agent besides its resources."""

    agent_id: uuid.UUID
    name: str
    pool_name: str = "desktop_pool_1"
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    specializations: list[str] = field(default_factory=list)
    agent_version: str = __version__
    accepts_jobs: bool = False  # its owner opted in (and it may run them: not as root)


# What every message says of its agent, from its identity.
DESCRIBED = ("name", "pool_name", "agent_version", "labels", "capabilities", "specializations")


def outgoing(
    identity: AgentIdentity,
    kind: MessageKind,
    *,
    boot_id: uuid.UUID,
    seq: int,
    resources: Snapshot | None,
    accepts_jobs: bool,
) -> Outgoing:
    """One message of `identity`'s, sent now."""
    described: dict[str, Any] = {name: getattr(identity, name) for name in DESCRIBED}
    return Outgoing(kind=kind, agent_id=identity.agent_id, boot_id=boot_id, seq=seq,
                    sent_at=datetime.now(UTC), resources=resources, accepts_jobs=accepts_jobs,
                    **described)  # fmt: skip


def beat_deadline(start: float, beat: int, interval_seconds: float, rng: random.Random) -> float:
    """When beat number `beat` is due: a fixed grid plus jitter, so errors never add up."""
    jitter = rng.uniform(-JITTER_FRACTION, JITTER_FRACTION) if beat > 0 else 0.0
    return start + interval_seconds * (beat + jitter)


def backoff_seconds(failures: int, interval_seconds: float, rng: random.Random) -> float:
    """0.5 s, 1 s, 2 s ... capped at the interval, each scaled by a random 50-100%."""
    return Backoff(BACKOFF_FIRST_SECONDS, max_seconds=interval_seconds).delay(failures, rng)


class AgentLoop:
    """Registration at start, a heartbeat every interval, a goodbye at stop.

    `run()` runs until `stop()`; `run(max_beats=N)` stops by itself once N snapshots are
    collected and the last one is delivered (tests, one-shot use).
    """

    def __init__(
        self,
        identity: AgentIdentity,
        publisher: Publisher,
        collect: Callable[[], Awaitable[Snapshot]],
        *,
        interval_seconds: float,
        publish_timeout_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        accepts_jobs: Callable[[], bool] | None = None,
    ) -> None:
        self.identity = identity
        # Whether new jobs may land here now (the owner's policy); else the identity's.
        self._accepts_jobs = accepts_jobs
        self.boot_id = uuid.uuid4()
        self._publisher = publisher
        self._collect = collect
        self.interval_seconds = interval_seconds
        self._publish_timeout_seconds = publish_timeout_seconds
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._seq = 0
        self._latest: Snapshot | None = None
        self._collected = 0  # snapshots put in the mailbox
        self._fresh = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a stop, or a nudge: collect now
        self._connected = False
        self.delivered = 0
        self.failures = 0

    def stop(self) -> None:
        """Ask the loop to say goodbye and return (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def nudge(self) -> None:
        """Collect and send a heartbeat now, outside the schedule (the owner came back:
        the orchestrator must hear it within a second or two, not at the next beat)."""
        self._wake.set()

    def message(self, kind: MessageKind, resources: Snapshot | None = None) -> Outgoing:
        ask = self._accepts_jobs
        accepts = self.identity.accepts_jobs if ask is None else ask()
        msg = outgoing(self.identity, kind, boot_id=self.boot_id, seq=self._seq,
                       resources=resources, accepts_jobs=accepts)  # fmt: skip
        self._seq += 1
        return msg

    async def _deliver(self, message: Outgoing) -> None:
        """Connect if needed and publish, within the publish timeout; `TransportError`."""
        try:
            async with asyncio.timeout(self._publish_timeout_seconds + 1):
                if not self._connected:
                    await self._publisher.connect()
                    self._connected = True
                await self._publisher.publish(message)
        except TimeoutError:
            raise TransportError(f"no answer within {self._publish_timeout_seconds:g} s") from None
        except OSError as exc:  # a transport that let a socket error through
            raise TransportError(f"{type(exc).__name__}: {exc}") from None

    async def _collect_loop(self, max_beats: int | None) -> None:
        start = self._monotonic()
        beat = 0
        while max_beats is None or beat < max_beats:
            due = beat_deadline(start, beat, self.interval_seconds, self._rng)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - self._monotonic()))
                self._wake.clear()
                if self._stop.is_set():
                    return
                await self._collect_once()  # nudged: now, and the schedule stands
                continue
            await self._collect_once()
            beat += 1
            # A pass that overran skips the beats it missed rather than bursting.
            behind = int((self._monotonic() - start) / self.interval_seconds)
            beat = max(beat, behind)

    async def _collect_once(self) -> None:
        try:
            snapshot = await self._collect()
        except Exception:  # never let one bad pass end the agent
            log.exception("collecting resources failed; skipping this beat")
            return
        self._latest = snapshot
        self._collected += 1
        self._caught_up.clear()
        self._fresh.set()

    async def _send_loop(self) -> None:
        failures = 0
        while True:
            await self._fresh.wait()
            self._fresh.clear()
            number, snapshot = self._collected, self._latest
            try:
                await self._deliver(self.message("heartbeat", snapshot))
            except TransportError as exc:
                failures += 1
                self.failures += 1
                delay = backoff_seconds(failures, self.interval_seconds, self._rng)
                log.warning("heartbeat not delivered (%s); retrying in %.1f s", exc, delay)
                self._fresh.set()  # retry with whatever is newest by then
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("heartbeat delivered again after %d failed attempts", failures)
            failures = 0
            self.delivered += 1
            if number == self._collected:
                self._caught_up.set()

    async def _finished(self, collector: asyncio.Task[None]) -> None:
        await collector
        await self._caught_up.wait()

    async def run(self, *, max_beats: int | None = None) -> None:
        collector = asyncio.create_task(self._collect_loop(max_beats), name="chiffon-collect")
        sender = asyncio.create_task(self._send_loop(), name="chiffon-send")
        waiters = {asyncio.create_task(self._stop.wait()), sender}
        if max_beats is not None:
            waiters.add(asyncio.create_task(self._finished(collector)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*waiters, collector, sender):
                task.cancel()
            await asyncio.gather(*waiters, collector, sender, return_exceptions=True)
            await self._goodbye()

    async def _goodbye(self) -> None:
        """The offline message, then close; bounded so a stop takes under 2 s."""
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT_SECONDS):
                await self._deliver(self.message("offline"))
        except (TransportError, TimeoutError) as exc:
            log.warning("goodbye not delivered (%s); the orchestrator will time us out", exc)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._publisher.close()
        except (TransportError, OSError, TimeoutError) as exc:
            log.warning("closing the transport failed: %s", exc)
