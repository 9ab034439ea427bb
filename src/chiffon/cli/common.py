"""What every command shares: one-line errors, logging, settings errors in plain words."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TextIO

import typer
from rich.console import Console
from rich.text import Text

from chiffon.schemas.limits import clean_text

if TYPE_CHECKING:  # the agent shares this module and must not load pydantic
    from pydantic import ValidationError

# Piped output (scripts, tests) is not cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


# Exit statuses, the same for every command (README, "Exit status"): a script waiting on
# `chiffon capacity` can tell "not yet" from a typo or an outage.
EXIT_FAILED = 1  # could not do it: orchestrator unreachable, token refused, server error
EXIT_USAGE = 2  # the command line, or a value in it, is wrong
EXIT_NO_CAPACITY = 3  # `chiffon capacity`: a fine question, but no agent can take the work now


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def plain(value: object) -> Text:
    """Text from outside (an agent's name, a driver's string, a server's error) as it is:
    never read as rich markup (`[/]` crashed the table), with control and bidirectional
    characters blanked (an escape sequence reached the terminal, a newline forged a row)."""
    return Text(clean_text(str(value)))


def fail(message: str, code: int = 1) -> typer.Exit:
    line = Text.assemble(("error:", "bold red"), " ", plain(message))
    err_console.print(line, highlight=False, soft_wrap=True)
    return typer.Exit(code)


# pydantic's error types in the agent's words ("must be greater than 0").
_PLAIN = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "float_parsing": "must be a number",
    "int_parsing": "must be a whole number",
    "bool_parsing": "must be true or false",
}


def describe_settings_error(
    exc: ValidationError,
    flags: Mapping[str, object] | None = None,
    env_names: Mapping[str, str] | None = None,
) -> str:
    """One line naming the setting, the bad value and where it came from (the flag, or the
    `CHIFFON_*` variable), worded like the agent's."""
    first = exc.errors(include_url=False)[0]
    key = ".".join(str(p) for p in first["loc"]) or "settings"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    if key.startswith("CHIFFON_"):
        key, source = key.removeprefix("CHIFFON_").lower(), f"env {key}"
    elif flags and flags.get(key) is not None:
        source = "flag"
    else:
        source = f"env {(env_names or {}).get(key, f'CHIFFON_{key.upper()}')}"
    template = _PLAIN.get(first["type"])
    ctx = {
        k: f"{v:g}" if isinstance(v, int | float) else v for k, v in first.get("ctx", {}).items()
    }
    reason = template.format(**ctx) if template else first["msg"]
    return f"bad setting {key}{shown} (from {source}): {reason}"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEBUG_HELP = (
    "Print full tracebacks, and every repeat of an error (without it: one line a failure, "
    "repeats counted). Anywhere on the line: chiffon --debug up."
)
_debug = False  # `chiffon --debug ...` (anywhere on the line; cli.main takes it off argv)


def set_debug(on: bool) -> None:
    """`--debug` was given: full tracebacks, every repeat (`setup_logging`)."""
    global _debug
    _debug = on


def setup_logging(verbose: bool, *, debug: bool | None = None) -> None:
    """Log to stderr, one line a failure: outside `--debug` no traceback is printed (the
    exception's type and first line end the line instead), and a warning or error that
    repeats is said once a minute with its count (`OncePerFailure`). Under resource
    exhaustion `chiffon up` printed 22 full tracebacks of the same `can't start new
    thread`. Everything logs through here: our loops, asyncio's default exception handler
    and uvicorn's error log (`serve` leaves logging to us), and threads that die."""
    debug = _debug if debug is None else debug
    handler = logging.StreamHandler() if debug else OncePerFailure()
    handler.setFormatter(logging.Formatter(LOG_FORMAT) if debug else OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        threading.excepthook = _log_thread_failure


def _log_thread_failure(args: threading.ExceptHookArgs) -> None:
    """A thread that died of an exception, as one line (Python prints its traceback)."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("chiffon.threads").error(
        "thread %s failed", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


class OneLineFormatter(logging.Formatter):
    """Each record on one line: a multi-line message joined, and an exception as its type
    and first line instead of its traceback (`--debug` shows that)."""

    def format(self, record: logging.LogRecord) -> str:
        # record.exc_text is left alone: other handlers (pytest's) format it their way.
        record.message = one_line_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        return self.formatMessage(record)


def one_line_message(record: logging.LogRecord) -> str:
    lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
    text = "; ".join(lines)
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        said = one_line(exc) if str(exc).strip() else ""
        text += f": {type(exc).__name__}" + (f": {said}" if said != type(exc).__name__ else "")
    return text


class _Tally:
    __slots__ = ("record", "repeats", "since")

    def __init__(self, record: logging.LogRecord, since: float) -> None:
        self.record, self.repeats, self.since = record, 0, since


class OncePerFailure(logging.StreamHandler[TextIO]):
    """A warning or error is printed the first time; the same failure again (same logger,
    same first line of message, same exception type) within `window_seconds` is counted,
    and the count said in one line when the window has passed (at the next record) or at
    exit: a failure that persists prints one line a minute, however often it happens."""

    def __init__(self, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()  # sys.stderr, as basicConfig's
        self.window_seconds = window_seconds
        self._clock = clock
        self._tallies: dict[tuple[str, int, str, str], _Tally] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = self._clock()
        key = _failure_class(record) if record.levelno >= logging.WARNING else None
        tally = self._tallies.get(key) if key is not None else None
        self._say_counts(now, keep=key)
        if tally is None or key is None:
            if key is not None:
                self._tallies[key] = _Tally(record, now)
            super().emit(record)
            return
        tally.repeats += 1
        if now - tally.since >= self.window_seconds:  # it goes on: once a window, counted
            self._say_count(tally, now)
            self._tallies[key] = _Tally(record, now)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # at exit: the stream may be gone
            self.acquire()
            try:
                self._say_counts(self._clock(), keep=None, every=True)
            finally:
                self.release()
        super().close()

    def _say_counts(
        self, now: float, *, keep: tuple[str, int, str, str] | None, every: bool = False
    ) -> None:
        """Say the count of each failure whose window has passed, and forget it."""
        for key, tally in list(self._tallies.items()):
            if key != keep and (every or now - tally.since >= self.window_seconds):
                del self._tallies[key]
                if tally.repeats:
                    self._say_count(tally, now)

    def _say_count(self, tally: _Tally, now: float) -> None:
        times = f"{tally.repeats} more time{'s' if tally.repeats != 1 else ''}"
        line = f"{one_line_message(tally.record)} ({times} in {now - tally.since:.0f} s)"
        created = time.time()
        summary = logging.makeLogRecord(
            {**tally.record.__dict__, "msg": line, "args": None, "exc_info": None,
             "exc_text": None, "stack_info": None, "created": created,
             "msecs": created % 1 * 1000}
        )  # fmt: skip
        super().emit(summary)


def _failure_class(record: logging.LogRecord) -> tuple[str, int, str, str]:
    exc = record.exc_info[0] if record.exc_info and record.exc_info[0] else None
    # A failure with an exception is grouped by what the code said (its format string:
    # "thread %s failed" for every thread that died) and the exception's type; a message
    # without one by its words.
    said = str(record.msg) if exc is not None else record.getMessage()
    first = next(iter(said.splitlines()), "")
    return (record.name, record.levelno, first, exc.__qualname__ if exc else "")


def one_line(exc: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's background link."""
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return lines[0] if lines else type(inner).__name__
