"""A job's output made harmless for a terminal: its control sequences could write the
viewer's clipboard (OSC 52), set the window title, hide links (OSC 8) or clear the screen.
Kept: newline, tab, carriage return (progress bars redraw their line with it) and plain
SGR colour sequences; any other C0 or C1 control is shown escaped (`\\x1b`), not obeyed."""

from __future__ import annotations

import re

# A plain SGR sequence (colours, bold): ESC [ digits and semicolons m.
_SGR = r"\x1b\[[0-9;]{0,64}m"
# Controls that are not kept: C0 but tab, newline, carriage return; DEL; C1.
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x9f]"
_TOKEN = re.compile(f"({_SGR})|({_CONTROL})")
# An escape sequence may be cut between two pieces of output: this much of a piece's end,
# from its last ESC, waits for the next piece.
_HOLD_MAX = 72
_PARTIAL = re.compile(r"\x1b(\[[0-9;]*)?")


def _escape(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1)
    return f"\\x{ord(match.group(2)):02x}"


class TerminalSafe:
    """Feed it output piece by piece; what it returns is safe to write to a terminal."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        self._held = ""
        cut = text.rfind("\x1b")
        # A tail that could still become an SGR sequence waits for the next piece.
        if cut >= 0 and len(text) - cut < _HOLD_MAX and _PARTIAL.fullmatch(text[cut:]):
            text, self._held = text[:cut], text[cut:]
        return _TOKEN.sub(_escape, text)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return _TOKEN.sub(_escape, held)
