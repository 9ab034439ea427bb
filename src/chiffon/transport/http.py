"""The HTTP transport: POST each message to the orchestrator's ingest route.

HTTP/1.1 is spoken with h11 (the protocol state machine under httpx and uvicorn) over
asyncio streams rather than with httpx: this module runs in the agent on every desktop,
and httpx with httpcore, anyio and certifi is about 10 MB of the agent's memory for two
POST routes (docs/performance.md, "Agent footprint"). Connections are kept alive and shared
by concurrent publishes (the simulator's thousands of agents), at most `MAX_CONNECTIONS`
at once; a kept connection that the server closed meanwhile is retried once on a new one.
HTTPS uses the system's trust store (`ssl.create_default_context()`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import ssl
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import h11

from chiffon import __version__
from chiffon.backoff import Backoff
from chiffon.transport.auth import AgentCredential, Credentials, credential_for
from chiffon.transport.base import Message, TransportError

Write = Callable[[bytes], object]  # where a streamed answer's body goes
MAX_CONNECTIONS = 100
MAX_RESPONSE_BYTES = 64 * 1024  # our answers are a few hundred bytes
READ_CHUNK_BYTES = 16 * 1024
USER_AGENT = f"chiffon-agent/{__version__}"


class EnrollmentRefusedError(TransportError):
    """The orchestrator answered and said no (bad token, already enrolled): retrying is futile."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    def detail(self) -> str:
        """The API's JSON `detail`, else the reason phrase."""
        try:
            body = self.json()
        except ValueError:
            return self.reason
        detail = body.get("detail") if isinstance(body, dict) else None
        return str(detail) if detail else self.reason


def encode_request(
    conn: h11.Connection, method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    """The request's bytes as they go on the wire (bench/wire_size.py counts them)."""
    request = h11.Request(method=method, target=target, headers=headers)
    return b"".join(
        conn.send(part) or b"" for part in (request, h11.Data(data=body), h11.EndOfMessage())
    )


class _Connection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_bytes = max_bytes
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_BYTES)

    @property
    def reusable(self) -> bool:
        return (
            self._h11.our_state is h11.IDLE
            and not self._reader.at_eof()
            and not self._writer.is_closing()
        )

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        self._writer.write(encode_request(self._h11, method, target, headers, body))
        await self._writer.drain()
        resp = await self._read_response()
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        return resp

    async def _read_response(self) -> Response:
        conn = self._h11
        status, reason, chunks, size = 0, b"", [], 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._reader.read(READ_CHUNK_BYTES)
                if not data and not status:
                    raise ConnectionResetError("the server closed the connection unanswered")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status, reason = event.status_code, event.reason
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_bytes:
                    raise h11.RemoteProtocolError(f"answer larger than {self._max_bytes} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, reason.decode("latin-1"), b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the server closed the connection")

    def close(self) -> None:
        self._writer.close()


class HttpClient:
    """Requests to one orchestrator over kept-alive HTTP/1.1 connections."""

    def __init__(self, base_url: str, *, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._prefix = parts.path.rstrip("/")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._max_response_bytes = max_response_bytes
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """One POST; raises `OSError` or `h11.ProtocolError` when no answer came."""
        return await self.request("POST", path, body, headers)

    async def request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Response:
        """One request; raises `OSError` or `h11.ProtocolError` when no answer came."""
        fields = self.header_fields(body, headers)
        async with self._slots:
            fresh_only = False
            while True:
                conn, reused = (None, False) if fresh_only else self._kept()
                if conn is None:
                    reader, writer = await asyncio.open_connection(
                        self._host, self._port, ssl=self._tls
                    )
                    conn = _Connection(reader, writer, self._max_response_bytes)
                try:
                    resp = await conn.request(method, self._prefix + path, fields, body)
                except (OSError, h11.ProtocolError):
                    conn.close()
                    # The server dropped a kept connection as it was reused: once more on a
                    # new one (a repeated message is harmless: its seq makes it "stale").
                    if reused:
                        fresh_only = True
                        continue
                    raise
                except BaseException:  # cancelled (timeout) mid-request: unusable
                    conn.close()
                    raise
                if conn.reusable:
                    self._idle.append(conn)
                else:
                    conn.close()
                return resp

    def header_fields(self, body: bytes | int, headers: dict[str, str]) -> list[tuple[str, str]]:
        """`body`: the body, or its length (a body streamed)."""
        return [
            ("host", self._host_header),
            ("user-agent", USER_AGENT),
            ("content-length", str(body if isinstance(body, int) else len(body))),
            *headers.items(),
        ]

    async def exchange(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        idle_seconds: float,
        send: BinaryIO | None = None,
        sink: Callable[[h11.Response], Write | None] | None = None,
    ) -> Response:
        """One request on a connection of its own, for bodies of any size: the request's
        streamed from `send` (from its position to its end), the answer's streamed into
        what `sink(response)` gives (None: kept, bounded, for its detail). Each step may
        take `idle_seconds`; raises `OSError`, `h11.ProtocolError` or `TimeoutError`."""
        size = 0
        if send is not None:  # from its position to its end
            start = send.tell()
            size = send.seek(0, io.SEEK_END) - start
            send.seek(start)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port, ssl=self._tls), idle_seconds
        )
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_BYTES)
        try:
            fields = self.header_fields(size, headers)
            writer.write(conn.send(h11.Request(method=method, target=self._prefix + path,
                                               headers=fields)) or b"")  # fmt: skip
            while send is not None and (chunk := await asyncio.to_thread(send.read, BODY_CHUNK)):
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await asyncio.wait_for(writer.drain(), idle_seconds)
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await asyncio.wait_for(writer.drain(), idle_seconds)
            return await _streamed_answer(conn, reader, sink, idle_seconds)
        finally:
            writer.close()

    def _kept(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn, True
            conn.close()
        return None, False

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


async def _streamed_answer(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    sink: Callable[[h11.Response], Write | None] | None,
    idle_seconds: float,
) -> Response:
    status, reason, kept, out = 0, b"", bytearray(), None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(reader.read(BODY_CHUNK), idle_seconds)
            if not data and not status:
                raise ConnectionResetError("the server closed the connection unanswered")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status, reason = event.status_code, event.reason
            out = sink(event) if sink is not None else None
        elif isinstance(event, h11.Data):
            if out is not None:
                out(event.data)
            elif len(kept) < MAX_RESPONSE_BYTES:
                kept += event.data[: MAX_RESPONSE_BYTES - len(kept)]
        elif isinstance(event, h11.EndOfMessage):
            return Response(status, reason.decode("latin-1"), bytes(kept))
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("the server closed the connection mid-answer")


class HttpPublisher:
    """`POST {url}/api/v1/agents/{agent_id}/heartbeat` (or `/offline`) with the message JSON,
    and `Authorization: Bearer <agent secret>` when it has a credential."""

    def __init__(
        self,
        orchestrator_url: str,
        *,
        timeout_seconds: float = 5.0,
        credential: Credentials | None = None,
    ) -> None:
        self._client = HttpClient(orchestrator_url)  # ValueError: not an http(s) URL
        self.orchestrator_url = self._client.base_url
        self.timeout_seconds = timeout_seconds
        self._credential = credential
        self._open = False

    async def connect(self) -> None:
        self._open = True

    async def publish(self, message: Message) -> None:
        if not self._open:
            raise TransportError("HTTP transport is not connected")
        route = "heartbeat" if message.kind == "heartbeat" else "offline"
        headers = {"content-type": "application/json"}
        credential = credential_for(self._credential, message.agent_id)
        if credential is not None:
            headers["authorization"] = credential.bearer
        path = f"/api/v1/agents/{message.agent_id}/{route}"
        resp = await _post(self._client, path, message.encode(), headers, self.timeout_seconds)
        if not resp.ok:
            raise TransportError(f"orchestrator refused it: HTTP {resp.status}: {resp.detail()}")

    async def close(self) -> None:
        self._open = False
        await self._client.aclose()


async def _post(
    client: HttpClient,
    path: str,
    body: bytes,
    headers: dict[str, str],
    timeout_seconds: float,
    *,
    method: str = "POST",
) -> Response:
    """The answer, or `TransportError` when none came within `timeout_seconds`."""
    try:
        async with asyncio.timeout(timeout_seconds):
            return await client.request(method, path, body, headers)
    except TimeoutError:
        raise TransportError(
            f"{client.base_url} did not answer within {timeout_seconds:g} s"
        ) from None
    except OSError as exc:
        raise TransportError(
            f"cannot reach {client.base_url}: {type(exc).__name__}: {exc}"
        ) from None
    except h11.ProtocolError as exc:
        raise TransportError(f"bad answer from {client.base_url}: {exc}") from None


async def enroll(
    orchestrator_url: str, *, token: str, agent_id: uuid.UUID, timeout_seconds: float = 5.0
) -> AgentCredential:
    """Trade the enrollment token for this agent's own secret (`POST /api/v1/enroll`).

    `EnrollmentRefusedError` when the orchestrator says no; `TransportError` when it cannot
    be reached (worth a retry). `ValueError` when the URL is not http(s).
    """
    client = HttpClient(orchestrator_url)
    body = json.dumps({"agent_id": str(agent_id)}).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    try:
        resp = await _post(client, "/api/v1/enroll", body, headers, timeout_seconds)
    finally:
        await client.aclose()
    if resp.status >= 500:
        raise TransportError(f"orchestrator could not enroll us: HTTP {resp.status}")
    if not resp.ok:
        raise EnrollmentRefusedError(f"enrollment refused: HTTP {resp.status}: {resp.detail()}")
    try:
        answer = resp.json()
        approved = answer.get("approved", True) is not False
        return AgentCredential(uuid.UUID(answer["agent_id"]), str(answer["secret"]), approved)
    except (ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"enrollment answer is not understood: {exc}") from None


ORDERS_RESPONSE_BYTES = 8 * 1024 * 1024  # a few orders of at most 256 KiB each
BODY_CHUNK = 256 * 1024
# A blob's transfer: each step (connect, a chunk read or written) may take this long; a
# dropped or stalled one is tried again this many times, a download resumed where it was.
BLOB_IDLE_SECONDS = 60.0
BLOB_TRIES = 5
MISSING_BATCH = 900  # hashes per "which are missing" ask: its JSON within the 64 KiB body limit


class HttpWork:
    """The agent's side of jobs over HTTP, with its own secret as the bearer credential:
    its orders (a long-poll), its reports of attempts, and their output."""

    def __init__(
        self,
        orchestrator_url: str,
        credential: AgentCredential,
        *,
        timeout_seconds: float = 5.0,
        client: HttpClient | None = None,
    ) -> None:
        """`client`: one shared by several agents' `HttpWork` (`chiffon simulate`)."""
        self._client = client or HttpClient(
            orchestrator_url, max_response_bytes=ORDERS_RESPONSE_BYTES
        )
        self._credential = credential
        self._prefix = f"/api/v1/agents/{credential.agent_id}"
        self.timeout_seconds = timeout_seconds

    async def orders(self, *, wait_seconds: float) -> list[tuple[bytes, str]]:
        """Each order due now (body, signature), waiting up to `wait_seconds` for one."""
        resp = await self._send("GET", f"/orders?wait={wait_seconds:g}", b"", waits=wait_seconds)
        try:
            return [(str(o["body"]).encode(), str(o["signature"])) for o in resp.json()["orders"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"orders answer is not understood: {exc}") from None

    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str:
        """Say how an attempt stands; the orchestrator's verdict ("applied", "stale"...)."""
        body = json.dumps(said).encode()
        resp = await self._send("POST", f"/attempts/{job_id}/{attempt}", body, json_body=True)
        return _verdict(resp)

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str:
        """A chunk of an attempt's output at its byte offset; the verdict."""
        path = f"/attempts/{job_id}/{attempt}/log?offset={offset}"
        return _verdict(await self._send("POST", path, data))

    # An attempt's files (`agent.stage.FileChannel`): blobs moved over connections of their
    # own, streamed, never through the bounded answers above.

    async def fetch_blob(
        self, job_id: uuid.UUID, attempt: int, sha256: str, into: Path, *, max_bytes: int
    ) -> None:
        """The blob's bytes into `into`, resumed (`Range: bytes=N-`) after a dropped
        connection, a few tries with backoff; `TransportError` when it could not be had
        (the orchestrator refused, or it is larger than `max_bytes`)."""
        path = f"{self._prefix}/attempts/{job_id}/{attempt}/blobs/{sha256}"
        with os.fdopen(os.open(into, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as out:
            await _retried(f"blob {sha256[:12]}",
                           lambda: self._fetch_once(path, out, max_bytes))  # fmt: skip

    async def _fetch_once(self, path: str, out: BinaryIO, max_bytes: int) -> bool:
        """One try; whether the blob is whole."""
        have = out.seek(0, io.SEEK_END)
        headers = {"authorization": self._credential.bearer}
        if have:
            headers["range"] = f"bytes={have}-"

        misplaced = False

        def sink(resp: h11.Response) -> Write | None:
            nonlocal misplaced
            if resp.status_code == 200:  # the whole blob (a Range not honoured): again
                out.seek(0)
                out.truncate()
            elif resp.status_code == 206 and _range_start(resp) != have:
                misplaced = True
                return None
            elif resp.status_code != 206:
                return None
            return _Bounded(out, max_bytes).write

        resp = await self._client.exchange("GET", path, headers, sink=sink,
                                           idle_seconds=BLOB_IDLE_SECONDS)  # fmt: skip
        if resp.status == 416 and have:  # all of it was here already
            return True
        if misplaced:  # a part that does not follow what is here: all of it, again
            out.seek(0)
            out.truncate()
            raise TransportError("the orchestrator answered another range than asked")
        _check_blob_answer(resp)
        return True

    async def missing_blobs(
        self, job_id: uuid.UUID, attempt: int, sha256s: Sequence[str]
    ) -> list[str]:
        """Those of `sha256s` the orchestrator's store lacks."""
        missing: list[str] = []
        for start in range(0, len(sha256s), MISSING_BATCH):
            body = json.dumps({"sha256": list(sha256s[start : start + MISSING_BATCH])}).encode()
            resp = await self._send("POST", f"/attempts/{job_id}/{attempt}/missing", body,
                                    json_body=True)  # fmt: skip
            try:
                missing += [str(h) for h in resp.json()["missing"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise TransportError(f"answer is not understood: {exc}") from None
        return missing

    async def put_blob(
        self, job_id: uuid.UUID, attempt: int, sha256: str, source: BinaryIO | bytes
    ) -> None:
        """One blob, streamed from `source`; tried again (from the same start) when the
        connection dropped; `TransportError` when refused (its content is not its hash,
        the store is full, the attempt is not current)."""
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        start = stream.tell()
        path = f"{self._prefix}/attempts/{job_id}/{attempt}/blobs/{sha256}"
        headers = {"authorization": self._credential.bearer,
                   "content-type": "application/octet-stream"}  # fmt: skip

        async def once() -> bool:
            stream.seek(start)
            resp = await self._client.exchange("PUT", path, headers, send=stream,
                                               idle_seconds=BLOB_IDLE_SECONDS)  # fmt: skip
            _check_blob_answer(resp)
            return True

        await _retried(f"blob {sha256[:12]}", once)

    async def record_files(self, job_id: uuid.UUID, attempt: int, kind: str, manifest: str) -> str:
        """The attempt's outputs or checkpoint are the stored manifest `manifest`."""
        body = json.dumps({"kind": kind, "manifest": manifest}).encode()
        resp = await self._send("POST", f"/attempts/{job_id}/{attempt}/files", body,
                                json_body=True)  # fmt: skip
        return _verdict(resp)

    async def _send(
        self, method: str, path: str, body: bytes, *, waits: float = 0, json_body: bool = False
    ) -> Response:
        headers = {"authorization": self._credential.bearer}
        headers["content-type"] = "application/json" if json_body else "application/octet-stream"
        resp = await _post(self._client, self._prefix + path, body, headers,
                           waits + self.timeout_seconds, method=method)  # fmt: skip
        if not resp.ok:
            raise TransportError(f"orchestrator refused it: HTTP {resp.status}: {resp.detail()}")
        return resp

    async def aclose(self) -> None:
        await self._client.aclose()


class _Refused(TransportError):
    """The orchestrator answered no: trying again is futile."""


class _Bounded:
    """A file written to, refusing more than `most` bytes in all."""

    def __init__(self, out: BinaryIO, most: int) -> None:
        self._out, self._left = out, most - out.tell()

    def write(self, data: bytes) -> int:
        self._left -= len(data)
        if self._left < 0:
            raise _Refused("the blob is larger than it may be")
        return self._out.write(data)


def _range_start(resp: h11.Response) -> int | None:
    for name, value in resp.headers:
        if name == b"content-range":
            unit, _, rest = value.decode("latin-1").partition(" ")
            first = rest.partition("-")[0]
            return int(first) if unit == "bytes" and first.isdigit() else None
    return None


def _check_blob_answer(resp: Response) -> None:
    if resp.ok:
        return
    why = f"orchestrator refused it: HTTP {resp.status}: {resp.detail()}"
    if (resp.status >= 500 and resp.status != 507) or resp.status == 429:
        raise TransportError(why)  # worth another try
    raise _Refused(why)


async def _retried(what: str, once: Callable[[], Any]) -> None:
    """`once()` tried `BLOB_TRIES` times with backoff while the connection fails or the
    orchestrator is busy; a refusal at once."""
    backoff = Backoff(0.5, max_seconds=8.0)
    for tries in range(1, BLOB_TRIES + 1):
        try:
            await once()
            return
        except _Refused:
            raise
        except (OSError, h11.ProtocolError, TimeoutError, TransportError) as exc:
            if tries == BLOB_TRIES:
                raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from None
            await asyncio.sleep(backoff.delay(tries))


def _verdict(resp: Response) -> str:
    try:
        return str(resp.json()["verdict"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"answer is not understood: {exc}") from None
