"""Orders to an agent: only its orchestrator, with its secret, can make it act; a replay
does nothing."""

from __future__ import annotations

import hashlib
import hmac
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
    seal,
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
    flipped = body[:-5] + (b"A" if body[-5:-4] != b"A" else b"B") + body[-4:]
    with pytest.raises(OrderRefused, match="bad_signature"):
        check(flipped, signature)


def test_an_order_on_the_wire_reveals_nothing_of_its_command_or_environment() -> None:
    """Issue 34, item 1: any broker user can bind a queue to `orders.#` and copy every
    order; what it gets is sealed to the agent, and two orders of one content differ."""
    secret_env = {"command": ["python", "train.py"], "env": {"S3_SECRET_KEY": "hunter2-xyz"}}
    order = Order("assign", AGENT, JOB, 1, NOW, secret_env)
    body, signature = encode(order, KEY)
    assert body.startswith(b"c1.") and body.isascii()
    for word in (b"train.py", b"S3_SECRET_KEY", b"hunter2", b"assign", str(JOB).encode()):
        assert word not in body
    assert encode(order, KEY)[0] != body  # a fresh nonce each time
    assert check(body, signature) == order


def test_a_signed_order_that_is_not_sealed_to_the_agent_is_refused() -> None:
    """A signature alone does not make a body readable: the orchestrator seals every
    order; one signed in plain text (an older orchestrator, a forged downgrade) is refused,
    as is one sealed under another agent's key but signed with this one's."""
    plain = json.dumps({"v": 1, "kind": "assign", "agent_id": str(AGENT), "job_id": str(JOB),
                        "attempt": 1, "issued_at": NOW, "payload": {}}).encode()  # fmt: skip
    signed = "v1=" + hmac.new(KEY, plain, hashlib.sha256).hexdigest()
    with pytest.raises(OrderRefused, match="bad_seal"):
        check(plain, signed)
    other = seal(b"{}", OTHER_KEY)
    with pytest.raises(OrderRefused, match="bad_seal"):
        check(other, "v1=" + hmac.new(KEY, other, hashlib.sha256).hexdigest())


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
