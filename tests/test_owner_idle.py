"""The owner's input idle time (issue 23, in progress), with fake `loginctl` and
`xprintidle` at the OS boundary: logind first, X11 when logind cannot say, unknown
otherwise; a hung tool is killed; the number travels in the heartbeat and `chiffon probe`
shows it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from chiffon.agent.probes import owner
from chiffon.agent.probes.owner import read_owner_idle
from chiffon.schemas.heartbeat import Resources
from tests.fakes.session import install
from tests.procs import run_cli

NOW = 1_800_000_000.0


def idle(bin_dir: Path, display: str | None = None) -> tuple[float | None, str | None]:
    def which(name: str) -> str | None:
        return shutil.which(name, path=str(bin_dir))

    environ = {"DISPLAY": display} if display else {}
    return read_owner_idle(environ=environ, which=which, clock=lambda: NOW)


def test_logind_says_the_owner_is_at_the_keyboard(tmp_path: Path) -> None:
    install(tmp_path, idle_hint="no")
    assert idle(tmp_path) == (0.0, None)


def test_logind_says_how_long_the_session_at_the_seat_has_been_idle(tmp_path: Path) -> None:
    install(tmp_path, idle_hint="yes", idle_since_us=int((NOW - 600) * 1e6))
    assert idle(tmp_path) == (600.0, None)


def test_x11_answers_when_no_one_is_at_the_seat_or_logind_is_away(tmp_path: Path) -> None:
    install(tmp_path, seat_session="", xprintidle_ms="4500")
    assert idle(tmp_path, display=":0") == (4.5, None)
    install(tmp_path, fail=True, xprintidle_ms="120000")
    assert idle(tmp_path, display=":0") == (120.0, None)
    assert idle(tmp_path)[0] is None  # no DISPLAY: X11 is not asked


def test_unknown_says_why_and_never_guesses(tmp_path: Path) -> None:
    install(tmp_path, fail=True)
    seconds, why = idle(tmp_path)
    assert seconds is None and why is not None and "loginctl exited 1" in why
    install(tmp_path, idle_hint="yes", idle_since_us=0)  # idle, but since when?
    assert idle(tmp_path)[0] is None
    assert idle(tmp_path / "nothing-installed") == (None, None)


def test_a_hung_loginctl_is_killed_at_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owner, "TIMEOUT_SECONDS", 0.5)
    install(tmp_path, hang_seconds=30)
    started = time.monotonic()
    seconds, why = idle(tmp_path)
    assert seconds is None and why is not None and "timed out" in why
    assert time.monotonic() - started < 5


def test_the_heartbeat_carries_it_and_probe_shows_it(tmp_path: Path) -> None:
    install(tmp_path, idle_hint="yes", idle_since_us=int((time.time() - 660) * 1e6))
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "DISPLAY": ""}
    shown = run_cli("probe", env=env)
    assert shown.returncode == 0 and "idle 11 min" in shown.stdout, shown.stdout
    as_json = run_cli("probe", "--json", env=env)
    resources = Resources.model_validate_json(as_json.stdout)  # the wire schema takes it
    assert resources.owner_idle_seconds is not None and 655 <= resources.owner_idle_seconds < 700
