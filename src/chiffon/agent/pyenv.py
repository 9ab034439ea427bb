"""A Python job's environment (`--python-env`): built once per lockfile with uv, kept in
the agent's cache, and the job run inside it.

The snapshot's `uv.lock` (with its `pyproject.toml`) is synced with `uv sync --frozen`,
without installing the project itself (the job's own code is the snapshot); else its
`requirements.txt` is installed with `uv pip install` into a fresh `uv venv`. Either way
the environment is named by the SHA-256 of what it was built from (the lockfile, its
kind, and the Python that runs it), so a second job of the same lock, or a new snapshot
whose lock did not change, runs at once in the environment already built.

uv is a dependency of Chiffon (the `uv` wheel), so the desktop needs nothing else; the
only downloads are the packages, from the index the desktop already reaches. Wheels only
(`--no-build`): building a source distribution runs its code, and the build runs outside
the job's sandbox as the agent's user, so a lock that needs a build is refused in uv's
words; a wheel's install runs nothing. A build
that fails ends the attempt with uv's last words. Environments are built under a lock
file, so two attempts of one lock build it once; one half built (the agent died) is
removed and built again.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BUILD_SECONDS = 1800.0
READY = ".chiffon-ready"
TAIL_CHARS = 400


class EnvFailed(Exception):
    """The environment could not be built; the message says why, in uv's words."""


@dataclass(frozen=True, slots=True)
class PythonEnv:
    path: Path
    key: str
    source: str  # "uv.lock" or "requirements.txt"
    built_seconds: float | None  # None: it was in the cache

    def line(self) -> str:
        """The job's first line of output: which environment it got."""
        how = ("from the cache" if self.built_seconds is None
               else f"built in {self.built_seconds:.1f} s")  # fmt: skip
        return f"chiffon: python environment {self.key[:12]} from {self.source} ({how})\n"

    def environ(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with the environment first on PATH."""
        path = f"{self.path / 'bin'}:{env.get('PATH', os.defpath)}"
        return {**env, "PATH": path, "VIRTUAL_ENV": str(self.path)}


LOCK_MAX_BYTES = 16 * 1024 * 1024
# What uv is given of the agent's environment: its own settings and how to reach the index
# (a proxy, a CA); nothing else (a secret in the agent's environment could be sent to an
# index URL a requirements file names, as `${VAR}`).
_PASSED = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY",
           "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
           "all_proxy")  # fmt: skip


def _own_file(folder: Path, name: str) -> Path | None:
    """`folder/name` where the system takes it (through links) when that is a regular file
    inside the folder, of at most `LOCK_MAX_BYTES`; None when there is none. `EnvFailed`
    when it leads out of the folder (a link to /etc/shadow: uv would read it as the
    agent's user, and say its first line back)."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    real, top = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([top, real]) != top:
        raise EnvFailed(f"--python-env: {name} leads outside the job's folder")
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode) or st.st_size > LOCK_MAX_BYTES:
        raise EnvFailed(f"--python-env: {name} is not a regular file of at most "
                        f"{LOCK_MAX_BYTES // 2**20} MB")  # fmt: skip
    return Path(real)


def lock_of(folder: Path) -> tuple[str, bytes] | None:
    """What the environment is built from: `uv.lock` (beside a `pyproject.toml`), else
    `requirements.txt`; None when the folder has neither."""
    lock, project = _own_file(folder, "uv.lock"), _own_file(folder, "pyproject.toml")
    if lock is not None and project is not None:
        return "uv.lock", project.read_bytes() + b"\0" + lock.read_bytes()
    requirements = _own_file(folder, "requirements.txt")
    if requirements is not None:
        return "requirements.txt", requirements.read_bytes()
    return None


# What a requirements file may say besides requirements: where wheels come from (a URL,
# never a path of the desktop's), and other requirement files of the job's own folder.
_URL_OPTIONS = frozenset({"-i", "--index-url", "--extra-index-url", "-f", "--find-links"})
_FILE_OPTIONS = frozenset({"-r", "--requirement", "-c", "--constraint"})
_FLAGS = frozenset({"--no-index", "--pre", "--prefer-binary"})


def check_requirements(folder: Path, name: str = "requirements.txt", depth: int = 0) -> None:
    """`EnvFailed` naming the first line that could make the agent, which builds the
    environment outside the sandbox and says uv's words back to the job's owner, read a
    file of the desktop's (`-r /etc/shadow`, `x @ file:///root/...`, `../x`), send one of
    its variables (`${...}`) or build code (`-e`). Requirement files it names are
    checked too."""
    if depth > 8:
        raise EnvFailed(f"{name}: requirement files nested more than 8 deep")
    own = _own_file(folder, name)
    if own is None:
        raise EnvFailed(f"--python-env: {name} is not in the job's folder")
    for number, raw in enumerate(own.read_text(errors="replace").splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            nested = _line_names(line, f"{name} line {number}")
            if nested is not None:
                check_requirements(folder, nested, depth + 1)


def _line_names(line: str, where: str) -> str | None:
    """The requirement file a line names (None: none), once the line is allowed."""
    if "${" in line:
        raise EnvFailed(f"--python-env: {where} names a variable of the desktop's")
    if "file:" in line or line.startswith(("/", "~", "..")) or "/.." in line:
        raise EnvFailed(f"--python-env: {where} names a path outside the job's folder")
    if not line.startswith("-"):
        return None
    option, _, value = line.replace("=", " ", 1).partition(" ")
    value = value.strip()
    if option in _URL_OPTIONS and value.startswith(("https://", "http://")):
        return None
    if option in _FILE_OPTIONS and value and not value.startswith("-"):
        return value
    if option in _FLAGS:
        return None
    allowed = "an index URL, a --find-links URL or a requirement file of the job's folder"
    raise EnvFailed(f"--python-env: {where}: {option} is not allowed ({allowed} is)")


def uv_binary() -> str:
    """uv as installed with Chiffon (the `uv` wheel), else on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise EnvFailed("uv is not installed with this agent") from None
        return found


async def ensure(folder: Path, envs: Path, *, python: str = sys.executable) -> PythonEnv:
    """The environment for the lock in `folder`, built under `envs` when not there yet (in
    a thread: a build takes minutes). `EnvFailed` when the folder has no lock, or the
    build fails."""
    return await asyncio.to_thread(find_or_build, folder, envs, python)


def find_or_build(folder: Path, envs: Path, python: str) -> PythonEnv:
    found = lock_of(folder)
    if found is None:
        raise EnvFailed("--python-env: the job's folder has no uv.lock (with its "
                        "pyproject.toml) or requirements.txt")  # fmt: skip
    source, content = found
    if source == "requirements.txt":
        check_requirements(folder)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = hashlib.sha256(b"%s\0%s\0%s\0" % (source.encode(), python.encode(), version.encode())
                         + content).hexdigest()  # fmt: skip
    path = envs / key
    envs.mkdir(parents=True, exist_ok=True)
    with open(envs / f"{key}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # one build per lock, whoever asks
        if (path / READY).exists():
            os.utime(path / READY)  # used: the last to be removed
            return PythonEnv(path, key, source, None)
        shutil.rmtree(path, ignore_errors=True)  # half built by an agent that died
        began = time.monotonic()
        try:
            _build(folder, path, source, python)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        (path / READY).write_text(source + "\n")
        return PythonEnv(path, key, source, time.monotonic() - began)


def _build(folder: Path, path: Path, source: str, python: str) -> None:
    uv = uv_binary()
    env = {k: v for k, v in os.environ.items() if k in _PASSED or k.startswith("UV_")}
    env.update(UV_PYTHON=python, UV_NO_PROGRESS="1", HOME=str(path.parent))
    env.setdefault("UV_CACHE_DIR", str(path.parent / ".uv-cache"))
    if source == "uv.lock":
        # A copy of the project's two files: the job's code is neither read nor installed.
        with tempfile.TemporaryDirectory(prefix="chiffon-lock-") as project:
            for name in ("pyproject.toml", "uv.lock"):
                own = _own_file(folder, name)
                assert own is not None  # lock_of found both
                shutil.copyfile(own, Path(project) / name)
            env["UV_PROJECT_ENVIRONMENT"] = str(path)
            _uv([uv, "sync", "--frozen", "--no-install-project", "--no-build", "--project",
                 project], env)  # fmt: skip
        return
    _uv([uv, "venv", "--python", python, str(path)], env)
    # In the job's folder, as pip runs: a path in the file is the folder's.
    _uv([uv, "pip", "install", "--no-build", "--python", str(path / "bin" / "python"), "-r",
         "requirements.txt"], env, cwd=folder)  # fmt: skip


def _uv(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=BUILD_SECONDS, check=False, cwd=cwd)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise EnvFailed(f"building the python environment took over {BUILD_SECONDS:.0f} s"
                        ) from None  # fmt: skip
    if done.returncode != 0:
        said = (done.stdout + done.stderr).decode(errors="replace")
        words = " ".join(said.split())[-TAIL_CHARS:]
        raise EnvFailed(f"building the python environment failed ({argv[1]} {argv[2]}): {words}")
