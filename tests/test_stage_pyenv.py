"""`--python-env` on the agent: the snapshot's requirements.txt (or uv.lock) builds an
environment once in the agent's cache, the job runs inside it (first on its PATH, even in
the sandbox, where the cache is hidden), and its log's first line says which it got.
Offline: the locks name no package an index would have to serve."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import pytest

from chiffon.agent.pyenv import ensure
from chiffon.agent.report import Snapshot
from chiffon.agent.runner import Assignment, JobRun
from chiffon.agent.sandbox import Sandbox, SandboxConfig
from chiffon.agent.work import WorkLoop, WorkSettings
from chiffon.schemas.files import Entry, Manifest
from tests.test_stage_files import Store, sha
from tests.test_work_loop import AGENT, SECRET, Orchestrator, machine, order

PREFIX = "import sys; print(sys.prefix)"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))


async def test_a_job_runs_in_the_environment_its_requirements_name(tmp_path: Path) -> None:
    requirements = b"# nothing to install\n"
    manifest = Manifest.of([Entry("requirements.txt", sha(requirements), len(requirements))])
    store = Store({sha(requirements): requirements, manifest.digest: manifest.to_bytes()})
    orch, job = Orchestrator(), uuid.uuid4()
    settings = WorkSettings(accept_jobs="always", jobs_dir=tmp_path / "jobs", allow_root=True,
                            grace_seconds=0.5)  # fmt: skip

    async def fresh() -> Snapshot:
        return machine({})

    work = WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=orch, fresh=fresh,
                    files=store)  # fmt: skip
    for n in (1, 2):
        await work.handle(*order(job, attempt=n, command=["python", "-c", PREFIX],
                                 snapshot=manifest.digest, python_env=True))  # fmt: skip
        await orch.until(job, 2 * n)
    first, second = (bytes(orch.logs[(job, n)]).decode().splitlines() for n in (1, 2))
    assert orch.said(job) == ["started", "exit", "started", "exit"]
    assert first[0].startswith("chiffon: python environment ") and "built in" in first[0]
    assert second[0].endswith("from requirements.txt (from the cache)")
    assert first[1] == second[1] and first[1].startswith(str(tmp_path / "cache" / "envs"))


async def test_a_failed_build_ends_the_attempt_in_uvs_words(tmp_path: Path) -> None:
    requirements = b"no-such-package-chiffon==1.0\n"
    manifest = Manifest.of([Entry("requirements.txt", sha(requirements), len(requirements))])
    store = Store({sha(requirements): requirements, manifest.digest: manifest.to_bytes()})
    orch, job = Orchestrator(), uuid.uuid4()
    settings = WorkSettings(accept_jobs="always", jobs_dir=tmp_path / "jobs", allow_root=True)

    async def fresh() -> Snapshot:
        return machine({})

    work = WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=orch, fresh=fresh,
                    files=store)  # fmt: skip
    await work.handle(*order(job, command=["python", "-c", PREFIX], snapshot=manifest.digest,
                             python_env=True))  # fmt: skip
    await orch.until(job, 1)
    [(_, _, said)] = orch.reports
    assert said["exit_code"] is None
    assert "building the python environment failed" in said["detail"]


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux only")
async def test_a_sandboxed_job_runs_in_its_environment_the_cache_still_hidden(
    tmp_path: Path,
) -> None:
    from tests.test_sandbox import pytestmark as needs_root

    if needs_root.args[0]:
        pytest.skip(needs_root.kwargs["reason"])
    data_dir = Path("/var/lib") / f"chiffon-test-pyenv-{uuid.uuid4().hex[:8]}"
    try:
        folder = data_dir / "jobs" / "p-1" / "work"
        folder.mkdir(parents=True)
        (folder / "requirements.txt").write_text("# nothing\n")
        env = await ensure(folder, data_dir / "cache" / "envs")
        sandbox = Sandbox(SandboxConfig(hide=[data_dir]))
        sandbox.start()
        run = JobRun(Assignment(job_id="p", attempt=1, command=["python", "-c", PREFIX]),
                     attempt_dir=data_dir / "jobs" / "p-1",
                     unit=sandbox.unit("p-1", memory_gb=0))  # fmt: skip
        run.python_env, run.preface = env.path, env.line().encode()
        await run.start()
        ended = await asyncio.wait_for(run.wait(), 60)
        lines = run.log_path.read_text().splitlines()
        assert ended.exit_code == 0, lines
        assert lines == [env.line().strip(), str(env.path)]
    finally:
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
