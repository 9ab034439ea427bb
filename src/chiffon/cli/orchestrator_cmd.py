"""`chiffon orchestrator` and `chiffon db upgrade`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError

from chiffon.cli.common import (
    CliError,
    console,
    describe_settings_error,
    one_line,
    setup_logging,
)

if TYPE_CHECKING:
    from chiffon.orchestrator.service import Orchestrator
    from chiffon.orchestrator.settings import OrchestratorSettings

# The server side (FastAPI, SQLAlchemy, Alembic) is imported inside the commands that use
# it, so `chiffon agents` or `chiffon --help` start in a fraction of a second.

db_app = typer.Typer(help="Manage the registry database.", no_args_is_help=True)


def build_settings(**flags: object) -> OrchestratorSettings:
    """Environment (`CHIFFON_*`) overridden by the flags that were given."""
    from chiffon.orchestrator.settings import OrchestratorSettings

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return OrchestratorSettings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise CliError(describe_settings_error(exc), code=2) from None


def bind(host: str, port: int) -> socket.socket:
    """Bind the API socket ourselves, so a port in use is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def serve(orchestrator: Orchestrator, sock: socket.socket, *, log_level: str) -> None:
    """Run the API until SIGINT/SIGTERM; the orchestrator is started and stopped here."""
    import uvicorn
    from sqlalchemy.exc import DBAPIError

    from chiffon.api.app import create_app
    from chiffon.persistence.db import SchemaBehindError

    try:
        await orchestrator.start()
    except SchemaBehindError as exc:
        await orchestrator.engine.dispose()
        raise CliError(str(exc)) from None
    except (OSError, DBAPIError) as exc:
        await orchestrator.engine.dispose()
        raise CliError(f"cannot reach the registry database: {one_line(exc)}") from None
    config = uvicorn.Config(
        create_app(orchestrator, manage_lifecycle=False), log_level=log_level, access_log=False
    )
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        await orchestrator.stop()


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")

    @app.command()
    def orchestrator(
        host: str = typer.Option(None, help="Address to serve the API on [127.0.0.1]."),
        port: int = typer.Option(None, help="Port to serve the API on [8700]."),
        database_url: str = typer.Option(
            None, help="sqlite:///path or postgresql://...; env CHIFFON_DATABASE_URL."
        ),
        amqp_url: str = typer.Option(None, help="Consume heartbeats from RabbitMQ here."),
        data_dir: Path = typer.Option(None, help="Where the SQLite registry lives [~/.chiffon]."),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
    ) -> None:
        """Run the registry: REST API, heartbeat ingest and the offline sweep."""
        from chiffon.orchestrator.service import Orchestrator
        from chiffon.persistence import db

        setup_logging(verbose)
        settings = build_settings(
            host=host, port=port, database_url=database_url, amqp_url=amqp_url, data_dir=data_dir
        )
        sock = bind(settings.host, settings.port)
        where = db.async_url(settings.effective_database_url).render_as_string()
        console.print(
            f"Chiffon orchestrator on http://{settings.host}:{settings.port} "
            f"(docs at /docs), registry {where}"
        )
        asyncio.run(
            serve(Orchestrator(settings), sock, log_level="debug" if verbose else "warning")
        )

    @db_app.command("upgrade")
    def upgrade(
        database_url: str = typer.Option(None, help="Default: env CHIFFON_DATABASE_URL or SQLite."),
        data_dir: Path = typer.Option(None, help="Where the SQLite registry lives [~/.chiffon]."),
    ) -> None:
        """Create or migrate the registry schema to this version."""
        from sqlalchemy.exc import DBAPIError

        from chiffon.persistence import db

        settings = build_settings(database_url=database_url, data_dir=data_dir)
        url = settings.effective_database_url
        try:
            db.upgrade(url)
        except (OSError, DBAPIError) as exc:
            raise CliError(f"cannot reach the registry database: {one_line(exc)}") from None
        console.print(
            f"registry schema is at {db.head_revision()}: {db.async_url(url).render_as_string()}"
        )
