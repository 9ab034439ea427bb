"""The agent's blob cache: each file a job's snapshot or checkpoint names, kept under its
SHA-256 (`<cache_dir>/blobs/ab/abcd...`), so that a second attempt of the same code on
this desktop fetches nothing (Ray's per-node `working_dir` cache, git's objects).

- A blob arrives in a temporary file (`<cache_dir>/tmp`), its hash is checked, and only
  then is it renamed in, read-only: a blob whose content does not match its name is
  deleted and refused (`BlobError`, one line naming it), never kept.
- The cache is bounded (`cache_max_gb`): past it, the least recently used blobs go first,
  never one an attempt being staged holds (`pinned`).
- Jobs never see it: the sandbox hides it, and an attempt gets copies of its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

GB = 1024**3
HASH_CHUNK = 1024 * 1024

Fetch = Callable[[Path], Awaitable[None]]


class BlobError(Exception):
    """A blob that arrived with content of another hash: one line naming it."""


class BlobCache:
    """`get(sha, fetch)` a blob's path (fetched, checked and kept once), `pinned(shas)`
    while an attempt is staged from them; the least recently used go past `max_bytes`."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._index: dict[str, tuple[float, int]] | None = None  # sha -> (last used, size)
        self._total = 0  # bytes the index holds
        # The index is read and changed from worker threads (a blob admitted while another
        # download evicts): one at a time. Unguarded, an eviction's sort met a blob being
        # admitted ("dictionary changed size during iteration") and ended the agent's
        # order loop.
        self._mutex = threading.Lock()
        self._pins: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    @property
    def used_bytes(self) -> int:
        with self._mutex:
            self._blobs()
            return self._total

    def has(self, sha256: str) -> bool:
        """Whether it is here; if so it counts as used now."""
        with self._mutex:
            return self._has(sha256)

    def _has(self, sha256: str) -> bool:
        blobs = self._blobs()
        if sha256 not in blobs:
            return False
        if not self.path(sha256).is_file():  # removed behind our back
            self._total -= blobs.pop(sha256)[1]
            return False
        now = time.time()
        blobs[sha256] = (now, blobs[sha256][1])
        with contextlib.suppress(OSError):  # kept as the file's mtime across restarts
            os.utime(self.path(sha256), (now, now))
        return True

    @contextlib.contextmanager
    def pinned(self, shas: Iterable[str]) -> Iterator[None]:
        """While in it, none of `shas` is evicted."""
        held = list(set(shas))
        with self._mutex:
            for sha in held:
                self._pins[sha] = self._pins.get(sha, 0) + 1
        try:
            yield
        finally:
            with self._mutex:
                for sha in held:
                    self._pins[sha] -= 1
                    if not self._pins[sha]:
                        del self._pins[sha]

    async def get(self, sha256: str, fetch: Fetch) -> Path:
        """The blob's path here: fetched with `fetch(into)` when missing, its hash checked
        (`BlobError` when it does not match: nothing is kept), then kept read-only."""
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            if self.has(sha256):
                return self.path(sha256)
            tmp = self.root / "tmp" / f"{sha256}.{uuid.uuid4().hex[:8]}"
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.parent.mkdir(exist_ok=True, mode=0o700)
            try:
                await fetch(tmp)
                await asyncio.to_thread(self._admit, tmp, sha256)
            finally:
                tmp.unlink(missing_ok=True)
        self._locks.pop(sha256, None)
        await asyncio.to_thread(self.evict)
        return self.path(sha256)

    def _admit(self, tmp: Path, sha256: str) -> None:
        digest, size = hashlib.sha256(), 0
        with tmp.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        if digest.hexdigest() != sha256:
            raise BlobError(f"blob {sha256} arrived with other content (its hash is "
                            f"{digest.hexdigest()}): refused")  # fmt: skip
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.chmod(0o444)
        os.replace(tmp, final)
        with self._mutex:
            blobs = self._blobs()
            self._total += size - (blobs[sha256][1] if sha256 in blobs else 0)
            blobs[sha256] = (time.time(), size)

    def evict(self) -> int:
        """Least recently used first, until under the bound (pinned blobs stay); how many
        went."""
        with self._mutex:
            blobs = self._blobs()
            if self._total <= self.max_bytes:  # the usual case: no sort at all
                return 0
            gone = 0
            for sha, (_, size) in sorted(blobs.items(), key=lambda kv: kv[1][0]):
                if self._total <= self.max_bytes:
                    break
                if sha in self._pins:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self.path(sha).unlink()
                del blobs[sha]
                self._total -= size
                gone += 1
            total = self._total
        if gone:
            log.info("blob cache: %d least recently used blob(s) removed, %.3g GB kept",
                     gone, total / GB)  # fmt: skip
        return gone

    def _blobs(self) -> dict[str, tuple[float, int]]:
        """What is here, read from the disk once (a previous run's blobs stay); what a
        previous run left half-fetched goes. Under `_mutex`."""
        if self._index is None:
            self._index = {}
            shutil.rmtree(self.root / "tmp", ignore_errors=True)
            for path in (self.root / "blobs").glob("??/*"):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    self._index[path.name] = (st.st_mtime, st.st_size)
            self._total = sum(size for _, size in self._index.values())
        return self._index


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return 0


def same_disk(a: Path, b: Path) -> bool:
    def device(path: Path) -> int | None:
        for folder in (path, *path.parents):
            with contextlib.suppress(OSError):
                return folder.stat().st_dev
        return None

    return device(a) == device(b)
