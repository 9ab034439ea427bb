"""Order delivery: how what an agent must be told reaches it (docs/jobs.md).

What an agent must be told is derived from the jobs' state (`jobs.pending_orders`), signed
with the agent's order key, and reaches it two ways: its HTTP long-poll (`wait_orders`,
woken by the agent's bell) and, over RabbitMQ, a push to its queue (`_Pusher`, through
any `transport.base.OrderPush`). The rest of the orchestrator knows only `OrderDelivery`:
`tell` after a decision that gives an agent something to hear, `wait_orders` for its poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import Clock
from chiffon.orchestrator.longpoll import Bells, ring_at_notices
from chiffon.persistence import jobs as jobs_repo
from chiffon.transport.base import OrderPush, SignedOrder
from chiffon.transport.orders import encode as encode_order

log = logging.getLogger(__name__)
PUSHES_AT_ONCE = 4  # order pushes reading the database at once (`_Pusher`)
NO_NOTICE_POLL_SECONDS = 1.0  # a waiting poll asks again this often where notices go unheard


class OrderDelivery(Protocol):
    """What the rest of the orchestrator asks of order delivery."""

    def tell(self, agent_id: UUID) -> None:
        """There may be an order for `agent_id` now (a placement, a cancel)."""
        ...

    async def orders_for(self, agent_id: UUID) -> list[SignedOrder]:
        """What `agent_id` must be told now, signed."""
        ...

    async def wait_orders(self, agent_id: UUID, *, wait_seconds: float) -> list[SignedOrder]:
        """`orders_for`, waiting up to `wait_seconds` for one when there is none."""
        ...


class OrderPost:
    """`OrderDelivery` by long-poll and, with an `OrderPush`, by push.

    `order_key(agent_id)`: the key the agent checks its orders with
    (`CredentialStore.order_key`). `follow_notices` (PostgreSQL) rings an agent's bell at
    every orchestrator's placements and cancels; `close` answers every waiting poll now.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        order_key: Callable[[UUID], Awaitable[bytes]],
        *,
        long_poll_max_seconds: float,
        push: OrderPush | None = None,
    ) -> None:
        self._sessions, self._clock, self._order_key = sessions, clock, order_key
        self._long_poll_max_seconds = long_poll_max_seconds
        # An agent's order long-poll waits on its bell: rung when this orchestrator places
        # or cancels there and, on PostgreSQL, at the database's notice (migration 0016).
        self._bells = Bells()
        self.notices = False  # whether those notices are heard now
        self._pusher = None if push is None else _Pusher(push, self.orders_for)
        self.closing = False

    def tell(self, agent_id: UUID) -> None:
        """There may be an order for `agent_id`: wake its long-poll, and with a push
        send what it must be told to its queue."""
        self._bells.ring(agent_id)
        if self._pusher is not None and not self.closing:
            self._pusher.push(agent_id)

    async def orders_for(self, agent_id: UUID) -> list[SignedOrder]:
        """What `agent_id` must be told now, each order signed with its own key (jobs,
        the long-poll and the RabbitMQ push carry them)."""
        orders = await jobs.pending_orders(self._sessions, agent_id=agent_id,
                                           now=self._clock.now())  # fmt: skip
        if not orders:
            return []
        key = await self._order_key(agent_id)
        return [encode_order(order, key) for order in orders]

    async def wait_orders(self, agent_id: UUID, *, wait_seconds: float) -> list[SignedOrder]:
        """`orders_for`, waiting up to `wait_seconds` for one when there is none, asking
        the database nothing meanwhile: woken by the agent's bell (this orchestrator's
        placements and cancels, and on PostgreSQL every orchestrator's, by notice). Where
        notices are not heard (SQLite, a lost listening connection) it asks again every
        second, for what another orchestrator sharing the database decided."""
        deadline = time.monotonic() + min(wait_seconds, self._long_poll_max_seconds)
        bell = self._bells.bell(agent_id)
        while True:
            seen = bell.rings
            orders = await self.orders_for(agent_id)
            left = deadline - time.monotonic()
            if orders or left <= 0 or self.closing:
                return orders
            await bell.wait(seen, left if self.notices else min(left, NO_NOTICE_POLL_SECONDS))

    def waiting(self, agent_id: UUID) -> bool:
        """Whether a long-poll of `agent_id` waits (or is about to) on its bell."""
        return agent_id in self._bells

    async def follow_notices(self, engine: AsyncEngine) -> None:
        """Ring an agent's bell at each notice that a job was placed on it or a cancel
        asked there (PostgreSQL, any orchestrator); while it cannot listen, a waiting poll
        asks again every second (`notices` says which)."""

        def hearing(now: bool) -> None:
            self.notices = now

        await ring_at_notices(partial(jobs_repo.order_changes, engine), self._bells, "order",
                              hearing=hearing)  # fmt: skip

    def close(self) -> None:
        """A stop has begun: every waiting poll answers now, and nothing more is pushed."""
        self.closing = True
        self._bells.ring_all()

    async def stop(self) -> None:
        """`close`, then drop the pushes under way and close the push's connection."""
        self.close()
        if self._pusher is not None:
            await self._pusher.stop()


class _Pusher:
    """Pushes what an agent must be told, one push an agent at a time (it says all that is
    due), at most `PUSHES_AT_ONCE` reading the database at once: a pass placing thousands
    of jobs leaves the connection pool to ingest and the API."""

    def __init__(
        self, push: OrderPush, orders_for: Callable[[UUID], Awaitable[list[SignedOrder]]]
    ) -> None:
        self._push = push
        self._orders_for = orders_for
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[UUID] = set()  # agents with a push waiting for its turn
        self._slots = asyncio.Semaphore(PUSHES_AT_ONCE)

    def push(self, agent_id: UUID) -> None:
        if agent_id in self._waiting:
            return  # the push waiting for its turn reads what this one would
        self._waiting.add(agent_id)
        task = asyncio.create_task(self._send(agent_id), name="chiffon-push-orders")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, agent_id: UUID) -> None:
        try:
            async with self._slots:
                self._waiting.discard(agent_id)  # a placement from now on pushes again
                orders = await self._orders_for(agent_id)
        except Exception as exc:  # the database is away: the agent's own poll finds them
            log.warning("orders for %s not pushed: %s", agent_id, exc)
            return
        finally:
            self._waiting.discard(agent_id)
        if orders:
            await self._push.send(agent_id, orders)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._push.close()
