"""Fake `loginctl` and `xprintidle` executables: the desktop session at the OS boundary.

`install(bin_dir, seat_session=..., idle_hint=..., idle_since_us=...)` writes a `loginctl`
answering `show-seat seat0 -p ActiveSession` and `show-session ID -p IdleHint -p
IdleSinceHint` as logind does (key=value lines), and optionally an `xprintidle` printing
milliseconds; `fail` makes loginctl exit 1 as on a machine without systemd, `hang_seconds`
makes it hang.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

LOGINCTL = """#!{python}
import json, sys, time
spec = json.load(open({spec!r}))
if spec["hang_seconds"]:
    time.sleep(spec["hang_seconds"])
if spec["fail"]:
    print("Failed to connect to bus: Host is down", file=sys.stderr)
    sys.exit(1)
args = sys.argv[1:]
if args[:2] == ["show-seat", "seat0"]:
    print("ActiveSession=" + spec["seat_session"])
elif args[:1] == ["show-session"] and args[1] == spec["seat_session"]:
    print("IdleHint=" + spec["idle_hint"])
    print("IdleSinceHint=" + str(spec["idle_since_us"]))
else:
    print("Unknown arguments " + " ".join(args), file=sys.stderr)
    sys.exit(1)
"""

XPRINTIDLE = """#!{python}
print({ms!r})
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(
    bin_dir: Path,
    *,
    seat_session: str = "2",
    idle_hint: str = "no",
    idle_since_us: int = 0,
    fail: bool = False,
    hang_seconds: float = 0,
    xprintidle_ms: str | None = None,
) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    spec = bin_dir / "loginctl.json"
    spec.write_text(json.dumps({"seat_session": seat_session, "idle_hint": idle_hint,
                                "idle_since_us": idle_since_us, "fail": fail,
                                "hang_seconds": hang_seconds}))  # fmt: skip
    _executable(bin_dir / "loginctl", LOGINCTL.format(python=sys.executable, spec=str(spec)))
    if xprintidle_ms is not None:
        _executable(
            bin_dir / "xprintidle", XPRINTIDLE.format(python=sys.executable, ms=xprintidle_ms)
        )
