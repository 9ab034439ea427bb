"""How long the desktop's owner has been away: input idle time from the desktop session.

Part of issue 23 ("The desktop's owner comes first"), in progress: the agent reports it as
`owner_idle_seconds`; nothing decides on it yet (docs/owner.md).

Sources, in order (the first that can say, says):

1. **logind** (Linux, systemd): the session active on `seat0` (whoever sits at the
   desktop), and its `IdleHint` / `IdleSinceHint`, read with `loginctl` (logind's own
   client, over D-Bus). `IdleHint=no` is an owner at the keyboard (0 s); `yes` is idle
   since `IdleSinceHint` (microseconds since the epoch). A graphical session's hint is
   set by the desktop environment after its own idle delay (GNOME: the screen-blank
   delay), so the time is a lower bound there; a text console's is logind's own, from
   the terminal's last input.
2. **X11**: `xprintidle` (the XScreenSaver extension's idle time, in ms) for the
   `DISPLAY` the agent runs in, when it has one and the tool is installed.

Unknown (None) otherwise: no logind and no X11 display (a Wayland session whose desktop
does not set logind's hint, macOS, Windows). Each source is a bounded subprocess: a hung
`loginctl` costs at most `TIMEOUT_SECONDS` and never the heartbeat.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping

from chiffon.agent.bounded import OutputTooLarge, run_bounded

TIMEOUT_SECONDS = 2.0
MAX_OUTPUT_BYTES = 4096
SEAT = "seat0"


class IdleUnknown(Exception):
    """A source that is there but could not say (its error is reported as a probe error)."""


def _name(argv: list[str]) -> str:
    return os.path.basename(argv[0])


def _run(argv: list[str]) -> str:
    try:
        done = run_bounded(argv, timeout_seconds=TIMEOUT_SECONDS, max_output_bytes=MAX_OUTPUT_BYTES)
    except subprocess.TimeoutExpired:
        raise IdleUnknown(f"{_name(argv)} timed out after {TIMEOUT_SECONDS:g} s (killed)") from None
    except (OutputTooLarge, OSError) as exc:
        raise IdleUnknown(f"{_name(argv)}: {exc}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise IdleUnknown(f"{_name(argv)} exited {done.returncode}: {said[0] if said else ''}")
    return done.stdout.decode(errors="replace")


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def logind_idle(loginctl: str, now: float) -> float | None:
    """Seconds the session at `seat0` has been idle; None when no one is at the seat."""
    seat = _properties(_run([loginctl, "show-seat", SEAT, "-p", "ActiveSession"]))
    session = seat.get("ActiveSession", "").strip()
    if not session:
        return None
    hints = _properties(
        _run([loginctl, "show-session", session, "-p", "IdleHint", "-p", "IdleSinceHint"])
    )
    idle = hints.get("IdleHint", "").strip()
    if idle == "no":
        return 0.0
    since = hints.get("IdleSinceHint", "").strip()
    if idle != "yes" or not since.isdigit() or int(since) == 0:
        raise IdleUnknown(f"loginctl: session {session} says IdleHint={idle!r} since {since!r}")
    return round(max(0.0, now - int(since) / 1e6), 1)


def x11_idle(xprintidle: str) -> float:
    text = _run([xprintidle]).strip()
    if not text.isdigit():
        raise IdleUnknown(f"xprintidle said {text[:40]!r}")
    return round(int(text) / 1000, 1)


def read_owner_idle(
    *,
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    clock: Callable[[], float] = time.time,
) -> tuple[float | None, str | None]:
    """(idle seconds or None, the error that made it unknown, if one did)."""
    environ = os.environ if environ is None else environ
    errors = []
    if (loginctl := which("loginctl")) is not None:
        try:
            idle = logind_idle(loginctl, clock())
            if idle is not None:
                return idle, None
        except IdleUnknown as exc:
            errors.append(str(exc))
    if environ.get("DISPLAY") and (xprintidle := which("xprintidle")) is not None:
        try:
            return x11_idle(xprintidle), None
        except IdleUnknown as exc:
            errors.append(str(exc))
    return None, "; ".join(errors) or None
