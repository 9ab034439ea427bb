"""Shared fixtures: a real SQLite file and a real PostgreSQL database for every registry test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import db
from chiffon.persistence.models import Base
from tests.auth import API_TOKEN, ENROLL_TOKEN, SECRET_KEY
from tests.private_services import PrivatePostgres, PrivateRabbit
from tests.procs import free_port
from tests.services import POSTGRES_ADMIN_URL, eventually, listening_pids, need


@contextmanager
def fresh_postgres_database(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A throwaway PostgreSQL database migrated to head; dropped afterwards."""
    admin = make_url(admin_url)
    need("PostgreSQL", admin.host or "127.0.0.1", admin.port or 5432)
    name = f"chiffon_test_{uuid.uuid4().hex[:12]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The PostgreSQL database of this test run's registry tests."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test run's own, for the tests that stop one."""
    cluster = PrivatePostgres()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this test run's own, for the tests that stop one."""
    node = PrivateRabbit()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="session", autouse=True)
def system_services_untouched() -> Iterator[None]:
    """The machine's own PostgreSQL and RabbitMQ are used, never stopped: the processes
    listening on their ports are the same at the end of the run as at its start."""
    before = listening_pids()
    yield
    after = listening_pids()
    assert after == before, f"a system service was restarted: {before} -> {after}"


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = db.default_database_url(tmp_path_factory.mktemp("sqlite"))
    db.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each registry test runs on both engines, against an empty registry."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url


@asynccontextmanager
async def api_client(
    orchestrator: Orchestrator, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The orchestrator's API in process (ASGI), for one test."""
    app = create_app(orchestrator, manage_lifecycle=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chiffon", headers=headers
    ) as client:
        yield client


@asynccontextmanager
async def serving(orchestrator: Orchestrator) -> AsyncIterator[str]:
    """The orchestrator's API on a real socket, in this event loop (a blocking client
    runs in a thread); its base URL."""
    port = free_port()
    app = create_app(orchestrator, manage_lifecycle=False)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await eventually(started)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> OrchestratorSettings:
    return OrchestratorSettings(
        database_url=database_url,
        data_dir=tmp_path,
        heartbeat_interval_seconds=15,
        heartbeat_timeout_seconds=45,
        sweep_interval_seconds=5,
        ingest_batch_delay_ms=5,
        api_token=API_TOKEN,
        enroll_token=ENROLL_TOKEN,
        secret_key=SECRET_KEY,
    )


@pytest.fixture
async def orchestrator(
    settings: OrchestratorSettings, clock: ManualClock
) -> AsyncIterator[Orchestrator]:
    orch = Orchestrator(settings, clock=clock)
    async with orch.engine.begin() as conn:  # every table the models declare, children first
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(table.delete())
    await orch.start(sweep=False)
    yield orch
    await orch.stop()


@pytest.fixture
def job_visible_dir() -> Iterator[Path]:
    """A folder a sandboxed job sees and may write (agent.sandbox): outside /tmp (each
    job's /tmp is its own), outside the homes, open to the job user. For tests whose job
    leaves a mark or waits for one that the test reads or makes."""
    import shutil
    import tempfile

    base = Path("/var/lib") if os.access("/var/lib", os.W_OK) else Path.home()
    folder = Path(tempfile.mkdtemp(prefix="chiffon-test-shared-", dir=base))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
