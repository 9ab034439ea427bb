"""A job's files on the agent's side (docs/jobs.md, "Your code and data"): the snapshot
and checkpoint laid into an attempt's folders, its outputs and checkpoint gathered and
sent back as manifests (`schemas.files`), every blob named by its SHA-256.

The attempt's directory (`<jobs_dir>/<job id>-<attempt>/`), as the sandbox sees it:

- `work/`: the job's folder (its cwd, `CHIFFON_JOB_DIR`), the snapshot laid in as copies;
  bound into the job's view, writable; `--out` patterns are matched here;
- `checkpoint/`: `CHIFFON_CHECKPOINT_DIR`, the latest checkpoint restored into it; in a
  sandbox with namespaces bound writable at `/tmp/chiffon-checkpoint` (its own /tmp, so
  always there), else used where it is; saved whole. The save marker
  (`CHIFFON_CHECKPOINT_SAVE`, `.chiffon-save` in it) is never saved;
- `tmp/`: its private /tmp; `output.log`, `state.json` and the markers: the agent's.

Files move over a `FileChannel` (`transport.http.HttpWork`), never in an order or a
heartbeat. What a job leaves is input: a link is recorded only when it stays inside its
folder, never followed; only regular files are read, each opened without following a link
and checked to be inside the folder it was found in.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import stat
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, runtime_checkable

from chiffon.agent.runner import CHECKPOINT_SAVE_MARKER
from chiffon.schemas.files import (
    MAX_FILES,
    Entry,
    Link,
    Manifest,
    ManifestError,
    check_path,
    link_inside,
)

log = logging.getLogger(__name__)

WORK = "work"
CHECKPOINT = "checkpoint"
SAVE_MARKER = CHECKPOINT_SAVE_MARKER  # in checkpoint/: the job asks for a save now
HASH_CHUNK = 1024 * 1024
PARALLEL = 4  # blobs moved at once
FileKind = Literal["output", "checkpoint"]


@runtime_checkable
class FileChannel(Protocol):
    """How the agent moves an attempt's blobs (the orchestrator's agent-side routes). Each
    raises `TransportError` when it could not be done (after its own retries)."""

    async def fetch_blob(
        self, job_id: uuid.UUID, attempt: int, sha256: str, into: Path, *, max_bytes: int
    ) -> None:
        """The blob's bytes written to `into` (streamed; resumed after a dropped
        connection). Its hash is the caller's to check."""
        ...

    async def missing_blobs(
        self, job_id: uuid.UUID, attempt: int, sha256s: Sequence[str]
    ) -> list[str]:
        """Those of `sha256s` the orchestrator's store does not hold."""
        ...

    async def put_blob(
        self, job_id: uuid.UUID, attempt: int, sha256: str, source: BinaryIO | bytes
    ) -> None:
        """One blob, streamed from `source` (read from its position to its end)."""
        ...

    async def record_files(
        self, job_id: uuid.UUID, attempt: int, kind: FileKind, manifest: str
    ) -> str:
        """The attempt's outputs or checkpoint are the manifest stored under `manifest`;
        the verdict ("applied", "stale")."""
        ...


# Laying a manifest out.


def lay_out(manifest: Manifest, blob: Callable[[str], Path], into: Path) -> None:
    """The manifest's tree made in `into` (which must not exist): each file a copy of its
    blob (`blob(sha)`; the job never holds the cache's own file), with its exec bit; each
    link as named. `ManifestError` when a path would leave `into` (checked again here,
    whatever checked the manifest) or a blob's size is not the manifest's."""
    into.mkdir(mode=0o700)
    top = os.path.realpath(into)
    for entry in manifest.files:
        dest = _made_parent(top, into, entry.path)
        _copy(blob(entry.sha256), dest, entry)
    for link in manifest.links:
        if not link_inside(link.path, link.target):
            raise ManifestError(f"link {link.path!r} points outside the job's folder")
        dest = _made_parent(top, into, link.path)
        os.symlink(link.target, dest)


def _made_parent(top: str, into: Path, path: str) -> Path:
    dest = into / path
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    parent = os.path.realpath(dest.parent)
    if parent != top and not parent.startswith(top + os.sep):
        raise ManifestError(f"{path!r} would be laid outside the job's folder")
    return dest


def _copy(source: Path, dest: Path, entry: Entry) -> None:
    mode = 0o755 if entry.executable else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with source.open("rb") as src, os.fdopen(os.open(dest, flags, mode), "wb") as out:
        size = os.fstat(src.fileno()).st_size
        if size != entry.size:
            raise ManifestError(f"{entry.path!r}: its blob is {size} bytes, the manifest "
                                f"says {entry.size}")  # fmt: skip
        while chunk := src.read(HASH_CHUNK):
            out.write(chunk)
        os.fchmod(out.fileno(), mode)  # as named, whatever the umask


# Gathering what a job left.


def out_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a relative path is named by one of the `--out` globs: `*`, `?` and `[...]`
    within a part (`fnmatch`, whose `*` cannot backtrack exponentially: a pattern like
    `*a*a*a*b` once held the agent's loop for minutes), `**` any number of parts; a
    pattern naming a folder names all under it."""
    split = [tuple(p for p in pattern.split("/") if p not in ("", ".")) for pattern in patterns]
    return lambda path: any(_glob_match(parts, tuple(path.split("/"))) for parts in split)


def _glob_match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    @functools.cache
    def at(i: int, j: int) -> bool:
        if i == len(pattern):
            return True  # all of the pattern: this path, or one under the folder it names
        if pattern[i] == "**":
            return any(at(i + 1, k) for k in range(j, len(path) + 1))
        return j < len(path) and fnmatch.fnmatchcase(path[j], pattern[i]) and at(i + 1, j + 1)

    return at(0, 0)


@dataclass(slots=True)
class Found:
    """What a folder holds that may be sent: regular files and links that stay inside."""

    files: list[str]
    links: list[Link]
    skipped: list[str]  # what was left out, and why (logged)


def gather(folder: Path, wanted: Callable[[str], bool] | None = None) -> Found:
    """Regular files and inside links under `folder` (relative paths) that `wanted` names
    (all when None), walked without following any link; the save marker left out."""
    found = Found([], [], [])
    if not folder.is_dir() or folder.is_symlink():
        return found
    for top, dirs, names in os.walk(folder, followlinks=False):
        rel_top = os.path.relpath(top, folder)
        for name in [*dirs, *names]:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if rel == SAVE_MARKER or (wanted is not None and not wanted(rel)):
                continue
            _take(folder, rel, found)
        if len(found.files) + len(found.links) > MAX_FILES:
            raise ManifestError(f"more than {MAX_FILES} files under {folder.name}/")
    return found


def _resolves_inside(folder: Path, rel: str) -> bool:
    """Where the system takes the link, through any other links: still in the folder."""
    top = os.path.realpath(folder)
    return os.path.commonpath([top, os.path.realpath(folder / rel)]) == top


def _take(folder: Path, rel: str, found: Found) -> None:
    try:
        check_path(rel)
        st = os.lstat(folder / rel)
    except ManifestError:  # a name no manifest may hold (a backslash): that file only
        found.skipped.append(f"{rel[:200]!r} (a name a manifest cannot hold)")
        return
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(folder / rel)
        if link_inside(rel, target) and _resolves_inside(folder, rel):
            found.links.append(Link(rel, target))
        else:
            found.skipped.append(f"{rel} (a link out of its folder)")
    elif stat.S_ISREG(st.st_mode):
        found.files.append(rel)
    elif not stat.S_ISDIR(st.st_mode):
        found.skipped.append(f"{rel} (not a regular file)")


def open_inside(folder: Path, rel: str) -> BinaryIO | None:
    """`folder/rel` opened for reading when it is a regular file that is really inside
    `folder` (no link followed on the way, whatever the job swapped in since it was
    found); else None."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(folder / rel, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _fd_inside(fd, folder):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except OSError:
        os.close(fd)
        return None


def _fd_inside(fd: int, folder: Path) -> bool:
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the name as opened (O_NOFOLLOW guarded its last part)
        return True
    top = os.path.realpath(folder)
    return real.startswith(top + os.sep)


def hash_inside(folder: Path, rel: str) -> Entry | None:
    """The entry for one found file (its hash and size, read once), or None when it is no
    longer a regular file inside `folder`."""
    f = open_inside(folder, rel)
    if f is None:
        return None
    with f:
        digest, size = hashlib.sha256(), 0
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        executable = bool(os.fstat(f.fileno()).st_mode & 0o100)
    return Entry(rel, digest.hexdigest(), size, executable)


# Sending a tree back.


async def save_tree(
    channel: FileChannel,
    key: tuple[uuid.UUID, int],
    folder: Path,
    kind: FileKind,
    wanted: Callable[[str], bool] | None = None,
    *,
    unless: str | None = None,
) -> str | None:
    """Send what `folder` holds (that `wanted` names) as a manifest: the orchestrator asked
    which blobs it lacks, those sent (a few at once), then the manifest, then recorded as
    the attempt's `kind`. The manifest's hash; None when there was nothing to send, or the
    tree is the one named `unless` (saved already). `TransportError` when it failed (a file
    that changed while it was sent is refused by the orchestrator: send it again later)."""
    found = await asyncio.to_thread(gather, folder, wanted)
    for skipped in found.skipped[:20]:
        log.info("attempt %s of %s: %s not sent: %s", key[1], key[0], kind, skipped)
    entries = [e for e in await asyncio.to_thread(_hash_all, folder, found.files) if e]
    if not entries and not found.links and kind == "checkpoint":
        return None
    manifest = Manifest.of(entries, found.links)
    if manifest.digest == unless:
        return None
    by_hash = {e.sha256: e.path for e in entries}
    missing = set(await channel.missing_blobs(*key, sorted({*by_hash, manifest.digest})))
    slots = asyncio.Semaphore(PARALLEL)

    async def send(sha: str) -> None:
        async with slots:
            source = await asyncio.to_thread(open_inside, folder, by_hash[sha])
            if source is None:  # gone since it was hashed: refused as a whole, later
                raise ManifestError(f"{by_hash[sha]!r} changed while it was sent")
            with source:
                await channel.put_blob(*key, sha, source)

    await asyncio.gather(*(send(sha) for sha in by_hash if sha in missing))
    if manifest.digest in missing:
        await channel.put_blob(*key, manifest.digest, manifest.to_bytes())
    verdict = await channel.record_files(*key, kind, manifest.digest)
    log.info("attempt %s of %s: %s saved (%d files, %d bytes, %d sent): %s", key[1], key[0],
             kind, len(entries), manifest.total_bytes, len(missing), verdict)  # fmt: skip
    return manifest.digest


def _hash_all(folder: Path, files: list[str]) -> list[Entry | None]:
    return [hash_inside(folder, rel) for rel in files]


def remove_tree(path: Path) -> None:
    """A staging folder removed, whatever it holds (never following a link)."""
    import shutil

    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        shutil.rmtree(path)
