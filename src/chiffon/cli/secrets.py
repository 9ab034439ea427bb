"""The orchestrator's own secrets: from the environment, else generated once into its data
directory (mode 0600). docs/security.md describes each."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from chiffon.agent.identity import write_private
from chiffon.cli.common import CliError

if TYPE_CHECKING:
    from chiffon.orchestrator.settings import OrchestratorSettings

API_TOKEN_FILE = "api_token"
ENROLL_TOKEN_FILE = "enroll_token"
SECRET_KEY_FILE = "secret_key"


@dataclass(frozen=True)
class Resolved:
    settings: OrchestratorSettings
    generated: list[str]  # files created on this start


def read_or_create(path: Path, generated: list[str]) -> SecretStr:
    """The secret in `path`, or a new random one written there (0600)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if not text:
        text = secrets.token_urlsafe(32)
        try:
            write_private(path, text)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror}") from None
        generated.append(str(path))
    return SecretStr(text)


def resolve_secrets(settings: OrchestratorSettings) -> Resolved:
    """Fill the API token, enrollment token and server key that the environment left unset.

    A generated API token is for loopback only: an orchestrator that listens on the network
    without a CHIFFON_API_TOKEN chosen by its operator refuses to start.
    """
    if settings.api_token is None and not settings.is_loopback:
        raise CliError(
            f"refusing to serve the API on {settings.host} without an API token: anyone on "
            "the network could read and change the registry (see Ray's CVE-2023-48022). "
            "Set CHIFFON_API_TOKEN to a long random string (e.g. `openssl rand -hex 32`), "
            "or listen on 127.0.0.1",
            code=2,
        )
    generated: list[str] = []
    data = settings.data_dir
    update = {
        "api_token": settings.api_token or read_or_create(data / API_TOKEN_FILE, generated),
        "enroll_token": settings.enroll_token
        or read_or_create(data / ENROLL_TOKEN_FILE, generated),
        "secret_key": settings.secret_key or read_or_create(data / SECRET_KEY_FILE, generated),
    }
    return Resolved(settings.model_copy(update=update), generated)
