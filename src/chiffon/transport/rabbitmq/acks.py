"""The consumer's ack bookkeeping: which deliveries may be acked, and in how few frames.

Free of aio-pika: a channel is anything with `basic_ack(tag, multiple=...)`, so the rules
are unit-tested with a fake channel that records every frame (tests/test_ack_window.py).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any

from chiffon.backoff import describe

log = logging.getLogger(__name__)


class AckWindow:
    """The acks of one channel, sent as one `basic.ack multiple` per run of settled
    deliveries instead of one frame per message: +31% in drains of a backlog, fewer frames
    for the broker too (docs/performance.md, item 18).

    A multiple ack settles every outstanding delivery up to its tag, so the window sends
    one only up to the highest tag below which every delivery is settled: acked after its
    commit (or its copy to the rejected queue), or already nacked one by one. A message
    still in hand holds back the acks of those after it; none is ever acked before its
    write committed. Acks settled in one turn of the event loop go out together.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel  # aiormq's channel, whose delivery tags these are
        self._in_hand: list[int] = []  # heap: tags not yet covered by an ack
        self._open: set[int] = set()  # tags held and not settled yet
        self._settled: dict[int, bool] = {}  # tag -> True: to ack; False: nacked already
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def hold(self, tag: int) -> None:
        """A delivery arrived: nothing after it is acked until it is settled."""
        heapq.heappush(self._in_hand, tag)
        self._open.add(tag)

    def is_open(self, tag: int) -> bool:
        """Held and neither acked nor nacked yet."""
        return tag in self._open

    def ack(self, tag: int) -> None:
        """Its write committed: ack it with the others settled in this turn."""
        self._settle(tag, True)

    def nacked(self, tag: int) -> None:
        """Its nack was written: later acks may pass it."""
        self._settle(tag, False)

    def _settle(self, tag: int, ack: bool) -> None:
        if tag not in self._open:
            return
        self._open.discard(tag)
        self._settled[tag] = ack
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_settled)

    def _take(self) -> int | None:
        """Pop the settled run at the head; the highest tag in it to ack, if any."""
        last = None
        while self._in_hand and self._in_hand[0] in self._settled:
            tag = heapq.heappop(self._in_hand)
            if self._settled.pop(tag):
                last = tag
        return last

    def _send_settled(self) -> None:
        self._scheduled = False
        tag = self._take()
        if tag is not None:
            task = asyncio.create_task(self._send(tag))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def flush(self) -> None:
        """Send what is settled now and wait until every ack is written."""
        self._send_settled()
        if self._sending:
            await asyncio.wait(set(self._sending))

    async def _send(self, tag: int) -> None:
        try:
            await self.channel.basic_ack(tag, multiple=True)
        except Exception as exc:  # the channel died: the broker redelivers (no ack was lost)
            log.info("AMQP ack not delivered, the broker will redeliver: %s", describe(exc))
