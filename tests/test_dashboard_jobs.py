"""The dashboard's jobs in a real headless Chromium: a real orchestrator, a real agent that
accepts jobs (GPUs from a fake nvidia-smi) running real commands. The jobs view with its
filter, a job page with its events, why it waits and its live log tail, and the running
jobs on an agent's page with the GPUs they hold. Screenshots land in tests/artifacts/."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from chiffon.client import Client
from tests.auth import API_TOKEN
from tests.fleet import Fleet, fleet_on, wait_for
from tests.test_dashboard_browser import ARTIFACTS, BROWSER_ARGS, CHROMIUM, PAGE, _need_chromium
from tests.test_jobs_e2e import ACCEPTS, GPU0

TICKS = "import time\nfor i in range(1, 60):\n    print(f'tick-{i}', flush=True)\n    time.sleep(1)"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, dict[str, str]]]:
    """One desktop that accepts jobs; a job running (a line a second), one that failed,
    one that waits for a GPU no desktop has."""
    _need_chromium()
    tmp = tmp_path_factory.mktemp("dash-jobs")
    with fleet_on("http", tmp, None, sqlite=True) as fleet, Client(fleet.api, token=API_TOKEN) as c:
        fleet.start_agent("desk-2x24g", **ACCEPTS)
        wait_for("the agent", lambda: "desk-2x24g" in fleet.agents(), fleet, 30)
        failed = c.submit(["sh", "-c", "echo broken; exit 4"], name="fails").job.job_id
        assert c.wait(failed, timeout_seconds=30).state == "failed"
        ticking = c.submit([sys.executable, "-c", TICKS], name="ticks", gpus=1, vram_gb=4)
        waiting = c.submit(["true"], name="too-big", gpus=1, vram_gb=100)
        ids = {"fails": str(failed), "ticks": str(ticking.job.job_id),
               "too-big": str(waiting.job.job_id)}  # fmt: skip
        wait_for("the ticks to run", lambda: c.get(ids["ticks"]).state == "running", fleet, 30)
        yield fleet, ids


@pytest.fixture
def page(jobs: tuple[Fleet, dict[str, str]]) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=jobs[0].api)
        yield context.new_page()
        browser.close()


def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)  # type: ignore[attr-defined]


def test_the_jobs_view_lists_and_filters_jobs(
    page: object, jobs: tuple[Fleet, dict[str, str]]
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    _, ids = jobs
    page.goto(PAGE)
    page.click("header nav a[data-nav='jobs']")
    expect(page.locator("#jobs tbody tr")).to_have_count(3)
    expect(page.locator(f"#jobs tr[data-job-id='{ids['fails']}']")).to_contain_text("exited 4")
    waits = page.locator(f"#jobs tr[data-job-id='{ids['too-big']}']")
    expect(waits).to_have_attribute("data-state", "queued")
    expect(waits).to_contain_text("closest is desk-2x24g")
    expect(page.locator("#job-counts [data-k='running'] .v")).to_have_text("1")
    shot(page, "jobs.png")
    page.select_option("#j-state", "running")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    expect(page.locator("#jobs tbody tr")).to_contain_text("desk-2x24g")


def test_a_job_page_follows_its_output_live(
    page: object, jobs: tuple[Fleet, dict[str, str]]
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    _, ids = jobs
    page.goto(f"{PAGE}")
    page.goto(f"/?refresh_ms=500#/jobs/{ids['ticks']}")
    expect(page.locator("#job-title")).to_contain_text("ticks")
    expect(page.locator("#job-facts [data-k='gpus']")).to_contain_text(GPU0)
    expect(page.locator("#job-log")).to_contain_text("tick-2", timeout=15_000)
    seen = page.locator("#job-log").inner_text().count("tick-")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#job-log")).to_contain_text(f"tick-{seen + 2}", timeout=15_000)
    assert page.evaluate("window.__sameDocument") is True  # appended, not reloaded
    expect(page.locator("#job-events tbody tr")).to_have_count(3)  # submitted, placed, started
    shot(page, "job.png")
    page.goto(f"/?refresh_ms=500#/jobs/{ids['too-big']}")
    expect(page.locator("#job-reason")).to_contain_text("Waits: no online agent")


def test_an_agents_page_shows_the_jobs_running_there(
    page: object, jobs: tuple[Fleet, dict[str, str]]
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    fleet, ids = jobs
    page.goto(PAGE)
    # The fleet's table offers what a new job could have: net of the running job's claim.
    desk = page.locator(f"#agents tr[data-agent-id='{fleet.agent_id('desk-2x24g')}']")
    expect(desk.locator(".held")).to_have_text("1 job holds 4.0 GB VRAM")
    page.fill("#f-temp", "30")  # its GPUs report 38 °C
    expect(desk).to_have_count(0)
    page.fill("#f-temp", "40")
    expect(desk).to_have_count(1)
    page.goto(f"/?refresh_ms=500#/agents/{fleet.agent_id('desk-2x24g')}")
    running = page.locator(f"#agent-jobs tr[data-job-id='{ids['ticks']}']")
    expect(running).to_contain_text(GPU0)
    expect(running).to_contain_text("1 GPU")
    expect(running).to_contain_text("4 GB")
    expect(page.locator("#agent-jobs tbody tr")).to_have_count(1)
