"""Security headers for the dashboard's pages: no framing, no foreign scripts.

A pure ASGI wrapper (no `BaseHTTPMiddleware`, which costs every request a task and a
queue): it adds headers to the start of each response outside the API, whose JSON needs
none, and outside FastAPI's `/docs`, whose Swagger UI loads from elsewhere.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DASHBOARD_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_EXEMPT = ("/api/", "/docs", "/redoc", "/openapi.json")


class DashboardHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_EXEMPT):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *DASHBOARD_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
