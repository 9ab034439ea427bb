"""The dashboard in a real headless Chromium against a real orchestrator and beating agents.

Needs Debian's chromium at /usr/bin/chromium (Playwright drives it; no browser download).
Screenshots land in tests/artifacts/ for people to look at.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from chiffon.schemas.heartbeat import GpuInfo, Resources, Sandbox
from tests import factories as f
from tests.auth import API_TOKEN, bearer, enroll
from tests.procs import orchestrator_process
from tests.services import require_services

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# An agent is offline 3 s after its last beat, found by a sweep every 0.5 s.
ORCHESTRATOR_ENV = {
    "CHIFFON_HEARTBEAT_INTERVAL": "1",
    "CHIFFON_HEARTBEAT_TIMEOUT": "3",
    "CHIFFON_SWEEP_INTERVAL": "0.5",
}
BEAT_SECONDS = 0.5
# `chiffon up` prints the dashboard's address with the API token in the fragment.
PAGE_NO_TOKEN = "/?refresh_ms=500"
PAGE = f"{PAGE_NO_TOKEN}#token={API_TOKEN}"


@dataclass(frozen=True)
class SimAgent:
    agent_id: uuid.UUID
    name: str
    pool_name: str
    gpus_free_total: list[tuple[float, float]]
    cores: int


FLEET = [
    SimAgent(uuid.UUID(int=0x101), "render-01", "studio", [(20.0, 24.0), (4.0, 24.0)], 16),
    SimAgent(uuid.UUID(int=0x102), "render-02", "studio", [(6.0, 8.0)], 8),
    SimAgent(uuid.UUID(int=0x103), "train-01", "lab", [(40.0, 48.0), (30.0, 48.0)], 32),
    SimAgent(uuid.UUID(int=0x104), "office-07", "office", [], 4),
]
BY_NAME = {a.name: a for a in FLEET}


def resources_at(agent: SimAgent, tick: int) -> Resources:
    """Numbers that move a little (so charts have shape) but never cross a test threshold."""
    wobble = math.sin(tick / 3)
    gpus = [(min(total, max(0.0, free + wobble)), total) for free, total in agent.gpus_free_total]
    base = f.resources(
        gpus_free_total=gpus,
        cores_physical=agent.cores,
        load_1min=round(agent.cores / 4 + wobble, 2),
        memory_available_gb=round(20 + 4 * wobble, 2),
    )
    with_util = [
        GpuInfo.model_validate({**g.model_dump(), "utilization_percent": 50 + 40 * wobble,
                                **OWNER_GPUS.get((agent.name, g.index), {})})
        for g in base.gpus
    ]  # fmt: skip
    return base.model_copy(update={"gpus": with_util, **OWNER.get(agent.name, {})})


# The owner's side (docs/owner.md): render-01's owner is away and plays a game on GPU 1;
# render-02's owner is at the keyboard.
OWNER: dict[str, dict[str, object]] = {
    # and its job sandbox lacks a memory limit (docs/protocol.md), saying why
    "render-01": {
        "owner_idle_seconds": 1800.0,
        "sandbox": Sandbox(
            processes="pidns",
            home_hidden=True,
            devices_hidden=True,
            why=["cgroup v2 memory controller not delegated"],
        ),
    },
    "render-02": {"owner_idle_seconds": 3.0, "jobs_withheld": "owner_active"},
}
OWNER_GPUS: dict[tuple[str, int], dict[str, object]] = {
    ("render-01", 0): {"foreign_processes": 0, "foreign_vram_gb": 0.0},
    ("render-01", 1): {"foreign_processes": 1, "foreign_vram_gb": 3.5,
                       "foreign_names": ["blender"], "withheld": "exclusive_app"},
    ("render-02", 0): {"withheld": "owner_active"},
}  # fmt: skip


class Beater(threading.Thread):
    """Simulated agents beating over the HTTP path until each is killed."""

    def __init__(self, url: str, agents: list[SimAgent]) -> None:
        super().__init__(daemon=True, name="sim-agents")
        self._url = url
        self._alive = {a.agent_id: a for a in agents}
        # Each simulated agent enrolls once and proves every heartbeat with its own secret.
        self._auth = {a.agent_id: bearer(enroll(url, a.agent_id)) for a in agents}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.errors: list[str] = []

    def kill(self, agent: SimAgent) -> None:
        """The agent stops beating (no goodbye), as if its desktop lost power."""
        with self._lock:
            self._alive.pop(agent.agent_id, None)

    def stop(self) -> None:
        self._done.set()
        self.join(10)

    def run(self) -> None:
        tick = 0
        with httpx.Client(base_url=self._url, timeout=5) as client:
            while not self._done.is_set():
                with self._lock:
                    alive = list(self._alive.values())
                for agent in alive:
                    self._beat(client, agent, tick)
                tick += 1
                self._done.wait(BEAT_SECONDS)

    def _beat(self, client: httpx.Client, agent: SimAgent, tick: int) -> None:
        msg = f.message(
            agent.agent_id,
            name=agent.name,
            pool_name=agent.pool_name,
            res=resources_at(agent, tick),
        ).model_copy(update={"accepts_jobs": agent.name in OWNER})
        try:
            response = client.post(
                f"/api/v1/agents/{agent.agent_id}/heartbeat",
                content=f.raw(msg),
                headers=self._auth[agent.agent_id],
            )
            if response.status_code != 200:
                self.errors.append(f"{agent.name}: {response.status_code} {response.text}")
        except httpx.HTTPError as exc:
            self.errors.append(f"{agent.name}: {exc}")


def _need_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if require_services():
        pytest.fail(f"{message} and CHIFFON_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Beater]]:
    """A real `chiffon orchestrator` with four simulated agents beating into it."""
    _need_chromium()
    with orchestrator_process(tmp_path_factory.mktemp("dash"), env=ORCHESTRATOR_ENV) as url:
        beater = Beater(url, FLEET)
        beater.start()
        try:
            yield url, beater
        finally:
            beater.stop()
        assert beater.errors == []


@pytest.fixture(scope="module")
def browser(fleet: tuple[str, Beater]) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: object, fleet: tuple[str, Beater]) -> Iterator[object]:
    from playwright.sync_api import Browser

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=fleet[0])
    new_page = context.new_page()
    yield new_page
    context.close()


def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)  # type: ignore[attr-defined]


def row(agent: SimAgent) -> str:
    return f"#agents tbody tr[data-agent-id='{agent.agent_id}']"


def visible_names(page: object) -> list[str]:
    return sorted(page.locator("#agents tbody tr td:first-child").all_inner_texts())  # type: ignore[attr-defined]


def test_table_lists_every_agent_with_its_gpus_and_the_fleet_summary(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    expect(page.locator("#agents tbody tr")).to_have_count(4)
    assert visible_names(page) == sorted(BY_NAME)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    render = page.locator(row(BY_NAME["render-01"]))
    expect(render.locator(".gpu")).to_have_count(2)
    expect(render.locator(".gpu").first).to_contain_text("/ 24.0 GB")
    expect(page.locator(row(BY_NAME["office-07"]))).to_contain_text("no GPU")
    expect(page.locator("#pools tbody tr")).to_have_count(3)
    expect(page.locator("#pools tr[data-pool='lab']")).to_contain_text("/ 96.0")
    shot(page, "dashboard.png")


def test_filtering_by_min_free_vram_hides_agents_with_less(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    expect(page.locator("#agents tbody tr")).to_have_count(4)
    page.fill("#f-vram", "10")
    expect(page.locator("#agents tbody tr")).to_have_count(2)
    assert visible_names(page) == ["render-01", "train-01"]
    page.fill("#f-vram", "50")
    expect(page.locator("#agents tbody tr")).to_have_count(1)
    assert visible_names(page) == ["train-01"]
    shot(page, "filtered.png")
    page.fill("#f-vram", "")
    page.select_option("#f-pool", "studio")
    expect(page.locator("#agents tbody tr")).to_have_count(2)
    assert visible_names(page) == ["render-01", "render-02"]


def test_killed_agent_turns_offline_on_the_page_without_a_reload(
    page: object, fleet: tuple[str, Beater]
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    victim = BY_NAME["render-02"]
    page.goto(PAGE)
    expect(page.locator(row(victim))).to_have_attribute("data-status", "online")
    page.evaluate("window.__sameDocument = true")
    fleet[1].kill(victim)
    # timeout 3 s + sweep 0.5 s + one 0.5 s refresh, with room for a busy machine.
    expect(page.locator(row(victim))).to_have_attribute("data-status", "offline", timeout=15_000)
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#summary [data-k='offline'] .v")).to_have_text("1")
    expect(page.locator(row(BY_NAME["render-01"]))).to_have_attribute("data-status", "online")
    shot(page, "offline.png")


def test_agent_page_draws_its_history_and_status_events(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    agent = BY_NAME["train-01"]
    page.goto(PAGE)
    page.click(f"{row(agent)} a")
    expect(page.locator("#agent-title")).to_contain_text("train-01")
    for chart, series in (("load", 2), ("memory", 1), ("vram", 2), ("util", 2)):
        box = page.locator(f"#chart-{chart}")
        expect(box).to_have_attribute("data-series", str(series))
        expect(box.locator("canvas")).to_have_count(1)
    # 15 min: one point per 3 s; the agents have been beating every 0.5 s since start.
    page.click("#windows button:has-text('15m')")
    expect(page.locator("#windows button[aria-pressed='true']")).to_have_text("15m")
    # Polled from here: a predicate run in the page would be `eval`, which the page's
    # Content-Security-Policy forbids.
    deadline = time.monotonic() + 15
    while int(page.locator("#chart-vram").get_attribute("data-points") or 0) < 3:
        assert time.monotonic() < deadline, "the 15m chart never had 3 points"
        page.wait_for_timeout(200)
    legend = page.locator("#chart-vram .u-legend")
    expect(legend).to_contain_text("GPU 0")
    expect(legend).to_contain_text("GPU 1")
    # Newest first: the registration is the oldest "online" row (a busy machine may have
    # let a 0.5 s beat miss the 3 s timeout once, adding an offline -> online pair above).
    online = page.locator("#events tbody tr[data-to='online']")
    expect(online.last).to_contain_text("registered")
    shot(page, "agent.png")


def test_unreachable_orchestrator_is_shown_then_recovers(page: object) -> None:
    from playwright.sync_api import Page, Route, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    def refuse(route: Route) -> None:
        route.abort("connectionrefused")

    page.route("**/api/v1/**", refuse)
    expect(page.locator("#conn")).to_have_attribute("data-state", "down")
    expect(page.locator("#conn")).to_contain_text("unreachable")
    expect(page.locator("#agents tbody tr")).to_have_count(4)  # the last data stays on screen
    # ...but no status on it claims to be current: no green "online" while no one can know
    expect(page.locator("#agents tbody .badge.online")).to_have_count(0)
    expect(page.locator("#agents tbody .badge.unknown").first).to_have_text("online?")
    shot(page, "unreachable.png")
    page.unroute("**/api/v1/**", refuse)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")


def test_without_a_token_the_page_asks_for_one_and_keeps_it_in_the_tab(
    browser: object, fleet: tuple[str, Beater]
) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    context = browser.new_context(base_url=fleet[0])
    try:
        page = context.new_page()
        page.goto(PAGE_NO_TOKEN)
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#login-msg")).to_contain_text("needs its API token")
        expect(page.locator("#agents tbody tr")).to_have_count(0)
        page.fill("#login-token", "wrong")
        page.click("#login button")
        expect(page.locator("#login-msg")).to_contain_text("was refused")
        # the orchestrator answered: refused, not "unreachable"
        expect(page.locator("#conn")).to_contain_text("the API token was refused")
        expect(page.locator("#conn")).not_to_contain_text("unreachable")
        page.fill("#login-token", API_TOKEN)
        page.click("#login button")
        expect(page.locator("#agents tbody tr")).to_have_count(len(FLEET))
        expect(page.locator("#login")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('chiffon.token')") == API_TOKEN
        assert "token" not in page.url
    finally:
        context.close()


def test_before_any_data_the_badge_says_none_was_loaded_and_how_to_give_the_token(
    browser: object, fleet: tuple[str, Beater]
) -> None:
    """Without a token the badge said "showing data from never"; an orchestrator that could
    not be reached from the start said the same."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": 1280, "height": 600}, base_url=fleet[0])
    try:
        page = context.new_page()
        page.goto(PAGE_NO_TOKEN)
        conn = page.locator("#conn")
        expect(conn).to_have_attribute("data-state", "down")
        expect(conn).to_have_text(
            "Orchestrator reachable, but an API token is needed; "
            "no data loaded yet: enter the token below"
        )
        expect(page.locator("#login-msg")).to_contain_text("~/.chiffon/api_token")
        expect(page.locator("#login-msg")).to_contain_text("#token=")
        shot(page, "no-token.png")
        page.route("**/api/v1/**", lambda route: route.abort("connectionrefused"))
        page.goto(PAGE)
        expect(conn).to_have_text(
            "Orchestrator unreachable (network error); no data could be loaded yet"
        )
    finally:
        context.close()


NARROW_PX = 390  # a phone held upright


def _sideways_overflow(page: object) -> int:
    """How many pixels the document is wider than the window (0: no sideways scrolling)."""
    js = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    return int(page.evaluate(js))  # type: ignore[attr-defined]


def _visible_right(page: object, table: str) -> dict[str, float]:
    """The right edge of what shows of `table`: its own, or its box's when that box scrolls
    sideways (what sticks out of it is scrolled to, not drawn past it)."""
    js = f"""(() => {{
        const table = document.querySelector("{table}"), box = table.parentElement;
        const clips = ["auto", "scroll"].includes(getComputedStyle(box).overflowX);
        const shown = clips ? box.getBoundingClientRect() : table.getBoundingClientRect();
        return {{ right: shown.right, left: shown.left, scrolls: box.scrollWidth > box.clientWidth,
                  clips }};
    }})()"""
    return page.evaluate(js)  # type: ignore[attr-defined,no-any-return]


def test_at_390_px_wide_the_tables_scroll_inside_their_own_box(
    browser: object, fleet: tuple[str, Beater]
) -> None:
    """At 390 px the fleet table stuck out past the header and the page scrolled sideways."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": NARROW_PX, "height": 844}, base_url=fleet[0])
    try:
        page = context.new_page()
        page.goto(PAGE)
        expect(page.locator("#agents tbody tr")).to_have_count(len(FLEET))
        assert _box(page.locator("header"))["width"] == NARROW_PX
        for table in ("#agents", "#pools"):
            shown = _visible_right(page, table)
            assert shown["left"] >= 0 and shown["right"] <= NARROW_PX, (table, shown)
        # the agents table is wider than a phone: it scrolls in its box, GPUs and all
        assert _visible_right(page, "#agents")["scrolls"]
        assert _sideways_overflow(page) == 0
        shot(page, "narrow-fleet.png")
        page.evaluate("document.querySelector('#agents').parentElement.scrollLeft = 1e6")
        gpus_head = _box(page.locator("#agents th[data-sort='vram']"))
        assert gpus_head["x"] + gpus_head["width"] <= NARROW_PX  # scrolled to, in its box
        shot(page, "narrow-fleet-scrolled.png")
        page.click(f"{row(BY_NAME['train-01'])} a")
        expect(page.locator("#chart-load canvas")).to_have_count(1)
        assert _visible_right(page, "#agent-gpus")["right"] <= NARROW_PX
        assert _sideways_overflow(page) == 0
        shot(page, "narrow-agent.png")
        page.click("header nav a[data-nav='jobs']")
        expect(page.locator("#jobs-shown")).to_contain_text("jobs")
        assert _visible_right(page, "#jobs")["right"] <= NARROW_PX
        assert _sideways_overflow(page) == 0
    finally:
        context.close()


def test_the_token_in_the_fragment_is_kept_and_leaves_the_address_bar(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    expect(page.locator("#agents tbody tr")).to_have_count(len(FLEET))
    assert API_TOKEN not in page.url
    assert page.evaluate("sessionStorage.getItem('chiffon.token')") == API_TOKEN


def test_hostile_names_neither_push_the_table_off_screen_nor_reorder_the_heading(
    browser: object, tmp_path: Path
) -> None:
    """A 255-character unbroken name wraps inside its column; a right-to-left override in a
    name (stored before the schema refused it: written straight into the registry here)
    is isolated, so the status badge stays after the name. The page also comes with a
    Content-Security-Policy and X-Frame-Options, and runs under them."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    long_id, rtl_id = uuid.uuid4(), uuid.uuid4()
    with orchestrator_process(tmp_path) as url:
        for agent, name in ((long_id, "W" * 255), (rtl_id, "placeholder")):
            resp = httpx.post(
                f"{url}/api/v1/agents/{agent}/heartbeat",
                content=f.raw(f.message(agent, name=name)),
                headers=bearer(enroll(url, agent)),
            )
            assert resp.status_code == 200, resp.text
        with sqlite3.connect(tmp_path / "chiffon.db") as db:
            db.execute(
                "UPDATE agent_registry SET name = ? WHERE agent_id = ?", ("\u202eevil", rtl_id.hex)
            )
        headers = httpx.get(f"{url}/").headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=url)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(PAGE)
        status = page.locator(f"#agents tbody tr[data-agent-id='{long_id}'] .badge")
        expect(status).to_be_visible()
        box = _box(status)
        assert box["x"] + box["width"] <= 1280
        shot(page, "long-name.png")
        page.goto(f"{url}/#/agents/{rtl_id}")
        title = page.locator("#agent-title")
        expect(title).to_contain_text("evil")
        name_box, badge_box = _box(title.locator("bdi")), _box(title.locator(".badge"))
        assert badge_box["x"] > name_box["x"]  # the badge follows the name, as in LTR text
        shot(page, "rtl-name.png")
        context.close()
    assert [e for e in errors if "Content Security Policy" in e] == []


def _box(locator: object) -> dict[str, float]:
    """The element's box; the page redraws every refresh, so a box read while an element
    is being replaced is asked for again (for up to 5 s)."""
    deadline = time.monotonic() + 5
    while (box := locator.bounding_box()) is None:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the element never stayed on the page"
        time.sleep(0.05)
    return box  # type: ignore[no-any-return]


def test_a_registry_that_cannot_be_written_is_called_stale_on_the_page(
    browser: object, tmp_path: Path
) -> None:
    """Every write to the registry fails as on a full disk (a PostgreSQL trigger raising
    SQLSTATE 53100): the sweep cannot keep statuses, and the page says so."""
    from playwright.sync_api import Browser, expect

    from tests.conftest import fresh_postgres_database

    assert isinstance(browser, Browser)
    env = {**ORCHESTRATOR_ENV, "CHIFFON_SWEEP_INTERVAL": "0.2"}
    with (
        fresh_postgres_database() as db_url,
        orchestrator_process(tmp_path, env={**env, "CHIFFON_DATABASE_URL": db_url}) as url,
    ):
        context = browser.new_context(viewport={"width": 1280, "height": 600}, base_url=url)
        page = context.new_page()
        page.goto(PAGE)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION "
                "'No space left on device' USING ERRCODE = '53100'; END $$ LANGUAGE plpgsql"
            )
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON agent_registry "
                "FOR EACH STATEMENT EXECUTE FUNCTION refuse()"
            )
        conn_badge = page.locator("#conn")
        expect(conn_badge).to_have_attribute("data-state", "stale", timeout=15_000)
        expect(conn_badge).to_contain_text("Registry stale")
        shot(page, "registry-stale.png")
        assert httpx.get(f"{url}/readyz").status_code == 503
        context.close()


def test_api_docs_render_offline_from_the_packages_own_files(page: object) -> None:
    """`/docs` was blank without internet: Swagger UI came from a CDN. This browser has no
    network beyond the orchestrator, so a page that renders here needs nothing else."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Chiffon")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    base = fleet_base(page)
    assert fetched and all(url.startswith(base) for url in fetched), fetched
    shot(page, "api-docs.png")


def fleet_base(page: object) -> str:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    return page.url.split("/docs")[0]


def _x_span(page: object, chart: str) -> float:
    """The x axis's span in seconds (-1 while the chart is being drawn again)."""
    c = f"state.charts.{chart}"
    span = page.evaluate(f"{c} ? {c}.scales.x.max - {c}.scales.x.min : -1")  # type: ignore[attr-defined]
    return float(span)


def test_each_window_button_sets_the_charts_span_and_labels_keep_apart(page: object) -> None:
    """With one point the x axis ran from 2027 to 2029, the 1h and 24h buttons did not set
    the window, and a day's time labels ran together."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(f"{PAGE_NO_TOKEN}#/agents/{BY_NAME['train-01'].agent_id}")
    page.evaluate(f"sessionStorage.setItem('chiffon.token', '{API_TOKEN}')")
    page.reload()
    expect(page.locator("#chart-load canvas")).to_have_count(1)
    for label, seconds in (("15m", 900), ("1h", 3600), ("15m", 900)):
        page.click(f"#windows button:has-text('{label}')")
        expect(page.locator("#windows button[aria-pressed='true']")).to_have_text(label)
        deadline = time.monotonic() + 10
        while abs(_x_span(page, "load") - seconds) > 5:
            assert time.monotonic() < deadline, f"{label}: span {_x_span(page, 'load')} s"
            page.wait_for_timeout(100)
    # The longer windows read the minute tiers, which this young fleet has not filled yet:
    # the page's own drawing code, given a day of points (and then a single point).
    held: list[object] = []

    def hold(route: object) -> None:  # never answered: the page cannot redraw meanwhile
        held.append(route)

    page.route("**/api/v1/agents/*/metrics*", hold)
    page.click("#windows button:has-text('24h')")
    page.evaluate(
        "(() => { const end = Date.now() / 1000, start = end - 86400;"
        " const xs = Array.from({length: 288}, (_, i) => start + 300 * i);"
        " drawChart('memory', xs, [['free', xs.map(() => 20)]], [start, end], '-'); })()"
    )
    assert abs(_x_span(page, "memory") - 86400) < 1
    gaps = page.evaluate(
        "(() => { const u = state.charts.memory;"
        " const xs = u.axes[0]._splits.map((v) => u.valToPos(v, 'x'));"
        " return xs.slice(1).map((x, i) => x - xs[i]); })()"
    )
    assert gaps and min(gaps) >= 89, gaps  # the time labels stay at least 90 px apart
    shot(page, "agent-24h.png")
    page.evaluate(
        "(() => { const end = Date.now() / 1000;"
        " drawChart('util', [end - 60], [['GPU 0', [42]]], [end - 3600, end], '-'); })()"
    )
    assert abs(_x_span(page, "util") - 3600) < 1  # one point: the hour, not 2027 to 2029


def test_an_offline_gap_breaks_the_line(page: object) -> None:
    """A 6-minute silence was drawn as a straight line across it."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    points = [
        {"at": f"2026-12-02T10:{m:02d}:00Z", "gpus": [], "cpu_load_1min": 1}
        for m in (0, 1, 2, 8, 9)
    ]
    filled = page.evaluate(f"withGaps({points!r}.map((p) => p), 12)".replace("'", '"'))
    assert [p.get("gap", False) for p in filled] == [False, False, False, True, False, False]
    assert filled[3]["at"] == "2026-12-02T10:03:00.000Z"
    series = page.evaluate(f"chartData(withGaps({points!r}, 12)).load[1][0][1]".replace("'", '"'))
    assert series == [1, 1, 1, None, 1, 1]  # null: uPlot leaves a gap (spanGaps: false)


def test_the_agent_page_shows_gpus_id_version_labels_and_probe_errors(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    agent = BY_NAME["render-01"]
    page.goto(PAGE)
    page.click(f"{row(agent)} a")
    expect(page.locator("#agent-facts [data-k='id']")).to_contain_text(str(agent.agent_id))
    expect(page.locator("#agent-facts [data-k='version']")).to_be_visible()
    expect(page.locator("#agent-facts [data-k='labels']")).to_contain_text("none")
    gpus = page.locator("#agent-gpus tbody tr")
    expect(gpus).to_have_count(2)
    expect(gpus.first).to_contain_text("GPU 0")  # the model the agent reported
    expect(page.locator("#agent-errors")).to_be_hidden()  # it reported none
    shot(page, "agent-details.png")
    page.click("text=← fleet")
    page.click(f"{row(BY_NAME['office-07'])} a")
    expect(page.locator("#agent-gpus tbody")).to_contain_text("no GPU on this machine")
    expect(page.locator("#chart-vram .empty")).to_have_text("no GPU on this machine")


def test_fleet_filters_cover_the_capacity_querys_minimums(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    expect(page.locator("#agents tbody tr")).to_have_count(len(FLEET))
    page.fill("#f-gpu", "25")  # one GPU with 25 GB free: only train-01's 48 GB cards
    expect(page.locator("#agents tbody tr")).to_have_count(1)
    assert visible_names(page) == ["train-01"]
    page.fill("#f-gpu", "")
    page.fill("#f-cores", "9")  # free cores: render-01 (16) and train-01 (32)
    expect(page.locator("#agents tbody tr")).to_have_count(2)
    assert visible_names(page) == ["render-01", "train-01"]


def test_the_owners_side_shows_per_agent_and_per_gpu(page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    render01, render02 = BY_NAME["render-01"], BY_NAME["render-02"]
    expect(page.locator(f"{row(render01)} [data-owner]")).to_have_text("owner idle 30 min")
    expect(page.locator(f"{row(render02)} [data-owner]")).to_have_text("owner active")
    expect(page.locator(f"{row(BY_NAME['office-07'])} [data-owner]")).to_have_text("takes no jobs")
    expect(page.locator(f"{row(render01)} [data-withheld='exclusive_app']")).to_have_text(
        "owner's exclusive app"
    )
    page.click(f"{row(render01)} a")
    gpu1 = page.locator("#agent-gpus tr[data-gpu='1']")
    expect(gpu1.locator("[data-foreign]")).to_have_text("1 (blender), 3.5 GB")
    expect(gpu1.locator("[data-withheld]")).to_have_text("owner's exclusive app")
    expect(page.locator("#agent-gpus tr[data-gpu='0'] [data-withheld]")).to_have_text("welcome")
    expect(page.locator("#agent-facts [data-k='owner'] .v")).to_have_text("owner idle 30 min")
    expect(page.locator("#agent-facts [data-k='reliability'] .v")).to_have_text(
        "0 offline, 0 taken back"
    )
    sandbox = page.locator("#agent-facts [data-k='sandbox']")
    expect(sandbox.locator(".v")).to_have_text("pidns+home+dev (no memory limit)")
    expect(sandbox.locator("ul.why li")).to_have_text(["cgroup v2 memory controller not delegated"])
    shot(page, "agent-owner.png")


def test_a_suspect_agent_is_shown_held_with_its_reason(
    page: object, fleet: tuple[str, Beater]
) -> None:
    """Issue 34, item 3: two runs beating with one secret quarantine the agent, and the
    page says so where the owner's side is shown, and why on its own page."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    url, _ = fleet
    agent_id = uuid.uuid4()
    auth = bearer(enroll(url, agent_id))
    runs = [uuid.uuid4(), uuid.uuid4()]
    outcomes = []
    try:
        for n, run in enumerate([runs[0], runs[1], runs[0]]):
            msg = f.message(agent_id, name="twice-run", boot_id=run, seq=n + 1)
            got = httpx.post(f"{url}/api/v1/agents/{agent_id}/heartbeat", content=f.raw(msg),
                             headers=auth, timeout=5)  # fmt: skip
            outcomes.append(got.json().get("outcome"))
            time.sleep(0.05)  # each sent after the one before
        assert outcomes == ["applied", "applied", "suspect"]
        page.goto(PAGE)
        held = page.locator(f"#agents tbody tr[data-agent-id='{agent_id}'] [data-owner]")
        expect(held).to_have_text("suspect: quarantined")
        expect(held).to_have_attribute("data-hold", "suspect")
        page.click(f"#agents tbody tr[data-agent-id='{agent_id}'] a")
        expect(page.locator("#agent-facts [data-k='hold'] .v")).to_contain_text(
            "boot ids alternate"
        )
        shot(page, "agent-suspect.png")
    finally:
        headers = {"authorization": f"Bearer {API_TOKEN}"}
        httpx.delete(f"{url}/api/v1/agents/{agent_id}/credential", headers=headers, timeout=5)
        httpx.delete(f"{url}/api/v1/agents/{agent_id}", headers=headers, timeout=5)
