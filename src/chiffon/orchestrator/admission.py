"""Heartbeat admission: the one way an agent's message gets in, whatever carried it.

A transport hands the raw bytes and what proves them (`transport.auth.Proof`) to `admit`,
which parses them and checks the proof and the send time, then the admitted message to
`receive`, which queues it for the ingest batcher and resolves once it has committed.
`Admission` is what RabbitMQ's consumer calls (its `IngestTarget`) and the HTTP routes,
through the `Orchestrator`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

from sqlalchemy.exc import DBAPIError

from chiffon.orchestrator.batcher import IngestBatcher
from chiffon.orchestrator.clock import Clock
from chiffon.orchestrator.credentials import CredentialStore
from chiffon.orchestrator.ingest import Outcome, Received
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.schemas.heartbeat import AgentMessage, MessageKind, RejectedMessage, parse_message
from chiffon.transport.auth import (
    IN_PROCESS,
    Bearer,
    Proof,
    ProofUnavailableError,
    Signature,
)


class Admission:
    """Admits agents' messages and queues them for ingest.

    `database_failed`: told when the credentials could not be read (the registry is away:
    the sweep then judges no one silent). `went_offline`: told once a goodbye has been
    written (the dispatcher places that agent's jobs again now).
    """

    def __init__(
        self,
        batcher: IngestBatcher,
        credentials: CredentialStore,
        clock: Clock,
        metrics: OrchestratorMetrics,
        settings: OrchestratorSettings,
        *,
        database_failed: Callable[[], None],
        went_offline: Callable[[], None],
    ) -> None:
        self._batcher = batcher
        self._credentials = credentials
        self._clock = clock
        self.metrics = metrics
        self._settings = settings  # its limits, read at each message
        self._database_failed = database_failed
        self._went_offline = went_offline

    def reject(self, reason: str) -> None:
        """Count a refused message by its reason."""
        self.metrics.rejected.labels(reason).inc()

    def receive(self, message: AgentMessage) -> asyncio.Future[Outcome]:
        """Stamp receipt time now and queue; resolves once the write has committed. A
        goodbye (`offline`) wakes the dispatcher once written: that agent's jobs are
        placed again now."""
        done = self._batcher.submit_nowait(Received(message, self._clock.now()))
        if message.kind == "offline":
            done.add_done_callback(lambda _: self._went_offline())
        return done

    async def check_bearer(self, agent_id: UUID, bearer: str | None) -> None:
        """Refuse (`RejectedMessage`, counted) a bearer that is not `agent_id`'s secret:
        the HTTP path checks it before it reads a byte of the body, then admits the body
        with `Bearer(agent_id)`."""
        try:
            await self._credentials.check_bearer(agent_id, bearer)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise
        except (OSError, DBAPIError):  # the registry is away: this beat goes unwritten
            self._database_failed()
            raise

    async def admit(
        self, raw: bytes, proof: Proof, *, kind: MessageKind | None = None
    ) -> AgentMessage:
        """Parse, check its proof and its send time. A refusal is counted here, once, and
        raised as `RejectedMessage` (each transport maps it to its own protocol);
        `ProofUnavailableError` when the credentials could not be read (the registry is
        down: not the message's fault).

        `proof`: `Bearer(agent_id)`, a bearer secret the transport already checked for that
        agent (the message must be that agent's, and of `kind` when given); `Signature`,
        the HMAC header to check against the body; `IN_PROCESS`, code in this process.
        """
        try:
            message = parse_message(raw, max_bytes=self._settings.max_message_bytes)
            if isinstance(proof, Bearer):
                _check_path(message, proof.agent_id, kind)
            if proof is not IN_PROCESS:  # a replay window against the outside only
                self._check_window(message)
            if isinstance(proof, Signature):
                await self._credentials.check_signature(message.agent_id, raw, proof.value)
        except RejectedMessage as exc:
            self.reject(exc.reason)
            raise
        except (OSError, DBAPIError) as exc:
            self._database_failed()
            raise ProofUnavailableError(str(exc)) from exc
        return message

    def _check_window(self, message: AgentMessage) -> None:
        skew = message.sent_at - self._clock.now()
        limit = timedelta(seconds=self._settings.max_clock_skew_seconds)
        if abs(skew) > limit:
            raise RejectedMessage(
                "clock_skew",
                f"sent_at is {skew.total_seconds():+.0f} s from the orchestrator's clock "
                f"(limit +-{limit.total_seconds():.0f} s)",
            )

    async def ingest(self, raw: bytes, *, signature: str | None = None) -> Outcome:
        """Admit and apply one message, waiting for its commit (tests, in-process agents).

        Without `signature` the caller is trusted (code in this process); with one, the
        message must be signed by its agent like one from RabbitMQ.
        """
        proof: Proof = IN_PROCESS if signature is None else Signature(signature)
        return await self.receive(await self.admit(raw, proof))


def _check_path(message: AgentMessage, agent_id: UUID, kind: MessageKind | None) -> None:
    if message.agent_id != agent_id or (kind is not None and message.kind != kind):
        raise RejectedMessage(
            "path_mismatch",
            f"body is a {message.kind} of agent {message.agent_id}, "
            f"the path a {kind or message.kind} of {agent_id}",
        )
