"""The agent's HTTP client against servers that misbehave on purpose.

The happy path runs against the real orchestrator in test_cli_agent.py and test_e2e_fleet.py;
here a small HTTP/1.1 server (h11 on asyncio, the same state machine uvicorn uses) does what
real servers do at the worst moment: close a kept-alive connection just as it is reused,
never answer, answer too much.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from chiffon.transport.base import TransportError
from chiffon.transport.http import MAX_RESPONSE_BYTES, HttpPublisher, enroll


@dataclass
class Server:
    """`behave(n)` for the n-th request overall: "answer", "close", "hang" or "huge"."""

    behave: Callable[[int], str] = lambda n: "answer"
    connections: int = 0
    requests: list[tuple[str, bytes]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(event, h11.Request):
                    target, body = event.target, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.requests.append((target.decode(), body))
                    if not await self._respond(conn, writer, len(self.requests)):
                        return
                    conn.start_next_cycle()
                else:
                    return
        finally:
            writer.close()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, n: int) -> bool:
        what = self.behave(n)
        if what == "close":
            return False
        if what == "hang":
            await asyncio.sleep(60)
        body = b'{"ok":true}' if what != "huge" else b"x" * (MAX_RESPONSE_BYTES + 1)
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        writer.write(conn.send(h11.Response(status_code=202, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        return True


@asynccontextmanager
async def serving(server: Server, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://localhost:{port}/prefix"
    finally:
        listener.close()


class Beat:
    kind = "heartbeat"

    def __init__(self) -> None:
        self.agent_id = uuid.uuid4()

    def encode(self) -> bytes:
        return b'{"beat":1}'


async def test_publishes_share_one_kept_alive_connection() -> None:
    server = Server()
    async with serving(server) as url:
        publisher = HttpPublisher(url, timeout_seconds=2)
        await publisher.connect()
        beat = Beat()
        for _ in range(5):
            await publisher.publish(beat)
        await publisher.close()
    assert server.connections == 1
    assert (
        server.requests == [(f"/prefix/api/v1/agents/{beat.agent_id}/heartbeat", b'{"beat":1}')] * 5
    )


async def test_a_kept_connection_closed_by_the_server_is_retried_once_on_a_new_one() -> None:
    server = Server(behave=lambda n: "close" if n == 2 else "answer")
    async with serving(server) as url:
        publisher = HttpPublisher(url, timeout_seconds=2)
        await publisher.connect()
        await publisher.publish(Beat())
        await publisher.publish(Beat())  # request 2 is dropped unanswered, request 3 answers
        await publisher.close()
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_a_fresh_connection_closed_unanswered_is_a_transport_error() -> None:
    server = Server(behave=lambda n: "close")
    async with serving(server) as url:
        publisher = HttpPublisher(url, timeout_seconds=2)
        await publisher.connect()
        with pytest.raises(TransportError, match=r"cannot reach .*/prefix"):
            await publisher.publish(Beat())
        await publisher.close()
    assert len(server.requests) == 1  # not retried: it was not a kept connection


async def test_no_answer_is_a_timeout_and_the_connection_is_not_reused() -> None:
    server = Server(behave=lambda n: "hang" if n == 1 else "answer")
    async with serving(server) as url:
        publisher = HttpPublisher(url, timeout_seconds=0.3)
        await publisher.connect()
        with pytest.raises(TransportError, match=r"did not answer within 0\.3 s"):
            await publisher.publish(Beat())
        await publisher.publish(Beat())
        await publisher.close()
    assert server.connections == 2


async def test_an_oversized_answer_is_refused() -> None:
    async with serving(Server(behave=lambda n: "huge")) as url:
        publisher = HttpPublisher(url, timeout_seconds=2)
        await publisher.connect()
        with pytest.raises(TransportError, match=r"bad answer .*larger than"):
            await publisher.publish(Beat())
        await publisher.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8700", "127.0.0.1:8700", "http://"])
async def test_a_url_that_is_not_http_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        HttpPublisher(url)
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        await enroll(url, token="t", agent_id=uuid.uuid4())


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_checks_the_certificate_against_the_trust_store(
    self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = Server()
    async with serving(server, tls) as url:
        untrusting = HttpPublisher(url, timeout_seconds=2)  # the system store lacks our CA
        await untrusting.connect()
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.publish(Beat())
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when a client is made
        trusting = HttpPublisher(url, timeout_seconds=2)
        await trusting.connect()
        await trusting.publish(Beat())
        await trusting.close()
    assert len(server.requests) == 1
