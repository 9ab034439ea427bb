"""What every command shares: one-line errors, logging, settings errors in plain words."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

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


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line(exc: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's background link."""
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return lines[0] if lines else type(inner).__name__
