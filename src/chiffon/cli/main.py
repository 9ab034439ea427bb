"""`chiffon`: the command line. Wiring only: build settings and objects, call the rest."""

from __future__ import annotations

import sys

import typer

from chiffon import __version__
from chiffon.cli import (
    agent_cmd,
    fleet_cmd,
    jobs_cmd,
    orchestrator_cmd,
    simulate_cmd,
    tokens_cmd,
    up_cmd,
)
from chiffon.cli.common import CliError, fail, set_debug

app = typer.Typer(
    name="chiffon",
    help="Chiffon: a fleet of GPU desktops as one capacity-aware pool.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say defaults as "[15]": text, not markup
)
up_cmd.register(app)
fleet_cmd.register(app)
jobs_cmd.register(app)
agent_cmd.register(app)
orchestrator_cmd.register(app)
simulate_cmd.register(app)
tokens_cmd.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chiffon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error (anywhere on the line)."
    ),
) -> None:
    """Chiffon: a fleet of GPU desktops as one capacity-aware pool."""


def usage_error(exc: typer.TyperException) -> int:
    """Print typer's usage error as one line (help itself when no command was given)."""
    ctx = getattr(exc, "ctx", None)
    code = int(getattr(exc, "exit_code", 2))
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        return code
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    return fail(f"{where}{message}", code).exit_code


def main() -> None:
    # `--debug` anywhere on chiffon's own part of the line; after `--` it is the job's.
    own = sys.argv[: sys.argv.index("--")] if "--" in sys.argv else sys.argv
    debug = "--debug" in own
    if debug:
        sys.argv.remove("--debug")  # the first one: chiffon's own
    set_debug(debug)  # and logging prints tracebacks (cli.common.setup_logging)
    try:
        result = app(standalone_mode=False, prog_name="chiffon")
    except CliError as exc:
        if debug:
            raise
        raise SystemExit(fail(str(exc), exc.code).exit_code) from None
    except typer.TyperException as exc:  # a bad flag or argument: one line, not a panel
        if debug:
            raise
        raise SystemExit(usage_error(exc)) from None
    except typer.Abort:
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) else 0)
