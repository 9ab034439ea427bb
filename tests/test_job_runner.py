"""The agent's job runner with real processes: environment, exit, timeout, cancel, output
bound, and the jobs a killed agent left behind."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from chiffon.agent.runner import (
    Assignment,
    CannotStart,
    JobRun,
    Ladder,
    end_orphans,
    why_not_started,
)
from tests.procs import alive
from tests.services import eventually

PY = sys.executable


def job(*command: str, **kwargs: object) -> Assignment:
    return Assignment(job_id="job-1", attempt=1, command=command, **kwargs)  # type: ignore[arg-type]


async def run(tmp_path: Path, a: Assignment, **kwargs: object) -> tuple[JobRun, object]:
    runner = JobRun(a, attempt_dir=tmp_path / "jobs" / f"{a.job_id}-{a.attempt}", **kwargs)  # type: ignore[arg-type]
    await runner.start()
    return runner, await asyncio.wait_for(runner.wait(), 30)


PRINT_ENV = (
    "import json, os, sys; print(json.dumps(dict(os.environ))); print(repr(sys.stdin.read()))"
)


async def test_a_job_sees_only_its_gpus_and_the_documented_environment(tmp_path: Path) -> None:
    inherited = {"PATH": os.environ["PATH"], "HOME": "/home/owner", "CHIFFON_ENROLL_TOKEN": "s3"}
    a = job(PY, "-c", PRINT_ENV, env={"EPOCHS": "3"}, gpu_uuids=("GPU-aa", "GPU-bb"))
    runner, ended = await run(tmp_path, a, inherited_env=inherited)
    env_line, stdin_line = runner.log_path.read_text().splitlines()
    env = json.loads(env_line)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aa,GPU-bb"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["ROCR_VISIBLE_DEVICES"] == "GPU-aa,GPU-bb"
    assert (env["CHIFFON_JOB_ID"], env["CHIFFON_ATTEMPT"], env["EPOCHS"]) == ("job-1", "1", "3")
    assert env["HOME"] == "/home/owner" and "CHIFFON_ENROLL_TOKEN" not in env  # no secrets
    assert env["CHIFFON_JOB_DIR"] == str(runner.attempt_dir / "work")
    assert stdin_line == "''"  # stdin closed
    assert ended.reason == "exit" and ended.exit_code == 0  # type: ignore[attr-defined]


async def test_a_job_without_gpus_sees_none(tmp_path: Path) -> None:
    runner, _ = await run(tmp_path, job(PY, "-c", PRINT_ENV))
    env = json.loads(runner.log_path.read_text().splitlines()[0])
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert env["ROCR_VISIBLE_DEVICES"] == env["HIP_VISIBLE_DEVICES"] == "-1"


async def test_exit_codes_are_reported_as_they_are(tmp_path: Path) -> None:
    _, ended = await run(tmp_path, job("sh", "-c", "echo failing >&2; exit 3"))
    assert (ended.reason, ended.exit_code, ended.signal) == ("exit", 3, None)  # type: ignore[attr-defined]


async def test_a_timeout_ends_the_whole_group(tmp_path: Path) -> None:
    started = time.monotonic()
    runner, ended = await run(
        tmp_path, job("sh", "-c", "sleep 60 & echo $! > child; wait", timeout_seconds=0.5)
    )
    assert (ended.reason, ended.signal) == ("timed_out", signal.SIGTERM)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 10
    child = int((runner.attempt_dir / "work" / "child").read_text())
    assert not alive(child)  # the job's own child went with it


async def test_cancel_sends_sigterm_then_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    a = job("sh", "-c", "trap '' TERM; echo ready; sleep 60")
    runner = JobRun(a, attempt_dir=tmp_path / "a", grace_seconds=0.5)
    await runner.start()
    waiting = asyncio.create_task(runner.wait())
    await _until(lambda: runner.log_path.exists() and b"ready" in runner.log_path.read_bytes())
    await asyncio.gather(runner.cancel(), runner.cancel())  # idempotent
    ended = await asyncio.wait_for(waiting, 10)
    assert (ended.reason, ended.signal) == ("cancelled", signal.SIGKILL)


async def test_output_past_the_bound_is_dropped_and_counted_never_blocking(tmp_path: Path) -> None:
    a = job(PY, "-c", "import sys; sys.stdout.write('x' * 3_000_000); print('end')")
    runner, ended = await run(tmp_path, a, max_log_bytes=1000)
    assert runner.log_path.stat().st_size == 1000
    kept, dropped = ended.log_bytes, ended.log_bytes_dropped  # type: ignore[attr-defined]
    assert (ended.exit_code, kept, kept + dropped) == (0, 1000, 3_000_004)  # type: ignore[attr-defined]
    assert "dropped" in ended.detail  # type: ignore[attr-defined]


def _files(tmp_path: Path) -> None:
    """A script that is not executable, one whose #! line names nothing, a plain file."""
    (tmp_path / "noexec.sh").write_text("echo hi\n")
    (tmp_path / "badline.sh").write_text("#!/no/such/interpreter\necho hi\n")
    (tmp_path / "badline.sh").chmod(0o755)
    (tmp_path / "a-file").write_text("")


@pytest.mark.parametrize(
    ("command", "workdir", "says"),
    [
        (["/no/such/program"], None, "the program '/no/such/program' was not found"),
        (["no-such-program-x"], None, "the program 'no-such-program-x' was not found"),
        (["true"], "/nonexistent/dir", "the folder /nonexistent/dir does not exist"),
        (["true"], "{tmp}/a-file", "the workdir {tmp}/a-file is not a folder"),
        (["{tmp}/noexec.sh"], None, "the program '{tmp}/noexec.sh' is not executable"),
        (["./noexec.sh"], "{tmp}", "the program './noexec.sh' is not executable"),
        (["{tmp}"], None, "the program '{tmp}' is a folder"),
        (["./badline.sh"], "{tmp}",
         "the interpreter on the first line of './badline.sh' was not found"),
    ],
)  # fmt: skip
async def test_a_job_that_cannot_start_says_why_in_words_and_has_no_exit_code(
    tmp_path: Path, command: list[str], workdir: str | None, says: str
) -> None:
    _files(tmp_path)
    tmp = str(tmp_path)
    a = job(*(c.format(tmp=tmp) for c in command),
            workdir=None if workdir is None else workdir.format(tmp=tmp))  # fmt: skip
    runner = JobRun(a, attempt_dir=tmp_path / "a")
    with pytest.raises(CannotStart) as raised:
        await runner.start()
    assert str(raised.value) == says.format(tmp=tmp)
    assert runner.pid is None and not (runner.attempt_dir / "state.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root enters every folder")
async def test_a_folder_the_agents_user_may_not_enter_is_named(tmp_path: Path) -> None:
    shut = tmp_path / "shut"
    shut.mkdir(mode=0o600)
    with pytest.raises(CannotStart, match=f"the agent's user may not enter the folder {shut}"):
        await JobRun(job("true", workdir=str(shut)), attempt_dir=tmp_path / "a").start()


def test_a_start_failure_is_classified_by_what_failed() -> None:
    """The folder vanishing between the check and the start, and the rarer errors."""
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory", Path("/gone/dir"))
    assert why_not_started(gone, "true", Path("/gone/dir"), {}) == (
        "the folder /gone/dir does not exist"
    )
    odd = OSError(errno.ENOEXEC, "Exec format error", "./x")
    assert why_not_started(odd, "./x", Path("/"), {}) == (
        "the program './x' is not in a format that can run"
    )
    busy = OSError(errno.ETXTBSY, "Text file busy", "./x")
    assert why_not_started(busy, "./x", Path("/"), {}) == (
        "the program './x' could not be started (Text file busy)"
    )
    long = Path("/" + "d" * 4000)  # one name longer than a folder's name may be
    too_long = FileNotFoundError(errno.ENAMETOOLONG, "File name too long", long)
    said = why_not_started(too_long, "true", long, {})
    assert said.startswith("the folder /ddd") and said.endswith("(File name too long)")
    assert len(said) < 300  # the path cut in the middle


async def test_a_restarted_agent_ends_the_jobs_it_left_and_only_those(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    left = JobRun(job("sleep", "60"), attempt_dir=jobs_dir / "job-1-1")
    await left.start()  # the agent "dies" here: nobody waits on it
    assert left.pid is not None and alive(left.pid)
    # a state file naming a pid that now belongs to someone else (this test process)
    stale = jobs_dir / "job-2-1"
    stale.mkdir()
    (stale / "state.json").write_text(
        json.dumps({"job_id": "job-2", "attempt": 1, "pid": os.getpid(), "create_time": 1.0})
    )
    orphans = await asyncio.to_thread(end_orphans, jobs_dir, grace_seconds=2)
    assert {(o.job_id, o.was_running) for o in orphans} == {("job-1", True), ("job-2", False)}
    await _until(lambda: not alive(left.pid))  # type: ignore[arg-type]
    assert list(jobs_dir.glob("*/state.json")) == []
    await left.wait()  # reaped here, so no unclosed pipe outlives the test


async def _until(check: object, within_seconds: float = 10) -> None:
    deadline = time.monotonic() + within_seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


LADDER_JOB = """
import signal, sys, time
def said(name):
    def handler(*_):
        print(name, flush=True)
    return handler
signal.signal(signal.SIGUSR1, said("checkpoint"))
signal.signal(signal.SIGTERM, said("term"))  # and keeps running: only SIGKILL ends it
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


async def test_vacating_goes_down_the_ladder_checkpoint_then_sigterm_then_sigkill(
    tmp_path: Path,
) -> None:
    ladder = Ladder("SIGUSR1", grace_seconds=0.5, kill_seconds=0.5)
    a = job(PY, "-c", LADDER_JOB)
    runner = JobRun(a, attempt_dir=tmp_path / "a", ladder=ladder)
    await runner.start()
    waiting = asyncio.create_task(runner.wait())
    await eventually(lambda: _logged(runner, b"ready"))
    await runner.vacate("preempted: the desktop's owner is using it")
    ended = await asyncio.wait_for(waiting, 10)
    assert runner.log_path.read_text().split() == ["ready", "checkpoint", "term"]
    assert (ended.reason, ended.signal) == ("preempted", signal.SIGKILL)
    assert ended.detail == "preempted: the desktop's owner is using it"


async def test_a_job_that_checkpoints_and_exits_is_preempted_and_told_its_deadline(
    tmp_path: Path,
) -> None:
    script = (
        "import os, signal, sys, time\n"
        "print(os.environ['CHIFFON_PREEMPT_SIGNAL'], os.environ['CHIFFON_PREEMPT_DEADLINE'],"
        " flush=True)\n"
        "signal.signal(signal.SIGUSR2, lambda *_: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    runner = JobRun(job(PY, "-c", script), attempt_dir=tmp_path / "a",
                    ladder=Ladder("SIGUSR2", grace_seconds=45, kill_seconds=3))  # fmt: skip
    await runner.start()
    waiting = asyncio.create_task(runner.wait())
    await eventually(lambda: _logged(runner, b"\n"))
    await runner.vacate("preempted")
    ended = await asyncio.wait_for(waiting, 10)
    assert runner.log_path.read_text().split() == ["SIGUSR2", "45"]
    assert (ended.reason, ended.exit_code) == ("preempted", 0)  # it runs again elsewhere


async def _logged(runner: JobRun, what: bytes) -> bool:
    return runner.log_path.exists() and what in runner.log_path.read_bytes()


async def test_a_suspended_job_is_continued_so_that_a_cancel_ends_it_with_sigterm(
    tmp_path: Path,
) -> None:
    runner = JobRun(job(PY, "-c", "import time; time.sleep(60)"), attempt_dir=tmp_path / "a",
                    grace_seconds=30)  # fmt: skip
    await runner.start()
    waiting = asyncio.create_task(runner.wait())
    runner.suspend()
    assert runner.suspended
    await runner.cancel()  # not 30 s: SIGTERM reaches it once it is continued
    ended = await asyncio.wait_for(waiting, 10)
    assert (ended.reason, ended.signal) == ("cancelled", signal.SIGTERM)
    assert not runner.suspended
