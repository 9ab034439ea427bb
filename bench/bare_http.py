"""The least a Python HTTP server pays per heartbeat: uvicorn, as `chiffon orchestrator`
runs it, with an ASGI app that reads each request's body and answers 200. The reference
beside the orchestrator in `bench/steady_cpu.py --transport http`; `GET /count` says how
many requests it has answered.

    .venv/bin/python -m uvicorn bench.bare_http:app --lifespan off --port PORT
"""

from __future__ import annotations

from typing import Any

answered = 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global answered
    more = True
    while more:
        event = await receive()
        more = event.get("more_body", False)
    if scope["path"] == "/count":
        body = str(answered).encode()
    else:
        answered += 1
        body = b"{}"
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
