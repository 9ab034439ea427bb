"""A method a path does not take is a 405 naming the ones it does (`Allow`), for the whole
path: FastAPI makes one route per method, so a 405 used to list only the first route's
methods (`OPTIONS /agents/{id}` said `GET, HEAD`, hiding `DELETE`), and a method no API route
takes fell through to the dashboard's files as a 404 (`GET /api/v1/enroll`).

A pure ASGI wrapper that acts only on a 404 or 405 (nothing is added to other requests):
when routes of the API match the path with other methods, the answer becomes a 405 with
their methods in `Allow`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class MethodNotAllowed:
    """`openapi()`: the app's OpenAPI document, whose paths say which methods each takes."""

    def __init__(self, app: ASGIApp, *, openapi: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self._openapi = openapi
        self._paths: list[tuple[re.Pattern[str], set[str]]] = []
        self._literal: dict[str, set[str]] = {}
        self._built = False

    def _build(self) -> None:
        for template, operations in self._openapi()["paths"].items():
            methods = {m.upper() for m in operations}
            self._paths.append((compile_path(template)[0], methods))
            if "{" not in template:
                self._literal[template] = methods
        self._built = True

    def allowed(self, path: str) -> set[str]:
        """Every documented method of the paths that match (the dashboard's files aside)."""
        methods: set[str] = set()
        for regex, documented in self._paths:
            if regex.match(path):
                methods |= documented
        return methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._built:
            self._build()
        # A path of its own (`/agents/available-capacity`) is not `/agents/{agent_id}` with
        # another method: a DELETE there is a 405, not "not a UUID".
        literal = self._literal.get(scope["path"])
        if literal is not None and scope["method"] not in literal:
            await _method_not_allowed(send, scope["method"], sorted(literal))
            return
        replaced = False

        async def answer(message: Message) -> None:
            nonlocal replaced
            if replaced:  # the app's own body for the answer we replaced
                return
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                allowed = self.allowed(scope["path"])
                if allowed and scope["method"] not in allowed:
                    replaced = True
                    await _method_not_allowed(send, scope["method"], sorted(allowed))
                    return
            await send(message)

        await self.app(scope, receive, answer)


async def _method_not_allowed(send: Send, method: str, allowed: list[str]) -> None:
    body = json.dumps({"detail": f"{method} is not allowed here; allowed: {', '.join(allowed)}"})
    await send(
        {
            "type": "http.response.start",
            "status": 405,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"allow", ", ".join(allowed).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
