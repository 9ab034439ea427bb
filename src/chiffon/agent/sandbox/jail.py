"""The launcher every sandboxed attempt starts through (`agent.sandbox` builds its plan).

Run as a script (`python -I -S jail.py PLAN -- COMMAND...`), standard library only: it is
between the agent and the job, so it imports nothing of the agent's and starts fast. In
order, before any of the job's code runs:

1. it dies with whoever started it (`PR_SET_PDEATHSIG`), checked against the agent's pid;
2. it joins the attempt's cgroups (each `cgroup.procs` named in the plan), so everything
   after is counted and bounded there, and lowers its priority (`nice`);
3. it unshares a mount and a PID namespace (and, run as an ordinary user, a user namespace
   mapping that user to itself; no capability survives the job's `exec`);
4. its child, PID 1 of the new namespace, makes the mount namespace the job sees: `/proc`
   for the namespace (no other process of the desktop is visible), the owner's homes and
   the agent's data directories hidden under empty read-only tmpfs, the job's own folders
   bound back in, a private `/tmp` and `/var/tmp` (its attempt's folder) and `/dev/shm`,
   the GPU device nodes not assigned covered; an IPC namespace of its own;
5. the job runs as PID 2, with `PR_SET_NO_NEW_PRIVS` (a setuid program cannot raise it)
   and, run as root, as the unprivileged user named in the plan.

PID 1 passes the signals the agent sends (cancel, the vacate ladder) to every process of
the namespace, reaps, and exits when the job's own process exits; the kernel then kills
whatever else is left in the namespace (a `setsid` double fork, `env -i` included). The
launcher outside ends the same way its job did (the same exit code, or the same signal).

Without namespaces (the plan says `pidns: false`), it is a child subreaper instead: what
the job leaves behind is reparented to it and killed when the job's process exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import warnings  # noqa: F401 (os.execvpe imports it late: before the mounts)
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)  # fmt: skip
PRIVATE_TMP = ("/tmp", "/var/tmp")  # both are the attempt's own tmp folder
# Other world-writable folders, each a tmpfs of the job's own (counted in its memory):
# shared memory, and lock files no other job nor the owner sees.
PRIVATE_TMPFS = (("/dev/shm", "mode=1777"), ("/run/lock", "mode=1777,size=1m"))
SETUP_FAILED = 125  # the launcher could not make the sandbox: the job never ran

_libc = ctypes.CDLL(None, use_errno=True)
Plan = dict[str, Any]  # what the agent tells the launcher (agent.sandbox)


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags),
                         _bytes(data or None))  # fmt: skip
    _check(result, f"mount {source or fstype} on {target}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _die_with_parent(parent: int) -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above: so do we
        os._exit(SETUP_FAILED)


def _enter_namespaces(plan: Plan) -> None:
    uid, gid = os.getuid(), os.getgid()
    user = plan.get("userns", False)
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (CLONE_NEWUSER if user else 0)
    _check(_libc.unshare(flags), "unshare")
    if user:  # this user is itself inside, with no other id mapped
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _bind_target(target: str, is_dir: bool) -> None:
    if is_dir:
        _mkdirs(target)
    elif not os.path.lexists(target):
        _mkdirs(os.path.dirname(target))
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))


def _open_binds(plan: Plan) -> list[tuple[int, str, bool, bool]]:
    """Each bind's source opened now, before anything is hidden (never followed again)."""
    binds = []
    for bind in plan.get("binds", []):
        fd = os.open(bind["source"], os.O_PATH | os.O_CLOEXEC)
        binds.append((fd, bind["target"], bool(bind.get("writable")),
                      os.path.isdir(bind["source"])))  # fmt: skip
    return binds


def _bind(fd: int, target: str, writable: bool, is_dir: bool) -> None:
    _bind_target(target, is_dir)
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    if not writable:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    os.close(fd)


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or under it (the agent's side uses it too)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _outermost(folders: list[str]) -> list[str]:
    """The folders to cover: those there, one inside another (or in a private tmp) skipped."""
    hidden: list[str] = []
    for folder in sorted(folders, key=len):
        if os.path.isdir(folder) and not any(inside(folder, h) for h in [*hidden, *PRIVATE_TMP]):
            hidden.append(folder)
    return hidden


def _cover_devices(cover_fd: int, nodes: list[str]) -> None:
    """The GPU nodes not assigned: each under an unopenable, read-only file."""
    for node in nodes:
        if os.path.exists(node):
            _mount(f"/proc/self/fd/{cover_fd}", node, None, MS_BIND)
            _mount(None, node, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    os.close(cover_fd)


def _make_view(plan: Plan) -> None:
    """The mount namespace the job sees (run by PID 1 of the new PID namespace): its own
    /tmp first, then the hidden folders covered, then its folders bound back in, then the
    covers made read-only, then the GPU nodes not assigned covered, then /proc."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here leaks out
    binds = _open_binds(plan)
    cover = plan.get("cover_file")
    cover_fd = os.open(cover, os.O_PATH | os.O_CLOEXEC) if cover else None
    for bind in [b for b in binds if b[1] in PRIVATE_TMP]:
        _bind(*bind)
    hidden = _outermost(plan.get("hide", []))
    for folder in hidden:
        _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for bind in [b for b in binds if b[1] not in PRIVATE_TMP]:
        _bind(*bind)
    for folder in hidden:  # the covers themselves: read-only from now on
        _mount(None, folder, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if cover_fd is not None:
        _cover_devices(cover_fd, plan.get("cover", []))
    for folder, options in PRIVATE_TMPFS:  # world-writable folders: its own, small
        if os.path.isdir(folder) and not os.path.islink(folder):
            _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, options)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _become_job_user(plan: Plan) -> None:
    who = plan.get("user")
    if who is not None:  # started as root: the job runs as this unprivileged user
        os.setgroups([])
        os.setgid(who["gid"])
        os.setuid(who["uid"])
        if os.getuid() == 0 or os.geteuid() == 0:
            raise SetupError("could not give up root")


def _exec_job(plan: Plan, command: list[str]) -> None:
    """In the job's own process: become what it runs as, then run it (never returns). Why
    it could not goes to the agent on the report pipe (closed by a successful exec)."""
    stage = "setup"
    try:
        _become_job_user(plan)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the user change, which clears it
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        stage = "chdir"
        os.chdir(plan["cwd"])
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        stage = "exec"
        os.execvpe(command[0], command, dict(os.environ))
    except OSError as exc:
        _report(plan, stage, str(exc), exc.errno, exc.filename)
    except SetupError as exc:
        _report(plan, "setup", str(exc))
    os._exit(SETUP_FAILED)


def _report(plan: Plan, stage: str, message: str, errno: int | None = None,
            filename: object = None) -> None:  # fmt: skip
    """Say why the job did not start, on the report pipe."""
    said = {"stage": stage, "message": message, "errno": errno,
            "filename": None if filename is None else str(filename)}  # fmt: skip
    try:
        os.write(plan["report_fd"], json.dumps(said).encode())
    except (OSError, KeyError):
        os.write(2, f"chiffon: {message}\n".encode())


def _pass_on(sig: int, _frame: object) -> None:
    """A signal from the agent goes on: from the launcher to PID 1, from PID 1 to every
    process of the namespace, from the subreaper to the job's process group."""
    try:
        if _ROLE == "init":
            os.kill(-1, sig)
        elif _ROLE == "outer":
            os.kill(_CHILD, sig)
        elif _CHILD:
            os.killpg(_CHILD, sig)
    except OSError:
        pass


_ROLE = "subreaper"
_CHILD = 0


def _supervise(child: int) -> int:
    """Reap until `child` exits; its wait status."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child:
            return status


def _end_as(status: int) -> None:
    """Exit as the job's process did: the same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _children() -> list[int]:
    """The processes whose parent is this one (reparented to it: it is a subreaper)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:
            found.append(int(entry))
    return found


def _kill_children() -> None:
    """SIGKILL every process reparented to this subreaper, until none is left."""
    for _ in range(100):
        found = _children()
        if not found:
            return
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass


def _as_subreaper(plan: Plan, command: list[str]) -> None:
    global _CHILD
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        _exec_job(plan, command)
    _CHILD = job
    os.close(plan["report_fd"])
    status = _supervise(job)
    _kill_children()
    _end_as(status)


def _as_namespace(plan: Plan, command: list[str]) -> None:
    """The launcher outside forks PID 1, which makes the view and forks the job."""
    global _ROLE, _CHILD
    told, tell = os.pipe()  # PID 1 tells the launcher how the job ended
    init = os.fork()
    if init == 0:
        _ROLE = "init"
        os.close(told)
        os.setsid()  # the agent's signals reach it through the launcher, once
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _make_view(plan)
        except (OSError, SetupError) as exc:
            _report(plan, "setup", f"the sandbox could not be made: {exc}")
            os._exit(SETUP_FAILED)
        job = os.fork()
        if job == 0:
            os.close(tell)
            _exec_job(plan, command)
        _CHILD = job
        os.close(plan["report_fd"])
        status = _supervise(job)
        os.write(tell, str(status).encode())
        os._exit(0)  # the kernel ends what else is left in the namespace
    _ROLE, _CHILD = "outer", init
    os.close(tell)
    os.close(plan["report_fd"])
    _supervise(init)
    said = os.read(told, 64)
    _end_as(int(said) if said else 137 << 8)


def main(argv: list[str]) -> None:
    plan = json.loads(argv[1])
    command = argv[3:]
    try:
        os.set_inheritable(plan["report_fd"], False)  # the job's exec closes it
        _die_with_parent(plan["agent_pid"])
        for procs in plan.get("cgroups", []):
            _write(procs, str(os.getpid()))
        os.nice(plan.get("nice", 0))
        for sig in FORWARDED:
            signal.signal(sig, _pass_on)
        if plan.get("pidns"):
            _enter_namespaces(plan)
    except (OSError, SetupError) as exc:
        _report(plan, "setup", f"the sandbox could not be made: {exc}")
        os._exit(SETUP_FAILED)
    if plan.get("pidns"):
        _as_namespace(plan, command)
    _as_subreaper(plan, command)


if __name__ == "__main__":
    main(sys.argv)
