"""The agent's side of a job's files, on local files: the blob cache (checked on arrival,
bounded, least recently used out, never what is being staged), a snapshot laid out as
copies and nothing half-written on a refusal, `--out` patterns that never leave the job's
folder, and a tree sent back as a manifest (with a tiny in-memory channel: these are unit
tests; tests/test_stage_http.py runs the same against a real orchestrator)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from chiffon.agent.cache import BlobCache, BlobError
from chiffon.agent.stage import gather, lay_out, open_inside, out_matcher, save_tree
from chiffon.schemas.files import Entry, Link, Manifest, ManifestError
from chiffon.transport.base import TransportError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """A blob store as the orchestrator keeps one: refuses bytes that are not their hash."""

    def __init__(self, blobs: dict[str, bytes] | None = None) -> None:
        self.blobs = dict(blobs or {})
        self.recorded: list[tuple[str, str]] = []
        self.fetched: list[str] = []

    async def fetch_blob(self, job_id: uuid.UUID, attempt: int, sha256: str, into: Path, *,
                         max_bytes: int) -> None:  # fmt: skip
        self.fetched.append(sha256)
        if sha256 not in self.blobs:
            raise TransportError(f"HTTP 404: blob {sha256} is not one of the job's files")
        await asyncio.to_thread(into.write_bytes, self.blobs[sha256])

    async def missing_blobs(self, job_id: uuid.UUID, attempt: int,
                            sha256s: Sequence[str]) -> list[str]:  # fmt: skip
        return [s for s in sha256s if s not in self.blobs]

    async def put_blob(self, job_id: uuid.UUID, attempt: int, sha256: str,
                       source: BinaryIO | bytes) -> None:  # fmt: skip
        data = source if isinstance(source, bytes) else source.read()
        if sha(data) != sha256:
            raise TransportError("HTTP 400: the body's hash is not the one named")
        self.blobs[sha256] = data

    async def record_files(self, job_id: uuid.UUID, attempt: int, kind: str,
                           manifest: str) -> str:  # fmt: skip
        self.recorded.append((kind, manifest))
        return "applied"


KEY = (uuid.uuid4(), 1)


async def test_a_blob_is_kept_only_when_its_content_is_its_hash(tmp_path: Path) -> None:
    cache, good = BlobCache(tmp_path / "cache", max_bytes=1 << 20), b"print('hi')\n"
    store = Store({sha(good): good})

    async def fetch(s: str) -> Path:
        return await cache.get(s, lambda into: store.fetch_blob(*KEY, s, into, max_bytes=99))

    path = await fetch(sha(good))
    assert path.read_bytes() == good and path.stat().st_mode & 0o777 == 0o444
    await fetch(sha(good))  # a hit: not fetched again
    assert store.fetched == [sha(good)]
    forged = sha(b"what the manifest named")
    store.blobs[forged] = b"something else"
    with pytest.raises(BlobError, match=f"blob {forged} arrived with other content"):
        await fetch(forged)
    assert not cache.has(forged) and list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_the_cache_drops_the_least_recently_used_past_its_bound_never_a_pinned_one(
    tmp_path: Path,
) -> None:
    blobs = [bytes([i]) * 400 for i in range(4)]
    store = Store({sha(b): b for b in blobs})
    cache = BlobCache(tmp_path / "cache", max_bytes=1000)  # room for two

    async def get(b: bytes) -> None:
        s = sha(b)
        await cache.get(s, lambda into: store.fetch_blob(*KEY, s, into, max_bytes=1000))

    await get(blobs[0])
    await get(blobs[1])
    os.utime(cache.path(sha(blobs[0])), (1, 1))  # long unused, as a restart reads it
    cache._index = None
    assert cache.has(sha(blobs[1]))
    with cache.pinned([sha(blobs[0])]):  # an attempt being staged needs it
        await get(blobs[2])
        assert [cache.path(sha(b)).exists() for b in blobs] == [True, False, True, False]
    await get(blobs[3])
    assert [cache.path(sha(b)).exists() for b in blobs] == [False, False, True, True]
    assert cache.used_bytes <= 1000


def _laid(tmp_path: Path, manifest: Manifest, blobs: dict[str, bytes]) -> Path:
    store = tmp_path / "blobs"
    store.mkdir(exist_ok=True)
    for s, data in blobs.items():
        (store / s).write_bytes(data)
        (store / s).chmod(0o444)
    into = tmp_path / "work"
    lay_out(manifest, lambda s: store / s, into)
    return into


def test_a_snapshot_is_laid_out_as_copies_with_exec_bits_and_links(tmp_path: Path) -> None:
    code, run = b"print(1)\n", b"#!/bin/sh\necho go\n"
    manifest = Manifest.of(
        [Entry("src/a.py", sha(code), len(code)), Entry("run.sh", sha(run), len(run), True)],
        [Link("latest", "src/a.py")],
    )
    work = _laid(tmp_path, manifest, {sha(code): code, sha(run): run})
    assert (work / "src/a.py").read_bytes() == code
    assert os.access(work / "run.sh", os.X_OK) and not os.access(work / "src/a.py", os.X_OK)
    assert os.readlink(work / "latest") == "src/a.py"
    (work / "src/a.py").write_bytes(b"changed by the job")  # a copy: the cache is untouched
    assert (tmp_path / "blobs" / sha(code)).read_bytes() == code


def test_a_manifest_that_would_leave_the_folder_is_refused_naming_it() -> None:
    bad = b'{"files":[{"exec":false,"path":"../../.bashrc","sha256":"%s","size":1}],"v":1}'
    with pytest.raises(ManifestError, match=r"'\.\./\.\./\.bashrc'.*'\.\.'"):
        Manifest.parse(bad % sha(b"x").encode())
    link = b'{"files":[],"links":[{"path":"etc","target":"../../../etc"}],"v":1}'
    with pytest.raises(ManifestError, match="link 'etc' points outside"):
        Manifest.parse(link)


def test_a_link_escaping_is_refused_at_lay_out_too(tmp_path: Path) -> None:
    """Whatever checked the manifest, lay_out checks its links again."""
    evil = Manifest((), (Link("etc", "/etc"),))  # built without parse: never checked
    with pytest.raises(ManifestError, match="link 'etc' points outside"):
        _laid(tmp_path, evil, {})


def test_a_blob_of_another_size_than_named_is_refused(tmp_path: Path) -> None:
    data = b"12345"
    manifest = Manifest.of([Entry("a", sha(data), 99)])
    with pytest.raises(ManifestError, match="'a': its blob is 5 bytes"):
        _laid(tmp_path, manifest, {sha(data): data})


@pytest.mark.parametrize(
    ("patterns", "path", "named"),
    [
        (["model.pt"], "model.pt", True),
        (["model.pt"], "sub/model.pt", False),
        (["results/**"], "results/a/b.csv", True),
        (["results"], "results/a/b.csv", True),  # a folder names all under it
        (["**/*.pt"], "a/b/c.pt", True),
        (["**/*.pt"], "c.pt", True),
        (["*.pt"], "a/c.pt", False),
        (["log?.txt"], "log1.txt", True),
        (["[ab].txt"], "c.txt", False),
    ],
)
def test_out_patterns(patterns: list[str], path: str, named: bool) -> None:
    assert out_matcher(patterns)(path) is named


def test_outputs_never_leave_the_folder_through_a_link(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "results" / "ok.csv").write_text("1,2\n")
    (work / "results" / "passwd").symlink_to("/etc/passwd")
    (work / "results" / "inside").symlink_to("ok.csv")
    (work / "results" / "etc").symlink_to("/etc")
    os.mkfifo(work / "results" / "pipe")
    found = gather(work, out_matcher(["results/**", "results/etc/*"]))
    assert found.files == ["results/ok.csv"]
    assert found.links == [Link("results/inside", "ok.csv")]
    assert sorted(found.skipped) == ["results/etc (a link out of its folder)",
                                     "results/passwd (a link out of its folder)",
                                     "results/pipe (not a regular file)"]  # fmt: skip
    assert open_inside(work, "results/passwd") is None  # never opened through the link
    assert open_inside(work, "results/etc/passwd") is None


async def test_a_tree_goes_back_as_a_manifest_sending_only_what_is_missing(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "step").write_text("7")
    (folder / "weights").write_bytes(b"w" * 1000)
    (folder / ".chiffon-save").touch()  # the marker: never saved
    store = Store({sha(b"w" * 1000): b"w" * 1000})
    digest = await save_tree(store, KEY, folder, "checkpoint")
    assert digest is not None and store.recorded == [("checkpoint", digest)]
    saved = Manifest.parse(store.blobs[digest])
    assert [(e.path, e.size) for e in saved] == [("step", 1), ("weights", 1000)]
    assert await save_tree(store, KEY, folder, "checkpoint", unless=digest) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert await save_tree(store, KEY, empty, "checkpoint") is None  # nothing to save


async def test_a_file_that_changes_while_it_is_sent_is_refused_and_tried_later(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state").write_text("step 1")

    class Racing(Store):
        async def put_blob(self, job_id: uuid.UUID, attempt: int, sha256: str,
                           source: BinaryIO | bytes) -> None:  # fmt: skip
            if not isinstance(source, bytes):
                (folder / "state").write_text("step 2, written meanwhile")
                source = io.BytesIO(source.read()).read()
            await super().put_blob(job_id, attempt, sha256, source)

    store = Racing()
    with pytest.raises(TransportError, match="HTTP 400"):
        await save_tree(store, KEY, folder, "checkpoint")
    assert store.recorded == []
    again = Store()  # the next round sends what is there then
    digest = await save_tree(again, KEY, folder, "checkpoint")
    assert digest is not None and again.recorded == [("checkpoint", digest)]


async def test_an_attempt_with_files_on_a_channel_that_cannot_move_them_is_refused(
    tmp_path: Path,
) -> None:
    from tests.test_work_loop import Orchestrator, loop, order

    orch, job = Orchestrator(), uuid.uuid4()
    work = loop(tmp_path, orch)  # its channel reports, and moves no files
    await work.handle(*order(job, snapshot=sha(b"a manifest")))
    await orch.until(job, 1)
    assert orch.said(job) == ["refused"]
    assert "cannot fetch a job's files" in orch.reports[-1][2]["detail"]


async def test_the_checkpoint_is_saved_every_so_often_while_the_job_runs(
    tmp_path: Path,
) -> None:
    """What a job on a desktop that dies resumes from (the orchestrator's bound is 10 s
    at least; the agent takes what the order says)."""
    import sys

    from chiffon.agent.report import Snapshot
    from chiffon.agent.work import WorkLoop, WorkSettings
    from tests.test_work_loop import AGENT, SECRET, Orchestrator, machine, order

    orch, store, job = Orchestrator(), Store(), uuid.uuid4()
    settings = WorkSettings(accept_jobs="always", jobs_dir=tmp_path / "jobs", allow_root=True,
                            grace_seconds=0.5)  # fmt: skip

    async def fresh() -> Snapshot:
        return machine({})

    work = WorkLoop(settings, agent_id=AGENT, secret=SECRET, channel=orch, fresh=fresh,
                    files=store)  # fmt: skip
    script = ("import os, pathlib, time\n"
              "cp = pathlib.Path(os.environ['CHIFFON_CHECKPOINT_DIR'])\n"
              "for i in range(40):\n"
              "    (cp / 'step').write_text(str(i)); time.sleep(0.1)\n")  # fmt: skip
    await work.handle(*order(job, command=[sys.executable, "-c", script],
                             checkpoint_every_seconds=1.0))  # fmt: skip
    await orch.until(job, 2)
    steps = [Manifest.parse(store.blobs[m]).files[0].sha256 for _, m in store.recorded]
    assert len(store.recorded) >= 3  # two or more while it ran, and the last at its end
    assert store.blobs[steps[-1]] == b"39" and len(set(steps)) == len(steps)


def test_a_name_no_manifest_can_hold_is_left_out_alone(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("1")
    (tmp_path / "odd\\name").write_text("2")
    found = gather(tmp_path)
    assert found.files == ["ok.txt"] and "a name a manifest cannot hold" in found.skipped[0]


def test_a_chain_of_links_each_inside_on_its_own_is_refused_where_it_leads_out(
    tmp_path: Path,
) -> None:
    # `k -> t/../../..` looks inside, but `t` is itself a link: the system climbs from
    # where `t` leads. Refused in a manifest (the agent's lay-out, `chiffon get`) and never
    # gathered from what a job left.
    deep = "/".join(f"d{i}" for i in range(12))
    chain = [Link("t", "tdir"), Link(f"{deep}/k", "../" * 12 + "t"),
             Link("esc", f"{deep}/k/" + "../" * 13 + "etc/passwd")]  # fmt: skip
    with pytest.raises(ManifestError, match=f"goes through the link '{deep}/k'"):
        Manifest.of([Entry("tdir/x", "0" * 64, 0)], chain)
    assert Manifest.of([], [Link("libx.so", "libx.so.1"), Link("libx.so.1", "d/libx.so.1.2")])
    job = tmp_path / "work"
    (job / "d0").mkdir(parents=True)
    os.symlink("/etc", job / "d0" / "etc-link-outside")  # itself out: never recorded
    os.symlink("d0/etc-link-outside", job / "inside-by-its-text")
    found = gather(job, None)
    assert [k.path for k in found.links] == []


def test_a_pattern_built_to_backtrack_is_matched_at_once() -> None:
    # `*a*a...*b` against a long name of `a`s: exponential for a backtracking regex (the
    # agent's loop once stalled on it: the GIL is never let go while a regex runs).
    named = out_matcher(["*a" * 20 + "b", "x/**/" + "*a" * 20 + "b"])
    began = time.perf_counter()
    assert not named("a" * 60) and not named("x/y/" + "a" * 60)
    assert time.perf_counter() - began < 5.0  # the backtracking regex: minutes


def test_blobs_admitted_while_others_are_evicted_keep_the_index_whole(tmp_path: Path) -> None:
    # Downloads admit blobs from worker threads while another's eviction sorts the index:
    # unguarded, the sort met a blob being added ("dictionary changed size during
    # iteration") and the agent's order loop died with it.
    import threading

    cache = BlobCache(tmp_path / "cache", max_bytes=64 * 1024)
    blobs = [os.urandom(1024) + i.to_bytes(4, "big") for i in range(600)]
    errors: list[BaseException] = []

    def admit(part: list[bytes]) -> None:
        for data in part:
            tmp = tmp_path / "cache" / "tmp" / sha(data)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            try:
                cache._admit(tmp, sha(data))
                cache.evict()
            except BaseException as exc:  # what a thread raised is the finding
                errors.append(exc)

    # the index is read (and a previous run's half-fetched files cleared) at the first ask,
    # as `get` does before any fetch writes a temporary file
    assert not cache.has(sha(blobs[0]))
    threads = [threading.Thread(target=admit, args=(blobs[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    kept = {p.name for p in (tmp_path / "cache" / "blobs").glob("??/*")}
    assert cache.used_bytes == sum(len(b) for b in blobs if sha(b) in kept) <= 64 * 1024
