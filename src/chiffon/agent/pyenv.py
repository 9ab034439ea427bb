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


def lock_of(folder: Path) -> tuple[str, bytes] | None:
    """What the environment is built from: `uv.lock` (beside a `pyproject.toml`), else
    `requirements.txt`; None when the folder has neither."""
    lock, project = folder / "uv.lock", folder / "pyproject.toml"
    if lock.is_file() and project.is_file():
        return "uv.lock", project.read_bytes() + b"\0" + lock.read_bytes()
    requirements = folder / "requirements.txt"
    if requirements.is_file():
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
    file of the desktop's (`-r /etc/shadow`, `x @ file:///root/...`, `../x`), or build one
    (`-e`). Requirement files it names are checked too."""
    if depth > 8:
        raise EnvFailed(f"{name}: requirement files nested more than 8 deep")
    for number, raw in enumerate((folder / name).read_text(errors="replace").splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name} line {number}"
        if "file:" in line or line.startswith(("/", "~", "..")) or "/.." in line:
            raise EnvFailed(f"--python-env: {where} names a path outside the job's folder")
        if not line.startswith("-"):
            continue
        option, _, value = line.replace("=", " ", 1).partition(" ")
        value = value.strip()
        if option in _URL_OPTIONS and value.startswith(("https://", "http://")):
            continue
        if option in _FILE_OPTIONS and value and _inside(folder, value):
            check_requirements(folder, value, depth + 1)
            continue
        if option in _FLAGS:
            continue
        allowed = "an index URL, a --find-links URL or a requirement file of the job's folder"
        raise EnvFailed(f"--python-env: {where}: {option} is not allowed ({allowed} is)")


def _inside(folder: Path, relative: str) -> bool:
    target = (folder / relative).resolve()
    return target.is_relative_to(folder.resolve()) and target.is_file()


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
    env = {**os.environ, "UV_PYTHON": python, "UV_NO_PROGRESS": "1"}
    if source == "uv.lock":
        # A copy of the project's two files: the job's code is neither read nor installed.
        with tempfile.TemporaryDirectory(prefix="chiffon-lock-") as project:
            for name in ("pyproject.toml", "uv.lock"):
                shutil.copyfile(folder / name, Path(project) / name)
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
