"""The dispatch contract: the words a job's life is written in, on both sides of the wire.

Job and attempt states, the moves between them and who makes each, the groupings
(terminal, out on a desktop, active) with their predicates, the one vocabulary of how an
attempt ends, what each ending does to its job (a table; the retry rule beside it), what
an agent reports of an attempt (encoded and decoded here, with its bounds), and how a GPU
is named in claims and orders. The orchestrator validates the same fields with pydantic
(`schemas.jobs`, `api.routes_work`); the agent imports this module as it is, so it stays
free of pydantic like `schemas.limits`.

Nothing else spells a state, an outcome or a grouping: the CLI, the API, the dashboard's
data and the agent read them from here (docs/architecture.md says where a new one goes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from chiffon.schemas import files, limits

# --- Job states -------------------------------------------------------------------------

JobState = Literal[
    "queued", "assigned", "running", "succeeded", "failed", "cancelled", "timed_out", "lost"
]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timed_out", "lost"})
# An attempt is out on a desktop: placed there (claims held) and not yet ended.
OUT: tuple[JobState, ...] = ("assigned", "running")
# Not over yet: waiting to be placed, or out.
ACTIVE: tuple[JobState, ...] = ("queued", *OUT)
# The endings an agent's saved outcome may still give a job after it was judged lost.
LATE_ENDS: frozenset[str] = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


def is_terminal(state: str) -> bool:
    """Over for good: no move leaves it (except a late end of `lost`)."""
    return state in TERMINAL


def is_out(state: str) -> bool:
    """An attempt of it is out on a desktop (placed, or running)."""
    return state in OUT


def is_active(state: str) -> bool:
    """Not over yet: queued, placed or running."""
    return state in ACTIVE


# Who makes a move: the scheduler (placing), the agent's report (start, end), a user
# (cancel), the sweep (a silent or forgetful desktop; a cancel the agent never heard).
Mover = Literal["scheduler", "agent", "user", "sweep"]

MOVES: dict[str, dict[str, frozenset[Mover]]] = {
    "queued": {
        # the late end of an attempt judged lost while it waits to be placed again
        **{end: frozenset({"agent"}) for end in LATE_ENDS},
        "assigned": frozenset({"scheduler"}),  # placed (claims written)
        # cancelled before it ever ran; or the late end of a cancelled attempt
        "cancelled": frozenset({"user", "agent"}),
    },
    "assigned": {
        "running": frozenset({"agent"}),
        # handed back: refused, preempted, lost with retries left
        "queued": frozenset({"agent", "sweep"}),
        "lost": frozenset({"agent", "sweep"}),  # out of retries
        "cancelled": frozenset({"agent"}),
        "failed": frozenset({"agent"}),  # its program could not be started (it never ran)
    },
    "running": {
        "succeeded": frozenset({"agent"}),
        "failed": frozenset({"agent"}),
        "timed_out": frozenset({"agent"}),
        "cancelled": frozenset({"agent"}),
        "lost": frozenset({"agent", "sweep"}),
        # back to the queue: lost, preempted, or a non-zero exit with `retry_on_exit`,
        # while retries remain
        "queued": frozenset({"agent", "sweep"}),
    },
    **{state: {} for state in TERMINAL},
    # An attempt judged lost whose agent then says how it really ended (its saved
    # outcome, heard after an outage): that outcome wins, while no later attempt was placed.
    "lost": {end: frozenset({"agent"}) for end in LATE_ENDS},
}


class IllegalMove(ValueError):
    """A state change the table does not allow: a bug, or a stale report."""


def check_move(from_state: str, to_state: str, by: Mover | None = None) -> None:
    """Raise `IllegalMove` unless the table allows `from_state` -> `to_state` (by `by`,
    when given)."""
    movers = MOVES.get(from_state, {}).get(to_state)
    if movers is None:
        raise IllegalMove(f"a job cannot go from {from_state} to {to_state}")
    if by is not None and by not in movers:
        raise IllegalMove(f"the {by} cannot move a job from {from_state} to {to_state}")


# --- How an attempt ends ------------------------------------------------------------------

# exit: its program exited (a code, or a signal; neither: it never started);
# cancelled, timed_out: the agent ended it for the user or the job's timeout;
# refused: the agent would not start it; lost: no one knows how it ended;
# preempted: the desktop's owner took it back.
Outcome = Literal["exit", "cancelled", "timed_out", "refused", "lost", "preempted"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

AttemptState = Literal[
    "assigned", "running", "succeeded", "failed", "cancelled", "timed_out", "lost",
    "refused", "preempted",
]  # fmt: skip
ATTEMPT_STATES: tuple[AttemptState, ...] = get_args(AttemptState)
ATTEMPT_ENDS: frozenset[str] = frozenset(ATTEMPT_STATES) - {"assigned", "running"}
ATTEMPT_MOVES: dict[str, frozenset[str]] = {
    "assigned": frozenset({"running"}) | ATTEMPT_ENDS,
    "running": ATTEMPT_ENDS - {"refused"},
    **{state: frozenset() for state in ATTEMPT_ENDS},
    "lost": LATE_ENDS,  # its late end (above)
}


@dataclass(frozen=True, slots=True)
class Ending:
    """What an outcome does to its job when no retry is taken: `job` is the state it
    ends in (None: back to the queue, spending no retry); `attempt` the attempt's own."""

    job: JobState | None
    attempt: AttemptState
    retry: Literal["never", "when_left", "when_asked"]  # the retry rule, `next_state`


ENDINGS: dict[Outcome, Ending] = {
    "refused": Ending(None, "refused", "never"),
    "preempted": Ending(None, "preempted", "never"),  # no retry used
    "lost": Ending("lost", "lost", "when_left"),
    "cancelled": Ending("cancelled", "cancelled", "never"),
    "timed_out": Ending("timed_out", "timed_out", "never"),
    "exit": Ending("failed", "failed", "when_asked"),  # exit 0 succeeds: `next_state`
}


def next_state(
    outcome: Outcome, exit_code: int | None, *, retries_left: bool, retry_on_exit: bool
) -> JobState:
    """The job's state after an attempt ended so: the table, then the retry rule (a lost
    attempt is retried while retries are left; a failed exit only with `retry_on_exit`)."""
    if outcome == "exit" and exit_code == 0:
        return "succeeded"
    ending = ENDINGS[outcome]
    if ending.job is None:
        return "queued"
    asked = ending.retry == "when_left" or (ending.retry == "when_asked" and retry_on_exit)
    return "queued" if asked and retries_left else ending.job


def attempt_ended(outcome: Outcome, job_state: str) -> AttemptState:
    """The attempt's own state once it ended: the job's, unless the job went back to
    the queue (then how the attempt ended: refused, lost, preempted, failed)."""
    return ENDINGS[outcome].attempt if job_state == "queued" else job_state  # type: ignore[return-value]


def spends_retry(outcome: Outcome, to_state: str) -> bool:
    """Whether going back to the queue after `outcome` uses one of the job's retries."""
    return to_state == "queued" and ENDINGS[outcome].retry != "never"


# --- What an order to run an attempt carries --------------------------------------------

COMMAND_MAX_ITEMS = 1024  # the submission's argv (`schemas.jobs.JobSubmit.command`)


@dataclass(frozen=True, slots=True)
class Work:
    """The payload of an `assign` order: what the agent runs, on which GPUs. Encoded by
    the orchestrator from the job's stored spec (`payload`), decoded by the agent with
    every field checked (`from_payload`): the orchestrator's word is input too."""

    command: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str | None = None
    timeout_seconds: float | None = None
    gpu_uuids: tuple[str, ...] = ()
    vram_gb: float = 0.0  # asked on each GPU: the agent checks it is still free
    gpu_vendor: str | None = None
    # The job's claims on the host (0: none asked): the agent may hold the job to them.
    memory_gb: float = 0.0
    cores: float = 0.0
    # Its files (`chiffon.files`): the snapshot laid into its folder, the checkpoint
    # restored into CHIFFON_CHECKPOINT_DIR (each a manifest's hash, fetched by the agent
    # over HTTP), the patterns of what comes back, and how often its checkpoint is saved.
    snapshot: str | None = None
    checkpoint: str | None = None
    outputs: tuple[str, ...] = ()
    checkpoint_every_seconds: float | None = None
    python_env: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "command": list(self.command), "env": dict(self.env), "workdir": self.workdir,
            "timeout_seconds": self.timeout_seconds, "gpu_uuids": list(self.gpu_uuids),
            "vram_gb": self.vram_gb, "gpu_vendor": self.gpu_vendor,
            "memory_gb": self.memory_gb, "cores": self.cores, "snapshot": self.snapshot,
            "checkpoint": self.checkpoint, "outputs": list(self.outputs),
            "checkpoint_every_seconds": self.checkpoint_every_seconds,
            "python_env": self.python_env,
        }  # fmt: skip

    @classmethod
    def from_payload(cls, p: Mapping[str, Any]) -> Work:
        """`ValueError` naming the first field that is unusable."""
        command = _strings(p.get("command"), "command", most=COMMAND_MAX_ITEMS)
        if not command or not command[0]:
            raise ValueError("command is empty")
        vendor = p.get("gpu_vendor")
        return cls(
            command=command,
            env=_env(p.get("env", {})),
            workdir=_workdir(p.get("workdir")),
            timeout_seconds=_positive(p.get("timeout_seconds"), "timeout_seconds"),
            gpu_uuids=_strings(p.get("gpu_uuids", []), "gpu_uuids", most=limits.GPUS_MAX),
            vram_gb=_positive(p.get("vram_gb"), "vram_gb", zero=True) or 0.0,
            gpu_vendor=vendor if isinstance(vendor, str) else None,
            # absent (an older orchestrator): none asked
            memory_gb=_positive(p.get("memory_gb"), "memory_gb", zero=True) or 0.0,
            cores=_positive(p.get("cores"), "cores", zero=True) or 0.0,
            snapshot=_hash(p.get("snapshot"), "snapshot"),
            checkpoint=_hash(p.get("checkpoint"), "checkpoint"),
            outputs=tuple(files.check_out_pattern(o) for o in
                          _strings(p.get("outputs", []), "outputs", most=files.OUT_PATTERNS_MAX)),
            checkpoint_every_seconds=_positive(p.get("checkpoint_every_seconds"),
                                               "checkpoint_every_seconds"),
            python_env=p.get("python_env") is True,
        )  # fmt: skip


def _hash(value: Any, name: str) -> str | None:
    if value is not None and not files.is_sha256(value):
        raise ValueError(f"{name} must be a SHA-256 in hex")
    return value  # type: ignore[no-any-return]


def _env(env: Any) -> Mapping[str, str]:
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "\x00" not in k + v for k, v in env.items()
    ):
        raise ValueError("env must map names to strings")
    return env


def _workdir(workdir: Any) -> str | None:
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
        raise ValueError("workdir must be an absolute path")
    return workdir


def _positive(value: Any, name: str, *, zero: bool = False) -> float | None:
    if value is None:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be a positive number")
    return float(value)


def _strings(value: object, name: str, *, most: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > most:
        raise ValueError(f"{name} must be a list of at most {most} strings")
    if not all(isinstance(v, str) and "\x00" not in v for v in value):
        raise ValueError(f"{name} must hold strings without NUL")
    return tuple(value)


# --- What an agent reports of an attempt ------------------------------------------------

ReportKind = Literal["started", "ended", "usage", "alive"]
REPORT_KINDS: tuple[ReportKind, ...] = get_args(ReportKind)
DETAIL_MAX_CHARS = 1000
LOG_PATH_MAX_CHARS = 4096  # an attempt's log on the desktop, as its agent says it
EXIT_CODE_MIN, EXIT_CODE_MAX = -255, 255
SIGNAL_MIN, SIGNAL_MAX = 1, 128
# Verdicts on a report: applied; stale (not the job's current attempt on this agent: end
# it); unknown_job.
Verdict = Literal["applied", "stale", "unknown_job"]


@dataclass(frozen=True, slots=True)
class Report:
    """What an agent says of one attempt: it started, or it ended (and how)."""

    # "alive": only whether the attempt is still current (the answer says)
    kind: ReportKind
    outcome: Outcome | None = None  # for "ended"
    exit_code: int | None = None
    signal: int | None = None
    detail: str = ""
    # VRAM its processes hold, by GPU id: now ("usage"), or at most ("ended")
    vram_gb: Mapping[str, float] | None = None
    # "started": where the attempt's whole output is on the desktop (older agents omit it)
    log_path: str | None = None

    def never_ran(self) -> bool:
        """Exited with neither a code nor a signal: its program could not be started (the
        detail says why: no such program, no such folder)."""
        return self.outcome == "exit" and self.exit_code is None and self.signal is None


def started(log_path: str | None = None) -> dict[str, Any]:
    """The payload of a "started" report: with where the attempt's whole output is on the
    desktop when the orchestrator would take the path (an absolute one, of printable
    characters, within its bound); else without it, as an older agent says it."""
    said: dict[str, Any] = {"kind": "started"}
    path = log_path or ""
    if path.startswith("/") and len(path) <= LOG_PATH_MAX_CHARS and limits.clean_text(path) == path:
        said["log_path"] = path
    return said


def usage(vram_gb: Mapping[str, float]) -> dict[str, Any]:
    """The payload of a "usage" report: the VRAM the attempt's processes hold now."""
    return {"kind": "usage", "vram_gb": dict(vram_gb)}


def alive() -> dict[str, Any]:
    """The payload of an "alive" report: only whether the attempt is still current."""
    return {"kind": "alive"}


def ended(
    outcome: Outcome,
    detail: str,
    *,
    exit_code: int | None = None,
    signal: int | None = None,
    runtime_seconds: float | None = None,
    peak_vram_gb: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The payload of an "ended" report; the detail made what the orchestrator takes (a
    path in it may hold any character but NUL) and cut to its bound."""
    payload: dict[str, Any] = {
        "kind": "ended", "outcome": outcome, "exit_code": exit_code,
        "detail": limits.clean_text(detail)[:DETAIL_MAX_CHARS],
    }  # fmt: skip
    if signal is not None:
        payload["signal"] = signal
    if runtime_seconds is not None:
        payload["runtime_seconds"] = runtime_seconds
    if peak_vram_gb:
        payload["peak_vram_gb"] = dict(peak_vram_gb)
    return payload


def report_from(payload: Mapping[str, Any]) -> Report:
    """A report payload, already validated (by pydantic over HTTP, or built by this
    module's encoders in-process), as the orchestrator reads it."""
    kind = payload["kind"]
    vram = payload.get("vram_gb") if kind == "usage" else payload.get("peak_vram_gb")
    return Report(
        kind=kind,
        outcome=payload.get("outcome"),
        exit_code=payload.get("exit_code"),
        signal=payload.get("signal"),
        detail=payload.get("detail") or "",
        vram_gb=vram,
        log_path=payload.get("log_path") if kind == "started" else None,
    )


# --- GPUs in claims and orders ------------------------------------------------------------

_BY_INDEX = "index-"


def gpu_id(uuid: str | None, index: int | None) -> str:
    """A GPU's id in claims and orders: its UUID, else `index-N` (the scheduler and the
    agent name GPUs the same way)."""
    return uuid or f"{_BY_INDEX}{index}"


def visible_device(gpu: str) -> str:
    """What `CUDA_VISIBLE_DEVICES` takes for a GPU id: the UUID, or the index (with
    `CUDA_DEVICE_ORDER=PCI_BUS_ID`, the index nvidia-smi shows)."""
    return gpu.removeprefix(_BY_INDEX)


def gpu_resource(gpu: str) -> str:
    """A GPU's name among an agent's claimed resources (beside the host's)."""
    return f"gpu:{gpu}"
