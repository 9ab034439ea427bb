"""`chiffon tokens`: enrollment tokens limited in uses, in time, or both."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from chiffon.cli.common import CliError, console, plain
from chiffon.cli.fleet_cmd import JSON_OPTION, URL_OPTION
from chiffon.cli.jobs_cmd import client, parse_duration

tokens_app = typer.Typer(help="List enrollment tokens (default), make one, or withdraw one.")


@tokens_app.callback(invoke_without_command=True)
def tokens(ctx: typer.Context, as_json: bool = JSON_OPTION, url: str = URL_OPTION) -> None:
    """The made enrollment tokens that can still enroll (never the tokens themselves)."""
    if ctx.invoked_subcommand is not None:
        return
    with client(url) as c:
        rows: list[dict[str, Any]] = c.get_json("/enroll-tokens")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no enrollment tokens made (`chiffon tokens create` makes one)")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("ID", "USES LEFT", "EXPIRES", "APPROVES", "NOTE"):
        table.add_column(header)
    for row in rows:
        table.add_row(
            plain(row["token_id"][:8]),
            "unlimited" if row["uses_left"] is None else str(row["uses_left"]),
            row["expires_at"] or "never",
            "yes" if row["approves"] else "no",
            plain(row["note"]),
        )
    console.print(table)


@tokens_app.command("create")
def create(
    uses: int = typer.Option(None, "--uses", min=1, help="Enrollments it allows (default: any)."),
    expires: str = typer.Option(None, "--expires", help="It expires after this: 90s, 30m, 1h, 7d."),
    approve: bool = typer.Option(
        False, "--approve", help="Desktops enrolled with it take jobs at once (no `approve`)."
    ),
    note: str = typer.Option("", "--note", help="What it is for (shown by `chiffon tokens`)."),
    url: str = URL_OPTION,
) -> None:
    """Make an enrollment token, shown once. Give it to a desktop as CHIFFON_ENROLL_TOKEN.
    Desktops enrolled with it wait for `chiffon agents approve` unless made with --approve."""
    body = {
        "uses": uses,
        "expires_seconds": None if expires is None else parse_duration(expires, "--expires"),
        "approves": approve,
        "note": note,
    }
    with client(url) as c:
        made = c.post_json("/enroll-tokens", body)
    limits = [
        "any number of enrollments" if uses is None else f"{uses} enrollment(s)",
        "never expires" if made["expires_at"] is None else f"expires {made['expires_at']}",
        "approves them" if approve else "they wait for `chiffon agents approve`",
    ]
    console.print(f"made enrollment token {made['token_id']} ({', '.join(limits)}):",
                  highlight=False)  # fmt: skip
    typer.echo(made["token"])


@tokens_app.command("rm")
def remove(
    token_id: str = typer.Argument(..., help="The token's id (as `chiffon tokens` lists it)."),
    url: str = URL_OPTION,
) -> None:
    """Withdraw a made enrollment token: it enrolls no one from now on."""
    with client(url) as c:
        rows = c.get_json("/enroll-tokens")
        hits = [r["token_id"] for r in rows if r["token_id"].startswith(token_id.lower())]
        if len(hits) != 1:
            raise CliError(
                f"no enrollment token has the id {token_id!r}"
                if not hits
                else f"{token_id!r} matches {len(hits)} tokens; give more of the id"
            )
        c.delete(f"/enroll-tokens/{hits[0]}")
    console.print(f"withdrew enrollment token {hits[0]}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(tokens_app, name="tokens")
