"""Orders: what the orchestrator tells one agent (run this attempt, cancel it, kill it).

Carried by the HTTP long-poll and the agent's RabbitMQ queue; docs/jobs.md describes them.

An order is the reverse of a heartbeat's signature. The body is JSON; beside it travels
`v1=<hex HMAC-SHA256>` under a key derived from *that agent's* secret with its own label,
so no heartbeat signature can pass for an order, nor one agent's order for another's.
Whoever can publish to the broker or reach the agent, without the agent's secret, cannot
make it run anything.

The JSON is also encrypted to the agent (`c1.<base64url(nonce || ChaCha20-Poly1305
ciphertext)>`, with a key derived from the signing key under its own label), then
signed: an order names a command and an environment (a job's
secrets among them), and every order travels through a broker that any of its users can
bind a queue to. Only the agent's secret opens it. Why both: the signature is checked
before a byte is parsed, as before; the encryption is what keeps the content private
(docs/security.md, "Orders over the broker").

The agent checks, in order: the size, the signature, that it decrypts for this agent,
that the order is addressed to it, that it is fresh (`issued_at` within
`max_age_seconds` of its clock), and its fields. A replay inside that window does nothing
either: an attempt is started at most once (`AttemptLedger`), and cancel and kill are
idempotent.

Free of pydantic: the agent imports it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chiffon.transport.auth import SIGNATURE_VERSION

OrderKind = Literal["assign", "cancel", "kill"]
KINDS: frozenset[str] = frozenset({"assign", "cancel", "kill"})
MAX_ORDER_BYTES = 256 * 1024
_ORDER_LABEL = b"chiffon order signing key v1"
_SEALING_LABEL = b"chiffon order sealing key v1"
SEALED = b"c1."  # an encrypted body's prefix (version 1)
_NONCE_BYTES = 12


class OrderRefused(ValueError):
    """An order the agent will not act on; `reason` is a short word for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Order:
    kind: OrderKind
    agent_id: uuid.UUID
    job_id: uuid.UUID
    attempt: int  # the fencing token: only ever grows for a job
    issued_at: float  # seconds since the epoch, the orchestrator's clock
    payload: Mapping[str, Any] = field(default_factory=dict)  # an assignment's details


def order_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _ORDER_LABEL, hashlib.sha256).digest()


def _aead(key: bytes) -> Any:
    """ChaCha20-Poly1305 under the sealing key derived from the agent's order key (imported
    here: an agent that is never sent an order never loads it)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(hmac.new(key, _SEALING_LABEL, hashlib.sha256).digest())


def seal(plain: bytes, key: bytes) -> bytes:
    """`plain` encrypted to the agent: `c1.` and base64url(nonce || ciphertext and tag),
    ASCII so that it travels as a JSON string too."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = _aead(key).encrypt(nonce, plain, None)
    return SEALED + base64.urlsafe_b64encode(nonce + sealed)


def unseal(body: bytes, key: bytes) -> bytes:
    """The order's JSON from a sealed body; `OrderRefused('bad_seal')` when it is not
    sealed to this agent (or not sealed at all)."""
    from cryptography.exceptions import InvalidTag

    if not body.startswith(SEALED):
        raise OrderRefused("bad_seal", "the order is not encrypted to this agent")
    try:
        raw = base64.urlsafe_b64decode(body[len(SEALED) :])
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        return bytes(_aead(key).decrypt(nonce, sealed, None))
    except (InvalidTag, ValueError) as exc:
        raise OrderRefused("bad_seal", f"does not open with this agent's key ({exc!r})") from None


def encode(order: Order, key: bytes) -> tuple[bytes, str]:
    """The body, encrypted to the agent, and its signature under the agent's
    `order_key`, as the orchestrator sends them."""
    plain = json.dumps(
        {
            "v": 1,
            "kind": order.kind,
            "agent_id": str(order.agent_id),
            "job_id": str(order.job_id),
            "attempt": order.attempt,
            "issued_at": order.issued_at,
            "payload": dict(order.payload),
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()
    body = seal(plain, key)
    return body, SIGNATURE_VERSION + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(
    body: bytes,
    signature: str | None,
    *,
    key: bytes,
    agent_id: uuid.UUID,
    now: float,
    max_age_seconds: float = 300.0,
) -> Order:
    """The order, when it is this agent's, from its orchestrator, fresh and well formed;
    `OrderRefused` otherwise. Nothing of an unsigned body is parsed."""
    if len(body) > MAX_ORDER_BYTES:
        raise OrderRefused("too_large", f"{len(body)} bytes, at most {MAX_ORDER_BYTES}")
    expected = SIGNATURE_VERSION + hmac.new(key, body, hashlib.sha256).hexdigest()
    given = (signature or "").encode(errors="replace")
    if not hmac.compare_digest(expected.encode(), given):
        raise OrderRefused("bad_signature", "not signed with this agent's key")
    order = _parse(unseal(body, key))
    if order.agent_id != agent_id:
        raise OrderRefused("not_mine", f"addressed to {order.agent_id}")
    age = now - order.issued_at
    if not -max_age_seconds <= age <= max_age_seconds:
        when = f"{age:.0f} s ago" if age > 0 else f"{-age:.0f} s ahead of this clock"
        raise OrderRefused("stale", f"issued {when}; orders live {max_age_seconds:g} s")
    return order


def _parse(body: bytes) -> Order:
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("kind") not in KINDS:
            raise ValueError("not an order of version 1")
        attempt, issued_at, payload = doc["attempt"], doc["issued_at"], doc.get("payload", {})
        _check_fields(attempt, issued_at, payload)
        return Order(
            kind=doc["kind"],
            agent_id=uuid.UUID(doc["agent_id"]),
            job_id=uuid.UUID(doc["job_id"]),
            attempt=attempt,
            issued_at=float(issued_at),
            payload=payload,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OrderRefused("malformed", str(exc)) from None


def _check_fields(attempt: object, issued_at: object, payload: object) -> None:
    """`ValueError` naming the first of an order's fields that is not what it must be."""
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ValueError("attempt must be a positive integer")
    if not isinstance(issued_at, int | float) or not math.isfinite(issued_at):
        raise ValueError("issued_at must be a number")
    if not isinstance(payload, dict):
        raise ValueError("payload must be an object")


class AttemptLedger:
    """The attempts this agent has started, one directory each (`<job_id>-<attempt>`),
    kept across restarts: an attempt starts at most once, and never one older than an
    attempt of the same job already started."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir

    def attempt_dir(self, job_id: uuid.UUID, attempt: int) -> Path:
        return self.jobs_dir / f"{job_id}-{attempt}"

    def claim(self, job_id: uuid.UUID, attempt: int) -> Path:
        """The new attempt's directory, created now; `OrderRefused` when this attempt, or
        a later one of the job, was started before (a replay, or a stale order)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        started = (p.name.removeprefix(f"{job_id}-") for p in self.jobs_dir.glob(f"{job_id}-*"))
        newest = max((int(n) for n in started if n.isdigit()), default=0)
        if newest >= attempt:
            raise OrderRefused("replayed", f"attempt {attempt} of {job_id}: {newest} was started")
        path = self.attempt_dir(job_id, attempt)
        try:
            path.mkdir(mode=0o700)  # atomic: two deliveries of one order cannot both pass
        except FileExistsError:
            raise OrderRefused("replayed", f"attempt {attempt} of {job_id} was started") from None
        return path
