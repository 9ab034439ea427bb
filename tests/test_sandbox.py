"""The sandbox (agent.sandbox) on this machine's own kernel, with real processes: each break
a job made before it (issue 37) tried again, and each mechanism checked.

Hostile jobs (the fork bomb, the memory hog, the disk filler) run under bounds this test
makes itself first (a pids and a memory cgroup whose limits are read back before the job
starts), with a timeout: they never depend on the code under test.

This machine offers cgroup v1 (memory, pids, freezer, cpu, devices) and PID, mount and user
namespaces to root; the v2 code runs against the unified tree's core files (processes,
kill, freeze; it has no controllers here), and the user-namespace path of the launcher runs
as the unprivileged user `nobody` with the system's Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from chiffon.agent.hooks.disk import DiskCap, used_bytes
from chiffon.agent.runner import Assignment, CannotStart, Ended, JobRun
from chiffon.agent.sandbox import Sandbox, SandboxConfig, jail
from chiffon.agent.sandbox.cgroups import (
    V1_CONTROLLERS,
    Limits,
    V1Tree,
    V2Tree,
    _mounts,
    _own_paths,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0
    or not Path("/sys/fs/cgroup/pids").is_dir(),
    reason="needs root and cgroup v1 controllers (as on CI)",
)  # fmt: skip

GB = 1024**3
BOMB_PIDS_BOUND = 400
HOG_MEMORY_BOUND = 1 * GB


def _test_groups(pids_max: int, memory_max: int) -> dict[str, Path]:
    """A group per v1 controller, made by the test under its own, its bounds read back."""
    own = _own_paths(Path("/proc/self/cgroup").read_text())
    mounts = _mounts(Path("/proc/self/mountinfo").read_text())
    name = f"chiffon-test-{uuid.uuid4().hex[:8]}"
    groups = {}
    for c in V1_CONTROLLERS:
        if c in mounts and c in own:
            groups[c] = mounts[c] / own[c].lstrip("/") / name
            groups[c].mkdir()
    (groups["pids"] / "pids.max").write_text(str(pids_max))
    (groups["memory"] / "memory.limit_in_bytes").write_text(str(memory_max))
    assert (groups["pids"] / "pids.max").read_text().strip() == str(pids_max)
    assert int((groups["memory"] / "memory.limit_in_bytes").read_text()) <= memory_max
    return groups


def _remove_groups(groups: dict[str, Path]) -> None:
    for group in groups.values():
        for d in sorted(group.rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir():
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), 9)
                _rmdir(d)
        _rmdir(group)


def _rmdir(d: Path) -> None:
    for _ in range(100):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


@pytest.fixture
def bounded() -> Iterator[dict[str, Path]]:
    groups = _test_groups(BOMB_PIDS_BOUND, HOG_MEMORY_BOUND)
    yield groups
    _remove_groups(groups)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """The agent's state directory with its secret and policy, outside /tmp (a job's /tmp
    is its own anyway) and outside /root, where a desktop keeps it under a home."""
    d = Path("/var/lib") / f"chiffon-test-agent-{uuid.uuid4().hex[:8]}"
    (d / "jobs").mkdir(parents=True)
    (d / "agent_secret").write_text("s3cret-agent")
    (d / "agent.yml").write_text("reserve_gpus: [1]\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _sandbox(data_dir: Path, groups: dict[str, Path] | None = None, **config: object) -> Sandbox:
    tree = V1Tree({c: g / "jobs" for c, g in groups.items()}) if groups else None
    sandbox = Sandbox(SandboxConfig(hide=[data_dir], **config), tree=tree)  # type: ignore[arg-type]
    sandbox.start()
    return sandbox


async def _start(sandbox: Sandbox, data_dir: Path, script: str, *, job: str = "j",
                 memory_gb: float = 0.0, gpus: tuple[int, ...] = (),
                 env: dict[str, str] | None = None) -> JobRun:  # fmt: skip
    name = f"{job}-1"
    run = JobRun(
        Assignment(job_id=job, attempt=1, command=["sh", "-c", script], env=env or {}),
        attempt_dir=data_dir / "jobs" / name, grace_seconds=2.0,
        unit=sandbox.unit(name, memory_gb=memory_gb, gpus=gpus),
    )  # fmt: skip
    await run.start()
    return run


async def _run(sandbox: Sandbox, data_dir: Path, script: str, **kw: object) -> tuple[Ended, str]:
    run = await _start(sandbox, data_dir, script, **kw)  # type: ignore[arg-type]
    ended = await asyncio.wait_for(run.wait(), 60)
    return ended, run.log_path.read_text()


def _running(marker: str) -> list[int]:
    found = psutil.process_iter(["cmdline"])
    return [p.pid for p in found if marker in " ".join(p.info["cmdline"] or [])]


def test_this_machine_gets_every_protection(data_dir: Path) -> None:
    found = _sandbox(data_dir).protections
    assert found.report() == {
        "processes": "cgroup", "memory_limit": True, "home_hidden": True,
        "devices_hidden": True, "required": False, "why": [],
    }  # fmt: skip
    assert found.complete


async def test_a_job_cannot_read_the_secret_the_policy_or_the_agent(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    script = (
        f"id -u; cat {data_dir}/agent_secret; echo rewritten > {data_dir}/agent.yml; "
        "tr '\\0' '\\n' < /proc/$PPID/environ; echo ppid=$PPID; ls /proc | grep -c '^[0-9]'; "
        "echo home=$(ls -A /home); echo root=$(ls -A /root)"
    )
    _, out = await _run(sandbox, data_dir, script)
    lines = out.splitlines()
    assert "s3cret" not in out
    assert lines[0] == str(sandbox.user.uid) != "0"  # type: ignore[union-attr]
    assert (data_dir / "agent.yml").read_text() == "reserve_gpus: [1]\n"
    # Its parent is PID 1 of its namespace (the launcher, root: not readable), not the agent.
    assert "ppid=1" in out and "CHIFFON_ENROLL_TOKEN" not in out
    assert int(lines[-3]) <= 4  # only the job's own processes are in its /proc
    assert lines[-2] == "home="
    # /root holds only what leads to the agent's own Python (read-only, for `python3`)
    assert lines[-1] in ("root=", "root=.pyenv")


async def test_jobs_cannot_see_each_other(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    a = await _start(sandbox, data_dir, "echo mine > /tmp/a-file; echo a-out; sleep 30",
                     job="a", env={"DB_PASSWORD": "hunter2"})  # fmt: skip
    try:
        script = (
            "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c DB_PASSWORD; "
            f"cat {data_dir}/jobs/a-1/output.log; ls /tmp"
        )
        _, out = await _run(sandbox, data_dir, script, job="b")
    finally:
        await a.cancel()
        await a.wait()
    assert "hunter2" not in out and "a-out" not in out
    assert out.splitlines()[0] == "0"
    assert "a-file" not in out


async def test_what_a_job_starts_ends_with_it(data_dir: Path) -> None:
    """`setsid` double forks, with and without a scrubbed environment, and `nohup`."""
    sandbox = _sandbox(data_dir)
    marker = "chiffon-escape-" + uuid.uuid4().hex[:8]
    script = (
        f"(setsid sh -c 'exec -a {marker} sleep 600' &); "
        f"(setsid env -i sh -c 'exec -a {marker} sleep 600' &); "
        f"nohup sh -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 & sleep 0.5; echo started"
    )
    run = await _start(sandbox, data_dir, script)
    await asyncio.wait_for(run.wait(), 30)
    assert _running(marker) == []


async def test_a_cancelled_job_leaves_nothing(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    run = await _start(sandbox, data_dir, "(setsid env -i sleep 600 &); sleep 600")
    await asyncio.sleep(0.5)
    unit = run.unit
    assert unit is not None and len(unit.pids()) >= 3
    held = list(unit.pids())
    await run.cancel()
    ended = await asyncio.wait_for(run.wait(), 30)
    assert ended.reason == "cancelled"
    assert not [p for p in held if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


async def test_a_restarted_agent_ends_a_job_whose_state_file_it_deleted(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    run = await _start(sandbox, data_dir, "rm -f $CHIFFON_JOB_DIR/../state.json; sleep 600")
    await asyncio.sleep(0.5)
    assert run.unit is not None
    held = run.unit.pids()
    state = run.attempt_dir / "state.json"
    assert held and state.exists()  # out of its reach: it sees only its work folder
    state.unlink()  # lost anyway (say, a disk error): the unit is found without it
    again = _sandbox(data_dir)  # the agent's next start, on the same tree
    assert again.sweep() == 1
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == "zombie" for p in held)
    await asyncio.wait_for(run.wait(), 30)


async def test_a_fork_bomb_ends_with_its_attempt_and_the_desktop_stays_responsive(
    data_dir: Path, bounded: dict[str, Path]
) -> None:
    sandbox = _sandbox(data_dir, bounded, max_processes=200)
    bomb = "import os\nwhile True:\n  try: os.fork()\n  except OSError: pass"
    run = await _start(sandbox, data_dir, f"python3 -c '{bomb}'")
    beats, shells = [], []
    last = time.monotonic()
    for _ in range(20):  # a heartbeat every 0.2 s, and a shell, during the bomb
        await asyncio.sleep(0.2)
        now = time.monotonic()
        beats.append(now - last)
        last = now
        t0 = time.monotonic()
        await asyncio.to_thread(subprocess.run, ["sh", "-c", "true"], check=True, timeout=10)
        shells.append(time.monotonic() - t0)
    assert run.unit is not None
    assert 100 <= len(run.unit.pids()) <= 200  # it forked up to its own limit, no further
    await run.cancel()
    ended = await asyncio.wait_for(run.wait(), 30)
    assert ended.reason == "cancelled"
    assert run.unit.pids() == []
    assert max(beats) < 1.0, beats
    assert max(shells) < 2.0, shells
    print(f"fork bomb: heartbeat gap max {max(beats):.3f} s, shell max {max(shells):.3f} s")


async def test_a_memory_hog_ends_failed_for_out_of_memory(
    data_dir: Path, bounded: dict[str, Path]
) -> None:
    sandbox = _sandbox(data_dir, bounded)
    hog = "python3 -c 'b = []\nwhile True: b.append(bytearray(16 << 20))'"
    ended, _ = await _run(sandbox, data_dir, hog, memory_gb=0.1)
    assert ended.exit_code == 137  # the shell says its python was SIGKILLed
    assert "out of memory (limit 0.35 GB)" in ended.detail  # 0.1 GB claimed + 256 MB


async def test_a_disk_filler_is_ended_past_its_cap(data_dir: Path) -> None:
    """The filler writes at most 64 MB (its own bound); the cap is 16 MB."""
    sandbox = _sandbox(data_dir)
    run = await _start(sandbox, data_dir, "head -c 67108864 /dev/zero > /tmp/fill; sleep 60")

    class Parts:
        class settings:
            job_disk_cap_gb = 16 / 1024

    class Attempt:
        number, job_id, directory = 1, "j", run.attempt_dir

    Attempt.run = run  # type: ignore[attr-defined]
    hook = DiskCap(Parts)  # type: ignore[arg-type]
    await hook.poststart(Attempt)  # type: ignore[arg-type]
    ended = await asyncio.wait_for(run.wait(), 60)
    await hook.stop(Attempt)  # type: ignore[arg-type]
    assert ended.reason == "exit" and ended.exit_code is None
    assert "used more disk than its cap of 0.015625 GB" in ended.detail


def test_disk_use_is_counted_in_blocks(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 50_000)
    assert 150_000 <= used_bytes(tmp_path) < 200_000


async def test_two_jobs_have_their_own_tmp_var_tmp_and_shared_memory(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    write = "echo 1 > /tmp/t; echo 2 > /var/tmp/v; echo 3 > /dev/shm/s; cat /tmp/t /var/tmp/v"
    _, first = await _run(sandbox, data_dir, f"{write} /dev/shm/s", job="a")
    read = "cat /tmp/t /var/tmp/v /dev/shm/s 2>&1 | grep -c 'No such file'"
    _, second = await _run(sandbox, data_dir, read, job="b")
    assert first.split() == ["1", "2", "1", "2", "3"] or first.split() == ["1", "2", "3"]
    assert second.split() == ["3"]  # none of the three is there for the next job


async def test_a_suspended_unit_is_frozen_and_resumes(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    tick = "while :; do echo x >> $CHIFFON_JOB_DIR/ticks; sleep 0.05; done"
    script = f"(setsid sh -c '{tick}' &); sleep 600"
    run = await _start(sandbox, data_dir, script)
    ticks = Path(run.attempt_dir) / "work" / "ticks"
    await asyncio.sleep(0.5)
    run.suspend()
    await asyncio.sleep(0.3)
    frozen_at = ticks.stat().st_size
    await asyncio.sleep(0.6)
    assert ticks.stat().st_size == frozen_at  # the process that left the group froze too
    run.resume()
    await asyncio.sleep(0.6)
    assert ticks.stat().st_size > frozen_at
    await run.cancel()
    await run.wait()


async def test_gpus_not_assigned_cannot_be_opened(data_dir: Path) -> None:
    """Device nodes made for the test with NVIDIA's major (195): the job was given GPU 0.
    No driver is here, so the open of its own GPU fails with ENXIO (allowed, no device);
    the others are covered (EACCES), and refused by the devices cgroup (EPERM) beneath."""
    dev = Path("/var/lib") / f"chiffon-test-dev-{uuid.uuid4().hex[:8]}"
    dev.mkdir()
    try:
        for minor in (0, 1, 2):
            os.mknod(dev / f"nvidia{minor}", 0o666 | 0o020000, os.makedev(195, minor))
            (dev / f"nvidia{minor}").chmod(0o666)
        sandbox = _sandbox(data_dir, dev_dir=dev)
        probe = "; ".join(
            f"python3 -c \"import os\ntry: os.open('{dev}/nvidia{m}', os.O_RDWR)\n"
            f'except OSError as e: print({m}, e.errno)"'
            for m in (0, 1, 2)
        )
        _, out = await _run(sandbox, data_dir, probe, gpus=(0,))
        assert out.split() == [
            "0",
            str(errno.ENXIO),
            "1",
            str(errno.EACCES),
            "2",
            str(errno.EACCES),
        ]
        # Beneath the covers: the unit's devices group denies them too.
        bare = _sandbox(data_dir, dev_dir=dev, use_namespaces=False)
        _, out = await _run(bare, data_dir, probe, job="k", gpus=(0,))
        assert out.split() == ["0", str(errno.ENXIO), "1", str(errno.EPERM), "2", str(errno.EPERM)]
    finally:
        shutil.rmtree(dev)


async def test_a_program_that_is_not_there_never_ran(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir)
    run = JobRun(
        Assignment(job_id="n", attempt=1, command=["no-such-program-x"]),
        attempt_dir=data_dir / "jobs" / "n-1",
        unit=sandbox.unit("n-1", memory_gb=0),
    )
    with pytest.raises(CannotStart, match="the program 'no-such-program-x' was not found"):
        await run.start()


def test_without_cgroups_namespaces_still_contain(data_dir: Path) -> None:
    found = _sandbox(data_dir, use_cgroups=False).protections
    assert (found.processes, found.memory_limit, found.home_hidden) == ("pidns", False, True)
    assert found.refusal() is None  # not required
    required = _sandbox(data_dir, use_cgroups=False, require=True).protections
    assert "no memory limit" not in (required.refusal() or "x")
    assert required.refusal() is not None and "control groups are off" in required.refusal()


def test_the_floor_is_a_subreaper(data_dir: Path, tmp_path: Path) -> None:
    found = _sandbox(data_dir, use_cgroups=False, use_namespaces=False).protections
    assert found.processes == "subreaper" and not found.home_hidden
    assert not found.complete


async def test_a_subreaper_ends_what_left_the_group(data_dir: Path) -> None:
    sandbox = _sandbox(data_dir, use_cgroups=False, use_namespaces=False)
    marker = "chiffon-floor-" + uuid.uuid4().hex[:8]
    escape = f"(setsid env -i sh -c 'exec -a {marker} sleep 600' &); sleep 0.3"
    ended, _ = await _run(sandbox, data_dir, escape)
    assert ended.exit_code == 0 and _running(marker) == []


def test_the_user_namespace_path_as_an_ordinary_user(data_dir: Path) -> None:
    """The launcher as `nobody`, with the system's Python: a user, PID and mount namespace,
    the homes hidden, the job still `nobody`, a setsid escapee ended with it."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3")
    launcher = data_dir / "jail.py"  # where nobody may read it
    shutil.copy(jail.__file__, launcher)
    data_dir.chmod(0o755)
    launcher.chmod(0o644)
    hide = ["/root", "/home", "/sys/fs/cgroup"]
    plan = {"agent_pid": 0, "report_fd": 3, "nice": 19, "userns": True, "pidns": True,
            "hide": hide, "binds": [], "cwd": "/", "cgroups": []}  # fmt: skip
    script = (
        "id -u; ls /proc | grep -c '^[0-9]'; ls -A /root /sys/fs/cgroup | grep -c .; "
        "(setsid sleep 600 &); echo ok"
    )
    wrapper = (
        "import os, subprocess, sys, json\n"
        "r, w = os.pipe()\n"
        "plan = json.loads(sys.argv[1]); plan['agent_pid'] = os.getpid(); plan['report_fd'] = w\n"
        "argv = [sys.executable, '-I', '-S', sys.argv[2], json.dumps(plan), '--']\n"
        "p = subprocess.run([*argv, 'sh', '-c', sys.argv[3]],"
        " pass_fds=(w,), capture_output=True, text=True, timeout=30)\n"
        "os.close(w); print(p.returncode); print(p.stdout, end='')\n"
        "print(os.read(r, 4096).decode())\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c", wrapper,
         json.dumps(plan), str(launcher), script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = done.stdout.split()
    code, uid, seen, in_root, said = lines[:5]
    # `ls` says only the two folders' names: both are empty covers
    assert (code, uid, in_root, said) == ("0", "65534", "2", "ok"), done.stdout + done.stderr
    assert int(seen) <= 4  # PID 1, sh, ls, grep: nothing else of the desktop
    assert not [
        p
        for p in psutil.process_iter(["username", "cmdline"])
        if p.info["username"] == "nobody" and "sleep 600" in " ".join(p.info["cmdline"] or [])
    ]


def test_cgroup_v2_core_on_this_kernel() -> None:
    """The v2 code on the unified tree (no controllers here): a process in a unit is
    listed, frozen, and killed with the kernel's `cgroup.kill`."""
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.procs").exists():
        pytest.skip("no unified tree")
    tree = V2Tree(unified, f"chiffon-test-{uuid.uuid4().hex[:8]}", move_self=False)
    unit = tree.unit("u-1")
    try:
        assert unit.create(Limits(pids=10)) == ["processes"]  # no controller to bound it
        child = subprocess.Popen(["sleep", "600"])
        Path(unit.procs_files()[0]).write_text(str(child.pid))
        assert unit.pids() == [child.pid]
        unit.freeze(True)
        time.sleep(0.2)
        assert (unit.dir / "cgroup.events").read_text().count("frozen 1") == 1
        unit.freeze(False)
        assert unit.kill()
        assert child.wait(timeout=10) == -9
    finally:
        unit.remove()
        tree.root.rmdir()


def test_the_ceiling_for_all_jobs_is_set_on_their_group(
    data_dir: Path, bounded: dict[str, Path]
) -> None:
    _sandbox(data_dir, bounded, jobs_max_memory_gb=0.5, jobs_max_cores=1.5)
    jobs = {c: g / "jobs" for c, g in bounded.items()}
    assert int((jobs["memory"] / "memory.limit_in_bytes").read_text()) == GB // 2
    assert (jobs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "150000"
    assert (jobs["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"


async def test_a_gpu_process_is_the_jobs_by_its_unit_even_with_its_environment_cleared(
    data_dir: Path,
) -> None:
    """GPU hygiene and the owner's policy take a GPU process for a job's by its unit: one
    that left the group and cleared its environment is not taken for the owner's."""
    from chiffon.agent.reading import Jobs, whose

    sandbox = _sandbox(data_dir)
    run = await _start(sandbox, data_dir, "(setsid env -i sleep 30 &); sleep 30")
    try:
        await asyncio.sleep(0.5)
        assert run.unit is not None
        [escaped] = [p for p in run.unit.pids() if psutil.Process(p).cmdline() == ["sleep", "30"]
                     and "CHIFFON_JOB_ID" not in psutil.Process(p).environ()]  # fmt: skip
        key = (uuid.uuid4(), 1)
        assert whose(escaped, Jobs(groups={run.pid: key})) is None  # by group or env: lost
        members = dict.fromkeys(run.unit.pids(), key)
        assert whose(escaped, Jobs(groups={run.pid: key}, members=members)) == key
    finally:
        await run.cancel()
        await run.wait()


async def test_an_agent_starting_ends_only_its_own_leftovers(data_dir: Path) -> None:
    """Two agents on one desktop (each with its jobs folder): one's start sweeps its own
    group for all jobs, never the other's running jobs."""
    mine, theirs = (f"chiffon-jobs-test-{uuid.uuid4().hex[:8]}" for _ in range(2))
    sandbox = _sandbox(data_dir, group=mine)
    run = await _start(sandbox, data_dir, "sleep 600")
    try:
        await asyncio.sleep(0.3)
        assert run.unit is not None and run.unit.pids()
        assert _sandbox(data_dir, group=theirs).sweep() == 0
        assert run.unit.pids() and not run.ending
        assert _sandbox(data_dir, group=mine).sweep() == 1
        ended = await asyncio.wait_for(run.wait(), 30)
        assert ended.signal == 9
    finally:
        await run.cancel()
        for name in (mine, theirs):  # the test's groups for all jobs, empty now
            tree = _sandbox(data_dir, group=name).tree
            assert isinstance(tree, V1Tree)
            for root in tree.roots.values():
                _rmdir(root)


async def test_a_probe_beside_a_running_agent_leaves_its_jobs_a_restart_ends_them(
    data_dir: Path,
) -> None:
    from chiffon.agent.daemon import decided, started_sandbox, swept
    from chiffon.agent.report import Snapshot
    from chiffon.agent.settings import AgentSettings
    from tests.test_agent_report import snapshot_fields

    settings = AgentSettings(state_dir=data_dir)
    agent = swept(started_sandbox(settings))
    run = JobRun(
        Assignment(job_id="p", attempt=1, command=["sleep", "600"]),
        attempt_dir=data_dir / "jobs" / "p-1",
        unit=agent.unit("p-1", memory_gb=0),
    )
    await run.start()
    try:
        probed = decided(settings, Snapshot(**snapshot_fields()))  # `chiffon probe`
        assert probed.sandbox is not None and probed.sandbox["processes"] == "cgroup"
        assert run.unit is not None and run.unit.pids() and not run.ending
        swept(started_sandbox(settings))  # the agent's next start
        ended = await asyncio.wait_for(run.wait(), 30)
        assert ended.signal == 9
    finally:
        await run.cancel()
        tree = agent.tree
        assert isinstance(tree, V1Tree)
        for root in tree.roots.values():
            _rmdir(root)


@pytest.mark.parametrize("named", ["jobs", "jobs/victim-1/work", "", "/", "/tmp", "/proc/1"])
async def test_a_workdir_that_would_uncover_a_hidden_folder_is_refused(
    data_dir: Path, named: str
) -> None:
    """Found by an attack on this sandbox: a job named another job's folder (or the
    agent's, or the desktop's /tmp) as its workdir, and the bind showed it what the cover
    hid. Such a workdir is refused; the job never runs."""
    (data_dir / "jobs" / "victim-1" / "work").mkdir(parents=True)
    workdir = named if named.startswith("/") else str(data_dir / named)
    sandbox = _sandbox(data_dir)
    run = JobRun(
        Assignment(job_id="w", attempt=1, command=["true"], workdir=workdir),
        attempt_dir=data_dir / "jobs" / "w-1",
        unit=sandbox.unit("w-1", memory_gb=0),
    )
    with pytest.raises(CannotStart, match="its sandbox could not be made \\(the workdir "):
        await run.start()


async def test_a_workdir_of_its_own_is_bound_in(data_dir: Path) -> None:
    own = Path("/var/lib") / f"chiffon-test-project-{uuid.uuid4().hex[:8]}"
    own.mkdir(mode=0o777)
    own.chmod(0o777)
    try:
        sandbox = _sandbox(data_dir)
        run = JobRun(
            Assignment(job_id="o", attempt=1, command=["sh", "-c", "pwd; echo hi > out"],
                       workdir=str(own)),
            attempt_dir=data_dir / "jobs" / "o-1",
            unit=sandbox.unit("o-1", memory_gb=0),
        )  # fmt: skip
        await run.start()
        ended = await asyncio.wait_for(run.wait(), 30)
        assert ended.exit_code == 0, run.log_path.read_text()
        assert (own / "out").read_text() == "hi\n"
    finally:
        shutil.rmtree(own)


@pytest.mark.skipif(not Path("/run/lock").is_dir(), reason="no /run/lock here")
async def test_lock_files_are_the_jobs_own(data_dir: Path) -> None:
    """Found by an attack: /run/lock, world-writable on disk, let one job leave data for
    the next, outside its cap and never removed."""
    marker = f"chiffon-left-{uuid.uuid4().hex[:8]}"
    sandbox = _sandbox(data_dir)
    _, first = await _run(sandbox, data_dir, f"echo x > /run/lock/{marker} && echo wrote", job="a")
    _, second = await _run(sandbox, data_dir, f"ls /run/lock | grep -c {marker}", job="b")
    assert first.split() == ["wrote"]
    assert second.split() == ["0"]
    assert not (Path("/run/lock") / marker).exists()


@pytest.mark.skipif(not Path("/home").is_dir(), reason="no /home here")
async def test_a_workdir_in_a_folder_the_owner_lent_is_allowed(data_dir: Path) -> None:
    """`job_paths` lends a folder under a hidden one (a lab's shared folder in /home): a
    workdir there is bound in, writable as its own permissions say; the agent's own
    folders stay refused, lent or not."""
    lent = Path("/home") / f"chiffon-test-lab-{uuid.uuid4().hex[:8]}"
    (lent / "proj").mkdir(parents=True)
    (lent / "proj").chmod(0o777)
    try:
        sandbox = _sandbox(data_dir, expose=[lent, data_dir])
        assert sandbox.forbidden_workdir(lent / "elsewhere") is None
        assert sandbox.forbidden_workdir(Path("/home")) is not None  # holds the homes
        assert sandbox.forbidden_workdir(data_dir / "jobs") is not None  # lent or not
        ok = JobRun(
            Assignment(job_id="l", attempt=1, command=["sh", "-c", "echo done > out"],
                       workdir=str(lent / "proj")),
            attempt_dir=data_dir / "jobs" / "l-1", unit=sandbox.unit("l-1", memory_gb=0),
        )  # fmt: skip
        await ok.start()
        assert (await asyncio.wait_for(ok.wait(), 30)).exit_code == 0, ok.log_path.read_text()
        assert (lent / "proj" / "out").read_text() == "done\n"
    finally:
        shutil.rmtree(lent)
