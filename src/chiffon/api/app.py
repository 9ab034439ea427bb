"""`create_app()`: the REST API around one `Orchestrator`."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import ClientDisconnect

from chiffon import __version__
from chiffon.api import (
    routes_agents,
    routes_files,
    routes_fleet,
    routes_ingest,
    routes_jobs,
    routes_tokens,
    routes_work,
)
from chiffon.api.auth import ApiTokenDep
from chiffon.api.body_limit import BodyLimit
from chiffon.api.headers import DashboardHeaders
from chiffon.api.methods import MethodNotAllowed
from chiffon.dashboard import STATIC_DIR
from chiffon.orchestrator.fleet_metrics import exposition, read_fleet
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas import dispatch

# The dashboard reads the states' groupings from here (`/dispatch.js`, before app.js).
DISPATCH_JS = (
    "// Made from chiffon.schemas.dispatch: which job states are active, out, over.\n"
    "const DISPATCH = Object.freeze("
    + json.dumps({"states": list(dispatch.JOB_STATES), "active": list(dispatch.ACTIVE),
                  "out": list(dispatch.OUT), "terminal": sorted(dispatch.TERMINAL)})
    + ");\n"
)  # fmt: skip
SWAGGER = "/vendor/swagger-ui"  # swagger-ui-dist, vendored under the dashboard's files


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "request"
    body = first.get("loc", ("",))[0] == "body"
    return JSONResponse(
        {"detail": f"{where}: {first.get('msg')}"}, status_code=422 if body else 400
    )


def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": f"registry database unavailable: {type(exc).__name__}"}, status_code=503
    )


def _client_gone(_request: Request, _exc: Exception) -> Response:
    """The client left before its body was read (it timed out waiting): nothing to say,
    and nothing to log."""
    return Response(status_code=400)


def _database_refused_value(_request: Request, exc: Exception) -> JSONResponse:
    """A value in the request the database cannot compare or store (a NUL in a filter):
    the client's mistake, not an outage."""
    first = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
    return JSONResponse({"detail": f"a value in the request was refused: {first}"}, 400)


def _operation_id(route: APIRoute) -> str:
    return route.name


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies the ingest routes read themselves, so
    every `$ref` resolves (the heartbeat's `#/$defs/GpuInfo` did not)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            routes_ingest.REQUEST_SCHEMAS
        )
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    orchestrator: Orchestrator,
    *,
    manage_lifecycle: bool = True,
) -> FastAPI:
    """The API. With `manage_lifecycle`, the app starts and stops the orchestrator."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await orchestrator.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await orchestrator.stop()

    app = FastAPI(
        title="Chiffon",
        version=__version__,
        summary="A capacity-aware registry of GPU desktops.",
        lifespan=lifespan,
        docs_url=None,  # served below from the package: FastAPI's loads Swagger UI from a CDN
        redoc_url=None,
        # operationId = the route's name (`list_agents`, `heartbeat`): what generated clients
        # call their functions, instead of `list_agents_api_v1_agents_get`
        generate_unique_id_function=_operation_id,
    )
    app.state.orchestrator = orchestrator
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    app.add_middleware(MethodNotAllowed, openapi=app.openapi)
    app.add_middleware(DashboardHeaders)
    app.add_middleware(
        BodyLimit,
        max_bytes=orchestrator.settings.max_message_bytes,
        on_refused=lambda: orchestrator.reject("too_large"),
        limit_for=routes_files.body_limit,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DataError, _database_refused_value)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(DBAPIError, _database_down)
    app.add_exception_handler(OSError, _database_down)
    # every connection of the pool busy for its whole timeout: the database is overloaded
    app.add_exception_handler(PoolTimeoutError, _database_down)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.include_router(routes_agents.router)
    app.include_router(routes_ingest.router)
    app.include_router(routes_fleet.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_work.router)
    app.include_router(routes_files.router)
    app.include_router(routes_files.agent_router)
    app.include_router(routes_tokens.router)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI from the package's own files, so the API docs work offline."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Chiffon API",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Ready when it can hear and can write: the database answers, the last ingest
        write committed, the offline sweep keeps up, and every receiver (RabbitMQ, when
        configured) hears its agents. 503 otherwise, with each check's state."""
        checks = await orchestrator.readiness()
        ready = all(v in ("ok", "hearing") for v in checks.values())
        body = {"status": "ready" if ready else "unavailable", "checks": checks}
        return JSONResponse(body, 200 if ready else 503)

    metrics_auth = [ApiTokenDep] if orchestrator.settings.metrics_require_token else []

    @app.get(
        "/metrics", tags=["health"], response_class=PlainTextResponse, dependencies=metrics_auth
    )
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: the orchestrator's own, and the fleet's (each agent and GPU,
        at most `CHIFFON_METRICS_FLEET_MAX_AGENTS` agents; docs/metrics.md)."""
        text = generate_latest(orchestrator.metrics.registry)
        limit = orchestrator.settings.metrics_fleet_max_agents
        if limit:
            async with orchestrator.sessions() as session:
                fleet = await read_fleet(session, now=orchestrator.clock.now(), max_agents=limit)
            # 10,000 agents take prometheus_client seconds to render (docs/metrics.md):
            # off the event loop, so ingest and the sweep go on meanwhile.
            text += await asyncio.to_thread(exposition, fleet)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/dispatch.js", include_in_schema=False)
    async def dispatch_js() -> Response:
        """The job states' groupings for the dashboard, from the dispatch contract, so the
        page spells none of them itself."""
        return Response(DISPATCH_JS, media_type="text/javascript")

    # Last: the dashboard's files answer every path the API does not.
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")
    return app
