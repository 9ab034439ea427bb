"""A job's files between a real orchestrator (its API on a socket, both engines) and the
agent's work loop over HTTP: the snapshot is fetched, checked and laid in; outputs and the
checkpoint come back byte for byte; a dropped download resumes; a tampered blob, and a
desktop whose disk cannot hold the files, are refused with one line naming why."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chiffon.agent.report import Snapshot
from chiffon.agent.work import WorkLoop, WorkSettings
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.files import Entry, Manifest
from chiffon.transport.auth import AgentCredential
from chiffon.transport.http import HttpWork
from chiffon.transport.memory import InMemoryWork
from tests.auth import API_HEADERS, issue
from tests.conftest import api_client, serving
from tests.jobfleet import desktop
from tests.services import eventually
from tests.test_work_loop import machine

TRAIN = b"""\
import os, pathlib
cp = pathlib.Path(os.environ["CHIFFON_CHECKPOINT_DIR"])
step = int((cp / "step").read_text()) if (cp / "step").exists() else 0
data = pathlib.Path("data.bin").read_bytes()
pathlib.Path("model.pt").write_bytes(data[::-1])
pathlib.Path("results").mkdir(exist_ok=True)
pathlib.Path("results/log.txt").write_text(f"resumed at {step}\\n")
os.symlink("/etc/passwd", "results/passwd")
(cp / "step").write_text(str(step + 5))
print("trained", step)
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def upload(user: httpx.AsyncClient, files: dict[str, bytes]) -> str:
    """The folder's blobs and its manifest stored; the manifest's hash."""
    manifest = Manifest.of(Entry(p, sha(d), len(d)) for p, d in files.items())
    for data in [*files.values(), manifest.to_bytes()]:
        resp = await user.put(f"/api/v1/blobs/{sha(data)}", content=data)
        assert resp.status_code in (200, 201), resp.text
    return manifest.digest


class Proxy:
    """A TCP relay to the orchestrator that does to one blob's download what a bad
    network does: `drop_at` closes its first connection after that many bytes of answer;
    `flip_at` changes the byte at that offset of every answer for it."""

    def __init__(self, upstream_port: int, blob: str) -> None:
        self.upstream_port, self.blob = upstream_port, blob.encode()
        self.drop_at: int | None = None
        self.flip_at: int | None = None
        self.requests: list[bytes] = []
        self.port = 0
        self._open: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._open:
            writer.close()
        await asyncio.sleep(0.05)  # the relays see their connections closed

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._open += [writer, up_writer]
        first = await reader.read(65536)
        up_writer.write(first)
        ours = first.startswith(b"GET") and self.blob in first.split(b"\r\n", 1)[0]
        if ours:
            self.requests.append(first)
        upward = asyncio.create_task(_pipe(reader, up_writer))
        sent, drop = 0, self.drop_at if ours else None
        self.drop_at = None if ours else self.drop_at
        try:
            while chunk := await up_reader.read(65536):
                if ours and self.flip_at is not None and sent <= self.flip_at < sent + len(chunk):
                    i = self.flip_at - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                if drop is not None and sent + len(chunk) >= drop:
                    writer.write(chunk[: drop - sent])
                    break
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
        finally:
            upward.cancel()
            writer.close()
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()


class Desk:
    """The agent's work loop on this desktop, over HTTP to the orchestrator."""

    def __init__(self, orch: Orchestrator, clock: ManualClock, url: str, files_url: str,
                 agent: uuid.UUID, cred: AgentCredential, tmp: Path) -> None:  # fmt: skip
        self.orch, self.channel = orch, HttpWork(url, cred)
        self.files = HttpWork(files_url, cred)
        settings = WorkSettings(accept_jobs="always", jobs_dir=tmp / "jobs", allow_root=True,
                                grace_seconds=0.5)  # fmt: skip

        async def fresh() -> Snapshot:
            return machine({"GPU-a-0": 24.0, "GPU-a-1": 24.0})

        self.work = WorkLoop(settings, agent_id=agent, secret=cred.secret, channel=self.channel,
                             fresh=fresh, clock=lambda: clock.now().timestamp(),
                             files=self.files)  # fmt: skip

    async def take(self) -> None:
        await self.orch.dispatcher.tick()
        for body, signature in await self.channel.orders(wait_seconds=0):
            await self.work.handle(body, signature)

    async def close(self) -> None:
        await self.work.stop()
        await self.channel.aclose()
        await self.files.aclose()


@contextlib.asynccontextmanager
async def desk(orch: Orchestrator, clock: ManualClock, tmp: Path,
               proxied: str | None = None) -> AsyncIterator[tuple[Desk, Proxy | None]]:  # fmt: skip
    agent = uuid.uuid4()
    await desktop(orch, "a", (24.0, 24.0), (24.0, 24.0), agent=agent)
    cred = await issue(orch, agent)
    async with serving(orch) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy = Proxy(port, proxied) if proxied else None
        async with contextlib.AsyncExitStack() as stack:
            if proxy is not None:
                await stack.enter_async_context(proxy)
            files_url = f"http://127.0.0.1:{proxy.port}" if proxy else url
            d = Desk(orch, clock, url, files_url, agent, cred, tmp)
            try:
                yield d, proxy
            finally:
                await d.close()


async def submit(user: httpx.AsyncClient, snap: str, **more: Any) -> str:
    job = {"command": [sys.executable, "train.py"], "snapshot": snap,
           "requirements": {"gpus": 1, "vram_gb": 20}, **more}  # fmt: skip
    resp = await user.post("/api/v1/jobs", json=job)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["job"]["job_id"])


async def ended(user: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """The job's last attempt, once it ended."""
    shown: dict[str, Any] = {}

    async def over() -> bool:
        shown.update((await user.get(f"/api/v1/jobs/{job_id}")).json())
        attempts = shown.get("attempts") or []
        return bool(attempts) and attempts[-1].get("ended_at") is not None

    await eventually(over, within_seconds=30)
    return dict(shown["attempts"][-1])


async def test_a_snapshot_runs_and_its_outputs_and_checkpoint_come_back_byte_for_byte(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path, proxied=sha(data)) as (d, proxy),
    ):
        assert proxy is not None
        proxy.drop_at = 120_000  # the first download of data.bin is cut: it resumes
        snap = await upload(user, {"train.py": TRAIN, "data.bin": data})
        job_id = await submit(user, snap, outputs=["model.pt", "results/**"])
        await d.take()
        last = await ended(user, job_id)
        assert last["exit_code"] == 0, last
        assert [r.split(b"\r\n", 1)[0].startswith(b"GET") for r in proxy.requests] == [True] * 2
        assert b"range: bytes=" in proxy.requests[1].lower()
        files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
        got = {e["path"]: e["sha256"] for e in files["outputs"]["entries"]}
        assert sorted(got) == ["model.pt", "results/log.txt"]  # never the link to /etc/passwd
        model = await user.get(f"/api/v1/blobs/{got['model.pt']}")
        assert model.content == data[::-1]
        log = await user.get(f"/api/v1/blobs/{got['results/log.txt']}")
        assert log.content == b"resumed at 0\n"
        [step] = files["checkpoint"]["entries"]
        assert (step["path"], (await user.get(f"/api/v1/blobs/{step['sha256']}")).content) == (
            "step", b"5")  # fmt: skip


async def test_a_tampered_blob_is_refused_naming_it_and_nothing_is_laid_out(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path, proxied=sha(data)) as (d, proxy),
    ):
        assert proxy is not None
        proxy.flip_at = 50_000  # in the body, whatever the headers' length
        snap = await upload(user, {"train.py": TRAIN, "data.bin": data})
        job_id = await submit(user, snap)
        await d.take()
        last = await ended(user, job_id)
        assert last["exit_code"] is None
        assert f"blob {sha(data)} arrived with other content" in last["reason"], last
        attempt_dir = tmp_path / "jobs" / f"{job_id}-1"
        assert not (attempt_dir / "work").exists()
        assert not (attempt_dir / ".work-staging").exists()
        assert not d.work._parts.cache or not d.work._parts.cache.has(sha(data))


async def test_a_desktop_whose_disk_cannot_hold_the_files_refuses_the_attempt(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chiffon.agent.hooks.files.free_bytes", lambda path: 10 * 1024**2)
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path) as (d, _),
    ):
        snap = await upload(user, {"train.py": TRAIN, "data.bin": b"x" * 1000})
        job_id = await submit(user, snap)
        await d.take()
        last = await ended(user, job_id)
        assert last["state"] == "refused", last
        assert "this desktop's disk cannot hold the job's files" in last["reason"]
        assert not (tmp_path / "jobs" / f"{job_id}-1" / "work").exists()


RESUMING = b"""\
import os, pathlib, sys
cp = pathlib.Path(os.environ["CHIFFON_CHECKPOINT_DIR"])
step = int((cp / "step").read_text()) if (cp / "step").exists() else 0
pathlib.Path("done.txt").write_text(f"resumed at {step}\\n")
(cp / "step").write_text(str(step + 5))
sys.exit(3 if step == 0 else 0)
"""


async def test_the_next_attempt_starts_from_the_checkpoint_the_last_one_left(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path) as (d, _),
    ):
        snap = await upload(user, {"train.py": RESUMING})
        job_id = await submit(user, snap, outputs=["done.txt"], retries=1, retry_on_exit=True)
        await d.take()
        first = await ended(user, job_id)
        assert first["exit_code"] == 3, first
        clock.advance(1)
        await d.take()

        async def second_ended() -> bool:
            attempts = (await user.get(f"/api/v1/jobs/{job_id}")).json()["attempts"]
            return len(attempts) == 2 and attempts[1]["ended_at"] is not None

        await eventually(second_ended, within_seconds=30)
        shown = (await user.get(f"/api/v1/jobs/{job_id}")).json()
        second = shown["attempts"][1]
        assert (second["exit_code"], second["resumed_from"]) == (0, 1), second
        files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
        [done] = files["outputs"]["entries"]
        assert (await user.get(f"/api/v1/blobs/{done['sha256']}")).content == b"resumed at 5\n"
        [step] = files["checkpoint"]["entries"]
        assert (await user.get(f"/api/v1/blobs/{step['sha256']}")).content == b"10"


ASKING = b"""\
import os, pathlib, time
cp = pathlib.Path(os.environ["CHIFFON_CHECKPOINT_DIR"])
(cp / "step").write_text("1")
pathlib.Path(os.environ["CHIFFON_CHECKPOINT_SAVE"]).touch()
time.sleep(60)
"""


async def test_a_job_asks_for_a_save_while_it_runs_and_gets_it(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    """What a job on a desktop that dies resumes from: saved while it ran."""
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path) as (d, _),
    ):
        snap = await upload(user, {"train.py": ASKING})
        job_id = await submit(user, snap)
        await d.take()

        async def saved() -> bool:
            files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
            return files["checkpoint"] is not None

        await eventually(saved, within_seconds=20)
        assert d.work.running != []  # saved while it runs
        marker = tmp_path / "jobs" / f"{job_id}-1" / "checkpoint" / ".chiffon-save"
        assert not marker.exists()  # taken
        files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
        assert [e["path"] for e in files["checkpoint"]["entries"]] == ["step"]


async def test_an_agent_inside_its_orchestrator_moves_files_through_its_store(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    """`chiffon up`: the in-memory twin of the HTTP channel, the same outcome."""
    agent = uuid.uuid4()
    await desktop(orchestrator, "a", (24.0, 24.0), (24.0, 24.0), agent=agent)
    cred = await issue(orchestrator, agent)
    channel = InMemoryWork(orchestrator, agent, store=orchestrator.store)
    settings = WorkSettings(accept_jobs="always", jobs_dir=tmp_path / "jobs", allow_root=True,
                            grace_seconds=0.5)  # fmt: skip

    async def fresh() -> Snapshot:
        return machine({"GPU-a-0": 24.0, "GPU-a-1": 24.0})

    work = WorkLoop(settings, agent_id=agent, secret=cred.secret, channel=channel, fresh=fresh,
                    clock=lambda: clock.now().timestamp())  # fmt: skip
    data = os.urandom(50_000)
    try:
        async with api_client(orchestrator, API_HEADERS) as user:
            snap = await upload(user, {"train.py": TRAIN, "data.bin": data})
            job_id = await submit(user, snap, outputs=["model.pt"])
            await orchestrator.dispatcher.tick()
            for body, signature in await channel.orders(wait_seconds=0):
                await work.handle(body, signature)
            last = await ended(user, job_id)
            assert last["exit_code"] == 0, last
            files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
            [model] = files["outputs"]["entries"]
            assert (await user.get(f"/api/v1/blobs/{model['sha256']}")).content == data[::-1]
            assert [e["path"] for e in files["checkpoint"]["entries"]] == ["step"]
    finally:
        await work.stop()


VACATED = b"""\
import os, pathlib, signal, time
cp = pathlib.Path(os.environ["CHIFFON_CHECKPOINT_DIR"])

def save(signum, frame):
    (cp / "step").write_text("42")
    raise SystemExit(0)

signal.signal(signal.SIGUSR1, save)
pathlib.Path("started").touch()
time.sleep(60)
"""


async def test_a_job_vacated_by_the_owner_leaves_its_checkpoint_for_the_next_desktop(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path) as (d, _),
    ):
        snap = await upload(user, {"train.py": VACATED})
        job_id = await submit(user, snap)
        await d.take()
        started = tmp_path / "jobs" / f"{job_id}-1" / "work" / "started"

        async def running() -> bool:
            return started.exists()

        await eventually(running, within_seconds=20)
        [run] = d.work.runs.values()
        await run.vacate("the owner is back")
        last = await ended(user, job_id)
        assert last["state"] == "preempted", last
        files = (await user.get(f"/api/v1/jobs/{job_id}/files")).json()
        [step] = files["checkpoint"]["entries"]
        assert (await user.get(f"/api/v1/blobs/{step['sha256']}")).content == b"42"


async def test_thousands_of_files_are_asked_about_within_the_body_limit(
    orchestrator: Orchestrator, clock: ManualClock, tmp_path: Path
) -> None:
    many = {f"f{i}.txt": f"{i}\n".encode() for i in range(2500)}
    async with (
        api_client(orchestrator, API_HEADERS) as user,
        desk(orchestrator, clock, tmp_path) as (d, _),
    ):
        snap = await upload(user, {"train.py": b"import time; time.sleep(30)\n"})
        job_id = await submit(user, snap)
        await d.take()  # the attempt is out on this agent while it runs
        missing = await d.files.missing_blobs(uuid.UUID(job_id), 1, sorted(map(sha, many.values())))
    assert len(missing) == 2500
