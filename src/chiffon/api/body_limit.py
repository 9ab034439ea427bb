"""Request bodies are bounded before anything reads them, on every route.

A pure ASGI middleware: a declared `Content-Length` over the limit is answered 413 without
reading a byte; a body without one (chunked) is counted as it arrives and refused the
moment it passes the limit. Four unauthenticated 256 MB POSTs once took the orchestrator
to about 2 GB; now no request holds more than the limit in memory.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """413 for a request body over `max_bytes`; `on_refused()` counts each refusal."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        on_refused: Callable[[], None],
        limit_for: Callable[[Scope], int | None] = lambda _: None,
    ) -> None:
        """`limit_for(scope)`: a route's own limit (None: `max_bytes`; 0: the route reads
        its body as a stream, after checking the caller, and bounds it itself, as a blob's
        upload is bounded by the file store's cap)."""
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        own = self.limit_for(scope)
        if own == 0:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes if own is None else own
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            self.on_refused()
            detail = f"body is {declared} bytes, limit {limit}"
            await JSONResponse({"detail": detail}, 413)(scope, receive, send)
            return
        await self.app(scope, self._counting(receive, limit), send)

    def _counting(self, receive: Receive, limit: int) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    self.on_refused()
                    # Raised inside the route's read: FastAPI passes an HTTPException on,
                    # and the app's exception middleware answers it.
                    raise HTTPException(413, f"body is over the limit of {limit} bytes")
            return message

        return counted


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
