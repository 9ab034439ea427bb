"""The work loop under the owner's policy, with real job processes and the GPUs' process
lists as the driver would give them (the fake is the snapshot, at the NVML boundary): an
exclusive app clears only its GPU, the owner's return vacates everything, an ended job's
leftovers are ended and its GPU is offered again only once clean."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from chiffon.agent.report import GpuReading, Snapshot
from chiffon.agent.runner import Ladder
from chiffon.agent.work import WorkLoop, WorkSettings
from tests.procs import alive
from tests.services import eventually
from tests.test_work_loop import AGENT, SECRET, Orchestrator, order

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]
QUICK_LADDER = Ladder("SIGUSR1", grace_seconds=0.3, kill_seconds=0.3)


class Desk:
    """Two 24 GB GPUs whose process lists and free memory the test sets."""

    def __init__(self) -> None:
        self.processes: dict[str, list[tuple[int, float]]] = {"GPU-0": [], "GPU-1": []}
        self.hidden_gb: dict[str, float] = {"GPU-0": 0.0, "GPU-1": 0.0}  # held by no process

    def snapshot(self) -> Snapshot:
        gpus = []
        for index, (gpu, listed) in enumerate(self.processes.items()):
            used = sum(gb for _, gb in listed) + self.hidden_gb[gpu]
            gpus.append(GpuReading(index=index, uuid=gpu, vendor="nvidia", vram_total_gb=24.0,
                                   vram_free_gb=24.0 - used, processes=tuple(listed)))  # fmt: skip
        free = [g.vram_free_gb or 0 for g in gpus]
        return Snapshot(gpus=gpus, gpu_count=2, gpu_type="nvidia", gpu_vram_total_gb=48.0,
                        gpu_vram_available_gb=sum(free),
                        gpu_vram_available_max_gb=max(free))  # fmt: skip

    async def fresh(self) -> Snapshot:
        return self.snapshot()


def work_loop(tmp_path: Path, orch: Orchestrator, desk: Desk, **policy: object) -> WorkLoop:
    settings = WorkSettings(jobs_dir=tmp_path / "jobs", allow_root=True, grace_seconds=0.5,
                            ladder=QUICK_LADDER, **{"accept_jobs": "always", **policy})  # type: ignore[arg-type]  # fmt: skip
    return WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=orch, fresh=desk.fresh)


@pytest.fixture
def blender(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A real process whose program is called blender (a copy of sleep)."""
    program = tmp_path / "blender"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    process = subprocess.Popen([str(program), "60"])
    yield process  # type: ignore[misc]
    process.kill()
    process.wait()


async def test_an_exclusive_app_vacates_only_the_job_on_its_gpu(
    tmp_path: Path, blender: subprocess.Popen[bytes]
) -> None:
    orch, desk = Orchestrator(), Desk()
    work = work_loop(tmp_path, orch, desk, exclusive_apps=("blender",))
    on0, on1 = uuid.uuid4(), uuid.uuid4()
    await work.handle(*order(on0, command=SLEEPER, gpu_uuids=["GPU-0"], vram_gb=8))
    await work.handle(*order(on1, command=SLEEPER, gpu_uuids=["GPU-1"], vram_gb=8))
    await orch.until(on0, 1)
    await orch.until(on1, 1)

    desk.processes["GPU-0"].append((blender.pid, 3.0))  # the owner opens Blender on GPU 0
    seen = work.observe(desk.snapshot())
    assert [g.withheld for g in seen.gpus] == ["exclusive_app", None]
    assert [g.foreign_processes for g in seen.gpus] == [1, 0]
    assert [g.foreign_names for g in seen.gpus] == [None, None]  # names: only if allowed
    await orch.until(on0, 2)
    [(_, _, said)] = [r for r in orch.reports if r[0] == on0 and r[2]["kind"] == "ended"]
    assert said["outcome"] == "preempted"
    assert "a program the owner named runs on it (GPU-0)" in said["detail"]
    work.observe(desk.snapshot())
    assert orch.said(on1) == ["started"] and (on1, 1) in work.running  # GPU 1 runs on
    await work.stop()


async def test_the_owners_return_vacates_every_job_and_reports_it_preempted(
    tmp_path: Path,
) -> None:
    orch, desk = Orchestrator(), Desk()
    work = work_loop(tmp_path, orch, desk, accept_jobs="when_idle", idle_minutes=10)
    idle = [3600.0]
    changes: list[str | None] = []
    guarding = asyncio.create_task(
        work.guard(
            lambda: (idle[0], None),
            lambda: changes.append(work.decision.desktop),
            every_seconds=0.05,
            gpu_every_seconds=0.05,
        )
    )
    await eventually(_true(lambda: work.accepting_now()))
    on_gpu, on_cpu = uuid.uuid4(), uuid.uuid4()
    await work.handle(*order(on_gpu, command=SLEEPER, gpu_uuids=["GPU-1"]))
    await work.handle(*order(on_cpu, command=SLEEPER))
    await orch.until(on_gpu, 1)
    await orch.until(on_cpu, 1)
    idle[0] = 0.0  # the owner is back
    await orch.until(on_gpu, 2)
    await orch.until(on_cpu, 2)
    assert orch.said(on_gpu) == orch.said(on_cpu) == ["started", "preempted"]
    assert changes[0] is None and changes[-1] == "owner_active"  # welcome; refused at once
    assert changes.count("owner_active") == 1
    assert work.running == []
    guarding.cancel()
    await work.stop()


ESCAPING_JOB = (
    "import subprocess, sys\n"
    "left = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
    " start_new_session=True)\n"  # out of the job's process group
    "print(left.pid, flush=True)\n"
    "sys.stdin.read() if False else __import__('time').sleep(1.0)\n"
)


async def test_a_dirty_gpu_is_offered_again_only_once_its_memory_is_back(
    tmp_path: Path,
) -> None:
    orch, desk = Orchestrator(), Desk()
    work = work_loop(tmp_path, orch, desk)
    job = uuid.uuid4()
    await work.handle(*order(job, command=[PY, "-c", ESCAPING_JOB], gpu_uuids=["GPU-0"]))
    [run] = list(work.runs.values())
    await eventually(_true(lambda: bool(run.log_path.exists() and run.log_path.read_bytes())))
    escaped = int(run.log_path.read_text().split()[0])
    try:
        desk.processes["GPU-0"] = [(escaped, 4.0)]
        seen = work.observe(desk.snapshot())  # while the job runs: its memory, by its env
        assert (seen.gpus[0].jobs_vram_used_gb, seen.gpus[0].foreign_processes) == (4.0, 0)
        await orch.until(job, 3)
        assert orch.said(job) == ["started", "usage", "exit"]
        # outside the job's group, it was found by its environment and ended with the job
        await eventually(_true(lambda: not alive(escaped)))
        # the driver still lists it a while (its memory is not back): dirty, not offered
        assert work.observe(desk.snapshot()).gpus[0].withheld == "dirty"
        # one that survived its job (as after an agent restart), still naming the attempt
        env = {**os.environ, "CHIFFON_JOB_ID": str(job), "CHIFFON_ATTEMPT": "1"}
        survivor = await asyncio.create_subprocess_exec(*SLEEPER, env=env)
        desk.processes["GPU-0"] = [(survivor.pid, 2.0)]
        await eventually(_true(lambda: _names_attempt(survivor.pid)))
        assert work.observe(desk.snapshot()).gpus[0].withheld == "dirty"
        ended = await asyncio.wait_for(survivor.wait(), 10)
        assert ended == -9 and work.killed_leftovers == 1  # ended: it was ours
        desk.processes["GPU-0"] = []
        desk.hidden_gb["GPU-0"] = 3.0  # gone from the list, its memory not yet back
        assert work.observe(desk.snapshot()).gpus[0].withheld == "dirty"
        desk.hidden_gb["GPU-0"] = 0.0
        assert work.observe(desk.snapshot()).gpus[0].withheld is None  # clean: offered
    finally:
        if alive(escaped):
            os.kill(escaped, 9)
    await work.stop()


async def test_two_gpus_with_one_id_are_cleaned_once_and_the_reading_goes_on(
    tmp_path: Path,
) -> None:
    """No UUID and the same index (an NVIDIA card without its driver beside an AMD card,
    numbered per vendor): both read as `index-0`. Cleaning it once must not fail the
    second reading of it (it raised KeyError, and the owner's guard died with it)."""
    work = work_loop(tmp_path, Orchestrator(), Desk())
    snap = Desk().snapshot()
    twins = [dataclasses.replace(g, uuid=None, index=0) for g in snap.gpus]
    work.hygiene.dirt["index-0"] = 0.0  # an attempt there just ended
    seen = work.observe(dataclasses.replace(snap, gpus=twins))
    assert [g.withheld for g in seen.gpus] == [None, None] and work.hygiene.dirt == {}
    await work.stop()


async def test_an_order_for_a_withheld_gpu_is_refused(tmp_path: Path) -> None:
    orch, desk = Orchestrator(), Desk()
    work = work_loop(tmp_path, orch, desk, reserve_gpus=("1",))
    job = uuid.uuid4()
    await work.handle(*order(job, command=SLEEPER, gpu_uuids=["GPU-1"]))
    [(_, _, said)] = orch.reports
    assert (
        said["outcome"] == "refused"
        and said["detail"] == "GPU-1 is withheld: the owner keeps this GPU"
    )


def _names_attempt(pid: int) -> bool:
    try:
        return "CHIFFON_JOB_ID" in psutil.Process(pid).environ()
    except psutil.Error:
        return False


def _true(check: object) -> object:
    async def checked() -> bool:
        return bool(check())  # type: ignore[operator]

    return checked


async def test_cpu_jobs_may_be_suspended_instead_and_continue_once_the_owner_leaves(
    tmp_path: Path,
) -> None:
    orch, desk = Orchestrator(), Desk()
    work = work_loop(tmp_path, orch, desk, accept_jobs="when_idle", idle_minutes=10,
                     cpu_jobs_on_return="suspend")  # fmt: skip
    idle = [3600.0]
    guarding = asyncio.create_task(
        work.guard(lambda: (idle[0], None), lambda: None, every_seconds=0.05)
    )
    await eventually(_true(work.accepting_now))
    cpu_job, gpu_job = uuid.uuid4(), uuid.uuid4()
    await work.handle(*order(cpu_job, command=SLEEPER))
    await work.handle(*order(gpu_job, command=SLEEPER, gpu_uuids=["GPU-0"]))
    await orch.until(cpu_job, 1)
    await orch.until(gpu_job, 1)
    cpu = psutil.Process(work.runs[(cpu_job, 1)].pid)  # type: ignore[arg-type]

    idle[0] = 0.0  # the owner is back: the GPU job leaves, the CPU job is stopped
    await orch.until(gpu_job, 2)
    assert orch.said(gpu_job) == ["started", "preempted"]
    await eventually(_true(lambda: cpu.status() == psutil.STATUS_STOPPED))
    assert orch.said(cpu_job) == ["started"] and (cpu_job, 1) in work.running

    idle[0] = 3600.0  # away again: it continues where it was
    await eventually(_true(lambda: cpu.status() != psutil.STATUS_STOPPED))
    assert orch.said(cpu_job) == ["started"]
    guarding.cancel()
    await work.stop()
    assert orch.said(cpu_job) == ["started", "lost"]  # the agent stopped: it says so


async def test_a_process_named_with_control_characters_is_reported_cleanly(
    tmp_path: Path,
) -> None:
    orch, desk = Orchestrator(), Desk()
    work = work_loop(tmp_path, orch, desk, report_process_names=True)
    hostile = tmp_path / "evil\x1b[2Jname"  # a local user's own program, named to break us
    shutil.copy(shutil.which("sleep") or "/bin/sleep", hostile)
    named = await asyncio.create_subprocess_exec(str(hostile), "30")
    try:
        await eventually(_true(lambda: psutil.Process(named.pid).name() != "sleep"))
        desk.processes["GPU-0"] = [(named.pid, 1.0)]
        seen = work.observe(desk.snapshot())
    finally:
        named.kill()
        await named.wait()
    [name] = seen.gpus[0].foreign_names or []
    assert "\x1b" not in name and name.startswith("evil") and seen.gpus[0].foreign_vram_gb == 1.0
