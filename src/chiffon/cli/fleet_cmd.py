"""Read commands, like `kubectl get nodes`: `chiffon agents`, `capacity`, `events`."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from chiffon.cli.common import EXIT_NO_CAPACITY, EXIT_USAGE, CliError, console, plain
from chiffon.schemas.limits import clean_text
from chiffon.schemas.metrics import BOUNDS, Bound
from chiffon.schemas.sandbox import gaps as sandbox_gaps
from chiffon.schemas.sandbox import summary as sandbox_summary

if TYPE_CHECKING:
    from chiffon.client import Client

URL_OPTION = typer.Option(
    None,
    "--orchestrator-url",
    help="Default: env CHIFFON_ORCHESTRATOR_URL or http://127.0.0.1:8700.",
)
JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts.")
LABEL_OPTION = typer.Option(
    None, "--selector", "-l", help="key=value: only agents with this label; repeatable."
)


def _selector(items: list[str] | None) -> list[str] | None:
    for item in items or ():
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise CliError(f"-l/--selector wants key=value, not {item!r}", code=EXIT_USAGE)
    return items or None


agents_app = typer.Typer(help="List agents (default) or manage one.", no_args_is_help=False)


def connect(url: str | None) -> contextlib.AbstractContextManager[Client]:
    """Imported on use: httpx stays out of the agent's process, which shares this CLI."""
    from chiffon.cli.client import connect as connect_to

    return connect_to(url)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "?" if value is None else fmt.format(value)


def _gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "-"
    return ", ".join(
        f"{_num(g.get('vram_free_gb'))}/{_num(g.get('vram_total_gb'))} GB"
        + (f" ({clean_text(str(g['withheld']))})" if g.get("withheld") else "")
        for g in gpus
    )


_OWNER_SAYS = {
    "never": "no jobs",
    "root": "no jobs (root)",
    "unsandboxed": "no jobs (sandbox)",
    "owner_active": "active",
    "owner_unknown": "unknown",
    "outside_schedule": "off schedule",
}


def owner(agent: dict[str, Any]) -> str:
    """The owner's side, as `chiffon agents` shows it: active, away N min, off schedule."""
    m = agent["resource_metrics"]
    withheld = m.get("jobs_withheld")
    if withheld is not None:
        return _OWNER_SAYS.get(str(withheld), clean_text(str(withheld)))
    if not agent.get("accepts_jobs"):
        return "no jobs"
    idle = m.get("owner_idle_seconds")
    if idle is None:
        return "jobs ok"
    return f"away {idle / 60:.0f}m" if idle >= 60 else "active"


def _reliability(agent: dict[str, Any]) -> str:
    r = agent.get("reliability") or {}
    return f"{r.get('offline_events_7d', 0)} off, {r.get('preemptions_7d', 0)} taken back"


def sandbox(agent: dict[str, Any]) -> Text:
    """Its job sandbox in a word (`cgroup+mem+home+dev`, `pidns+home`, `none`; `-`: not
    said; `!`: its owner requires it), green when `--require-sandbox` jobs may land there."""
    said = agent.get("sandbox") or agent["resource_metrics"].get("sandbox")
    full = not sandbox_gaps(said)
    return Text(clean_text(sandbox_summary(said)), style="green" if full else "")


def _status(status: str, hold: str | None = None) -> Text:
    """online, offline; an admin's hold beside it (`online, pending`), in yellow."""
    if hold:
        return Text(clean_text(f"{status}, {hold}"), style="yellow")
    return Text(clean_text(status), style="green" if status == "online" else "red")


# `chiffon agents` columns, most needed first: at a narrow terminal the last ones go first
# (an operator needs the name, the status and the GPUs), and `-o wide` shows them all.
_AGENT_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str | Text]], ...] = (
    ("NAME", lambda a: plain(a["name"])),
    ("STATUS", lambda a: _status(a["status"], a.get("hold"))),
    ("GPUS (free/total)", lambda a: _gpus(a["resource_metrics"].get("gpus", []))),
    ("OWNER", owner),
    ("LAST SEEN", lambda a: ago(a["age_seconds"])),
    ("CORES", lambda a: _cores(a["resource_metrics"])),
    ("MEM FREE", lambda a: f"{_num(a['resource_metrics'].get('memory_available_gb'))} GB"),
    ("POOL", lambda a: plain(a["pool_name"])),
    ("LOAD1", lambda a: _num(a["resource_metrics"].get("cpu_load_1min"), "{:.2f}")),
    ("TYPE", lambda a: plain(a["resource_metrics"].get("gpu_type", "?"))),
    ("ID", lambda a: plain(a["agent_id"][:8])),
    ("7 DAYS", _reliability),
    ("SANDBOX", sandbox),
)


def _print_whole(table: Table) -> None:
    """Print without squeezing: wide output is as wide as it needs (like `kubectl -o wide`)."""
    wanted = console.measure(table, options=console.options.update_width(100_000)).maximum
    if wanted <= console.width:
        console.print(table)
    else:  # rich's print never goes past its console's width
        Console(width=wanted, force_terminal=console.is_terminal).print(table)


def _cores(m: dict[str, Any]) -> str:
    return f"{_num(m.get('cpu_cores_available'), '{}')}/{_num(m.get('cpu_cores_physical'), '{}')}"


def agents_table(agents: list[dict[str, Any]], *, wide: bool = False) -> Table:
    """The agents, with as many columns as the terminal holds (all of them when `wide`)."""
    unbounded = console.options.update_width(100_000)  # the width the table wants
    for count in range(len(_AGENT_COLUMNS), 2, -1):
        table = _agents_table(agents, _AGENT_COLUMNS[:count])
        if wide or console.measure(table, options=unbounded).maximum <= console.width:
            return table
    return table


def _agents_table(
    agents: list[dict[str, Any]],
    columns: Sequence[tuple[str, Callable[[dict[str, Any]], str | Text]]],
) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header, _ in columns:
        table.add_column(header, no_wrap=header != "GPUS (free/total)")
    for agent in agents:
        table.add_row(*(cell(agent) for _, cell in columns))
    return table


def capacity_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("#", "NAME", "ID", "POOL", "FREE VRAM", "BEST GPU", "CORES", "MEM FREE", "AGE"):
        table.add_column(column, no_wrap=True)
    for rank, c in enumerate(rows, start=1):
        table.add_row(
            str(rank),
            plain(c["name"]),
            plain(c["agent_id"][:8]),
            plain(c["pool_name"]),
            f"{_num(c['gpu_vram_available_gb'])}/{_num(c['gpu_vram_total_gb'])} GB",
            f"{_num(c['gpu_vram_available_max_gb'])} GB",
            f"{_num(c['cpu_cores_available'], '{}')}/{_num(c['cpu_cores_physical'], '{}')}",
            f"{_num(c['memory_available_gb'])} GB",
            ago(c["age_seconds"]),
        )
    return table


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@agents_app.callback(invoke_without_command=True)
def agents(
    ctx: typer.Context,
    status: str = typer.Option(None, help="online or offline."),
    pool: str = typer.Option(None, help="Only this pool."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh in place until Ctrl-C."),
    output: str = typer.Option(
        None, "--output", "-o", help="wide: every column, however narrow the terminal."
    ),
    interval: float = typer.Option(2.0, help="Seconds between refreshes with --watch."),
    selector: list[str] = LABEL_OPTION,
    as_json: bool = JSON_OPTION,
    url: str = URL_OPTION,
) -> None:
    """One row per agent: status, last seen, free cores, memory and VRAM."""
    if ctx.invoked_subcommand is not None:
        return
    if status not in (None, "online", "offline"):
        raise CliError(f"--status must be online or offline, not {status!r}", code=EXIT_USAGE)
    if output not in (None, "wide"):
        raise CliError(f"-o/--output must be wide, not {output!r}", code=EXIT_USAGE)
    wide = output == "wide"
    labels = _selector(selector)
    with connect(url) as client:
        _list_agents(client, status, pool, labels, as_json=as_json, wide=wide,
                     watch=watch, interval=interval)  # fmt: skip


def _list_agents(
    client: Client,
    status: str | None,
    pool: str | None,
    labels: list[str] | None,
    *,
    as_json: bool,
    wide: bool,
    watch: bool,
    interval: float,
) -> None:
    def fetch() -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = client.get_json(
            "/agents", status=status, pool_name=pool, label=labels
        )
        return result

    if as_json:
        _print_json(fetch())
    elif not watch:
        rows = fetch()
        if rows:
            _print_whole(agents_table(rows, wide=wide))
        else:
            console.print(_none_listed(client, status, pool))
    else:
        with Live(agents_table(fetch(), wide=wide), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(agents_table(fetch(), wide=wide), refresh=True)
            except KeyboardInterrupt:
                pass


def _act_on(url: str | None, agent: str, path: str, done: str, method: str = "DELETE") -> None:
    """DELETE (or POST) `path` for one agent (id, id prefix or name), then say `done`."""
    with connect(url) as client:
        agent_id = client.resolve_agent(agent)
        if method == "POST":
            client.post_json(path.format(id=agent_id))
        else:
            client.delete(path.format(id=agent_id))
    console.print(done.format(id=agent_id), highlight=False)


@agents_app.command("approve")
def approve(
    agent: str = typer.Argument(..., help="The pending agent (id, id prefix or name)."),
    url: str = URL_OPTION,
) -> None:
    """Let an enrolled agent take jobs. A desktop enrolled with the enrollment token waits
    for this (`chiffon agents` shows it `pending`), unless CHIFFON_AUTO_APPROVE is set."""
    _act_on(url, agent, "/agents/{id}/approve", "approved {id}: it may take jobs", "POST")


@agents_app.command("clear")
def clear(
    agent: str = typer.Argument(..., help="The suspect agent (id, id prefix or name)."),
    url: str = URL_OPTION,
) -> None:
    """Lift a `suspect` quarantine once you know both senders were the agent (it was run
    twice). If its secret may have been copied, `chiffon agents rotate` it instead."""
    _act_on(
        url, agent, "/agents/{id}/clear",
        "cleared {id}: it may take jobs again", "POST",
    )  # fmt: skip


def local_secret_file(agent_id: str) -> Path | None:
    """This machine's agent's secret file (CHIFFON_STATE_DIR or ~/.chiffon), when that
    agent is `agent_id`."""
    from chiffon.agent.identity import ID_FILE, SECRET_FILE
    from chiffon.agent.settings import DEFAULT_STATE_DIR

    state_dir = Path(os.environ.get("CHIFFON_STATE_DIR") or DEFAULT_STATE_DIR)
    try:
        kept = (state_dir / ID_FILE).read_text().strip()
    except OSError:
        return None
    return state_dir / SECRET_FILE if kept == agent_id else None


@agents_app.command("rotate")
def rotate(
    agent: str = typer.Argument(..., help="The agent (id, id prefix or name)."),
    secret_file: Path = typer.Option(
        None,
        "--secret-file",
        help="Write the new secret here (mode 0600) instead of printing it; default: this "
        "machine's agent's own file when AGENT is this machine's agent.",
    ),
    url: str = URL_OPTION,
) -> None:
    """Give an agent a new secret: the old one, and whoever copied it, is refused from now
    on, and a `suspect` quarantine is lifted. Run on the desktop, it writes the new secret
    where the agent keeps it; restart the agent then."""
    from chiffon.agent.identity import IdentityError, write_private

    with connect(url) as client:
        agent_id = client.resolve_agent(agent)
        answer = client.post_json(f"/agents/{agent_id}/rotate")
    target = secret_file or local_secret_file(agent_id)
    if target is None:
        console.print(
            f"rotated the secret of {agent_id}; its old one is refused from now on. Put this "
            f"new secret in the agent's state directory as `agent_secret` (mode 0600), then "
            f"restart the agent:\n{answer['secret']}",
            highlight=False,
        )
        return
    try:
        write_private(target, answer["secret"])
    except OSError as exc:
        raise CliError(f"cannot write the new secret to {target}: {exc.strerror}") from None
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    console.print(
        f"rotated the secret of {agent_id}; the new one is in {target} (mode 0600) and the "
        "old one is refused from now on: restart the agent",
        highlight=False,
    )


@agents_app.command("revoke")
def revoke(
    agent: str = typer.Argument(..., help="The agent (id, id prefix or name)."),
    url: str = URL_OPTION,
) -> None:
    """Revoke an agent's secret and ban its id: its messages are refused and it cannot
    enroll again until `chiffon agents unban` (rotation: revoke, unban, restart it with the
    enrollment token)."""
    _act_on(
        url, agent, "/agents/{id}/credential",
        "revoked the credential of {id}: its messages are refused and it cannot enroll "
        "again until `chiffon agents unban {id}`",
    )  # fmt: skip


@agents_app.command("rm")
def remove(
    agent: str = typer.Argument(..., help="The agent (id, id prefix or name)."),
    url: str = URL_OPTION,
) -> None:
    """Remove an agent from the registry (its event history stays). An agent still running
    registers again at its next heartbeat: revoke it to keep it out."""
    _act_on(
        url, agent, "/agents/{id}",
        "removed {id} from the registry; if it still runs it comes back at its next "
        "heartbeat (`chiffon agents revoke {id}` keeps it out)",
    )  # fmt: skip


@agents_app.command("unban")
def unban(
    agent: str = typer.Argument(..., help="The revoked agent's id."),
    url: str = URL_OPTION,
) -> None:
    """Lift a revoked agent's ban, so that it may enroll again with the enrollment token."""
    _act_on(
        url, agent, "/agents/{id}/ban",
        "lifted the ban of {id}: it may enroll again (delete its agent_secret file and start "
        "it with the enrollment token)",
    )  # fmt: skip


def _none_listed(client: Client, status: str | None, pool: str | None) -> Text:
    """Why the list is empty: nothing registered, or nothing matching the filters."""
    if status is None and pool is None:
        return plain("no agents registered yet")
    if pool is not None and (unknown := _unknown_pool(client, pool)):
        return plain(unknown)
    what = " ".join(x for x in (status, "agents") if x)
    where = f" in pool {pool!r}" if pool else ""
    total = len(client.get_json("/agents"))
    return plain(f"no {what}{where} ({total} registered in all)")


def _unknown_pool(client: Client, pool: str) -> str | None:
    """A sentence naming the pools there are, when `pool` is not one of them."""
    pools = [p["pool_name"] for p in client.get_json("/fleet/summary")["pools"]]
    if pool in pools:
        return None
    return f"no agent is in pool {pool!r} (pools: {', '.join(pools) or 'none yet'})"


def _shortfall(bound: Bound, need: float, have: float | None) -> float:
    """How far `have` misses the bound, as a fraction of what was asked (1: unknown)."""
    if have is None:
        return 1.0
    miss = need - have if bound.op == "min" else have - need
    return max(0.0, miss) / max(abs(need), 1e-9)


def closest(rows: list[dict[str, Any]], wanted: dict[str, float]) -> str | None:
    """The online agent that misses the requirements by the least (the sum of each
    shortfall as a fraction of what was asked), said with what it lacks."""
    asked = [(m.name, b, wanted[b.param]) for m, b in BOUNDS if wanted.get(b.param) is not None]

    def shortfall(row: dict[str, Any]) -> float:
        return sum(_shortfall(bound, need, row.get(name)) for name, bound, need in asked)

    if not rows or not asked:
        return None
    best = min(rows, key=shortfall)
    lacks = [
        f"{bound.label} {_num(best.get(name))}{(' ' + bound.unit) if bound.unit else ''} "
        f"of {need:g} {'wanted' if bound.op == 'min' else 'at most'}"
        for name, bound, need in asked
        if _shortfall(bound, need, best.get(name)) > 0
    ]
    return f"closest: {best['name']} ({', '.join(lacks)})"


def _why_none(
    client: Client, pool: str | None, labels: list[str] | None, wanted: dict[str, float]
) -> str:
    if pool is not None and (unknown := _unknown_pool(client, pool)):
        return unknown
    candidates = client.get_json("/agents/available-capacity", pool_name=pool, label=labels)
    if labels and not candidates:
        return f"no online agent has the labels {', '.join(labels)}"
    near = closest(candidates, wanted)
    return "no online agent can take that work right now" + (f"; {near}" if near else "")


def with_bound_options(command: Callable[..., None]) -> Callable[..., None]:
    """One option per capacity bound a metric declares (schemas.metrics.BOUNDS), given to
    `command` in its `**bounds`, keyed by the API's query parameter."""
    signature = inspect.signature(command, eval_str=True)
    # All by keyword (as typer calls a command), the bounds after the command's arguments.
    kept = [
        p.replace(kind=p.KEYWORD_ONLY)
        for p in signature.parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    arguments = [p for p in kept if isinstance(p.default, typer.models.ArgumentInfo)]
    options = [
        inspect.Parameter(
            bound.param,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=metric.kind,
            default=typer.Option(
                None, bound.option, min=bound.low, max=bound.high, help=bound.help
            ),
        )
        for metric, bound in BOUNDS
    ]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*arguments, *options, *(p for p in kept if p not in arguments)]
    )
    return command


@with_bound_options
def capacity(
    agent: str = typer.Argument(None, help="One agent (id, id prefix or name)."),
    pool: str = typer.Option(None, help="Only this pool."),
    selector: list[str] = LABEL_OPTION,
    as_json: bool = JSON_OPTION,
    url: str = URL_OPTION,
    **bounds: float | None,
) -> None:
    """One agent's capacity, or the agents that can take the work, best first.

    Exit status 3 when no agent can take the work (so a script can wait on it), 2 for a
    usage error, 1 when the orchestrator cannot be asked.
    """
    with connect(url) as client:
        _capacity(client, agent, selector, pool, as_json, bounds)


def _capacity(
    client: Client,
    agent: str | None,
    selector: list[str] | None,
    pool: str | None,
    as_json: bool,
    bounds: dict[str, float | None],
) -> None:
    if agent is not None:
        one = client.get_json(f"/agents/{client.resolve_agent(agent)}/capacity")
        if as_json:
            _print_json(one)
        else:
            console.print(capacity_table([one]))
        return
    wanted = {name: value for name, value in bounds.items() if value is not None}
    labels = _selector(selector)
    rows = client.get_json("/agents/available-capacity", **wanted, pool_name=pool, label=labels)
    if as_json:
        _print_json(rows)
    elif rows:
        console.print(capacity_table(rows))
    else:
        console.print(plain(_why_none(client, pool, labels, wanted)))
    if not rows:
        raise typer.Exit(EXIT_NO_CAPACITY)


def events(
    agent: str = typer.Argument(None, help="One agent (id, id prefix or name)."),
    limit: int = typer.Option(50, min=1, max=10_000),
    as_json: bool = JSON_OPTION,
    url: str = URL_OPTION,
) -> None:
    """Status history, newest first: when agents went online or offline, and why."""
    with connect(url) as client:
        agent_id = None if agent is None else client.resolve_agent(agent)
        rows = client.get_json("/events", agent_id=agent_id, limit=limit)
        if as_json:
            _print_json(rows)
            return
        names = {a["agent_id"]: a["name"] for a in client.get_json("/agents")}
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WHEN", "AGENT", "FROM", "TO", "WHY"):
        table.add_column(column, no_wrap=True)
    now = datetime.now(UTC)
    for e in rows:
        when = datetime.fromisoformat(e["at"])
        table.add_row(
            f"{when:%Y-%m-%d %H:%M:%S} ({ago((now - when).total_seconds())})",
            plain(names.get(e["agent_id"], e["agent_id"][:8])),
            plain(e["from_status"] or "-"),
            plain(e["to_status"]),
            plain(e["reason"]),
        )
    console.print(table if rows else "no events")


def status(as_json: bool = JSON_OPTION, url: str = URL_OPTION) -> None:
    """The fleet at a glance, like `ray status`: agents, cores, GPUs and VRAM by pool."""
    with connect(url) as client:
        summary = client.get_json("/fleet/summary")
    if as_json:
        _print_json(summary)
        return
    fleet = summary["fleet"]
    console.print(
        plain(
            f"{fleet['agents_online']} online, {fleet['agents_offline']} offline; free: "
            f"{fleet['cpu_cores_available']}/{fleet['cpu_cores_physical']} cores, "
            f"{fleet['gpu_vram_available_gb']:.1f}/{fleet['gpu_vram_total_gb']:.1f} GB VRAM "
            f"on {fleet['gpu_count']} GPUs"
        )
    )
    stale = summary.get("registry_stale_seconds")
    if stale is not None:
        console.print(
            plain(f"warning: the registry has not been kept for {stale:.0f} s: statuses are stale"),
            style="bold red",
        )
    if summary["pools"]:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("POOL", "ONLINE", "OFFLINE", "FREE CORES", "GPUS", "FREE VRAM"):
            table.add_column(column, no_wrap=True)
        for p in summary["pools"]:
            table.add_row(
                plain(p["pool_name"]),
                str(p["agents_online"]),
                str(p["agents_offline"]),
                f"{p['cpu_cores_available']}/{p['cpu_cores_physical']}",
                str(p["gpu_count"]),
                f"{p['gpu_vram_available_gb']:.1f}/{p['gpu_vram_total_gb']:.1f} GB",
            )
        console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(agents_app, name="agents")
    app.command()(capacity)
    app.command()(events)
    app.command()(status)
