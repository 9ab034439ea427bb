"""`chiffon.client`'s blob transfers over real HTTP, against a small server that can drop
a connection halfway, ignore a Range or serve tampered bytes (what the orchestrator never
does on purpose, and a network does): a download resumes where it stopped, is verified,
and leaves nothing behind when it is refused; an upload streams its file."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chiffon.cli.common import CliError
from chiffon.cli.sync import fetch
from chiffon.client import ChiffonError, Client

PREFIX = "/api/v1/blobs/"


@dataclass
class Store:
    blobs: dict[str, bytes] = field(default_factory=dict)
    ranges: list[str | None] = field(default_factory=list)
    drop_after: int | None = None  # the next GET sends this many bytes, then hangs up
    honour_range: bool = True
    tamper: bool = False
    put_headers: list[dict[str, str]] = field(default_factory=list)


def handler_for(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def reply(self, status: int, doc: object) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            asked = json.loads(self.rfile.read(int(self.headers["content-length"])))["sha256"]
            self.reply(200, {"missing": [h for h in asked if h not in store.blobs]})

        def do_PUT(self) -> None:
            sha = self.path.removeprefix(PREFIX)
            store.put_headers.append({k.lower(): v for k, v in self.headers.items()})
            body = self.rfile.read(int(self.headers["content-length"]))
            if hashlib.sha256(body).hexdigest() != sha:
                self.reply(400, {"detail": f"the body's SHA-256 is not {sha}"})
                return
            store.blobs[sha] = body
            self.reply(201, {"sha256": sha, "size": len(body)})

        def do_GET(self) -> None:
            sha = self.path.removeprefix(PREFIX)
            if sha not in store.blobs:
                self.reply(404, {"detail": "no such blob"})
                return
            data = store.blobs[sha]
            data = data[:-1] + b"?" if store.tamper else data
            asked = self.headers.get("range")
            store.ranges.append(asked)
            start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
            start = start if store.honour_range else 0
            self.send_response(206 if start else 200)
            self.send_header("content-length", str(len(data) - start))
            self.end_headers()
            if store.drop_after is not None:
                cut, store.drop_after = store.drop_after, None
                self.wfile.write(data[start : start + cut])
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


@pytest.fixture
def served() -> Iterator[tuple[Store, Client]]:
    store = Store()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(store))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with Client(f"http://127.0.0.1:{server.server_port}", token="t") as c:
            yield store, c
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def blob(size: int) -> tuple[str, bytes]:
    data = bytes(i % 251 for i in range(size))
    return hashlib.sha256(data).hexdigest(), data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_an_upload_streams_the_file_with_its_length_and_counts_progress(
    served: tuple[Store, Client], tmp_path: Path
) -> None:
    store, c = served
    sha, data = blob(3 * 1024 * 1024 + 5)
    (tmp_path / "w.bin").write_bytes(data)
    assert c.missing_blobs([sha, sha]) == {sha}
    seen: list[int] = []
    assert c.put_blob(sha, tmp_path / "w.bin", seen.append) == len(data)
    assert store.blobs[sha] == data and sum(seen) == len(data) and len(seen) == 4
    assert store.put_headers[0]["content-length"] == str(len(data))
    assert "transfer-encoding" not in store.put_headers[0]
    assert c.missing_blobs([sha]) == set()


def test_an_upload_whose_content_is_not_its_hash_is_refused(
    served: tuple[Store, Client], tmp_path: Path
) -> None:
    store, c = served
    sha, _ = blob(10)
    with pytest.raises(ChiffonError) as caught:
        c.put_blob(sha, b"something else")
    assert caught.value.status == 400 and store.blobs == {}


def test_a_download_cut_halfway_resumes_from_where_it_stopped(
    served: tuple[Store, Client], tmp_path: Path
) -> None:
    store, c = served
    sha, data = blob(2 * 1024 * 1024)
    store.blobs[sha] = data
    store.drop_after = 700_000
    seen: list[int] = []
    assert c.get_blob(sha, tmp_path / "out.bin", seen.append, size=len(data)) == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert store.ranges == [None, "bytes=700000-"]
    assert sum(seen) == len(data) and leftovers(tmp_path) == []


def test_a_server_that_ignores_the_range_gets_the_download_started_again(
    served: tuple[Store, Client], tmp_path: Path
) -> None:
    store, c = served
    sha, data = blob(100_000)
    store.blobs[sha], store.drop_after, store.honour_range = data, 40_000, False
    seen: list[int] = []
    c.get_blob(sha, tmp_path / "out.bin", seen.append)
    assert (tmp_path / "out.bin").read_bytes() == data and sum(seen) == len(data)


def test_a_tampered_blob_is_refused_and_nothing_is_written(
    served: tuple[Store, Client], tmp_path: Path
) -> None:
    store, c = served
    sha, data = blob(1000)
    store.blobs[sha], store.tamper = data, True
    (tmp_path / "out.bin").write_bytes(b"what was there stays")
    with pytest.raises(ChiffonError, match=f"blob {sha[:12]} arrived with the hash"):
        c.get_blob(sha, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == b"what was there stays"
    assert leftovers(tmp_path) == []
    with pytest.raises(ChiffonError, match="arrived with another hash"):
        c.read_blob(sha, 10_000)


def test_an_unknown_blob_and_a_bad_hash_are_one_clear_error(
    served: tuple[Store, Client], tmp_path: Path
) -> None:
    _, c = served
    sha, _ = blob(5)
    with pytest.raises(ChiffonError) as caught:
        c.get_blob(sha, tmp_path / "x")
    assert caught.value.status == 404 and leftovers(tmp_path) == []
    with pytest.raises(ChiffonError, match="is not a SHA-256"):
        c.get_blob("../../etc/passwd", tmp_path / "x")


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/cron.d/job", "a/../../b"])
def test_an_output_manifest_naming_a_path_outside_is_refused_and_nothing_written(
    served: tuple[Store, Client], tmp_path: Path, path: str
) -> None:
    store, c = served
    content_sha, content = blob(10)
    doc = {"v": 1, "links": [], "files": [{"path": path, "sha256": content_sha, "size": 10}]}
    raw = json.dumps(doc).encode()
    store.blobs[content_sha], store.blobs[hashlib.sha256(raw).hexdigest()] = content, raw
    to = tmp_path / "out" / "job"
    with pytest.raises(CliError, match="the job's outputs are refused: path"):
        fetch(c, hashlib.sha256(raw).hexdigest(), to)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
