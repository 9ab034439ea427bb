"""What `chiffon run` sends of the user's folder (cli/sync.py), on real folders with a real
`git`: what git ignores and `.chiffonignore` names stay home, `.git` never travels, links
inside travel as links, and a link leaving the folder, an unreadable file and a folder
over the cap are each refused with one line naming them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon.cli.common import EXIT_USAGE, CliError
from chiffon.cli.sync import Snapshot, SyncSettings, human_bytes, snapshot
from chiffon.schemas.files import Manifest, sha256_bytes

MB = 1_000_000
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for path, content in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        full.write_bytes(data)


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip


def paths(snap: Snapshot) -> list[str]:
    return [e.path for e in snap.manifest.files]


def take(root: Path, max_bytes: int = 500 * MB) -> Snapshot:
    return snapshot(root, max_bytes=max_bytes)


def refusal(root: Path, max_bytes: int = 500 * MB) -> str:
    with pytest.raises(CliError) as caught:
        take(root, max_bytes)
    assert caught.value.code == EXIT_USAGE
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A project under git: code committed, a build folder and logs ignored."""
    root = tmp_path / "proj"
    write(root, {".gitignore": "build/\n*.log\n!keep.log\n", "train.py": "print(1)\n",
                 "src/model.py": "W = 1\n", "build/out.bin": b"\0" * 10, "run.log": "x",
                 "keep.log": "kept"})  # fmt: skip
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "first")
    return root


@needs_git
def test_git_folder_sends_tracked_and_untracked_files_but_not_what_git_ignores(
    repo: Path,
) -> None:
    write(repo, {"notes.md": "untracked, not ignored", "debug.log": "ignored"})
    snap = take(repo)
    assert paths(snap) == [".gitignore", "keep.log", "notes.md", "src/model.py", "train.py"]
    assert snap.honoured == (".gitignore",)
    assert not any(p.startswith(".git/") for p in paths(snap))


@needs_git
def test_chiffonignore_leaves_out_its_patterns_too(repo: Path) -> None:
    write(repo, {".chiffonignore": "data/\n*.ckpt\n", "data/big.bin": b"1" * 100,
                 "model.ckpt": "w", "src/a.ckpt": "w"})  # fmt: skip
    snap = take(repo)
    assert paths(snap) == [".chiffonignore", ".gitignore", "keep.log", "src/model.py",
                           "train.py"]  # fmt: skip
    assert snap.honoured == (".gitignore", ".chiffonignore")
    line = snap.summary(new=0)
    size = human_bytes(snap.manifest.total_bytes)
    assert line == f"sending 5 files, {size}; .gitignore and .chiffonignore honoured; 0 new"


@needs_git
def test_a_subfolder_of_a_work_tree_sends_only_itself_with_its_parents_rules(
    repo: Path,
) -> None:
    write(repo, {"src/x.log": "ignored by the parent's .gitignore", "src/new.py": "y"})
    snap = take(repo / "src")
    assert paths(snap) == ["model.py", "new.py"]


@needs_git
def test_a_tracked_file_deleted_from_the_folder_is_not_sent(repo: Path) -> None:
    (repo / "train.py").unlink()
    assert "train.py" not in paths(take(repo))


def test_a_folder_outside_git_honours_its_gitignore_files_as_git_would(
    tmp_path: Path,
) -> None:
    write(tmp_path, {".gitignore": "*.tmp\ncache/\n/top-only.txt\n", "a.py": "a",
                     "x.tmp": "", "cache/c": "", "deep/cache/c": "", "top-only.txt": "",
                     "deep/top-only.txt": "kept: '/' anchors to the .gitignore's folder",
                     "deep/.gitignore": "!keep.tmp\n", "deep/keep.tmp": "kept: negated",
                     "deep/drop.tmp": "", ".git/HEAD": "a broken repository: never sent",
                     "sub/.git": "also never"})  # fmt: skip
    snap = take(tmp_path)
    assert paths(snap) == [".gitignore", "a.py", "deep/.gitignore", "deep/keep.tmp",
                           "deep/top-only.txt"]  # fmt: skip
    assert snap.honoured == (".gitignore",)


def test_nothing_ignored_says_so(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": "print(2)\n"})
    assert take(tmp_path).summary(new=1) == "sending 1 file, 9 B; nothing ignored; 1 new"


def test_the_manifest_names_each_files_content_and_executable_bit(tmp_path: Path) -> None:
    write(tmp_path, {"run.sh": "#!/bin/sh\n", "same1": "dup", "same2": "dup"})
    (tmp_path / "run.sh").chmod(0o755)
    snap = take(tmp_path)
    doc = json.loads(snap.manifest.to_bytes())
    assert [(f["path"], f["exec"]) for f in doc["files"]] == [
        ("run.sh", True), ("same1", False), ("same2", False)]  # fmt: skip
    assert doc["files"][1]["sha256"] == sha256_bytes(b"dup")
    assert set(snap.sources) == snap.manifest.blobs()  # one local file per blob
    assert Manifest.parse(snap.manifest.to_bytes()).digest == snap.digest


def test_a_link_inside_travels_as_a_link_an_absolute_one_made_relative(
    tmp_path: Path,
) -> None:
    write(tmp_path, {"data/v1.csv": "1,2\n"})
    (tmp_path / "latest.csv").symlink_to("data/v1.csv")
    (tmp_path / "data" / "abs.csv").symlink_to(tmp_path / "data" / "v1.csv")
    (tmp_path / "dir-link").symlink_to("data", target_is_directory=True)
    snap = take(tmp_path)
    assert paths(snap) == ["data/v1.csv"]
    links = {k.path: k.target for k in snap.manifest.links}
    assert links == {"latest.csv": "data/v1.csv", "data/abs.csv": "v1.csv",
                     "dir-link": "data"}  # fmt: skip


@pytest.mark.parametrize("target", ["../../elsewhere", "/etc/passwd", "a/../../../x"])
def test_a_link_leaving_the_folder_is_refused_naming_it(tmp_path: Path, target: str) -> None:
    root = tmp_path / "proj"
    write(root, {"data/a": "a"})
    (root / "data" / "escape").symlink_to(target)
    message = refusal(root)
    assert message.startswith("data/escape is a link to ")
    assert "outside the folder" in message and ".chiffonignore" in message


def test_an_escaping_link_that_is_ignored_is_not_refused(tmp_path: Path) -> None:
    write(tmp_path, {"a": "a", ".chiffonignore": "escape\n"})
    (tmp_path / "escape").symlink_to("/etc")
    assert paths(take(tmp_path)) == [".chiffonignore", "a"]


def test_a_folder_over_the_cap_is_refused_naming_its_largest_files(tmp_path: Path) -> None:
    write(tmp_path, {"weights.bin": b"w" * 3000, "data/train.npy": b"d" * 2000,
                     "small.py": "s", "mid.txt": b"m" * 1000})  # fmt: skip
    message = refusal(tmp_path, max_bytes=5000)
    assert "holds 6.0 kB to send, over the 5.0 kB cap (--sync-max-mb, CHIFFON_SYNC_MAX_MB)" \
        in message  # fmt: skip
    assert "largest: weights.bin (3.0 kB), data/train.npy (2.0 kB), mid.txt (1.0 kB);" in message
    assert take(tmp_path, max_bytes=6001).manifest.total_bytes == 6001


def test_a_name_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"bad\xffname")).write_text("x")
    assert "its name is not plain UTF-8" in refusal(tmp_path)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="chiffon-sync-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to collect as an unprivileged user (root reads all)",
)
def test_a_file_the_user_cannot_read_is_refused_naming_it(shared_folder: Path) -> None:
    write(shared_folder, {"ok.py": "x", "secret/key.pem": "k"})
    for path in (shared_folder / "ok.py", shared_folder / "secret"):
        path.chmod(0o755)
    (shared_folder / "secret" / "key.pem").chmod(0o600)
    code = ("import sys; from pathlib import Path; from chiffon.cli.sync import snapshot\n"
            "from chiffon.cli.common import CliError\n"
            "try: snapshot(Path(sys.argv[1]), max_bytes=10**9)\n"
            "except CliError as e: print(e); sys.exit(e.code)\n")  # fmt: skip
    done = subprocess.run([*NOBODY, sys.executable, "-c", code, str(shared_folder)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stdout.strip() == ("cannot read secret/key.pem (permission denied): make it "
                                   "readable or add it to .chiffonignore")  # fmt: skip


def test_the_cap_comes_from_the_flag_else_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert SyncSettings.build().max_bytes == 500 * MB
    monkeypatch.setenv("CHIFFON_SYNC_MAX_MB", "20")
    assert SyncSettings.build().max_bytes == 20 * MB
    assert SyncSettings.build(1.5).max_bytes == 1_500_000
    monkeypatch.setenv("CHIFFON_SYNC_MAX_MB", "lots")
    with pytest.raises(CliError) as caught:
        SyncSettings.build()
    assert str(caught.value) == ("bad setting max_mb = 'lots' (from env CHIFFON_SYNC_MAX_MB): "
                                 "must be a number")  # fmt: skip
    with pytest.raises(CliError, match=r"max_mb = -1.0 \(from flag\): must be greater than 0"):
        SyncSettings.build(-1.0)


def test_what_came_back_from_earlier_jobs_is_not_sent_again(tmp_path: Path) -> None:
    # ./chiffon-out/ is where `chiffon run` and `chiffon get` put outputs: sending it would
    # make every run's snapshot new (no desktop's cache would hold it) and grow it each time.
    write(tmp_path, {"train.py": "print(1)\n", "chiffon-out/5f0c/model.pt": b"w" * 100,
                     "data/chiffon-out/keep.csv": "1,2\n"})  # fmt: skip
    assert paths(take(tmp_path)) == ["data/chiffon-out/keep.csv", "train.py"]
    git(tmp_path, "init", "-q")
    assert paths(take(tmp_path)) == ["data/chiffon-out/keep.csv", "train.py"]
