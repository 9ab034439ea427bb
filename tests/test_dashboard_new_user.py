"""What a new user tripped on, in a real headless Chromium: a real orchestrator and a real
agent on a desktop without a GPU that accepts jobs, running one whose command and working
directory hold quotes, spaces and markup. The job page shows that command as a shell
would need it typed, and the folder, as text; the fleet table says truly what the job
holds. Screenshots land in tests/artifacts/."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from chiffon.client import Client
from tests.auth import API_TOKEN
from tests.fleet import Fleet, fleet_on, wait_for
from tests.test_dashboard_browser import ARTIFACTS, BROWSER_ARGS, CHROMIUM, PAGE, _need_chromium
from tests.test_jobs_e2e import ACCEPTS

# Quotes, a space, markup that would run as HTML, and an empty word.
QUOTED = [
    "sh",
    "-c",
    "echo '<img src=x onerror=alert(1)>' \"$0\"; sleep 60",
    "it's <b>bold</b>",
    "",
]
WORKDIR = "<i>runs 1"  # a folder (markup, a space) made under the test's temporary one


@dataclass(frozen=True)
class Desk:
    fleet: Fleet
    quoted: str  # QUOTED, running in WORKDIR
    plain: str  # `true`, done, with no working directory named
    workdir: str


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    """desk-none (no GPU, no nvidia-smi) accepts jobs: it ran `true`, and runs QUOTED,
    which reserves nothing, until it is cancelled at the end."""
    _need_chromium()
    tmp = tmp_path_factory.mktemp("dash-new-user")
    workdir = tmp / WORKDIR
    workdir.mkdir()
    with fleet_on("http", tmp, None, sqlite=True) as fleet, Client(fleet.api, token=API_TOKEN) as c:
        fleet.start_agent("desk-none", **ACCEPTS)
        wait_for("the agent", lambda: "desk-none" in fleet.agents(), fleet, 30)
        plain = c.submit(["true"], name="plain").job.job_id
        assert c.wait(plain, timeout_seconds=30).state == "succeeded"
        quoted = c.submit(QUOTED, name="quoted", workdir=str(workdir)).job.job_id
        wait_for("the job to run", lambda: c.get(quoted).state == "running", fleet, 30)
        try:
            yield Desk(fleet, str(quoted), str(plain), str(workdir))
        finally:
            c.cancel(quoted)
            c.wait(quoted, timeout_seconds=30)


@pytest.fixture
def page(desk: Desk) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        context = browser.new_context(
            viewport={"width": 1280, "height": 800}, base_url=desk.fleet.api
        )
        yield context.new_page()
        browser.close()


def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)  # type: ignore[attr-defined]


def test_a_job_page_shows_its_command_shell_quoted_and_its_workdir_as_text(
    page: object, desk: Desk
) -> None:
    """The job page never showed the command at all."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    page.goto(f"/?refresh_ms=500#/jobs/{desk.quoted}")
    expect(page.locator("#job-title")).to_contain_text("quoted")
    expect(page.locator("#job-command")).to_have_text(shlex.join(QUOTED))
    expect(page.locator("#job-workdir")).to_have_text(desk.workdir)
    expect(page.locator("#job-run dd[data-workdir]")).to_be_visible()
    expect(page.locator("#job-run img, #job-run b, #job-run i")).to_have_count(0)  # never HTML
    shot(page, "job-command.png")
    # A job that named no working directory: the line is left out, not shown empty.
    page.goto(f"/?refresh_ms=500#/jobs/{desk.plain}")
    expect(page.locator("#job-command")).to_have_text("true")
    expect(page.locator("#job-run [data-workdir]")).to_have_count(2)
    for line in page.locator("#job-run [data-workdir]").all():
        expect(line).to_be_hidden()
    # The jobs list quotes it the same way.
    page.click("header nav a[data-nav='jobs']")
    cell = page.locator(f"#jobs tr[data-job-id='{desk.quoted}'] td.command")
    expect(cell).to_have_text(shlex.join(QUOTED))


HELD = [  # the capacity answer's `claims` (jobs, cores, memory GB, VRAM GB) -> the row's words
    ((1, 0, 0, 0), "1 job running, holds nothing reserved"),
    ((2, 0, 0, 0), "2 jobs running, hold nothing reserved"),
    ((1, 2, 0, 0), "1 job holds 2 cores"),
    ((2, 1, 0, 0), "2 jobs hold 1 core"),
    ((1, 1.5, 8, 0), "1 job holds 1.5 cores, 8.0 GB memory"),
    ((3, 4, 0, 24), "3 jobs hold 24.0 GB VRAM, 4 cores"),
]


def test_a_desktop_without_a_gpu_says_truly_what_its_job_holds(page: object, desk: Desk) -> None:
    """It read "1 job hold 0.0 GB VRAM, 0 cores" on a desktop with no GPU."""
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(PAGE)
    desk_row = page.locator(f"#agents tr[data-agent-id='{desk.fleet.agent_id('desk-none')}']")
    expect(desk_row).to_contain_text("no GPU")
    expect(desk_row.locator(".held")).to_have_text("1 job running, holds nothing reserved")
    shot(page, "held-no-gpu.png")
    for (jobs, cores, memory_gb, vram_gb), text in HELD:
        claims = {"jobs": jobs, "cpu_cores": cores, "memory_gb": memory_gb, "vram_gb": vram_gb}
        assert page.evaluate(f"heldText({json.dumps(claims)})") == text, claims
