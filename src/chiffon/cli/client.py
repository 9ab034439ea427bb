"""Where the commands find the orchestrator and its token, and the one client they use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from chiffon.cli.common import EXIT_FAILED, EXIT_USAGE, CliError

if TYPE_CHECKING:  # imported on use: httpx stays out of the agent's process
    from chiffon.client import ChiffonError, Client

DEFAULT_ORCHESTRATOR_URL = "http://127.0.0.1:8700"


def orchestrator_url(flag: str | None) -> str:
    """The orchestrator's base URL; a usage error when it does not say http:// or https://
    (a bare `127.0.0.1:8700` used to be blamed on the connection)."""
    url = flag or os.environ.get("CHIFFON_ORCHESTRATOR_URL") or DEFAULT_ORCHESTRATOR_URL
    if not url.startswith(("http://", "https://")):
        where = "--orchestrator-url" if flag else "CHIFFON_ORCHESTRATOR_URL"
        raise CliError(
            f"{where} must start with http:// or https://, not {url!r} "
            f"(did you mean http://{url}?)",
            code=EXIT_USAGE,
        )
    return url.rstrip("/")


def data_dir() -> Path:
    """Where `chiffon up` and the orchestrator keep their files (CHIFFON_DATA_DIR)."""
    return Path(os.environ.get("CHIFFON_DATA_DIR") or Path.home() / ".chiffon").expanduser()


def local_secret(env_var: str, file_name: str) -> str | None:
    """The environment variable, else the file the orchestrator wrote (data dir, 0600)."""
    value = os.environ.get(env_var)
    if value:
        return value
    try:
        return (data_dir() / file_name).read_text().strip() or None
    except OSError:
        return None


def api_token() -> str | None:
    """CHIFFON_API_TOKEN, else CHIFFON_READ_TOKEN (the read commands need no more), else
    the token file `chiffon up` writes."""
    from chiffon.client import default_token

    return default_token(data_dir())


@contextmanager
def connect(url: str | None) -> Iterator[Client]:
    """The one HTTP client of every command (`chiffon.client.Client`), whose errors are one
    line: a refusal the user can fix (a 4xx, an unknown agent or job) is a usage error
    (exit 2); an unreachable or failing orchestrator exit 1."""
    from chiffon.client import ChiffonError, Client, LookupFailed

    c = Client(orchestrator_url(url), token=api_token())
    try:
        yield c
    except LookupFailed as exc:
        raise CliError(exc.detail, code=EXIT_USAGE) from None
    except ChiffonError as exc:
        raise cli_error(exc) from None
    finally:
        c.close()


def cli_error(exc: ChiffonError) -> CliError:
    if exc.status is None:
        return CliError(f"{exc} (set CHIFFON_ORCHESTRATOR_URL or --orchestrator-url)")
    if exc.status == 401:
        return CliError(
            f"{exc}: set CHIFFON_API_TOKEN to the orchestrator's API token "
            "(`chiffon up` keeps it in ~/.chiffon/api_token)"
        )
    # A request the orchestrator found wrong is the user's to fix (usage); a 5xx is the
    # orchestrator's failure.
    return CliError(str(exc), code=EXIT_USAGE if exc.status < 500 else EXIT_FAILED)
