"""The sandbox's rules that need no kernel feature (tests/test_sandbox.py tries the
mechanisms themselves): what an owner who requires it gets where it is incomplete, and
what a desktop that is not Linux reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from chiffon.agent import sandbox as sandbox_module
from chiffon.agent.sandbox import Sandbox, SandboxConfig


def test_an_owner_who_requires_the_sandbox_withholds_an_incomplete_desktop(tmp_path: Path) -> None:
    from chiffon.agent.guard import read_only
    from chiffon.agent.report import Snapshot
    from chiffon.agent.work import WorkSettings
    from tests.test_agent_report import snapshot_fields

    def snapshot() -> Snapshot:
        return Snapshot(**snapshot_fields())

    settings = WorkSettings(jobs_dir=tmp_path, accept_jobs="always", allow_root=True)
    missing = {"processes": "pidns", "memory_limit": False, "home_hidden": True,
               "devices_hidden": True, "required": True, "why": ["no memory limit"]}  # fmt: skip
    assert read_only(settings, snapshot(), missing).jobs_withheld == "unsandboxed"
    full = {**missing, "memory_limit": True}
    assert read_only(settings, snapshot(), full).jobs_withheld is None
    assert read_only(settings, snapshot(), {**missing, "required": False}).jobs_withheld is None


def test_a_desktop_that_is_not_linux_says_none_and_refuses_when_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbox_module.sys, "platform", "darwin")
    found = Sandbox(SandboxConfig(require=True)).start()
    assert found.report() == {
        "processes": "none", "memory_limit": False, "home_hidden": False,
        "devices_hidden": False, "required": True, "why": ["no sandbox on darwin (Linux only)"],
    }  # fmt: skip
    assert found.refusal() == (
        "the owner requires the sandbox, and it is not complete here "
        "(no sandbox on darwin (Linux only))"
    )
    assert Sandbox(SandboxConfig()).start().refusal() is None  # not required: jobs run
