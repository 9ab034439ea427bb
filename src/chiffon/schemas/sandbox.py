"""A desktop's job sandbox as its heartbeat says it (`resources.sandbox`), pydantic-free.

Both sides read this: the agent checks the object it sends against it (`check`), the
orchestrator's schema (`schemas.heartbeat.Sandbox`) takes its vocabulary and bounds from
it, and placement (`--require-sandbox`), the CLI and the probe say it with `gaps` and
`summary`. docs/protocol.md describes the same object for people.

    {"processes": "cgroup" | "pidns" | "subreaper" | "none",  # how a job's processes
                                                             # are kept together
     "memory_limit": bool,    # the job's memory is capped
     "home_hidden": bool,     # the owner's home is out of the job's sight
     "devices_hidden": bool,  # the GPUs not given to it are out of its sight
     "why": [str, ...],       # why a protection is missing (up to 8 lines of 200 chars)
     "required": bool}        # the owner's require_sandbox: no job runs here unprotected
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from chiffon.schemas.limits import check_text

Processes = Literal["cgroup", "pidns", "subreaper", "none"]
PROCESSES: tuple[str, ...] = get_args(Processes)
# The process containments that count as protected: the job's whole tree is ended with it.
CONTAINED: frozenset[str] = frozenset({"cgroup", "pidns"})
WHY_MAX = 8
WHY_MAX_CHARS = 200
# The keys in the order they travel (the pydantic model writes them in this order too).
FLAGS = ("memory_limit", "home_hidden", "devices_hidden")
KEYS = ("processes", *FLAGS, "why", "required")


def check(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The object as it travels (its keys in order, the flags not said false), or
    `ValueError` naming what is wrong (the agent's side: `agent.report.Snapshot`)."""
    if not isinstance(doc, Mapping):
        raise ValueError("sandbox: not an object")
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        raise ValueError(f"sandbox: unknown key {unknown[0]!r}")
    processes = doc.get("processes")
    if processes not in PROCESSES:
        raise ValueError(f"sandbox.processes: {processes!r} is not one of {', '.join(PROCESSES)}")
    out: dict[str, Any] = {"processes": processes}
    for flag in FLAGS:
        value = doc.get(flag, False)
        if not isinstance(value, bool):
            raise ValueError(f"sandbox.{flag}: {value!r} is not true or false")
        out[flag] = value
    why = doc.get("why", [])
    if not isinstance(why, list | tuple) or len(why) > WHY_MAX:
        raise ValueError(f"sandbox.why: not a list of at most {WHY_MAX} lines")
    for line in why:
        if not isinstance(line, str):
            raise ValueError(f"sandbox.why: {line!r} is not text")
        check_text("sandbox.why", line or " ", WHY_MAX_CHARS)
    out["why"] = list(why)
    required = doc.get("required", False)
    if not isinstance(required, bool):
        raise ValueError(f"sandbox.required: {required!r} is not true or false")
    out["required"] = required
    return out


def gaps(doc: Mapping[str, Any] | None) -> list[str]:
    """What keeps a desktop's sandbox from being full (its processes contained, its memory
    capped, the owner's home hidden), in words; empty: it is full. None (an agent too old
    to say, or one that does not check): "no sandbox reported"."""
    if not doc:
        return ["no sandbox reported"]
    missing = []
    if doc.get("processes") not in CONTAINED:
        missing.append("processes not contained")
    if not doc.get("memory_limit"):
        missing.append("no memory limit")
    if not doc.get("home_hidden"):
        missing.append("home not hidden")
    return missing


def is_full(doc: Mapping[str, Any] | None) -> bool:
    """Whether a job placed with `require_sandbox` may run there (`gaps` is empty)."""
    return not gaps(doc)


def summary(doc: Mapping[str, Any] | None, *, marked: bool = True) -> str:
    """One word for a table: `cgroup+mem+home+dev`, `pidns+home`, `none`; `-`: not said.
    A desktop whose owner requires the sandbox is `marked` `!` (it refuses jobs unprotected)."""
    if not doc:
        return "-"
    processes = doc.get("processes")
    parts = [processes] if processes in CONTAINED else []
    parts += [word for key, word in _WORDS if doc.get(key)]
    said = "+".join(parts) or "none"
    return f"{said}!" if marked and doc.get("required") else said


_WORDS = (("memory_limit", "mem"), ("home_hidden", "home"), ("devices_hidden", "dev"))


def explained(doc: Mapping[str, Any] | None) -> str:
    """`summary` (unmarked), with what is missing and why: "pidns+home (no memory limit: the memory
    controller is not delegated)"."""
    missing = gaps(doc)
    if not doc:
        return missing[0]
    if not missing:
        return summary(doc, marked=False)
    why = [line for line in doc.get("why") or [] if line]
    said = ", ".join(missing) + (f": {'; '.join(why)}" if why else "")
    return f"{summary(doc, marked=False)} ({said})"
