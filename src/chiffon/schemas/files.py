"""A job's files as the pool moves them: a manifest of paths, each naming the SHA-256 of
its content (a blob in the orchestrator's store, `orchestrator.store`).

The same manifest describes three things: a snapshot of the user's folder (code in), what
an attempt leaves that its `--out` patterns name (results out), and its checkpoint folder
(`CHIFFON_CHECKPOINT_DIR`). A manifest is itself stored as a blob, so one hash names the
whole tree; the order to an agent carries only that hash (docs/jobs.md, "Your code and
data").

Every manifest is input wherever it is read: `Manifest.parse` refuses an absolute path, a
`..`, a path twice, a file under another file, a link whose target leaves the tree, and a
hash that is not one. Free of pydantic: the agent imports it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1
MAX_FILES = 100_000
MAX_PATH_CHARS = 4096
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
HASH_CHUNK = 1024 * 1024
SHA256 = re.compile(r"^[0-9a-f]{64}$")
OUT_PATTERN_MAX_CHARS = 1024
OUT_PATTERNS_MAX = 64


class ManifestError(ValueError):
    """A manifest, a path or a pattern that is refused; the message names it."""


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and SHA256.match(text) is not None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's SHA-256 (hex) and size, read once in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_path(path: object, what: str = "path") -> str:
    """`path` as a clean relative POSIX path inside its tree, or `ManifestError`."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what} must be a non-empty string")
    shown = repr(path[:200])
    if len(path) > MAX_PATH_CHARS or "\x00" in path or "\\" in path:
        raise ManifestError(f"{what} {shown} is too long or holds a NUL or a backslash")
    if path.startswith("/"):
        raise ManifestError(f"{what} {shown} is absolute: paths are relative to the job's folder")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"{what} {shown} has an empty, '.' or '..' part: it could leave "
                            "the job's folder")  # fmt: skip
    return path


def check_out_pattern(pattern: object) -> str:
    """An `--out` glob, relative to the job's folder and unable to leave it."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > OUT_PATTERN_MAX_CHARS:
        raise ManifestError(f"--out pattern must be 1 to {OUT_PATTERN_MAX_CHARS} characters")
    shown = repr(pattern[:200])
    if "\x00" in pattern or "\\" in pattern:
        raise ManifestError(f"--out {shown} holds a NUL or a backslash")
    if pattern.startswith("/") or pattern.startswith("~"):
        raise ManifestError(f"--out {shown} is absolute: patterns are relative to the job's "
                            "folder")  # fmt: skip
    if any(p == ".." for p in pattern.split("/")):
        raise ManifestError(f"--out {shown} has a '..': it could leave the job's folder")
    return pattern


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    sha256: str
    size: int
    executable: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size,
                "exec": self.executable}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Link:
    """A symbolic link inside the tree; its target resolves inside the tree too."""

    path: str
    target: str

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "target": self.target}


def link_inside(path: str, target: str) -> bool:
    """Whether a link at `path` to `target` (as `os.readlink` says it) stays in the tree."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return joined != ".." and not joined.startswith("../") and joined != "."


@dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[Entry, ...] = ()
    links: tuple[Link, ...] = ()
    _bytes: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def of(cls, files: Iterable[Entry], links: Iterable[Link] = ()) -> Manifest:
        """A manifest in its one canonical form (sorted by path), checked."""
        m = cls(tuple(sorted(files, key=lambda e: e.path)),
                tuple(sorted(links, key=lambda e: e.path)))  # fmt: skip
        return cls.parse(m.to_bytes())

    def to_bytes(self) -> bytes:
        if self._bytes:
            return self._bytes
        doc = {"v": MANIFEST_VERSION, "files": [e.as_json() for e in self.files],
               "links": [k.as_json() for k in self.links]}  # fmt: skip
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @property
    def digest(self) -> str:
        """The manifest's own hash: the name of the whole tree."""
        return sha256_bytes(self.to_bytes())

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def blobs(self) -> set[str]:
        """The content hashes it names (not its own)."""
        return {e.sha256 for e in self.files}

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.files)

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """A manifest from its bytes, every path and hash checked; `ManifestError` names the
        first that is refused."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(raw)} bytes, over {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("v") != MANIFEST_VERSION:
            raise ManifestError(f"manifest is not version {MANIFEST_VERSION}")
        files, links = doc.get("files"), doc.get("links", [])
        if not isinstance(files, list) or not isinstance(links, list):
            raise ManifestError("manifest's files and links must be lists")
        if len(files) + len(links) > MAX_FILES:
            raise ManifestError(f"manifest names more than {MAX_FILES} paths")
        entries = tuple(_entry(f) for f in files)
        linked = tuple(_link(k) for k in links)
        _one_tree([e.path for e in entries] + [k.path for k in linked])
        _no_link_through_a_link(linked)
        return cls(entries, linked, raw)


def _entry(f: object) -> Entry:
    if not isinstance(f, dict):
        raise ManifestError("a manifest's file must be an object")
    path = check_path(f.get("path"))
    sha, size, executable = f.get("sha256"), f.get("size"), f.get("exec", False)
    if not is_sha256(sha):
        raise ManifestError(f"{path!r}: sha256 is not 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{path!r}: size must be a whole number of bytes")
    if not isinstance(executable, bool):
        raise ManifestError(f"{path!r}: exec must be true or false")
    return Entry(path, str(sha), size, executable)


def _link(k: object) -> Link:
    if not isinstance(k, dict):
        raise ManifestError("a manifest's link must be an object")
    path, target = check_path(k.get("path"), "link"), k.get("target")
    if not isinstance(target, str) or not link_inside(path, target):
        raise ManifestError(f"link {path!r} points outside the job's folder ({target!r})")
    return Link(path, target)


def _no_link_through_a_link(links: tuple[Link, ...]) -> None:
    """No link's target goes *through* another link of the tree (`a -> b/../../x` with `b`
    a link): the system follows `b` there, so `..` after it climbs from wherever `b`
    leads, and a chain of links each inside on its own can leave the tree. A link to a
    link (`libx.so -> libx.so.1`) is fine: each hop is checked on its own."""
    named = {k.path for k in links}
    for k in links:
        parts = [*posixpath.dirname(k.path).split("/"), *k.target.split("/")]
        parts = [p for p in parts if p not in ("", ".")]
        stack: list[str] = []
        for i, part in enumerate(parts):
            if part == "..":
                if not stack:
                    raise ManifestError(f"link {k.path!r} points outside the job's folder")
                stack.pop()
                continue
            stack.append(part)
            through = "/".join(stack)
            if through in named and i < len(parts) - 1:
                raise ManifestError(f"link {k.path!r} goes through the link {through!r}: it "
                                    "could lead outside the job's folder")  # fmt: skip


def _one_tree(paths: list[str]) -> None:
    """No path twice, and none under another (a file `a` and a file `a/b`)."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise ManifestError(f"{path!r} is named twice")
        seen.add(path)
    for path in paths:
        parent = posixpath.dirname(path)
        while parent:
            if parent in seen:
                raise ManifestError(f"{path!r} is under {parent!r}, which is a file or link")
            parent = posixpath.dirname(parent)
