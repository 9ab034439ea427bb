"""A stored job's submission, parsed once into a typed object.

The API validated the submission (`schemas.jobs.JobSubmit`) and stored it as JSON in the
job's row; everything on the orchestrator that reads it back (the scheduler, the outcome
rule, the order to the agent, the views) reads this object, not the dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from chiffon.schemas.dispatch import Work
from chiffon.schemas.jobs import Policy

POLICIES: tuple[str, ...] = get_args(Policy)


@dataclass(frozen=True, slots=True)
class Wants:
    """What the job needs on one desktop (`schemas.jobs.JobRequirements`)."""

    gpus: int = 0
    vram_gb: float = 0.0  # free on each GPU
    cpu_cores: float = 0.0
    memory_gb: float = 0.0
    pool: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    gpu_vendor: str | None = None
    # Only a desktop whose sandbox is full (`schemas.sandbox.is_full`).
    require_sandbox: bool = False

    @classmethod
    def parse(cls, stored: Mapping[str, Any]) -> Wants:
        return cls(
            gpus=int(stored.get("gpus", 0)),
            vram_gb=float(stored.get("vram_gb", 0.0)),
            cpu_cores=float(stored.get("cpu_cores", 0.0)),
            memory_gb=float(stored.get("memory_gb", 0.0)),
            pool=stored.get("pool"),
            labels=dict(stored.get("labels") or {}),
            gpu_vendor=stored.get("gpu_vendor"),
            require_sandbox=stored.get("require_sandbox") is True,
        )

    def stored(self) -> dict[str, Any]:
        """As the API shows it (`JobView.requirements`)."""
        return {
            "gpus": self.gpus, "vram_gb": self.vram_gb, "cpu_cores": self.cpu_cores,
            "memory_gb": self.memory_gb, "pool": self.pool, "labels": dict(self.labels),
            "gpu_vendor": self.gpu_vendor, "require_sandbox": self.require_sandbox,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job's submission as stored (`JobRow.spec`)."""

    command: tuple[str, ...]
    wants: Wants = Wants()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    timeout_seconds: float | None = None
    retries: int = 0
    retry_on_exit: bool = False
    policy: Policy = "best_fit"
    snapshot: str | None = None
    outputs: tuple[str, ...] = ()
    checkpoint_every_seconds: float | None = None
    python_env: bool = False

    @classmethod
    def parse(cls, stored: Mapping[str, Any]) -> JobSpec:
        timeout = stored.get("timeout_seconds")
        return cls(
            command=tuple(stored["command"]),
            wants=Wants.parse(stored.get("requirements") or {}),
            env=dict(stored.get("env") or {}),
            workdir=stored.get("workdir"),
            timeout_seconds=None if timeout is None else float(timeout),
            retries=int(stored.get("retries", 0)),
            retry_on_exit=bool(stored.get("retry_on_exit", False)),
            policy=_policy(stored.get("policy")),
            snapshot=stored.get("snapshot"),
            outputs=tuple(stored.get("outputs") or ()),
            checkpoint_every_seconds=stored.get("checkpoint_every_seconds"),
            python_env=stored.get("python_env") is True,
        )

    def retries_left(self, used: int) -> bool:
        return used < self.retries

    def assignment(self, gpus: list[str], checkpoint: str | None = None) -> dict[str, Any]:
        """The payload of the order that runs it on `gpus` (`schemas.dispatch.Work`),
        restoring the `checkpoint` manifest an earlier attempt saved."""
        work = Work(command=self.command, env=self.env, workdir=self.workdir,
                    timeout_seconds=self.timeout_seconds, gpu_uuids=tuple(gpus),
                    vram_gb=self.wants.vram_gb, gpu_vendor=self.wants.gpu_vendor,
                    memory_gb=self.wants.memory_gb, cores=self.wants.cpu_cores,
                    snapshot=self.snapshot, checkpoint=checkpoint, outputs=self.outputs,
                    checkpoint_every_seconds=self.checkpoint_every_seconds,
                    python_env=self.python_env)  # fmt: skip
        return work.payload()


def _policy(name: object) -> Policy:
    """The stored policy's name; one no longer known (a job queued before an upgrade that
    dropped it) is placed best fit."""
    return name if name in POLICIES else "best_fit"  # type: ignore[return-value]
