"""Orders to an agent: only its orchestrator, with its secret, can make it act; a replay
does nothing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from chiffon.transport.auth import AgentCredential
from chiffon.transport.orders import (
    MAX_ORDER_BYTES,
    AttemptLedger,
    Order,
    OrderRefused,
    encode,
    order_key,
    verify,
)

AGENT, OTHER, JOB = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
SECRET, OTHER_SECRET = "s" * 43, "t" * 43
NOW = 1_800_000_000.0


def assign(attempt: int = 1, *, to: uuid.UUID = AGENT, at: float = NOW) -> Order:
    return Order("assign", to, JOB, attempt, at, {"command": ["python", "train.py"]})


KEY, OTHER_KEY = order_key(SECRET), order_key(OTHER_SECRET)


def check(body: bytes, signature: str | None) -> Order:
    return verify(body, signature, key=KEY, agent_id=AGENT, now=NOW)


def test_an_order_signed_with_the_agents_secret_is_read_back_whole() -> None:
    order = assign(3)
    assert check(*encode(order, KEY)) == order


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (encode(assign(), KEY)[0], None), "bad_signature"),
        (lambda: (encode(assign(), KEY)[0], "v1=" + "0" * 64), "bad_signature"),
        (lambda: encode(assign(), OTHER_KEY), "bad_signature"),  # another agent's key
        (lambda: encode(assign(to=OTHER), KEY), "not_mine"),
        (lambda: encode(assign(at=NOW - 301), KEY), "stale"),
        (lambda: encode(assign(at=NOW + 301), KEY), "stale"),
        (lambda: encode(assign(0), KEY), "malformed"),
        (lambda: (b"x" * (MAX_ORDER_BYTES + 1), "v1="), "too_large"),
    ],
)
def test_orders_that_are_not_this_agents_own_fresh_ones_are_refused(
    make: object, reason: str
) -> None:
    with pytest.raises(OrderRefused) as refused:
        check(*make())  # type: ignore[operator]
    assert refused.value.reason == reason


def test_a_heartbeat_signature_never_passes_for_an_order() -> None:
    body, _ = encode(assign(), KEY)
    heartbeat_style = AgentCredential(AGENT, SECRET).sign(body)  # same secret, other label
    with pytest.raises(OrderRefused, match="bad_signature"):
        check(body, heartbeat_style)


def test_a_tampered_body_fails_its_signature() -> None:
    body, signature = encode(assign(), KEY)
    doc = json.loads(body)
    doc["payload"]["command"] = ["rm", "-rf", "/"]
    with pytest.raises(OrderRefused, match="bad_signature"):
        check(json.dumps(doc, separators=(",", ":")).encode(), signature)


def test_an_attempt_starts_at_most_once_and_never_behind_a_later_one(tmp_path: Path) -> None:
    ledger = AttemptLedger(tmp_path / "jobs")
    assert ledger.claim(JOB, 1).is_dir()
    with pytest.raises(OrderRefused, match="replayed"):
        ledger.claim(JOB, 1)  # the same order delivered twice, or replayed
    assert ledger.claim(JOB, 3).name == f"{JOB}-3"
    with pytest.raises(OrderRefused, match="3 was started"):
        ledger.claim(JOB, 2)  # an older attempt arriving late
    restarted = AttemptLedger(tmp_path / "jobs")  # the record survives a restart
    with pytest.raises(OrderRefused, match="replayed"):
        restarted.claim(JOB, 3)
    assert restarted.claim(uuid.uuid4(), 1).is_dir()  # other jobs are their own
