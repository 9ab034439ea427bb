"""`chiffon up`: the five-minute start, like `nomad agent -dev`.

One process: an orchestrator on the embedded SQLite registry (migrated on the spot), its
REST API with the HTTP heartbeat path, and this machine's own agent, which hands its
heartbeats straight to the orchestrator's ingest (the in-memory transport: same bytes, same
validation, same commit). No broker, no database server.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import IO, TYPE_CHECKING

import typer
from rich.text import Text

from chiffon.cli.common import DEBUG_HELP, CliError, console, one_line, setup_logging
from chiffon.schemas.limits import clean_text

if TYPE_CHECKING:
    from chiffon.agent.daemon import Daemon
    from chiffon.agent.loop import AgentIdentity
    from chiffon.agent.probes.collect import Collector
    from chiffon.agent.settings import AgentSettings
    from chiffon.orchestrator.service import Orchestrator
    from chiffon.transport.auth import AgentCredential

STOP_TIMEOUT_SECONDS = 3.0


class LocalAgent:
    """This machine's agent, running inside the orchestrator's process (`agent.daemon`,
    on the in-memory transport)."""

    def __init__(self, settings: AgentSettings, identity: AgentIdentity, collector: Collector):
        self._settings = settings
        self._identity = identity
        self._collector = collector
        self._daemon: Daemon | None = None

    async def start(self, orchestrator: Orchestrator) -> None:
        from chiffon.agent.daemon import Daemon, polled
        from chiffon.transport.memory import InMemoryPublisher, InMemoryWork

        credential = await self._credential(orchestrator)
        publisher = InMemoryPublisher(orchestrator.ingest, credential=credential)
        channel = InMemoryWork(orchestrator, credential.agent_id, store=orchestrator.store)
        self._daemon = Daemon(self._settings, self._identity, credential, publisher=publisher,
                              channel=channel, collector=self._collector,
                              orders=polled(channel))  # fmt: skip
        self._daemon.start()

    async def _credential(self, orchestrator: Orchestrator) -> AgentCredential:
        """This machine's agent is the orchestrator's own: it keeps its secret in the data
        directory like any agent and uses it again at the next start. Only when it has none
        that the registry accepts is a new one issued in process (no enrollment token), and
        that is said, never done silently."""
        from chiffon.agent.identity import load_secret, store_secret
        from chiffon.schemas.limits import RejectedMessage
        from chiffon.transport.auth import AgentCredential

        agent_id = self._identity.agent_id
        kept = load_secret(self._settings.state_dir)
        if kept is not None:
            try:
                await orchestrator.credentials.check_bearer(agent_id, kept)
                return AgentCredential(agent_id, kept)
            except RejectedMessage as exc:
                why = exc.reason
        else:
            why = "none kept yet"
        credential = await orchestrator.credentials.replace(agent_id)
        path = store_secret(self._settings.state_dir, credential.secret)
        console.print(
            f"issued this machine's agent a new credential ({why}); kept in {path}",
            highlight=False,
        )
        return credential

    async def stop(self) -> None:
        """Say goodbye (the orchestrator marks this machine offline at once), then stop."""
        if self._daemon is not None:
            await self._daemon.stop(goodbye_timeout_seconds=STOP_TIMEOUT_SECONDS)


def _join_hint(host: str, port: int, enroll_token: str) -> str:
    if host in ("127.0.0.1", "localhost", "::1"):
        return (
            "Other desktops cannot reach 127.0.0.1: restart with --host 0.0.0.0 and an API "
            "token (CHIFFON_API_TOKEN), then on each of them run:\n  "
            f"CHIFFON_ENROLL_TOKEN={enroll_token} chiffon agent "
            f"--orchestrator-url http://{socket.gethostname()}:{port} --transport http\n"
            "then approve each here: chiffon agents approve <its name>"
        )
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return (
        f"To add another desktop, run there:\n  CHIFFON_ENROLL_TOKEN={enroll_token} chiffon "
        f"agent --orchestrator-url http://{shown}:{port} --transport http\nthen approve it "
        "here: chiffon agents approve <its name>"
    )


def _migrate(url: str) -> None:
    from sqlalchemy.exc import DBAPIError

    from chiffon.persistence import db

    try:
        db.upgrade(url)
    except (OSError, DBAPIError) as exc:
        raise CliError(f"cannot open the registry {url}: {one_line(exc)}") from None


def up(
    host: str = typer.Option("127.0.0.1", help="Address to serve the API on."),
    port: int = typer.Option(8700, min=1, max=65535, help="Port to serve the API on."),
    data_dir: Path = typer.Option(
        None, help="Registry and agent identity live here [~/.chiffon]; env CHIFFON_DATA_DIR."
    ),
    accept_jobs: bool = typer.Option(
        True,
        "--accept-jobs/--no-accept-jobs",
        help="Run jobs submitted with the API token on this machine, as this user.",
    ),
    allow_root_jobs: bool = typer.Option(
        False,
        "--allow-root-jobs",
        help="Run jobs when started as root, as the unprivileged user chiffon-job (without "
        "it, a root `up` runs no job).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Start everything on this machine: orchestrator, API, dashboard and its own agent."""
    from chiffon.agent.daemon import decided, new_collector
    from chiffon.cli.agent_cmd import identity_of, job_user, load, resources_table
    from chiffon.cli.orchestrator_cmd import bind, build_settings, serve
    from chiffon.cli.secrets import resolve_secrets
    from chiffon.orchestrator.service import Orchestrator
    from chiffon.persistence import db

    setup_logging(verbose, debug=debug or None)
    settings = build_settings(host=host, port=port, data_dir=data_dir)
    lock = lock_data_dir(settings.data_dir)  # held until this process exits
    # Embedded on purpose: `up` needs no database server, whatever the environment says.
    url = db.default_database_url(settings.data_dir)
    settings = settings.model_copy(update={"database_url": url, "amqp_url": None})
    settings = resolve_secrets(settings).settings
    assert settings.api_token is not None and settings.enroll_token is not None
    agent_settings = load(
        None,
        {"state_dir": settings.data_dir, "accept_jobs": accept_jobs,
         "allow_root_jobs": allow_root_jobs or None},
    ).settings  # fmt: skip
    sock = bind(settings.host, settings.port)
    _migrate(url)
    identity = identity_of(agent_settings)
    collector = new_collector(agent_settings)
    snapshot = decided(agent_settings, collector.collect())  # "New jobs": as its agent says
    api = f"http://{settings.host}:{settings.port}"
    token = settings.api_token.get_secret_value()
    # The token rides in the fragment, which the browser never sends; the page keeps it in
    # sessionStorage and removes it from the address bar.
    console.print(
        f"[bold]Chiffon is up[/]: dashboard {api}/#token={token}  API docs {api}/docs",
        highlight=False,
    )
    console.print(
        f"registry: {settings.data_dir / 'chiffon.db'}  API token: "
        f"{settings.data_dir / 'api_token'} (the CLI reads it)",
        highlight=False,
    )
    console.print(
        Text.assemble(
            "\nThis machine, ", (clean_text(identity.name), "bold"), f" ({identity.agent_id}):"
        )
    )
    console.print(resources_table(snapshot))
    if identity.accepts_jobs:
        console.print(
            f"It runs jobs (chiffon run), as {job_user(agent_settings)}, each in its sandbox, "
            f"in {agent_settings.effective_jobs_dir}; --no-accept-jobs turns that off.",
            highlight=False,
        )
    elif agent_settings.accept_jobs != "never":
        console.print(
            "It does not run jobs: it was started as root. To run them as root, restart it "
            "with `chiffon up --allow-root-jobs`; or start it as another user.",
            highlight=False,
        )
    hint = _join_hint(settings.host, settings.port, settings.enroll_token.get_secret_value())
    console.print(f"\n{hint}", highlight=False)
    console.print("See the fleet: chiffon agents   Stop: Ctrl-C\n")
    asyncio.run(
        serve(
            Orchestrator(settings),
            sock,
            log_level="debug" if verbose else "warning",
            companions=[LocalAgent(agent_settings, identity, collector)],
        )
    )
    lock.close()


def lock_data_dir(data_dir: Path) -> IO[str]:
    """One `chiffon up` per data directory. A second one gave the shared local agent a new
    credential, which cancelled the first one's (its beats were refused forever), and said
    goodbye for it on exit. The lock is the kernel's (flock): it ends with the process, even
    one killed with SIGKILL."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / "up.lock"
    handle = path.open("a+")
    try:
        import fcntl
    except ImportError:  # not POSIX (untested there): no lock, and say so
        console.print(f"warning: cannot lock {data_dir} on this platform", highlight=False)
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CliError(
            f"another `chiffon up` (pid {holder}) is running on {data_dir}; stop it first, "
            "or give this one its own --data-dir",
            code=1,
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def register(app: typer.Typer) -> None:
    app.command()(up)
