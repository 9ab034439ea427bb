"""Real `chiffon` processes for end-to-end tests, always ended by their own pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from tests.auth import TOKENS_ENV

CHIFFON = [sys.executable, "-m", "chiffon.cli"]


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`chiffon ...` as a user runs it, in `cwd` (default: an empty folder of its own, so
    `chiffon run` sends nothing: in the repository it would send the repository)."""
    with tempfile.TemporaryDirectory(prefix="chiffon-cwd-") as empty:
        return subprocess.run(
            [*CHIFFON, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                **os.environ,
                "CHIFFON_API_TOKEN": TOKENS_ENV["CHIFFON_API_TOKEN"],
                **(env or {}),
            },
            check=False,
            cwd=cwd or empty,
        )


def wait_http(
    url: str, proc: subprocess.Popen[str], *, log: Path | None = None, timeout: float = 30
) -> None:
    """Wait until `url` answers 200, failing early (with the log) if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text() if log else ""
            raise RuntimeError(f"process exited {proc.returncode}: {output}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextmanager
def orchestrator_process(
    data_dir: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """`chiffon orchestrator` on a free port with a migrated registry; yields its URL."""
    port = free_port()
    full_env = {**os.environ, "CHIFFON_DATA_DIR": str(data_dir), **TOKENS_ENV, **(env or {})}
    upgraded = run_cli("db", "upgrade", env=full_env)
    assert upgraded.returncode == 0, upgraded.stderr
    log = (data_dir / "orchestrator.log").open("w")
    proc = subprocess.Popen(
        [*CHIFFON, "orchestrator", "--port", str(port), *args],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, log=data_dir / "orchestrator.log")
        yield url
    finally:
        stop(proc)
        log.close()
