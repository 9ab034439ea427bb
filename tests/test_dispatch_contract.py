"""The dispatch contract: the state tables walked pair by pair, the outcome table and its
retry rule, and the report payload's round trip."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from chiffon.orchestrator.jobspec import JobSpec
from chiffon.schemas.dispatch import (
    ACTIVE,
    ATTEMPT_MOVES,
    ATTEMPT_STATES,
    ENDINGS,
    MOVES,
    OUT,
    OUTCOMES,
    TERMINAL,
    IllegalMove,
    JobState,
    Work,
    alive,
    check_move,
    ended,
    is_active,
    is_out,
    is_terminal,
    next_state,
    report_from,
    spends_retry,
    started,
    usage,
)

STATES = get_args(JobState)
ALLOWED = {
    ("queued", "assigned"),
    ("queued", "cancelled"),
    ("assigned", "running"),
    ("assigned", "queued"),
    ("assigned", "lost"),
    ("assigned", "cancelled"),
    ("assigned", "failed"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "timed_out"),
    ("running", "cancelled"),
    ("running", "lost"),
    ("running", "queued"),
    # an attempt judged lost whose saved outcome is heard later (issue 34, item 6)
    *((state, late) for state in ("queued", "lost")
      for late in ("succeeded", "failed", "timed_out", "cancelled")),
}  # fmt: skip


def test_the_table_covers_every_state_and_ends_only_in_terminal_ones() -> None:
    assert set(MOVES) == set(STATES)
    # `lost` is final but for the one way back: the attempt's own outcome, heard late.
    assert {s for s in STATES if not MOVES[s]} == TERMINAL - {"lost"}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(STATES, STATES)))
def test_every_pair_of_states_is_allowed_or_refused_as_the_table_says(
    source: str, target: str
) -> None:
    if (source, target) in ALLOWED:
        check_move(source, target)
    else:
        with pytest.raises(IllegalMove, match=f"from {source} to {target}"):
            check_move(source, target)


def test_each_move_names_who_may_make_it() -> None:
    check_move("queued", "assigned", by="scheduler")
    check_move("running", "succeeded", by="agent")
    check_move("running", "lost", by="sweep")
    check_move("queued", "cancelled", by="user")
    with pytest.raises(IllegalMove, match="the agent cannot move a job from queued to assigned"):
        check_move("queued", "assigned", by="agent")
    with pytest.raises(IllegalMove, match="the sweep cannot"):
        check_move("running", "succeeded", by="sweep")
    assert all(movers for to in MOVES.values() for movers in to.values())


def test_the_groupings_partition_the_states() -> None:
    assert set(ACTIVE) | TERMINAL == set(STATES) and not set(ACTIVE) & TERMINAL
    assert set(OUT) < set(ACTIVE) and "queued" not in OUT
    for state in STATES:
        assert is_terminal(state) == (state in TERMINAL)
        assert is_out(state) == (state in ("assigned", "running"))
        assert is_active(state) == (not is_terminal(state))


def test_every_outcome_has_an_ending_and_each_ending_state_is_reachable() -> None:
    assert set(ENDINGS) == set(OUTCOMES)
    for outcome, ending in ENDINGS.items():
        assert ending.attempt in ATTEMPT_STATES
        source = "assigned" if outcome == "refused" else "running"
        check_move(source, ending.job or "queued", by="agent")  # an out attempt ends so
        assert ending.attempt in ATTEMPT_MOVES["running"] | ATTEMPT_MOVES["assigned"], outcome


@pytest.mark.parametrize(
    ("outcome", "code", "retries_left", "retry_on_exit", "expected"),
    [
        ("exit", 0, False, False, "succeeded"),
        ("exit", 0, True, True, "succeeded"),
        ("exit", 3, True, False, "failed"),  # a failed exit is retried only when asked
        ("exit", 3, True, True, "queued"),
        ("exit", 3, False, True, "failed"),
        ("exit", None, True, True, "queued"),  # never started, retried when asked
        ("lost", None, True, False, "queued"),  # a lost attempt is retried while left
        ("lost", None, False, True, "lost"),
        ("refused", None, False, False, "queued"),  # always placed again, free
        ("preempted", None, False, False, "queued"),
        ("cancelled", None, True, True, "cancelled"),
        ("timed_out", None, True, True, "timed_out"),
    ],
)
def test_the_outcome_table_and_the_retry_rule(
    outcome: str, code: int | None, retries_left: bool, retry_on_exit: bool, expected: str
) -> None:
    got = next_state(outcome, code, retries_left=retries_left, retry_on_exit=retry_on_exit)  # type: ignore[arg-type]
    assert got == expected


def test_only_a_retried_loss_or_exit_spends_a_retry() -> None:
    assert spends_retry("lost", "queued") and spends_retry("exit", "queued")
    assert not spends_retry("refused", "queued") and not spends_retry("preempted", "queued")
    assert not spends_retry("lost", "lost")


def test_the_attempt_table_ends_only_in_ends_and_lost_ends_late() -> None:
    assert set(ATTEMPT_MOVES) == set(ATTEMPT_STATES)
    assert ATTEMPT_MOVES["lost"] == {"succeeded", "failed", "timed_out", "cancelled"}
    assert "refused" not in ATTEMPT_MOVES["running"]  # only an attempt not started is refused


def test_a_report_round_trips_through_its_payload() -> None:
    said = report_from(ended("exit", "x" * 5000, exit_code=2, peak_vram_gb={"GPU-1": 3.5}))
    assert (said.kind, said.outcome, said.exit_code, said.signal) == ("ended", "exit", 2, None)
    assert len(said.detail) == 1000 and said.vram_gb == {"GPU-1": 3.5}
    assert not said.never_ran() and report_from(ended("exit", "gone")).never_ran()
    begun = report_from(started("/home/u/.chiffon/jobs/a-1/output.log"))
    assert begun.kind == "started" and begun.log_path.endswith("output.log")  # type: ignore[union-attr]


def test_the_work_an_order_carries_round_trips_and_is_checked_on_arrival() -> None:
    work = Work(("python", "train.py"), {"SEED": "1"}, "/data", 60.0, ("GPU-1",), 8.0, "nvidia")
    assert Work.from_payload(work.payload()) == work
    good = work.payload()
    for field, bad, says in [
        ("command", "rm -rf /", "command must be a list"),
        ("command", [], "command is empty"),
        ("command", ["x"] * 1025, "at most 1024"),
        ("env", {"A": 1}, "env must map names to strings"),
        ("workdir", "relative", "workdir must be an absolute path"),
        ("timeout_seconds", 0, "timeout_seconds must be a positive number"),
        ("timeout_seconds", float("inf"), "timeout_seconds must be a positive number"),
        ("vram_gb", -1, "vram_gb must be a positive number"),
        ("vram_gb", "8", "vram_gb must be a positive number"),
        ("gpu_uuids", ["a\x00"], "gpu_uuids must hold strings without NUL"),
    ]:
        with pytest.raises(ValueError, match=says):
            Work.from_payload({**good, field: bad})


def test_the_work_carries_the_memory_and_cores_claims_absent_from_older_orchestrators() -> None:
    """The host claims travel with the order (the agent's sandbox may hold the job to
    them); an order from an orchestrator that did not send them asks none."""
    work = Work(("python", "train.py"), {}, None, None, (), 0.0, None, memory_gb=16.0, cores=2.5)
    payload = work.payload()
    assert (payload["memory_gb"], payload["cores"]) == (16.0, 2.5)
    assert Work.from_payload(payload) == work
    older = {k: v for k, v in payload.items() if k not in ("memory_gb", "cores")}
    assert (Work.from_payload(older).memory_gb, Work.from_payload(older).cores) == (0.0, 0.0)
    assert Work.from_payload({**payload, "memory_gb": None, "cores": 0}).memory_gb == 0.0
    for field in ("memory_gb", "cores"):
        for bad in (-1, "8", True, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{field} must be a positive number"):
                Work.from_payload({**payload, field: bad})
    # the orchestrator encodes them from the job's spec
    spec = JobSpec.parse({"command": ["x"], "requirements": {"cpu_cores": 3, "memory_gb": 12}})
    assert Work.from_payload(spec.assignment([])) == Work(("x",), {}, memory_gb=12.0, cores=3.0)


def test_a_start_report_carries_only_a_log_path_the_orchestrator_takes() -> None:
    assert started("/home/u/jobs/a-1/output.log")["log_path"] == "/home/u/jobs/a-1/output.log"
    for refused in ("jobs/a-1/output.log", "/" + "d" * 4096, "/a\x1b[2J/output.log", None):
        assert started(refused) == {"kind": "started"}, refused
    assert report_from(usage({"GPU-1": 2.0})).vram_gb == {"GPU-1": 2.0}
    assert report_from(alive()).kind == "alive"
    assert "signal" not in ended("exit", "no such program")  # never started: no signal
    assert report_from(ended("exit", "", signal=9)).signal == 9
