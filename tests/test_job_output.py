"""What a reader of a job's output is handed: whole lines in order, a skip counted and
never glued to the next line (LogCursor), and a terminal that obeys no control sequence a
job wrote but colours (TerminalSafe). The end-to-end checks are in test_jobs_e2e.py."""

from __future__ import annotations

import uuid

from chiffon.cli.terminal import TerminalSafe
from chiffon.client import LogCursor
from chiffon.schemas.jobs import JobLog

JOB = uuid.uuid4()


def piece(offset: int, data: str, *, done: bool = False, attempt: int = 1) -> JobLog:
    return JobLog(job_id=JOB, attempt=attempt, offset=offset,
                  next_offset=offset + len(data.encode()), data=data, done=done)  # fmt: skip


def test_lines_are_handed_out_whole_and_in_order() -> None:
    at = LogCursor()
    first = at.take(piece(0, "line 1\nline"))
    assert first is not None and first.data == "line 1\n" and first.next_offset == 7
    second = at.take(piece(11, " 2\nline 3\n"))
    assert second is not None and second.data == "line 2\nline 3\n"
    assert (second.offset, second.next_offset, second.skipped_bytes) == (7, 21, 0)


def test_a_skip_is_counted_and_the_line_it_cut_is_left_out() -> None:
    at = LogCursor()
    assert at.take(piece(0, "line 1\nli")) is not None  # "li" waits for its line's end
    # The orchestrator dropped bytes 9..30: the reader asked from 9, got from 30.
    later = at.take(piece(30, "ne 5\nline 6\n"))
    assert later is not None and later.data == "line 6\n"
    # "li" (2), the 21 bytes never read, and "ne 5\n" (5): every byte not shown is counted.
    assert later.skipped_bytes == 2 + 21 + 5
    assert later.offset == 35 and at.offset == 42


def test_output_without_newlines_is_resumed_after_a_bounded_search() -> None:
    at = LogCursor()
    dots = "." * 20_000
    skipped = [at.take(piece(100 + i * 20_000, dots)) for i in range(4)]
    assert skipped[0] is not None and skipped[0].data == ""  # still looking for a line
    shown = [p for p in skipped if p is not None and p.data]
    assert shown, "resumed once no line end came within the bound"


def test_the_last_line_is_handed_out_when_the_attempt_ends() -> None:
    at = LogCursor()
    assert at.take(piece(0, "50%")) is None  # a line not yet ended, more may come
    last = at.take(piece(3, " 100%", done=True))
    assert last is not None and last.data == "50% 100%" and last.offset == 0


def test_a_progress_bar_is_shown_as_it_redraws() -> None:
    at = LogCursor()
    shown = at.take(piece(0, "10%\r20%\r30"))
    assert shown is not None and shown.data == "10%\r20%\r"


def test_a_terminal_gets_colours_but_no_other_control_sequence() -> None:
    safe = TerminalSafe()
    hostile = (
        "\x1b[31mred\x1b[0m\ttab\n"  # kept: SGR, tab, newline
        "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: writes the viewer's clipboard
        "\x1b]0;title\x07\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"  # title, hyperlink
        "\x1b[2J\x9b31m\r"  # clear screen, a C1 CSI; carriage return kept
    )
    out = safe.feed(hostile) + safe.flush()
    assert "\x1b[31mred\x1b[0m\ttab\n" in out and out.endswith("\r")
    assert "\x07" not in out and "\x9b" not in out
    assert out.count("\x1b") == 2, "only the two colour sequences reach the terminal"
    assert "\\x1b]52;c;" in out and "\\x1b[2J" in out and "\\x9b" in out


def test_a_colour_cut_between_two_pieces_stays_a_colour() -> None:
    safe = TerminalSafe()
    assert safe.feed("a\x1b[3") == "a"
    assert safe.feed("2mgreen") == "\x1b[32mgreen"
    assert safe.feed("\x1b") == "" and safe.flush() == "\\x1b"


def test_a_signal_raises_once_and_the_ones_after_it_wait_until_rearmed() -> None:
    import signal

    import pytest

    from chiffon.client import Interrupted, Signals

    signals = Signals()
    with pytest.raises(Interrupted) as first:
        signals.on_signal(signal.SIGINT, None)
    assert first.value.signum == signal.SIGINT
    signals.on_signal(signal.SIGINT, None)  # `timeout -s INT`'s second: held, not raised
    signals.on_signal(signal.SIGHUP, None)  # the terminal went: it outranks Ctrl-C
    signals.on_signal(signal.SIGINT, None)
    assert signals.rearm() == signal.SIGHUP
    with pytest.raises(Interrupted):
        signals.on_signal(signal.SIGTERM, None)  # armed again


def test_a_signal_during_a_shielded_block_is_raised_after_it() -> None:
    import signal

    import pytest

    from chiffon.client import Interrupted, Signals

    signals, done = Signals(), []
    with pytest.raises(Interrupted) as raised, signals.shield():
        signals.on_signal(signal.SIGTERM, None)
        done.append("the submission finished")
    assert done and raised.value.signum == signal.SIGTERM
