"""Why a job waits, in one sentence: what the placement checks found over the fleet
(`checks.Findings`), said in words, with the nearest miss named."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from chiffon.orchestrator import checks
from chiffon.orchestrator.checks import Chain, Findings, Requirements
from chiffon.orchestrator.ledger import Candidate
from chiffon.schemas import sandbox


def why_not(want: Requirements, candidates: Sequence[Candidate]) -> str:
    """ "no online agent that accepts jobs has 1 GPU with 8 GB free: closest is render-02
    GPU 0 with 6.1 GB; 2 agents offline; 1 does not accept jobs (its owner is using it)".

    Agents that take no job are counted by the reason their heartbeats give, in words; the
    one a new user meets first says its fix: "the only agent runs as root and refuses
    jobs: restart it with `chiffon up --allow-root-jobs` ..."."""
    found = Findings.of(want, candidates)
    parts = [_headline(want, found), *_offline_and_refusing(found, len(candidates))]
    if avoided := found.count(checks.AVOIDED):
        parts.append(f"{avoided} avoided (its owner took this job back lately)")
    if unsandboxed := found.rejected.get(checks.SANDBOX):
        parts.append(not_sandboxed(unsandboxed))
    if held := sorted(found.withheld_gpus):
        reasons = ", ".join(sorted(set(held)))
        parts.append(f"{len(held)} GPU{_s(len(held))} withheld ({reasons})")
    return "; ".join(parts)


def _headline(want: Requirements, found: Findings) -> str:
    full = " and is fully sandboxed" if want.require_sandbox else ""
    said = f"no online agent that accepts jobs{full}{_where(want)} has {_asked(want)}"
    near = _nearest(want, _closest_of(Chain.of(want), found.eligible))
    return said if near is None else f"{said}: closest is {near}"


def _offline_and_refusing(found: Findings, agents: int) -> list[str]:
    offline = found.count(checks.OFFLINE)
    parts = [f"{offline} agent{_s(offline)} offline"] if offline else []
    refusing = Counter(c.withheld for c in found.rejected.get(checks.REFUSES, ()))
    only = "the only online agent" if offline else "the only agent"
    for reason, count in sorted(refusing.items(), key=_root_first):
        parts.append(_refusing(reason, count, only if count == agents - offline == 1 else None))
    return parts


def _s(count: int) -> str:
    return "s" if count != 1 else ""


# Why online agents take no job, by the reason their heartbeats give (`Candidate.withheld`),
# for one agent and for several. Root is the one a new user meets first (`chiffon up` as
# root), so it says the fix.
_REFUSING: dict[str | None, tuple[str, str]] = {
    "never": (" (its owner did not opt in: accept_jobs)", " (their owners did not opt in)"),
    # An admin's hold (docs/security.md), not the owner's policy.
    "pending": (
        " (enrolled, waiting for an admin: chiffon agents approve ID)",
        " (enrolled, waiting for an admin: chiffon agents approve ID)",
    ),
    "suspect": (
        " (quarantined, its secret seems copied: chiffon agents clear or rotate ID)",
        " (quarantined, their secrets seem copied: chiffon agents clear or rotate ID)",
    ),
    # The owner requires the job sandbox (require_sandbox) and it is not full there.
    "unsandboxed": (
        " (its owner requires a sandbox it cannot fully enforce: chiffon probe says why)",
        " (their owners require a sandbox they cannot fully enforce: chiffon probe says why)",
    ),
    "outside_schedule": (" (outside its owner's schedule)", " (outside their owners' schedules)"),
    "owner_active": (" (its owner is using it)", " (their owners are using them)"),
    "owner_unknown": (
        " (its owner's idle time is unknown, and no schedule is set)",
        " (their owners' idle time is unknown, and no schedule is set)",
    ),
}
_ROOT_FIX = "`chiffon up --allow-root-jobs` (or `chiffon agent --allow-root-jobs`)"


def _root_first(item: tuple[str | None, int]) -> tuple[bool, bool, int, str]:
    """Root first (it says its fix), reasons not said last, the most common first."""
    reason, count = item
    return (reason != "root", reason is None, -count, str(reason))


def _refusing(reason: str | None, count: int, only: str | None) -> str:
    """ "1 does not accept jobs (its owner is using it)"; "the only agent runs as root and
    refuses jobs: restart it with `chiffon up --allow-root-jobs` ..." (`only`: how to
    name the one agent there is, when it is the one refusing)."""
    one = count == 1
    if reason == "root":
        who = only or str(count)
        verbs = "runs as root and refuses" if one else "run as root and refuse"
        return f"{who} {verbs} jobs: restart {'it' if one else 'them'} with {_ROOT_FIX}"
    why = _REFUSING.get(reason, ("", ""))[0 if one else 1]
    return f"{count} {'does' if one else 'do'} not accept jobs{why}"


def not_sandboxed(agents: Sequence[Candidate]) -> str:
    """ "1 not sandboxed (no memory limit: the memory controller is not delegated)"; for
    several, how many lack what: "3 not sandboxed (2 no memory limit, 1 no sandbox
    reported)". What each lacks is `schemas.sandbox.gaps`, the agent's why with it for one."""
    if len(agents) == 1:
        doc = agents[0].sandbox
        missing = ", ".join(sandbox.gaps(doc))
        why = [line for line in (doc or {}).get("why") or [] if line]
        return f"1 not sandboxed ({missing}{': ' + '; '.join(why) if why else ''})"
    lacks = Counter(", ".join(sandbox.gaps(c.sandbox)) for c in agents)
    said = ", ".join(f"{n} {gap}" for gap, n in sorted(lacks.items(), key=lambda i: (-i[1], i[0])))
    return f"{len(agents)} not sandboxed ({said})"


def never_fits(want: Requirements) -> str:
    """The warning for a job no registered agent's hardware could ever hold."""
    return (
        f"no registered agent{_where(want)} could ever hold {_asked(want)}; the job waits "
        "until one that can joins"
    )


def _where(want: Requirements) -> str:
    where = f" in pool {want.pool!r}" if want.pool else ""
    if want.labels:
        where += " with " + ", ".join(f"{k}={v}" for k, v in sorted(want.labels.items()))
    return where


def _asked(want: Requirements) -> str:
    asked = []
    if want.gpus:
        vendor = f" {want.gpu_vendor}" if want.gpu_vendor else ""
        each = f" with {want.vram_gb:g} GB free" if want.vram_gb else ""
        asked.append(f"{want.gpus}{vendor} GPU{_s(want.gpus)}{each}")
    if want.cpu_cores:
        asked.append(f"{want.cpu_cores:g} free cores")
    if want.memory_gb:
        asked.append(f"{want.memory_gb:g} GB free memory")
    return " and ".join(asked) or "room"


def closest(
    want: Requirements,
    candidates: Sequence[Candidate],
    could_hold: Callable[[Candidate], bool] | None = None,
) -> Candidate | None:
    """The eligible agent (`checks.ELIGIBILITY`) that misses `want` by the least (summed
    shortfalls, each as a fraction of what was asked); None when no agent is eligible at
    all. `could_hold`: the closest of those it says yes to, asked from the closest on (it
    may be costly)."""
    chain = Chain.of(want, checks.ELIGIBILITY)
    eligible = [c for c in candidates if chain.host_miss(c) is None]
    return _closest_of(chain, eligible, could_hold)


def _closest_of(
    chain: Chain,
    eligible: list[Candidate],
    could_hold: Callable[[Candidate], bool] | None = None,
) -> Candidate | None:
    if could_hold is None:
        return min(eligible, key=lambda c: (_shortfall(chain, c), c.name), default=None)
    eligible.sort(key=lambda c: (_shortfall(chain, c), c.name))
    return next((c for c in eligible if could_hold(c)), None)


def _nearest(want: Requirements, best: Candidate | None) -> str | None:
    """The closest agent, said with its best GPU when GPUs were asked for, else with what
    it lacks."""
    if best is None:
        return None
    if not want.gpus:
        return f"{best.name} ({_lacks(want, best)})"
    gpus = sorted(
        (g for g in best.gpus if checks.of_vendor(want, g) is None),
        key=lambda g: (g.withheld is not None, -g.available_gb),
    )
    if not gpus:
        return f"{best.name} (no {want.gpu_vendor or ''} GPU)".replace("  ", " ")
    g = gpus[min(want.gpus, len(gpus)) - 1]
    if g.withheld is not None:
        return f"{best.name} GPU {g.index}, withheld ({g.withheld})"
    return f"{best.name} GPU {g.index} with {g.available_gb:.1f} GB"


def _shortfall(chain: Chain, c: Candidate) -> float:
    want = chain.want
    total = _gpus_short(chain, c) if want.gpus else 0.0
    total += _miss(want.cpu_cores, c.cpu_cores_available)
    return total + _miss(want.memory_gb, c.memory_available_gb)


def _gpus_short(chain: Chain, c: Candidate) -> float:
    """The GPUs' shortfalls: of those that pass every GPU check but room, the roomiest."""
    want = chain.want
    free = sorted((g.available_gb for g in c.gpus
                   if chain.gpu_miss(g) in (None, checks.VRAM)), reverse=True)  # fmt: skip
    free += [0.0] * max(0, want.gpus - len(free))
    total = 0.0
    for have in free[: want.gpus]:
        total += _miss(want.vram_gb, have) if want.vram_gb else (0.0 if have else 1.0)
    return total


def _miss(need: float, have: float | None) -> float:
    if need <= 0:
        return 0.0
    if have is None or math.isnan(have):
        return 1.0
    return max(0.0, need - have) / need


def _lacks(want: Requirements, c: Candidate) -> str:
    lacks = []
    if checks.cores(want, c) is not None:
        lacks.append(f"{c.cpu_cores_available or 0:g} free cores")
    if checks.memory(want, c) is not None:
        lacks.append(f"{c.memory_available_gb or 0:.1f} GB free memory")
    return ", ".join(lacks) or "busy"
