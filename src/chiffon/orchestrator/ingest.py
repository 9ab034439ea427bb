"""Heartbeat ingest: one handler for every transport.

`apply_batch` takes validated messages with the orchestrator's receipt time and applies
them in the caller's transaction: two statements for the registry (a locked read of the
agents' message ordering, then one upsert) and one for status events. The metrics history
is not written here: `orchestrator.history.HistoryRecorder` samples the registry on its own
schedule, so history costs ingest nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.persistence import credentials, registry
from chiffon.persistence.registry import Ordering, StatusEvent
from chiffon.schemas.heartbeat import AgentMessage, Resources
from chiffon.schemas.metrics import REGISTRY

log = logging.getLogger(__name__)
Outcome = Literal["applied", "stale", "unknown_agent", "suspect"]


@dataclass(frozen=True, slots=True)
class Received:
    """A valid message and when this orchestrator received it (its own clock)."""

    message: AgentMessage
    received_at: datetime


def is_newer(item: Received, last: Ordering) -> bool:
    """Whether `item` comes after the last message applied for its agent.

    Within one agent run the sequence number decides, so the agent's clock cannot matter;
    across runs (a restart), the send time does (`sent_at`: the agent's, bounded by receipt).
    """
    message = item.message
    if last.boot_id is None or last.seq is None:
        return True
    if message.boot_id == last.boot_id:
        return message.seq > last.seq
    return last.sent_at is None or sent_at(item) > last.sent_at


def two_streams(item: Received, last: Ordering) -> str | None:
    """Why `item` shows that two processes send as this agent (a copied secret, or the
    agent run twice), or None. Neither happens to one agent process, however its messages
    are delayed, repeated or reordered:

    - a message from the run before the last one, sent after the last one's latest: the
      old run still beats (two boot ids alternating);
    - a lower sequence number of the same run sent later than the higher one was, by more
      than `OVERLAP_MARGIN` (the send times are bounded by receipt, which can move a send
      time later by the agent's clock skew, never by this much between two heartbeats of
      one run): two senders counting the same run's numbers.
    """
    message, when = item.message, sent_at(item)
    if last.sent_at is None or last.boot_id is None:
        return None
    if message.boot_id != last.boot_id:
        if message.boot_id == last.prev_boot_id and when > last.sent_at:
            return (
                f"boot ids alternate: run {message.boot_id} beats again after run "
                f"{last.boot_id} began"
            )
        return None
    if last.seq is not None and message.seq < last.seq and when > last.sent_at + OVERLAP_MARGIN:
        return f"sequence numbers overlap: seq {message.seq} sent after seq {last.seq} of one run"
    return None


# See `two_streams`: more than any clamp by receipt moves one heartbeat past the next.
OVERLAP_MARGIN = timedelta(seconds=5)


def metric_columns(resources: Resources) -> dict[str, Any]:
    """The typed columns the capacity query filters on (`schemas.metrics.REGISTRY`), read
    from the message, and the JSON itself as the validated model: Chiffon's engines write it
    with pydantic's encoder (`persistence.db.create_engine`), without an intermediate dict."""
    columns: dict[str, Any] = {m.name: m.value(resources) for m in REGISTRY}
    columns["resource_metrics"] = resources  # encoded as validated, by the engine's encoder
    return columns


def sent_at(item: Received) -> datetime:
    """The send time kept for ordering across restarts: the agent's `sent_at`, but never
    later than this orchestrator received it. A boot whose clock ran ahead would otherwise
    leave a `last_sent_at` in the future, and the next boot, its clock corrected, would be
    `stale` until real time caught up, marked offline while beating."""
    return min(item.message.sent_at, item.received_at)


def _ordering(item: Received, last: Ordering | None, status: str) -> Ordering:
    """Where the agent's stream stands once `item` is applied after `last`."""
    message = item.message
    if last is None or last.boot_id == message.boot_id:
        prev = None if last is None else last.prev_boot_id
    else:
        prev = last.boot_id
    return Ordering(status, message.boot_id, message.seq, sent_at(item), prev)


def _ordering_columns(ordering: Ordering) -> dict[str, Any]:
    return {
        "last_boot_id": ordering.boot_id,
        "last_seq": ordering.seq,
        "last_sent_at": ordering.sent_at,
        "prev_boot_id": ordering.prev_boot_id,
    }


def _heartbeat_row(item: Received, ordering: Ordering) -> dict[str, Any]:
    msg = item.message
    assert msg.resources is not None  # the schema guarantees it for heartbeats
    return {
        "agent_id": msg.agent_id,
        "name": msg.name,
        "agent_type": msg.agent_type,
        "pool_name": msg.pool_name,
        "agent_version": msg.agent_version,
        "labels": dict(msg.labels),
        "capabilities": list(msg.capabilities),
        "specializations": list(msg.specializations),
        "status": "online",
        "accepts_jobs": msg.accepts_jobs,
        "last_heartbeat_at": item.received_at,
        "created_at": item.received_at,
        "updated_at": item.received_at,
        **metric_columns(msg.resources),
        **_ordering_columns(ordering),
    }


@dataclass
class _BatchPlan:
    """What one batch will write, built message by message in arrival order."""

    state: dict[uuid.UUID, Ordering]
    upserts: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    goodbyes: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    events: list[StatusEvent] = field(default_factory=list)
    suspects: dict[uuid.UUID, str] = field(default_factory=dict)  # agent -> why

    def take(self, item: Received) -> Outcome:
        msg = item.message
        last = self.state.get(msg.agent_id)
        refused = self._refusal(item, last)
        if refused is not None:
            return refused
        new_status = "online" if msg.kind == "heartbeat" else "offline"
        if last is None or last.status != new_status:
            self._event(item, last, new_status)
        ordering = self.state[msg.agent_id] = _ordering(item, last, new_status)
        self._write(item, ordering)
        return "applied"

    def _refusal(self, item: Received, last: Ordering | None) -> Outcome | None:
        """Why the message is not applied (a goodbye from no one, two senders, an old
        message), or None."""
        if last is None:
            return "unknown_agent" if item.message.kind == "offline" else None
        if (why := two_streams(item, last)) is not None:
            self._suspect(item, last, why)
            return "suspect"
        return None if is_newer(item, last) else "stale"

    def _write(self, item: Received, ordering: Ordering) -> None:
        """Plan the row the message writes: a heartbeat's upsert, or a goodbye (folded into
        the agent's upsert in this batch, if any)."""
        msg = item.message
        if msg.kind == "heartbeat":
            self.upserts[msg.agent_id] = _heartbeat_row(item, ordering)
            self.goodbyes.pop(msg.agent_id, None)
        elif msg.agent_id in self.upserts:
            row = self.upserts[msg.agent_id]
            row.update(status="offline", updated_at=item.received_at, **_ordering_columns(ordering))
        else:
            self.goodbyes[msg.agent_id] = {
                "agent_id": msg.agent_id,
                "updated_at": item.received_at,
                "boot_id": ordering.boot_id,
                "seq": ordering.seq,
                "sent_at": ordering.sent_at,
                "prev_boot_id": ordering.prev_boot_id,
            }

    def _suspect(self, item: Received, last: Ordering, why: str) -> None:
        """Quarantine the agent (once a batch): the message is not applied, since which
        of the two senders is the agent cannot be told."""
        agent_id = item.message.agent_id
        if agent_id in self.suspects:
            return
        self.suspects[agent_id] = why
        self.events.append(
            StatusEvent(agent_id, item.received_at, last.status, "suspect", why.split(":")[0])
        )

    def _event(self, item: Received, last: Ordering | None, to_status: str) -> None:
        if last is None:
            reason = "registered"
        else:
            reason = "heartbeat" if to_status == "online" else "goodbye"
        self.events.append(
            StatusEvent(
                agent_id=item.message.agent_id,
                at=item.received_at,
                from_status=None if last is None else last.status,
                to_status=to_status,
                reason=reason,
            )
        )


async def apply_batch(session: AsyncSession, items: Sequence[Received]) -> list[Outcome]:
    """Apply messages in order inside the caller's transaction; one outcome per message."""
    ids = {item.message.agent_id for item in items}
    plan = _BatchPlan(state=await registry.lock_orderings(session, agent_ids=list(ids)))
    outcomes = [plan.take(item) for item in items]
    await registry.upsert_agents(session, rows=list(plan.upserts.values()))
    await registry.mark_offline(session, rows=list(plan.goodbyes.values()))
    if items:
        now = max(item.received_at for item in items)
        await _quarantine(session, plan.suspects, now)
        await _hold(session, plan, now)
    await registry.add_events(session, events=plan.events)
    return outcomes


async def _quarantine(session: AsyncSession, suspects: dict[uuid.UUID, str], now: datetime) -> None:
    for agent_id, why in suspects.items():
        if await credentials.mark_suspect(session, agent_id=agent_id, reason=why, at=now):
            log.warning(
                "agent %s quarantined: its secret seems used from two places (%s); it "
                "takes no new job until `chiffon agents clear` or `chiffon agents rotate`",
                agent_id,
                why,
            )


async def _hold(session: AsyncSession, plan: _BatchPlan, now: datetime) -> None:
    """A new row takes its credential's hold (pending approval, suspect); a suspect one
    is held from this transaction on."""
    registered = [e.agent_id for e in plan.events if e.reason == "registered"]
    if registered or plan.suspects:
        await registry.sync_holds(session, agent_ids=[*registered, *plan.suspects], now=now)
