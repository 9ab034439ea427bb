"""An attempt's files (agent.hooks.disk): removed once its end is heard (after the owner's
retention), its small markers kept; a restarted agent removes what is past retention."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chiffon.agent.attempts import REPORTED, Attempt
from chiffon.agent.hooks.disk import RemoveFiles, remove_files, remove_old, used_bytes


@dataclass
class _Settings:
    keep_attempt_files_seconds: float | None


@dataclass
class _Parts:
    settings: _Settings
    spawn: Any = None


def _attempt_dir(root: Path, name: str = "a-1") -> Path:
    d = root / name
    (d / "work" / "results").mkdir(parents=True)
    (d / "work" / "results" / "model.pt").write_bytes(b"x" * 10_000)
    (d / "work" / "locked").mkdir(mode=0o000)  # the job took its own rights away
    (d / "tmp").mkdir()
    (d / "tmp" / "scratch").write_bytes(b"y" * 10_000)
    (d / "output.log").write_text("hello\n")
    (d / "ended").write_text("{}")
    (d / REPORTED).touch()
    (d / "issued").write_text("1.0")
    return d


def _left(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


async def test_files_go_once_the_end_is_heard_and_the_markers_stay(tmp_path: Path) -> None:
    d = _attempt_dir(tmp_path)
    attempt = Attempt((uuid.uuid4(), 1), d, state="reported")
    await RemoveFiles(_Parts(_Settings(None))).stop(attempt)  # type: ignore[arg-type]
    assert _left(d) == ["ended", "issued", REPORTED]


async def test_an_end_not_heard_keeps_its_files(tmp_path: Path) -> None:
    d = _attempt_dir(tmp_path)
    attempt = Attempt((uuid.uuid4(), 1), d, state="ended")
    await RemoveFiles(_Parts(_Settings(None))).stop(attempt)  # type: ignore[arg-type]
    assert "work" in _left(d) and "output.log" in _left(d)
    os.chmod(d / "work" / "locked", 0o700)


async def test_files_kept_for_debugging_go_after_the_retention(tmp_path: Path) -> None:
    d = _attempt_dir(tmp_path)
    attempt = Attempt((uuid.uuid4(), 1), d, state="reported")
    await RemoveFiles(_Parts(_Settings(0.3))).stop(attempt)  # type: ignore[arg-type]
    assert "work" in _left(d)
    await asyncio.sleep(1.0)
    assert _left(d) == ["ended", "issued", REPORTED]


def test_a_restarted_agent_removes_what_is_past_its_retention(tmp_path: Path) -> None:
    old, new = _attempt_dir(tmp_path, "a-1"), _attempt_dir(tmp_path, "b-1")
    past = time.time() - 7200
    os.utime(old / REPORTED, (past, past))
    assert remove_old(tmp_path, 3600, time.time()) == 1
    assert _left(old) == ["ended", "issued", REPORTED]
    assert "work" in _left(new)
    os.chmod(new / "work" / "locked", 0o700)


def _nest(top: Path, depth: int) -> None:
    """Folders `depth` deep under `top`, made through a dir fd (paths that long cannot
    be named whole)."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(b"z" * 100_000)
    finally:
        os.close(fd)


def test_folders_thousands_deep_are_counted_and_removed(tmp_path: Path) -> None:
    """A job nested 1,100 folders: the disk count raised RecursionError (the cap's check
    died and the job wrote past it) and so did the removal (the files stayed, and the
    agent's next start died in its sweep)."""
    d = _attempt_dir(tmp_path)
    _nest(d / "work", 1100)
    assert used_bytes(d / "work") >= 1100 * 4096 + 100_000
    remove_files(d)
    assert _left(d) == ["ended", "issued", REPORTED]


def test_empty_files_and_links_are_not_free(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"l{i}").symlink_to("/nowhere")
    assert used_bytes(tmp_path) >= 2000 * 4096  # a block each, though they hold nothing


def test_links_are_removed_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    d = _attempt_dir(tmp_path, "c-1")
    (d / "work" / "escape").symlink_to(outside)
    (d / "tmp" / "file-link").symlink_to(outside / "keep")
    remove_files(d)
    assert (outside / "keep").read_text() == "mine"
    assert _left(d) == ["ended", "issued", REPORTED]
