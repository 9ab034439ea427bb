"""Control groups for attempts: one group per attempt under one group for all jobs, under
the agent's own group, on cgroup v2 (the unified tree of current desktops) or v1 (one tree
per controller: memory, pids, freezer, cpu, devices).

Each limit is written, then read back: a limit the kernel (or a delegation that does not
cover it) silently ignored is reported as missing, never assumed (systemd #9641).

Where the agent may create groups: as root, anywhere under its own; as an ordinary user,
where systemd delegated its group to it (`systemd-run --user --scope -p Delegate=yes`, or
a user service with `Delegate=yes`; docs/owner.md).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "freezer", "cpu", "devices")
V2_CONTROLLERS = ("memory", "pids", "cpu")
JOBS_GROUP = "chiffon-jobs"
CPU_PERIOD_US = 100_000
LOWEST_WEIGHT_V1 = 2  # cpu.shares: the owner's processes (1024) always win
LOWEST_WEIGHT_V2 = 1  # cpu.weight
EMPTY_WAIT_SECONDS = 5.0


class CgroupError(Exception):
    """A group could not be made or bounded: why, in words."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int | None = None  # no swap beyond it
    pids: int | None = None
    deny_devices: Sequence[tuple[int, int]] = ()  # (major, minor) of character devices


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path} ({exc.strerror or exc})") from exc


def _own_paths(text: str) -> dict[str, str]:
    """/proc/self/cgroup: each controller (v2: "") to the agent's group in its tree."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        _id, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            own[name] = path
    return own


def _mounts(text: str) -> dict[str, Path]:
    """/proc/self/mountinfo: each v1 controller (v2: "") to where its tree is mounted."""
    found: dict[str, Path] = {}
    for line in text.splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        where = Path(fields[4])
        if fstype == "cgroup2":
            found.setdefault("", where)
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in V1_CONTROLLERS:
                    found.setdefault(option, where)
    return found


def _wait_empty(procs_files: Iterable[Path], seconds: float = EMPTY_WAIT_SECONDS) -> bool:
    files = list(procs_files)
    deadline = time.monotonic() + seconds
    while True:
        if all(not f.exists() or not _read(f) for f in files):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _took(path: Path, value: str) -> bool:
    """Write a limit and read it back: whether it took effect as written."""
    _write(path, value)
    return _read(path) == value


def _kill_listed(procs: Path) -> int:
    killed = 0
    with contextlib.suppress(OSError):
        for pid in _read(procs).split():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
    return killed


def _freeze_and_kill(unit: Unit, procs: Path) -> bool:
    """Freeze the unit (nothing forks meanwhile), SIGKILL each of `procs`, thaw (SIGKILL
    acts on a thawed process), until `procs` is empty; whether it is."""
    for _ in range(20):
        with contextlib.suppress(CgroupError):
            unit.freeze(True)
        killed = _kill_listed(procs)
        with contextlib.suppress(CgroupError):
            unit.freeze(False)
        if _wait_empty([procs], 0.5 if killed else 0.1):
            return True
    return False


class Tree:
    """Where attempt groups go, on one version of cgroups."""

    version: str
    name: str

    def unit(self, name: str) -> Unit:
        raise NotImplementedError

    def units(self) -> list[str]:
        """The attempt groups present (a previous run's included)."""
        raise NotImplementedError

    def bound_jobs(self, memory_bytes: int | None, cores: float | None) -> list[str]:
        """The ceiling for all jobs together; what took effect, in words."""
        raise NotImplementedError

    def controls(self) -> set[str]:
        raise NotImplementedError


class Unit:
    """One attempt's group."""

    tree: Tree
    name: str

    def create(self, limits: Limits) -> list[str]:
        """Make it with these limits (each read back); the protections that took effect."""
        raise NotImplementedError

    def procs_files(self) -> list[str]:
        """Where the launcher writes its pid to join."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def freeze(self, frozen: bool) -> None:
        raise NotImplementedError

    def kill(self) -> bool:
        """SIGKILL all in it; whether it is empty now."""
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


class V1Tree(Tree):
    version = "v1"

    def __init__(self, roots: dict[str, Path], name: str = JOBS_GROUP) -> None:
        self.name = name
        self.roots = roots  # controller: its tree's group for all jobs
        for controller, root in roots.items():
            try:
                root.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(
                    f"cannot make a {controller} group in {root.parent} ({exc.strerror})"
                ) from exc

    @classmethod
    def here(cls, name: str = JOBS_GROUP) -> V1Tree:
        own = _own_paths(Path("/proc/self/cgroup").read_text())
        mounts = _mounts(Path("/proc/self/mountinfo").read_text())
        roots = {}
        for controller in V1_CONTROLLERS:
            if controller in mounts and controller in own:
                roots[controller] = mounts[controller] / own[controller].lstrip("/") / name
        if not {"memory", "pids", "freezer"} <= roots.keys():
            raise CgroupError("this desktop has no cgroup v1 memory, pids and freezer trees")
        return cls(roots, name)

    def controls(self) -> set[str]:
        return set(self.roots)

    def unit(self, name: str) -> V1Unit:
        return V1Unit(self, name)

    def units(self) -> list[str]:
        return sorted(p.name for p in self.roots["pids"].iterdir() if p.is_dir())

    def bound_jobs(self, memory_bytes: int | None, cores: float | None) -> list[str]:
        took = []
        if memory_bytes:
            memory = self.roots["memory"]
            _write(memory / "memory.limit_in_bytes", str(memory_bytes))
            if int(_read(memory / "memory.limit_in_bytes")) <= memory_bytes:
                took.append("memory")
        if cores and "cpu" in self.roots:
            cpu = self.roots["cpu"]
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(int(cores * CPU_PERIOD_US)))
            if int(_read(cpu / "cpu.cfs_quota_us")) == int(cores * CPU_PERIOD_US):
                took.append("cores")
        return took


class V1Unit(Unit):
    def __init__(self, tree: V1Tree, name: str) -> None:
        self.tree, self.name = tree, name
        self.dirs = {c: root / name for c, root in tree.roots.items()}

    def create(self, limits: Limits) -> list[str]:
        for controller, d in self.dirs.items():
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(
                    f"cannot make the {controller} group {d} ({exc.strerror})"
                ) from exc
        took = ["processes"]
        if limits.memory_bytes:
            took += self._bound_memory(limits.memory_bytes)
        if limits.pids and _took(self.dirs["pids"] / "pids.max", str(limits.pids)):
            took.append("pids")
        if "cpu" in self.dirs and _took(self.dirs["cpu"] / "cpu.shares", str(LOWEST_WEIGHT_V1)):
            took.append("cpu_weight")
        if limits.deny_devices and "devices" in self.dirs and self._deny(limits.deny_devices):
            took.append("devices")
        return took

    def _deny(self, devices: Sequence[tuple[int, int]]) -> bool:
        """Each character device refused to the group; whether the list says so."""
        for major, minor in devices:
            _write(self.dirs["devices"] / "devices.deny", f"c {major}:{minor} rwm")
        listed = _read(self.dirs["devices"] / "devices.list") + "\n"
        if "a *:* rwm" in listed:  # everything allowed still: the deny did not take
            return False
        return all(f"c {major}:{minor} " not in listed for major, minor in devices)

    def _bound_memory(self, limit: int) -> list[str]:
        memory = self.dirs["memory"]
        _write(memory / "memory.limit_in_bytes", str(limit))
        took = int(_read(memory / "memory.limit_in_bytes")) <= limit
        swap = memory / "memory.memsw.limit_in_bytes"
        if swap.exists():  # memory and swap together: no swap beyond the limit
            _write(swap, str(limit))
        else:
            with contextlib.suppress(CgroupError):
                _write(memory / "memory.swappiness", "0")
        return ["memory"] if took else []

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in _read(self.dirs["pids"] / "cgroup.procs").split()]
        return []

    def freeze(self, frozen: bool) -> None:
        state = self.dirs["freezer"] / "freezer.state"
        _write(state, "FROZEN" if frozen else "THAWED")

    def kill(self) -> bool:
        _freeze_and_kill(self, self.dirs["pids"] / "cgroup.procs")
        return _wait_empty(self.procs_files_paths())

    def procs_files_paths(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def oom_kills(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in _read(self.dirs["memory"] / "memory.oom_control").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> None:
        for d in self.dirs.values():
            with contextlib.suppress(FileNotFoundError):
                _rmdir(d)


def _rmdir(d: Path) -> None:
    for _ in range(50):  # a group empties a moment after its last process is reaped
        try:
            d.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    d.rmdir()


class V2Tree(Tree):
    """`<own group>/chiffon-jobs/<attempt>`; the agent itself moves to `<own>/agent` when
    its own group must hand controllers down (a group with processes cannot)."""

    version = "v2"

    def __init__(self, own: Path, name: str = JOBS_GROUP, *, move_self: bool = True) -> None:
        self.own, self.name = own, name
        self.root = own / name
        available = set(_read(own / "cgroup.controllers").split())
        self._controls = available & set(V2_CONTROLLERS)
        try:
            if self._controls and move_self and _read(own / "cgroup.procs"):
                (own / "agent").mkdir(exist_ok=True)
                _write(own / "agent" / "cgroup.procs", str(os.getpid()))
            self.root.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot make a group in {own} ({exc.strerror})") from exc
        self._controls = self._hand_down(own, self._controls)
        self._controls = self._hand_down(self.root, self._controls)

    @staticmethod
    def _hand_down(group: Path, wanted: set[str]) -> set[str]:
        for controller in sorted(wanted):
            with contextlib.suppress(CgroupError):
                _write(group / "cgroup.subtree_control", f"+{controller}")
        return wanted & set(_read(group / "cgroup.subtree_control").split())

    @classmethod
    def here(cls, name: str = JOBS_GROUP) -> V2Tree:
        own = _own_paths(Path("/proc/self/cgroup").read_text())
        mounts = _mounts(Path("/proc/self/mountinfo").read_text())
        if "" not in mounts or "" not in own or mounts[""] != Path("/sys/fs/cgroup"):
            raise CgroupError("this desktop does not use the unified cgroup v2 tree")
        return cls(mounts[""] / own[""].lstrip("/"), name)

    def controls(self) -> set[str]:
        return {"freezer", *self._controls}

    def unit(self, name: str) -> V2Unit:
        return V2Unit(self, name)

    def units(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def bound_jobs(self, memory_bytes: int | None, cores: float | None) -> list[str]:
        took = []
        if memory_bytes and "memory" in self._controls:
            _write(self.root / "memory.max", str(memory_bytes))
            if int(_read(self.root / "memory.max")) <= memory_bytes:
                took.append("memory")
        if cores and "cpu" in self._controls:
            quota = f"{int(cores * CPU_PERIOD_US)} {CPU_PERIOD_US}"
            _write(self.root / "cpu.max", quota)
            if _read(self.root / "cpu.max") == quota:
                took.append("cores")
        return took


class V2Unit(Unit):
    """`<attempt>` holds the limits; its processes live in the leaf `<attempt>/job`, so a
    job run as the agent's own user cannot reach (nor raise) its limits from inside."""

    def __init__(self, tree: V2Tree, name: str) -> None:
        self.tree, self.name = tree, name
        self.dir = tree.root / name
        self.leaf = self.dir / "job"

    def create(self, limits: Limits) -> list[str]:
        try:
            self.dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot make the group {self.dir} ({exc.strerror})") from exc
        controls, took = self.tree.controls(), ["processes"]
        if limits.memory_bytes and "memory" in controls:
            _write(self.dir / "memory.max", str(limits.memory_bytes))
            with contextlib.suppress(CgroupError, FileNotFoundError):
                _write(self.dir / "memory.swap.max", "0")
            if int(_read(self.dir / "memory.max")) <= limits.memory_bytes:
                took.append("memory")
        if limits.pids and "pids" in controls:
            _write(self.dir / "pids.max", str(limits.pids))
            if _read(self.dir / "pids.max") == str(limits.pids):
                took.append("pids")
        if "cpu" in controls:
            _write(self.dir / "cpu.weight", str(LOWEST_WEIGHT_V2))
            if _read(self.dir / "cpu.weight") == str(LOWEST_WEIGHT_V2):
                took.append("cpu_weight")
        try:
            self.leaf.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot make the group {self.leaf} ({exc.strerror})") from exc
        return took  # devices: v2 needs a BPF program; the mount namespace covers them

    def procs_files(self) -> list[str]:
        return [str(self.leaf / "cgroup.procs")]

    def pids(self) -> list[int]:
        found: list[int] = []
        for group in (self.dir, self.leaf):
            with contextlib.suppress(OSError):
                found += [int(p) for p in _read(group / "cgroup.procs").split()]
        return found

    def freeze(self, frozen: bool) -> None:
        _write(self.dir / "cgroup.freeze", "1" if frozen else "0")

    def kill(self) -> bool:
        procs = self.leaf / "cgroup.procs"
        if (self.dir / "cgroup.kill").exists():  # Linux 5.14: the kernel kills them all
            with contextlib.suppress(CgroupError):
                _write(self.dir / "cgroup.kill", "1")
                if _wait_empty([procs, self.dir / "cgroup.procs"]):
                    return True
        return _freeze_and_kill(self, procs) or _wait_empty([procs])

    def oom_kills(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in _read(self.dir / "memory.events").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> None:
        for group in (self.leaf, self.dir):
            with contextlib.suppress(FileNotFoundError):
                _rmdir(group)


def tree_here(name: str = JOBS_GROUP) -> Tree:
    """The cgroup tree this desktop offers the agent (v2 first); `CgroupError` says why
    none."""
    why = []
    for make in (V2Tree.here, V1Tree.here):
        try:
            return make(name)
        except (CgroupError, OSError) as exc:
            why.append(str(exc))
    raise CgroupError("; ".join(why))
