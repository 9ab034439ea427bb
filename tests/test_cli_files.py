"""`chiffon run` sends the folder it is run from, `chiffon get` and `run` bring a job's
outputs back, `jobs show` says what travelled: the real CLI in a subprocess against a real
orchestrator (both engines) whose desktop is played over the agent's own HTTP routes, so
the test decides when the attempt saves its outputs and ends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from chiffon.cli.sync import human_bytes, snapshot
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.files import Entry, Link, Manifest
from chiffon.transport.orders import order_key, verify
from tests.auth import API_HEADERS, TOKENS_ENV, AgentCredential, bearer, issue
from tests.conftest import api_client, serving
from tests.jobfleet import desktop
from tests.procs import CHIFFON


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chiffon(url: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHIFFON, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **TOKENS_ENV, "CHIFFON_ORCHESTRATOR_URL": url, **env},
    )  # fmt: skip


@dataclass
class Pool:
    """The orchestrator on a socket, one desktop played by the test, the user's API."""

    orch: Orchestrator
    clock: ManualClock
    url: str
    user: httpx.AsyncClient
    desk: httpx.AsyncClient
    agent: uuid.UUID
    credential: AgentCredential

    async def cli(self, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(chiffon, self.url, *args, cwd=cwd, **env)

    async def job(self, job_id: str) -> dict[str, Any]:
        got: dict[str, Any] = (await self.user.get(f"/api/v1/jobs/{job_id}")).json()
        return got

    async def place(self) -> tuple[str, int]:
        """Place the queued job on the desktop: (job id, attempt)."""
        await self.orch.dispatcher.tick()
        orders = (await self.desk.get(f"/api/v1/agents/{self.agent}/orders")).json()["orders"]
        opened = verify(orders[-1]["body"].encode(), orders[-1]["signature"],
                        key=order_key(self.credential.secret), agent_id=self.agent,
                        now=self.clock.now().timestamp())  # fmt: skip
        return str(opened.job_id), opened.attempt

    async def save(
        self,
        job_id: str,
        attempt: int,
        kind: str,
        files: dict[str, bytes],
        links: dict[str, str] | None = None,
        executable: tuple[str, ...] = (),
    ) -> None:
        """The attempt saves `files` (and `links`) as its outputs or checkpoint."""
        mine = f"/api/v1/agents/{self.agent}/attempts/{job_id}/{attempt}"
        entries = [Entry(p, sha(d), len(d), p in executable) for p, d in files.items()]
        manifest = Manifest.of(entries, [Link(p, t) for p, t in (links or {}).items()])
        for data in [*files.values(), manifest.to_bytes()]:
            stored = await self.desk.put(f"{mine}/blobs/{sha(data)}", content=data)
            assert stored.status_code in (200, 201), stored.text
        body = {"kind": kind, "manifest": manifest.digest}
        said = await self.desk.post(f"{mine}/files", json=body)
        assert said.json() == {"verdict": "applied"}, said.text

    async def report(self, job_id: str, attempt: int, **body: Any) -> None:
        mine = f"/api/v1/agents/{self.agent}/attempts/{job_id}/{attempt}"
        said = await self.desk.post(mine, json=body)
        assert said.json()["verdict"] == "applied", said.text
        self.clock.advance(1)

    async def queued(self) -> str:
        """The id of the job the CLI submitted, once it is there."""
        for _ in range(300):
            jobs = (await self.user.get("/api/v1/jobs")).json()
            if jobs:
                return str(jobs[0]["job_id"])
            await asyncio.sleep(0.1)
        raise AssertionError("the CLI submitted no job")


@pytest.fixture
async def pool(orchestrator: Orchestrator, clock: ManualClock) -> AsyncIterator[Pool]:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    async with (
        serving(orchestrator) as url,
        api_client(orchestrator, API_HEADERS) as user,
        api_client(orchestrator, bearer(credential)) as desk,
    ):
        yield Pool(orchestrator, clock, url, user, desk, agent, credential)


def project(root: Path) -> Path:
    """A small git project: code, data, an ignored log and a scratch folder left out."""
    root.mkdir()
    files = {"train.py": "print('training')\n", "data.csv": "x,y\n1,2\n",
             ".gitignore": "*.log\n", ".chiffonignore": "scratch/\n", "run.log": "noise",
             "scratch/tmp.bin": "left home"}  # fmt: skip
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def row(table: str, label: str) -> str:
    """The value `jobs show` gives beside `label`."""
    found = [ln[len(label) :].strip() for ln in table.splitlines() if ln.startswith(label + " ")]
    assert len(found) == 1, table
    return found[0]


def said(done: subprocess.CompletedProcess[str], start: str) -> str:
    """The one line of the CLI's own words on stderr that starts with `start`."""
    lines = [ln.removeprefix("chiffon: ") for ln in done.stderr.splitlines()]
    found = [ln for ln in lines if ln.startswith(start)]
    assert len(found) == 1, done.stderr
    return found[0]


async def test_run_sends_the_folder_once_then_only_what_changed(pool: Pool, tmp_path: Path) -> None:
    folder = project(tmp_path / "proj")
    size = human_bytes(snapshot(folder, max_bytes=10**9).manifest.total_bytes)
    first = await pool.cli("run", "--detach", "--", "python", "train.py", cwd=folder)
    assert first.returncode == 0, first.stderr
    assert said(first, "sending") == (f"sending 4 files, {size}; .gitignore and "
                                      ".chiffonignore honoured; 4 new")  # fmt: skip
    job = await pool.job(first.stdout.strip())
    assert job["snapshot"] == snapshot(folder, max_bytes=10**9).digest
    again = await pool.cli("run", "--detach", "--", "python", "train.py", cwd=folder)
    assert said(again, "sending").endswith("; 0 new")
    (folder / "train.py").write_text("print('training, better')\n")
    changed = await pool.cli("run", "--detach", "--", "python", "train.py", cwd=folder)
    assert said(changed, "sending").endswith("; 1 new")
    job = await pool.job(changed.stdout.strip())
    assert job["snapshot"] == snapshot(folder, max_bytes=10**9).digest
    stored = await pool.user.post("/api/v1/blobs/missing", json={"sha256": [job["snapshot"]]})
    assert stored.json() == {"missing": []}


async def test_no_sync_and_workdir_send_nothing(pool: Pool, tmp_path: Path) -> None:
    folder = project(tmp_path / "proj")
    for flags in (["--no-sync"], ["--workdir", str(tmp_path)]):
        done = await pool.cli("run", "--detach", *flags, "--", "true", cwd=folder)
        assert done.returncode == 0, done.stderr
        assert "sending" not in done.stderr
        assert (await pool.job(done.stdout.strip()))["snapshot"] is None


async def test_bad_files_input_is_one_line_and_submits_nothing(pool: Pool, tmp_path: Path) -> None:
    folder = project(tmp_path / "proj")
    (folder / "big.bin").write_bytes(b"b" * 5000)
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--out", "../secrets"], {}, "--out '../secrets' has a '..'"),
        (["--out", "/etc/passwd"], {}, "--out '/etc/passwd' is absolute"),
        (["--checkpoint-every", "often"], {}, "--checkpoint-every wants a duration"),
        (["--checkpoint-every", "5s"], {}, "--checkpoint-every must be at least 10s"),
        (["--sync-max-mb", "0.004"], {}, "largest: big.bin (5.0 kB), "),
        ([], {"CHIFFON_SYNC_MAX_MB": "0.004"}, "over the 4.0 kB cap"),
        ([], {"CHIFFON_SYNC_MAX_MB": "many"}, "bad setting max_mb = 'many' (from env "
                                              "CHIFFON_SYNC_MAX_MB)"),
    ]  # fmt: skip
    for flags, env, words in cases:
        done = await pool.cli("run", *flags, "--", "true", cwd=folder, **env)
        assert done.returncode == 2, (flags, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    (folder / "big.bin").unlink()
    (folder / "etc").symlink_to("/etc")
    done = await pool.cli("run", "--", "true", cwd=folder)
    assert done.returncode == 2
    assert done.stderr.startswith("error: etc is a link to /etc, outside the folder sent")
    assert (await pool.user.get("/api/v1/jobs")).json() == []


async def test_outputs_come_back_when_the_job_ends_and_again_with_get(
    pool: Pool, tmp_path: Path
) -> None:
    folder = project(tmp_path / "proj")
    model, loss, script = os.urandom(300_000), b"step,loss\n1,0.5\n", b"#!/bin/sh\necho hi\n"
    running = asyncio.create_task(pool.cli(
        "run", "--out", "model.pt", "--out", "results/**", "--checkpoint-every", "10m",
        "--", "python", "train.py", cwd=folder))  # fmt: skip
    job_id = await pool.queued()
    placed, attempt = await pool.place()
    assert placed == job_id
    await pool.report(job_id, attempt, kind="started")
    await pool.save(job_id, attempt, "output",
                    {"model.pt": model, "results/loss.csv": loss, "results/plot.sh": script},
                    links={"results/latest.csv": "loss.csv"},
                    executable=("results/plot.sh",))  # fmt: skip
    await pool.report(job_id, attempt, kind="ended", outcome="exit", exit_code=0,
                      runtime_seconds=1.0)  # fmt: skip
    done = await running
    assert done.returncode == 0, done.stderr
    total = human_bytes(len(model) + len(loss) + len(script))
    assert said(done, "3 output files") == f"3 output files, {total}, in chiffon-out/{job_id}"
    back = folder / "chiffon-out" / job_id
    assert (back / "model.pt").read_bytes() == model
    assert (back / "results" / "loss.csv").read_bytes() == loss
    assert os.access(back / "results" / "plot.sh", os.X_OK)
    assert os.readlink(back / "results" / "latest.csv") == "loss.csv"
    assert not [p for p in back.rglob("*") if p.name.endswith((".part", ".link"))]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "trap").mkdir()
    (tmp_path / "trap" / "results").symlink_to(elsewhere)
    trapped = await pool.cli("get", job_id, "--to", str(tmp_path / "trap"), cwd=tmp_path)
    assert trapped.returncode == 1
    assert trapped.stderr.startswith("error: results/") and "leads outside" in trapped.stderr
    assert list(elsewhere.iterdir()) == []

    later = await pool.cli("get", job_id[:8], "--to", str(tmp_path / "copy"), cwd=tmp_path)
    assert later.returncode == 0, later.stderr
    assert later.stdout.strip() == f"3 output files, {total}, in {tmp_path / 'copy'}"
    assert (tmp_path / "copy" / "model.pt").read_bytes() == model

    shown = await pool.cli("jobs", "show", job_id, cwd=tmp_path, COLUMNS="200")
    assert shown.returncode == 0, shown.stderr
    snap = (await pool.job(job_id))["snapshot"]
    assert row(shown.stdout, "snapshot") == snap[:12]
    assert row(shown.stdout, "--out") == "model.pt  results/**"
    assert row(shown.stdout, "outputs saved") == f"3 files, {total} (attempt 1)"


async def test_get_says_when_a_job_has_no_outputs(pool: Pool, tmp_path: Path) -> None:
    done = await pool.cli("run", "--detach", "--no-sync", "--", "true", cwd=tmp_path)
    job_id = done.stdout.strip()
    got = await pool.cli("get", job_id, cwd=tmp_path)
    assert got.returncode == 1
    assert got.stderr.strip() == (f"error: job {job_id} has no saved outputs (it was run "
                                  "without --out)")  # fmt: skip
    waiting = await pool.cli("run", "--detach", "--no-sync", "--out", "m.pt", "--", "true",
                             cwd=tmp_path)  # fmt: skip
    waiting_id = waiting.stdout.strip()
    got = await pool.cli("get", waiting_id, cwd=tmp_path)
    assert got.returncode == 1
    assert got.stderr.strip() == (f"error: job {waiting_id} has no saved outputs yet: it is "
                                  "queued, and they are saved when an attempt ends")  # fmt: skip
    unknown = await pool.cli("get", "ffffffff", cwd=tmp_path)
    assert unknown.returncode == 2 and "no job has the id" in unknown.stderr


async def test_jobs_show_says_which_checkpoint_an_attempt_resumed_from(
    pool: Pool, tmp_path: Path
) -> None:
    done = await pool.cli("run", "--detach", "--no-sync", "--retries", "1", "--", "true",
                          cwd=tmp_path)  # fmt: skip
    job_id = done.stdout.strip()
    _, first = await pool.place()
    await pool.report(job_id, first, kind="started")
    await pool.save(job_id, first, "checkpoint", {"step": b"7" * 1500})
    await pool.report(job_id, first, kind="ended", outcome="lost", detail="gone")
    await desktop(pool.orch, "a", (24.0, 24.0), agent=pool.agent)
    _, second = await pool.place()
    await pool.report(job_id, second, kind="started")
    shown = await pool.cli("jobs", "show", job_id, cwd=tmp_path, COLUMNS="200")
    assert "resumed from attempt 1's checkpoint (1.5 kB)" in shown.stdout, shown.stdout
    assert row(shown.stdout, "checkpoint") == "1 file, 1.5 kB (attempt 1)"


async def test_a_file_changed_between_snapshot_and_upload_is_named_and_nothing_is_sent(
    pool: Pool, tmp_path: Path
) -> None:
    from chiffon.cli.common import CliError
    from chiffon.cli.sync import send
    from chiffon.client import Client

    folder = project(tmp_path / "proj")
    snap = snapshot(folder, max_bytes=10**9)
    (folder / "train.py").write_text("print('edited meanwhile')\n")
    told: list[str] = []
    with (
        Client(pool.url, token=TOKENS_ENV["CHIFFON_API_TOKEN"]) as c,
        pytest.raises(CliError) as caught,
    ):
        await asyncio.to_thread(send, c, snap, told.append)
    assert str(caught.value).startswith(f"{folder / 'train.py'} changed while it was sent")
    assert told == [snap.summary(new=4)]
    stored = await pool.user.post("/api/v1/blobs/missing", json={"sha256": [snap.digest]})
    assert stored.json() == {"missing": [snap.digest]}  # no manifest: nothing half-sent


async def test_thousands_of_hashes_are_asked_about_in_requests_the_api_takes(pool: Pool) -> None:
    from chiffon.client import Client

    hashes = {sha(str(i).encode()) for i in range(2500)}
    with Client(pool.url, token=TOKENS_ENV["CHIFFON_API_TOKEN"]) as c:
        assert await asyncio.to_thread(c.missing_blobs, hashes) == hashes
