"""`AckWindow`, the subtlest correctness code of the consumer, without a broker: a channel
that records every `basic_ack(tag, multiple)` it is asked to write. The rule under test: a
multiple ack never covers a delivery whose write has not committed, and the acks settled in
one turn of the event loop leave as one frame. (tests/rabbitmq/test_delivery.py proves the
same against a live RabbitMQ.)"""

from __future__ import annotations

import asyncio

from chiffon.transport.rabbitmq.acks import AckWindow


class RecordingChannel:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, tag: int, *, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


async def _turn() -> None:
    """Let the window's once-per-turn send run, and its write complete."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_delivery_in_hand_holds_back_the_acks_after_it() -> None:
    channel = RecordingChannel()
    window = AckWindow(channel)
    for tag in range(1, 6):
        window.hold(tag)
    window.ack(2)
    window.ack(3)
    await _turn()
    assert channel.acks == []  # 1 is still being written: nothing after it may be acked
    window.ack(1)
    await _turn()
    assert channel.acks == [(3, True)]  # 1, 2 and 3 in one frame
    window.ack(5)
    await _turn()
    assert channel.acks == [(3, True)]  # 4 still in hand
    window.nacked(4)  # handed back one by one: later acks may pass it
    await _turn()
    assert channel.acks == [(3, True), (5, True)]
    assert not any(window.is_open(tag) for tag in range(1, 6))


async def test_acks_settled_in_one_turn_leave_as_one_frame() -> None:
    channel = RecordingChannel()
    window = AckWindow(channel)
    for tag in range(1, 501):
        window.hold(tag)
    for tag in range(500, 0, -1):  # committed in any order within the turn
        window.ack(tag)
    await _turn()
    assert channel.acks == [(500, True)]


async def test_settling_twice_or_a_tag_never_held_changes_nothing() -> None:
    channel = RecordingChannel()
    window = AckWindow(channel)
    window.hold(1)
    window.hold(2)
    window.ack(7)  # never held here (another channel's, or already gone)
    window.nacked(1)
    window.ack(1)  # already settled by its nack: no ack may follow
    await _turn()
    assert channel.acks == []  # a nacked head alone sends nothing
    assert window.is_open(2)
    window.ack(2)
    await window.flush()  # flush writes what is settled and waits for it
    assert channel.acks == [(2, True)]
