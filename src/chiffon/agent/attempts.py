"""The attempts this agent holds, each in one state, moved only along `MOVES`.

    accepted -> starting -> running -> ended -> reported
        \\____________\\____________/^
    (refused, or could not start: ended without running)

- `accepted`: its order was verified and claimed in the ledger (`transport.orders`);
- `starting`: the prestart hooks run and its process is being started;
- `running`: its process runs (`JobRun`);
- `ended`: how it ended is known and saved in its directory (`ENDED`, the outbox) but
  not yet heard by the orchestrator;
- `reported`: the orchestrator heard its end (`REPORTED` marks the directory).

On disk (read again at the next start, `WorkLoop.recover`): `state.json` while its
process runs (`agent.runner`), `ended.json` once ended, `reported` once heard. The
attempts an agent *holds* (every heartbeat lists them) are those starting, running or
ended.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chiffon.agent.runner import JobRun
from chiffon.schemas.dispatch import Work

AttemptState = Literal["accepted", "starting", "running", "ended", "reported"]
MOVES: dict[AttemptState, frozenset[AttemptState]] = {
    "accepted": frozenset({"starting", "ended"}),
    "starting": frozenset({"running", "ended"}),
    "running": frozenset({"ended"}),
    "ended": frozenset({"reported"}),
    "reported": frozenset(),
}
HELD: frozenset[AttemptState] = frozenset({"starting", "running", "ended"})
OVER: frozenset[AttemptState] = frozenset({"ended", "reported"})
# In an attempt's directory once the orchestrator heard how it ended.
REPORTED = "reported"
# In an attempt's directory: how it ended, written before it is said (the outbox), so that
# an end the orchestrator did not hear is said again, across restarts, until it is heard.
ENDED = "ended.json"
# How long an ended attempt is kept in the table (its processes are still recognised,
# and ended, as leftovers).
ENDED_KEPT_SECONDS = 3600.0

Key = tuple[uuid.UUID, int]


class IllegalMove(RuntimeError):
    """A move `MOVES` does not allow: a bug in the agent, never the orchestrator's doing."""


@dataclass(slots=True, eq=False)
class Attempt:
    """One attempt on this desktop. `used` and `peak`: the VRAM its processes hold, by
    GPU, as last reported and at most (the peak goes in its end's report)."""

    key: Key
    directory: Path
    state: AttemptState = "accepted"
    run: JobRun | None = None
    said: dict[str, Any] | None = None  # its end, once known
    ended_at: float | None = None  # time.monotonic() of its end
    used: dict[str, float] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    work: Work | None = None  # what its order said (its files: `agent.stage`)
    checkpoint_saved: str | None = None  # the manifest of its last checkpoint saved

    @property
    def job_id(self) -> uuid.UUID:
        return self.key[0]

    @property
    def number(self) -> int:
        return self.key[1]


class AttemptTable:
    """Every attempt this run of the agent took or found; each change of state goes
    through `move`."""

    def __init__(self) -> None:
        self._rows: dict[Key, Attempt] = {}

    def add(self, key: Key, directory: Path) -> Attempt:
        attempt = self._rows[key] = Attempt(key, directory)
        return attempt

    def get(self, key: Key) -> Attempt | None:
        return self._rows.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[Attempt]:
        return iter(list(self._rows.values()))

    def move(self, attempt: Attempt, to: AttemptState) -> None:
        if to not in MOVES[attempt.state]:
            raise IllegalMove(f"attempt {attempt.number} of {attempt.job_id}: "
                              f"{attempt.state} -> {to}")  # fmt: skip
        attempt.state = to
        if to == "ended":
            attempt.ended_at = time.monotonic()
            self._forget_old(attempt.ended_at)

    def in_state(self, *states: AttemptState) -> list[Attempt]:
        return [a for a in self._rows.values() if a.state in states]

    def running(self) -> dict[Key, JobRun]:
        """The attempts whose process runs, and their runs."""
        return {a.key: a.run for a in self._rows.values() if a.state == "running" and a.run}

    def held(self) -> list[Key]:
        return sorted(a.key for a in self._rows.values() if a.state in HELD)

    def ended_keys(self) -> set[Key]:
        """Attempts over (within `ENDED_KEPT_SECONDS`) whose processes ran."""
        return {a.key for a in self._rows.values() if a.state in OVER and a.run is not None
                and a.run.pid is not None}  # fmt: skip

    def _forget_old(self, now: float) -> None:
        old = [k for k, a in self._rows.items() if a.state == "reported"
               and a.ended_at is not None and now - a.ended_at >= ENDED_KEPT_SECONDS]  # fmt: skip
        for key in old:
            del self._rows[key]
