"""Isolation on the agent side, in one place: what this desktop can enforce (`Sandbox`,
found once at start and reported in every heartbeat), and one contained unit per attempt
(`AttemptUnit`) that the attempt's process starts in and ends with.

The mechanisms, strongest first, each checked by trying it at start:

- a control group per attempt (`sandbox.cgroups`, v2 or v1): whatever the job starts stays
  counted there and is killed with it; memory (its claim plus a margin, no swap),
  processes and CPU weight bounded; frozen to suspend;
- a PID, mount (and, for an ordinary user, user) namespace (`sandbox.jail`): the job sees
  no other process, the owner's homes and the agent's data directories are hidden, `/tmp`
  is its own, GPU nodes not assigned are covered; the namespace dies with its job;
- a child subreaper, the floor: what the job leaves behind is reparented to the launcher
  and killed with it.

Run as root, jobs run as an unprivileged user (`job_user`, made if missing), never root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from chiffon.agent.sandbox import jail
from chiffon.agent.sandbox.cgroups import JOBS_GROUP, CgroupError, Limits, Tree, Unit, tree_here
from chiffon.schemas.sandbox import is_full

log = logging.getLogger(__name__)

GB = 1024**3
MEMORY_MARGIN = 0.10  # over the job's claim
MEMORY_MARGIN_MIN_BYTES = 256 * 1024**2
JOBS_MEMORY_SHARE = 0.9  # of the desktop's memory, for all jobs, unless the owner sets it
HOMES = ("/home", "/root", "/run/user")
CHIFFON_DIRS = ("/etc/chiffon", "/var/lib/chiffon")
CGROUPS = "/sys/fs/cgroup"
KERNEL_DIRS = ("/proc", "/sys", "/dev")  # never a job's workdir
NICE = 19
# Where a job in namespaces sees its checkpoint folder (`<attempt dir>/checkpoint`): in its
# own /tmp, always there and writable (a bind at its own path would fail where the owner
# lent a folder holding the agent's, read-only).
JAIL_CHECKPOINT = "/tmp/chiffon-checkpoint"
NVIDIA_MAJOR = 195
TRIAL_SECONDS = 10.0
WHY_MAX = 8


class SandboxError(Exception):
    """An attempt's unit could not be made: why, in words."""


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """What the owner set (agent settings) and where the agent keeps its own files."""

    hide: Sequence[Path] = ()  # the agent's and the orchestrator's data directories
    expose: Sequence[Path] = ()  # read-only for every job (a shared dataset, a conda)
    job_user: str = "chiffon-job"
    require: bool = False
    jobs_max_memory_gb: float | None = None
    jobs_max_cores: float | None = None
    max_processes: int = 4096
    dev_dir: Path = Path("/dev")
    use_cgroups: bool = True
    use_namespaces: bool = True
    group: str = JOBS_GROUP  # this agent's group for all its jobs (one per agent)


@dataclass(slots=True)
class Protections:
    """What is enforced on this desktop, as the heartbeat says it."""

    processes: str = "none"  # cgroup | pidns | subreaper | none
    memory_limit: bool = False
    home_hidden: bool = False
    devices_hidden: bool = False
    required: bool = False
    why: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every protection `require_sandbox` asks for (`schemas.sandbox.is_full`)."""
        return is_full(self.report())

    def report(self) -> dict[str, Any]:
        return {
            "processes": self.processes, "memory_limit": self.memory_limit,
            "home_hidden": self.home_hidden, "devices_hidden": self.devices_hidden,
            "required": self.required, "why": [w[:200] for w in self.why[:WHY_MAX]],
        }  # fmt: skip

    def refusal(self) -> str | None:
        """Why a desktop whose owner requires the sandbox refuses jobs now, if it does."""
        if not self.required or self.complete:
            return None
        missing = "; ".join(self.why) or "it is incomplete"
        return f"the owner requires the sandbox, and it is not complete here ({missing})"


@dataclass(frozen=True, slots=True)
class JobUser:
    name: str
    uid: int
    gid: int


class Sandbox:
    """This desktop's isolation: `start()` finds what works; `unit()` per attempt."""

    def __init__(self, config: SandboxConfig, *, tree: Tree | None = None) -> None:
        self.config = config
        self.protections = Protections(required=config.require)
        self._tree = tree
        self._namespaces = False
        self._devices_cgroup = False
        self.user: JobUser | None = None

    def start(self) -> Protections:
        """Try each mechanism for real; what took effect, and why the rest did not."""
        p, why = self.protections, self.protections.why
        if not sys.platform.startswith("linux"):
            why.append(f"no sandbox on {sys.platform} (Linux only)")
            return p
        if os.geteuid() == 0:
            try:
                self.user = _job_user(self.config.job_user)
            except SandboxError as exc:
                why.append(str(exc))
                p.processes = "none"
                return p
        self._start_cgroups(p, why)
        self._start_namespaces(p, why)
        if p.processes == "none":
            p.processes = "subreaper"
        p.devices_hidden = self._namespaces or self._devices_cgroup
        return p

    def _start_cgroups(self, p: Protections, why: list[str]) -> None:
        if not self.config.use_cgroups:
            why.append("control groups are off (use_cgroups: false)")
            return
        try:
            tree = self._tree or tree_here(self.config.group)
            trial = tree.unit(f"trial-{os.getpid()}")
            took = trial.create(Limits(memory_bytes=GB, pids=64, deny_devices=[(1, 3)]))
            trial.remove()
            ceiling = tree.bound_jobs(_jobs_memory(self.config), self.config.jobs_max_cores)
        except (CgroupError, OSError) as exc:
            why.append(f"no control group per job: {exc}")
            return
        self._tree = tree
        p.processes = "cgroup"
        p.memory_limit = "memory" in took
        self._devices_cgroup = "devices" in took
        if not p.memory_limit:
            why.append(f"no memory limit: the {tree.version} memory controller is not "
                       "available to the agent")  # fmt: skip
        if "pids" not in took:
            why.append("no process limit: the pids controller is not available")
        log.info("sandbox: a %s control group per job (%s); jobs together: %s",
                 tree.version, ", ".join(took), ", ".join(ceiling) or "no ceiling")  # fmt: skip

    def _start_namespaces(self, p: Protections, why: list[str]) -> None:
        if not self.config.use_namespaces:
            why.append("namespaces are off (use_namespaces: false)")
            return
        problem = self._trial_run()
        if problem is not None:
            why.append(f"no namespaces: {problem}")
            return
        self._namespaces = True
        p.home_hidden = True
        if p.processes == "none":
            p.processes = "pidns"

    def _trial_run(self) -> str | None:
        """Run a job-like `true` through the launcher, in namespaces; why it failed."""
        read, write = os.pipe()
        exposed = [{"source": str(p), "target": str(p)} for p in _exposed(self.config.expose)]
        plan = {**self._base_plan(write), "pidns": True, "hide": self.hidden_paths(),
                "cwd": "/", "binds": exposed}  # fmt: skip
        try:
            done = subprocess.run(
                [*_launcher(), json.dumps(plan), "--", "true"],
                pass_fds=(write,),
                capture_output=True,
                timeout=TRIAL_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"the launcher did not run ({exc})"
        finally:
            os.close(write)
        said = _drain(read)
        if said or done.returncode != 0:
            detail = json.loads(said)["message"] if said else done.stderr.decode()[-200:].strip()
            return detail or f"the launcher exited with {done.returncode}"
        return None

    def _base_plan(self, report_fd: int) -> dict[str, Any]:
        plan: dict[str, Any] = {"agent_pid": os.getpid(), "report_fd": report_fd, "nice": NICE,
                                "userns": os.geteuid() != 0}  # fmt: skip
        if self.user is not None:
            plan["user"] = {"uid": self.user.uid, "gid": self.user.gid}
        return plan

    def sweep(self) -> int:
        """End every unit a previous run of this agent left (its processes killed, its group
        removed), whatever its attempt's files say; how many."""
        if self._tree is None or self.protections.processes != "cgroup":
            return 0
        ended = 0
        for name in self._tree.units():
            unit = self._tree.unit(name)
            if unit.pids():
                ended += 1
            unit.kill()
            with contextlib.suppress(OSError):
                unit.remove()
        return ended

    def unit(self, name: str, *, memory_gb: float, gpus: Iterable[int] = ()) -> AttemptUnit:
        """The unit of one attempt (`name`: `<job id>-<attempt>`; `gpus`: the indexes of
        the GPUs assigned, every other GPU's device node is covered), not made yet."""
        return AttemptUnit(self, name, memory_gb=memory_gb, gpus=tuple(gpus))

    def hidden_paths(self) -> list[str]:
        # The control groups too: the agent's (and their limits, which a job run as the
        # agent's user could write) and the other attempts' names, pids and use.
        wanted = [*HOMES, *CHIFFON_DIRS, CGROUPS,
                  *(os.path.realpath(p) for p in self.config.hide)]  # fmt: skip
        return _outermost(p for p in wanted if os.path.isdir(p))

    def forbidden_workdir(self, workdir: Path) -> str | None:
        """Why a workdir the submitter named may not be bound into a job's view, if so.
        Inside a path the owner lent in `job_paths` it may be (a lab's shared folder under
        /home), unless it is in, or holds, the agent's own folders."""
        real = os.path.realpath(workdir)
        agents = [os.path.realpath(p) for p in self.config.hide]
        lent = [os.path.realpath(p) for p in self.config.expose]
        if any(jail.inside(real, p) for p in lent) and not any(
            jail.inside(real, a) or jail.inside(a, real) for a in agents
        ):  # a folder the owner lent jobs (`job_paths`), though under a hidden one
            return None
        for folder in [*self.hidden_paths(), *KERNEL_DIRS]:
            if jail.inside(real, folder) or (
                folder not in KERNEL_DIRS and jail.inside(folder, real)
            ):
                return f"the workdir {real} is in or holds {folder}, which jobs may not see"
        for shared in jail.PRIVATE_TMP:  # a folder in it, yes; the desktop's own, whole, no
            if jail.inside(shared, real):
                return f"the workdir {real} holds {shared}, which each job has its own of"
        return None

    @property
    def tree(self) -> Tree | None:
        return self._tree if self.protections.processes == "cgroup" else None

    @property
    def namespaces(self) -> bool:
        return self._namespaces


class AttemptUnit:
    """One attempt's contained unit: `prepare()`, `command()` (how to start it),
    `started()` (whether it did), then `pids()`, `freeze()`, `kill()`, `close()`."""

    def __init__(self, sandbox: Sandbox, name: str, *, memory_gb: float,
                 gpus: tuple[int, ...]) -> None:  # fmt: skip
        self.sandbox, self.name = sandbox, name
        self.memory_bytes = _job_memory(sandbox.config, memory_gb)
        self.gpus = gpus
        self.group: Unit | None = None
        self.launcher_pid: int | None = None
        self._report: tuple[int, int] | None = None

    @property
    def memory_limit_gb(self) -> float | None:
        bounded = self.group is not None and self.sandbox.protections.memory_limit
        return self.memory_bytes / GB if bounded and self.memory_bytes else None

    def prepare(self, attempt_dir: Path, workdir: Path, given_workdir: bool) -> None:
        """Its group (limits read back), its private /tmp; the job user's folders. A given
        workdir inside (or holding) a folder the sandbox hides is refused: bound back in,
        it would show the job what the cover hides (another job's folder, the agent's
        secret, the owner's home)."""
        if given_workdir and (why := self.sandbox.forbidden_workdir(workdir)) is not None:
            raise SandboxError(why)
        tmp = attempt_dir / "tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        user = self.sandbox.user
        if user is not None:  # its folders, and the files laid into them (`agent.stage`)
            owned = [tmp, attempt_dir / "checkpoint"] + ([] if given_workdir else [workdir])
            for path in owned:
                _chown_tree(path, user.uid, user.gid)
            attempt_dir.chmod(0o711)  # the job user passes through to work/, reads nothing
        tree = self.sandbox.tree
        if tree is None:
            return
        self.group = tree.unit(self.name)
        try:
            self.group.create(Limits(memory_bytes=self.memory_bytes,
                                     pids=self.sandbox.config.max_processes,
                                     deny_devices=self._device_numbers()))  # fmt: skip
        except (CgroupError, OSError) as exc:
            raise SandboxError(f"its control group could not be made ({exc})") from exc

    def _covered_nodes(self) -> list[str]:
        dev = self.sandbox.config.dev_dir
        assigned = set(self.gpus)
        nodes = []
        for node in sorted(dev.glob("nvidia[0-9]*")):
            index = node.name.removeprefix("nvidia")
            if index.isdigit() and int(index) not in assigned:
                nodes.append(str(node))
        for pattern, first in (("renderD", 128), ("card", 0)):
            for node in sorted((dev / "dri").glob(f"{pattern}[0-9]*")):
                index = node.name.removeprefix(pattern)
                if index.isdigit() and int(index) - first not in assigned:
                    nodes.append(str(node))
        if not assigned and (dev / "kfd").exists():
            nodes.append(str(dev / "kfd"))
        return nodes

    def _device_numbers(self) -> list[tuple[int, int]]:
        numbers = []
        for node in self._covered_nodes():
            with contextlib.suppress(OSError):
                rdev = os.stat(node).st_rdev
                numbers.append((os.major(rdev), os.minor(rdev)))
        return numbers

    def command(self, argv: Sequence[str], *, cwd: Path, attempt_dir: Path,
                binds: Sequence[Path] = (), checkpoint: Path | None = None,
                read_only: Sequence[Path] = ()) -> tuple[list[str], int]:  # fmt: skip
        """The launcher's argv for this job, and the fd to pass it (its report pipe);
        `checkpoint`: its checkpoint folder, bound writable at `JAIL_CHECKPOINT`;
        `read_only`: folders of the agent's it may read (its Python environment)."""
        read, write = os.pipe()
        self._report = (read, write)
        sandbox = self.sandbox
        plan = sandbox._base_plan(write)
        plan["cwd"] = str(cwd)
        plan["cgroups"] = self.group.procs_files() if self.group is not None else []
        plan["pidns"] = sandbox.namespaces
        if sandbox.namespaces:
            cover = attempt_dir / "covered-device"
            if not cover.exists():
                cover.touch(mode=0o000)
                cover.chmod(0o000)
            mounts = [{"source": str(attempt_dir / "tmp"), "target": tmp, "writable": True}
                      for tmp in jail.PRIVATE_TMP if os.path.isdir(tmp)]  # fmt: skip
            # read-only first: the job's own folder, inside a lent one, is bound over it
            mounts += [{"source": str(p), "target": str(p), "writable": False}
                       for p in _exposed(sandbox.config.expose)]  # fmt: skip
            mounts += [{"source": str(p), "target": str(p), "writable": False} for p in read_only]
            mounts += [{"source": str(p), "target": str(p), "writable": True} for p in binds]
            if checkpoint is not None and "/tmp" in jail.PRIVATE_TMP:
                mounts.append({"source": str(checkpoint), "target": JAIL_CHECKPOINT,
                               "writable": True})  # fmt: skip
            hide = [*sandbox.hidden_paths(), *self._closed_to_job_user(binds)]
            plan.update(hide=_outermost(hide), binds=mounts, cover_file=str(cover),
                        cover=self._covered_nodes())  # fmt: skip
        return [*_launcher(), json.dumps(plan), "--", *argv], write

    def _closed_to_job_user(self, folders: Sequence[Path]) -> list[str]:
        """Folders above the job's own that its user may not pass through (a 0700 data
        directory's parent): covered too, so its own folder is reached through the cover."""
        user = self.sandbox.user
        if user is None:
            return []
        closed = []
        for folder in folders:
            for above in Path(os.path.abspath(folder)).parents:
                with contextlib.suppress(OSError):
                    st = above.stat()
                    if st.st_uid != user.uid and not st.st_mode & 0o001 and str(above) != "/":
                        closed.append(str(above))
        return closed

    async def started(self, launcher_pid: int) -> dict[str, Any] | None:
        """After the launcher started: None once the job's program runs, or what went
        wrong (`stage`, `message`, `errno`, `filename`)."""
        import asyncio

        self.launcher_pid = launcher_pid
        assert self._report is not None
        read, write = self._report
        self._report = None
        os.close(write)
        said = await asyncio.to_thread(_drain, read)
        return json.loads(said) if said else None

    def pids(self) -> list[int]:
        if self.group is not None:
            return self.group.pids()
        return _descendants(self.launcher_pid)

    def freeze(self, frozen: bool) -> None:
        """Suspend (or resume) every process of the unit."""
        if self.group is not None and "freezer" in self.group.tree.controls():
            with contextlib.suppress(CgroupError):
                self.group.freeze(frozen)
                return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def kill(self) -> int:
        """SIGKILL all that is left in the unit; how many were."""
        left = self.pids()
        if self.group is not None:
            self.group.kill()
            return len(left)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return len(left)

    def out_of_memory(self) -> str | None:
        """ "out of memory (limit N GB)" when the kernel killed in it for its limit."""
        if self.group is None or not self.group.oom_kills():
            return None
        return f"out of memory (limit {self.memory_bytes / GB:.3g} GB)"

    def close(self) -> None:
        """Its processes killed and its group removed (idempotent); the report pipe shut."""
        if self._report is not None:
            for fd in self._report:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._report = None
        if self.group is not None:
            self.group.kill()
            try:
                self.group.remove()
            except OSError as exc:
                log.warning("the control group of %s could not be removed: %s", self.name, exc)


def _chown_tree(folder: Path, uid: int, gid: int) -> None:
    """`folder` and all under it, links themselves (never followed), given to the job user."""
    if not folder.exists():
        return
    os.lchown(folder, uid, gid)
    for top, dirs, names in os.walk(folder, followlinks=False):
        for name in [*dirs, *names]:
            os.lchown(os.path.join(top, name), uid, gid)


def _launcher() -> list[str]:
    """How the launcher starts: this Python, isolated (-I) and without site (-S), on the
    launcher's file, so it imports nothing else."""
    return [sys.executable, "-I", "-S", jail.__file__]


def _drain(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _descendants(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _outermost(paths: Iterable[str]) -> list[str]:
    """Each folder once, without those inside another listed (hidden with it)."""
    kept: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(jail.inside(p, k) for k in kept):
            kept.append(p)
    return kept


def _dedupe(paths: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def _exposed(expose: Sequence[Path]) -> list[Path]:
    """The owner's read-only paths, and the agent's own Python (what `python3` of a job on
    the agent's PATH needs; code, not the owner's files)."""
    own = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix})
    return [Path(p) for p in _dedupe([*(str(p) for p in expose), *own]) if os.path.exists(p)]


def _jobs_memory(config: SandboxConfig) -> int:
    if config.jobs_max_memory_gb:
        return int(config.jobs_max_memory_gb * GB)
    return int(psutil.virtual_memory().total * JOBS_MEMORY_SHARE)


def _job_memory(config: SandboxConfig, claim_gb: float) -> int:
    """An attempt's memory limit: its claim plus a margin; with no claim, the ceiling for
    all jobs."""
    if claim_gb > 0:
        claim = int(claim_gb * GB)
        return claim + max(int(claim * MEMORY_MARGIN), MEMORY_MARGIN_MIN_BYTES)
    return _jobs_memory(config)


def _job_user(name: str) -> JobUser:
    """The unprivileged user jobs of a root agent run as; made (a system user with no home
    and no login) if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise SandboxError(f"the job user {name!r} does not exist (and no useradd)") from None
        done = subprocess.run(
            [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SandboxError(
                f"the job user {name!r} does not exist and could not be made: "
                f"{done.stderr.strip()[:150]}"
            ) from None
        log.warning("made the unprivileged user %r that jobs run as", name)
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise SandboxError(f"the job user {name!r} is root")
    return JobUser(name, entry.pw_uid, entry.pw_gid)


def parse_report(said: Mapping[str, Any]) -> OSError | str:
    """The launcher's report as the `OSError` the start would have raised, or words."""
    if said.get("stage") in ("exec", "chdir") and isinstance(said.get("errno"), int):
        return OSError(said["errno"], os.strerror(said["errno"]), said.get("filename"))
    return str(said.get("message", "the sandbox could not be made"))
