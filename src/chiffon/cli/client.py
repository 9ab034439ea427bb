"""A small client of the orchestrator's REST API, for the read commands."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from chiffon.cli.common import EXIT_USAGE, CliError

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


class ApiClient:
    def __init__(self, base_url: str, *, timeout_seconds: float = 5.0) -> None:
        self.base_url = base_url
        token = api_token()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout_seconds, headers=headers)

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self._check(lambda: self._http.get(f"/api/v1{path}", params=query))

    def delete(self, path: str) -> None:
        self._check(lambda: self._http.delete(f"/api/v1{path}"))

    def _check(self, send: Callable[[], httpx.Response]) -> Any:
        try:
            resp = send()
        except httpx.HTTPError as exc:
            raise CliError(
                f"cannot reach the orchestrator at {self.base_url} ({type(exc).__name__}); "
                "is it running? (set CHIFFON_ORCHESTRATOR_URL or --orchestrator-url)"
            ) from None
        if resp.status_code == 401:
            raise CliError(
                f"{_detail(resp)} (HTTP 401): set CHIFFON_API_TOKEN to the orchestrator's API "
                "token (`chiffon up` keeps it in ~/.chiffon/api_token)"
            )
        if resp.status_code >= 400:
            # A request the orchestrator found wrong is the user's to fix (usage); a 5xx
            # is the orchestrator's failure.
            code = EXIT_USAGE if resp.status_code < 500 else 1
            raise CliError(f"{_detail(resp)} (HTTP {resp.status_code})", code=code)
        return resp.json() if resp.content else None

    def resolve(self, ref: str) -> str:
        """An agent id from a UUID, a unique id prefix (as `chiffon agents` shows) or a name."""
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        agents = self.get("/agents")
        hits = [a for a in agents if a["agent_id"].startswith(ref.lower()) or a["name"] == ref]
        if len(hits) == 1:
            return str(hits[0]["agent_id"])
        if not hits:
            raise CliError(f"no agent has the id, id prefix or name {ref!r}", code=EXIT_USAGE)
        raise CliError(f"{ref!r} matches {len(hits)} agents; give more of the id", code=EXIT_USAGE)


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else resp.reason_phrase
