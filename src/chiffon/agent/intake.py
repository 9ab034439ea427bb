"""Order intake: each delivered order verified (`transport.orders.verify`), an assignment
claimed in the ledger (an attempt starts at most once, `AttemptLedger`) and its fields
bounded (`assignment_from`) before anything runs. What fails is dropped, logged and counted
by reason (the counts travel in every heartbeat, docs/security.md, "Orders an agent
refuses")."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from chiffon.agent.runner import Assignment
from chiffon.schemas.dispatch import Work
from chiffon.transport.orders import AttemptLedger, Order, OrderRefused, order_key, verify

# Refusals are logged as the work loop's, as they always were (log filters name it).
log = logging.getLogger("chiffon.agent.work")

# In an attempt's directory: the newest `issued_at` of its order seen, kept across restarts,
# so that the orchestrator saying the order again is known for a duplicate (`_in_hand`).
ISSUED = "issued_at"
# Each refused order is counted by reason (`OrderIntake.refused`, in every heartbeat as
# `orders_refused`) and logged as a warning, but for a `duplicate`: an assignment in hand
# that the orchestrator said again (it says each pending order until it hears back, signed
# afresh with a newer `issued_at`, which only the holder of the key can make), logged at
# DEBUG. docs/security.md, "Orders an agent refuses".
DUPLICATE = "duplicate"
Key = tuple[uuid.UUID, int]


class OrderIntake:
    def __init__(
        self,
        jobs_dir: Path,
        *,
        agent_id: uuid.UUID,
        secret: str,
        max_order_age_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.ledger = AttemptLedger(jobs_dir)
        self.refused: Counter[str] = Counter()  # orders refused, by reason
        self._agent_id = agent_id
        self._key = order_key(secret)
        self._max_age = max_order_age_seconds
        self._clock = clock
        self._issued: dict[Key, float] = {}  # see ISSUED

    def verified(self, body: bytes, signature: str | None) -> Order | None:
        """The order, when it is this agent's, signed with its key and fresh; else None
        (counted)."""
        try:
            return verify(body, signature, key=self._key, agent_id=self._agent_id,
                          now=self._clock(), max_age_seconds=self._max_age)  # fmt: skip
        except OrderRefused as exc:
            self.refuse(exc.reason, _detail(exc))
            return None

    def claim(self, order: Order) -> Path | None:
        """The new attempt's directory; None (counted) when it is in hand already, or
        older than one started (said again, replayed)."""
        key = (order.job_id, order.attempt)
        try:
            attempt_dir = self.ledger.claim(*key)
        except OrderRefused as exc:
            self.refuse(*self._in_hand(order, exc))
            return None
        self._note_issued(key, order.issued_at)
        return attempt_dir

    def refuse(self, reason: str, detail: str) -> None:
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
        attempt_dir = self.ledger.attempt_dir(*key)
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

    def _note_issued(self, key: Key, issued_at: float) -> None:
        self._issued[key] = issued_at
        with contextlib.suppress(OSError):
            (self.ledger.attempt_dir(*key) / ISSUED).write_text(repr(issued_at))


def _detail(exc: OrderRefused) -> str:
    return str(exc).removeprefix(f"{exc.reason}: ")


def _read_issued(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def assignment_from(order: Order, work: Work | None = None) -> Assignment:
    """The order's payload as an `Assignment`, every field checked (`ValueError`; the
    contract's decoder, `schemas.dispatch.Work.from_payload`, unless given decoded)."""
    w = work or Work.from_payload(order.payload)
    return Assignment(
        job_id=str(order.job_id), attempt=order.attempt, command=w.command, env=w.env,
        workdir=w.workdir, gpu_uuids=w.gpu_uuids, gpu_vendor=w.gpu_vendor,
        timeout_seconds=w.timeout_seconds,
    )  # fmt: skip
