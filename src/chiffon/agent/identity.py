"""The agent's stable identity: a UUID created once and kept in the state directory.

The seeds made `{hostname}-{uuid[:8]}` on every start: neither a UUID nor stable. That
shape survives as the default human-readable name, built from the stable UUID.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import uuid
from pathlib import Path

ID_FILE = "agent_id"


class IdentityError(RuntimeError):
    """The state directory cannot give this agent an identity."""


def load_or_create_agent_id(state_dir: Path, explicit: uuid.UUID | None = None) -> uuid.UUID:
    """`explicit` (CHIFFON_AGENT_ID) if given, else the kept id, else a new one, kept."""
    if explicit is not None:
        return explicit
    path = state_dir / ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return _create(path)
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise IdentityError(
            f"{path} does not hold a UUID ({text[:40]!r}); delete it to get a new identity"
        ) from None


def _create(path: Path) -> uuid.UUID:
    agent_id = uuid.uuid4()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Write-then-rename: a crash never leaves a half-written identity behind.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".agent_id.")
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{agent_id}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise IdentityError(f"cannot keep the agent id in {path}: {exc.strerror}") from None
    return agent_id


def default_name(agent_id: uuid.UUID, hostname: str | None = None) -> str:
    """The seeds' `{hostname}-{uuid[:8]}`, now stable because the UUID is."""
    host = (hostname or socket.gethostname() or "desktop").split(".")[0]
    return f"{host}-{str(agent_id)[:8]}"[:255]


SECRET_FILE = "agent_secret"


def load_secret(state_dir: Path) -> str | None:
    """The secret this agent got at enrollment, or None before it enrolled."""
    path = state_dir / SECRET_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    return text or None


def store_secret(state_dir: Path, secret: str) -> Path:
    """Keep the secret readable only by this user (mode 0600), written then renamed."""
    path = state_dir / SECRET_FILE
    try:
        write_private(path, secret)
    except OSError as exc:
        raise IdentityError(f"cannot keep the agent secret in {path}: {exc.strerror}") from None
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{text}\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
