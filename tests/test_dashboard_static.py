"""The orchestrator serves the dashboard at / without shadowing the API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from chiffon.api.app import create_app
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas import dispatch
from tests.auth import API_HEADERS


@pytest.fixture
async def web(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(orchestrator, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://chiffon") as client:
        yield client


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_dashboard_and_its_vendored_chart_library_are_served(
    web: httpx.AsyncClient,
) -> None:
    index = await web.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<script src="app.js">' in index.text
    for path in ("/app.js", "/style.css", "/vendor/uPlot.iife.min.js", "/vendor/uPlot.min.css"):
        assert (await web.get(path)).status_code == 200, path
    # The page needs no token; the data does.
    assert (await web.get("/api/v1/agents")).status_code == 401
    api = await web.get("/api/v1/agents", headers=API_HEADERS)
    assert api.status_code == 200 and api.json() == []
    assert (await web.get("/healthz")).json() == {"status": "ok"}
    assert (await web.get("/no-such-page")).status_code == 404


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_favicon_is_served_and_the_page_links_it(web: httpx.AsyncClient) -> None:
    """`/favicon.ico` was a 404 in every browser's console."""
    icon = await web.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/")
    assert icon.content.startswith(b"\x00\x00\x01\x00")  # an ICO file's header
    assert '<link rel="icon" href="favicon.ico"' in (await web.get("/")).text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_page_reads_the_job_states_groupings_from_the_dispatch_contract(
    web: httpx.AsyncClient,
) -> None:
    page = (await web.get("/")).text
    assert page.index('<script src="dispatch.js">') < page.index('<script src="app.js">')
    script = await web.get("/dispatch.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    body = script.text.split("Object.freeze(", 1)[1].rsplit(");", 1)[0]
    groupings = json.loads(body)
    assert groupings["active"] == list(dispatch.ACTIVE) and groupings["out"] == list(dispatch.OUT)
    assert set(groupings["terminal"]) == dispatch.TERMINAL
    app_js = (await web.get("/app.js")).text
    assert '"assigned", "running"' not in app_js and "DISPATCH.out" in app_js
