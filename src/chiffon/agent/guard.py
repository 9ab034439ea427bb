"""The owner's guard: the owner's policy decided on what was last read (`agent.owner`), and
acted on: a running job whose GPUs (or, CPU-only, whose desktop) the decision takes back is
vacated, or, with `cpu_jobs_on_return: suspend`, a CPU-only job is stopped while its owner
is there or outside the schedule, and continued after."""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from chiffon.agent.hygiene import gpu_key
from chiffon.agent.owner import SAID, Decision, GpuSeen, OwnerPolicy, decide
from chiffon.agent.reading import read
from chiffon.agent.report import Snapshot
from chiffon.agent.runner import JobRun
from chiffon.schemas.sandbox import is_full

if TYPE_CHECKING:
    from chiffon.agent.work import WorkSettings

log = logging.getLogger(__name__)
Key = tuple[uuid.UUID, int]
Offered = tuple[str | None, tuple[tuple[str, str | None], ...]]


def may_run_jobs(settings: WorkSettings) -> bool:
    """Whether this agent runs jobs at all: its owner opted in, and it is not root (or was
    told it may run jobs as root)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return settings.accept_jobs != "never" and (not root or settings.allow_root)


class OwnerGuard:
    """The decision as last made, and what is done on it."""

    def __init__(
        self,
        settings: WorkSettings,
        *,
        local_time: Callable[[], datetime] = lambda: datetime.now().astimezone(),
    ) -> None:
        self.settings = settings
        self.policy: OwnerPolicy = settings.policy
        self._local_time = local_time
        self.idle_seconds: float | None = None  # the owner's, as last seen (probes.owner)
        self.reads_idle = False  # the guard's loop reads the idle time (else each snapshot)
        self.seen: Sequence[GpuSeen] = []
        self.unsandboxed = False  # the owner requires the sandbox; it is incomplete here
        # While jobs run, the GPUs are read afresh only when the policy looks at what runs
        # on them (a GPU read is cheap with NVML, a process or two with nvidia-smi).
        self.watches_gpus = bool(self.policy.exclusive_apps) or (
            self.policy.on_owner_return == "vacate_used_gpus"
        )
        self.decision = self.decide()

    def decide(self, seen: Sequence[GpuSeen] | None = None) -> Decision:
        """Decide again, on `seen` (else on the GPUs as last seen)."""
        if seen is not None:
            self.seen = seen
        self.decision = decide(
            self.policy,
            local=self._local_time(),
            idle_seconds=self.idle_seconds,
            gpus=self.seen,
            root_refused=self.settings.accept_jobs != "never" and not may_run_jobs(self.settings),
            unsandboxed=self.unsandboxed,
        )
        return self.decision

    def offered(self) -> Offered:
        return self.decision.desktop, tuple(sorted(self.decision.gpus.items()))

    def why_not_desktop(self) -> str | None:
        """Why no job lands on this desktop now, in the owner's words (None: welcome)."""
        if not may_run_jobs(self.settings):
            return SAID["never" if self.settings.accept_jobs == "never" else "root"]
        why = self.decision.desktop
        if why is None:
            return None
        seen = "unknown" if self.idle_seconds is None else f"{self.idle_seconds:.0f} s"
        return (f"{SAID[why]} (owner idle {seen}; jobs wait for "
                f"{self.settings.idle_minutes:g} min)")  # fmt: skip

    def enforce(
        self, runs: Mapping[Key, JobRun], spawn: Callable[[Coroutine[Any, Any, Any]], object]
    ) -> None:
        for key, run in runs.items():
            why = self.decision.vacating(run.assignment.gpu_uuids)
            if why is None:
                _resume(key, run)
            elif not run.ending:
                self._take_back(key, run, why, spawn)

    def _take_back(
        self, key: Key, run: JobRun, why: str, spawn: Callable[[Coroutine[Any, Any, Any]], object]
    ) -> None:
        if self._suspends(run, why):
            if not run.suspended:
                log.warning("stopping attempt %s of %s: %s", key[1], key[0], SAID[why])
                run.suspend()
            return
        on = ", ".join(run.assignment.gpu_uuids) or "this desktop"
        log.warning("vacating attempt %s of %s on %s: %s", key[1], key[0], on, SAID[why])
        spawn(run.vacate(f"preempted: {SAID[why]} ({on})"))

    def _suspends(self, run: JobRun, why: str) -> bool:
        return (
            self.settings.cpu_jobs_on_return == "suspend"
            and not run.assignment.gpu_uuids
            and why in ("owner_active", "outside_schedule")
        )

    def annotate(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` with the decision: each GPU's `withheld`, the desktop's
        `jobs_withheld`, and the owner's idle time as the decision took it."""
        gpus = [dataclasses.replace(g, withheld=self.decision.withheld(gpu_key(g)))
                for g in snapshot.gpus]  # fmt: skip
        return dataclasses.replace(snapshot, gpus=gpus, jobs_withheld=self.decision.desktop,
                                   owner_idle_seconds=self.idle_seconds)  # fmt: skip


def _resume(key: Key, run: JobRun) -> None:
    if run.suspended:
        log.info("continuing attempt %s of %s", key[1], key[0])
        run.resume()


def read_only(
    settings: WorkSettings, snapshot: Snapshot, sandbox: dict[str, Any] | None = None
) -> Snapshot:
    """`snapshot` with what the agent would decide now under its owner's policy, per GPU and
    for the desktop, with no job running (all use is foreign): a reading and a decision,
    nothing acted on (`chiffon probe`); with the sandbox as found (`agent.sandbox`)."""
    guard = OwnerGuard(settings)
    guard.idle_seconds = snapshot.owner_idle_seconds
    if sandbox is not None:
        guard.unsandboxed = bool(sandbox.get("required")) and not is_full(sandbox)
    reading = read(snapshot, show_names=guard.policy.report_process_names)
    guard.decide(reading.seen)
    return dataclasses.replace(guard.annotate(reading.snapshot), orders_refused={},
                               attempts_held=[], sandbox=sandbox)  # fmt: skip
