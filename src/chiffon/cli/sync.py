"""The user's folder as a job's snapshot, and a job's outputs back into a folder.

What is sent: the folder's files minus what git ignores (git's own list where the folder
is in a git work tree, untracked files that are not ignored included; elsewhere its
`.gitignore` files read as git reads them) minus the patterns of its `.chiffonignore`
(the same syntax); `.git` never. A link that stays inside the folder travels as a link; one
that leaves it, a file the user cannot read, and a folder over the size cap are each
refused with one line naming them: nothing is ever left out silently (SkyPilot's and Ray's
users were surprised by both, skypilot #1600, ray #45602).

Hashing is not cached: 200 MB in 2,000 files hashes in 0.2 s on the development machine
(`sha256_file` over /tmp, 2 cores), below what a cache keyed by size and mtime would save.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from chiffon.cli.common import EXIT_FAILED, EXIT_USAGE, CliError, describe_settings_error
from chiffon.schemas.files import (
    MAX_MANIFEST_BYTES,
    Entry,
    Link,
    Manifest,
    ManifestError,
    check_path,
    link_inside,
    sha256_file,
)

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

    from chiffon.client import Client
    from chiffon.schemas.jobs import FileSet

CHIFFONIGNORE = ".chiffonignore"
OUT_FOLDER = "chiffon-out"  # where `chiffon run` and `chiffon get` put outputs: never sent
GITIGNORE = ".gitignore"
DEFAULT_MAX_MB = 500.0
LARGEST_SHOWN = 3  # files a refusal over the cap names
TRANSFERS = 8  # blobs sent or fetched at once: 2,000 small files are latency, not bandwidth
BAR_AFTER_SECONDS = 1.0  # a transfer shorter than this shows no progress bar
GIT_SECONDS = 120.0
T = TypeVar("T")


class SyncSettings(BaseSettings):
    """The snapshot's settings: `--sync-max-mb`, else CHIFFON_SYNC_MAX_MB."""

    model_config = SettingsConfigDict(env_prefix="CHIFFON_SYNC_", extra="ignore")

    max_mb: float = Field(DEFAULT_MAX_MB, gt=0, allow_inf_nan=False)

    @classmethod
    def build(cls, max_mb: float | None = None) -> SyncSettings:
        given = {"max_mb": max_mb} if max_mb is not None else {}
        try:
            return cls(**given)  # type: ignore[arg-type]
        except ValidationError as exc:
            names = {"max_mb": "CHIFFON_SYNC_MAX_MB"}
            raise CliError(describe_settings_error(exc, given, names), code=EXIT_USAGE) from None

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1_000_000)


def human_bytes(n: float) -> str:
    """`1.2 MB`: decimal units, as `du --si` and the cap's MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A folder as its manifest, with a local file for each blob it names."""

    root: Path
    manifest: Manifest
    sources: dict[str, Path]  # content hash -> a file in the folder that holds it
    honoured: tuple[str, ...]  # the ignore files that took effect

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def summary(self, new: int) -> str:
        """`sending 37 files, 1.2 MB; .gitignore and .chiffonignore honoured; 0 new`."""
        files = len(self.manifest.files)
        ignored = " and ".join(self.honoured) + " honoured" if self.honoured else "nothing ignored"
        size = human_bytes(self.manifest.total_bytes)
        return f"sending {files} file{'s' if files != 1 else ''}, {size}; {ignored}; {new} new"


def snapshot(root: Path, *, max_bytes: int) -> Snapshot:
    """The snapshot of `root`; `CliError` (one line naming what) for a link leaving the
    folder, a file that cannot be read, a folder over `max_bytes`."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise CliError(f"{root} is not a folder to send", code=EXIT_USAGE)
    paths, honoured = _listing(root)
    # What came back from earlier jobs (`./chiffon-out/`) is not sent as the next one's code.
    paths = [p for p in paths if p.split("/", 1)[0] != OUT_FOLDER]
    ignore = _chiffonignore(root)
    if ignore is not None:
        paths = [p for p in paths if not ignore.match_file(p)]
        honoured.append(CHIFFONIGNORE)
    found = _look(root, paths)
    _check_size(root, found.sizes, max_bytes)
    files, sources = _hash(root, found.sizes, found.executable)
    try:
        manifest = Manifest.of(files, found.links)
    except ManifestError as exc:
        raise CliError(f"cannot send {root}: {exc}", code=EXIT_USAGE) from None
    return Snapshot(root, manifest, sources, tuple(honoured))


# --- which paths ------------------------------------------------------------------------


def _listing(root: Path) -> tuple[list[str], list[str]]:
    """Relative paths to send before `.chiffonignore`, and the ignore files honoured."""
    listed = _git_files(root)
    if listed is not None:
        return [p for p in listed if ".git" not in p.split("/")], [GITIGNORE]
    found, saw_gitignore = _walk(root)
    return found, [GITIGNORE] if saw_gitignore else []


def _git_files(folder: Path) -> list[str] | None:
    """git's own list when `folder` is in a work tree (tracked, and untracked that are
    not ignored); None when it is not, or git is not installed. A nested repository (a
    submodule, a clone inside the folder) is listed by its own git."""
    git = shutil.which("git")
    if git is None:
        return None
    inside = _git(git, folder, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != b"true":
        return None
    out = _git(git, folder, "ls-files", "-co", "--exclude-standard", "-z")
    if out is None:
        raise CliError(f"git could not list the files of {folder}; try --no-sync")
    found: list[str] = []
    for raw in out.split(b"\0"):
        path = os.fsdecode(raw).rstrip("/")
        if not path:
            continue
        full = folder / path
        if full.is_dir() and not full.is_symlink():  # a nested repository
            found += [f"{path}/{p}" for p in _nested(full)]
        else:
            found.append(path)
    return found


def _nested(folder: Path) -> list[str]:
    listed = _git_files(folder)
    return listed if listed is not None else _walk(folder)[0]


def _git(git: str, folder: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(
            [git, "-c", "core.quotePath=false", *args],
            cwd=folder, capture_output=True, timeout=GIT_SECONDS, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


Rules = list[tuple[str, "GitIgnoreSpec"]]  # (the folder a .gitignore is in, its patterns)


def _walk(root: Path) -> tuple[list[str], bool]:
    """Files under `root` less what its `.gitignore` files ignore, read as git does (each
    applies below its folder, a deeper one overrides, an ignored folder is not entered);
    and whether any `.gitignore` was found."""
    found: list[str] = []
    saw = False
    stack: list[tuple[str, Rules]] = [("", [])]
    while stack:
        rel, rules = stack.pop()
        here = root / rel if rel else root
        spec = _read_spec(here / GITIGNORE)
        if spec is not None:
            saw, rules = True, [*rules, (rel, spec)]
        for entry in _entries(here, root):
            path = f"{rel}/{entry.name}" if rel else entry.name
            folder = entry.is_dir(follow_symlinks=False)
            if entry.name == ".git" or _ignored(path, folder, rules):
                continue
            if folder and (Path(entry.path) / ".git").exists():
                found += [f"{path}/{p}" for p in _nested(Path(entry.path))]
            elif folder:
                stack.append((path, rules))
            else:
                found.append(path)
    return found, saw


def _entries(here: Path, root: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(here) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        where = here.relative_to(root).as_posix()
        raise CliError(
            f"cannot read the folder {where} (permission denied): make it "
            f"readable or add it to {CHIFFONIGNORE}",
            code=EXIT_USAGE,
        ) from None


def _ignored(path: str, folder: bool, rules: Rules) -> bool:
    """git's answer: the deepest `.gitignore` whose pattern matches decides."""
    ignored = False
    for base, spec in rules:
        sub = path[len(base) + 1 :] if base else path
        include = spec.check_file(sub + "/" if folder else sub).include
        if include is not None:
            ignored = include
    return ignored


def _read_spec(path: Path) -> GitIgnoreSpec | None:
    from pathspec import GitIgnoreSpec

    try:
        lines = path.read_text(errors="replace").splitlines()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", code=EXIT_USAGE) from None
    return GitIgnoreSpec.from_lines(lines)


def _chiffonignore(root: Path) -> GitIgnoreSpec | None:
    return _read_spec(root / CHIFFONIGNORE)


# --- what each path is --------------------------------------------------------------------


@dataclass(slots=True)
class _Found:
    sizes: dict[str, int]
    executable: set[str]
    links: list[Link]


def _look(root: Path, paths: Iterable[str]) -> _Found:
    """Each path's kind and size (links checked); the unreadable refused, all named."""
    found = _Found({}, set(), [])
    unreadable: list[str] = []
    for path in sorted(set(paths)):
        _check_name(path)
        full = root / path
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue  # tracked by git but deleted from the folder
        if stat.S_ISLNK(st.st_mode):
            found.links.append(Link(path, _link_target(root, path)))
        elif stat.S_ISREG(st.st_mode):
            if not os.access(full, os.R_OK):
                unreadable.append(path)
            found.sizes[path] = st.st_size
            if st.st_mode & 0o111:
                found.executable.add(path)
        # A socket or a pipe holds no content to send.
    if unreadable:
        _refuse_unreadable(unreadable)
    return found


def _check_name(path: str) -> None:
    try:
        path.encode()
        check_path(path)
    except (UnicodeEncodeError, ManifestError):
        raise CliError(f"cannot send {path!r}: its name is not plain UTF-8 or holds a "
                       f"backslash; rename it or add it to {CHIFFONIGNORE}",
                       code=EXIT_USAGE) from None  # fmt: skip


def _link_target(root: Path, path: str) -> str:
    """The link's target, relative; `CliError` when it leaves the folder."""
    target = os.readlink(root / path)
    if os.path.isabs(target):
        absolute = os.path.normpath(target)
        for base in {str(root), os.path.realpath(root)}:
            if absolute.startswith(base.rstrip("/") + "/"):
                here = os.path.dirname(os.path.join(base, path))
                target = os.path.relpath(absolute, here)
                break
    top = os.path.realpath(root)
    through = os.path.commonpath([top, os.path.realpath(root / path)]) != top
    if through or not link_inside(path, target):  # through other links, or on its own
        raise CliError(f"{path} is a link to {target}, outside the folder sent: the job "
                       f"could not follow it; copy what it points to in, or add {path} to "
                       f"{CHIFFONIGNORE}", code=EXIT_USAGE)  # fmt: skip
    return target


def _refuse_unreadable(paths: list[str]) -> NoReturn:
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    raise CliError(f"cannot read {paths[0]}{more} (permission denied): make it readable or "
                   f"add it to {CHIFFONIGNORE}", code=EXIT_USAGE)  # fmt: skip


def _check_size(root: Path, sizes: dict[str, int], max_bytes: int) -> None:
    total = sum(sizes.values())
    if total <= max_bytes:
        return
    largest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:LARGEST_SHOWN]
    named = ", ".join(f"{p} ({human_bytes(n)})" for p, n in largest)
    raise CliError(
        f"{root} holds {human_bytes(total)} to send, over the {human_bytes(max_bytes)} cap "
        f"(--sync-max-mb, CHIFFON_SYNC_MAX_MB); largest: {named}; add what the job does "
        f"not need to {CHIFFONIGNORE}, raise the cap, or use --no-sync",
        code=EXIT_USAGE,
    )


def _hash(
    root: Path, sizes: dict[str, int], executable: set[str]
) -> tuple[list[Entry], dict[str, Path]]:
    files: list[Entry] = []
    sources: dict[str, Path] = {}
    for path in sizes:
        full = root / path
        try:
            sha, size = sha256_file(full)
        except PermissionError:
            _refuse_unreadable([path])
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}", code=EXIT_USAGE) from None
        files.append(Entry(path, sha, size, path in executable))
        sources.setdefault(sha, full)
    return files, sources


# --- transfers ----------------------------------------------------------------------------


class Bar:
    """A progress bar on stderr for a transfer that outlasts `BAR_AFTER_SECONDS`, only on
    a terminal; `advance` is safe from any thread."""

    def __init__(self, what: str, total_bytes: int) -> None:
        from chiffon.cli.common import err_console

        self._what, self._total = what, total_bytes
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._done = 0
        self._shown: Any = None
        self._task: Any = None
        self._enabled = err_console.is_terminal and total_bytes > 0

    def advance(self, n: int) -> None:
        with self._lock:
            self._done += n
            if not self._enabled:
                return
            if self._shown is None and time.monotonic() - self._started > BAR_AFTER_SECONDS:
                self._show()
            if self._shown is not None:
                self._shown.update(self._task, completed=self._done)

    def _show(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from chiffon.cli.common import err_console

        self._shown = Progress(
            "{task.description}", BarColumn(), DownloadColumn(binary_units=False),
            TransferSpeedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
        )  # fmt: skip
        self._task = self._shown.add_task(self._what, total=self._total, completed=self._done)
        self._shown.start()

    def close(self) -> None:
        with self._lock:
            if self._shown is not None:
                self._shown.stop()
                self._shown = None


@contextmanager
def bar(what: str, total_bytes: int) -> Iterator[Bar]:
    shown = Bar(what, total_bytes)
    try:
        yield shown
    finally:
        shown.close()


def send(c: Client, snap: Snapshot, tell: Callable[[str], None]) -> str:
    """Upload what the store lacks of `snap` (its files, then its manifest), saying first
    what is sent in one line; the manifest's hash, to submit as the job's snapshot."""
    missing = c.missing_blobs(snap.manifest.blobs() | {snap.digest})
    new_files = sorted(missing - {snap.digest})
    tell(snap.summary(len(new_files)))
    total = sum(snap.sources[sha].stat().st_size for sha in new_files)
    with bar("sending", total) as shown:
        _each(lambda sha: _put(c, sha, snap.sources[sha], shown.advance), new_files)
    if snap.digest in missing:
        c.put_blob(snap.digest, snap.manifest.to_bytes())
    return snap.digest


def _put(c: Client, sha: str, source: Path, progress: Callable[[int], None]) -> None:
    from chiffon.client import ChiffonError

    try:
        c.put_blob(sha, source, progress)
    except OSError as exc:  # gone since the snapshot was taken
        raise CliError(f"cannot read {source}: {exc.strerror}; nothing was submitted") from None
    except ChiffonError as exc:
        if exc.status != 400:
            raise
        # The store hashed other bytes than the snapshot did: the file is being written.
        raise CliError(f"{source} changed while it was sent; nothing was submitted: run "
                       "again once it is written", code=EXIT_USAGE) from None  # fmt: skip


def _each(work: Callable[[T], None], items: list[T]) -> None:
    """`work` on every item, `TRANSFERS` at once; the first failure (or Ctrl-C) is raised
    and the items not yet started are dropped."""
    pool = ThreadPoolExecutor(TRANSFERS)
    try:
        for done in [pool.submit(work, item) for item in items]:
            done.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


@dataclass(frozen=True, slots=True)
class Fetched:
    folder: Path
    files: int
    bytes: int

    def line(self) -> str:
        n, size = self.files, human_bytes(self.bytes)
        return f"{n} output file{'s' if n != 1 else ''}, {size}, in {self.folder}"


def outputs_of(c: Client, job_id: uuid.UUID) -> FileSet | None:
    """The job's saved outputs, or None when it saved none."""
    return c.job_files(job_id).outputs


def fetch(c: Client, manifest_sha: str, to: Path) -> Fetched:
    """Write the tree `manifest_sha` names into `to`: each file to a temporary file,
    verified, renamed into place; a file already there with the same content is kept.
    Paths come from `Manifest.parse`: none can leave `to`, and a link already in `to`
    is never written through."""
    try:
        manifest = Manifest.parse(c.read_blob(manifest_sha, MAX_MANIFEST_BYTES))
    except ManifestError as exc:
        raise CliError(f"the job's outputs are refused: {exc}") from None
    to.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.realpath(to))
    wanted = [e for e in manifest.files if not _same(base / e.path, e)]
    total = sum(e.size for e in wanted)
    with bar("fetching", total) as shown:
        _each(lambda e: _fetch_one(c, base, e, shown.advance), wanted)
    for link in manifest.links:
        _place_link(base, link)
    return Fetched(to, len(manifest.files), manifest.total_bytes)


def _within(base: Path, path: str) -> Path:
    """Where `path` goes under `base`, its folders made; refused when one of them is a
    link leading out of `base`."""
    dest = base / path
    dest.parent.mkdir(parents=True, exist_ok=True)
    parent = os.path.realpath(dest.parent)
    if parent != str(base) and not parent.startswith(str(base) + os.sep):
        raise CliError(f"{path}: {dest.parent} leads outside {base}; not written through",
                       code=EXIT_FAILED)  # fmt: skip
    return dest


def _same(dest: Path, entry: Entry) -> bool:
    try:
        if dest.is_symlink() or not dest.is_file() or dest.stat().st_size != entry.size:
            return False
        return sha256_file(dest)[0] == entry.sha256
    except OSError:
        return False


def _fetch_one(c: Client, base: Path, entry: Entry, progress: Callable[[int], None]) -> None:
    dest = _within(base, entry.path)
    try:
        c.get_blob(entry.sha256, dest, progress, size=entry.size)
        if entry.executable:
            dest.chmod(dest.stat().st_mode | 0o111)
    except OSError as exc:
        raise CliError(f"cannot write {dest}: {exc.strerror}") from None


def _place_link(base: Path, link: Link) -> None:
    dest = _within(base, link.path)
    temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.link")
    try:
        os.symlink(link.target, temp)
        os.replace(temp, dest)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise CliError(f"cannot write the link {dest}: {exc.strerror}") from None
