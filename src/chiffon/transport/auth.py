"""An agent's credential on the wire: a bearer secret (HTTP) and a body signature (AMQP).

The agent holds one secret. Over HTTP it sends it as `Authorization: Bearer <secret>`; over
RabbitMQ it never sends it, but signs each message body with HMAC-SHA256 under a key derived
from it, in the header `x-chiffon-signature: v1=<hex>`. docs/security.md says why.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

SIGNATURE_HEADER = "x-chiffon-signature"
SIGNATURE_VERSION = "v1="
# Domain separation: the AMQP signing key is not the bearer secret itself.
_SIGNING_LABEL = b"chiffon amqp signing key v1"


def signing_key(secret: str) -> bytes:
    """The HMAC key for message bodies, derived from the agent's secret."""
    return hmac.new(secret.encode(), _SIGNING_LABEL, hashlib.sha256).digest()


def sign(key: bytes, body: bytes) -> str:
    """`v1=<hex HMAC-SHA256(key, body)>`."""
    return SIGNATURE_VERSION + hmac.new(key, body, hashlib.sha256).hexdigest()


def signature_matches(key: bytes, body: bytes, signature: str) -> bool:
    """Whether `signature` is `sign(key, body)`, compared in constant time."""
    return hmac.compare_digest(sign(key, body).encode(), signature.encode(errors="replace"))


def secret_digest(secret: str) -> str:
    """What the orchestrator keeps to recognise a bearer secret (SHA-256, hex)."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class AgentCredential:
    """One agent's id and secret, as enrollment returned them."""

    agent_id: uuid.UUID
    secret: str = field(repr=False)
    # False: enrolled, but it takes no jobs until an admin approves it.
    approved: bool = field(default=True, compare=False)

    @property
    def bearer(self) -> str:
        return f"Bearer {self.secret}"

    def sign(self, body: bytes) -> str:
        return sign(signing_key(self.secret), body)


# What a publisher is handed: one agent's credential, or (one publisher carrying many
# agents' messages, like a simulator) each agent's by id.
Credentials = AgentCredential | Mapping[uuid.UUID, AgentCredential]


def credential_for(credentials: Credentials | None, agent_id: uuid.UUID) -> AgentCredential | None:
    """The credential to prove a message of `agent_id` with (a single one is used as is)."""
    if credentials is None or isinstance(credentials, AgentCredential):
        return credentials
    return credentials.get(agent_id)


# How a message proves it comes from its agent, as the orchestrator's one admission path
# (`Orchestrator.admit`) takes it from every transport.
@dataclass(frozen=True, slots=True)
class Bearer:
    """The agent's bearer secret, already checked for this agent by the transport."""

    agent_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Signature:
    """The `x-chiffon-signature` that came with the body (None: there was none)."""

    value: str | None


class _InProcess:
    """Code in this process: the embedded agent of `chiffon up`, tests."""


IN_PROCESS = _InProcess()
Proof = Bearer | Signature | _InProcess


class ProofUnavailableError(RuntimeError):
    """The credentials could not be read (the registry is down): retry the message later."""
