"""`chiffon orchestrator` and `chiffon db upgrade`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import typer

from chiffon.cli.common import (
    CliError,
    console,
    describe_settings_error,
    one_line,
    setup_logging,
)

if TYPE_CHECKING:
    import uvicorn

    from chiffon.cli.secrets import Resolved
    from chiffon.orchestrator.service import Orchestrator
    from chiffon.orchestrator.settings import OrchestratorSettings

# The server side (FastAPI, SQLAlchemy, Alembic) is imported inside the commands that use
# it, so `chiffon agents` or `chiffon --help` start in a fraction of a second.

# The garbage collector's young generation, raised from 700 allocations: at the default,
# objects alive for a millisecond (a scheduler batch's rows) were promoted to the old
# generation, whose full collections then ran every few seconds at 150-420 ms each, the
# event loop (the API, ingest) stopped meanwhile (bench/dispatch_load.py).
GC_THRESHOLDS = (50_000, 10, 10)

db_app = typer.Typer(help="Manage the registry database.", no_args_is_help=True)


def build_settings(**flags: object) -> OrchestratorSettings:
    """Environment (`CHIFFON_*`) overridden by the flags that were given."""
    from pydantic import ValidationError

    from chiffon.orchestrator.settings import OrchestratorSettings

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return OrchestratorSettings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        env_names = OrchestratorSettings.env_names()
        raise CliError(describe_settings_error(exc, given, env_names), code=2) from None


def bind(host: str, port: int) -> socket.socket:
    """Bind the API socket ourselves, so a port in use is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every response waited out the client's delayed ACK (40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class Companion(Protocol):
    """Something that runs beside the orchestrator in its process (`chiffon up`'s agent)."""

    async def start(self, orchestrator: Orchestrator) -> None: ...

    async def stop(self) -> None: ...


async def serve(
    orchestrator: Orchestrator,
    sock: socket.socket,
    *,
    log_level: str,
    companions: Sequence[Companion] = (),
) -> None:
    """Run the orchestrator (its receivers and loops) and its API until SIGINT/SIGTERM.

    Shutdown order: the API stops, companions stop (an in-process agent says goodbye while
    ingest still runs), then the orchestrator: its receivers stop taking messages and ack
    those whose batch commits, then it flushes and closes the database.
    """
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
    app = create_app(orchestrator, manage_lifecycle=False)
    # log_config=None: uvicorn's errors go through our logging (one line a failure outside
    # --debug: cli.common.setup_logging), not through handlers of its own.
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, http=_request_deadline_protocol(),
        log_config=None,
    )  # fmt: skip
    started: list[Companion] = []
    try:
        for companion in companions:
            await companion.start(orchestrator)
            started.append(companion)
        # What is alive now (the imported modules: about 140,000 objects) lives as long
        # as the process: kept out of the garbage collector's full collections, each of
        # which stops the event loop (the API, ingest) for as long as it takes.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        await _server_class(orchestrator.begin_stop)(config).serve(sockets=[sock])
    finally:
        for companion in reversed(started):
            await companion.stop()
        await orchestrator.stop()


def print_secrets(resolved: Resolved) -> None:
    """Where each secret came from; the enrollment token itself only when just generated."""
    settings = resolved.settings
    for created in resolved.generated:
        console.print(f"generated {created} (mode 0600)", highlight=False)
    token_file = str(settings.data_dir / "enroll_token")
    if token_file in resolved.generated and settings.enroll_token is not None:
        console.print(
            f"enrollment token (give it to new agents once): "
            f"{settings.enroll_token.get_secret_value()}",
            highlight=False,
        )
    elif Path(token_file).is_file():  # every start says where it is, not only the first
        console.print(
            f"enrollment token: in {token_file} (new agents read it with "
            "CHIFFON_ENROLL_TOKEN_FILE, or CHIFFON_ENROLL_TOKEN)",
            highlight=False,
        )


def _request_deadline_protocol() -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head
    within `timeout_keep_alive` (5 s) of opening, or of its last response. uvicorn's own
    keep-alive timer starts only after a response and stops at the first byte, so 1,000
    sockets that never sent a request (or trickled one byte at a time) were held for as long
    as their client wanted."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            waiting_after = self.cycle  # a new request replaces it
            self._deadline = self.loop.call_later(
                self.timeout_keep_alive, self._expire, waiting_after
            )

        def _expire(self, waiting_after: object) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return RequestDeadline


def _server_class(stopping: Callable[[], None]) -> type[uvicorn.Server]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM once it has stopped, which kills the process
        before our own shutdown (consumer drain, last batch) can run; handle it instead.
        `stopping` is told first: the long-polls end, the sweep stops judging."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            stopping()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return Server


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")

    @app.command()
    def orchestrator(
        host: str = typer.Option(None, help="Address to serve the API on [127.0.0.1]."),
        port: int = typer.Option(None, help="Port to serve the API on [8700]."),
        database_url: str = typer.Option(
            None, help="sqlite:///path or postgresql://...; env CHIFFON_DATABASE_URL."
        ),
        amqp_url: str = typer.Option(
            None, help="Also consume heartbeats from RabbitMQ (amqp://...); env CHIFFON_AMQP_URL."
        ),
        data_dir: Path = typer.Option(None, help="Where the SQLite registry lives [~/.chiffon]."),
        dispatch: bool = typer.Option(
            None,
            "--dispatch/--no-dispatch",
            help="Place queued jobs [on]; off: serve the API and ingest only, beside "
            "orchestrators that place. Env CHIFFON_DISPATCH.",
            show_default=False,
        ),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
    ) -> None:
        """Run the registry: REST API, heartbeat ingest, the offline sweep and the
        scheduler."""
        from chiffon.cli.secrets import resolve_secrets
        from chiffon.orchestrator.service import Orchestrator
        from chiffon.persistence import db

        setup_logging(verbose)
        settings = build_settings(
            host=host, port=port, database_url=database_url, amqp_url=amqp_url,
            data_dir=data_dir, dispatch=dispatch,
        )  # fmt: skip
        sock = bind(settings.host, settings.port)  # before any secret is generated
        resolved = resolve_secrets(settings)
        settings = resolved.settings
        where = db.async_url(settings.effective_database_url).render_as_string()
        console.print(
            f"Chiffon orchestrator on http://{settings.host}:{settings.port} "
            f"(docs at /docs), registry {where}"
        )
        if settings.amqp_url:
            broker = urlsplit(settings.amqp_url)
            console.print(f"consuming {settings.amqp_queue} from {broker.hostname}:{broker.port}")
        if not settings.dispatch:
            console.print(
                "placing no jobs (--no-dispatch): other orchestrators on this registry do"
            )
            if not where.startswith("postgresql"):
                console.print(
                    "note: on SQLite, jobs submitted here are placed only by an orchestrator "
                    "that places on this same file, at its next tick (SQLite has no notices)"
                )
        print_secrets(resolved)
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
