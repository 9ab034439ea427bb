"""One attempt, sequenced through its states (`agent.attempts`) with its hooks run at the
named points (`agent.hooks`): starting (prestart hooks, then its process), running
(poststart hooks, its start reported), ended (exited hooks: the end saved, its output
shipped), reported (the end heard); the stop hooks always, last. The runner only
sequences: every concern of an attempt is a hook."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from chiffon.agent.attempts import Attempt, AttemptTable
from chiffon.agent.hooks import AttemptHook, HookParts
from chiffon.agent.hooks.base import Refuse, not_current
from chiffon.agent.outbox import ended_from
from chiffon.agent.runner import CannotStart, JobRun
from chiffon.backoff import Backoff
from chiffon.schemas.dispatch import ended, started
from chiffon.transport.base import TransportError

log = logging.getLogger(__name__)

START_REPORT_TRIES = 7


class AttemptRunner:
    def __init__(
        self,
        attempt: Attempt,
        run: JobRun,
        *,
        table: AttemptTable,
        parts: HookParts,
        hooks: Sequence[type[AttemptHook]],
    ) -> None:
        self.attempt = attempt
        self._table = table
        self._parts = parts
        self._hooks = [make(parts) for make in hooks]
        attempt.run = run

    async def start(self) -> bool:
        """starting: the prestart hooks, then its process; whether it runs. One that could
        not start is ended (`exit`, without a code: it never ran) and said."""
        a = self.attempt
        assert a.run is not None
        self._table.move(a, "starting")
        try:
            for hook in self._hooks:
                await hook.prestart(a)
            await a.run.start()
        except Refuse as exc:  # not here, not now: placed elsewhere
            log.info("attempt %s of %s refused: %s", a.number, a.job_id, exc)
            await self._stop_hooks()
            await self._parts.outbox.say(a, ended("refused", str(exc)))
            return False
        except (CannotStart, OSError) as exc:  # no such program, a workdir that is not
            # there: it fails without an exit code (it never ran); the orchestrator adds where
            why = str(exc) if isinstance(exc, CannotStart) else f"it could not be started ({exc})"
            await self._stop_hooks()
            await self._parts.outbox.say(a, ended("exit", why))
            return False
        self._table.move(a, "running")
        return True

    async def follow(self) -> None:
        """running, until its end is said (or the agent stops)."""
        a = self.attempt
        assert a.run is not None
        try:
            for hook in self._hooks:
                await hook.poststart(a)
            verdict = await self._say_started()
            if verdict == "stale":  # placed again elsewhere meanwhile: end this one
                await not_current(a)
            said = ended_from(await a.run.wait())
            for hook in self._hooks:
                await hook.exited(a, said)
            await self._parts.outbox.say(a, said)
        finally:
            await self._stop_hooks()

    async def _stop_hooks(self) -> None:
        for hook in self._hooks:
            await hook.stop(self.attempt)

    async def _say_started(self) -> str:
        """Report, retrying a few times while the orchestrator cannot be reached; an end
        that is never heard is found by the orchestrator (the attempt is lost)."""
        a = self.attempt
        assert a.run is not None
        said = started(str(a.run.log_path.absolute()))
        backoff = Backoff(0.5, max_seconds=10.0)
        for failures in range(1, START_REPORT_TRIES + 1):
            try:
                verdict = await self._parts.channel.report(*a.key, said)
                self._parts.outbox.heard.set()
                return verdict
            except TransportError as exc:
                log.warning("reporting attempt %s of %s failed: %s", a.number, a.job_id, exc)
                await asyncio.sleep(backoff.delay(failures))
        return "unreported"
