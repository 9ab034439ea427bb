"""`chiffon agents`, `capacity`, `events` against a real orchestrator process."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chiffon.schemas.heartbeat import Sandbox
from tests import factories as f
from tests.auth import bearer, enroll
from tests.procs import free_port, orchestrator_process, run_cli

FULL_SANDBOX = {"processes": "cgroup", "memory_limit": True, "home_hidden": True,
                "devices_hidden": True, "why": [], "required": False}  # fmt: skip
RICH = uuid.UUID("11111111-0000-0000-0000-000000000001")
SMALL = uuid.UUID("22222222-0000-0000-0000-000000000002")


@pytest.fixture(scope="module")
def fleet_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with orchestrator_process(tmp_path_factory.mktemp("orch")) as url:
        beats = [
            (
                RICH,
                "rich",
                f.resources(gpus_free_total=[(20.0, 24.0), (22.0, 24.0)], temperatures=[60, 75]),
            ),
            (
                SMALL,
                "small",
                f.resources(gpus_free_total=[(6.0, 8.0)], temperatures=[50], cores_physical=4),
            ),
        ]
        for agent, name, res in beats:
            labels = {"room": "b12", "os": "linux"} if name == "rich" else {"os": "linux"}
            if name == "rich":  # its job sandbox is full; small's agent is too old to say
                res = res.model_copy(update={"sandbox": Sandbox.model_validate(FULL_SANDBOX)})
            body = f.raw(f.message(agent, name=name, res=res).model_copy(update={"labels": labels}))
            resp = httpx.post(
                f"{url}/api/v1/agents/{agent}/heartbeat",
                content=body,
                headers=bearer(enroll(url, agent)),
            )
            assert resp.status_code == 200, resp.text
        yield url


def test_agents_lists_every_agent(fleet_url: str) -> None:
    out = run_cli("agents", "--orchestrator-url", fleet_url)
    assert out.returncode == 0, out.stderr
    assert "rich" in out.stdout and "small" in out.stdout
    assert "22.0/24.0 GB" in out.stdout and "11111111" in out.stdout
    as_json = json.loads(
        run_cli("agents", "--json", env={"CHIFFON_ORCHESTRATOR_URL": fleet_url}).stdout
    )
    assert {a["name"] for a in as_json} == {"rich", "small"}


def test_capacity_query_best_first_and_exit_status(fleet_url: str) -> None:
    found = run_cli("capacity", "--min-gpu-vram", "8", "--json", "--orchestrator-url", fleet_url)
    assert found.returncode == 0
    assert [c["name"] for c in json.loads(found.stdout)] == ["rich"]
    both = run_cli("capacity", "--min-cpu-cores", "1", "--json", "--orchestrator-url", fleet_url)
    assert [c["name"] for c in json.loads(both.stdout)] == ["rich", "small"]
    none = run_cli("capacity", "--min-single-gpu-vram", "23", "--orchestrator-url", fleet_url)
    assert none.returncode == 3  # its own code: "not yet", never a typo or an outage
    assert none.stdout.strip() == (
        "no online agent can take that work right now; "
        "closest: rich (best GPU 22.0 GB of 23 wanted)"
    )
    cool = run_cli("capacity", "--max-gpu-temp", "70", "--json", "--orchestrator-url", fleet_url)
    assert [c["name"] for c in json.loads(cool.stdout)] == ["small"]
    cooler = run_cli("capacity", "--max-gpu-temp", "40", "--min-gpu-vram", "8",
                     "--orchestrator-url", fleet_url)  # fmt: skip
    assert cooler.returncode == 3
    assert cooler.stdout.strip() == (
        "no online agent can take that work right now; "
        "closest: small (free VRAM 6.0 GB of 8 wanted, hottest GPU 50.0 °C of 40 at most)"
    )
    pool = run_cli("capacity", "--min-cpu-cores", "1", "--pool", "nosuch",
                   "--orchestrator-url", fleet_url)  # fmt: skip
    assert pool.returncode == 3
    assert pool.stdout.strip() == "no agent is in pool 'nosuch' (pools: desktop_pool_1)"


def test_exit_statuses_tell_no_capacity_from_usage_from_failure(fleet_url: str) -> None:
    """0 found, 3 no capacity, 2 usage error, 1 the orchestrator could not be asked."""
    url = ["--orchestrator-url", fleet_url]
    cases = {
        ("capacity", "--min-gpu-vram", "8", *url): 0,
        ("capacity", "--min-gpu-vram", "1000", *url): 3,
        ("capacity", "--min-cpu-cores", "-1", *url): 2,
        ("capacity", "--min-gpu-vram", "8", "--orchestrator-url", "127.0.0.1:8700"): 2,
        ("capacity", "--min-gpu-vram", "8", "--orchestrator-url", "http://127.0.0.1:1"): 1,
    }
    for args, code in cases.items():
        assert run_cli(*args).returncode == code, args
    refused = run_cli("capacity", "--min-gpu-vram", "8", *url, env={"CHIFFON_API_TOKEN": "x"})
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    scheme = run_cli("agents", "--orchestrator-url", "127.0.0.1:8700")
    assert scheme.stderr.strip() == (
        "error: --orchestrator-url must start with http:// or https://, not '127.0.0.1:8700' "
        "(did you mean http://127.0.0.1:8700?)"
    )


def test_empty_lists_say_why(fleet_url: str) -> None:
    url = ["--orchestrator-url", fleet_url]
    assert run_cli("agents", "--status", "offline", *url).stdout.strip() == (
        "no offline agents (2 registered in all)"
    )
    assert run_cli("agents", "--pool", "nosuch", *url).stdout.strip() == (
        "no agent is in pool 'nosuch' (pools: desktop_pool_1)"
    )
    events = run_cli("events", *url).stdout
    assert "rich" in events and "small" in events  # names, not id prefixes


def test_one_agent_by_name_prefix_or_id(fleet_url: str) -> None:
    by_name = run_cli("capacity", "small", "--json", "--orchestrator-url", fleet_url)
    assert json.loads(by_name.stdout)["agent_id"] == str(SMALL)
    by_prefix = run_cli("capacity", "2222", "--json", "--orchestrator-url", fleet_url)
    assert json.loads(by_prefix.stdout)["gpu_vram_total_gb"] == 8.0
    events = run_cli("events", "rich", "--json", "--orchestrator-url", fleet_url)
    assert [e["reason"] for e in json.loads(events.stdout)] == ["registered"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("capacity", "nobody"), 2, "no agent has the id, id prefix or name 'nobody'"),
        (("capacity", str(uuid.uuid4())), 2, "is not registered (HTTP 404)"),
        (("capacity", "--min-gpu-vram", "-3"), 2, "-3.0 is not in the range 0.0<=x<=1000000.0"),
        (("agents", "--status", "asleep"), 2, "--status must be online or offline"),
        (("capacity", "--min-gpu-vram", "lots"), 2, "Invalid value for '--min-gpu-vram'"),
        (("agents", "--colour"), 2, "chiffon agents: No such option: --colour"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    fleet_url: str, args: tuple[str, ...], code: int, message: str
) -> None:
    out = run_cli(*args, "--orchestrator-url", fleet_url)
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unreachable_orchestrator_is_the_same_one_line_from_every_command(
    tmp_path: Path,
) -> None:
    """`agents` and `run`, `jobs`, `logs` went through two HTTP clients with two messages:
    now one client, one message, one exit status."""
    url = f"http://127.0.0.1:{free_port()}"
    said = set()
    for args in (("agents",), ("capacity",), ("status",), ("events",), ("jobs",),
                 ("jobs", "show", "abc"), ("logs", "abc"), ("run",)):  # fmt: skip
        where = ("--orchestrator-url", url)
        out = run_cli(*args, *where) if args[0] != "run" else run_cli("run", *where, "true")
        assert out.returncode == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        said.add(out.stderr.strip())
    assert said == {
        f"error: cannot reach the orchestrator at {url} (ConnectError); is it running? "
        "(set CHIFFON_ORCHESTRATOR_URL or --orchestrator-url)"
    }


def test_agent_controlled_names_are_shown_as_text_never_as_markup_or_escapes(
    tmp_path: Path,
) -> None:
    """`[/]` crashed `chiffon agents` with a MarkupError (exit 1, read as "no capacity");
    an escape sequence reached the terminal and a newline forged a row. The schema now
    refuses the controls, so the second agent's row is written straight into the registry,
    as one stored before that check would be."""
    markup, forged = uuid.uuid4(), uuid.uuid4()
    with orchestrator_process(tmp_path) as url:
        body = f.raw(f.message(markup, name="[/]", res=f.resources(gpus_free_total=[(9.0, 9.0)])))
        resp = httpx.post(
            f"{url}/api/v1/agents/{markup}/heartbeat",
            content=body,
            headers=bearer(enroll(url, markup)),
        )
        assert resp.status_code == 200, resp.text
        hostile = "\x1b[2J\x1b[31mevil\nfake-row  online"
        body = f.raw(f.message(forged, name="placeholder"))
        resp = httpx.post(
            f"{url}/api/v1/agents/{forged}/heartbeat",
            content=body,
            headers=bearer(enroll(url, forged)),
        )
        assert resp.status_code == 200, resp.text
        with sqlite3.connect(tmp_path / "chiffon.db") as db:
            db.execute("UPDATE agent_registry SET name = ? WHERE name = 'placeholder'", (hostile,))
        listed = run_cli("agents", "--orchestrator-url", url)
        capacity = run_cli("capacity", "--min-gpu-vram", "1", "--orchestrator-url", url)
    assert listed.returncode == 0, listed.stderr
    assert "[/]" in listed.stdout and "Traceback" not in listed.stderr
    assert "\x1b" not in listed.stdout
    rows = [line for line in listed.stdout.splitlines() if "online" in line]
    assert len(rows) == 2  # the newline forged no third row
    assert any(" [2J [31mevil fake-row  online" in row for row in rows)
    assert capacity.returncode == 0, capacity.stderr
    assert "[/]" in capacity.stdout


def test_agents_fit_80_columns_keeping_name_status_and_gpus(fleet_url: str) -> None:
    narrow = run_cli("agents", "--orchestrator-url", fleet_url, env={"COLUMNS": "80"})
    lines = narrow.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert "…" not in narrow.stdout
    header = lines[0].split()
    assert header[:3] == ["NAME", "STATUS", "GPUS"] and "ID" not in header
    assert "20.0/24.0 GB, 22.0/24.0 GB" in narrow.stdout and "online" in narrow.stdout
    wide = run_cli("agents", "-o", "wide", "--orchestrator-url", fleet_url, env={"COLUMNS": "80"})
    for column in ("NAME", "STATUS", "POOL", "LOAD1", "TYPE", "ID"):
        assert column in wide.stdout.splitlines()[0]
    assert "11111111" in wide.stdout


def test_label_selectors_filter_agents_and_capacity(fleet_url: str) -> None:
    url = ["--orchestrator-url", fleet_url, "--json"]
    names = lambda out: sorted(a["name"] for a in json.loads(out.stdout))  # noqa: E731
    assert names(run_cli("agents", "-l", "os=linux", *url)) == ["rich", "small"]
    assert names(run_cli("agents", "-l", "os=linux", "-l", "room=b12", *url)) == ["rich"]
    assert names(run_cli("capacity", "--min-cpu-cores", "1", "-l", "room=b12", *url)) == ["rich"]
    none = run_cli("capacity", "--min-cpu-cores", "1", "-l", "room=nowhere",
                   "--orchestrator-url", fleet_url)  # fmt: skip
    assert none.returncode == 3
    assert none.stdout.strip() == "no online agent has the labels room=nowhere"
    bad = run_cli("agents", "-l", "justakey", "--orchestrator-url", fleet_url)
    assert bad.returncode == 2 and "-l/--selector wants key=value" in bad.stderr


def test_status_summarises_the_fleet_like_ray_status(fleet_url: str) -> None:
    out = run_cli("status", "--orchestrator-url", fleet_url)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first == "2 online, 0 offline; free: 10/12 cores, 48.0/56.0 GB VRAM on 3 GPUs"
    assert "desktop_pool_1" in out.stdout


def test_completion_and_debug_are_offered() -> None:
    helped = run_cli("--help")
    assert "--install-completion" in helped.stdout and "--debug" in helped.stdout
    completed = run_cli(
        env={"_CHIFFON_COMPLETE": "complete_bash", "COMP_WORDS": "chiffon ag", "COMP_CWORD": "1"}
    )
    assert set(completed.stdout.split()) == {"agent", "agents"}


def test_rm_removes_an_agent_and_keeps_its_history(fleet_url: str) -> None:
    gone = uuid.uuid4()
    resp = httpx.post(
        f"{fleet_url}/api/v1/agents/{gone}/heartbeat",
        content=f.raw(f.message(gone, name="old-desk")),
        headers=bearer(enroll(fleet_url, gone)),
    )
    assert resp.status_code == 200, resp.text
    out = run_cli("agents", "rm", "old-desk", "--orchestrator-url", fleet_url)
    assert out.returncode == 0, out.stderr
    assert f"removed {gone} from the registry" in out.stdout
    listed = json.loads(run_cli("agents", "--json", "--orchestrator-url", fleet_url).stdout)
    assert "old-desk" not in {a["name"] for a in listed}
    events = run_cli("events", str(gone), "--json", "--orchestrator-url", fleet_url)
    assert [e["reason"] for e in json.loads(events.stdout)] == ["deregistered", "registered"]
    again = run_cli("agents", "rm", "old-desk", "--orchestrator-url", fleet_url)
    assert again.returncode == 2


def test_revoke_bans_and_unban_lets_the_agent_enroll_again(fleet_url: str) -> None:
    agent = uuid.uuid4()
    credential = enroll(fleet_url, agent)
    beat = f.raw(f.message(agent, name="banned-desk"))
    url = f"{fleet_url}/api/v1/agents/{agent}/heartbeat"
    assert httpx.post(url, content=beat, headers=bearer(credential)).status_code == 200
    revoked = run_cli("agents", "revoke", "banned-desk", "--orchestrator-url", fleet_url)
    assert revoked.returncode == 0, revoked.stderr
    assert f"chiffon agents unban {agent}" in revoked.stdout
    refused = httpx.post(url, content=beat, headers=bearer(credential))
    assert refused.status_code == 401 and refused.json()["detail"].startswith("revoked")
    lifted = run_cli("agents", "unban", str(agent), "--orchestrator-url", fleet_url)
    assert lifted.returncode == 0 and f"lifted the ban of {agent}" in lifted.stdout
    assert enroll(fleet_url, agent).secret != credential.secret


def test_agents_show_the_owners_side_and_wide_shows_the_reliability_record(
    tmp_path: Path,
) -> None:
    at_desk, away = uuid.uuid4(), uuid.uuid4()
    with orchestrator_process(tmp_path) as url:
        for agent, name, owner in ((at_desk, "at-desk", {"jobs_withheld": "owner_active",
                                                         "owner_idle_seconds": 4.0}),
                                   (away, "away", {"owner_idle_seconds": 1800.0})):  # fmt: skip
            res = f.resources(gpus_free_total=[(20.0, 24.0)]).model_copy(update=owner)
            gpus = [res.gpus[0].model_copy(update={"withheld": owner.get("jobs_withheld")})]
            msg = f.message(agent, name=name, res=res.model_copy(update={"gpus": gpus}))
            msg = msg.model_copy(update={"accepts_jobs": name == "away"})
            resp = httpx.post(f"{url}/api/v1/agents/{agent}/heartbeat", content=f.raw(msg),
                              headers=bearer(enroll(url, agent)))  # fmt: skip
            assert resp.status_code == 200, resp.text
        wide = run_cli("agents", "-o", "wide", "--orchestrator-url", url)
    assert wide.returncode == 0, wide.stderr
    rows = {line.split()[0]: line for line in wide.stdout.splitlines()[1:]}
    assert "OWNER" in wide.stdout.splitlines()[0] and "7 DAYS" in wide.stdout.splitlines()[0]
    assert "20.0/24.0 GB (owner_active)" in rows["at-desk"] and " active " in rows["at-desk"]
    assert "away 30m" in rows["away"] and "(owner_active)" not in rows["away"]
    assert all("0 off, 0 taken back" in row for row in rows.values())


def test_wide_agents_show_the_sandbox_and_run_can_require_it(fleet_url: str) -> None:
    wide = run_cli("agents", "-o", "wide", "--orchestrator-url", fleet_url)
    assert wide.returncode == 0, wide.stderr
    assert "SANDBOX" in wide.stdout.splitlines()[0]
    rows = {line.split()[0]: line for line in wide.stdout.splitlines()[1:]}
    assert rows["rich"].rstrip().endswith("cgroup+mem+home+dev")
    assert rows["small"].rstrip().endswith(" -")
    url = ["--orchestrator-url", fleet_url]
    done = run_cli("run", "--detach", "--require-sandbox", "--gpus", "1", "--vram", "100", *url,
                   "--", "true")  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    shown = json.loads(run_cli("jobs", "show", job_id, "--json", *url).stdout)
    assert shown["requirements"]["require_sandbox"] is True
    assert "a full sandbox" in run_cli("jobs", "show", job_id, *url).stdout
    assert run_cli("jobs", "cancel", job_id, *url).returncode == 0
