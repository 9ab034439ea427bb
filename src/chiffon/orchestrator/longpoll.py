"""What a long-poll waits on without asking the database, and how many one caller may
hold open.

A follower of a job's output reads once, then waits on the job's `Bell` until something
may have changed: a chunk stored, the attempt ended, the job cancelled while queued. This
orchestrator rings the bell after its own commit; on PostgreSQL every orchestrator rings
it at the database's notice (`persistence.jobs.LOG_CHANNEL`, `ring_at_notices`), whichever
one received the change. Until then the follower costs no query, and when it rings, the
followers asking for the same bytes share one read (`SharedReads`). An agent's order
long-poll waits on its own bell the same way (`orchestrator.delivery`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager, suppress
from functools import partial
from typing import Any, Generic, TypeVar
from uuid import UUID
from weakref import WeakValueDictionary

log = logging.getLogger(__name__)

# An iterator of a channel's notices (their payloads), which raises when its connection
# is lost: `persistence.jobs.queue_changes` and its siblings, given their engine.
Listen = Callable[[], AbstractAsyncContextManager[AsyncIterator[str]]]


class Bell:
    """Rung each time a job's log may have changed. A reader notes `rings` before it reads
    and, finding nothing new, waits for a ring after that one: a ring while it was reading
    is never missed, whatever other readers of the job do meanwhile."""

    __slots__ = ("__weakref__", "_rung", "rings")

    def __init__(self) -> None:
        self.rings = 0
        self._rung = asyncio.Event()

    def ring(self) -> None:
        self.rings += 1
        self._rung.set()  # wakes every waiter; the next waits on a fresh event
        self._rung = asyncio.Event()

    async def wait(self, seen: int, timeout_seconds: float) -> None:
        """Until a ring after the `seen`-th, or `timeout_seconds`."""
        if self.rings != seen:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._rung.wait(), timeout_seconds)


class Bells:
    """A bell per job while someone waits on it (nobody waiting: nothing kept)."""

    def __init__(self) -> None:
        self._bells: WeakValueDictionary[UUID, Bell] = WeakValueDictionary()

    def bell(self, job_id: UUID) -> Bell:
        """The job's bell; keep it while waiting on it."""
        return self._bells.setdefault(job_id, Bell())

    def __contains__(self, key: UUID) -> bool:
        """Whether someone holds the bell of `key` (waits on it, or is about to)."""
        return key in self._bells

    def ring(self, job_id: UUID) -> None:
        if (bell := self._bells.get(job_id)) is not None:
            bell.ring()

    def ring_all(self) -> None:
        """Every waiter reads again (a stop; notices that may have been missed)."""
        for bell in list(self._bells.values()):
            bell.ring()


T = TypeVar("T")


class SharedReads(Generic[T]):
    """Followers asking for the same bytes (`key`) share one read, when the job's bell
    has not rung since it began: three thousand followers of one job, woken by its chunk,
    cost one read of it, not three thousand."""

    def __init__(self) -> None:
        # key -> (the bell, its rings when the read began, the read); the bell is held so
        # that a follower arriving meanwhile finds the same one, with the same count
        self._reads: dict[Hashable, tuple[Bell, int, asyncio.Task[T]]] = {}

    async def read(
        self, key: Hashable, bell: Bell, read: Callable[[], Coroutine[Any, Any, T]]
    ) -> tuple[int, T]:
        """The bell's rings as noted before reading, and what `read()` gives: from a read
        of `key` already under way since that ring, or begun now. A follower that leaves
        does not end it for the others."""
        seen = bell.rings
        held = self._reads.get(key)
        if held is None or held[0] is not bell or held[1] != seen:
            held = (bell, seen, asyncio.create_task(read()))
            self._reads[key] = held
            held[2].add_done_callback(partial(self._forget, key, held))
        return seen, await asyncio.shield(held[2])

    def _forget(
        self, key: Hashable, held: tuple[Bell, int, asyncio.Task[T]], task: asyncio.Task[T]
    ) -> None:
        if self._reads.get(key) is held:
            del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved: every follower may have left before it failed


class TooManyLongPolls(Exception):
    """A caller already holds as many long-polls open as it may."""

    def __init__(self, limit: int, retry_after_seconds: int) -> None:
        super().__init__(
            f"this token already holds {limit} log long-polls open "
            f"(CHIFFON_LONG_POLLS_PER_TOKEN); ask again in {retry_after_seconds} s, "
            "or follow fewer logs at once"
        )
        self.retry_after_seconds = retry_after_seconds


# A refused follower asks again after this: a slot frees as soon as any of the caller's
# long-polls is answered, but a thousand refused followers asking every second would keep
# the server busy refusing them.
LONG_POLL_RETRY_AFTER_SECONDS = 5  # whole seconds, as Retry-After says them


class LongPolls:
    """At most `per_caller` long-polls open at once for each caller (an API token, by its
    digest): the next is refused before it costs a query."""

    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._open: Counter[str] = Counter()

    def held(self, caller: str) -> int:
        """How many of `caller`'s long-polls are open."""
        return self._open[caller]

    def slot(self, caller: str) -> AbstractContextManager[None]:
        """Take one of `caller`'s slots now (`TooManyLongPolls` when none is free); the
        context returned gives it back when left."""
        if self._open[caller] >= self.per_caller:
            raise TooManyLongPolls(self.per_caller, LONG_POLL_RETRY_AFTER_SECONDS)
        self._open[caller] += 1
        return self._held(caller)

    @contextmanager
    def _held(self, caller: str) -> Iterator[None]:
        try:
            yield
        finally:
            self._open[caller] -= 1
            if self._open[caller] <= 0:
                del self._open[caller]


async def follow_notices(
    listen: Listen,
    each: Callable[[str], None],
    what: str,
    *,
    hearing: Callable[[bool], None] = lambda _: None,
    retry_seconds: float = 1.0,
) -> None:
    """Until cancelled: hand each notice's payload to `each`, and listen again
    `retry_seconds` after the connection is lost (the database is away: the waiters fall
    back on their own timeouts meanwhile). `hearing` is told when notices start and stop
    being heard."""
    while True:
        try:
            async with listen() as changes:
                hearing(True)
                async for payload in changes:
                    each(payload)
                raise ConnectionError("the notices ended")
        except Exception as exc:  # the database is away: waiters fall back meanwhile
            log.debug("cannot listen for %s changes: %s", what, exc)
        finally:
            hearing(False)
        await asyncio.sleep(retry_seconds)


async def ring_at_notices(
    listen: Listen,
    bells: Bells,
    what: str,
    *,
    hearing: Callable[[bool], None] = lambda _: None,
    retry_seconds: float = 1.0,
) -> None:
    """Until cancelled: ring the bell each notice names. At each (re)connection every
    bell rings: a notice sent while this one was not listening is lost, so its waiters
    read once more. `hearing` is told when notices start and stop."""

    def heard(now: bool) -> None:
        hearing(now)
        if now:
            bells.ring_all()

    await follow_notices(listen, partial(_ring_named, bells, what), what, hearing=heard,
                         retry_seconds=retry_seconds)  # fmt: skip


def _ring_named(bells: Bells, what: str, payload: str) -> None:
    """Ring the bell a notice names (a UUID); a payload that names none is someone else's
    NOTIFY on the channel."""
    try:
        bells.ring(UUID(payload))
    except ValueError:
        log.debug("%s notice that names nothing: %r", what, payload[:100])
