"""A desktop's job sandbox on the wire (`resources.sandbox`): the agent's pydantic-free
check and the orchestrator's schema agree, and the words every display uses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from rich.console import Console

from chiffon.agent.report import Snapshot
from chiffon.cli.agent_cmd import resources_table
from chiffon.schemas import sandbox
from chiffon.schemas.heartbeat import Resources, Sandbox

FULL = {"processes": "cgroup", "memory_limit": True, "home_hidden": True,
        "devices_hidden": True, "why": [], "required": False}  # fmt: skip


def test_a_snapshots_sandbox_travels_as_the_contract_writes_it() -> None:
    said = {"required": True, "why": ["no cgroup v2"], "processes": "pidns", "home_hidden": True}
    doc = Snapshot(sandbox=said).as_json()
    parsed = Resources.model_validate_json(json.dumps(doc))
    assert parsed.model_dump_json() == json.dumps(doc, separators=(",", ":"))
    assert parsed.sandbox == Sandbox(processes="pidns", home_hidden=True, why=["no cgroup v2"],
                                     required=True)  # fmt: skip
    # not said: null, as an older agent's absent field reads
    assert Snapshot().as_json()["sandbox"] is None
    assert Resources.model_validate({}).sandbox is None


@pytest.mark.parametrize(
    "change",
    [
        {"processes": "docker"},
        {"processes": None},
        {"memory_limit": "yes"},
        {"required": 1},
        {"why": ["x"] * (sandbox.WHY_MAX + 1)},
        {"why": ["x" * (sandbox.WHY_MAX_CHARS + 1)]},
        {"why": ["\x1b[31mred"]},
        {"why": "one line"},
    ],
)
def test_a_bad_sandbox_is_refused_by_both_sides(change: dict[str, Any]) -> None:
    bad = {**FULL, **change}
    with pytest.raises(ValueError, match="sandbox"):
        Snapshot(sandbox=bad)
    with pytest.raises(ValidationError):
        Resources.model_validate_json(json.dumps({"sandbox": bad}))


def test_the_bounds_hold_at_their_edge_on_both_sides() -> None:
    edge = {**FULL, "why": ["x" * sandbox.WHY_MAX_CHARS] * sandbox.WHY_MAX}
    Snapshot(sandbox=edge)
    Resources.model_validate_json(json.dumps({"sandbox": edge}))


@pytest.mark.parametrize(
    ("said", "summary", "gaps"),
    [
        (FULL, "cgroup+mem+home+dev", []),
        ({**FULL, "processes": "pidns", "devices_hidden": False}, "pidns+mem+home", []),
        ({**FULL, "processes": "subreaper"}, "mem+home+dev", ["processes not contained"]),
        ({**FULL, "memory_limit": False, "required": True}, "cgroup+home+dev!",
         ["no memory limit"]),
        ({"processes": "none"}, "none",
         ["processes not contained", "no memory limit", "home not hidden"]),
        (None, "-", ["no sandbox reported"]),
    ],
)  # fmt: skip
def test_the_words_for_a_sandbox(
    said: dict[str, Any] | None, summary: str, gaps: list[str]
) -> None:
    assert sandbox.summary(said) == summary
    assert sandbox.gaps(said) == gaps
    assert sandbox.is_full(said) is (not gaps)


def test_probe_prints_the_sandbox_when_the_snapshot_carries_it() -> None:
    def printed(snapshot: Snapshot) -> list[str]:
        console = Console(width=200, record=True)
        console.print(resources_table(snapshot))
        return [" ".join(line.split()) for line in console.export_text().splitlines()]

    lacking = {"processes": "pidns", "home_hidden": True, "required": True,
               "why": ["cgroup v2 memory controller not delegated"]}  # fmt: skip
    assert (
        "Sandbox pidns+home (no memory limit: cgroup v2 memory controller not delegated); "
        "required: jobs are refused" in printed(Snapshot(sandbox=lacking))
    )
    assert "Sandbox cgroup+mem+home+dev" in printed(Snapshot(sandbox=FULL))
    assert not any(line.startswith("Sandbox") for line in printed(Snapshot()))
