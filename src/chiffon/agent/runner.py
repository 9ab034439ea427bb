"""One attempt of a job on this desktop: its environment, its process group, its log, its end.

`agent.work.WorkLoop` runs one per assignment; docs/jobs.md describes it.

- The command is an argv list, run without a shell, stdin closed, in a process group of
  its own (`start_new_session`), as the agent's own user; given a unit (`agent.sandbox`),
  through the sandbox's launcher, in that unit, which ends whatever the job started.
- It sees only its GPUs: `CUDA_VISIBLE_DEVICES` holds their UUIDs (with
  `CUDA_DEVICE_ORDER=PCI_BUS_ID`), and `NVIDIA_VISIBLE_DEVICES`, `ROCR_VISIBLE_DEVICES`,
  `HIP_VISIBLE_DEVICES` are set the same way; a job without GPUs sees none.
- stdout and stderr go through the agent into one log file, cut at `max_log_bytes`
  (what is cut is counted, never blocks the job).
- Cancel and timeout send SIGTERM to the group, SIGKILL after `grace_seconds`.
- Vacating (the desktop's owner wants it back, docs/owner.md) goes down a ladder: the
  checkpoint signal (`CHIFFON_PREEMPT_SIGNAL`, SIGUSR1 by default), SIGTERM after
  `CHIFFON_PREEMPT_DEADLINE` seconds, SIGKILL after the vacate kill grace. The job is told
  both in its environment at start.
- Every job gets `CHIFFON_CHECKPOINT_DIR` (`<attempt dir>/checkpoint`; in a sandbox with
  namespaces, bound writable at `/tmp/chiffon-checkpoint` in its own /tmp): whatever it
  leaves there is saved and restored into its next attempt (`agent.stage`); creating
  `CHIFFON_CHECKPOINT_SAVE` asks for a save now.
- While it runs, `<attempt dir>/state.json` names its process (pid and start time, so a
  reused pid is never taken for it). A restarted agent finds such files and ends those
  processes (`end_orphans`): no job is left running unsupervised.

Free of pydantic: the agent stays small on the desktop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from chiffon.agent.sandbox import JAIL_CHECKPOINT, AttemptUnit, SandboxError, parse_report
from chiffon.schemas.dispatch import Outcome, visible_device

log = logging.getLogger(__name__)

# The environment a job gets beyond what its user gave (docs/jobs.md).
PASSED_THROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")
READ_CHUNK_BYTES = 64 * 1024
# After the job's process ended, how long its output may take to drain.
OUTPUT_DRAIN_SECONDS = 2.0
EXIT_POLL_SECONDS = 0.05
# In the checkpoint folder: the job creates it to ask for a save now (`agent.stage`).
CHECKPOINT_SAVE_MARKER = ".chiffon-save"
LEFT_THE_GROUP = "a process it started left its process group and still held its output"


@dataclass(frozen=True, slots=True)
class Assignment:
    """What the agent was told to run, already verified as the orchestrator's."""

    job_id: str
    attempt: int
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    gpu_uuids: Sequence[str] = ()
    gpu_vendor: str | None = None  # "nvidia", "amd", ... of the GPUs assigned
    timeout_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Ladder:
    """How a job is vacated: `checkpoint` (a signal's name), SIGTERM after
    `grace_seconds`, SIGKILL after `kill_seconds` more."""

    checkpoint: str = "SIGUSR1"
    grace_seconds: float = 30.0
    kill_seconds: float = 3.0


class CannotStart(Exception):
    """The attempt's process could not be started (its program or its folder is not
    there): why, in words that "on <desktop>" can follow. It never ran, so it has no exit
    code."""


@dataclass(frozen=True, slots=True)
class Ended:
    """How an attempt ended. `exit_code` is None when a signal ended it (`signal`)."""

    reason: Outcome
    exit_code: int | None
    signal: int | None
    runtime_seconds: float
    log_bytes: int
    log_bytes_dropped: int
    detail: str = ""


def job_environment(
    a: Assignment,
    *,
    inherited: Mapping[str, str],
    workdir: Path,
    ladder: Ladder = Ladder(),
    checkpoint_dir: Path | None = None,
) -> dict[str, str]:
    """The documented set, then what the user gave (which may not override it: the
    submission's schema refuses those names)."""
    env = {k: inherited[k] for k in PASSED_THROUGH if k in inherited}
    visible = ",".join(visible_device(g) for g in a.gpu_uuids)
    env.update(
        CHIFFON_JOB_ID=a.job_id,
        CHIFFON_ATTEMPT=str(a.attempt),
        CHIFFON_JOB_DIR=str(workdir),
        CHIFFON_GPUS=visible,
        CHIFFON_PREEMPT_SIGNAL=ladder.checkpoint,
        CHIFFON_PREEMPT_DEADLINE=f"{ladder.grace_seconds:g}",
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        CUDA_VISIBLE_DEVICES=visible,
        NVIDIA_VISIBLE_DEVICES=visible or "void",
        ROCR_VISIBLE_DEVICES=visible,
        HIP_VISIBLE_DEVICES=visible,
    )
    if checkpoint_dir is not None:
        marker = checkpoint_dir / CHECKPOINT_SAVE_MARKER
        env.update(CHIFFON_CHECKPOINT_DIR=str(checkpoint_dir), CHIFFON_CHECKPOINT_SAVE=str(marker))
    if not a.gpu_uuids:
        # an empty CUDA_VISIBLE_DEVICES hides every device; ROCm reads -1 as "none"
        env.update(ROCR_VISIBLE_DEVICES="-1", HIP_VISIBLE_DEVICES="-1")
    return {**a.env, **env}


class JobRun:
    """One attempt's process. `start()`, then `wait()` for its `Ended`; `cancel()` at any
    time (idempotent)."""

    def __init__(
        self,
        assignment: Assignment,
        *,
        attempt_dir: Path,
        max_log_bytes: int = 64 * 1024 * 1024,
        grace_seconds: float = 10.0,
        inherited_env: Mapping[str, str] | None = None,
        ladder: Ladder = Ladder(),
        unit: AttemptUnit | None = None,
    ) -> None:
        self.assignment = assignment
        self.unit = unit  # its contained unit (agent.sandbox); None: a process group only
        self.ladder = ladder
        self.attempt_dir = attempt_dir
        self.log_path = attempt_dir / "output.log"
        self.checkpoint_dir = attempt_dir / "checkpoint"
        # Set by a prestart hook (`hooks.pyenv`): the Python environment it runs in (first on
        # its PATH, bound read-only into its sandbox), and a line its log starts with.
        self.python_env: Path | None = None
        self.preface = b""
        self._max_log_bytes = max_log_bytes
        self._grace = grace_seconds
        self._inherited = os.environ if inherited_env is None else inherited_env
        self._process: asyncio.subprocess.Process | None = None
        self._ending: Outcome | None = None
        self._suspended = False
        self._why = ""
        self._started = 0.0
        self.log_bytes = 0
        self.log_bytes_dropped = 0
        self.output = asyncio.Event()  # set when the log grew
        self.finished = asyncio.Event()  # set when it ended and its log is complete

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def ending(self) -> bool:
        """Whether it was told to end (cancel, timeout, stop) or has ended."""
        return self._ending is not None or (
            self._process is not None and self._process.returncode is not None
        )

    async def start(self) -> None:
        """Start the process. `CannotStart` says why it could not be (no such program, a
        workdir that is not there); the caller reports the attempt failed, with no exit
        code."""
        a = self.assignment
        workdir = Path(a.workdir) if a.workdir else self.attempt_dir / "work"
        try:  # a fresh directory per attempt; a given one must exist
            self.attempt_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not a.workdir:
                workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.checkpoint_dir.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:  # the agent's own disk: full, read-only
            shown = _shown(self.attempt_dir)
            raise CannotStart(f"the agent could not make {shown} ({exc.strerror or exc})") from exc
        if a.workdir and (why := folder_problem(workdir)) is not None:
            raise CannotStart(why)
        env = job_environment(a, inherited=self._inherited, workdir=workdir, ladder=self.ladder,
                              checkpoint_dir=self.checkpoint_dir)  # fmt: skip
        if self.python_env is not None:
            env.update(PATH=f"{self.python_env / 'bin'}:{env.get('PATH', os.defpath)}",
                       VIRTUAL_ENV=str(self.python_env))  # fmt: skip
        argv, passed = list(a.command), tuple[int, ...]()
        if self.unit is not None:
            argv, passed = self._in_unit(self.unit, workdir, env)
        self._started = time.monotonic()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=workdir,
                env=env,
                start_new_session=True,  # its own process group: signals reach all it starts
                pass_fds=passed,
            )
        except OSError as exc:
            if self.unit is not None:  # its group made, its launcher not started
                await asyncio.to_thread(self.unit.close)
            raise CannotStart(why_not_started(exc, a.command[0], workdir, env)) from exc
        if self.unit is not None:
            await self._check_started(self.unit, workdir, env)
        _write_state(self.attempt_dir, self._process.pid, a)

    def _in_unit(
        self, unit: AttemptUnit, workdir: Path, env: dict[str, str]
    ) -> tuple[list[str], tuple[int, ...]]:
        """The launcher's argv (`agent.sandbox`): the job in its unit, its folder bound."""
        try:
            unit.prepare(self.attempt_dir, workdir, given_workdir=bool(self.assignment.workdir))
            env_dirs = [self.python_env] if self.python_env else []
            argv, fd = unit.command(self.assignment.command, cwd=workdir,
                                    attempt_dir=self.attempt_dir, binds=[workdir],
                                    checkpoint=self.checkpoint_dir,
                                    read_only=env_dirs)  # fmt: skip
        except (SandboxError, OSError) as exc:
            unit.close()  # a group made before the failure goes with it
            raise CannotStart(f"its sandbox could not be made ({exc})") from exc
        if unit.sandbox.namespaces:  # the owner's home is hidden: its own /tmp is its home
            env.update(HOME="/tmp", TMPDIR="/tmp")
            # its checkpoint folder, bound in its own /tmp (`AttemptUnit.command`)
            marker = Path(JAIL_CHECKPOINT) / CHECKPOINT_SAVE_MARKER
            env.update(CHIFFON_CHECKPOINT_DIR=JAIL_CHECKPOINT, CHIFFON_CHECKPOINT_SAVE=str(marker))
        return argv, (fd,)

    async def _check_started(self, unit: AttemptUnit, workdir: Path, env: dict[str, str]) -> None:
        """Whether the launcher got the job's program running; if not, why (it never ran)."""
        assert self._process is not None
        said = await unit.started(self._process.pid)
        if said is None:
            return
        await self._exit()
        await asyncio.to_thread(unit.close)
        problem = parse_report(said)
        if isinstance(problem, OSError):
            raise CannotStart(why_not_started(problem, self.assignment.command[0], workdir, env))
        raise CannotStart(problem)

    async def wait(self) -> Ended:
        """Copy its output to the log until it ends (or its timeout), then say how."""
        process = self._process
        assert process is not None and process.stdout is not None, "start() first"
        copying = asyncio.create_task(self._copy_output(process.stdout))
        timeout = self.assignment.timeout_seconds
        try:
            await asyncio.wait_for(self._exit(), timeout)
        except TimeoutError:
            await self.end("timed_out", f"ran past its timeout of {timeout:g} s")
        await self._exit()
        # What it started and left behind ends with it (and lets go of the output pipe):
        # its process group, and any process that left the group but still carries the
        # attempt in its environment.
        _signal_group(process.pid, signal.SIGKILL)
        strays = await asyncio.to_thread(self._end_strays)
        try:  # one that also cleared its environment may still hold the pipe: not for ever
            await asyncio.wait_for(asyncio.shield(copying), OUTPUT_DRAIN_SECONDS)
        except TimeoutError:
            self._why = "; ".join(d for d in (self._why, LEFT_THE_GROUP) if d)
            _close_output(process)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(copying, OUTPUT_DRAIN_SECONDS)
        if strays:
            log.warning("attempt %s of %s: ended %d process(es) it left outside its group",
                        self.assignment.attempt, self.assignment.job_id, strays)  # fmt: skip
        if self.unit is not None:
            if (oom := self.unit.out_of_memory()) is not None:
                self._why = "; ".join(d for d in (oom, self._why) if d)
            await asyncio.to_thread(self.unit.close)
        (self.attempt_dir / "state.json").unlink(missing_ok=True)
        self.finished.set()
        self.output.set()
        return self._ended(process.returncode)

    def _end_strays(self) -> int:
        """What is left of the job once its process exited: its unit's processes (or,
        without a unit, those of this user whose environment names the attempt)."""
        return self.unit.kill() if self.unit is not None else end_strays(self.assignment)

    async def cancel(self) -> None:
        await self.end("cancelled")

    async def end(self, why: Outcome, detail: str = "") -> None:
        """SIGTERM to the group, SIGKILL after the grace period; it ends as `why`."""
        process = self._process
        if process is None or process.returncode is not None or self._ending is not None:
            return
        self._ending, self._why = why, detail
        _signal_group(process.pid, signal.SIGTERM)
        self.resume()  # a stopped process acts on SIGTERM only once continued
        try:
            await asyncio.wait_for(self._exit(), self._grace)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)

    @property
    def suspended(self) -> bool:
        return self._suspended

    def suspend(self) -> None:
        """Freeze its unit, or SIGSTOP its group without one (CPU-only jobs: a stopped
        process keeps its GPU memory)."""
        if self._process is not None and self._process.returncode is None and not self.ending:
            if self.unit is not None:  # the whole unit, whatever left the group
                self.unit.freeze(True)
            else:
                _signal_group(self._process.pid, signal.SIGSTOP)
            self._suspended = True

    def resume(self) -> None:
        if self._process is not None and self._suspended:
            if self.unit is not None:
                self.unit.freeze(False)
            else:
                _signal_group(self._process.pid, signal.SIGCONT)
            self._suspended = False

    async def vacate(self, detail: str) -> None:
        """The ladder (`Ladder`): checkpoint signal, SIGTERM, SIGKILL; it ends as
        `preempted`, whatever its exit code (its job runs again elsewhere)."""
        process = self._process
        if process is None or process.returncode is not None or self._ending is not None:
            return
        self._ending, self._why = "preempted", detail
        _signal_group(process.pid, signal.Signals[self.ladder.checkpoint])
        self.resume()
        for sig, wait in ((signal.SIGTERM, self.ladder.grace_seconds),
                          (signal.SIGKILL, self.ladder.kill_seconds)):  # fmt: skip
            try:
                await asyncio.wait_for(self._exit(), wait)
                return
            except TimeoutError:
                _signal_group(process.pid, sig)

    async def _exit(self) -> None:
        """Until its process has exited. Not `Process.wait()`, which (Python 3.11) waits
        for the output pipe to close as well: a process that left the group would hold
        it."""
        process = self._process
        assert process is not None
        while process.returncode is None:  # noqa: ASYNC110 (no event is set at exit alone)
            await asyncio.sleep(EXIT_POLL_SECONDS)

    async def _copy_output(self, stream: asyncio.StreamReader) -> None:
        with self.log_path.open("ab") as out:
            preface = self.preface
            while chunk := preface or await stream.read(READ_CHUNK_BYTES):
                preface = b""
                room = max(0, self._max_log_bytes - self.log_bytes)
                out.write(chunk[:room])
                out.flush()
                self.log_bytes += min(room, len(chunk))
                self.log_bytes_dropped += max(0, len(chunk) - room)
                self.output.set()

    def _ended(self, returncode: int | None) -> Ended:
        code = 0 if returncode is None else returncode
        dropped = self.log_bytes_dropped
        cut = f"log cut at {self._max_log_bytes} bytes, {dropped} dropped" if dropped else ""
        return Ended(
            reason=self._ending or "exit",
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            runtime_seconds=round(time.monotonic() - self._started, 3),
            log_bytes=self.log_bytes,
            log_bytes_dropped=dropped,
            detail="; ".join(d for d in (self._why, cut) if d),
        )


def folder_problem(workdir: Path) -> str | None:
    """What keeps a job from starting in `workdir`, in words; None when nothing does."""
    shown = _shown(workdir)
    try:
        if not workdir.exists():
            return f"the folder {shown} does not exist"
        if not workdir.is_dir():
            return f"the workdir {shown} is not a folder"
    except OSError as exc:  # a name too long, a loop of links
        return f"the folder {shown} cannot be used ({exc.strerror or exc})"
    if not os.access(workdir, os.X_OK):
        return f"the agent's user may not enter the folder {shown}"
    return None


def why_not_started(exc: OSError, program: str, workdir: Path, env: Mapping[str, str]) -> str:
    """Why starting `program` in `workdir` failed with `exc`, in words (never a made-up
    exit code: it never ran)."""
    if exc.filename is not None and str(exc.filename) == str(workdir):  # chdir failed
        return folder_problem(workdir) or f"the folder {_shown(workdir)} cannot be entered"
    named = f"the program {_shown(program)!r}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
        return _not_there(exc, program, named, _program_path(program, workdir, env))
    if exc.errno == errno.ENOEXEC:
        return f"{named} is not in a format that can run"
    return f"{named} could not be started ({exc.strerror or exc})"


def _not_there(exc: OSError, program: str, named: str, found: Path | None) -> str:
    """Not found (ENOENT, ENOTDIR) or not executable (EACCES), in words."""
    if exc.errno == errno.EACCES:
        is_folder = found is not None and found.is_dir()
        return f"{named} is a folder" if is_folder else f"{named} is not executable"
    if found is not None and found.is_file():  # there: what its #! line names is not
        return f"the interpreter on the first line of {_shown(program)!r} was not found"
    return f"{named} was not found"


def _shown(path: Path | str, most: int = 200) -> str:
    """A path as a report shows it: a long one cut in the middle."""
    text = str(path)
    return text if len(text) <= most else f"{text[: most // 2]}...{text[-(most // 2) :]}"


def _program_path(program: str, workdir: Path, env: Mapping[str, str]) -> Path | None:
    """Where `program` is, as the start looked for it: a path (relative to `workdir`), or
    an executable file on the job's PATH."""
    if "/" in program:
        return workdir / program
    found = shutil.which(program, path=env.get("PATH", ""))
    return None if found is None else Path(found)


def end_strays(a: Assignment) -> int:
    """SIGKILL every process of this user whose environment names this attempt (one that
    left the job's process group with setsid); how many."""
    me, uid, ended = os.getpid(), os.getuid(), 0
    wanted = {"CHIFFON_JOB_ID": a.job_id, "CHIFFON_ATTEMPT": str(a.attempt)}
    for p in psutil.process_iter(["uids"]):
        try:
            if p.pid == me or p.info["uids"] is None or p.info["uids"].real != uid:
                continue
            env = p.environ()
            if all(env.get(k) == v for k, v in wanted.items()):
                p.kill()
                ended += 1
        except psutil.Error:
            continue
    return ended


def _close_output(process: asyncio.subprocess.Process) -> None:
    """Stop reading the job's output pipe (a process outside our reach holds it open)."""
    transport = getattr(process, "_transport", None)
    pipe = transport.get_pipe_transport(1) if transport is not None else None
    if pipe is not None:
        pipe.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _write_state(attempt_dir: Path, pid: int, a: Assignment) -> None:
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:  # it ended already: nothing to find after a restart
        return
    state = {"job_id": a.job_id, "attempt": a.attempt, "pid": pid, "create_time": started}
    path = attempt_dir / "state.json"
    path.write_text(json.dumps(state))
    path.chmod(0o600)


@dataclass(frozen=True, slots=True)
class Orphan:
    """A job process a previous run of the agent left behind, and what became of it."""

    job_id: str
    attempt: int
    pid: int
    was_running: bool


def end_orphans(jobs_dir: Path, *, grace_seconds: float = 10.0) -> list[Orphan]:
    """End every job process a previous run of this agent left (after a SIGKILL or a
    crash), each group SIGTERMed then SIGKILLed after `grace_seconds`, and say which.

    A process is ours only if its pid *and* its start time match the state file: a pid
    the system reused for something else is never signalled.
    """
    found = []
    for state_file in sorted(jobs_dir.glob("*/state.json")):
        try:
            state = json.loads(state_file.read_text())
            job_id, attempt = str(state["job_id"]), int(state["attempt"])
            pid, started = int(state["pid"]), float(state["create_time"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable job state %s: %s", state_file, exc)
            state_file.unlink(missing_ok=True)
            continue
        running = _is_same_process(pid, started)
        if running:
            _end_group(pid, grace_seconds)
        state_file.unlink(missing_ok=True)
        found.append(Orphan(job_id, attempt, pid, running))
    return found


def _is_same_process(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def _end_group(pid: int, grace_seconds: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        time.sleep(0.05)
    _signal_group(pid, signal.SIGKILL)
