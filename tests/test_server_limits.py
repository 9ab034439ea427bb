"""What a stranger on the LAN can make a running orchestrator hold: big bodies, idle
sockets, and the files it keeps. Against a real `chiffon orchestrator` process."""

from __future__ import annotations

import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.procs import orchestrator_process, run_cli


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    data = tmp_path_factory.mktemp("orch")
    with orchestrator_process(data) as url:
        port = int(url.rsplit(":", 1)[1])
        (pid,) = [
            c.pid
            for c in psutil.Process().children(recursive=True)
            if any(conn.laddr.port == port for conn in c.net_connections("tcp"))
        ]
        yield url, pid


def _send_chunked(port: int, path: str, chunks: int) -> bytes:
    """POST `chunks` 1 MiB chunks without a token; what the server answered (or b"")."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\n\r\n".encode()
        )
        chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
        try:
            for _ in range(chunks):
                sock.sendall(chunk)
        except OSError:  # the server answered and closed: it will not read the rest
            pass
        try:
            return sock.recv(4096)
        except OSError:
            return b""


def test_big_unauthenticated_bodies_never_grow_the_orchestrator(served: tuple[str, int]) -> None:
    """Four 256 MB POSTs to /enroll without a token took the RSS to about 2 GB."""
    url, pid = served
    port = int(url.rsplit(":", 1)[1])
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the peak while the bodies arrive, not what is left after
        while not done.wait(0.01):
            peak.append(proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answers = [_send_chunked(port, "/api/v1/enroll", 64) for _ in range(4)]
        heartbeat = "/api/v1/agents/00000000-0000-0000-0000-000000000001/heartbeat"
        answers.append(_send_chunked(port, heartbeat, 64))
    finally:
        done.set()
        sampler.join()
    grown = max(peak) - before
    assert [a[:12] for a in answers] == [b"HTTP/1.1 401"] * 5  # refused before the body
    assert grown < 20 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB"


def test_sockets_that_never_send_a_whole_request_are_closed(served: tuple[str, int]) -> None:
    url, _pid = served
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        started = time.monotonic()
        for byte in b"GET /healthz HTTP/1.1\r\n":  # one byte a second: never a whole head
            try:
                trickle.sendall(bytes([byte]))
            except OSError:  # closed by the server: what this test waits for
                break
            assert time.monotonic() - started < 10, "a trickling client was held"
            time.sleep(1)
        assert all(s.recv(1) == b"" for s in [*idle, trickle])  # closed by the server
        assert time.monotonic() - started < 12
    finally:
        for s in [*idle, trickle]:
            s.close()


def test_the_data_directory_and_registry_are_private(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    out = run_cli("db", "upgrade", env={"CHIFFON_DATA_DIR": str(data), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "chiffon.db").stat().st_mode) == 0o600
    (data / "chiffon.db").chmod(0o644)  # as an earlier version left it
    again = run_cli("db", "upgrade", env={"CHIFFON_DATA_DIR": str(data), "HOME": str(tmp_path)})
    assert again.returncode == 0, again.stderr
    assert stat.S_IMODE((data / "chiffon.db").stat().st_mode) == 0o600
